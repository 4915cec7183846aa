"""WebVision 1.0 (first 50 classes of the Google subset) for DivideMix, plus ImageNet val for the same classes.

Layout under data_path (as distributed): info/train_filelist_google.txt and info/val_filelist.txt
(`relative/path label`), train images at <data_path>/<path>, val images at <data_path>/val_images_256/<path>,
ImageNet val images at <data_path>/imagenet/val/<class index>/*.
"""
import os

import numpy as np
import torchvision.transforms as T

from imagelist import (IMAGE_EXTENSIONS, ListLoaders, check_images, check_list_files, list_image_folder,
                       read_labeled_list)
from cli import UserError

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
LIST_FILES = ("info/train_filelist_google.txt", "info/val_filelist.txt")
TRAIN_CROPS = ("random_resized", "center")


def transforms(image_size, train_crop):
    """(train, test) transforms; image_size 299 gives the paper's Resize(320) + 299 crop."""
    if train_crop not in TRAIN_CROPS:
        raise UserError(f"unknown --train_crop {train_crop!r}: use random_resized or center")
    resize = round(image_size * 320 / 299)
    norm = [T.ToTensor(), T.Normalize(MEAN, STD)]
    # The published numbers used a center crop for training; the original code later moved to RandomResizedCrop.
    crop = T.RandomResizedCrop(image_size) if train_crop == "random_resized" else T.CenterCrop(image_size)
    train = T.Compose([T.Resize(resize), crop, T.RandomHorizontalFlip(), *norm])
    test = T.Compose([T.Resize(resize), T.CenterCrop(image_size), *norm])
    return train, test


def _read_list(path, folder, num_class):
    """Paths and labels of a `relative/path label` list, keeping labels below num_class (the original's rule)."""
    paths, labels = [], []
    for _, rel, label in read_labeled_list(path):
        if label < num_class:
            paths.append(os.path.join(folder, rel))
            labels.append(label)
    return paths, np.array(labels, dtype=np.int64)


def _read_imagenet(imagenet, num_class):
    """Paths and labels of the images in imagenet/0..num_class-1; other files there are skipped with a warning."""
    paths, labels, skipped = [], [], []
    for c in range(num_class):
        folder = os.path.join(imagenet, str(c))
        images, others = list_image_folder(folder) if os.path.isdir(folder) else ([], [])
        paths += images
        labels += [c] * len(images)
        skipped += [os.path.join(str(c), name) for name in others]
    if skipped:
        print(f"warning: skipped {len(skipped)} entries of {imagenet}/<class>/ that are not image files (e.g. "
              f"{', '.join(skipped[:3])}): only {' '.join(IMAGE_EXTENSIONS)} files are read", flush=True)
    return paths, np.array(labels, dtype=np.int64)


class WebVision:
    """The WebVision lists, read once per run, the ImageNet val images of the same classes, and the loaders."""

    def __init__(self, root, num_class, batch_size, image_size, train_crop, num_workers, device, max_bad_images=100,
                 shard=None):
        """Read and check the list files, the ImageNet val folders and every referenced image file (not decoded);
        shard: the run's Shard with several processes (see ListLoaders)."""
        self.loader = ListLoaders(num_workers, device, max_bad_images, shard)
        self.bad_images = self.loader.bad_images
        check_list_files(root, LIST_FILES, "WebVision")
        self.batch_size = batch_size
        self.train_tf, self.test_tf = transforms(image_size, train_crop)
        self.train_paths, self.train_labels = _read_list(os.path.join(root, LIST_FILES[0]), root, num_class)
        self.val_paths, self.val_labels = _read_list(os.path.join(root, LIST_FILES[1]),
                                                     os.path.join(root, "val_images_256"), num_class)
        check_images(self.train_paths, os.path.join(root, LIST_FILES[0]))
        check_images(self.val_paths, os.path.join(root, LIST_FILES[1]))
        imagenet = os.path.join(root, "imagenet", "val")
        if not os.path.isdir(imagenet):
            raise UserError(f"WebVision: {imagenet} is missing: it holds the ImageNet val images of the first "
                            f"{num_class} classes in folders 0..{num_class - 1} (see docs/real_world.md, Data)")
        self.imagenet_paths, self.imagenet_labels = _read_imagenet(imagenet, num_class)
        if not self.imagenet_paths:
            raise UserError(f"WebVision: no images in {imagenet}/0..{num_class - 1}: see docs/real_world.md, Data")
        check_images(self.imagenet_paths, imagenet)
        eval_bs = batch_size * 2
        self.val_loader = self.loader(self.val_paths, self.val_labels, self.test_tf, "plain", None, eval_bs, False,
                                       persistent=True, drop_bad=True)
        self.imagenet_loader = self.loader(self.imagenet_paths, self.imagenet_labels, self.test_tf, "plain", None,
                                            eval_bs, False, persistent=True, drop_bad=True)
        self.eval_loader = self.loader(self.train_paths, self.train_labels, self.test_tf, "plain", None, eval_bs,
                                        False, persistent=True)


    def warmup_loader(self):
        """All training images, shuffled and augmented, batch 2 x batch_size."""
        return self.loader(self.train_paths, self.train_labels, self.train_tf, "plain", None, self.batch_size * 2,
                            True)

    def labeled_loader(self, pred, prob):
        """Training images with pred True: two views, noisy label and clean probability."""
        sel = np.flatnonzero(pred)
        return self.loader([self.train_paths[i] for i in sel], self.train_labels[sel], self.train_tf, "labeled",
                            prob[sel], self.batch_size, True)

    def unlabeled_loader(self, pred):
        """Training images with pred False: two views; None when there are none."""
        sel = np.flatnonzero(~pred)
        if not len(sel):
            return None
        return self.loader([self.train_paths[i] for i in sel], self.train_labels[sel], self.train_tf, "unlabeled",
                            None, self.batch_size, True)
