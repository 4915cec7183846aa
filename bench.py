"""Time each DivideMix phase on synthetic CIFAR-shaped data, for this project's data path and levers and for a
straightforward implementation of the same algorithm (PIL transforms, DataLoader with workers, fp32), in one run.

    python bench.py --device cuda                      # full CIFAR-10 size: 50,000 train / 10,000 test images
    python bench.py --device cpu --num_train 512       # a couple of minutes on a small CPU
    torchrun --nproc_per_node=8 bench.py               # this project's path on 8 processes, and on one first

Under torchrun with several processes, rank 0 first times the phases alone (before the process group exists, the
other ranks wait for it), then every rank times them together on its shard of the same global batch; the table
shows images/s of both and the scaling efficiency (images/s of N processes / (N x images/s of one)).

Prints a table, then one JSON line with the device, torch version, seconds and images/s per phase for both
implementations, the speedups and the peak memory.
"""
import argparse
import json
import os
import resource
import time

import numpy as np
import torch
import torchvision.transforms as T
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from cli import UserError, run_main
import dataloader_cifar
from distributed import (init_distributed, is_main_process, local_batch_size, make_shard, on_main, select_device,
                         world_size, wrap_ddp)
from dividemix import (DivideMixConfig, Precision, cpu_native_bf16, eval_train, evaluate, gmm_division,
                       normalise_losses, train_epoch, warmup_epoch)
from flags import AT_LEAST_ONE, NON_NEGATIVE, SEED, FlagParser, Range, check_flags
from PreResNet import ResNet18

PHASES = ("warmup", "eval", "gmm", "train1", "train2", "test")
# Allowed values of every numeric flag. The GMM needs two images at least, and the fixed half/half division
# needs both halves non-empty: 16 images make an empty half unlikely (2 / 2**16).
FLAG_RANGES = {"num_train": Range(16, note="the benchmark's division needs both halves"), "num_test": AT_LEAST_ONE,
               "batch_size": AT_LEAST_ONE, "eval_batch_size": AT_LEAST_ONE, "num_workers": NON_NEGATIVE,
               "epochs": Range(1, note="train epochs per net"), "seed": SEED,
               "net_width": Range(1)}


# ----------------------------------------------------------------------------- the straightforward baseline

class PILDataset(Dataset):
    """CIFAR-style dataset returning PIL-transformed tensors, as the original code's loaders do."""

    def __init__(self, images_hwc, labels, mode, transform, prob=None):
        """mode: 'warmup' / 'eval' / 'test' (image, label), 'labeled' (x, x2, label, w), 'unlabeled' (u, u2)."""
        self.images, self.labels, self.mode, self.transform, self.prob = images_hwc, labels, mode, transform, prob

    def __len__(self):
        """Number of images."""
        return len(self.images)

    def __getitem__(self, i):
        """One sample, transformed on the fly from a PIL image."""
        img = Image.fromarray(self.images[i])
        if self.mode == "labeled":
            return self.transform(img), self.transform(img), int(self.labels[i]), float(self.prob[i])
        if self.mode == "unlabeled":
            return self.transform(img), self.transform(img)
        return self.transform(img), int(self.labels[i])


def baseline_loaders(train_hwc, labels, test_hwc, test_labels, pred, prob, args, device):
    """DataLoaders with worker processes and torchvision PIL transforms."""
    mean, std = dataloader_cifar.MEAN_STD["cifar10"]
    train_tf = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(mean, std)])
    test_tf = T.Compose([T.ToTensor(), T.Normalize(mean, std)])
    kw = {"num_workers": args.num_workers, "pin_memory": device.type == "cuda",
          "persistent_workers": args.num_workers > 0}
    return {
        "warmup": DataLoader(PILDataset(train_hwc, labels, "warmup", train_tf), args.batch_size * 2, shuffle=True, **kw),
        "eval": DataLoader(PILDataset(train_hwc, labels, "eval", test_tf), args.eval_batch_size, **kw),
        "labeled": DataLoader(PILDataset(train_hwc[pred], labels[pred], "labeled", train_tf, prob[pred]),
                              args.batch_size, shuffle=True, **kw),
        "unlabeled": DataLoader(PILDataset(train_hwc[~pred], labels[~pred], "unlabeled", train_tf),
                                args.batch_size, shuffle=True, **kw),
        "test": DataLoader(PILDataset(test_hwc, test_labels, "test", test_tf), args.eval_batch_size, **kw),
    }


