"""The successors' ideas as options: class-wise division (RSL), the kNN OOD filter and MixEMatch's embedding mixing
(Manifold DivideMix): their rules on hand-made inputs, the default path untouched, end to end with resume."""
import json
import os

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from sklearn.neighbors import NearestNeighbors

import dividemix
from dividemix import (DivideMixConfig, fit_gmm, fit_gmm_classwise, gmm_division, knn_scores, normalise_losses,
                       ood_removal, train_step)
from fake_cifar import write_fake_cifar
from PreResNet import ResNet18
from runs import CIFAR_FAST, LARGE_ON_DISK, run_script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------- class-wise division

def two_class_losses(seed=0):
    """Class 0's losses are low (clean 0.05, noisy 0.45); class 1's high (clean 0.5, noisy 0.95): a global GMM
    takes class 1's clean samples for noise, a GMM per class does not."""
    rng = np.random.default_rng(seed)
    clean = np.concatenate([rng.random(200) < 0.7, rng.random(200) < 0.7])
    labels = np.repeat([0, 1], 200)
    centre = np.where(labels == 0, np.where(clean, 0.05, 0.45), np.where(clean, 0.5, 0.95))
    losses = torch.tensor(np.clip(centre + rng.normal(0, 0.03, 400), 0, 1), dtype=torch.float32)
    return losses, labels, clean


def test_classwise_fits_each_class_on_its_own():
    losses, labels, clean = two_class_losses()
    np.random.seed(0)
    prob_global, _ = fit_gmm(losses)
    np.random.seed(0)
    prob, gmm, fallback = fit_gmm_classwise(losses, labels, min_samples=20)
    assert fallback == []
    for c in (0, 1):  # each class's probabilities are those of a GMM fitted on that class alone
        rows = labels == c
        np.random.seed(0)
        fit_gmm(losses)  # the global fit comes first and draws from the same generator
        for before in range(c):
            fit_gmm(losses[torch.as_tensor(np.flatnonzero(labels == before))])
        alone, _ = fit_gmm(losses[torch.as_tensor(np.flatnonzero(rows))])
        assert np.allclose(prob[rows], alone)
    acc = lambda p: np.mean((p > 0.5) == clean)  # noqa: E731
    assert acc(prob) > 0.97 and acc(prob_global) < 0.85


def test_classwise_falls_back_to_the_global_fit_for_small_classes():
    losses, labels, _ = two_class_losses()
    labels = labels.copy()
    labels[:10] = 2  # a class of ten samples
    np.random.seed(1)
    prob_global, _ = fit_gmm(losses)
    np.random.seed(1)
    prob, _, fallback = fit_gmm_classwise(losses, labels, min_samples=20)
    assert fallback == [2]
    assert np.array_equal(prob[:10], prob_global[:10])


def test_gmm_division_classwise_stats_and_global_default():
    losses, labels, clean = two_class_losses()
    history = [normalise_losses(losses)]
    np.random.seed(2)
    plain = gmm_division(history, 0.5, 1, clean)
    np.random.seed(2)
    again = gmm_division(history, 0.5, 1, clean, labels=None)
    assert np.array_equal(plain[0], again[0]) and "classwise" not in plain[3]
    np.random.seed(2)
    prob, input_loss, _, stats = gmm_division(history, 0.5, 1, clean, labels=labels, min_samples=20)
    per_class = stats["classwise"]
    assert per_class["classes"] == [0, 1] and per_class["fallback"] == []
    pred = prob > 0.5
    assert per_class["labeled"] == [int(pred[labels == 0].sum()), int(pred[labels == 1].sum())]
    assert sum(per_class["labeled"]) == stats["labeled"]
    for c, threshold in zip((0, 1), per_class["threshold"]):
        assert threshold == pytest.approx(float(input_loss.numpy()[(labels == c) & pred].max()))


# ----------------------------------------------------------------------------- kNN OOD filter

def test_knn_scores_are_exact_mean_cosine_distances():
    features = torch.randn(300, 16, generator=torch.Generator().manual_seed(0))
    scores = knn_scores(features, k=7, chunk=64)
    nn_ = NearestNeighbors(n_neighbors=8, metric="cosine", algorithm="brute").fit(features.numpy())
    distances, indices = nn_.kneighbors(features.numpy())
    assert np.all(indices[:, 0] == np.arange(300))  # each sample is its own nearest: dropped
    assert np.allclose(scores.numpy(), distances[:, 1:].mean(1), atol=1e-5)


def test_the_filter_removes_the_samples_far_from_the_rest():
    g = torch.Generator().manual_seed(1)
    inside = F.normalize(torch.randn(5, 32, generator=g), dim=1).repeat_interleave(40, 0)
    inside = inside + 0.05 * torch.randn(200, 32, generator=g)  # five tight clusters
    outside = torch.randn(20, 32, generator=g)  # scattered
    scores = knn_scores(torch.cat([inside, outside]), k=5)
    removed = ood_removal(scores, 20 / 220)
    assert removed.sum() == 20 and removed[200:].all()
    assert ood_removal(scores, 0.0).sum() == 0


