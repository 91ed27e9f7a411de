"""Pure-PyTorch reference of the MTKD-RL maths (docs/method.md sections 2-6).

This module is the ground truth the fused kernels and the trainer are tested against. Every
function works on any device and dtype (float64 included) and is written for clarity, not speed.

Shapes: B samples, M teachers, K classes.
- student logits ``[B, K]``; teacher logits ``[M, B, K]`` (a list of M ``[B, K]`` tensors is accepted);
- targets ``[B]`` int64; teacher weights ``[B, M]``;
- feature maps: per teacher m a student map after feature transfer ``G_m`` and a teacher map ``F_m``,
  both ``[B, C_m, H_m, W_m]`` (shapes may differ between teachers); embeddings ``e_m`` ``[B, D_m]``.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ._validation import (
    check_logits,
    check_maps,
    check_per_sample,
    check_scale,
    check_targets,
    check_temperature,
    check_weights,
    stack_teachers,
)

# The agent's maths (state layout, priors, action, reward, agent loss; sections 4-6) has no fused twin: it lives
# in mtkd_fast.agent, which the trainer uses, and is re-exported here so this module covers sections 2-6.
from .agent import (
    action,
    agent_bce_loss,
    agent_state,
    confidence_prior,
    gap_prior,
    normalized_reward,
    similarity_prior,
)

__all__ = [
    "LogitKDOutput",
    "FeatureKDOutput",
    "kl_per_sample",
    "cross_entropy_per_sample",
    "teacher_cross_entropy",
    "feature_mse_per_sample",
    "pooled_cosine",
    "AgentStats",
    "agent_stats",
    "mtkd_logit_kd",
    "mtkd_feature_kd",
    "feature_kd_and_cosine",
    "logit_kd_grad",
    "feature_kd_grad",
    "total_loss",
    "per_sample_loss",
    "agent_state",
    "confidence_prior",
    "gap_prior",
    "similarity_prior",
    "action",
    "normalized_reward",
    "RewardOutput",
    "per_sample_loss_and_reward",
    "agent_bce_loss",
]


class LogitKDOutput(NamedTuple):
    """Scalar loss and the per-sample statistics of logit distillation."""

    loss: Tensor  # mean_i SCE_i + alpha * sum_m mean_i(w_im * KL_im)
    kl: Tensor  # [B, M]
    teacher_ce: Tensor  # [B, M]
    student_ce: Tensor  # [B]


class FeatureKDOutput(NamedTuple):
    """Scalar loss and the per-sample MSE of feature distillation."""

    loss: Tensor  # beta * sum_m mean_i(wf_im * MSE_im)
    mse: Tensor  # [B, M]


class RewardOutput(NamedTuple):
    """Per-sample loss l_i [B] and the normalised, clamped reward r_hat [B] (docs/method.md section 5)."""

    per_sample_loss: Tensor
    reward: Tensor


# --------------------------------------------------------------------------------------------
# Section 2: per-sample, per-teacher quantities
# --------------------------------------------------------------------------------------------


def kl_per_sample(student_logits: Tensor, teacher_logits, temperature: float = 4.0) -> Tensor:
    """KL_{i,m} = T^2 * sum_k p^T(z_m)_ik (log p^T(z_m)_ik - log p^T(z_s)_ik), shape [B, M]."""
    check_logits("student_logits", student_logits)
    teachers = stack_teachers("teacher_logits", teacher_logits, student_logits)
    _check_temperature(temperature)
    log_ps = F.log_softmax(student_logits / temperature, dim=-1)  # [B,K]
    log_pt = F.log_softmax(teachers / temperature, dim=-1)  # [M,B,K]
    # xlogy-style: only a teacher probability of exactly 0 (a -inf logit) contributes 0, never 0 * -inf; a NaN
    # probability (a NaN or +inf logit) is not masked (!= 0, not > 0), so the row's KL is NaN as in plain PyTorch.
    pt = log_pt.exp()
    kl = torch.where(pt != 0, pt * (log_pt - log_ps.unsqueeze(0)), torch.zeros_like(pt)).sum(-1)
    return (temperature**2) * kl.transpose(0, 1)


def cross_entropy_per_sample(logits: Tensor, targets: Tensor) -> Tensor:
    """Cross-entropy of each row of ``logits`` [B, K] against ``targets`` [B] (T = 1), shape [B]."""
    check_logits("logits", logits)
    check_targets("targets", targets, logits.shape[0], logits.shape[1], logits.device)
    return F.cross_entropy(logits, targets, reduction="none")


def teacher_cross_entropy(teacher_logits, targets: Tensor) -> Tensor:
    """TCE_{i,m}: each teacher's cross-entropy against the labels, shape [B, M]."""
    teachers = stack_teachers("teacher_logits", teacher_logits)
    M, B, K = teachers.shape
    check_targets("targets", targets, B, K, teachers.device)
    ce = F.cross_entropy(teachers.reshape(M * B, K), targets.repeat(M), reduction="none")
    return ce.reshape(M, B).transpose(0, 1)


