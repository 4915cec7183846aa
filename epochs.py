"""The end of a training epoch, shared by the training scripts: the JSON record, the summary line, the
checkpoint; and, where a validation set chooses the final nets, each net's best-validation weights."""
import os
import time

import torch

from checkpointing import atomic_save
from utils import json_safe


def end_epoch(run, epoch, phase, lr, t_epoch, shown, records, timing, checkpoint, scores=None, extra=None,
              details="", probs=None):
    """Write the epoch's JSON record, print its summary line and save the checkpoint.

    shown: the scores as the summary line shows them; scores: the same for the JSON record, before the nets'
    records; extra: further entries after them; details: the end of the summary line. checkpoint: run_state's
    state after this epoch (built on every rank: under torchrun it is a collective). probs: each net's clean
    probabilities of a co-divide in this epoch, histograms with --tensorboard."""
    seconds = time.perf_counter() - t_epoch
    histograms = {f"net{k}/clean_prob": p for k, p in enumerate(probs or (), 1) if p is not None}
    run.record_epoch(json_safe({"epoch": epoch, "phase": phase, "lr": lr, **(scores or {}), "net1": records[0],
                                "net2": records[1], **(extra or {}), "seconds": seconds, "time": timing}),
                     histograms)
    print(f"epoch {epoch:3d} {phase:6s} {shown}  lr {lr:g}  {seconds:.1f}s{details}", flush=True)
    run.save(checkpoint)


class BestWeights:
    """Each net's best validation accuracy so far, its weights of that epoch in the run folder (_net1.pth.tar,
    _net2.pth.tar), and those weights loaded back for the final test."""

    def __init__(self, run, best=None):
        """run: the RunDir; best: the accuracies a checkpoint recorded (None: a fresh start)."""
        self.run = run
        self.paths = [run.path(f"_net{k}.pth.tar") for k in (1, 2)]
        self.best = list(best) if best is not None else [0.0, 0.0]

    def update(self, nets, accs):
        """Keep the weights of each net whose validation accuracy beats its best so far (rank 0 writes)."""
        for k, (net, acc) in enumerate(zip(nets, accs)):
            if acc > self.best[k]:
                self.best[k] = acc
                if self.run.main:
                    atomic_save(net.state_dict(), self.paths[k])

    def load_into(self, nets, device):
        """Give each net its best-validation weights (a net never validated above 0% keeps its own)."""
        for net, path in zip(nets, self.paths):
            if os.path.exists(path):
                net.load_state_dict(torch.load(path, map_location=device, weights_only=True))
