"""The CUDA kernels of the fused ops against the float64 reference (skipped without a GPU).

Same tolerances as tests/test_ops.py. Written with the CPU tests; run on a machine with a GPU
(`compute-sanitizer --tool memcheck .venv/bin/python -m pytest -q tests/test_ops_cuda.py` checks memory too).
"""

import pytest
import torch

from mtkd_fast import MTKDLoss, ops, reference as ref

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or not ops.available("cuda"), reason="needs a GPU and the CUDA kernels"
)

F64 = torch.float64
DEV = "cuda"
GRAD_RTOL = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float32: 1e-5, torch.float64: 1e-10}
STAT_TOL = {torch.float64: 1e-10}


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _logits(B, K, M, seed, dtype, scale=3.0):
    g = _gen(seed)
    zs = (scale * torch.randn(B, K, generator=g, dtype=F64)).to(dtype)
    zt = (scale * torch.randn(M, B, K, generator=g, dtype=F64)).to(dtype)
    y = torch.randint(0, K, (B,), generator=g)
    w = 2.0 * torch.rand(B, M, generator=g, dtype=F64)
    w[0, 0] = 0.0
    return zs, zt, y, w


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B,K,M", [(1, 2, 2), (3, 1001, 3), (64, 100, 5), (129, 1000, 8), (256, 10, 2)])
def test_logit_kd_cuda_matches_reference(dtype, B, K, M):
    zs, zt, y, w = _logits(B, K, M, seed=B + K + M, dtype=dtype)
    acc = F64 if dtype == F64 else torch.float32
    z = zs.to(DEV).requires_grad_(True)
    out = ops.mtkd_logit_kd(z, zt.to(DEV), y.to(DEV), w.to(DEV, acc), 3.0, 0.8)
    (grad,) = torch.autograd.grad(out.loss, z)
    z64 = zs.to(F64).requires_grad_(True)
    exp = ref.mtkd_logit_kd(z64, zt.to(F64), y, w, 3.0, 0.8)
    (exp_grad,) = torch.autograd.grad(exp.loss, z64)
    tol = STAT_TOL.get(dtype, 1e-4)
    for a, b in zip(out, exp):
        torch.testing.assert_close(a.cpu().to(F64), b, rtol=tol, atol=tol)
    rtol = GRAD_RTOL[dtype]
    torch.testing.assert_close(grad.cpu().to(F64), exp_grad, rtol=rtol, atol=rtol * exp_grad.abs().max().item())


