"""Small helpers of the training scripts: strict-JSON log values, timing, progress lines."""
import math
import sys
import time


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
