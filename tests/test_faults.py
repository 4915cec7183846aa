"""Faults on CPU and tiny data: kill -9 inside checkpoint writes, signals, two starts, foreign, older, damaged and
copied checkpoints, logs that do not match, other noisy labels, unusable folders and full disks. After each, the
run either refuses with one line and changes nothing, or continues to the same logs and weights as a run that
was never disturbed."""
import fcntl
import json
import os
import pathlib
import shlex
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from checkpointing import verify_checkpoint
from cifar_files import read_cifar
from fake_cifar import write_fake_cifar
from fake_realworld import write_fake_clothing1m
from noise import inject_noise
from runs import CIFAR_FAST as FAST, LARGE_ON_DISK, PREFIX, assert_same_run as same_run, script_command

pytestmark = pytest.mark.slow  # every test here starts training processes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOGS = (PREFIX + "_acc.txt", PREFIX + "_stats.txt", PREFIX + "_log.jsonl")
CKPT = PREFIX + "_checkpoint.pth.tar"
PREV = PREFIX + "_checkpoint_prev.pth.tar"
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def command(data, out, epochs, *extra, fault=None, prestarted=True):
    """The Train_cifar.py command line (through the fault launcher when a fault is given; a test that needs the
    run's own pid, or kills it with SIGKILL, starts it without tests/prestarted.py)."""
    script = ["tests/fault_launch.py", os.path.join(ROOT, "Train_cifar.py")] if fault else ["Train_cifar.py"]
    return script_command(*script, "--data_path", data, "--output_dir", out, "--num_epochs", epochs, *FAST, *extra,
                          prestarted=prestarted)


def train(data, out, epochs, *extra, fault=None, code=0):
    """Run Train_cifar.py to its end; check the exit code; return the completed process."""
    env = {**ENV, "FAULT": fault} if fault else ENV
    proc = subprocess.run(command(data, out, epochs, *extra, fault=fault), cwd=ROOT, capture_output=True, text=True,
                          env=env)
    assert proc.returncode == code, proc.stdout[-2000:] + proc.stderr[-3000:]
    if code:
        assert "Traceback" not in proc.stderr
    return proc


def one_line(proc):
    """The single stderr line of a refused or stopped run."""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


def records(out):
    """The JSON log without its timing fields."""
    lines = open(os.path.join(out, PREFIX + "_log.jsonl")).read().splitlines()
    result = [json.loads(line) for line in lines]
    for rec in result:
        rec.pop("seconds"), rec.pop("time")
    return result


def assert_same_run(out, reference):
    """The run equals the undisturbed one (runs.assert_same_run); nothing temporary or NUL left behind."""
    for name in LOGS[:2]:
        assert b"\0" not in open(os.path.join(out, name), "rb").read(), name
    same_run(reference, out)
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]


def snapshot(folder):
    """{file name: bytes} of the files of a folder (checkpoints by size and mtime; the lock's pid aside)."""
    result = {}
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if not os.path.isfile(path) or name.endswith(".lock"):
            continue
        stat = os.stat(path)
        result[name] = (stat.st_size, stat.st_mtime_ns) if name.endswith(".pth.tar") else open(path, "rb").read()
    return result


def clone(src, dst, copy_checkpoints=False):
    """A copy of a run folder (its losses folder too); checkpoints are hard links unless they are to be damaged."""
    os.makedirs(dst)
    for name in os.listdir(src):
        path = os.path.join(src, name)
        if os.path.isdir(path):
            shutil.copytree(path, os.path.join(dst, name))
        elif os.path.isfile(path):
            if name.endswith(".pth.tar") and not copy_checkpoints:
                os.link(path, os.path.join(dst, name))
            else:
                shutil.copy2(path, os.path.join(dst, name))
    return dst


def wait_for(predicate, proc, timeout=240):
    """Poll until predicate() holds (the process must still be running)."""
    t0 = time.time()
    while not predicate():
        assert proc.poll() is None, proc.communicate()
        assert time.time() - t0 < timeout
        time.sleep(0.01)


def temp_files(out):
    """This run's temporary checkpoint files in out."""
    return [f for f in os.listdir(out) if f.startswith("." + CKPT) and f.endswith(".tmp")]


@pytest.fixture
def data(tiny_data):
    """The session's tiny CIFAR-10."""
    return pathlib.Path(tiny_data("cifar"))


@pytest.fixture
def straight(undisturbed):
    """The session's undisturbed run of epochs 0..2 (epoch 0 warm-up, 1 and 2 co-divide); copy it before writing."""
    return pathlib.Path(undisturbed("cifar")[0])


# ---- 1. logs and checkpoint are one unit -------------------------------------------------------------------

