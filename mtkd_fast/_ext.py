"""Loads the compiled extension ``mtkd_fast._C``; without it the package runs on the reference path."""

from __future__ import annotations

import warnings

import torch

try:  # importing _C registers the mtkd_fast::* operators with torch
    from . import _C  # type: ignore[attr-defined]

    LOAD_ERROR: Exception | None = None
except ImportError as exc:  # not built, or built against another torch
    _C = None
    LOAD_ERROR = exc


class ExtensionMissingWarning(RuntimeWarning):
    """The compiled extension could not be loaded; the pure-PyTorch reference is used instead."""


_warned = False


def available() -> bool:
    return _C is not None


def warn_if_missing() -> None:
    """Say once per process that the fused kernels are missing and the reference is used."""
    global _warned
    if _C is None and not _warned:
        _warned = True
        warnings.warn(
            f"mtkd_fast: the compiled extension is not available ({LOAD_ERROR}); using the pure-PyTorch "
            "reference implementation. Build it with `make build` (or `pip install --no-build-isolation -e .`).",
            ExtensionMissingWarning,
            stacklevel=3,
        )


def registered_ops(dispatch_key: str) -> list[str]:
    """Names of mtkd_fast operators that have a kernel for ``dispatch_key`` ("CPU" or "CUDA")."""
    # the dispatcher's own list: dir(torch.ops.mtkd_fast) only shows the ops already looked up
    qualified = sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("mtkd_fast::"))
    return [q.split("::", 1)[1] for q in qualified if torch._C._dispatch_has_kernel_for_dispatch_key(q, dispatch_key)]


def build_info() -> dict:
    """What was compiled: CPU and CUDA kernels, CUDA archs, OpenMP threads, torch and CUDA versions."""
    info: dict = {
        "extension_loaded": _C is not None,
        "load_error": None if LOAD_ERROR is None else str(LOAD_ERROR),
        "torch_runtime_version": torch.__version__,
        "torch_cuda_version": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
    }
    if _C is None:
        info.update(cpu_kernels=[], cuda_kernels=[], cuda_compiled=False, cuda_archs="", openmp=False)
        return info
    info.update(dict(_C.build_info()))
    info["cpu_kernels"] = registered_ops("CPU")
    info["cuda_kernels"] = registered_ops("CUDA")
    return info
