"""Teacher weighting strategies behind one interface, so the baselines share everything else (docs/method.md section 9).

Each strategy turns one batch's teacher information into per-sample weights ``(logit_weights, feature_weights)``
[B, M] that enter the one student loss of docs/method.md section 3 (``alpha``, ``beta`` and everything else are the same
for every strategy; only the weighting follows each method's source); ``"none"`` trains with cross-entropy only.

The baselines follow the code the MTKD-RL authors' comparisons ran, the CA-MKD repository (Rorozhl/CA-MKD,
``helper/loops.py`` and ``distiller_zoo/CAMKD.py``); where this differs from that code, the docstring says so.
That code divides the EB-KD and CA-MKD weighted sums over teachers by B*M, so those weights carry a factor 1/M:
- ``aver``: 1/M per teacher for logits and features.
- ``ebkd`` (Kwon et al., ICASSP 2020; the code's ``EBKD`` branch): logits only, w_m = (1 - H_m / sum_j H_j) / M.
- ``camkd`` (Zhang et al., ICASSP 2022; the ``CAMKD`` branch and ``CAMKD.py``): logit weights (1 - softmax_m(CE of
  teacher m's logits)) / ((M - 1) M); feature weights the same form on the CE of teacher m's CLASSIFIER applied
  to the pooled transformed student map G_m; no feature distillation in epoch 0.
- ``aekd`` (Du et al., NeurIPS 2020; the ``AEKD`` branch and ``helper/optimization.py``): one weight per teacher
  per batch, the min-norm point of the teachers' KD gradients w.r.t. the student logits (a nu-SVM dual), summing
  to 1; logits only.

Two options reproduce the CA-MKD code's step exactly where the default departs from it (docs/training.md, "The
baselines as published"): ``camkd_weight_grad`` lets the gradient flow through CA-MKD's feature weights (the code
does not detach them), and ``aekd_solver="libsvm"`` solves AEKD's dual with scikit-learn's ``OneClassSVM`` as the
code does (which stops early when the Gram matrix is tiny) instead of exactly.
"""

from __future__ import annotations

import itertools
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._validation import stack_teachers
from ..agent import AgentState, MTKDAgent
from ..distiller import AEKD_SOLVERS

__all__ = ["aver_weights", "ebkd_weights", "camkd_weights", "camkd_feature_weights", "aekd_weights",
           "min_norm_simplex", "libsvm_simplex", "WeightStrategy", "make_strategy", "AEKD_C", "AEKD_SOLVERS"]

# CA-MKD's default tolerance C for AEKD (train_student.py ``-C``): nu = 1 / (C M)
AEKD_C = 0.6


def aver_weights(batch_size: int, num_teachers: int, device=None, dtype=torch.float32) -> Tensor:
    """AVER: every teacher weighs 1/M."""
    return torch.full((batch_size, num_teachers), 1.0 / num_teachers, device=device, dtype=dtype)


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


def _confidence(ce: Tensor) -> Tensor:
    M = ce.shape[1]
    return (1.0 - F.softmax(ce, dim=1)) / ((M - 1) * M)


def camkd_weights(teacher_ce: Tensor) -> Tensor:
    """CA-MKD's logit weights as in its code: (1 - softmax_m(TCE)_m) / (M - 1) / M, rows summing to 1/M.
    ``teacher_ce`` [B, M] is each teacher's cross-entropy against the label."""
    if not isinstance(teacher_ce, Tensor) or teacher_ce.dim() != 2 or teacher_ce.shape[1] < 2:
        raise ValueError(f"teacher_ce: expected a [B, M] tensor with M >= 2, got "
                         f"{tuple(teacher_ce.shape) if isinstance(teacher_ce, Tensor) else type(teacher_ce).__name__}")
    return _confidence(teacher_ce)


def camkd_feature_weights(student_maps: Sequence[Tensor], teacher_heads: Sequence[nn.Module], labels: Tensor,
                          with_grad: bool = False) -> Tensor:
    """CA-MKD's feature weights (``CAMKD.py`` with ``CalWeight``): teacher m's classifier applied to the globally
    average-pooled transformed student map G_m gives a cross-entropy CE_m against the label; the weight is
    (1 - softmax_m(CE)_m) / (M - 1) / M. Returns [B, M].

    ``with_grad`` False (the default): computed without gradient. True: as in the CA-MKD code, the weights stay a
    differentiable function of the maps G_m, so the student's gradient also flows through them."""
    if len(student_maps) != len(teacher_heads) or len(student_maps) < 2:
        raise ValueError(f"teacher_heads: expected one classifier head per teacher map ({len(student_maps)}), "
                         f"got {len(teacher_heads)}")
    with torch.set_grad_enabled(with_grad and torch.is_grad_enabled()):
        cols = []
        for m, (g, head) in enumerate(zip(student_maps, teacher_heads)):
            pooled = (g if with_grad else g.detach()).mean(dim=(2, 3))
            weight = getattr(head, "weight", None)
            if weight is not None and weight.shape[-1] != pooled.shape[1]:
                raise ValueError(f"teacher_heads[{m}]: takes {weight.shape[-1]} features but the transformed map "
                                 f"G_{m} has {pooled.shape[1]} channels")
            logits = head(pooled.to(weight.dtype) if weight is not None else pooled)
            cols.append(F.cross_entropy(logits.to(g.dtype), labels, reduction="none"))
        return _confidence(torch.stack(cols, dim=1))


