"""The MTKD-RL authors' way of running a training step: the baseline the benchmarks measure mtkd_fast against.

Two levels, written from docs/method.md sections 2-7:
- :func:`authors_step`: one step's loss, agent state, priors and reward computed as the authors' code does, a
  per-teacher Python loop of small PyTorch operations that recomputes each teacher's KL three times (state, loss,
  reward), each feature MSE and the student cross-entropy twice, and each teacher's cross-entropy twice (state,
  confidence prior). The agent is not included: its weights are inputs; ``loss`` is differentiable w.r.t. the
  student logits and maps. ``mtkd-fast bench ops`` (``mtkd_fast/bench/ops.py``) times it against the fused step.
- :class:`AuthorsMTKDRL`: a whole training step as their loop runs it (the ``mtkd_rl_authors`` row of
  ``mtkd-fast bench epoch``): float32 teachers one after the other under ``torch.no_grad``; the feature transfer
  teacher by teacher (``FeatureTransfer.forward_plain``); the state phase, the agent, then the loss and reward
  phases of :func:`authors_step`; every step's float32 state, statistics and reward appended to a Python list that
  grows until the agent update replays it mini-batch by mini-batch (reward-weighted BCE toward 1, SGD lr 0.1).

``tests/test_bench.py`` checks that both give the loss, weights, reward and agent update of mtkd_fast's
``Trainer.train_step`` on the same inputs, so the comparisons are like for like.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..agent import AgentState, MTKDAgent

__all__ = ["AuthorsStep", "authors_step", "AuthorsMTKDRL"]


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


class AuthorsMTKDRL:
    """One MTKD-RL run in the authors' way: student + feature transfer, M teachers, agent, optimisers.

    Same optimisation settings as ``mtkd_fast.train.TrainConfig``'s defaults (SGD lr 0.05, momentum 0.9
    Nesterov, weight decay 1e-4 for the student and transfer; SGD lr 0.1 for the agent), so a step of each
    does the same update.
    """

    def __init__(self, student: nn.Module, teachers: Sequence[nn.Module], feature_transfer: nn.Module,
                 agent: MTKDAgent, *, temperature: float = 4.0, alpha: float = 1.0, beta: float = 5.0,
                 lr: float = 0.05, momentum: float = 0.9, weight_decay: float = 1e-4, agent_lr: float = 0.1,
                 agent_step: int = 1000, device="cpu"):
        if len(teachers) < 2:
            raise ValueError(f"teachers: expected at least 2 teacher models, got {len(teachers)}")
        self.device = torch.device(device)
        self.student = student.to(self.device)
        self.teachers = [t.to(self.device).eval() for t in teachers]
        self.feature_transfer = feature_transfer.to(self.device)
        self.agent = agent.to(self.device)
        self.temperature, self.alpha, self.beta = float(temperature), float(alpha), float(beta)
        self.agent_step = int(agent_step)
        params = list(self.student.parameters()) + list(self.feature_transfer.parameters())
        self.optimizer = torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=True, weight_decay=weight_decay)
        self.agent_optimizer = torch.optim.SGD(self.agent.parameters(), lr=agent_lr)
        self.memory: list = []  # the authors' growing list of float32 (state, statistics, reward) per step
        self.epoch = 0
        self.step_in_epoch = 0

    def begin_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.step_in_epoch = 0

    def train_step(self, images: Tensor, labels: Tensor) -> dict:
        """One student step (and the agent update when due). Returns the loss (before the optimiser step), the
        weights used and the reward, detached."""
        T, M = self.temperature, len(self.teachers)
        images = images.to(self.device)
        labels = labels.to(self.device)
        # float32 teachers, one at a time, every step
        t_feats, t_logits = [], []
        with torch.no_grad():
            for teacher in self.teachers:
                feats, logits = teacher(images, is_feat=True)
                t_feats.append([f.detach() for f in feats])
                t_logits.append(logits.detach())
        self.student.train()
        self.feature_transfer.train()
        s_feats, s_logits = self.student(images, is_feat=True)
        maps = self.feature_transfer.forward_plain(s_feats[-2])  # per teacher: resize, conv, BN, ReLU
        t_maps = [f[-2] for f in t_feats]
        t_emb = [f[-1] for f in t_feats]

        # 1. state, teacher by teacher (KL 1st time, TCE 1st time), then the priors' TCE (2nd time)
        with torch.no_grad():
            parts, cos, kl, tce = [], [], [], []
            for m in range(M):
                pooled = F.adaptive_avg_pool2d(maps[m], 1).flatten(1)
                cos_m = F.cosine_similarity(pooled, t_emb[m], dim=1)
                kl_m = _kl_per_sample(s_logits, t_logits[m], T)
                tce_m = F.cross_entropy(t_logits[m], labels, reduction="none")
                parts += [cos_m[:, None], kl_m[:, None], tce_m[:, None], t_emb[m], t_logits[m]]
                cos.append(cos_m)
                kl.append(kl_m)
                tce.append(tce_m)
            features = torch.cat(parts, dim=1)
            tce2 = torch.stack([F.cross_entropy(t, labels, reduction="none") for t in t_logits], 1)
            state = AgentState(features, tce2, torch.stack(kl, 1), torch.stack(cos, 1))
            # the agent blends its heads with the priors computed from the state
            self.agent.eval()
            wl, wf = self.agent(state)
            if self.epoch == 0:  # warm-up epoch: all-ones weights (docs/method.md section 7)
                wl, wf = torch.ones_like(wl), torch.ones_like(wf)

        # 2. loss, teacher by teacher (CE 1st time, KL 2nd time, MSE 1st time)
        loss_cls = F.cross_entropy(s_logits, labels)
        loss_div = 0.0
        loss_kd = 0.0
        for m in range(M):
            loss_div = loss_div + (wl[:, m] * _kl_per_sample(s_logits, t_logits[m], T)).mean()
            mse_m = (maps[m] - t_maps[m]).pow(2).mean(dim=(1, 2, 3))
            loss_kd = loss_kd + (wf[:, m] * mse_m).mean()
        loss = loss_cls + self.alpha * loss_div + self.beta * loss_kd

        # 3. reward, recomputed (CE 2nd time, KL 3rd time, MSE 2nd time)
        with torch.no_grad():
            per_sample = F.cross_entropy(s_logits, labels, reduction="none")
            for m in range(M):
                per_sample = per_sample + self.alpha * wl[:, m] * _kl_per_sample(s_logits, t_logits[m], T)
                per_sample = per_sample + self.beta * wf[:, m] * (maps[m] - t_maps[m]).pow(2).mean(dim=(1, 2, 3))
            r = -per_sample
            reward = ((r - r.mean()) / r.std()).clamp(0.0, 1.0)

        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()

        batch_index = self.step_in_epoch
        self.step_in_epoch += 1
        self.memory.append((features.float().clone(), state.teacher_ce.clone(), state.kl.clone(),
                            state.cos.clone(), reward.float().clone()))
        if batch_index % self.agent_step == 0 and batch_index != 0:
            self.update_agent()
        return {"loss": loss.detach(), "logit_weights": wl, "feature_weights": wf, "reward": reward}

    def update_agent(self) -> Optional[float]:
        """Replay the stored list in order, one SGD step of the agent per mini-batch, then clear it."""
        if not self.memory:
            return None
        self.agent.train()
        total = 0.0
        for features, tce, kl, cos, reward in self.memory:
            wl, wf = self.agent(AgentState(features, tce, kl, cos))
            target = torch.ones_like(wl)
            loss = (F.binary_cross_entropy(wl, target, weight=reward[:, None])
                    + F.binary_cross_entropy(wf, target, weight=reward[:, None]))
            self.agent_optimizer.zero_grad()
            loss.backward()
            self.agent_optimizer.step()
            total += loss.item()  # the authors log every agent loss
        self.memory = []
        self.agent.eval()
        return total

    def end_epoch(self) -> None:
        self.update_agent()
