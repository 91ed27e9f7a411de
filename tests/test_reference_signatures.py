"""mtkd_fast.reference mirrors mtkd_fast.ops: same signatures and result fields, so callers (MTKDLoss, distill_step)
pick a module instead of branching; the reference twins of the fused-only functions match the fused ops."""

import inspect
import typing

import pytest
import torch

from mtkd_fast import ops
from mtkd_fast import reference as ref

DT = torch.float64
needs_ext = pytest.mark.skipif(not ops.available("cpu"), reason="needs the compiled extension")

OP_FUNCTIONS = sorted(n for n in ops.__all__ if inspect.isfunction(getattr(ops, n)) and n != "available")


def _params(fn):
    return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]


def _fields(fn):
    ret = typing.get_type_hints(fn, globalns=vars(inspect.getmodule(fn))).get("return")
    return getattr(ret, "_fields", None)


def test_every_fused_function_has_a_reference_twin():
    missing = [n for n in OP_FUNCTIONS if not inspect.isfunction(getattr(ref, n, None))]
    assert not missing, f"mtkd_fast.reference lacks {missing}"
    assert set(OP_FUNCTIONS) <= set(ref.__all__)


@pytest.mark.parametrize("name", OP_FUNCTIONS)
def test_twins_share_signature_and_result_fields(name):
    fused, twin = getattr(ops, name), getattr(ref, name)
    assert _params(fused) == _params(twin)
    assert _fields(fused) == _fields(twin)


def test_result_namedtuples_are_shared():
    for name in ("AgentStats", "LogitKDOutput", "FeatureKDOutput", "RewardOutput"):
        assert getattr(ops, name) is getattr(ref, name)


def _maps(B, M, seed, channels_last):
    g = torch.Generator().manual_seed(seed)
    shapes = [(5, 3, 3), (7, 2, 5), (3, 1, 1)][:M]
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    gs = [torch.randn(B, *s, generator=g, dtype=DT).contiguous(memory_format=fmt).requires_grad_() for s in shapes]
    fs = [torch.randn(B, *s, generator=g, dtype=DT).contiguous(memory_format=fmt) for s in shapes]
    emb = [torch.randn(B, s[0], generator=g, dtype=DT) for s in shapes]
    w = torch.rand(B, M, generator=g, dtype=DT)
    return gs, fs, emb, w


@needs_ext
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("with_embeddings", [False, True])
@pytest.mark.parametrize("B,M", [(1, 2), (3, 3), (7, 2)])
def test_feature_kd_and_cosine_matches_fused(B, M, with_embeddings, channels_last):
    gs, fs, emb, w = _maps(B, M, seed=B * 10 + M, channels_last=channels_last)
    out = {}
    for mod in (ops, ref):
        maps = [g.detach().clone(memory_format=torch.preserve_format).requires_grad_() for g in gs]
        loss, mse, cos = mod.feature_kd_and_cosine(maps, fs, w, 3.0, emb if with_embeddings else None)
        loss.backward()
        out[mod] = loss, mse, cos, [g.grad for g in maps]
    (fl, fm, fc, fg), (rl, rm, rc, rg) = out[ops], out[ref]
    torch.testing.assert_close(fl, rl, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(fm, rm, rtol=1e-10, atol=1e-12)
    for a, b in zip(fg, rg):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    if with_embeddings:
        torch.testing.assert_close(fc, rc, rtol=1e-10, atol=1e-12)
        assert not rc.requires_grad
    else:
        assert fc is None and rc is None


@needs_ext
@pytest.mark.parametrize("with_maps", [False, True])
@pytest.mark.parametrize("B,M", [(1, 2), (5, 3), (33, 2)])
def test_per_sample_loss_and_reward_matches_fused(B, M, with_maps):
    g = torch.Generator().manual_seed(B + M)
    sce = torch.rand(B, generator=g, dtype=DT) * 3
    kl = torch.rand(B, M, generator=g, dtype=DT)
    wl = torch.rand(B, M, generator=g, dtype=DT)
    mse = torch.rand(B, M, generator=g, dtype=DT) if with_maps else None
    wf = torch.rand(B, M, generator=g, dtype=DT) if with_maps else None
    out = {}
    for mod in (ops, ref):
        s, k = sce.clone().requires_grad_(), kl.clone().requires_grad_()
        res = mod.per_sample_loss_and_reward(s, k, wl, mse, wf, 0.7, 2.0)
        assert res._fields == ("per_sample_loss", "reward")
        res.per_sample_loss.sum().backward()
        assert not res.reward.requires_grad
        out[mod] = res, s.grad, k.grad
    for a, b in zip(out[ops], out[ref]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
