"""The algorithm's formulas against hand-computed values, and the training iteration's behaviour."""
import argparse
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import dividemix
from dividemix import (DivideMixConfig, Precision, confidence_penalty, division_stats, fit_gmm, gmm_input,
                       linear_rampup, normalise_losses, prior_penalty, semi_loss, set_learning_rate, sharpen,
                       topk_accuracy, train_epoch, train_step)


def test_sharpen():
    out = sharpen(torch.tensor([[0.6, 0.4]]), 0.5)
    assert torch.allclose(out, torch.tensor([[0.36 / 0.52, 0.16 / 0.52]]))


@pytest.mark.parametrize("current,expected", [(9.0, 0.0), (10.0, 0.0), (18.0, 12.5), (26.0, 25.0), (40.0, 25.0)])
def test_linear_rampup(current, expected):
    assert linear_rampup(current, warm_up=10, lambda_u=25, rampup_length=16) == pytest.approx(expected)


def test_confidence_penalty_is_negative_entropy():
    logits = torch.tensor([[0.0, math.log(3.0)]])  # p = (0.25, 0.75)
    expected = 0.25 * math.log(0.25) + 0.75 * math.log(0.75)
    assert confidence_penalty(logits).item() == pytest.approx(expected, abs=1e-6)


def test_prior_penalty_uniform_prior():
    # rows with p = (0, 1)-ish and (0.5, 0.5) average to (0.25, 0.75)
    logits = torch.tensor([[0.0, math.log(3.0)], [0.0, math.log(3.0)]])
    expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert prior_penalty(logits, 2).item() == pytest.approx(expected, abs=1e-6)
    assert prior_penalty(torch.zeros(4, 10), 10).item() == pytest.approx(0.0, abs=1e-7)


def test_semi_loss():
    Lx, Lu = semi_loss(torch.zeros(1, 2), torch.tensor([[1.0, 0.0]]), torch.zeros(1, 2), torch.tensor([[1.0, 0.0]]))
    assert Lx.item() == pytest.approx(math.log(2))
    assert Lu.item() == pytest.approx(0.25)  # mean over rows AND classes: (0.25 + 0.25) / 2
    Lx, Lu = semi_loss(torch.zeros(2, 3), torch.full((2, 3), 1 / 3), torch.zeros(0, 3), torch.zeros(0, 3))
    assert Lu.item() == 0.0 and Lx.item() == pytest.approx(math.log(3))


def test_normalise_losses():
    assert torch.allclose(normalise_losses(torch.tensor([1.0, 3.0, 5.0])), torch.tensor([0.0, 0.5, 1.0]))
    assert torch.equal(normalise_losses(torch.full((4,), 2.0)), torch.zeros(4))


def test_gmm_input_window():
    history = [torch.full((3,), float(v)) for v in range(7)]
    assert torch.allclose(gmm_input(history, 5), torch.full((3,), 4.0))  # mean of 2..6
    assert torch.allclose(gmm_input(history, 1), torch.full((3,), 6.0))
    assert torch.allclose(gmm_input(history[:2], 5), torch.full((3,), 0.5))  # fewer than 5 available


def test_fit_gmm_settings_and_clean_component(monkeypatch):
    seen = {}
    real = dividemix.GaussianMixture

    def spy(**kwargs):
        seen.update(kwargs)
        return real(**kwargs)

    monkeypatch.setattr(dividemix, "GaussianMixture", spy)
    np.random.seed(0)
    clean = np.random.normal(0.1, 0.03, 300)
    noisy = np.random.normal(0.8, 0.05, 100)
    prob, gmm = fit_gmm(torch.tensor(np.concatenate([clean, noisy]), dtype=torch.float32))
    assert seen == {"n_components": 2, "max_iter": 10, "tol": 1e-2, "reg_covar": 5e-4}
    assert prob[:300].min() > 0.9 and prob[300:].max() < 0.1  # posterior of the smaller-mean component


