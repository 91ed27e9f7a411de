"""Strategy ``camkd``: CA-MKD (Zhang et al., ICASSP 2022) as its code runs it (``helper/loops.py``, the ``CAMKD``
branch, and ``distiller_zoo/CAMKD.py``): confidence-aware logit and feature weights; the feature weights apply
each teacher's classifier, so the strategy needs the teacher models' heads."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import WeightStrategy, register_strategy


def _confidence(ce: Tensor) -> Tensor:
    M = ce.shape[1]
    return (1.0 - F.softmax(ce, dim=1)) / ((M - 1) * M)


def camkd_weights(teacher_ce: Tensor) -> Tensor:
    """CA-MKD's logit weights as in its code: (1 - softmax_m(TCE)_m) / (M - 1) / M, rows summing to 1/M.
    ``teacher_ce`` [B, M] is each teacher's cross-entropy against the label."""
    if not isinstance(teacher_ce, Tensor) or teacher_ce.dim() != 2 or teacher_ce.shape[1] < 2:
        raise ValueError(f"teacher_ce: expected a [B, M] tensor with M >= 2, got "
                         f"{tuple(teacher_ce.shape) if isinstance(teacher_ce, Tensor) else type(teacher_ce).__name__}")
    return _confidence(teacher_ce)


def camkd_feature_weights(student_maps: Sequence[Tensor], teacher_heads: Sequence[nn.Module], labels: Tensor,
                          with_grad: bool = False) -> Tensor:
    """CA-MKD's feature weights (``CAMKD.py`` with ``CalWeight``): teacher m's classifier applied to the globally
    average-pooled transformed student map G_m gives a cross-entropy CE_m against the label; the weight is
    (1 - softmax_m(CE)_m) / (M - 1) / M. Returns [B, M].

    ``with_grad`` False (the default): computed without gradient. True: as in the CA-MKD code, the weights stay a
    differentiable function of the maps G_m, so the student's gradient also flows through them."""
    if len(student_maps) != len(teacher_heads) or len(student_maps) < 2:
        raise ValueError(f"teacher_heads: expected one classifier head per teacher map ({len(student_maps)}), "
                         f"got {len(teacher_heads)}")
    with torch.set_grad_enabled(with_grad and torch.is_grad_enabled()):
        cols = []
        for m, (g, head) in enumerate(zip(student_maps, teacher_heads)):
            pooled = (g if with_grad else g.detach()).mean(dim=(2, 3))
            weight = getattr(head, "weight", None)
            if weight is not None and weight.shape[-1] != pooled.shape[1]:
                raise ValueError(f"teacher_heads[{m}]: takes {weight.shape[-1]} features but the transformed map "
                                 f"G_{m} has {pooled.shape[1]} channels")
            logits = head(pooled.to(weight.dtype) if weight is not None else pooled)
            cols.append(F.cross_entropy(logits.to(g.dtype), labels, reduction="none"))
        return _confidence(torch.stack(cols, dim=1))


@register_strategy("camkd")
class ConfidenceAware(WeightStrategy):
    """CA-MKD as in its code: logit weights :func:`camkd_weights` from the teachers' own cross-entropies, feature
    weights :func:`camkd_feature_weights` from each teacher's classifier applied to the transformed student map
    (both summing to 1/M), and no feature distillation in epoch 0 (the code's first epoch). Needs the teachers'
    classifier heads (``mtkd_fast.models.classifier_head``). ``camkd_weight_grad``: the feature weights keep their
    gradient (the code's step; the caller adds the product-rule term, see ``Distiller.step``)."""

    requires = frozenset({"teachers", "teacher_ce", "teacher_heads"})
    options = ("camkd_weight_grad",)

    def __init__(self, teacher_heads: Optional[Sequence[nn.Module]], camkd_weight_grad: bool = False):
        self.weight_grad = bool(camkd_weight_grad)
        if not teacher_heads:
            raise ValueError("teacher_heads: strategy 'camkd' needs the teachers' classifier heads (its feature "
                             "weights apply each teacher's classifier to the transformed student features)")
        self.teacher_heads = list(teacher_heads)

    def weights(self, epoch, teacher_logits, teacher_ce, state, student_logits=None, student_maps=None, labels=None):
        if teacher_ce is None:
            raise ValueError("teacher_ce: the camkd strategy needs the teachers' cross-entropies")
        wl = camkd_weights(teacher_ce)
        if epoch == 0 or student_maps is None:  # no feature KD in the first epoch (or without a transfer)
            return wl, torch.zeros_like(wl), None
        if labels is None:
            raise ValueError("labels: the camkd strategy's feature weights need the batch labels")
        wf = camkd_feature_weights(student_maps, self.teacher_heads, labels, with_grad=self.weight_grad)
        return wl, wf.to(wl.dtype), None
