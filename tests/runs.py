"""What the tests share about running the training scripts: tiny, fast arguments per script, the runner, and the
bit-for-bit comparison of two run folders."""
import hashlib
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
from prestarted import COMMAND as PRESTARTED

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PREFIX = "cifar10_0.5_sym"
# Tests that are not about the network train a PreAct ResNet-18 of width 8 (the paper's is 64) through the same code
# path: about 50x less arithmetic per image and 3 MB checkpoints instead of 179 MB.
CIFAR_FAST = ["--batch_size", "8", "--warm_up", "1", "--eval_batch_size", "64", "--save_loss_every", "1",
              "--net_width", "8"]
CUSTOM_FAST = ["--arch", "preact_resnet18", "--image_size", "16", "--batch_size", "4", "--warm_up", "1",
               "--num_workers", "0"]

# Tests that keep 0.2-1.9 GB on disk (runs of the paper's networks, ResNet-50 and Inception-ResNet-v2, or of a
# full-width PreAct ResNet-18; a CIFAR-size data set of 50,000 images): pytest-xdist runs them one after another on
# one worker (pytest.ini: --dist loadgroup; tests/conftest.py keeps every other test with the rest of its file), so
# that the suite's temporary files stay below 2 GB.
LARGE_ON_DISK = pytest.mark.xdist_group("large_on_disk")

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
    launcher = [PRESTARTED] if prestarted else []
    return [sys.executable, *launcher, os.path.join(ROOT, script), *map(str, args)]


def torchrun_command(nproc, script, *args, max_restarts=0):
    """`torchrun --standalone --nproc_per_node=N SCRIPT ARGS...` (CPU: gloo), the launcher and each worker started
    through tests/prestarted.py (its --no-python runs the given interpreter command as the worker)."""
    return [sys.executable, PRESTARTED, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            f"--max_restarts={max_restarts}", "--monitor_interval=0.2", "--no-python", sys.executable, PRESTARTED,
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


def _digest(value):
    """A nested checkpoint value with each tensor and array replaced by (dtype, shape, SHA-256 of its bytes)."""
    if isinstance(value, dict):
        return {key: _digest(v) for key, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_digest(v) for v in value]
    if isinstance(value, torch.Tensor):
        raw = value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        return ("tensor", str(value.dtype), tuple(value.shape), hashlib.sha256(raw.tobytes()).hexdigest())
    if isinstance(value, np.ndarray):
        raw = np.ascontiguousarray(value)
        return ("array", str(raw.dtype), raw.shape, hashlib.sha256(raw.tobytes()).hexdigest())
    return value


def run_contents(folder):
    """What two runs must have equal, file by file: every log line (timings aside), the checkpoint (weights,
    optimizers, divisions, random states), the best weights and the saved losses, tensors as digests. Small next to
    the folder: a test may keep it and delete a run of large checkpoints before making the one it compares to."""
    # not compared: the lock, temporary files, the config (it names the folder), the fallback checkpoint and the
    # TensorBoard events (they hold wall-clock times)
    skip = ("_config.json", "_checkpoint_prev.pth.tar", "tensorboard")
    contents = {}
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if name.startswith(".") or name.endswith(skip):
            continue
        if os.path.isdir(path):  # the saved losses, one file per epoch
            contents[name] = {}
            for snap in sorted(os.listdir(path)):
                with np.load(os.path.join(path, snap)) as x:
                    contents[name][snap] = {k: _digest(x[k]) for k in x.files}
        elif name.endswith(".jsonl"):
            contents[name] = json_records(path)
        elif name.endswith(".pth.tar"):
            x = torch.load(path, weights_only=False)
            if isinstance(x, dict) and "nets" in x:  # the paths (all_args) and log sizes (timings) differ
                x = {k: v for k, v in x.items() if k not in ("all_args", "logs")}
            contents[name] = _digest(x)
        else:
            with open(path, "rb") as f:
                contents[name] = f.read()
    return contents


def _assert_equal(a, b, where):
    """Assert two nested values are equal, naming the first place where they differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        assert a.keys() == b.keys(), f"{where}: {sorted(a)} != {sorted(b)}"
        for key in a:
            _assert_equal(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_equal(x, y, f"{where}/{i}")
    else:
        assert a == b, where


def assert_same_run(a, b):
    """Two runs are the same run bit for bit (run_contents); each is a run folder or its run_contents."""
    _assert_equal(*(x if isinstance(x, dict) else run_contents(x) for x in (a, b)), "run")
