"""Baselines' teacher weights against their formulas (docs/method.md section 9), and a step per strategy."""

import math

import pytest
import torch

from mtkd_fast import reference as ref
from mtkd_fast.agent import MTKDAgent
from mtkd_fast.teachers import LiveTeachers
from mtkd_fast.train import Trainer, TrainConfig, aver_weights, camkd_weights, ebkd_weights, make_strategy
from test_train_standins import make_batches, make_setup


def test_aver():
    w = aver_weights(5, 4)
    assert torch.equal(w, torch.full((5, 4), 0.25))


def test_ebkd_matches_formula():
    g = torch.Generator().manual_seed(0)
    M, B, K = 3, 6, 7
    z = torch.randn(M, B, K, generator=g, dtype=torch.float64) * 3
    got = ebkd_weights(z)
    for i in range(B):
        H = []
        for m in range(M):
            p = torch.softmax(z[m, i], 0)
            H.append(-sum(float(q) * math.log(float(q)) for q in p))
        raw = [1 - h / sum(H) for h in H]
        for m in range(M):
            assert got[i, m].item() == pytest.approx(raw[m] / sum(raw), rel=1e-12)
    # a confident (low-entropy) teacher gets more weight
    z2 = torch.zeros(2, 1, 5, dtype=torch.float64)
    z2[0, 0, 0] = 10.0
    w2 = ebkd_weights(z2)
    assert w2[0, 0] > w2[0, 1]
    # every teacher certain: equal weights, not NaN
    sure = torch.full((2, 1, 4), -1e4)
    sure[:, 0, 1] = 1e4
    assert torch.equal(ebkd_weights(sure), torch.full((1, 2), 0.5))


def test_camkd_matches_formula():
    g = torch.Generator().manual_seed(1)
    tce = torch.rand(5, 4, generator=g, dtype=torch.float64) * 3
    got = camkd_weights(tce)
    exp = (1 - torch.exp(tce) / torch.exp(tce).sum(1, keepdim=True)) / 3
    torch.testing.assert_close(got, exp)
    torch.testing.assert_close(got.sum(1), torch.ones(5, dtype=torch.float64))
    torch.testing.assert_close(got, ref.confidence_prior(tce))


@pytest.mark.parametrize("name", ["aver", "ebkd", "camkd"])
def test_strategy_weights_reach_the_loss(name):
    student, teachers, transfer, _ = make_setup(seed=2)
    source = LiveTeachers(teachers)
    cfg = TrainConfig(student="tiny", teachers=["a", "b", "c"], strategy=name, loss_backend="reference", progress=False)
    trainer = Trainer(cfg, student, source, transfer)
    (x, y, idx), = make_batches(1, 6, seed=3)
    out = trainer.train_step(x, y, idx, 0)
    t = source(x)
    expected = {"aver": lambda: aver_weights(6, 3), "ebkd": lambda: ebkd_weights(t.logits),
                "camkd": lambda: camkd_weights(ref.teacher_cross_entropy(t.logits, y))}[name]()
    torch.testing.assert_close(out["logit_weights"], expected)
    torch.testing.assert_close(out["feature_weights"], expected)
    assert trainer.agent is None and out["reward"] is None


def test_make_strategy_errors():
    with pytest.raises(ValueError, match="agent"):
        make_strategy("mtkd_rl")
    with pytest.raises(ValueError, match="strategy"):
        make_strategy("aekd")
    assert make_strategy("mtkd_rl", MTKDAgent([10, 10], 2)).needs_state
    assert not make_strategy("none").needs_teachers
