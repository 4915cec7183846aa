"""Write synthetic run directories in the formats of Train_cifar.py, Train_clothing1M.py and Train_webvision.py.

No training happens: the numbers are made up (known inputs for the report tests, and the docs' illustration).

    python tests/synthetic_runs.py OUT_DIR   # the synthetic runs behind docs/sweeps.md
"""
import json
import math
import os
import sys

import numpy as np

from presets import run_prefix
from rundirs import LOSSES_SUFFIX, loss_snapshot_name


def write_json_lines(path, records):
    """One strict-JSON object per line."""
    with open(path, "w") as f:
        for record in records:
            f.write(json.dumps(record, allow_nan=False) + "\n")


def write_config(path, script, args):
    """A config file like the training scripts write."""
    with open(path, "w") as f:
        json.dump({"args": args, "sources": {}, "num_train": 1000, "device": "cpu", "torch": "2.x",
                   "script": script}, f, indent=1)


def gaussian_fit(x):
    """(mean, variance) of a sample, variance floored like the GMM's reg_covar."""
    return float(np.mean(x)), float(np.var(x)) + 5e-4


def synthetic_division(rng, clean, separation):
    """Normalised losses for a clean mask, the two-Gaussian model of them (as the saved GMM), clean posteriors."""
    n = len(clean)
    clean_loss = rng.beta(2.0, 2.0 + 18.0 * separation, size=n)
    noisy_loss = rng.beta(2.0 + 4.0 * separation, 3.0, size=n)
    loss = np.where(clean, clean_loss, noisy_loss)
    loss = (loss - loss.min()) / (loss.max() - loss.min())
    fits = [gaussian_fit(loss[clean]), gaussian_fit(loss[~clean])]
    means = np.array([f[0] for f in fits])
    variances = np.array([f[1] for f in fits])
    weights = np.array([clean.mean(), 1.0 - clean.mean()])
    log_pdf = (np.log(weights)[None, :] - 0.5 * np.log(2 * np.pi * variances)[None, :]
               - (loss[:, None] - means[None, :]) ** 2 / (2 * variances[None, :]))
    prob = 1.0 / (1.0 + np.exp(log_pdf[:, 1] - log_pdf[:, 0]))
    return loss.astype(np.float32), prob.astype(np.float32), means, variances, weights


def auc(prob, clean):
    """ROC AUC of prob against the clean mask (rank formula; no ties in synthetic data)."""
    ranks = np.empty(len(prob))
    ranks[np.argsort(prob)] = np.arange(1, len(prob) + 1)
    pos = clean.sum()
    return float((ranks[clean].sum() - pos * (pos + 1) / 2) / (pos * (len(prob) - pos)))


def write_cifar_run(run_dir, dataset="cifar10", r=0.5, noise_mode="sym", seed=123, accs=(), num_epochs=None,
                    lambda_u=25, p_threshold=0.5, warm_up=2, seconds=10.0, snapshots=(), n_samples=1000,
                    ood_ratio=0.0):
    """Write a Train_cifar.py run dir (test accuracy accs[e], npz at `snapshots`; r None: CIFAR-N); its prefix."""
    os.makedirs(run_dir, exist_ok=True)
    prefix = run_prefix(dataset, r, noise_mode, ood_ratio)
    num_epochs = len(accs) - 1 if num_epochs is None else num_epochs
    write_config(os.path.join(run_dir, prefix + "_config.json"), "Train_cifar.py",
                 {"dataset": dataset, "r": r, "noise_mode": noise_mode, "seed": seed, "num_epochs": num_epochs,
                  "lambda_u": lambda_u, "p_threshold": p_threshold, "warm_up": warm_up, "batch_size": 64,
                  "output_dir": run_dir, "ood_ratio": ood_ratio,
                  "ood_path": "/data/other-cifar" if ood_ratio else None})
    rng = np.random.default_rng(seed)
    clean = rng.random(n_samples) >= noise_rate_of(r, noise_mode)
    records = []
    for epoch, acc in enumerate(accs):
        record = {"epoch": epoch, "phase": "warmup" if epoch < warm_up else "train", "lr": 0.02,
                  "test_acc": acc, "seconds": seconds, "time": {"test": 0.1}}
        if epoch < warm_up:
            record["net1"], record["net2"] = {"loss": 2.0 - 0.1 * epoch}, {"loss": 2.1 - 0.1 * epoch}
        else:
            # Divisions get sharper over training: more labeled samples, higher precision and AUC.
            progress = (epoch - warm_up + 1) / max(num_epochs - warm_up + 1, 1)
            arrays = {"clean": clean, "p_threshold": np.float64(p_threshold)}
            for k in (1, 2):
                loss, prob, means, variances, weights = synthetic_division(rng, clean, 0.3 + 0.7 * progress)
                pred = prob > p_threshold
                record[f"net{k}"] = {
                    "labeled": int(pred.sum()), "unlabeled": int((~pred).sum()), "auc": auc(prob, clean),
                    "precision": float((pred & clean).sum() / max(pred.sum(), 1)),
                    "recall": float((pred & clean).sum() / max(clean.sum(), 1)),
                    "Lx": 1.0, "Lu": 0.01, "lambda": float(lambda_u), "iterations": 10,
                    "gmm": {"means": means.tolist(), "vars": variances.tolist(), "weights": weights.tolist()}}
                if ood_ratio:
                    # Fewer replaced images pass the division as training goes on.
                    record[f"net{k}"]["ood_labeled"] = int(n_samples * ood_ratio * (1.0 - 0.8 * progress))
                arrays.update({f"loss{k}": loss, f"prob{k}": prob, f"gmm{k}_means": means,
                               f"gmm{k}_vars": variances, f"gmm{k}_weights": weights})
            if epoch in snapshots:
                losses = os.path.join(run_dir, prefix + LOSSES_SUFFIX)
                os.makedirs(losses, exist_ok=True)
                np.savez_compressed(os.path.join(losses, loss_snapshot_name(epoch)), **arrays)
        records.append(record)
    write_json_lines(os.path.join(run_dir, prefix + "_log.jsonl"), records)
    with open(os.path.join(run_dir, prefix + "_acc.txt"), "w") as f:
        f.writelines("Epoch:%d   Accuracy:%.2f\n" % (e, a) for e, a in enumerate(accs))
    return prefix


