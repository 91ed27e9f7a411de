"""A self-check of the fused ops against the float64 reference on small random inputs.

Kernels that no GPU in the test suite has run need a safety net on the user's machine: the first time
:class:`mtkd_fast.MTKDLoss` resolves its backend for a CUDA device in a process, :func:`device_ok` runs
:func:`check_device` for that device and the dtypes in use (every op of :data:`CHECKS`, contiguous and
channels_last maps, forward values and gradients; a few milliseconds). On a mismatch it warns once, with
the numbers, and ``backend="auto"`` uses the reference for that device from then on. ``mtkd-fast
selftest`` runs the full check (every dtype) on demand.

Each entry of :data:`CHECKS` pairs a fused op (looked up by name in :mod:`mtkd_fast.ops` when the check
runs) with its reference; a new op is one more entry. The fused result is compared with the reference
computed in float64 on the same (rounded) inputs: the error of an output is ``max |fused - ref|`` and its
tolerance ``rtol * max |ref| + atol`` with ``rtol`` per input dtype (:data:`RTOL`), loose enough for
float16/bfloat16 rounding and tight enough for any wrong formula or index.
"""

from __future__ import annotations

import threading
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional, Sequence

import torch
from torch import Tensor

from . import reference

__all__ = ["CHECKS", "OpCheck", "CaseResult", "Report", "SelfTestWarning", "check_device", "device_ok",
           "AUTO_CHECK_DEVICE_TYPES", "RTOL", "ALL_DTYPES"]

F64 = torch.float64
ALL_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
# relative tolerance per input dtype (float16/bfloat16: gradients come back rounded to the input dtype)
RTOL = {torch.float64: 1e-8, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}
ATOL = 1e-6
# device types whose fused ops are checked automatically on first use; the CPU kernels run in the test suite
AUTO_CHECK_DEVICE_TYPES = ("cuda",)


class SelfTestWarning(RuntimeWarning):
    """The fused ops disagree with the reference on this device; ``backend="auto"`` uses the reference."""


@dataclass(frozen=True)
class OpCheck:
    """One fused op and its reference. ``make_inputs(gen, dtype, channels_last)`` returns the positional
    arguments (tensors, lists of tensors, numbers) on the CPU; ``grad_wrt``: the argument positions whose
    gradient of ``sum(output[0] * probe)`` (a random probe) is compared too; ``outputs``: the names of the
    compared outputs, in order; ``has_maps``: whether the layout (channels_last) matters."""

    op: str
    reference: Callable
    make_inputs: Callable
    outputs: tuple
    grad_wrt: tuple = ()
    has_maps: bool = False

    def fused(self):
        from . import ops

        return getattr(ops, self.op)


@dataclass
class CaseResult:
    op: str
    dtype: str
    layout: str
    output: str
    max_abs_err: float
    scale: float
    tol: float

    @property
    def ok(self) -> bool:
        return self.max_abs_err <= self.tol  # NaN fails

    def line(self) -> str:
        verdict = "ok" if self.ok else "MISMATCH"
        return (f"{self.op:<28} {self.dtype:<9} {self.layout:<14} {self.output:<26} max|err| {self.max_abs_err:.3e}"
                f"  max|ref| {self.scale:.3e}  tol {self.tol:.3e}  {verdict}")


@dataclass
class Report:
    device: str
    results: list = field(default_factory=list)
    errors: list = field(default_factory=list)  # (op, dtype, layout, message) of cases that raised

    @property
    def ok(self) -> bool:
        return not self.errors and all(r.ok for r in self.results)

    @property
    def failures(self) -> list:
        return [r for r in self.results if not r.ok]

    def format(self, only_failures: bool = False) -> str:
        rows = self.failures if only_failures else self.results
        lines = [r.line() for r in rows]
        lines += [f"{op:<28} {dt:<9} {lay:<14} raised: {msg}" for op, dt, lay, msg in self.errors]
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# inputs (odd sizes) and references
# --------------------------------------------------------------------------------------------

