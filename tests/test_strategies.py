"""Baselines' teacher weights (docs/method.md section 9) against the formulas of the CA-MKD code they come from, AEKD's
min-norm weights against an independent brute-force solution of the same small QP, and a step per strategy."""

import math

import pytest
import torch
import torch.nn.functional as F
from standins import make_batches, make_setup

from mtkd_fast.agent import MTKDAgent
from mtkd_fast.teachers import LiveTeachers
from mtkd_fast.train import (
    TrainConfig,
    Trainer,
    aekd_weights,
    aver_weights,
    camkd_feature_weights,
    camkd_weights,
    ebkd_weights,
    make_strategy,
    train,
)
from mtkd_fast.train.strategies import min_norm_simplex

pytestmark = pytest.mark.usefixtures("one_thread")


def test_aver():
    w = aver_weights(5, 4)
    assert torch.equal(w, torch.full((5, 4), 0.25))


def test_ebkd_matches_the_code():
    """loops.py EBKD: weight_m = 1 - H_m / sum H (softmax at T = 1), loss = sum(weight * KL) / (B M)."""
    g = torch.Generator().manual_seed(0)
    M, B, K = 3, 6, 7
    z = torch.randn(M, B, K, generator=g, dtype=torch.float64) * 3
    got = ebkd_weights(z)
    for i in range(B):
        H = []
        for m in range(M):
            p = torch.softmax(z[m, i], 0)
            H.append(-sum(float(q) * math.log(float(q)) for q in p))
        for m in range(M):
            assert got[i, m].item() == pytest.approx((1 - H[m] / sum(H)) / M, rel=1e-12)
    torch.testing.assert_close(got.sum(1), torch.full((B,), (M - 1) / M, dtype=torch.float64))
    z2 = torch.zeros(2, 1, 5, dtype=torch.float64)  # a confident (low-entropy) teacher gets more weight
    z2[0, 0, 0] = 10.0
    w2 = ebkd_weights(z2)
    assert w2[0, 0] > w2[0, 1]
    sure = torch.full((2, 1, 4), -1e4)  # every teacher certain: equal weights, not NaN
    sure[:, 0, 1] = 1e4
    assert torch.equal(ebkd_weights(sure), torch.full((1, 2), 0.25))


def test_camkd_logit_weights_match_the_code():
    """loops.py CAMKD: attention = (1 - softmax over teachers of CE) / (M - 1); loss = sum(att * KL) / (B M)."""
    g = torch.Generator().manual_seed(1)
    tce = torch.rand(5, 4, generator=g, dtype=torch.float64) * 3
    got = camkd_weights(tce)
    exp = (1 - torch.exp(tce) / torch.exp(tce).sum(1, keepdim=True)) / 3 / 4
    torch.testing.assert_close(got, exp)
    torch.testing.assert_close(got.sum(1), torch.full((5,), 0.25, dtype=torch.float64))
    with pytest.raises(ValueError, match="teacher_ce"):
        camkd_weights(torch.rand(5))


def test_camkd_feature_weights_use_the_teachers_classifiers_on_the_student_maps():
    """CAMKD.py + CalWeight: CE of teacher m's classifier (after its global average pool) on G_m."""
    g = torch.Generator().manual_seed(2)
    B, K, chans = 6, 5, (4, 7, 3)
    maps = [torch.randn(B, c, s, s, generator=g, dtype=torch.float64) for c, s in zip(chans, (2, 4, 3))]
    heads = [torch.nn.Linear(c, K).double() for c in chans]
    y = torch.randint(0, K, (B,), generator=g)
    got = camkd_feature_weights(maps, heads, y)
    for i in range(B):
        ce = []
        for G, head in zip(maps, heads):
            with torch.no_grad():
                logits = G[i].mean(dim=(1, 2)) @ head.weight.T + head.bias
            ce.append(float(torch.logsumexp(logits, 0) - logits[y[i]]))
        e = [math.exp(c) for c in ce]
        for m in range(3):
            assert got[i, m].item() == pytest.approx((1 - e[m] / sum(e)) / 2 / 3, rel=1e-10)
    with pytest.raises(ValueError, match="teacher_heads"):
        camkd_feature_weights(maps, heads[:2], y)
    with pytest.raises(ValueError, match=r"teacher_heads\[1\]: takes 3 features"):
        camkd_feature_weights(maps, [heads[0], heads[2], heads[1]], y)


