"""scripts/sweep_cifar.sh --slurm against a real one-machine SLURM (scripts/slurm_local.sh): a 2-cell sweep as a job
array ends with the logs of the same runs made locally; a task requeued mid-run and a task warned of its time
limit stop cleanly, requeue and still end identical. Skipped, with the reason, where SLURM cannot run."""
import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from fake_cifar import write_fake_cifar

pytestmark = pytest.mark.slow  # every test here starts training processes

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SWEEP = os.path.join(REPO, "scripts", "sweep_cifar.sh")
LOCAL_SLURM = os.path.join(REPO, "scripts", "slurm_local.sh")
CELLS = ("cifar10:sym:0.5", "cifar10:asym:0.4")
RUNS = {"cifar10:sym:0.5": ("cifar10_sym_0.5_seed123", "cifar10_0.5_sym"),
        "cifar10:asym:0.4": ("cifar10_asym_0.4_seed123", "cifar10_0.4_asym")}
TRAIN_ARGS = ["--num_epochs", "2", "--batch_size", "8", "--warm_up", "1", "--eval_batch_size", "64",
              "--save_loss_every", "0", "--net_width", "8"]


def slurm_answers(env):
    """Whether the SLURM controller of env answers."""
    try:
        return subprocess.run(["sinfo", "-h"], env=env, capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.fixture(scope="module")
def env(prestarted_python):
    """An environment whose SLURM answers: the one configured, else the local one started (as root) here."""
    if shutil.which("sbatch") is None:
        pytest.skip("sbatch is not installed (Debian: apt-get install slurm-wlm munge; .ci/run does this)")
    e = {**os.environ, "PYTHON": prestarted_python, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    e.pop("CUDA_VISIBLE_DEVICES", None)
    local_conf = os.path.join(os.environ.get("SLURM_LOCAL_DIR", "/tmp/dividemix-slurm"), "slurm.conf")
    if "SLURM_CONF" not in e and os.path.exists(local_conf):
        e["SLURM_CONF"] = local_conf
    started = False
    if not slurm_answers(e):
        if os.geteuid() != 0:
            pytest.skip("no SLURM controller answers and the local one needs root to start")
        proc = subprocess.run(["bash", LOCAL_SLURM, "start"], capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"the local SLURM did not start: {proc.stderr.strip()}")
        e["SLURM_CONF"] = os.path.join(proc.stdout.strip(), "slurm.conf")
        started = True
    yield e
    if started:
        subprocess.run(["bash", LOCAL_SLURM, "stop"], capture_output=True)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("cifar")
    write_fake_cifar(str(path), "cifar10", n_train=32, n_test=16)
    return path


def sweep(args, env):
    """Run the sweep to its end; the completed process (asserted successful)."""
    proc = subprocess.run(["bash", SWEEP, *map(str, args)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc


@pytest.fixture(scope="module")
def local(env, data, tmp_path_factory):
    """The two runs made by the local sweep (two worker slots, so side by side)."""
    root = tmp_path_factory.mktemp("local")
    sweep(["--out", root, "--cifar10_path", data, "--gpus", "a", "b", *CELLS, "--", *TRAIN_ARGS], env)
    return root


def submit(root, data, env, *cells):
    """Submit the cells through --slurm; the job id."""
    proc = sweep(["--slurm", "--gpus_per_task", 0, "--out", root, "--cifar10_path", data, *cells, "--",
                  *TRAIN_ARGS], env)
    line = [x for x in proc.stdout.splitlines() if x.startswith("sweep: submitted job array ")]
    assert line, proc.stdout
    return line[0].split()[4]


def wait_done(job, env, timeout=400):
    """Wait until the job array has left the queue."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        out = subprocess.run(["squeue", "-h", "-j", job], env=env, capture_output=True, text=True).stdout
        if not out.strip():
            return
        time.sleep(1)
    subprocess.run(["scancel", job], env=env)
    pytest.fail(f"job {job} still queued after {timeout} s")


def wait_for_checkpoint(run_dir, timeout=200):
    """Wait until the run has written its first checkpoint (it is then mid-run)."""
    t0 = time.time()
    while not (os.path.isdir(run_dir) and any(f.endswith("_checkpoint.pth.tar") for f in os.listdir(run_dir))):
        assert time.time() - t0 < timeout, f"no checkpoint in {run_dir}"
        time.sleep(0.2)


def records(run_dir, prefix):
    """The JSON log without its timing fields."""
    result = [json.loads(line) for line in open(os.path.join(run_dir, prefix + "_log.jsonl"))]
    for rec in result:
        rec.pop("seconds", None), rec.pop("time", None)
    return result


def assert_same_run(root, reference, cell):
    """The run of `cell` under root has the logs of the reference run."""
    folder, prefix = RUNS[cell]
    a, b = os.path.join(root, folder), os.path.join(reference, folder)
    for suffix in ("_acc.txt", "_stats.txt"):
        assert open(os.path.join(a, prefix + suffix)).read() == open(os.path.join(b, prefix + suffix)).read()
    assert records(a, prefix) == records(b, prefix)
    assert [r["epoch"] for r in records(a, prefix)] == [0, 1, 2]


def task_log(root, job, task=0):
    """The array task's SLURM output file."""
    return open(os.path.join(root, "slurm", f"dividemix-sweep_{job}_{task}.out")).read()


def test_a_sweep_as_a_job_array_ends_as_the_local_one(env, data, local, tmp_path):
    job = submit(tmp_path, data, env, *CELLS)
    wait_done(job, env)
    for task, cell in enumerate(CELLS):
        assert_same_run(tmp_path, local, cell)
        assert f"run folder {os.path.join(tmp_path, RUNS[cell][0])}" in task_log(tmp_path, job, task)
    # a second call finds nothing left to submit
    proc = sweep(["--slurm", "--gpus_per_task", 0, "--out", tmp_path, "--cifar10_path", data, *CELLS, "--",
                  *TRAIN_ARGS], env)
    assert "nothing left to submit" in proc.stdout


def test_a_task_requeued_mid_run_resumes_and_ends_identical(env, data, local, tmp_path):
    cell = CELLS[0]
    job = submit(tmp_path, data, env, cell)
    wait_for_checkpoint(os.path.join(tmp_path, RUNS[cell][0]))
    subprocess.run(["scontrol", "requeue", f"{job}_0"], env=env, check=True)
    wait_done(job, env)
    assert_same_run(tmp_path, local, cell)
    log = open(os.path.join(tmp_path, RUNS[cell][0], "train.log")).read()
    assert "stopped by SIGTERM" in log and "resumed from epoch" in log
    assert "(restart 1)" in task_log(tmp_path, job)


def test_the_time_limit_warning_stops_requeues_and_resumes(env, data, local, tmp_path):
    cell = CELLS[1]
    job = submit(tmp_path, data, env, cell)
    wait_for_checkpoint(os.path.join(tmp_path, RUNS[cell][0]))
    # what --signal=B:USR1@N delivers N seconds before the limit
    subprocess.run(["scancel", "--signal=USR1", "--batch", f"{job}_0"], env=env, check=True)
    wait_done(job, env)
    assert_same_run(tmp_path, local, cell)
    out = task_log(tmp_path, job)
    assert "time limit near: requeued" in out and "(restart 1)" in out
    assert "resumed from epoch" in open(os.path.join(tmp_path, RUNS[cell][0], "train.log")).read()


def test_without_sbatch_slurm_stops_with_one_line(tmp_path):
    bin_dir = tmp_path / "bin"  # a PATH with what the script needs before its check, and no sbatch
    bin_dir.mkdir()
    os.symlink(shutil.which("dirname"), bin_dir / "dirname")
    env = {**os.environ, "PATH": str(bin_dir), "PYTHON": sys.executable}
    proc = subprocess.run(["/bin/bash", SWEEP, "--slurm", "--out", str(tmp_path), "cifar10:sym:0.5"], env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0
    assert "--slurm needs sbatch on the PATH" in proc.stderr


def test_a_torchrun_job_requeues_on_the_time_limit_warning_and_resumes(env, data, tmp_path):
    """scripts/slurm_torchrun.sbatch: one run on 2 processes (CPU, gloo), warned mid-run, requeued, continued."""
    out = tmp_path / "run"
    # the epoch-1 checkpoint write lingers 4 s (tests/fault_launch.py), so the warning finds the run mid-way
    proc = subprocess.run(["sbatch", "--parsable", "--cpus-per-task=2", f"--output={tmp_path}/job_%j.out",
                           os.path.join(REPO, "scripts", "slurm_torchrun.sbatch"),
                           os.path.join(REPO, "tests", "fault_launch.py"), os.path.join(REPO, "Train_cifar.py"),
                           "--data_path", str(data), "--output_dir", str(out), *TRAIN_ARGS],
                          env={**env, "PROCS_PER_NODE": "2", "FAULT": "slow:2:4"}, capture_output=True, text=True,
                          cwd=tmp_path, check=True)
    job = proc.stdout.strip().split(";")[0]
    wait_for_checkpoint(str(out))
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=env, check=True)
    wait_done(job, env)
    log = open(tmp_path / f"job_{job}.out").read()
    assert "time limit near: requeued" in log and "(restart 1)" in log and "resumed from epoch" in log
    assert [r["epoch"] for r in records(str(out), "cifar10_0.5_sym")] == [0, 1, 2]
