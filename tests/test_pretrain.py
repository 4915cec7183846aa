"""SimCLR pre-training (Pretrain_simclr.py, simclr.py) and --pretrained: the views against torchvision's own
transforms, NT-Xent against the paper's formula, the schedule, the kNN measure; checkpoints of every usual shape
loaded into both training scripts, and the refusals; end to end with resume, torchrun and the kNN filter's
embedding. The default path is the reference-step and noise-vector tests' (test_reference_steps.py, test_noise.py)."""
import argparse
import json
import math
import os
import subprocess

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
import torchvision.transforms.functional as TF

from backbone_weights import load_backbone
from cifar_files import read_cifar
from cli import UserError
from dataloader_cifar import CIFARData
from device_batches import (JITTER_KINDS, apply_jitter, jitter_draws, random_grayscale, random_resized_crop_flip)
from dividemix import Precision, embed, knn_scores, ood_removal
from fake_custom import write_image_folder
from PreResNet import ResNet18
from runs import (CIFAR_FAST, CUSTOM_FAST, LARGE_ON_DISK, assert_same_run, json_records, run_script, run_torchrun,
                  script_command)
from simclr import SimCLRConfig, knn_accuracy, learning_rate, nt_xent
import Train_cifar
import Train_custom

CPU = torch.device("cpu")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PREFIX = "simclr_cifar10"
# A tiny pre-training: width 8 as the CIFAR tests' nets, two steps an epoch on the 64 images of the tiny data set.
TINY = ["--epochs", "3", "--batch_size", "32", "--net_width", "8", "--warm_epochs", "1", "--eval_batch_size", "64"]
BACKBONE_TENSORS = 105  # the PreAct ResNet-18's state dict without its classifier (weights, biases, BN buffers)


# ----------------------------------------------------------------------------- the views

def test_colour_jitter_equals_torchvision_per_image():
    torch.manual_seed(0)
    images = torch.rand(12, 3, 8, 8)
    draws = jitter_draws(12, 0.4, 0.4, 0.4, 0.1, 0.8, CPU)
    out = apply_jitter(images, draws)
    adjust = {"brightness": TF.adjust_brightness, "contrast": TF.adjust_contrast,
              "saturation": TF.adjust_saturation, "hue": TF.adjust_hue}
    for i in range(12):
        expected = images[i]
        if draws["applied"][i]:  # torchvision's ColorJitter: the four adjustments in this image's order
            for k in draws["order"][i].tolist():
                kind = JITTER_KINDS[k]
                expected = adjust[kind](expected, float(draws[kind][i]))
        assert torch.allclose(out[i], expected, atol=1e-4), i
    assert 0 < int(draws["applied"].sum()) < 12
    assert len({tuple(o) for o in draws["order"].tolist()}) > 1  # each image its own order


