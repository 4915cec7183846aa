"""Compare finished (and unfinished) runs with the published numbers: one Markdown report and one CSV.

    python report.py runs/ [more run dirs ...] [--out_md report.md] [--out_csv report.csv] [--plots plots/]

A run is found by its `<prefix>_config.json`; an argument may be a run directory or any folder above run
directories. CIFAR runs are grouped by cell (dataset, noise mode, r, open-set ratio) and by the settings that
change results (lambda_u, p_threshold, num_epochs); finished runs of a group share one row (mean and sample
standard deviation, ddof = 1, over seeds), every unfinished run gets a row of its own. CIFAR rows go to one table
per family: the paper's Table 1 (sym, CIFAR-10 asym), CIFAR-N human labels, CIFAR-100 instance-dependent noise,
and the other settings (nothing published); the footnotes cite every published number's source. Clothing1M and
WebVision runs (written by Train_clothing1M.py and Train_webvision.py) get tables of their own.
"""
import csv
import io
import math
import os
import statistics
import sys

from cli import run_main
from flags import FlagParser
from published import (CIFAR_TABLES, PAPER_CLOTHING1M_TEST, PAPER_WEBVISION, SOURCES, Published, cifar_published,
                       cifar_table)
from rundirs import KIND_ORDER, find_runs, fmt_num, group_runs

WEBVISION_METRICS = ("webvision_top1", "webvision_top5", "imagenet_top1", "imagenet_top5")
LAST_EPOCHS = 10  # the paper's "last": mean test accuracy of the last 10 epochs
# Report sections in order: the CIFAR tables, then the real-noise datasets.
SECTION_ORDER = tuple(table for table, _ in CIFAR_TABLES) + KIND_ORDER[1:]
# paper_*: the primary published number of a row (with its source); alt_*: a second one where there is one.
CSV_COLUMNS = ("section", "dataset", "noise_mode", "r", "ood_ratio", "lambda_u", "p_threshold", "num_epochs",
               "metric", "n_seeds", "seeds", "status", "best_mean", "best_std", "paper_best", "paper_best_std",
               "best_diff", "last_mean", "last_std", "paper_last", "last_diff", "paper_source", "alt_best",
               "alt_best_std", "alt_diff", "alt_source", "sec_per_epoch")
SUMMARY = ("Accuracy in %. Ours: mean ± sample standard deviation (ddof = 1) over seeds; no ± with one seed. "
           "Δ = ours − paper (paper: Li, Socher and Hoi, ICLR 2020, Tables 1 and 2). "
           "s/epoch: mean wall time of an epoch. Each unfinished run has a row of its own with its numbers so far.")
NOTHING_PUBLISHED = Published(None, None, None, None)  # empty paper_* / alt_* cells where nothing is published
# Footnotes cited by each section's table (keys of published.SOURCES).
SECTION_SOURCES = {"cifar_n": ("cifarn", "noisypy"), "cifar_idn": ("instancegm",)}


# ----------------------------------------------------------------------------- numbers

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


def published_numbers(key, metric):
    """The published numbers beside a row (primary first; [] where nothing is published)."""
    if key.kind == "cifar":
        return cifar_published(key.dataset, key.mode, key.r, key.ood_ratio)
    if key.kind == "clothing1m":
        return [Published("dividemix", None, None, PAPER_CLOTHING1M_TEST)] if metric == "test_acc" else []
    # The paper gives one WebVision number per metric; it is set beside both our best and our last.
    value = PAPER_WEBVISION.get(metric)
    return [Published("dividemix", value, None, value)]


def section_of(key):
    """The report section of a group: one of the CIFAR tables, or the real-noise dataset."""
    return cifar_table(key.dataset, key.mode, key.ood_ratio) if key.kind == "cifar" else key.kind


def diff(ours, paper):
    """ours - paper, or None when either is missing."""
    return None if ours is None or paper is None else ours - paper


def build_rows(runs):
    """Table rows (CSV_COLUMNS dicts): per group and metric one row of finished runs, one per unfinished run."""
    rows = []
    for key, members in group_runs(runs):
        finished = [m for m in members if m.finished]
        batches = ([(finished, "finished")] if finished else []) + [([m], m.status) for m in members
                                                                    if not m.finished]
        for batch, status in batches:
            metrics = [run_metrics(m) for m in batch]
            for metric in metrics[0]:
                best_mean, best_std = mean_std([m[metric][0] for m in metrics])
                last_mean, last_std = mean_std([m[metric][1] for m in metrics])
                published = published_numbers(key, metric)
                paper, alt = (published + [NOTHING_PUBLISHED] * 2)[:2]
                rows.append({
                    "section": section_of(key), "dataset": key.dataset, "noise_mode": key.mode, "r": key.r,
                    "ood_ratio": key.ood_ratio, "lambda_u": key.lambda_u, "p_threshold": key.p_threshold,
                    "num_epochs": key.num_epochs, "metric": metric, "n_seeds": len(batch),
                    "seeds": " ".join(str(m.seed) for m in batch), "status": status,
                    "best_mean": best_mean, "best_std": best_std, "paper_best": paper.best,
                    "paper_best_std": paper.best_std, "best_diff": diff(best_mean, paper.best),
                    "last_mean": last_mean, "last_std": last_std, "paper_last": paper.last,
                    "last_diff": diff(last_mean, paper.last), "paper_source": source_label(paper.source),
                    "alt_best": alt.best, "alt_best_std": alt.best_std, "alt_diff": diff(best_mean, alt.best),
                    "alt_source": source_label(alt.source), "sec_per_epoch": seconds_per_epoch(batch)})
    # Sections in report order; within one, the groups' paper order is kept (the sort is stable).
    return sorted(rows, key=lambda row: SECTION_ORDER.index(row["section"]))


