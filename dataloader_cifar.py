"""CIFAR-10/100 for DivideMix: the python-pickle format, noise injection and noise files, batched augmentation
on the training device, and the loaders for warm-up, loss evaluation, labeled, unlabeled and test.

Run as a command it writes a noise file without training:
    python dataloader_cifar.py --dataset cifar10 --data_path D --r 0.5 --noise_mode sym --seed 123
"""
import json
import math
import os
import pickle
import random
import shutil
from decimal import Decimal

import numpy as np
import torch
import torch.nn.functional as F

from utils import SEED, FlagParser, Range, UserError, check_flags, check_value, run_main

NUM_CLASSES = {"cifar10": 10, "cifar100": 100}
MEAN_STD = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    "cifar100": ((0.507, 0.487, 0.441), (0.267, 0.256, 0.276)),
}
TRAIN_FILES = {"cifar10": [f"data_batch_{i}" for i in range(1, 6)], "cifar100": ["train"]}
TEST_FILES = {"cifar10": ["test_batch"], "cifar100": ["test"]}
LABEL_KEY = {"cifar10": "labels", "cifar100": "fine_labels"}
ASYM_TRANSITION = {9: 1, 2: 0, 4: 7, 3: 5, 5: 3}  # truck->automobile, bird->airplane, deer->horse, cat<->dog
# CIFAR-100 asym as the successors define it: 20 blocks of 5 consecutive fine-label indices (not the semantic
# superclasses), each class flipping to the next one in its block, the last back to the first.
ASYM_TRANSITION_CIFAR100 = {c: c - c % 5 + (c + 1) % 5 for c in range(100)}
NOISE_MODES = ("sym", "asym")
# Numeric flags of the noise-file command; Train_cifar.py checks the same two with the same ranges.
NOISE_FLAGS = {"r": Range(0, 1, note="the noise ratio as a fraction, e.g. --r 0.5"), "seed": SEED}
# A reused noise file must look like inject_noise's output: its number of changed labels may stray from the
# expected count by NOISE_SIGMAS standard deviations (a genuine file is refused with probability below 1e-8)
# plus NOISE_SLACK labels for the discreteness of tiny training sets.
NOISE_SIGMAS = 6
NOISE_SLACK = 1


# ----------------------------------------------------------------------------- files

def missing_files(data_path, dataset):
    """The CIFAR files of `dataset` absent from data_path."""
    return [f for f in TRAIN_FILES[dataset] + TEST_FILES[dataset] if not os.path.isfile(os.path.join(data_path, f))]


def download(data_path, dataset):
    """Fetch the python-version CIFAR archive with torchvision (checksummed) and place its files in data_path."""
    import torchvision  # only needed here
    cls = {"cifar10": torchvision.datasets.CIFAR10, "cifar100": torchvision.datasets.CIFAR100}[dataset]
    os.makedirs(data_path, exist_ok=True)
    try:
        cls(root=data_path, train=True, download=True)
    except Exception as exc:
        raise UserError(f"could not download {dataset} ({type(exc).__name__}: {exc}); place "
                        f"{', '.join(TRAIN_FILES[dataset] + TEST_FILES[dataset])} in {data_path} by hand") from exc
    extracted = os.path.join(data_path, cls.base_folder)
    for name in os.listdir(extracted):
        target = os.path.join(data_path, name)
        if not os.path.exists(target):
            shutil.move(os.path.join(extracted, name), target)
    shutil.rmtree(extracted, ignore_errors=True)
    archive = os.path.join(data_path, cls.filename)
    if os.path.exists(archive):
        os.remove(archive)


def ensure_data(data_path, dataset, allow_download):
    """Check that the CIFAR files are present, downloading them when allowed; UserError otherwise."""
    missing = missing_files(data_path, dataset)
    if missing and allow_download:
        download(data_path, dataset)
        missing = missing_files(data_path, dataset)
    if missing:
        raise UserError(f"{data_path} lacks {', '.join(missing)} (the python version of {dataset}): point "
                        f"--data_path at the folder holding {', '.join(TRAIN_FILES[dataset] + TEST_FILES[dataset])}"
                        f" or pass --download")


