"""Compare finished (and unfinished) runs with the paper's tables: one Markdown table and one CSV.

    python report.py runs/ [more run dirs ...] [--out_md report.md] [--out_csv report.csv] [--plots plots/]

A run is found by its `<prefix>_config.json`; an argument may be a run directory or any folder above run
directories. CIFAR runs are grouped by cell (dataset, noise mode, r) and by the settings that change results
(lambda_u, p_threshold, num_epochs); finished runs of a group share one row (mean and sample standard
deviation, ddof = 1, over seeds), every unfinished run gets a row of its own. Clothing1M and WebVision runs
(written by Train_clothing1M.py and Train_webvision.py) get tables of their own.
"""
import argparse
import csv
import io
import json
import math
import os
import statistics
import sys
from dataclasses import dataclass, field

from utils import UserError, run_main

# SPEC.md section 7: test accuracy (%), best over epochs / mean of the last 10 epochs.
PAPER_CIFAR = {
    ("cifar10", "sym", 0.2): (96.1, 95.7),
    ("cifar10", "sym", 0.5): (94.6, 94.4),
    ("cifar10", "sym", 0.8): (93.2, 92.9),
    ("cifar10", "sym", 0.9): (76.0, 75.4),
    ("cifar10", "asym", 0.4): (93.4, 92.1),
    ("cifar100", "sym", 0.2): (77.3, 76.9),
    ("cifar100", "sym", 0.5): (74.6, 74.2),
    ("cifar100", "sym", 0.8): (60.2, 59.6),
    ("cifar100", "sym", 0.9): (31.5, 31.0),
}
PAPER_CLOTHING1M_TEST = 74.76
PAPER_WEBVISION = {"webvision_top1": 77.32, "webvision_top5": 91.64, "imagenet_top1": 75.20, "imagenet_top5": 90.84}
WEBVISION_METRICS = ("webvision_top1", "webvision_top5", "imagenet_top1", "imagenet_top5")
LAST_EPOCHS = 10  # the paper's "last": mean test accuracy of the last 10 epochs
SCRIPT_KINDS = {"Train_cifar.py": "cifar", "Train_clothing1M.py": "clothing1m", "Train_webvision.py": "webvision"}
KIND_ORDER = ("cifar", "clothing1m", "webvision")
DEFAULT_EPOCHS = {"cifar": 300, "clothing1m": 80, "webvision": 80}
MODE_ORDER = {"sym": 0, "asym": 1}
CSV_COLUMNS = ("section", "dataset", "noise_mode", "r", "lambda_u", "p_threshold", "num_epochs", "metric", "n_seeds",
               "seeds", "status", "best_mean", "best_std", "paper_best", "best_diff", "last_mean", "last_std",
               "paper_last", "last_diff", "sec_per_epoch")
SUMMARY = ("Accuracy in %. Ours: mean ± sample standard deviation (ddof = 1) over seeds; no ± with one seed. "
           "Δ = ours − paper (paper: SPEC.md section 7). s/epoch: mean wall time of an epoch. "
           "Each unfinished run has a row of its own with its numbers so far.")


@dataclass
class Run:
    """One training run: its config, its per-epoch log records and, for Clothing1M, the final test record."""

    kind: str
    run_dir: str
    prefix: str
    config: dict
    records: list = field(default_factory=list)
    final: dict = None

    @property
    def args(self):
        """The run's command-line arguments as saved in its config."""
        return self.config.get("args", {})

    @property
    def num_epochs(self):
        """Last epoch of the run (epochs are numbered 0..num_epochs)."""
        return int(self.args.get("num_epochs", DEFAULT_EPOCHS[self.kind]))

    @property
    def last_epoch(self):
        """Last completed epoch, or None before the first one."""
        return self.records[-1]["epoch"] if self.records else None

    @property
    def finished(self):
        """Clothing1M: the final test line is written; CIFAR and WebVision: the last epoch is logged."""
        if self.kind == "clothing1m":
            return self.final is not None
        return self.last_epoch is not None and self.last_epoch >= self.num_epochs

    @property
    def status(self):
        """'finished' or 'unfinished (epoch E/N)'."""
        if self.finished:
            return "finished"
        if self.last_epoch is None:
            return f"unfinished (no epoch yet/{self.num_epochs})"
        return f"unfinished (epoch {self.last_epoch}/{self.num_epochs})"

    @property
    def seed(self):
        """The run's seed (None when its config has none)."""
        return self.args.get("seed")


# ----------------------------------------------------------------------------- reading runs

