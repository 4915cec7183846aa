"""What the whole suite shares: one thread per process, the slow marker, a prestarted interpreter for the training
processes, and one undisturbed tiny run per script."""
import os
import shutil
import subprocess
import sys
import tempfile

import pytest

from prestarted import COMMAND, SOCKET_VARIABLE

# One thread per torch process: on a 2-core machine the pytest process, a training subprocess and torchrun's
# workers would otherwise oversubscribe the cores, and OpenMP's spinning threads then make a tiny run 10x slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")
_server = pytest.StashKey()  # the prestarted server of this pytest process


def pytest_configure(config):
    """Register the marker of the tests that start training processes; start this process's prestarted server
    (tests/prestarted.py; until it listens, runs start the plain way)."""
    config.addinivalue_line("markers", "slow: starts training processes (deselect with -m 'not slow')")
    # named before the test files are imported (some copy os.environ then), and started at once where tests run
    # (not in pytest-xdist's controller): the server imports torch while this process collects the tests
    folder = tempfile.mkdtemp(prefix="dividemix-prestarted-")
    os.environ[SOCKET_VARIABLE] = os.path.join(folder, "socket")
    config.stash[_server] = None
    if hasattr(config, "workerinput") or not config.getoption("numprocesses", None):
        config.stash[_server] = subprocess.Popen(
            [sys.executable, COMMAND, "--serve", os.environ[SOCKET_VARIABLE]], stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, start_new_session=True)


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups
def pytest_collection_modifyitems(items):
    """Each test without an xdist group (runs.LARGE_ON_DISK) joins the group of its file."""
    for item in items:
        if item.get_closest_marker("xdist_group") is None:
            item.add_marker(pytest.mark.xdist_group(item.path.name))


def pytest_collection_finish(session):
    """Stop the prestarted server again when no selected test starts training processes (-m "not slow")."""
    if not any(item.get_closest_marker("slow") for item in session.items):
        _stop_server(session.config)


def _stop_server(config):
    """Stop this process's prestarted server, if it runs."""
    server = config.stash.get(_server, None)
    if server is not None:
        server.terminate()
        server.wait()
        config.stash[_server] = None


def pytest_unconfigure(config):
    """Stop the prestarted server and remove its folder."""
    _stop_server(config)
    if SOCKET_VARIABLE in os.environ:
        shutil.rmtree(os.path.dirname(os.environ.pop(SOCKET_VARIABLE)), ignore_errors=True)


@pytest.fixture(scope="session")
def prestarted_python(tmp_path_factory):
    """An interpreter command for $PYTHON (the sweep's): `python SCRIPT ...` through tests/prestarted.py."""
    path = tmp_path_factory.mktemp("prestarted") / "python"
    path.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{COMMAND}" "$@"\n')
    path.chmod(0o755)
    return str(path)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """The tiny data set of a runs.SCRIPTS entry, written once per session: key -> folder."""
    from runs import SCRIPTS
    made = {}

    def get(key):
        """The folder holding key's data set."""
        if key not in made:
            made[key] = str(tmp_path_factory.mktemp(f"data-{key}"))
            SCRIPTS[key][1](made[key])
        return made[key]
    return get


@pytest.fixture(scope="session")
def undisturbed(tiny_data, tmp_path_factory):
    """The undisturbed run of epochs 0..2 of a runs.SCRIPTS entry, made once per session and shared by every test
    that compares against it: key -> (run folder, completed process)."""
    from runs import SCRIPTS, run_script
    made = {}

    def get(key):
        """key's run folder and process (do not write into the folder: copy it first)."""
        if key not in made:
            script, _, args = SCRIPTS[key]
            out = str(tmp_path_factory.mktemp(f"undisturbed-{key}"))
            made[key] = out, run_script(script, "--data_path", tiny_data(key), "--output_dir", out,
                                        "--num_epochs", 2, *args)
        return made[key]
    return get