def noise_rate_of(r, noise_mode):
    """Fraction of wrong labels: sym r * 9/10 (draws over all 10 classes), asym r / 2 (five classes), idn r."""
    if r is None:
        return 0.2  # a stand-in for the human labels' noise rate
    return {"sym": r * 0.9, "idn": r}.get(noise_mode, r * 0.5)


def write_clothing_run(run_dir, run_id="clothing1m", seed=123, val=(), test_acc=None, seconds=100.0):
    """A Train_clothing1M.py run: val = [(acc1, acc2) per epoch]; the test line when test_acc is given."""
    os.makedirs(run_dir, exist_ok=True)
    write_config(os.path.join(run_dir, run_id + "_config.json"), "Train_clothing1M.py",
                 {"id": run_id, "seed": seed, "num_epochs": 80, "lambda_u": 0, "p_threshold": 0.5})
    records = [{"epoch": e, "phase": "warmup" if e == 0 else "train", "lr": 0.002, "val_acc1": a1, "val_acc2": a2,
                "net1": {}, "net2": {}, "seconds": seconds, "time": {}} for e, (a1, a2) in enumerate(val)]
    if test_acc is not None:
        records.append({"phase": "test", "test_acc": test_acc})
    write_json_lines(os.path.join(run_dir, run_id + "_log.jsonl"), records)


def write_webvision_run(run_dir, run_id="webvision", seed=123, accs=(), num_epochs=80, seconds=1000.0):
    """A Train_webvision.py run: accs = [(wv top1, wv top5, in top1, in top5) per epoch]."""
    os.makedirs(run_dir, exist_ok=True)
    write_config(os.path.join(run_dir, run_id + "_config.json"), "Train_webvision.py",
                 {"id": run_id, "seed": seed, "num_epochs": num_epochs, "lambda_u": 0, "p_threshold": 0.5})
    records = [{"epoch": e, "phase": "warmup" if e == 0 else "train", "lr": 0.01, "webvision_top1": a[0],
                "webvision_top5": a[1], "imagenet_top1": a[2], "imagenet_top5": a[3], "net1": {}, "net2": {},
                "seconds": seconds, "time": {}} for e, a in enumerate(accs)]
    write_json_lines(os.path.join(run_dir, run_id + "_log.jsonl"), records)


def demo_curve(final, epochs, warm_up, seed, noise=0.3):
    """A made-up accuracy curve: fast rise to `final`, a small bump at the lr decay, seeded jitter."""
    rng = np.random.default_rng(seed)
    out = []
    for e in range(epochs + 1):
        acc = final - 3.0 - 25.0 * math.exp(-e / 4.0) + (3.0 if e >= epochs // 2 else 0.0)
        out.append(round(acc + noise * float(rng.standard_normal()), 2))
    return out


def write_demo(out_dir):
    """The synthetic runs used for the illustration in docs/sweeps.md: a short CIFAR-10 sweep with 3 seeds."""
    epochs = 30
    for cell, final in ((("cifar10", "sym", 0.5), 94.0), (("cifar10", "sym", 0.8), 92.5)):
        dataset, mode, r = cell
        for seed in (1, 2, 3):
            run_dir = os.path.join(out_dir, f"{dataset}_{mode}_{r:g}_seed{seed}")
            lambda_u = 25
            write_cifar_run(run_dir, dataset, r, mode, seed, demo_curve(final, epochs, 5, seed * 10 + int(r * 10)),
                            lambda_u=lambda_u, warm_up=5, seconds=60.0 + seed,
                            snapshots=(5, 15, 30) if seed == 1 else (), n_samples=4000)
    unfinished = demo_curve(33.0, 30, 5, 7)[:13]
    write_cifar_run(os.path.join(out_dir, "cifar100_sym_0.9_seed1"), "cifar100", 0.9, "sym", 1, unfinished,
                    num_epochs=30, lambda_u=150, p_threshold=0.6, warm_up=5, seconds=65.0)


if __name__ == "__main__":
    write_demo(sys.argv[1] if len(sys.argv) > 1 else "synthetic_runs")
