"""The model zoo of mtkd_fast and the MTKD-RL feature transfer.

- ``create_model(name, num_classes, weights=None)``: a CIFAR model (32x32 inputs; parameter names of the
  RepDistiller / CA-MKD / MTKD-RL checkpoints) or an ImageNet model (``imagenet_*``: torchvision's
  ResNets, torchvision parameter names); ``weights`` is an optional local checkpoint file.
- ``imagenet_vit_*`` / ``imagenet_swin_*``: torchvision's ViT and Swin Transformer (models/vit.py), same
  interface (a ViT's feats[-1] is its class token).
- ``timm:<name>``: any timm model (models/timm_models.py; needs the ``mtkd_fast[timm]`` extra), same interface;
  ``is_model(name)`` says whether a name (zoo or timm) is valid.
- ``backbone(arch, weights, task=...)``: a distilled ResNet student inside a torchvision detector or segmenter.
- ``list_models()``: the valid names, sorted.
- Every model: ``model(x)`` -> logits; ``model(x, is_feat=True)`` -> ``(feats, logits)`` with ``feats[-2]``
  the last feature map before global pooling [B, C, H, W] and ``feats[-1]`` its global average [B, C].
- ``load_checkpoint(model, path)``: load ``{"model": state_dict}`` or a bare state_dict from a local file.
- ``FeatureTransfer(student_shape, teacher_shapes, chained_resize=False)``: the per-teacher feature transfer E_m
  (docs/method.md section 1; ``chained_resize`` reproduces the authors' chained resizing, section 8 item 7).
- ``classifier_head(model)``: the final ``nn.Linear`` of a zoo model (feats[-1] -> logits).
- ``with_features(model)``: any torchvision classifier instance (or your model and its map layer) with the
  ``(feats, logits)`` contract.
"""

from __future__ import annotations

import os

from torch import nn

from . import imagenet, timm_models, vit
from .backbone import backbone
from .cifar import BUILDERS as _CIFAR_BUILDERS
from .features import with_features
from .heads import classifier_head
from .loading import load_checkpoint
from .transfer import FeatureTransfer

__all__ = ["create_model", "list_models", "is_model", "load_checkpoint", "FeatureTransfer", "classifier_head",
           "backbone", "with_features"]

_BUILDERS = {**_CIFAR_BUILDERS, **{name: imagenet.build for name in imagenet.ARCHS}}
_BUILDERS.update({name: vit.build for name in vit.ARCHS})  # ViT and Swin (models/vit.py)


def list_models() -> list[str]:
    """All model names ``create_model`` accepts, sorted."""
    return sorted(_BUILDERS)


def is_model(name) -> bool:
    """Whether ``create_model`` knows ``name``: a zoo name, or ``timm:<arch>`` for an architecture timm has
    (a one-line error when timm is not installed)."""
    if timm_models.is_timm_name(name):
        return timm_models.exists(name)
    return name in _BUILDERS


def create_model(name: str, num_classes: int, weights: str | os.PathLike | None = None,
                 **timm_kwargs) -> nn.Module:
    """Build model ``name`` with a ``num_classes``-way classifier, optionally loading local ``weights``.

    ``timm_kwargs``: for ``timm:`` names only, passed to ``timm.create_model`` (e.g. ``img_size=32``).
    Raises ValueError for an unknown name (listing the valid ones) or a bad ``num_classes``;
    FileNotFoundError / ValueError from ``load_checkpoint`` for a missing or mismatched weights file.
    """
    is_timm = timm_models.is_timm_name(name)
    if not is_timm and name not in _BUILDERS:
        raise ValueError(f"name: unknown model {name!r}; valid names: {', '.join(list_models())}, "
                         f"or {timm_models.PREFIX}<a timm model>")
    if timm_kwargs and not is_timm:
        raise ValueError(f"timm_kwargs: {sorted(timm_kwargs)} apply to timm: models only, not to {name!r}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes: expected a positive int, got {num_classes!r}")
    if is_timm:
        model = timm_models.build(name, num_classes, **timm_kwargs)
    else:
        model = _BUILDERS[name](name, num_classes)
    if weights is not None:
        load_checkpoint(model, weights)
    return model