def feature_mse_per_sample(student_maps: Sequence[Tensor], teacher_maps: Sequence[Tensor]) -> Tensor:
    """MSE_{i,m}: mean over (c, h, w) of (G_m - F_m)^2 for each sample, shape [B, M]."""
    check_maps(student_maps, teacher_maps)
    cols = [(g - f).pow(2).flatten(1).mean(1) for g, f in zip(student_maps, teacher_maps)]
    return torch.stack(cols, dim=1)


def pooled_cosine(student_maps: Sequence[Tensor], teacher_embeddings: Sequence[Tensor], eps: float = 1e-8) -> Tensor:
    """COS_{i,m}: cosine similarity of global-average-pooled G_m [B, C_m] and e_m [B, D_m], shape [B, M].

    Follows ``torch.nn.functional.cosine_similarity`` (each norm clamped below by ``eps``).
    """
    if len(student_maps) != len(teacher_embeddings) or len(student_maps) < 1:
        raise ValueError(
            f"teacher_embeddings: expected one embedding per student map ({len(student_maps)}), "
            f"got {len(teacher_embeddings)}"
        )
    cols = []
    for m, (g, e) in enumerate(zip(student_maps, teacher_embeddings)):
        if g.dim() != 4:
            raise ValueError(f"student_maps[{m}]: expected a [B, C, H, W] map, got shape {tuple(g.shape)}")
        if e.dim() != 2 or e.shape != g.shape[:2]:
            raise ValueError(
                f"teacher_embeddings[{m}]: expected shape {tuple(g.shape[:2])} (the pooled map's [B, C_m]), "
                f"got {tuple(e.shape)}"
            )
        cols.append(F.cosine_similarity(g.mean(dim=(2, 3)), e, dim=1, eps=eps))
    return torch.stack(cols, dim=1)


class AgentStats(NamedTuple):
    """The agent state's per-sample statistics, each [B, M] (no gradient)."""

    kl: Tensor  # KL_{i,m} (with T^2)
    teacher_ce: Tensor  # TCE_{i,m}
    cos: Tensor  # COS_{i,m} (0 without student maps)


def agent_stats(
    student_logits: Tensor,
    teacher_logits,
    targets: Tensor,
    student_maps: Sequence[Tensor] | None,
    teacher_embeddings: Sequence[Tensor] | None,
    temperature: float = 4.0,
    eps: float = 1e-8,
) -> AgentStats:
    """KL, TCE and COS of the agent state (docs/method.md section 2), computed before the teacher weights exist.

    :func:`kl_per_sample`, :func:`teacher_cross_entropy` and :func:`pooled_cosine` of the detached inputs;
    without student maps (``None``) the cosine is 0. The oracle of :func:`mtkd_fast.ops.agent_stats`.
    """
    with torch.no_grad():
        zs = student_logits.detach()
        kl = kl_per_sample(zs, teacher_logits, temperature)
        tce = teacher_cross_entropy(stack_teachers("teacher_logits", teacher_logits, zs), targets)
        if (student_maps is None) != (teacher_embeddings is None):
            raise ValueError("student_maps, teacher_embeddings: give both (the cosine) or neither")
        if student_maps is None:
            cos = torch.zeros_like(kl)
        else:
            if len(student_maps) != kl.shape[1]:
                raise ValueError(f"student_maps: expected {kl.shape[1]} maps (one per teacher), "
                                 f"got {len(student_maps)}")
            cos = pooled_cosine([g.detach() for g in student_maps], [e.detach() for e in teacher_embeddings], eps)
    return AgentStats(kl, tce, cos)


