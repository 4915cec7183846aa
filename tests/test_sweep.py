"""scripts/sweep_cifar.sh: dry-run listing, presets, run dirs, skip/resume, seeds, GPU spreading, execution; then
sweep.py's parts in-process: argument parsing, cells, the plan, the job script, the worker pool.

Nothing trains: execution tests replace Train_cifar.py by a fake script through $TRAIN_SCRIPT.
"""
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time

import pytest

from cli import UserError
from presets import PAPER_PRESETS, run_prefix
from rundirs import UNCHECKPOINTED_EPOCHS
import sweep as sweep_py  # `sweep` below runs the shell entry

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SWEEP = os.path.join(REPO, "scripts", "sweep_cifar.sh")

# The paper's appendix (as presets.PAPER_PRESETS and docs/paper.md): (lambda_u, p_threshold) per Table 1 cell.
TABLE1 = {("cifar10", "sym", "0.2"): ("0", "0.5"), ("cifar10", "sym", "0.5"): ("25", "0.5"),
          ("cifar10", "sym", "0.8"): ("25", "0.5"), ("cifar10", "sym", "0.9"): ("50", "0.6"),
          ("cifar10", "asym", "0.4"): ("0", "0.5"), ("cifar100", "sym", "0.2"): ("25", "0.5"),
          ("cifar100", "sym", "0.5"): ("150", "0.5"), ("cifar100", "sym", "0.8"): ("150", "0.5"),
          ("cifar100", "sym", "0.9"): ("150", "0.6")}

FAKE_TRAIN = """\
import json, os, sys
args = sys.argv[1:]
out = args[args.index("--output_dir") + 1]
with open(os.path.join(out, "called.json"), "w") as f:
    json.dump({"args": args, "cuda": os.environ.get("CUDA_VISIBLE_DEVICES")}, f)
print("fake training output")
sys.exit(3 if "0.8" in args else 0)
"""


