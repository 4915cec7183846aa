"""WebVision: lists and folders, Inception-ResNet-v2 shapes, top-k, and Train_webvision.py end to end."""
import json
import os
import re

import numpy as np
import pytest
import torch

from dataloader_webvision import WebVision, transforms
from dividemix import topk_accuracy
from fake_realworld import write_fake_webvision
from imagelist import ListLoaders
from InceptionResNetV2 import InceptionResNetV2
from cli import UserError
import runs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_inception_resnet_v2_layout():
    net = InceptionResNetV2(num_classes=1000)
    # plus the 30,272 BatchNorm channels' running means this is the 55,873,736 of the reference TF-slim model
    assert sum(p.numel() for p in net.parameters()) == 55_843_464
    assert sum(m.num_features for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)) == 30_272
    assert all(m.eps == 0.001 for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d))
    net = InceptionResNetV2(num_classes=50).eval()
    x = torch.randn(1, 3, 299, 299)
    shapes = {}
    with torch.no_grad():
        for i, layer in enumerate(net.features):
            x = layer(x)
            shapes[type(layer).__name__] = tuple(x.shape[1:])
    assert shapes["Mixed5b"] == (320, 35, 35) and shapes["Mixed6a"] == (1088, 17, 17)
    assert shapes["Mixed7a"] == (2080, 8, 8) and shapes["ConvBN"] == (1536, 8, 8)
    assert net(torch.randn(2, 3, 75, 75)).shape == (2, 50)


def test_topk_metric_in_percent():
    logits = torch.eye(6)[[0, 1, 2, 3]] + 0.1 * torch.arange(6.0)
    assert topk_accuracy(logits, torch.tensor([0, 1, 5, 4]), ks=(1, 5)) == [50.0, 100.0]


def test_lists_keep_the_first_50_classes_and_folders(tmp_path):
    write_fake_webvision(str(tmp_path))
    data = WebVision(str(tmp_path), 50, 4, 75, "center", 0, torch.device("cpu"))
    assert len(data.train_paths) == 40 and data.train_labels.max() < 50
    assert data.val_paths[0] == os.path.join(str(tmp_path), "val_images_256", "val00000000.jpg")
    assert len(data.imagenet_paths) == 10 and data.imagenet_labels.max() < 50
    assert data.train_paths[0] == os.path.join(str(tmp_path), "google/q0000/000000.jpg")


def test_missing_files(tmp_path):
    cpu = torch.device("cpu")
    with pytest.raises(UserError, match="lacks info/train_filelist_google.txt, info/val_filelist.txt"):
        WebVision(str(tmp_path), 50, 4, 75, "center", 0, cpu)
    write_fake_webvision(str(tmp_path))
    os.remove(tmp_path / "val_images_256" / "val00000003.jpg")
    with pytest.raises(UserError, match=r"1 of 10 images listed in .*val_filelist.txt are missing"):
        WebVision(str(tmp_path), 50, 4, 75, "center", 0, cpu)


def test_train_crop_choices():
    random_tf, _ = transforms(299, "random_resized")
    center_tf, test_tf = transforms(299, "center")
    names = lambda tf: [type(t).__name__ for t in tf.transforms]  # noqa: E731
    assert names(random_tf)[:3] == ["Resize", "RandomResizedCrop", "RandomHorizontalFlip"]
    assert names(center_tf)[:3] == ["Resize", "CenterCrop", "RandomHorizontalFlip"]
    assert test_tf.transforms[0].size == 320 and test_tf.transforms[1].size == (299, 299)
    with pytest.raises(UserError, match="unknown --train_crop"):
        transforms(299, "five_crop")


def run_script(*args):
    """Run Train_webvision.py; return the completed process."""
    return runs.run_script("Train_webvision.py", *args, check=False)


@runs.LARGE_ON_DISK
@pytest.mark.slow
def test_train_webvision_end_to_end(tmp_path):
    data = tmp_path / "webvision"
    write_fake_webvision(str(data), n_train=12, n_val=6, n_imagenet=6)
    out = tmp_path / "out"
    proc = run_script("--data_path", data, "--output_dir", out, "--batch_size", 4, "--image_size", 107,
                      "--num_workers", 0, "--num_epochs", 1)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    acc = (out / "webvision_acc.txt").read_text().splitlines()
    pattern = r"Epoch:%d \t WebVision Acc: \d+\.\d\d%% \(\d+\.\d\d%%\) \t ImageNet Acc: \d+\.\d\d%% \(\d+\.\d\d%%\)"
    assert len(acc) == 2 and all(re.fullmatch(pattern % e, line) for e, line in enumerate(acc))
    stats = (out / "webvision_stats.txt").read_text().splitlines()
    assert len(stats) == 2 and all(re.fullmatch(r"Numer of labeled samples:\d+ ", s) for s in stats)
    records = [json.loads(x) for x in (out / "webvision_log.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in records] == ["warmup", "train"]
    for key in ("webvision_top1", "webvision_top5", "imagenet_top1", "imagenet_top5"):
        assert 0 <= records[1][key] <= 100
    assert records[0]["net1"]["labeled"] + records[0]["net1"]["unlabeled"] == 12
    # the division made at the end of epoch 0 by net2 is the one net1 trains on in epoch 1
    assert stats[0] == "Numer of labeled samples:%d " % records[0]["net2"]["labeled"]
    assert records[1]["net1"]["Lu"] == 0.0


@pytest.mark.slow
def test_missing_data_is_one_line(tmp_path):
    proc = run_script("--data_path", tmp_path, "--output_dir", tmp_path / "o")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().startswith("error: WebVision:")


def test_an_empty_division_gives_loaders_of_no_batches():
    """A division that labels nothing (or everything) leaves an empty list: its loader yields no batch."""
    loaders = ListLoaders(0, torch.device("cpu"), 0)
    for mode, shuffle in (("labeled", True), ("unlabeled", True), ("plain", False)):
        loader = loaders([], np.zeros(0, dtype=np.int64), lambda image: image, mode, np.zeros(0), 4, shuffle)
        assert list(loader) == [] and len(loader.dataset) == 0
