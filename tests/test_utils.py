"""Checkpoint writing, log truncation, argument checks and the error wrapper."""
import hashlib
import os
import subprocess
import sys

import pytest
import torch

from checkpointing import CheckpointWriter, atomic_save, check_resume_args, load_checkpoint
from cli import UserError
from run_folder import RunLogs


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