@pytest.fixture
def env(tmp_path, prestarted_python):
    """Environment with this Python (prestarted), no CUDA_VISIBLE_DEVICES and an nvidia-smi that finds no GPU."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake_smi(bin_dir, "exit 9")
    e = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    e["PYTHON"] = prestarted_python
    e["PATH"] = f"{bin_dir}{os.pathsep}{e.get('PATH', '')}"
    return e


def fake_smi(bin_dir, body):
    """An nvidia-smi stand-in running the given shell body."""
    path = bin_dir / "nvidia-smi"
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)


def sweep(args, env, check=True):
    """Run the sweep; returns the completed process."""
    proc = subprocess.run(["bash", SWEEP] + [str(a) for a in args], env=env, capture_output=True, text=True,
                          timeout=60)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def commands(stdout):
    """Parsed command lines of a dry run: list of (env assignment or None, argv dict, comment)."""
    out = []
    for line in stdout.splitlines():
        if not line or line.startswith("#"):
            continue
        command, _, comment = line.partition("  # ")
        words = shlex.split(command)
        cuda = words.pop(0).split("=", 1)[1] if words[0].startswith("CUDA_VISIBLE_DEVICES=") else None
        redirect = words.index(">>")
        flags, opts = words[2:redirect], {}
        i = 0
        while i < len(flags):
            if i + 1 < len(flags) and not flags[i + 1].startswith("--"):
                opts[flags[i]] = flags[i + 1]
                i += 2
            else:
                opts[flags[i]] = True
                i += 1
        opts["_log"] = words[redirect + 1]
        opts["_script"] = words[1]
        out.append((cuda, opts, comment))
    return out


def test_dry_run_lists_table1_with_presets(tmp_path, env):
    """All nine cells, default seed 123, paper presets shown, run dirs and per-run noise files."""
    root = tmp_path / "runs"
    proc = sweep(["--dry-run", "--out", root, "--cifar10_path", "/d/c10", "--cifar100_path", "/d/c100"], env)
    cmds = commands(proc.stdout)
    assert len(cmds) == 9
    seen = set()
    for cuda, opts, comment in cmds:
        cell = (opts["--dataset"], opts["--noise_mode"], opts["--r"])
        seen.add(cell)
        run_dir = os.path.join(str(root), "%s_%s_%s_seed123" % (cell[0], cell[1], cell[2]))
        assert cuda is None  # no GPU found: the device is left to Train_cifar.py
        assert opts["_script"] == os.path.join(REPO, "Train_cifar.py")
        assert opts["--seed"] == "123" and opts["--gpuid"] == "0"
        assert opts["--output_dir"] == run_dir
        assert opts["--noise_file"] == os.path.join(run_dir, f"noise_{cell[2]}_{cell[1]}.json")
        assert opts["_log"] == os.path.join(run_dir, "train.log")
        assert opts["--data_path"] == ("/d/c10" if cell[0] == "cifar10" else "/d/c100")
        assert "--resume" not in opts and "--lambda_u" not in opts
        lambda_u, p_threshold = TABLE1[cell]
        assert f"lambda_u={lambda_u} p_threshold={p_threshold} (paper preset)" in comment
    assert seen == set(TABLE1)
    assert not root.exists()  # a dry run creates nothing


def test_cells_seeds_and_pass_through(tmp_path, env):
    """Chosen cells times seeds, in order; arguments after -- reach every command."""
    proc = sweep(["--dry-run", "--out", tmp_path, "--seeds", "1", "2", "3", "cifar100:sym:0.9", "cifar10:sym:0.5",
                  "--", "--num_epochs", "5", "--eval_batch_size", "256"], env)
    cmds = commands(proc.stdout)
    got = [(o["--dataset"], o["--r"], o["--seed"], os.path.basename(o["--output_dir"])) for _, o, _ in cmds]
    assert got == [("cifar100", "0.9", s, f"cifar100_sym_0.9_seed{s}") for s in "123"] + \
        [("cifar10", "0.5", s, f"cifar10_sym_0.5_seed{s}") for s in "123"]
    assert all(o["--num_epochs"] == "5" and o["--eval_batch_size"] == "256" for _, o, _ in cmds)
    assert "lambda_u=150 p_threshold=0.6" in cmds[0][2]


def test_overridden_preset_is_shown(tmp_path, env):
    """A --lambda_u after -- is what the dry run reports."""
    proc = sweep(["--dry-run", "--out", tmp_path, "cifar10:sym:0.2", "--", "--lambda_u", "7"], env)
    (_, opts, comment), = commands(proc.stdout)
    assert opts["--lambda_u"] == "7" and "lambda_u=7 p_threshold=0.5 (set after --)" in comment


def write_run(run_dir, dataset, r, mode, num_epochs, last_epoch, checkpoint, cut_line=False, ood_ratio=0.0):
    """Fake Train_cifar.py outputs: config, a log up to last_epoch, optionally a checkpoint."""
    run_dir.mkdir(parents=True)
    prefix = run_prefix(dataset, r, mode, ood_ratio)
    (run_dir / f"{prefix}_config.json").write_text(json.dumps({"args": {"num_epochs": num_epochs},
                                                               "script": "Train_cifar.py"}))
    lines = [json.dumps({"epoch": e, "phase": "train", "test_acc": 50.0}) for e in range(last_epoch + 1)]
    text = "\n".join(lines) + "\n" + ('{"epoch": %d, "pha' % (last_epoch + 1) if cut_line else "")
    (run_dir / f"{prefix}_log.jsonl").write_text(text)
    if checkpoint:
        (run_dir / f"{prefix}_checkpoint.pth.tar").write_bytes(b"x")


def test_finished_skipped_interrupted_resumed(tmp_path, env):
    """Finished runs are skipped, checkpointed ones get --resume, logs without a checkpoint are blocked."""
    root = tmp_path / "runs"
    write_run(root / "cifar10_sym_0.5_seed1", "cifar10", 0.5, "sym", 300, 300, checkpoint=True)
    write_run(root / "cifar10_sym_0.5_seed2", "cifar10", 0.5, "sym", 300, 123, checkpoint=True, cut_line=True)
    write_run(root / "cifar10_sym_0.5_seed3", "cifar10", 0.5, "sym", 300, 4, checkpoint=False)
    proc = sweep(["--dry-run", "--out", root, "--seeds", "1", "2", "3", "4", "cifar10:sym:0.5"], env)
    cmds = commands(proc.stdout)
    assert [(o["--seed"], "--resume" in o) for _, o, _ in cmds] == [("2", True), ("4", False)]
    assert "resume (epoch 123/300)" in cmds[0][2]
    assert f"# skip {root / 'cifar10_sym_0.5_seed1'}: finished (epoch 300/300)" in proc.stdout
    assert "cifar10_sym_0.5_seed3 holds cifar10_0.5_sym logs of epochs up to 4 but no checkpoint" in proc.stderr
    # a run killed before its first checkpoint landed starts again with the same command
    write_run(root / "cifar10_sym_0.5_seed5", "cifar10", 0.5, "sym", 300, 1, checkpoint=False)
    proc = sweep(["--dry-run", "--out", root, "--seeds", "5", "cifar10:sym:0.5"], env)
    (_, opts, comment), = commands(proc.stdout)
    assert "--resume" not in opts and "restart (stopped before its first checkpoint)" in comment
    # A longer --num_epochs after -- turns the finished run into one to continue.
    proc = sweep(["--dry-run", "--out", root, "--seeds", "1", "cifar10:sym:0.5", "--", "--num_epochs", "400"], env)
    (_, opts, comment), = commands(proc.stdout)
    assert opts["--resume"] is True and "epoch 300/400" in comment


def test_r_off_one_decimal_keeps_every_digit(tmp_path, env):
    """Train_cifar.py names --r 0.45 cifar10_0.45_sym: the sweep finds that run; --r is passed on exactly."""
    root = tmp_path / "runs"
    write_run(root / "cifar10_sym_0.45_seed1", "cifar10", 0.45, "sym", 300, 12, checkpoint=True)
    write_run(root / "cifar10_sym_0.5_seed1", "cifar10", 0.5, "sym", 300, 300, checkpoint=True)
    proc = sweep(["--dry-run", "--out", root, "--seeds", "1", "cifar10:sym:0.45", "cifar10:sym:0.5",
                  "cifar10:sym:0.1234567"], env)
    cmds = commands(proc.stdout)
    assert [(o["--r"], "--resume" in o) for _, o, _ in cmds] == [("0.45", True), ("0.1234567", False)]
    assert cmds[1][1]["--output_dir"] == str(root / "cifar10_sym_0.1234567_seed1")
    assert "original-code default, no paper preset" in cmds[0][2] and "resume (epoch 12/300)" in cmds[0][2]
    assert "skip" in proc.stdout and "cifar10_sym_0.5_seed1: finished" in proc.stdout


def test_gpus_round_robin(tmp_path, env):
    """--gpus 0 1: runs alternate between the GPUs, each with CUDA_VISIBLE_DEVICES and --gpuid 0."""
    proc = sweep(["--dry-run", "--out", tmp_path, "--gpus", "0", "1", "--seeds", "1", "2", "3", "cifar10:sym:0.5"],
                 env)
    cmds = commands(proc.stdout)
    assert [c for c, _, _ in cmds] == ["0", "1", "0"]
    assert all(o["--gpuid"] == "0" for _, o, _ in cmds)
    assert [comment.rsplit("; ", 1)[1] for _, _, comment in cmds] == ["gpu 0", "gpu 1", "gpu 0"]
    assert "2 worker(s) on GPU(s): 0 1" in proc.stdout


def test_gpus_found_by_nvidia_smi_or_env(tmp_path, env):
    """Without --gpus: $CUDA_VISIBLE_DEVICES wins, else every GPU nvidia-smi lists."""
    fake_smi(tmp_path / "bin", "printf '0\\n1\\n2\\n'")
    cmds = commands(sweep(["--dry-run", "--out", tmp_path, "--seeds", "1", "2", "3", "4", "cifar10:sym:0.5"],
                          env).stdout)
    assert [c for c, _, _ in cmds] == ["0", "1", "2", "0"]
    cmds = commands(sweep(["--dry-run", "--out", tmp_path, "--seeds", "1", "2", "cifar10:sym:0.5"],
                          dict(env, CUDA_VISIBLE_DEVICES="5,7")).stdout)
    assert [c for c, _, _ in cmds] == ["5", "7"]


def test_usage_errors(tmp_path, env):
    """Bad cells, flags the sweep owns, unknown options: exit 2 with one error line."""
    for args in (["cifar10:sym"], ["cifar10:foo:0.5"], ["svhn:sym:0.5"], ["cifar10:sym:1.5"], ["--bogus"],
                 ["--seeds"], ["--", "--seed", "3"], ["--", "--output_dir=x"],
                 ["--seeds", "-1"], ["--seeds", "4294967296"], ["--", "--num_epochs", "-1"]):
        proc = sweep(["--dry-run", "--out", tmp_path] + args, env, check=False)
        assert proc.returncode == 2, args
        assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, (args, proc.stderr)


def test_execution_with_fake_trainer(tmp_path, env):
    """Runs really start: per-GPU environment, output appended to train.log, a failed run makes exit 1."""
    fake = tmp_path / "fake_train.py"
    fake.write_text(FAKE_TRAIN)
    root = tmp_path / "runs"
    proc = sweep(["--out", root, "--gpus", "3", "4", "cifar10:sym:0.5", "cifar10:sym:0.8", "cifar100:sym:0.2"],
                 dict(env, TRAIN_SCRIPT=str(fake)), check=False)
    assert proc.returncode == 1
    assert "FAILED" in proc.stderr and "cifar10_sym_0.8_seed123" in proc.stderr
    called = {d: json.loads((root / d / "called.json").read_text())
              for d in ("cifar10_sym_0.5_seed123", "cifar10_sym_0.8_seed123", "cifar100_sym_0.2_seed123")}
    assert [c["cuda"] for c in called.values()] == ["3", "4", "3"]
    assert called["cifar100_sym_0.2_seed123"]["args"][:4] == ["--dataset", "cifar100", "--noise_mode", "sym"]
    log = (root / "cifar10_sym_0.5_seed123" / "train.log").read_text()
    assert log.startswith("=== sweep ") and "fake training output" in log
    # Running the failed cell again appends to its train.log and fails again with exit status 1.
    proc = sweep(["--out", root, "--gpus", "3", "cifar10:sym:0.8"], dict(env, TRAIN_SCRIPT=str(fake)), check=False)
    assert proc.returncode == 1
    assert (root / "cifar10_sym_0.8_seed123" / "train.log").read_text().count("=== sweep ") == 2


def test_slurm_dry_run_prints_the_job_script_and_writes_nothing(tmp_path, env):
    root = tmp_path / "runs"
    proc = sweep(["--slurm", "--dry-run", "--out", root, "--seeds", 1, 2, "--partition", "gpu", "--time", "02:00:00",
                  "--gpus_per_task", 2, "cifar10:sym:0.5", "--", "--num_epochs", 7], env)
    text = proc.stdout
    for line in ("#SBATCH --array=0-1", "#SBATCH --requeue", "#SBATCH --signal=B:USR1@300", "#SBATCH --partition=gpu",
                 "#SBATCH --time=02:00:00", "#SBATCH --gres=gpu:2", "scontrol requeue"):
        assert line in text, line
    assert f"cifar10:sym:0.5\\ 1\\ {root}/cifar10_sym_0.5_seed1" in text
    assert "train_args=( --num_epochs 7 )" in text
    assert not root.exists()  # nothing written, nothing submitted


def test_cifar100_asym_cells_are_planned(tmp_path, env):
    proc = sweep(["--dry-run", "--out", tmp_path / "runs", "cifar100:asym:0.4"], env)
    line = [x for x in proc.stdout.splitlines() if "--noise_mode asym" in x]
    assert len(line) == 1 and "--dataset cifar100" in line[0] and "cifar100_asym_0.4_seed123" in line[0]
    assert "original-code default, no paper preset" in line[0]


NEW_CELLS = ["cifar10:worst", "cifar100:noisy100", "cifar10:rand2", "cifar100:idn:0.45", "cifar10:idn:0.2",
             "cifar10:sym:0.2:ood0.2", "cifar10:aggre:ood0.1", "cifar100:asym:0.4:ood0.25"]


def test_cifar_n_idn_and_open_set_cells(tmp_path, env):
    """CIFAR-N cells have no --r and no noise file; open-set cells pass --ood_path and --ood_ratio; run dirs."""
    root = tmp_path / "runs"
    proc = sweep(["--dry-run", "--out", root, "--ood_path", "/d/ood", "--cifar10_path", "/d/c10",
                  "--cifar100_path", "/d/c100"] + NEW_CELLS + ["--", "--num_epochs", "5"], env)
    cmds = commands(proc.stdout)
    got = {os.path.basename(o["--output_dir"]): o for _, o, _ in cmds}
    assert list(got) == ["cifar10_worst_seed123", "cifar100_noisy100_seed123", "cifar10_rand2_seed123",
                         "cifar100_idn_0.45_seed123", "cifar10_idn_0.2_seed123", "cifar10_sym_0.2_ood0.2_seed123",
                         "cifar10_aggre_ood0.1_seed123", "cifar100_asym_0.4_ood0.25_seed123"]
    for name, opts in got.items():
        run_dir = str(root / name)
        assert opts["--output_dir"] == run_dir and opts["--num_epochs"] == "5" and opts["--gpuid"] == "0"
        assert opts["--data_path"] == ("/d/c10" if opts["--dataset"] == "cifar10" else "/d/c100")
        if opts["--noise_mode"] in ("worst", "noisy100", "rand2", "aggre"):
            assert "--r" not in opts and "--noise_file" not in opts
        else:
            suffix = f"_ood{opts['--ood_ratio']}" if "_ood" in name else ""
            assert opts["--noise_file"] == os.path.join(run_dir, f"noise_{opts['--r']}_{opts['--noise_mode']}"
                                                                 f"{suffix}.json")
        if "_ood" in name:
            assert opts["--ood_path"] == "/d/ood" and name.endswith(f"_ood{opts['--ood_ratio']}_seed123")
        else:
            assert "--ood_path" not in opts and "--ood_ratio" not in opts
        # CIFAR-N has no noise file to put the replacement beside: the run's own replacement file is named
        if "_ood" in name and "--r" not in opts:
            assert opts["--ood_file"] == os.path.join(run_dir, f"{opts['--noise_mode']}_ood{opts['--ood_ratio']}"
                                                               "_replaced.json")
        else:
            assert "--ood_file" not in opts
    assert got["cifar100_idn_0.45_seed123"]["--r"] == "0.45"
    assert got["cifar10_aggre_ood0.1_seed123"]["--ood_ratio"] == "0.1"
    comments = {os.path.basename(o["--output_dir"]): c for _, o, c in cmds}
    for name in ("cifar10_worst_seed123", "cifar100_noisy100_seed123", "cifar10_aggre_ood0.1_seed123"):
        assert "lambda_u=0 p_threshold=0.5 (CIFAR-N preset (noisypy reproduction))" in comments[name]
    assert "lambda_u=0 p_threshold=0.5 (paper preset)" in comments["cifar10_sym_0.2_ood0.2_seed123"]
    assert "original-code default, no paper preset" in comments["cifar100_idn_0.45_seed123"]
    # An explicit --lambda_u wins over the CIFAR-N preset too.
    proc = sweep(["--dry-run", "--out", root, "cifar10:worst", "--", "--lambda_u", "3"], env)
    (_, opts, comment), = commands(proc.stdout)
    assert opts["--lambda_u"] == "3" and "lambda_u=3 p_threshold=0.5 (set after --)" in comment


def test_new_cells_find_their_runs(tmp_path, env):
    """Skip and resume use Train_cifar.py's prefixes: cifar10_worst, cifar10_0.2_sym_ood0.2, cifar100_0.45_idn."""
    root = tmp_path / "runs"
    write_run(root / "cifar10_worst_seed1", "cifar10", None, "worst", 300, 300, checkpoint=True)
    write_run(root / "cifar10_sym_0.2_ood0.2_seed1", "cifar10", 0.2, "sym", 300, 40, checkpoint=True, ood_ratio=0.2)
    write_run(root / "cifar100_idn_0.45_seed1", "cifar100", 0.45, "idn", 300, 7, checkpoint=False)
    proc = sweep(["--dry-run", "--out", root, "--ood_path", "/d/ood", "--seeds", "1", "cifar10:worst",
                  "cifar10:sym:0.2:ood0.2", "cifar100:idn:0.45"], env)
    (_, opts, comment), = commands(proc.stdout)
    assert opts["--output_dir"] == str(root / "cifar10_sym_0.2_ood0.2_seed1") and opts["--resume"] is True
    assert "resume (epoch 40/300)" in comment
    assert f"# skip {root / 'cifar10_worst_seed1'}: finished (epoch 300/300)" in proc.stdout
    assert "cifar100_idn_0.45_seed1 holds cifar100_0.45_idn logs of epochs up to 7 but no checkpoint" in proc.stderr


