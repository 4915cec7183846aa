"""Noisy CIFAR labels: symmetric, asymmetric and instance-dependent noise drawn here, CIFAR-N's human labels, open-set
replacement; the noise files and their checks, the noise flags, and the noise-file command, which keeps its name:
    python dataloader_cifar.py --dataset cifar10 --data_path D --r 0.5 --noise_mode sym --seed 123
"""
import json
import math
import os
import random

import numpy as np
import torch

from cifar_files import LABEL_KEY, TRAIN_FILES, ensure_data, read_batch, read_cifar
from cli import UserError, see_doc
from flags import SEED, FlagParser, Range, check_flags, check_value
from presets import CIFARN_MODES, NUM_CLASSES, SYNTHETIC_MODES, noise_file_name, ratio_text

# Where the noise files' errors are explained.
NOISE_DOC = see_doc("Noise files")

ASYM_TRANSITION = {9: 1, 2: 0, 4: 7, 3: 5, 5: 3}  # truck->automobile, bird->airplane, deer->horse, cat<->dog
# CIFAR-100 asym as the successors define it: 20 blocks of 5 consecutive fine-label indices (not the semantic
# superclasses), each class flipping to the next one in its block, the last back to the first.
ASYM_TRANSITION_CIFAR100 = {c: c - c % 5 + (c + 1) % 5 for c in range(100)}
# CIFAR-N (Wei et al., ICLR 2022): each human-label mode's key in the release's file (the worst labels are stored
# as worse_label).
CIFARN_KEYS = {"aggre": "aggre_label", "worst": "worse_label", "rand1": "random_label1", "rand2": "random_label2",
               "rand3": "random_label3", "noisy100": "noisy_label"}
CIFARN_FILES = {"cifar10": "CIFAR-10_human.pt", "cifar100": "CIFAR-100_human.pt"}
# The noise rates of the released files (fraction of labels that differ from clean_label), printed beside ours.
CIFARN_RATES = {"aggre": 0.090, "worst": 0.402, "rand1": 0.172, "rand2": 0.181, "rand3": 0.176, "noisy100": 0.402}
NOISE_MODES = SYNTHETIC_MODES + tuple(CIFARN_MODES)
# Instance-dependent noise (Xia et al., NeurIPS 2020): per-sample flip rates from N(r, IDN_SD^2) cut to [0, 1].
IDN_SD = 0.1
# Open-set replacement draws from numpy's Generator seeded with (--seed, OOD_STREAM): apart from other draws.
OOD_STREAM = 1
# Numeric flags of the noise-file command; Train_cifar.py checks the same ones with the same ranges.
NOISE_FLAGS = {"r": Range(0, 1, note="the noise ratio as a fraction, e.g. --r 0.5"), "seed": SEED,
               "ood_ratio": Range(0, 1, note="the fraction of training images replaced, below 1")}
# A reused noise file must look like inject_noise's output: its number of changed labels may stray from the
# expected count by NOISE_SIGMAS standard deviations (a genuine file is refused with probability below 1e-8)
# plus NOISE_SLACK labels for the discreteness of tiny training sets.
NOISE_SIGMAS = 6
NOISE_SLACK = 1


# ----------------------------------------------------------------------------- synthetic noise and noise files

def asym_transition(dataset):
    """The asymmetric class map of a data set: CIFAR-10's semantic pairs, or CIFAR-100's blocks of five."""
    return ASYM_TRANSITION_CIFAR100 if dataset == "cifar100" else ASYM_TRANSITION


def inject_noise(clean_labels, r, noise_mode, num_class, seed, transition=ASYM_TRANSITION):
    """The original code's noisy labels, bit for bit, in linear time.

    Python's random seeded with `seed`, first use: shuffle range(N), the first int(r * N) indices are noisy;
    then in index order each noisy label is redrawn uniformly over all classes (sym) or mapped through the
    asymmetric class transition (asym; default CIFAR-10's map, the original's).
    """
    if noise_mode not in ("sym", "asym"):
        raise UserError(f"inject_noise draws sym or asym noise, not {noise_mode!r}")
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


def noise_file_path(data_path, r, noise_mode, ood_ratio=0.0):
    """The default noise file of a setting: presets.noise_file_name in data_path."""
    return os.path.join(data_path, noise_file_name(r, noise_mode, ood_ratio))


