"""PreAct ResNet-18 for 32x32 inputs, as used by DivideMix on CIFAR.

The residual path keeps the original code's quirk: when a block's shape is unchanged the shortcut adds the
pre-activated tensor relu(bn1(x)), not x itself.
"""
import torch.nn as nn
import torch.nn.functional as F


class PreActBlock(nn.Module):
    """Pre-activation basic block (two 3x3 convolutions)."""

    expansion = 1

    def __init__(self, in_planes, planes, stride=1):
        """Build the block; a 1x1 convolution shortcut is used only when the shape changes."""
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.shortcut = None
        if stride != 1 or in_planes != planes * self.expansion:
            self.shortcut = nn.Conv2d(in_planes, planes * self.expansion, kernel_size=1, stride=stride, bias=False)

    def forward(self, x):
        """Return conv2(relu(bn2(conv1(o)))) + shortcut(o) with o = relu(bn1(x))."""
        o = F.relu(self.bn1(x))
        # The original adds o (not x) on the identity path; reproduced on purpose.
        shortcut = self.shortcut(o) if self.shortcut is not None else o
        out = self.conv1(o)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class PreActResNet(nn.Module):
    """Stem conv-BN-ReLU, four stages of PreAct blocks, 4x4 average pool, linear head."""

    def __init__(self, block, num_blocks, num_classes=10, width=64):
        """Build the network for 32x32 RGB inputs; width: channels of the first stage (64 in the paper), doubled
        at each later stage."""
        super().__init__()
        self.in_planes = width
        self.conv1 = nn.Conv2d(3, width, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.layer1 = self._make_layer(block, width, num_blocks[0], stride=1)
        self.layer2 = self._make_layer(block, 2 * width, num_blocks[1], stride=2)
        self.layer3 = self._make_layer(block, 4 * width, num_blocks[2], stride=2)
        self.layer4 = self._make_layer(block, 8 * width, num_blocks[3], stride=2)
        self.linear = nn.Linear(8 * width * block.expansion, num_classes)

    def _make_layer(self, block, planes, num_blocks, stride):
        """Stack num_blocks blocks, the first with the given stride."""
        layers = []
        for s in [stride] + [1] * (num_blocks - 1):
            layers.append(block(self.in_planes, planes, s))
            self.in_planes = planes * block.expansion
        return nn.Sequential(*layers)

    def features(self, x):
        """The penultimate embedding (8 x width = 512 per image in the paper's net) of a batch of normalised 32x32 images."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return F.avg_pool2d(out, 4).flatten(1)

    def forward(self, x, mix=None):
        """Class logits; with mix = (lam, idx) those of the mixed embeddings lam * e + (1 - lam) * e[idx]
        (manifold mixing: a keyword of forward, so DistributedDataParallel sees it as one forward)."""
        out = self.features(x)
        if mix is not None:
            lam, idx = mix
            out = lam * out + (1 - lam) * out[idx]
        return self.linear(out)


def ResNet18(num_classes=10, width=64):
    """PreAct ResNet-18 (two blocks per stage); width 64 is the paper's network."""
    return PreActResNet(PreActBlock, [2, 2, 2, 2], num_classes=num_classes, width=width)


class PreActResNet18(PreActResNet):
    """The PreAct ResNet-18 for any input size from 16 px: its last grid is averaged whole (ResNet18 pools a fixed
    4 x 4 window, which only 32 x 32 inputs fill); at 32 px the two give the same outputs and share state-dict keys.
    Train_custom.py trains it, Pretrain_simclr.py pre-trains it on images of any size."""

    def __init__(self, num_classes, width=64):
        """Two PreAct blocks per stage, as ResNet18."""
        super().__init__(PreActBlock, [2, 2, 2, 2], num_classes=num_classes, width=width)

    def features(self, x):
        """The penultimate embedding (8 x width per image) of a batch of normalised images of any size."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return F.adaptive_avg_pool2d(out, 1).flatten(1)
