"""Your own noisy data set for DivideMix: the ways to lay it out, the transforms, and the two ways to feed the engine.

Layouts (see docs/custom_data.md):
  imagefolder  <data_path>/train/<class>/<image>, <data_path>/test/<class>/<image>, optional val/: the folder name is
               the (noisy) label; the classes are the sorted folder names of train/
  list         --train_list, --test_list, optional --val_list: `relative/path label` lines, paths relative to
               --data_path, integer labels; optional --classes FILE names them (line i: class i)
  animal10n    <data_path>/training/*.jpg and testing/*.jpg, the label is the number before the first `_`
  food101n     Food-101N_release/meta/imagelist.tsv (training, noisy), meta/verified_{train,val}.tsv (the
               verification labels of a subset), Food-101's meta/classes.txt and meta/test.txt (testing)

Feeding: small images (random-crop augmentation) that fit --cache_limit_gb are decoded once into a uint8 tensor on
the training device and augmented there in batches, as CIFAR is; everything else streams from the files through
DataLoader workers (imagelist's loaders). Unreadable images follow imagelist's policy in both.
"""
import os
from dataclasses import dataclass

import numpy as np
import torch
import torchvision.transforms as T

from cli import UserError
from device_batches import Batches, normalise, random_crop_flip
from imagelist import (IMAGE_EXTENSIONS, BadImages, ImageListDataset, ListLoaders, check_images, list_image_folder,
                       make_loader, numbered_lines, read_labeled_list)

LAYOUTS = ("auto", "imagefolder", "list", "animal10n", "food101n")
AUGMENTS = ("crop", "resized_crop")
# ImageNet's statistics for every net: right for pretrained ones, close enough for photos trained from scratch,
# and the same whichever way the images are fed.
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# Images up to this size get CIFAR's augmentation (random crop of the zero-padded image, flip), larger ones
# ImageNet's (random-resized crop, flip).
SMALL_IMAGE = 96
ANIMAL10N_CLASSES = 10
DECODE_BATCH = 256
SHOWN = 3  # entries quoted in a warning


@dataclass
class Split:
    """One split: image paths, integer labels, and where they were listed (for messages)."""

    paths: list
    labels: np.ndarray
    source: str

    def __len__(self):
        """Number of images."""
        return len(self.paths)


@dataclass
class Layout:
    """A data set as read from disk: its classes and splits; verified: (training indices, clean mask) of the
    images whose label was checked by hand (Food-101N), else None."""

    name: str
    root: str
    classes: list
    train: Split
    test: Split
    val: Split = None
    verified: tuple = None

    def splits(self):
        """(name, split) of every split present."""
        return [(n, s) for n, s in (("train", self.train), ("val", self.val), ("test", self.test)) if s is not None]


def _split(paths, labels, source):
    """A Split with labels as an int64 array."""
    return Split(list(paths), np.asarray(labels, dtype=np.int64), source)


def _warn_skipped(skipped, where):
    """One warning line for the entries of image folders that are not image files."""
    if skipped:
        more = f" and {len(skipped) - SHOWN} more" if len(skipped) > SHOWN else ""
        print(f"warning: skipped {len(skipped)} entries of {where} that are not image files "
              f"({', '.join(skipped[:SHOWN])}{more}): only {' '.join(IMAGE_EXTENSIONS)} files are read", flush=True)


# ----------------------------------------------------------------------------- ImageFolder

def _subfolders(folder):
    """Sorted names of the visible subfolders of folder, and of its other visible entries."""
    with os.scandir(folder) as entries:
        visible = [e for e in entries if not e.name.startswith(".")]
    return sorted(e.name for e in visible if e.is_dir()), sorted(e.name for e in visible if not e.is_dir())


