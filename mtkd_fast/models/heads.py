"""``classifier_head(model)``: the final linear layer of a zoo model (the map from feats[-1] to the logits)."""

from __future__ import annotations

from torch import nn

# where the zoo's families keep their classifier: ResNet/WRN/ImageNet ``fc``, ShuffleNet/RegNet ``linear``,
# VGG/MobileNetV2 ``classifier`` (a Linear or a Sequential ending in one), vision transformers ``head``
_HEAD_NAMES = ("fc", "linear", "classifier", "head")


def classifier_head(model: nn.Module) -> nn.Linear:
    """The ``nn.Linear`` that turns ``model``'s pooled embedding ``feats[-1]`` into its logits.

    Asks a timm model's ``get_classifier()``, then looks for the zoo's classifier attributes (``fc``, ``linear``,
    ``classifier``, ``head``; a Sequential counts through its last module), else takes the last ``nn.Linear``
    registered. Raises ValueError when there is none.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    named = model.get_classifier() if callable(getattr(model, "get_classifier", None)) else None  # timm's own answer
    if isinstance(named, nn.Linear):
        return named
    for name in _HEAD_NAMES:
        sub = getattr(model, name, None)
        if isinstance(sub, nn.Sequential) and len(sub) > 0:
            sub = sub[-1]
        if isinstance(sub, nn.Linear):
            return sub
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"model: {type(model).__name__} has no nn.Linear classifier")
    return linears[-1]