# K = 131 classes: the CUDA logit kernel splits each of the B = 5 rows over several blocks (chunks of at least
# 64 classes), so the first-use check covers its merge of the chunks, not only the one-block-per-row case
B, K, M = 5, 131, 3
# (C, H, W) per teacher, chosen to reach every walk of the CUDA map kernels: a tiny odd map; 5 x 61 x 59 = 17995
# values per sample, three 8192-value blocks of the flat feature_kd walk with a short last one, and rows of
# 3599 > 1024 pixels (the block-per-row walk with the cosine); C = 260 >= 256, the thread-per-channel pooling
# of channels_last maps (and two channel blocks of feature_kd's channels_last walk)
MAP_SHAPES = ((6, 3, 5), (5, 61, 59), (260, 2, 3))


def _randn(gen, *shape, scale=1.0):
    return scale * torch.randn(*shape, generator=gen, dtype=F64)


def _maps(gen, dtype, channels_last):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return [_randn(gen, B, *s).to(dtype).contiguous(memory_format=fmt) for s in MAP_SHAPES]


def _logit_inputs(gen, dtype, channels_last):
    zs = _randn(gen, B, K, scale=3.0).to(dtype)
    zt = _randn(gen, M, B, K, scale=3.0).to(dtype)
    y = torch.randint(0, K, (B,), generator=gen)
    w = 2.0 * torch.rand(B, M, generator=gen, dtype=F64)
    return [zs, zt, y, w, 4.0, 0.7]


def _feature_inputs(gen, dtype, channels_last):
    w = 2.0 * torch.rand(B, M, generator=gen, dtype=F64)
    return [_maps(gen, dtype, channels_last), _maps(gen, dtype, channels_last), w, 5.0]


def _embeddings(gen, dtype):
    return [_randn(gen, B, s[0]).to(dtype) for s in MAP_SHAPES]


def _feature_cos_inputs(gen, dtype, channels_last):
    return _feature_inputs(gen, dtype, channels_last) + [_embeddings(gen, dtype)]


def _cosine_inputs(gen, dtype, channels_last):
    return [_maps(gen, dtype, channels_last), _embeddings(gen, dtype)]


def _reward_inputs(gen, dtype, channels_last):
    sce = torch.rand(B, generator=gen, dtype=F64).mul(3).to(dtype)
    kl = torch.rand(B, M, generator=gen, dtype=F64).to(dtype)
    wl = 2.0 * torch.rand(B, M, generator=gen, dtype=F64)
    mse = torch.rand(B, M, generator=gen, dtype=F64).to(dtype)
    wf = 2.0 * torch.rand(B, M, generator=gen, dtype=F64)
    return [sce, kl, wl, mse, wf, 0.9, 5.0]


def _agent_stats_inputs(gen, dtype, channels_last):
    zs, zt, y = _logit_inputs(gen, dtype, channels_last)[:3]
    return [zs, zt, y, _maps(gen, dtype, channels_last), _embeddings(gen, dtype), 4.0]


def _ref_feature_cos(smaps, tmaps, w, beta, emb):
    out = reference.mtkd_feature_kd(smaps, tmaps, w, beta)
    return out.loss, out.mse, reference.pooled_cosine(smaps, emb)


def _ref_reward(sce, kl, wl, mse, wf, alpha, beta):
    loss = reference.per_sample_loss(sce, kl, wl, mse, wf, alpha, beta)
    return loss, reference.normalized_reward(loss)


def _ref_cosine(maps, emb):
    return (reference.pooled_cosine(maps, emb),)


def _ref_agent_stats(*args):
    return reference.agent_stats(*args)