# --------------------------------------------------------------------------------------------
# Section 3: student loss and its closed-form gradients
# --------------------------------------------------------------------------------------------


def mtkd_logit_kd(
    student_logits: Tensor,
    teacher_logits,
    targets: Tensor,
    weights: Tensor,
    temperature: float = 4.0,
    alpha: float = 1.0,
) -> LogitKDOutput:
    """Logit distillation: ``mean_i SCE_i + alpha * sum_m mean_i(w_im * KL_im)`` and its statistics.

    ``weights`` [B, M] carry no gradient (detached here, as docs/method.md section 3 requires).
    """
    check_logits("student_logits", student_logits)
    check_scale("alpha", alpha)
    teachers = stack_teachers("teacher_logits", teacher_logits, student_logits)
    B, M = student_logits.shape[0], teachers.shape[0]
    check_targets("targets", targets, B, student_logits.shape[1], student_logits.device)
    check_weights("weights", weights, B, M, student_logits.device)
    kl = kl_per_sample(student_logits, teachers, temperature)
    tce = teacher_cross_entropy(teachers, targets)
    sce = cross_entropy_per_sample(student_logits, targets)
    w = weights.detach().to(kl.dtype)
    loss = sce.mean() + alpha * (w * kl).mean(0).sum()
    return LogitKDOutput(loss, kl, tce, sce)


def mtkd_feature_kd(
    student_maps: Sequence[Tensor], teacher_maps: Sequence[Tensor], weights: Tensor, beta: float = 5.0
) -> FeatureKDOutput:
    """Feature distillation: ``beta * sum_m mean_i(wf_im * MSE_im)`` and the per-sample MSE [B, M]."""
    check_scale("beta", beta)
    mse = feature_mse_per_sample(student_maps, teacher_maps)
    B, M = mse.shape
    check_weights("weights", weights, B, M, mse.device)
    loss = beta * (weights.detach().to(mse.dtype) * mse).mean(0).sum()
    return FeatureKDOutput(loss, mse)