def test_resized_crop_takes_boxes_of_the_drawn_size_and_flips_half():
    torch.manual_seed(0)
    cols = torch.arange(32.0).view(1, 1, 1, 32).expand(400, 1, 32, 32)
    rows = torch.arange(32.0).view(1, 1, 32, 1).expand(400, 1, 32, 32)
    images = torch.cat([cols, rows, torch.zeros(400, 1, 32, 32)], 1)
    out = random_resized_crop_flip(images, 32, scale=(0.25, 0.25), ratio=(1.0, 1.0))  # 16 x 16 boxes
    assert out.shape == (400, 3, 32, 32)
    span_x = out[:, 0].amax((1, 2)) - out[:, 0].amin((1, 2))
    span_y = out[:, 1].amax((1, 2)) - out[:, 1].amin((1, 2))
    assert torch.all((span_x - 15).abs() < 1) and torch.all((span_y - 15).abs() < 1)
    assert out[:, 0].amin() >= 0 and out[:, 0].amax() <= 31
    flipped = out[:, 0, 0, 0] > out[:, 0, 0, -1]
    assert 150 < int(flipped.sum()) < 250
    whole = random_resized_crop_flip(images[:8], 32, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    for x, y in zip(images[:8], whole):
        assert torch.allclose(y, x, atol=1e-4) or torch.allclose(y, x.flip(2), atol=1e-4)


def test_grayscale_with_probability():
    torch.manual_seed(0)
    images = torch.rand(1000, 3, 4, 4)
    out = random_grayscale(images, 0.2)
    grey = (out[:, 0] == out[:, 1]).all(2).all(1) & (out[:, 1] == out[:, 2]).all(2).all(1)
    assert 150 < int(grey.sum()) < 250
    luma = 0.299 * images[:, 0] + 0.587 * images[:, 1] + 0.114 * images[:, 2]
    assert torch.allclose(out[grey][:, 0], luma[grey], atol=1e-6)
    assert torch.equal(out[~grey], images[~grey])
    assert torch.equal(random_grayscale(images, 0.0), images)


# ----------------------------------------------------------------------------- loss, schedule, kNN measure

def test_nt_xent_is_the_papers_formula():
    torch.manual_seed(0)
    n, t = 5, 0.5
    z = F.normalize(torch.randn(2 * n, 7), dim=1)
    terms = []
    for i in range(2 * n):  # l(i, j) = -log exp(s_ij / t) / sum over k != i of exp(s_ik / t), j the other view
        j = (i + n) % (2 * n)
        others = sum(math.exp(float(z[i] @ z[k]) / t) for k in range(2 * n) if k != i)
        terms.append(-math.log(math.exp(float(z[i] @ z[j]) / t) / others))
    assert abs(nt_xent(z, t).item() - sum(terms) / len(terms)) < 1e-5


def test_learning_rate_follows_supcontrast_warm_up_and_cosine():
    cfg = SimCLRConfig(epochs=1000, lr=0.5, warm_epochs=10, warmup_from=0.01, lr_decay_rate=0.1)
    eta_min = 0.5 * 0.1 ** 3

    def cosine(e):
        return eta_min + (0.5 - eta_min) * (1 + math.cos(math.pi * e / 1000)) / 2

    assert learning_rate(cfg, 0, 0, 20) == pytest.approx(0.01)
    assert learning_rate(cfg, 4, 10, 20) == pytest.approx(0.01 + (90 / 200) * (cosine(10) - 0.01))
    assert learning_rate(cfg, 10, 0, 20) == learning_rate(cfg, 10, 19, 20) == pytest.approx(cosine(11))
    assert learning_rate(cfg, 999, 0, 20) == pytest.approx(eta_min)
    after = [learning_rate(cfg, e, 0, 20) for e in range(10, 1000)]
    assert all(a > b for a, b in zip(after, after[1:]))


def test_knn_accuracy_weights_the_votes_by_similarity():
    train = torch.tensor([[1.0, 0.0], [0.98, 0.2], [0.0, 1.0], [0.2, 0.98]])
    labels = torch.tensor([0, 0, 1, 1])
    assert knn_accuracy(train, labels, torch.tensor([[0.9, 0.1], [0.1, 0.9]]), torch.tensor([0, 1]), 2, k=4) == 100
    # two far neighbours of class 0 against one very close of class 1: the close one outweighs them
    train = torch.tensor([[0.0, 1.0], [0.1, 1.0], [1.0, 0.05]])
    assert knn_accuracy(train, torch.tensor([0, 0, 1]), torch.tensor([[1.0, 0.0]]), torch.tensor([1]), 2, k=3) == 100


# ----------------------------------------------------------------------------- checkpoints of every shape

def source_net(width=8, seed=0):
    """A PreAct ResNet-18 with random weights and BatchNorm statistics: what a pre-training would leave."""
    torch.manual_seed(seed)
    net = ResNet18(num_classes=10, width=width)
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-1, 1)
    return net