def test_resume_refuses_missing_shorter_or_other_logs_and_changes_nothing(straight, data, tmp_path):
    out = clone(straight, tmp_path / "run")
    os.remove(out / LOGS[1])
    before = snapshot(out)
    assert "_stats.txt is missing" in one_line(train(data, out, 3, "--resume", code=2))
    shutil.copy2(straight / LOGS[1], out / LOGS[1])
    with open(out / LOGS[0], "r+b") as f:
        f.truncate(os.path.getsize(out / LOGS[0]) - 5)
    before = snapshot(out)
    line = one_line(train(data, out, 3, "--resume", code=2))
    assert "_acc.txt holds" in line and "fewer than" in line and "nothing was changed" in line
    assert snapshot(out) == before
    shutil.copy2(straight / LOGS[0], out / LOGS[0])
    text = (out / LOGS[2]).read_bytes()
    (out / LOGS[2]).write_bytes(text.replace(b'"phase": "warmup"', b'"phase": "wrmupp"'))
    before = snapshot(out)
    assert "does not begin with" in one_line(train(data, out, 3, "--resume", code=2))
    assert snapshot(out) == before


def test_foreign_checkpoint_continues_in_a_new_folder_with_its_logs(straight, data, tmp_path):
    source = clone(straight, tmp_path / "source")
    before = snapshot(source)
    out = tmp_path / "fork"
    proc = train(data, out, 2, "--resume", source / PREV)  # the epoch-1 checkpoint, continued elsewhere
    assert "its checkpoint, its logs up to that epoch and its config.json were copied" in proc.stdout
    assert (out / (PREFIX + "_config.json")).read_bytes() == (source / (PREFIX + "_config.json")).read_bytes()
    assert_same_run(out, straight)
    assert snapshot(source) == before
    # into a folder that holds a run of its own: refused
    line = one_line(train(data, out, 2, "--resume", source / PREV, code=2))
    assert "already holds a cifar10_0.5_sym run of its own" in line


def test_an_older_checkpoint_does_not_cut_a_longer_run(straight, data, tmp_path):
    out = clone(straight, tmp_path / "run")
    before = snapshot(out)
    line = one_line(train(data, out, 2, "--resume", out / PREV, code=2))
    assert "(epoch 1) would cut the run" in line and "at epoch 2" in line
    assert snapshot(out) == before


# ---- 2. one process per run folder ---------------------------------------------------------------------------

