"""Strategy ``mtkd_rl``: the MTKD-RL agent's per-sample weights (docs/method.md sections 4-7). The agent itself,
its optimiser, replay buffer and update belong to the Distiller, which builds it from the agent options."""

from __future__ import annotations

from typing import Any, Mapping

import torch

from ...agent import MTKDAgent
from ...distiller import WARMUP_WEIGHTS
from . import WeightStrategy, register_strategy


@register_strategy("mtkd_rl")
class MTKDRL(WeightStrategy):
    """The agent's weights; epoch 0 (warm-up) uses all-ones (parity) or 1/M weights (docs/method.md section 7).

    With the policy-gradient update the student uses weights sampled from the agent's policy (also during
    warm-up the sample is drawn and stored, so the first update has actions to score; the student then uses
    the warm-up weights)."""

    requires = frozenset({"teachers", "teacher_ce", "agent_state", "agent"})
    options = ("warmup_weights",)

    @classmethod
    def check_options(cls, values: Mapping[str, Any]) -> None:
        if values["warmup_weights"] not in WARMUP_WEIGHTS:
            raise ValueError(f"warmup_weights: expected 'ones' or 'uniform', got {values['warmup_weights']!r}")

    def __init__(self, agent: MTKDAgent, warmup_weights: str = "ones"):
        self.agent = agent
        self.warmup_weights = warmup_weights

    def weights(self, epoch, teacher_logits, teacher_ce, state, student_logits=None, student_maps=None, labels=None):
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
