"""timm (PyTorch Image Models) models with the zoo's ``(feats, logits)`` interface: the ``timm:<name>`` names.

``build("timm:convnext_tiny", num_classes, **kwargs)`` creates timm's model (``pretrained=False`` always: weights
come only from a local file, never from the hub) and gives it the zoo's ``forward(x, is_feat=False)``. The model
stays timm's own instance (its class is a subclass of timm's that only adds that ``forward``), so its parameter
names are timm's: timm checkpoints load through ``load_checkpoint`` and its state_dict loads back into
``timm.create_model(name, num_classes=K)``.

``model(x, is_feat=True)`` -> ``(feats, logits)``, built on timm's public API only:

- ``feats[-2]``: ``forward_features(x)`` as a map [B, C, H, W]: a CNN's last stage (EfficientNet: after its
  1x1 head convolution), Swin's last stage (timm gives it NHWC), ViT/DeiT/EVA/MLP-Mixer's patch tokens laid out
  on their grid (class and register tokens dropped).
- ``feats[-1]``: ``forward_head(f, pre_logits=True)``, what the classifier reads (pooled map or class token).
- ``logits``: ``forward_head(f)``.

C == D (the map's channels equal the embedding's width) is checked when the model is built: MTKD-RL's cosine
state compares the pooled map with the embedding (docs/method.md section 2). Models whose head widens the
pooled map (MobileNetV3, GhostNet, VGG, EfficientViT) are refused with an error naming the model.
"""

from __future__ import annotations

import functools

import torch
import torch.fx
from torch import Tensor, nn

PREFIX = "timm:"
__all__ = ["PREFIX", "TimmFeatures", "build", "is_timm_name", "timm_name", "exists", "classifier_key"]


def _timm():
    from .._optional import require

    return require("timm", "timm", f"a {PREFIX}<name> model")


def is_timm_name(name) -> bool:
    return isinstance(name, str) and name.startswith(PREFIX)


def timm_name(name: str) -> str:
    """``"timm:convnext_tiny"`` -> ``"convnext_tiny"``."""
    return name[len(PREFIX):]


def exists(name: str) -> bool:
    """Whether timm defines the architecture of ``timm:<arch>`` (a ``.tag`` of pretrained weights is allowed)."""
    timm = _timm()
    arch = timm_name(name).split(".", 1)[0]
    return bool(arch) and timm.is_model(arch)


class TimmFeatures:
    """Mixin put in front of a timm model's class: the zoo's ``forward(x, is_feat)`` on timm's public API."""

    timm_name: str = "?"

    def forward(self, x: Tensor, is_feat: bool = False):
        patch_embed = getattr(self, "patch_embed", None)
        if getattr(patch_embed, "strict_img_size", False):  # a ViT's learnt position embeddings fix its input size
            _check_size(x, tuple(patch_embed.img_size), self.timm_name)
        f = self.forward_features(x)
        logits = self.forward_head(f)
        if not is_feat:
            return logits
        # the head twice: its pooling and norm are cheap, and timm's API gives the embedding only this way
        embedding = self.forward_head(f, pre_logits=True)
        fmap = _feature_map(f, x, getattr(self, "output_fmt", "NCHW"), int(getattr(self, "num_prefix_tokens", 0)),
                            int(self.feature_info[-1]["reduction"]), self.timm_name)
        return [fmap, embedding], logits


@torch.fx.wrap  # shapes are not known while torch.fx traces the forward
def _check_size(x: Tensor, size: tuple, name: str) -> None:
    if x.dim() != 4 or tuple(x.shape[-2:]) != size:
        raise ValueError(f"x: {PREFIX}{name} takes images [B, C, {size[0]}, {size[1]}], got {list(x.shape)}; for "
                         f"another size build it with create_model({PREFIX + name!r}, K, img_size=...)")