def change_rate(clean_labels, noise_mode, num_class, transition=ASYM_TRANSITION):
    """The fraction of the labels inject_noise picks as noisy that end up changed."""
    if noise_mode == "idn":
        raise ValueError("idn noise has no picked set: its change rate is that of each label, see expected_changes")
    if noise_mode == "sym":
        return (num_class - 1) / num_class  # a redrawn label keeps its class 1/C of the time
    moved = [c for c, to in transition.items() if to != c]
    clean = np.asarray(clean_labels)
    return float(np.isin(clean, moved).mean()) if len(clean) else 0.0


def expected_changes(clean_labels, r, noise_mode, num_class, transition=ASYM_TRANSITION):
    """Mean and standard deviation of the number of labels inject_noise changes in clean_labels."""
    n = len(clean_labels)
    if noise_mode == "idn":  # every label changes independently, with the mean of its flip rate's distribution
        p = float(idn_flip_distribution(r).mean()) if n else 0.0
        return n * p, math.sqrt(n * p * (1 - p))
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
                            f"asym noise file of this data set: {fix}{NOISE_DOC}")
    n = len(clean)
    mean, sd = expected_changes(clean, r, noise_mode, num_class, transition)
    tolerance = NOISE_SIGMAS * sd + NOISE_SLACK
    count = int(changed.sum())
    if abs(count - mean) <= tolerance:
        return
    # The fraction of noisy labels that change: from it the r the file was probably made with.
    rate = 1.0 if noise_mode == "idn" else change_rate(clean, noise_mode, num_class, transition)
    guess = f" (it looks made with --r {count / (n * rate):.2f})" if n and rate > 0 and count <= n * rate else ""
    raise UserError(f"noise file {path} does not fit --r {r} --noise_mode {noise_mode}: {count / n:.4f} of its labels "
                    f"differ from the clean ones where {mean / n:.4f} +- {tolerance / n:.4f} are expected{guess}: "
                    f"{fix}{NOISE_DOC}")


def draw_noise(clean_labels, r, noise_mode, num_class, seed, transition=ASYM_TRANSITION, images=None):
    """Noisy labels of a synthetic noise mode: the original's sym/asym draws, or instance-dependent from images."""
    if noise_mode == "idn":
        return instance_noise(images, clean_labels, r, num_class, seed).tolist()
    return inject_noise(clean_labels, r, noise_mode, num_class, seed, transition)


def load_or_create_noise(path, clean_labels, r, noise_mode, num_class, seed, transition=ASYM_TRANSITION,
                         images=None, keep=None):
    """Read the noise file if it exists (validated), else draw noise and write it. Returns (labels, created).

    images: the training images (idn noise needs them). keep: with open-set noise, the mask of images not
    replaced: the noise falls on them alone, at rate r; replaced images keep their clean label."""
    n = len(clean_labels)
    if os.path.exists(path):
        try:
            with open(path) as f:
                labels = json.load(f)
        except (OSError, ValueError) as exc:
            raise UserError(f"noise file {path} is not a JSON list ({exc}): delete it to regenerate"
                            f"{NOISE_DOC}") from None
        if not isinstance(labels, list) or len(labels) != n:
            size = len(labels) if isinstance(labels, list) else type(labels).__name__
            raise UserError(f"noise file {path} has {size} labels but the training set has {n}: delete it to "
                            f"regenerate, or use the --data_path it was made for{NOISE_DOC}")
        # JSON true/false load as bool, a subclass of int: they are no labels either.
        odd = [y for y in labels if isinstance(y, bool) or not isinstance(y, int)]
        if odd:
            raise UserError(f"noise file {path} holds non-integer values (e.g. {json.dumps(odd[0])}), not class "
                            f"labels: delete it to regenerate, or give a JSON list of integer labels{NOISE_DOC}")
        bad = [y for y in labels if not 0 <= y < num_class]
        if bad:
            raise UserError(f"noise file {path} has labels outside 0..{num_class - 1} (e.g. {bad[0]!r}): it was "
                            f"made for another dataset; delete it to regenerate{NOISE_DOC}")
        if keep is None:
            check_noise_fits(path, labels, clean_labels, r, noise_mode, num_class, transition)
            return labels, False
        arr, clean = np.asarray(labels, dtype=np.int64), np.asarray(clean_labels, dtype=np.int64)
        moved = np.flatnonzero(~keep & (arr != clean))
        if moved.size:
            raise UserError(f"noise file {path} changes the label of image {moved[0]}, which the open-set "
                            "replacement replaces (those keep their clean label): it was made without this "
                            f"replacement; delete it to regenerate, or pass the --ood_file it was made with{NOISE_DOC}")
        check_noise_fits(path, arr[keep], clean[keep], r, noise_mode, num_class, transition)
        return labels, False
    if keep is None:
        labels = draw_noise(clean_labels, r, noise_mode, num_class, seed, transition, images)
    else:
        arr = np.asarray(clean_labels, dtype=np.int64).copy()
        arr[keep] = draw_noise(arr[keep].tolist(), r, noise_mode, num_class, seed, transition,
                               None if images is None else np.asarray(images)[keep])
        labels = arr.tolist()
    write_json(path, labels, "noise file", "make --data_path writable")
    return labels, True