# ----------------------------------------------------------------------------- embedding mixing

def test_preresnet_mixes_embeddings_before_its_head_and_keeps_its_keys():
    torch.manual_seed(0)
    net = ResNet18(num_classes=10).eval()
    x = torch.randn(6, 3, 32, 32)
    idx = torch.tensor([3, 0, 5, 1, 2, 4])
    with torch.no_grad():
        f = net.features(x)
        assert torch.equal(net(x), net.linear(f))
        assert torch.allclose(net(x, mix=(0.7, idx)), net.linear(0.7 * f + 0.3 * f[idx]), atol=1e-6)
    keys = list(net.state_dict())
    assert keys[:2] == ["conv1.weight", "bn1.weight"] and keys[-2:] == ["linear.weight", "linear.bias"]
    assert not any("feature" in k or "head" in k for k in keys)


class Embedder(nn.Module):
    """A tiny conv-BN net with features() and forward(x, mix) like the project's models."""

    def __init__(self, num_class=3):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, num_class)

    def features(self, x):
        return F.relu(self.bn(self.conv(x))).mean((2, 3))

    def forward(self, x, mix=None):
        f = self.features(x)
        if mix is not None:
            f = mix[0] * f + (1 - mix[0]) * f[mix[1]]
        return self.fc(f)


def _step(cfg, monkeypatch, lambda_now=3.0):
    """One train_step from fixed weights, batch and draws; returns (loss, net)."""
    torch.manual_seed(0)
    net, net2 = Embedder(), Embedder()
    net.train(), net2.eval()
    g = torch.Generator().manual_seed(3)
    x, x2, u, u2 = (torch.randn(n, 3, 6, 6, generator=g) for n in (4, 4, 3, 3))
    batch = [x, x2, torch.randint(0, 3, (4,), generator=g), torch.rand(4, generator=g), u, u2]
    monkeypatch.setattr(dividemix.np.random, "beta", lambda a, b: 0.3)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    torch.manual_seed(5)
    _, _, loss = train_step(net, net2, opt, batch, cfg, lambda_now)
    return loss.item(), net


def test_mixed_embeddings_add_their_loss_terms_with_weight_lambda_e(monkeypatch):
    base, net_base = _step(DivideMixConfig(num_class=3), monkeypatch)
    one, _ = _step(DivideMixConfig(num_class=3, mix="input+embedding", lambda_e=1.0), monkeypatch)
    two, _ = _step(DivideMixConfig(num_class=3, mix="input+embedding", lambda_e=2.0), monkeypatch)
    zero, net_zero = _step(DivideMixConfig(num_class=3, mix="input+embedding", lambda_e=0.0), monkeypatch)
    assert one != base and two - base == pytest.approx(2 * (one - base), rel=1e-5)
    assert zero == base  # no weight: the input-mixing loss alone
    for a, b in zip(net_base.parameters(), net_zero.parameters()):
        assert torch.equal(a, b)


def test_mixed_embedding_terms_by_hand(monkeypatch):
    """The added term is Lx_e + lambda * Lu_e of the head on lam * e + (1 - lam) * e[perm] of the unmixed rows."""
    cfg = DivideMixConfig(num_class=3, mix="input+embedding", lambda_e=1.0)
    captured = {}
    original = dividemix.semi_loss

    def spy(logits_x, targets_x, logits_u, targets_u):
        captured.setdefault("calls", []).append((logits_x.detach(), targets_x, logits_u.detach(), targets_u))
        return original(logits_x, targets_x, logits_u, targets_u)

    monkeypatch.setattr(dividemix, "semi_loss", spy)
    total, _ = _step(cfg, monkeypatch, lambda_now=3.0)
    (lx0, tx0, lu0, tu0), (lx1, tx1, lu1, tu1) = captured["calls"]
    assert torch.equal(tx0, tx1) and torch.equal(tu0, tu1)  # the same mixed targets: same lambda, same partners
    assert lx1.shape == lx0.shape and lu1.shape == lu0.shape and not torch.equal(lx0, lx1)
    Lx_e, Lu_e = original(lx1, tx1, lu1, tu1)
    base, _ = _step(DivideMixConfig(num_class=3), monkeypatch)
    assert total == pytest.approx(base + Lx_e.item() + 3.0 * Lu_e.item(), rel=1e-5)


# ----------------------------------------------------------------------------- end to end, with resume

FAST = [*CIFAR_FAST, "--save_loss_every", "0"]
OPTIONS = ["--division", "classwise", "--ood_filter", "knn", "--ood_k", "3", "--ood_remove", "0.1",
           "--ood_interval", "1", "--mix", "input+embedding", "--lambda_e", "0.5"]


def run_train(data, out, epochs, *extra):
    """Train_cifar.py with every option on; returns the completed process (checked)."""
    return run_script("Train_cifar.py", "--data_path", data, "--output_dir", out, "--num_epochs", epochs, *FAST,
                      *OPTIONS, *extra)