def test_malformed_new_cells_are_usage_errors(tmp_path, env):
    """Each malformed cell, an open-set cell without --ood_path, and the sweep's ood flags after --: one line, 2."""
    cases = {"cifar100:worst": "belong to cifar10: write cifar10:worst",
             "cifar10:noisy100": "write cifar100:noisy100",
             "cifar10:worst:0.2": "takes no r: write cifar10:worst",
             "cifar100:idn": "needs its rate r",
             "cifar10:sym:0.2:ood1": "strictly between 0 and 1",
             "cifar10:worst:ood0": "strictly between 0 and 1",
             "cifar10:sym:0.2:oodx": "strictly between 0 and 1",
             "cifar10:sym:0.2:0.3": "is not dataset:mode:r or dataset:mode",
             "cifar10::0.2": "is not dataset:mode:r or dataset:mode",
             "cifar10:sym:ood0.2:0.2": "optionally followed by :ood<ratio>",
             "cifar10:ood0.2": "noise mode must be sym, asym, idn",
             "cifar10:aggre:ood0.1": "give --ood_path P"}
    for cell, message in cases.items():
        proc = sweep(["--dry-run", "--out", tmp_path, cell], env, check=False)
        assert proc.returncode == 2, cell
        assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, (cell, proc.stderr)
        assert message in proc.stderr, (cell, proc.stderr)
    for args in (["--", "--ood_ratio", "0.2"], ["--", "--ood_path=/x"], ["--ood_path"]):
        proc = sweep(["--dry-run", "--out", tmp_path, "cifar10:sym:0.5"] + args, env, check=False)
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1, (args, proc.stderr)


