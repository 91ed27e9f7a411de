"""Strategy ``ebkd``: EB-KD (Kwon et al., ICASSP 2020) as the CA-MKD code runs it (``helper/loops.py``, the ``EBKD``
branch): logit weights from the teachers' prediction entropies, no feature distillation."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..._validation import stack_teachers
from . import WeightStrategy, register_strategy


def ebkd_weights(teacher_logits: Tensor) -> Tensor:
    """EB-KD as in the CA-MKD code: w_m = (1 - H_m / sum_j H_j) / M, H_m the entropy of teacher m's prediction
    (T = 1); not renormalised, so a row sums to (M - 1) / M. [M, B, K] -> [B, M]. (When every teacher is certain,
    H = 0 for all, the shares fall back to 1/M instead of the code's 0/0.)"""
    teachers = stack_teachers("teacher_logits", teacher_logits)
    M = teachers.shape[0]
    log_p = F.log_softmax(teachers.float() if teachers.dtype in (torch.float16, torch.bfloat16) else teachers, -1)
    entropy = -(log_p.exp() * log_p).sum(-1).transpose(0, 1)  # [B, M]
    total = entropy.sum(1, keepdim=True)
    share = torch.where(total > 0, entropy / torch.where(total > 0, total, torch.ones_like(total)),
                        torch.full_like(entropy, 1.0 / M))
    return (1.0 - share) / M


@register_strategy("ebkd")
class EntropyBased(WeightStrategy):
    """EB-KD as in the CA-MKD code: logit weights :func:`ebkd_weights` ((1 - H_m / sum H) / M), no feature
    distillation (feature weights 0)."""

    requires = frozenset({"teachers"})
    options = ()

    def weights(self, epoch, teacher_logits, teacher_ce, state, student_logits=None, student_maps=None, labels=None):
        wl = ebkd_weights(teacher_logits)
        return wl, torch.zeros_like(wl), None