def _read_batch(path, label_key, num_class):
    """Read one pickled CIFAR batch: (N x 3 x 32 x 32 uint8 array, int64 labels), pixels and labels range-checked."""
    try:
        with open(path, "rb") as f:
            entry = pickle.load(f, encoding="latin1")
        raw = np.asarray(entry["data"])
        labels = np.asarray(entry[label_key])
        if raw.ndim != 2 or raw.shape[1] != 3072 or labels.ndim != 1 or len(labels) != raw.shape[0]:
            raise ValueError(f"data {raw.shape} with {labels.shape} labels")
    except Exception as exc:
        raise UserError(f"{path} is truncated or corrupt ({type(exc).__name__}: {exc}): replace it with the "
                        "original file (or delete it and pass --download)") from None
    fix = ("replace it with the original file (or delete it and pass --download); a data set of your own in this "
           "layout needs")
    if raw.dtype != np.uint8:
        # Casting to uint8 would wrap 256 to 0 and -1 to 255 without a word: check the values first.
        whole = raw.dtype.kind in "iu" or (raw.dtype.kind == "f" and bool(np.all(np.mod(raw, 1) == 0)))
        if not whole:
            raise UserError(f"{path} has pixel values that are not whole numbers (dtype {raw.dtype}): {fix} uint8 "
                            "pixels 0..255")
        outside = raw[(raw < 0) | (raw > 255)]
        if outside.size:
            raise UserError(f"{path} has pixel values outside 0..255 (e.g. {outside[0]}): {fix} uint8 pixels 0..255")
        raw = raw.astype(np.uint8)
    if labels.dtype.kind not in "iu" and labels.size:  # an empty list reads as float64: no label is wrong
        raise UserError(f"{path} has labels that are not integers (dtype {labels.dtype}): {fix} integer labels")
    outside = labels[(labels < 0) | (labels >= num_class)]
    if outside.size:
        raise UserError(f"{path} has labels outside 0..{num_class - 1} (e.g. {outside[0]}): {fix} labels 0..C-1 "
                        "and --num_class C")
    return raw.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def read_cifar(data_path, dataset, num_class=None):
    """Read train and test sets: (train_images N x 3 x 32 x 32 uint8, train_labels, test_images, test_labels)."""
    # every label, train and test alike, must lie in 0..num_class-1 (default: the classes of `dataset`)
    num_class = NUM_CLASSES[dataset] if num_class is None else num_class
    parts = [_read_batch(os.path.join(data_path, f), LABEL_KEY[dataset], num_class) for f in TRAIN_FILES[dataset]]
    test = [_read_batch(os.path.join(data_path, f), LABEL_KEY[dataset], num_class) for f in TEST_FILES[dataset]]
    train_x = np.concatenate([p[0] for p in parts])
    train_y = np.concatenate([p[1] for p in parts])
    test_x = np.concatenate([p[0] for p in test])
    test_y = np.concatenate([p[1] for p in test])
    return train_x, train_y, test_x, test_y


# ----------------------------------------------------------------------------- noise

def asym_transition(dataset):
    """The asymmetric class map of a data set: CIFAR-10's semantic pairs, or CIFAR-100's blocks of five."""
    return ASYM_TRANSITION_CIFAR100 if dataset == "cifar100" else ASYM_TRANSITION


def inject_noise(clean_labels, r, noise_mode, num_class, seed, transition=ASYM_TRANSITION):
    """The original code's noisy labels, bit for bit, in linear time.

    Python's random seeded with `seed`, first use: shuffle range(N), the first int(r * N) indices are noisy;
    then in index order each noisy label is redrawn uniformly over all classes (sym) or mapped through the
    asymmetric class transition (asym; default CIFAR-10's map, the original's).
    """
    if noise_mode not in NOISE_MODES:
        raise UserError(f"unknown --noise_mode {noise_mode!r}: use one of {', '.join(NOISE_MODES)}")
    rng = random.Random(seed)
    n = len(clean_labels)
    idx = list(range(n))
    rng.shuffle(idx)
    noisy = np.zeros(n, dtype=bool)
    noisy[idx[:int(r * n)]] = True
    labels = [int(y) for y in clean_labels]
    for i in np.flatnonzero(noisy).tolist():  # ascending, as the original's loop over i
        if noise_mode == "sym":
            labels[i] = rng.randint(0, num_class - 1)
        else:
            labels[i] = transition.get(labels[i], labels[i])
    return labels


def noise_seed(seed, legacy_string_seed=False):
    """The seed of inject_noise: the integer --seed, or its text with --legacy_string_seed.

    The original declares --seed without a type: its default is the integer 123, but a --seed given on its command
    line reaches Python's random as a string, which random seeds from the string's SHA-512 and so draws other noisy
    labels (its torch seed, int() of the string, is the same). The text reproduces those noise files."""
    return str(seed) if legacy_string_seed else seed


