"""Checkpoint writing, log truncation, argument checks and the error wrapper."""
import hashlib
import os
import shlex
import subprocess
import sys

import pytest
import torch

from checkpointing import CheckpointWriter, atomic_save, check_resume_args, load_checkpoint
from cli import UserError
from run_folder import RunDir, RunLogs


def test_checkpoint_writer_snapshots_before_training_goes_on(tmp_path):
    weights = torch.zeros(1000)
    writer = CheckpointWriter()
    writer.save({"w": weights, "nested": [weights]}, str(tmp_path / "ck.pt"))
    weights += 1  # training continues while the file is written
    writer.close()
    saved = load_checkpoint(str(tmp_path / "ck.pt"))
    assert torch.equal(saved["w"], torch.zeros(1000)) and torch.equal(saved["nested"][0], torch.zeros(1000))
    assert [f for f in os.listdir(tmp_path) if f.endswith(".tmp")] == []


def test_atomic_save_keeps_the_old_file_on_failure(tmp_path):
    path = str(tmp_path / "ck.pt")
    atomic_save({"epoch": 1}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        atomic_save({"epoch": 2, "bad": Unpicklable()}, path)
    assert load_checkpoint(path)["epoch"] == 1
    assert os.listdir(tmp_path) == ["ck.pt"]


def test_unreadable_checkpoint_is_a_user_error(tmp_path):
    path = tmp_path / "ck.pt"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="cannot read checkpoint"):
        load_checkpoint(str(path))


def test_run_logs_resume_cuts_back(tmp_path):
    logs = RunLogs({"a": str(tmp_path / "a.txt")})
    logs.start()
    logs.write("a", "one\n")
    state = logs.state()
    logs.write("a", "two\n")
    logs.close()
    assert state["a"] == {"name": "a.txt", "size": 4, "sha256": hashlib.sha256(b"one\n").hexdigest()}
    logs.resume(state)
    logs.write("a", "three\n")
    assert logs.state()["a"]["sha256"] == hashlib.sha256(b"one\nthree\n").hexdigest()
    logs.close()
    assert (tmp_path / "a.txt").read_text() == "one\nthree\n"


def test_check_resume_args():
    check_resume_args({"seed": 1, "r": 0.5}, {"seed": 1, "r": 0.5}, ("seed", "r"))
    with pytest.raises(UserError, match="--r 0.5.*0.8"):
        check_resume_args({"seed": 1, "r": 0.5}, {"seed": 1, "r": 0.8}, ("seed", "r"))


def test_run_main_exit_code_and_one_line():
    code = ("import cli\n"
            "def main(a):\n    raise cli.UserError('bad thing: do this')\n"
            "cli.run_main(main, None)\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr == "error: bad thing: do this\n"


def test_errors_and_run_main_come_from_the_torch_free_cli_module():
    """cli defines the error classes and utils does not re-export them: they are imported from cli."""
    import cli
    import utils
    assert not any(hasattr(utils, name) for name in ("UserError", "Interrupted", "ReportedOnRankZero", "run_main"))
    assert issubclass(cli.ReportedOnRankZero, cli.UserError)


def test_run_main_still_ends_the_process_group(tmp_path):
    """With torch.distributed loaded and a group up, run_main destroys the group when main returns."""
    code = ("import torch.distributed as dist\nimport cli\n"
            f"dist.init_process_group('gloo', init_method='file://{tmp_path / 'rdzv'}', rank=0, world_size=1)\n"
            "cli.run_main(lambda args: 0, None)\nprint(dist.is_initialized())\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout == "False\n", proc.stderr


def run_dir(folder):
    """A RunDir of a run named p in folder."""
    return RunDir(str(folder), "p", {"json": "p_log.jsonl"})


def test_a_refusal_before_anything_is_written_leaves_nothing_behind(tmp_path):
    """The folders and the lock file a start created go again on a UserError; what was there before stays."""
    fresh = tmp_path / "a" / "b"
    with pytest.raises(UserError), run_dir(fresh):
        assert (fresh / ".p.lock").exists()
        raise UserError("refused")
    assert os.listdir(tmp_path) == []
    existing = tmp_path / "old"
    existing.mkdir()
    (existing / ".p.lock").write_text("1\n")  # a lock file a finished run left: not this start's to remove
    (existing / "notes.txt").write_text("mine")
    with pytest.raises(UserError), run_dir(existing):
        raise UserError("refused")
    assert sorted(os.listdir(existing)) == [".p.lock", "notes.txt"]
    # once the run has begun writing, a later error keeps its folder and files
    with pytest.raises(UserError), run_dir(fresh) as run:
        run.begin({"args": {}})
        raise UserError("refused later")
    assert sorted(os.listdir(fresh)) == [".p.lock", "p_config.json", "p_log.jsonl"]
    # other errors are no refusal: the folder stays for what they left
    with pytest.raises(RuntimeError), run_dir(tmp_path / "c"):
        raise RuntimeError("crash")
    assert os.listdir(tmp_path / "c") == [".p.lock"]


def test_the_resume_command_names_the_interpreter_or_torchrun(tmp_path, monkeypatch):
    """The command to copy starts as this process did: this interpreter, or torchrun under torchrun."""
    monkeypatch.setattr(sys, "argv", ["Train_cifar.py", "--output_dir", str(tmp_path)])
    for name in ("TORCHELASTIC_RUN_ID", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    expected = f"Train_cifar.py --output_dir {shlex.quote(str(tmp_path))} --resume"
    assert run_dir(tmp_path).resume_command() == f"{shlex.quote(sys.executable)} {expected}"
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
    assert run_dir(tmp_path).resume_command() == f"torchrun [its options as before] {expected}"
