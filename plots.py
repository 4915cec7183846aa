"""Plots of DivideMix runs (PNG): accuracy over epochs, loss histograms with the GMM, division quality.

    python plots.py runs/ [--out_dir plots] [--epochs 10 100 300]

Written into --out_dir:
  acc_<cell>.png                       accuracy over epochs, one line per seed, the published numbers dashed
  losses_<run>_epoch_<E>.png           (CIFAR) per net: histogram of the normalised per-sample loss (the GMM
                                       input) split by the true clean/noisy mask, the two fitted Gaussians and
                                       the threshold, as in the paper's Figure 1
  division_<run>.png                   labeled-set size, precision and AUC of each net's division over epochs
                                       (open-set runs: also the replaced images it labeled)
Figures are drawn with matplotlib's object interface on the Agg canvas: no display, no global pyplot state.
"""
import os
import re
import sys

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from cli import run_main
from flags import FlagParser
from published import PAPER_CLOTHING1M_TEST, PAPER_WEBVISION, SOURCES, cifar_published
from rundirs import LOSSES_SUFFIX, cell_name, find_runs, fmt_num, group_runs, loss_snapshots

MAX_SNAPSHOTS = 5  # loss-histogram epochs drawn per run when --epochs is not given
ACC_CURVES = {
    "cifar": (("test_acc", "test", "-"),),
    "clothing1m": (("val_acc1", "val net1", "-"), ("val_acc2", "val net2", "--")),
    "webvision": (("webvision_top1", "WebVision top-1", "-"), ("imagenet_top1", "ImageNet top-1", "--")),
}
# ood_labeled (open-set runs only): replaced images the division put in the labeled set.
DIVISION_PANELS = (("labeled", "labeled samples"), ("precision", "precision of labeled set"), ("auc", "AUC"),
                   ("ood_labeled", "open-set images labeled"))


def save(fig, path):
    """Render a Figure to PNG through the Agg canvas."""
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=100)
    return path


def slug(text):
    """A file-name-safe version of text."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")


def group_slugs(groups):
    """File-name stem per group key: the cell alone, plus the settings when two groups share a cell."""
    base = {key: cell_name(key) for key, _ in groups}
    counts = {}
    for stem in base.values():
        counts[stem] = counts.get(stem, 0) + 1
    out = {}
    for key, stem in base.items():
        if counts[stem] > 1:
            stem += "_lu%s_p%s_e%d" % (fmt_num(key.lambda_u), fmt_num(key.p_threshold), key.num_epochs)
        out[key] = slug(stem)
    return out


def run_labels(groups, stems):
    """Unique file-name stem per run: '<cell>_seed<S>', numbered when two runs would share one."""
    labels, used = {}, set()
    for key, members in groups:
        for run in members:
            stem = f"{stems[key]}_seed{run.seed}"
            label, n = stem, 2
            while label in used:
                label, n = f"{stem}_{n}", n + 1
            used.add(label)
            labels[id(run)] = label
    return labels


def cell_title(key):
    """Human-readable title of a group."""
    if key.kind != "cifar":
        return str(key.dataset)
    noise = key.mode if key.r is None else "%s %g%%" % (key.mode, key.r * 100)
    open_set = ", open-set %g%%" % (key.ood_ratio * 100) if key.ood_ratio else ""
    return "%s %s%s (lambda_u %s, tau %s)" % (key.dataset, noise, open_set, fmt_num(key.lambda_u),
                                             fmt_num(key.p_threshold))


def published_lines(key):
    """[(legend name, accuracy)] drawn as horizontal lines on a group's accuracy figure (at most two)."""
    if key.kind == "clothing1m":
        return [("paper test", PAPER_CLOTHING1M_TEST)]
    if key.kind == "webvision":
        return [("paper WebVision top-1", PAPER_WEBVISION["webvision_top1"]),
                ("paper ImageNet top-1", PAPER_WEBVISION["imagenet_top1"])]
    published = cifar_published(key.dataset, key.mode, key.r, key.ood_ratio)
    if published and published[0].source == "dividemix":
        return [("paper best", published[0].best), ("paper last 10", published[0].last)]
    return [(f"{SOURCES[p.source][0]} best", p.best) for p in published]


# ----------------------------------------------------------------------------- (a) accuracy