def source_label(source):
    """Short name of a published source for the CSV, None without one."""
    return None if source is None else SOURCES[source][0]


# ----------------------------------------------------------------------------- formatting

def fmt(x, spec="%.2f", missing="-"):
    """A number in a fixed format, `missing` for None or NaN."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return missing
    return spec % x


def fmt_mean_std(mean, std):
    """'94.12 ± 0.10', or '94.12' without a std."""
    if mean is None:
        return "-"
    return fmt(mean) if std is None else f"{fmt(mean)} ± {fmt(std)}"


def noise_text(row):
    """The Noise cell: 'sym 50%' for a noise rate, the label set's name ('worst') for CIFAR-N."""
    return row["noise_mode"] if row["r"] is None else "%s %g%%" % (row["noise_mode"], row["r"] * 100)


def markdown_table(header, lines):
    """A Markdown table from a header and rows of cell strings."""
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(cells) + " |" for cells in lines]
    return "\n".join(out)


def settings_cells(row):
    """The lambda_u, tau, Epochs and Seeds cells of a CIFAR row."""
    return (fmt_num(row["lambda_u"]), fmt_num(row["p_threshold"]), str(row["num_epochs"]), str(row["n_seeds"]))


def cifar_table1(rows, heading):
    """The CIFAR (Table 1) section."""
    header = ("Dataset", "Noise", "lambda_u", "tau", "Epochs", "Seeds", "Best", "Paper best", "Δ best", "Last 10",
              "Paper last", "Δ last", "s/epoch", "Status")
    lines = [(row["dataset"], noise_text(row)) + settings_cells(row) +
             (fmt_mean_std(row["best_mean"], row["best_std"]), fmt(row["paper_best"]), fmt(row["best_diff"], "%+.2f"),
              fmt_mean_std(row["last_mean"], row["last_std"]), fmt(row["paper_last"]), fmt(row["last_diff"], "%+.2f"),
              fmt(row["sec_per_epoch"], "%.1f"), row["status"]) for row in rows]
    return (f"## {heading}\n\nTest accuracy. Best: highest over epochs; Last 10: mean of the last "
            f"{LAST_EPOCHS} epochs.\n\n" + markdown_table(header, lines))


def cifar_n_table(rows, heading):
    """The CIFAR-N section: ours beside the CIFAR-N paper's and the noisypy reproduction's best-epoch numbers."""
    header = ("Dataset", "Labels", "lambda_u", "tau", "Epochs", "Seeds", "Best", "CIFAR-N paper best[^cifarn]",
              "Δ best", "noisypy best[^noisypy]", "Δ best", "Last 10", "s/epoch", "Status")
    lines = [(row["dataset"], noise_text(row)) + settings_cells(row) +
             (fmt_mean_std(row["best_mean"], row["best_std"]), fmt_mean_std(row["paper_best"], row["paper_best_std"]),
              fmt(row["best_diff"], "%+.2f"), fmt_mean_std(row["alt_best"], row["alt_best_std"]),
              fmt(row["alt_diff"], "%+.2f"), fmt_mean_std(row["last_mean"], row["last_std"]),
              fmt(row["sec_per_epoch"], "%.1f"), row["status"]) for row in rows]
    return (f"## {heading}\n\nTest accuracy when training on the human labels of CIFAR-10N (aggre, rand1-3, worst) "
            f"or CIFAR-100N (noisy100). Best: highest over epochs; Last 10: mean of the last {LAST_EPOCHS} epochs. "
            "Both published columns are best-epoch numbers (mean ± std over their runs): Δ compares them with our "
            "best.\n\n" + markdown_table(header, lines))


def cifar_idn_table(rows, heading):
    """The CIFAR-100 idn section: ours beside DivideMix as reported by InstanceGM."""
    header = ("Dataset", "Noise", "lambda_u", "tau", "Epochs", "Seeds", "Best", "Published best[^instancegm]",
              "Δ best", "Last 10", "s/epoch", "Status")
    lines = [(row["dataset"], noise_text(row)) + settings_cells(row) +
             (fmt_mean_std(row["best_mean"], row["best_std"]), fmt(row["paper_best"]), fmt(row["best_diff"], "%+.2f"),
              fmt_mean_std(row["last_mean"], row["last_std"]), fmt(row["sec_per_epoch"], "%.1f"), row["status"])
             for row in rows]
    return (f"## {heading}\n\nTest accuracy with instance-dependent noise of rate r. Best: highest over epochs; "
            f"Last 10: mean of the last {LAST_EPOCHS} epochs. The published numbers are taken as best-epoch "
            "numbers: Δ compares them with our best.\n\n" + markdown_table(header, lines))


