"""The CUDA kernels of the fused ops against the float64 reference (skipped without a GPU).

Same tolerances as tests/test_ops.py. Written with the CPU tests; run on a machine with a GPU
(`compute-sanitizer --tool memcheck .venv/bin/python -m pytest -q tests/test_ops_cuda.py` checks memory too).
"""

import pytest
import torch

from mtkd_fast import MTKDLoss, ops
from mtkd_fast import reference as ref

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
    loss, mse, cos = ops.feature_kd_and_cosine(gd, [f.to(DEV) for f in fs],
                                               w.to(DEV, acc), 5.0, [e.to(DEV) for e in emb])
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
    sce, kl, wl, mse, wf = (torch.rand(B, generator=g, dtype=F64),) + tuple(torch.rand(B, 3, generator=g, dtype=F64)
                                                                            for _ in range(4))
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
    torch.library.opcheck(torch.ops.mtkd_fast.logit_kd.default, (z, list(zt.to(DEV)), y.to(DEV),
                                                                 w.float().to(DEV), 4.0, 1.0))
    gs = [torch.randn(3, 4, 2, 2, device=DEV, requires_grad=True),
          torch.randn(3, 2, 3, 1, device=DEV, requires_grad=True)]
    fs = [torch.randn_like(x) for x in gs]
    torch.library.opcheck(torch.ops.mtkd_fast.feature_kd.default, (gs, fs, w.float().to(DEV), 5.0))
    emb = [torch.randn(3, 4, device=DEV, requires_grad=True), torch.randn(3, 2, device=DEV, requires_grad=True)]
    torch.library.opcheck(torch.ops.mtkd_fast.pooled_cosine.default, (gs, emb, 1e-8))
    torch.library.opcheck(torch.ops.mtkd_fast.feature_kd.default,
                          (gs, fs, w.float().to(DEV), 5.0, [e.detach() for e in emb], 1e-8))
    gs_cl = [x.detach().contiguous(memory_format=torch.channels_last).requires_grad_(True) for x in gs]
    fs_cl = [x.contiguous(memory_format=torch.channels_last) for x in fs]
    torch.library.opcheck(torch.ops.mtkd_fast.feature_kd.default,
                          (gs_cl, fs_cl, w.float().to(DEV), 5.0, [e.detach() for e in emb], 1e-8))
    torch.library.opcheck(torch.ops.mtkd_fast.per_sample_loss_reward.default,
                          (torch.rand(3, device=DEV), torch.rand(3, 2, device=DEV),
                           w.float().to(DEV), None, None, 1.0, 5.0))
    assert MTKDLoss().resolve_backend(torch.device(DEV)) == "fused"


# ------------------------------------------------------------------ agent_stats and the reworked walks

STATS_CASES = [  # (B, K, per-teacher map shapes): odd sizes, a 1x1 map, C = 1, C > 256 (one thread per channel)
    (1, 2, [(3, 2, 2), (5, 1, 3)]),
    (3, 1001, [(4, 3, 3), (300, 2, 2), (1, 3, 2)]),
    (17, 100, [(8, 4, 4), (16, 1, 1), (5, 3, 1), (7, 2, 3), (4, 5, 4)]),
    (64, 10, [(33, 15, 14), (2, 9, 11)]),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("B,K,shapes", STATS_CASES)
def test_agent_stats_cuda_matches_reference(dtype, channels_last, B, K, shapes):
    zs, zt, y, _ = _logits(B, K, len(shapes), seed=B + K, dtype=dtype)
    g = _gen(B)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    gs = [torch.randn(B, *s, generator=g, dtype=F64).to(dtype).contiguous(memory_format=fmt) for s in shapes]
    acc = F64 if dtype == F64 else torch.float32
    emb = [torch.randn(B, s[0], generator=g, dtype=F64).to(acc) for s in shapes]
    out = ops.agent_stats(zs.to(DEV), zt.to(DEV), y.to(DEV), [x.to(DEV) for x in gs], [e.to(DEV) for e in emb])
    exp = ref.agent_stats(zs.to(F64), zt.to(F64), y, [x.to(F64) for x in gs], [e.to(F64) for e in emb])
    tol = 1e-10 if dtype == F64 else 1e-4  # float32 accumulation on the same rounded inputs
    for name, a, b in zip(out._fields, out, exp):
        assert a.dtype == acc and a.device.type == torch.device(DEV).type
        torch.testing.assert_close(a.cpu().to(F64), b, rtol=tol, atol=tol, msg=lambda m: f"{name}: {m}")
    none = ops.agent_stats(zs.to(DEV), zt.to(DEV), y.to(DEV), None, None)
    assert torch.equal(none.cos.cpu(), torch.zeros(B, len(shapes), dtype=acc))


def _cuda_kernels(fn):
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
            and "Memset" not in e.name and "Memcpy" not in e.name]


