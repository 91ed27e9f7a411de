"""The one chain of a distillation step, in the order MTKD-RL needs it (docs/method.md sections 2-5 and 7): the
agent state from the teachers' outputs and the student's detached outputs, then the teacher weights (the state's
consumer), then the weighted loss with its gradients, then the per-sample loss and the reward.

Every face of the method runs :func:`distill_step`: ``mtkd_fast.Distiller`` (and through it ``Trainer``) with a
weighting strategy, ``mtkd_fast.MTKDLoss`` with the caller's fixed weights, and ``mtkd-fast bench ops`` times it.
:func:`resolve_backend` is the one place that picks the fused kernels or the reference.

On the fused backend this is compiled kernels end to end: ``ops.agent_stats`` (KL, TCE, COS in one pass per
tensor family), ``ops.mtkd_logit_kd`` and ``ops.feature_kd_and_cosine`` (loss and gradients in one pass each) and
``ops.per_sample_loss_and_reward`` (l_i and the reward straight from the loss ops' per-sample statistics).
The reference backend computes the same with :mod:`mtkd_fast.reference` (the test oracle).
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .agent import AgentState, make_state

__all__ = ["DistillStep", "distill_step", "feature_kl_per_sample", "teacher_ce", "resolve_backend", "BACKENDS"]

BACKENDS = ("auto", "fused", "reference")

# (teacher_ce [B, M] or None, state or None) -> (logit_weights, feature_weights, sampled actions or None)
WeightFn = Callable[[Optional[Tensor], Optional[AgentState]], tuple]


class DistillStep(NamedTuple):
    """What one step's distillation hands back; everything but ``loss`` is detached."""

    loss: Tensor  # scalar, differentiable w.r.t. the student logits and maps
    per_sample_loss: Tensor  # [B] l_i (docs/method.md section 5)
    reward: Optional[Tensor]  # [B] r_hat normalised over this batch (None when not asked for)
    logit_weights: Tensor  # [B, M]
    feature_weights: Tensor  # [B, M]
    actions: Optional[tuple]  # the agent's sampled actions (policy-gradient update) or None
    state: Optional[AgentState]  # the agent state (strategies that need one) or None
    student_ce: Tensor  # [B] SCE_i
    kl: Tensor  # [B, M] KL_{i,m}
    feature_stat: Optional[Tensor]  # [B, M] the feature term per sample (MSE or feature KL); None without maps
    teacher_ce: Optional[Tensor] = None  # [B, M] TCE_{i,m}
    cos: Optional[Tensor] = None  # [B, M] COS_{i,m} (the state's, or with_cosine's); None when not computed


