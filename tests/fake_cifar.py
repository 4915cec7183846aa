"""Write tiny CIFAR-format pickles for tests: class-dependent images so the nets can learn something.

    python tests/fake_cifar.py /tmp/fake-cifar [--dataset cifar10] [--n_train 100] [--n_test 40]

makes a data folder for a smoke run of Train_cifar.py (`--data_path /tmp/fake-cifar`).
"""
import argparse
import os
import pickle
import sys

import numpy as np

# Run as a script, sys.path starts at tests/; the repository root holds cifar_files.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cifar_files import LABEL_KEY, TEST_FILES, TRAIN_FILES  # noqa: E402


def make_images(labels, rng):
    """32x32 RGB uint8 images whose colour and a bright square depend on the label, plus noise."""
    n = len(labels)
    imgs = rng.integers(0, 60, size=(n, 3, 32, 32)).astype(np.int64)
    for i, y in enumerate(labels):
        imgs[i, y % 3] += 120
        r, c = (y * 7) % 24, (y * 11) % 24
        imgs[i, :, r:r + 8, c:c + 8] += 70
    return np.clip(imgs, 0, 255).astype(np.uint8).reshape(n, 3072)


def write_fake_cifar(path, dataset="cifar10", n_train=100, n_test=40, seed=0):
    """Write the pickled train/test files of `dataset` into path; returns the clean train labels."""
    rng = np.random.default_rng(seed)
    num_class = 10 if dataset == "cifar10" else 100
    os.makedirs(path, exist_ok=True)
    train_labels = (np.arange(n_train) % num_class).tolist()
    train_files = TRAIN_FILES[dataset]
    per = -(-n_train // len(train_files))
    for b, name in enumerate(train_files):
        ys = train_labels[b * per:(b + 1) * per]
        with open(os.path.join(path, name), "wb") as f:
            pickle.dump({"data": make_images(ys, rng), LABEL_KEY[dataset]: ys}, f, protocol=2)
    test_labels = (np.arange(n_test) % num_class).tolist()
    with open(os.path.join(path, TEST_FILES[dataset][0]), "wb") as f:
        pickle.dump({"data": make_images(test_labels, rng), LABEL_KEY[dataset]: test_labels}, f, protocol=2)
    return train_labels


def main():
    """Write a fake CIFAR folder from the command line."""
    p = argparse.ArgumentParser(description="Write tiny fake CIFAR python-version files for a smoke run.")
    p.add_argument("folder", help="the folder to write (Train_cifar.py's --data_path)")
    p.add_argument("--dataset", default="cifar10", choices=("cifar10", "cifar100"))
    p.add_argument("--n_train", default=100, type=int, help="training images")
    p.add_argument("--n_test", default=40, type=int, help="test images")
    p.add_argument("--seed", default=0, type=int, help="seed of the image noise")
    args = p.parse_args()
    write_fake_cifar(args.folder, args.dataset, args.n_train, args.n_test, args.seed)
    print(f"wrote {args.dataset} with {args.n_train} training and {args.n_test} test images to {args.folder}")


if __name__ == "__main__":
    main()
