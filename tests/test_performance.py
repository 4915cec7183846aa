"""The optimised train step equals the plain fp32 step within tolerance; bench.py runs and reports."""
import copy
import json
import os

import numpy as np
import pytest
import torch

from dividemix import DivideMixConfig, Precision, cpu_native_bf16, default_amp, train_step
from PreResNet import ResNet18
from runs import run_script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _step(precision, nets, batch, seed):
    """One train_step from copies of `nets` with fixed random draws; returns (Lx, Lu, loss, parameter update)."""
    net, net2 = (copy.deepcopy(n) for n in nets)
    if precision.channels_last:
        net, net2 = net.to(memory_format=torch.channels_last), net2.to(memory_format=torch.channels_last)
    net.train(), net2.eval()
    before = torch.cat([p.detach().flatten().clone() for p in net.parameters()])
    opt = torch.optim.SGD(net.parameters(), lr=0.02, momentum=0.9, weight_decay=5e-4)
    cfg = DivideMixConfig(num_class=10, lambda_u=25, precision=precision)
    np.random.seed(seed)
    torch.manual_seed(seed)
    Lx, Lu, loss = train_step(net, net2, opt, batch, cfg, lambda_now=25.0)
    after = torch.cat([p.detach().flatten() for p in net.parameters()])
    return Lx.item(), Lu.item(), loss.item(), after - before


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    nets = [ResNet18(10), ResNet18(10)]
    g = torch.Generator().manual_seed(1)
    B, U = 8, 8
    batch = [torch.randn(B, 3, 32, 32, generator=g), torch.randn(B, 3, 32, 32, generator=g),
             torch.randint(0, 10, (B,), generator=g), torch.rand(B, generator=g),
             torch.randn(U, 3, 32, 32, generator=g), torch.randn(U, 3, 32, 32, generator=g)]
    return nets, batch, _step(Precision(), nets, batch, seed=3)


# Batch 8 of random images through train-mode BatchNorm amplifies rounding: a layout change alone moves the
# update by ~0.5%, bf16 by ~12%, while the direction stays the same (cosine > 0.99).
@pytest.mark.slow  # bf16 on a CPU without bf16 instructions is emulated: tens of seconds
@pytest.mark.parametrize("precision,tol_loss,tol_update,min_cos", [
    (Precision(channels_last=True), 1e-4, 2e-2, 0.9999),
    (Precision(amp=True, channels_last=True), 3e-2, 0.2, 0.99),
])
def test_optimised_step_matches_plain_fp32(setup, precision, tol_loss, tol_update, min_cos):
    nets, batch, (Lx, Lu, loss, update) = setup
    Lx2, Lu2, loss2, update2 = _step(precision, nets, batch, seed=3)
    assert Lx2 == pytest.approx(Lx, rel=tol_loss)
    assert Lu2 == pytest.approx(Lu, rel=tol_loss, abs=1e-4)
    assert loss2 == pytest.approx(loss, rel=tol_loss)
    assert ((update2 - update).norm() / update.norm()).item() < tol_update
    cos = torch.nn.functional.cosine_similarity(update, update2, dim=0).item()
    print(f"relative update difference {((update2 - update).norm() / update.norm()).item():.4f}, cosine {cos:.5f}")
    assert cos > min_cos


@pytest.mark.slow
def test_bench_runs_and_reports(tmp_path):
    proc = run_script("bench.py", "--device", "cpu", "--num_train", "48", "--num_test", "16", "--batch_size", "8",
                      "--eval_batch_size", "32", "--epochs", "1", "--num_workers", "0", "--net_width", "8")
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["device"] == "cpu" and report["torch"] == torch.__version__
    for impl in ("fast", "baseline"):
        for phase in ("warmup", "eval", "gmm", "train1", "train2", "test"):
            entry = report[impl]["phases"][phase]
            assert entry["seconds"] > 0 and entry["images_per_s"] > 0
    assert report["speedup_vs_baseline"] > 0 and report["peak_memory_bytes"] > 0
    # the CPU's capability is recorded, and --amp took the training scripts' default for it
    assert report["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert report["cpu_native_bf16"] == cpu_native_bf16()
    assert report["amp"] == default_amp(torch.device("cpu"))


@pytest.mark.parametrize("capabilities, native", [
    ({"avx2": True, "avx512_f": False, "avx512_bf16": False, "amx_bf16": False}, False),
    ({"avx512_f": True, "avx512_bf16": False}, False),
    ({"avx512_f": True, "avx512_bf16": True}, True),
    ({"avx512_bf16": False, "amx_bf16": True}, True),
    ({"neon": True, "bf16": True}, True),
])
def test_amp_default_follows_native_bf16(monkeypatch, capabilities, native):
    """bf16 autocast is on by default with CUDA, and on a CPU only where torch reports bf16 instructions."""
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: capabilities, raising=False)
    assert cpu_native_bf16() is native and default_amp(torch.device("cpu")) is native
    assert default_amp(torch.device("cuda")) is True

    class Args:
        amp, channels_last = None, True

    args = Args()
    assert Precision.from_args(args, torch.device("cpu")).amp is native and args.amp is native