def resolve_backend(backend: str, device, dtypes=()) -> str:
    """The backend (``"fused"`` or ``"reference"``) that runs for inputs on ``device`` of ``dtypes`` (float32 if
    none are given) when ``backend`` is asked for: ``"fused"`` (error when the compiled kernels are missing for
    the device), ``"reference"``, or ``"auto"`` (fused when the extension has kernels for the device and they
    passed the self-check of :func:`mtkd_fast.selftest.device_ok` there, once per process, device and dtype)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    from . import ops

    device = torch.device(device)
    fused_ok = ops.available(device)
    if backend == "fused" and not fused_ok:
        raise RuntimeError(
            f"backend='fused': the compiled mtkd_fast kernels are not available for device {device} "
            "(see mtkd_fast.build_info()); use backend='auto' or 'reference'"
        )
    if backend == "reference" or not fused_ok:
        return "reference"
    from . import selftest

    if backend == "auto" and not selftest.device_ok(device, tuple(dtypes) or (torch.float32,)):
        return "reference"
    return "fused"


def feature_kl_per_sample(student_maps: Sequence[Tensor], teacher_maps: Sequence[Tensor], temperature: float) -> Tensor:
    """The "kl" feature distillation of the authors' code (docs/method.md section 8, item 6): per channel, a softmax
    over the
    spatial positions at temperature T; KL(teacher || student) summed over positions, averaged over channels,
    times T^2. Returns [B, M]."""
    cols = []
    for g, f in zip(student_maps, teacher_maps):
        log_ps = F.log_softmax(g.flatten(2) / temperature, dim=-1)
        log_pt = F.log_softmax(f.detach().flatten(2) / temperature, dim=-1)
        cols.append((log_pt.exp() * (log_pt - log_ps)).sum(-1).mean(-1) * temperature**2)
    return torch.stack(cols, dim=1)


def teacher_ce(teacher_logits: Tensor, labels: Tensor) -> Tensor:
    """TCE [B, M] from stacked teacher logits [M, B, K], without a label-range check (which would read the
    labels back to the host every step)."""
    M, B, K = teacher_logits.shape
    return F.cross_entropy(teacher_logits.reshape(M * B, K), labels.repeat(M), reduction="none").reshape(M, B).T


def distill_step(
    logits: Tensor,
    maps: Optional[Sequence[Tensor]],
    labels: Tensor,
    teacher_logits: Tensor,
    teacher_embeddings: Optional[Sequence[Tensor]],
    teacher_maps: Optional[Sequence[Tensor]],
    choose_weights: WeightFn,
    *,
    temperature: float = 4.0,
    alpha: float = 1.0,
    beta: float = 5.0,
    feature_kd: str = "mse",
    needs_state: bool = True,
    needs_teacher_ce: bool = True,
    backend: str = "fused",
    with_reward: bool = True,
    with_cosine: bool = False,
) -> DistillStep:
    """State -> weights -> loss -> reward for one batch.

    Args:
        logits: student logits [B, K] (with grad); maps: the student's M transferred maps or None (no
            feature distillation; the state's cosine is then 0).
        teacher_logits: [M, B, K]; teacher_embeddings: M tensors [B, C_m] (or None without a state or cosine);
            teacher_maps: M maps (with ``maps``).
        choose_weights: ``(teacher_ce, state) -> (wl, wf, actions)``, e.g. a weighting strategy.
        feature_kd: ``"mse"`` (fused ``feature_kd``) or ``"kl"`` (the authors' spatial-softmax KL, PyTorch).
        needs_state / needs_teacher_ce: what ``choose_weights`` reads (the state implies the TCE).
        backend: ``"fused"`` (compiled kernels) or ``"reference"`` (:mod:`mtkd_fast.reference`).
        with_reward: also return the reward normalised over this batch.
        with_cosine: without a state, also return COS from the MSE feature loss's read of the maps (``MTKDLoss``).
    """
    if backend not in ("fused", "reference"):
        raise ValueError(f"backend: expected 'fused' or 'reference', got {backend!r}")
    if backend == "fused":
        from . import ops as impl
    else:
        from . import reference as impl
    state = None
    with torch.no_grad():
        if needs_state:
            use_maps = maps is not None
            stats = impl.agent_stats(logits, teacher_logits, labels, list(maps) if use_maps else None,
                                     list(teacher_embeddings) if use_maps else None, temperature)
            tce = stats.teacher_ce
            state = make_state(stats.cos, stats.kl, tce, teacher_embeddings, teacher_logits)
        else:
            tce = teacher_ce(teacher_logits, labels) if needs_teacher_ce else None
    wl, wf, actions = choose_weights(tce, state)

    logit = impl.mtkd_logit_kd(logits, teacher_logits, labels, wl, temperature, alpha)
    loss = logit.loss
    feature_stat = None
    cos = state.cos if state is not None else None
    if maps is not None and feature_kd == "mse":
        # the fused op pools the cosine from the loss's own read of the maps
        embeddings = list(teacher_embeddings) if (with_cosine and state is None and teacher_embeddings is not None) \
            else None
        feat_loss, mse, feat_cos = impl.feature_kd_and_cosine(list(maps), list(teacher_maps), wf, beta, embeddings)
        loss = loss + feat_loss
        feature_stat = mse.detach()
        cos = feat_cos if embeddings is not None else cos
    elif maps is not None:  # "kl" feature distillation
        fkl = feature_kl_per_sample(maps, teacher_maps, temperature)
        loss = loss + beta * (wf * fkl).mean(0).sum()
        feature_stat = fkl.detach()
    sce, kl = logit.student_ce.detach(), logit.kl.detach()
    wf_stat = wf if feature_stat is not None else None
    # fused: l_i and r_hat in one pass over the loss ops' statistics; reference: per_sample_loss, normalized_reward
    per_sample, reward = impl.per_sample_loss_and_reward(sce, kl, wl, feature_stat, wf_stat, alpha, beta)
    return DistillStep(loss, per_sample.detach(), reward if with_reward else None, wl, wf, actions, state, sce, kl,
                       feature_stat, logit.teacher_ce.detach(), cos)