CHECKS: dict[str, OpCheck] = {
    "mtkd_logit_kd": OpCheck("mtkd_logit_kd", reference.mtkd_logit_kd, _logit_inputs,
                             ("loss", "kl", "teacher_ce", "student_ce"), grad_wrt=(0,)),
    "mtkd_feature_kd": OpCheck("mtkd_feature_kd", reference.mtkd_feature_kd, _feature_inputs, ("loss", "mse"),
                               grad_wrt=(0,), has_maps=True),
    "feature_kd_and_cosine": OpCheck("feature_kd_and_cosine", _ref_feature_cos, _feature_cos_inputs,
                                     ("loss", "mse", "cos"), grad_wrt=(0,), has_maps=True),
    "pooled_cosine": OpCheck("pooled_cosine", _ref_cosine, _cosine_inputs, ("cos",), grad_wrt=(0, 1), has_maps=True),
    "per_sample_loss_and_reward": OpCheck("per_sample_loss_and_reward", _ref_reward, _reward_inputs,
                                          ("per_sample_loss", "reward"), grad_wrt=(0, 1, 3)),
}
_AGENT_STATS = OpCheck("agent_stats", _ref_agent_stats, _agent_stats_inputs, ("kl", "teacher_ce", "cos"), has_maps=True)


def active_checks() -> list[OpCheck]:
    """The entries of :data:`CHECKS` whose fused op exists (plus ``agent_stats`` where ops and reference have it)."""
    from . import ops

    checks = [c for c in CHECKS.values() if hasattr(ops, c.op)]
    if "agent_stats" not in CHECKS and hasattr(ops, "agent_stats") and hasattr(reference, "agent_stats"):
        checks.append(_AGENT_STATS)
    return checks


# --------------------------------------------------------------------------------------------
# running one case
# --------------------------------------------------------------------------------------------


def _map_args(args, fn):
    return [[fn(t) for t in a] if isinstance(a, (list, tuple)) else fn(a) if isinstance(a, Tensor) else a for a in args]


def _leaves(args, positions) -> list[Tensor]:
    out = []
    for p in positions:
        out += list(args[p]) if isinstance(args[p], (list, tuple)) else [args[p]]
    return out


def _prepare(args, positions, convert):
    """``args`` converted by ``convert`` (tensors only), with the tensors at ``positions`` requiring grad."""
    args = _map_args(args, lambda t: convert(t).detach())
    for t in _leaves(args, positions):
        t.requires_grad_(True)
    return args


def _outputs(value) -> list[Optional[Tensor]]:
    return list(value) if isinstance(value, (tuple, list)) else [value]


def _compare(check, dtype, layout, name, got, exp, report):
    rtol = RTOL.get(dtype, 1e-4)
    if got is None or exp is None:
        if (got is None) != (exp is None):
            report.errors.append((check.op, _dtype_name(dtype), layout, f"{name}: one side returned None"))
        return
    got, exp = got.detach().to(F64).cpu(), exp.detach().to(F64).cpu()
    if got.shape != exp.shape:
        report.errors.append((check.op, _dtype_name(dtype), layout,
                              f"{name}: shape {tuple(got.shape)}, reference {tuple(exp.shape)}"))
        return
    err = float((got - exp).abs().max()) if got.numel() else 0.0
    if got.numel() and not bool(torch.isfinite(got).all()):
        err = float("nan")
    scale = float(exp.abs().max()) if exp.numel() else 0.0
    report.results.append(CaseResult(check.op, _dtype_name(dtype), layout, name, err, scale, rtol * scale + ATOL))


def _dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def _run_case(check: OpCheck, device: torch.device, dtype, channels_last: bool, seed: int, report: Report) -> None:
    layout = "channels_last" if channels_last else "contiguous"
    gen = torch.Generator().manual_seed(seed)
    base = check.make_inputs(gen, dtype, channels_last)
    fmt = torch.channels_last if channels_last else torch.preserve_format

    def to_device(t):
        return t.to(device, memory_format=fmt if t.dim() == 4 else torch.preserve_format)

    def to_f64(t):
        return t.to(F64) if t.is_floating_point() else t

    args = _prepare(base, check.grad_wrt, to_device)
    ref_args = _prepare(base, check.grad_wrt, to_f64)
    try:
        got = _outputs(check.fused()(*args))
        exp = _outputs(check.reference(*ref_args))
        for name, g, e in zip(check.outputs, got, exp):
            _compare(check, dtype, layout, name, g, e, report)
        if check.grad_wrt:
            probe = torch.randn(exp[0].shape, generator=gen, dtype=F64)
            leaves, ref_leaves = _leaves(args, check.grad_wrt), _leaves(ref_args, check.grad_wrt)
            grads = torch.autograd.grad((got[0].to(F64) * probe.to(device)).sum(), leaves, allow_unused=True)
            ref_grads = torch.autograd.grad((exp[0] * probe).sum(), ref_leaves, allow_unused=True)
            for k, (g, e) in enumerate(zip(grads, ref_grads)):
                if g is None and e is not None:
                    g = torch.zeros_like(e)
                _compare(check, dtype, layout, f"grad[{k}] of {check.outputs[0]}", g, e, report)
    except Exception as exc:  # a kernel that raises is as broken as one that is wrong
        report.errors.append((check.op, _dtype_name(dtype), layout, f"{type(exc).__name__}: {exc}"))


