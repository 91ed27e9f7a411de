"""How teacher outputs are laid out on disk: one raw memory-mapped array per (teacher, field), shaped
``[V, N, ...]`` (view-major, so one epoch reads one contiguous block per array), and the encodings:

- ``float16`` (default), ``bfloat16`` (stored as its raw 16-bit pattern), ``float32``;
- ``int8`` for feature maps: symmetric int8 with one float16 scale per (sample, channel),
  ``x ~= q * scale``, ``scale = max|x over H,W| / 127``;
- top-k logits (FKD-style) for large class counts: the k largest logits, their class indices and the
  softmax mass (at the recorded temperature T) of the other K - k classes. Decoding fills the other classes
  with the one logit value that gives them exactly that mass, so p^T of the top-k classes and of the tail as
  a whole are kept.
"""

from __future__ import annotations

import errno
import hashlib
import math
import os
import shutil
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

FIELDS = ("logits", "embeddings", "feature_maps")
FLOAT_ENCODINGS = ("float16", "bfloat16", "float32")
FEATURE_ENCODINGS = FLOAT_ENCODINGS + ("int8",)

# numpy dtype of each stored encoding (bfloat16 has no numpy dtype: its 16 bits are kept as int16)
_NUMPY_DTYPES = {"float16": np.float16, "bfloat16": np.int16, "float32": np.float32, "int8": np.int8,
                 "int16": np.int16, "int32": np.int32}
_TORCH_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
ITEM_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4, "int8": 1, "int16": 2, "int32": 4}


def numpy_dtype(name: str):
    return np.dtype(_NUMPY_DTYPES[name])


def check_encoding(arg: str, name: str, allowed: Sequence[str]) -> str:
    if name not in allowed:
        raise ValueError(f"{arg}: expected one of {tuple(allowed)}, got {name!r}")
    return name


# ---- float encodings ---------------------------------------------------------------------------------------

def encode_float(x: Tensor, encoding: str, what: str = "values") -> np.ndarray:
    """float tensor (any device) -> numpy array in the stored encoding. Refuses, naming ``what``, finite values the
    encoding cannot hold (float16 overflows past 65504): a cache must not turn them into an Inf that surfaces epochs
    later, deep in a training step. (A teacher's own NaN/Inf is stored as it is; ``cache verify`` reports it.)"""
    t = x.detach().to("cpu", _TORCH_DTYPES[encoding]).contiguous()
    if not bool(torch.isfinite(t).all()) and bool((torch.isfinite(x.detach().cpu()) & ~torch.isfinite(t)).any()):
        amax = float(x.detach().abs().nan_to_num(0.0, 0.0, 0.0).max())
        raise ValueError(f"{what}: values up to {amax:.3g} overflow {encoding} (largest finite "
                         f"{torch.finfo(_TORCH_DTYPES[encoding]).max:.6g}); build the cache with --dtype bfloat16 "
                         f"or float32 (--feature-dtype for feature maps)")
    if encoding == "bfloat16":
        return t.view(torch.int16).numpy()
    return t.numpy()


def decode_float(a: np.ndarray, encoding: str, device) -> Tensor:
    """numpy array in the stored encoding -> float32 tensor on ``device``."""
    t = torch.from_numpy(np.ascontiguousarray(a))
    if encoding == "bfloat16":
        t = t.view(torch.bfloat16)
    return t.to(device, non_blocking=True).float()


# ---- int8 feature maps -------------------------------------------------------------------------------------

