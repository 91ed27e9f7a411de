"""The MTKD-RL agent (docs/method.md sections 4-6): a small policy network that turns each sample's state into
per-teacher weights for logit and feature distillation, its update loss, and the replay buffer that holds
the (state, reward) mini-batches between agent updates.

Parameter names follow the authors' ``PolicyTrans`` (``steam.0.weight`` -- sic --, ``logit_head.*``,
``feature_head.*``, and with ``dynamic`` ``logit_weight_factor``/``feature_weight_factor``), so their agent
checkpoints load unchanged with ``load_state_dict``.
"""

from __future__ import annotations

from typing import Iterator, NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._validation import check_per_sample, check_weights, stack_teachers

__all__ = ["AgentState", "MTKDAgent", "AgentReplayBuffer", "make_state", "agent_state", "confidence_prior",
           "gap_prior", "similarity_prior", "action", "normalized_reward", "agent_bce_loss", "list_storage_nbytes",
           "buffer_storage_nbytes"]

UPDATES = ("bce", "policy_gradient")


# --------------------------------------------------------------------------------------------
# Section 4: state, priors and action
# --------------------------------------------------------------------------------------------


def agent_state(
    cos: Tensor, kl: Tensor, teacher_ce: Tensor, embeddings: Sequence[Tensor], teacher_logits
) -> Tensor:
    """Agent input [B, sum_m (D_m + K + 3)]: per teacher (COS, KL, TCE, e_m, z_m), concatenated over m.

    Every input is detached: the state carries no gradient.
    """
    teachers = stack_teachers("teacher_logits", teacher_logits)
    M, B, K = teachers.shape
    for name, t in (("cos", cos), ("kl", kl), ("teacher_ce", teacher_ce)):
        check_weights(name, t, B, M, teachers.device, what="statistic")
    if len(embeddings) != M:
        raise ValueError(f"embeddings: expected {M} tensors (one per teacher), got {len(embeddings)}")
    for m, e in enumerate(embeddings):
        if e.dim() != 2 or e.shape[0] != B:
            raise ValueError(f"embeddings[{m}]: expected shape [{B}, D_{m}], got {tuple(e.shape)}")
    dtype = torch.promote_types(teachers.dtype, cos.dtype)
    # one cat of 3 M parts: the three statistics interleaved once into [B, M, 3] (teacher m's (COS, KL, TCE)
    # is stats[:, m]); under no_grad instead of a detach per part (every op here costs more than its bytes)
    with torch.no_grad():
        stats = torch.stack([cos.to(dtype), kl.to(dtype), teacher_ce.to(dtype)], dim=2)
        teachers = teachers.to(dtype)
        parts = []
        for m in range(M):
            parts += [stats[:, m], embeddings[m].to(dtype), teachers[m]]
        return torch.cat(parts, dim=1)


def confidence_prior(teacher_ce: Tensor) -> Tensor:
    """c_m = (1 - softmax_m(TCE_{i,.})_m) / (M - 1), rows sum to 1 (the CA-MKD weights)."""
    M = _check_bm("teacher_ce", teacher_ce)
    return (1.0 - F.softmax(teacher_ce, dim=1)) / (M - 1)


def gap_prior(kl: Tensor) -> Tensor:
    """gl_m = softmax_m(KL_{i,.})_m: a larger teacher-student gap gets a larger weight."""
    _check_bm("kl", kl)
    return F.softmax(kl, dim=1)


def similarity_prior(cos: Tensor) -> Tensor:
    """gf_m = softmax_m(COS_{i,.})_m: more similar features get a larger weight."""
    _check_bm("cos", cos)
    return F.softmax(cos, dim=1)