def _read_class_folders(folder, classes, train_folder):
    """The images of folder/<class>/ for every class folder there, labelled by the class's index."""
    names, stray = _subfolders(folder)
    index = {c: i for i, c in enumerate(classes)}
    paths, labels, skipped = [], [], [os.path.join(os.path.basename(folder), n) for n in stray]
    for name in names:
        if name not in index:
            raise UserError(f"{os.path.join(folder, name)} is no class of {train_folder}: rename it to one of the "
                            "training class folders, or remove it")
        images, others = list_image_folder(os.path.join(folder, name))
        if not images:
            inside = (f" (it holds {', '.join(others[:SHOWN])}; images are read from the class folder itself)"
                      if others else "")
            raise UserError(f"class folder {os.path.join(folder, name)} holds no images{inside}: put the images of "
                            f"class {name!r} in it, or delete the folder")
        paths += images
        labels += [index[name]] * len(images)
        skipped += [os.path.join(name, o) for o in others]
    _warn_skipped(skipped, f"{folder}/")
    return paths, labels


def read_image_folder(root):
    """The ImageFolder layout: root/train/<class>/, root/test/<class>/, optional root/val/<class>/."""
    train_folder = os.path.join(root, "train")
    if not os.path.isdir(train_folder):
        raise UserError(f"{root} has no train/ folder: lay the data out as <data_path>/train/<class>/<image> and "
                        "<data_path>/test/<class>/<image>, or give --train_list / --layout (see docs/custom_data.md)")
    classes = _subfolders(train_folder)[0]
    if len(classes) < 2:
        raise UserError(f"{train_folder} holds {len(classes)} class folder(s): DivideMix needs at least two "
                        "classes, one folder each")
    train = _split(*_read_class_folders(train_folder, classes, train_folder), train_folder)
    test_folder = os.path.join(root, "test")
    if not os.path.isdir(test_folder):
        raise UserError(f"{root} has no test/ folder: put the test images in <data_path>/test/<class>/ (the same "
                        "class folder names as train/)")
    test = _split(*_read_class_folders(test_folder, classes, train_folder), test_folder)
    val_folder = os.path.join(root, "val")
    val = None
    if os.path.isdir(val_folder):
        val = _split(*_read_class_folders(val_folder, classes, train_folder), val_folder)
    return Layout("imagefolder", root, classes, train, test, val)


# ----------------------------------------------------------------------------- list files

def _read_classes_file(path):
    """Class names, one a line; UserError on a repeated name."""
    names = [text for _, text in numbered_lines(path)]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise UserError(f"--classes {path} names {repeated[0]!r} more than once: give every class once, line i "
                        "naming label i")
    return names


def _read_list(path, root, flag, num_class, limit_source):
    """Paths (joined to root) and labels of a `relative/path label` list; labels must be below num_class."""
    if not os.path.isfile(path):
        raise UserError(f"{flag} {path}: no such file: give the list file's path (its lines are `relative/path "
                        "label`, paths relative to --data_path)")
    rows = read_labeled_list(path)
    for number, _, label in rows:
        if num_class is not None and label >= num_class:
            raise UserError(f"{path}:{number}: label {label} is outside the classes 0..{num_class - 1} of "
                            f"{limit_source}: fix the line, or name every class with --classes FILE")
    return [os.path.join(root, rel) for _, rel, _ in rows], [label for _, _, label in rows]


def read_lists(root, train_list, test_list, val_list=None, classes_file=None):
    """The list layout; the classes come from --classes, else from the training list's labels (0..max)."""
    if not test_list:
        raise UserError("--train_list needs --test_list FILE too: the test images, one `relative/path label` a line")
    classes = _read_classes_file(classes_file) if classes_file else None
    source = f"--classes {classes_file}" if classes_file else None
    paths, labels = _read_list(train_list, root, "--train_list", len(classes) if classes else None, source)
    if classes is None:
        classes = [str(c) for c in range(max(labels, default=-1) + 1)]
        source = f"the training list {train_list}"
    if len(classes) < 2:
        raise UserError(f"{source} gives {len(classes)} class(es): DivideMix needs at least two")
    train = _split(paths, labels, train_list)
    test = _split(*_read_list(test_list, root, "--test_list", len(classes), source), test_list)
    val = _split(*_read_list(val_list, root, "--val_list", len(classes), source), val_list) if val_list else None
    return Layout("list", root, classes, train, test, val)


# ----------------------------------------------------------------------------- Animal-10N

