"""How the MTKD-RL authors' code computes one training step's loss, agent state and reward: the baseline the
fused kernels are measured against (written from docs/method.md sections 2-5).

The authors' step is a per-teacher Python loop of small PyTorch operations, and it recomputes:
- each teacher's KL three times: for the agent state (no grad), for the loss (with grad) and for the reward
  (no grad, after the loss);
- each feature MSE twice (loss, reward), the student cross-entropy twice (mean for the loss, per sample for
  the reward) and each teacher's cross-entropy twice (state, confidence prior).

Use :func:`authors_step` as one step's loss/state/reward (the agent itself is not included: its weights are
inputs); ``loss`` is differentiable w.r.t. the student logits and maps, like the fused path.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["AuthorsStep", "authors_step"]


class AuthorsStep(NamedTuple):
    loss: Tensor  # scalar, differentiable
    state: Tensor  # [B, sum_m (D_m + K + 3)], detached
    priors: tuple  # (c, gl, gf), each [B, M]
    reward: Tensor  # [B], normalised and clamped


def _kl_per_sample(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    # the authors' DistillKL with reduction='none', summed over classes
    log_ps = F.log_softmax(student_logits / temperature, dim=1)
    pt = F.softmax(teacher_logits / temperature, dim=1)
    return F.kl_div(log_ps, pt, reduction="none").sum(1) * temperature**2


def authors_step(
    student_logits: Tensor,
    teacher_logits: Sequence[Tensor],
    targets: Tensor,
    student_maps: Sequence[Tensor],
    teacher_maps: Sequence[Tensor],
    teacher_embeddings: Sequence[Tensor],
    logit_weights: Tensor,
    feature_weights: Tensor,
    temperature: float = 4.0,
    alpha: float = 1.0,
    beta: float = 5.0,
) -> AuthorsStep:
    """One step the authors' way: state (and priors), loss, reward, teacher by teacher."""
    M = len(teacher_logits)
    # 1. agent state, no grad: COS, KL (1st time), TCE (1st time), embedding, logits per teacher
    with torch.no_grad():
        parts, cos, kl, tce = [], [], [], []
        for m in range(M):
            pooled = F.adaptive_avg_pool2d(student_maps[m], 1).flatten(1)
            cos_m = F.cosine_similarity(pooled, teacher_embeddings[m], dim=1)
            kl_m = _kl_per_sample(student_logits, teacher_logits[m], temperature)
            tce_m = F.cross_entropy(teacher_logits[m], targets, reduction="none")
            parts += [cos_m[:, None], kl_m[:, None], tce_m[:, None], teacher_embeddings[m], teacher_logits[m]]
            cos.append(cos_m)
            kl.append(kl_m)
            tce.append(tce_m)
        state = torch.cat(parts, dim=1)
        # priors of the action: TCE recomputed (2nd time) for the confidence prior
        tce2 = torch.stack([F.cross_entropy(t, targets, reduction="none") for t in teacher_logits], 1)
        c = (1.0 - F.softmax(tce2, dim=1)) / (M - 1)
        gl = F.softmax(torch.stack(kl, 1), dim=1)
        gf = F.softmax(torch.stack(cos, 1), dim=1)
    # 2. loss: CE (1st time), KL (2nd time, with grad), feature MSE (1st time)
    loss_cls = F.cross_entropy(student_logits, targets)
    loss_div = 0.0
    loss_kd = 0.0
    for m in range(M):
        loss_div = loss_div + (logit_weights[:, m] * _kl_per_sample(student_logits,
                                                                    teacher_logits[m], temperature)).mean()
        mse_m = (student_maps[m] - teacher_maps[m]).pow(2).mean(dim=(1, 2, 3))
        loss_kd = loss_kd + (feature_weights[:, m] * mse_m).mean()
    loss = loss_cls + alpha * loss_div + beta * loss_kd
    # 3. reward, no grad: CE (2nd time), KL (3rd time), feature MSE (2nd time)
    with torch.no_grad():
        per_sample = F.cross_entropy(student_logits, targets, reduction="none")
        for m in range(M):
            per_sample = per_sample + alpha * logit_weights[:, m] * _kl_per_sample(student_logits,
                                                                                   teacher_logits[m], temperature)
            per_sample = per_sample + beta * feature_weights[:, m] * (student_maps[m] -
                                                                      teacher_maps[m]).pow(2).mean(dim=(1, 2, 3))
        r = -per_sample
        reward = ((r - r.mean()) / r.std()).clamp(0.0, 1.0)
    return AuthorsStep(loss, state, (c, gl, gf), reward)