def test_division_stats_by_hand():
    prob = np.array([0.9, 0.2, 0.7, 0.4])
    clean = np.array([True, False, False, True])
    s = division_stats(prob, 0.5, clean)
    assert s["labeled"] == 2 and s["unlabeled"] == 2
    assert s["precision"] == 0.5 and s["recall"] == 0.5
    assert s["auc"] == pytest.approx(0.75)
    assert math.isnan(division_stats(prob, 0.5, np.ones(4, bool))["auc"])
    assert "auc" not in division_stats(prob, 0.5)


def test_step_learning_rate():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    assert set_learning_rate(opt, 0.02, 149, 150) == 0.02
    assert set_learning_rate(opt, 0.02, 150, 150) == pytest.approx(0.002)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.002)


def test_topk_accuracy():
    logits = torch.tensor([[3.0, 2.0, 1.0], [1.0, 3.0, 2.0], [1.0, 2.0, 3.0], [3.0, 1.0, 2.0]])
    labels = torch.tensor([0, 2, 0, 1])
    top1, top2 = topk_accuracy(logits, labels, ks=(1, 2))
    assert top1 == 25.0 and top2 == 50.0


# ----------------------------------------------------------------------------- the training iteration

class Recorder(nn.Module):
    """A tiny conv-BN net that records every forward: (input, output, training mode, grad enabled)."""

    def __init__(self, num_class=3):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, num_class)
        self.calls = []

    def forward(self, x):
        out = self.fc(F.relu(self.bn(self.conv(x))).mean((2, 3)))
        self.calls.append((x.detach().clone(), out.detach().clone(), self.training, torch.is_grad_enabled()))
        return out


