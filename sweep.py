"""The CIFAR sweep that scripts/sweep_cifar.sh runs: its arguments, the plan (cells, presets, run states), the local
worker pool and the SLURM job array. Free of torch: presets and names come from presets.py, the run-state rules
from rundirs.py and the seed range from flags.py, where each is written once.

    python3 sweep.py --help      # the same as scripts/sweep_cifar.sh --help
"""
import errno
import functools
import json
import os
import re
import shutil
import signal
import string
import subprocess
import sys
import time
from dataclasses import dataclass

from cli import STOP_SIGNALS, UserError, see_doc
from flags import SEED, FlagParser
from presets import (CIFARN_MODES, ORIGINAL_DEFAULTS, PAPER_PRESETS, SYNTHETIC_MODES, ratio_text, run_prefix,
                     setting_preset)
from rundirs import is_finished, restartable

USAGE = """\
Run CIFAR cells, by default the paper's Table 1, with their presets: one run directory per cell and seed.

  scripts/sweep_cifar.sh [options] [CELL ...] [-- TRAIN_CIFAR_ARGS ...]

CELL (default: all nine Table 1 cells) is one of
  dataset:mode:r        synthetic noise at rate r: mode sym, asym or idn, e.g. cifar10:sym:0.5, cifar100:idn:0.4
  dataset:mode          CIFAR-N human labels, no r: cifar10 with aggre, worst, rand1, rand2 or rand3;
                        cifar100 with noisy100, e.g. cifar10:worst (labels: CIFAR-10_human.pt in --cifar10_path,
                        CIFAR-100_human.pt in --cifar100_path)
either followed by :oodO for open-set noise, O in (0, 1) of the training images replaced by images from
--ood_path, e.g. cifar10:sym:0.2:ood0.2 or cifar10:aggre:ood0.1.
Options:
  --seeds S ...         seeds to run for every cell (default: 123)
  --cifar10_path DIR    CIFAR-10 python files (default: ./cifar-10)
  --cifar100_path DIR   CIFAR-100 python files (default: ./cifar-100)
  --out ROOT            parent of the run directories (default: ./runs)
  --ood_path P          images of the open-set cells (passed on as --ood_path P --ood_ratio O): a folder with
                        the other CIFAR's python files, or an .npz; needed when a cell has :oodO
  --gpus G ...          one worker per GPU id (default: $CUDA_VISIBLE_DEVICES, else nvidia-smi's GPUs,
                        else one slot that leaves the device choice to Train_cifar.py)
  --dry-run             print the commands (with their GPU) and run nothing
  --slurm               hand the runs to SLURM instead: write ROOT/slurm/sweep_<time>.sbatch, a job array of
                        one task per run left to do, and submit it with sbatch (with --dry-run: print it only)
  --partition P         (--slurm) the partition to submit to
  --time HH:MM:SS       (--slurm) each task's time limit; a task warned before it (USR1, --warn_seconds)
                        stops cleanly, requeues itself and resumes from its checkpoint
  --gpus_per_task G     (--slurm) GPUs per task (default 1; 0 for CPU-only nodes)
  --warn_seconds N      (--slurm) how long before the time limit the warning comes (default 300)
  --sbatch_args "..."   (--slurm) further sbatch options, e.g. "--account=A --qos=Q"
Everything after -- goes to every Train_cifar.py call (checked against its flags before any run starts; seeds
are --seeds). The runs' interpreter: $PYTHON, else the repository's .venv/bin/python, else python3; it must
import torch. $TRAIN_SCRIPT replaces Train_cifar.py as the script run (the tests use a fake one; presets still
come from Train_cifar.py).

Run directory: ROOT/<dataset>_<mode>_<r>_seed<S> (CIFAR-N: ROOT/<dataset>_<mode>_seed<S>; open-set cells add
_ood<O> before _seed), holding the run's logs, checkpoint, its own noise file noise_<r>_<mode>.json (with
_ood<O> before .json for open-set cells; none for CIFAR-N, whose labels are given) so seeds do not share one
noise draw, the open-set cells' replacement file (beside the noise file, <mode>_ood<O>_replaced.json for
CIFAR-N) and train.log (stdout and stderr, appended).
A run whose log reaches its num_epochs is skipped; one with a checkpoint is resumed with --resume.
Exit status: 0 when every run succeeded, 1 when one failed, 2 for a usage error.
"""

REPO = os.path.dirname(os.path.abspath(__file__))
JOB_TEMPLATE = os.path.join(REPO, "scripts", "sweep_cifar.sbatch.template")
DEFAULT_SEEDS = (123,)
# A worker slot without a GPU of its own: the run's device is left to Train_cifar.py (the CPU when there is none).
DEFAULT_SLOT = "default"
VALUE_OPTIONS = ("--cifar10_path", "--cifar100_path", "--out", "--ood_path", "--partition", "--time",
                 "--gpus_per_task", "--warn_seconds", "--sbatch_args")
