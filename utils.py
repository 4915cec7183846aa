"""Infrastructure shared by the training scripts: errors, seeding, RNG state, checkpoints, logs, progress."""
import argparse
import json
import math
import os
import random
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch


class UserError(Exception):
    """A problem with the user's input: reported as one line, exit code 2, no traceback."""


def run_main(main, args):
    """Call main(args); turn a UserError into one line on stderr and exit code 2."""
    try:
        return main(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        sys.exit(2)


class FlagParser(argparse.ArgumentParser):
    """argparse with the project's error style: one `error: ...` line and exit code 2, no usage block."""

    def error(self, message):
        """Print the problem on one line and exit 2 (argparse's own error prints the usage first)."""
        print(f"error: {message}: run with --help for every flag and its default", file=sys.stderr, flush=True)
        sys.exit(2)


@dataclass(frozen=True)
class Range:
    """The values a numeric flag accepts: low and high are inclusive (low exclusive when low_open); None: no bound."""

    low: float = None
    high: float = None
    low_open: bool = False
    note: str = ""

    def holds(self, value):
        """Whether a finite value lies in the range."""
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or value <= self.high

    def text(self, integer):
        """The range as the messages show it: 0..4294967295, [0, 1], > 0, >= 1."""
        show = str if integer else (lambda x: f"{x:g}")
        if self.low is not None and self.high is not None:
            if integer and not self.low_open:
                return f"{show(self.low)}..{show(self.high)}"
            return f"{'(' if self.low_open else '['}{show(self.low)}, {show(self.high)}]"
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {show(self.low)}"
        return f"<= {show(self.high)}"


# numpy's global seed takes 0..2**32 - 1, and every script seeds numpy from --seed.
SEED = Range(0, 2 ** 32 - 1)
POSITIVE = Range(0, low_open=True)
NON_NEGATIVE = Range(0)
AT_LEAST_ONE = Range(1)
FRACTION = Range(0, 1)
# Flags the three training scripts share, with the same meaning and the same allowed values.
TRAIN_FLAGS = {
    "seed": SEED, "lr": POSITIVE, "alpha": POSITIVE, "T": POSITIVE, "lambda_u": NON_NEGATIVE,
    "p_threshold": FRACTION, "num_epochs": Range(0, note="the last epoch: 0 runs epoch 0 only"),
    "warm_up": NON_NEGATIVE, "batch_size": AT_LEAST_ONE, "gpuid": NON_NEGATIVE, "num_class": Range(2),
}


def check_value(name, value, allowed):
    """UserError naming --name, its value and the allowed range when value is NaN, infinite or outside it."""
    integer = isinstance(value, int)
    kind = "an integer" if integer else "a number"
    text = allowed.text(integer)
    two_sided = allowed.low is not None and allowed.high is not None
    where = f"in {text}" if two_sided else text
    note = f" ({allowed.note})" if allowed.note else ""
    if not integer and not math.isfinite(value):
        raise UserError(f"--{name} {value} is not allowed: give a number {where}{note}")
    if allowed.holds(value):
        return
    if two_sided:
        raise UserError(f"--{name} {value} is outside {text}: give {kind} in that range{note}")
    raise UserError(f"--{name} {value} is not allowed: give {kind} {where}{note}")


def check_flags(args, table):
    """Check every flag of `table` ({dest: Range}) that has a value; flags left at None are filled in later."""
    for name, allowed in table.items():
        value = getattr(args, name)
        if value is not None:
            check_value(name, value, allowed)


def seed_everything(seed):
    """Seed Python's, numpy's and torch's global generators from one integer."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def get_rng_state():
    """Capture every global random state the training loop draws from."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    """Restore the states captured by get_rng_state."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def select_device(gpuid):
    """CUDA device `gpuid` when CUDA is available, otherwise the CPU."""
    if torch.cuda.is_available():
        if not 0 <= gpuid < torch.cuda.device_count():
            raise UserError(f"--gpuid {gpuid} does not exist: {torch.cuda.device_count()} CUDA device(s) visible")
        torch.cuda.set_device(gpuid)
        torch.backends.cudnn.benchmark = True
        return torch.device("cuda", gpuid)
    return torch.device("cpu")


def atomic_save(obj, path):
    """torch.save to a temporary file in the same folder, then rename: a crash never leaves half a file."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp_", suffix=".pt")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _cpu_copy(obj):
    """A deep copy of obj with every tensor copied to the CPU, safe to save while training goes on."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _cpu_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cpu_copy(v) for v in obj)
    return obj


class CheckpointWriter:
    """Writes checkpoints atomically in a background thread, one at a time, so the next epoch need not wait."""

    def __init__(self):
        """Start the writer thread pool."""
        self.pool = ThreadPoolExecutor(max_workers=1)
        self.pending = None

    def save(self, obj, path):
        """Snapshot obj now (tensors copied to the CPU) and write it to path in the background."""
        self.wait()
        self.pending = self.pool.submit(atomic_save, _cpu_copy(obj), path)

    def wait(self):
        """Block until the last write is on disk; re-raise its error, if any."""
        if self.pending is not None:
            pending, self.pending = self.pending, None
            pending.result()

    def close(self):
        """Finish the last write and stop the thread."""
        self.wait()
        self.pool.shutdown()


def load_checkpoint(path):
    """Load a checkpoint written by atomic_save onto the CPU."""
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise UserError(f"cannot read checkpoint {path} ({type(exc).__name__}): point --resume at a checkpoint "
                        "file written by this project") from exc


def check_resume_args(saved, current, keys):
    """Raise a UserError naming the first defining argument that differs from the checkpoint's."""
    for key in keys:
        if key in saved and saved[key] != current.get(key):
            raise UserError(f"--resume checkpoint was made with --{key} {saved[key]!r}, this run has "
                            f"{current.get(key)!r}: pass the same value or start a new --output_dir")


def open_run(logs, ckpt_path, resume_arg, defining, name):
    """The checkpoint to resume from (checked against the defining args), or None for a fresh start.

    resume_arg: None (fresh start), "auto" (ckpt_path), a checkpoint file or a folder holding ckpt_path's file.
    A fresh start where this run's logs or checkpoint already exist is refused, so nothing is overwritten.
    """
    if resume_arg:
        path = ckpt_path if resume_arg == "auto" else resume_arg
        if os.path.isdir(path):
            path = os.path.join(path, os.path.basename(ckpt_path))
        if not os.path.isfile(path):
            raise UserError(f"--resume: no checkpoint at {path}: run without --resume to start, or name the file")
        checkpoint = load_checkpoint(path)
        check_resume_args(checkpoint["args"], defining, defining.keys())
        return checkpoint
    if logs.existing() or os.path.exists(ckpt_path):
        raise UserError(f"{os.path.dirname(ckpt_path) or '.'} already holds a {name} run: pass --resume to continue "
                        "it, or choose another --output_dir (nothing was overwritten)")
    return None


def begin_run(logs, config_path, script, args, device, num_train, sources=None):
    """Fresh start: open the logs and record how the run was started (kept as it is on resume)."""
    logs.start()
    config = {"args": vars(args), "sources": sources or {}, "num_train": num_train, "device": str(device),
              "torch": torch.__version__, "script": script}
    with open(config_path, "w") as f:
        json.dump(config, f, indent=1)


def restore_run(checkpoint, nets, optimizers, logs):
    """Resume: nets, optimizers, every RNG state and the logs cut back to the checkpoint. Returns the next epoch."""
    for net, opt, net_state, opt_state in zip(nets, optimizers, checkpoint["nets"], checkpoint["optimizers"]):
        net.load_state_dict(net_state)
        opt.load_state_dict(opt_state)
    logs.resume(checkpoint["log_sizes"])
    set_rng_state(checkpoint["rng"])
    print(f"resumed from epoch {checkpoint['epoch']}", flush=True)
    return checkpoint["epoch"] + 1


def run_state(epoch, defining, args, nets, optimizers, logs, **extra):
    """Everything a checkpoint after `epoch` holds to continue exactly; `extra` adds the script's own state."""
    return {"epoch": epoch, "args": defining, "all_args": vars(args), "nets": [n.state_dict() for n in nets],
            "optimizers": [o.state_dict() for o in optimizers], "rng": get_rng_state(), "log_sizes": logs.sizes(),
            **extra}


def json_safe(value):
    """NaN and infinities become null so every log line is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def timed(fn, *args):
    """fn(*args) and the seconds it took."""
    t0 = time.perf_counter()
    result = fn(*args)
    return result, time.perf_counter() - t0


class RunLogs:
    """The run's text logs (the original code's files) plus a JSON-lines file, truncatable on resume."""

    def __init__(self, paths):
        """paths: name -> file path; nothing is opened until start() or resume()."""
        self.paths = paths
        self.files = {}

    def existing(self):
        """Paths among this run's logs that exist and hold something (a run that died before logging is not)."""
        return [p for p in self.paths.values() if os.path.exists(p) and os.path.getsize(p) > 0]

    def start(self):
        """Open every log fresh."""
        self.files = {k: open(p, "w") for k, p in self.paths.items()}

    def resume(self, sizes):
        """Cut every log back to the size it had at the checkpoint, then append."""
        for key, path in self.paths.items():
            size = sizes.get(key, 0)
            with open(path, "a+") as f:
                f.truncate(size)
        self.files = {k: open(p, "a") for k, p in self.paths.items()}

    def sizes(self):
        """Current byte size of each log (stored in the checkpoint)."""
        for f in self.files.values():
            f.flush()
        return {k: os.path.getsize(p) for k, p in self.paths.items()}

    def write(self, key, text):
        """Append text to one log and flush it."""
        self.files[key].write(text)
        self.files[key].flush()

    def write_json(self, key, record):
        """Append one JSON line."""
        self.write(key, json.dumps(record, sort_keys=False) + "\n")

    def close(self):
        """Close every open log."""
        for f in self.files.values():
            f.close()
        self.files = {}


class Progress:
    """Compact progress line for one phase; reads device values only when it prints."""

    def __init__(self, desc, total, every=None, stream=None):
        """total: iterations expected; every: print period (default: about ten lines a phase)."""
        self.desc, self.total = desc, max(int(total), 1)
        self.every = every or max(self.total // 10, 1)
        self.stream = stream or sys.stdout
        # On a terminal the line is redrawn in place; in a log file a line is printed every `every` steps.
        self.tty = self.stream.isatty()
        if self.tty:
            self.every = max(self.total // 100, 1)
        self.start = time.perf_counter()

    def update(self, step, **values):
        """Print after iteration `step` (1-based) when due; values may be tensors (synced only then)."""
        if step % self.every and step != self.total:
            return
        shown = "  ".join(f"{k} {float(v):.4f}" for k, v in values.items())
        rate = step / max(time.perf_counter() - self.start, 1e-9)
        line = f"{self.desc} [{step:>4}/{self.total}] {shown}  {rate:.1f} it/s"
        if self.tty:
            end = "\n" if step == self.total else ""
            print("\r" + line + "\033[K", end=end, file=self.stream, flush=True)
        else:
            print(line, file=self.stream, flush=True)
