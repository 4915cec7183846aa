"""Training data kept on the training device: batches drawn by index (shuffled or in order, split over processes)
and augmented there in batches. CIFAR's loaders (dataloader_cifar.py) and dataloader_custom.py's cached images use it.
"""
import torch
import torch.nn.functional as F


def normalise(images, mean, std):
    """uint8 N x 3 x H x W -> float, scaled to [0, 1] then normalised per channel."""
    return (images.float().div_(255) - mean) / std


def random_crop_flip(images, padding=4):
    """Random crop of the zero-padded images back to their size, then horizontal flip with p = 0.5.

    One gather per axis over the whole batch; the flip is folded into the column indices.
    """
    n, c, h, w = images.shape
    padded = F.pad(images, (padding, padding, padding, padding))
    dev = images.device
    oy = torch.randint(0, 2 * padding + 1, (n, 1), device=dev)
    ox = torch.randint(0, 2 * padding + 1, (n, 1), device=dev)
    flip = torch.rand(n, 1, device=dev) < 0.5
    ar_h = torch.arange(h, device=dev)
    ar_w = torch.arange(w, device=dev)
    rows = oy + ar_h
    cols = ox + torch.where(flip, w - 1 - ar_w, ar_w)
    out = padded.gather(2, rows.view(n, 1, h, 1).expand(n, c, h, w + 2 * padding))
    return out.gather(3, cols.view(n, 1, 1, w).expand(n, c, h, w))


class Batches:
    """Batches over a subset of device-resident samples, shuffled or in order; `make(idx)` builds a batch.

    With a Shard (several processes) a shuffled pass is this rank's share of a shuffle common to all ranks, in
    batches of batch_size / world; a pass in order is this rank's contiguous span.
    """

    def __init__(self, make, indices, batch_size, shuffle, shard=None):
        """indices: 1-D long tensor on the data's device; batch_size: the global batch."""
        self.make, self.indices, self.batch_size, self.shuffle, self.shard = make, indices, batch_size, shuffle, shard
        self.num_samples = int(indices.numel())
        if shard is not None:
            if shuffle:
                self.batch_size //= shard.world
                self.num_samples = -(-self.num_samples // shard.world)
            else:
                start, stop = shard.span(self.num_samples)
                self.indices, self.num_samples = indices[start:stop], stop - start

    def __len__(self):
        """Number of batches (the last partial batch is kept)."""
        return -(-self.num_samples // self.batch_size)

    def __iter__(self):
        """Yield the batches of one pass."""
        order = self.indices
        if self.shuffle and self.shard is not None:
            order = order[self.shard.order(int(order.numel())).to(order.device)]
        elif self.shuffle:
            order = order[torch.randperm(self.num_samples, device=order.device)]
        for start in range(0, self.num_samples, self.batch_size):
            yield self.make(order[start:start + self.batch_size])