def test_slurm_tasks_carry_the_new_cells(tmp_path, env):
    """--slurm hands each task its cell string and --ood_path; the task's own plan finds the same run folder."""
    root = tmp_path / "runs"
    cells = ["cifar10:worst", "cifar100:idn:0.45", "cifar10:sym:0.2:ood0.2", "cifar10:aggre:ood0.1"]
    proc = sweep(["--slurm", "--dry-run", "--out", root, "--ood_path", "ood_images", "--seeds", 4] + cells, env)
    runs_line = next(line for line in proc.stdout.splitlines() if line.startswith("runs=("))
    sweep_line = next(line for line in proc.stdout.splitlines() if line.startswith("sweep=("))
    tasks = [word.split(" ") for word in shlex.split(runs_line[len("runs=("):-1])]
    assert [cell for cell, _, _ in tasks] == cells
    task_sweep = shlex.split(sweep_line[len("sweep=("):-1])
    assert task_sweep[task_sweep.index("--ood_path") + 1] == os.path.join(os.getcwd(), "ood_images")
    for cell, seed, run_dir in tasks:
        # What a task runs: the sweep's options as written in the job script, one cell and one seed.
        task = sweep(task_sweep[1:] + ["--dry-run", "--seeds", seed, cell], env)
        (_, opts, _), = commands(task.stdout)
        assert opts["--output_dir"] == run_dir