# ---------------------------------------------------------------- AEKD: min-norm point over the capped simplex

def _grid_min(gram, cap, steps):
    """Brute force: every point of a grid on {a >= 0, sum a = 1, a <= cap} (M = len(gram)), least a^T G a."""
    M = gram.shape[0]
    axes = torch.cartesian_prod(*[torch.arange(steps + 1)] * (M - 1)).reshape(-1, M - 1)
    axes = axes[axes.sum(1) <= steps]
    a = torch.cat([axes, steps - axes.sum(1, keepdim=True)], 1).to(torch.float64) / steps
    a = a[(a <= cap + 1e-12).all(1)]
    values = torch.einsum("pi,ij,pj->p", a, gram, a)
    k = int(values.argmin())
    return float(values[k]), a[k]


@pytest.mark.parametrize("M,K,cap,collinear", [(2, 5, 1.0, False), (3, 4, 1.0, False), (3, 4, 0.6, False),
                                                (3, 2, 0.4, False), (4, 6, 0.5, True), (3, 7, 1.0, True)])
def test_min_norm_simplex_against_brute_force(M, K, cap, collinear):
    g = torch.Generator().manual_seed(M * 10 + K)
    v = torch.randn(M, K, generator=g, dtype=torch.float64)
    v[0] += 1.5  # teachers that partly agree: the optimum is often interior, sometimes on a face
    if collinear:
        v[-1] = 0.7 * v[0] + 0.3 * v[1]  # a teacher inside the hull of two others: a singular Gram matrix
    gram = v @ v.T
    a = min_norm_simplex(gram * 1e-6, cap)  # tiny gradients, as per-batch KD gradients are: scale-free
    assert a.dtype == torch.float64 and a.shape == (M,)
    assert float(a.sum()) == pytest.approx(1.0, abs=1e-12)
    assert (a >= 0).all() and (a <= cap + 1e-12).all()
    steps = {2: 2000, 3: 300, 4: 60}[M]
    best, _ = _grid_min(gram, cap, steps)
    ours = float(a @ gram @ a)
    assert ours <= best + 1e-12  # never worse than any grid point ...
    assert best - ours <= 2 * float(gram.abs().max()) * M / steps  # ... and the grid gets to within its spacing
    if M == 2 and cap == 1.0:  # closed form of the two-point min-norm problem
        a0 = (gram[1, 1] - gram[0, 1]) / (gram[0, 0] + gram[1, 1] - 2 * gram[0, 1])
        assert float(a[0]) == pytest.approx(float(a0.clamp(0, 1)), abs=1e-9)


def test_min_norm_simplex_errors():
    with pytest.raises(ValueError, match="gram"):
        min_norm_simplex(torch.ones(2, 3))
    with pytest.raises(ValueError, match="cap"):
        min_norm_simplex(torch.eye(3), cap=0.2)