def test_logit_kd_cuda_large_logits_float16():
    zs, zt, y, w = _logits(9, 100, 3, seed=1, dtype=F64, scale=1.0)
    zs, zt = (1e4 * zs.clamp(-1, 1)).half(), (1e4 * zt.clamp(-1, 1)).half()
    out = ops.mtkd_logit_kd(zs.to(DEV), zt.to(DEV), y.to(DEV), w.float().to(DEV), 2.0)
    exp = ref.mtkd_logit_kd(zs.double(), zt.double(), y, w, 2.0)
    for a, b in zip(out, exp):
        assert bool(torch.isfinite(a).all())
        torch.testing.assert_close(a.cpu().double(), b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_feature_kd_cuda_matches_reference(dtype, channels_last):
    g = _gen(2)
    B = 33
    shapes = [(64, 8, 8), (48, 7, 7), (5, 3, 1), (3, 2, 2)]  # multi-chunk, odd, tiny (unvectorised) maps
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    gs = [torch.randn(B, *s, generator=g, dtype=F64).to(dtype).contiguous(memory_format=fmt) for s in shapes]
    fs = [torch.randn(B, *s, generator=g, dtype=F64).to(dtype).contiguous(memory_format=fmt) for s in shapes]
    w = torch.rand(B, len(shapes), generator=g, dtype=F64)
    acc = F64 if dtype == F64 else torch.float32
    gd = [x.to(DEV).requires_grad_(True) for x in gs]
    out = ops.mtkd_feature_kd(gd, [f.to(DEV) for f in fs], w.to(DEV, acc), 5.0)
    grads = torch.autograd.grad(out.loss, gd)
    g64 = [x.to(F64).requires_grad_(True) for x in gs]
    exp = ref.mtkd_feature_kd(g64, [f.to(F64) for f in fs], w, 5.0)
    exp_grads = torch.autograd.grad(exp.loss, g64)
    tol = STAT_TOL.get(dtype, 1e-4)
    for a, b in zip(out, exp):
        torch.testing.assert_close(a.cpu().to(F64), b, rtol=tol, atol=tol)
    rtol = GRAD_RTOL[dtype]
    for a, b, x in zip(grads, exp_grads, gd):
        assert a.stride() == x.stride()
        torch.testing.assert_close(a.cpu().to(F64), b, rtol=rtol, atol=rtol * b.abs().max().item())


@pytest.mark.parametrize("channels_last", [False, True])
def test_pooled_cosine_cuda_matches_reference(channels_last):
    g = _gen(3)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    shapes = [(300, 4, 4), (16, 7, 7), (3, 1, 2)]
    gs = [torch.randn(5, *s, generator=g, dtype=F64).contiguous(memory_format=fmt) for s in shapes]
    emb = [torch.randn(5, s[0], generator=g, dtype=F64) for s in shapes]
    gd = [x.to(DEV).requires_grad_(True) for x in gs]
    ed = [e.to(DEV).requires_grad_(True) for e in emb]
    out = ops.pooled_cosine(gd, ed)
    up = torch.randn(out.shape, generator=g, dtype=F64)
    got = torch.autograd.grad((out * up.to(DEV)).sum(), gd + ed)
    gs = [x.requires_grad_(True) for x in gs]
    emb = [e.requires_grad_(True) for e in emb]
    exp = ref.pooled_cosine(gs, emb)
    want = torch.autograd.grad((exp * up).sum(), gs + emb)
    torch.testing.assert_close(out.cpu(), exp)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.cpu(), b)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_feature_kd_and_cosine_cuda_matches_reference(dtype, channels_last):
    # every walk of the kernel: warp rows (short NCHW rows), block rows (rows > 1024 values), channels_last
    # with several channel groups per sample, and 1x1 maps
    g = _gen(6)
    B = 17
    shapes = [(600, 4, 4), (40, 7, 7), (3, 40, 40), (300, 1, 1), (5, 3, 1)]
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    gs = [torch.randn(B, *s, generator=g, dtype=F64).to(dtype).contiguous(memory_format=fmt) for s in shapes]
    fs = [torch.randn(B, *s, generator=g, dtype=F64).to(dtype).contiguous(memory_format=fmt) for s in shapes]
    emb = [torch.randn(B, s[0], generator=g, dtype=F64) for s in shapes]
    emb[0][3].zero_()
    w = torch.rand(B, len(shapes), generator=g, dtype=F64)
    acc = F64 if dtype == F64 else torch.float32
    gd = [x.to(DEV).requires_grad_(True) for x in gs]
    loss, mse, cos = ops.feature_kd_and_cosine(gd, [f.to(DEV) for f in fs], w.to(DEV, acc), 5.0, [e.to(DEV) for e in emb])
    grads = torch.autograd.grad(loss, gd)
    g64 = [x.to(F64).requires_grad_(True) for x in gs]
    exp = ref.mtkd_feature_kd(g64, [f.to(F64) for f in fs], w, 5.0)
    exp_grads = torch.autograd.grad(exp.loss, g64)
    exp_cos = ref.pooled_cosine([x.detach() for x in g64], [e.to(acc).to(F64) for e in emb])
    tol = STAT_TOL.get(dtype, 1e-4)
    torch.testing.assert_close(loss.cpu().to(F64), exp.loss, rtol=tol, atol=tol)
    torch.testing.assert_close(mse.cpu().to(F64), exp.mse, rtol=tol, atol=tol)
    torch.testing.assert_close(cos.cpu().to(F64), exp_cos, rtol=max(tol, 1e-5), atol=max(tol, 1e-5))
    rtol = GRAD_RTOL[dtype]
    for a, b, x in zip(grads, exp_grads, gd):
        assert a.stride() == x.stride()
        torch.testing.assert_close(a.cpu().to(F64), b, rtol=rtol, atol=rtol * b.abs().max().item())