# ----------------------------------------------------------------------------- sweep.py in-process

def test_sweep_module_needs_no_torch():
    """The sweep plans and prints without loading torch (nor distributed, which imports it)."""
    code = "import sys, sweep\nprint('torch' in sys.modules, 'distributed' in sys.modules)\n"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, PYTHONPATH=REPO))
    assert proc.returncode == 0 and proc.stdout == "False False\n", proc.stderr


def test_arguments_lists_end_where_their_kind_ends():
    """--seeds takes integers and --gpus ids without a colon, so cells may follow either; values may start with -."""
    args = sweep_py.parse_args(["--seeds", "1", "-0", "cifar10:sym:0.5", "--gpus", "0", "GPU-1a", "cifar10:worst",
                                "--out", "-odd", "--dry_run", "--seeds", "7", "--", "--num_epochs", "3", "x:y"])
    assert args.seeds == [1, 0, 7] and args.gpus == ["0", "GPU-1a"] and args.root == "-odd" and args.dry_run
    assert args.cells == ["cifar10:sym:0.5", "cifar10:worst"] and args.train_args == ["--num_epochs", "3", "x:y"]
    args = sweep_py.parse_args([])
    assert (args.seeds, args.gpus, args.cells, args.root, args.slurm) == ([123], None, [], "./runs", False)
    assert (args.cifar10_path, args.cifar100_path, args.gpus_per_task, args.warn_seconds) == \
        ("./cifar-10", "./cifar-100", "1", "300")


@pytest.mark.parametrize("argv, message", [
    (["--seeds", "x"], "--seeds needs at least one integer, e.g. --seeds 1 2 3"),
    (["--gpus", "-1"], "--gpus needs at least one GPU id, e.g. --gpus 0 1"),
    (["--out"], "--out needs a value"),
    (["--out=x"], "unknown option --out=x (Train_cifar.py options go after --)"),
    (["--bogus", "-h"], "unknown option --bogus"),
    (["--gpus_per_task", "1.5"], "--gpus_per_task 1.5 is not allowed: give an integer >= 0"),
    (["--warn_seconds", "-3"], "--warn_seconds -3 is not allowed: give an integer >= 0"),
    (["--", "--seed=3"], "--seed is the sweep's --seeds, one run folder per seed: give --seeds S ... before the "
                         "cells (e.g. --seeds 1 2 3), not --seed"),
    (["--seed", "3", "cifar10:sym:0.5"], "--seed is the sweep's --seeds"),
    (["--seed=3"], "--seed is the sweep's --seeds"),
    (["--", "--ood_path", "x"], "--ood_path is a sweep option: give it before the cells, not after --"),
    (["--seeds", "4294967296"], "--seeds 4294967296 is outside 0..4294967295: give integers in that range"),
    (["--", "--num_epochs", "+3"], "--num_epochs +3 is not allowed: give an integer >= 0 (the last epoch)"),
])
def test_argument_errors(argv, message):
    """Each usage error is a UserError with the shell version's words."""
    with pytest.raises(UserError) as info:
        sweep_py.parse_args(argv)
    assert str(info.value).startswith(message)


def test_help_is_the_usage_text_wherever_it_comes(capsys):
    """-h prints the usage and exits 0 where it stands: what follows it is not looked at."""
    with pytest.raises(SystemExit) as info:
        sweep_py.parse_args(["--seeds", "1", "-h", "--bogus"])
    assert info.value.code == 0 and capsys.readouterr().out == sweep_py.USAGE


def test_main_reports_a_usage_error_on_one_line(capsys):
    """main turns a UserError into one `error: ...` line and exit status 2."""
    assert sweep_py.main(["--dry-run", "cifar10:sym"]) == 2
    err = capsys.readouterr().err
    assert err == "error: cell 'cifar10:sym': sym noise needs its rate r: write cifar10:sym:r, e.g. cifar10:sym:0.4\n"


def test_cells_parse_into_their_names():
    """A cell's command-line text, run-directory stem and Train_cifar.py prefix."""
    cases = {"cifar10:sym:0.5": ("cifar10:sym:0.5", "cifar10_sym_0.5", "cifar10_0.5_sym"),
             "cifar10:sym:.50": ("cifar10:sym:0.5", "cifar10_sym_0.5", "cifar10_0.5_sym"),
             "cifar100:idn:0.45": ("cifar100:idn:0.45", "cifar100_idn_0.45", "cifar100_0.45_idn"),
             "cifar10:sym:0": ("cifar10:sym:0", "cifar10_sym_0", "cifar10_0.0_sym"),
             "cifar10:sym:0.1234567": ("cifar10:sym:0.1234567", "cifar10_sym_0.1234567", "cifar10_0.1234567_sym"),
             "cifar10:worst": ("cifar10:worst", "cifar10_worst", "cifar10_worst"),
             "cifar10:aggre:ood0.1": ("cifar10:aggre:ood0.1", "cifar10_aggre_ood0.1", "cifar10_aggre_ood0.1"),
             "cifar10:sym:0.2:ood0.25": ("cifar10:sym:0.2:ood0.25", "cifar10_sym_0.2_ood0.25",
                                         "cifar10_0.2_sym_ood0.25")}
    for text, names in cases.items():
        cell = sweep_py.parse_cell(text)
        assert (cell.text, cell.stem, cell.prefix) == names, text
    assert sweep_py.parse_cell("cifar100:noisy100") == sweep_py.Cell("cifar100", "noisy100", None, 0.0)
    for text in ("cifar10:sym:1.5", "cifar10:sym:x", "cifar10:sym:0.2:ood1", "cifar10:rand1:0.2", "cifar100:rand1",
                 "cifar10:idn", "svhn:sym:0.5", "cifar10:foo:0.5", "cifar10"):
        with pytest.raises(UserError, match=f"cell '{text}'"):
            sweep_py.parse_cell(text)