@torch.fx.wrap  # one opaque call under torch.fx (BatchNorm folding traces the forward), whose shapes it cannot see
def _feature_map(f: Tensor, x: Tensor, output_fmt: str, prefix: int, reduction: int, name: str) -> Tensor:
    """``forward_features``' output as a [B, C, H, W] map."""
    if f.dim() == 4:
        # timm's Swin/SwinV2 (output_fmt "NHWC") give [B, H, W, C]; every other map is NCHW already
        return f.permute(0, 3, 1, 2) if output_fmt == "NHWC" else f
    if f.dim() == 3:  # tokens [B, prefix + h*w, D] (ViT, DeiT, EVA, Mixer): class/register tokens first
        h, w = -(-x.shape[-2] // reduction), -(-x.shape[-1] // reduction)  # a partial last patch is padded
        if h * w != f.shape[1] - prefix:
            raise ValueError(f"{PREFIX}{name}: {f.shape[1] - prefix} patch tokens do not form the {h}x{w} grid of "
                             f"a {x.shape[-2]}x{x.shape[-1]} input")
        return f[:, prefix:].unflatten(1, (h, w)).permute(0, 3, 1, 2)
    raise ValueError(f"{PREFIX}{name}: forward_features gives a {f.dim()}-d tensor {list(f.shape)}; a feature map "
                     "or tokens were expected")


@functools.lru_cache(maxsize=None)
def _with_features(cls: type) -> type:
    """timm's class ``cls`` with the zoo's forward (one subclass per timm class, named after it)."""
    sub = type(f"Timm{cls.__name__}", (TimmFeatures, cls), {"__module__": __name__})
    globals().setdefault(sub.__name__, sub)  # so that pickle finds the class in this process
    return sub


def build(name: str, num_classes: int, **kwargs) -> nn.Module:
    """timm's model ``timm:<arch>`` with a ``num_classes``-way head and random weights, as the zoo's interface.

    ``kwargs`` go to ``timm.create_model`` (e.g. ``img_size=32`` for a ViT on small images). Raises ValueError
    for an architecture timm does not have, for ``pretrained`` (weights come from files only) and when the map's
    channels and the embedding's width differ (C != D)."""
    timm = _timm()
    arch = timm_name(name)
    if not exists(name):
        raise ValueError(f"name: timm has no model {arch!r} ({name!r}); see timm.list_models() for its names")
    if kwargs.pop("pretrained", False):
        raise ValueError(f"pretrained: {name} takes its weights from a local file only (weights=...), "
                         "never from the hub")
    for key in ("num_classes", "checkpoint_path"):  # timm's file loading is not weights_only
        if key in kwargs:
            raise ValueError(f"{key}: set by create_model for {name}; pass num_classes / weights instead")
    model = timm.create_model(arch, pretrained=False, num_classes=num_classes, **kwargs)
    c = int(model.num_features)
    d = int(getattr(model, "head_hidden_size", c))
    if c != d:
        raise ValueError(f"name: {name}'s head widens its {c}-channel feature map to a {d}-wide embedding (a layer "
                         f"after the pooling), so feats[-2] (C={c}) and feats[-1] (D={d}) cannot agree as the "
                         "(feats, logits) contract requires; choose another model (docs/models.md)")
    model.__class__ = _with_features(type(model))
    model.timm_name = arch
    return model


def classifier_key(name: str) -> str:
    """The state_dict key of ``timm:<arch>``'s classifier weight (its rows are the classes), e.g. ``head.fc.weight``
    for ConvNeXt: export reads the class count of a checkpoint from it."""
    with torch.device("meta"):  # names only: no memory, no initialisation
        model = build(name, 2)
    head = model.get_classifier()
    head = head[0] if isinstance(head, tuple) else head  # DeiT-distilled: (head, head_dist)
    weight = getattr(head, "weight", None)
    key = next((k for k, p in model.named_parameters() if p is weight), None)
    if key is None:
        raise ValueError(f"{name}: timm's get_classifier() has no weight (num_classes=0?)")
    return key
