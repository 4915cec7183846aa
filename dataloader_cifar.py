"""CIFAR-10/100 for DivideMix: the python-pickle files (read, checked, downloaded) and the device-resident loaders
for warm-up, loss evaluation, labeled, unlabeled and test.

Run as a command it writes a noise file without training (noise.py's command):
    python dataloader_cifar.py --dataset cifar10 --data_path D --r 0.5 --noise_mode sym --seed 123
"""
import os
import pickle
import shutil

import numpy as np
import torch

from cli import UserError, run_main
from device_batches import Batches, normalise, random_crop_flip
from presets import NUM_CLASSES

MEAN_STD = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    "cifar100": ((0.507, 0.487, 0.441), (0.267, 0.256, 0.276)),
}
TRAIN_FILES = {"cifar10": [f"data_batch_{i}" for i in range(1, 6)], "cifar100": ["train"]}
TEST_FILES = {"cifar10": ["test_batch"], "cifar100": ["test"]}
LABEL_KEY = {"cifar10": "labels", "cifar100": "fine_labels"}


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
    parts = [read_batch(os.path.join(data_path, f), LABEL_KEY[dataset], num_class) for f in TRAIN_FILES[dataset]]
    test = [read_batch(os.path.join(data_path, f), LABEL_KEY[dataset], num_class) for f in TEST_FILES[dataset]]
    train_x = np.concatenate([p[0] for p in parts])
    train_y = np.concatenate([p[1] for p in parts])
    test_x = np.concatenate([p[0] for p in test])
    test_y = np.concatenate([p[1] for p in test])
    return train_x, train_y, test_x, test_y


# ----------------------------------------------------------------------------- loaders

class CIFARData:
    """The CIFAR training and test sets as tensors on the training device, with DivideMix's loaders."""

    def __init__(self, train_images, noisy_labels, clean_labels, test_images, test_labels, dataset, device,
                 shard=None, ood=None):
        """Images uint8 N x 3 x 32 x 32 (numpy or tensor); labels sequences of ints; shard: the run's Shard with
        several processes (see Batches); ood: indices of open-set images, counted as noisy whatever their label."""
        mean, std = MEAN_STD[dataset]
        self.device, self.shard = device, shard
        self.mean = torch.tensor(mean, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=device).view(1, 3, 1, 1)
        self.train_images = torch.as_tensor(train_images, dtype=torch.uint8).to(device)
        self.noisy_labels = torch.as_tensor(noisy_labels, dtype=torch.long).to(device)
        self.clean_labels = torch.as_tensor(clean_labels, dtype=torch.long)
        self.clean_mask = (self.noisy_labels.cpu() == self.clean_labels).numpy()
        self.ood_mask = None
        if ood is not None:
            self.ood_mask = np.zeros(len(self.clean_mask), dtype=bool)
            self.ood_mask[np.asarray(ood, dtype=np.int64)] = True
            self.clean_mask &= ~self.ood_mask
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


if __name__ == "__main__":
    # The noise command keeps this file's name. noise imports this module, so it is imported only here: run as a
    # script this file is __main__, not dataloader_cifar, and no import cycle arises.
    import noise
    run_main(noise.main, noise.get_args_parser().parse_args())