def test_agent_stats_cuda_one_launch_per_tensor_family():
    zs, zt, y, _ = _logits(64, 100, 4, seed=6, dtype=torch.float32)
    zs, zt, y = zs.to(DEV), list(zt.to(DEV)), y.to(DEV)
    gs = [torch.randn(64, c, 8, 8, device=DEV) for c in (384, 384, 256, 256)]
    emb = [torch.randn(64, c, device=DEV) for c in (384, 384, 256, 256)]
    op = torch.ops.mtkd_fast.agent_stats
    assert len(_cuda_kernels(lambda: op(zs, zt, y, gs, emb, 4.0, 1e-8))) == 2
    assert len(_cuda_kernels(lambda: op(zs, zt, y, [], [], 4.0, 1e-8))) == 1


def test_agent_stats_cuda_opcheck():
    zs, zt, y, _ = _logits(3, 7, 2, seed=7, dtype=torch.float32)
    gs = [torch.randn(3, 4, 2, 2, device=DEV),
          torch.randn(3, 2, 3, 1, device=DEV).contiguous(memory_format=torch.channels_last)]
    emb = [torch.randn(3, 4, device=DEV), torch.randn(3, 2, device=DEV)]
    torch.library.opcheck(torch.ops.mtkd_fast.agent_stats.default,
                          (zs.to(DEV), list(zt.to(DEV)), y.to(DEV), gs, emb, 4.0, 1e-8))


def test_empty_batches_launch_nothing_and_return_empty_results():
    op = torch.ops.mtkd_fast
    gs = [torch.randn(0, 3, 2, 2, device=DEV), torch.randn(0, 2, 1, 3, device=DEV)]
    emb = [torch.randn(0, 3, device=DEV), torch.randn(0, 2, device=DEV)]
    assert op.pooled_cosine(gs, emb, 1e-8).shape == (0, 2)
    grad_maps, grad_emb = op.pooled_cosine_backward(torch.zeros(0, 2, device=DEV), gs, emb, 1e-8)
    assert [t.shape for t in grad_maps] == [g.shape for g in gs]
    loss, mse, cos, grads = op.feature_kd(gs, [torch.randn_like(x) for x in gs], torch.zeros(0, 2, device=DEV),
                                          5.0, emb, 1e-8)
    assert float(loss) == 0.0 and mse.shape == cos.shape == (0, 2)
    kl, tce, cos = op.agent_stats(torch.randn(0, 5, device=DEV), [torch.randn(0, 5, device=DEV)] * 2,
                                  torch.zeros(0, dtype=torch.long, device=DEV), gs, emb, 4.0, 1e-8)
    assert kl.shape == tce.shape == cos.shape == (0, 2)
    torch.cuda.synchronize()


def test_size_one_dimensions_do_not_decide_the_layout_cuda():
    gs = [torch.empty_strided((3, 5, 1, 1), (5, 1, 5, 5), dtype=F64).copy_(torch.randn(3, 5, 1, 1, dtype=F64)),
          torch.empty_strided((3, 1, 2, 3), (6, 1, 3, 1), dtype=F64).copy_(torch.randn(3, 1, 2, 3, dtype=F64))]
    fs = [torch.randn(3, 5, 1, 1, dtype=F64), torch.randn(3, 1, 2, 3, dtype=F64)]
    w = torch.rand(3, 2, dtype=F64)
    emb = [torch.randn(3, 5, dtype=F64), torch.randn(3, 1, dtype=F64)]
    loss, mse, cos, grads = torch.ops.mtkd_fast.feature_kd([g.to(DEV) for g in gs], [f.to(DEV) for f in fs], w.to(DEV),
                                                           2.0, [e.to(DEV) for e in emb], 1e-8)
    torch.testing.assert_close(mse.cpu(), ref.feature_mse_per_sample(gs, fs))
    torch.testing.assert_close(cos.cpu(), ref.pooled_cosine(gs, emb))
    for a, b in zip(grads, ref.feature_kd_grad(gs, fs, w, 2.0)):
        torch.testing.assert_close(a.cpu(), b)


