"""Sample builders and tolerances shared by the op tests (tests/test_ops.py) on every device.

A helper module, not a test module. Inputs are always built on the CPU from a seeded generator (the same
values on every device) and compared with the float64 reference of the SAME (possibly rounded) inputs.

Tolerances: float64 inputs are computed in float64 and match the reference to ~1e-12. float16/bfloat16
inputs: statistics are accumulated in float32 (rtol/atol 1e-4); gradients are returned in the input dtype, so
they carry its rounding (float16: rtol 2e-3, bfloat16: rtol 1.6e-2, atol a matching fraction of the largest
gradient).
"""

import pytest
import torch

from mtkd_fast import ops
from mtkd_fast import reference as ref

F64 = torch.float64
GRAD_RTOL = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float32: 1e-5, torch.float64: 1e-10}
STAT_TOL = {torch.float64: 1e-10}  # statistics; 1e-4 for the float32 accumulation of every other dtype

CPU_SKIP_REASON = "compiled extension not built (make build)"
CUDA_SKIP_REASON = "needs a GPU and the CUDA kernels"
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available() or not ops.available("cuda"), reason=CUDA_SKIP_REASON)
# the devices a test parametrised over `device` runs on: cpu always (the module skips without the extension),
# cuda where a GPU and the CUDA kernels are there
DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=needs_cuda)]
CUDA_ONLY = [pytest.param("cuda", id="cuda", marks=needs_cuda)]


def gen(seed):
    return torch.Generator().manual_seed(seed)


def logit_inputs(B, K, M, seed=0, scale=3.0, dtype=F64):
    g = gen(seed)
    zs = (scale * torch.randn(B, K, generator=g, dtype=F64)).to(dtype)
    zt = (scale * torch.randn(M, B, K, generator=g, dtype=F64)).to(dtype)
    y = torch.randint(0, K, (B,), generator=g)
    w = 2.0 * torch.rand(B, M, generator=g, dtype=F64)  # rows do not sum to one
    w[0, 0] = 0.0  # a zero weight
    return zs, zt, y, w


def ref_logit(zs, zt, y, w, T, alpha):
    """float64 reference on the same (possibly rounded) inputs: outputs and dL/dz_s."""
    zs64 = zs.detach().to(F64).requires_grad_(True)
    out = ref.mtkd_logit_kd(zs64, zt.to(F64), y, w.to(F64), T, alpha)
    (grad,) = torch.autograd.grad(out.loss, zs64)
    return out, grad


def fused_logit(zs, zt, y, w, T, alpha):
    zs = zs.detach().clone().requires_grad_(True)
    out = ops.mtkd_logit_kd(zs, zt, y, w, T, alpha)
    (grad,) = torch.autograd.grad(out.loss, zs)
    return out, grad


def assert_stats_close(out, exp, rtol, atol):
    for name, a, b in zip(out._fields, out, exp):
        torch.testing.assert_close(a.to(F64), b.to(F64), rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


# Every B in (1, 3, 64, 129), K in (2, 10, 100, 1000, 1001) and M in (2, 3, 5, 8) appears; the cross
# product is sampled to keep the suite fast.
LOGIT_SIZES = [
    (1, 2, 2), (3, 10, 3), (64, 100, 5), (129, 1000, 8), (3, 1001, 2), (129, 2, 3),
    (64, 1001, 8), (1, 1000, 5), (129, 10, 2), (64, 2, 8), (3, 100, 3),
]

FEATURE_CASES = [  # (B, per-teacher (C, H, W)), M = 2, 3, 5, 8
    (1, [(3, 2, 2), (5, 1, 3)]),
    (3, [(4, 3, 3), (6, 2, 2), (3, 1, 2)]),
    (64, [(8, 4, 4), (16, 2, 2), (5, 3, 1), (7, 2, 3), (4, 4, 4)]),
    (129, [(3, 2, 2), (4, 1, 1), (2, 3, 3), (5, 2, 1), (3, 3, 2), (6, 1, 2), (2, 2, 2), (1, 4, 3)]),
]


def feature_inputs(B, shapes, seed=0, dtype=F64, channels_last=False):
    g = gen(seed)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    gs = [torch.randn(B, *s, generator=g, dtype=F64).to(dtype).contiguous(memory_format=fmt) for s in shapes]
    fs = [torch.randn(B, *s, generator=g, dtype=F64).to(dtype).contiguous(memory_format=fmt) for s in shapes]
    w = 1.5 * torch.rand(B, len(shapes), generator=g, dtype=F64)
    w[-1, 0] = 0.0
    return gs, fs, w


def ref_feature(gs, fs, w, beta):
    g64 = [x.detach().to(F64).requires_grad_(True) for x in gs]
    out = ref.mtkd_feature_kd(g64, [f.to(F64) for f in fs], w.to(F64), beta)
    return out, torch.autograd.grad(out.loss, g64)


def fused_feature(gs, fs, w, beta):
    gs = [x.detach().clone(memory_format=torch.preserve_format).requires_grad_(True) for x in gs]
    out = ops.mtkd_feature_kd(gs, fs, w, beta)
    return out, torch.autograd.grad(out.loss, gs)


# (B, K, per-teacher map shapes): odd sizes, M = 2, 3, 5; a 1x1 map, C = 1, K = 2 and K = 1001
STATS_CASES = [
    (1, 2, [(3, 2, 2), (5, 1, 3)]),
    (3, 10, [(4, 3, 3), (6, 2, 2), (1, 3, 2)]),
    (17, 1001, [(8, 4, 4), (16, 1, 1), (5, 3, 1), (7, 2, 3), (4, 5, 4)]),
    (64, 100, [(33, 5, 4), (2, 9, 11)]),
]

# the cases of the device-parametrised agent_stats test: odd sizes, a 1x1 map, C = 1, C > 256 (one CUDA thread
# per channel) and long rows
DEVICE_STATS_CASES = [
    (1, 2, [(3, 2, 2), (5, 1, 3)]),
    (3, 1001, [(4, 3, 3), (300, 2, 2), (1, 3, 2)]),
    (17, 100, [(8, 4, 4), (16, 1, 1), (5, 3, 1), (7, 2, 3), (4, 5, 4)]),
    (64, 10, [(33, 15, 14), (2, 9, 11)]),
]


def stats_inputs(B, K, shapes, seed, dtype=F64, channels_last=False, scale=3.0):
    M = len(shapes)
    zs, zt, y, _ = logit_inputs(B, K, M, seed=seed, scale=scale, dtype=dtype)
    gs, _, _ = feature_inputs(B, shapes, seed=seed + 1, dtype=dtype, channels_last=channels_last)
    g = gen(seed + 2)
    emb = [torch.randn(B, s[0], generator=g, dtype=F64) for s in shapes]
    emb[-1][0].zero_()  # a zero embedding: its norm is clamped to eps, the cosine is 0
    return zs, zt, y, gs, emb


def ref_stats(zs, zt, y, gs, emb, T):
    """float64 oracle on the same (possibly rounded) inputs."""
    maps = None if gs is None else [x.to(F64) for x in gs]
    embs = None if emb is None else [e.to(F64) for e in emb]
    return ref.agent_stats(zs.to(F64), zt.to(F64), y, maps, embs, T)