def find_config_files(paths):
    """Every *_config.json under the given run directories or parents, sorted, without duplicates."""
    found = set()
    for path in paths:
        if not os.path.exists(path):
            raise UserError(f"{path} does not exist: give run directories or a folder holding them")
        if os.path.isfile(path):
            if not path.endswith("_config.json"):
                raise UserError(f"{path} is not a run directory or a *_config.json file")
            found.add(os.path.realpath(path))
            continue
        for folder, dirs, files in os.walk(path):
            dirs.sort()
            found.update(os.path.realpath(os.path.join(folder, f)) for f in files if f.endswith("_config.json"))
    return sorted(found)


def read_log(path):
    """Epoch records (sorted, one per epoch: the last wins) and the final test record of a JSON-lines log."""
    by_epoch, final = {}, None
    if not os.path.isfile(path):
        return [], None
    with open(path) as f:
        lines = [line for line in f.read().splitlines() if line.strip()]
    for i, line in enumerate(lines):
        try:
            record = json.loads(line)
        except ValueError:
            if i < len(lines) - 1:  # a cut last line is a killed run's normal state; anything else is worth a word
                print(f"warning: {path} line {i + 1} is not JSON; skipped", file=sys.stderr)
            continue
        if not isinstance(record, dict):
            continue
        if record.get("phase") == "test":
            final = record
        elif isinstance(record.get("epoch"), int):
            by_epoch[record["epoch"]] = record
    return [by_epoch[e] for e in sorted(by_epoch)], final


def load_run(config_path):
    """The Run of one config file, or None (with a warning) when it is not a run config of this project."""
    try:
        with open(config_path) as f:
            config = json.load(f)
    except (OSError, ValueError) as exc:
        print(f"warning: {config_path} is not readable JSON ({exc}); skipped", file=sys.stderr)
        return None
    kind = SCRIPT_KINDS.get(config.get("script")) if isinstance(config, dict) else None
    if kind is None or not isinstance(config.get("args"), dict):
        print(f"warning: {config_path} was not written by a training script of this project; skipped",
              file=sys.stderr)
        return None
    folder, name = os.path.split(config_path)
    prefix = name[:-len("_config.json")]
    records, final = read_log(os.path.join(folder, prefix + "_log.jsonl"))
    return Run(kind=kind, run_dir=folder, prefix=prefix, config=config, records=records, final=final)


def find_runs(paths):
    """Every run under the given paths; UserError when there is none."""
    runs = [run for run in (load_run(p) for p in find_config_files(paths)) if run is not None]
    if not runs:
        raise UserError(f"no run found in {' '.join(paths)}: give run directories (holding *_config.json) "
                        "or a folder above them")
    return runs


# ----------------------------------------------------------------------------- numbers

def group_key(run):
    """Runs with the same key are seeds of one experiment: (kind, dataset, noise mode, r, lambda_u, tau, epochs)."""
    a = run.args
    if run.kind == "cifar":
        dataset, mode, r = a.get("dataset"), a.get("noise_mode"), round(float(a.get("r", 0.0)), 4)
    else:
        dataset, mode, r = run.kind, "real", None
    lambda_u = None if a.get("lambda_u") is None else float(a["lambda_u"])
    p_threshold = None if a.get("p_threshold") is None else float(a["p_threshold"])
    return (run.kind, dataset, mode, r, lambda_u, p_threshold, run.num_epochs)


def sort_key(key):
    """Rows in paper order: kind, dataset, sym before asym, r, then the settings."""
    kind, dataset, mode, r, lambda_u, p_threshold, num_epochs = key
    return (KIND_ORDER.index(kind), str(dataset), MODE_ORDER.get(mode, 2), str(mode), r or 0.0,
            -1.0 if lambda_u is None else lambda_u, -1.0 if p_threshold is None else p_threshold, num_epochs)


def group_runs(runs):
    """[(key, runs sorted by seed and directory)] in table order."""
    groups = {}
    for run in runs:
        groups.setdefault(group_key(run), []).append(run)
    return [(key, sorted(groups[key], key=lambda r: (r.seed is None, r.seed or 0, r.run_dir, r.prefix)))
            for key in sorted(groups, key=sort_key)]


def values(run, name):
    """The non-null values of one log field over the run's epochs."""
    return [rec[name] for rec in run.records if isinstance(rec.get(name), (int, float))]


def best_last(series, last_n=1):
    """(max, mean of the last `last_n` values) of a series; (None, None) when it is empty."""
    if not series:
        return None, None
    tail = series[-last_n:]
    return max(series), sum(tail) / len(tail)


