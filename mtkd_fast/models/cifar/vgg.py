"""CIFAR VGG with batch norm (Simonyan & Zisserman 2015; the fully connected head replaced by one Linear).

Module names follow the RepDistiller lineage (``vgg8`` etc. are its ``vgg*_bn``): five Sequential
``block{0..4}`` of [Conv2d(3x3, bias), BatchNorm2d, ReLU] repeated, the last ReLU of each block left out
(applied in forward), max pooling between blocks, ``classifier``. On 32x32 inputs the lineage skips the
fourth pooling (it only pools there for 64x64 inputs), so feats[-2] is [512, 4, 4].
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ._base import FeatureModel, init_weights


def _block(widths: list[int], in_channels: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for w in widths:
        layers += [nn.Conv2d(in_channels, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
        in_channels = w
    return nn.Sequential(*layers[:-1])


class CifarVGG(FeatureModel):
    def __init__(self, cfg: list[list[int]], num_classes: int):
        super().__init__()
        in_channels = 3
        for i, widths in enumerate(cfg):
            self.add_module(f"block{i}", _block(widths, in_channels))
            in_channels = widths[-1]
        self.classifier = nn.Linear(in_channels, num_classes)
        init_weights(self)

    def stages(self, x: Tensor) -> list[Tensor]:
        pool_before_last = x.shape[2] == 64  # the lineage's rule: a fourth pooling only for 64x64 inputs
        f0 = F.relu(self.block0(x))
        f1 = F.relu(self.block1(F.max_pool2d(f0, 2)))
        f2 = F.relu(self.block2(F.max_pool2d(f1, 2)))
        f3 = F.relu(self.block3(F.max_pool2d(f2, 2)))
        f4 = F.relu(self.block4(F.max_pool2d(f3, 2) if pool_before_last else f3))
        return [f0, f1, f2, f3, f4]

    def classify(self, embedding: Tensor) -> Tensor:
        return self.classifier(embedding)


ARCHS = {
    "vgg8": [[64], [128], [256], [512], [512]],
    "vgg11": [[64], [128], [256, 256], [512, 512], [512, 512]],
    "vgg13": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    "vgg16": [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
    "vgg19": [[64, 64], [128, 128], [256] * 4, [512] * 4, [512] * 4],
}


def build(name: str, num_classes: int) -> CifarVGG:
    return CifarVGG(ARCHS[name], num_classes)
