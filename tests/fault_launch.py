"""Run a training script with a fault injected into its checkpoint writes; the scripts themselves have no hooks.

    FAULT=slow:N:SECONDS python tests/fault_launch.py Train_cifar.py ARGS...   the N-th checkpoint write lingers
    FAULT=enospc:N       python tests/fault_launch.py Train_cifar.py ARGS...   the N-th one fails: disk full
"""
import errno
import os
import runpy
import sys
import time

import torch


def main():
    """Wrap torch.save for checkpoints (dicts holding "nets"), then run the script as __main__."""
    kind, nth, *seconds = os.environ.get("FAULT", "").split(":")
    original = torch.save
    calls = [0]

    def save(obj, f, *args, **kwargs):
        """torch.save with the fault applied to checkpoints."""
        if not (isinstance(obj, dict) and "nets" in obj):
            return original(obj, f, *args, **kwargs)
        calls[0] += 1
        if kind == "enospc" and calls[0] == int(nth):
            f.write(b"\0" * 4096)  # a full disk leaves a partial file behind
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        original(obj, f, *args, **kwargs)
        if kind == "slow" and calls[0] == int(nth):
            time.sleep(float(seconds[0]))  # the temporary file exists all this time
        return None

    torch.save = save
    sys.argv = sys.argv[1:]
    sys.path.insert(0, os.path.dirname(os.path.abspath(sys.argv[0])))
    runpy.run_path(sys.argv[0], run_name="__main__")


if __name__ == "__main__":
    main()