def plan_of(argv):
    """sweep.plan of a command line, as (run folder name, state, note, lambda_u, p_threshold, source) rows."""
    runs = sweep_py.plan(sweep_py.parse_args(argv))
    return [(os.path.basename(r.run_dir), r.state, r.note, r.lambda_u, r.p_threshold, r.source) for r in runs]


def test_plan_presets_and_table1(tmp_path):
    """Table 1 by default, in presets.PAPER_PRESETS order and with its values; other cells their own source."""
    rows = plan_of(["--out", str(tmp_path)])
    assert [row[0] for row in rows] == [f"{d}_{m}_{r:g}_seed123" for d, m, r in PAPER_PRESETS]
    assert [(row[3], row[4]) for row in rows] == [(str(v["lambda_u"]), str(v["p_threshold"]))
                                                  for v in PAPER_PRESETS.values()]
    assert {row[5] for row in rows} == {"paper preset"}
    rows = plan_of(["--out", str(tmp_path), "--ood_path", "o", "cifar10:worst", "cifar100:idn:0.4",
                    "cifar10:sym:0.9:ood0.2", "cifar10:sym:0.9:ood0.2", "--", "--p_threshold", "0.7"])
    assert [row[3:] for row in rows] == [("0", "0.7", "set after --"), ("25", "0.7", "set after --"),
                                         ("50", "0.7", "set after --")]  # the repeated cell is planned once
    assert [row[5] for row in plan_of(["cifar10:worst", "cifar100:idn:0.4"])] == \
        ["CIFAR-N preset (noisypy reproduction)", "original-code default, no paper preset"]
    with pytest.raises(UserError, match="asks for open-set noise: give --ood_path P"):
        plan_of(["cifar10:sym:0.9:ood0.2"])


def test_plan_run_states(tmp_path):
    """finished, resume (either checkpoint), restart up to rundirs.UNCHECKPOINTED_EPOCHS logged, blocked beyond."""
    root = tmp_path / "runs"
    write_run(root / "cifar10_sym_0.5_seed1", "cifar10", 0.5, "sym", 10, 10, checkpoint=True)
    write_run(root / "cifar10_sym_0.5_seed2", "cifar10", 0.5, "sym", 10, 6, checkpoint=True, cut_line=True)
    write_run(root / "cifar10_sym_0.5_seed3", "cifar10", 0.5, "sym", 10, UNCHECKPOINTED_EPOCHS - 1, checkpoint=False)
    write_run(root / "cifar10_sym_0.5_seed4", "cifar10", 0.5, "sym", 10, UNCHECKPOINTED_EPOCHS, checkpoint=False)
    write_run(root / "cifar10_sym_0.5_seed5", "cifar10", 0.5, "sym", 10, 3, checkpoint=False)
    prefix = root / "cifar10_sym_0.5_seed5" / "cifar10_0.5_sym"
    os.rename(f"{prefix}_log.jsonl", f"{prefix}_acc.txt")  # logs, yet no JSON epoch
    (root / "cifar10_sym_0.5_seed5" / "cifar10_0.5_sym_checkpoint_prev.pth.tar").write_bytes(b"x")
    rows = plan_of(["--out", str(root), "--seeds", "1", "2", "3", "4", "5", "6", "cifar10:sym:0.5"])
    assert [row[1:3] for row in rows] == [
        ("finished", "epoch 10/10"), ("resume", "epoch 6/10"),
        ("new", "restart (stopped before its first checkpoint)"),
        ("blocked", f"{root}/cifar10_sym_0.5_seed4 holds cifar10_0.5_sym logs of epochs up to {UNCHECKPOINTED_EPOCHS} "
                    "but no checkpoint, so Train_cifar.py would refuse it: remove that directory to start the run "
                    "again"),
        ("resume", "checkpoint"), ("new", "no output yet")]
    # --num_epochs after -- replaces the config's: the finished run is one to continue
    assert plan_of(["--out", str(root), "--seeds", "1", "cifar10:sym:0.5", "--", "--num_epochs=12"])[0][1:3] == \
        ("resume", "epoch 10/12")


