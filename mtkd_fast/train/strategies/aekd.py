"""Strategy ``aekd``: AEKD (Du et al., NeurIPS 2020) as the CA-MKD code runs it (``helper/loops.py``, the ``AEKD``
branch, and ``helper/optimization.py``): one weight per teacher per batch, the min-norm point of the teachers' KD
gradients w.r.t. the student logits (a nu-SVM dual), summing to 1; logits only."""

from __future__ import annotations

import itertools
from typing import Any, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..._validation import stack_teachers
from ...distiller import AEKD_SOLVERS
from . import WeightStrategy, register_strategy

# CA-MKD's default tolerance C for AEKD (train_student.py ``-C``): nu = 1 / (C M)
AEKD_C = 0.6


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
    from ..._optional import require

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


@register_strategy("aekd")
class AdaptiveEnsemble(WeightStrategy):
    """AEKD as in the CA-MKD code: each batch's logit weights are :func:`aekd_weights` (one per teacher, the same
    for every sample, summing to 1); logits only (feature weights 0: the code's min-norm weighting of features
    applies to its FitNet hint layer, which this trainer does not have)."""

    requires = frozenset({"teachers"})
    options = ("temperature", "aekd_nu", "aekd_solver")

    @classmethod
    def check_options(cls, values: Mapping[str, Any]) -> None:
        nu, solver = values["aekd_nu"], values["aekd_solver"]
        if nu is not None and (isinstance(nu, bool) or not isinstance(nu, (int, float)) or not 0 < nu <= 1):
            raise ValueError(f"aekd_nu: expected a number in (0, 1] or None, got {nu}")
        if solver not in AEKD_SOLVERS:
            raise ValueError(f"aekd_solver: expected one of {list(AEKD_SOLVERS)}, got {solver!r}")

    def __init__(self, temperature: float = 4.0, aekd_nu: Optional[float] = None, aekd_solver: str = "exact"):
        self.temperature = float(temperature)
        self.nu = aekd_nu
        self.solver = aekd_solver

    def weights(self, epoch, teacher_logits, teacher_ce, state, student_logits=None, student_maps=None, labels=None):
        if student_logits is None:
            raise ValueError("student_logits: the aekd strategy needs the student's logits")
        a = aekd_weights(student_logits, teacher_logits, self.temperature, self.nu, self.solver)
        a = a.to(teacher_logits.dtype)
        wl = a[None, :].expand(teacher_logits.shape[1], -1).contiguous()
        return wl, torch.zeros_like(wl), None