def write_json(path, content, what, fix):
    """Write JSON through a temporary file and a rename: a reader never sees half a file. UserError on failure."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "w") as f:
            json.dump(content, f)
        os.replace(tmp, path)
    except OSError as exc:
        raise UserError(f"cannot write {what} {path} ({exc}): {fix}") from None


def idn_flip_distribution(r):
    """The flip rate of an image under instance-dependent noise: N(r, IDN_SD^2) cut to [0, 1] (scipy's truncnorm)."""
    from scipy import stats  # only idn noise needs scipy
    return stats.truncnorm((0 - r) / IDN_SD, (1 - r) / IDN_SD, loc=r, scale=IDN_SD)


def instance_noise(images, clean_labels, r, num_class, seed):
    """Instance-dependent noisy labels, equal to those of Xia et al.'s part-dependent generator (NeurIPS 2020) as
    InstanceGM's CIFAR loader calls it, but vectorised (seconds for 50,000 images instead of a loop per image).

    images: N x 3 x 32 x 32 uint8, as read_cifar returns them. The published generator sees each image as its 3072
    raw pixel values (0-255, not scaled) in height-width-channel order, and draws from numpy's legacy RandomState
    seeded with `seed`, in this order: the N flip rates q (scipy's truncnorm, see idn_flip_distribution); the
    float64 projections W = randn(C, 3072, C), used as float32; one uniform per image, in index order, for its
    label. Image i of true class y scores the classes with the float32 logits x_i W[y], its own class masked out;
    its label distribution is q_i * softmax(logits) with 1 - q_i on y (float32), and the label is the first class
    whose normalised float64 cumulative probability exceeds the uniform (numpy's choice). Returns int64 labels.
    """
    clean = np.asarray(clean_labels, dtype=np.int64)
    n = len(clean)
    if n == 0 or num_class < 2:
        return clean.copy()
    rng = np.random.RandomState(seed)
    q = idn_flip_distribution(r).rvs(n, random_state=rng)
    pixels = np.asarray(images, dtype=np.uint8).reshape(n, 3, 32, 32).transpose(0, 2, 3, 1).reshape(n, -1)
    w = torch.from_numpy(rng.randn(num_class, pixels.shape[1], num_class).astype(np.float32))
    logits = torch.empty(n, num_class)
    for c in range(num_class):  # the images of each true class share their projection W[c]
        rows = np.flatnonzero(clean == c)
        logits[rows] = torch.from_numpy(pixels[rows]).float() @ w[c]
    rows, y = torch.arange(n), torch.from_numpy(clean)
    logits[rows, y] = -math.inf
    p = torch.from_numpy(q.astype(np.float32))[:, None] * torch.softmax(logits, dim=1)
    p[rows, y] = torch.from_numpy((1 - q).astype(np.float32))  # the masked class had probability 0
    # numpy's choice: the cumulative sum in float64, normalised by its last entry, searched for one uniform draw
    cdf = np.cumsum(p.numpy().astype(np.float64), axis=1)
    cdf /= cdf[:, -1:]
    u = rng.random_sample(n)
    return (cdf <= u[:, None]).sum(axis=1).astype(np.int64)


# ----------------------------------------------------------------------------- CIFAR-N

def _numpy_array_globals():
    """What torch's weights-only loading must allow to rebuild numpy arrays, under numpy 1's and numpy 2's names."""
    rebuild = np.ndarray.__reduce__(np.zeros(1))[0]  # numpy's _reconstruct
    dtypes = [type(np.dtype(t)) for t in (np.int64, np.int32, np.int16, np.int8, np.uint8, np.uint16, np.uint32,
                                          np.uint64, np.float32, np.float64, np.bool_)]
    return [np.ndarray, np.dtype, *dtypes, (rebuild, "numpy.core.multiarray._reconstruct"),
            (rebuild, "numpy._core.multiarray._reconstruct")]


def cifarn_file_path(data_path, dataset, cifarn_file=None):
    """The CIFAR-N release's file: --cifarn_file, else CIFAR-10_human.pt / CIFAR-100_human.pt in data_path."""
    return cifarn_file or os.path.join(data_path, CIFARN_FILES[dataset])


def read_cifarn(path, noise_mode, clean_labels, num_class):
    """The human labels of a CIFAR-N mode, loaded without arbitrary unpickling and checked against the training
    labels (same data set, same order). Returns a list of ints."""
    dataset = CIFARN_MODES[noise_mode]
    name = CIFARN_FILES[dataset]
    if not os.path.isfile(path):
        raise UserError(f"CIFAR-N file {path} not found: put {name} from the CIFAR-N release "
                        f"(github.com/UCSC-REAL/cifar-10-100n, data/) in --data_path, or pass --cifarn_file{NOISE_DOC}")
    try:
        with torch.serialization.safe_globals(_numpy_array_globals()):
            content = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{path} cannot be loaded as a CIFAR-N file with weights-only loading ({reason}): replace "
                        f"it with {name} of the CIFAR-N release") from None
    key = CIFARN_KEYS[noise_mode]
    if not isinstance(content, dict) or key not in content or "clean_label" not in content:
        found = ", ".join(map(str, content)) if isinstance(content, dict) else type(content).__name__
        raise UserError(f"{path} holds no {key!r} and 'clean_label' (it has: {found}): give {name} of the CIFAR-N "
                        f"release, whose {key} are the {noise_mode} labels")
    clean = np.asarray(clean_labels, dtype=np.int64)
    arrays = {}
    for field in ("clean_label", key):
        value = np.asarray(content[field])
        if value.shape != clean.shape or value.dtype.kind not in "iu":
            raise UserError(f"{path}: {field} is {value.dtype} {value.shape}, not {len(clean)} integer labels of "
                            f"the training set: give {name} of the CIFAR-N release for --dataset {dataset}")
        arrays[field] = value.astype(np.int64)
    differ = np.flatnonzero(arrays["clean_label"] != clean)
    if differ.size:
        i = int(differ[0])
        raise UserError(f"{path}: clean_label differs from the training labels read from --data_path at "
                        f"{differ.size} images (first at {i}: {arrays['clean_label'][i]} vs {clean[i]}), so it "
                        f"belongs to another data set or order: use {name} with the python version of {dataset}"
                        f"{NOISE_DOC}")
    labels = arrays[key]
    outside = labels[(labels < 0) | (labels >= num_class)]
    if outside.size:
        raise UserError(f"{path}: {key} has labels outside 0..{num_class - 1} (e.g. {outside[0]}): give {name} "
                        "of the CIFAR-N release")
    return labels.tolist()


