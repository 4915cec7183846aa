"""Clothing1M: class-balanced draws, list checks, the model, and Train_clothing1M.py end to end."""
import json
import os
import re

import numpy as np
import pytest
import torch

from dataloader_clothing1M import Clothing1M
from fake_realworld import write_fake_clothing1m
from imagelist import class_balanced_draw
from cli import UserError
import runs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def reference_draw(labels, num_samples, num_class, order):
    """The original loop, over a given shuffled order."""
    counts, kept = np.zeros(num_class), []
    for i in order:
        if counts[labels[i]] < num_samples / num_class and len(kept) < num_samples:
            kept.append(i)
            counts[labels[i]] += 1
    return kept


@pytest.mark.parametrize("num_samples", [10, 70, 140, 1000])
def test_class_balanced_draw_matches_the_loop(num_samples):
    rng_labels = np.random.default_rng(0)
    labels = rng_labels.choice(14, size=600, p=np.linspace(1, 3, 14) / np.linspace(1, 3, 14).sum())
    rng = np.random.RandomState(5)
    drawn = class_balanced_draw(labels, num_samples, 14, rng)
    order = np.random.RandomState(5).permutation(len(labels))
    expected = reference_draw(labels, num_samples, 14, order)
    assert sorted(drawn.tolist()) == sorted(expected)
    counts = np.bincount(labels[drawn], minlength=14)
    assert counts.max() <= np.ceil(num_samples / 14) and len(drawn) <= num_samples


def test_missing_list_and_images(tmp_path):
    write_fake_clothing1m(str(tmp_path), n_train=20, n_val=5, n_test=5)
    cpu = torch.device("cpu")
    os.remove(tmp_path / "clean_test_key_list.txt")
    with pytest.raises(UserError, match="lacks clean_test_key_list.txt"):
        Clothing1M(str(tmp_path), 14, 4, 2, 32, 0, cpu)
    write_fake_clothing1m(str(tmp_path), n_train=20, n_val=5, n_test=5)
    for name in os.listdir(tmp_path / "1"):
        os.remove(tmp_path / "1" / name)
    with pytest.raises(UserError, match=r"\d+ of \d+ images listed in .*noisy_train_key_list.txt are missing"):
        Clothing1M(str(tmp_path), 14, 4, 2, 32, 0, cpu)


def test_paths_drop_the_images_prefix_and_labels_come_from_the_right_kv(tmp_path):
    write_fake_clothing1m(str(tmp_path), n_train=20, n_val=5, n_test=5)
    data = Clothing1M(str(tmp_path), 14, 4, 2, 32, 0, torch.device("cpu"))
    assert data.train_paths[0] == os.path.join(str(tmp_path), "0/train_0.jpg")
    assert data.train_labels[0] == 1 and data.train_labels[1] == 1  # noisy kv (key 0 was flipped)
    assert data.val_labels.tolist() == [0, 1, 2, 3, 4]  # clean kv


def run_script(*args):
    """Run Train_clothing1M.py; return the completed process."""
    return runs.run_script("Train_clothing1M.py", *args, check=False)


@runs.LARGE_ON_DISK
@pytest.mark.slow
def test_train_clothing1m_end_to_end(tmp_path):
    data = tmp_path / "clothing"
    write_fake_clothing1m(str(data))
    out = tmp_path / "out"
    common = ["--data_path", data, "--output_dir", out, "--pretrained", "none", "--batch_size", 4, "--num_batches", 3,
              "--image_size", 48, "--num_workers", 0]
    proc = run_script(*common, "--num_epochs", 1)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    lines = (out / "clothing1m.txt").read_text().splitlines()
    assert re.fullmatch(r"Validation Epoch:0      Acc1:\d+\.\d\d  Acc2:\d+\.\d\d", lines[0])
    assert lines[1].startswith("Validation Epoch:1      Acc1:")
    assert re.fullmatch(r"Test Accuracy:\d+\.\d\d", lines[2])
    records = [json.loads(x) for x in (out / "clothing1m_log.jsonl").read_text().splitlines()]
    assert [r.get("phase") for r in records] == ["warmup", "train", "test"]
    assert records[1]["net1"]["labeled"] + records[1]["net1"]["unlabeled"] == 12  # a 3 x 4 draw per net
    assert records[1]["net1"]["Lu"] == 0.0 and records[1]["net1"]["iterations"] >= 1
    assert "val_acc1" in records[0] and "test_acc" in records[2]
    for k in (1, 2):
        state = torch.load(out / f"clothing1m_net{k}.pth.tar", weights_only=True)
        assert state["fc.weight"].shape == (14, 2048)
    assert json.loads((out / "clothing1m_config.json").read_text())["script"] == "Train_clothing1M.py"

    proc = run_script(*common, "--num_epochs", 1)  # a second start would overwrite: refused
    assert proc.returncode == 2 and "already holds a clothing1m run" in proc.stderr


@pytest.mark.slow
def test_missing_data_is_one_line(tmp_path):
    proc = run_script("--data_path", tmp_path, "--output_dir", tmp_path / "o", "--pretrained", "none")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().startswith("error: Clothing1M:") and "noisy_label_kv.txt" in proc.stderr


def test_unavailable_imagenet_weights_message(tmp_path, monkeypatch):
    import torchvision

    import Train_clothing1M
    from dividemix import Precision

    def offline(*args, **kwargs):
        raise RuntimeError("no network")

    monkeypatch.setattr(torchvision.models, "resnet50", offline)
    with pytest.raises(UserError, match="cannot load the ImageNet weights of ResNet-50.*--pretrained PATH"):
        Train_clothing1M.create_model("imagenet", 14, torch.device("cpu"), Precision())


def test_pretrained_from_a_local_state_dict(tmp_path):
    import torchvision

    import Train_clothing1M
    from dividemix import Precision
    torch.manual_seed(0)
    source = torchvision.models.resnet50()
    torch.save(source.state_dict(), tmp_path / "r50.pth")
    net = Train_clothing1M.create_model(str(tmp_path / "r50.pth"), 14, torch.device("cpu"), Precision())
    assert torch.equal(net.conv1.weight, source.conv1.weight) and net.fc.out_features == 14
    assert net.eval()(torch.randn(1, 3, 64, 64)).shape == (1, 14)