def shaped(state, shape):
    """A backbone state dict in one of the shapes published checkpoints come in."""
    backbone = {k: v for k, v in state.items() if not k.startswith("linear.")}
    head = {"head.0.weight": torch.zeros(3, 3), "head.2.bias": torch.zeros(3)}
    return {
        "plain": backbone,
        "state_dict": {"state_dict": backbone, "epoch": 7},
        "module.": {f"module.{k}": v for k, v in state.items()},
        "encoder. with a head": {**{f"encoder.{k}": v for k, v in backbone.items()}, **head},
        "backbone. under model": {"model": {f"backbone.{k}": v for k, v in backbone.items()}},
        "SupContrast (options, model, module.encoder.)": {
            "opt": argparse.Namespace(temp=0.5), "epoch": 1000,
            "model": {**{f"module.encoder.{k}": v for k, v in backbone.items()}, **head}},
        "torch.compile": {f"_orig_mod.{k}": v for k, v in backbone.items()},
    }[shape]


SHAPES = ("plain", "state_dict", "module.", "encoder. with a head", "backbone. under model",
          "SupContrast (options, model, module.encoder.)", "torch.compile")


@pytest.mark.parametrize("shape", SHAPES)
def test_every_usual_checkpoint_shape_gives_both_nets_the_backbone(shape, tmp_path, capsys):
    source = source_net()
    path = tmp_path / "w.pth"
    torch.save(shaped(source.state_dict(), shape), path)
    net = Train_cifar.create_model(3, CPU, Precision(), width=8, pretrained=str(path), name="net1")
    expected = {k: v for k, v in source.state_dict().items() if not k.startswith("linear.")}
    got = net.state_dict()
    assert all(torch.equal(got[k], v) for k, v in expected.items())
    assert net.linear.out_features == 3
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"net1: {BACKBONE_TENSORS} backbone tensors loaded from {path}")


def test_custom_preact_net_takes_a_renamed_checkpoint(tmp_path):
    source = source_net(width=64)
    path = tmp_path / "w.pth"
    torch.save(shaped(source.state_dict(), "encoder. with a head"), path)
    net = Train_custom.create_model("preact_resnet18", str(path), 4, CPU, Precision())
    assert torch.equal(net.layer4[1].conv2.weight, source.layer4[1].conv2.weight) and net.linear.out_features == 4


def test_refusals_name_the_problem(tmp_path):
    source = source_net()

    def load(obj, width=8):
        path = tmp_path / "w.pth"
        if isinstance(obj, bytes):
            path.write_bytes(obj)
        else:
            torch.save(obj, path)
        with pytest.raises(UserError) as err:
            load_backbone(ResNet18(num_classes=3, width=width), str(path), "linear", "preact_resnet18")
        return str(err.value)

    assert "does not fit this preact_resnet18: conv1.weight is 8x3x3x3 there and 16x3x3x3 here" in load(
        source.state_dict(), width=16)
    # torchvision's ResNet-18 shares most names with the PreAct ResNet-18, not the shapes
    assert "conv1.weight is 64x3x7x7 there and 8x3x3x3 here" in load(torchvision.models.resnet18().state_dict())
    assert "holds no preact_resnet18 backbone weights (its keys: fc.weight, fc.bias, ...)" in load(
        {"fc.weight": torch.zeros(2, 2), "fc.bias": torch.zeros(2)})
    partial = {k: v for k, v in source.state_dict().items() if not k.startswith("layer4.")}
    assert "lacks 21 of 88 preact_resnet18 backbone weights (e.g. layer4.0.bn1.weight)" in load(partial)
    assert "cannot read it as a checkpoint" in load(b"not a checkpoint")
    assert "holds no tensors" in load({"model": "x", "epoch": 3})


def test_growing_removal_follows_the_filterings_and_may_not_reach_every_image():
    args = Train_cifar.get_args_parser().parse_args(["--ood_filter", "knn", "--ood_remove_step", "0.01",
                                                     "--ood_interval", "10"])
    Train_cifar.resolve_settings(args)  # warm-up 10: filterings at epochs 10, 20, ...
    assert [Train_cifar.ood_fraction(args, e) for e in (10, 19, 20, 300)] == pytest.approx([0.1, 0.1, 0.11, 0.39])
    args = Train_cifar.get_args_parser().parse_args(["--ood_filter", "knn", "--ood_remove_step", "0.05",
                                                     "--ood_interval", "10"])
    with pytest.raises(UserError, match="would reach 1.55 by epoch 300"):
        Train_cifar.resolve_settings(args)


