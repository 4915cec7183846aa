"""Miniature Clothing1M and WebVision trees in their real layouts, with small JPEGs written by Pillow."""
import os

import numpy as np
from PIL import Image


def _jpeg(path, label, rng, size=40):
    """A small JPEG whose colour depends on the label."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pixels = rng.integers(0, 80, (size, size, 3)).astype(np.uint8)
    pixels[..., label % 3] += np.uint8(100 + 10 * (label % 5))
    Image.fromarray(pixels).save(path, quality=80)


def write_fake_clothing1m(root, n_train=48, n_val=14, n_test=14, num_class=14, seed=0):
    """data_path layout of Clothing1M: images/<a>/<b>.jpg stored as root/<a>/<b>.jpg, kv and key-list files."""
    rng = np.random.default_rng(seed)
    noisy_kv, clean_kv, lists = [], [], {"noisy_train_key_list.txt": [], "clean_val_key_list.txt": [],
                                         "clean_test_key_list.txt": []}
    for split, n, listname in (("train", n_train, "noisy_train_key_list.txt"), ("val", n_val, "clean_val_key_list.txt"),
                               ("test", n_test, "clean_test_key_list.txt")):
        for i in range(n):
            label = i % num_class
            key = f"images/{i % 3}/{split}_{i}.jpg"
            _jpeg(os.path.join(root, key[len("images/"):]), label, rng)
            lists[listname].append(key)
            if split == "train":
                noisy_kv.append(f"{key} {(label + (i % 4 == 0)) % num_class}")
            else:
                clean_kv.append(f"{key} {label}")
    files = {"noisy_label_kv.txt": noisy_kv, "clean_label_kv.txt": clean_kv, **lists}
    for name, lines in files.items():
        with open(os.path.join(root, name), "w") as f:
            f.write("\n".join(lines) + "\n")


def write_fake_webvision(root, n_train=40, n_val=10, n_imagenet=10, num_class=50, seed=0):
    """data_path layout of WebVision: info/ lists, google/ train images, val_images_256/, imagenet/val/<c>/."""
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(root, "info"), exist_ok=True)
    train, val = [], []
    for i in range(n_train):
        label = (i * 7) % num_class
        rel = f"google/q{label:04d}/{i:06d}.jpg"
        _jpeg(os.path.join(root, rel), label, rng)
        train.append(f"{rel} {label}")
    train.append("google/q0999/000999.jpg 700")  # a class beyond the first 50: must be skipped
    for i in range(n_val):
        label = (i * 11) % num_class
        rel = f"val{i:08d}.jpg"
        _jpeg(os.path.join(root, "val_images_256", rel), label, rng)
        val.append(f"{rel} {label}")
    val.append("val99999999.jpg 600")
    for i in range(n_imagenet):
        label = (i * 13) % num_class
        _jpeg(os.path.join(root, "imagenet", "val", str(label), f"ILSVRC_{i}.JPEG"), label, rng)
    with open(os.path.join(root, "info", "train_filelist_google.txt"), "w") as f:
        f.write("\n".join(train) + "\n")
    with open(os.path.join(root, "info", "val_filelist.txt"), "w") as f:
        f.write("\n".join(val) + "\n")
