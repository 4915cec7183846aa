"""CIFAR-10/100's python-version files: their names, reading with range checks, and the download."""
import os
import pickle
import shutil

import numpy as np

from cli import UserError, see_doc
from presets import NUM_CLASSES

# Where missing and damaged data files are explained.
DATA_DOC = see_doc("Missing or bad data")

TRAIN_FILES = {"cifar10": [f"data_batch_{i}" for i in range(1, 6)], "cifar100": ["train"]}
TEST_FILES = {"cifar10": ["test_batch"], "cifar100": ["test"]}
LABEL_KEY = {"cifar10": "labels", "cifar100": "fine_labels"}
# The python version's archive and the folder it unpacks to (torchvision's names too).
ARCHIVE = {"cifar10": "cifar-10-python.tar.gz", "cifar100": "cifar-100-python.tar.gz"}
UNPACKED = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}


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
        raise UserError(missing_data_message(data_path, dataset, missing))


def missing_data_message(data_path, dataset, missing):
    """Why data_path is not a folder of dataset's python files and what to pass instead, in one line."""
    files = ", ".join(TRAIN_FILES[dataset] + TEST_FILES[dataset])
    lacks = f"{data_path} lacks {', '.join(missing)} (the python version of {dataset}, from {ARCHIVE[dataset]})"
    nested = os.path.join(data_path, UNPACKED[dataset])
    if not missing_files(nested, dataset):  # the folder above the unpacked one
        fix = f"its files are one folder down: pass --data_path {nested}"
    elif os.path.isfile(os.path.join(data_path, ARCHIVE[dataset])):
        fix = f"unpack {ARCHIVE[dataset]} there (tar -xzf) and pass --data_path {nested}, or pass --download"
    else:
        fix = f"point --data_path at the folder holding {files} (the archive's {UNPACKED[dataset]}/) or pass --download"
    return f"{lacks}: {fix}{DATA_DOC}"


def read_batch(path, label_key, num_class):
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
                        f"original file (or delete it and pass --download){DATA_DOC}") from None
    fix = ("replace it with the original file (or delete it and pass --download); a data set of your own in this "
           "layout needs")
    if raw.dtype != np.uint8:
        # Casting to uint8 would wrap 256 to 0 and -1 to 255 without a word: check the values first.
        whole = raw.dtype.kind in "iu" or (raw.dtype.kind == "f" and bool(np.all(np.mod(raw, 1) == 0)))
        if not whole:
            raise UserError(f"{path} has pixel values that are not whole numbers (dtype {raw.dtype}): {fix} uint8 "
                            f"pixels 0..255{DATA_DOC}")
        outside = raw[(raw < 0) | (raw > 255)]
        if outside.size:
            raise UserError(f"{path} has pixel values outside 0..255 (e.g. {outside[0]}): {fix} uint8 pixels 0..255"
                            f"{DATA_DOC}")
        raw = raw.astype(np.uint8)
    if labels.dtype.kind not in "iu" and labels.size:  # an empty list reads as float64: no label is wrong
        raise UserError(f"{path} has labels that are not integers (dtype {labels.dtype}): {fix} integer "
                        f"labels{DATA_DOC}")
    outside = labels[(labels < 0) | (labels >= num_class)]
    if outside.size:
        raise UserError(f"{path} has labels outside 0..{num_class - 1} (e.g. {outside[0]}): {fix} labels 0..C-1 "
                        f"and --num_class C{DATA_DOC}")
    return raw.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def read_cifar(data_path, dataset, num_class=None):
    """Read train and test sets: (train_images N x 3 x 32 x 32 uint8, train_labels, test_images, test_labels)."""
    # every label, train and test alike, must lie in 0..num_class-1 (default: the classes of `dataset`)
    num_class = NUM_CLASSES[dataset] if num_class is None else num_class
    parts = [read_batch(os.path.join(data_path, f), LABEL_KEY[dataset], num_class) for f in TRAIN_FILES[dataset]]
    test = [read_batch(os.path.join(data_path, f), LABEL_KEY[dataset], num_class) for f in TEST_FILES[dataset]]
    train_x = np.concatenate([p[0] for p in parts])
    train_y = np.concatenate([p[1] for p in parts])
    test_x = np.concatenate([p[0] for p in test])
    test_y = np.concatenate([p[1] for p in test])
    return train_x, train_y, test_x, test_y
