"""One Trainer step against a hand-written step of the formulas of docs/method.md (mtkd_fast.reference), in float64."""

import copy

import pytest
import torch
import torch.nn.functional as F
from standins import ExactTeachers, make_batches, make_setup

from mtkd_fast import reference as ref
from mtkd_fast.agent import MTKDAgent
from mtkd_fast.teachers import LiveTeachers
from mtkd_fast.train import TrainConfig, Trainer, feature_kl_per_sample


def config(**kw):
    base = dict(student="tiny", teachers=["t0", "t1", "t2"], strategy="mtkd_rl", loss_backend="reference",
                progress=False, lr=0.05, weight_decay=1e-4)
    base.update(kw)
    return TrainConfig(**base)


def sgd(params, cfg):
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                           weight_decay=cfg.weight_decay)


def assert_modules_close(a, b, **tol):
    for (name, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items()):
        torch.testing.assert_close(p, q, msg=lambda m: f"{name}: {m}", **tol)


@pytest.mark.parametrize("feature_kd", ["mse", "kl"])
@pytest.mark.parametrize("dynamic", [False, True])
def test_mtkd_rl_step_and_agent_update_match_spec(feature_kd, dynamic):
    dt = torch.float64
    student, teachers, transfer, sizes = make_setup(dtype=dt, seed=1)
    torch.manual_seed(2)
    agent = MTKDAgent(sizes, 3, dynamic=dynamic).to(dt)
    s2, ft2, a2 = copy.deepcopy(student), copy.deepcopy(transfer), copy.deepcopy(agent)
    cfg = config(feature_kd=feature_kd, dynamic=dynamic)
    trainer = Trainer(cfg, student, ExactTeachers(teachers), transfer, agent)
    trainer.begin_epoch(1, steps=1)  # after the warm-up: the agent's weights are used
    (x, y, idx), = make_batches(1, 9, dtype=dt, seed=3)
    student.drop.p = s2.drop.p = 0.0  # dropout would draw different masks in the two runs
    out = trainer.train_step(x, y, idx, view=1)
    trainer.update_agent()

    # ---- the hand-written step (docs/method.md sections 1-7)
    s2.train()
    ft2.train()
    feats, z = s2(x, is_feat=True)
    G = ft2(feats[-2])
    with torch.no_grad():
        touts = [t.eval()(x, is_feat=True) for t in teachers]
    zt = torch.stack([o[1] for o in touts])
    emb = [o[0][-1] for o in touts]
    maps = [o[0][-2] for o in touts]
    kl = ref.kl_per_sample(z.detach(), zt)
    tce = ref.teacher_cross_entropy(zt, y)
    cos = ref.pooled_cosine([g.detach() for g in G], emb)
    state = ref.agent_state(cos, kl, tce, emb, zt)

    def weights(agent_module):
        h = torch.relu(state @ agent_module.steam[0].weight.T)
        pi_l = torch.softmax(agent_module.logit_head(h), 1)
        pi_f = torch.softmax(agent_module.feature_head(h), 1)
        lam = (agent_module.logit_weight_factor, agent_module.feature_weight_factor) if dynamic else (None, None)
        return ref.action(pi_l, pi_f, tce, kl, cos, *lam)

    with torch.no_grad():
        wl, wf = weights(a2)
    logit = ref.mtkd_logit_kd(z, zt, y, wl, 4.0, 1.0)
    if feature_kd == "mse":
        feat = ref.mtkd_feature_kd(G, maps, wf, 5.0)
        feat_loss, feat_stat = feat.loss, feat.mse
    else:  # per-channel spatial softmax KL, written with F.kl_div
        fkl = torch.stack([F.kl_div(F.log_softmax(g.flatten(2) / 4, -1), F.softmax(f.flatten(2) / 4, -1),
                                    reduction="none").sum(-1).mean(-1) * 16 for g, f in zip(G, maps)], 1)
        feat_loss, feat_stat = 5.0 * (wf * fkl).mean(0).sum(), fkl.detach()
    loss = logit.loss + feat_loss
    opt = sgd(list(s2.parameters()) + list(ft2.parameters()), cfg)
    opt.zero_grad()
    loss.backward()
    opt.step()
    reward = ref.normalized_reward(ref.per_sample_loss(logit.student_ce, logit.kl, wl, feat_stat, wf))
    assert float(reward.max()) > 0
    wl2, wf2 = weights(a2)
    agent_loss = ref.agent_bce_loss(wl2, wf2, reward)
    agent_opt = torch.optim.SGD(a2.parameters(), lr=0.1)
    agent_opt.zero_grad()
    agent_loss.backward()
    agent_opt.step()

    torch.testing.assert_close(out["loss"], loss.detach())
    torch.testing.assert_close(out["logit_weights"], wl)
    torch.testing.assert_close(out["feature_weights"], wf)
    torch.testing.assert_close(out["reward"], reward)
    assert_modules_close(student, s2)
    assert_modules_close(transfer, ft2)
    assert_modules_close(agent, a2)
    assert not torch.equal(agent.steam[0].weight, MTKDAgent(sizes, 3).steam[0].weight)