# ----------------------------------------------------------------------------- open-set noise

def read_ood_source(path, dataset):
    """Open-set images as N x 3 x 32 x 32 uint8: the other CIFAR's training images (a folder of its python files)
    or the `images` array (N x 32 x 32 x 3 uint8) of an .npz."""
    if os.path.isdir(path):
        other = "cifar100" if dataset == "cifar10" else "cifar10"
        missing = [f for f in TRAIN_FILES[other] if not os.path.isfile(os.path.join(path, f))]
        if missing:
            raise UserError(f"--ood_path {path} lacks {', '.join(missing)}: give the folder of {other}'s python "
                            f"files (the open-set images of a {dataset} run) or an .npz with an `images` array")
        return np.concatenate([read_batch(os.path.join(path, f), LABEL_KEY[other], NUM_CLASSES[other])[0]
                               for f in TRAIN_FILES[other]])
    fix = "give an .npz whose `images` array is N x 32 x 32 x 3 uint8, or a folder of the other CIFAR's python files"
    if not os.path.isfile(path):
        raise UserError(f"--ood_path {path} does not exist: {fix}")
    try:
        with np.load(path, allow_pickle=False) as archive:
            if "images" not in archive.files:
                raise UserError(f"--ood_path {path} has no `images` array (it has: {', '.join(archive.files)}): "
                                f"{fix}")
            images = archive["images"]
    except UserError:
        raise
    except Exception as exc:
        raise UserError(f"--ood_path {path} is not a readable .npz ({type(exc).__name__}: {exc}): {fix}") from None
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (32, 32, 3):
        raise UserError(f"--ood_path {path}: `images` is {images.dtype} {images.shape}: {fix}")
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2))