def accuracy_figure(key, members):
    """Accuracy over epochs of every run of a group, one colour per seed; paper numbers as dashed lines."""
    kind = key.kind
    fig = Figure(figsize=(7, 4.2))
    ax = fig.add_subplot()
    colours = [f"C{i % 10}" for i in range(len(members))]
    for run, colour in zip(members, colours):
        for field, name, style in ACC_CURVES[kind]:
            points = [(rec["epoch"], rec[field]) for rec in run.records if isinstance(rec.get(field), (int, float))]
            if points:
                x, y = zip(*points)
                suffix = "" if run.finished else " (unfinished)"
                ax.plot(x, y, style, color=colour, lw=1.2, label=f"seed {run.seed} {name}{suffix}")
    for (name, value), (colour, style) in zip(published_lines(key), (("k", "--"), ("dimgray", ":"))):
        if value is not None:
            ax.axhline(value, color=colour, ls=style, lw=1.0, label=f"{name} {value:.2f}")
    ax.set_xlabel("epoch")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(cell_title(key))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------- (b) loss histograms + GMM

def log_component_pdfs(x, means, variances, weights):
    """log(weight_j * N(x; mean_j, var_j)) for each component j: array (len(x), 2)."""
    x = np.asarray(x, dtype=np.float64)[:, None]
    means, variances, weights = (np.asarray(a, dtype=np.float64)[None, :] for a in (means, variances, weights))
    return np.log(weights) - 0.5 * np.log(2 * np.pi * variances) - (x - means) ** 2 / (2 * variances)


def clean_posterior(x, means, variances, weights):
    """Posterior of the smaller-mean (clean) component at each x, computed in log space to avoid 0/0."""
    logp = log_component_pdfs(x, means, variances, weights)
    c = int(np.argmin(means))
    return 1.0 / (1.0 + np.exp(np.clip(logp[:, 1 - c] - logp[:, c], -700, 700)))


def threshold_crossings(means, variances, weights, p_threshold, lo=0.0, hi=1.0, points=4001):
    """Losses in [lo, hi] where the clean posterior crosses p_threshold (linear interpolation on a grid)."""
    # Usually one value; two when the clean component is the wider one and takes over again at high loss.
    grid = np.linspace(lo, hi, points)
    d = clean_posterior(grid, means, variances, weights) - p_threshold
    idx = np.nonzero(np.sign(d[:-1]) * np.sign(d[1:]) < 0)[0]
    return [float(grid[i] + (grid[i + 1] - grid[i]) * d[i] / (d[i] - d[i + 1])) for i in idx]


def loss_figure(snapshot, title):
    """Both nets' loss histograms (clean vs noisy), GMM component densities and the threshold."""
    fig = Figure(figsize=(10, 3.8))
    clean = snapshot["clean"].astype(bool)
    p_threshold = float(snapshot["p_threshold"])
    for k in (1, 2):
        ax = fig.add_subplot(1, 2, k)
        loss = snapshot[f"loss{k}"].astype(np.float64)
        means, variances, weights = (snapshot[f"gmm{k}_{n}"].ravel() for n in ("means", "vars", "weights"))
        lo, hi = min(0.0, float(loss.min())), max(1.0, float(loss.max()))
        bins = np.linspace(lo, hi, 61)
        # Weights 1 / (N * bin width): the two histograms together integrate to 1, the scale of the GMM density.
        scale = 1.0 / (len(loss) * (bins[1] - bins[0]))
        ax.hist([loss[clean], loss[~clean]], bins=bins, weights=[np.full(clean.sum(), scale),
                np.full((~clean).sum(), scale)], stacked=True, color=["tab:green", "tab:red"], alpha=0.55,
                label=["clean", "noisy"])
        grid = np.linspace(lo, hi, 800)
        comp = np.exp(log_component_pdfs(grid, means, variances, weights))
        c = int(np.argmin(means))
        ax.plot(grid, comp[:, c], color="darkgreen", lw=1.4, label="GMM clean component")
        ax.plot(grid, comp[:, 1 - c], color="darkred", lw=1.4, label="GMM noisy component")
        ax.plot(grid, comp.sum(1), color="k", lw=0.8, ls=":", label="GMM mixture")
        for i, t in enumerate(threshold_crossings(means, variances, weights, p_threshold, lo, hi)):
            ax.axvline(t, color="tab:blue", ls="--", lw=1.2,
                       label=f"clean posterior = {p_threshold:g}" if i == 0 else None)
        prob = snapshot.get(f"prob{k}")
        if prob is not None:
            pred = prob > p_threshold
            precision = 100.0 * (pred & clean).sum() / max(int(pred.sum()), 1)
            ax.set_title(f"net{k}: {int(pred.sum())} labeled, {precision:.1f}% of them clean", fontsize=9)
        ax.set_xlabel("normalised loss (GMM input)")
        ax.set_ylabel("density")
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def snapshot_epochs(run):
    """{epoch: path} of a run's saved loss snapshots."""
    return loss_snapshots(os.path.join(run.run_dir, run.prefix + LOSSES_SUFFIX))