@pytest.mark.parametrize("warmup,fill", [("ones", 1.0), ("uniform", 1 / 3)])
def test_warmup_epoch_weights(warmup, fill):
    student, teachers, transfer, sizes = make_setup(seed=4)
    trainer = Trainer(config(warmup_weights=warmup), student, LiveTeachers(teachers), transfer, MTKDAgent(sizes, 3))
    trainer.begin_epoch(0)
    (x, y, idx), = make_batches(1, 6, seed=5)
    out = trainer.train_step(x, y, idx, 0)
    assert torch.equal(out["logit_weights"], torch.full((6, 3), fill))
    assert torch.equal(out["feature_weights"], torch.full((6, 3), fill))
    assert len(trainer.buffer) == 1  # the warm-up epoch still feeds the agent


def test_agent_update_schedule_follows_authors_trigger():
    student, teachers, transfer, sizes = make_setup(seed=6)
    trainer = Trainer(config(agent_step=2), student, LiveTeachers(teachers), transfer, MTKDAgent(sizes, 3))
    trainer.begin_epoch(1, steps=5)
    sizes_after = []
    for x, y, idx in make_batches(5, 4, seed=7):
        trainer.train_step(x, y, idx, 1)
        sizes_after.append(len(trainer.buffer))
    # update after batch indices 2 and 4 (batch_idx % agent_step == 0 and batch_idx != 0)
    assert sizes_after == [1, 2, 0, 1, 0]
    assert trainer.buffer.capacity == 3


def test_plain_cross_entropy_step():
    student, _, _, _ = make_setup(seed=8, dtype=torch.float64)
    student.drop.p = 0.0
    s2 = copy.deepcopy(student)
    cfg = config(strategy="none", teachers=[])
    trainer = Trainer(cfg, student)
    (x, y, idx), = make_batches(1, 7, dtype=torch.float64, seed=9)
    out = trainer.train_step(x, y, idx, 0)
    loss = F.cross_entropy(s2(x), y)
    opt = sgd(s2.parameters(), cfg)
    loss.backward()
    opt.step()
    torch.testing.assert_close(out["loss"], loss.detach())
    assert_modules_close(student, s2)


def test_backends_give_the_same_trajectory():
    """reference vs auto (the fused kernels where the extension has them) over a few steps."""
    results = []
    for backend in ("reference", "auto"):
        student, teachers, transfer, sizes = make_setup(seed=10)
        student.drop.p = 0.0
        torch.manual_seed(11)
        agent = MTKDAgent(sizes, 3)
        trainer = Trainer(config(loss_backend=backend, agent_step=2), student, LiveTeachers(teachers), transfer, agent)
        trainer.begin_epoch(1, steps=4)
        losses = [trainer.train_step(x, y, i, 1)["loss"] for x, y, i in make_batches(4, 8, seed=12)]
        results.append((torch.stack(losses), student, agent))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-4, atol=1e-5)
    assert_modules_close(results[0][1], results[1][1], rtol=1e-4, atol=1e-5)
    assert_modules_close(results[0][2], results[1][2], rtol=1e-4, atol=1e-5)


