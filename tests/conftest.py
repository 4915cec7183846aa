"""What the whole suite shares: one thread per process, the slow marker, and the tiny CIFAR data set."""
import os

import pytest

# One thread per torch process: on a 2-core machine the pytest process, a training subprocess and torchrun's
# workers would otherwise oversubscribe the cores, and OpenMP's spinning threads then make a tiny run 10x slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_configure(config):
    """Register the marker of the tests that start training processes."""
    config.addinivalue_line("markers", "slow: starts training processes (deselect with -m 'not slow')")
