"""Input checks shared by the reference, the fused ops and the loss module.

Every failure raises ``ValueError`` (``TypeError`` for a wrong kind of object) whose message starts with
the argument's name and says what was expected, so a user sees at once which input is wrong.
"""

from __future__ import annotations

import math
import re
from typing import Sequence

import torch
from torch import Tensor


class DataError(ValueError):
    """A file or directory the user handed us cannot be used as it is (corrupt, truncated, in use by another
    process, edited). The command line reports it in one line with exit status 1 (usage mistakes: 2)."""


FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _shape(t: Tensor) -> tuple:
    return tuple(t.shape)


def check_tensor(name: str, t) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    return t


def check_logits(name: str, logits: Tensor) -> None:
    """A [B, K] floating tensor with B >= 1 and K >= 2."""
    check_tensor(name, logits)
    if logits.dim() != 2 or logits.shape[0] < 1 or logits.shape[1] < 2:
        raise ValueError(f"{name}: expected shape [B, K] with B >= 1 and K >= 2 classes, got {_shape(logits)}")
    if logits.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name}: expected a floating dtype (float16, bfloat16, float32, float64), got {logits.dtype}")


def stack_teachers(name: str, teacher_logits, student_logits: Tensor | None = None) -> Tensor:
    """Accept a stacked [M, B, K] tensor or a sequence of M [B, K] tensors; return the [M, B, K] tensor.

    With ``student_logits`` given, B, K, dtype and device must match it.
    """
    if isinstance(teacher_logits, Tensor):
        teachers = teacher_logits
        if teachers.dim() != 3:
            raise ValueError(f"{name}: expected shape [M, B, K] or a list of M [B, K] tensors, got {_shape(teachers)}")
    elif isinstance(teacher_logits, (list, tuple)):
        if len(teacher_logits) == 0:
            raise ValueError(f"{name}: expected at least 2 teachers, got an empty list")
        for m, t in enumerate(teacher_logits):
            check_logits(f"{name}[{m}]", t)
            if t.shape != teacher_logits[0].shape:
                raise ValueError(
                    f"{name}[{m}]: expected shape {_shape(teacher_logits[0])} like {name}[0], got {_shape(t)}"
                )
        teachers = torch.stack(list(teacher_logits), 0)
    else:
        raise TypeError(f"{name}: expected a [M, B, K] tensor or a list of [B, K] tensors, "
                        f"got {type(teacher_logits).__name__}")
    if teachers.shape[0] < 2:
        raise ValueError(f"{name}: expected M >= 2 teachers, got M = {teachers.shape[0]}")
    if teachers.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name}: expected a floating dtype, got {teachers.dtype}")
    if student_logits is not None:
        if teachers.shape[1:] != student_logits.shape:
            raise ValueError(
                f"{name}: expected shape [M, {student_logits.shape[0]}, {student_logits.shape[1]}] to match "
                f"student_logits {_shape(student_logits)}, got {_shape(teachers)}"
            )
        if teachers.device != student_logits.device:
            raise ValueError(f"{name}: expected device {student_logits.device} like student_logits, "
                             f"got {teachers.device}")
    return teachers


def check_targets(name: str, targets: Tensor, B: int, K: int, device) -> None:
    check_tensor(name, targets)
    if targets.dim() != 1 or targets.shape[0] != B:
        raise ValueError(f"{name}: expected shape [{B}] (one class index per sample), got {_shape(targets)}")
    if targets.dtype != torch.int64:
        raise ValueError(f"{name}: expected dtype torch.int64 class indices, got {targets.dtype}")
    if targets.device != torch.device(device):
        raise ValueError(f"{name}: expected device {device}, got {targets.device}")
    # The value range is checked here on the CPU only: on an accelerator it would read back to the host (a sync
    # every step); there the kernels (and F.cross_entropy) assert on the device instead.
    if B and not torch.compiler.is_compiling() and targets.device.type == "cpu":
        lo, hi = int(targets.min()), int(targets.max())
        if lo < 0 or hi >= K:
            raise ValueError(f"{name}: expected class indices in [0, {K - 1}], got values in [{lo}, {hi}]")


def check_weights(name: str, w: Tensor, B: int, M: int, device, what: str = "teacher weights") -> None:
    """A floating [B, M] tensor on ``device``; teacher weights must also be non-negative (a negative weight turns
    distillation into pushing the student away from a teacher). Like the target range, the values are checked
    on the CPU only (on an accelerator that would read back to the host every step; ``check_finite=True`` of
    :class:`mtkd_fast.MTKDLoss` checks them there)."""
    check_tensor(name, w)
    if w.dim() != 2 or w.shape[0] != B or w.shape[1] != M:
        raise ValueError(f"{name}: expected {what} of shape [{B}, {M}] ([B, M]), got {_shape(w)}")
    if w.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name}: expected a floating dtype, got {w.dtype}")
    if w.device != torch.device(device):
        raise ValueError(f"{name}: expected device {device}, got {w.device}")
    if what == "teacher weights" and w.numel() and w.device.type == "cpu" and not torch.compiler.is_compiling():
        check_nonnegative_values(name, w)


def check_nonnegative_values(name: str, w: Tensor) -> None:
    """Raise if ``w`` has a negative entry (reads the tensor: call it on the CPU or when a sync is wanted)."""
    lo = float(w.detach().min())
    if lo < 0:
        raise ValueError(f"{name}: expected non-negative teacher weights, got a minimum of {lo:g}")


