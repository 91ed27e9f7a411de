"""The fused mtkd_fast::* ops against the float64 reference, on every device: forward and gradients, odd sizes,
reduced precision, layouts, extreme logits, opcheck, torch.compile, autocast and argument errors.

Tests parametrised over `device` run on the CPU kernels always, on the CUDA kernels where a GPU is there
(skipped otherwise), and on the CUDA kernels compiled for the CPU SIMT emulator (ids [cuda_emu], tests/cuda_emu,
docs/ops.md); the last section holds the CUDA-only checks (launch counts, shared-memory bounds, devices).
Sample builders and tolerances (see there) live in tests/op_samples.py. On a GPU, `compute-sanitizer --tool
memcheck .venv/bin/python -m pytest -q tests/test_ops.py -k "cuda and not cuda_emu"` checks memory too.
"""

import pytest
import torch
from op_samples import (
    CPU_SKIP_REASON,
    CUDA_ONLY,
    DEVICE_STATS_CASES,
    DEVICES,
    F64,
    FEATURE_CASES,
    GRAD_RTOL,
    LOGIT_SIZES,
    STAT_TOL,
    STATS_CASES,
    assert_stats_close,
    feature_inputs,
    fused_feature,
    fused_logit,
    gen,
    logit_inputs,
    ref_feature,
    ref_logit,
    ref_stats,
    stats_inputs,
)

import mtkd_fast
from mtkd_fast import MTKDLoss, ops
from mtkd_fast import reference as ref

pytestmark = pytest.mark.skipif(not ops.available("cpu"), reason=CPU_SKIP_REASON)

# cpu and cuda (op_samples.DEVICES), and cuda_emu: the CUDA kernels of csrc/cuda compiled for the CPU SIMT
# emulator (tests/cuda_emu; `make emu` builds it, or the fixture on first use: minutes on 2 cores). The `device`
# fixture (conftest.py) turns it into "cpu" tensors whose mtkd_fast ops run the emulated kernels.
DEVICES = [*DEVICES, pytest.param("cuda_emu", id="cuda_emu")]


@pytest.mark.parametrize("B,K,M", LOGIT_SIZES)
def test_logit_kd_matches_reference_float64(B, K, M):
    zs, zt, y, w = logit_inputs(B, K, M, seed=B * 7 + K + M)
    T, alpha = (1.0 + (K % 5)) if B != 3 else 2.7, 0.25 + M / 4  # integer T (exp shortcut) and 2.7
    out, grad = fused_logit(zs, zt, y, w, T, alpha)
    exp, exp_grad = ref_logit(zs, zt, y, w, T, alpha)
    assert out.loss.dtype == out.kl.dtype == F64
    assert_stats_close(out, exp, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, exp_grad, rtol=1e-10, atol=1e-13)
    # the closed-form gradient of docs/method.md section 3 agrees too
    torch.testing.assert_close(grad, ref.logit_kd_grad(zs, zt, y, w, T, alpha), rtol=1e-10, atol=1e-13)


def test_logit_kd_teacher_list_and_stack_agree_and_grad_scales_with_grad_output():
    zs, zt, y, w = logit_inputs(7, 13, 3, seed=1)
    a = ops.mtkd_logit_kd(zs, zt, y, w)
    b = ops.mtkd_logit_kd(zs, list(zt), y, w)
    for x, z in zip(a, b):
        torch.testing.assert_close(x, z, rtol=0, atol=0)
    zs = zs.clone().requires_grad_(True)
    (g3,) = torch.autograd.grad(3.5 * ops.mtkd_logit_kd(zs, zt, y, w).loss, zs)
    (g1,) = torch.autograd.grad(ops.mtkd_logit_kd(zs, zt, y, w).loss, zs)
    torch.testing.assert_close(g3, 3.5 * g1)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("B,K,M", [(3, 1001, 3), (64, 100, 4), (1, 10, 2)])
def test_logit_kd_reduced_precision(dtype, B, K, M):
    zs, zt, y, w = logit_inputs(B, K, M, seed=K + 1, dtype=dtype)
    out, grad = fused_logit(zs, zt, y, w.float(), 4.0, 1.0)
    assert grad.dtype == dtype and out.kl.dtype == torch.float32
    exp, exp_grad = ref_logit(zs, zt, y, w, 4.0, 1.0)
    assert_stats_close(out, exp, rtol=1e-4, atol=1e-4)
    rtol = GRAD_RTOL[dtype]
    torch.testing.assert_close(grad.to(F64), exp_grad, rtol=rtol, atol=rtol * exp_grad.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
def test_logit_kd_is_stable_for_logits_of_magnitude_1e4(dtype):
    zs, zt, y, w = logit_inputs(9, 100, 3, seed=5, scale=1.0, dtype=F64)
    zs, zt = (1e4 * zs.sign() * zs.abs().clamp(0.3, 1.0)).to(dtype), (1e4 * zt.clamp(-1, 1)).to(dtype)
    out, grad = fused_logit(zs, zt, y, w.to(torch.float64 if dtype == F64 else torch.float32), 2.0, 1.0)
    assert all(bool(torch.isfinite(t).all()) for t in (*out, grad))
    exp, exp_grad = ref_logit(zs, zt, y, w, 2.0, 1.0)
    # the statistics are ~1e4 in size: float32 accumulation keeps ~7 digits of them
    tol = 1e-10 if dtype == F64 else 1e-5
    assert_stats_close(out, exp, rtol=tol, atol=tol)
    torch.testing.assert_close(grad.to(F64), exp_grad, rtol=GRAD_RTOL.get(dtype, 1e-10),
                               atol=1e-3 if dtype == torch.float16 else 1e-6)


@pytest.mark.parametrize("T", [4.0, 2.5])
def test_logit_kernels_float32_exps_over_the_whole_range(T):
    # the float32 exps of logit_kd and agent_stats run four at a time (csrc/cpu/simd.h): shifted exponents from 0
    # down past float32's underflow at ~-87 (probabilities exactly 0), K = 103 (groups of four and a tail of
    # three), the integer-T path (e^x from e^{x/T}) and the plain one
    B, K, M = 6, 103, 3
    zs, zt, y, w = logit_inputs(B, K, M, seed=52, scale=1.0, dtype=F64)
    spread = torch.linspace(0.01, 300.0, K, dtype=F64)  # logits from ~0.01 to ~1000 in size
    zs, zt = (zs * spread).float(), (zt * spread).float()
    out, grad = fused_logit(zs, zt, y, w.float(), T, 1.0)
    exp, exp_grad = ref_logit(zs, zt, y, w, T, 1.0)
    assert all(bool(torch.isfinite(t).all()) for t in (*out, grad))
    scale = max(float(exp.kl.detach().abs().max()), float(exp.teacher_ce.detach().abs().max()))
    assert_stats_close(out, exp, rtol=1e-5, atol=1e-6 * scale)
    torch.testing.assert_close(grad.double(), exp_grad, rtol=1e-5, atol=1e-6)
    stats = ops.agent_stats(zs, zt, y, None, None, T)
    exp_stats = ref_stats(zs, zt, y, None, None, T)
    torch.testing.assert_close(stats.kl.double(), exp_stats.kl, rtol=1e-5, atol=1e-6 * scale)
    torch.testing.assert_close(stats.teacher_ce.double(), exp_stats.teacher_ce, rtol=1e-5, atol=1e-6 * scale)


def test_logit_kd_zero_weights_leave_the_cross_entropy_only():
    zs, zt, y, _ = logit_inputs(5, 17, 3, seed=2)
    w = torch.zeros(5, 3, dtype=F64)
    out, grad = fused_logit(zs, zt, y, w, 4.0, 1.0)
    torch.testing.assert_close(out.loss, out.student_ce.mean())
    expected = (torch.softmax(zs, 1) - torch.nn.functional.one_hot(y, 17)) / 5
    torch.testing.assert_close(grad, expected)
    assert bool((out.kl > 0).all())  # the statistics are still computed


def test_logit_kd_non_contiguous_and_mixed_dtype_inputs():
    zs, zt, y, w = logit_inputs(6, 11, 3, seed=3)
    zs_nc = zs.t().contiguous().t()  # [B, K] with column-major strides
    zt_nc = zt.transpose(1, 2).contiguous().transpose(1, 2)
    assert not zs_nc.is_contiguous() and not zt_nc.is_contiguous()
    out, grad = fused_logit(zs_nc, zt_nc, y, w[:, :].t().contiguous().t(), 4.0, 1.0)
    exp, exp_grad = ref_logit(zs, zt, y, w, 4.0, 1.0)
    assert_stats_close(out, exp, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, exp_grad)
    # float32 student with float16 teachers: computed in float32
    out = ops.mtkd_logit_kd(zs.float(), zt.half(), y, w.float())
    exp, _ = ref_logit(zs.float(), zt.half(), y, w, 4.0, 1.0)
    assert_stats_close(out, exp, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------ feature distillation

@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("B,shapes", FEATURE_CASES)
def test_feature_kd_matches_reference_float64(B, shapes, channels_last):
    gs, fs, w = feature_inputs(B, shapes, seed=B + len(shapes), channels_last=channels_last)
    out, grads = fused_feature(gs, fs, w, 2.5)
    exp, exp_grads = ref_feature(gs, fs, w, 2.5)
    assert_stats_close(out, exp, rtol=1e-10, atol=1e-12)
    for g, e, x in zip(grads, exp_grads, gs):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-14)
        assert g.stride() == x.stride()  # the gradient keeps the map's layout
    for g, e in zip(grads, ref.feature_kd_grad(gs, fs, w, 2.5)):
        torch.testing.assert_close(g, e)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_feature_kd_reduced_precision(dtype):
    gs, fs, w = feature_inputs(5, [(32, 7, 7), (16, 3, 5), (8, 1, 1)], seed=4, dtype=dtype)
    out, grads = fused_feature(gs, fs, w.float(), 5.0)
    exp, exp_grads = ref_feature(gs, fs, w, 5.0)
    assert_stats_close(out, exp, rtol=1e-4, atol=1e-5)
    rtol = GRAD_RTOL[dtype]
    for g, e in zip(grads, exp_grads):
        assert g.dtype == dtype
        torch.testing.assert_close(g.to(F64), e, rtol=rtol, atol=rtol * e.abs().max().item())


def test_feature_kd_mixed_layouts_and_non_contiguous_maps():
    gs, fs, w = feature_inputs(4, [(6, 3, 3), (4, 2, 5), (3, 4, 4)], seed=6)
    gs_mixed = [gs[0].contiguous(memory_format=torch.channels_last),
                gs[1].transpose(2, 3).contiguous().transpose(2, 3), gs[2]]
    fs_mixed = [fs[0], fs[1].contiguous(memory_format=torch.channels_last),
                fs[2][:, :, :, :].permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)]
    big = torch.randn(4, 6, 8, 8, dtype=F64)
    gs_mixed.append(big[:, ::2, ::2, 1::2])  # strided slice: neither layout
    fs_mixed.append(torch.randn(4, 3, 4, 4, dtype=F64))
    w = torch.cat([w, torch.rand(4, 1, dtype=F64)], 1)
    out, grads = fused_feature(gs_mixed, fs_mixed, w, 1.0)
    exp, exp_grads = ref_feature(gs_mixed, fs_mixed, w, 1.0)
    assert_stats_close(out, exp, rtol=1e-10, atol=1e-12)
    for g, e in zip(grads, exp_grads):
        torch.testing.assert_close(g, e)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("B,shapes", FEATURE_CASES + [(3, [(70, 1, 1), (2, 9, 11), (33, 5, 4)])])
