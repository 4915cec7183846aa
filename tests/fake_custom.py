"""Miniature data sets for Train_custom.py, written with Pillow: an ImageFolder tree, list files, and the Animal-10N
and Food-101N layouts. The colour of an image follows its true class; a few given labels are flipped."""
import os

import numpy as np
from PIL import Image


def write_image(path, label, rng, size=16, fmt=None):
    """A small image whose colour depends on the label (JPEG or PNG after the extension)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pixels = rng.integers(0, 60, (size, size, 3)).astype(np.uint8)
    pixels[..., label % 3] += np.uint8(120 + 40 * (label // 3 % 3))
    Image.fromarray(pixels).save(path, format=fmt)


def noisy(label, i, num_class):
    """Every fifth image carries the next class's label."""
    return (label + 1) % num_class if i % 5 == 4 else label


def write_image_folder(root, classes=("cat", "dog", "fox"), n_train=8, n_test=3, n_val=0, size=16, seed=0):
    """root/train/<class>/, root/test/<class>/ and (n_val > 0) root/val/<class>/; n_* images per class; in train/
    every fifth image of a class lies in the next class's folder. Returns the training images' true classes by
    path relative to root."""
    rng = np.random.default_rng(seed)
    truth = {}
    for split, n in (("train", n_train), ("test", n_test), ("val", n_val)):
        for c, name in enumerate(classes):
            for i in range(n):
                folder = classes[noisy(c, i, len(classes))] if split == "train" else name
                rel = os.path.join(split, folder, f"{name}_{i:03d}.jpg")
                write_image(os.path.join(root, rel), c, rng, size)
                if split == "train":
                    truth[rel] = name
    return truth


def write_lists(root, counts=(12, 12), n_test=8, n_val=0, size=16, seed=0):
    """root/img/*.png with root/train.txt, test.txt (and val.txt when n_val > 0): `img/<split>_<i>.png label`;
    counts: training images per class (every fifth one labelled as the next class), the others cycle the classes."""
    rng = np.random.default_rng(seed)
    num_class = len(counts)
    truth = {"train": [c for c, n in enumerate(counts) for _ in range(n)],
             "test": [i % num_class for i in range(n_test)], "val": [i % num_class for i in range(n_val)]}
    for split, labels in truth.items():
        if not labels:
            continue
        lines = []
        for i, label in enumerate(labels):
            rel = f"img/{split}_{i:03d}.png"
            write_image(os.path.join(root, rel), label, rng, size)
            lines.append(f"{rel} {noisy(label, i, num_class) if split == 'train' else label}")
        with open(os.path.join(root, f"{split}.txt"), "w") as f:
            f.write("\n".join(lines) + "\n")


def write_animal10n(root, n_train=30, n_test=10, size=16, seed=0):
    """root/training/<label>_<id>.jpg and root/testing/<label>_<id>.jpg, labels 0..9."""
    rng = np.random.default_rng(seed)
    for folder, n in (("training", n_train), ("testing", n_test)):
        for i in range(n):
            label = i % 10
            write_image(os.path.join(root, folder, f"{label}_{i:05d}.jpg"), label, rng, size)


FOOD_CLASSES = ("apple_pie", "baby_back_ribs", "baklava", "beef_carpaccio")


def write_food101n(root, n_train=24, n_test=8, size=16, seed=0):
    """root/Food-101N_release/{meta,images} and root/food-101/{meta,images} in the releases' layouts; the first
    half of the training images carry verification labels (train TSV, then val TSV), the flipped ones 0."""
    rng = np.random.default_rng(seed)
    release, food = os.path.join(root, "Food-101N_release"), os.path.join(root, "food-101")
    os.makedirs(os.path.join(release, "meta"))
    os.makedirs(os.path.join(food, "meta"))
    k = len(FOOD_CLASSES)
    keys, verified = [], []
    for i in range(n_train):
        label = i % k
        given = noisy(label, i, k)
        key = f"{FOOD_CLASSES[given]}/{i:032x}.jpg"
        write_image(os.path.join(release, "images", key), label, rng, size)
        keys.append(key)
        if i < n_train // 2:
            verified.append(f"{key}\t{int(given == label)}")
    tests = []
    for i in range(n_test):
        label = i % k
        key = f"{FOOD_CLASSES[label]}/{100000 + i}"
        write_image(os.path.join(food, "images", key + ".jpg"), label, rng, size)
        tests.append(key)
    half = len(verified) // 2
    files = {os.path.join(release, "meta", "imagelist.tsv"): ["class_name/key"] + keys,
             os.path.join(release, "meta", "verified_train.tsv"): ["class_name/key\tverification_label"]
             + verified[:half],
             os.path.join(release, "meta", "verified_val.tsv"): ["class_name/key\tverification_label"]
             + verified[half:],
             os.path.join(food, "meta", "classes.txt"): list(FOOD_CLASSES),
             os.path.join(food, "meta", "test.txt"): tests}
    for path, lines in files.items():
        with open(path, "w") as f:
            f.write("\n".join(lines) + "\n")