_FACE_PATTERNS: dict = {}


def _face_patterns(M: int, device: torch.device) -> Tensor:
    """The 3^M faces as a [3^M, M] tensor, made once per (M, device): a fresh host-to-device copy every step
    would wait for the device."""
    key = (M, str(device))
    if key not in _FACE_PATTERNS:
        _FACE_PATTERNS[key] = torch.tensor(list(itertools.product((0, 1, 2), repeat=M)), device=device)
    return _FACE_PATTERNS[key]


def min_norm_simplex(gram: Tensor, cap: float = 1.0) -> Tensor:
    """argmin_a a^T G a over {a >= 0, a_m <= cap, sum a = 1}: the min-norm point of the convex hull of M vectors
    with Gram matrix ``gram`` [M, M] (``cap`` >= 1/M bounds each weight, the nu-SVM box 1/(nu M)).

    Exact for the small M of multi-teacher distillation: every face of the box-capped simplex (each weight at 0,
    free or at ``cap``, 3^M of them, M <= 8) is solved as one equality-constrained problem (batched least
    squares on its KKT system) and the feasible solution of least norm is kept. Runs on ``gram``'s device
    without reading anything back; returns float64 [M]."""
    if not isinstance(gram, Tensor) or gram.dim() != 2 or gram.shape[0] != gram.shape[1] or gram.shape[0] < 1:
        raise ValueError(f"gram: expected a square [M, M] tensor, got "
                         f"{tuple(gram.shape) if isinstance(gram, Tensor) else type(gram).__name__}")
    M = gram.shape[0]
    if M > 8:
        raise ValueError(f"gram: the exact min-norm solver handles up to 8 teachers, got M = {M}")
    if not 1.0 / M - 1e-12 <= cap:
        raise ValueError(f"cap: expected at least 1/M = {1.0 / M:.4g} (else no weights sum to 1), got {cap}")
    dev = gram.device
    g = gram.to(torch.float64)
    g = g / g.diagonal().max().clamp_min(torch.finfo(torch.float64).tiny)  # scale-free: same minimiser
    pats = _face_patterns(M, dev)  # 0: at 0, 1: free, 2: at cap
    free, at_cap = pats == 1, pats == 2
    P = pats.shape[0]
    eye = torch.eye(M, dtype=torch.float64, device=dev)
    A = torch.zeros(P, M + 1, M + 1, dtype=torch.float64, device=dev)
    A[:, :M, :M] = torch.where(free[:, :, None], 2.0 * g[None], eye[None])  # free: 2 (G a)_m + lambda = 0
    A[:, :M, M] = free.to(torch.float64)
    A[:, M, :M] = 1.0  # sum a = 1
    rhs = torch.zeros(P, M + 1, dtype=torch.float64, device=dev)
    rhs[:, :M] = at_cap.to(torch.float64) * cap
    rhs[:, M] = 1.0
    a = (torch.linalg.pinv(A) @ rhs.unsqueeze(-1))[:, :M, 0]
    tol = 1e-9
    feasible = (a >= -tol).all(1) & (a <= cap + tol).all(1) & ((a.sum(1) - 1.0).abs() <= 1e-7)
    norm = torch.einsum("pi,ij,pj->p", a, g, a)
    pick = torch.where(feasible, norm, torch.full_like(norm, float("inf"))).argmin().reshape(1)
    best = a.index_select(0, pick)[0]  # index_select, not a[pick]: a 0-dim index would be read back to the host
    best = best.clamp(0.0, cap)
    return best / best.sum()


