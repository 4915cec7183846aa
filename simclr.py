"""SimCLR (Chen et al., ICML 2020): contrastive pre-training without labels, the self-supervised start of C2D
(Zheltonozhskii et al., WACV 2022) and Manifold DivideMix. Two augmented views of every image go through the
backbone and a projection head; NT-Xent pulls each image's two views together against every other view of the
global batch. Pretrain_simclr.py runs it; the backbone's weights start Train_cifar.py and Train_custom.py."""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from device_batches import color_jitter, random_grayscale, random_resized_crop_flip
from distributed import gather_rows_with_grad, get_rank
from dividemix import Precision
from presets import KNN_MONITOR, SIMCLR_RECIPE
from utils import Progress


@dataclass
class SimCLRConfig:
    """The recipe (presets.SIMCLR_RECIPE) as one run uses it."""

    epochs: int = SIMCLR_RECIPE["epochs"]
    lr: float = SIMCLR_RECIPE["lr"]
    temperature: float = SIMCLR_RECIPE["temperature"]
    warm_epochs: int = SIMCLR_RECIPE["warm_epochs"]
    warmup_from: float = SIMCLR_RECIPE["warmup_from"]
    lr_decay_rate: float = SIMCLR_RECIPE["lr_decay_rate"]
    crop_scale: tuple = SIMCLR_RECIPE["crop_scale"]
    jitter: tuple = SIMCLR_RECIPE["jitter"]
    jitter_p: float = SIMCLR_RECIPE["jitter_p"]
    grayscale_p: float = SIMCLR_RECIPE["grayscale_p"]
    image_size: int = 32
    precision: Precision = None

    @classmethod
    def from_args(cls, args, precision):
        """From Pretrain_simclr.py's resolved flags."""
        return cls(epochs=args.epochs, lr=args.lr, temperature=args.temperature, warm_epochs=args.warm_epochs,
                   crop_scale=(args.crop_min_scale, 1.0), image_size=args.image_size, precision=precision)


# ----------------------------------------------------------------------------- views, network, loss

def two_views(images, cfg, mean, std):
    """Two independently augmented, normalised views of a batch of uint8 images, stacked: 2N x 3 x S x S.

    Each view: random resized crop and flip, colour jitter with probability, grayscale with probability (the
    CIFAR recipe has no blur), all drawn per image on the images' device.
    """
    both = torch.cat([images, images])
    views = random_resized_crop_flip(both, cfg.image_size, scale=cfg.crop_scale).div_(255)
    views = random_grayscale(color_jitter(views, *cfg.jitter, p=cfg.jitter_p), cfg.grayscale_p)
    return (views - mean) / std  # the views are in [0, 1] already: normalise's scaling is done


class ProjectionHead(nn.Module):
    """SimCLR's MLP head on the penultimate features: Linear, ReLU, Linear to feat_dim, L2-normalised."""

    def __init__(self, dim, feat_dim=SIMCLR_RECIPE["feat_dim"]):
        """dim: the backbone's embedding size (512 for the PreAct ResNet-18)."""
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(inplace=True), nn.Linear(dim, feat_dim))

    def forward(self, features):
        """Unit-length projections of a batch of embeddings."""
        return F.normalize(self.mlp(features), dim=1)


class SimCLRNet(nn.Module):
    """A training script's network without its classifier (`backbone`, whose state dict is what the training
    scripts load) and the projection head (`head`, dropped after pre-training)."""

    def __init__(self, backbone, classifier="linear"):
        """backbone: a net with features() and a classifier attribute, replaced here by the identity."""
        super().__init__()
        dim = getattr(backbone, classifier).in_features
        setattr(backbone, classifier, nn.Identity())
        self.backbone, self.head = backbone, ProjectionHead(dim)

    def forward(self, x):
        """Unit-length projections of a batch of images."""
        return self.head(self.backbone(x))


def nt_xent(z, temperature):
    """NT-Xent over this rank's 2B projections [view 1 of B images; view 2 of the same images] against every
    projection of the global batch (gathered from all ranks): for each row, cross-entropy of its partner view
    among all other rows at similarity / temperature; the mean over this rank's rows."""
    rows = z.shape[0]
    everyone = gather_rows_with_grad(z)
    logits = z @ everyone.T / temperature
    offset = get_rank() * rows
    own = torch.arange(rows, device=z.device)
    logits[own, own + offset] = -float("inf")  # a view is not its own negative
    partner = (own + rows // 2) % rows + offset
    return F.cross_entropy(logits.float(), partner)


def learning_rate(cfg, epoch, step, steps):
    """SupContrast's schedule: linear warm-up per iteration from warmup_from over warm_epochs, then per epoch a
    cosine from lr down to lr * lr_decay_rate**3 over cfg.epochs (epoch counted from 0, SupContrast's from 1)."""
    e = epoch + 1
    eta_min = cfg.lr * cfg.lr_decay_rate ** 3

    def cosine(at):
        """The cosine's value at (1-based) epoch `at`."""
        return eta_min + (cfg.lr - eta_min) * (1 + math.cos(math.pi * at / cfg.epochs)) / 2

    if e <= cfg.warm_epochs:
        progress = (step + (e - 1) * steps) / (cfg.warm_epochs * steps)
        return cfg.warmup_from + progress * (cosine(cfg.warm_epochs) - cfg.warmup_from)
    return cosine(e)


# ----------------------------------------------------------------------------- training and the kNN monitor

def pretrain_epoch(epoch, model, optimizer, loader, cfg, device, mean, std):
    """One pass over the training images: both views in one forward (BatchNorm sees the 2B rows together, as in
    SupContrast), NT-Xent, SGD at the schedule's rate. Returns the record of the epoch (mean loss, last lr)."""
    model.train()
    precision = cfg.precision or Precision()
    steps = len(loader)
    progress = Progress(f"epoch {epoch} simclr", steps)
    total = torch.zeros((), device=device)
    lr = cfg.lr
    for step, images in enumerate(loader):
        lr = learning_rate(cfg, epoch, step, steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        views = precision.prepare(two_views(images, cfg, mean, std))
        with precision.autocast(device):
            z = model(views)
        loss = nt_xent(z.float(), cfg.temperature)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss.detach()
        progress.update(step + 1, loss=loss.detach())
    return {"loss": (total / max(steps, 1)).item(), "lr": lr, "iterations": steps}


def knn_accuracy(train_features, train_labels, test_features, test_labels, num_class, k=KNN_MONITOR["k"],
                 temperature=KNN_MONITOR["temperature"], chunk=1024):
    """Top-1 accuracy (percent) of the weighted kNN classifier on the test features: the k most cosine-similar
    training images vote for their labels with weight exp(similarity / temperature)."""
    train = F.normalize(train_features.float(), dim=1)
    test = F.normalize(test_features.float(), dim=1)
    labels = torch.as_tensor(train_labels, device=train.device).long()
    k = min(k, train.shape[0])
    hits = torch.zeros((), device=train.device)
    for start in range(0, test.shape[0], chunk):
        sim, idx = (test[start:start + chunk] @ train.T).topk(k, dim=1)
        votes = torch.zeros(sim.shape[0], num_class, device=train.device)
        votes.scatter_add_(1, labels[idx], (sim / temperature).exp())
        truth = torch.as_tensor(test_labels[start:start + chunk], device=train.device).long()
        hits += (votes.argmax(1) == truth).sum()
    return 100.0 * hits.item() / max(test.shape[0], 1)
