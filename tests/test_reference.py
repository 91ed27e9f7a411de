"""The reference maths (docs/method.md sections 2-6) against independent derivations, on random odd-sized inputs."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from mtkd_fast import reference as ref

DT = torch.float64
SIZES_B = [1, 3, 64]
SIZES_K = [2, 10, 100, 1000]
SIZES_M = [2, 3, 5]


def make_logits(B, K, M, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    zs = torch.randn(B, K, generator=g, dtype=DT) * scale
    zt = torch.randn(M, B, K, generator=g, dtype=DT) * scale
    y = torch.randint(0, K, (B,), generator=g)
    w = torch.rand(B, M, generator=g, dtype=DT)  # deliberately not summing to one
    return zs, zt, y, w


def make_maps(B, M, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(5, 3, 3), (7, 2, 4), (3, 1, 1), (6, 4, 2), (2, 5, 3)][:M]
    gs = [torch.randn(B, *s, generator=g, dtype=DT) for s in shapes]
    fs = [torch.randn(B, *s, generator=g, dtype=DT) for s in shapes]
    return gs, fs


# ----------------------------------------------------------------------------- section 2


@pytest.mark.parametrize("B,K,M", list(itertools.product(SIZES_B, SIZES_K, SIZES_M)))
def test_kl_matches_kl_div_and_is_nonnegative(B, K, M):
    zs, zt, _, _ = make_logits(B, K, M, seed=B * 7 + K + M)
    T = 4.0
    kl = ref.kl_per_sample(zs, zt, T)
    assert kl.shape == (B, M)
    # independent derivation: torch's kl_div with log-target, summed over classes
    expect = torch.stack(
        [F.kl_div(F.log_softmax(zs / T, 1), F.log_softmax(zt[m] / T, 1), log_target=True, reduction="none").sum(1)
         for m in range(M)], 1) * T * T
    torch.testing.assert_close(kl, expect, rtol=1e-10, atol=1e-12)
    assert (kl >= -1e-12).all()


def test_kl_zero_for_identical_logits_and_list_input_equals_stacked():
    zs, zt, _, _ = make_logits(3, 10, 3)
    same = torch.stack([zs, zs])
    torch.testing.assert_close(ref.kl_per_sample(zs, same), torch.zeros(3, 2, dtype=DT), atol=1e-12, rtol=0)
    torch.testing.assert_close(ref.kl_per_sample(zs, list(zt)), ref.kl_per_sample(zs, zt))


def test_kl_invariant_to_row_constants_and_scales_with_temperature_squared():
    zs, zt, _, _ = make_logits(3, 10, 2, seed=3)
    shift_s = torch.randn(3, 1, dtype=DT) * 50
    shift_t = torch.randn(2, 3, 1, dtype=DT) * 50
    torch.testing.assert_close(ref.kl_per_sample(zs + shift_s, zt + shift_t), ref.kl_per_sample(zs, zt))
    # T^2 factor: KL at temperature T of (zs, zt) equals T^2 * KL at T=1 of (zs/T, zt/T)
    T = 2.5
    torch.testing.assert_close(ref.kl_per_sample(zs, zt, T), T * T * ref.kl_per_sample(zs / T, zt / T, 1.0))


def test_kl_stable_for_huge_logits():
    zs, zt, _, _ = make_logits(4, 50, 3, seed=5)
    kl = ref.kl_per_sample(zs * 1e4, zt * 1e4)
    assert torch.isfinite(kl).all() and (kl >= 0).all()


@pytest.mark.parametrize("B,K,M", [(1, 2, 2), (3, 10, 3), (64, 1000, 5)])
def test_cross_entropies(B, K, M):
    zs, zt, y, _ = make_logits(B, K, M, seed=11)
    sce = ref.cross_entropy_per_sample(zs, y)
    expect = torch.logsumexp(zs, 1) - zs[torch.arange(B), y]
    torch.testing.assert_close(sce, expect)
    tce = ref.teacher_cross_entropy(zt, y)
    assert tce.shape == (B, M)
    for m in range(M):
        torch.testing.assert_close(tce[:, m], torch.logsumexp(zt[m], 1) - zt[m, torch.arange(B), y])


@pytest.mark.parametrize("B,M", list(itertools.product(SIZES_B, SIZES_M)))
def test_feature_mse_and_cosine(B, M):
    gs, fs = make_maps(B, M, seed=B + M)
    mse = ref.feature_mse_per_sample(gs, fs)
    assert mse.shape == (B, M)
    for m in range(M):
        n = gs[m][0].numel()
        for i in range(B):
            assert math.isclose(float(mse[i, m]), float(((gs[m][i] - fs[m][i]) ** 2).sum() / n), rel_tol=1e-12)
    emb = [torch.randn(B, g.shape[1], dtype=DT) for g in gs]
    cos = ref.pooled_cosine(gs, emb)
    for m in range(M):
        pooled = gs[m].sum(dim=(2, 3)) / (gs[m].shape[2] * gs[m].shape[3])
        expect = (pooled * emb[m]).sum(1) / (pooled.norm(dim=1) * emb[m].norm(dim=1))
        torch.testing.assert_close(cos[:, m], expect)
    assert (cos.abs() <= 1 + 1e-12).all()


# ----------------------------------------------------------------------------- section 3


@pytest.mark.parametrize("B,K,M", list(itertools.product(SIZES_B, SIZES_K, SIZES_M)))
def test_logit_loss_formula_and_closed_form_gradient(B, K, M):
    zs, zt, y, w = make_logits(B, K, M, seed=B + 3 * K + 5 * M)
    T, alpha = 4.0, 0.7
    zs.requires_grad_(True)
    out = ref.mtkd_logit_kd(zs, zt, y, w, T, alpha)
    kl, sce = out.kl, out.student_ce
    expect = sce.mean() + alpha * sum((w[:, m] * kl[:, m]).mean() for m in range(M))
    torch.testing.assert_close(out.loss, expect)
    (grad,) = torch.autograd.grad(out.loss, zs)
    closed = ref.logit_kd_grad(zs.detach(), zt, y, w, T, alpha)
    torch.testing.assert_close(closed, grad, rtol=1e-9, atol=1e-12)
    # the gradient of every row sums to zero (softmax differences)
    torch.testing.assert_close(grad.sum(1), torch.zeros(B, dtype=DT), atol=1e-12, rtol=0)


def test_logit_loss_gradcheck_and_weights_carry_no_gradient():
    zs, zt, y, w = make_logits(3, 7, 3, seed=2)
    zs.requires_grad_(True)
    zt.requires_grad_(True)
    w.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: ref.mtkd_logit_kd(a, b, y, w, 3.0, 1.3).loss, (zs, zt))
    loss = ref.mtkd_logit_kd(zs, zt, y, w).loss
    assert torch.autograd.grad(loss, w, allow_unused=True)[0] is None


@pytest.mark.parametrize("B,M", list(itertools.product(SIZES_B, SIZES_M)))
def test_feature_loss_formula_and_closed_form_gradient(B, M):
    gs, fs = make_maps(B, M, seed=B * M)
    w = torch.rand(B, M, dtype=DT)
    beta = 5.0
    gs = [g.requires_grad_(True) for g in gs]
    out = ref.mtkd_feature_kd(gs, fs, w, beta)
    torch.testing.assert_close(out.loss, beta * (w * out.mse).mean(0).sum())
    grads = torch.autograd.grad(out.loss, gs)
    for a, b in zip(ref.feature_kd_grad([g.detach() for g in gs], fs, w, beta), grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)


def test_feature_loss_gradcheck():
    gs, fs = make_maps(2, 3, seed=9)
    w = torch.rand(2, 3, dtype=DT)
    gs = [g.requires_grad_(True) for g in gs]
    assert torch.autograd.gradcheck(lambda *g: ref.mtkd_feature_kd(list(g), fs, w, 2.0).loss, tuple(gs))


def test_total_and_per_sample_loss():
    B, K, M = 5, 11, 3
    zs, zt, y, wl = make_logits(B, K, M, seed=4)
    gs, fs = make_maps(B, M, seed=4)
    wf = torch.rand(B, M, dtype=DT)
    lo = ref.mtkd_logit_kd(zs, zt, y, wl, 4.0, 1.0)
    fo = ref.mtkd_feature_kd(gs, fs, wf, 5.0)
    ps = ref.per_sample_loss(lo.student_ce, lo.kl, wl, fo.mse, wf, 1.0, 5.0)
    for i in range(B):
        e = lo.student_ce[i] + (wl[i] * lo.kl[i]).sum() + 5.0 * (wf[i] * fo.mse[i]).sum()
        torch.testing.assert_close(ps[i], e)
    torch.testing.assert_close(ref.total_loss(lo.student_ce, lo.kl, wl, fo.mse, wf), lo.loss + fo.loss)
    torch.testing.assert_close(ref.total_loss(lo.student_ce, lo.kl, wl), lo.loss)


# ----------------------------------------------------------------------------- section 4


def test_agent_state_layout():
    B, K, M = 3, 10, 3
    zs, zt, y, _ = make_logits(B, K, M)
    dims = [4, 6, 5]
    emb = [torch.randn(B, d, dtype=DT) for d in dims]
    cos, kl, tce = torch.rand(B, M, dtype=DT), torch.rand(B, M, dtype=DT), torch.rand(B, M, dtype=DT)
    s = ref.agent_state(cos, kl, tce, emb, zt)
    assert s.shape == (B, sum(d + K + 3 for d in dims))
    off = 0
    for m in range(M):
        torch.testing.assert_close(s[:, off], cos[:, m])
        torch.testing.assert_close(s[:, off + 1], kl[:, m])
        torch.testing.assert_close(s[:, off + 2], tce[:, m])
        torch.testing.assert_close(s[:, off + 3: off + 3 + dims[m]], emb[m])
        torch.testing.assert_close(s[:, off + 3 + dims[m]: off + 3 + dims[m] + K], zt[m])
        off += dims[m] + K + 3
    assert not s.requires_grad


@pytest.mark.parametrize("M", SIZES_M)
def test_priors(M):
    B = 7
    tce = torch.rand(B, M, dtype=DT) * 3
    c = ref.confidence_prior(tce)
    torch.testing.assert_close(c.sum(1), torch.ones(B, dtype=DT))
    sm = torch.exp(tce) / torch.exp(tce).sum(1, keepdim=True)
    torch.testing.assert_close(c, (1 - sm) / (M - 1))
    # the most confident teacher (lowest CE) gets the largest weight
    assert torch.equal(c.argmax(1), tce.argmin(1))
    kl, cos = torch.rand(B, M, dtype=DT), torch.rand(B, M, dtype=DT) * 2 - 1
    torch.testing.assert_close(ref.gap_prior(kl), torch.softmax(kl, 1))
    assert torch.equal(ref.gap_prior(kl).argmax(1), kl.argmax(1))
    torch.testing.assert_close(ref.similarity_prior(cos).sum(1), torch.ones(B, dtype=DT))
    assert torch.equal(ref.similarity_prior(cos).argmax(1), cos.argmax(1))


@pytest.mark.parametrize("M", SIZES_M)
def test_action_default_and_dynamic(M):
    B = 6
    g = torch.Generator().manual_seed(M)
    pi_l = torch.softmax(torch.randn(B, M, generator=g, dtype=DT), 1)
    pi_f = torch.softmax(torch.randn(B, M, generator=g, dtype=DT), 1)
    tce, kl, cos = (torch.rand(B, M, generator=g, dtype=DT) for _ in range(3))
    wl, wf = ref.action(pi_l, pi_f, tce, kl, cos)
    for w in (wl, wf):
        torch.testing.assert_close(w.sum(1), torch.ones(B, dtype=DT))
        assert (w > 0).all()
    c = ref.confidence_prior(tce)
    torch.testing.assert_close(wl, (pi_l + c + torch.softmax(kl, 1)) / 3)
    torch.testing.assert_close(wf, (pi_f + c + torch.softmax(cos, 1)) / 3)
    # dynamic with the initial lambdas (ones) is the default blend
    ones = torch.ones(3, dtype=DT)
    dl, df = ref.action(pi_l, pi_f, tce, kl, cos, ones, ones)
    torch.testing.assert_close(dl, wl)
    torch.testing.assert_close(df, wf)
    lam = torch.tensor([2.0, -1.0, 0.5], dtype=DT)
    a = torch.softmax(lam, 0)
    dl, _ = ref.action(pi_l, pi_f, tce, kl, cos, lam, ones)
    torch.testing.assert_close(dl, a[0] * pi_l + a[1] * c + a[2] * torch.softmax(kl, 1))
    torch.testing.assert_close(dl.sum(1), torch.ones(B, dtype=DT))


# ----------------------------------------------------------------------------- sections 5-6


@pytest.mark.parametrize("B", [2, 3, 64])
def test_reward_normalisation(B):
    losses = torch.rand(B, dtype=DT) * 5
    r = ref.normalized_reward(losses)
    neg = -losses
    mean = neg.sum() / B
    std = math.sqrt(float(((neg - mean) ** 2).sum()) / (B - 1))
    torch.testing.assert_close(r, ((neg - mean) / std).clamp(0, 1))
    assert (r >= 0).all() and (r <= 1).all()
    # the lowest-loss sample gets the largest reward, and the highest-loss sample none
    assert r[losses.argmin()] == r.max() and r[losses.argmax()] == 0


def test_reward_edge_cases_are_zero_not_nan():
    assert torch.equal(ref.normalized_reward(torch.tensor([3.0], dtype=DT)), torch.zeros(1, dtype=DT))
    assert torch.equal(ref.normalized_reward(torch.full((5,), 2.5, dtype=DT)), torch.zeros(5, dtype=DT))


def test_agent_bce_loss():
    B, M = 9, 3
    wl = torch.softmax(torch.randn(B, M, dtype=DT), 1).requires_grad_(True)
    wf = torch.softmax(torch.randn(B, M, dtype=DT), 1)
    r = torch.rand(B, dtype=DT)
    loss = ref.agent_bce_loss(wl, wf, r)
    expect = (-r[:, None] * wl.log()).mean() + (-r[:, None] * wf.log()).mean()
    torch.testing.assert_close(loss, expect)
    (g,) = torch.autograd.grad(loss, wl)
    torch.testing.assert_close(g, -r[:, None] / wl.detach() / (B * M))
    # zero reward: zero loss and no push on the weights
    assert float(ref.agent_bce_loss(wl, wf, torch.zeros(B, dtype=DT)).detach()) == 0.0


# ----------------------------------------------------------------------------- validation


def test_errors_name_the_argument():
    zs, zt, y, w = make_logits(4, 10, 3)
    with pytest.raises(ValueError, match="teacher_logits"):
        ref.mtkd_logit_kd(zs, zt[:, :3], y, w)
    with pytest.raises(ValueError, match="weights.*\\[4, 3\\]"):
        ref.mtkd_logit_kd(zs, zt, y, w[:, :2])
    with pytest.raises(ValueError, match="targets.*int64"):
        ref.mtkd_logit_kd(zs, zt, y.int(), w)
    with pytest.raises(ValueError, match="targets.*\\[0, 9\\]"):
        ref.mtkd_logit_kd(zs, zt, y + 10, w)
    with pytest.raises(ValueError, match="student_logits.*floating"):
        ref.mtkd_logit_kd(zs.long(), zt, y, w)
    with pytest.raises(ValueError, match="teacher_logits.*M >= 2"):
        ref.kl_per_sample(zs, zt[:1])
    with pytest.raises(ValueError, match="temperature"):
        ref.kl_per_sample(zs, zt, 0.0)
    gs, fs = make_maps(4, 3)
    with pytest.raises(ValueError, match="teacher_maps\\[1\\]"):
        ref.mtkd_feature_kd(gs, [fs[0], fs[2], fs[1]], w)
    with pytest.raises(ValueError, match="teacher_maps: expected 3"):
        ref.mtkd_feature_kd(gs, fs[:2], w)
    with pytest.raises(ValueError, match="embeddings"):
        ref.agent_state(w, w, w, [torch.zeros(4, 2)], zt)
    with pytest.raises(ValueError, match="lambda_l"):
        ref.action(w, w, w, w, w, torch.ones(2), torch.ones(3))
    with pytest.raises(ValueError, match="per_sample"):
        ref.normalized_reward(w)