def ratio_text(r):
    """r as file names show it: one decimal where that is exact (the original's names), else every digit of r."""
    r = float(r)
    if r == round(r, 1):
        return "%.1f" % r
    # repr is the shortest text that reads back as r; Decimal writes it without an exponent (1e-05 -> 0.00001)
    return format(Decimal(repr(r)), "f")


def noise_file_path(data_path, r, noise_mode):
    """<data_path>/<r>_<noise_mode>.json: the original code's name (0.5_sym.json) for one-decimal r."""
    return os.path.join(data_path, "%s_%s.json" % (ratio_text(r), noise_mode))


def change_rate(clean_labels, noise_mode, num_class, transition=ASYM_TRANSITION):
    """The fraction of the labels inject_noise picks as noisy that end up changed."""
    if noise_mode == "sym":
        return (num_class - 1) / num_class  # a redrawn label keeps its class 1/C of the time
    moved = [c for c, to in transition.items() if to != c]
    clean = np.asarray(clean_labels)
    return float(np.isin(clean, moved).mean()) if len(clean) else 0.0


def expected_changes(clean_labels, r, noise_mode, num_class, transition=ASYM_TRANSITION):
    """Mean and standard deviation of the number of labels inject_noise changes in clean_labels."""
    n = len(clean_labels)
    k = int(r * n)
    p = change_rate(clean_labels, noise_mode, num_class, transition)
    if noise_mode == "sym":  # each of the k redrawn labels changes independently
        return k * p, math.sqrt(k * p * (1 - p))
    # The k noisy indices are drawn without replacement: the mapped ones among them are hypergeometric.
    var = k * p * (1 - p) * (n - k) / (n - 1) if n > 1 else 0.0
    return k * p, math.sqrt(var)


def check_noise_fits(path, labels, clean_labels, r, noise_mode, num_class, transition=ASYM_TRANSITION):
    """UserError when a reused noise file cannot be inject_noise's output for this r and noise mode."""
    labels, clean = np.asarray(labels, dtype=np.int64), np.asarray(clean_labels, dtype=np.int64)
    changed = labels != clean
    fix = ("delete it to regenerate, pass the --r and --noise_mode it was made with, or give this run another "
           "--noise_file")
    if noise_mode == "asym":
        table = np.arange(max(num_class, max(transition) + 1, int(clean.max(initial=0)) + 1))
        table[list(transition)] = list(transition.values())
        off = np.flatnonzero(changed & (labels != table[clean]))
        if off.size:
            i = int(off[0])
            raise UserError(f"noise file {path} changes label {i} from class {clean[i]} to {labels[i]}, which the "
                            f"asymmetric map (class {clean[i]} -> {table[clean[i]]}) never does, so it is no "
                            f"asym noise file of this data set: {fix}")
    n = len(clean)
    mean, sd = expected_changes(clean, r, noise_mode, num_class, transition)
    tolerance = NOISE_SIGMAS * sd + NOISE_SLACK
    count = int(changed.sum())
    if abs(count - mean) <= tolerance:
        return
    # The fraction of noisy labels that change: from it the r the file was probably made with.
    rate = change_rate(clean, noise_mode, num_class, transition)
    guess = f" (it looks made with --r {count / (n * rate):.2f})" if rate > 0 and count <= n * rate else ""
    raise UserError(f"noise file {path} does not fit --r {r} --noise_mode {noise_mode}: {count / n:.4f} of its labels "
                    f"differ from the clean ones where {mean / n:.4f} +- {tolerance / n:.4f} are expected{guess}: {fix}")


def load_or_create_noise(path, clean_labels, r, noise_mode, num_class, seed, transition=ASYM_TRANSITION):
    """Read the noise file if it exists (validated), else inject noise and write it. Returns (labels, created)."""
    n = len(clean_labels)
    if os.path.exists(path):
        try:
            with open(path) as f:
                labels = json.load(f)
        except (OSError, ValueError) as exc:
            raise UserError(f"noise file {path} is not a JSON list ({exc}): delete it to regenerate") from None
        if not isinstance(labels, list) or len(labels) != n:
            size = len(labels) if isinstance(labels, list) else type(labels).__name__
            raise UserError(f"noise file {path} has {size} labels but the training set has {n}: delete it to "
                            "regenerate, or use the --data_path it was made for")
        # JSON true/false load as bool, a subclass of int: they are no labels either.
        odd = [y for y in labels if isinstance(y, bool) or not isinstance(y, int)]
        if odd:
            raise UserError(f"noise file {path} holds non-integer values (e.g. {json.dumps(odd[0])}), not class "
                            "labels: delete it to regenerate, or give a JSON list of integer labels")
        bad = [y for y in labels if not 0 <= y < num_class]
        if bad:
            raise UserError(f"noise file {path} has labels outside 0..{num_class - 1} (e.g. {bad[0]!r}): it was "
                            "made for another dataset; delete it to regenerate")
        check_noise_fits(path, labels, clean_labels, r, noise_mode, num_class, transition)
        return labels, False
    labels = inject_noise(clean_labels, r, noise_mode, num_class, seed, transition)
    tmp = path + ".tmp"
    try:
        with open(tmp, "w") as f:
            json.dump(labels, f)
        os.replace(tmp, path)
    except OSError as exc:
        raise UserError(f"cannot write noise file {path} ({exc}): make --data_path writable") from None
    return labels, True