SWITCHES = ("--slurm", "--dry-run", "--dry_run")
# The sweep owns these flags: a pass-through copy would silently contradict the run directory's name.
SWEEP_FLAGS = ("--dataset", "--r", "--noise_ratio", "--noise_mode", "--seed", "--data_path", "--output_dir",
               "--noise_file", "--gpuid", "--resume", "--ood_ratio")
SEED_HINT = ("--seed is the sweep's --seeds, one run folder per seed: give --seeds S ... before the cells "
             "(e.g. --seeds 1 2 3), not --seed")
PRESET_SOURCES = {"paper": "paper preset", "cifarn": "CIFAR-N preset (noisypy reproduction)",
                  None: "original-code default, no paper preset"}
CELL_FORM = ("is not dataset:mode:r or dataset:mode (CIFAR-N), optionally followed by :ood<ratio>, e.g. "
             "cifar10:sym:0.5, cifar10:worst or cifar10:sym:0.2:ood0.2")
# printf %q of bash escapes these anywhere, '#' first and '~' first or after ':' or '='.
BASH_SPECIAL = frozenset(" !\"$&'()*,;<>?[\\]^`{|}")
ANSI_C_ESCAPES = {"\a": "\\a", "\b": "\\b", "\x1b": "\\E", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t",
                  "\v": "\\v", "\\": "\\\\", "'": "\\'"}


# ----------------------------------------------------------------------------- shell text

def bash_quote(word):
    """word as bash's printf %q writes it, so printed commands and job scripts read as they always did."""
    if not word:
        return "''"
    if any(c < " " or c == "\x7f" for c in word):
        return "$'" + "".join(ANSI_C_ESCAPES.get(c, "\\%03o" % ord(c) if c < " " or c == "\x7f" else c)
                              for c in word) + "'"
    out = []
    for i, c in enumerate(word):
        if c in BASH_SPECIAL or (c == "#" and i == 0) or (c == "~" and (i == 0 or word[i - 1] in ":=")):
            out.append("\\")
        out.append(c)
    return "".join(out)


def bash_words(words):
    """The words quoted, each after a space: the inside of a bash array written as `name=(... )`."""
    return "".join(" " + bash_quote(w) for w in words)


def shell_line(argv, log):
    """The command as printed and logged: argv quoted, output appended to log."""
    return " ".join(bash_quote(w) for w in argv) + f" >> {bash_quote(log)} 2>&1"


def working_directory():
    """The working directory as bash's $PWD names it (symlinks kept), else os.getcwd()."""
    pwd = os.environ.get("PWD", "")
    try:
        if os.path.isabs(pwd) and os.path.samefile(pwd, "."):
            return pwd
    except OSError:
        pass
    return os.getcwd()


def absolute(path):
    """path made absolute without normalising it ($PWD/./runs stays so), as job scripts have always named it."""
    return path if path.startswith("/") else f"{working_directory()}/{path}"


def python():
    """The interpreter of the training runs: $PYTHON, else the repository's .venv/bin/python, else python3."""
    if os.environ.get("PYTHON"):
        return os.environ["PYTHON"]
    venv = os.path.join(REPO, ".venv", "bin", "python")
    return venv if os.access(venv, os.X_OK) else "python3"


# Run by python() before planning: it imports torch, then reads the arguments after -- with Train_cifar.py's own
# parser and range checks. Out: exit 0, or 3 and the reason torch cannot be imported, 4 and the parser's
# complaint, 5 and a value out of its range. Abbreviated flags are refused: the sweep recognises the flags it owns
# by their full names.
TRAIN_ARGS_CHECK = """\
import sys
try:
    import torch
except BaseException as exc:
    print(f"{type(exc).__name__}: {exc}".splitlines()[0])
    sys.exit(3)
sys.path.insert(0, sys.argv[1])
import Train_cifar
from cli import UserError
parser = Train_cifar.get_args_parser()
parser.allow_abbrev = False

def refuse(message):
    print(message)
    sys.exit(4)

parser.error = refuse
try:
    Train_cifar.check_flags(parser.parse_args(sys.argv[2:]), Train_cifar.FLAG_RANGES)
except UserError as exc:
    print(exc)
    sys.exit(5)
"""
VENV_FIX = ("install the requirements into .venv (python3 -m venv .venv && .venv/bin/pip install -r "
            "requirements.txt) or set PYTHON=/path/to/python")


