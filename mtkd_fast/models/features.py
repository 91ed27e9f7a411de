"""``with_features(model)``: any classifier instance with the zoo's ``(feats, logits)`` contract, so that
``Distiller.from_config``, ``LiveTeachers`` and the trainer take a torchvision model (or your own) as it is."""

from __future__ import annotations

from typing import Optional, Union

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["with_features", "WithFeatures"]

# the module whose output is the last map before global pooling, by the attribute names torchvision uses:
# ResNet/ResNeXt/Wide ResNet, RegNet, ShuffleNetV2, MNASNet, and the rest (MobileNet, EfficientNet, ConvNeXt,
# DenseNet, VGG, AlexNet, SqueezeNet) name their convolutional trunk "features"
_MAP_LAYERS = ("layer4", "trunk_output", "conv5", "layers", "features")


def _keep_output(module: nn.Module, args, output) -> None:
    # a module-level hook (no closure): a deepcopy of the model (LiveTeachers makes one) keeps a working hook
    module._mtkd_fast_map = output


class WithFeatures(nn.Module):
    """``model`` with ``forward(x, is_feat=True) -> ([map, embedding], logits)``: ``map`` [B, C, H, W] is the output
    of the submodule ``map_layer`` (a dotted name; caught by a forward hook, then ``map_fn`` applied to it),
    ``embedding`` [B, C] its global average."""

    def __init__(self, model: nn.Module, map_layer: str, map_fn=None):
        super().__init__()
        self.model = model
        self.map_layer = map_layer
        self.map_fn = map_fn
        layer = model.get_submodule(map_layer)
        if _keep_output not in layer._forward_hooks.values():
            layer.register_forward_hook(_keep_output)

    def forward(self, x: Tensor, is_feat: bool = False):
        layer = self.model.get_submodule(self.map_layer)
        layer._mtkd_fast_map = None
        logits = self.model(x)
        fmap, layer._mtkd_fast_map = layer._mtkd_fast_map, None  # not kept alive past this call
        if not is_feat:
            return logits
        if fmap is None:
            raise RuntimeError(f"with_features: the map layer {self.map_layer!r} did not run in the model's forward")
        if self.map_fn is not None:
            fmap = self.map_fn(fmap)
        if not isinstance(fmap, Tensor) or fmap.dim() != 4:
            raise ValueError(f"map_layer: expected its output to be a [B, C, H, W] map, got "
                             f"{tuple(fmap.shape) if isinstance(fmap, Tensor) else type(fmap).__name__}")
        return [fmap, fmap.mean(dim=(2, 3))], logits


def with_features(model: nn.Module, map_layer: Union[str, nn.Module, None] = None, map_fn=None) -> nn.Module:
    """``model`` with the ``(feats, logits)`` contract of the zoo (``feats[-2]`` the last map [B, C, H, W],
    ``feats[-1]`` its global average [B, C]).

    A model that already takes ``is_feat`` (the zoo's) is returned as it is. For a torchvision classifier the last
    map is found by name (``layer4``, ``trunk_output``, ``conv5``, ``layers`` or ``features``; DenseNet's gets
    its final ReLU); for any other model name it: ``map_layer`` is a submodule or its dotted name, and ``map_fn``
    (optional) turns that module's output into the map the classifier pools.
    """
    import inspect

    if not isinstance(model, nn.Module):
        raise ValueError(f"model: expected an nn.Module, got {type(model).__name__}")
    if map_layer is None and "is_feat" in inspect.signature(model.forward).parameters:
        return model
    name: Optional[str]
    if isinstance(map_layer, nn.Module):
        name = next((n for n, m in model.named_modules() if m is map_layer and n), None)
        if name is None:
            raise ValueError(f"map_layer: the module given is not a submodule of {type(model).__name__}")
    elif isinstance(map_layer, str):
        try:
            model.get_submodule(map_layer)
        except AttributeError:
            raise ValueError(f"map_layer: {type(model).__name__} has no submodule {map_layer!r}") from None
        name = map_layer
    elif map_layer is None:
        name = next((n for n in _MAP_LAYERS if isinstance(getattr(model, n, None), nn.Module)), None)
        if name is None:
            raise ValueError(f"map_layer: cannot tell which layer of {type(model).__name__} gives its last feature "
                             f"map (none of {', '.join(_MAP_LAYERS)}); pass map_layer='name.of.module'")
        if map_fn is None and type(model).__name__ == "DenseNet":
            map_fn = F.relu  # torchvision's DenseNet applies its last ReLU in forward(), after "features"
    else:
        raise ValueError(f"map_layer: expected a module, a submodule name or None, got {type(map_layer).__name__}")
    return WithFeatures(model, name, map_fn)