def quantize_int8(x: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """[B, C, H, W] float -> (int8 [B, C, H, W], float16 scales [B, C]); x ~= q * scale per (sample, channel)."""
    x = x.detach().float().cpu()
    if not bool(torch.isfinite(x).all()):
        raise ValueError("feature_maps: expected finite teacher feature maps to quantise to int8, found NaN/Inf")
    amax = x.abs().amax(dim=(2, 3))
    scale16 = (amax / 127.0).to(torch.float16)
    if not bool(torch.isfinite(scale16).all()):  # |x| > 127 * 65504: the float16 scale itself overflows
        raise ValueError(f"feature_maps: values up to {float(amax.max()):.3g} overflow int8's float16 scales; build "
                         f"the cache with --feature-dtype bfloat16 or float32")
    scale = scale16.float()[:, :, None, None]
    q = torch.where(scale > 0, torch.round(x / scale.clamp_min(torch.finfo(torch.float32).tiny)), torch.zeros(()))
    q = q.clamp_(-127, 127).to(torch.int8)
    return q.numpy(), scale16.numpy()


def dequantize_int8(q: np.ndarray, scale: np.ndarray, device) -> Tensor:
    qt = torch.from_numpy(np.ascontiguousarray(q)).to(device, non_blocking=True)
    st = torch.from_numpy(np.ascontiguousarray(scale)).to(device, non_blocking=True)
    return qt.float() * st.float()[:, :, None, None]


# ---- top-k logits ------------------------------------------------------------------------------------------

def index_encoding(num_classes: int) -> str:
    return "int16" if num_classes <= 32767 else "int32"


def topk_encode(logits: Tensor, k: int, temperature: float, encoding: str, what: str = "logits"):
    """[B, K] logits -> (values [B, k] in ``encoding``, indices [B, k], tail mass [B] float32 at T)."""
    z = logits.detach().float().cpu()
    K = z.shape[1]
    values, idx = torch.topk(z, k, dim=1)  # sorted, ties broken by torch's rule (deterministic on CPU)
    log_p = torch.log_softmax(z / temperature, dim=1)
    top_mass = log_p.gather(1, idx).exp().sum(1)
    tail = (1.0 - top_mass).clamp_(0.0, 1.0) if k < K else torch.zeros(z.shape[0])
    return (encode_float(values, encoding, what), idx.numpy().astype(numpy_dtype(index_encoding(K))),
            tail.numpy().astype(np.float32))


def topk_decode(values: np.ndarray, indices: np.ndarray, tail: np.ndarray, num_classes: int, temperature: float,
                encoding: str, device) -> Tensor:
    """Rebuild [B, K] logits: stored values at their indices, and one fill value c for the other classes with
    (K - k) exp(c/T) / (sum_topk exp(z/T) + (K - k) exp(c/T)) = tail mass."""
    v = decode_float(values, encoding, device)
    idx = torch.from_numpy(np.ascontiguousarray(indices)).to(device).long()
    r = torch.from_numpy(np.ascontiguousarray(tail)).to(device).float()
    B, k = v.shape
    K = num_classes
    if k == K:
        return torch.empty(B, K, device=device).scatter_(1, idx, v)
    T = temperature
    lse_top = torch.logsumexp(v / T, dim=1)
    # mass can round to 0 (tail classes far below the top-k): floor it so c stays finite, which keeps their
    # probability negligible, as it was
    r = r.clamp(min=1e-30, max=1.0 - 1e-7)
    c = T * (torch.log(r) - torch.log1p(-r) + lse_top - math.log(K - k))
    out = c[:, None].expand(B, K).clone()
    return out.scatter_(1, idx, v)


# ---- sizes -------------------------------------------------------------------------------------------------

def per_sample_bytes(num_classes: int, embedding_dim: int, map_shape: Sequence[int], *, logits: str = "float16",
                     embeddings: str | None = "float16", feature_maps: str | None = "float16",
                     topk: int | None = None) -> int:
    """Bytes one teacher's outputs take for one (sample, view); ``None`` for a field left out of the cache."""
    if topk:
        b = topk * (ITEM_BYTES[logits] + ITEM_BYTES[index_encoding(num_classes)]) + 4
    else:
        b = num_classes * ITEM_BYTES[logits]
    if embeddings:
        b += embedding_dim * ITEM_BYTES[embeddings]
    if feature_maps:
        C, H, W = map_shape
        b += C * H * W * ITEM_BYTES[feature_maps] + (C * 2 if feature_maps == "int8" else 0)
    return b


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024.0
    raise AssertionError


def parse_bytes(text: str) -> int:
    """'20G', '512M', '1.5T', '1000' -> bytes (binary units)."""
    s = str(text).strip().upper().removesuffix("IB").removesuffix("B")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    try:
        if s and s[-1] in mult:
            return int(float(s[:-1]) * mult[s[-1]])
        return int(float(s))
    except ValueError:
        raise ValueError(f"budget: expected a size like 20G, 512M or a byte count, got {text!r}") from None


# ---- files -------------------------------------------------------------------------------------------------

def create_array_file(path: str, nbytes: int) -> None:
    """Create (or extend) a file to ``nbytes`` with its disk blocks allocated; an existing file of that size
    keeps its data (resume).

    The arrays are written through a memory map, and a write into a sparse file's hole on a full disk kills the
    process with SIGBUS. So the blocks are reserved here first (``posix_fallocate``): a disk without room for
    the file fails now, with one error naming the file and the free space, and the build resumes once there is
    space."""
    with open(path, "ab") as f:
        size = f.seek(0, os.SEEK_END)
        if size > nbytes:
            raise ValueError(f"{path}: expected at most {nbytes} bytes for this cache layout, found {size}")
        allocated = min(os.fstat(f.fileno()).st_blocks * 512, nbytes)
        free = free_bytes(os.path.dirname(os.path.abspath(path)))
        if nbytes - allocated > free:
            raise _no_space(path, nbytes - allocated, free)
        if nbytes and allocated < nbytes:
            try:
                os.posix_fallocate(f.fileno(), 0, nbytes)
            except OSError as exc:
                if exc.errno == errno.ENOSPC:
                    raise _no_space(path, nbytes - allocated, free_bytes(os.path.dirname(os.path.abspath(path)))) \
                        from None
                if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                    raise
                f.truncate(nbytes)  # a file system without fallocate: sparse, as before
        elif size < nbytes:
            f.truncate(nbytes)


def free_bytes(directory: str) -> int:
    """Bytes free to this user on ``directory``'s file system (a test can replace it)."""
    return shutil.disk_usage(directory).free


def _no_space(path: str, need: int, free: int) -> OSError:
    return OSError(errno.ENOSPC, f"{path}: no space left on the device: the cache array needs {format_bytes(need)} "
                                 f"more, {format_bytes(free)} free; free some space and run the same command again "
                                 "to resume the build")


def open_array(path: str, dtype: str, shape: Sequence[int], mode: str = "r") -> np.memmap:
    expected = int(np.prod(shape)) * ITEM_BYTES[dtype]
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: cache array file is missing")
    size = os.path.getsize(path)
    if size != expected:
        raise ValueError(f"{path}: cache array is truncated or has the wrong size: expected {expected} bytes "
                         f"({dtype} {list(shape)}), found {size}")
    return np.memmap(path, dtype=numpy_dtype(dtype), mode=mode, shape=tuple(shape))


def count_non_finite(a: np.ndarray, dtype: str) -> int:
    """NaN/Inf values in a slice of a stored array (integer arrays hold none). bfloat16 is stored as its raw
    16 bits: all exponent bits set means Inf or NaN."""
    if dtype == "bfloat16":
        return int(np.count_nonzero((np.asarray(a).view(np.uint16) & 0x7F80) == 0x7F80))
    if dtype in ("float16", "float32"):
        return int(a.size - np.count_nonzero(np.isfinite(a)))
    return 0


def checksum(a: np.ndarray) -> str:
    """blake2b-128 of an array's bytes (C-contiguous slices of a memmap hash without a copy)."""
    return hashlib.blake2b(np.ascontiguousarray(a).data, digest_size=16).hexdigest()