def _animal10n_folder(folder):
    """Paths and labels of an Animal-10N folder; the label is the number before the first `_` of a file name."""
    if not os.path.isdir(folder):
        raise UserError(f"Animal-10N: {folder} is missing: point --data_path at the folder that holds training/ "
                        "and testing/ (the extracted release)")
    paths, others = list_image_folder(folder)
    labels = []
    for path in paths:
        head, sep, _ = os.path.basename(path).partition("_")
        if not (sep and head.isdigit() and int(head) < ANIMAL10N_CLASSES):
            raise UserError(f"{path}: an Animal-10N file name begins with its label 0-9 and `_` (e.g. 3_01234.jpg): "
                            "rename or remove the file, or use --layout imagefolder / list for other data")
        labels.append(int(head))
    _warn_skipped(others, f"{folder}/")
    return paths, labels


def read_animal10n(root):
    """Animal-10N: root/training/ (50,000 images) and root/testing/ (5,000), 64 x 64, labels 0..9."""
    train = _split(*_animal10n_folder(os.path.join(root, "training")), os.path.join(root, "training"))
    test = _split(*_animal10n_folder(os.path.join(root, "testing")), os.path.join(root, "testing"))
    return Layout("animal10n", root, [str(c) for c in range(ANIMAL10N_CLASSES)], train, test)


# ----------------------------------------------------------------------------- Food-101N

def food101n_roots(data_path, food101_path=None):
    """(Food-101N_release folder, food-101 folder): data_path holds both as they extract, or is the release
    itself with food-101 beside it; --food101_path names food-101 wherever it is."""
    release = os.path.join(data_path, "Food-101N_release")
    if not os.path.isfile(os.path.join(release, "meta", "imagelist.tsv")):
        release = data_path
    if not os.path.isfile(os.path.join(release, "meta", "imagelist.tsv")):
        raise UserError(f"Food-101N: neither {data_path}/Food-101N_release/meta/imagelist.tsv nor "
                        f"{data_path}/meta/imagelist.tsv exists: point --data_path at the folder holding "
                        "Food-101N_release/ and food-101/ (or at Food-101N_release itself)")
    if food101_path:
        return release, food101_path
    for food in (os.path.join(data_path, "food-101"),
                 os.path.join(os.path.dirname(os.path.abspath(release)), "food-101")):
        if os.path.isdir(food):
            return release, food
    raise UserError(f"Food-101N is tested on Food-101's test split, and no food-101/ folder is beside {release}: "
                    "extract food-101.tar.gz there, or give --food101_path")


def _tsv_rows(path):
    """(line number, fields) of a Food-101N TSV file, its `class_name/key` header left out."""
    lines = numbered_lines(path)
    if lines and lines[0][1].startswith("class_name"):
        lines = lines[1:]
    return [(n, text.split("\t")) for n, text in lines]


def _class_of(key, path, number, index):
    """The class index of a `class_name/...` key; UserError when the class is not Food-101's."""
    name = key.split("/", 1)[0]
    if "/" not in key or name not in index:
        raise UserError(f"{path}:{number}: {key!r} is not `class_name/file` with one of the {len(index)} classes of "
                        "food-101/meta/classes.txt: fix the line, or check --food101_path")
    return index[name]


def _read_verified(release, keys):
    """(training indices, clean mask) of the verification labels in meta/verified_{train,val}.tsv (when present)."""
    row_of = {k: i for i, k in enumerate(keys)}
    found, unknown = {}, 0
    for name in ("verified_train.tsv", "verified_val.tsv"):
        path = os.path.join(release, "meta", name)
        if not os.path.isfile(path):
            continue
        for number, fields in _tsv_rows(path):
            if len(fields) != 2 or fields[1].strip() not in ("0", "1"):
                raise UserError(f"{path}:{number}: expected `class_name/key<TAB>0 or 1`: fix or delete the line")
            row = row_of.get(fields[0].strip())
            if row is None:
                unknown += 1
            else:
                found.setdefault(row, fields[1].strip() == "1")
    if unknown:
        print(f"warning: {unknown} verification labels name images that meta/imagelist.tsv does not list: ignored",
              flush=True)
    if not found:
        return None
    rows = np.array(sorted(found), dtype=np.int64)
    return rows, np.array([found[r] for r in rows.tolist()], dtype=bool)


