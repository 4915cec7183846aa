"""Clothing1M for DivideMix: the list and key-value files, transforms, per-epoch class-balanced draws and the loaders.

Layout under data_path (as distributed): noisy_label_kv.txt, clean_label_kv.txt (lines `images/x/y.jpg label`),
noisy_train_key_list.txt, clean_val_key_list.txt, clean_test_key_list.txt (one `images/...` key a line); the
image of key `images/x/y.jpg` is `<data_path>/x/y.jpg`.
"""
import os

import numpy as np
import torchvision.transforms as T

from imagelist import (ListLoaders, check_images, check_list_files, class_balanced_draw, numbered_lines,
                       read_labeled_list)
from cli import UserError

MEAN, STD = (0.6959, 0.6537, 0.6371), (0.3113, 0.3192, 0.3214)
LIST_FILES = ("noisy_label_kv.txt", "clean_label_kv.txt", "noisy_train_key_list.txt", "clean_val_key_list.txt",
              "clean_test_key_list.txt")
KEY_PREFIX = len("images/")  # the original drops a key's first 7 characters


def transforms(image_size):
    """(train, test) transforms; image_size 224 gives the paper's Resize(256) + 224 crop."""
    resize = round(image_size * 256 / 224)
    norm = [T.ToTensor(), T.Normalize(MEAN, STD)]
    train = T.Compose([T.Resize(resize), T.RandomCrop(image_size), T.RandomHorizontalFlip(), *norm])
    test = T.Compose([T.Resize(resize), T.CenterCrop(image_size), *norm])
    return train, test


def _read_kv(path, num_class):
    """{key: label} of a key-value label file, checked against num_class."""
    table = {}
    for number, key, label in read_labeled_list(path):
        if label >= num_class:
            raise UserError(f"{path}:{number}: label {label} is outside 0..{num_class - 1}: check --num_class "
                            "(Clothing1M has 14 classes) or fix the line")
        table[key] = label
    return table


class Clothing1M:
    """The Clothing1M lists, read once per run, and the loaders of every phase."""

    def __init__(self, root, num_class, batch_size, num_batches, image_size, num_workers, device, max_bad_images=100,
                 shard=None):
        """Read and check the list files and every referenced image file (not decoded: see imagelist); shard: the
        run's Shard with several processes (see ListLoaders)."""
        self.loader = ListLoaders(num_workers, device, max_bad_images, shard)
        self.bad_images = self.loader.bad_images
        check_list_files(root, LIST_FILES, "Clothing1M")
        self.root, self.num_class, self.batch_size, self.num_batches = root, num_class, batch_size, num_batches
        self.train_tf, self.test_tf = transforms(image_size)
        noisy = _read_kv(os.path.join(root, "noisy_label_kv.txt"), num_class)
        clean = _read_kv(os.path.join(root, "clean_label_kv.txt"), num_class)
        self.train_paths, self.train_labels = self._split("noisy_train_key_list.txt", noisy)
        self.val_paths, self.val_labels = self._split("clean_val_key_list.txt", clean)
        self.test_paths, self.test_labels = self._split("clean_test_key_list.txt", clean)
        for paths, name in ((self.train_paths, "noisy_train_key_list.txt"),
                            (self.val_paths, "clean_val_key_list.txt"), (self.test_paths, "clean_test_key_list.txt")):
            check_images(paths, os.path.join(root, name))
        self.val_loader = self.loader(self.val_paths, self.val_labels, self.test_tf, "plain", None, batch_size * 2,
                                       False, persistent=True, drop_bad=True)

    def _split(self, list_name, table):
        """Image paths and labels of one key list, with keys looked up in a label table."""
        path = os.path.join(self.root, list_name)
        lines = numbered_lines(path)
        missing = [(n, k) for n, k in lines if k not in table]
        if missing:
            raise UserError(f"{path}:{missing[0][0]}: key {missing[0][1]!r} has no label ({len(missing)} keys of "
                            f"{list_name} lack one): the kv files do not match the key lists")
        keys = [k for _, k in lines]
        return [os.path.join(self.root, k[KEY_PREFIX:]) for k in keys], np.array([table[k] for k in keys])

    def draw(self, num_samples, rng):
        """Indices into the training list of a fresh class-balanced draw."""
        return class_balanced_draw(self.train_labels, num_samples, self.num_class, rng)


    def _subset(self, idx, mode, transform, batch_size, shuffle, prob=None):
        """Loader over the training images at idx."""
        return self.loader([self.train_paths[i] for i in idx], self.train_labels[idx], transform, mode, prob,
                            batch_size, shuffle)

    def warmup_loader(self, rng):
        """Shuffled, augmented draw of num_batches x batch_size x 2 images, batch 2 x batch_size."""
        idx = self.draw(self.num_batches * self.batch_size * 2, rng)
        return self._subset(idx, "plain", self.train_tf, self.batch_size * 2, True)

    def eval_loader(self, idx):
        """The images at idx in order, unaugmented (loss evaluation)."""
        return self._subset(idx, "plain", self.test_tf, self.batch_size * 2, False)

    def labeled_loader(self, idx, pred, prob):
        """Images of the draw idx with pred True: two views, noisy label and clean probability."""
        sel = np.flatnonzero(pred)
        return self._subset(idx[sel], "labeled", self.train_tf, self.batch_size, True, prob[sel])

    def unlabeled_loader(self, idx, pred):
        """Images of the draw idx with pred False: two views; None when there are none."""
        sel = np.flatnonzero(~pred)
        if not len(sel):
            return None
        return self._subset(idx[sel], "unlabeled", self.train_tf, self.batch_size, True)

    def test_loader(self):
        """The clean test set, unaugmented."""
        return self.loader(self.test_paths, self.test_labels, self.test_tf, "plain", None, self.batch_size * 2, False,
                            drop_bad=True)