def choose_replacement(n, ood_ratio, source_size, seed):
    """The training images to replace (int(ood_ratio * n), sorted) and the source images replacing them, drawn
    without repetition by numpy's Generator seeded with (seed, OOD_STREAM)."""
    k = int(ood_ratio * n)
    if k > source_size:
        raise UserError(f"--ood_ratio {ood_ratio} replaces {k} training images but --ood_path holds {source_size}: "
                        "lower --ood_ratio or give a larger source")
    rng = np.random.default_rng([seed, OOD_STREAM])
    replaced = np.sort(rng.choice(n, k, replace=False)).astype(np.int64)
    return replaced, rng.choice(source_size, k, replace=False).astype(np.int64)


def load_or_create_replacement(path, n, ood_ratio, source_size, seed, source):
    """Read the replacement file if it exists (validated), else choose the replacement and write it.

    Returns (replaced, source_index, created): int64 index arrays into the training set and the source."""
    fix = "delete it to choose again, or pass the --ood_ratio and --ood_path it was made with" + NOISE_DOC
    if os.path.exists(path):
        try:
            with open(path) as f:
                content = json.load(f)
            replaced = np.asarray(content["replaced"], dtype=np.int64)
            source_index = np.asarray(content["source_index"], dtype=np.int64)
            saved_ratio, saved_size = float(content["ood_ratio"]), int(content["source_size"])
        except (OSError, ValueError, TypeError, KeyError) as exc:
            raise UserError(f"replacement file {path} is not one this code writes ({type(exc).__name__}: {exc}): "
                            f"delete it to choose again{NOISE_DOC}") from None
        if saved_ratio != ood_ratio:
            raise UserError(f"replacement file {path} was made for --ood_ratio {saved_ratio:g}, not {ood_ratio:g}: "
                            f"{fix}")
        if saved_size != source_size:
            raise UserError(f"replacement file {path} was made with a source of {saved_size} images, --ood_path "
                            f"has {source_size}: {fix}")
        k = int(ood_ratio * n)
        valid = (replaced.shape == source_index.shape == (k,) and np.unique(replaced).size == k
                 and (k == 0 or (replaced.min() >= 0 and replaced.max() < n and source_index.min() >= 0
                                 and source_index.max() < source_size)))
        if not valid:
            raise UserError(f"replacement file {path} does not hold {k} distinct training indices below {n} with "
                            f"source indices below {source_size}: {fix}")
        return np.sort(replaced), source_index[np.argsort(replaced)], False
    replaced, source_index = choose_replacement(n, ood_ratio, source_size, seed)
    write_json(path, {"ood_ratio": ood_ratio, "source": source, "source_size": source_size, "seed": seed,
                      "replaced": replaced.tolist(), "source_index": source_index.tolist()},
               "replacement file", "make its folder writable or pass another --ood_file")
    return replaced, source_index, True


# ----------------------------------------------------------------------------- a run's noise