# ----------------------------------------------------------------------------- batched augmentation

def normalise(images, mean, std):
    """uint8 N x 3 x H x W -> float, scaled to [0, 1] then normalised per channel."""
    return (images.float().div_(255) - mean) / std


def random_crop_flip(images, padding=4):
    """Random crop of the zero-padded images back to their size, then horizontal flip with p = 0.5.

    One gather per axis over the whole batch; the flip is folded into the column indices.
    """
    n, c, h, w = images.shape
    padded = F.pad(images, (padding, padding, padding, padding))
    dev = images.device
    oy = torch.randint(0, 2 * padding + 1, (n, 1), device=dev)
    ox = torch.randint(0, 2 * padding + 1, (n, 1), device=dev)
    flip = torch.rand(n, 1, device=dev) < 0.5
    ar_h = torch.arange(h, device=dev)
    ar_w = torch.arange(w, device=dev)
    rows = oy + ar_h
    cols = ox + torch.where(flip, w - 1 - ar_w, ar_w)
    out = padded.gather(2, rows.view(n, 1, h, 1).expand(n, c, h, w + 2 * padding))
    return out.gather(3, cols.view(n, 1, 1, w).expand(n, c, h, w))


class Batches:
    """Batches over a subset of device-resident samples, shuffled or in order; `make(idx)` builds a batch.

    With a Shard (several processes) a shuffled pass is this rank's share of a shuffle common to all ranks, in
    batches of batch_size / world; a pass in order is this rank's contiguous span.
    """

    def __init__(self, make, indices, batch_size, shuffle, shard=None):
        """indices: 1-D long tensor on the data's device; batch_size: the global batch."""
        self.make, self.indices, self.batch_size, self.shuffle, self.shard = make, indices, batch_size, shuffle, shard
        self.num_samples = int(indices.numel())
        if shard is not None:
            if shuffle:
                self.batch_size //= shard.world
                self.num_samples = -(-self.num_samples // shard.world)
            else:
                start, stop = shard.span(self.num_samples)
                self.indices, self.num_samples = indices[start:stop], stop - start

    def __len__(self):
        """Number of batches (the last partial batch is kept)."""
        return -(-self.num_samples // self.batch_size)

    def __iter__(self):
        """Yield the batches of one pass."""
        order = self.indices
        if self.shuffle and self.shard is not None:
            order = order[self.shard.order(int(order.numel())).to(order.device)]
        elif self.shuffle:
            order = order[torch.randperm(self.num_samples, device=order.device)]
        for start in range(0, self.num_samples, self.batch_size):
            yield self.make(order[start:start + self.batch_size])


class CIFARData:
    """The CIFAR training and test sets as tensors on the training device, with DivideMix's loaders."""

    def __init__(self, train_images, noisy_labels, clean_labels, test_images, test_labels, dataset, device,
                 shard=None):
        """Images uint8 N x 3 x 32 x 32 (numpy or tensor); labels sequences of ints; shard: the run's Shard with
        several processes (see Batches)."""
        mean, std = MEAN_STD[dataset]
        self.device, self.shard = device, shard
        self.mean = torch.tensor(mean, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=device).view(1, 3, 1, 1)
        self.train_images = torch.as_tensor(train_images, dtype=torch.uint8).to(device)
        self.noisy_labels = torch.as_tensor(noisy_labels, dtype=torch.long).to(device)
        self.clean_labels = torch.as_tensor(clean_labels, dtype=torch.long)
        self.clean_mask = (self.noisy_labels.cpu() == self.clean_labels).numpy()
        self.test_images = torch.as_tensor(test_images, dtype=torch.uint8).to(device)
        self.test_labels = torch.as_tensor(test_labels, dtype=torch.long).to(device)
        self.all_indices = torch.arange(len(self.noisy_labels), device=device)

    def __len__(self):
        """Number of training images."""
        return len(self.noisy_labels)

    def augment(self, idx):
        """Augmented, normalised training images at idx."""
        return normalise(random_crop_flip(self.train_images[idx]), self.mean, self.std)

    def plain(self, idx):
        """Normalised training images at idx, no augmentation."""
        return normalise(self.train_images[idx], self.mean, self.std)

    def warmup_loader(self, batch_size):
        """All training images, shuffled and augmented, with their noisy labels."""
        make = lambda i: (self.augment(i), self.noisy_labels[i])  # noqa: E731
        return Batches(make, self.all_indices, batch_size, True, self.shard)

    def eval_loader(self, batch_size):
        """All training images in order, unaugmented, with their noisy labels (loss evaluation)."""
        make = lambda i: (self.plain(i), self.noisy_labels[i])  # noqa: E731
        return Batches(make, self.all_indices, batch_size, False, self.shard)

    def labeled_loader(self, pred, prob, batch_size):
        """Images with pred True: two augmented views, noisy label and clean probability w."""
        idx = torch.as_tensor(np.flatnonzero(pred), dtype=torch.long, device=self.device)
        w = torch.as_tensor(np.asarray(prob), dtype=torch.float32, device=self.device)
        make = lambda i: (self.augment(i), self.augment(i), self.noisy_labels[i], w[i])  # noqa: E731
        return Batches(make, idx, batch_size, True, self.shard)

    def unlabeled_loader(self, pred, batch_size):
        """Images with pred False: two augmented views; None when there are none."""
        idx = torch.as_tensor(np.flatnonzero(~np.asarray(pred, dtype=bool)), dtype=torch.long, device=self.device)
        if idx.numel() == 0:
            return None
        return Batches(lambda i: (self.augment(i), self.augment(i)), idx, batch_size, True, self.shard)

    def test_loader(self, batch_size):
        """Test images in order, unaugmented, with their labels."""
        make = lambda i: (normalise(self.test_images[i], self.mean, self.std), self.test_labels[i])  # noqa: E731
        return Batches(make, torch.arange(len(self.test_labels), device=self.device), batch_size, False, self.shard)


# ----------------------------------------------------------------------------- command

def get_args_parser():
    """Arguments of the noise-file command."""
    parser = FlagParser(description="Write a CIFAR noise file without training.")
    parser.add_argument("--dataset", default="cifar10", type=str)
    parser.add_argument("--data_path", default="./cifar-10", type=str)
    parser.add_argument("--r", "--noise_ratio", default=0.5, type=float, dest="r", help="noise ratio")
    parser.add_argument("--noise_mode", default="sym", type=str)
    parser.add_argument("--seed", default=123, type=int)
    parser.add_argument("--legacy_string_seed", action="store_true",
                        help="seed the noise with the text of --seed, as the original did for an explicit --seed")
    parser.add_argument("--download", action="store_true", help="fetch CIFAR into --data_path if absent")
    return parser


def validate_setting(dataset, r, noise_mode):
    """UserError for an unknown dataset or noise mode, or a noise ratio outside [0, 1]."""
    if dataset not in NUM_CLASSES:
        raise UserError(f"unknown --dataset {dataset!r}: use cifar10 or cifar100")
    if noise_mode not in NOISE_MODES:
        raise UserError(f"unknown --noise_mode {noise_mode!r}: use one of {', '.join(NOISE_MODES)}")
    check_value("r", r, NOISE_FLAGS["r"])


def main(args):
    """Write (or reuse) <data_path>/<r>_<mode>.json and report the fraction of changed labels."""
    check_flags(args, NOISE_FLAGS)
    validate_setting(args.dataset, args.r, args.noise_mode)
    ensure_data(args.data_path, args.dataset, args.download)
    _, clean, _, _ = read_cifar(args.data_path, args.dataset)
    path = noise_file_path(args.data_path, args.r, args.noise_mode)
    labels, created = load_or_create_noise(path, clean, args.r, args.noise_mode, NUM_CLASSES[args.dataset],
                                           noise_seed(args.seed, args.legacy_string_seed),
                                           asym_transition(args.dataset))
    changed = float(np.mean(np.asarray(labels) != clean))
    print(f"{path} ({'written' if created else 'exists, kept'}): {changed:.4f} of {len(clean)} labels changed")


if __name__ == "__main__":
    run_main(main, get_args_parser().parse_args())
