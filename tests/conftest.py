"""What the whole suite shares: one thread per process, the slow marker, and one undisturbed tiny run per script."""
import os

import pytest

# One thread per torch process: on a 2-core machine the pytest process, a training subprocess and torchrun's
# workers would otherwise oversubscribe the cores, and OpenMP's spinning threads then make a tiny run 10x slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_configure(config):
    """Register the marker of the tests that start training processes."""
    config.addinivalue_line("markers", "slow: starts training processes (deselect with -m 'not slow')")


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
