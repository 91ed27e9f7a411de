"""CIFAR ResNets (He et al. 2016, the 6n+2 family with three stages of basic blocks).

Module names follow the RepDistiller lineage so its CIFAR-100 teacher checkpoints load unchanged:
``conv1, bn1, layer{1,2,3}.{i}.{conv1,bn1,conv2,bn2,downsample.0,downsample.1}, fc``.
Widths: resnetN [16,16,32,64]; resnet8x4 / resnet32x4 [32,64,128,256]; resnet110x2 [16,32,64,128]
(the "x2" definition used by the SimKD / CA-MKD / MTKD-RL teachers).
feats: [stem, layer1, layer2, layer3 (= feats[-2], 8x8 on 32x32 input), pooled].
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ._base import FeatureModel, init_weights


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(out + shortcut)


class CifarResNet(FeatureModel):
    def __init__(self, depth: int, widths: tuple[int, int, int, int], num_classes: int):
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError(f"depth: expected 6n+2 (8, 14, 20, 32, ...), got {depth}")
        blocks_per_stage = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        in_planes = widths[0]
        for stage, (planes, stride) in enumerate(zip(widths[1:], (1, 2, 2)), start=1):
            layers = []
            for i in range(blocks_per_stage):
                layers.append(BasicBlock(in_planes, planes, stride if i == 0 else 1))
                in_planes = planes
            self.add_module(f"layer{stage}", nn.Sequential(*layers))
        self.fc = nn.Linear(in_planes, num_classes)
        init_weights(self)

    def stages(self, x: Tensor) -> list[Tensor]:
        return self.stem_and_layers(x, 3)

    def classify(self, embedding: Tensor) -> Tensor:
        return self.fc(embedding)


_THIN = (16, 16, 32, 64)
_X4 = (32, 64, 128, 256)
_X2 = (16, 32, 64, 128)

ARCHS = {
    "resnet8": (8, _THIN),
    "resnet14": (14, _THIN),
    "resnet20": (20, _THIN),
    "resnet32": (32, _THIN),
    "resnet44": (44, _THIN),
    "resnet56": (56, _THIN),
    "resnet110": (110, _THIN),
    "resnet8x4": (8, _X4),
    "resnet32x4": (32, _X4),
    "resnet110x2": (110, _X2),
}


def build(name: str, num_classes: int) -> CifarResNet:
    depth, widths = ARCHS[name]
    return CifarResNet(depth, widths, num_classes)
