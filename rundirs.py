"""Run directories of the training scripts, as report.py and plots.py read them: finding the runs, loading their
configs and JSON-lines logs, and grouping the seeds of one experiment. No torch, no matplotlib."""
import json
import os
import re
import sys
from collections import namedtuple
from dataclasses import dataclass, field

from cli import UserError
from published import CIFARN_ROW_ORDER

SCRIPT_KINDS = {"Train_cifar.py": "cifar", "Train_clothing1M.py": "clothing1m", "Train_webvision.py": "webvision"}
# The project's other scripts with run folders: no published numbers to compare with, so the report passes them by.
UNREPORTED_SCRIPTS = ("Train_custom.py", "Pretrain_simclr.py")
KIND_ORDER = ("cifar", "clothing1m", "webvision")
DEFAULT_EPOCHS = {"cifar": 300, "clothing1m": 80, "webvision": 80}
# Paper order first (sym before asym), then instance-dependent noise, then the CIFAR-N label sets.
MODE_ORDER = {mode: i for i, mode in enumerate(("sym", "asym", "idn") + CIFARN_ROW_ORDER)}

# A run killed before its first checkpoint landed has at most this many epochs logged: the epoch whose checkpoint
# was being written in the background and the next one, which waits for that write to finish. More logged epochs
# without a checkpoint are a run whose checkpoint is gone: a fresh start refuses to overwrite them.
UNCHECKPOINTED_EPOCHS = 2


# Train_cifar.py saves each co-divide epoch's per-sample losses and division as <prefix>_losses/epoch_NNN.npz.
LOSSES_SUFFIX = "_losses"
_SNAPSHOT = re.compile(r"epoch_(\d+)\.npz$")


def loss_snapshot_name(epoch):
    """The file name of an epoch's loss snapshot in a run's losses folder."""
    return "epoch_%03d.npz" % epoch


def loss_snapshots(folder):
    """{epoch: path} of the loss snapshots in a losses folder (empty when there is none), by epoch."""
    if not os.path.isdir(folder):
        return {}
    found = {int(m.group(1)): os.path.join(folder, name) for name in os.listdir(folder) if (m := _SNAPSHOT.match(name))}
    return dict(sorted(found.items()))


def is_finished(last_epoch, num_epochs):
    """Whether a run whose last logged epoch is last_epoch (None: none yet) has run all its epochs 0..num_epochs."""
    return last_epoch is not None and num_epochs is not None and last_epoch >= num_epochs


def restartable(logged_epochs):
    """Whether logs of this many epochs and no checkpoint are what a run killed before its first checkpoint leaves,
    so that a fresh start may replace them."""
    return logged_epochs <= UNCHECKPOINTED_EPOCHS


# Runs with the same key are seeds of one experiment. r is None for CIFAR-N labels and real-noise datasets;
# ood_ratio is 0.0 without open-set noise (and for real-noise datasets).
GroupKey = namedtuple("GroupKey", "kind dataset mode r ood_ratio lambda_u p_threshold num_epochs")


@dataclass
class Run:
    """One training run: its config, its per-epoch log records and, for Clothing1M, the final test record."""

    kind: str
    run_dir: str
    prefix: str
    config: dict
    records: list = field(default_factory=list)
    final: dict = None

    @property
    def args(self):
        """The run's command-line arguments as saved in its config."""
        return self.config.get("args", {})

    @property
    def num_epochs(self):
        """Last epoch of the run (epochs are numbered 0..num_epochs)."""
        return int(self.args.get("num_epochs", DEFAULT_EPOCHS[self.kind]))

    @property
    def last_epoch(self):
        """Last completed epoch, or None before the first one."""
        return self.records[-1]["epoch"] if self.records else None

    @property
    def finished(self):
        """Clothing1M: the final test line is written; CIFAR and WebVision: the last epoch is logged."""
        if self.kind == "clothing1m":
            return self.final is not None
        return is_finished(self.last_epoch, self.num_epochs)

    @property
    def status(self):
        """'finished' or 'unfinished (epoch E/N)'."""
        if self.finished:
            return "finished"
        if self.last_epoch is None:
            return f"unfinished (no epoch yet/{self.num_epochs})"
        return f"unfinished (epoch {self.last_epoch}/{self.num_epochs})"

    @property
    def seed(self):
        """The run's seed (None when its config has none)."""
        return self.args.get("seed")


# ----------------------------------------------------------------------------- reading runs

def find_config_files(paths):
    """Every *_config.json under the given run directories or parents, sorted, without duplicates."""
    found = set()
    for path in paths:
        if not os.path.exists(path):
            raise UserError(f"{path} does not exist: give run directories or a folder holding them")
        if os.path.isfile(path):
            if not path.endswith("_config.json"):
                raise UserError(f"{path} is not a run directory or a *_config.json file")
            found.add(os.path.realpath(path))
            continue
        for folder, dirs, files in os.walk(path):
            dirs.sort()
            found.update(os.path.realpath(os.path.join(folder, f)) for f in files if f.endswith("_config.json"))
    return sorted(found)


