"""CIFAR-10/100 for DivideMix: the device-resident loaders for warm-up, loss evaluation, labeled, unlabeled and
test (the files themselves are read by cifar_files.py).

Run as a command it writes a noise file without training (noise.py's command):
    python dataloader_cifar.py --dataset cifar10 --data_path D --r 0.5 --noise_mode sym --seed 123
"""
import numpy as np
import torch

from cli import run_main
from device_batches import Batches, normalise, random_crop_flip
import noise

MEAN_STD = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    "cifar100": ((0.507, 0.487, 0.441), (0.267, 0.256, 0.276)),
}


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
    # The noise command keeps the name users know from the original code; noise.py holds it.
    run_main(noise.main, noise.get_args_parser().parse_args())
