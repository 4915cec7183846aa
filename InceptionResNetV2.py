"""Inception-ResNet-v2 in the TF-slim layout (BatchNorm eps 0.001), trained from scratch for WebVision.

Stem to 35x35x192, Mixed_5b (320), 10 x Block35 (scale 0.17), Mixed_6a (1088), 20 x Block17 (scale 0.10),
Mixed_7a (2080), 9 x Block8 (scale 0.20) and one Block8 without ReLU, a 1x1 conv to 1536, global average pool and
a linear head. At 299x299 the three grids are 35x35, 17x17 and 8x8.
"""
import torch
import torch.nn as nn


class ConvBN(nn.Module):
    """Convolution without bias, BatchNorm (eps 0.001) and ReLU."""

    def __init__(self, cin, cout, kernel_size, stride=1, padding=0):
        """Build the three layers."""
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001, momentum=0.1)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        """relu(bn(conv(x)))."""
        return self.relu(self.bn(self.conv(x)))


class Mixed5b(nn.Module):
    """35x35 grid: 192 -> 320 channels in four branches."""

    def __init__(self):
        """Build the branches."""
        super().__init__()
        self.branch0 = ConvBN(192, 96, 1)
        self.branch1 = nn.Sequential(ConvBN(192, 48, 1), ConvBN(48, 64, 5, padding=2))
        self.branch2 = nn.Sequential(ConvBN(192, 64, 1), ConvBN(64, 96, 3, padding=1), ConvBN(96, 96, 3, padding=1))
        self.branch3 = nn.Sequential(nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False), ConvBN(192, 64, 1))

    def forward(self, x):
        """Concatenate the branches."""
        return torch.cat([self.branch0(x), self.branch1(x), self.branch2(x), self.branch3(x)], 1)


class Block35(nn.Module):
    """Inception-ResNet-A on the 35x35 grid (320 channels)."""

    def __init__(self, scale=1.0):
        """Build the branches and the 1x1 up-projection."""
        super().__init__()
        self.scale = scale
        self.branch0 = ConvBN(320, 32, 1)
        self.branch1 = nn.Sequential(ConvBN(320, 32, 1), ConvBN(32, 32, 3, padding=1))
        self.branch2 = nn.Sequential(ConvBN(320, 32, 1), ConvBN(32, 48, 3, padding=1), ConvBN(48, 64, 3, padding=1))
        self.conv2d = nn.Conv2d(128, 320, 1)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        """relu(x + scale * up(branches))."""
        out = self.conv2d(torch.cat([self.branch0(x), self.branch1(x), self.branch2(x)], 1))
        return self.relu(x + self.scale * out)


class Mixed6a(nn.Module):
    """Reduction 35x35 -> 17x17: 320 -> 1088 channels."""

    def __init__(self):
        """Build the branches."""
        super().__init__()
        self.branch0 = ConvBN(320, 384, 3, stride=2)
        self.branch1 = nn.Sequential(ConvBN(320, 256, 1), ConvBN(256, 256, 3, padding=1), ConvBN(256, 384, 3, stride=2))
        self.branch2 = nn.MaxPool2d(3, stride=2)

    def forward(self, x):
        """Concatenate the branches."""
        return torch.cat([self.branch0(x), self.branch1(x), self.branch2(x)], 1)


class Block17(nn.Module):
    """Inception-ResNet-B on the 17x17 grid (1088 channels)."""

    def __init__(self, scale=1.0):
        """Build the branches and the 1x1 up-projection."""
        super().__init__()
        self.scale = scale
        self.branch0 = ConvBN(1088, 192, 1)
        self.branch1 = nn.Sequential(ConvBN(1088, 128, 1), ConvBN(128, 160, (1, 7), padding=(0, 3)),
                                     ConvBN(160, 192, (7, 1), padding=(3, 0)))
        self.conv2d = nn.Conv2d(384, 1088, 1)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        """relu(x + scale * up(branches))."""
        out = self.conv2d(torch.cat([self.branch0(x), self.branch1(x)], 1))
        return self.relu(x + self.scale * out)


class Mixed7a(nn.Module):
    """Reduction 17x17 -> 8x8: 1088 -> 2080 channels."""

    def __init__(self):
        """Build the branches."""
        super().__init__()
        self.branch0 = nn.Sequential(ConvBN(1088, 256, 1), ConvBN(256, 384, 3, stride=2))
        self.branch1 = nn.Sequential(ConvBN(1088, 256, 1), ConvBN(256, 288, 3, stride=2))
        self.branch2 = nn.Sequential(ConvBN(1088, 256, 1), ConvBN(256, 288, 3, padding=1), ConvBN(288, 320, 3, stride=2))
        self.branch3 = nn.MaxPool2d(3, stride=2)

    def forward(self, x):
        """Concatenate the branches."""
        return torch.cat([self.branch0(x), self.branch1(x), self.branch2(x), self.branch3(x)], 1)


class Block8(nn.Module):
    """Inception-ResNet-C on the 8x8 grid (2080 channels); the last one has no ReLU."""

    def __init__(self, scale=1.0, relu=True):
        """Build the branches and the 1x1 up-projection."""
        super().__init__()
        self.scale = scale
        self.branch0 = ConvBN(2080, 192, 1)
        self.branch1 = nn.Sequential(ConvBN(2080, 192, 1), ConvBN(192, 224, (1, 3), padding=(0, 1)),
                                     ConvBN(224, 256, (3, 1), padding=(1, 0)))
        self.conv2d = nn.Conv2d(448, 2080, 1)
        self.relu = nn.ReLU(inplace=True) if relu else None

    def forward(self, x):
        """x + scale * up(branches), then ReLU unless this is the last block."""
        out = x + self.scale * self.conv2d(torch.cat([self.branch0(x), self.branch1(x)], 1))
        return self.relu(out) if self.relu is not None else out


class InceptionResNetV2(nn.Module):
    """The whole network; inputs of at least 75x75 (299x299 in the paper)."""

    def __init__(self, num_classes=1001):
        """Build stem, blocks and head."""
        super().__init__()
        self.features = nn.Sequential(
            ConvBN(3, 32, 3, stride=2), ConvBN(32, 32, 3), ConvBN(32, 64, 3, padding=1), nn.MaxPool2d(3, stride=2),
            ConvBN(64, 80, 1), ConvBN(80, 192, 3), nn.MaxPool2d(3, stride=2),
            Mixed5b(), *[Block35(scale=0.17) for _ in range(10)],
            Mixed6a(), *[Block17(scale=0.10) for _ in range(20)],
            Mixed7a(), *[Block8(scale=0.20) for _ in range(9)], Block8(relu=False),
            ConvBN(2080, 1536, 1))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.last_linear = nn.Linear(1536, num_classes)

    def forward(self, x):
        """Class logits."""
        return self.last_linear(self.avgpool(self.features(x)).flatten(1))
