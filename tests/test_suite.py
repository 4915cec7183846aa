"""The suite's own machinery. tests/prestarted.py, the prestarted interpreter most training processes of the suite
start through: a run is the script as `python SCRIPT` would run it (arguments, path, folder, environment, streams,
exit codes, tracebacks, signals), and a client killed with SIGKILL takes its run along. And the pytest-xdist groups
that keep large checkpoints on one worker."""
import os
import signal
import subprocess
import sys
import time

import pytest

from prestarted import COMMAND as CLIENT, SOCKET_VARIABLE


NEEDS_SERVER = pytest.mark.slow  # tests/conftest.py starts the server only for a run with slow tests
SCRIPT = """\
import json, os, signal, sys, time
preloaded = "torch" in sys.modules  # before this script imports anything
mode = sys.argv[1]
if mode == "report":
    print(json.dumps({"argv": sys.argv, "path0": sys.path[0], "cwd": os.getcwd(), "name": __name__,
                      "variable": os.environ.get("SOME_VARIABLE"), "preloaded": preloaded, "pid": os.getpid()}))
    print("to stderr", file=sys.stderr)
    sys.exit(3)
if mode == "raise":
    raise ValueError("bad value")
if mode == "message":
    sys.exit("a message")
if mode == "signal":
    def stop(signum, frame):
        print("stopped by", signal.Signals(signum).name, flush=True)
        sys.exit(128 + signum)
    signal.signal(signal.SIGTERM, stop)
if mode in ("signal", "sleep"):
    open(sys.argv[2], "w").write(str(os.getpid()))
    print("ready", flush=True)
    time.sleep(60)
"""


@pytest.fixture(scope="module")
def script(tmp_path_factory):
    """The probe script, once the session's server listens (it imports torch in the background first)."""
    path = tmp_path_factory.mktemp("prestarted") / "probe.py"
    path.write_text(SCRIPT)
    deadline = time.time() + 120
    while not os.path.exists(os.environ[SOCKET_VARIABLE]):
        assert time.time() < deadline, "the prestarted server did not start"
        time.sleep(0.2)
    return path


def client(script, *args, **kwargs):
    """Popen of `python tests/prestarted.py SCRIPT ARGS...`."""
    return subprocess.Popen([sys.executable, CLIENT, str(script), *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kwargs)


@NEEDS_SERVER
def test_a_run_sees_what_python_script_would(script, tmp_path):
    import json
    proc = client(script, "report", "x y", cwd=tmp_path, env={**os.environ, "SOME_VARIABLE": "v"})
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 3 and err == "to stderr\n"
    seen = json.loads(out)
    assert seen["argv"] == [str(script), "report", "x y"] and seen["name"] == "__main__"
    assert seen["path0"] == str(script.parent) and seen["cwd"] == str(tmp_path) and seen["variable"] == "v"
    assert seen["preloaded"] and seen["pid"] != proc.pid  # forked from the server, with torch already imported


@NEEDS_SERVER
def test_exceptions_and_exit_messages_end_as_in_python(script):
    proc = client(script, "raise")
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1 and "Traceback" in err and err.endswith("ValueError: bad value\n")
    proc = client(script, "message")
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1 and err == "a message\n"


@NEEDS_SERVER
def test_a_signal_to_the_client_reaches_the_run(script, tmp_path):
    proc = client(script, "signal", tmp_path / "pid")
    assert proc.stdout.readline() == "ready\n"
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM and out == "stopped by SIGTERM\n"
    proc = client(script, "sleep", tmp_path / "pid")  # no handler: the run dies by the signal, and so the client
    assert proc.stdout.readline() == "ready\n"
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGTERM


@NEEDS_SERVER
def test_a_client_killed_with_sigkill_takes_its_run_along(script, tmp_path):
    proc = client(script, "sleep", tmp_path / "pid")
    assert proc.stdout.readline() == "ready\n"
    run = int((tmp_path / "pid").read_text())
    proc.kill()
    proc.wait()
    deadline = time.time() + 30
    while os.path.exists(f"/proc/{run}") and open(f"/proc/{run}/stat").read().split()[2] != "Z":
        assert time.time() < deadline, "the run outlived its client"
        time.sleep(0.05)


@NEEDS_SERVER
def test_python_dash_c_and_dash_m(script, tmp_path):
    proc = client("-c", "import sys; print(sys.argv, __name__, 'torch' in sys.modules); sys.exit(4)", "a",
                  cwd=tmp_path)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 4 and out == "['-c', 'a'] __main__ True\n"
    (tmp_path / "probe_module.py").write_text("import sys\nprint(sys.argv[1:], __name__)\n")
    proc = client("-m", "probe_module", "b", cwd=tmp_path)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0 and out == "['b'] __main__\n"


def test_each_test_runs_in_its_xdist_group(request):
    """pytest.ini's --dist loadgroup sees the groups tests/conftest.py gives (a test of this file: the file's)."""
    if not hasattr(request.config, "workerinput"):
        pytest.skip("not under pytest-xdist (-n 0)")
    assert request.node.nodeid.endswith("@test_suite.py"), request.node.nodeid
