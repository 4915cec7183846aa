"""Write tiny CIFAR-format pickles for tests: class-dependent images so the nets can learn something."""
import os
import pickle

import numpy as np

from cifar_files import LABEL_KEY, TEST_FILES, TRAIN_FILES


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