def libsvm_simplex(gram: Tensor, nu: float) -> Tensor:
    """AEKD's dual solved as the CA-MKD code does (``helper/optimization.py``, ``find_optimal_svm``): scikit-learn's
    ``OneClassSVM(kernel="precomputed", nu=nu, tol=1e-6)`` fitted on ``gram`` [M, M], a = dual_coef / (M nu) on the
    support vectors (0 elsewhere), as float32 [M] on ``gram``'s device. libsvm stops when its KKT gap is under
    tol, so on a Gram matrix whose entries are below it (the CIFAR shape) it returns its starting point.
    Needs scikit-learn (``pip install mtkd_fast[baselines]``); reads ``gram`` back to the host."""
    from .._optional import require

    svm_module = require("sklearn.svm", "baselines", "aekd_solver='libsvm'")
    if not isinstance(gram, Tensor) or gram.dim() != 2 or gram.shape[0] != gram.shape[1] or gram.shape[0] < 1:
        raise ValueError(f"gram: expected a square [M, M] tensor, got "
                         f"{tuple(gram.shape) if isinstance(gram, Tensor) else type(gram).__name__}")
    M = gram.shape[0]
    svm = svm_module.OneClassSVM(kernel="precomputed", nu=nu, tol=1e-6)
    svm.fit(gram.detach().to("cpu", torch.float64).numpy())
    a = torch.zeros(M, dtype=torch.float64)
    a[torch.as_tensor(svm.support_, dtype=torch.long)] = torch.as_tensor(svm.dual_coef_[0], dtype=torch.float64) \
        / (M * nu)
    return a.to(torch.float32).to(gram.device)


def aekd_weights(student_logits: Tensor, teacher_logits: Tensor, temperature: float,
                 nu: Optional[float] = None, solver: str = "exact") -> Tensor:
    """AEKD's per-batch teacher weights as in the CA-MKD code (``svm_norm`` off, its default).

    g_m = d KD_m / d z_s with KD_m = T^2 * KL(p^T(z_m) || p^T(z_s)) averaged over the batch, i.e.
    T (p^T(z_s) - p^T(z_m)) / B per sample; v_m = the mean of g_m over the batch [K]; the weights solve the
    one-class nu-SVM dual min a^T V V^T a over a >= 0, sum a = 1, a_m <= 1 / (nu M), nu clamped to [1/M, 1]
    (``nu`` None: 1 / (0.6 M), the code's default C = 0.6). ``solver``: ``"exact"`` (:func:`min_norm_simplex`, the
    true minimum, float64) or ``"libsvm"`` (:func:`libsvm_simplex`, the code's OneClassSVM, float32). Returns [M],
    summing to 1 (no gradient)."""
    if solver not in AEKD_SOLVERS:
        raise ValueError(f"aekd_solver: expected one of {list(AEKD_SOLVERS)}, got {solver!r}")
    teachers = stack_teachers("teacher_logits", teacher_logits, student_logits)
    M, B, _ = teachers.shape
    if nu is None:
        nu = 1.0 / (AEKD_C * M)
    if not nu > 0:
        raise ValueError(f"nu: expected a positive number, got {nu}")
    nu = min(max(float(nu), 1.0 / M), 1.0)
    with torch.no_grad():
        zs = student_logits.detach().to(torch.float64)
        p_s = F.softmax(zs / temperature, dim=-1)
        p_t = F.softmax(teachers.detach().to(torch.float64) / temperature, dim=-1)
        v = (temperature * (p_s[None] - p_t) / B).mean(dim=1)  # [M, K]
        if solver == "libsvm":
            return libsvm_simplex(v @ v.T, nu)
        return min_norm_simplex(v @ v.T, cap=1.0 / (nu * M))


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

    def weights(self, epoch: int, teacher_logits: Tensor, teacher_ce: Optional[Tensor], state: Optional[AgentState],
                student_logits: Optional[Tensor] = None, student_maps: Optional[Sequence[Tensor]] = None,
                labels: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Optional[tuple[Tensor, Tensor]]]:
        """Return (logit_weights, feature_weights, sampled_actions_or_None), weights [B, M] without gradient
        (but camkd's feature weights with ``weight_grad``).
        ``student_logits`` [B, K], ``student_maps`` (the transformed maps G_m) and ``labels`` are given by the
        trainer for the strategies that need them."""
        raise NotImplementedError


class NoDistillation(WeightStrategy):
    name = "none"
    needs_teachers = False


class Average(WeightStrategy):
    """AVER: 1/M for every teacher, logits and features."""

    name = "aver"

    def weights(self, epoch, teacher_logits, teacher_ce, state, student_logits=None, student_maps=None, labels=None):
        w = aver_weights(teacher_logits.shape[1], teacher_logits.shape[0], teacher_logits.device, teacher_logits.dtype)
        return w, w, None