def check_interpreter(train_args):
    """UserError unless python() imports torch and Train_cifar.py's parser takes train_args (one subprocess)."""
    py = python()
    shown = shutil.which(py) or py
    try:
        proc = subprocess.run([py, "-c", TRAIN_ARGS_CHECK, REPO, *train_args], stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    except OSError as err:
        raise UserError(f"Python interpreter {py!r} cannot be run ({err.strerror}): {VENV_FIX}") from None
    reason = (proc.stdout.strip() or proc.stderr.strip() or f"exit status {proc.returncode}").splitlines()[-1]
    if proc.returncode == 3:
        raise UserError(f"{shown} cannot import torch ({reason}): {VENV_FIX}")
    if proc.returncode == 4:
        raise UserError(f"the arguments after -- do not fit Train_cifar.py: {reason} (write its flags in full, as "
                        f"`{shown} {REPO}/Train_cifar.py --help` lists them)")
    if proc.returncode == 5:
        raise UserError(f"the arguments after -- do not fit Train_cifar.py: {reason}")
    if proc.returncode != 0:
        raise UserError(f"{shown} cannot check the arguments after -- with Train_cifar.py ({reason}): {VENV_FIX}")


def train_script():
    """The script each run starts: $TRAIN_SCRIPT (the tests' fake trainer) or Train_cifar.py."""
    return os.environ.get("TRAIN_SCRIPT") or f"{REPO}/Train_cifar.py"


# ----------------------------------------------------------------------------- arguments

def is_seed(word):
    """Whether word continues a --seeds list: an integer, signed or not."""
    return re.fullmatch(r"-?[0-9]+", word) is not None


def is_gpu(word):
    """Whether word continues a --gpus list: GPU ids are numbers or UUIDs, cells are told apart by their colons."""
    return not word.startswith("-") and ":" not in word


LIST_OPTIONS = {"--seeds": (is_seed, "--seeds needs at least one integer, e.g. --seeds 1 2 3"),
                "--gpus": (is_gpu, "--gpus needs at least one GPU id, e.g. --gpus 0 1")}


class SweepParser(FlagParser):
    """The sweep's argparse: the project's one-line errors, and the usage text as its help."""

    def format_help(self):
        """The usage text, as the shell script printed it."""
        return USAGE


def build_parser():
    """The parser of the sweep's options, in the form argparse_form hands over (--name=value, cells last)."""
    parser = SweepParser(prog="scripts/sweep_cifar.sh", allow_abbrev=False)
    parser.add_argument("cells", nargs="*")
    parser.add_argument("--seeds", action="append", type=int)
    parser.add_argument("--gpus", action="append")
    parser.add_argument("--cifar10_path", default="./cifar-10")
    parser.add_argument("--cifar100_path", default="./cifar-100")
    parser.add_argument("--out", dest="root", default="./runs")
    parser.add_argument("--ood_path", default="")
    parser.add_argument("--partition", default="")
    parser.add_argument("--time", dest="time_limit", default="")
    # kept as text: the job script shows them as given, once checked
    parser.add_argument("--gpus_per_task", default="1")
    parser.add_argument("--warn_seconds", default="300")
    parser.add_argument("--sbatch_args", default="")
    parser.add_argument("--slurm", action="store_true")
    parser.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true")
    return parser


def argparse_form(argv):
    """(tokens for build_parser, the arguments after --). The sweep's grammar decides what argparse cannot: a list
    ends at the first word not of its kind, so cells may follow it, and a value may start with '-'."""
    tokens, cells = [], []
    i = 0
    while i < len(argv):
        word = argv[i]
        i += 1
        if word in LIST_OPTIONS:
            fits, message = LIST_OPTIONS[word]
            start = i
            while i < len(argv) and fits(argv[i]):
                i += 1
            if i == start:
                raise UserError(message)
            tokens += [f"{word}={item}" for item in argv[start:i]]
        elif word in VALUE_OPTIONS:
            if i == len(argv):
                raise UserError(f"{word} needs a value")
            tokens.append(f"{word}={argv[i]}")
            i += 1
        elif word in SWITCHES:
            tokens.append(word)
        elif word in ("-h", "--help"):
            return tokens + ["--help"], []  # the help is printed where it is met, before any later error
        elif word == "--":
            return tokens + ["--"] + cells, argv[i:]
        elif word == "--seed" or word.startswith("--seed="):
            raise UserError(SEED_HINT)
        elif word.startswith("-"):
            raise UserError(f"unknown option {word} (Train_cifar.py options go after --)")
        else:
            cells.append(word)
    return tokens + ["--"] + cells, []


def flag_value(args, name):
    """Last value given to --name in a list of arguments (either --name V or --name=V), else None."""
    value = None
    for i, a in enumerate(args):
        if a == name and i + 1 < len(args):
            value = args[i + 1]
        elif a.startswith(name + "="):
            value = a.split("=", 1)[1]
    return value


def check_options(args):
    """UserError for an option the sweep cannot use, in the order the shell version checked them."""
    for name in ("gpus_per_task", "warn_seconds"):
        if re.fullmatch("[0-9]+", getattr(args, name)) is None:
            raise UserError(f"--{name} {getattr(args, name)} is not allowed: give an integer >= 0")
    if args.slurm and not args.dry_run and shutil.which("sbatch") is None:
        raise UserError("--slurm needs sbatch on the PATH (a SLURM login node); --dry-run --slurm prints the job "
                        "script")
    for a in args.train_args:
        name = a.split("=", 1)[0]
        if name == "--seed":
            raise UserError(SEED_HINT)
        if name in SWEEP_FLAGS:
            raise UserError(f"{name} is set by the sweep per run; leave it out of the arguments after --")
        if name == "--ood_path":
            raise UserError("--ood_path is a sweep option: give it before the cells, not after --")
    for seed in args.seeds:
        if not SEED.holds(seed):  # Train_cifar.py's range: numpy is seeded from --seed
            raise UserError(f"--seeds {seed} is outside {SEED.text(True)}: give integers in that range")
    num_epochs = flag_value(args.train_args, "--num_epochs")
    if num_epochs is not None and not (num_epochs.isdigit() and num_epochs.isascii()):
        raise UserError(f"--num_epochs {num_epochs} is not allowed: give an integer >= 0 (the last epoch)")


def parse_args(argv):
    """The sweep's options as a Namespace, train_args holding the arguments after --; UserError for a usage error."""
    tokens, train_args = argparse_form(argv)
    args = build_parser().parse_args(tokens)
    args.train_args = train_args
    args.seeds = args.seeds or list(DEFAULT_SEEDS)
    check_options(args)
    return args


# ----------------------------------------------------------------------------- cells and the plan

def short_text(r):
    """A ratio in cells, run directory names and commands: %g where that reads back as r, else every digit."""
    # a rate in [0, 1] that %g cannot hold has more than one decimal, so ratio_text gives its every digit
    return f"{r:g}" if float(f"{r:g}") == r else ratio_text(r)


@dataclass(frozen=True)
class Cell:
    """One CIFAR setting: data set, noise mode, rate r (None for CIFAR-N's labels), open-set share (0.0: none)."""

    dataset: str
    mode: str
    r: float = None
    ood: float = 0.0

    @property
    def fields(self):
        """dataset, mode and r (when there is one) as run directories and cells write them."""
        return [self.dataset, self.mode] + ([] if self.r is None else [short_text(self.r)])

    @property
    def text(self):
        """The cell as written on the command line: cifar10:sym:0.5, cifar10:worst:ood0.1."""
        return ":".join(self.fields) + (f":ood{short_text(self.ood)}" if self.ood else "")

    @property
    def stem(self):
        """The run directory's name without the seed: cifar10_sym_0.5, cifar10_worst_ood0.1."""
        return "_".join(self.fields) + (f"_ood{short_text(self.ood)}" if self.ood else "")

    @property
    def prefix(self):
        """The prefix of the files Train_cifar.py writes for this cell."""
        return run_prefix(self.dataset, self.r, self.mode, self.ood)


def parse_cell(text):
    """'cifar10:sym:0.5' -> Cell('cifar10', 'sym', 0.5); 'cifar10:worst:ood0.1' -> Cell('cifar10', 'worst', None, 0.1);
    UserError naming the cell and the form to write."""
    parts = text.split(":")
    ood = 0.0
    if len(parts) > 2 and parts[-1].startswith("ood"):
        try:
            ood = float(parts.pop()[3:])
        except ValueError:
            ood = -1.0
        if not 0.0 < ood < 1.0:
            raise UserError(f"cell {text!r}: the open-set ratio must be a number strictly between 0 and 1, e.g. "
                            ":ood0.2")
    if len(parts) not in (2, 3) or not all(parts):
        raise UserError(f"cell {text!r} {CELL_FORM}")
    dataset, mode = parts[:2]
    if dataset not in ("cifar10", "cifar100"):
        raise UserError(f"cell {text!r}: dataset must be cifar10 or cifar100")
    if mode in CIFARN_MODES:
        if CIFARN_MODES[mode] != dataset:
            raise UserError(f"cell {text!r}: the CIFAR-N labels {mode} belong to {CIFARN_MODES[mode]}: "
                            f"write {CIFARN_MODES[mode]}:{mode}")
        if len(parts) == 3:
            raise UserError(f"cell {text!r}: CIFAR-N labels bring their own noise, so the cell takes no r: write "
                            f"{dataset}:{mode}")
        return Cell(dataset, mode, None, ood)
    if mode not in SYNTHETIC_MODES:
        raise UserError(f"cell {text!r}: noise mode must be {', '.join(SYNTHETIC_MODES)} (with r) or one of the "
                        f"CIFAR-N label sets {', '.join(CIFARN_MODES)} (without r)")
    if len(parts) == 2:
        raise UserError(f"cell {text!r}: {mode} noise needs its rate r: write {dataset}:{mode}:r, e.g. "
                        f"{dataset}:{mode}:0.4")
    try:
        r = float(parts[2])
    except ValueError:
        raise UserError(f"cell {text!r}: r must be a number in [0, 1]") from None
    if not 0.0 <= r <= 1.0:
        raise UserError(f"cell {text!r}: r must be in [0, 1]")
    return Cell(dataset, mode, r, ood)


def last_epoch(log_path):
    """Epoch of the last complete JSON line of a run log, or None."""
    try:
        with open(log_path) as f:
            lines = [line for line in f.read().splitlines() if line.strip()]
    except OSError:
        return None
    for line in reversed(lines):
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line cut short by a kill: the one before it is the last complete epoch
        if isinstance(record, dict) and isinstance(record.get("epoch"), int):
            return record["epoch"]
    return None


def configured_epochs(config_path):
    """num_epochs of a run's saved config, or None."""
    try:
        with open(config_path) as f:
            return json.load(f)["args"]["num_epochs"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def run_state(run_dir, prefix, num_epochs=None):
    """(state, note) of a run folder: finished, resume, new or blocked, with a short explanation. num_epochs: the
    --num_epochs given after -- (int), else the one of the run's config counts."""
    def path(suffix):
        """One of the run's files."""
        return os.path.join(run_dir, prefix + suffix)

    target = num_epochs if num_epochs is not None else configured_epochs(path("_config.json"))
    done = last_epoch(path("_log.jsonl"))
    if is_finished(done, target):
        return "finished", f"epoch {done}/{target}"
    if os.path.isfile(path("_checkpoint.pth.tar")) or os.path.isfile(path("_checkpoint_prev.pth.tar")):
        return "resume", f"epoch {done}/{target}" if done is not None else "checkpoint"
    if any(os.path.isfile(path(s)) and os.path.getsize(path(s)) > 0 for s in ("_log.jsonl", "_acc.txt", "_stats.txt")):
        # Epochs are logged in order from 0: logs up to epoch `done` hold done + 1 of them.
        if restartable(0 if done is None else done + 1):
            return "new", "restart (stopped before its first checkpoint)"
        return "blocked", (f"{run_dir} holds {prefix} logs of epochs up to {done} but no checkpoint, so "
                           "Train_cifar.py would refuse it: remove that directory to start the run again")
    return "new", "no output yet"


@dataclass(frozen=True)
class Run:
    """One cell and seed as planned: its folder, state (finished, resume, new, blocked) and the settings it gets."""

    cell: Cell
    seed: int
    run_dir: str
    state: str
    note: str
    lambda_u: str
    p_threshold: str
    source: str


def plan(args):
    """Every (cell, seed) run of the sweep, cells in the order given (repeats dropped), then seeds."""
    cells = []
    for text in args.cells:
        cell = parse_cell(text)
        if cell.ood and not args.ood_path:
            raise UserError(f"cell {text!r} asks for open-set noise: give --ood_path P (a folder with the other "
                            "CIFAR's python files, or an .npz)")
        if cell not in cells:
            cells.append(cell)
    if not args.cells:
        cells = [Cell(dataset, mode, r) for dataset, mode, r in PAPER_PRESETS]  # Table 1
    num_epochs = flag_value(args.train_args, "--num_epochs")
    overridden = {n: flag_value(args.train_args, "--" + n) for n in ("lambda_u", "p_threshold")}
    runs = []
    for cell in cells:
        kind, preset = setting_preset(cell.dataset, cell.mode, cell.r)
        values, source = dict(preset or ORIGINAL_DEFAULTS), PRESET_SOURCES[kind]
        for name, value in overridden.items():
            if value is not None:
                values[name], source = value, "set after --"
        for seed in args.seeds:
            run_dir = os.path.join(args.root, f"{cell.stem}_seed{seed}")
            state, note = run_state(run_dir, cell.prefix, None if num_epochs is None else int(num_epochs))
            runs.append(Run(cell, seed, run_dir, state, note, str(values["lambda_u"]), str(values["p_threshold"]),
                            source))
    return runs


def announce(runs):
    """Print the runs skipped (finished) and blocked, in plan order; the runs left to do."""
    todo = []
    for run in runs:
        if run.state == "finished":
            print(f"# skip {run.run_dir}: finished ({run.note})")
        elif run.state == "blocked":
            print(f"# blocked: {run.note}", file=sys.stderr)
        else:
            todo.append(run)
    return todo


def train_argv(run, args):
    """The command that trains (or resumes) one run."""
    cell, run_dir = run.cell, run.run_dir
    argv = [python(), train_script(), "--dataset", cell.dataset, "--noise_mode", cell.mode]
    # CIFAR-N cells have no --r and no noise file: Train_cifar.py refuses both with human labels.
    if cell.r is not None:
        argv += ["--r", short_text(cell.r)]
    data_path = args.cifar10_path if cell.dataset == "cifar10" else args.cifar100_path
    argv += ["--seed", str(run.seed), "--data_path", data_path, "--output_dir", run_dir]
    ood = f"_ood{short_text(cell.ood)}" if cell.ood else ""
    if cell.r is not None:
        argv += ["--noise_file", f"{run_dir}/noise_{short_text(cell.r)}_{cell.mode}{ood}.json"]
    if cell.ood:
        argv += ["--ood_path", args.ood_path, "--ood_ratio", short_text(cell.ood)]
        if cell.r is None:  # the replaced images are the run's own too; with no noise file to sit beside, name them
            argv += ["--ood_file", f"{run_dir}/{cell.mode}{ood}_replaced.json"]
    argv += ["--gpuid", "0"] + (["--resume"] if run.state == "resume" else []) + args.train_args
    return argv


# ----------------------------------------------------------------------------- running here

def env_gpus():
    """$CUDA_VISIBLE_DEVICES split at its commas as bash's `read -a` does (a trailing comma adds no empty id)."""
    ids = os.environ["CUDA_VISIBLE_DEVICES"].split(",")
    return ids[:-1] if ids[-1] == "" else ids


def find_gpus(given):
    """The workers' GPU ids: --gpus, else $CUDA_VISIBLE_DEVICES, else nvidia-smi's GPUs, else [DEFAULT_SLOT]."""
    if given:
        return given
    gpus = []
    if "CUDA_VISIBLE_DEVICES" in os.environ:
        gpus = env_gpus()
    elif shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"], text=True,
                                 stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL).stdout
        except OSError:
            out = ""
        gpus = [g for g in (line.replace(" ", "").replace("\r", "") for line in out.split("\n")) if g]
    return gpus or [DEFAULT_SLOT]


def gpu_prefix(gpu):
    """The environment assignment shown before a command on that GPU ('' for the default slot)."""
    return "" if gpu == DEFAULT_SLOT else f"CUDA_VISIBLE_DEVICES={bash_quote(gpu)} "


@dataclass(frozen=True)
class Job:
    """One run to start here: its folder, command and GPU, and the command as printed and logged."""

    run_dir: str
    argv: tuple
    gpu: str
    shown: str


class Stopped(Exception):
    """A stop signal ended the sweep; the runs going were stopped and waited for."""


def background_job_signals(mask):
    """In a run's process before it starts: the signals of a bash background job (SIGINT and SIGQUIT ignored: the
    sweep passes a stop on as SIGTERM) and the sweep's signal mask from before the pool."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGQUIT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_SETMASK, mask)


class WorkerPool:
    """Worker slots, each running its jobs one after another: job i on slot i % slots, as the dry run shows."""

    def __init__(self, jobs, slots):
        """jobs: the Jobs in plan order; slots: how many run at once."""
        self.queues = [list(jobs[slot::slots]) for slot in range(slots)]
        self.going = {}  # slot -> (Popen, Job, start time)
        self.failed = 0

    def run(self):
        """Run every job; the number that failed. Stopped once a stop signal has stopped the runs going."""
        # A signal the sweep was started ignoring (SIGINT in a background job) stays ignored, as it did in bash.
        stops = {s for s in STOP_SIGNALS if signal.getsignal(s) != signal.SIG_IGN}
        # Blocked and taken with sigwait: a stop can never fall between starting a run and recording it.
        watched = stops | {signal.SIGCHLD}
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, watched)
        try:
            for slot in range(len(self.queues)):
                self.start_next(slot, mask)
            while self.going:
                if signal.sigwait(watched) in stops:
                    self.stop()
                    raise Stopped
                for slot in list(self.going):
                    self.collect(slot, mask)
            return self.failed
        finally:
            while signal.sigpending() & stops:  # taken here, not by the default action once unblocked
                signal.sigtimedwait(stops, 0)
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)

    def start_next(self, slot, mask):
        """Start the slot's next job that can start; one that cannot counts as failed."""
        while self.queues[slot]:
            job = self.queues[slot].pop(0)
            try:
                os.makedirs(job.run_dir, exist_ok=True)
            except OSError as err:
                print(f"mkdir: cannot create directory '{job.run_dir}': {err.strerror}", file=sys.stderr)
                self.failed += 1
                continue
            env = None if job.gpu == DEFAULT_SLOT else {**os.environ, "CUDA_VISIBLE_DEVICES": job.gpu}
            rc = 1  # the log cannot be opened: the shell's redirection failed with status 1
            try:
                with open(os.path.join(job.run_dir, "train.log"), "ab") as log:
                    log.write(f"=== sweep {time.strftime('%Y-%m-%d %H:%M:%S')}: {job.shown}\n".encode())
                    log.flush()
                    try:
                        proc = subprocess.Popen(job.argv, stdin=subprocess.DEVNULL, stdout=log,
                                                stderr=subprocess.STDOUT, env=env,
                                                preexec_fn=functools.partial(background_job_signals, mask))
                    except OSError as err:  # bash's words and status for a command it cannot run
                        log.write(f"sweep: {job.argv[0]}: {err.strerror}\n".encode())
                        rc = 127 if err.errno == errno.ENOENT else 126
                        raise
            except OSError:
                self.report(job, rc, 0.0)
                continue
            self.going[slot] = (proc, job, time.monotonic())
            return

    def report(self, job, rc, seconds):
        """Say how a run ended: done on stdout, FAILED (counted) on stderr."""
        if rc == 0:
            print(f"sweep: done {job.run_dir} ({int(seconds)} s, gpu {job.gpu})")
        else:
            print(f"sweep: FAILED {job.run_dir} (exit {rc}, gpu {job.gpu}): see {job.run_dir}/train.log",
                  file=sys.stderr)
            self.failed += 1

    def collect(self, slot, mask):
        """Report the slot's run if it has ended and start the slot's next one."""
        proc, job, t0 = self.going[slot]
        rc = proc.poll()
        if rc is None:
            return
        del self.going[slot]
        self.report(job, 128 - rc if rc < 0 else rc, time.monotonic() - t0)  # killed by signal N: 128 + N, as bash
        self.start_next(slot, mask)

    def stop(self):
        """Pass a stop on: SIGTERM to every run going, then wait for each (it finishes the checkpoint it writes)."""
        print("sweep: stopping the workers", file=sys.stderr)
        for proc, _, _ in self.going.values():
            proc.send_signal(signal.SIGTERM)
        for proc, _, _ in self.going.values():
            proc.wait()
        self.going.clear()


def run_here(args, runs):
    """Print the plan and, unless it is a dry run, run it on this machine's workers; the exit status."""
    todo = announce(runs)
    finished = sum(run.state == "finished" for run in runs)
    blocked = sum(run.state == "blocked" for run in runs)
    gpus = find_gpus(args.gpus)
    slots = max(1, min(len(gpus), len(todo)))
    print(f"# sweep: {len(runs)} run(s): {len(todo)} to run, {finished} finished, {blocked} blocked; {slots} "
          f"worker(s) on GPU(s): {' '.join(gpus[:slots])}")
    # Round-robin: CIFAR cells take about the same time per epoch, so this balances well, and the dry run can
    # show exactly which GPU each run gets.
    jobs = []
    for i, run in enumerate(todo):
        gpu = gpus[i % slots]
        argv = train_argv(run, args)
        shown = gpu_prefix(gpu) + shell_line(argv, f"{run.run_dir}/train.log")
        print(f"{shown}  # lambda_u={run.lambda_u} p_threshold={run.p_threshold} ({run.source}); {run.state} "
              f"({run.note}); gpu {gpu}")
        jobs.append(Job(run.run_dir, tuple(argv), gpu, shown))
    if args.dry_run:
        return 0
    try:
        failed = WorkerPool(jobs, slots).run() + blocked
    except Stopped:
        return 130
    print(f"sweep: {len(todo)} run(s) started, {finished} already finished, {failed} failed or blocked")
    return 0 if failed == 0 else 1


# ----------------------------------------------------------------------------- SLURM

class JobTemplate(string.Template):
    """Placeholders are @{name}; every other character of the job script, each $ and @ included, is bash's own."""

    pattern = r"@(?: \{(?P<braced>[a-z_]+)\} | (?P<named>(?!)) | (?P<escaped>(?!)) | (?P<invalid>(?!)) )"


def job_script(args, todo):
    """The job array's sbatch script for the runs left to do: scripts/sweep_cifar.sbatch.template filled in."""
    root = absolute(args.root)
    sweep = [f"{REPO}/scripts/sweep_cifar.sh", "--out", root, "--cifar10_path", absolute(args.cifar10_path),
             "--cifar100_path", absolute(args.cifar100_path)]
    if args.ood_path:
        sweep += ["--ood_path", absolute(args.ood_path)]
    options = [("--partition", args.partition), ("--time", args.time_limit),
               ("--gres", f"gpu:{args.gpus_per_task}" if int(args.gpus_per_task) > 0 else "")]
    fake_trainer = os.environ.get("TRAIN_SCRIPT")
    with open(JOB_TEMPLATE) as f:
        template = JobTemplate(f.read())
    return template.substitute(
        last_task=len(todo) - 1, warn_seconds=args.warn_seconds, root=root,
        sbatch_lines="".join(f"#SBATCH {name}={value}\n" for name, value in options if value),
        # a task plans again from its run folder: it resumes from the checkpoint or skips a finished run
        runs=bash_words(f"{run.cell.text} {run.seed} {run.run_dir}" for run in todo), sweep=bash_words(sweep),
        train_args=bash_words(args.train_args), python=bash_quote(python()),
        train_script_line=f"export TRAIN_SCRIPT={bash_quote(fake_trainer)}\n" if fake_trainer else "")


def sbatch_options(text):
    """--sbatch_args as words: its first line split at blanks, as bash's `read -r -a` split it."""
    return [w for w in re.split("[ \t]", text.split("\n", 1)[0]) if w]


def sbatch_refusal(script, stderr, returncode):
    """The one line saying why sbatch refused the job script: sbatch's own reason, and the fix of a GPU request
    the cluster cannot meet."""
    lines = [re.sub(r"^sbatch: error: ", "", line.strip()) for line in stderr.splitlines() if line.strip()]
    reason = "; ".join(lines) or f"exit status {returncode}, no reason given"
    fix = ""
    if re.search(r"gres|generic resource|gpu", reason, re.I):
        fix = ": for nodes without GPUs pass --gpus_per_task 0 (and a CPU partition with --partition)"
    return f"sbatch refused {script}: {reason}{fix}{see_doc('SLURM')}"


def submit(args, runs):
    """Print the plan and write the job array's script and submit it (--dry-run: print it); the exit status."""
    todo = announce(runs)
    finished = sum(run.state == "finished" for run in runs)
    blocked = sum(run.state == "blocked" for run in runs)
    print(f"# sweep: {len(runs)} run(s): {len(todo)} to submit, {finished} finished, {blocked} blocked")
    if not todo:
        print("sweep: nothing left to submit")
        return 1 if blocked else 0
    text = job_script(args, todo)
    if args.dry_run:
        sys.stdout.write(text)
        return 0
    root = absolute(args.root)
    script = f"{root}/slurm/sweep_{time.strftime('%Y%m%d_%H%M%S')}.sbatch"
    try:
        os.makedirs(f"{root}/slurm", exist_ok=True)
        with open(script, "w") as f:
            f.write(text)
    except OSError:
        raise UserError(f"cannot write {script}") from None
    try:
        # sbatch options given here override the script's #SBATCH lines
        proc = subprocess.run(["sbatch", "--parsable", *sbatch_options(args.sbatch_args), script],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    except OSError as err:
        print(f"error: sbatch could not be run ({err.strerror}) for {script}{see_doc('SLURM')}", file=sys.stderr)
        return 1
    if proc.returncode != 0:
        print(f"error: {sbatch_refusal(script, proc.stderr, proc.returncode)}", file=sys.stderr)
        return 1
    job = proc.stdout.rstrip("\n").split(";")[0]
    print(f"sweep: submitted job array {job} ({len(todo)} task(s)): {script}")
    print(f"sweep: follow it with: squeue -j {job}; task logs: {root}/slurm/dividemix-sweep_{job}_<task>.out; "
          f"each run's own log: <run folder>/train.log; report: python report.py {args.root}")
    return 0


# ----------------------------------------------------------------------------- entry

def main(argv):
    """The sweep; its exit status: 0 every run succeeded, 1 one failed or was blocked, 2 a usage error, 130 stopped
    by SIGINT or SIGTERM."""
    try:
        args = parse_args(argv)
        runs = plan(args)  # reads run folders only: the usage errors come first, before the subprocess below
        check_interpreter(args.train_args)  # before anything is printed, written or started
        return submit(args, runs) if args.slurm else run_here(args, runs)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2


def configure_process():
    """The process as the shell version's: Ctrl-C before the runs start and a closed pipe end it quietly, and its
    stdout lines keep their place among its stderr lines in a shared log."""
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    sys.stdout.reconfigure(line_buffering=True)


if __name__ == "__main__":
    configure_process()
    sys.exit(main(sys.argv[1:]))