@pytest.mark.parametrize("nu", [None, 0.9, 0.05])
def test_aekd_weights_are_the_min_norm_point_of_the_kd_gradients(nu):
    """loops.py AEKD: grads of each teacher's DistillKL (batchmean, x T^2) w.r.t. the student logits, their batch
    mean, the one-class SVM dual with nu = 1 / (C M) clamped to [1/M, 1]: box 1 / (nu M), weights summing to 1."""
    g = torch.Generator().manual_seed(7)
    M, B, K, T = 3, 8, 6, 4.0
    zs = torch.randn(B, K, generator=g, dtype=torch.float64)
    zt = torch.randn(M, B, K, generator=g, dtype=torch.float64) * 2
    zt[1] += zt[0]  # partly agreeing teachers
    grads = []
    for m in range(M):
        z = zs.clone().requires_grad_(True)
        kd = F.kl_div(F.log_softmax(z / T, 1), F.softmax(zt[m] / T, 1), reduction="batchmean") * T**2
        kd.backward()
        grads.append(z.grad.mean(0))
    V = torch.stack(grads)
    eff_nu = min(max(1 / (0.6 * M) if nu is None else nu, 1 / M), 1.0)
    cap = 1 / (eff_nu * M)
    got = aekd_weights(zs, zt, T, nu)
    best, _ = _grid_min(V @ V.T, cap, 300)
    assert float(got.sum()) == pytest.approx(1.0, abs=1e-12) and float(got.max()) <= cap + 1e-12
    assert float(got @ V @ V.T @ got) <= best + 1e-15
    torch.testing.assert_close(got, min_norm_simplex(V @ V.T, cap))


# ---------------------------------------------------------------- through the trainer

def _cfg(name, **kw):
    return TrainConfig(student="tiny", teachers=["a", "b", "c"], strategy=name, loss_backend="reference",
                       progress=False, **kw)


@pytest.mark.parametrize("epoch", [0, 1])
@pytest.mark.parametrize("name", ["aver", "ebkd", "camkd", "aekd"])
def test_strategy_weights_reach_the_loss(name, epoch):
    student, teachers, transfer, _ = make_setup(seed=2)
    student.drop.p = 0.0
    source = LiveTeachers(teachers)
    heads = [t.fc for t in teachers]
    trainer = Trainer(_cfg(name), student, source, transfer, teacher_heads=heads if name == "camkd" else None)
    trainer.begin_epoch(epoch)
    (x, y, idx), = make_batches(1, 6, seed=3)
    student.train(), transfer.train()
    with torch.no_grad():  # the maps and logits the step will see (same parameters, train-mode BN)
        s_feats, z_s = student(x, is_feat=True)
        maps = transfer(s_feats[-2])
    out = trainer.train_step(x, y, idx, 0)
    t = source(x)
    tce = torch.stack([F.cross_entropy(t.logits[m], y, reduction="none") for m in range(3)], 1)
    zeros = torch.zeros(6, 3)
    if name == "aver":
        wl = wf = aver_weights(6, 3)
    elif name == "ebkd":
        wl, wf = ebkd_weights(t.logits), zeros
    elif name == "camkd":
        wl = camkd_weights(tce)
        wf = zeros if epoch == 0 else camkd_feature_weights(maps, heads, y)
    else:
        wl, wf = aekd_weights(z_s, t.logits, 4.0).float()[None].expand(6, 3), zeros
    torch.testing.assert_close(out["logit_weights"], wl)
    torch.testing.assert_close(out["feature_weights"], wf)
    assert trainer.agent is None and out["reward"] is None


def test_make_strategy_errors():
    with pytest.raises(ValueError, match="agent"):
        make_strategy("mtkd_rl")
    with pytest.raises(ValueError, match="strategy"):
        make_strategy("mmkd")
    with pytest.raises(ValueError, match="teacher_heads: strategy 'camkd' needs the teachers' classifier heads"):
        make_strategy("camkd")
    assert make_strategy("mtkd_rl", MTKDAgent([10, 10], 2)).needs_state
    assert not make_strategy("none").needs_teachers
    assert make_strategy("aekd", temperature=2.0, aekd_nu=0.7).nu == 0.7
    with pytest.raises(ValueError, match="aekd_nu"):
        TrainConfig(teachers=["a", "b"], strategy="aekd", aekd_nu=1.5)


def test_camkd_from_a_cache_without_teacher_models_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="'camkd' applies each teacher's classifier"):
        train(TrainConfig(strategy="camkd", teacher_cache=str(tmp_path), out_dir=str(tmp_path / "o")))
    with pytest.raises(ValueError, match="teacher_checkpoints"):
        train(TrainConfig(strategy="camkd", teachers=["resnet8", "resnet14"], teacher_cache=str(tmp_path),
                          out_dir=str(tmp_path / "o")))
