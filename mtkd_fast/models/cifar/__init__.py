"""The CIFAR model zoo (32x32 inputs): parameter names match the RepDistiller lineage's checkpoints."""

from __future__ import annotations

from typing import Callable

from torch import nn

from . import mobilenetv2, regnet, resnet, shufflenet, vgg, wrn

# name -> builder(name, num_classes)
BUILDERS: dict[str, Callable[[str, int], nn.Module]] = {
    name: family.build
    for family in (resnet, wrn, vgg, mobilenetv2, shufflenet, regnet)
    for name in family.ARCHS
}
