"""The feature interface shared by every model of the zoo.

``model(x)`` returns logits; ``model(x, is_feat=True)`` returns ``(feats, logits)`` where ``feats`` holds
the stage outputs, then ``feats[-2]`` the last feature map before global pooling ``[B, C, H, W]`` and
``feats[-1]`` the pooled embedding ``[B, C]`` (the global average of ``feats[-2]``, so C == D for the
cosine state of MTKD-RL). The classifier is a single Linear on that embedding.
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor, nn


class FeatureModel(nn.Module):
    """Base class: subclasses implement ``stages(x)`` (list of maps, last one pooled) and ``classify``."""

    def stages(self, x: Tensor) -> list[Tensor]:
        raise NotImplementedError

    def classify(self, embedding: Tensor) -> Tensor:
        raise NotImplementedError

    def stem_and_layers(self, x: Tensor, num_layers: int) -> list[Tensor]:
        """The lineage's common body: relu(bn1(conv1(x))), then layer1 .. layer<num_layers>, every output kept."""
        maps = [F.relu(self.bn1(self.conv1(x)))]
        for k in range(1, num_layers + 1):
            maps.append(getattr(self, f"layer{k}")(maps[-1]))
        return maps

    def forward(self, x: Tensor, is_feat: bool = False):
        maps = self.stages(x)
        embedding = F.adaptive_avg_pool2d(maps[-1], 1).flatten(1)
        logits = self.classify(embedding)
        if is_feat:
            return [*maps, embedding], logits
        return logits


def init_weights(model: nn.Module) -> None:
    """He-normal convolutions (fan_out), unit BatchNorm, small-normal classifier: the lineage's usual start."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 1.0 / math.sqrt(m.in_features))
            nn.init.zeros_(m.bias)