def _batch(B=4, U=3, C=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, x2 = torch.randn(B, 3, 6, 6, generator=g), torch.randn(B, 3, 6, 6, generator=g)
    u, u2 = torch.randn(U, 3, 6, 6, generator=g), torch.randn(U, 3, 6, 6, generator=g)
    labels = torch.randint(0, C, (B,), generator=g)
    w = torch.rand(B, generator=g)
    return [x, x2, labels, w, u, u2]


def _reference_loss(net, net2, batch, cfg, lam, perm, lambda_now):
    """The original Train_cifar.py's iteration written out from the recorded outputs of the six no-grad forwards."""
    x, x2, labels, w, u, u2 = batch
    B = x.shape[0]
    (_, o_u11, *_), (_, o_u12, *_), (_, o_x, *_), (_, o_x2, *_) = net.calls[:4]
    (_, o_u21, *_), (_, o_u22, *_) = net2.calls[:2]
    pu = (o_u11.softmax(1) + o_u12.softmax(1) + o_u21.softmax(1) + o_u22.softmax(1)) / 4
    tu = pu ** 2 / (pu ** 2).sum(1, keepdim=True)
    y = F.one_hot(labels, cfg.num_class).float()
    px = (o_x.softmax(1) + o_x2.softmax(1)) / 2
    px = w.view(-1, 1) * y + (1 - w.view(-1, 1)) * px
    tx = px ** 2 / (px ** 2).sum(1, keepdim=True)
    inputs = torch.cat([x, x2, u, u2])
    targets = torch.cat([tx, tx, tu, tu])
    mixed_in = lam * inputs + (1 - lam) * inputs[perm]
    mixed_t = lam * targets + (1 - lam) * targets[perm]
    recorded_in, logits, training, grad = net.calls[4]
    assert training and grad
    assert torch.allclose(recorded_in, mixed_in, atol=1e-6)
    Lx = -(F.log_softmax(logits[:2 * B], 1) * mixed_t[:2 * B]).sum(1).mean()
    Lu = ((logits[2 * B:].softmax(1) - mixed_t[2 * B:]) ** 2).mean()
    prior = torch.full((cfg.num_class,), 1 / cfg.num_class)
    penalty = (prior * torch.log(prior / logits.softmax(1).mean(0))).sum()
    return Lx + lambda_now * Lu + penalty


def test_train_step_matches_spec_formulas(monkeypatch):
    torch.manual_seed(0)
    net, net2 = Recorder(), Recorder()
    net.train(), net2.eval()
    cfg = DivideMixConfig(num_class=3, alpha=4, T=0.5, lambda_u=25)
    batch = _batch()
    monkeypatch.setattr(dividemix.np.random, "beta", lambda a, b: 0.3)  # l = max(0.3, 0.7) = 0.7
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    torch.manual_seed(5)
    _, _, loss = train_step(net, net2, opt, batch, cfg, lambda_now=7.0)
    torch.manual_seed(5)
    perm = torch.randperm(14)
    expected = _reference_loss(net, net2, batch, cfg, 0.7, perm, 7.0)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_train_step_forward_order_modes_and_batchnorm_updates():
    torch.manual_seed(0)
    net, net2 = Recorder(), Recorder()
    net.train(), net2.eval()
    batch = _batch(B=4, U=3)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    train_step(net, net2, opt, batch, DivideMixConfig(num_class=3), 1.0)
    # six separate no-grad forwards (u, u2 on net; u, u2 on net2; x, x2 on net), then one mixed forward
    sizes = [c[0].shape[0] for c in net.calls]
    assert sizes == [3, 3, 4, 4, 14]
    assert [c[2:] for c in net.calls] == [(True, False)] * 4 + [(True, True)]
    assert torch.equal(net.calls[0][0], batch[4]) and torch.equal(net.calls[2][0], batch[0])
    assert [c[2:] for c in net2.calls] == [(False, False)] * 2
    assert net.bn.num_batches_tracked.item() == 5  # every forward of the trained net updates running stats
    assert net2.bn.num_batches_tracked.item() == 0


def test_train_step_labeled_rows_only_for_real_world_datasets():
    torch.manual_seed(0)
    net, net2 = Recorder(), Recorder()
    net.train(), net2.eval()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    cfg = DivideMixConfig(num_class=3, unlabeled_loss=False)
    _, Lu, _ = train_step(net, net2, opt, _batch(B=4, U=3), cfg, 25.0)
    assert net.calls[-1][0].shape[0] == 8 and Lu.item() == 0.0


def test_train_step_without_unlabeled_rows():
    torch.manual_seed(0)
    net, net2 = Recorder(), Recorder()
    net.train(), net2.eval()
    batch = _batch(B=4, U=0)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    Lx, Lu, loss = train_step(net, net2, opt, batch, DivideMixConfig(num_class=3), 25.0)
    assert [c[0].shape[0] for c in net.calls] == [4, 4, 8] and not net2.calls
    assert Lu.item() == 0.0 and torch.isfinite(loss)


class ListLoader(list):
    """A list of batches with the attributes the engine reads."""

    def __init__(self, batches, num_samples, batch_size):
        super().__init__(batches)
        self.num_samples, self.batch_size = num_samples, batch_size
        self.iterations_started = 0

    def __iter__(self):
        self.iterations_started += 1
        return super().__iter__()


def test_train_epoch_rampup_cycling_and_empty_sets():
    torch.manual_seed(0)
    net, net2 = Recorder(), Recorder()
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    x, x2, labels, w, u, u2 = _batch(B=8, U=4)
    labeled = ListLoader([(x, x2, labels, w)] * 2 + [(x[:4], x2[:4], labels[:4], w[:4])], 20, 8)
    unlabeled = ListLoader([(u, u2)] * 2, 8, 4)
    cfg = DivideMixConfig(num_class=3, lambda_u=16, warm_up=10)
    out = train_epoch(12, net, net2, opt, labeled, unlabeled, cfg, torch.device("cpu"))
    # num_iter = 20 // 8 + 1 = 3; lambda = 16 * (12 + b / 3 - 10) / 16 for b = 0, 1, 2
    assert out["iterations"] == 3 and out["lambda"] == pytest.approx(2 + 1 / 3)
    assert unlabeled.iterations_started == 2  # restarted once, when exhausted
    assert net.training and not net2.training

    before = [p.clone() for p in net.parameters()]
    empty = ListLoader([], 0, 8)
    out = train_epoch(12, net, net2, opt, empty, unlabeled, cfg, torch.device("cpu"))
    assert out["iterations"] == 0 and all(torch.equal(a, b) for a, b in zip(before, net.parameters()))

    out = train_epoch(12, net, net2, opt, labeled, None, cfg, torch.device("cpu"))
    assert out["iterations"] == 3 and out["Lu"] == 0.0


def test_warmup_epoch_cross_entropy_plus_confidence_penalty():
    torch.manual_seed(0)
    x, _, labels, *_ = _batch(B=6)
    for penalty in (False, True):
        net = Recorder()
        opt = torch.optim.SGD(net.parameters(), lr=0.0)  # lr 0: the recorded logits are those of the loss
        loader = ListLoader([(x, labels)], 6, 6)
        loss = dividemix.warmup_epoch(net, opt, loader, torch.device("cpu"), penalty=penalty)
        logits = net.calls[0][1]
        expected = F.cross_entropy(logits, labels)
        if penalty:
            p = logits.softmax(1)
            expected = expected + (p * p.log()).sum(1).mean()
        assert loss == pytest.approx(expected.item(), rel=1e-5)


def test_config_from_args_maps_every_flag():
    args = argparse.Namespace(num_class=14, alpha=0.5, T=0.4, lambda_u=150.0, p_threshold=0.6, warm_up=30)
    precision = Precision(amp=True)
    cfg = DivideMixConfig.from_args(args, precision, unlabeled_loss=False, loss_window=5)
    assert (cfg.num_class, cfg.alpha, cfg.T, cfg.lambda_u, cfg.p_threshold, cfg.warm_up) == (14, 0.5, 0.4, 150.0, 0.6, 30)
    assert cfg.unlabeled_loss is False and cfg.loss_window == 5 and cfg.precision is precision
    assert cfg.rampup_length == 16


# ----------------------------------------------------------------------------- co-divide

def test_co_divide_is_each_nets_gmm_division_in_order():
    torch.manual_seed(0)
    nets = [Recorder(), Recorder()]
    images, labels = torch.randn(40, 3, 6, 6), torch.randint(0, 3, (40,))
    loader = [(images[:25], labels[:25]), (images[25:], labels[25:])]
    clean = np.arange(40) % 3 != 0
    cfg = DivideMixConfig(num_class=3, loss_window=2)
    earlier = [torch.rand(40), torch.rand(40)]
    histories = [[earlier[0]], [earlier[1]]]

    np.random.seed(3)  # the GMM fits draw from numpy's global generator, net1's first
    divisions, timing = dividemix.co_divide(nets, loader, cfg, torch.device("cpu"), histories=histories, clean=clean)
    assert sorted(timing) == ["eval1", "eval2", "gmm1", "gmm2"]

    np.random.seed(3)
    for k, net in enumerate(nets):
        net.eval()
        with torch.no_grad():
            losses = F.cross_entropy(net(images), labels, reduction="none")
        history = [earlier[k], normalise_losses(losses)]
        assert len(histories[k]) == 2 and torch.allclose(histories[k][1], history[1])
        prob, input_loss, _, stats = dividemix.gmm_division(history, cfg.p_threshold, 2, clean)
        assert np.array_equal(divisions[k][0], prob) and torch.equal(divisions[k][1], input_loss)
        assert divisions[k][3] == stats and "auc" in stats

    # the window keeps only the losses it averages
    dividemix.co_divide(nets, loader, cfg, torch.device("cpu"), histories=histories)
    assert [len(h) for h in histories] == [2, 2]


def test_co_divide_takes_a_loader_and_labels_per_net():
    torch.manual_seed(1)
    nets = [Recorder(), Recorder()]
    images, labels = torch.randn(60, 3, 6, 6), torch.randint(0, 3, (60,))
    asked = []

    def loader_of(k):
        """Net k's own half of the images."""
        asked.append(("loader", k))
        rows = slice(30 * k, 30 * (k + 1))
        return [(images[rows], labels[rows])]

    def labels_of(k):
        """The noisy labels of net k's half."""
        asked.append(("labels", k))
        return labels[30 * k:30 * (k + 1)].numpy()

    cfg = DivideMixConfig(num_class=3, classwise_min_samples=5)
    divisions, _ = dividemix.co_divide(nets, loader_of, cfg, torch.device("cpu"), labels=labels_of, overlap=False)
    assert asked == [("loader", 0), ("labels", 0), ("loader", 1), ("labels", 1)]
    assert [len(d[0]) for d in divisions] == [30, 30]
    assert all("classwise" in d[3] for d in divisions)
