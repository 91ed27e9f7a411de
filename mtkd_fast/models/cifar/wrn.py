"""CIFAR Wide ResNets (Zagoruyko & Komodakis 2016): pre-activation blocks, depth 6n+4, widen factor k.

Module names follow the RepDistiller lineage (``conv1, block{1,2,3}.layer.{i}.{bn1,conv1,bn2,conv2,
convShortcut}, bn1, fc``) so its CIFAR-100 teacher checkpoints load unchanged. As in CA-MKD / MTKD-RL,
feats[-2] is the map after the final BN+ReLU (so the embedding is its global average), 8x8 on 32x32.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ._base import FeatureModel, init_weights


class PreActBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.equal_in_out = in_planes == planes
        # the lineage's blocks only have a projection when the width changes (stride changes come with it)
        self.convShortcut = None if self.equal_in_out else nn.Conv2d(in_planes, planes, 1, stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        pre = F.relu(self.bn1(x))
        out = F.relu(self.bn2(self.conv1(pre)))
        out = self.conv2(out)
        # a width change projects the pre-activated input; an identity block adds the raw input
        shortcut = x if self.equal_in_out else self.convShortcut(pre)
        return out + shortcut


class NetworkBlock(nn.Module):
    def __init__(self, num_blocks: int, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.layer = nn.Sequential(
            *[PreActBlock(in_planes if i == 0 else planes, planes, stride if i == 0 else 1) for i in range(num_blocks)]
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x)


class WideResNet(FeatureModel):
    def __init__(self, depth: int, widen_factor: int, num_classes: int):
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError(f"depth: expected 6n+4 (10, 16, 28, 40, ...), got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.block1 = NetworkBlock(n, widths[0], widths[1], 1)
        self.block2 = NetworkBlock(n, widths[1], widths[2], 2)
        self.block3 = NetworkBlock(n, widths[2], widths[3], 2)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.fc = nn.Linear(widths[3], num_classes)
        init_weights(self)

    def stages(self, x: Tensor) -> list[Tensor]:
        f0 = self.conv1(x)
        f1 = self.block1(f0)
        f2 = self.block2(f1)
        f3 = F.relu(self.bn1(self.block3(f2)))
        return [f0, f1, f2, f3]

    def classify(self, embedding: Tensor) -> Tensor:
        return self.fc(embedding)


ARCHS = {
    "wrn_16_1": (16, 1),
    "wrn_16_2": (16, 2),
    "wrn_40_1": (40, 1),
    "wrn_40_2": (40, 2),
    "wrn_28_4": (28, 4),
}


def build(name: str, num_classes: int) -> WideResNet:
    depth, k = ARCHS[name]
    return WideResNet(depth, k, num_classes)
