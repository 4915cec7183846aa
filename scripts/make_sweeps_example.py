"""Rebuild the synthetic illustration of docs/sweeps.md: example report and figures from made-up runs.

    python scripts/make_sweeps_example.py

Prints the example report (Markdown) and writes docs/sweeps_example_*.png. Nothing here is a result: the runs are
written by tests/synthetic_runs.py, and every figure is stamped "SYNTHETIC DATA".
"""
import os
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

import plots  # noqa: E402  (needs the repository on sys.path first)
import report  # noqa: E402
from rundirs import find_runs, group_runs  # noqa: E402
from synthetic_runs import write_demo  # noqa: E402


def stamp(fig):
    """Mark a figure as made from synthetic data."""
    fig.text(0.5, 0.5, "SYNTHETIC DATA", ha="center", va="center", fontsize=40, color="gray", alpha=0.25,
             rotation=20)
    return fig


def main():
    """Print the example report; write two figures into docs/."""
    docs = os.path.join(ROOT, "docs")
    with tempfile.TemporaryDirectory() as tmp:
        runs_dir = os.path.join(tmp, "runs")
        write_demo(runs_dir)
        runs = find_runs([runs_dir])
        print(report.render_markdown(report.build_rows(runs)), end="")
        groups = group_runs(runs)
        key, members = next((k, m) for k, m in groups if (k.dataset, k.mode, k.r) == ("cifar10", "sym", 0.5))
        plots.save(stamp(plots.accuracy_figure(key, members)), os.path.join(docs, "sweeps_example_acc.png"))
        run = members[0]
        with np.load(plots.snapshot_epochs(run)[15]) as data:
            snapshot = {name: data[name] for name in data.files}
        title = f"{plots.cell_title(key)}, seed {run.seed}, epoch 15"
        plots.save(stamp(plots.loss_figure(snapshot, title)), os.path.join(docs, "sweeps_example_losses.png"))


if __name__ == "__main__":
    main()