def test_feature_kl_matches_kl_div():
    g = torch.Generator().manual_seed(13)
    s = [torch.randn(3, 4, 5, 3, generator=g, dtype=torch.float64) for _ in range(2)]
    t = [torch.randn(3, 4, 5, 3, generator=g, dtype=torch.float64) for _ in range(2)]
    got = feature_kl_per_sample(s, t, 2.0)
    for m in range(2):
        exp = F.kl_div(F.log_softmax(s[m].flatten(2) / 2, -1), F.log_softmax(t[m].flatten(2) / 2, -1),
                       reduction="none", log_target=True).sum(-1).mean(-1) * 4
        torch.testing.assert_close(got[:, m], exp)


@pytest.mark.parametrize("opts", [dict(amp="bf16"), dict(amp="fp16"), dict(channels_last=True),
                                  dict(agent_buffer_dtype="bfloat16"),
                                  dict(agent_update="policy_gradient")])
def test_step_options_run(opts):
    student, teachers, transfer, sizes = make_setup(seed=14)
    agent = MTKDAgent(sizes, 3, update=opts.get("agent_update", "bce"))
    trainer = Trainer(config(agent_step=1, **opts), student, LiveTeachers(teachers), transfer, agent)
    trainer.begin_epoch(1, steps=3)
    before = agent.steam[0].weight.clone()
    for x, y, i in make_batches(3, 6, seed=15):
        out = trainer.train_step(x, y, i, 1)
        assert torch.isfinite(out["loss"])
    torch.testing.assert_close(out["logit_weights"].sum(1), torch.ones(6))
    metrics = trainer.end_epoch()
    assert metrics["images"] == 18 and 0 <= metrics["train_top1"] <= 100
    assert not torch.equal(before, agent.steam[0].weight)


def test_trainer_argument_errors():
    student, teachers, transfer, sizes = make_setup(seed=16)
    with pytest.raises(ValueError, match="teachers"):
        Trainer(config(), student, None, transfer, MTKDAgent(sizes, 3))
    with pytest.raises(ValueError, match="feature_transfer"):
        Trainer(config(strategy="aver"), student, LiveTeachers(teachers), None)
    with pytest.raises(ValueError, match="agent"):
        Trainer(config(), student, LiveTeachers(teachers), transfer, None)
    with pytest.raises(ValueError, match="strategy"):
        config(strategy="mmkd")
    with pytest.raises(ValueError, match="feature_kd"):
        config(feature_kd="l1")


@pytest.mark.filterwarnings("ignore:Detected call of:UserWarning")  # epochs without steps here
@pytest.mark.parametrize("schedule", ["multistep", "cosine"])
def test_learning_rate_schedule_matches_authors_formula(schedule):
    """Authors' adjust_lr at the start of epoch e: lr0 * 0.1 ** bisect_right(milestones, e), or
    lr0 * (1 + cos(pi e / E)) / 2."""
    import bisect
    import math

    student, _, _, _ = make_setup(seed=17)
    cfg = config(strategy="none", teachers=[], schedule=schedule, epochs=6, milestones=[2, 4], lr=0.05)
    trainer = Trainer(cfg, student)
    lrs = []
    for epoch in range(6):
        trainer.begin_epoch(epoch)
        lrs.append(trainer.end_epoch()["lr"])
    if schedule == "multistep":
        expected = [0.05 * 0.1 ** bisect.bisect_right([2, 4], e) for e in range(6)]
    else:
        expected = [0.05 * 0.5 * (1 + math.cos(math.pi * e / 6)) for e in range(6)]
    assert lrs == pytest.approx(expected, rel=1e-9, abs=1e-12)