def read_food101n(data_path, food101_path=None):
    """Food-101N: the 310k noisy training images of imagelist.tsv; Food-101's 101 classes and test split."""
    release, food = food101n_roots(data_path, food101_path)
    classes_path, test_path = os.path.join(food, "meta", "classes.txt"), os.path.join(food, "meta", "test.txt")
    for path in (classes_path, test_path):
        if not os.path.isfile(path):
            raise UserError(f"Food-101: {path} is missing: point --food101_path at the extracted food-101/ folder")
    classes = [text for _, text in numbered_lines(classes_path)]
    index = {c: i for i, c in enumerate(classes)}
    imagelist = os.path.join(release, "meta", "imagelist.tsv")
    keys, labels = [], []
    for number, fields in _tsv_rows(imagelist):
        key = fields[0].strip()
        labels.append(_class_of(key, imagelist, number, index))
        keys.append(key)
    train = _split([os.path.join(release, "images", k) for k in keys], labels, imagelist)
    test_keys = [(n, text) for n, text in numbered_lines(test_path)]
    test = _split([os.path.join(food, "images", k + ".jpg") for _, k in test_keys],
                  [_class_of(k, test_path, n, index) for n, k in test_keys], test_path)
    return Layout("food101n", data_path, classes, train, test, verified=_read_verified(release, keys))


# ----------------------------------------------------------------------------- any layout

def resolve_layout(layout, train_list):
    """The layout in force: auto is list when --train_list is given, else imagefolder."""
    if layout == "auto":
        return "list" if train_list else "imagefolder"
    return layout


def read_layout(layout, data_path, train_list=None, test_list=None, val_list=None, classes_file=None,
                food101_path=None):
    """Read and check a layout: its lists or folders, and that every image file exists and is not empty."""
    list_flags = {"--train_list": train_list, "--test_list": test_list, "--val_list": val_list,
                  "--classes": classes_file}
    given = [flag for flag, value in list_flags.items() if value]
    if layout != "list" and given:
        raise UserError(f"{given[0]} belongs to list files, but --layout is {layout}: drop it, or use --layout list")
    if layout != "food101n" and food101_path:
        raise UserError(f"--food101_path belongs to --layout food101n, not {layout}: drop it")
    if layout == "list" and not train_list:
        raise UserError("--layout list needs --train_list FILE and --test_list FILE (`relative/path label` lines)")
    if not os.path.isdir(data_path):
        raise UserError(f"--data_path {data_path} is not a folder: point it at your data set (see "
                        "docs/custom_data.md)")
    if layout == "imagefolder":
        data = read_image_folder(data_path)
    elif layout == "list":
        data = read_lists(data_path, train_list, test_list, val_list, classes_file)
    elif layout == "animal10n":
        data = read_animal10n(data_path)
    else:
        data = read_food101n(data_path, food101_path)
    for _, split in data.splits():
        check_images(split.paths, split.source)
    if len(data.train) < 2:
        raise UserError(f"{data.train.source} gives {len(data.train)} training image: DivideMix's two-component "
                        "mixture needs at least two")
    counts = np.bincount(data.train.labels, minlength=len(data.classes))
    empty = [data.classes[c] for c in np.flatnonzero(counts == 0)]
    if empty:
        print(f"warning: {len(empty)} of {len(data.classes)} classes have no training image ({', '.join(empty[:5])}"
              f"{' ...' if len(empty) > 5 else ''}): they are still classes of the nets", flush=True)
    return data


# ----------------------------------------------------------------------------- transforms and the cache

def default_augment(image_size):
    """crop (CIFAR's) for small images, resized_crop (ImageNet's) for large ones."""
    return "crop" if image_size <= SMALL_IMAGE else "resized_crop"


