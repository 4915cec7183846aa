"""What the tests share about running the training scripts: tiny, fast arguments per script, the runner, and the
bit-for-bit comparison of two run folders."""
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from fake_cifar import write_fake_cifar
from fake_custom import write_image_folder
from fake_realworld import write_fake_clothing1m

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PREFIX = "cifar10_0.5_sym"
# Tests that are not about the network train a PreAct ResNet-18 of width 8 (the paper's is 64) through the same code
# path: about 50x less arithmetic per image and 3 MB checkpoints instead of 179 MB.
CIFAR_FAST = ["--batch_size", "8", "--warm_up", "1", "--eval_batch_size", "64", "--save_loss_every", "1",
              "--net_width", "8"]
CUSTOM_FAST = ["--arch", "preact_resnet18", "--image_size", "16", "--batch_size", "4", "--warm_up", "1",
               "--num_workers", "0"]

# Per script (and variant): how to write its tiny data set and the arguments of a tiny run, --num_epochs aside.
# Train_webvision.py is left out: its Inception-ResNet-v2 checkpoints are 0.9 GB a save, and it resumes through the
# same run folder and checkpoint code as Train_clothing1M.py.
SCRIPTS = {
    "cifar": ("Train_cifar.py", lambda d: write_fake_cifar(d, "cifar10", n_train=64, n_test=20), CIFAR_FAST),
    "clothing1m": ("Train_clothing1M.py", write_fake_clothing1m,
                   ["--pretrained", "none", "--batch_size", "4", "--num_batches", "2", "--image_size", "48",
                    "--num_workers", "0"]),
    "custom-streamed-val": ("Train_custom.py", lambda d: write_image_folder(d, n_train=5, n_test=2, n_val=2),
                            [*CUSTOM_FAST, "--cache_limit_gb", "0"]),
    "custom-cached": ("Train_custom.py", lambda d: write_image_folder(d, n_train=5, n_test=2),
                      [*CUSTOM_FAST, "--cache_limit_gb", "4"]),
}


def script_command(script, *args, prestarted=True):
    """`python SCRIPT ARGS...` for a script of the repository, through tests/prestarted.py unless told not to (the
    same process as far as the script can tell, without its seconds of importing torch)."""
    launcher = [os.path.join(ROOT, "tests", "prestarted.py")] if prestarted else []
    return [sys.executable, *launcher, os.path.join(ROOT, script), *map(str, args)]


def torchrun_command(nproc, script, *args, max_restarts=0):
    """`torchrun --standalone --nproc_per_node=N SCRIPT ARGS...` (CPU: gloo), the launcher and each worker started
    through tests/prestarted.py (its --no-python runs the given interpreter command as the worker)."""
    prestarted = os.path.join(ROOT, "tests", "prestarted.py")
    return [sys.executable, prestarted, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            f"--max_restarts={max_restarts}", "--monitor_interval=0.2", "--no-python", sys.executable, prestarted,
            os.path.join(ROOT, script), *map(str, args)]


def run_torchrun(nproc, script, *args, env=None, max_restarts=0, timeout=300):
    """Run torchrun_command's job in a session of its own (a job that hangs is killed whole, torchrun and its
    workers, and fails the test); the completed process."""
    cmd = torchrun_command(nproc, script, *args, max_restarts=max_restarts)
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"torchrun did not end within {timeout} s: {stdout[-2000:]} {stderr[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def run_script(script, *args, env=None, check=True):
    """Run a script of the repository as a user would; check its exit code (0) unless told not to."""
    proc = subprocess.run(script_command(script, *args), cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    if check:
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def json_records(path):
    """A JSON-lines log without its timing fields."""
    with open(path) as f:
        records = [json.loads(line) for line in f]
    return [{k: v for k, v in r.items() if k not in ("seconds", "time")} for r in records]


def _same_tensors(a, b, where):
    """Assert two (nested) checkpoint values are equal bit for bit."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            _same_tensors(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _same_tensors(x, y, f"{where}/{i}")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, np.ndarray):
        assert np.array_equal(a, b), where
    else:
        assert a == b, where


def assert_same_run(a, b):
    """Two run folders hold the same run: every log line (timings aside), the checkpoint (weights, optimizers,
    divisions, random states), the best weights and the saved losses, bit for bit."""
    def compared(folder):
        """The files and folders of a run that must be equal (not the lock, temporary files, config, fallback)."""
        skip = ("_config.json", "_checkpoint_prev.pth.tar")
        return sorted(n for n in os.listdir(folder) if not n.startswith(".") and not n.endswith(skip))
    names = compared(a)
    assert names == compared(b)
    for name in names:
        pa, pb = os.path.join(a, name), os.path.join(b, name)
        if os.path.isdir(pa):
            assert sorted(os.listdir(pa)) == sorted(os.listdir(pb)), name
            for snap in os.listdir(pa):
                with np.load(os.path.join(pa, snap)) as x, np.load(os.path.join(pb, snap)) as y:
                    assert x.files == y.files and all(np.array_equal(x[k], y[k]) for k in x.files), snap
        elif name.endswith(".jsonl"):
            assert json_records(pa) == json_records(pb), name
        elif name.endswith(".pth.tar"):
            x, y = torch.load(pa, weights_only=False), torch.load(pb, weights_only=False)
            if isinstance(x, dict) and "nets" in x:  # the paths (all_args) and log sizes (timings) differ
                _same_tensors({k: v for k, v in x.items() if k not in ("all_args", "logs")},
                              {k: v for k, v in y.items() if k not in ("all_args", "logs")}, name)
            else:
                _same_tensors(x, y, name)
        else:
            with open(pa, "rb") as fa, open(pb, "rb") as fb:
                assert fa.read() == fb.read(), name