def test_a_second_start_is_refused_while_the_first_runs(data, tmp_path):
    out = tmp_path / "run"
    # the first run lingers in its checkpoint write, so it still holds the lock when the second one starts
    first = subprocess.Popen(command(data, out, 0, fault="slow:1:5", prestarted=False),
                             cwd=ROOT, env={**ENV, "FAULT": "slow:1:5"},
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lock = out / f".{PREFIX}.lock"
    wait_for(lambda: lock.exists() and lock.read_text().strip() == str(first.pid), first)
    line = one_line(train(data, out, 0, code=2))
    assert f"another process (pid {first.pid}) is running {PREFIX}" in line
    assert first.wait() == 0
    assert [r["epoch"] for r in records(out)] == [0]  # one writer: every line parses


def test_a_lock_left_by_a_dead_process_does_not_block(data, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / f".{PREFIX}.lock").write_text("999999\n")
    with open(out / f".{PREFIX}.lock") as held:  # and a lock held by someone else does block
        fcntl.flock(held, fcntl.LOCK_EX)
        assert "another process (pid 999999)" in one_line(train(data, out, 0, code=2))
    train(data, out, 0)


# ---- 3. kill -9 inside a checkpoint write --------------------------------------------------------------------

def test_kill_during_the_first_checkpoint_write_then_the_same_command(straight, data, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(command(data, out, 1, fault="slow:1:60", prestarted=False),
                            cwd=ROOT, env={**ENV, "FAULT": "slow:1:60"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: out.exists() and temp_files(out), proc)
    proc.kill()
    proc.wait()
    assert temp_files(out) and not (out / CKPT).exists() and (out / LOGS[0]).stat().st_size > 0
    started = train(data, out, 1)  # the same command, no --resume
    assert "removed 1 temporary file(s)" in started.stdout and "starting it again" in started.stdout
    assert (out / LOGS[0]).read_text() == "".join((straight / LOGS[0]).read_text().splitlines(True)[:2])
    assert not temp_files(out)


def test_kill_during_a_later_checkpoint_write_then_resume(straight, data, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(command(data, out, 2, fault="slow:2:60", prestarted=False),
                            cwd=ROOT, env={**ENV, "FAULT": "slow:2:60"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: (out / CKPT).exists() and temp_files(out), proc)
    proc.kill()
    proc.wait()
    assert verify_checkpoint(str(out / CKPT)) is None
    proc = train(data, out, 2, "--resume")
    assert "removed 1 temporary file(s)" in proc.stdout
    assert_same_run(out, straight)


# ---- 4. checkpoint integrity ---------------------------------------------------------------------------------

def test_a_damaged_checkpoint_names_the_fallback_which_continues(straight, data, tmp_path):
    out = clone(straight, tmp_path / "run", copy_checkpoints=True)
    size = (out / CKPT).stat().st_size
    with open(out / CKPT, "r+b") as f:
        f.seek(size // 2)
        f.write(np.random.default_rng(0).bytes(4096))
    assert "fails its CRC-32 check" in verify_checkpoint(str(out / CKPT))
    before = snapshot(out)
    line = one_line(train(data, out, 2, "--resume", code=2))
    assert f"checkpoint {out / CKPT} is damaged" in line and f"--resume {out / PREV}" in line and "(epoch 1)" in line
    assert snapshot(out) == before
    train(data, out, 2, "--resume", out / PREV)
    assert_same_run(out, straight)
    assert torch.load(out / PREV, weights_only=False)["epoch"] == 1  # the damaged file did not become the previous


# ---- 5. the noisy labels define a run ------------------------------------------------------------------------

def test_resume_with_other_noisy_labels_is_refused(straight, data, tmp_path):
    out = clone(straight, tmp_path / "run")
    clean = read_cifar(str(data), "cifar10")[1]  # the data's own clean training labels
    other = tmp_path / "other.json"
    other.write_text(json.dumps(inject_noise(clean, 0.5, "sym", 10, seed=7)))
    before = snapshot(out)
    line = one_line(train(data, out, 3, "--resume", "--noise_file", other, code=2))
    assert f"training labels from noise file {other} differ" in line
    assert snapshot(out) == before


# ---- 6. unusable folders and full disks ----------------------------------------------------------------------

def test_unusable_output_folders_are_refused_before_anything_is_written(tmp_path):
    data = tmp_path / "data"
    write_fake_cifar(str(data), "cifar10", n_train=16, n_test=8)
    (tmp_path / "afile").write_text("x")
    for out in (tmp_path / "afile", tmp_path / "afile" / "below"):
        line = one_line(train(data, out, 0, code=2))
        assert f"--output_dir {out} is not usable" in line
    assert sorted(os.listdir(data)) == ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4",
                                        "data_batch_5", "test_batch"]  # no noise file written


def test_an_injected_full_disk_stops_at_once_and_resume_continues(straight, data, tmp_path):
    out = tmp_path / "run"
    proc = train(data, out, 2, fault="enospc:2", code=2)  # the checkpoint of epoch 1 cannot be written
    line = one_line(proc)
    assert f"cannot write {out / CKPT}" in line and "No space left on device" in line
    assert "the checkpoint of epoch 0" in line and line.endswith("--resume")
    assert "epoch   2" not in proc.stdout  # stopped during epoch 2, not after it
    assert verify_checkpoint(str(out / CKPT)) is None and not temp_files(out)
    train(data, out, 2, "--resume")
    assert_same_run(out, straight)


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 4 MB tmpfs: room for one 2.9 MB checkpoint of the tiny run, not for two (skipped where mount is not
    allowed)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)],
                      capture_output=True).returncode:
        pytest.skip("mount -t tmpfs is not allowed here")
    yield mount
    subprocess.run(["umount", "-l", str(mount)])


def test_a_real_full_disk_then_more_space(straight, data, small_tmpfs):
    out = small_tmpfs / "run"
    line = one_line(train(data, out, 2, code=2))
    assert "No space left on device" in line and "the checkpoint of epoch 0" in line
    assert verify_checkpoint(str(out / CKPT)) is None and not temp_files(out)
    subprocess.run(["mount", "-o", "remount,size=16m", str(small_tmpfs)], check=True)
    train(data, out, 2, "--resume")
    assert_same_run(out, straight)


def test_a_read_only_folder_is_refused(data, small_tmpfs):
    subprocess.run(["mount", "-o", "remount,ro", str(small_tmpfs)], check=True)
    line = one_line(train(data, small_tmpfs / "run", 0, code=2))
    assert "is not usable (Read-only file system)" in line


# ---- 7. signals ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("signum,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_stops_cleanly_and_resume_continues(straight, data, tmp_path, signum, code):
    out = tmp_path / "run"
    proc = subprocess.Popen(command(data, out, 2), cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("epoch   1"):  # by now the checkpoint of epoch 0 is being written or on disk
            break
    proc.send_signal(signum)
    _, err = proc.communicate()
    assert proc.returncode == code, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err
    assert lines[0].startswith(f"stopped by {signal.Signals(signum).name}: the checkpoint of epoch ")
    # the command to copy names the interpreter that ran (here this test's, as command() starts it)
    assert f"continue with: {shlex.quote(sys.executable)} " in lines[0] and lines[0].endswith("--resume")
    assert not temp_files(out)
    if signum == signal.SIGTERM:  # what follows is the same for both signals
        train(data, out, 2, "--resume")
        assert_same_run(out, straight)


# ---- 11. file modes ------------------------------------------------------------------------------------------

def test_checkpoints_get_the_mode_of_the_logs_and_stale_temps_go(straight, data, tmp_path):
    assert (straight / CKPT).stat().st_mode & 0o777 == (straight / LOGS[0]).stat().st_mode & 0o777
    out = tmp_path / "run"
    out.mkdir()
    ours, theirs = out / f".{CKPT}.0123456789ab.tmp", out / ".cifar10_0.2_sym_checkpoint.pth.tar.0123456789ab.tmp"
    ours.write_bytes(b"x")
    theirs.write_bytes(b"x")
    train(data, out, 0)
    assert not ours.exists() and theirs.exists()


# ---- the same mechanisms in the real-world scripts -----------------------------------------------------------

@pytest.mark.parametrize("script,prefix", [("Train_cifar.py", PREFIX), ("Train_clothing1M.py", "clothing1m"),
                                           ("Train_webvision.py", "webvision")])
def test_every_script_checks_its_folder_and_lock_before_reading_data(script, prefix, tmp_path):
    (tmp_path / "afile").write_text("x")
    cmd = script_command(script, "--data_path", tmp_path / "nowhere")
    proc = subprocess.run(cmd + ["--output_dir", str(tmp_path / "afile")], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and "is not usable" in one_line(proc)
    out = tmp_path / "run"
    out.mkdir()
    with open(out / f".{prefix}.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        proc = subprocess.run(cmd + ["--output_dir", str(out)], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and f"is running {prefix} in {out}" in one_line(proc)


@LARGE_ON_DISK
def test_sigterm_with_loader_workers_is_one_line_and_resume_continues(tmp_path):
    data = tmp_path / "clothing"
    write_fake_clothing1m(str(data))
    out = tmp_path / "out"
    cmd = script_command("Train_clothing1M.py", "--data_path", data, "--output_dir", out, "--pretrained", "none",
                         "--batch_size", 4, "--num_batches", 2, "--image_size", 48, "--num_workers", 2,
                         "--num_epochs", 1)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("warm-up"):  # inside the warm-up epoch, its loader's workers running
            break
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate()
    assert proc.returncode == 143 and "Traceback" not in err, err
    assert one_line(subprocess.CompletedProcess(cmd, 143, "", err)).startswith("stopped by SIGTERM: no epoch")
    proc = subprocess.run(cmd + ["--resume"], cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [json.loads(x).get("epoch") for x in open(out / "clothing1m_log.jsonl")] == [0, 1, None]
    # continued in another folder, the run takes its best-validation weights along and ends the same; it starts from
    # the fallback checkpoint, so the newer one goes (one ResNet-50 checkpoint less on disk)
    (out / "clothing1m_checkpoint.pth.tar").unlink()
    fork = tmp_path / "fork"
    forked = [a if a != str(out) else str(fork) for a in cmd]
    forked += ["--resume", str(out / "clothing1m_checkpoint_prev.pth.tar")]
    proc = subprocess.run(forked, cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "config.json, net1.pth.tar, net2.pth.tar were copied" in proc.stdout
    assert (fork / "clothing1m.txt").read_text() == (out / "clothing1m.txt").read_text()


def test_loader_workers_keep_quiet_about_a_connection_the_stopped_main_process_broke():
    code = ("import threading\n"
            "from imagelist import quiet_worker_threads\n"
            "quiet_worker_threads(0)\n"
            "def fail(exc):\n    raise exc\n"
            "for exc in (ConnectionResetError('peer gone'), EOFError(), ValueError('a real error')):\n"
            "    thread = threading.Thread(target=fail, args=(exc,))\n    thread.start()\n    thread.join()\n"
            # multiprocessing's resource sharer thread reports through sys.excepthook itself
            "import sys\n"
            "for exc in (BrokenPipeError('peer gone'), KeyError('another real error')):\n"
            "    try:\n        fail(exc)\n    except BaseException:\n        sys.excepthook(*sys.exc_info())\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.stderr.count("Traceback") == 2, proc.stderr
    assert "ValueError: a real error" in proc.stderr and "KeyError: 'another real error'" in proc.stderr