def test_empty_spatial_maps_give_the_same_cosine_cuda():
    gs = [torch.randn(2, 3, 0, 4, dtype=F64), torch.randn(2, 0, 2, 2, dtype=F64)]
    emb = [torch.randn(2, 3, dtype=F64), torch.randn(2, 0, dtype=F64)]
    want = ref.pooled_cosine(gs, emb)
    dg, de = [g.to(DEV) for g in gs], [e.to(DEV) for e in emb]
    op = torch.ops.mtkd_fast
    got = {
        "pooled_cosine": op.pooled_cosine(dg, de, 1e-8),
        "feature_kd": op.feature_kd(dg, [torch.randn_like(g) for g in dg],
                                    torch.rand(2, 2, dtype=F64, device=DEV), 1.0, de, 1e-8)[2],
        "agent_stats": op.agent_stats(torch.randn(2, 4, dtype=F64, device=DEV),
                                      [torch.randn(2, 4, dtype=F64, device=DEV)] * 2,
                                      torch.zeros(2, dtype=torch.long, device=DEV), dg, de, 4.0, 1e-8)[2],
    }
    for name, cos in got.items():
        torch.testing.assert_close(cos.cpu(), want, equal_nan=True, msg=lambda m: f"{name}: {m}")


def test_pooled_cosine_backward_checks_the_device_of_grad():
    gs = [torch.randn(2, 3, 2, 2, device=DEV)]
    emb = [torch.randn(2, 3, device=DEV)]
    with pytest.raises(RuntimeError, match="grad: expected device"):
        torch.ops.mtkd_fast.pooled_cosine_backward(torch.ones(2, 1), gs, emb, 1e-8)


def test_pooled_cosine_channel_bound_counts_static_shared_memory():
    # the forward keeps no channel means (any C); the backward keeps C of them next to its static arrays:
    # a C just under the old bound (48 KiB / 4 bytes) is refused with a clear error instead of a failed launch
    g = torch.randn(2, 12280, 1, 1, device=DEV, requires_grad=True)
    e = torch.randn(2, 12280, device=DEV)
    out = ops.pooled_cosine([g], [e])
    torch.testing.assert_close(out.cpu().double(), ref.pooled_cosine([g.detach().cpu().double()], [e.cpu().double()]),
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="channels for the CUDA pooled_cosine backward"):
        out.sum().backward()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_feature_kd_cuda_channels_last_small_c_large_maps(dtype):
    # the channels_last walk with the cosine: few channels over many pixels (rows of threads split the pixels)
    B, shapes = 3, [(5, 40, 41), (64, 23, 19), (300, 3, 3)]
    g = _gen(8)
    gs = [torch.randn(B, *s, generator=g, dtype=F64).to(dtype).contiguous(memory_format=torch.channels_last)
          for s in shapes]
    fs = [torch.randn(B, *s, generator=g, dtype=F64).to(dtype).contiguous(memory_format=torch.channels_last)
          for s in shapes]
    emb = [torch.randn(B, s[0], generator=g, dtype=F64).float() for s in shapes]
    w = torch.rand(B, 3, generator=g, dtype=F64).float()
    loss, mse, cos = ops.feature_kd_and_cosine([x.to(DEV) for x in gs], [f.to(DEV) for f in fs], w.to(DEV), 5.0,
                                               [e.to(DEV) for e in emb])
    g64 = [x.double() for x in gs]
    torch.testing.assert_close(mse.cpu().double(), ref.feature_mse_per_sample(g64, [f.double() for f in fs]),
                               rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(cos.cpu().double(), ref.pooled_cosine(g64, [e.double() for e in emb]),
                               rtol=1e-4, atol=1e-5)