def fast_loaders(data, pred, prob, args):
    """This project's loaders: device-resident uint8 tensors, batched augmentation."""
    return {"warmup": data.warmup_loader(args.batch_size * 2), "eval": data.eval_loader(args.eval_batch_size),
            "labeled": data.labeled_loader(pred, prob, args.batch_size),
            "unlabeled": data.unlabeled_loader(pred, args.batch_size), "test": data.test_loader(args.eval_batch_size)}


# ----------------------------------------------------------------------------- timing

def _sync(device):
    """Wait for queued device work (and, with several processes, for every rank) so the wall clock covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    if world_size() > 1:
        torch.distributed.barrier()


def _memory(device):
    """Peak memory in bytes: CUDA allocator peak, or the process's peak resident set on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_phases(name, loaders, precision, args, device, clean_mask, shard=None):
    """Run every phase once (train twice when --epochs 2) and return {phase: seconds}, iterations, memory trace.

    With several processes the nets train as DistributedDataParallel (SyncBatchNorm on CUDA), the GMM is fitted
    on rank 0, and evaluation is gathered, as in the training scripts."""
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    nets = []
    for _ in range(2):
        net = ResNet18(num_classes=10, width=args.net_width).to(device)
        if precision.channels_last:
            net = net.to(memory_format=torch.channels_last)
        if args.compile and name == "fast":
            net.compile()
        nets.append(net)
    opts = [torch.optim.SGD(n.parameters(), lr=0.02, momentum=0.9, weight_decay=5e-4) for n in nets]
    train_nets = wrap_ddp(nets, device, sync_bn=device.type == "cuda")
    if shard is not None:
        shard.start_epoch(0)
    cfg = DivideMixConfig(num_class=10, lambda_u=25, warm_up=10, precision=precision)
    times, memory, iters = {}, [], {}

    def timed(phase, fn):
        _sync(device)
        t0 = time.perf_counter()
        result = fn()
        _sync(device)
        times[phase] = time.perf_counter() - t0
        return result

    timed("warmup", lambda: warmup_epoch(train_nets[0], opts[0], loaders["warmup"], device, desc=f"{name} warm-up",
                                         precision=precision))
    losses = timed("eval", lambda: eval_train(nets[0], loaders["eval"], device, precision))
    timed("gmm", lambda: on_main(gmm_division, [normalise_losses(losses)], 0.5, 1, clean_mask))
    for epoch in range(args.epochs):
        for k in range(2):
            out = timed(f"train{k + 1}", lambda: train_epoch(12, train_nets[k], train_nets[1 - k], opts[k],
                                                             loaders["labeled"], loaders["unlabeled"], cfg, device,
                                                             desc=f"{name} train net{k + 1}"))
            iters[f"train{k + 1}"] = out["iterations"]
        memory.append(_memory(device))
    timed("test", lambda: evaluate(nets, loaders["test"], device, precision=precision))
    return times, iters, memory


def get_args_parser():
    """Benchmark arguments."""
    p = FlagParser(description="Time DivideMix phases: this project vs a straightforward baseline")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"],
                   help="where both implementations run (default: cuda when available, else cpu)")
    p.add_argument("--num_train", default=None, type=int, help="training images (default: 50000 on cuda, 512 on cpu)")
    p.add_argument("--num_test", default=None, type=int, help="test images (default: 10000 on cuda, 256 on cpu)")
    p.add_argument("--batch_size", default=64, type=int, help="labeled and unlabeled batch size, as Train_cifar.py")
    p.add_argument("--eval_batch_size", default=1024, type=int, help="batch size of loss evaluation and test")
    p.add_argument("--num_workers", default=min(4, os.cpu_count() or 1), type=int,
                   help="baseline DataLoader workers (default: the CPU count, at most 4)")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast on the fast path (default: as the training scripts, on with CUDA and on "
                        "CPUs with native bf16; off on other CPUs, which run it about 10x slower than fp32)")
    p.add_argument("--channels_last", action=argparse.BooleanOptionalAction, default=True,
                   help="channels_last memory layout on the fast path")
    p.add_argument("--compile", action="store_true", help="torch.compile the fast path's nets")
    p.add_argument("--epochs", default=2, type=int, help="train epochs per net, to see memory growth")
    p.add_argument("--net_width", default=64, type=int,
                   help="channels of the PreAct ResNet-18's first stage, as Train_cifar.py (64: the paper's network)")
    p.add_argument("--skip_baseline", action="store_true", help="time this project's path only")
    p.add_argument("--seed", default=0, type=int, help="seeds the synthetic data and both implementations")
    return p