def run_metrics(run):
    """{metric: (best, last)} of one run, the paper's definitions per benchmark."""
    if run.kind == "cifar":
        return {"test_acc": best_last(values(run, "test_acc"), LAST_EPOCHS)}
    if run.kind == "clothing1m":
        # A net's validation accuracy picks its best checkpoint; the row shows the better of the two nets.
        per_epoch = []
        for rec in run.records:
            accs = [rec[k] for k in ("val_acc1", "val_acc2") if isinstance(rec.get(k), (int, float))]
            if accs:
                per_epoch.append(max(accs))
        test = run.final.get("test_acc") if run.final else None
        return {"val_acc": best_last(per_epoch), "test_acc": (None, test)}
    return {m: best_last(values(run, m)) for m in WEBVISION_METRICS}


def seconds_per_epoch(runs):
    """Mean over runs of each run's mean epoch wall time (None when no epoch has a time)."""
    means = [sum(s) / len(s) for s in (values(run, "seconds") for run in runs) if s]
    return sum(means) / len(means) if means else None


def mean_std(xs):
    """(mean, sample std with ddof = 1) of the non-None values; std None for fewer than two values."""
    xs = [x for x in xs if x is not None]
    if not xs:
        return None, None
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else None)


def paper_numbers(key, metric):
    """(paper best, paper last) for a row, None where the paper has no number."""
    kind, dataset, mode, r = key[:4]
    if kind == "cifar":
        return PAPER_CIFAR.get((dataset, mode, r), (None, None))
    if kind == "clothing1m":
        return (None, PAPER_CLOTHING1M_TEST) if metric == "test_acc" else (None, None)
    # The paper gives one WebVision number per metric; it is set beside both our best and our last.
    value = PAPER_WEBVISION.get(metric)
    return value, value


def diff(ours, paper):
    """ours - paper, or None when either is missing."""
    return None if ours is None or paper is None else ours - paper


def build_rows(runs):
    """Table rows (CSV_COLUMNS dicts): per group and metric one row of finished runs, one per unfinished run."""
    rows = []
    for key, members in group_runs(runs):
        kind, dataset, mode, r, lambda_u, p_threshold, num_epochs = key
        finished = [m for m in members if m.finished]
        batches = ([(finished, "finished")] if finished else []) + [([m], m.status) for m in members
                                                                    if not m.finished]
        for batch, status in batches:
            metrics = [run_metrics(m) for m in batch]
            for metric in metrics[0]:
                best_mean, best_std = mean_std([m[metric][0] for m in metrics])
                last_mean, last_std = mean_std([m[metric][1] for m in metrics])
                paper_best, paper_last = paper_numbers(key, metric)
                rows.append({
                    "section": kind, "dataset": dataset, "noise_mode": mode, "r": r, "lambda_u": lambda_u,
                    "p_threshold": p_threshold, "num_epochs": num_epochs, "metric": metric,
                    "n_seeds": len(batch), "seeds": " ".join(str(m.seed) for m in batch), "status": status,
                    "best_mean": best_mean, "best_std": best_std, "paper_best": paper_best,
                    "best_diff": diff(best_mean, paper_best), "last_mean": last_mean, "last_std": last_std,
                    "paper_last": paper_last, "last_diff": diff(last_mean, paper_last),
                    "sec_per_epoch": seconds_per_epoch(batch)})
    return rows


# ----------------------------------------------------------------------------- formatting

