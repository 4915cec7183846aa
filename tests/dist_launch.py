"""Run a training script under torchrun with probes and faults for the tests; the scripts themselves have no hooks.

    PROBE=DIR torchrun ... tests/dist_launch.py Train_cifar.py ARGS...   each rank writes DIR/rank<R>.json: per
                                                                         epoch a digest of its nets, optimizers and
                                                                         the divisions it trained on
    KILL=R:E  torchrun ... tests/dist_launch.py Train_cifar.py ARGS...   rank R kills itself (SIGKILL) when it
                                                                         reaches the checkpoint of epoch E, on the
                                                                         job's first attempt only
"""
import hashlib
import json
import os
import runpy
import signal
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import checkpointing  # noqa: E402 (the project root is put on the path first)
import distributed  # noqa: E402
import dividemix  # noqa: E402


def digest(tensors):
    """SHA-256 over the bytes of a sequence of tensors / arrays."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(np.ascontiguousarray(t.detach().cpu().numpy() if torch.is_tensor(t) else np.asarray(t)).tobytes())
    return h.hexdigest()


def state_tensors(state):
    """Every tensor of a (nested) state dict, in key order."""
    if torch.is_tensor(state):
        return [state]
    if isinstance(state, dict):
        return [t for k in sorted(state, key=str) for t in state_tensors(state[k])]
    if isinstance(state, (list, tuple)):
        return [t for v in state for t in state_tensors(v)]
    return []


def main():
    """Wrap run_state (probe, kill) and co_train (probe), then run the script as __main__."""
    probe = os.environ.get("PROBE")
    kill = os.environ.get("KILL")
    rank = int(os.environ.get("RANK", "0"))
    record = {"epochs": [], "divisions": []}
    run_state, co_train = checkpointing.run_state, dividemix.co_train

    def probed_run_state(epoch, defining, args, nets, optimizers, **extra):
        """run_state, noting digests of what each rank holds; the kill fault."""
        state = run_state(epoch, defining, args, nets, optimizers, **extra)
        record["epochs"].append({"epoch": epoch, "nets": [digest(state_tensors(n)) for n in state["nets"]],
                                 "optimizers": [digest(state_tensors(o)) for o in state["optimizers"]]})
        if probe:
            with open(os.path.join(probe, f"rank{rank}.json"), "w") as f:
                json.dump(record, f)
        if kill and distributed.restart_count() == 0 and kill == f"{rank}:{epoch}":
            os.kill(os.getpid(), signal.SIGKILL)
        return state

    def probed_co_train(epoch, nets, optimizers, probs, make_loaders, cfg, device):
        """co_train, noting a digest of the clean probabilities each net trains on."""
        record["divisions"].append({"epoch": epoch, "probs": digest([np.asarray(p) for p in probs])})
        return co_train(epoch, nets, optimizers, probs, make_loaders, cfg, device)

    checkpointing.run_state, dividemix.co_train = probed_run_state, probed_co_train
    sys.argv = sys.argv[1:]
    sys.path.insert(0, os.path.dirname(os.path.abspath(sys.argv[0])))
    runpy.run_path(sys.argv[0], run_name="__main__")


if __name__ == "__main__":
    main()
