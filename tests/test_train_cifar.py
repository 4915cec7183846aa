"""Train_cifar.py end to end as a subprocess on a few dozen fake images: outputs, resume details, bad input (resume
identity itself: test_resume.py)."""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from fake_cifar import write_fake_cifar
from runs import CIFAR_FAST as FAST, PREFIX, run_script

pytestmark = pytest.mark.slow  # every test here starts training processes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_train(*args, check=True):
    """Run Train_cifar.py with args; return the completed process."""
    return run_script("Train_cifar.py", *args, check=check)


@pytest.fixture
def data_dir(tiny_data):
    """The session's tiny CIFAR-10 (64 training, 20 test images)."""
    return tiny_data("cifar")


@pytest.fixture
def straight_run(undisturbed):
    """The session's undisturbed run of epochs 0..2: (folder, process)."""
    return undisturbed("cifar")


def test_outputs_of_a_run(straight_run, data_dir):
    out, proc = straight_run
    acc = open(os.path.join(out, PREFIX + "_acc.txt")).read().splitlines()
    assert len(acc) == 3 and all(re.fullmatch(r"Epoch:\d+   Accuracy:\d+\.\d\d", line) for line in acc)
    stats = open(os.path.join(out, PREFIX + "_stats.txt")).read().splitlines()
    assert len(stats) == 4  # two divisions per co-divide epoch (epochs 1 and 2)
    assert all(re.fullmatch(r"Numer of labeled samples:\d+   AUC:\d\.\d{3}", line) for line in stats)
    records = [json.loads(line) for line in open(os.path.join(out, PREFIX + "_log.jsonl"))]
    assert [r["epoch"] for r in records] == [0, 1, 2]
    assert [r["phase"] for r in records] == ["warmup", "train", "train"]
    for key in ("labeled", "auc", "precision", "recall", "Lx", "Lu", "lambda", "iterations"):
        assert key in records[1]["net1"] and key in records[2]["net2"]
    assert records[1]["net1"]["labeled"] + records[1]["net1"]["unlabeled"] == 64
    # the stats file lists net2's division first: it is the one net1 trains on
    assert stats[0].startswith("Numer of labeled samples:%d " % records[1]["net2"]["labeled"])
    assert records[2]["test_acc"] == pytest.approx(float(acc[2].split(":")[-1]), abs=0.006)
    config = json.load(open(os.path.join(out, PREFIX + "_config.json")))
    assert config["args"]["lambda_u"] == 25 and config["sources"]["lambda_u"] == "paper preset"
    assert config["num_train"] == 64
    snap = np.load(os.path.join(out, PREFIX + "_losses", "epoch_002.npz"))
    assert snap["loss1"].shape == (64,) and snap["clean"].dtype == bool and snap["gmm2_means"].shape == (2,)
    assert "settings: lambda_u=25.0 (paper preset), p_threshold=0.5 (paper preset)" in proc.stdout
    assert os.path.exists(os.path.join(data_dir, "0.5_sym.json"))


def test_resume_cuts_log_lines_written_after_the_checkpoint(straight_run, data_dir, tmp_path):
    out = str(tmp_path)
    run_train("--data_path", data_dir, "--output_dir", out, "--num_epochs", 0, *FAST)
    with open(os.path.join(out, PREFIX + "_acc.txt"), "a") as f:
        f.write("Epoch:1   Accuracy:99.99\n")  # a run killed after logging but before its checkpoint
    run_train("--data_path", data_dir, "--output_dir", out, "--num_epochs", 1, "--resume", *FAST)
    acc = open(os.path.join(out, PREFIX + "_acc.txt")).read()
    assert "99.99" not in acc and acc == "".join(open(os.path.join(straight_run[0], PREFIX + "_acc.txt"))
                                                 .readlines()[:2])


def test_zero_noise_runs_to_the_end(tmp_path):
    data = tmp_path / "data"
    write_fake_cifar(str(data), "cifar10", n_train=40, n_test=10)
    proc = run_train("--data_path", data, "--output_dir", tmp_path / "out", "--r", 0, "--num_epochs", 2, *FAST)
    records = [json.loads(x) for x in open(tmp_path / "out" / "cifar10_0.0_sym_log.jsonl")]
    assert [r["epoch"] for r in records] == [0, 1, 2]
    assert records[1]["net1"]["auc"] is None  # every label is clean: AUC undefined, logged as null
    assert "lambda_u=25.0 (original-code default" in proc.stdout