# ----------------------------------------------------------------------------- end to end

@pytest.fixture(scope="module")
def pretraining(tiny_data, tmp_path_factory):
    """The tiny pre-training, epochs 0..2: (folder, completed process)."""
    out = tmp_path_factory.mktemp("pretraining")
    proc = run_script("Pretrain_simclr.py", "--data_path", tiny_data("cifar"), "--output_dir", out, *TINY)
    return out, proc


@pytest.mark.slow
def test_pretraining_logs_loss_and_knn_accuracy_and_writes_the_backbone(pretraining):
    out, proc = pretraining
    records = json_records(out / f"{PREFIX}_log.jsonl")
    assert [r["epoch"] for r in records] == [0, 1, 2] and {r["phase"] for r in records} == {"simclr"}
    assert all(r["iterations"] == 2 and 0 <= r["knn_acc"] <= 100 and r["loss"] > 0 for r in records)
    cfg = SimCLRConfig(epochs=3, lr=0.5, warm_epochs=1)  # the last step's rate of each epoch: warm-up, then cosine
    assert [r["lr"] for r in records] == pytest.approx([learning_rate(cfg, e, 1, 2) for e in range(3)])
    assert "batch_size=32 (flag)" in proc.stdout and "temperature=0.5 (SupContrast SimCLR recipe" in proc.stdout
    saved = torch.load(out / f"{PREFIX}_backbone.pth", weights_only=True)
    assert saved["epoch"] == 2 and saved["net_width"] == 8 and saved["knn_acc"] == records[-1]["knn_acc"]
    assert len(saved["state_dict"]) == BACKBONE_TENSORS
    assert not [k for k in saved["state_dict"] if k.startswith(("linear.", "head."))]
    config = json.loads((out / f"{PREFIX}_config.json").read_text())
    assert config["script"] == "Pretrain_simclr.py" and config["args"]["temperature"] == 0.5


@pytest.mark.slow
def test_a_resumed_pretraining_ends_as_the_undisturbed_one(pretraining, tiny_data, tmp_path):
    out = tmp_path / "run"
    args = ["--data_path", tiny_data("cifar"), "--output_dir", out, *TINY]
    fault = script_command("tests/fault_launch.py", os.path.join(ROOT, "Pretrain_simclr.py"), *args)
    proc = subprocess.run(fault, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "FAULT": "enospc:2"})
    assert proc.returncode == 2 and "the checkpoint of epoch 0" in proc.stderr  # epoch 1's could not be written
    proc = run_script("Pretrain_simclr.py", *args, "--resume")
    assert "resumed from epoch 0" in proc.stdout
    assert_same_run(pretraining[0], out)