def action(
    pi_l: Tensor,
    pi_f: Tensor,
    teacher_ce: Tensor,
    kl: Tensor,
    cos: Tensor,
    lambda_l: Tensor | None = None,
    lambda_f: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Teacher weights (wl, wf), each [B, M] with rows summing to 1.

    Default: wl = (pi_l + c + gl) / 3, wf = (pi_f + c + gf) / 3. Dynamic (``lambda_l``/``lambda_f`` given,
    3-vectors): wl = sum_j softmax(lambda_l)_j [pi_l, c, gl]_j, and likewise wf.
    """
    B, M = pi_l.shape if pi_l.dim() == 2 else (None, None)
    if B is None:
        raise ValueError(f"pi_l: expected shape [B, M], got {tuple(pi_l.shape)}")
    for name, t in (("pi_f", pi_f), ("teacher_ce", teacher_ce), ("kl", kl), ("cos", cos)):
        check_weights(name, t, B, M, pi_l.device, what="tensor")
    if (lambda_l is None) != (lambda_f is None):
        raise ValueError("lambda_l, lambda_f: give both (dynamic action) or neither (default action)")
    c, gl, gf = confidence_prior(teacher_ce), gap_prior(kl), similarity_prior(cos)
    if lambda_l is None:
        return (pi_l + c + gl) / 3.0, (pi_f + c + gf) / 3.0
    for name, lam in (("lambda_l", lambda_l), ("lambda_f", lambda_f)):
        if lam.shape != (3,):
            raise ValueError(f"{name}: expected shape (3,), got {tuple(lam.shape)}")
    a_l, a_f = F.softmax(lambda_l, dim=0), F.softmax(lambda_f, dim=0)
    wl = a_l[0] * pi_l + a_l[1] * c + a_l[2] * gl
    wf = a_f[0] * pi_f + a_f[1] * c + a_f[2] * gf
    return wl, wf


# --------------------------------------------------------------------------------------------
# Sections 5-6: reward and agent loss
# --------------------------------------------------------------------------------------------


def normalized_reward(per_sample: Tensor) -> Tensor:
    """r_hat = clamp((r - mean r) / std r, 0, 1) with r = -per_sample loss and Bessel's std.

    A batch of one sample, or one whose losses are all equal (std 0), gets reward 0 instead of NaN. A NaN/Inf
    loss gets reward 0 and is left out of the mean and std, so it does not zero the other samples' rewards
    (``MTKDLoss(check_finite=True)`` raises on it instead).
    """
    if per_sample.dim() != 1:
        raise ValueError(f"per_sample: expected a [B] vector of per-sample losses, got {tuple(per_sample.shape)}")
    r = -per_sample.detach()
    if r.numel() < 2:
        return torch.zeros_like(r)
    # selects instead of branches: a training step never reads a statistic back to the host
    finite = torch.isfinite(r)
    n = finite.sum().to(r.dtype)
    zero = torch.zeros_like(r)
    mean = torch.where(finite, r, zero).sum() / n.clamp(min=1)
    dev = torch.where(finite, r - mean, zero)
    std = (dev.pow(2).sum() / (n - 1).clamp(min=1)).sqrt()
    ok = (n >= 2) & (std > 0)
    z = (dev / torch.where(ok, std, torch.ones_like(std))).clamp(0.0, 1.0)
    return torch.where(ok & finite, z, zero)



def agent_bce_loss(logit_weights: Tensor, feature_weights: Tensor, reward: Tensor) -> Tensor:
    """Parity agent loss: BCE(wl, 1; weight=r_hat) + BCE(wf, 1; weight=r_hat)
    = mean_{i,m}(-r_hat_i log wl_im) + mean_{i,m}(-r_hat_i log wf_im).

    ``torch.nn.functional.binary_cross_entropy`` clamps the log at -100, so a zero weight gives a finite loss.
    """
    if logit_weights.dim() != 2:
        raise ValueError(f"logit_weights: expected shape [B, M], got {tuple(logit_weights.shape)}")
    B, M = logit_weights.shape
    check_weights("feature_weights", feature_weights, B, M, logit_weights.device)
    check_per_sample("reward", reward, B, logit_weights.device)
    w = reward.detach().to(logit_weights.dtype).unsqueeze(1).expand(B, M)
    ones = torch.ones_like(logit_weights)
    return F.binary_cross_entropy(logit_weights, ones, weight=w) + F.binary_cross_entropy(
        feature_weights, ones, weight=w.to(feature_weights.dtype)
    )



def _check_bm(name: str, t: Tensor) -> int:
    if t.dim() != 2 or t.shape[1] < 2:
        raise ValueError(f"{name}: expected shape [B, M] with M >= 2 teachers, got {tuple(t.shape)}")
    return t.shape[1]


# --------------------------------------------------------------------------------------------
# the policy network and its replay buffer
# --------------------------------------------------------------------------------------------


class AgentState(NamedTuple):
    """The agent's input for a batch (all detached).

    ``features`` [B, sum_m (D_m + K + 3)]: per teacher m, (COS, KL, TCE, e_m, z_m) concatenated over m (the
    layout of :func:`agent_state`); ``teacher_ce``, ``kl``, ``cos`` [B, M] feed the priors.
    """

    features: Tensor
    teacher_ce: Tensor
    kl: Tensor
    cos: Tensor


def make_state(cos: Tensor, kl: Tensor, teacher_ce: Tensor, embeddings: Sequence[Tensor], teacher_logits) -> AgentState:
    """Build an :class:`AgentState` from the per-sample statistics and the teachers' outputs."""
    features = agent_state(cos, kl, teacher_ce, embeddings, teacher_logits)
    return AgentState(features, teacher_ce.detach(), kl.detach(), cos.detach())


class MTKDAgent(nn.Module):
    """Policy network of docs/method.md section 4.

    Args:
        input_sizes: per teacher the state width D_m + K + 3 (a sequence of M ints); the network sees their sum.
        num_teachers: M (>= 2).
        dynamic: learn the blend of (agent, confidence prior, gap prior) as softmax(lambda) over two learnable
            3-vectors initialised to ones, instead of the fixed mean.
        update: ``"bce"`` (parity: reward-weighted BCE toward 1 of docs/method.md section 6) or ``"policy_gradient"``
            (REINFORCE with a Dirichlet policy centred on the blended weights; see :meth:`sample`).
        concentration: total Dirichlet concentration of the policy-gradient option (larger = less exploration).
        hidden: width of the shared layer (128 in the paper).
    """

    def __init__(self, input_sizes: Sequence[int], num_teachers: int, dynamic: bool = False, update: str = "bce",
                 concentration: float = 50.0, hidden: int = 128):
        super().__init__()
        input_sizes = [int(s) for s in input_sizes]
        if num_teachers < 2:
            raise ValueError(f"num_teachers: expected M >= 2 teachers, got {num_teachers}")
        if len(input_sizes) != num_teachers or min(input_sizes) < 4:
            raise ValueError(
                f"input_sizes: expected {num_teachers} per-teacher state widths D_m + K + 3 (each >= 4), "
                f"got {input_sizes}"
            )
        if update not in UPDATES:
            raise ValueError(f"update: expected one of {UPDATES}, got {update!r}")
        if not concentration > 0:
            raise ValueError(f"concentration: expected a positive number, got {concentration}")
        self.input_sizes = input_sizes
        self.num_teachers = num_teachers
        self.dynamic = dynamic
        self.update = update
        self.concentration = float(concentration)
        width = sum(input_sizes)
        self.steam = nn.Sequential(nn.Linear(width, hidden, bias=False), nn.ReLU())  # authors' name, sic
        self.logit_head = nn.Linear(hidden, num_teachers, bias=True)
        self.feature_head = nn.Linear(hidden, num_teachers, bias=True)
        if dynamic:
            self.logit_weight_factor = nn.Parameter(torch.ones(3))
            self.feature_weight_factor = nn.Parameter(torch.ones(3))

    @property
    def state_width(self) -> int:
        return sum(self.input_sizes)

    def extra_repr(self) -> str:
        return (f"input_sizes={self.input_sizes}, num_teachers={self.num_teachers}, "
                f"dynamic={self.dynamic}, update={self.update!r}")

    def policy(self, state: AgentState) -> tuple[Tensor, Tensor]:
        """The agent's own softmax outputs (pi_l, pi_f), each [B, M], before blending with the priors."""
        x = state.features
        if x.dim() != 2 or x.shape[1] != self.state_width:
            raise ValueError(f"state.features: expected shape [B, {self.state_width}], got {tuple(x.shape)}")
        h = self.steam(x.to(self.steam[0].weight.dtype))
        return F.softmax(self.logit_head(h), dim=1), F.softmax(self.feature_head(h), dim=1)

    def forward(self, state: AgentState) -> tuple[Tensor, Tensor]:
        """Teacher weights (logit_weights, feature_weights), each [B, M], rows summing to 1
        (docs/method.md section 4)."""
        pi_l, pi_f = self.policy(state)
        dt = pi_l.dtype
        lam_l = self.logit_weight_factor if self.dynamic else None
        lam_f = self.feature_weight_factor if self.dynamic else None
        return action(pi_l, pi_f, state.teacher_ce.to(dt), state.kl.to(dt), state.cos.to(dt), lam_l, lam_f)

    def _dirichlets(self, state: AgentState):
        wl, wf = self(state)
        tiny = torch.finfo(wl.dtype).tiny
        return (torch.distributions.Dirichlet(wl.clamp_min(tiny) * self.concentration),
                torch.distributions.Dirichlet(wf.clamp_min(tiny) * self.concentration))

    def sample(self, state: AgentState) -> tuple[Tensor, Tensor]:
        """Policy-gradient option: draw (logit_weights, feature_weights) from Dirichlet(concentration * w), whose
        mean is the deterministic action ``self(state)`` (global torch RNG, so seeded runs repeat)."""
        with torch.no_grad():
            dist_l, dist_f = self._dirichlets(state)
            return _simplex_safe(dist_l.sample()), _simplex_safe(dist_f.sample())

    def loss(self, state: AgentState, reward: Tensor, actions: Optional[tuple[Tensor, Tensor]] = None) -> Tensor:
        """The agent's update loss on one stored mini-batch.

        ``"bce"``: BCE(wl, 1; weight=r_hat) + BCE(wf, 1; weight=r_hat) on the re-computed weights
        (docs/method.md section 6).
        ``"policy_gradient"``: -mean_i r_hat_i (log pi(a_l,i | s_i) + log pi(a_f,i | s_i)), ``actions`` being the
        sampled weights the student step used.
        """
        if self.update == "bce":
            wl, wf = self(state)
            return agent_bce_loss(wl, wf, reward.to(wl.dtype))
        if actions is None:
            raise ValueError("actions: the policy-gradient update needs the sampled (logit, feature) weights")
        dist_l, dist_f = self._dirichlets(state)
        a_l, a_f = (a.to(dist_l.concentration.dtype) for a in actions)
        r = reward.to(a_l.dtype)
        return -(r * (dist_l.log_prob(_simplex_safe(a_l)) + dist_f.log_prob(_simplex_safe(a_f)))).mean()


def _simplex_safe(a: Tensor) -> Tensor:
    a = a.clamp_min(torch.finfo(a.dtype).tiny)
    return a / a.sum(1, keepdim=True)


class AgentReplayBuffer:
    """The (state, reward[, actions]) mini-batches stored between agent updates, in one preallocated block.

    The authors keep a Python list of float32 tensors that grows over up to ``agent_step`` batches; here the
    storage is allocated once (``capacity`` batches of ``batch_size`` samples) and written in place, and the
    state features -- by far the largest part -- may be kept in float16/bfloat16 (``dtype``; float32 gives the
    parity trajectory). Batches smaller than ``batch_size`` (an epoch's last) are supported.
    """

    def __init__(self, capacity: int, batch_size: int, state_width: int, num_teachers: int,
                 dtype: torch.dtype = torch.float32, device="cpu", store_actions: bool = False):
        if capacity < 1:
            raise ValueError(f"capacity: expected at least 1 mini-batch, got {capacity}")
        if batch_size < 1:
            raise ValueError(f"batch_size: expected a positive number, got {batch_size}")
        if dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            raise ValueError(f"dtype: expected torch.float32, torch.float16 or torch.bfloat16, got {dtype}")
        self.capacity, self.batch_size, self.num_teachers = capacity, batch_size, num_teachers
        N, B, M = capacity, batch_size, num_teachers
        self.features = torch.zeros(N, B, state_width, dtype=dtype, device=device)
        # the [B, M] statistics and the reward stay float32: tiny, and the priors' softmaxes want the precision
        self.stats = torch.zeros(N, 3, B, M, dtype=torch.float32, device=device)  # teacher_ce, kl, cos
        self.reward = torch.zeros(N, B, dtype=torch.float32, device=device)
        self.actions = torch.zeros(N, 2, B, M, dtype=torch.float32, device=device) if store_actions else None
        self.sizes = [0] * N
        self.count = 0

    def __len__(self) -> int:
        return self.count

    @property
    def nbytes(self) -> int:
        parts = [self.features, self.stats, self.reward] + ([self.actions] if self.actions is not None else [])
        return sum(p.numel() * p.element_size() for p in parts)

    def append(self, state: AgentState, reward: Tensor, actions: Optional[tuple[Tensor, Tensor]] = None) -> None:
        if self.count >= self.capacity:
            raise ValueError(f"AgentReplayBuffer: full ({self.capacity} mini-batches); run the agent update first")
        B = state.features.shape[0]
        if B > self.batch_size or state.features.shape[1] != self.features.shape[2]:
            raise ValueError(
                f"state.features: expected at most {self.batch_size} rows of width {self.features.shape[2]}, "
                f"got {tuple(state.features.shape)}"
            )
        n = self.count
        self.features[n, :B].copy_(state.features)
        self.stats[n, 0, :B].copy_(state.teacher_ce)
        self.stats[n, 1, :B].copy_(state.kl)
        self.stats[n, 2, :B].copy_(state.cos)
        self.reward[n, :B].copy_(reward)
        if self.actions is not None:
            if actions is None:
                raise ValueError("actions: this buffer stores the sampled actions; pass (logit, feature) weights")
            self.actions[n, 0, :B].copy_(actions[0])
            self.actions[n, 1, :B].copy_(actions[1])
        self.sizes[n] = B
        self.count += 1

    def __iter__(self) -> Iterator[tuple[AgentState, Tensor, Optional[tuple[Tensor, Tensor]]]]:
        """Yield the stored (state (float32), reward, actions or None) mini-batches in insertion order."""
        for n in range(self.count):
            B = self.sizes[n]
            st = self.stats[n, :, :B]
            state = AgentState(self.features[n, :B].float(), st[0], st[1], st[2])
            acts = (self.actions[n, 0, :B], self.actions[n, 1, :B]) if self.actions is not None else None
            yield state, self.reward[n, :B], acts

    def clear(self) -> None:
        self.count = 0


def list_storage_nbytes(num_batches: int, batch_size: int, embed_dims: Sequence[int], num_classes: int) -> int:
    """Bytes the authors' growing list holds after ``num_batches`` steps: float32 per-teacher states
    [B, D_m + K + 3], the three [B, M] statistics, the two [B, M] actions and the [B] reward."""
    M = len(embed_dims)
    per_batch = batch_size * (sum(d + num_classes + 3 for d in embed_dims) + 3 * M + 2 * M + 1)
    return 4 * num_batches * per_batch


def buffer_storage_nbytes(num_batches: int, batch_size: int, embed_dims: Sequence[int], num_classes: int,
                          dtype: torch.dtype = torch.float32) -> int:
    """Bytes of an :class:`AgentReplayBuffer` of that capacity (BCE update: no stored actions)."""
    M = len(embed_dims)
    width = sum(d + num_classes + 3 for d in embed_dims)
    elem = torch.tensor([], dtype=dtype).element_size()
    return num_batches * batch_size * (elem * width + 4 * (3 * M + 1))
