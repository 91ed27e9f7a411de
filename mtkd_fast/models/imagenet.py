"""ImageNet models: torchvision's ResNet family with the zoo's feature interface.

The classes subclass ``torchvision.models.ResNet`` and only replace ``forward``, so parameter names are
torchvision's and torchvision state_dicts (e.g. ``resnet50-0676ba61.pth``) load unchanged through
``mtkd_fast.models.load_checkpoint``. Nothing is downloaded: weights come only from a local file.
feats: [stem (after max pool), layer1, layer2, layer3, layer4 (= feats[-2], 7x7 on 224x224), pooled].
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet


class ImageNetResNet(ResNet):
    def forward(self, x: Tensor, is_feat: bool = False):
        f0 = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        f1 = self.layer1(f0)
        f2 = self.layer2(f1)
        f3 = self.layer3(f2)
        f4 = self.layer4(f3)
        embedding = torch.flatten(self.avgpool(f4), 1)
        logits = self.fc(embedding)
        if is_feat:
            return [f0, f1, f2, f3, f4, embedding], logits
        return logits


# name -> (block, layers, groups, width_per_group): torchvision's definitions of the same names
ARCHS = {
    "imagenet_resnet18": (BasicBlock, [2, 2, 2, 2], 1, 64),
    "imagenet_resnet34": (BasicBlock, [3, 4, 6, 3], 1, 64),
    "imagenet_resnet50": (Bottleneck, [3, 4, 6, 3], 1, 64),
    "imagenet_resnet101": (Bottleneck, [3, 4, 23, 3], 1, 64),
    "imagenet_wide_resnet50_2": (Bottleneck, [3, 4, 6, 3], 1, 128),
    "imagenet_resnext50_32x4d": (Bottleneck, [3, 4, 6, 3], 32, 4),
}


def build(name: str, num_classes: int) -> ImageNetResNet:
    block, layers, groups, width_per_group = ARCHS[name]
    return ImageNetResNet(block, layers, num_classes=num_classes, groups=groups, width_per_group=width_per_group)