def crop_padding(image_size):
    """Zero padding of the random crop: 4 pixels at 32, 8 at 64 (an eighth of the size)."""
    return max(1, image_size // 8)


def fit_transform(image_size):
    """Shorter side to image_size, then the centred square: every image the same size, aspect kept."""
    return [T.Resize(image_size), T.CenterCrop(image_size)]


def transforms(image_size, augment):
    """(train, test) transforms of the streamed images."""
    if augment not in AUGMENTS:
        raise UserError(f"unknown --augment {augment!r}: use crop or resized_crop")
    norm = [T.ToTensor(), T.Normalize(MEAN, STD)]
    flip = T.RandomHorizontalFlip()
    if augment == "crop":
        fit = fit_transform(image_size)
        train = T.Compose([*fit, T.RandomCrop(image_size, padding=crop_padding(image_size)), flip, *norm])
        return train, T.Compose([*fit, *norm])
    train = T.Compose([T.RandomResizedCrop(image_size), flip, *norm])
    test = T.Compose([T.Resize(round(image_size * 256 / 224)), T.CenterCrop(image_size), *norm])
    return train, test


def cache_bytes(data, image_size):
    """Bytes of every split's images as uint8 at image_size x image_size."""
    return sum(len(s) for _, s in data.splits()) * 3 * image_size * image_size


def cache_decision(data, image_size, augment, limit_gb):
    """(whether to cache, why) for the data at this size: only crop augmentation, only below the limit."""
    size = cache_bytes(data, image_size) / 2 ** 30
    if augment != "crop":
        return False, f"streamed (resized_crop augments each image from its file; {size:.2f} GB at {image_size} px)"
    if size > limit_gb:
        return False, f"streamed ({size:.2f} GB as uint8 is above --cache_limit_gb {limit_gb:g})"
    return True, f"cached as uint8 ({size:.2f} GB of --cache_limit_gb {limit_gb:g})"


class EmptyLoader:
    """A loader with no sample: what a division that labels nothing gives (a DataLoader cannot shuffle nothing)."""

    num_samples = 0
    dataset = ()

    def __init__(self, batch_size):
        """batch_size: that of the loader it stands for."""
        self.batch_size = batch_size

    def __len__(self):
        """No batch."""
        return 0

    def __iter__(self):
        """No batch."""
        return iter(())


# ----------------------------------------------------------------------------- the two ways to feed the engine

class StreamData:
    """The splits streamed from their files by DataLoader workers (any size), with DivideMix's loaders."""

    def __init__(self, data, image_size, augment, batch_size, eval_batch_size, num_workers, device,
                 max_bad_images=100, shard=None, known_bad=()):
        """data: a Layout; known_bad: the checkpoint's unreadable images on --resume; shard: see ListLoaders."""
        self.loader = ListLoaders(num_workers, device, max_bad_images, shard)
        self.bad_images = self.loader.bad_images
        self.bad_images.restore(known_bad)
        self.train_paths, self.train_labels = data.train.paths, data.train.labels
        self.batch_size = batch_size
        self.train_tf, self.test_tf = transforms(image_size, augment)
        evaluation = dict(persistent=True, drop_bad=True)
        self.eval_loader = self.loader(self.train_paths, self.train_labels, self.test_tf, "plain", None,
                                       eval_batch_size, False, persistent=True)
        self.test_loader = self.loader(data.test.paths, data.test.labels, self.test_tf, "plain", None,
                                       eval_batch_size, False, **evaluation)
        self.val_loader = None if data.val is None else self.loader(data.val.paths, data.val.labels, self.test_tf,
                                                                    "plain", None, eval_batch_size, False,
                                                                    **evaluation)

    def warmup_loader(self):
        """All training images, shuffled and augmented, batch 2 x batch_size."""
        return self.loader(self.train_paths, self.train_labels, self.train_tf, "plain", None, self.batch_size * 2,
                           True)

    def labeled_loader(self, pred, prob):
        """Training images with pred True: two views, noisy label and clean probability."""
        sel = np.flatnonzero(pred)
        if not len(sel):
            return EmptyLoader(self.batch_size)
        return self.loader([self.train_paths[i] for i in sel], self.train_labels[sel], self.train_tf, "labeled",
                           np.asarray(prob)[sel], self.batch_size, True)

    def unlabeled_loader(self, pred):
        """Training images with pred False: two views; None when there are none."""
        sel = np.flatnonzero(~np.asarray(pred, dtype=bool))
        if not len(sel):
            return None
        return self.loader([self.train_paths[i] for i in sel], self.train_labels[sel], self.train_tf, "unlabeled",
                           None, self.batch_size, True)


def decode_split(split, image_size, num_workers, bad_images, drop_bad):
    """uint8 N x 3 x S x S images and labels of a split, decoded by loader workers under imagelist's policy:
    an unreadable training image stands in as the next readable one (drop_bad False), an evaluation one is left
    out (drop_bad True)."""
    fit = T.Compose([*fit_transform(image_size), T.PILToTensor()])
    dataset = ImageListDataset(split.paths, split.labels, fit, "plain", None, bad_images.max_tries)
    loader = make_loader(dataset, DECODE_BATCH, False, num_workers, torch.device("cpu"), bad_images,
                         drop_bad=drop_bad)
    images, labels = [], []
    for x, y in loader:
        images.append(x)
        labels.append(y)
    empty = torch.zeros((0, 3, image_size, image_size), dtype=torch.uint8)
    return torch.cat(images) if images else empty, torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long)