def synthetic_data(args, device):
    """CIFAR-shaped random images and labels (the same for every --seed on every rank) and a half/half division."""
    n_train = args.num_train or (50000 if device.type == "cuda" else 512)
    n_test = args.num_test or (10000 if device.type == "cuda" else 256)
    rng = np.random.default_rng(args.seed)
    train = rng.integers(0, 256, (n_train, 3, 32, 32), dtype=np.uint8)
    test = rng.integers(0, 256, (n_test, 3, 32, 32), dtype=np.uint8)
    labels = rng.integers(0, 10, n_train)
    clean = labels.copy()
    flipped = rng.random(n_train) < 0.5
    clean[flipped] = (labels[flipped] + 1) % 10
    test_labels = rng.integers(0, 10, n_test)
    prob = rng.random(n_train)
    pred = prob > 0.5  # a fixed half/half division so both implementations train on the same split sizes
    return train, labels, clean, test, test_labels, pred, prob


def time_fast(arrays, args, device, shard=None):
    """Time this project's path (device-resident data, batched augmentation) on this process or shard."""
    train, labels, clean, test, test_labels, pred, prob = arrays
    data = dataloader_cifar.CIFARData(train, labels, clean, test, test_labels, "cifar10", device, shard)
    precision = Precision.from_args(args, device)  # --amp None: the training scripts' default for the device
    return run_phases("fast", fast_loaders(data, pred, prob, args), precision, args, device, data.clean_mask, shard)


def phase_rates(times, iters, arrays):
    """{phase: seconds, images/s, s/iter} and the seconds of one co-divide epoch."""
    n_train, n_test, n_labeled = len(arrays[0]), len(arrays[3]), int(arrays[5].sum())
    images = {"warmup": n_train, "eval": n_train, "gmm": n_train, "test": n_test}
    per = {}
    for phase in PHASES:
        seconds = times[phase]
        if phase.startswith("train"):
            n_img = n_labeled  # the labeled set drives a train epoch
            per_iter = seconds / max(iters[phase], 1)
        else:
            n_img, per_iter = images[phase], None
        per[phase] = {"seconds": seconds, "images_per_s": n_img / seconds, "s_per_iter": per_iter}
    # one co-divide epoch: loss evaluation and GMM for both nets, both train epochs, test
    epoch = 2 * times["eval"] + 2 * times["gmm"] + times["train1"] + times["train2"] + times["test"]
    return per, epoch


def describe(args, arrays, device):
    """The report's common fields."""
    return {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            # the CPU's vector instructions torch runs on, and whether bf16 is native there (the --amp default)
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "cpu_native_bf16": cpu_native_bf16(),
            "torch": torch.__version__, "num_train": len(arrays[0]), "num_test": len(arrays[3]),
            "batch_size": args.batch_size, "amp": args.amp, "channels_last": args.channels_last,
            "compile": args.compile, "epochs": args.epochs, "net_width": args.net_width}


