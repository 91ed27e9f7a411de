"""CIFAR MobileNetV2 (Sandler et al. 2018), expansion 6, in two widths.

Module names follow the RepDistiller lineage (``MobileNetV2`` / ``mobile_half`` of its mobilenetv2.py):
``conv1.{0,1}`` (3x3, stride 2: 32 -> 16), ``blocks.{s}.{i}.conv.{0,1,3,4,6,7}`` (pointwise expand, depthwise,
pointwise project, each with its BN), ``conv2.{0,1}`` (1x1 to 1280 channels), ``classifier.0``.

- ``MobileNetV2``: width 1.0, the network the MTKD-RL authors' CIFAR-100 student is (docs/method.md section 8, item 8).
  Its feats are theirs: the outputs of conv1 and of blocks 1, 2, 4 and 6, then the pooled 1280-channel output
  of ``conv2``. So ``feats[-2]`` is the 320-channel map BEFORE ``conv2`` (2x2 on a 32x32 input) and
  ``feats[-1]`` (1280 values) is NOT its global average: as a teacher of MTKD-RL, whose cosine state needs
  the two to have one width (docs/method.md section 2), it cannot serve; use ``MobileNetV2_0_5`` there.
- ``MobileNetV2_0_5``: width 0.5 (the lineage's ``mobile_half``: 16 stem channels, 160 after the last block,
  conv2 still 1280), with ``feats[-2]`` the 1280-channel map AFTER ``conv2`` (2x2) and ``feats[-1]`` its global
  average, like every other model of the zoo. mobile_half checkpoints load into it; a feature transfer trained
  on the lineage's own ``mobile_half`` feats[-2] (the 160-channel map before conv2) has a different input width.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ._base import FeatureModel, init_weights


def _conv_bn_relu(in_channels: int, out_channels: int, kernel: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel, stride, kernel // 2, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class InvertedResidual(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int, expand_ratio: int):
        super().__init__()
        hidden = in_channels * expand_ratio
        self.use_residual = stride == 1 and in_channels == out_channels
        self.conv = nn.Sequential(
            nn.Conv2d(in_channels, hidden, 1, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
        )

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv(x)
        return x + out if self.use_residual else out


class CifarMobileNetV2(FeatureModel):
    """``width_mult`` scales every stage; ``tap_before_conv2`` selects the authors' feats[-2] (see the module)."""

    # (expansion, channels, blocks, first stride); expansion of the first stage is always 1
    SETTING = [(1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2),
               (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]

    def __init__(self, num_classes: int, width_mult: float = 0.5, expansion: int = 6, tap_before_conv2: bool = False):
        super().__init__()
        self.tap_before_conv2 = tap_before_conv2
        in_channels = int(32 * width_mult)
        self.conv1 = _conv_bn_relu(3, in_channels, 3, 2)
        self.blocks = nn.ModuleList()
        for t, c, n, s in self.SETTING:
            out_channels = int(c * width_mult)
            t = 1 if t == 1 else expansion
            stage = []
            for i in range(n):
                stage.append(InvertedResidual(in_channels, out_channels, s if i == 0 else 1, t))
                in_channels = out_channels
            self.blocks.append(nn.Sequential(*stage))
        last_channels = int(1280 * width_mult) if width_mult > 1.0 else 1280
        self.conv2 = _conv_bn_relu(in_channels, last_channels, 1, 1)
        self.classifier = nn.Sequential(nn.Linear(last_channels, num_classes))
        init_weights(self)

    def stages(self, x: Tensor) -> list[Tensor]:
        out = self.conv1(x)
        maps = [out]
        for i, stage in enumerate(self.blocks):
            out = stage(out)
            if i in (1, 2, 4, 6):  # ends of the 32x32->16, 8, 4, 2 resolutions, as in the lineage
                maps.append(out)
        maps.append(self.conv2(out))
        return maps

    def classify(self, embedding: Tensor) -> Tensor:
        return self.classifier(embedding)

    def forward(self, x: Tensor, is_feat: bool = False):
        if not self.tap_before_conv2:
            return super().forward(x, is_feat)
        maps = self.stages(x)
        embedding = F.adaptive_avg_pool2d(maps[-1], 1).flatten(1)  # the pooled conv2 output (1280)
        logits = self.classify(embedding)
        if is_feat:  # conv2's map itself is not among the authors' feats
            return [*maps[:-1], embedding], logits
        return logits


ARCHS = {"MobileNetV2": (1.0, True), "MobileNetV2_0_5": (0.5, False)}


def build(name: str, num_classes: int) -> CifarMobileNetV2:
    width, tap_before_conv2 = ARCHS[name]
    return CifarMobileNetV2(num_classes, width_mult=width, tap_before_conv2=tap_before_conv2)
