"""CIFAR RegNets (Radosavovic et al. 2020) in the form the KD code bases train as CIFAR-100 teachers.

Stem: 3x3 convolution to 64 channels, stride 1 (no downsampling); four stages of residual bottleneck
blocks (bottleneck ratio 1, grouped 3x3, optional squeeze-excitation for the Y models), stage strides
1, 1, 2, 2, so feats[-2] is 8x8 on 32x32 input; classifier ``linear``. Module names (``conv1, bn1,
layer{1..4}.{i}.{conv1,bn1,conv2,bn2,se.se1,se.se2,conv3,bn3,shortcut.0,shortcut.1}, linear``) and
widths follow the widely used pytorch-cifar RegNet that the MTKD-RL / CA-MKD teachers are built from.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ._base import FeatureModel, init_weights


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, reduced: int):
        super().__init__()
        self.se1 = nn.Conv2d(channels, reduced, 1)
        self.se2 = nn.Conv2d(reduced, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        scale = self.se2(F.relu(self.se1(F.adaptive_avg_pool2d(x, 1)))).sigmoid()
        return x * scale


class RegNetBlock(nn.Module):
    def __init__(self, w_in: int, w_out: int, stride: int, group_width: int, bottleneck_ratio: float, se_ratio: float):
        super().__init__()
        w_b = int(round(w_out * bottleneck_ratio))
        self.conv1 = nn.Conv2d(w_in, w_b, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(w_b)
        self.conv2 = nn.Conv2d(w_b, w_b, 3, stride, 1, groups=w_b // group_width, bias=False)
        self.bn2 = nn.BatchNorm2d(w_b)
        # the SE width is a fraction of the block's INPUT width, as in the reference implementation
        self.se = SqueezeExcite(w_b, int(round(w_in * se_ratio))) if se_ratio > 0 else None
        self.conv3 = nn.Conv2d(w_b, w_out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(w_out)
        self.shortcut = None
        if stride != 1 or w_in != w_out:
            self.shortcut = nn.Sequential(nn.Conv2d(w_in, w_out, 1, stride, bias=False), nn.BatchNorm2d(w_out))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        if self.se is not None:
            out = self.se(out)
        out = self.bn3(self.conv3(out))
        return F.relu(out + (x if self.shortcut is None else self.shortcut(x)))


class CifarRegNet(FeatureModel):
    def __init__(self, depths, widths, group_width: int, se_ratio: float, num_classes: int,
                 bottleneck_ratio: float = 1.0):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        w_in = 64
        for stage, (depth, width, stride) in enumerate(zip(depths, widths, (1, 1, 2, 2)), start=1):
            blocks = []
            for i in range(depth):
                blocks.append(RegNetBlock(w_in, width, stride if i == 0 else 1,
                                          group_width, bottleneck_ratio, se_ratio))
                w_in = width
            self.add_module(f"layer{stage}", nn.Sequential(*blocks))
        self.linear = nn.Linear(w_in, num_classes)
        init_weights(self)

    def stages(self, x: Tensor) -> list[Tensor]:
        return self.stem_and_layers(x, 4)

    def classify(self, embedding: Tensor) -> Tensor:
        return self.linear(embedding)


# depths, widths, group width, SE ratio
ARCHS = {
    "RegNetX_200MF": ((1, 1, 4, 7), (24, 56, 152, 368), 8, 0.0),
    "RegNetX_400MF": ((1, 2, 7, 12), (32, 64, 160, 384), 16, 0.0),
    "RegNetY_400MF": ((1, 2, 7, 12), (32, 64, 160, 384), 16, 0.25),
}


def build(name: str, num_classes: int) -> CifarRegNet:
    depths, widths, group_width, se_ratio = ARCHS[name]
    return CifarRegNet(depths, widths, group_width, se_ratio, num_classes)
