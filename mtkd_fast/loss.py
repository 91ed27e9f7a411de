"""``MTKDLoss``: the drop-in multi-teacher distillation loss (docs/method.md section 3) with every per-sample statistic
the MTKD-RL agent needs (docs/method.md sections 2 and 5), computed once.

Use it without any agent machinery as a fast multi-teacher KD loss by passing fixed weights (e.g. 1/M).
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch
from torch import Tensor, nn

from ._validation import (
    check_finite,
    check_finite_teachers,
    check_nonnegative_values,
    check_scale,
    check_temperature,
    check_weights,
    stack_teachers,
)
from .step import BACKENDS, distill_step, resolve_backend


class MTKDLossOutput(NamedTuple):
    """Everything one training step needs from the loss.

    ``loss`` is differentiable w.r.t. the student logits and the student maps; every other field is a
    detached per-sample statistic ([B, M] per teacher or [B]).
    """

    loss: Tensor
    kl: Tensor  # [B, M]  KL_{i,m} (with T^2)
    teacher_ce: Tensor  # [B, M]  TCE_{i,m}
    student_ce: Tensor  # [B]     SCE_i
    mse: Optional[Tensor]  # [B, M]  MSE_{i,m} (None without feature maps)
    cos: Optional[Tensor]  # [B, M]  COS_{i,m} (None without teacher embeddings)
    per_sample_loss: Tensor  # [B]  l_i, whose negative is the reward (docs/method.md section 5)


class MTKDLoss(nn.Module):
    """L = mean_i SCE_i + alpha sum_m mean_i(wl_im KL_im) + beta sum_m mean_i(wf_im MSE_im).

    ``temperature`` must lie in ``mtkd_fast._validation.TEMPERATURE_RANGE`` ([0.01, 100]), ``alpha`` and ``beta``
    finite and >= 0, teacher weights >= 0 (checked on CPU tensors always; on an accelerator under
    ``check_finite``, which also refuses a negative weight and a NaN/Inf per-sample loss). A NaN or +inf logit
    or map gives a NaN loss (as plain PyTorch); ``check_finite`` refuses it instead, naming the tensor and
    teacher (``teacher_logits[1]: expected finite values, ...``).

    Args:
        temperature: softmax temperature T of the KL term (default 4).
        alpha: weight of logit distillation (default 1).
        beta: weight of feature distillation (default 5).
        backend: ``"fused"`` (compiled kernels; error if unavailable), ``"reference"`` (pure PyTorch) or
            ``"auto"`` (fused when the extension has kernels for the inputs' device and they pass the
            self-check of :mod:`mtkd_fast.selftest` there, else reference).
        check_finite: raise ``ValueError`` naming the input that holds NaN/Inf (synchronises the device).
    """

    def __init__(self, temperature: float = 4.0, alpha: float = 1.0, beta: float = 5.0, backend: str = "auto",
                 check_finite: bool = False):
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
        check_temperature(temperature)  # in TEMPERATURE_RANGE
        check_scale("alpha", alpha), check_scale("beta", beta)  # finite and >= 0
        self.temperature, self.alpha, self.beta = float(temperature), float(alpha), float(beta)
        self.backend = backend
        self.check_finite = check_finite

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, alpha={self.alpha}, beta={self.beta}, backend={self.backend!r}"

    def resolve_backend(self, device: torch.device, dtypes=()) -> str:
        """The backend that will run for inputs on ``device`` (of ``dtypes``, float32 if none are given);
        :func:`mtkd_fast.step.resolve_backend` decides (on CUDA after the fused kernels' self-check)."""
        return resolve_backend(self.backend, device, dtypes)

    def forward(
        self,
        student_logits: Tensor,
        teacher_logits,
        targets: Tensor,
        logit_weights: Tensor,
        student_maps: Optional[Sequence[Tensor]] = None,
        teacher_maps: Optional[Sequence[Tensor]] = None,
        feature_weights: Optional[Tensor] = None,
        teacher_embeddings: Optional[Sequence[Tensor]] = None,
    ) -> MTKDLossOutput:
        """
        Args:
            student_logits: [B, K].
            teacher_logits: [M, B, K] or a list of M [B, K] tensors.
            targets: [B] int64 class indices.
            logit_weights: [B, M] teacher weights of the KL terms (no gradient flows into them).
            student_maps: M student maps after feature transfer, map m of shape [B, C_m, H_m, W_m].
            teacher_maps: M teacher maps, each the shape of the matching student map.
            feature_weights: [B, M] teacher weights of the feature terms (required with maps).
            teacher_embeddings: M pooled teacher embeddings [B, C_m]; gives ``cos`` (the agent state).
        """
        teachers = stack_teachers("teacher_logits", teacher_logits, student_logits)
        B, M = student_logits.shape[0], teachers.shape[0]
        check_weights("logit_weights", logit_weights, B, M, student_logits.device)
        has_maps = student_maps is not None or teacher_maps is not None
        if has_maps:
            if student_maps is None or teacher_maps is None or feature_weights is None:
                raise ValueError(
                    "student_maps, teacher_maps, feature_weights: feature distillation needs all three"
                )
            if len(student_maps) != M:
                raise ValueError(f"student_maps: expected {M} maps (one per teacher), got {len(student_maps)}")
        elif feature_weights is not None:
            raise ValueError("feature_weights: given without student_maps and teacher_maps")
        if teacher_embeddings is not None and not has_maps:
            raise ValueError("teacher_embeddings: the cosine state needs student_maps too")
        if self.check_finite:
            check_finite("student_logits", student_logits)
            check_finite_teachers("teacher_logits", teachers)
            check_finite("logit_weights", logit_weights)
            check_nonnegative_values("logit_weights", logit_weights)
            if has_maps:
                for m in range(M):
                    check_finite(f"student_maps[{m}]", student_maps[m])
                    check_finite(f"teacher_maps[{m}]", teacher_maps[m])
                if teacher_embeddings is not None:
                    check_finite_teachers("teacher_embeddings", teacher_embeddings)
                check_finite("feature_weights", feature_weights)
                check_nonnegative_values("feature_weights", feature_weights)

        dtypes = (student_logits.dtype, student_maps[0].dtype) if has_maps else (student_logits.dtype,)
        wf = feature_weights if has_maps else torch.zeros_like(logit_weights)
        # the caller's weights through the one step chain (mtkd_fast/step.py): no state, no reward
        step = distill_step(student_logits, list(student_maps) if has_maps else None, targets, teachers,
                            teacher_embeddings, list(teacher_maps) if has_maps else None,
                            lambda tce, state: (logit_weights, wf, None), temperature=self.temperature,
                            alpha=self.alpha, beta=self.beta, needs_state=False, needs_teacher_ce=False,
                            backend=self.resolve_backend(student_logits.device, dtypes), with_reward=False,
                            with_cosine=teacher_embeddings is not None)
        per_sample = step.per_sample_loss
        if self.check_finite:  # finite inputs can still overflow (e.g. a huge T^2 KL)
            check_finite("per_sample_loss", per_sample)
        return MTKDLossOutput(step.loss, step.kl, step.teacher_ce, step.student_ce, step.feature_stat, step.cos,
                              per_sample)
