"""Command-line flags, torch-free: the project's argparse (one-line errors, exit 2), numeric ranges and their
checks, and the argument groups the training scripts share."""
import argparse
import math
import sys
from dataclasses import dataclass

from cli import UserError


def add_engine_arguments(parser):
    """The flags every training script shares: numerics and memory layout, the division, torchrun's BatchNorm."""
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                        help="bf16 autocast for the forwards (default: on with CUDA and on CPUs with native bf16, "
                             "e.g. AVX512_BF16 or AMX; off on other CPUs, which emulate it slowly)")
    parser.add_argument("--channels_last", action=argparse.BooleanOptionalAction, default=True,
                        help="channels_last memory layout for nets and batches")
    parser.add_argument("--division", default="global", choices=("global", "classwise"),
                        help="classwise: a GMM per observed class (RSL; see the README's successors section)")
    parser.add_argument("--sync_bn", action=argparse.BooleanOptionalAction, default=None,
                        help="under torchrun: BatchNorm statistics of the global batch (default: on with CUDA; the "
                             "CPU has no SyncBatchNorm)")


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


def defining_args(args, may_change):
    """The flags that define a run, as --resume compares them with its checkpoint's: every flag except those in
    may_change (where files are, how long and how fast it runs), so that a new flag defines the run by default."""
    return {name: value for name, value in vars(args).items() if name not in may_change}