@pytest.mark.parametrize("B", [1, 3, 129, 1000])
def test_per_sample_loss_and_reward_cuda(B):
    g = _gen(B)
    sce, kl, wl, mse, wf = (torch.rand(B, generator=g, dtype=F64),) + tuple(torch.rand(B, 3, generator=g, dtype=F64) for _ in range(4))
    out = ops.per_sample_loss_and_reward(*(t.to(DEV) for t in (sce, kl, wl, mse, wf)), alpha=0.5, beta=3.0)
    exp = ref.per_sample_loss(sce, kl, wl, mse, wf, 0.5, 3.0)
    torch.testing.assert_close(out.per_sample_loss.cpu(), exp)
    torch.testing.assert_close(out.reward.cpu(), ref.normalized_reward(exp))


def test_one_kernel_launch_per_op():
    # the raw ops (the Python API adds argument checks, e.g. the target range, which launch reductions)
    zs, zt, y, w = _logits(64, 100, 4, seed=4, dtype=torch.float32)
    gs = [torch.randn(64, c, 8, 8, device=DEV) for c in (384, 384, 256, 256)]
    fs = [torch.randn_like(x) for x in gs]
    emb = [torch.randn(64, c, device=DEV) for c in (384, 384, 256, 256)]
    w = w.float().to(DEV)
    op = torch.ops.mtkd_fast
    calls = {
        "logit_kd": lambda: op.logit_kd(zs.to(DEV), list(zt.to(DEV)), y.to(DEV), w, 4.0, 1.0),
        "feature_kd": lambda: op.feature_kd(gs, fs, w, 5.0),
        "feature_kd with the cosine": lambda: op.feature_kd(gs, fs, w, 5.0, emb, 1e-8),
        "pooled_cosine": lambda: op.pooled_cosine(gs, emb, 1e-8),
    }
    for name, fn in calls.items():
        fn()
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        kernels = [
            e.name for e in prof.events()
            if e.device_type == torch.autograd.DeviceType.CUDA and "Memset" not in e.name and "Memcpy" not in e.name
        ]
        # the host-to-device copies of the logit inputs are memcpys; every computed value comes from one kernel
        assert len(kernels) == 1 and "mtkd" in kernels[0], (name, kernels)


def test_mtkd_loss_cuda_opcheck_and_module():
    zs, zt, y, w = _logits(3, 7, 2, seed=5, dtype=torch.float32)
    z = zs.to(DEV).requires_grad_(True)
    torch.library.opcheck(torch.ops.mtkd_fast.logit_kd.default, (z, list(zt.to(DEV)), y.to(DEV), w.float().to(DEV), 4.0, 1.0))
    gs = [torch.randn(3, 4, 2, 2, device=DEV, requires_grad=True), torch.randn(3, 2, 3, 1, device=DEV, requires_grad=True)]
    fs = [torch.randn_like(x) for x in gs]
    torch.library.opcheck(torch.ops.mtkd_fast.feature_kd.default, (gs, fs, w.float().to(DEV), 5.0))
    emb = [torch.randn(3, 4, device=DEV, requires_grad=True), torch.randn(3, 2, device=DEV, requires_grad=True)]
    torch.library.opcheck(torch.ops.mtkd_fast.pooled_cosine.default, (gs, emb, 1e-8))
    torch.library.opcheck(torch.ops.mtkd_fast.feature_kd.default, (gs, fs, w.float().to(DEV), 5.0, [e.detach() for e in emb], 1e-8))
    gs_cl = [x.detach().contiguous(memory_format=torch.channels_last).requires_grad_(True) for x in gs]
    fs_cl = [x.contiguous(memory_format=torch.channels_last) for x in fs]
    torch.library.opcheck(torch.ops.mtkd_fast.feature_kd.default, (gs_cl, fs_cl, w.float().to(DEV), 5.0, [e.detach() for e in emb], 1e-8))
    torch.library.opcheck(torch.ops.mtkd_fast.per_sample_loss_reward.default,
                          (torch.rand(3, device=DEV), torch.rand(3, 2, device=DEV), w.float().to(DEV), None, None, 1.0, 5.0))
    assert MTKDLoss().resolve_backend(torch.device(DEV)) == "fused"