def main(args):
    """Build synthetic data, time both implementations (or, under torchrun, 1 vs N processes), print the table
    and the JSON line."""
    check_flags(args, FLAG_RANGES)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return main_scaling(args)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda but CUDA is not available: use --device cpu")
    arrays = synthetic_data(args, device)
    results = {"fast": time_fast(arrays, args, device)}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    if not args.skip_baseline:
        train, labels, clean, test, test_labels, pred, prob = arrays
        loaders = baseline_loaders(train.transpose(0, 2, 3, 1), labels, test.transpose(0, 2, 3, 1), test_labels,
                                   pred, prob, args, device)
        results["baseline"] = run_phases("baseline", loaders, Precision(), args, device, labels == clean)

    report = describe(args, arrays, device)
    print(f"\n{'phase':<8} {'impl':<9} {'seconds':>9} {'images/s':>10} {'s/iter':>8}")
    for impl, (times, iters, memory) in results.items():
        per, epoch = phase_rates(times, iters, arrays)
        for phase, row in per.items():
            per_iter = row["s_per_iter"]
            print(f"{phase:<8} {impl:<9} {row['seconds']:9.3f} {row['images_per_s']:10.1f} "
                  f"{per_iter if per_iter is not None else float('nan'):8.4f}")
        report[impl] = {"phases": per, "co_divide_epoch_s": epoch, "peak_memory_bytes": max(memory),
                        "memory_after_each_epoch": memory}
    if "baseline" in results:
        report["speedup_vs_baseline"] = report["baseline"]["co_divide_epoch_s"] / report["fast"]["co_divide_epoch_s"]
        report["speedup_train_iteration"] = (
            (report["baseline"]["phases"]["train1"]["s_per_iter"] + report["baseline"]["phases"]["train2"]["s_per_iter"])
            / (report["fast"]["phases"]["train1"]["s_per_iter"] + report["fast"]["phases"]["train2"]["s_per_iter"]))
        print(f"co-divide epoch: fast {report['fast']['co_divide_epoch_s']:.2f}s, baseline "
              f"{report['baseline']['co_divide_epoch_s']:.2f}s, speedup {report['speedup_vs_baseline']:.2f}x; "
              f"per train iteration {report['speedup_train_iteration']:.2f}x")
    report["peak_memory_bytes"] = report["fast"]["peak_memory_bytes"]
    print(json.dumps(report))


def main_scaling(args):
    """Under torchrun with N processes: this project's path on rank 0 alone, then on all N; images/s per phase of
    both and the scaling efficiency. --batch_size is the global batch both times; the device is cuda:LOCAL_RANK
    when CUDA is available (else the CPU), whatever --device says."""
    arrays = None
    if os.environ["RANK"] == "0":  # before the process group exists: the other ranks wait for it meanwhile
        device = select_device(int(os.environ["LOCAL_RANK"])) if torch.cuda.is_available() else torch.device("cpu")
        arrays = synthetic_data(args, device)
        single = time_fast(arrays, args, device)
    device = init_distributed()
    local_batch_size(args.batch_size)
    if arrays is None:  # rank 0 made them already, for the same device
        arrays = synthetic_data(args, device)
    together = time_fast(arrays, args, device, make_shard(args.seed))
    if not is_main_process():
        return
    world = world_size()
    report = {**describe(args, arrays, device), "world_size": world}
    print(f"\n{'phase':<8} {'images/s 1 process':>19} {f'images/s {world} processes':>21} {'efficiency':>11}")
    rows = {}
    for name, (times, iters, memory) in (("one_process", single), ("n_processes", together)):
        per, epoch = phase_rates(times, iters, arrays)
        report[name] = {"phases": per, "co_divide_epoch_s": epoch, "peak_memory_bytes": max(memory)}
        rows[name] = per
    report["efficiency"] = {}
    for phase in PHASES:
        one, many = rows["one_process"][phase]["images_per_s"], rows["n_processes"][phase]["images_per_s"]
        report["efficiency"][phase] = many / (world * one)
        print(f"{phase:<8} {one:19.1f} {many:21.1f} {100 * report['efficiency'][phase]:10.1f}%")
    report["epoch_efficiency"] = report["one_process"]["co_divide_epoch_s"] / (
        world * report["n_processes"]["co_divide_epoch_s"])
    print(f"co-divide epoch: 1 process {report['one_process']['co_divide_epoch_s']:.2f}s, {world} processes "
          f"{report['n_processes']['co_divide_epoch_s']:.2f}s, efficiency {100 * report['epoch_efficiency']:.1f}%")
    print(json.dumps(report))


if __name__ == "__main__":
    run_main(main, get_args_parser().parse_args())
