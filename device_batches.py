"""Training data kept on the training device: batches drawn by index (shuffled or in order, split over processes)
and augmented there in batches. CIFAR's loaders (dataloader_cifar.py), dataloader_custom.py's cached images and
SimCLR's two views (simclr.py) use it.
"""
import math

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


# ----------------------------------------------------------------------------- SimCLR's views (simclr.py)

def random_resized_crop_flip(images, size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), tries=10):
    """torchvision's RandomResizedCrop(size, scale, ratio) then a horizontal flip with p = 0.5, for a whole batch.

    Each image draws `tries` boxes of a random area fraction in `scale` and a log-uniform aspect ratio in `ratio`
    and keeps the first that fits (none: the whole image, which is square here, so within `ratio`). torchvision's
    roi_align resizes every box to size x size in one call (bilinear, averaging several samples per output pixel
    when it shrinks). Returns float images in the input's scale.
    """
    # imported here: torchvision.ops takes about 2 s to import, which every training script would pay at start
    from torchvision.ops import roi_align

    n, _, h, w = images.shape
    dev = images.device
    area = h * w * torch.empty(n, tries, device=dev).uniform_(*scale)
    log_ratio = torch.empty(n, tries, device=dev).uniform_(math.log(ratio[0]), math.log(ratio[1]))
    aspect = torch.exp(log_ratio)
    bw = torch.sqrt(area * aspect).round()
    bh = torch.sqrt(area / aspect).round()
    fits = (bw >= 1) & (bw <= w) & (bh >= 1) & (bh <= h)
    first = torch.where(fits.any(1), fits.float().argmax(1), -1)
    pick = first.clamp(min=0).view(n, 1)
    found = (first >= 0).float()
    bw = bw.gather(1, pick).squeeze(1) * found + w * (1 - found)
    bh = bh.gather(1, pick).squeeze(1) * found + h * (1 - found)
    x0 = (torch.rand(n, device=dev) * (w - bw + 1)).floor()  # uniform over the w - bw + 1 positions
    y0 = (torch.rand(n, device=dev) * (h - bh + 1)).floor()
    boxes = torch.stack([torch.arange(n, device=dev, dtype=torch.float), x0, y0, x0 + bw, y0 + bh], dim=1)
    out = roi_align(images.float(), boxes, output_size=(size, size), spatial_scale=1.0, sampling_ratio=-1,
                    aligned=True)
    flip = (torch.rand(n, device=dev) < 0.5).view(n, 1, 1, 1)
    return torch.where(flip, out.flip(3), out)


def grayscale(images):
    """ITU-R 601 luma of float RGB images (torchvision's rgb_to_grayscale weights), N x 1 x H x W."""
    r, g, b = images.unbind(1)
    return (0.299 * r + 0.587 * g + 0.114 * b).unsqueeze(1)


def _rgb_to_hsv(images):
    """Float RGB in [0, 1] -> hue, saturation, value in [0, 1] (N x 3 x H x W)."""
    r, g, b = images.unbind(1)
    value, _ = images.max(1)
    chroma = value - images.min(1)[0]
    saturation = torch.where(value > 0, chroma / value.clamp(min=1e-12), torch.zeros_like(value))
    safe = chroma.clamp(min=1e-12)
    hue = torch.where(value == r, ((g - b) / safe) % 6,
                      torch.where(value == g, (b - r) / safe + 2, (r - g) / safe + 4))
    hue = torch.where(chroma > 0, hue / 6, torch.zeros_like(hue))
    return torch.stack([hue, saturation, value], 1)


def _hsv_to_rgb(hsv):
    """Hue, saturation, value in [0, 1] -> float RGB in [0, 1]."""
    hue, saturation, value = hsv.unbind(1)
    k = torch.stack([(5 + hue * 6) % 6, (3 + hue * 6) % 6, (1 + hue * 6) % 6], 1)
    ramp = torch.minimum(k, 4 - k).clamp(0, 1)
    return value.unsqueeze(1) * (1 - saturation.unsqueeze(1) * ramp)


def jitter_draws(n, brightness, contrast, saturation, hue, p, device):
    """ColorJitter's random draws for n images: whether it applies (probability p), a factor of each kind (hue: a
    shift in [-hue, hue] of a full turn) and the order of the four adjustments (a permutation per image)."""
    def uniform(low, high):
        """n draws from U[low, high]."""
        return torch.empty(n, device=device).uniform_(low, high)

    return {"applied": torch.rand(n, device=device) < p,
            "brightness": uniform(max(0.0, 1 - brightness), 1 + brightness),
            "contrast": uniform(max(0.0, 1 - contrast), 1 + contrast),
            "saturation": uniform(max(0.0, 1 - saturation), 1 + saturation),
            "hue": uniform(-hue, hue),
            "order": torch.rand(n, 4, device=device).argsort(1)}


# The adjustments in the numbering of jitter_draws' "order": torchvision's adjust_brightness, adjust_contrast,
# adjust_saturation and adjust_hue for float images, each with a per-image factor f (N x 1 x 1 x 1).
ADJUSTMENTS = (
    lambda x, f: (x * f).clamp(0, 1),
    lambda x, f: (f * x + (1 - f) * grayscale(x).mean((2, 3), keepdim=True)).clamp(0, 1),
    lambda x, f: (f * x + (1 - f) * grayscale(x)).clamp(0, 1),
    lambda x, f: _shift_hue(x, f.view(-1, 1, 1)),
)
JITTER_KINDS = ("brightness", "contrast", "saturation", "hue")


def _shift_hue(images, shift):
    """The hue of float RGB images turned by `shift` of a full circle."""
    hsv = _rgb_to_hsv(images)
    return _hsv_to_rgb(torch.stack([(hsv[:, 0] + shift) % 1.0, hsv[:, 1], hsv[:, 2]], 1))


def apply_jitter(images, draws):
    """ColorJitter with given draws on a batch of float RGB images in [0, 1].

    Each of the four steps applies every adjustment to the whole batch and each image keeps the one its order
    names there: no per-image loop and no host sync, for four times the (small) arithmetic.
    """
    view = (images.shape[0], 1, 1, 1)
    out = images
    for step in range(len(ADJUSTMENTS)):
        chosen = draws["order"][:, step].view(view)
        out = sum(torch.where(chosen == k, adjust(out, draws[kind].view(view)), 0.0)
                  for k, (kind, adjust) in enumerate(zip(JITTER_KINDS, ADJUSTMENTS)))
    return torch.where(draws["applied"].view(view), out, images)


def color_jitter(images, brightness, contrast, saturation, hue, p=1.0):
    """torchvision's RandomApply([ColorJitter(brightness, contrast, saturation, hue)], p) for a batch of float RGB
    images in [0, 1]: per image its own factors and its own random order of the four adjustments."""
    return apply_jitter(images, jitter_draws(images.shape[0], brightness, contrast, saturation, hue, p,
                                             images.device))


def random_grayscale(images, p):
    """Each image replaced by its grayscale (in all three channels) with probability p."""
    chosen = (torch.rand(images.shape[0], device=images.device) < p).view(-1, 1, 1, 1)
    return torch.where(chosen, grayscale(images).expand_as(images), images)
