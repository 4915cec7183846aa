"""A run's TensorBoard events (--tensorboard): every number of each epoch's JSON record as a scalar, and the clean
probabilities of each co-divide as histograms, in <output_dir>/tensorboard/<prefix> so that `tensorboard --logdir`
over a sweep's root shows every run. tensorboard is an optional dependency (requirements-optional.txt)."""
import math
import os

from cli import UserError

FOLDER = "tensorboard"
MISSING = ("--tensorboard needs the tensorboard package, which is not installed: pip install -r "
           "requirements-optional.txt (or pip install tensorboard), or drop --tensorboard")


def check_installed():
    """UserError with one line when the tensorboard package cannot be imported."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401 (imported to see that it can be)
    except ImportError:
        raise UserError(MISSING) from None


def log_dir(folder, prefix):
    """Where a run's events go: <folder>/tensorboard/<prefix>."""
    return os.path.join(folder, FOLDER, prefix)


def scalars(record, tag=""):
    """{tag: value} of every finite number of a JSON record, nested keys joined by '/' (net1/Lx, time/train); the
    epoch itself, texts, lists and missing values (null) left out."""
    found = {}
    for key, value in record.items():
        name = f"{tag}/{key}" if tag else str(key)
        if isinstance(value, dict):
            found.update(scalars(value, name))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            if name != "epoch":
                found[name] = value
    return found


class Board:
    """The run's event writer, opened at a fresh start or at a resume (purging every event of a later epoch than
    the checkpoint's, so a resumed run shows each epoch once)."""

    def __init__(self, folder, prefix, start_epoch):
        """Open the writer; start_epoch: the first epoch this process writes (0 at a fresh start)."""
        from torch.utils.tensorboard import SummaryWriter
        self.writer = SummaryWriter(log_dir(folder, prefix), purge_step=start_epoch or None)

    def epoch(self, record, histograms=None):
        """Write an epoch's record (its "epoch" is the step) and histograms ({tag: array})."""
        step = record["epoch"]
        for tag, value in scalars(record).items():
            self.writer.add_scalar(tag, value, step)
        for tag, values in (histograms or {}).items():
            self.writer.add_histogram(tag, values, step)
        self.writer.flush()

    def close(self):
        """Flush and close the event file."""
        self.writer.close()