def fmt(x, spec="%.2f", missing="-"):
    """A number in a fixed format, `missing` for None or NaN."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return missing
    return spec % x


def fmt_num(x):
    """A setting value without trailing zeros (25.0 -> 25), '-' when absent."""
    return "-" if x is None else "%g" % x


def fmt_mean_std(mean, std):
    """'94.12 ± 0.10', or '94.12' without a std."""
    if mean is None:
        return "-"
    return fmt(mean) if std is None else f"{fmt(mean)} ± {fmt(std)}"


def markdown_table(header, lines):
    """A Markdown table from a header and rows of cell strings."""
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(cells) + " |" for cells in lines]
    return "\n".join(out)


def cifar_table(rows):
    """The CIFAR (Table 1) section."""
    header = ("Dataset", "Noise", "lambda_u", "tau", "Epochs", "Seeds", "Best", "Paper best", "Δ best", "Last 10",
              "Paper last", "Δ last", "s/epoch", "Status")
    lines = [(row["dataset"], "%s %g%%" % (row["noise_mode"], row["r"] * 100), fmt_num(row["lambda_u"]),
              fmt_num(row["p_threshold"]), str(row["num_epochs"]), str(row["n_seeds"]),
              fmt_mean_std(row["best_mean"], row["best_std"]), fmt(row["paper_best"]), fmt(row["best_diff"], "%+.2f"),
              fmt_mean_std(row["last_mean"], row["last_std"]), fmt(row["paper_last"]), fmt(row["last_diff"], "%+.2f"),
              fmt(row["sec_per_epoch"], "%.1f"), row["status"]) for row in rows]
    return ("## CIFAR (paper Table 1)\n\nTest accuracy. Best: highest over epochs; Last 10: mean of the last "
            f"{LAST_EPOCHS} epochs.\n\n" + markdown_table(header, lines))


def clothing_table(rows):
    """The Clothing1M section: best validation accuracy and the final test accuracy per row pair."""
    header = ("Epochs", "Seeds", "Best val acc", "Test acc", "Paper test", "Δ test", "s/epoch", "Status")
    lines = []
    # build_rows gives each Clothing1M batch a val_acc row followed by its test_acc row.
    for val, test in zip(rows[0::2], rows[1::2]):
        lines.append((str(val["num_epochs"]), str(val["n_seeds"]), fmt_mean_std(val["best_mean"], val["best_std"]),
                      fmt_mean_std(test["last_mean"], test["last_std"]), fmt(test["paper_last"]),
                      fmt(test["last_diff"], "%+.2f"), fmt(val["sec_per_epoch"], "%.1f"), val["status"]))
    return ("## Clothing1M\n\nBest val acc: highest validation accuracy of either net over epochs; test acc: the two "
            "best-validation checkpoints together, after training.\n\n" + markdown_table(header, lines))


def webvision_table(rows):
    """The WebVision section: top-1/top-5 on WebVision and ImageNet val, best and last epoch."""
    header = ("Epochs", "Seeds", "Metric", "Best", "Last", "Paper", "Δ best", "Δ last", "s/epoch", "Status")
    lines = [(str(row["num_epochs"]), str(row["n_seeds"]), row["metric"],
              fmt_mean_std(row["best_mean"], row["best_std"]), fmt_mean_std(row["last_mean"], row["last_std"]),
              fmt(row["paper_best"]), fmt(row["best_diff"], "%+.2f"), fmt(row["last_diff"], "%+.2f"),
              fmt(row["sec_per_epoch"], "%.1f"), row["status"]) for row in rows]
    return ("## WebVision (first 50 classes) and ILSVRC12\n\nBest: highest over epochs; Last: the last epoch. The "
            "paper gives one number per metric.\n\n" + markdown_table(header, lines))


def render_markdown(rows):
    """The whole report as Markdown text (ends with a newline)."""
    parts = ["# DivideMix: our runs against the paper", SUMMARY]
    tables = {"cifar": cifar_table, "clothing1m": clothing_table, "webvision": webvision_table}
    for kind in KIND_ORDER:
        section = [row for row in rows if row["section"] == kind]
        if section:
            parts.append(tables[kind](section))
    return "\n\n".join(parts) + "\n"


def render_csv(rows):
    """The rows as CSV text: numbers with 4 decimals (seconds 2), empty cells where there is no value."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for row in rows:
        cells = []
        for col in CSV_COLUMNS:
            value = row[col]
            if col in ("lambda_u", "p_threshold", "r"):
                cells.append("" if value is None else "%g" % value)
            elif col == "sec_per_epoch":
                cells.append(fmt(value, "%.2f", ""))
            elif isinstance(value, float):
                cells.append(fmt(value, "%.4f", ""))
            else:
                cells.append("" if value is None else str(value))
        writer.writerow(cells)
    return buf.getvalue()


# ----------------------------------------------------------------------------- command line

def get_args_parser():
    """Command-line arguments of the report."""
    p = argparse.ArgumentParser(description="Tabulate DivideMix runs against the paper's numbers", add_help=True)
    p.add_argument("runs", nargs="+", help="run directories, or folders holding run directories")
    p.add_argument("--out_md", default="report.md", help="Markdown table written here (default: report.md)")
    p.add_argument("--out_csv", default="report.csv", help="CSV written here (default: report.csv)")
    p.add_argument("--plots", default=None, metavar="DIR", help="also draw the plots of plots.py into DIR")
    p.add_argument("--plot_epochs", type=int, nargs="*", default=None,
                   help="epochs of the loss-histogram plots (default: up to 5 saved snapshots)")
    return p


def write_text(path, text):
    """Write text to path (UTF-8), creating its folder."""
    folder = os.path.dirname(path)
    if folder:
        os.makedirs(folder, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as f:
        f.write(text)


def main(args):
    """Find the runs, write the Markdown and CSV reports, print the Markdown, draw plots when asked."""
    runs = find_runs(args.runs)
    rows = build_rows(runs)
    markdown = render_markdown(rows)
    write_text(args.out_md, markdown)
    write_text(args.out_csv, render_csv(rows))
    print(markdown, end="")
    if args.plots:
        import plots  # matplotlib is loaded only when plots are asked for
        written = plots.make_plots(runs, args.plots, args.plot_epochs)
        print(f"\n{len(written)} plot(s) written to {args.plots}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main, get_args_parser().parse_args()))
