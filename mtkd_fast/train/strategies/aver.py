"""Strategy ``aver``: every teacher weighs 1/M, logits and features."""

from __future__ import annotations

import torch
from torch import Tensor

from . import WeightStrategy, register_strategy


def aver_weights(batch_size: int, num_teachers: int, device=None, dtype=torch.float32) -> Tensor:
    """AVER: every teacher weighs 1/M."""
    return torch.full((batch_size, num_teachers), 1.0 / num_teachers, device=device, dtype=dtype)


@register_strategy("aver")
class Average(WeightStrategy):
    """AVER: 1/M for every teacher, logits and features."""

    requires = frozenset({"teachers"})
    options = ()

    def weights(self, epoch, teacher_logits, teacher_ce, state, student_logits=None, student_maps=None, labels=None):
        w = aver_weights(teacher_logits.shape[1], teacher_logits.shape[0], teacher_logits.device, teacher_logits.dtype)
        return w, w, None