def feature_kd_and_cosine(
    student_maps: Sequence[Tensor],
    teacher_maps: Sequence[Tensor],
    weights: Tensor,
    beta: float = 5.0,
    teacher_embeddings: Sequence[Tensor] | None = None,
    eps: float = 1e-8,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """:func:`mtkd_feature_kd` plus COS_{i,m} [B, M] (detached; :func:`pooled_cosine`) for ``teacher_embeddings``.

    Without embeddings the third value is None. The oracle of :func:`mtkd_fast.ops.feature_kd_and_cosine`, with
    its signature, so :class:`mtkd_fast.MTKDLoss` calls either module the same way.
    """
    loss, mse = mtkd_feature_kd(student_maps, teacher_maps, weights, beta)
    cos = None
    if teacher_embeddings is not None:
        with torch.no_grad():
            cos = pooled_cosine([g.detach() for g in student_maps], [e.detach() for e in teacher_embeddings], eps)
    return loss, mse, cos


def logit_kd_grad(
    student_logits: Tensor,
    teacher_logits,
    targets: Tensor,
    weights: Tensor,
    temperature: float = 4.0,
    alpha: float = 1.0,
) -> Tensor:
    """Closed-form dL/dz_s of :func:`mtkd_logit_kd` (docs/method.md section 3), shape [B, K].

    dL/dz_s[i] = (p^1(z_s)_i - onehot(y_i)) / B + alpha * T * sum_m w_im (p^T(z_s)_i - p^T(z_m)_i) / B
    """
    check_logits("student_logits", student_logits)
    teachers = stack_teachers("teacher_logits", teacher_logits, student_logits)
    B, K = student_logits.shape
    check_targets("targets", targets, B, K, student_logits.device)
    check_weights("weights", weights, B, teachers.shape[0], student_logits.device)
    T = temperature
    p1 = F.softmax(student_logits, dim=-1)
    onehot = F.one_hot(targets, K).to(p1.dtype)
    ps = F.softmax(student_logits / T, dim=-1)
    pt = F.softmax(teachers / T, dim=-1)  # [M,B,K]
    w = weights.detach().to(p1.dtype).transpose(0, 1).unsqueeze(-1)  # [M,B,1]
    kd = (w * (ps.unsqueeze(0) - pt)).sum(0)
    return (p1 - onehot) / B + alpha * T * kd / B


def feature_kd_grad(
    student_maps: Sequence[Tensor], teacher_maps: Sequence[Tensor], weights: Tensor, beta: float = 5.0
) -> list[Tensor]:
    """Closed-form dL/dG_m of :func:`mtkd_feature_kd` (docs/method.md section 3), one tensor per teacher.

    dL/dG_m[i] = beta * wf_im * 2 (G_m - F_m)_i / (B * C_m * H_m * W_m)
    """
    check_maps(student_maps, teacher_maps)
    B, M = student_maps[0].shape[0], len(student_maps)
    check_weights("weights", weights, B, M, student_maps[0].device)
    grads = []
    for m, (g, f) in enumerate(zip(student_maps, teacher_maps)):
        n = g[0].numel()
        w = weights.detach()[:, m].to(g.dtype).view(B, 1, 1, 1)
        grads.append(beta * w * 2.0 * (g - f) / (B * n))
    return grads


def per_sample_loss(
    student_ce: Tensor,
    kl: Tensor,
    logit_weights: Tensor,
    mse: Tensor | None = None,
    feature_weights: Tensor | None = None,
    alpha: float = 1.0,
    beta: float = 5.0,
) -> Tensor:
    """l_i = SCE_i + alpha * sum_m wl_im KL_im + beta * sum_m wf_im MSE_im, shape [B] (docs/method.md section 5).

    ``mse``/``feature_weights`` may be omitted together (logit distillation only).
    """
    B, M = _check_stats(student_ce, kl, logit_weights, mse, feature_weights)
    check_scale("alpha", alpha), check_scale("beta", beta)
    loss = student_ce + alpha * (logit_weights.detach().to(kl.dtype) * kl).sum(1)
    if mse is not None:
        loss = loss + beta * (feature_weights.detach().to(mse.dtype) * mse).sum(1)
    return loss


def total_loss(
    student_ce: Tensor,
    kl: Tensor,
    logit_weights: Tensor,
    mse: Tensor | None = None,
    feature_weights: Tensor | None = None,
    alpha: float = 1.0,
    beta: float = 5.0,
) -> Tensor:
    """L = mean_i SCE_i + alpha sum_m mean_i(wl KL) + beta sum_m mean_i(wf MSE) (docs/method.md section 3): the batch
    mean
    of :func:`per_sample_loss`."""
    return per_sample_loss(student_ce, kl, logit_weights, mse, feature_weights, alpha, beta).mean()


def per_sample_loss_and_reward(
    student_ce: Tensor,
    kl: Tensor,
    logit_weights: Tensor,
    mse: Tensor | None = None,
    feature_weights: Tensor | None = None,
    alpha: float = 1.0,
    beta: float = 5.0,
) -> RewardOutput:
    """:func:`per_sample_loss` and its :func:`normalized_reward` (detached) together.

    The oracle of :func:`mtkd_fast.ops.per_sample_loss_and_reward`, with its signature, so callers pick a module
    instead of branching.
    """
    loss = per_sample_loss(student_ce, kl, logit_weights, mse, feature_weights, alpha, beta)
    return RewardOutput(loss, normalized_reward(loss))


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _check_temperature(temperature: float) -> None:
    check_temperature(temperature)


def _check_stats(student_ce, kl, logit_weights, mse, feature_weights):
    if kl.dim() != 2:
        raise ValueError(f"kl: expected shape [B, M], got {tuple(kl.shape)}")
    B, M = kl.shape
    check_per_sample("student_ce", student_ce, B, kl.device)
    check_weights("logit_weights", logit_weights, B, M, kl.device)
    if (mse is None) != (feature_weights is None):
        raise ValueError("mse, feature_weights: give both (feature distillation) or neither")
    if mse is not None:
        check_weights("mse", mse, B, M, kl.device, what="statistic")
        check_weights("feature_weights", feature_weights, B, M, kl.device)
    return B, M