class EntropyBased(WeightStrategy):
    """EB-KD as in the CA-MKD code: logit weights :func:`ebkd_weights` ((1 - H_m / sum H) / M), no feature
    distillation (feature weights 0)."""

    name = "ebkd"

    def weights(self, epoch, teacher_logits, teacher_ce, state, student_logits=None, student_maps=None, labels=None):
        wl = ebkd_weights(teacher_logits)
        return wl, torch.zeros_like(wl), None


class ConfidenceAware(WeightStrategy):
    """CA-MKD as in its code: logit weights :func:`camkd_weights` from the teachers' own cross-entropies, feature
    weights :func:`camkd_feature_weights` from each teacher's classifier applied to the transformed student map
    (both summing to 1/M), and no feature distillation in epoch 0 (the code's first epoch). Needs the teachers'
    classifier heads (``mtkd_fast.models.classifier_head``). ``weight_grad``: the feature weights keep their
    gradient (the code's step; the caller adds the product-rule term, see ``Distiller.step``)."""

    name = "camkd"
    needs_teacher_ce = True

    def __init__(self, teacher_heads: Optional[Sequence[nn.Module]], weight_grad: bool = False):
        self.weight_grad = bool(weight_grad)
        if not teacher_heads:
            raise ValueError("teacher_heads: strategy 'camkd' needs the teachers' classifier heads (its feature "
                             "weights apply each teacher's classifier to the transformed student features)")
        self.teacher_heads = list(teacher_heads)

    def weights(self, epoch, teacher_logits, teacher_ce, state, student_logits=None, student_maps=None, labels=None):
        if teacher_ce is None:
            raise ValueError("teacher_ce: the camkd strategy needs the teachers' cross-entropies")
        wl = camkd_weights(teacher_ce)
        if epoch == 0 or student_maps is None:  # no feature KD in the first epoch (or without a transfer)
            return wl, torch.zeros_like(wl), None
        if labels is None:
            raise ValueError("labels: the camkd strategy's feature weights need the batch labels")
        wf = camkd_feature_weights(student_maps, self.teacher_heads, labels, with_grad=self.weight_grad)
        return wl, wf.to(wl.dtype), None


class AdaptiveEnsemble(WeightStrategy):
    """AEKD as in the CA-MKD code: each batch's logit weights are :func:`aekd_weights` (one per teacher, the same
    for every sample, summing to 1); logits only (feature weights 0: the code's min-norm weighting of features
    applies to its FitNet hint layer, which this trainer does not have)."""

    name = "aekd"

    def __init__(self, temperature: float = 4.0, nu: Optional[float] = None, solver: str = "exact"):
        if solver not in AEKD_SOLVERS:
            raise ValueError(f"aekd_solver: expected one of {list(AEKD_SOLVERS)}, got {solver!r}")
        self.temperature = float(temperature)
        self.nu = nu
        self.solver = solver

    def weights(self, epoch, teacher_logits, teacher_ce, state, student_logits=None, student_maps=None, labels=None):
        if student_logits is None:
            raise ValueError("student_logits: the aekd strategy needs the student's logits")
        a = aekd_weights(student_logits, teacher_logits, self.temperature, self.nu, self.solver)
        a = a.to(teacher_logits.dtype)
        wl = a[None, :].expand(teacher_logits.shape[1], -1).contiguous()
        return wl, torch.zeros_like(wl), None


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


def make_strategy(name: str, agent: Optional[MTKDAgent] = None, warmup_weights: str = "ones",
                  teacher_heads: Optional[Sequence[nn.Module]] = None, temperature: float = 4.0,
                  aekd_nu: Optional[float] = None, camkd_weight_grad: bool = False,
                  aekd_solver: str = "exact") -> WeightStrategy:
    """The strategy called ``name`` (none | aver | ebkd | camkd | aekd | mtkd_rl). mtkd_rl needs ``agent``; camkd
    needs ``teacher_heads`` (each teacher's final linear layer) and uses ``camkd_weight_grad``; aekd uses
    ``temperature``, ``aekd_nu`` and ``aekd_solver``."""
    if name == "mtkd_rl":
        if agent is None:
            raise ValueError("agent: the mtkd_rl strategy needs an MTKDAgent")
        return MTKDRL(agent, warmup_weights)
    if name == "camkd":
        return ConfidenceAware(teacher_heads, camkd_weight_grad)
    if name == "aekd":
        return AdaptiveEnsemble(temperature, aekd_nu, aekd_solver)
    simple = {"none": NoDistillation, "aver": Average, "ebkd": EntropyBased}
    if name not in simple:
        raise ValueError(f"strategy: expected one of {sorted(list(simple) + ['camkd', 'aekd', 'mtkd_rl'])}, "
                         f"got {name!r}")
    return simple[name]()