@pytest.mark.slow
def test_two_processes_pretrain_on_the_global_batch(tiny_data, tmp_path):
    out = tmp_path / "run"
    proc = run_torchrun(2, "Pretrain_simclr.py", "--data_path", tiny_data("cifar"), "--output_dir", out,
                        *TINY[2:], "--epochs", "2", env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    records = json_records(out / f"{PREFIX}_log.jsonl")
    assert [r["epoch"] for r in records] == [0, 1] and all(r["iterations"] == 2 for r in records)
    checkpoint = torch.load(out / f"{PREFIX}_checkpoint.pth.tar", weights_only=False)
    assert len(checkpoint["rng_ranks"]) == 2


@pytest.mark.slow
def test_cifar_starts_from_the_backbone_and_filters_in_its_embedding(pretraining, tiny_data, tmp_path):
    """Both nets start from the backbone (renamed here as a published file would be); the kNN filter's removals are
    those of the pre-trained embedding, growing by --ood_remove_step; --pretrained defines the run for --resume."""
    backbone = torch.load(pretraining[0] / f"{PREFIX}_backbone.pth", weights_only=True)["state_dict"]
    renamed = tmp_path / "renamed.pth"
    torch.save({"model": {f"module.encoder.{k}": v for k, v in backbone.items()}}, renamed)
    data, out = tiny_data("cifar"), tmp_path / "run"
    args = ["--data_path", data, "--output_dir", out, *CIFAR_FAST, "--ood_filter", "knn", "--ood_interval", "1",
            "--ood_remove_step", "0.05"]
    proc = run_script("Train_cifar.py", *args, "--num_epochs", 2, "--pretrained", renamed)
    assert (f"net1: {BACKBONE_TENSORS} backbone tensors loaded from {renamed} (key prefix 'module.encoder.' removed)"
            in proc.stdout) and "net2: " in proc.stdout
    assert json.loads((out / "cifar10_0.5_sym_config.json").read_text())["args"]["pretrained"] == str(renamed)

    # the removals of epochs 1 and 2: the 10%, then 15% of the training images farthest from their neighbours in the
    # backbone's embedding
    net = ResNet18(num_classes=10, width=8)
    net.load_state_dict(backbone, strict=False)
    train_x, clean, test_x, test_y = read_cifar(data, "cifar10")
    images = CIFARData(train_x, clean, clean, test_x, test_y, "cifar10", CPU)
    precision = Precision(channels_last=True)
    features = embed(net.to(memory_format=torch.channels_last), images.eval_loader(64), CPU, precision)
    records = json_records(out / "cifar10_0.5_sym_log.jsonl")
    assert [r["ood_filter"]["removed"] for r in records[1:]] == [6, 9]  # int(0.1 x 64), int(0.15 x 64)
    checkpoint = torch.load(out / "cifar10_0.5_sym_checkpoint.pth.tar", weights_only=False)
    assert np.array_equal(checkpoint["ood_removed"], ood_removal(knn_scores(features, 10), 0.15))

    proc = run_script("Train_cifar.py", *args, "--num_epochs", 3, "--resume", check=False)
    assert proc.returncode == 2 and "--resume checkpoint was made with --pretrained" in proc.stderr


@pytest.mark.slow
def test_a_refused_backbone_is_one_line_and_writes_no_run(pretraining, tiny_data, tmp_path):
    out, noise = tmp_path / "run", tmp_path / "noise.json"
    proc = run_script("Train_cifar.py", "--data_path", tiny_data("cifar"), "--output_dir", out, *CIFAR_FAST,
                      "--net_width", "16", "--num_epochs", 0, "--noise_file", noise, "--pretrained",
                      pretraining[0] / f"{PREFIX}_backbone.pth", check=False)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "does not fit this preact_resnet18" in proc.stderr and not out.exists() and not noise.exists()


@pytest.mark.slow
@LARGE_ON_DISK
def test_custom_data_pretrains_and_starts_train_custom(tmp_path):
    """Pre-training on an ImageFolder at 16 px with Train_custom.py's net (width 64), then Train_custom.py from it."""
    data = tmp_path / "data"
    write_image_folder(str(data), n_train=6, n_test=2)
    pre = tmp_path / "pre"
    proc = run_script("Pretrain_simclr.py", "--dataset", "custom", "--data_path", data, "--output_dir", pre,
                      "--image_size", "16", "--epochs", "1", "--batch_size", "6", "--num_workers", "0")
    assert "18 training images" in proc.stdout and "imagefolder layout" in proc.stdout
    backbone = pre / "simclr_imagefolder_backbone.pth"
    proc = run_script("Train_custom.py", "--data_path", data, "--output_dir", tmp_path / "run", *CUSTOM_FAST,
                      "--num_epochs", 1, "--pretrained", backbone)
    assert f"net1: {BACKBONE_TENSORS} backbone tensors loaded from {backbone}" in proc.stdout