def add_noise_arguments(parser):
    """The flags that choose a run's noisy labels and open-set images (the noise command's and Train_cifar.py's)."""
    parser.add_argument("--dataset", default="cifar10", choices=tuple(NUM_CLASSES), help="the CIFAR data set")
    parser.add_argument("--data_path", default="./cifar-10", type=str, help="folder holding the CIFAR python files")
    # torchrun's own parser takes --r for an abbreviation of its options: under torchrun write --noise_ratio
    parser.add_argument("--r", "--noise_ratio", default=None, type=float, dest="r",
                        help="noise ratio in [0, 1]; refused with the CIFAR-N modes, whose file fixes the noise "
                             "(default: 0.5, none with the CIFAR-N modes)")
    parser.add_argument("--noise_mode", default="sym", choices=NOISE_MODES,
                        help="sym, asym, idn (instance-dependent), or CIFAR-N's human labels: aggre, worst, rand1, "
                             "rand2, rand3 (cifar10), noisy100 (cifar100)")
    parser.add_argument("--seed", default=123, type=int,
                        help="one integer seeds the noise draw (and, in training, Python, numpy and torch)")
    parser.add_argument("--legacy_string_seed", action="store_true",
                        help="sym/asym noise as the original drew it for an explicit --seed (seeded with its text)")
    parser.add_argument("--noise_file", default=None, type=str,
                        help="noisy labels to use or create; r in its name with one decimal as in the original's name "
                             "when that is exact, else every digit; no seed in it (default: "
                             "<data_path>/<r>_<noise_mode>.json, with _ood<O> before .json for open-set noise)")
    parser.add_argument("--cifarn_file", default=None, type=str,
                        help="the CIFAR-N release's file (default: CIFAR-10_human.pt or CIFAR-100_human.pt in "
                             "--data_path)")
    parser.add_argument("--ood_ratio", default=0.0, type=float,
                        help="open-set noise: the fraction of training images replaced by --ood_path's images, in "
                             "[0, 1) (0: none)")
    parser.add_argument("--ood_path", default=None, type=str,
                        help="open-set images: the other CIFAR's python files (a folder) or an .npz with `images` "
                             "(default: none; needed with --ood_ratio)")
    parser.add_argument("--ood_file", default=None, type=str,
                        help="which images are replaced, to use or create (default: <noise file>_replaced.json beside "
                             "the noise file; CIFAR-N: <data_path>/<noise_mode>_ood<O>_replaced.json)")


def resolve_noise_args(args):
    """Check the noise flags together (UserError naming the fix) and fill --r's default where it applies."""
    if args.r is None and args.noise_mode not in CIFARN_MODES:
        args.r = 0.5
    validate_setting(args.dataset, args.r, args.noise_mode, args.ood_ratio, args.ood_path, args.legacy_string_seed)
    if args.noise_mode in CIFARN_MODES and args.noise_file:
        raise UserError(f"--noise_file does not apply to CIFAR-N's human labels (--noise_mode {args.noise_mode}): "
                        "give the release's file with --cifarn_file")
    if args.ood_file and not args.ood_ratio:
        raise UserError("--ood_file without --ood_ratio replaces nothing: give --ood_ratio O and --ood_path P")


def noise_source(args):
    """Where a run's labels come from: the CIFAR-N file, or the noise file to read or write."""
    if args.noise_mode in CIFARN_MODES:
        return cifarn_file_path(args.data_path, args.dataset, args.cifarn_file)
    return args.noise_file or noise_file_path(args.data_path, args.r, args.noise_mode, args.ood_ratio)


def ood_file_path(args):
    """The replacement file: --ood_file, else beside the noise file (CIFAR-N: <data_path>/<mode>_ood<O>.json)."""
    if args.ood_file:
        return args.ood_file
    if args.noise_mode in CIFARN_MODES:
        return os.path.join(args.data_path, f"{args.noise_mode}_ood{ratio_text(args.ood_ratio)}_replaced.json")
    stem = noise_source(args)
    return (stem[:-len(".json")] if stem.endswith(".json") else stem) + "_replaced.json"


def make_noise(args, images, clean_labels, num_class, source_size):
    """A run's noisy labels and open-set replacement, read from their files or drawn and written (rank 0's part).

    Returns (labels, replaced, source_index, note): replaced/source_index are int64 index arrays (empty without
    open-set noise); note says which files were used or written."""
    n = len(clean_labels)
    replaced = source_index = np.zeros(0, dtype=np.int64)
    notes = []
    if args.ood_ratio:
        path = ood_file_path(args)
        replaced, source_index, created = load_or_create_replacement(path, n, args.ood_ratio, source_size, args.seed,
                                                                     args.ood_path)
        notes.append(f"replacement file {path} ({'written' if created else 'reused'}, {len(replaced)} images)")
    path = noise_source(args)
    if args.noise_mode in CIFARN_MODES:
        labels = read_cifarn(path, args.noise_mode, clean_labels, num_class)
        rate = float(np.mean(np.asarray(labels) != np.asarray(clean_labels))) if n else 0.0
        notes.append(f"CIFAR-N file {path}, {args.noise_mode} labels {rate:.1%} noisy (the release's: "
                     f"{CIFARN_RATES[args.noise_mode]:.1%})")
        return labels, replaced, source_index, "; ".join(notes)
    keep, r = None, args.r
    if args.ood_ratio:  # the in-distribution noise falls on the images kept, at the rate that leaves r overall
        keep = np.ones(n, dtype=bool)
        keep[replaced] = False
        r = min(1.0, args.r / (1 - args.ood_ratio))
    labels, created = load_or_create_noise(path, clean_labels, r, args.noise_mode, num_class,
                                           noise_seed(args.seed, args.legacy_string_seed),
                                           asym_transition(args.dataset), images, keep)
    notes.append(f"noise file {path} ({'written' if created else 'reused'})")
    return labels, replaced, source_index, "; ".join(notes)