# The documented temperature range (docs/safety.md; csrc/cpu/op_checks.h holds the same bounds for direct op
# calls): T^2 scales the KL and alpha*T the gradient, so T = 1e30 overflows (an inf loss, 1e21 gradients) and a
# tiny T is an argmax. Distillation uses T of about 1 to 20.
TEMPERATURE_RANGE = (1e-2, 1e2)


def check_temperature(temperature, name: str = "temperature") -> float:
    """A number in :data:`TEMPERATURE_RANGE` (finite: T = inf makes every softmax uniform and the KL term NaN)."""
    lo, hi = TEMPERATURE_RANGE
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or \
            not (lo <= temperature <= hi):
        raise ValueError(f"{name}: expected a number in [{lo:g}, {hi:g}], got {temperature!r}")
    return float(temperature)


DEVICE_NAMES = "auto, cpu, cuda or cuda:N"
_DEVICE_RE = re.compile(r"(auto|cpu|cuda(:[0-9]+)?)")


def check_device_name(name, option: str = "device") -> str:
    """A device the commands can run on: ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (``mps``, ``bogus`` and the
    like are refused here, naming ``option``, instead of failing deep inside torch with a traceback)."""
    if not isinstance(name, str) or not _DEVICE_RE.fullmatch(name):
        raise ValueError(f"{option}: expected {DEVICE_NAMES}, got {name!r}")
    return name


def check_int_range(name: str, value, lo: int, hi: int) -> int:
    """An integer in [lo, hi] (an overflowing ``--seed 99999999999999999999`` named, not a C overflow error)."""
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ValueError(f"{name}: expected an integer in [{lo}, {hi}], got {value!r}")
    return value


def check_scale(name: str, value) -> float:
    """A loss weight (alpha, beta): a finite number >= 0 (a negative one would reward moving away from the
    teachers, and the loss could fall below the cross-entropy alone)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name}: expected a finite non-negative number, got {value!r}")
    return float(value)


def check_per_sample(name: str, v: Tensor, B: int, device) -> None:
    check_tensor(name, v)
    if v.dim() != 1 or v.shape[0] != B:
        raise ValueError(f"{name}: expected shape [{B}] (one value per sample), got {_shape(v)}")
    if v.device != torch.device(device):
        raise ValueError(f"{name}: expected device {device}, got {v.device}")


def check_maps(student_maps: Sequence[Tensor], teacher_maps: Sequence[Tensor]) -> None:
    """M >= 1 pairs of 4-d maps; pair m shares one shape, all pairs share B, device and dtype."""
    if not isinstance(student_maps, (list, tuple)) or not isinstance(teacher_maps, (list, tuple)):
        raise TypeError("student_maps, teacher_maps: expected lists of [B, C_m, H_m, W_m] tensors")
    if len(student_maps) != len(teacher_maps):
        raise ValueError(
            f"teacher_maps: expected {len(student_maps)} maps (one per student map), got {len(teacher_maps)}"
        )
    if len(student_maps) == 0:
        raise ValueError("student_maps: expected at least one feature map")
    ref = student_maps[0]
    for m, (g, f) in enumerate(zip(student_maps, teacher_maps)):
        check_tensor(f"student_maps[{m}]", g)
        check_tensor(f"teacher_maps[{m}]", f)
        if g.dim() != 4:
            raise ValueError(f"student_maps[{m}]: expected shape [B, C, H, W], got {_shape(g)}")
        if g.numel() == 0:  # B = 0 or an empty channel/spatial dimension: no mean to take, on any backend
            raise ValueError(f"student_maps[{m}]: expected a non-empty map (B, C, H, W >= 1), got {_shape(g)}")
        if f.shape != g.shape:
            raise ValueError(f"teacher_maps[{m}]: expected shape {_shape(g)} like student_maps[{m}], got {_shape(f)}")
        if g.shape[0] != ref.shape[0]:
            raise ValueError(f"student_maps[{m}]: expected batch size {ref.shape[0]} like student_maps[0], "
                             f"got {g.shape[0]}")
        for nm, t in ((f"student_maps[{m}]", g), (f"teacher_maps[{m}]", f)):
            if t.dtype not in FLOAT_DTYPES:
                raise ValueError(f"{nm}: expected a floating dtype, got {t.dtype}")
            if t.device != ref.device:
                raise ValueError(f"{nm}: expected device {ref.device} like student_maps[0], got {t.device}")


def check_finite(name: str, t: Tensor) -> None:
    """Raise if ``t`` holds NaN or Inf (only called when the user asks for the check: it syncs the device)."""
    if not bool(torch.isfinite(t).all()):
        n_bad = int((~torch.isfinite(t)).sum())
        raise ValueError(f"{name}: expected finite values, found {n_bad} NaN/Inf entries")


def check_finite_teachers(name: str, teachers) -> None:
    """:func:`check_finite` of each teacher's tensor, naming the teacher (``teacher_logits[1]: ...``)."""
    for m, t in enumerate(teachers):
        check_finite(f"{name}[{m}]", t)


def check_finite_weights(model: torch.nn.Module, what: str) -> None:
    """Raise :class:`DataError` naming ``what`` (a checkpoint file) when the loaded weights hold NaN/Inf: every
    output of such a model is NaN, so an evaluation would report a meaningless accuracy and a teacher would
    poison the distillation (one read-back per tensor; called once per loaded file)."""
    bad = [name for name, t in (*model.named_parameters(), *model.named_buffers())
           if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
        raise DataError(f"{what}: the weights hold NaN/Inf values (in {bad[0]}{more}); the file is not a usable model")