def cifar_other_table(rows, heading):
    """CIFAR settings nothing is published for: CIFAR-100 asym, CIFAR-10 idn, open-set runs."""
    header = ("Dataset", "Noise", "Open-set", "lambda_u", "tau", "Epochs", "Seeds", "Best", "Last 10", "Published",
              "s/epoch", "Status")
    lines = [(row["dataset"], noise_text(row), "%g%%" % (row["ood_ratio"] * 100) if row["ood_ratio"] else "-") +
             settings_cells(row) +
             (fmt_mean_std(row["best_mean"], row["best_std"]), fmt_mean_std(row["last_mean"], row["last_std"]),
              fmt(row["paper_best"]), fmt(row["sec_per_epoch"], "%.1f"), row["status"]) for row in rows]
    return (f"## {heading}\n\nTest accuracy. Best: highest over epochs; Last 10: mean of the last {LAST_EPOCHS} "
            "epochs. Open-set: the share of training images replaced by images of another dataset (--ood_ratio). "
            "No DivideMix number is published for these settings.\n\n" + markdown_table(header, lines))


def clothing_table(rows, heading):
    """The Clothing1M section: best validation accuracy and the final test accuracy per row pair."""
    header = ("Epochs", "Seeds", "Best val acc", "Test acc", "Paper test", "Δ test", "s/epoch", "Status")
    lines = []
    # build_rows gives each Clothing1M batch a val_acc row followed by its test_acc row.
    for val, test in zip(rows[0::2], rows[1::2]):
        lines.append((str(val["num_epochs"]), str(val["n_seeds"]), fmt_mean_std(val["best_mean"], val["best_std"]),
                      fmt_mean_std(test["last_mean"], test["last_std"]), fmt(test["paper_last"]),
                      fmt(test["last_diff"], "%+.2f"), fmt(val["sec_per_epoch"], "%.1f"), val["status"]))
    return (f"## {heading}\n\nBest val acc: highest validation accuracy of either net over epochs; test acc: the "
            "two best-validation checkpoints together, after training.\n\n" + markdown_table(header, lines))


def webvision_table(rows, heading):
    """The WebVision section: top-1/top-5 on WebVision and ImageNet val, best and last epoch."""
    header = ("Epochs", "Seeds", "Metric", "Best", "Last", "Paper", "Δ best", "Δ last", "s/epoch", "Status")
    lines = [(str(row["num_epochs"]), str(row["n_seeds"]), row["metric"],
              fmt_mean_std(row["best_mean"], row["best_std"]), fmt_mean_std(row["last_mean"], row["last_std"]),
              fmt(row["paper_best"]), fmt(row["best_diff"], "%+.2f"), fmt(row["last_diff"], "%+.2f"),
              fmt(row["sec_per_epoch"], "%.1f"), row["status"]) for row in rows]
    return (f"## {heading}\n\nBest: highest over epochs; Last: the last epoch. The paper gives one number per "
            "metric.\n\n" + markdown_table(header, lines))


def render_markdown(rows):
    """The whole report as Markdown text (ends with a newline); footnotes cite the published numbers' sources."""
    parts = ["# DivideMix: our runs against the paper", SUMMARY]
    tables = {"cifar": cifar_table1, "cifar_n": cifar_n_table, "cifar_idn": cifar_idn_table,
              "cifar_other": cifar_other_table, "clothing1m": clothing_table, "webvision": webvision_table}
    headings = dict(CIFAR_TABLES, clothing1m="Clothing1M", webvision="WebVision (first 50 classes) and ILSVRC12")
    cited = []
    for section_name in SECTION_ORDER:
        section = [row for row in rows if row["section"] == section_name]
        if section:
            parts.append(tables[section_name](section, headings[section_name]))
            cited += SECTION_SOURCES.get(section_name, ())
    if cited:
        # The paper's own numbers keep the summary's short citation, so a report of its settings alone is unchanged.
        paper = [f"Paper: {SOURCES['dividemix'][1]}"] if any(row["paper_source"] == SOURCES["dividemix"][0]
                                                              for row in rows) else []
        parts.append("## Sources\n\n" + "\n\n".join(paper + [f"[^{source}]: {SOURCES[source][1]}"
                                                              for source in cited]))
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
            if col in ("lambda_u", "p_threshold", "r", "ood_ratio"):
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
    p = FlagParser(description="Tabulate DivideMix runs against the paper's numbers")
    p.add_argument("runs", nargs="+", help="run directories, or folders holding run directories")
    p.add_argument("--out_md", default="report.md", help="Markdown table written here")
    p.add_argument("--out_csv", default="report.csv", help="CSV written here")
    p.add_argument("--plots", default=None, metavar="DIR",
                   help="also draw the plots of plots.py into DIR (default: none, no plots)")
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