def _error(proc):
    assert proc.returncode == 2, proc.stdout[-1000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    return lines[0]


@pytest.mark.parametrize("args,message", [
    (["--r", "1.5"], "--r 1.5 is outside [0, 1]"),
    (["--noise_mode", "pairflip"], "unknown --noise_mode 'pairflip'"),
    (["--dataset", "svhn"], "unknown --dataset 'svhn'"),
])
def test_bad_settings(tmp_path, args, message):
    assert message in _error(run_train("--output_dir", tmp_path, *args, check=False))
    assert not os.listdir(tmp_path)


def test_missing_data(tmp_path):
    line = _error(run_train("--data_path", tmp_path / "nowhere", "--output_dir", tmp_path / "o", check=False))
    assert "lacks data_batch_1, data_batch_2" in line and "--download" in line


def test_a_refused_start_leaves_nothing_behind(tmp_path):
    """A fresh --output_dir (and its parents) is gone again after a refusal; an existing one keeps its contents."""
    fresh = tmp_path / "new" / "out"
    line = _error(run_train("--data_path", tmp_path / "nowhere", "--output_dir", fresh, check=False))
    assert "lacks data_batch_1" in line and not (tmp_path / "new").exists()
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "notes.txt").write_text("mine")
    line = _error(run_train("--data_path", tmp_path / "nowhere", "--output_dir", existing, check=False))
    assert "lacks data_batch_1" in line and os.listdir(existing) == ["notes.txt"]
    assert (existing / "notes.txt").read_text() == "mine"


def test_truncated_data(tmp_path):
    write_fake_cifar(str(tmp_path), "cifar10", n_train=20, n_test=10)
    (tmp_path / "test_batch").write_bytes((tmp_path / "test_batch").read_bytes()[:100])
    line = _error(run_train("--data_path", tmp_path, "--output_dir", tmp_path / "o", check=False))
    assert "test_batch is truncated or corrupt" in line


def test_bad_noise_files(tmp_path):
    write_fake_cifar(str(tmp_path), "cifar10", n_train=20, n_test=10)
    noise = tmp_path / "0.5_sym.json"
    noise.write_text(json.dumps([1] * 19))
    line = _error(run_train("--data_path", tmp_path, "--output_dir", tmp_path / "o", check=False))
    assert "has 19 labels but the training set has 20" in line
    noise.write_text(json.dumps([1] * 19 + [10]))
    line = _error(run_train("--data_path", tmp_path, "--output_dir", tmp_path / "o", check=False))
    assert "outside 0..9" in line
    assert json.loads(noise.read_text())[-1] == 10


def test_resume_with_other_args_and_rerun_without_resume(straight_run, data_dir):
    out, _ = straight_run
    before = open(os.path.join(out, PREFIX + "_acc.txt")).read()
    line = _error(run_train("--data_path", data_dir, "--output_dir", out, "--resume", *FAST, "--seed", 7,
                            check=False))
    assert "--seed 123" in line and "7" in line
    line = _error(run_train("--data_path", data_dir, "--output_dir", out, *FAST, check=False))
    assert "already holds a cifar10_0.5_sym run" in line and "--resume" in line
    assert open(os.path.join(out, PREFIX + "_acc.txt")).read() == before


def test_importing_does_not_train():
    proc = subprocess.run([sys.executable, "-c", "import Train_cifar; print('ok')"], cwd=ROOT, capture_output=True,
                          text=True)
    assert proc.stdout.strip() == "ok"


def test_a_run_that_died_before_logging_starts_again(data_dir, tmp_path):
    for suffix in ("_acc.txt", "_stats.txt", "_log.jsonl"):
        (tmp_path / (PREFIX + suffix)).write_text("")
    run_train("--data_path", data_dir, "--output_dir", tmp_path, "--num_epochs", 0, *FAST)
    assert (tmp_path / (PREFIX + "_acc.txt")).read_text().startswith("Epoch:0   Accuracy:")