# ----------------------------------------------------------------------------- command

def get_args_parser():
    """Arguments of the noise-file command."""
    parser = FlagParser(description="Write a CIFAR noise file (and open-set replacement file) without training.")
    add_noise_arguments(parser)
    parser.add_argument("--download", action="store_true", help="fetch CIFAR into --data_path if it is absent")
    return parser


def validate_setting(dataset, r, noise_mode, ood_ratio=0.0, ood_path=None, legacy_string_seed=False):
    """UserError for an unknown dataset or noise mode, a noise ratio outside [0, 1], or flags that do not go
    together (CIFAR-N modes take no r and label one data set; open-set noise needs its source)."""
    if dataset not in NUM_CLASSES:
        raise UserError(f"unknown --dataset {dataset!r}: use cifar10 or cifar100")
    if noise_mode not in NOISE_MODES:
        raise UserError(f"unknown --noise_mode {noise_mode!r}: use one of {', '.join(NOISE_MODES)}")
    if noise_mode in CIFARN_MODES:
        if CIFARN_MODES[noise_mode] != dataset:
            raise UserError(f"--noise_mode {noise_mode} is CIFAR-N's human labels of {CIFARN_MODES[noise_mode]}, "
                            f"not {dataset}: use --dataset {CIFARN_MODES[noise_mode]}, or "
                            f"{'noisy100' if dataset == 'cifar100' else 'aggre, worst, rand1, rand2 or rand3'}")
        if r is not None:
            raise UserError(f"--r does not apply to CIFAR-N's human labels (--noise_mode {noise_mode}): the file "
                            "fixes the noise; drop --r")
    else:
        check_value("r", r, NOISE_FLAGS["r"])
    if legacy_string_seed and noise_mode not in ("sym", "asym"):
        raise UserError(f"--legacy_string_seed reproduces the original's sym and asym noise, not --noise_mode "
                        f"{noise_mode}: drop it")
    check_value("ood_ratio", ood_ratio, NOISE_FLAGS["ood_ratio"])
    if ood_ratio >= 1:
        raise UserError(f"--ood_ratio {ood_ratio:g} would replace every training image: give a fraction below 1")
    if ood_ratio and not ood_path:
        raise UserError(f"--ood_ratio {ood_ratio:g} needs --ood_path: the folder of CIFAR-100's python files "
                        "(training on cifar10) or an .npz whose `images` are N x 32 x 32 x 3 uint8")
    if ood_path and not ood_ratio:
        raise UserError("--ood_path without --ood_ratio replaces nothing: give --ood_ratio O (e.g. 0.2)")
    if ood_ratio and noise_mode not in CIFARN_MODES and r > 1 - ood_ratio:
        raise UserError(f"--r {r:g} with --ood_ratio {ood_ratio:g} asks for more noisy labels than images left "
                        f"(r / (1 - ood_ratio) > 1): lower --r or --ood_ratio")


def main(args):
    """Write (or reuse) the noise file, and the replacement file of open-set noise; report the noise."""
    check_flags(args, NOISE_FLAGS)
    resolve_noise_args(args)
    ensure_data(args.data_path, args.dataset, args.download)
    images, clean, _, _ = read_cifar(args.data_path, args.dataset)
    source_size = len(read_ood_source(args.ood_path, args.dataset)) if args.ood_ratio else 0
    labels, replaced, _, note = make_noise(args, images, clean, NUM_CLASSES[args.dataset], source_size)
    changed = float(np.mean(np.asarray(labels) != clean))
    ood = f", {len(replaced)} images replaced by open-set ones" if len(replaced) else ""
    print(f"{note}: {changed:.4f} of {len(clean)} labels changed{ood}")