def read_log(path):
    """Epoch records (sorted, one per epoch: the last wins) and the final test record of a JSON-lines log."""
    by_epoch, final = {}, None
    if not os.path.isfile(path):
        return [], None
    with open(path) as f:
        lines = [line for line in f.read().splitlines() if line.strip()]
    for i, line in enumerate(lines):
        try:
            record = json.loads(line)
        except ValueError:
            if i < len(lines) - 1:  # a cut last line is a killed run's normal state; anything else is worth a word
                print(f"warning: {path} line {i + 1} is not JSON; skipped", file=sys.stderr)
            continue
        if not isinstance(record, dict):
            continue
        if record.get("phase") == "test":
            final = record
        elif isinstance(record.get("epoch"), int):
            by_epoch[record["epoch"]] = record
    return [by_epoch[e] for e in sorted(by_epoch)], final


def load_run(config_path):
    """The Run of one config file, or None: quietly for the project's runs the report does not cover, with a warning
    for a file that is not a run config of this project."""
    try:
        with open(config_path) as f:
            config = json.load(f)
    except (OSError, ValueError) as exc:
        print(f"warning: {config_path} is not readable JSON ({exc}); skipped", file=sys.stderr)
        return None
    kind = SCRIPT_KINDS.get(config.get("script")) if isinstance(config, dict) else None
    if kind is None and isinstance(config, dict) and config.get("script") in UNREPORTED_SCRIPTS:
        return None
    if kind is None or not isinstance(config.get("args"), dict):
        print(f"warning: {config_path} was not written by a training script of this project; skipped",
              file=sys.stderr)
        return None
    folder, name = os.path.split(config_path)
    prefix = name[:-len("_config.json")]
    records, final = read_log(os.path.join(folder, prefix + "_log.jsonl"))
    return Run(kind=kind, run_dir=folder, prefix=prefix, config=config, records=records, final=final)


def find_runs(paths):
    """Every run under the given paths; UserError when there is none."""
    runs = [run for run in (load_run(p) for p in find_config_files(paths)) if run is not None]
    if not runs:
        raise UserError(f"no run found in {' '.join(paths)}: give run directories (holding *_config.json) "
                        "or a folder above them")
    return runs


# ----------------------------------------------------------------------------- grouping

def optional_float(value, digits=None):
    """float(value), rounded to `digits` when given; None stays None."""
    if value is None:
        return None
    return float(value) if digits is None else round(float(value), digits)


def group_key(run):
    """The run's GroupKey: (kind, dataset, noise mode, r, ood_ratio, lambda_u, tau, epochs)."""
    a = run.args
    if run.kind == "cifar":
        # Older configs have no ood_ratio (no open-set noise then); CIFAR-N configs hold r = null.
        dataset, mode = a.get("dataset"), a.get("noise_mode")
        r, ood_ratio = optional_float(a.get("r", 0.0), 4), optional_float(a.get("ood_ratio") or 0.0, 4)
    else:
        dataset, mode, r, ood_ratio = run.kind, "real", None, 0.0
    return GroupKey(run.kind, dataset, mode, r, ood_ratio, optional_float(a.get("lambda_u")),
                    optional_float(a.get("p_threshold")), run.num_epochs)


def sort_key(key):
    """Rows in paper order: kind, dataset, sym before asym, r, open-set ratio, then the settings."""
    return (KIND_ORDER.index(key.kind), str(key.dataset), MODE_ORDER.get(key.mode, len(MODE_ORDER)), str(key.mode),
            key.r or 0.0, key.ood_ratio, -1.0 if key.lambda_u is None else key.lambda_u,
            -1.0 if key.p_threshold is None else key.p_threshold, key.num_epochs)


def group_runs(runs):
    """[(GroupKey, runs sorted by seed and directory)] in table order."""
    groups = {}
    for run in runs:
        groups.setdefault(group_key(run), []).append(run)
    return [(key, sorted(groups[key], key=lambda r: (r.seed is None, r.seed or 0, r.run_dir, r.prefix)))
            for key in sorted(groups, key=sort_key)]


def fmt_num(x):
    """A setting value without trailing zeros (25.0 -> 25), '-' when absent."""
    return "-" if x is None else "%g" % x


def cell_name(key):
    """The cell as the sweep names its run directories, without the seed: cifar10_sym_0.5, cifar10_worst_ood0.2."""
    if key.kind != "cifar":
        return str(key.dataset)
    name = f"{key.dataset}_{key.mode}" + ("" if key.r is None else f"_{key.r:g}")
    return name + (f"_ood{key.ood_ratio:g}" if key.ood_ratio else "")
