"""Train_custom.py: the ImageFolder, list, Animal-10N and Food-101N layouts end to end on miniature data sets,
the class count from the data, a binary imbalanced set, the label-review CSV, resume refusals (resume identity:
test_resume.py), two processes under torchrun, the settings each layout resolves, the nets, empty divisions, and
the one-line errors."""
import csv
import json
import os
import re
import shutil

import numpy as np
import pytest
import torch

from cli import UserError, run_main
import dataloader_custom as dcu
from dividemix import Precision
from fake_custom import FOOD_CLASSES, write_animal10n, write_food101n, write_image_folder, write_lists
from PreResNet import ResNet18
import Train_custom
import runs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU = torch.device("cpu")
# tiny nets settings: PreAct ResNet-18 at 16 px, batch 4, one warm-up epoch; --num_epochs 1 runs two epochs
FAST = ["--arch", "preact_resnet18", "--image_size", "16", "--batch_size", "4", "--warm_up", "1",
        "--num_workers", "0", "--num_epochs", "1"]


def train(*args):
    """Run Train_custom.main in this process (no interpreter start-up); exceptions propagate."""
    return Train_custom.main(Train_custom.get_args_parser().parse_args([str(a) for a in args]))


def error_line(capsys, *args):
    """The single `error: ...` line of a run that stopped on bad input (exit code 2, no traceback)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        run_main(Train_custom.main, Train_custom.get_args_parser().parse_args([str(a) for a in args]))
    err = capsys.readouterr().err
    assert info.value.code == 2 and len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
    return err.strip()


def read_review(path):
    """The label-review CSV as a list of dicts."""
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def json_log(path):
    """The JSON-lines log, timings left out."""
    records = [json.loads(x) for x in open(path)]
    return [{k: v for k, v in r.items() if k not in ("seconds", "time")} for r in records]


def corrupt(path):
    """Replace an image by bytes no decoder reads."""
    with open(path, "wb") as f:
        f.write(np.random.default_rng(1).bytes(300))


# ----------------------------------------------------------------------------- layouts end to end

@runs.LARGE_ON_DISK
@pytest.mark.slow
def test_image_folder_end_to_end_with_val_and_an_unreadable_image(tmp_path):
    data, out = tmp_path / "data", tmp_path / "out"
    write_image_folder(str(data), n_val=2)
    broken = data / "train" / "dog" / "dog_001.jpg"
    corrupt(broken)
    proc = runs.run_script("Train_custom.py", "--data_path", data, "--output_dir", out, "--cache_limit_gb", 0, *FAST)
    assert f"warning: skipped unreadable image {broken}" in proc.stdout
    assert "3 classes, 24 training images, 6 val, 9 test; streamed" in proc.stdout
    lines = (out / "custom_acc.txt").read_text().splitlines()
    assert re.fullmatch(r"Validation Epoch:0      Acc1:\d+\.\d\d  Acc2:\d+\.\d\d", lines[0])
    assert lines[1].startswith("Validation Epoch:1 ") and re.fullmatch(r"Test Accuracy:\d+\.\d\d", lines[2])
    records = json_log(out / "custom_log.jsonl")
    assert [r["phase"] for r in records] == ["warmup", "train", "test"]
    assert records[0]["net1"]["labeled"] + records[0]["net1"]["unlabeled"] == 24  # a division after warm-up too
    assert records[0]["new_bad_images"] == [str(broken)] and records[2]["bad_images"] == 1
    config = json.loads((out / "custom_config.json").read_text())
    assert config["classes"] == ["cat", "dog", "fox"] and config["args"]["num_class"] == 3
    assert config["cached"] is False and config["script"] == "Train_custom.py"
    for k in (1, 2):  # best-validation weights, head sized by the data
        assert torch.load(out / f"custom_net{k}.pth.tar", weights_only=True)["linear.weight"].shape == (3, 512)

    rows = read_review(out / "custom_label_review.csv")
    assert list(rows[0]) == list(Train_custom.REVIEW_COLUMNS) and len(rows) == 24
    clean = [float(r["clean_prob"]) for r in rows]
    assert clean == sorted(clean)  # most suspicious first
    for r in rows:
        assert r["path"].split("/")[1] == r["given_label"]  # the folder is the given label
        assert ["cat", "dog", "fox"][int(r["given_index"])] == r["given_label"]
        assert float(r["clean_prob"]) == pytest.approx((float(r["clean_prob_net1"]) + float(r["clean_prob_net2"]))
                                                       / 2, abs=2e-6)
        assert r["suspect"] == str(int(float(r["clean_prob"]) <= 0.5))
        assert r["predicted_label"] in ("cat", "dog", "fox") and 0 <= float(r["predicted_prob"]) <= 1
    assert [r["path"] for r in rows if r["unreadable"] == "1"] == ["train/dog/dog_001.jpg"]


@runs.LARGE_ON_DISK
@pytest.mark.slow
def test_binary_imbalanced_lists_cached_with_class_names(tmp_path):
    data, out = tmp_path / "data", tmp_path / "out"
    write_lists(str(data), counts=(20, 4))
    (data / "names.txt").write_text("negative\npositive\n")
    train("--data_path", data, "--train_list", data / "train.txt", "--test_list", data / "test.txt", "--classes",
          data / "names.txt", "--output_dir", out, *FAST)
    config = json.loads((out / "custom_config.json").read_text())
    assert config["classes"] == ["negative", "positive"] and config["cached"] is True
    assert config["args"]["layout"] == "list"
    checkpoint = torch.load(out / "custom_checkpoint.pth.tar", weights_only=False)
    assert checkpoint["nets"][0]["linear.weight"].shape == (2, 512) and checkpoint["classes"] == config["classes"]
    lines = (out / "custom_acc.txt").read_text().splitlines()  # no val split: the pair is tested every epoch
    assert re.fullmatch(r"Epoch:0   Accuracy:\d+\.\d\d", lines[0]) and lines[2].startswith("Test Accuracy:")
    rows = read_review(out / "custom_label_review.csv")
    assert len(rows) == 24 and {r["given_label"] for r in rows} == {"negative", "positive"}
    assert sorted(r["path"] for r in rows) == [f"img/train_{i:03d}.png" for i in range(24)]


@runs.LARGE_ON_DISK
@pytest.mark.slow
def test_animal10n_layout(tmp_path, capsys):
    data, out = tmp_path / "animal", tmp_path / "out"
    write_animal10n(str(data), n_train=30, n_test=10)
    (data / "training" / "notes.txt").write_text("not an image")
    train("--data_path", data, "--layout", "animal10n", "--output_dir", out, *FAST)
    stdout = capsys.readouterr().out
    assert "skipped 1 entries" in stdout
    assert "animal10n layout, 10 classes, 30 training images, 10 test; cached" in stdout
    config = json.loads((out / "animal10n_config.json").read_text())
    assert config["classes"] == [str(c) for c in range(10)] and config["num_train"] == 30
    rows = read_review(out / "animal10n_label_review.csv")
    assert all(r["path"].startswith("training/") and r["path"][9] == r["given_label"] for r in rows)


@runs.LARGE_ON_DISK
@pytest.mark.slow
def test_food101n_layout_reports_the_verified_subset(tmp_path):
    data, out = tmp_path / "food", tmp_path / "out"
    write_food101n(str(data), n_train=24, n_test=8)
    # ResNet-18 at its smallest size, streamed
    train("--data_path", data, "--layout", "food101n", "--output_dir", out, "--arch", "resnet18", "--pretrained",
          "none", "--image_size", 64, "--cache_limit_gb", 0, *FAST[4:])
    records = json_log(out / "food101n_log.jsonl")
    for r in records[:2]:
        verified = r["net1"]["verified"]
        assert verified["labeled"] + verified["unlabeled"] == 12
        assert {"auc", "precision", "recall"} <= set(verified)
    rows = read_review(out / "food101n_label_review.csv")
    assert len(rows) == 24 and {r["given_label"] for r in rows} == set(FOOD_CLASSES)
    marks = {r["path"]: r["verified_clean"] for r in rows}
    assert sum(v != "" for v in marks.values()) == 12
    assert sorted(v for v in marks.values() if v) == ["0"] * 2 + ["1"] * 10  # every fifth label is flipped
    assert all(p.startswith("Food-101N_release/images/") for p in marks)
    checkpoint = torch.load(out / "food101n_checkpoint.pth.tar", weights_only=False)
    assert checkpoint["nets"][0]["fc.weight"].shape == (4, 512)


def test_food101n_folders(tmp_path):
    write_food101n(str(tmp_path), n_train=6, n_test=2)
    release, food = str(tmp_path / "Food-101N_release"), str(tmp_path / "food-101")
    assert dcu.food101n_roots(str(tmp_path)) == (release, food)
    assert dcu.food101n_roots(release) == (release, food)  # the release itself, food-101 beside it
    moved = str(tmp_path / "elsewhere")
    os.rename(food, moved)
    with pytest.raises(UserError, match="no food-101/ folder is beside"):
        dcu.food101n_roots(release)
    assert dcu.food101n_roots(release, moved) == (release, moved)


@runs.LARGE_ON_DISK
@pytest.mark.slow
def test_two_processes_under_torchrun(tmp_path):
    data, out = tmp_path / "data", tmp_path / "out"
    write_image_folder(str(data), n_train=5, n_test=3, n_val=2)
    proc = runs.run_torchrun(2, "Train_custom.py", "--data_path", data, "--output_dir", out, "--cache_limit_gb", 0,
                             *FAST)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    config = json.loads((out / "custom_config.json").read_text())
    assert config["world_size"] == 2 and config["classes"] == ["cat", "dog", "fox"]
    records = json_log(out / "custom_log.jsonl")
    assert [r["phase"] for r in records] == ["warmup", "train", "test"]
    assert records[1]["net2"]["labeled"] + records[1]["net2"]["unlabeled"] == 15  # the losses gathered whole
    for r in records[:2]:  # each net alone on 6 val images
        assert round(r["val_acc1"] * 6 / 100, 6).is_integer()
    assert round(records[2]["test_acc"] * 9 / 100, 6).is_integer()
    assert len(read_review(out / "custom_label_review.csv")) == 15


# ----------------------------------------------------------------------------- resume

def test_resume_refuses_other_data(tmp_path, capsys):
    data = tmp_path / "data"
    write_image_folder(str(data), n_train=5, n_test=2)
    train("--data_path", data, "--output_dir", tmp_path / "o", *FAST[:-2], "--num_epochs", 0)
    os.rename(data / "train" / "fox", data / "train" / "wolf")
    os.rename(data / "test" / "fox", data / "test" / "wolf")
    line = error_line(capsys, "--data_path", data, "--output_dir", tmp_path / "o", *FAST, "--resume")
    assert "the classes of the data" in line and "start a new --output_dir" in line


# ----------------------------------------------------------------------------- settings, nets, loaders

def test_each_layout_resolves_its_defaults():
    def resolve(*argv):
        args = Train_custom.get_args_parser().parse_args(list(argv))
        return args, Train_custom.resolve_settings(args)

    args, sources = resolve("--layout", "animal10n")
    assert (args.arch, args.pretrained, args.image_size, args.augment) == ("preact_resnet18", "none", 64, "crop")
    assert (args.lr, args.batch_size, args.warm_up, args.num_epochs, args.lambda_u) == (0.02, 64, 10, 300, 0.0)
    assert args.unlabeled_loss and sources["lambda_u"] == "animal10n default" and args.id == "animal10n"
    args, _ = resolve("--layout", "food101n")
    assert (args.arch, args.pretrained, args.image_size, args.augment) == ("resnet50", "imagenet", 224,
                                                                          "resized_crop")
    assert (args.lr, args.batch_size, args.weight_decay, args.warm_up, args.num_epochs) == (0.002, 32, 1e-3, 1, 80)
    assert not args.unlabeled_loss and args.lambda_u == 0
    args, sources = resolve("--train_list", "t.txt", "--lr", "0.01")
    assert args.layout == "list" and args.id == "custom" and sources["lr"] == "flag" and args.lr == 0.01
    args, _ = resolve("--arch", "preact_resnet18")  # a net from scratch gets the scratch recipe and its size
    assert (args.pretrained, args.image_size, args.lr, args.eval_batch_size) == ("none", 32, 0.02, 128)
    args, sources = resolve("--arch", "preact_resnet18", "--no-unlabeled_loss")  # the recipe's lambda_u unused
    assert args.lambda_u == 0 and sources["lambda_u"] == "unused without --unlabeled_loss"


def test_augmentation_and_cache_follow_the_size(tmp_path):
    assert dcu.default_augment(64) == "crop" and dcu.default_augment(224) == "resized_crop"
    assert dcu.crop_padding(32) == 4 and dcu.crop_padding(64) == 8
    write_lists(str(tmp_path), counts=(6, 6), n_test=4)
    data = dcu.read_layout("list", str(tmp_path), str(tmp_path / "train.txt"), str(tmp_path / "test.txt"))
    assert dcu.cache_bytes(data, 64) == 16 * 3 * 64 * 64
    assert dcu.cache_decision(data, 64, "crop", 1.0)[0]
    assert not dcu.cache_decision(data, 64, "crop", 0.0)[0]
    assert not dcu.cache_decision(data, 64, "resized_crop", 1.0)[0]
    train_tf, test_tf = dcu.transforms(20, "crop")
    from PIL import Image
    image = Image.new("RGB", (30, 24))
    assert train_tf(image).shape == test_tf(image).shape == (3, 20, 20)
    cached = dcu.CachedData(data, 20, 4, 8, 0, CPU)
    assert cached.train_images.shape == (12, 3, 20, 20) and cached.train_images.dtype == torch.uint8
    assert cached.warmup_loader().batch_size == 8 and next(iter(cached.warmup_loader()))[0].shape == (8, 3, 20, 20)


@pytest.mark.parametrize("cached", [False, True])
def test_empty_divisions(tmp_path, cached):
    write_lists(str(tmp_path), counts=(3, 3), n_test=2)
    data = dcu.read_layout("list", str(tmp_path), str(tmp_path / "train.txt"), str(tmp_path / "test.txt"))
    feed = dcu.CachedData(data, 16, 4, 8, 0, CPU) if cached else dcu.StreamData(data, 16, "crop", 4, 8, 0, CPU)
    nothing, everything, prob = np.zeros(6, dtype=bool), np.ones(6, dtype=bool), np.full(6, 0.5)
    labeled = feed.labeled_loader(nothing, prob)
    assert getattr(labeled, "num_samples", None) == 0 and list(labeled) == [] and labeled.batch_size == 4
    assert feed.unlabeled_loader(everything) is None
    x, x2, labels, w = next(iter(feed.labeled_loader(everything, prob)))
    assert x.shape == x2.shape == (4, 3, 16, 16) and w.tolist() == [0.5] * 4


def test_preact_resnet18_of_any_size_equals_the_cifar_net_at_32_px(tmp_path):
    torch.manual_seed(0)
    cifar = ResNet18(num_classes=5).eval()
    net = Train_custom.PreActResNet18(5).eval()
    net.load_state_dict(cifar.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(net(x), cifar(x), atol=1e-6)
        assert net(torch.randn(2, 3, 16, 16)).shape == net(torch.randn(2, 3, 64, 64)).shape == (2, 5)
        assert net.features(torch.randn(2, 3, 48, 48)).shape == (2, 512)  # the embedding the engine may mix
    # --pretrained PATH: every weight but the head, which gets the data's classes
    torch.save(cifar.state_dict(), tmp_path / "w.pth")
    loaded = Train_custom.create_model("preact_resnet18", str(tmp_path / "w.pth"), 3, CPU, Precision())
    assert torch.equal(loaded.conv1.weight, cifar.conv1.weight) and loaded.linear.out_features == 3
    with pytest.raises(UserError, match="does not fit this resnet18: conv1.weight is 64x3x3x3 there and 64x3x7x7"):
        Train_custom.create_model("resnet18", str(tmp_path / "w.pth"), 3, CPU, Precision())


def test_unavailable_imagenet_weights_message(monkeypatch):
    import torchvision

    def offline(*args, **kwargs):
        raise RuntimeError("no network")

    monkeypatch.setattr(torchvision.models, "resnet34", offline)
    with pytest.raises(UserError, match="cannot load the ImageNet weights of resnet34.*--pretrained PATH"):
        Train_custom.create_model("resnet34", "imagenet", 3, CPU, Precision())


def test_no_flag_is_an_abbreviation_of_a_torchrun_option():
    from torch.distributed.run import get_args_parser as torchrun_parser
    theirs = [o for action in torchrun_parser()._actions for o in action.option_strings if o.startswith("--")]
    ours = [o for action in Train_custom.get_args_parser()._actions for o in action.option_strings
            if o.startswith("--") and o != "--help"]
    assert not [(o, t) for o in ours for t in theirs if t.startswith(o)]


# ----------------------------------------------------------------------------- errors

def test_data_errors_are_one_line_and_write_nothing(tmp_path, capsys):
    data, out = tmp_path / "data", tmp_path / "out"
    write_image_folder(str(data), n_train=5, n_test=2)
    for name in os.listdir(data / "train" / "dog"):
        os.remove(data / "train" / "dog" / name)
    line = error_line(capsys, "--data_path", data, "--output_dir", out, *FAST)
    assert f"class folder {data}/train/dog holds no images" in line and "delete the folder" in line
    os.rmdir(data / "train" / "dog")  # test/dog is left
    line = error_line(capsys, "--data_path", data, "--output_dir", out, *FAST)
    assert f"{data}/test/dog is no class of {data}/train: rename it" in line
    for split in ("train", "test"):
        shutil.rmtree(data / split / "fox")
    shutil.rmtree(data / "test" / "dog")
    line = error_line(capsys, "--data_path", data, "--output_dir", out, *FAST)
    assert "holds 1 class folder(s): DivideMix needs at least two classes" in line
    assert not out.exists()


def test_list_errors(tmp_path, capsys):
    write_lists(str(tmp_path), counts=(4, 4), n_test=4)
    train_list, test_list = tmp_path / "train.txt", tmp_path / "test.txt"
    common = ["--data_path", tmp_path, "--train_list", train_list, "--output_dir", tmp_path / "out", *FAST]
    with open(test_list, "a") as f:
        f.write("img/test_000.png 2\n")
    line = error_line(capsys, *common, "--test_list", test_list)
    assert f"{test_list}:5: label 2 is outside the classes 0..1 of the training list {train_list}" in line
    (tmp_path / "names.txt").write_text("a\n")
    line = error_line(capsys, *common, "--test_list", test_list, "--classes", tmp_path / "names.txt")
    assert re.search(rf"{train_list}:\d+: label 1 is outside the classes 0..0 of --classes", line)
    assert "needs --test_list" in error_line(capsys, *common)
    line = error_line(capsys, *common, "--test_list", tmp_path / "nowhere.txt")
    assert "--test_list" in line and "no such file" in line
    line = error_line(capsys, "--data_path", tmp_path, "--layout", "animal10n", "--train_list", train_list, *FAST)
    assert "--train_list belongs to list files, but --layout is animal10n" in line


def test_layout_errors(tmp_path, capsys):
    animal = tmp_path / "animal"
    write_animal10n(str(animal), n_train=4, n_test=2)
    os.rename(animal / "training" / "3_00003.jpg", animal / "training" / "cat3.jpg")
    line = error_line(capsys, "--data_path", animal, "--layout", "animal10n", *FAST)
    assert "cat3.jpg: an Animal-10N file name begins with its label 0-9 and `_`" in line
    food = tmp_path / "food"
    write_food101n(str(food), n_train=4, n_test=2)
    with open(food / "Food-101N_release" / "meta" / "imagelist.tsv", "a") as f:
        f.write("pizza/abc.jpg\n")
    line = error_line(capsys, "--data_path", food, "--layout", "food101n", *FAST)
    assert "imagelist.tsv:6: 'pizza/abc.jpg' is not `class_name/file` with one of the 4 classes" in line


def test_an_unreadable_image_stops_at_max_bad_images_0(tmp_path, capsys):
    data, out = tmp_path / "data", tmp_path / "out"
    write_image_folder(str(data), n_train=5, n_test=2)
    corrupt(data / "train" / "cat" / "cat_002.jpg")
    for cache in ("4", "0"):  # found while decoding the cache, or while streaming the warm-up
        line = error_line(capsys, "--data_path", data, "--output_dir", out / cache, "--max_bad_images", 0,
                          "--cache_limit_gb", cache, *FAST)
        assert "1 images could not be read, more than --max_bad_images 0" in line and "cat_002.jpg" in line


@pytest.mark.parametrize("args,message", [
    (["--lambda_u", "25", "--no-unlabeled_loss"], "--lambda_u 25 has no effect without the unlabeled loss"),
    (["--arch", "preact_resnet18", "--pretrained", "imagenet"], "preact_resnet18 has no ImageNet weights"),
    (["--arch", "resnet18", "--image_size", "32"], "--image_size 32 is too small for resnet18: give at least 64"),
    (["--warm_up", "0"], "--warm_up 0 is not allowed: give an integer >= 1"),
    (["--cache_limit_gb", "-1"], "--cache_limit_gb -1.0 is not allowed"),
    (["--data_path", "/nonexistent/data"], "--data_path /nonexistent/data is not a folder"),
])
def test_bad_settings(tmp_path, capsys, args, message):
    line = error_line(capsys, "--output_dir", tmp_path / "out", *args)
    assert message in line
    assert not (tmp_path / "out").exists()
