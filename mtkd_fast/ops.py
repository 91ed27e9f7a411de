"""Fused multi-teacher distillation operators (the compiled ``mtkd_fast::*`` custom ops) and their Python API.

Each op reads its inputs once and produces, in the same pass, the loss, its gradient and every per-sample
statistic the MTKD-RL agent needs (docs/method.md sections 2-5), so nothing is recomputed:

- :func:`mtkd_logit_kd`: ``mean_i SCE_i + alpha * sum_m mean_i(w_im KL_im)`` with KL, TCE, SCE; dloss/dz_s is
  computed in the forward pass and saved, backward only scales it by the incoming gradient.
- :func:`mtkd_feature_kd`: ``beta * sum_m mean_i(w_im MSE_im)`` over M maps of per-teacher shapes, all teachers
  in one kernel launch (CUDA) / one parallel region (CPU), gradients of every student map in the same pass.
- :func:`feature_kd_and_cosine`: the same, plus the agent-state cosine COS_{i,m} pooled from the same read of
  the student maps (what :class:`mtkd_fast.MTKDLoss` uses when given teacher embeddings).
- :func:`pooled_cosine`: COS_{i,m} alone (differentiable through its own backward op).
- :func:`agent_stats`: the agent state's KL, TCE and COS in one pass over each tensor family, before the
  teacher weights exist (no gradients).
- :func:`per_sample_loss_and_reward`: l_i and the normalised, clamped reward r_hat (docs/method.md section 5).

Dtypes: inputs may be float16, bfloat16, float32 or float64 (mixed inputs are promoted to a common dtype);
accumulation is float32 (float64 for float64 inputs) and every statistic is returned in that accumulation
dtype, gradients in the input's dtype. Only the loss (and ``pooled_cosine``, ``per_sample_loss``) carry
gradients: the per-sample statistics are detached (the agent's state and reward never need their gradient),
the teacher weights receive none, and no gradient flows into teacher logits or maps (teachers are frozen).

The ops have fake (meta) kernels and autograd registered here, so they work under ``torch.compile``,
autocast and ``torch.library.opcheck``. Without the compiled extension :func:`available` is False and
:class:`mtkd_fast.MTKDLoss` uses :mod:`mtkd_fast.reference`.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from . import _ext
from ._validation import (
    FLOAT_DTYPES,
    check_logits,
    check_maps,
    check_scale,
    check_targets,
    check_temperature,
    check_tensor,
    check_weights,
    stack_teachers,
)
from .reference import AgentStats, FeatureKDOutput, LogitKDOutput, RewardOutput, _check_stats

__all__ = [
    "available",
    "mtkd_logit_kd",
    "mtkd_feature_kd",
    "feature_kd_and_cosine",
    "pooled_cosine",
    "agent_stats",
    "per_sample_loss_and_reward",
    "AgentStats",
    "LogitKDOutput",
    "FeatureKDOutput",
    "RewardOutput",
    "OP_NAMES",
]

OP_NAMES = ("logit_kd", "feature_kd", "pooled_cosine", "pooled_cosine_backward", "per_sample_loss_reward",
            "agent_stats")
_DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA"}


def available(device) -> bool:
    """True when the compiled extension has every fused kernel for ``device`` (a torch.device or string)."""
    device_type = torch.device(device).type
    if device_type == "cuda" and not torch.cuda.is_available():
        return False
    return _HAS_KERNELS.get(device_type, False)


def _has_kernels(dispatch_key: str) -> bool:
    if not _ext.available():
        return False
    return all(torch._C._dispatch_has_kernel_for_dispatch_key(f"mtkd_fast::{op}", dispatch_key) for op in OP_NAMES)


# looked up once: the dispatcher query is not traceable by torch.compile, and the answer never changes
_HAS_KERNELS = {device_type: _has_kernels(key) for device_type, key in _DISPATCH_KEYS.items()}


# --------------------------------------------------------------------------------------------
# Python API
# --------------------------------------------------------------------------------------------


def mtkd_logit_kd(
    student_logits: Tensor,
    teacher_logits,
    targets: Tensor,
    weights: Tensor,
    temperature: float = 4.0,
    alpha: float = 1.0,
) -> LogitKDOutput:
    """Fused logit distillation: ``(loss, kl [B, M], teacher_ce [B, M], student_ce [B])``.

    ``teacher_logits`` is a stacked [M, B, K] tensor or a list of M [B, K] tensors (not copied into a stack).
    ``weights`` [B, M] carry no gradient. Same maths as :func:`mtkd_fast.reference.mtkd_logit_kd`.
    """
    _require_extension()
    teachers, B, K, M = _check_logit_args(student_logits, teacher_logits, targets)
    check_weights("weights", weights, B, M, student_logits.device)
    check_temperature(temperature), check_scale("alpha", alpha)
    dtype = _common_dtype([student_logits, *teachers])
    student = student_logits.to(dtype).contiguous()
    teachers = [t.detach().to(dtype).contiguous() for t in teachers]
    w = weights.detach().to(_acc_dtype(dtype)).contiguous()
    args = (student, teachers, targets.contiguous(), w, float(temperature), float(alpha))
    if _eager_autograd(student):
        loss, kl, tce, sce = _LogitKD.apply(*args)
    else:
        loss, kl, tce, sce, _ = _call(torch.ops.mtkd_fast.logit_kd, *args)
    return LogitKDOutput(loss, kl, tce, sce)


def mtkd_feature_kd(
    student_maps: Sequence[Tensor], teacher_maps: Sequence[Tensor], weights: Tensor, beta: float = 5.0
) -> FeatureKDOutput:
    """Fused feature distillation: ``(loss, mse [B, M])`` for M (student map, teacher map) pairs.

    Pair m may have its own shape [B, C_m, H_m, W_m]; contiguous and channels_last maps are used as they are
    (the gradient of a map has the map's layout). Same maths as :func:`mtkd_fast.reference.mtkd_feature_kd`.
    """
    loss, mse, _ = feature_kd_and_cosine(student_maps, teacher_maps, weights, beta)
    return FeatureKDOutput(loss, mse)


def feature_kd_and_cosine(
    student_maps: Sequence[Tensor],
    teacher_maps: Sequence[Tensor],
    weights: Tensor,
    beta: float = 5.0,
    teacher_embeddings: Sequence[Tensor] | None = None,
    eps: float = 1e-8,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """:func:`mtkd_feature_kd` that also returns COS_{i,m} [B, M] (detached) for ``teacher_embeddings``.

    The cosine is :func:`pooled_cosine` computed from the same read of the student maps as the loss, which
    saves a pass over the maps (the agent state needs no gradient of it; :func:`pooled_cosine` has one).
    Without embeddings the third value is None. Used by :class:`mtkd_fast.MTKDLoss`.
    """
    _require_extension()
    check_scale("beta", beta)
    check_maps(student_maps, teacher_maps)
    B, M = student_maps[0].shape[0], len(student_maps)
    check_weights("weights", weights, B, M, student_maps[0].device)
    if teacher_embeddings is not None:
        _check_embeddings(student_maps, teacher_embeddings, eps)
    dtype = _common_dtype([*student_maps, *teacher_maps])
    acc = _acc_dtype(dtype)
    students, teachers = [], []
    for g, f in zip(student_maps, teacher_maps):
        g, memory_format = _dense_map(g.to(dtype))
        students.append(g)
        teachers.append(_like_layout(f.detach().to(dtype), g, memory_format))
    w = weights.detach().to(acc).contiguous()
    embeddings = None if teacher_embeddings is None else [e.detach().to(acc).contiguous() for e in teacher_embeddings]
    if _eager_autograd(*students):
        loss, mse, cos = _FeatureKD.apply(teachers, w, float(beta), embeddings, float(eps), *students)
    else:
        loss, mse, cos, _ = _call(torch.ops.mtkd_fast.feature_kd, students, teachers, w, float(beta), embeddings,
                                  float(eps))
    return loss, mse, (cos if embeddings is not None else None)


def pooled_cosine(student_maps: Sequence[Tensor], teacher_embeddings: Sequence[Tensor], eps: float = 1e-8) -> Tensor:
    """COS_{i,m} [B, M]: cosine similarity of the spatially averaged map m and embedding m, each norm clamped
    below by ``eps`` (as :func:`mtkd_fast.reference.pooled_cosine`). Differentiable w.r.t. both inputs."""
    _require_extension()
    _check_embeddings(student_maps, teacher_embeddings, eps)
    dtype = _common_dtype([*student_maps, *teacher_embeddings])
    maps = [_dense_map(g.to(dtype))[0] for g in student_maps]
    embeddings = [e.to(dtype).contiguous() for e in teacher_embeddings]
    return torch.ops.mtkd_fast.pooled_cosine(maps, embeddings, float(eps))


def agent_stats(
    student_logits: Tensor,
    teacher_logits,
    targets: Tensor,
    student_maps: Sequence[Tensor] | None,
    teacher_embeddings: Sequence[Tensor] | None,
    temperature: float = 4.0,
    eps: float = 1e-8,
) -> AgentStats:
    """The agent state's statistics ``(kl [B, M], teacher_ce [B, M], cos [B, M])`` (docs/method.md section 2), computed
    before the teacher weights exist, in one pass over the logits and one over the student maps; no gradients.

    Same maths as :func:`mtkd_fast.reference.agent_stats`: ``kl`` and ``teacher_ce`` as :func:`mtkd_logit_kd`
    returns them, ``cos`` as :func:`pooled_cosine` (0 when ``student_maps`` and ``teacher_embeddings`` are None).
    Statistics come out in the accumulation dtype (float32; float64 for float64 inputs); logits and maps are
    promoted to one common dtype; maps are read as they are when contiguous or channels_last.

    The weighted loss that follows (:func:`mtkd_logit_kd`) recomputes the teachers' softmax normalisers instead
    of taking them from this pass. Given them, the loss would still need one exp per teacher logit to form
    p^T(z_m) for the student's gradient; it could skip only the max pass, the T = 1 sum and the KL/TCE sums.
    Measured at the CIFAR shape (B=64, K=100, M=4, one thread, raw ops, same run): this op's whole logit side,
    exps included, takes 0.21 ms and ``logit_kd`` 0.18 ms, so even skipping all of it would save at most
    ~0.2 ms of a ~5 ms step (the feature maps' bytes dominate), while storing the normalisers (or the teacher
    probabilities, M*B*K values: 3 MB at the ImageNet shape) would widen the loss op's schema and add traffic.
    So the loss recomputes, and ``logit_kd`` stays usable on its own (:class:`mtkd_fast.MTKDLoss`).
    """
    _require_extension()
    teachers, B, K, M = _check_logit_args(student_logits, teacher_logits, targets)
    check_temperature(temperature)
    if (student_maps is None) != (teacher_embeddings is None):
        raise ValueError("student_maps, teacher_embeddings: give both (the cosine) or neither")
    maps, embeddings = [], []
    tensors = [student_logits, *teachers]
    if student_maps is not None:
        if not isinstance(student_maps, (list, tuple)) or len(student_maps) != M:
            raise ValueError(f"student_maps: expected a list of {M} maps (one per teacher)")
        _check_embeddings(student_maps, teacher_embeddings, eps)
        if student_maps[0].shape[0] != B or student_maps[0].device != student_logits.device:
            raise ValueError(
                f"student_maps: expected maps of batch size {B} on {student_logits.device} like student_logits, "
                f"got {tuple(student_maps[0].shape)} on {student_maps[0].device}"
            )
        tensors += list(student_maps)
    dtype = _common_dtype(tensors)
    acc = _acc_dtype(dtype)
    if student_maps is not None:
        maps = [_dense_map(g.detach().to(dtype))[0] for g in student_maps]
        embeddings = [e.detach().to(acc).contiguous() for e in teacher_embeddings]
    kl, tce, cos = _call(
        torch.ops.mtkd_fast.agent_stats,
        student_logits.detach().to(dtype).contiguous(), [t.detach().to(dtype).contiguous() for t in teachers],
        targets.contiguous(), maps, embeddings, float(temperature), float(eps),
    )
    return AgentStats(kl, tce, cos)


def per_sample_loss_and_reward(
    student_ce: Tensor,
    kl: Tensor,
    logit_weights: Tensor,
    mse: Tensor | None = None,
    feature_weights: Tensor | None = None,
    alpha: float = 1.0,
    beta: float = 5.0,
) -> RewardOutput:
    """l_i = SCE_i + alpha sum_m wl_im KL_im + beta sum_m wf_im MSE_im and r_hat = clamp((r - mean r) / std r,
    0, 1) with r = -l (Bessel's std; a batch of one, or of equal losses, gets reward 0), in one pass.

    Same maths as :func:`mtkd_fast.reference.per_sample_loss` and :func:`~mtkd_fast.reference.normalized_reward`;
    ``per_sample_loss`` is differentiable w.r.t. the statistics, ``reward`` is detached.
    """
    _require_extension()
    _check_stats(student_ce, kl, logit_weights, mse, feature_weights)
    check_scale("alpha", alpha), check_scale("beta", beta)
    for name, t in (("student_ce", student_ce), ("kl", kl)):
        if t.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{name}: expected a floating dtype, got {t.dtype}")
    acc = _acc_dtype(kl.dtype)

    def prep(t, detach=False):
        if t is None:
            return None
        return (t.detach() if detach else t).to(acc).contiguous()

    stats = (prep(student_ce), prep(kl), prep(mse))
    op = torch.ops.mtkd_fast.per_sample_loss_reward
    args = (stats[0], stats[1], prep(logit_weights, True), stats[2], prep(feature_weights, True),
            float(alpha), float(beta))
    # per_sample_loss is differentiable w.r.t. the statistics: the registered autograd when one needs a gradient
    # (small tensors: no eager Function of its own)
    loss, reward = op(*args) if _eager_autograd(*(t for t in stats if t is not None)) else _call(op, *args)
    return RewardOutput(loss, reward)


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


# torch's guard that skips the autograd dispatch keys (what torch.library's own autograd kernel uses to pass a
# call on); private, so looked up once, and without it calls simply go through the autograd key
_BELOW_AUTOGRAD = getattr(torch._C, "_AutoDispatchBelowAutograd", None)


def _call(op, *args):
    """``op(*args)`` where no gradient is recorded (no input needs one, or autograd is handled by the caller).

    In eager mode the call goes straight to the device kernel, below the autograd dispatch key, whose
    registered Python kernel (``torch.library.register_autograd``) costs ~10 us a call even when it only passes
    the call on; under ``torch.compile`` the op is called as is (with its registered autograd)."""
    if _BELOW_AUTOGRAD is None or torch.compiler.is_compiling():
        return op(*args)
    with _BELOW_AUTOGRAD():
        return op(*args)


def _eager_autograd(*tensors: Tensor) -> bool:
    """True when an eager call (not under ``torch.compile``) must record a gradient for one of ``tensors``:
    grad mode on and one of them requires it."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors) and not torch.compiler.is_compiling()


def _require_extension() -> None:
    if not _ext.available():
        raise RuntimeError(
            f"mtkd_fast.ops: the compiled extension is not available ({_ext.LOAD_ERROR}); "
            "build it with `make build`, or use mtkd_fast.reference"
        )


def _check_embeddings(student_maps, teacher_embeddings, eps: float) -> None:
    """One [B, C_m] teacher embedding per [B, C_m, H_m, W_m] student map, floating, on the maps' device."""
    if not isinstance(student_maps, (list, tuple)) or not isinstance(teacher_embeddings, (list, tuple)):
        raise TypeError("student_maps, teacher_embeddings: expected lists of tensors")
    if len(student_maps) != len(teacher_embeddings) or len(student_maps) < 1:
        raise ValueError(
            f"teacher_embeddings: expected one embedding per student map ({len(student_maps)}), "
            f"got {len(teacher_embeddings)}"
        )
    B = None
    for m, (g, e) in enumerate(zip(student_maps, teacher_embeddings)):
        check_tensor(f"student_maps[{m}]", g)
        check_tensor(f"teacher_embeddings[{m}]", e)
        if g.dim() != 4:
            raise ValueError(f"student_maps[{m}]: expected a [B, C, H, W] map, got shape {tuple(g.shape)}")
        B = g.shape[0] if B is None else B
        if g.shape[0] != B:
            raise ValueError(f"student_maps[{m}]: expected batch size {B} like student_maps[0], got {g.shape[0]}")
        if e.dim() != 2 or e.shape != g.shape[:2]:
            raise ValueError(
                f"teacher_embeddings[{m}]: expected shape {tuple(g.shape[:2])} (the pooled map's [B, C_m]), "
                f"got {tuple(e.shape)}"
            )
        for name, t in ((f"student_maps[{m}]", g), (f"teacher_embeddings[{m}]", e)):
            if t.dtype not in FLOAT_DTYPES:
                raise ValueError(f"{name}: expected a floating dtype, got {t.dtype}")
            if t.device != student_maps[0].device:
                raise ValueError(f"{name}: expected device {student_maps[0].device} like student_maps[0], "
                                 f"got {t.device}")
    if not eps >= 0:
        raise ValueError(f"eps: expected a non-negative number, got {eps}")


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _common_dtype(tensors) -> torch.dtype:
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _check_logit_args(student_logits: Tensor, teacher_logits, targets: Tensor) -> tuple[list[Tensor], int, int, int]:
    """The checks ``mtkd_logit_kd`` and ``agent_stats`` share: student logits [B, K], M teachers like them,
    targets [B] in range. Returns (the teachers as a list, B, K, M)."""
    check_logits("student_logits", student_logits)
    teachers = _teacher_list("teacher_logits", teacher_logits, student_logits)
    B, K = student_logits.shape
    check_targets("targets", targets, B, K, student_logits.device)
    return teachers, B, K, len(teachers)


def _teacher_list(name: str, teacher_logits, student_logits: Tensor) -> list[Tensor]:
    """The M teacher [B, K] tensors as a list (views of a stacked tensor; a list is never stacked/copied)."""
    if isinstance(teacher_logits, Tensor):
        return list(stack_teachers(name, teacher_logits, student_logits).unbind(0))
    if not isinstance(teacher_logits, (list, tuple)):
        raise TypeError(f"{name}: expected a [M, B, K] tensor or a list of [B, K] tensors, "
                        f"got {type(teacher_logits).__name__}")
    if len(teacher_logits) < 2:
        raise ValueError(f"{name}: expected M >= 2 teachers, got M = {len(teacher_logits)}")
    for m, t in enumerate(teacher_logits):
        check_logits(f"{name}[{m}]", t)
        if t.shape != student_logits.shape:
            raise ValueError(f"{name}[{m}]: expected shape {tuple(student_logits.shape)} like student_logits, "
                             f"got {tuple(t.shape)}")
        if t.device != student_logits.device:
            raise ValueError(f"{name}[{m}]: expected device {student_logits.device} like student_logits, "
                             f"got {t.device}")
    return list(teacher_logits)


def _dense_map(g: Tensor) -> tuple[Tensor, torch.memory_format]:
    """The map as the kernels walk it: NCHW-contiguous or channels_last (kept), anything else made contiguous."""
    if g.is_contiguous():
        return g, torch.contiguous_format
    if g.is_contiguous(memory_format=torch.channels_last):
        return g, torch.channels_last
    return g.contiguous(), torch.contiguous_format


def _like_layout(f: Tensor, g: Tensor, memory_format: torch.memory_format) -> Tensor:
    """``f`` with exactly ``g``'s strides, so one flat index walks both maps."""
    f = f.contiguous(memory_format=memory_format)
    if _same_layout(f, g):
        return f
    out = torch.empty_like(g)
    out.copy_(f)
    return out


def _same_layout(a: Tensor, b: Tensor) -> bool:
    return all(sa == sb for n, sa, sb in zip(a.shape, a.stride(), b.stride()) if n > 1)


# --------------------------------------------------------------------------------------------
# fake (meta) kernels and autograd of the mtkd_fast::* ops
# --------------------------------------------------------------------------------------------


def _scaled(saved_grads: Sequence[Tensor], grad_output: Tensor) -> list[Tensor]:
    """The gradients saved in the forward pass times the incoming scalar gradient.

    The usual incoming gradient is exactly 1 (``loss.backward()``): then the saved tensors are returned as
    they are, sparing a read and a write of every gradient (as Liger-Kernel's fused losses do). The check reads
    the value (once for all the saved tensors), so it is only made in eager mode on the CPU; traced
    (fake/functional tensors) and CUDA backward passes always multiply. Autograd clones a returned gradient
    before accumulating into a leaf's ``.grad`` while the saved tensor is alive, so retained graphs stay
    correct.
    """
    if (
        type(grad_output) is Tensor
        and grad_output.device.type == "cpu"
        and not torch.compiler.is_compiling()
        and grad_output.item() == 1  # a 0-dim tensor: item() costs ~0.1 us, a comparison op ~2 us (hot)
    ):
        return list(saved_grads)
    return [g * grad_output.to(g.dtype) for g in saved_grads]


# Plain module-level functions (as in pytorch/extension-cpp's extension_cpp/ops.py), registered below only when
# the extension is loaded: without it the mtkd_fast::* ops do not exist. The fakes check the shapes the kernels
# assume (torch._check), so a wrong shape under torch.compile or on meta tensors fails with a message naming it.


def _check_batch_matrix(name: str, t: Tensor, B, M) -> None:
    torch._check(t.dim() == 2, lambda: f"{name}: expected shape [B, M] = [{B}, {M}], got {tuple(t.shape)}")
    torch._check(t.shape[0] == B and t.shape[1] == M,
                 lambda: f"{name}: expected shape [B, M] = [{B}, {M}], got {tuple(t.shape)}")


def _check_fake_logits(student_logits: Tensor, teacher_logits, targets: Tensor) -> None:
    """student [B, K], M >= 1 teachers each [B, K] (the [M, B, K] stack as a list), targets [B]."""
    torch._check(student_logits.dim() == 2,
                 lambda: f"student_logits: expected shape [B, K], got {tuple(student_logits.shape)}")
    B, K = student_logits.shape
    torch._check(len(teacher_logits) >= 1, lambda: "teacher_logits: expected at least one teacher")
    for m, t in enumerate(teacher_logits):
        torch._check(t.dim() == 2 and t.shape[0] == B and t.shape[1] == K,
                     lambda: f"teacher_logits[{m}]: expected shape [B, K] = [{B}, {K}] like student_logits "
                             f"(teacher logits are [M, B, K]), got {tuple(t.shape)}")
    torch._check(targets.dim() == 1 and targets.shape[0] == B,
                 lambda: f"targets: expected shape [B] = [{B}], got {tuple(targets.shape)}")


def _check_fake_maps(student_maps, teacher_embeddings, B=None) -> None:
    """M >= 1 student maps [B, C_m, H_m, W_m] of one batch size and, if given, one [B, C_m] embedding per map."""
    torch._check(len(student_maps) >= 1, lambda: "student_maps: expected at least one map")
    B = student_maps[0].shape[0] if B is None else B
    for m, g in enumerate(student_maps):
        torch._check(g.dim() == 4, lambda: f"student_maps[{m}]: expected a [B, C, H, W] map, got {tuple(g.shape)}")
        torch._check(g.shape[0] == B, lambda: f"student_maps[{m}]: expected batch size {B}, got {g.shape[0]}")
    if teacher_embeddings is None:
        return
    torch._check(len(teacher_embeddings) == len(student_maps),
                 lambda: f"teacher_embeddings: expected one embedding per student map ({len(student_maps)}), "
                         f"got {len(teacher_embeddings)}")
    for m, (g, e) in enumerate(zip(student_maps, teacher_embeddings)):
        torch._check(e.dim() == 2 and e.shape[0] == g.shape[0] and e.shape[1] == g.shape[1],
                     lambda: f"teacher_embeddings[{m}]: expected shape {tuple(g.shape[:2])} (the pooled map's "
                             f"[B, C_m]), got {tuple(e.shape)}")


def _logit_kd_fake(student_logits, teacher_logits, targets, weights, temperature, alpha):
    _check_fake_logits(student_logits, teacher_logits, targets)
    B, K = student_logits.shape
    M = len(teacher_logits)
    _check_batch_matrix("weights", weights, B, M)
    acc = _acc_dtype(student_logits.dtype)
    stat = dict(dtype=acc, device=student_logits.device)
    return (
        torch.empty((), **stat),
        torch.empty((B, M), **stat),
        torch.empty((B, M), **stat),
        torch.empty((B,), **stat),
        torch.empty((B, K), dtype=student_logits.dtype, device=student_logits.device),
    )


# Every setup turns off materialize_grads: autograd would otherwise fill zero gradients for the
# non-differentiable outputs (for feature_kd, tensors the size of every student map) on each backward.


def _logit_kd_setup(ctx, inputs, output):
    ctx.set_materialize_grads(False)
    ctx.num_teachers = len(inputs[1])
    ctx.save_for_backward(output[4])
    ctx.mark_non_differentiable(*output[1:])


def _logit_kd_backward(ctx, grad_loss, *_unused):
    if grad_loss is None:
        return None, [None] * ctx.num_teachers, None, None, None, None
    (grad_student,) = ctx.saved_tensors
    # no gradient into the (frozen) teachers; the return mirrors the inputs, the list included
    return _scaled([grad_student], grad_loss)[0], [None] * ctx.num_teachers, None, None, None, None


def _feature_kd_fake(student_maps, teacher_maps, weights, beta, teacher_embeddings=None, eps=1e-8):
    _check_fake_maps(student_maps, teacher_embeddings)
    B, M = student_maps[0].shape[0], len(student_maps)
    torch._check(len(teacher_maps) == M, lambda: f"teacher_maps: expected {M} maps like student_maps, "
                                                 f"got {len(teacher_maps)}")
    for m, (g, f) in enumerate(zip(student_maps, teacher_maps)):
        torch._check(f.dim() == 4 and all(a == b for a, b in zip(f.shape, g.shape)),
                     lambda: f"teacher_maps[{m}]: expected shape {tuple(g.shape)} like student_maps[{m}], "
                             f"got {tuple(f.shape)}")
    _check_batch_matrix("weights", weights, B, M)
    stat = dict(dtype=_acc_dtype(student_maps[0].dtype), device=student_maps[0].device)
    cos = torch.empty((B, M) if teacher_embeddings is not None else (0,), **stat)
    return torch.empty((), **stat), torch.empty((B, M), **stat), cos, [torch.empty_like(g) for g in student_maps]


def _feature_kd_setup(ctx, inputs, output):
    ctx.set_materialize_grads(False)
    ctx.num_maps = len(output[3])
    embeddings = inputs[4] if len(inputs) > 4 else None
    ctx.no_embedding_grads = None if embeddings is None else [None] * len(embeddings)  # mirrors the input
    ctx.save_for_backward(*output[3])
    ctx.mark_non_differentiable(output[1], output[2], *output[3])


def _feature_kd_backward(ctx, grad_loss, *_unused):
    if grad_loss is None:
        return [None] * ctx.num_maps, [None] * ctx.num_maps, None, None, ctx.no_embedding_grads, None
    grads = _scaled(ctx.saved_tensors, grad_loss)
    # no gradient into the teacher maps and embeddings (frozen teachers) or the weights (the agent's)
    return grads, [None] * len(grads), None, None, ctx.no_embedding_grads, None


def _pooled_cosine_fake(student_maps, teacher_embeddings, eps):
    _check_fake_maps(student_maps, teacher_embeddings)
    g = student_maps[0]
    return torch.empty((g.shape[0], len(student_maps)), dtype=_acc_dtype(g.dtype), device=g.device)


def _pooled_cosine_backward_fake(grad, student_maps, teacher_embeddings, eps):
    _check_fake_maps(student_maps, teacher_embeddings)
    _check_batch_matrix("grad", grad, student_maps[0].shape[0], len(student_maps))
    return [torch.empty_like(g) for g in student_maps], [torch.empty_like(e) for e in teacher_embeddings]


def _pooled_cosine_setup(ctx, inputs, output):
    maps, embeddings, eps = inputs
    ctx.set_materialize_grads(False)
    ctx.num_maps = len(maps)
    ctx.eps = eps
    ctx.save_for_backward(*maps, *embeddings)


def _pooled_cosine_backward(ctx, grad):
    if grad is None:
        return [None] * ctx.num_maps, [None] * ctx.num_maps, None
    saved = ctx.saved_tensors
    maps, embeddings = list(saved[: ctx.num_maps]), list(saved[ctx.num_maps :])
    grad_maps, grad_embeddings = torch.ops.mtkd_fast.pooled_cosine_backward(grad, maps, embeddings, ctx.eps)
    return grad_maps, grad_embeddings, None


def _agent_stats_fake(student_logits, teacher_logits, targets, student_maps, teacher_embeddings, temperature, eps):
    _check_fake_logits(student_logits, teacher_logits, targets)
    B, M = student_logits.shape[0], len(teacher_logits)
    if len(student_maps):  # no maps (an empty list): the cosine is 0
        torch._check(len(student_maps) == M,
                     lambda: f"student_maps: expected {M} maps (one per teacher), got {len(student_maps)}")
        _check_fake_maps(student_maps, teacher_embeddings, B)
    stat = dict(dtype=_acc_dtype(student_logits.dtype), device=student_logits.device)
    return torch.empty((B, M), **stat), torch.empty((B, M), **stat), torch.empty((B, M), **stat)


def _reward_fake(student_ce, kl, logit_weights, mse, feature_weights, alpha, beta):
    torch._check(kl.dim() == 2, lambda: f"kl: expected shape [B, M], got {tuple(kl.shape)}")
    B, M = kl.shape
    torch._check(student_ce.dim() == 1 and student_ce.shape[0] == B,
                 lambda: f"student_ce: expected shape [B] = [{B}], got {tuple(student_ce.shape)}")
    _check_batch_matrix("logit_weights", logit_weights, B, M)
    torch._check((mse is None) == (feature_weights is None),
                 lambda: "mse, feature_weights: give both (feature distillation) or neither")
    if mse is not None:
        _check_batch_matrix("mse", mse, B, M)
        _check_batch_matrix("feature_weights", feature_weights, B, M)
    return torch.empty_like(student_ce), torch.empty_like(student_ce)


def _reward_setup(ctx, inputs, output):
    _, _, logit_weights, _, feature_weights, alpha, beta = inputs
    ctx.set_materialize_grads(False)
    ctx.alpha, ctx.beta = alpha, beta
    ctx.has_mse = feature_weights is not None
    ctx.save_for_backward(logit_weights, feature_weights if ctx.has_mse else None)
    ctx.mark_non_differentiable(output[1])


def _reward_backward(ctx, grad_loss, _grad_reward):
    # l is linear in the statistics; the weights receive no gradient (they come from the agent)
    if grad_loss is None:
        return None, None, None, None, None, None, None
    logit_weights, feature_weights = ctx.saved_tensors
    g = grad_loss.unsqueeze(1)
    grad_mse = ctx.beta * feature_weights * g if ctx.has_mse else None
    return grad_loss, ctx.alpha * logit_weights * g, None, grad_mse, None, None, None


# op -> (fake kernel, (backward, setup_context) or None)
_REGISTRATIONS = {
    "logit_kd": (_logit_kd_fake, (_logit_kd_backward, _logit_kd_setup)),
    "feature_kd": (_feature_kd_fake, (_feature_kd_backward, _feature_kd_setup)),
    "pooled_cosine": (_pooled_cosine_fake, (_pooled_cosine_backward, _pooled_cosine_setup)),
    "pooled_cosine_backward": (_pooled_cosine_backward_fake, None),
    "agent_stats": (_agent_stats_fake, None),
    "per_sample_loss_reward": (_reward_fake, (_reward_backward, _reward_setup)),
}
assert set(_REGISTRATIONS) == set(OP_NAMES)

if _ext.available():
    for _op, (_fake, _autograd) in _REGISTRATIONS.items():
        torch.library.register_fake(f"mtkd_fast::{_op}", _fake)
        if _autograd is not None:
            torch.library.register_autograd(f"mtkd_fast::{_op}", _autograd[0], setup_context=_autograd[1])
    del _op, _fake, _autograd


# --------------------------------------------------------------------------------------------
# eager autograd of the loss ops
# --------------------------------------------------------------------------------------------
# The Python API records the loss ops' gradients with these autograd.Functions in eager mode; the registered
# autograd above serves torch.compile, opcheck and direct calls of torch.ops.mtkd_fast.*. Both run the same
# setup and backward functions (marking a tensor the Function does not return, as the saved gradients, is a
# no-op). Why two routes: the registered route wraps every call in torch.library's tensor-list support
# (pytree flattening of the inputs, outputs and gradients): ~40-70 us per op and step in forward + backward,
# measured at the CIFAR shape (B=64, K=100, M=4, one thread), next to ~0.2 ms of kernel time for logit_kd.
# A Function tracks only its tensor inputs: the student maps are passed one by one, the frozen teachers as a
# list.


class _LogitKD(torch.autograd.Function):
    """logit_kd's loss, differentiable w.r.t. the student logits (the teachers are frozen: a plain list)."""

    @staticmethod
    def forward(ctx, student, teachers, targets, weights, temperature, alpha):
        output = _call(torch.ops.mtkd_fast.logit_kd, student, teachers, targets, weights, temperature, alpha)
        _logit_kd_setup(ctx, (student, teachers), output)
        return output[:4]

    @staticmethod
    def backward(ctx, grad_loss, *_unused):
        return _logit_kd_backward(ctx, grad_loss)[0], None, None, None, None, None


class _FeatureKD(torch.autograd.Function):
    """feature_kd's loss, differentiable w.r.t. each student map: the maps come last, one input each."""

    @staticmethod
    def forward(ctx, teachers, weights, beta, embeddings, eps, *students):
        output = _call(torch.ops.mtkd_fast.feature_kd, list(students), teachers, weights, beta, embeddings, eps)
        _feature_kd_setup(ctx, (students, teachers, weights, beta, embeddings, eps), output)
        return output[:3]

    @staticmethod
    def backward(ctx, grad_loss, *_unused):
        grads = _feature_kd_backward(ctx, grad_loss)[0]
        return None, None, None, None, None, *grads
