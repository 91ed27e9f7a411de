"""WeightDiagnostics against the same quantities computed directly over the whole epoch, and the files a run writes."""

import csv
import math
import os

import pytest
import torch
from standins import make_batches, make_setup

from mtkd_fast.agent import AgentState, MTKDAgent
from mtkd_fast.teachers import LiveTeachers
from mtkd_fast.train import TrainConfig, Trainer
from mtkd_fast.train.diagnostics import DIAGNOSTICS_CSV, DIAGNOSTICS_PNG, WeightDiagnostics

pytestmark = pytest.mark.usefixtures("one_thread")

M, K, D = 3, 5, 4


def _batch(g, B):
    z = torch.randn(M, B, K, generator=g) * 2
    y = torch.randint(0, K, (B,), generator=g)
    tce = torch.rand(B, M, generator=g) * 2
    kl = torch.rand(B, M, generator=g)
    cos = torch.rand(B, M, generator=g) * 2 - 1
    feats = torch.randn(B, M * (D + K + 3), generator=g)
    return z, y, AgentState(feats, tce, kl, cos)


@pytest.mark.parametrize("dynamic", [False, True])
def test_accumulated_diagnostics_equal_the_direct_computation(dynamic):
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(1)
    agent = MTKDAgent([D + K + 3] * M, M, dynamic=dynamic)
    if dynamic:
        with torch.no_grad():
            agent.logit_weight_factor.copy_(torch.tensor([0.3, 1.2, -0.4]))
            agent.feature_weight_factor.copy_(torch.tensor([1.5, 0.1, 0.2]))
    diag = WeightDiagnostics(M)
    all_w, all_right, all_parts = {"wl": [], "wf": []}, [], {"wl": [], "wf": []}
    for B in (7, 5, 9):  # batches of different sizes: sums, not means of means
        z, y, state = _batch(g, B)
        with torch.no_grad():
            wl, wf = agent(state)
        wf = wf.clone()
        wf[0] = 0.0  # a row without feature weights: left out of the feature entropy
        diag.update(wl, wf, z, y, state, agent)
        all_w["wl"].append(wl.double())
        all_w["wf"].append(wf.double())
        all_right.append((z.argmax(-1) == y[None]).T.double())
        # the policy / prior split, written out
        with torch.no_grad():
            pi_l, pi_f = (p.double() for p in agent.policy(state))
        c = (1 - torch.softmax(state.teacher_ce.double(), 1)) / (M - 1)
        u = 1.0 / M
        for key, pi, prior, lam in (("wl", pi_l, torch.softmax(state.kl.double(), 1), "logit_weight_factor"),
                                    ("wf", pi_f, torch.softmax(state.cos.double(), 1), "feature_weight_factor")):
            coef = (torch.softmax(getattr(agent, lam).detach().double(), 0) if dynamic
                    else torch.full((3,), 1 / 3).double())
            w = coef[0] * pi + coef[1] * c + coef[2] * prior
            only = (coef[1] * c + coef[2] * prior) / (coef[1] + coef[2])
            all_parts[key].append(torch.stack([(coef[0] * (pi - u)).abs().sum(1),
                                               (coef[1] * (c - u) + coef[2] * (prior - u)).abs().sum(1),
                                               (w - only).abs().sum(1)], 1))
    out = diag.compute()
    right = torch.cat(all_right)
    for key in ("wl", "wf"):
        w = torch.cat(all_w[key])
        rows = w[w.sum(1) > 0]
        p = rows / rows.sum(1, keepdim=True)
        entropy = float((-(p * p.log()).sum(1) / math.log(M)).mean())
        assert out[f"diag_entropy_{key}"] == pytest.approx(entropy, rel=1e-9)
        for m in range(M):
            corr = float(torch.corrcoef(torch.stack([w[:, m], right[:, m]]))[0, 1])
            assert out[f"diag_corr_{key}_right_t{m}"] == pytest.approx(corr, rel=1e-7, abs=1e-9)
        parts = torch.cat(all_parts[key]).mean(0)
        for j, name in enumerate(("policy", "prior", "shift")):
            assert out[f"diag_{name}_{key}"] == pytest.approx(float(parts[j]), rel=1e-6)
    assert 0 < out["diag_entropy_wl"] < 1
    # compute() started a new epoch
    again = diag.compute()
    assert all(math.isnan(v) for v in again.values())