def check_device(device, dtypes: Iterable = (torch.float32,), checks: Optional[Sequence[OpCheck]] = None,
                 seed: int = 0) -> Report:
    """Run every fused op on ``device`` against the float64 reference, for each of ``dtypes`` and (ops taking
    maps) both layouts; forward outputs and gradients. Returns a :class:`Report` (``report.ok``,
    ``report.format()``). Needs the compiled extension with kernels for the device."""
    from . import ops

    device = torch.device(device)
    if not ops.available(device):
        raise ValueError(f"device: the compiled mtkd_fast kernels are not available for {device} "
                         "(see `mtkd-fast info`)")
    dtypes = list(dict.fromkeys(dtypes))
    for d in dtypes:
        if d not in ALL_DTYPES:
            raise ValueError(f"dtypes: expected some of {[_dtype_name(x) for x in ALL_DTYPES]}, got {d}")
    report = Report(str(device))
    checks = active_checks() if checks is None else list(checks)
    with torch.inference_mode(False), torch.enable_grad(), torch.autocast(device.type, enabled=False):
        for n, check in enumerate(checks):
            for dtype in dtypes:
                for channels_last in ((False, True) if check.has_maps else (False,)):
                    _run_case(check, device, dtype, channels_last, seed + n, report)
    return report


# --------------------------------------------------------------------------------------------
# the automatic check on first use
# --------------------------------------------------------------------------------------------

_lock = threading.Lock()
_results: dict = {}  # (device str, dtype) -> bool
_failed_types: set = set()  # device types with a failed check (what a compiled graph consults)


def _device_key(device) -> str:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return str(device)


def device_ok(device, dtypes: Iterable = (torch.float32,)) -> bool:
    """True when the fused ops matched the reference on ``device`` for every dtype in ``dtypes`` (checked
    once per process and (device, dtype); a mismatch warns once, with the numbers). Devices whose type is
    not in :data:`AUTO_CHECK_DEVICE_TYPES` are not checked (True). Under ``torch.compile`` nothing is run:
    the answer is whether a check on this device type has failed so far (the eager first call checks)."""
    device = torch.device(device)
    if device.type not in AUTO_CHECK_DEVICE_TYPES:
        return True
    if torch.compiler.is_compiling():
        return device.type not in _failed_types
    return _checked(device, dtypes)


def _checked(device: torch.device, dtypes) -> bool:
    key = _device_key(device)
    wanted = [d for d in dict.fromkeys(dtypes) if d in ALL_DTYPES] or [torch.float32]
    with _lock:
        missing = [d for d in wanted if (key, d) not in _results]
        if missing:
            report = check_device(key, missing)
            bad = {r.dtype for r in report.failures} | {e[1] for e in report.errors}
            for d in missing:
                _results[key, d] = _dtype_name(d) not in bad
            if not report.ok:
                _failed_types.add(device.type)
                warnings.warn(
                    f"mtkd_fast: the fused kernels disagree with the reference on {key}; backend='auto' uses the "
                    f"reference implementation on this device (run `mtkd-fast selftest --device {key}` for the "
                    f"full check, and please report it):\n{report.format(only_failures=True)}",
                    SelfTestWarning, stacklevel=4)
        return all(_results[key, d] for d in wanted)


def reset() -> None:
    """Forget the cached results (the next :func:`device_ok` checks again)."""
    with _lock:
        _results.clear()
        _failed_types.clear()