def test_feature_kd_and_cosine_matches_reference_float64(B, shapes, channels_last):
    # the cosine comes from the loss's own read of the maps; everything else is unchanged by asking for it
    gs, fs, w = feature_inputs(B, shapes, seed=2 * B + len(shapes), channels_last=channels_last)
    g = gen(B)
    emb = [torch.randn(B, s[0], generator=g, dtype=F64) for s in shapes]
    emb[-1][0].zero_()  # a zero embedding: its norm is clamped to eps, the cosine is 0
    gs = [x.requires_grad_(True) for x in gs]
    loss, mse, cos = ops.feature_kd_and_cosine(gs, fs, w, 2.5, emb)
    grads = torch.autograd.grad(loss, gs)
    exp, exp_grads = ref_feature(gs, fs, w, 2.5)
    torch.testing.assert_close(loss, exp.loss, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(mse, exp.mse, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(cos, ref.pooled_cosine([x.detach() for x in gs], emb), rtol=1e-10, atol=1e-12)
    assert not cos.requires_grad and not mse.requires_grad
    assert float(cos[0, -1]) == 0.0
    for a, b, x in zip(grads, exp_grads, gs):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)
        assert a.stride() == x.stride()
    assert ops.feature_kd_and_cosine(gs, fs, w, 2.5)[2] is None


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_feature_kd_and_cosine_reduced_precision_and_mixed_layouts(dtype):
    gs, fs, w = feature_inputs(7, [(40, 3, 3), (16, 2, 5), (9, 1, 1)], seed=24, dtype=dtype)
    gs[1] = gs[1].contiguous(memory_format=torch.channels_last)  # mixed layouts in one call
    fs[1] = fs[1].contiguous(memory_format=torch.channels_last)
    gs.append(torch.randn(7, 12, 8, 8, dtype=F64)[:, ::2, ::2, 1::2].to(dtype))  # strided: made contiguous
    fs.append(torch.randn(7, 6, 4, 4, dtype=F64).to(dtype))
    w = torch.cat([w, torch.rand(7, 1, dtype=F64)], 1).float()
    emb = [torch.randn(7, x.shape[1], dtype=F64) for x in gs]  # float64 embeddings: cast to the accumulation type
    gs = [x.requires_grad_(True) for x in gs]
    loss, mse, cos = ops.feature_kd_and_cosine(gs, fs, w, 5.0, emb)
    grads = torch.autograd.grad(loss, gs)
    assert cos.dtype == torch.float32 and cos.shape == (7, 4)
    # against float64 on the same (rounded) inputs: float32 accumulation, so 1e-5 relative
    exp_cos = ref.pooled_cosine([x.detach().double() for x in gs], [e.float().double() for e in emb])
    torch.testing.assert_close(cos.double(), exp_cos, rtol=1e-5, atol=1e-5)
    exp, exp_grads = ref_feature(gs, fs, w, 5.0)
    torch.testing.assert_close(mse.double(), exp.mse, rtol=1e-4, atol=1e-5)
    rtol = GRAD_RTOL[dtype]
    for a, b in zip(grads, exp_grads):
        assert a.dtype == dtype
        torch.testing.assert_close(a.to(F64), b, rtol=rtol, atol=rtol * b.abs().max().item())


@pytest.mark.parametrize("stream", ["1", "0"])
def test_feature_kd_float32_streaming_and_cached_gradient_stores(monkeypatch, stream):
    # float32 gradients larger than the last-level cache are written with streaming stores (csrc/cpu/simd.h);
    # MTKD_FAST_STREAM_STORES forces either path here, at odd sizes: every sample's run starts unaligned, ends
    # in a tail shorter than a vector, spans several 2048-value blocks (2 x 33 x 35), or is a single value; with
    # the cosine, NCHW maps are walked in blocks of channels (2 blocks of 80 + 70 channels at 7 x 7, 28 + 12 at
    # 12 x 11)
    monkeypatch.setenv("MTKD_FAST_STREAM_STORES", stream)
    B, shapes = 5, [(5, 7, 9), (3, 1, 3), (2, 33, 35), (1, 1, 1), (150, 7, 7), (40, 12, 11)]
    gs, fs, w = feature_inputs(B, shapes, seed=41, dtype=torch.float32)
    g = gen(42)
    emb = [torch.randn(B, s[0], generator=g, dtype=F64).float() for s in shapes]
    gs = [x.requires_grad_(True) for x in gs]
    exp, exp_grads = ref_feature(gs, fs, w.float(), 2.5)
    for embeddings in (None, emb):  # the plain walk and the one that also pools the maps for the cosine
        loss, mse, cos = ops.feature_kd_and_cosine(gs, fs, w.float(), 2.5, embeddings)
        grads = torch.autograd.grad(loss, gs)
        torch.testing.assert_close(loss.double(), exp.loss, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(mse.double(), exp.mse, rtol=1e-5, atol=1e-6)
        if embeddings is not None:
            exp_cos = ref.pooled_cosine([x.detach().double() for x in gs], [e.double() for e in emb])
            torch.testing.assert_close(cos.double(), exp_cos, rtol=1e-5, atol=1e-6)
        for a, b in zip(grads, exp_grads):
            assert a.dtype == torch.float32
            torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5 * b.abs().max().item())


def test_feature_kd_and_cosine_bad_embeddings_name_the_argument():
    gs, fs, w = feature_inputs(4, [(3, 2, 2), (2, 2, 2)], seed=25)
    emb = [torch.randn(4, 3, dtype=F64), torch.randn(4, 2, dtype=F64)]
    with pytest.raises(ValueError, match="teacher_embeddings"):
        ops.feature_kd_and_cosine(gs, fs, w, 5.0, emb[:1])
    with pytest.raises(ValueError, match=r"teacher_embeddings\[1\]"):
        ops.feature_kd_and_cosine(gs, fs, w, 5.0, [emb[0], torch.randn(4, 3, dtype=F64)])
    with pytest.raises(ValueError, match=r"teacher_embeddings\[0\]"):
        ops.feature_kd_and_cosine(gs, fs, w, 5.0, [emb[0].long(), emb[1]])
    with pytest.raises(ValueError, match="eps"):
        ops.feature_kd_and_cosine(gs, fs, w, 5.0, emb, eps=-1.0)
    # the compiled op checks its own arguments when called directly
    with pytest.raises(RuntimeError, match=r"teacher_embeddings\[0\].*accumulation"):
        torch.ops.mtkd_fast.feature_kd(gs, fs, w, 5.0, [emb[0].float(), emb[1].float()], 1e-8)


# ------------------------------------------------------------------ state helpers


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("B,shapes", FEATURE_CASES[:3])
def test_pooled_cosine_matches_reference_with_gradients(B, shapes, channels_last):
    gs, _, _ = feature_inputs(B, shapes, seed=9, channels_last=channels_last)
    g = gen(10)
    emb = [torch.randn(B, s[0], generator=g, dtype=F64) for s in shapes]
    emb[0][0].zero_()  # a zero embedding: its norm is clamped to eps
    gs = [x.requires_grad_(True) for x in gs]
    emb = [e.requires_grad_(True) for e in emb]
    out = ops.pooled_cosine(gs, emb)
    exp = ref.pooled_cosine(gs, emb)
    torch.testing.assert_close(out, exp, rtol=1e-10, atol=1e-12)
    upstream = torch.randn(out.shape, generator=g, dtype=F64)
    got = torch.autograd.grad((out * upstream).sum(), gs + emb)
    want = torch.autograd.grad((exp * upstream).sum(), gs + emb)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_pooled_cosine_float16_and_tiny_norms():
    gs, _, _ = feature_inputs(6, [(32, 4, 4), (16, 2, 2)], seed=11)
    emb = [torch.randn(6, c, dtype=F64) for c in (32, 16)]
    out = ops.pooled_cosine([x.half() for x in gs], [e.half() for e in emb])
    exp = ref.pooled_cosine([x.half().double() for x in gs], [e.half().double() for e in emb])
    torch.testing.assert_close(out.double(), exp, rtol=1e-4, atol=1e-4)
    tiny = [1e-12 * x for x in gs]  # norms below eps: values and gradients follow cosine_similarity's clamp
    tiny = [x.requires_grad_(True) for x in tiny]
    torch.testing.assert_close(ops.pooled_cosine(tiny, emb), ref.pooled_cosine(tiny, emb))
    a = torch.autograd.grad(ops.pooled_cosine(tiny, emb).sum(), tiny)
    b = torch.autograd.grad(ref.pooled_cosine(tiny, emb).sum(), tiny)
    for x, z in zip(a, b):
        torch.testing.assert_close(x, z)


@pytest.mark.parametrize("B,M,with_features", [(1, 2, True), (3, 3, False), (64, 5, True), (129, 8, True)])
def test_per_sample_loss_and_reward_match_reference(B, M, with_features):
    g = gen(B + M)
    sce, kl = torch.rand(B, generator=g, dtype=F64), 3 * torch.rand(B, M, generator=g, dtype=F64)
    wl, wf, mse = (torch.rand(B, M, generator=g, dtype=F64), torch.rand(B, M, generator=g, dtype=F64),
                   torch.rand(B, M, generator=g, dtype=F64))
    if not with_features:
        mse = wf = None
    kl.requires_grad_(True)
    out = ops.per_sample_loss_and_reward(sce, kl, wl, mse, wf, 0.7, 4.0)
    exp = ref.per_sample_loss(sce, kl, wl, mse, wf, 0.7, 4.0)
    torch.testing.assert_close(out.per_sample_loss, exp)
    torch.testing.assert_close(out.reward, ref.normalized_reward(exp))
    assert not out.reward.requires_grad
    torch.testing.assert_close(torch.autograd.grad(out.per_sample_loss.sum(), kl)[0],
                               torch.autograd.grad(exp.sum(), kl)[0])
    # equal losses: std 0, reward 0 (not NaN)
    flat = ops.per_sample_loss_and_reward(torch.ones(B, dtype=F64), torch.zeros(B, M, dtype=F64), wl)
    assert bool((flat.reward == 0).all())


# ------------------------------------------------------------------ the drop-in module


def test_mtkd_loss_auto_picks_fused_and_matches_reference():
    zs, zt, y, wl = logit_inputs(5, 9, 3, seed=12)
    gs, fs, wf = feature_inputs(5, [(4, 3, 3), (6, 2, 2), (3, 1, 2)], seed=13)
    emb = [torch.randn(5, c, dtype=F64) for c in (4, 6, 3)]
    crit = MTKDLoss(temperature=3.0, alpha=0.5, beta=2.0)
    assert crit.resolve_backend(torch.device("cpu")) == "fused"
    outs, grads = [], []
    for backend in ("fused", "reference"):
        z = zs.clone().requires_grad_(True)
        g = [x.clone().requires_grad_(True) for x in gs]
        out = MTKDLoss(3.0, 0.5, 2.0, backend=backend)(z, zt, y, wl, g, fs, wf, emb)
        out.loss.backward()
        outs.append(out)
        grads.append([z.grad] + [x.grad for x in g])
    for name, a, b in zip(outs[0]._fields, outs[0], outs[1]):
        torch.testing.assert_close(a, b, msg=lambda m: f"{name}: {m}")
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_autocast_bfloat16_model_outputs():
    torch.manual_seed(0)
    B, D, K, M = 8, 16, 10, 3
    head = torch.nn.Linear(D, K)
    x, zt, y = torch.randn(B, D), torch.randn(M, B, K), torch.randint(0, K, (B,))
    w = torch.full((B, M), 1.0 / M)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        zs = head(x)
        assert zs.dtype == torch.bfloat16
        out = MTKDLoss(backend="fused")(zs, zt, y, w)
    out.loss.backward()
    grad_fused = head.weight.grad.clone()
    head.weight.grad = None
    ref_out = MTKDLoss(backend="reference")(head(x), zt, y, w)
    ref_out.loss.backward()
    torch.testing.assert_close(out.loss.float(), ref_out.loss, rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(grad_fused, head.weight.grad, rtol=5e-2, atol=5e-3)


# ------------------------------------------------------------------ agent_stats (the state before the weights)

@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("B,K,shapes", STATS_CASES)
def test_agent_stats_matches_reference_float64(B, K, shapes, channels_last):
    zs, zt, y, gs, emb = stats_inputs(B, K, shapes, seed=B + K, channels_last=channels_last)
    for T in (4.0, 2.5):  # integer T takes the kernel's exp-by-multiplication path, 2.5 the plain one
        out = ops.agent_stats(zs, zt, y, gs, emb, T)
        exp = ref_stats(zs, zt, y, gs, emb, T)
        assert isinstance(out, ops.AgentStats) and out._fields == ("kl", "teacher_ce", "cos")
        for name, a, b in zip(out._fields, out, exp):
            assert a.dtype == F64 and a.shape == (B, len(shapes))
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=lambda m: f"{name}: {m}")
        assert float(out.cos[0, -1]) == 0.0
    # the same KL and TCE as the loss op computes from the same logits
    w = torch.rand(B, len(shapes), dtype=F64)
    logit = ops.mtkd_logit_kd(zs, zt, y, w, 4.0)
    torch.testing.assert_close(ops.agent_stats(zs, zt, y, gs, emb).kl, logit.kl, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(ops.agent_stats(zs, zt, y, gs, emb).teacher_ce, logit.teacher_ce, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("channels_last", [False, True])
def test_agent_stats_reduced_precision(dtype, channels_last):
    # float32 accumulation against float64 on the same rounded inputs: rtol/atol 1e-4 (embeddings are cast to
    # float32, the accumulation dtype, so the oracle gets them rounded the same way)
    zs, zt, y, gs, emb = stats_inputs(9, 101, [(40, 3, 3), (16, 2, 5), (9, 1, 1)], seed=31, dtype=dtype,
                                       channels_last=channels_last)
    out = ops.agent_stats(zs, zt, y, gs, emb)
    exp = ref_stats(zs, zt, y, gs, [e.float() for e in emb], 4.0)
    for name, a, b in zip(out._fields, out, exp):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4, msg=lambda m: f"{dtype} {name}: {m}")


def test_agent_stats_mixed_layouts_dtypes_and_no_maps():
    zs, zt, y, gs, emb = stats_inputs(5, 12, [(6, 3, 3), (4, 2, 5), (3, 4, 4)], seed=33)
    gs = [gs[0].contiguous(memory_format=torch.channels_last), gs[1], gs[2][:, :, ::2, 1::2]]  # last: strided
    out = ops.agent_stats(zs.float(), list(zt), y, gs, emb)  # float32 student, float64 teachers: promoted
    exp = ref_stats(zs, zt, y, gs, emb, 4.0)
    for a, b in zip(out, exp):
        assert a.dtype == F64
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    none = ops.agent_stats(zs, zt, y, None, None)
    assert torch.equal(none.cos, torch.zeros(5, 3, dtype=F64))
    torch.testing.assert_close(none.kl, exp.kl)
    # inputs that require grad give detached statistics
    z = zs.clone().requires_grad_(True)
    assert not any(t.requires_grad for t in ops.agent_stats(z, zt, y, [g.requires_grad_(True) for g in gs], emb))


def test_agent_stats_extreme_logits_stay_finite():
    zs, zt, y, gs, emb = stats_inputs(4, 50, [(3, 2, 2), (2, 2, 2)], seed=34, scale=1e4)
    for dtype in (torch.float32, F64):
        out = ops.agent_stats(zs.to(dtype), zt.to(dtype), y, [g.to(dtype) for g in gs], emb)
        exp = ref_stats(zs.to(dtype), zt.to(dtype), y, gs, emb, 4.0)
        assert all(torch.isfinite(t).all() for t in out)
        torch.testing.assert_close(out.kl.double(), exp.kl, rtol=1e-4, atol=1e-2)


def test_agent_stats_bad_input_names_the_argument():
    zs, zt, y, gs, emb = stats_inputs(4, 6, [(3, 2, 2), (2, 2, 2)], seed=35)
    with pytest.raises(ValueError, match="teacher_logits"):
        ops.agent_stats(zs, zt[:, :3], y, gs, emb)
    with pytest.raises(ValueError, match="targets"):
        ops.agent_stats(zs, zt, y.int(), gs, emb)
    with pytest.raises(ValueError, match="targets"):
        ops.agent_stats(zs, zt, torch.full_like(y, 6), gs, emb)
    with pytest.raises(ValueError, match="temperature"):
        ops.agent_stats(zs, zt, y, gs, emb, temperature=float("inf"))
    with pytest.raises(ValueError, match="student_maps"):
        ops.agent_stats(zs, zt, y, gs[:1], emb[:1])
    with pytest.raises(ValueError, match="teacher_embeddings"):
        ops.agent_stats(zs, zt, y, gs, None)
    with pytest.raises(ValueError, match=r"teacher_embeddings\[1\]"):
        ops.agent_stats(zs, zt, y, gs, [emb[0], torch.randn(4, 3, dtype=F64)])
    with pytest.raises(ValueError, match="eps"):
        ops.agent_stats(zs, zt, y, gs, emb, eps=-1.0)
    # the compiled op checks its own arguments when called directly
    op = torch.ops.mtkd_fast.agent_stats
    with pytest.raises(RuntimeError, match=r"teacher_embeddings\[0\].*accumulation"):
        op(zs.float(), [t.float() for t in zt], y, [g.float() for g in gs], emb, 4.0, 1e-8)
    with pytest.raises(RuntimeError, match="student_maps"):
        op(zs, list(zt), y, gs[:1], emb[:1], 4.0, 1e-8)
    with pytest.raises(RuntimeError, match=r"student_maps\[0\].*contiguous or channels_last"):
        op(zs, list(zt), y, [gs[0].transpose(2, 3), gs[1]], emb, 4.0, 1e-8)
    with pytest.raises(RuntimeError, match="temperature"):
        op(zs, list(zt), y, gs, emb, float("inf"), 1e-8)
    with pytest.raises(RuntimeError, match="targets"):
        op(zs, list(zt), torch.full_like(y, 6), gs, emb, 4.0, 1e-8)


@pytest.mark.parametrize("device", DEVICES, indirect=True)
def test_empty_batches_return_empty_results(device):
    # B = 0: a sum over no samples (loss 0) and empty statistics on every device; on CUDA nothing is launched
    op = torch.ops.mtkd_fast
    gs = [torch.randn(0, 3, 2, 2, device=device), torch.randn(0, 2, 1, 3, device=device)]
    emb = [torch.randn(0, 3, device=device), torch.randn(0, 2, device=device)]
    assert op.pooled_cosine(gs, emb, 1e-8).shape == (0, 2)
    grad_maps, grad_emb = op.pooled_cosine_backward(torch.zeros(0, 2, device=device), gs, emb, 1e-8)
    assert [t.shape for t in grad_maps] == [g.shape for g in gs]
    loss, mse, cos, grads = op.feature_kd(gs, [torch.randn_like(x) for x in gs], torch.zeros(0, 2, device=device),
                                          5.0, emb, 1e-8)
    assert float(loss) == 0.0 and mse.shape == cos.shape == (0, 2)
    assert [g.shape for g in grads] == [x.shape for x in gs]
    kl, tce, cos = op.agent_stats(torch.randn(0, 5, device=device), [torch.randn(0, 5, device=device)] * 2,
                                  torch.zeros(0, dtype=torch.long, device=device), gs, emb, 4.0, 1e-8)
    assert kl.shape == tce.shape == cos.shape == (0, 2)
    kl, tce, cos = op.agent_stats(torch.randn(0, 5, device=device), [torch.randn(0, 5, device=device)] * 2,
                                  torch.zeros(0, dtype=torch.long, device=device),
                                  [torch.randn(0, 3, 2, 2, device=device)] * 2, [torch.randn(0, 3, device=device)] * 2,
                                  4.0, 1e-8)
    assert kl.shape == tce.shape == cos.shape == (0, 2)
    if device == "cuda":
        torch.cuda.synchronize()


# ------------------------------------------------------------------ layouts and empty maps


@pytest.mark.parametrize("device", DEVICES, indirect=True)
def test_size_one_dimensions_do_not_decide_the_layout(device):
    # a channels_last [B, C, 1, 1] (or C = 1) student map and a contiguous teacher map are walked alike: the
    # strides of size-1 dimensions never matter (the op used to refuse them when called directly)
    g = torch.Generator().manual_seed(36)
    # channels_last strides as empty_like(..., channels_last) gives them (.contiguous() keeps an NCHW tensor here)
    gs = [torch.empty_strided((3, 5, 1, 1), (5, 1, 5, 5), dtype=F64)
              .copy_(torch.randn(3, 5, 1, 1, dtype=F64, generator=g)),
          torch.empty_strided((3, 1, 2, 3), (6, 1, 3, 1), dtype=F64)
              .copy_(torch.randn(3, 1, 2, 3, dtype=F64, generator=g))]
    fs = [torch.randn(3, 5, 1, 1, dtype=F64, generator=g), torch.randn(3, 1, 2, 3, dtype=F64, generator=g)]
    assert gs[0].stride() != fs[0].stride() and gs[1].stride() != fs[1].stride()
    w = torch.rand(3, 2, dtype=F64, generator=g)
    emb = [torch.randn(3, 5, dtype=F64, generator=g), torch.randn(3, 1, dtype=F64, generator=g)]
    gd = [x.to(device).requires_grad_(True) for x in gs]
    assert [x.stride() for x in gd] == [x.stride() for x in gs]
    loss, mse, cos, grads = torch.ops.mtkd_fast.feature_kd(gd, [f.to(device) for f in fs], w.to(device), 2.0,
                                                           [e.to(device) for e in emb], 1e-8)
    exp, exp_grads = ref_feature(gs, fs, w, 2.0)
    torch.testing.assert_close(mse.cpu(), exp.mse)
    torch.testing.assert_close(mse.cpu(), ref.feature_mse_per_sample(gs, fs))
    torch.testing.assert_close(cos.cpu(), ref.pooled_cosine(gs, emb))
    for a, b in zip(grads, exp_grads):
        torch.testing.assert_close(a.cpu(), b)
    for a, b in zip(grads, ref.feature_kd_grad(gs, fs, w, 2.0)):
        torch.testing.assert_close(a.cpu(), b)


@pytest.mark.parametrize("device", DEVICES, indirect=True)
def test_empty_spatial_maps_give_the_same_cosine_everywhere(device):
    # H*W = 0 has no spatial mean: NaN in the reference, pooled_cosine, feature_kd and agent_stats alike;
    # C = 0 pools to an empty vector, whose cosine is 0
    gs = [torch.randn(2, 3, 0, 4, dtype=F64), torch.randn(2, 0, 2, 2, dtype=F64)]
    emb = [torch.randn(2, 3, dtype=F64), torch.randn(2, 0, dtype=F64)]
    want = ref.pooled_cosine(gs, emb)
    assert torch.isnan(want[:, 0]).all() and torch.equal(want[:, 1], torch.zeros(2, dtype=F64))
    dg, de = [x.to(device) for x in gs], [e.to(device) for e in emb]
    op = torch.ops.mtkd_fast
    got = {
        "pooled_cosine": op.pooled_cosine(dg, de, 1e-8),
        "feature_kd": op.feature_kd(dg, [torch.randn_like(x) for x in dg],
                                    torch.rand(2, 2, dtype=F64, device=device), 1.0, de, 1e-8)[2],
        "agent_stats": op.agent_stats(torch.randn(2, 4, dtype=F64, device=device),
                                      [torch.randn(2, 4, dtype=F64, device=device)] * 2,
                                      torch.zeros(2, dtype=torch.long, device=device), dg, de, 4.0, 1e-8)[2],
    }
    for name, cos in got.items():
        torch.testing.assert_close(cos.cpu(), want, equal_nan=True, msg=lambda m: f"{name}: {m}")


# ------------------------------------------------------------------ custom-op machinery


def _opcheck_cases():
    zs, zt, y, w = logit_inputs(3, 7, 2, seed=14, dtype=torch.float32)
    gs, fs, wf = feature_inputs(3, [(4, 2, 2), (2, 3, 1)], seed=15, dtype=torch.float32)
    gs_cl = [x.contiguous(memory_format=torch.channels_last) for x in gs]
    fs_cl = [x.contiguous(memory_format=torch.channels_last) for x in fs]
    emb = [torch.randn(3, 4), torch.randn(3, 2)]
    kl, sce = torch.rand(3, 2), torch.rand(3)
    w = w.float()
    wf = wf.float()
    req = lambda t: t.clone(memory_format=torch.preserve_format).requires_grad_(True)
    op = torch.ops.mtkd_fast
    return [
        (op.logit_kd.default, (req(zs), list(zt), y, w, 4.0, 1.0)),
        (op.feature_kd.default, ([req(g) for g in gs], fs, wf, 5.0)),
        (op.feature_kd.default, ([req(g) for g in gs_cl], fs_cl, wf, 5.0)),
        (op.feature_kd.default, ([req(g) for g in gs], fs, wf, 5.0, emb, 1e-8)),
        (op.feature_kd.default, ([req(g) for g in gs_cl], fs_cl, wf, 5.0, emb, 1e-8)),
        (op.pooled_cosine.default, ([req(g) for g in gs], [req(e) for e in emb], 1e-8)),
        (op.pooled_cosine_backward.default, (torch.randn(3, 2), gs_cl, emb, 1e-8)),
        (op.per_sample_loss_reward.default, (req(sce), req(kl), w, req(torch.rand(3, 2)), wf, 1.0, 5.0)),
        (op.per_sample_loss_reward.default, (sce, kl, w, None, None, 1.0, 5.0)),
        (op.agent_stats.default, (zs, list(zt), y, gs, emb, 4.0, 1e-8)),
        (op.agent_stats.default, (zs, list(zt), y, gs_cl, emb, 3.0, 1e-8)),
        (op.agent_stats.default, (zs, list(zt), y, [], [], 4.0, 1e-8)),
    ]


OPCHECK_IDS = [
    "logit_kd", "feature_kd", "feature_kd-channels_last", "feature_kd-embeddings",
    "feature_kd-channels_last-embeddings",
    "pooled_cosine", "pooled_cosine_backward-channels_last", "per_sample_loss_reward-features",
    "per_sample_loss_reward-logits_only", "agent_stats", "agent_stats-channels_last-T3", "agent_stats-no_maps",
]


@pytest.mark.parametrize("case", [pytest.param(i, id=name) for i, name in enumerate(OPCHECK_IDS)])
def test_opcheck(case):
    cases = _opcheck_cases()
    assert len(cases) == len(OPCHECK_IDS)
    op, args = cases[case]
    torch.library.opcheck(op, args)


def test_build_lists_the_fused_cpu_kernels():
    assert set(ops.OP_NAMES) <= set(mtkd_fast.build_info()["cpu_kernels"])


@pytest.mark.slow  # ~45 s cold: inductor compiles C++ around the custom ops
def test_torch_compile_runs_the_fused_loss():
    zs, zt, y, wl = logit_inputs(6, 12, 3, seed=16, dtype=torch.float32)
    gs, fs, wf = feature_inputs(6, [(4, 3, 3), (8, 2, 2), (2, 1, 3)], seed=17, dtype=torch.float32)
    wl, wf = wl.float(), wf.float()
    crit = MTKDLoss(backend="fused")

    def step(z, g):
        out = crit(z, zt, y, wl, g, fs, wf)
        return out.loss, out.per_sample_loss

    compiled = torch.compile(step, fullgraph=True)  # inductor: real codegen around the custom ops
    results = []
    for fn in (step, compiled):
        z = zs.clone().requires_grad_(True)
        g = [x.clone().requires_grad_(True) for x in gs]
        loss, per_sample = fn(z, g)
        loss.backward()
        results.append((loss, per_sample, z.grad, *[x.grad for x in g]))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)


# ------------------------------------------------------------------ errors name the argument


def test_bad_input_names_the_argument():
    zs, zt, y, w = logit_inputs(4, 6, 3, seed=18)
    with pytest.raises(ValueError, match="student_logits"):
        ops.mtkd_logit_kd(zs.long(), zt, y, w)
    with pytest.raises(ValueError, match="teacher_logits"):
        ops.mtkd_logit_kd(zs, zt[:, :3], y, w)
    with pytest.raises(ValueError, match=r"teacher_logits\[1\]"):
        ops.mtkd_logit_kd(zs, [zt[0], zt[1, :, :5]], y, w)
    with pytest.raises(ValueError, match="teacher_logits"):
        ops.mtkd_logit_kd(zs, zt[:1], y, w[:, :1])
    with pytest.raises(ValueError, match="weights"):
        ops.mtkd_logit_kd(zs, zt, y, w[:, :2])
    with pytest.raises(ValueError, match="targets"):
        ops.mtkd_logit_kd(zs, zt, y.int(), w)
    with pytest.raises(ValueError, match="targets"):
        ops.mtkd_logit_kd(zs, zt, torch.full_like(y, 6), w)
    with pytest.raises(ValueError, match="temperature"):
        ops.mtkd_logit_kd(zs, zt, y, w, temperature=0.0)
    gs, fs, wf = feature_inputs(4, [(3, 2, 2), (2, 2, 2)], seed=19)
    with pytest.raises(ValueError, match=r"teacher_maps\[1\]"):
        ops.mtkd_feature_kd(gs, [fs[0], fs[1][:, :1]], wf)
    with pytest.raises(ValueError, match="weights"):
        ops.mtkd_feature_kd(gs, fs, wf[:3])
    with pytest.raises(ValueError, match=r"teacher_embeddings\[0\]"):
        ops.pooled_cosine(gs, [torch.randn(4, 5, dtype=F64), torch.randn(4, 2, dtype=F64)])
    with pytest.raises(ValueError, match="logit_weights"):
        ops.per_sample_loss_and_reward(torch.rand(4, dtype=F64), torch.rand(4, 3, dtype=F64), w[:, :2])
    # the compiled op names its own argument too when called directly
    with pytest.raises(RuntimeError, match="weights"):
        torch.ops.mtkd_fast.logit_kd(zs, list(zt), y, w.float(), 4.0, 1.0)


def test_backward_twice_with_retained_graph_and_scaled_loss():
    # the saved gradient is handed out as is for an incoming gradient of 1: repeated backward passes and
    # accumulation into .grad must still be right
    zs, zt, y, w = logit_inputs(4, 9, 2, seed=20)
    gs, fs, wf = feature_inputs(4, [(3, 2, 2), (2, 1, 3)], seed=21)
    z = zs.clone().requires_grad_(True)
    g = [x.clone().requires_grad_(True) for x in gs]
    loss = ops.mtkd_logit_kd(z, zt, y, w).loss + ops.mtkd_feature_kd(g, fs, wf).loss
    loss.backward(retain_graph=True)
    loss.backward(retain_graph=True)
    (2.0 * loss).backward()
    exp, exp_grad = ref_logit(zs, zt, y, w, 4.0, 1.0)
    torch.testing.assert_close(z.grad, 4.0 * exp_grad)
    _, exp_grads = ref_feature(gs, fs, wf, 5.0)
    for a, b in zip(g, exp_grads):
        torch.testing.assert_close(a.grad, 4.0 * b)


def test_recycled_gradient_buffers_never_overwrite_a_live_gradient():
    # maps of >= 1 MiB get their gradient buffers from a pool (no page faults per step); a buffer someone
    # still holds (or views) must not be handed out again
    gs, fs, w = feature_inputs(8, [(64, 32, 32), (64, 32, 32)], seed=22)
    first = torch.ops.mtkd_fast.feature_kd(gs, fs, w, 5.0)[3]
    kept, view = first[0].clone(), first[1][:, :1]
    view_copy = view.clone()
    del first  # the first gradient's buffer is now free; the second's is still viewed
    for _ in range(3):
        gs2, fs2, w2 = feature_inputs(8, [(64, 32, 32), (64, 32, 32)], seed=23)
        second = torch.ops.mtkd_fast.feature_kd(gs2, fs2, w2, 5.0)[3]
        assert second[0].data_ptr() != view.data_ptr() and second[1].data_ptr() != view.data_ptr()
        torch.testing.assert_close(view, view_copy, rtol=0, atol=0)
        for g, e in zip(second, ref.feature_kd_grad(gs2, fs2, w2, 5.0)):
            torch.testing.assert_close(g, e)
    assert kept.abs().sum() > 0

# ------------------------------------------------------------------ every device: the walks the CUDA kernels take
# (written for the CUDA kernels, whose tiling these sizes exercise; run on the CPU kernels too)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
# On CUDA a row is split over chunks of >= 64 classes when B is small (a few per row up to ~2 blocks per SM):
# B = 1 and 8 with K = 1000 take many chunks, K = 1001 a short last chunk, K = 40 (B = 5) and K = 2 one chunk
# shorter than the minimum, K = 50000 and M = 32 many chunks, and B = 300 (which alone fills the GPU) with
# K = 3000, M = 8 chunks bounded by the shared memory the staged rows take.
@pytest.mark.parametrize("B,K,M", [(1, 2, 2), (3, 1001, 3), (64, 100, 5), (129, 1000, 8), (256, 10, 2),
                                   (1, 1000, 8), (8, 1000, 4), (5, 40, 2), (2, 50000, 3), (2, 4000, 32),
                                   (300, 3000, 8)])
@pytest.mark.parametrize("device", DEVICES, indirect=True)
def test_logit_kd_on_device_matches_reference(device, dtype, B, K, M):
    zs, zt, y, w = logit_inputs(B, K, M, seed=B + K + M, dtype=dtype)
    acc = F64 if dtype == F64 else torch.float32
    z = zs.to(device).requires_grad_(True)
    out = ops.mtkd_logit_kd(z, zt.to(device), y.to(device), w.to(device, acc), 3.0, 0.8)
    (grad,) = torch.autograd.grad(out.loss, z)
    z64 = zs.to(F64).requires_grad_(True)
    exp = ref.mtkd_logit_kd(z64, zt.to(F64), y, w, 3.0, 0.8)
    (exp_grad,) = torch.autograd.grad(exp.loss, z64)
    tol = STAT_TOL.get(dtype, 1e-4)
    for a, b in zip(out, exp):
        torch.testing.assert_close(a.cpu().to(F64), b, rtol=tol, atol=tol)
    rtol = GRAD_RTOL[dtype]
    torch.testing.assert_close(grad.cpu().to(F64), exp_grad, rtol=rtol, atol=rtol * exp_grad.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("device", DEVICES, indirect=True)
def test_logit_kd_on_device_masked_classes(device, dtype):
    # classes masked with -inf: a run of 300 in every row (whole CUDA chunks of -inf), one of 300 in teacher 1
    # only (its probability 0 there: no KL term); the statistics stay finite and match the reference
    zs, zt, y, w = logit_inputs(4, 1000, 3, seed=23, dtype=dtype)
    zs[:, 100:400] = float("-inf")
    zt[:, :, 100:400] = float("-inf")
    zt[1, :, 600:900] = float("-inf")
    y = torch.tensor([0, 450, 999, 550])  # classes no row masks (a masked target has an infinite cross-entropy)
    acc = F64 if dtype == F64 else torch.float32
    z = zs.to(device).requires_grad_(True)
    out = ops.mtkd_logit_kd(z, zt.to(device), y.to(device), w.to(device, acc), 3.0, 0.8)
    (grad,) = torch.autograd.grad(out.loss, z)
    exp = ref.mtkd_logit_kd(zs.to(F64), zt.to(F64), y, w, 3.0, 0.8)
    exp_grad = ref.logit_kd_grad(zs.to(F64), zt.to(F64), y, w, 3.0, 0.8)
    assert all(bool(torch.isfinite(t).all()) for t in (*out, grad))
    tol = STAT_TOL.get(dtype, 1e-4)
    for a, b in zip(out, exp):
        torch.testing.assert_close(a.cpu().to(F64), b, rtol=tol, atol=tol)
    assert bool((grad[:, 100:400] == 0).all())  # p^1 = p^T = 0 for the student and every teacher there
    rtol = GRAD_RTOL[dtype]
    torch.testing.assert_close(grad.cpu().to(F64), exp_grad, rtol=rtol, atol=rtol * exp_grad.abs().max().item())


@pytest.mark.parametrize("device", DEVICES, indirect=True)
def test_logit_kd_on_device_large_logits_float16(device):
    zs, zt, y, w = logit_inputs(9, 100, 3, seed=1, dtype=F64, scale=1.0)
    zs, zt = (1e4 * zs.clamp(-1, 1)).half(), (1e4 * zt.clamp(-1, 1)).half()
    out = ops.mtkd_logit_kd(zs.to(device), zt.to(device), y.to(device), w.float().to(device), 2.0)
    exp = ref.mtkd_logit_kd(zs.double(), zt.double(), y, w, 2.0)
    for a, b in zip(out, exp):
        assert bool(torch.isfinite(a).all())
        torch.testing.assert_close(a.cpu().double(), b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("device", DEVICES, indirect=True)
def test_feature_kd_on_device_matches_reference(device, dtype, channels_last):
    # multi-chunk, odd, tiny (unvectorised) maps
    shapes = [(64, 8, 8), (48, 7, 7), (5, 3, 1), (3, 2, 2)]
    _check_feature_kd_on_device(device, dtype, channels_last, gen(2), 33, shapes)


def _check_feature_kd_on_device(device, dtype, channels_last, g, B, shapes):
    """mtkd_feature_kd on ``device`` against the float64 reference: every output, every gradient and its strides."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    gs = [torch.randn(B, *s, generator=g, dtype=F64).to(dtype).contiguous(memory_format=fmt) for s in shapes]
    fs = [torch.randn(B, *s, generator=g, dtype=F64).to(dtype).contiguous(memory_format=fmt) for s in shapes]
    w = torch.rand(B, len(shapes), generator=g, dtype=F64)
    acc = F64 if dtype == F64 else torch.float32
    gd = [x.to(device).requires_grad_(True) for x in gs]
    out = ops.mtkd_feature_kd(gd, [f.to(device) for f in fs], w.to(device, acc), 5.0)
    grads = torch.autograd.grad(out.loss, gd)
    exp, exp_grads = ref_feature(gs, fs, w, 5.0)
    tol = STAT_TOL.get(dtype, 1e-4)
    for name, a, b in zip(out._fields, out, exp):
        torch.testing.assert_close(a.cpu().to(F64), b, rtol=tol, atol=tol, msg=lambda m: f"{name}: {m}")
    rtol = GRAD_RTOL[dtype]
    for a, b, x in zip(grads, exp_grads, gd):
        assert a.stride() == x.stride()
        torch.testing.assert_close(a.cpu().to(F64), b, rtol=rtol, atol=rtol * b.abs().max().item())


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("device", DEVICES, indirect=True)
def test_pooled_cosine_on_device_matches_reference(device, channels_last):
    g = gen(3)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    shapes = [(300, 4, 4), (16, 7, 7), (3, 1, 2)]
    gs = [torch.randn(5, *s, generator=g, dtype=F64).contiguous(memory_format=fmt) for s in shapes]
    emb = [torch.randn(5, s[0], generator=g, dtype=F64) for s in shapes]
    gd = [x.to(device).requires_grad_(True) for x in gs]
    ed = [e.to(device).requires_grad_(True) for e in emb]
    out = ops.pooled_cosine(gd, ed)
    up = torch.randn(out.shape, generator=g, dtype=F64)
    got = torch.autograd.grad((out * up.to(device)).sum(), gd + ed)
    gs = [x.requires_grad_(True) for x in gs]
    emb = [e.requires_grad_(True) for e in emb]
    exp = ref.pooled_cosine(gs, emb)
    want = torch.autograd.grad((exp * up).sum(), gs + emb)
    torch.testing.assert_close(out.cpu(), exp)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.cpu(), b)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("device", DEVICES, indirect=True)
def test_feature_kd_and_cosine_on_device_matches_reference(device, dtype, channels_last):
    # every walk of the kernel: warp rows (short NCHW rows), block rows (rows > 1024 values), channels_last
    # with several channel groups per sample, and 1x1 maps
    g = gen(6)
    B = 17
    shapes = [(600, 4, 4), (40, 7, 7), (3, 40, 40), (300, 1, 1), (5, 3, 1)]
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    gs = [torch.randn(B, *s, generator=g, dtype=F64).to(dtype).contiguous(memory_format=fmt) for s in shapes]
    fs = [torch.randn(B, *s, generator=g, dtype=F64).to(dtype).contiguous(memory_format=fmt) for s in shapes]
    emb = [torch.randn(B, s[0], generator=g, dtype=F64) for s in shapes]
    emb[0][3].zero_()
    w = torch.rand(B, len(shapes), generator=g, dtype=F64)
    acc = F64 if dtype == F64 else torch.float32
    gd = [x.to(device).requires_grad_(True) for x in gs]
    loss, mse, cos = ops.feature_kd_and_cosine(gd, [f.to(device) for f in fs],
                                               w.to(device, acc), 5.0, [e.to(device) for e in emb])
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
@pytest.mark.parametrize("device", DEVICES, indirect=True)
def test_per_sample_loss_and_reward_on_device(device, B):
    g = gen(B)
    sce, kl, wl, mse, wf = (torch.rand(B, generator=g, dtype=F64),) + tuple(torch.rand(B, 3, generator=g, dtype=F64)
                                                                            for _ in range(4))
    out = ops.per_sample_loss_and_reward(*(t.to(device) for t in (sce, kl, wl, mse, wf)), alpha=0.5, beta=3.0)
    exp = ref.per_sample_loss(sce, kl, wl, mse, wf, 0.5, 3.0)
    torch.testing.assert_close(out.per_sample_loss.cpu(), exp)
    torch.testing.assert_close(out.reward.cpu(), ref.normalized_reward(exp))


@pytest.mark.parametrize("device", DEVICES, indirect=True)
def test_mtkd_loss_opcheck_and_module_on_device(device):
    zs, zt, y, w = logit_inputs(3, 7, 2, seed=5, dtype=torch.float32)
    z = zs.to(device).requires_grad_(True)
    torch.library.opcheck(torch.ops.mtkd_fast.logit_kd.default, (z, list(zt.to(device)), y.to(device),
                                                                 w.float().to(device), 4.0, 1.0))
    gs = [torch.randn(3, 4, 2, 2, device=device, requires_grad=True),
          torch.randn(3, 2, 3, 1, device=device, requires_grad=True)]
    fs = [torch.randn_like(x) for x in gs]
    torch.library.opcheck(torch.ops.mtkd_fast.feature_kd.default, (gs, fs, w.float().to(device), 5.0))
    emb = [torch.randn(3, 4, device=device, requires_grad=True), torch.randn(3, 2, device=device, requires_grad=True)]
    torch.library.opcheck(torch.ops.mtkd_fast.pooled_cosine.default, (gs, emb, 1e-8))
    torch.library.opcheck(torch.ops.mtkd_fast.feature_kd.default,
                          (gs, fs, w.float().to(device), 5.0, [e.detach() for e in emb], 1e-8))
    gs_cl = [x.detach().contiguous(memory_format=torch.channels_last).requires_grad_(True) for x in gs]
    fs_cl = [x.contiguous(memory_format=torch.channels_last) for x in fs]
    torch.library.opcheck(torch.ops.mtkd_fast.feature_kd.default,
                          (gs_cl, fs_cl, w.float().to(device), 5.0, [e.detach() for e in emb], 1e-8))
    torch.library.opcheck(torch.ops.mtkd_fast.per_sample_loss_reward.default,
                          (torch.rand(3, device=device), torch.rand(3, 2, device=device),
                           w.float().to(device), None, None, 1.0, 5.0))
    assert MTKDLoss().resolve_backend(torch.device(device)) == "fused"


# ------------------------------------------------------------------ agent_stats and the reworked walks

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("B,K,shapes", DEVICE_STATS_CASES)
@pytest.mark.parametrize("device", DEVICES, indirect=True)
def test_agent_stats_on_device_matches_reference(device, dtype, channels_last, B, K, shapes):
    zs, zt, y, _ = logit_inputs(B, K, len(shapes), seed=B + K, dtype=dtype)
    g = gen(B)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    gs = [torch.randn(B, *s, generator=g, dtype=F64).to(dtype).contiguous(memory_format=fmt) for s in shapes]
    acc = F64 if dtype == F64 else torch.float32
    emb = [torch.randn(B, s[0], generator=g, dtype=F64).to(acc) for s in shapes]
    out = ops.agent_stats(zs.to(device), zt.to(device), y.to(device), [x.to(device) for x in gs],
                          [e.to(device) for e in emb])
    exp = ref.agent_stats(zs.to(F64), zt.to(F64), y, [x.to(F64) for x in gs], [e.to(F64) for e in emb])
    tol = 1e-10 if dtype == F64 else 1e-4  # float32 accumulation on the same rounded inputs
    for name, a, b in zip(out._fields, out, exp):
        assert a.dtype == acc and a.device.type == torch.device(device).type
        torch.testing.assert_close(a.cpu().to(F64), b, rtol=tol, atol=tol, msg=lambda m: f"{name}: {m}")
    none = ops.agent_stats(zs.to(device), zt.to(device), y.to(device), None, None)
    assert torch.equal(none.cos.cpu(), torch.zeros(B, len(shapes), dtype=acc))


@pytest.mark.parametrize("device", DEVICES, indirect=True)
def test_agent_stats_opcheck_on_device(device):
    zs, zt, y, _ = logit_inputs(3, 7, 2, seed=7, dtype=torch.float32)
    gs = [torch.randn(3, 4, 2, 2, device=device),
          torch.randn(3, 2, 3, 1, device=device).contiguous(memory_format=torch.channels_last)]
    emb = [torch.randn(3, 4, device=device), torch.randn(3, 2, device=device)]
    torch.library.opcheck(torch.ops.mtkd_fast.agent_stats.default,
                          (zs.to(device), list(zt.to(device)), y.to(device), gs, emb, 4.0, 1e-8))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("device", DEVICES, indirect=True)
def test_feature_kd_channels_last_small_c_large_maps_on_device(device, dtype):
    # the channels_last walk with the cosine: few channels over many pixels (rows of threads split the pixels)
    B, shapes = 3, [(5, 40, 41), (64, 23, 19), (300, 3, 3)]
    g = gen(8)
    gs = [torch.randn(B, *s, generator=g, dtype=F64).to(dtype).contiguous(memory_format=torch.channels_last)
          for s in shapes]
    fs = [torch.randn(B, *s, generator=g, dtype=F64).to(dtype).contiguous(memory_format=torch.channels_last)
          for s in shapes]
    emb = [torch.randn(B, s[0], generator=g, dtype=F64).float() for s in shapes]
    w = torch.rand(B, 3, generator=g, dtype=F64).float()
    loss, mse, cos = ops.feature_kd_and_cosine([x.to(device) for x in gs], [f.to(device) for f in fs], w.to(device),
                                               5.0, [e.to(device) for e in emb])
    g64 = [x.double() for x in gs]
    torch.testing.assert_close(mse.cpu().double(), ref.feature_mse_per_sample(g64, [f.double() for f in fs]),
                               rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(cos.cpu().double(), ref.pooled_cosine(g64, [e.double() for e in emb]),
                               rtol=1e-4, atol=1e-5)



@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("device", DEVICES, indirect=True)
def test_feature_kd_on_device_multi_chunk_flat_walk(device, dtype, channels_last):
    # the flat walk (no cosine) takes kChunk = 8192 values of a sample per CUDA block: 17995 values are three
    # chunks with a short last one (odd: the scalar loop), 18496 three vectorised ones, 15 a single short one
    _check_feature_kd_on_device(device, dtype, channels_last, gen(11), 2, [(5, 61, 59), (64, 17, 17), (1, 3, 5)])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("device", DEVICES, indirect=True)
def test_logit_kd_on_device_chunk_max_underflows_against_the_row_max(device, dtype):
    # classes 130-519 sit 1000 below the rest: on CUDA (B = 2, K = 1000: chunks of ~63 classes) whole chunks
    # whose own sums are fine but whose weight exp(chunk max - row max) underflows to 0 in the merge; teacher 1
    # has them in row 1 only
    zs, zt, y, w = logit_inputs(2, 1000, 3, seed=31, dtype=F64)
    zs[:, 130:520] -= 1000.0
    zt[0, :, 130:520] -= 1000.0
    zt[1, 1, 130:520] -= 1000.0
    zs, zt = zs.to(dtype), zt.to(dtype)
    y = torch.tensor([7, 999])
    acc = F64 if dtype == F64 else torch.float32
    z = zs.to(device).requires_grad_(True)
    out = ops.mtkd_logit_kd(z, zt.to(device), y.to(device), w.to(device, acc), 3.0, 0.8)
    (grad,) = torch.autograd.grad(out.loss, z)
    exp, exp_grad = ref_logit(zs, zt, y, w, 3.0, 0.8)
    assert all(bool(torch.isfinite(t).all()) for t in (*out, grad))
    tol = STAT_TOL.get(dtype, 1e-4)
    assert_stats_close(out, exp, rtol=tol, atol=tol)
    rtol = GRAD_RTOL[dtype]
    torch.testing.assert_close(grad.cpu().to(F64), exp_grad, rtol=rtol, atol=rtol * exp_grad.abs().max().item())
    stats = ops.agent_stats(zs.to(device), zt.to(device), y.to(device), None, None, 3.0)
    exp_stats = ref_stats(zs, zt, y, None, None, 3.0)
    torch.testing.assert_close(stats.kl.cpu().to(F64), exp_stats.kl, rtol=tol, atol=tol)
    torch.testing.assert_close(stats.teacher_ce.cpu().to(F64), exp_stats.teacher_ce, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("device", DEVICES, indirect=True)
def test_pooled_cosine_and_agent_stats_on_device_split_over_channel_blocks(device, dtype, channels_last):
    # on CUDA the forward cosine splits a (sample, teacher) over blocks of channels (about 8192 values each,
    # or 256 channels channels_last) whose last block adds up the terms: 700 x 4 x 4 is two NCHW blocks of 350
    # channels, 512 channels two channels_last blocks of 256 (a thread per channel), 97 x 93 pixels a block per
    # channel; 5 x 1 x 1 one block
    g = gen(12)
    B, shapes = 3, [(700, 4, 4), (512, 2, 3), (2, 97, 93), (5, 1, 1)]
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    gs = [torch.randn(B, *s, generator=g, dtype=F64).to(dtype).contiguous(memory_format=fmt) for s in shapes]
    emb = [torch.randn(B, s[0], generator=g, dtype=F64).to(dtype) for s in shapes]
    zs, zt, y, _ = logit_inputs(B, 10, len(shapes), seed=12, dtype=dtype)
    tol = STAT_TOL.get(dtype, 1e-5)
    want = ref.pooled_cosine([x.to(F64) for x in gs], [e.to(F64) for e in emb])
    gd = [x.to(device).requires_grad_(True) for x in gs]
    ed = [e.to(device).requires_grad_(True) for e in emb]
    cos = ops.pooled_cosine(gd, ed)
    torch.testing.assert_close(cos.cpu().to(F64), want, rtol=tol, atol=tol)
    stats = ops.agent_stats(zs.to(device), zt.to(device), y.to(device), [x.to(device) for x in gs],
                            [e.to(device) for e in emb])
    torch.testing.assert_close(stats.cos.cpu().to(F64), want, rtol=tol, atol=tol)
    up = torch.randn(B, len(shapes), generator=g, dtype=F64)
    got = torch.autograd.grad((cos * up.to(device, cos.dtype)).sum(), gd + ed)
    g64 = [x.to(F64).requires_grad_(True) for x in gs]
    e64 = [e.to(F64).requires_grad_(True) for e in emb]
    exp = torch.autograd.grad((ref.pooled_cosine(g64, e64) * up).sum(), g64 + e64)
    for a, b in zip(got, exp):
        torch.testing.assert_close(a.cpu().to(F64), b, rtol=tol, atol=tol * b.abs().max().item())


def _torch_logit_stats(zs, zt, y, T):
    """KL [B, M], teacher CE [B, M] and student CE [B] by plain float64 torch: a teacher probability of exactly 0
    contributes 0 to the KL (even where the student's is 0 too), a NaN or +inf logit makes its row's values NaN."""
    zs, zt = zs.to(F64), zt.to(F64)
    log_ps = torch.log_softmax(zs / T, -1)
    pt = torch.softmax(zt / T, -1)
    kl = T * T * torch.where(pt == 0, 0.0, pt * (torch.log(pt) - log_ps)).sum(-1).t()
    tce = -torch.log_softmax(zt, -1).gather(2, y.expand(zt.shape[0], -1).unsqueeze(2)).squeeze(2).t()
    sce = -torch.log_softmax(zs, -1).gather(1, y[:, None]).squeeze(1)
    return kl, tce, sce


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("device", [p for p in DEVICES if p.values[0] != "cpu"], indirect=True)
def test_non_finite_logits_give_nan_rows_on_device(device, dtype):
    # "mask only exact zeros" (issue 23): -inf logits are probabilities of 0 (finite statistics); a NaN or +inf
    # logit makes its row's KL/CE NaN, as plain torch does. K = 128, B = 6: on CUDA (>= 6 SMs) each row is two
    # chunks of 64 classes. Row 0: teacher 0's second chunk all NaN (its max is -inf: max drops NaN, like an
    # all -inf chunk's), the first finite; row 1: one NaN in teacher 1; row 2: +inf in the student; row 3: +inf
    # in teacher 0; row 4: -inf classes, teacher 1's second chunk all -inf; row 5: untouched. The CPU kernels:
    # issue 23's tests.
    zs, zt, y, w = logit_inputs(6, 128, 2, seed=41, dtype=F64)
    zt[0, 0, 64:] = float("nan")
    zt[1, 1, 17] = float("nan")
    zs[2, 5] = float("inf")
    zt[0, 3, 90] = float("inf")
    zs[4, 70:80] = float("-inf")
    zt[0, 4, 60:100] = float("-inf")
    zt[1, 4, 64:] = float("-inf")
    y = torch.tensor([1, 2, 3, 4, 5, 6])
    zs, zt = zs.to(dtype), zt.to(dtype)
    want_kl, want_tce, want_sce = _torch_logit_stats(zs, zt, y, 3.0)
    assert bool(want_kl[4].isfinite().all()) and bool(want_kl[[0, 1, 2, 3], [0, 1, 0, 0]].isnan().all())
    acc = F64 if dtype == F64 else torch.float32
    args = (zs.to(device), list(zt.to(device)), y.to(device))
    loss, kl, tce, sce, _ = torch.ops.mtkd_fast.logit_kd(*args, w.to(device, acc), 3.0, 0.8)
    stats = torch.ops.mtkd_fast.agent_stats(*args, [], [], 3.0, 1e-8)
    tol = STAT_TOL.get(dtype, 1e-4)
    for name, got, want in [("kl", kl, want_kl), ("teacher_ce", tce, want_tce), ("student_ce", sce, want_sce),
                            ("agent_stats kl", stats[0], want_kl), ("agent_stats teacher_ce", stats[1], want_tce)]:
        torch.testing.assert_close(got.cpu().to(F64), want, rtol=tol, atol=tol, equal_nan=True,
                                   msg=lambda m: f"{name}: {m}")
    assert bool(loss.isnan())


# ------------------------------------------------------------------ CUDA only: launch counts, shared memory, devices


def _cuda_kernels(fn):
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
            and "Memset" not in e.name and "Memcpy" not in e.name]


@pytest.mark.parametrize("device", CUDA_ONLY)
def test_one_kernel_launch_per_op(device):
    # the raw ops (the Python API adds argument checks, e.g. the target range, which launch reductions)
    zs, zt, y, w = logit_inputs(64, 100, 4, seed=4, dtype=torch.float32)
    gs = [torch.randn(64, c, 8, 8, device=device) for c in (384, 384, 256, 256)]
    fs = [torch.randn_like(x) for x in gs]
    emb = [torch.randn(64, c, device=device) for c in (384, 384, 256, 256)]
    w = w.float().to(device)
    op = torch.ops.mtkd_fast
    calls = {
        "logit_kd": lambda: op.logit_kd(zs.to(device), list(zt.to(device)), y.to(device), w, 4.0, 1.0),
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


@pytest.mark.parametrize("device", CUDA_ONLY)
def test_logit_kd_cuda_repeated_calls_are_bitwise_equal(device):
    # B = 8, K = 1000: each row split over several blocks whose records the row's last block merges; fresh
    # arrival counters per call and fixed reduction orders give the same bits whichever block finishes last
    zs, zt, y, w = logit_inputs(8, 1000, 4, seed=24, dtype=torch.float32)
    args = (zs.to(device), list(zt.to(device)), y.to(device), w.float().to(device), 4.0, 1.0)
    first = torch.ops.mtkd_fast.logit_kd(*args)
    for _ in range(3):
        for a, b in zip(torch.ops.mtkd_fast.logit_kd(*args), first):
            assert torch.equal(a, b)


@pytest.mark.parametrize("device", CUDA_ONLY)
def test_agent_stats_cuda_one_launch_per_tensor_family(device):
    zs, zt, y, _ = logit_inputs(64, 100, 4, seed=6, dtype=torch.float32)
    zs, zt, y = zs.to(device), list(zt.to(device)), y.to(device)
    gs = [torch.randn(64, c, 8, 8, device=device) for c in (384, 384, 256, 256)]
    emb = [torch.randn(64, c, device=device) for c in (384, 384, 256, 256)]
    op = torch.ops.mtkd_fast.agent_stats
    assert len(_cuda_kernels(lambda: op(zs, zt, y, gs, emb, 4.0, 1e-8))) == 2
    assert len(_cuda_kernels(lambda: op(zs, zt, y, [], [], 4.0, 1e-8))) == 1


@pytest.mark.parametrize("device", CUDA_ONLY)
def test_pooled_cosine_backward_checks_the_device_of_grad(device):
    gs = [torch.randn(2, 3, 2, 2, device=device)]
    emb = [torch.randn(2, 3, device=device)]
    with pytest.raises(RuntimeError, match="grad: expected device"):
        torch.ops.mtkd_fast.pooled_cosine_backward(torch.ones(2, 1), gs, emb, 1e-8)


@pytest.mark.parametrize("device", CUDA_ONLY)
def test_pooled_cosine_channel_bound_counts_static_shared_memory(device):
    # the forward keeps no channel means (any C); the backward keeps C of them next to its static arrays:
    # a C just under the old bound (48 KiB / 4 bytes) is refused with a clear error instead of a failed launch
    g = torch.randn(2, 12280, 1, 1, device=device, requires_grad=True)
    e = torch.randn(2, 12280, device=device)
    out = ops.pooled_cosine([g], [e])
    torch.testing.assert_close(out.cpu().double(), ref.pooled_cosine([g.detach().cpu().double()], [e.cpu().double()]),
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="channels for the CUDA pooled_cosine backward"):
        out.sum().backward()
