"""Real-image test beds for the successors' options: Fashion-MNIST subsets in CIFAR-10's python layout.

    python scripts/fashion_mnist_subsets.py OUT [--src /usr/share/datasets/fashion-mnist] [--train 800] [--test 1000]

Writes OUT/all (the ten classes) and, for open-set noise, OUT/open (classes 0-4 only) with OUT/open_ood.npz (images
of classes 5-9, N x 32 x 32 x 3 uint8, the format --ood_path takes). Images are 28x28 grey padded to 32x32 and
repeated over three channels. Fashion-MNIST ships in Debian's package dataset-fashion-mnist.
"""
import argparse
import gzip
import os
import pickle

import numpy as np


def read_idx(path):
    """An IDX file (gzip) as a numpy array."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    dims = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(raw[3])]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * raw[3]).reshape(dims)


def to_chw(images):
    """N x 28 x 28 grey -> N x 3 x 32 x 32, zero-padded."""
    return np.repeat(np.pad(images, ((0, 0), (2, 2), (2, 2)))[:, None], 3, axis=1)


def write_cifar10(folder, train_x, train_y, test_x, test_y):
    """CIFAR-10's python files: five training batches and test_batch."""
    os.makedirs(folder, exist_ok=True)
    for b, part in enumerate(np.array_split(np.arange(len(train_y)), 5), 1):
        with open(os.path.join(folder, f"data_batch_{b}"), "wb") as f:
            pickle.dump({"data": train_x[part].reshape(len(part), -1), "labels": train_y[part].tolist()}, f)
    with open(os.path.join(folder, "test_batch"), "wb") as f:
        pickle.dump({"data": test_x.reshape(len(test_y), -1), "labels": test_y.tolist()}, f)


def main():
    """Write the ten-class and the open-set test beds."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out")
    parser.add_argument("--src", default="/usr/share/datasets/fashion-mnist")
    parser.add_argument("--train", type=int, default=800, help="training images of each test bed")
    parser.add_argument("--test", type=int, default=1000, help="test images of each test bed")
    args = parser.parse_args()
    tr_x = to_chw(read_idx(os.path.join(args.src, "train-images-idx3-ubyte.gz")))
    tr_y = read_idx(os.path.join(args.src, "train-labels-idx1-ubyte.gz")).astype(np.int64)
    te_x = to_chw(read_idx(os.path.join(args.src, "t10k-images-idx3-ubyte.gz")))
    te_y = read_idx(os.path.join(args.src, "t10k-labels-idx1-ubyte.gz")).astype(np.int64)
    write_cifar10(os.path.join(args.out, "all"), tr_x[:args.train], tr_y[:args.train], te_x[:args.test],
                  te_y[:args.test])
    inside, outside = np.flatnonzero(tr_y < 5), np.flatnonzero(tr_y >= 5)
    test_inside = np.flatnonzero(te_y < 5)[:args.test]
    write_cifar10(os.path.join(args.out, "open"), tr_x[inside[:args.train]], tr_y[inside[:args.train]],
                  te_x[test_inside], te_y[test_inside])
    np.savez(os.path.join(args.out, "open_ood.npz"), images=tr_x[outside[:args.train]].transpose(0, 2, 3, 1))
    print(f"{args.out}/all, {args.out}/open and {args.out}/open_ood.npz written")


if __name__ == "__main__":
    main()
