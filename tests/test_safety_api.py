"""Odd values at the Python API: non-finite or non-positive temperature, negative loss weights and teacher
weights, empty batches and empty maps give a clear error naming the argument (the same on the fused CPU ops, the
reference and MTKDLoss); a NaN per-sample loss is an error under check_finite and never zeroes the other
samples' rewards."""

import math

import pytest
import torch

from mtkd_fast import MTKDLoss, ops, reference
from mtkd_fast.agent import normalized_reward

G = torch.Generator().manual_seed(13)
B, M, K = 5, 3, 7


def _logits():
    s = torch.randn(B, K, generator=G, dtype=torch.float64)
    t = torch.randn(M, B, K, generator=G, dtype=torch.float64)
    y = torch.randint(0, K, (B,), generator=G)
    w = torch.rand(B, M, generator=G, dtype=torch.float64)
    return s, t, y, w


def _maps(b=B, c=3, h=4, w=5):
    g = [torch.randn(b, c, h, w, generator=G, dtype=torch.float64) for _ in range(M)]
    f = [torch.randn(b, c, h, w, generator=G, dtype=torch.float64) for _ in range(M)]
    return g, f, torch.rand(b, M, generator=G, dtype=torch.float64)


IMPLS = [reference, pytest.param(ops, marks=pytest.mark.skipif(not ops.available("cpu"), reason="no extension"))]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("temperature", [math.inf, math.nan, 0.0, -1.0, 1e30])
def test_temperature_finite_positive(impl, temperature):
    s, t, y, w = _logits()
    with pytest.raises(ValueError, match=r"temperature: expected a number in \[0.01, 100\]"):
        impl.mtkd_logit_kd(s, t, y, w, temperature)
    with pytest.raises(ValueError, match="temperature"):
        MTKDLoss(temperature)


@pytest.mark.parametrize("impl", IMPLS)
def test_negative_weights_and_scales_refused(impl):
    s, t, y, w = _logits()
    with pytest.raises(ValueError, match="weights: expected non-negative teacher weights"):
        impl.mtkd_logit_kd(s, t, y, w - 0.75)
    with pytest.raises(ValueError, match="alpha: expected a finite non-negative number"):
        impl.mtkd_logit_kd(s, t, y, w, 4.0, -1.0)
    g, f, wf = _maps()
    with pytest.raises(ValueError, match="beta: expected a finite non-negative number"):
        impl.mtkd_feature_kd(g, f, wf, -5.0)
    with pytest.raises(ValueError, match="weights: expected non-negative"):
        impl.mtkd_feature_kd(g, f, -wf)
    for bad in ({"beta": -1.0}, {"alpha": -0.5}, {"beta": math.inf}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            MTKDLoss(**bad)
    with pytest.raises(ValueError, match="logit_weights: expected non-negative"):
        MTKDLoss(backend="reference")(s, t, y, -w)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", [(0, 3, 4, 5), (B, 0, 4, 5), (B, 3, 0, 5), (B, 3, 4, 0)])
def test_empty_maps_clear_error(impl, shape):
    g, f, wf = _maps(*shape)
    with pytest.raises(ValueError, match=r"student_maps\[0\]: expected a non-empty map"):
        impl.mtkd_feature_kd(g, f, wf)


def test_nan_loss_does_not_zero_other_rewards():
    losses = torch.randn(9, generator=G, dtype=torch.float64)
    expect = normalized_reward(losses[1:])
    bad = losses.clone()
    bad[0] = math.nan
    got = normalized_reward(bad)
    assert got[0] == 0 and torch.isfinite(got).all()
    torch.testing.assert_close(got[1:], expect)
    assert float(got[1:].max()) > 0
    # inf too, and reference == agent's
    bad[0] = math.inf
    torch.testing.assert_close(reference.normalized_reward(bad)[1:], expect)
    # every loss NaN: all zero, no NaN
    assert torch.equal(normalized_reward(torch.full((4,), math.nan)), torch.zeros(4))


def test_nan_per_sample_loss_is_an_error_under_check_finite():
    s, t, y, w = (x.float() if x.is_floating_point() else x for x in _logits())
    s = s * 1e38  # finite inputs whose T^2-scaled KL overflows float32: per-sample loss inf/NaN
    assert torch.isfinite(s).all()
    out = MTKDLoss(backend="reference")(s, t, y, w)
    assert not torch.isfinite(out.per_sample_loss).all()
    with pytest.raises(ValueError, match="per_sample_loss: expected finite values"):
        MTKDLoss(backend="reference", check_finite=True)(s, t, y, w)


@pytest.mark.skipif(not ops.available("cpu"), reason="needs the compiled extension")
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_fused_reward_leaves_non_finite_losses_out_like_the_reference(bad):
    """The trainer's reward comes from the fused op: one NaN/Inf sample must not zero the others'."""
    B, M = 11, 3
    sce = torch.rand(B, generator=G, dtype=torch.float64) * 3
    kl = torch.rand(B, M, generator=G, dtype=torch.float64) * 2
    wl = torch.softmax(torch.randn(B, M, generator=G, dtype=torch.float64), 1)
    mse = torch.rand(B, M, generator=G, dtype=torch.float64)
    wf = torch.softmax(torch.randn(B, M, generator=G, dtype=torch.float64), 1)
    sce[4] = bad
    loss, reward = ops.per_sample_loss_and_reward(sce, kl, wl, mse, wf, 1.0, 5.0)
    expect = reference.normalized_reward(reference.per_sample_loss(sce, kl, wl, mse, wf, 1.0, 5.0))
    assert reward[4] == 0 and torch.isfinite(reward).all() and float(reward.max()) > 0
    torch.testing.assert_close(reward, expect, rtol=1e-12, atol=1e-12)
