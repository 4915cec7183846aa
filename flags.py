"""Command-line flags, torch-free: the project's argparse (one-line errors, exit 2), numeric ranges and their
checks, and the argument groups the training scripts share."""
import argparse
import math
import re
import sys
from dataclasses import dataclass

from cli import UserError


def add_engine_arguments(parser, division=True):
    """The flags every training script shares: numerics and memory layout, the division (unless division is
    False: a script without one), torchrun's BatchNorm."""
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                        help="bf16 autocast for the forwards (default: on with CUDA and on CPUs with native bf16, "
                             "e.g. AVX512_BF16 or AMX; off on other CPUs, which emulate it slowly)")
    parser.add_argument("--channels_last", action=argparse.BooleanOptionalAction, default=True,
                        help="channels_last memory layout for nets and batches (no effect on results)")
    if division:
        parser.add_argument("--division", default="global", choices=("global", "classwise"),
                            help="global: one two-component GMM over every sample's loss; classwise: a GMM per "
                                 "observed class (RSL; see docs/successors.md)")
    parser.add_argument("--sync_bn", action=argparse.BooleanOptionalAction, default=None,
                        help="under torchrun: BatchNorm statistics of the global batch; the CPU has no "
                             "SyncBatchNorm (default: on with CUDA, off on the CPU)")


# A help text that states its own default ends with this: flags whose default is None say what None means, flags
# whose default depends on the machine say how it is chosen.
STATED_DEFAULT = re.compile(r" \(default: (.+)\)$")
# What argparse's BooleanOptionalAction appends to a help text by itself (Python 3.9 to 3.13).
BOOLEAN_SUFFIX = " (default: %(default)s)"


def help_text(action):
    """The help text as written, without the default that BooleanOptionalAction may have appended."""
    text = action.help or ""
    return text[:-len(BOOLEAN_SUFFIX)] if text.endswith(BOOLEAN_SUFFIX) else text


def value_text(value):
    """A default as --help and docs/flags.md show it: on / off for switches, lists joined by spaces."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (list, tuple)):
        return " ".join(map(str, value))
    return '""' if value == "" else str(value)


def shown_default(action):
    """The default --help shows for an action: the one its help text states, else its value (None: None)."""
    stated = STATED_DEFAULT.search(help_text(action))
    if stated:
        return stated.group(1)
    return None if action.default is None else value_text(action.default)


class FlagHelpFormatter(argparse.HelpFormatter):
    """--help lists every flag with its default: appended as `(default: X)` unless the help text states it."""

    def _get_help_string(self, action):
        """The action's help with its default (argparse's hook for ArgumentDefaultsHelpFormatter)."""
        text = help_text(action)
        if not action.option_strings or action.default is argparse.SUPPRESS or STATED_DEFAULT.search(text):
            return text
        return f"{text} (default: {value_text(action.default).replace('%', '%%')})"


def add_resume_argument(parser):
    """--resume, as every training script takes it."""
    parser.add_argument("--resume", nargs="?", const="auto", default=None,
                        help="continue from the checkpoint in --output_dir, or from the given checkpoint file "
                             "(default: off: a fresh start, refused where --output_dir holds a checkpoint of the run)")


def add_tensorboard_argument(parser):
    """--tensorboard, as every training script takes it."""
    parser.add_argument("--tensorboard", action="store_true",
                        help="also write each epoch's numbers (and each co-divide's clean probabilities) as "
                             "TensorBoard events in <output_dir>/tensorboard/<run prefix>; needs the optional "
                             "tensorboard package")


class FlagParser(argparse.ArgumentParser):
    """argparse with the project's error style: one `error: ...` line and exit code 2, no usage block; --help
    shows every flag's default."""

    def __init__(self, *args, **kwargs):
        """An ArgumentParser whose help shows the defaults."""
        kwargs.setdefault("formatter_class", FlagHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        """Print the problem on one line and exit 2 (argparse's own error prints the usage first)."""
        print(f"error: {message}: run with --help for every flag and its default", file=sys.stderr, flush=True)
        sys.exit(2)

    def _check_value(self, action, value):
        """A value outside a flag's choices, in the project's words: `unknown --flag 'value': use one of ...`."""
        # argparse's own hook for choices; its message lists the choices as reprs, after 'argument --flag:'.
        if action.choices is not None and value not in action.choices:
            name = action.option_strings[0] if action.option_strings else action.dest
            choices = ", ".join(map(str, action.choices))
            raise argparse.ArgumentError(None, f"unknown {name} {value!r}: use one of {choices}")


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


def settings_line(args, sources):
    """The `settings:` line a training script prints at start: each resolved flag's value and where it came from."""
    return "settings: " + ", ".join(f"{k}={getattr(args, k)} ({v})" for k, v in sources.items())


# Flags of every script that never define a run: what is written beside it for watching it.
WATCHING_FLAGS = ("tensorboard",)


def defining_args(args, may_change):
    """The flags that define a run, as --resume compares them with its checkpoint's: every flag except those in
    may_change (where files are, how long and how fast it runs) and WATCHING_FLAGS, so that a new flag defines the
    run by default."""
    return {name: value for name, value in vars(args).items() if name not in (*may_change, *WATCHING_FLAGS)}