def test_job_script_from_the_template(tmp_path, monkeypatch):
    """Every placeholder filled, optional #SBATCH lines only when asked for, and bash reads the result."""
    monkeypatch.setenv("PYTHON", "/opt/py 3/bin/python")
    monkeypatch.delenv("TRAIN_SCRIPT", raising=False)
    monkeypatch.chdir(tmp_path)
    args = sweep_py.parse_args(["--slurm", "--dry-run", "--seeds", "1", "2", "--out", "r", "--ood_path", "ood",
                                "cifar10:aggre:ood0.1", "--gpus_per_task", "0", "--", "--num_epochs", "5", "--note",
                                "a b"])
    runs = sweep_py.plan(args)
    text = sweep_py.job_script(args, runs)
    lines = text.splitlines()
    assert lines[:7] == ["#!/usr/bin/env bash", "#SBATCH --job-name=dividemix-sweep", "#SBATCH --array=0-1",
                         "#SBATCH --requeue", "#SBATCH --open-mode=append", "#SBATCH --signal=B:USR1@300",
                         f"#SBATCH --output={tmp_path}/r/slurm/%x_%A_%a.out"]
    assert lines[7].startswith("# Written by") and "@{" not in text and text.endswith('wait "$child"\n')
    assert "runs=( cifar10:aggre:ood0.1\\ 1\\ r/cifar10_aggre_ood0.1_seed1 cifar10:aggre:ood0.1\\ 2\\ " \
           "r/cifar10_aggre_ood0.1_seed2 )" in lines
    assert f"sweep=( {REPO}/scripts/sweep_cifar.sh --out {tmp_path}/r --cifar10_path {tmp_path}/./cifar-10 " \
           f"--cifar100_path {tmp_path}/./cifar-100 --ood_path {tmp_path}/ood )" in lines
    assert "train_args=( --num_epochs 5 --note a\\ b )" in lines and "export PYTHON=/opt/py\\ 3/bin/python" in lines
    assert not any(line.startswith(("#SBATCH --partition", "#SBATCH --time", "#SBATCH --gres", "export TRAIN_SCRIPT"))
                   for line in lines)
    monkeypatch.setenv("TRAIN_SCRIPT", "/t/fake.py")
    args = sweep_py.parse_args(["--slurm", "--dry-run", "--out", "/abs", "--partition", "gpu", "--time", "1:00:00",
                                "--gpus_per_task", "2", "--warn_seconds", "60", "cifar10:sym:0.5"])
    lines = sweep_py.job_script(args, sweep_py.plan(args)).splitlines()
    assert lines[5:11] == ["#SBATCH --signal=B:USR1@60", "#SBATCH --output=/abs/slurm/%x_%A_%a.out",
                           "#SBATCH --partition=gpu", "#SBATCH --time=1:00:00", "#SBATCH --gres=gpu:2",
                           lines[10]] and lines[10].startswith("# Written by")
    assert "export TRAIN_SCRIPT=/t/fake.py" in lines and "train_args=( )" in lines
    script = tmp_path / "job.sbatch"
    script.write_text(text)
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0


def test_bash_quote_is_printf_q():
    """Words are quoted as bash's printf %q quotes them, so printed lines are what the shell version printed."""
    words = ["plain/path-1.0_x", "", "a b", "it's", "~home", "a=~b", "x:~", "#c", "a#b", "$x`y`", "tab\there",
             "new\nline", "esc\x1b", "é", "a,b;c|d&e", "(x)[y]{z}<>!?*^", "back\\slash", '"q"', "%x_%A", "-"]
    proc = subprocess.run(["bash", "-c", 'printf "%q\\n" "$@"', "bash", *words], capture_output=True, text=True,
                          env=dict(os.environ, LC_ALL="C.UTF-8"))
    assert proc.stdout.splitlines() == [sweep_py.bash_quote(w) for w in words]


def pool_job(tmp_path, name, code, gpu="default"):
    """A sweep_py.Job running a Python snippet in the run folder tmp_path/name."""
    run_dir = str(tmp_path / name)
    argv = (sys.executable, "-c", code, run_dir)
    return sweep_py.Job(run_dir, argv, gpu, " ".join(argv))


def test_worker_pool_runs_each_slot_in_order(tmp_path, capsys):
    """Job i runs on slot i % slots with its GPU; output goes to train.log; failures are counted and named."""
    code = ("import os, sys, time\nprint('gpu', os.environ.get('CUDA_VISIBLE_DEVICES'))\n"
            "open(os.path.join(sys.argv[1], 'start'), 'w').write(repr(time.time()))\n"
            "time.sleep(0.3)\nsys.exit(3 if sys.argv[1].endswith('b') else 0)\n")
    jobs = [pool_job(tmp_path, name, code, gpu) for name, gpu in (("a", "7"), ("b", "8"), ("c", "7"))]
    assert sweep_py.WorkerPool(jobs, 2).run() == 1
    out, err = capsys.readouterr()
    assert re.search(f"^sweep: done {re.escape(str(tmp_path / 'a'))} \\([0-9]+ s, gpu 7\\)$", out, re.M)
    assert f"sweep: done {tmp_path / 'c'}" in out
    assert err == f"sweep: FAILED {tmp_path / 'b'} (exit 3, gpu 8): see {tmp_path / 'b'}/train.log\n"
    log = (tmp_path / "a" / "train.log").read_text()
    assert log.startswith("=== sweep ") and log.endswith(f": {jobs[0].shown}\ngpu 7\n")
    start = {name: float((tmp_path / name / "start").read_text()) for name in "abc"}
    assert start["c"] - start["a"] >= 0.3  # c waited for a on slot 0
    assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == set()  # the mask is given back