class CachedData:
    """The splits decoded once into uint8 tensors on the training device, augmented there in batches (random crop
    of the zero-padded image, flip) as CIFAR is; the same loaders as StreamData."""

    def __init__(self, data, image_size, batch_size, eval_batch_size, num_workers, device, max_bad_images=100,
                 shard=None, known_bad=()):
        """Decode every split (every rank holds the whole set); arguments as StreamData's."""
        self.bad_images = BadImages(max_bad_images)
        self.bad_images.restore(known_bad)
        self.device, self.shard, self.batch_size = device, shard, batch_size
        self.padding = crop_padding(image_size)
        self.mean = torch.tensor(MEAN, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(STD, device=device).view(1, 3, 1, 1)
        images, labels = decode_split(data.train, image_size, num_workers, self.bad_images, False)
        self.train_images, self.train_labels = images.to(device), labels.to(device)
        self.all_indices = torch.arange(len(labels), device=device)
        self.eval_loader = self._in_order(self.train_images, self.train_labels, eval_batch_size)
        self.test_loader = self._in_order(*decode_split(data.test, image_size, num_workers, self.bad_images, True),
                                          eval_batch_size)
        self.val_loader = None
        if data.val is not None:
            self.val_loader = self._in_order(*decode_split(data.val, image_size, num_workers, self.bad_images, True),
                                             eval_batch_size)

    def _in_order(self, images, labels, batch_size):
        """Batches of normalised images with their labels, in order."""
        images, labels = images.to(self.device), labels.to(self.device)
        make = lambda i: (normalise(images[i], self.mean, self.std), labels[i])  # noqa: E731
        return Batches(make, torch.arange(len(labels), device=self.device), batch_size, False, self.shard)

    def augment(self, idx):
        """Augmented, normalised training images at idx."""
        return normalise(random_crop_flip(self.train_images[idx], self.padding), self.mean, self.std)

    def warmup_loader(self):
        """All training images, shuffled and augmented, batch 2 x batch_size."""
        make = lambda i: (self.augment(i), self.train_labels[i])  # noqa: E731
        return Batches(make, self.all_indices, self.batch_size * 2, True, self.shard)

    def labeled_loader(self, pred, prob):
        """Images with pred True: two augmented views, noisy label and clean probability."""
        idx = torch.as_tensor(np.flatnonzero(pred), dtype=torch.long, device=self.device)
        w = torch.as_tensor(np.asarray(prob), dtype=torch.float32, device=self.device)
        make = lambda i: (self.augment(i), self.augment(i), self.train_labels[i], w[i])  # noqa: E731
        return Batches(make, idx, self.batch_size, True, self.shard)

    def unlabeled_loader(self, pred):
        """Images with pred False: two augmented views; None when there are none."""
        idx = torch.as_tensor(np.flatnonzero(~np.asarray(pred, dtype=bool)), dtype=torch.long, device=self.device)
        if idx.numel() == 0:
            return None
        return Batches(lambda i: (self.augment(i), self.augment(i)), idx, self.batch_size, True, self.shard)