def test_constant_or_absent_weights_give_nan_not_noise():
    g = torch.Generator().manual_seed(3)
    diag = WeightDiagnostics(M)
    z, y, _ = _batch(g, 8)
    diag.update(torch.full((8, M), 1.0), torch.zeros(8, M), z, y)
    out = diag.compute()
    assert out["diag_entropy_wl"] == pytest.approx(1.0)  # weight 1 each (the warm-up) is uniform
    assert math.isnan(out["diag_entropy_wf"])
    assert all(math.isnan(out[f"diag_corr_{k}_right_t{m}"]) for k in ("wl", "wf") for m in range(M))
    assert math.isnan(out["diag_policy_wl"])  # no agent
    with pytest.raises(ValueError, match="logit_weights"):
        diag.update(torch.ones(8, 2), torch.ones(8, 2), z, y)


@pytest.mark.parametrize("strategy", ["mtkd_rl", "camkd"])
def test_a_run_writes_the_diagnostics(strategy, tmp_path):
    student, teachers, transfer, sizes = make_setup(seed=4)
    cfg = TrainConfig(student="tiny", teachers=["a", "b", "c"], strategy=strategy, epochs=2, progress=False,
                      loss_backend="reference", out_dir=str(tmp_path))
    agent = MTKDAgent(sizes, 3) if strategy == "mtkd_rl" else None
    heads = [t.fc for t in teachers] if strategy == "camkd" else None
    trainer = Trainer(cfg, student, LiveTeachers(teachers), transfer, agent, teacher_heads=heads)
    batches = make_batches(3, 8, seed=5)
    trainer.fit(lambda epoch: batches, None, str(tmp_path))
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    diag_rows = list(csv.DictReader(open(tmp_path / DIAGNOSTICS_CSV)))
    assert os.path.getsize(tmp_path / DIAGNOSTICS_PNG) > 1000
    assert len(rows) == len(diag_rows) == 2
    for row, d in zip(rows, diag_rows):
        assert row["diag_entropy_wl"] == d["diag_entropy_wl"]
        assert {f"diag_corr_wl_right_{name}" for name in "abc"} <= set(d)  # named as the teachers
    later = {k: float(v) for k, v in diag_rows[1].items()}
    assert 0 < later["diag_entropy_wl"] < 1
    if strategy == "mtkd_rl":
        assert float(diag_rows[0]["diag_entropy_wl"]) == pytest.approx(1.0)  # warm-up: weight 1 per teacher
        assert later["diag_policy_wl"] > 0 and later["diag_prior_wl"] > 0 and later["diag_shift_wl"] > 0
    else:
        assert math.isnan(later["diag_policy_wl"])


def test_demo_table_prints_a_dash_without_a_none_run():
    """The demo's "vs none" column (mtkd_fast.demo): a dash, not "+nan", when "none" was not run."""
    from mtkd_fast.demo import _format_table

    rows = [{"label": "AVER", "top1_mean": 70.0, "top1_std": 0.5, "gain_vs_none": float("nan"), "epoch_time_s": 1.0},
            {"label": "MTKD-RL", "top1_mean": 71.0, "top1_std": 0.4, "gain_vs_none": 2.5, "epoch_time_s": 1.2}]
    text = _format_table([], rows, 3)
    assert "nan" not in text
    aver, rl = [line for line in text.splitlines() if "AVER" in line or "MTKD-RL" in line]
    assert aver.split()[-2] == "-" and rl.split()[-2] == "+2.50"
