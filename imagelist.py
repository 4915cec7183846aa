"""Image-list data shared by the real-world benchmarks (Clothing1M, WebVision): a Dataset over file paths with the
DivideMix sample modes, the DataLoader factory, the class-balanced draw and the quick missing-file check."""
import os

import numpy as np
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from utils import UserError

# What one sample is in each loader mode of the algorithm engine (dividemix.py).
MODES = ("plain", "labeled", "unlabeled")


class ImageListDataset(Dataset):
    """Images given by path. plain: (image, label); labeled: (view, view, label, w); unlabeled: (view, view)."""

    def __init__(self, paths, labels, transform, mode="plain", prob=None):
        """paths: list of file paths; labels: int array; prob: clean probability per sample (labeled mode)."""
        assert mode in MODES
        self.paths, self.labels, self.transform, self.mode = list(paths), np.asarray(labels), transform, mode
        self.prob = None if prob is None else np.asarray(prob, dtype=np.float32)

    def __len__(self):
        """Number of images."""
        return len(self.paths)

    def __getitem__(self, i):
        """Load, convert to RGB and transform one image (twice in labeled and unlabeled mode)."""
        with open(self.paths[i], "rb") as f:
            image = Image.open(f).convert("RGB")
        if self.mode == "labeled":
            return self.transform(image), self.transform(image), int(self.labels[i]), float(self.prob[i])
        if self.mode == "unlabeled":
            return self.transform(image), self.transform(image)
        return self.transform(image), int(self.labels[i])


def make_loader(dataset, batch_size, shuffle, num_workers, device, persistent=False):
    """DataLoader with worker processes and pinned memory on CUDA; `persistent` for loaders reused every epoch."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers,
                      pin_memory=device.type == "cuda", persistent_workers=persistent and num_workers > 0)


def default_num_workers():
    """Worker processes per loader: the CPU count, at most 8."""
    return min(8, os.cpu_count() or 1)


def class_balanced_draw(labels, num_samples, num_class, rng):
    """Indices of a shuffled subset with at most ceil(num_samples / num_class) per class and num_samples in all.

    Same rule as the original loop (shuffle, then keep an image while its class has fewer than num_samples /
    num_class and the total is below num_samples, then shuffle the kept ones), without a loop over images.
    """
    labels = np.asarray(labels)
    order = rng.permutation(len(labels))
    shuffled = labels[order]
    # rank of each image within its class, in shuffled order
    sort = np.argsort(shuffled, kind="stable")
    counts = np.bincount(shuffled, minlength=num_class)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank = np.empty(len(labels), dtype=np.int64)
    rank[sort] = np.arange(len(labels)) - np.repeat(starts, counts)
    keep = order[rank < np.ceil(num_samples / num_class)][:num_samples]
    return keep[rng.permutation(len(keep))]


def read_lines(path):
    """Non-empty stripped lines of a text file."""
    with open(path) as f:
        return [line.strip() for line in f if line.strip()]


def check_list_files(root, names, what):
    """UserError naming the list files of `what` absent under root."""
    missing = [n for n in names if not os.path.isfile(os.path.join(root, n))]
    if missing:
        raise UserError(f"{what}: {root} lacks {', '.join(missing)}: point --data_path at the dataset root "
                        "(see README, data preparation)")


def check_images_exist(paths, source, sample=64, seed=0):
    """UserError when any of a random sample of the referenced image files is absent."""
    if not len(paths):
        raise UserError(f"{source} lists no images: check the file and --num_class")
    rng = np.random.default_rng(seed)
    picked = rng.choice(len(paths), size=min(sample, len(paths)), replace=False)
    absent = [paths[i] for i in picked if not os.path.isfile(paths[i])]
    if absent:
        raise UserError(f"{len(absent)} of {len(picked)} sampled images listed in {source} are missing "
                        f"(e.g. {absent[0]}): check --data_path and that the images were extracted")

