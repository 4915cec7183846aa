"""The authors' original training iteration, replayed through this project's own code.

tests/reference_steps/ holds three CIFAR iterations recorded by running the original Train_cifar.py on the CPU
(see the README there): its inputs, its MixMatch draws, its losses and digests of both nets before and after the
SGD step. Each case here builds the two seeded PreAct ResNet-18s as Train_cifar.py does, replays the iteration
through dividemix.train_epoch with the recorded draws, and compares everything recorded to about 1e-6 relative:
any change of the algorithm's arithmetic (a formula, a constant, the order of the forwards, the optimizer) fails.
"""
import glob
import os

import numpy as np
import pytest
import torch

import dividemix
import Train_cifar
from dividemix import DivideMixConfig, Precision, train_epoch

CASES = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "reference_steps", "*.npz")))
RTOL = 1e-6  # recorded and replayed values agree bit for bit where recorded; this leaves other CPUs their last bits
ATOL = 1e-12  # only for values that are exactly zero (a BatchNorm bias at initialisation)


def original_name(key):
    """This project's state-dict name in the original's naming (its projection shortcut sits in a Sequential)."""
    return key.replace(".shortcut.weight", ".shortcut.0.weight")


def digests(tensors):
    """float64 sum and sum of squares of every floating tensor, keyed by the original's names."""
    out = {}
    for key, t in tensors.items():
        if t.is_floating_point():
            t = t.detach().double()
            out[f"sum/{original_name(key)}"] = t.sum().item()
            out[f"sumsq/{original_name(key)}"] = (t * t).sum().item()
    return out


def momentum_buffers(net, optimizer):
    """SGD's momentum buffer of every parameter, keyed by the parameter's name."""
    return {name: optimizer.state[p]["momentum_buffer"] for name, p in net.named_parameters()}


def assert_matches(ours, ref, prefix):
    """Every digest recorded under prefix equals ours (same keys, RTOL); names the first that differs."""
    recorded = {k[len(prefix) + 1:]: float(ref[k]) for k in ref.files if k.startswith(prefix + "/")
                and not k.startswith(prefix + "/full/")}
    assert sorted(ours) == sorted(recorded), f"{prefix}: the recorded entries are not this net's"
    for key, value in recorded.items():
        assert ours[key] == pytest.approx(value, rel=RTOL, abs=ATOL), f"{prefix}/{key}"


class OneBatch(list):
    """A loader of one batch with the attributes train_epoch reads."""

    def __init__(self, batch, num_samples, batch_size):
        super().__init__([batch])
        self.num_samples, self.batch_size = num_samples, batch_size


@pytest.fixture
def one_thread():
    """The cases were recorded with one CPU thread: replay them with one too."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_three_cases_are_present():
    names = [os.path.basename(c) for c in CASES]
    assert names == ["s0_e12_l25_c10_b8.npz", "s1_e40_l150_c100_b8.npz", "s2_e20_l0_c10_b16.npz"]


@pytest.mark.parametrize("path", CASES, ids=os.path.basename)
def test_original_iteration_replayed(path, monkeypatch, one_thread):
    ref = np.load(path)
    case = {k[len("case/"):]: ref[k].item() for k in ref.files if k.startswith("case/")}
    num_class, batch = case["num_class"], case["batch"]
    cpu = torch.device("cpu")

    # 1. the two nets, seeded and built one after the other as Train_cifar.py builds them
    torch.manual_seed(case["seed"])
    net1, net2 = (Train_cifar.create_model(num_class, cpu, Precision()) for _ in range(2))
    assert_matches(digests(net1.state_dict()), ref, "init1")
    assert_matches(digests(net2.state_dict()), ref, "init2")
    net2_before = {k: v.clone() for k, v in net2.state_dict().items()}

    # 2. the iteration: the project's optimizer and train_epoch, the original's inputs and MixMatch draws
    optimizer = Train_cifar.create_optimizer(net1, case["lr"])
    group = optimizer.param_groups[0]
    assert (group["momentum"], group["weight_decay"]) == (case["momentum"], case["weight_decay"])
    cfg = DivideMixConfig(num_class=num_class, alpha=case["alpha"], T=case["T"], lambda_u=case["lambda_u"],
                          warm_up=case["warm_up"], rampup_length=case["rampup_length"])
    draws = []
    monkeypatch.setattr(dividemix.np.random, "beta", lambda a, b: draws.append(("beta", a, b)) or
                        float(ref["input/l"]))
    monkeypatch.setattr(dividemix.torch, "randperm", lambda n, device=None: draws.append(("randperm", n)) or
                        torch.from_numpy(ref["input/perm"]).to(device))
    tensor = lambda key: torch.from_numpy(ref[key])  # noqa: E731
    # num_iter = num_samples // batch + 1: a labeled set of `batch` samples gives the recorded num_iter of 2
    assert case["num_iter"] == 2
    labeled = OneBatch((tensor("input/x"), tensor("input/x2"), tensor("input/y"), tensor("input/w")), batch, batch)
    unlabeled = OneBatch((tensor("input/u"), tensor("input/u2")), batch, batch)
    out = train_epoch(case["epoch"], net1, net2, optimizer, labeled, unlabeled, cfg, cpu)
    assert draws == [("beta", case["alpha"], case["alpha"]), ("randperm", 4 * batch)]

    # 3. losses, lambda, every digest after the step, the momentum buffers and the classifier in full
    assert out["iterations"] == 1
    assert out["lambda"] == pytest.approx(float(ref["expect/lamb"]), rel=RTOL)
    assert out["Lx"] == pytest.approx(float(ref["expect/Lx"]), rel=RTOL)
    assert out["Lu"] == pytest.approx(float(ref["expect/Lu"]), rel=RTOL, abs=ATOL)
    assert_matches(digests(net1.state_dict()), ref, "after1")
    assert_matches(digests(momentum_buffers(net1, optimizer)), ref, "momentum1")
    for name in ("linear.weight", "linear.bias"):
        np.testing.assert_allclose(net1.state_dict()[name].numpy(), ref[f"after1/full/{name}"], rtol=RTOL,
                                   atol=ATOL, err_msg=name)
    # the other net only guessed, in eval mode: not a bit of it moved
    assert all(torch.equal(v, net2.state_dict()[k]) for k, v in net2_before.items())
