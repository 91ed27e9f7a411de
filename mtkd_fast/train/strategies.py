"""Teacher weighting strategies behind one interface, so the baselines share everything else (docs/method.md section 9).

Each strategy turns one batch's teacher information into per-sample weights ``(logit_weights, feature_weights)``
[B, M]; ``"none"`` trains with cross-entropy only (no teachers at all).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import reference
from .._validation import stack_teachers
from ..agent import AgentState, MTKDAgent

__all__ = ["aver_weights", "ebkd_weights", "camkd_weights", "WeightStrategy", "make_strategy"]


def aver_weights(batch_size: int, num_teachers: int, device=None, dtype=torch.float32) -> Tensor:
    """AVER: every teacher weighs 1/M."""
    return torch.full((batch_size, num_teachers), 1.0 / num_teachers, device=device, dtype=dtype)


def ebkd_weights(teacher_logits: Tensor) -> Tensor:
    """EB-KD (Kwon et al. 2020): w_m = 1 - H(p(z_m)) / sum_j H(p(z_j)) with H the entropy of the teacher's
    prediction (T = 1), normalised per sample to sum to 1 (i.e. divided by M - 1). [M, B, K] -> [B, M]."""
    teachers = stack_teachers("teacher_logits", teacher_logits)
    log_p = F.log_softmax(teachers.float() if teachers.dtype in (torch.float16, torch.bfloat16) else teachers, -1)
    entropy = -(log_p.exp() * log_p).sum(-1).transpose(0, 1)  # [B, M]
    total = entropy.sum(1, keepdim=True)
    # all teachers certain (every H = 0): fall back to equal weights rather than 0/0
    share = torch.where(total > 0, entropy / torch.where(total > 0, total, torch.ones_like(total)),
                        torch.full_like(entropy, 1.0 / entropy.shape[1]))
    w = 1.0 - share
    return w / w.sum(1, keepdim=True)


def camkd_weights(teacher_ce: Tensor) -> Tensor:
    """CA-MKD (Zhang et al. 2022): w_m = (1 - softmax_m(TCE)_m) / (M - 1), for logit and feature KD."""
    return reference.confidence_prior(teacher_ce)


class WeightStrategy:
    """Per-sample teacher weights for one batch.

    ``needs_teachers``: whether the step runs distillation at all; ``needs_state``: whether the step must build
    the agent state (KL, cosine) before choosing the weights; ``agent``: the MTKD-RL agent or None.
    """

    name = "base"
    needs_teachers = True
    needs_state = False
    needs_teacher_ce = False
    agent: Optional[MTKDAgent] = None

    def weights(self, epoch: int, teacher_logits: Tensor, teacher_ce: Optional[Tensor],
                state: Optional[AgentState]) -> tuple[Tensor, Tensor, Optional[tuple[Tensor, Tensor]]]:
        """Return (logit_weights, feature_weights, sampled_actions_or_None), weights [B, M] without gradient."""
        raise NotImplementedError


class NoDistillation(WeightStrategy):
    name = "none"
    needs_teachers = False


class Average(WeightStrategy):
    name = "aver"

    def weights(self, epoch, teacher_logits, teacher_ce, state):
        w = aver_weights(teacher_logits.shape[1], teacher_logits.shape[0], teacher_logits.device)
        return w, w, None


class EntropyBased(WeightStrategy):
    name = "ebkd"

    def weights(self, epoch, teacher_logits, teacher_ce, state):
        w = ebkd_weights(teacher_logits)
        return w, w, None


class ConfidenceAware(WeightStrategy):
    name = "camkd"
    needs_teacher_ce = True

    def weights(self, epoch, teacher_logits, teacher_ce, state):
        w = camkd_weights(teacher_ce)
        return w, w, None


class MTKDRL(WeightStrategy):
    """The agent's weights; epoch 0 (warm-up) uses all-ones (parity) or 1/M weights (docs/method.md section 7).

    With the policy-gradient update the student uses weights sampled from the agent's policy (also during
    warm-up the sample is drawn and stored, so the first update has actions to score; the student then uses
    the warm-up weights)."""

    name = "mtkd_rl"
    needs_state = True
    needs_teacher_ce = True

    def __init__(self, agent: MTKDAgent, warmup_weights: str = "ones"):
        if warmup_weights not in ("ones", "uniform"):
            raise ValueError(f"warmup_weights: expected 'ones' or 'uniform', got {warmup_weights!r}")
        self.agent = agent
        self.warmup_weights = warmup_weights

    def weights(self, epoch, teacher_logits, teacher_ce, state):
        if state is None:
            raise ValueError("state: the mtkd_rl strategy needs the agent state")
        with torch.no_grad():
            actions = None
            if self.agent.update == "policy_gradient":
                actions = self.agent.sample(state)
                wl, wf = actions
            else:
                wl, wf = self.agent(state)
            if epoch == 0:
                fill = 1.0 if self.warmup_weights == "ones" else 1.0 / wl.shape[1]
                wl = torch.full_like(wl, fill)
                wf = torch.full_like(wf, fill)
        return wl.detach(), wf.detach(), actions


def make_strategy(name: str, agent: Optional[MTKDAgent] = None, warmup_weights: str = "ones") -> WeightStrategy:
    """The strategy called ``name`` (none | aver | ebkd | camkd | mtkd_rl); mtkd_rl needs ``agent``."""
    if name == "mtkd_rl":
        if agent is None:
            raise ValueError("agent: the mtkd_rl strategy needs an MTKDAgent")
        return MTKDRL(agent, warmup_weights)
    simple = {"none": NoDistillation, "aver": Average, "ebkd": EntropyBased, "camkd": ConfidenceAware}
    if name not in simple:
        raise ValueError(f"strategy: expected one of {sorted(list(simple) + ['mtkd_rl'])}, got {name!r}")
    return simple[name]()
