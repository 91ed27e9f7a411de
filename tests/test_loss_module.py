"""MTKDLoss (reference backend here; the fused backend is tested against it in test_ops)."""

import pytest
import torch

from mtkd_fast import MTKDLoss
from mtkd_fast import reference as ref

DT = torch.float64


def _inputs(B=5, K=9, M=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    zs = torch.randn(B, K, generator=g, dtype=DT, requires_grad=True)
    zt = torch.randn(M, B, K, generator=g, dtype=DT)
    y = torch.randint(0, K, (B,), generator=g)
    wl, wf = torch.rand(B, M, generator=g, dtype=DT), torch.rand(B, M, generator=g, dtype=DT)
    shapes = [(4, 3, 3), (6, 2, 2), (3, 1, 2)][:M]
    gs = [torch.randn(B, *s, generator=g, dtype=DT, requires_grad=True) for s in shapes]
    fs = [torch.randn(B, *s, generator=g, dtype=DT) for s in shapes]
    emb = [torch.randn(B, s[0], generator=g, dtype=DT) for s in shapes]
    return zs, zt, y, wl, wf, gs, fs, emb


def test_reference_backend_matches_the_formulas():
    zs, zt, y, wl, wf, gs, fs, emb = _inputs()
    crit = MTKDLoss(temperature=3.0, alpha=0.5, beta=2.0, backend="reference")
    out = crit(zs, zt, y, wl, gs, fs, wf, emb)
    lo = ref.mtkd_logit_kd(zs, zt, y, wl, 3.0, 0.5)
    fo = ref.mtkd_feature_kd(gs, fs, wf, 2.0)
    torch.testing.assert_close(out.loss, lo.loss + fo.loss)
    torch.testing.assert_close(out.cos, ref.pooled_cosine(gs, emb))
    torch.testing.assert_close(out.per_sample_loss, ref.per_sample_loss(lo.student_ce, lo.kl, wl, fo.mse, wf, 0.5, 2.0))
    torch.testing.assert_close(out.per_sample_loss.mean(), out.loss)
    out.loss.backward()
    torch.testing.assert_close(zs.grad, ref.logit_kd_grad(zs.detach(), zt, y, wl, 3.0, 0.5))
    for g, e in zip(gs, ref.feature_kd_grad([g.detach() for g in gs], fs, wf, 2.0)):
        torch.testing.assert_close(g.grad, e)
    for t in (out.kl, out.teacher_ce, out.student_ce, out.mse, out.cos, out.per_sample_loss):
        assert not t.requires_grad


def test_logit_only_with_fixed_weights():
    zs, zt, y, *_ = _inputs(B=4, K=7, M=2)
    w = torch.full((4, 2), 0.5, dtype=DT)
    out = MTKDLoss(backend="reference")(zs, list(zt), y, w)
    assert out.mse is None and out.cos is None
    torch.testing.assert_close(out.loss, ref.mtkd_logit_kd(zs, zt, y, w).loss)


def test_bad_input_names_the_argument():
    zs, zt, y, wl, wf, gs, fs, emb = _inputs()
    crit = MTKDLoss(backend="reference", check_finite=True)
    with pytest.raises(ValueError, match="logit_weights"):
        crit(zs, zt, y, wl[:, :2])
    with pytest.raises(ValueError, match="feature_weights"):
        crit(zs, zt, y, wl, gs, fs)
    with pytest.raises(ValueError, match="student_maps: expected 3"):
        crit(zs, zt, y, wl, gs[:2], fs[:2], wf)
    bad = zt.clone()
    bad[1, 2, 3] = float("nan")
    with pytest.raises(ValueError, match="teacher_logits.*finite"):
        crit(zs, bad, y, wl)
    with pytest.raises(ValueError, match="backend"):
        MTKDLoss(backend="cuda")