def test_a_stop_signal_reaches_the_runs_and_waits_for_them(tmp_path):
    """SIGTERM to the sweep: SIGTERM to each run going, which the sweep waits for (a 1 s checkpoint write); exit 130."""
    child = ("import os, signal, sys, time\n"
             "def stop(signum, frame):\n"
             "    time.sleep(1)\n"
             "    open(os.path.join(sys.argv[1], 'checkpoint'), 'w').write(signal.getsignal(signal.SIGINT).name)\n"
             "    sys.exit(143)\n"
             "signal.signal(signal.SIGTERM, stop)\n"
             "open(os.path.join(sys.argv[1], 'started'), 'w').close()\n"
             "time.sleep(60)\n")
    driver = ("import sys, sweep\n"
              "jobs = [sweep.Job(d, (sys.executable, '-c', sys.argv[1], d), 'default', '') for d in sys.argv[2:]]\n"
              "try:\n    sweep.WorkerPool(jobs, 2).run()\nexcept sweep.Stopped:\n    sys.exit(130)\n")
    dirs = [tmp_path / "a", tmp_path / "b", tmp_path / "c"]
    proc = subprocess.Popen([sys.executable, "-c", driver, child, *map(str, dirs)], cwd=REPO, text=True,
                            env=dict(os.environ, PYTHONPATH=REPO), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    t0 = time.time()
    while not all((d / "started").exists() for d in dirs[:2]):
        assert time.time() - t0 < 60 and proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and err == "sweep: stopping the workers\n", err
    # both runs wrote their checkpoint before the sweep left; they had ignored SIGINT, as bash background jobs do
    assert [(d / "checkpoint").read_text() for d in dirs[:2]] == ["SIG_IGN", "SIG_IGN"]
    assert not dirs[2].exists()  # the third run never started


# ----------------------------------------------------------------------------- the interpreter and its checks

def test_interpreter_is_python_env_else_the_venv_else_python3(tmp_path, monkeypatch):
    """$PYTHON wins; without it the repository's .venv/bin/python when there is one; else python3."""
    monkeypatch.setattr(sweep_py, "REPO", str(tmp_path))
    monkeypatch.setenv("PYTHON", "/opt/py/bin/python")
    assert sweep_py.python() == "/opt/py/bin/python"
    monkeypatch.delenv("PYTHON")
    assert sweep_py.python() == "python3"
    venv = tmp_path / ".venv" / "bin" / "python"
    venv.parent.mkdir(parents=True)
    venv.write_text("#!/bin/sh\n")
    venv.chmod(0o755)
    assert sweep_py.python() == str(venv)
    monkeypatch.setenv("PYTHON", "")  # empty: as if unset
    assert sweep_py.python() == str(venv)


def test_the_dry_run_and_the_job_script_name_the_interpreter(tmp_path, monkeypatch):
    """The commands printed (and run) and the job script's $PYTHON are python()."""
    monkeypatch.setenv("PYTHON", "/opt/venv/bin/python")
    monkeypatch.delenv("TRAIN_SCRIPT", raising=False)
    args = sweep_py.parse_args(["--slurm", "--dry-run", "--out", str(tmp_path), "cifar10:sym:0.5"])
    run, = sweep_py.plan(args)
    assert sweep_py.train_argv(run, args)[:2] == ["/opt/venv/bin/python", os.path.join(REPO, "Train_cifar.py")]
    assert "export PYTHON=/opt/venv/bin/python" in sweep_py.job_script(args, [run]).splitlines()


def python_without_torch(tmp_path):
    """An interpreter that cannot import torch: this Python with a torch package that fails to import first on
    its path."""
    stub = tmp_path / "stub" / "torch"
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'torch'\")\n")
    wrapper = tmp_path / "python-without-torch"
    wrapper.write_text(f"#!/bin/sh\nPYTHONPATH={stub.parent} exec {sys.executable} \"$@\"\n")
    wrapper.chmod(0o755)
    return str(wrapper)


def test_an_interpreter_without_torch_stops_the_sweep_before_planning(tmp_path, monkeypatch, capsys):
    """One line naming the interpreter and both fixes; nothing planned or printed."""
    monkeypatch.setenv("PYTHON", python_without_torch(tmp_path))
    assert sweep_py.main(["--dry-run", "--out", str(tmp_path / "runs"), "cifar10:sym:0.5"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1
    assert err.startswith(f"error: {tmp_path / 'python-without-torch'} cannot import torch (ModuleNotFoundError")
    assert "python3 -m venv .venv && .venv/bin/pip install -r requirements.txt" in err
    assert "or set PYTHON=/path/to/python" in err
    monkeypatch.setenv("PYTHON", str(tmp_path / "no-such-python"))
    assert sweep_py.main(["--dry-run", "cifar10:sym:0.5"]) == 2
    assert "cannot be run (No such file or directory)" in capsys.readouterr().err


@pytest.mark.parametrize("train_args, message", [
    (["--num-epochs", "5"], "unrecognized arguments: --num-epochs 5 (write its flags in full"),
    (["--num_ep", "5"], "unrecognized arguments: --num_ep 5"),  # Train_cifar.py would take it as --num_epochs
    (["--see", "5"], "unrecognized arguments: --see 5"),  # ... and this as --seed, behind the sweep's back
    (["--lr", "-1"], "--lr -1.0 is not allowed: give a number > 0"),
    (["--batch_size", "x"], "argument --batch_size: invalid int value: 'x'"),
])
def test_arguments_after_the_dashes_are_checked_by_train_cifar(tmp_path, monkeypatch, capsys, train_args, message):
    """A flag Train_cifar.py would refuse stops the sweep with one line before any run starts."""
    monkeypatch.setenv("PYTHON", sys.executable)
    root = tmp_path / "runs"
    assert sweep_py.main(["--out", str(root), "cifar10:sym:0.5", "--"] + train_args) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and not root.exists()
    assert err.startswith("error: the arguments after -- do not fit Train_cifar.py: ") and message in err, err


def fake_sbatch(bin_dir, body):
    """An sbatch stand-in running the given shell body."""
    bin_dir.mkdir(exist_ok=True)
    path = bin_dir / "sbatch"
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)


@pytest.mark.parametrize("reason, gpu_hint", [
    ("sbatch: error: Invalid generic resource (gres) specification", True),
    ("sbatch: error: Batch job submission failed: Invalid account or account/partition combination specified",
     False),
])
def test_a_refused_submission_says_why(tmp_path, monkeypatch, capsys, reason, gpu_hint):
    """sbatch's own reason on the error line, and --gpus_per_task 0 where the GPU request is what it refused."""
    fake_sbatch(tmp_path / "bin", f"echo '{reason}' >&2\nexit 1")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("PYTHON", sys.executable)
    root = tmp_path / "runs"
    assert sweep_py.main(["--slurm", "--out", str(root), "cifar10:sym:0.5"]) == 1
    err = capsys.readouterr().err
    script, = (root / "slurm").iterdir()
    assert err.count("\n") == 1 and err.startswith(f"error: sbatch refused {script}: {reason[len('sbatch: error: '):]}")
    assert ("pass --gpus_per_task 0" in err) == gpu_hint
    assert err.rstrip().endswith("(docs/errors.md, SLURM)")