def choose_epochs(available, wanted, label):
    """The wanted epochs that were saved (a warning for the others), or up to MAX_SNAPSHOTS spread evenly."""
    epochs = sorted(available)
    if wanted is not None:
        missing = [e for e in wanted if e not in available]
        if missing and epochs:
            print(f"warning: {label}: no loss snapshot for epoch(s) {' '.join(map(str, missing))} "
                  f"(saved: {' '.join(map(str, epochs))})", file=sys.stderr)
        return [e for e in sorted(set(wanted)) if e in available]
    if len(epochs) <= MAX_SNAPSHOTS:
        return epochs
    picks = np.unique(np.round(np.linspace(0, len(epochs) - 1, MAX_SNAPSHOTS)).astype(int))
    return [epochs[i] for i in picks]


# ----------------------------------------------------------------------------- (c) division quality

def division_figure(run, title):
    """Labeled-set size, precision, AUC (and open-set images labeled) of each net's divisions; None without any."""
    panels = [(f, name) for f, name in DIVISION_PANELS
              if any(isinstance(rec.get(f"net{k}", {}).get(f), (int, float)) for rec in run.records for k in (1, 2))]
    if not panels:
        return None
    fig = Figure(figsize=(4 * len(panels), 3.5))
    for i, (field, name) in enumerate(panels, 1):
        ax = fig.add_subplot(1, len(panels), i)
        for k, style in ((1, "-"), (2, "--")):
            points = [(rec["epoch"], rec[f"net{k}"][field]) for rec in run.records
                      if isinstance(rec.get(f"net{k}", {}).get(field), (int, float))]
            if points:
                x, y = zip(*points)
                ax.plot(x, y, style, lw=1.2, label=f"from net{k}'s losses")
        ax.set_xlabel("epoch")
        ax.set_title(name, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def classwise_figure(run, title):
    """Per-class labeled counts and thresholds of the last class-wise division (--division classwise); None
    when the run has none."""
    last = next((rec for rec in reversed(run.records) if "classwise" in rec.get("net1", {})), None)
    if last is None:
        return None
    fig = Figure(figsize=(10, 3.5))
    counts, thresholds = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for k, offset in ((1, -0.2), (2, 0.2)):
        per_class = last[f"net{k}"]["classwise"]
        classes = np.asarray(per_class["classes"])
        counts.bar(classes + offset, per_class["labeled"], width=0.4, label=f"from net{k}'s losses")
        shown = [(c, t) for c, t in zip(classes, per_class["threshold"]) if t is not None]
        if shown:
            thresholds.plot(*zip(*shown), "o" if k == 1 else "x", label=f"from net{k}'s losses")
        fell_back = per_class["fallback"]
        if fell_back:
            counts.plot(fell_back, [0] * len(fell_back), "k|", ms=12, label=f"net{k}: global fit (too few)")
    counts.set_title(f"labeled samples per class, epoch {last['epoch']}", fontsize=9)
    thresholds.set_title("largest GMM input still labeled, per class", fontsize=9)
    for ax in (counts, thresholds):
        ax.set_xlabel("observed (noisy) class")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------- driver

def make_plots(runs, out_dir, epochs=None):
    """Draw every plot for the runs into out_dir; returns the written paths in order."""
    os.makedirs(out_dir, exist_ok=True)
    groups = group_runs(runs)
    stems = group_slugs(groups)
    labels = run_labels(groups, stems)
    written = []
    for key, members in groups:
        written.append(save(accuracy_figure(key, members), os.path.join(out_dir, f"acc_{stems[key]}.png")))
        for run in members:
            label = labels[id(run)]
            title = f"{cell_title(key)}, seed {run.seed}"
            snapshots = snapshot_epochs(run)
            for epoch in choose_epochs(snapshots, epochs, label):
                with np.load(snapshots[epoch]) as data:
                    snapshot = {name: data[name] for name in data.files}
                path = os.path.join(out_dir, f"losses_{label}_epoch_{epoch:03d}.png")
                written.append(save(loss_figure(snapshot, f"{title}, epoch {epoch}"), path))
            for name, draw in (("division", division_figure), ("classwise", classwise_figure)):
                fig = draw(run, title)
                if fig is not None:
                    written.append(save(fig, os.path.join(out_dir, f"{name}_{label}.png")))
    return written


def get_args_parser():
    """Command-line arguments of the plots."""
    p = FlagParser(description="Plots of DivideMix runs")
    p.add_argument("runs", nargs="+", help="run directories, or folders holding run directories")
    p.add_argument("--out_dir", default="plots", help="PNG files go here")
    p.add_argument("--epochs", type=int, nargs="*", default=None,
                   help=f"epochs of the loss histograms (default: up to {MAX_SNAPSHOTS} saved snapshots per run)")
    return p


def main(args):
    """Find the runs and draw their plots."""
    written = make_plots(find_runs(args.runs), args.out_dir, args.epochs)
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main, get_args_parser().parse_args()))
