"""CIFAR ShuffleNet V1 (Zhang et al. 2018, groups 3) and V2 (Ma et al. 2018, 1x), as in the KD lineage.

Module names follow the RepDistiller lineage so its CIFAR-100 checkpoints load unchanged:
- ShuffleV1: ``conv1, bn1, layer{1,2,3}.{i}.{conv1,bn1,conv2,bn2,conv3,bn3}, linear``; stem is a 1x1
  convolution (no downsampling), each stage starts with a stride-2 block that concatenates an average-
  pooled shortcut. feats[-2] = layer3 output [960, 4, 4].
- ShuffleV2: ``conv1, bn1, layer{1,2,3}.0.{conv1..5,bn1..5}`` (down block), ``layer{k}.{i>0}.{conv1..3,
  bn1..3}`` (basic blocks), ``conv2, bn2, linear``. feats[-2] = the map after conv2+bn2+ReLU
  [1024, 4, 4] (as in CA-MKD / MTKD-RL, where the embedding is its global average).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._base import FeatureModel, init_weights


def channel_shuffle(x: Tensor, groups: int) -> Tensor:
    """[B, C, H, W] -> interleave the channels of ``groups`` groups."""
    b, c, h, w = x.shape
    return x.view(b, groups, c // groups, h, w).transpose(1, 2).reshape(b, c, h, w)


class ShuffleV1Block(nn.Module):
    def __init__(self, in_planes: int, out_planes: int, stride: int, groups: int):
        super().__init__()
        self.stride = stride
        mid = out_planes // 4
        # the first pointwise convolution of the network (24 input channels) is not grouped
        self.first_groups = 1 if in_planes == 24 else groups
        self.conv1 = nn.Conv2d(in_planes, mid, 1, groups=self.first_groups, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, out_planes, 1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = channel_shuffle(out, self.first_groups)
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.stride == 2:
            return F.relu(torch.cat([out, F.avg_pool2d(x, 3, 2, 1)], 1))
        return F.relu(out + x)


class ShuffleNetV1(FeatureModel):
    def __init__(self, num_classes: int, out_planes=(240, 480, 960), num_blocks=(4, 8, 4), groups: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 24, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        in_planes = 24
        for stage, (planes, n) in enumerate(zip(out_planes, num_blocks), start=1):
            blocks = []
            for i in range(n):
                # the stride-2 block concatenates its input, so it only produces planes - in_planes channels
                blocks.append(ShuffleV1Block(in_planes, planes - (in_planes if i == 0 else 0),
                                             2 if i == 0 else 1, groups))
                in_planes = planes
            self.add_module(f"layer{stage}", nn.Sequential(*blocks))
        self.linear = nn.Linear(in_planes, num_classes)
        init_weights(self)

    def stages(self, x: Tensor) -> list[Tensor]:
        return self.stem_and_layers(x, 3)

    def classify(self, embedding: Tensor) -> Tensor:
        return self.linear(embedding)


class ShuffleV2Basic(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        half = channels // 2
        self.conv1 = nn.Conv2d(half, half, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(half)
        self.conv2 = nn.Conv2d(half, half, 3, 1, 1, groups=half, bias=False)
        self.bn2 = nn.BatchNorm2d(half)
        self.conv3 = nn.Conv2d(half, half, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(half)

    def forward(self, x: Tensor) -> Tensor:
        half = x.shape[1] // 2
        kept, branch = x[:, :half], x[:, half:]
        out = F.relu(self.bn1(self.conv1(branch)))
        out = self.bn2(self.conv2(out))
        out = F.relu(self.bn3(self.conv3(out)))
        return channel_shuffle(torch.cat([kept, out], 1), 2)


class ShuffleV2Down(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        mid = out_channels // 2
        # left branch: depthwise stride 2, pointwise
        self.conv1 = nn.Conv2d(in_channels, in_channels, 3, 2, 1, groups=in_channels, bias=False)
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv2 = nn.Conv2d(in_channels, mid, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        # right branch: pointwise, depthwise stride 2, pointwise
        self.conv3 = nn.Conv2d(in_channels, mid, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv4 = nn.Conv2d(mid, mid, 3, 2, 1, groups=mid, bias=False)
        self.bn4 = nn.BatchNorm2d(mid)
        self.conv5 = nn.Conv2d(mid, mid, 1, bias=False)
        self.bn5 = nn.BatchNorm2d(mid)

    def forward(self, x: Tensor) -> Tensor:
        left = F.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        right = F.relu(self.bn3(self.conv3(x)))
        right = F.relu(self.bn5(self.conv5(self.bn4(self.conv4(right)))))
        return channel_shuffle(torch.cat([left, right], 1), 2)


class ShuffleNetV2(FeatureModel):
    def __init__(self, num_classes: int, out_channels=(116, 232, 464, 1024), num_blocks=(3, 7, 3)):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 24, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        in_channels = 24
        for stage, (c, n) in enumerate(zip(out_channels[:3], num_blocks), start=1):
            self.add_module(f"layer{stage}", nn.Sequential(ShuffleV2Down(in_channels, c),
                                                           *[ShuffleV2Basic(c) for _ in range(n)]))
            in_channels = c
        self.conv2 = nn.Conv2d(in_channels, out_channels[3], 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels[3])
        self.linear = nn.Linear(out_channels[3], num_classes)
        init_weights(self)

    def stages(self, x: Tensor) -> list[Tensor]:
        maps = self.stem_and_layers(x, 3)
        return maps + [F.relu(self.bn2(self.conv2(maps[-1])))]

    def classify(self, embedding: Tensor) -> Tensor:
        return self.linear(embedding)


ARCHS = {"ShuffleV1": ShuffleNetV1, "ShuffleV2": ShuffleNetV2}


def build(name: str, num_classes: int) -> FeatureModel:
    return ARCHS[name](num_classes)