@pytest.mark.slow
def test_every_option_end_to_end_and_resumed_exactly(tmp_path):
    data = str(tmp_path / "cifar")
    write_fake_cifar(data, "cifar10", n_train=64, n_test=20)
    straight, resumed = str(tmp_path / "a"), str(tmp_path / "b")
    run_train(data, straight, 2)
    run_train(data, resumed, 1)
    proc = run_train(data, resumed, 2, "--resume")
    assert "resumed from epoch 1" in proc.stdout and "OOD filter: removed 6" in proc.stdout
    prefix = "cifar10_0.5_sym"
    logs = []
    for out in (straight, resumed):
        records = [json.loads(line) for line in open(os.path.join(out, prefix + "_log.jsonl"))]
        for record in records:
            record.pop("seconds"), record.pop("time"), record.get("ood_filter", {}).pop("seconds", None)
        logs.append(records)
    assert logs[0] == logs[1]
    epoch1 = logs[0][1]
    assert epoch1["ood_filter"]["removed"] == 6  # int(0.1 * 64)
    for net in ("net1", "net2"):
        per_class = epoch1[net]["classwise"]
        assert per_class["classes"] == list(range(10)) and sum(per_class["labeled"]) == epoch1[net]["labeled"]
        assert per_class["fallback"] == list(range(10))  # 6 or 7 images a class: fewer than 20, global fit
    checkpoints = [torch.load(os.path.join(out, prefix + "_checkpoint.pth.tar"), weights_only=False)
                   for out in (straight, resumed)]
    assert np.array_equal(checkpoints[0]["ood_removed"], checkpoints[1]["ood_removed"])
    for k in range(2):
        for name, tensor in checkpoints[0]["nets"][k].items():
            assert torch.equal(tensor, checkpoints[1]["nets"][k][name]), name


def test_option_flags_are_checked(tmp_path):
    proc = run_script("Train_cifar.py", "--ood_remove", "1", "--output_dir", tmp_path, check=False)
    assert proc.returncode == 2 and "--ood_remove 1 would take every training image out" in proc.stderr
    proc = run_script("Train_cifar.py", "--division", "perclass", "--output_dir", tmp_path, check=False)
    assert proc.returncode == 2 and "perclass" in proc.stderr and proc.stderr.count("\n") == 1


def test_plots_draw_the_classwise_division(tmp_path):
    import plots
    from synthetic_runs import write_cifar_run
    run = tmp_path / "runs" / "a"
    prefix = write_cifar_run(str(run), r=0.4, noise_mode="asym", seed=1, accs=[30, 40, 50], warm_up=1, n_samples=100)
    path = run / f"{prefix}_log.jsonl"
    records = [json.loads(line) for line in open(path)]
    for record in records[1:]:
        for k in (1, 2):
            record[f"net{k}"]["classwise"] = {"classes": list(range(10)), "labeled": [5 + k] * 10,
                                              "threshold": [0.1 * k] * 9 + [None], "fallback": [9]}
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert plots.main(plots.get_args_parser().parse_args([str(tmp_path / "runs"), "--out_dir",
                                                          str(tmp_path / "p")])) == 0
    names = sorted(os.listdir(tmp_path / "p"))
    assert "classwise_cifar10_asym_0.4_seed1.png" in names
    assert (tmp_path / "p" / "classwise_cifar10_asym_0.4_seed1.png").read_bytes()[:4] == b"\x89PNG"


@LARGE_ON_DISK
@pytest.mark.slow
@pytest.mark.parametrize("script", ["Train_clothing1M.py", "Train_webvision.py", "Train_custom.py"])
def test_classwise_division_in_the_other_scripts(tmp_path, script):
    """--division classwise reaches the division every script makes at the end of its warm-up epoch."""
    from fake_custom import write_image_folder
    from fake_realworld import write_fake_clothing1m, write_fake_webvision
    data, out = tmp_path / "data", tmp_path / "out"
    args = ["--data_path", str(data), "--output_dir", str(out), "--num_epochs", "0", "--batch_size", "4",
            "--num_workers", "0", "--division", "classwise"]
    if script == "Train_clothing1M.py":
        write_fake_clothing1m(str(data))
        args += ["--pretrained", "none", "--num_batches", "3", "--image_size", "48"]
    elif script == "Train_webvision.py":
        write_fake_webvision(str(data), n_train=12, n_val=6, n_imagenet=6)
        args += ["--image_size", "107"]
    else:
        write_image_folder(str(data))
        args += ["--pretrained", "none", "--arch", "preact_resnet18", "--image_size", "16"]
    run_script(script, *args)
    log = next(p for p in os.listdir(out) if p.endswith("_log.jsonl"))
    record = json.loads(open(out / log).readline())
    per_class = record["net1"]["classwise"]
    assert sum(per_class["labeled"]) == record["net1"]["labeled"]
    assert per_class["fallback"] == per_class["classes"]  # a handful of images a class: the global fit
