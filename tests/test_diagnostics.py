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
        # issue 27's checks, written by every MTKD-RL run: the reward's sign and the agent's steps
        for d in diag_rows:
            assert float(d["diag_reward_loss_corr"]) < 0 and 0 < float(d["diag_reward_pos"]) < 1
            assert float(d["diag_agent_grad_norm"]) > 0 and float(d["diag_agent_step_ratio"]) > 0
    else:
        assert math.isnan(later["diag_policy_wl"])
        assert "diag_reward_mean" not in later and "diag_agent_grad_norm" not in later


def test_demo_table_prints_a_dash_without_a_none_run():
    """The demo's "vs none" column (mtkd_fast.demo): a dash, not "+nan", when "none" was not run."""
    from mtkd_fast.demo import _format_table

    rows = [{"label": "AVER", "top1_mean": 70.0, "top1_std": 0.5, "gain_vs_none": float("nan"), "epoch_time_s": 1.0},
            {"label": "MTKD-RL", "top1_mean": 71.0, "top1_std": 0.4, "gain_vs_none": 2.5, "epoch_time_s": 1.2}]
    text = _format_table([], rows, 3)
    assert "nan" not in text
    aver, rl = [line for line in text.splitlines() if "AVER" in line or "MTKD-RL" in line]
    assert aver.split()[-2] == "-" and rl.split()[-2] == "+2.50"


# ---------------------------------------------------------------- issue 27's checks: the reward and the agent update


def test_reward_statistics_equal_a_float64_computation():
    """diag_reward_*: the epoch's r_hat mean / std / share > 0, the mean per-batch std of -l, corr(r_hat, l)."""
    from mtkd_fast.agent import normalized_reward

    g = torch.Generator().manual_seed(11)
    diag = WeightDiagnostics(M)
    losses, rewards = [], []
    for B in (7, 13, 5):
        z, y, _ = _batch(g, B)
        loss = torch.rand(B, generator=g) * 3 + 0.1
        reward = normalized_reward(loss)
        diag.update(torch.full((B, M), 1.0 / M), torch.full((B, M), 1.0 / M), z, y, per_sample_loss=loss,
                    reward=reward)
        losses.append([float(v) for v in loss])
        rewards.append([float(v) for v in reward])
    out = diag.compute()
    r = [v for b in rewards for v in b]
    ell = [v for b in losses for v in b]
    n = len(r)
    mean_r, mean_l = sum(r) / n, sum(ell) / n
    std_r = math.sqrt(sum((v - mean_r) ** 2 for v in r) / (n - 1))
    std_l = math.sqrt(sum((v - mean_l) ** 2 for v in ell) / (n - 1))
    corr = sum((a - mean_r) * (b - mean_l) for a, b in zip(r, ell)) / ((n - 1) * std_r * std_l)

    def bessel_std(b):
        m = sum(b) / len(b)
        return math.sqrt(sum((v - m) ** 2 for v in b) / (len(b) - 1))

    assert out["diag_reward_mean"] == pytest.approx(mean_r, rel=1e-9)
    assert out["diag_reward_std"] == pytest.approx(std_r, rel=1e-9)
    assert out["diag_reward_pos"] == pytest.approx(sum(v > 0 for v in r) / n, rel=1e-12)
    assert out["diag_reward_raw_std"] == pytest.approx(sum(bessel_std(b) for b in losses) / len(losses), rel=1e-6)
    assert out["diag_reward_loss_corr"] == pytest.approx(corr, rel=1e-9)
    assert out["diag_reward_loss_corr"] < 0  # the sign: lower-loss samples get the larger reward
    assert "diag_reward_mean" not in WeightDiagnostics(M).compute()  # no reward given: no columns


def _float64_agent_updates(agent, batches, lr):
    """The agent update of docs/method.md section 6 written out in float64: per stored batch one SGD step on
    mean_im(-r_i log wl_im) + mean_im(-r_i log wf_im); returns the statistics AgentUpdateDiagnostics reports."""
    import copy

    ref = copy.deepcopy(agent).double()
    params = list(ref.parameters())

    def flat():
        return torch.cat([p.detach().reshape(-1) for p in params])

    def outputs():
        with torch.no_grad():
            res = []
            for state, _ in batches:
                st = AgentState(*(t.double() for t in state))
                pi = ref.policy(st)
                ent = [-(w * w.log()).sum(1) / math.log(M) for w in ref(st)]
                res.append((pi, ent))
            return res

    theta0, before = flat(), outputs()
    grad_norms, ratios = [], []
    for state, reward in batches:
        st = AgentState(*(t.double() for t in state))
        wl, wf = ref(st)
        r = reward.double()[:, None]
        loss = (-r * wl.log().clamp_min(-100)).mean() + (-r * wf.log().clamp_min(-100)).mean()
        grads = torch.autograd.grad(loss, params)
        gn = math.sqrt(sum(float((x * x).sum()) for x in grads))
        grad_norms.append(gn)
        ratios.append(lr * gn / float(flat().norm()))
        with torch.no_grad():
            for p, x in zip(params, grads):
                p -= lr * x
    after = outputs()
    n = sum(s.features.shape[0] for s, _ in batches)
    return {"diag_agent_grad_norm": sum(grad_norms) / len(grad_norms),
            "diag_agent_step_ratio": sum(ratios) / len(ratios),
            "diag_agent_rel_change": float((flat() - theta0).norm() / theta0.norm()),
            "diag_agent_move_pil": sum(float((a[0][0] - b[0][0]).abs().sum()) for a, b in zip(after, before)) / n,
            "diag_agent_move_pif": sum(float((a[0][1] - b[0][1]).abs().sum()) for a, b in zip(after, before)) / n,
            "diag_agent_dentropy_wl": sum(float((a[1][0] - b[1][0]).sum()) for a, b in zip(after, before)) / n,
            "diag_agent_dentropy_wf": sum(float((a[1][1] - b[1][1]).sum()) for a, b in zip(after, before)) / n}


@pytest.mark.parametrize("dynamic", [False, True])
def test_agent_update_statistics_equal_a_float64_computation(dynamic):
    """AgentUpdateDiagnostics through the Distiller's own update (its hook), against the float64 update."""
    from mtkd_fast.distiller import Distiller
    from mtkd_fast.train.diagnostics import AgentUpdateDiagnostics

    g = torch.Generator().manual_seed(21)
    torch.manual_seed(5)
    agent = MTKDAgent([D + K + 3] * M, M, dynamic=dynamic)
    lr = 0.7  # large enough that the heads move visibly in three steps
    distiller = Distiller("mtkd_rl", agent=agent, agent_lr=lr)
    probe = AgentUpdateDiagnostics()
    distiller.update_probe = probe
    batches = []
    for B in (9, 6, 11):
        _, _, state = _batch(g, B)
        reward = (torch.rand(B, generator=g) * 1.6 - 0.4).clamp(0, 1)  # some zeros, as the clamp gives
        distiller._store(state, reward, None)
        batches.append((state, reward))
    expected = _float64_agent_updates(agent, batches, lr)
    distiller.update_agent()
    out = probe.compute()
    assert set(out) == set(expected)
    for key, value in expected.items():
        assert out[key] == pytest.approx(value, rel=2e-4, abs=1e-7), key
    assert out["diag_agent_move_pil"] > 1e-3 and out["diag_agent_rel_change"] > 1e-3
    assert probe.compute() == {}  # reset: no update since
