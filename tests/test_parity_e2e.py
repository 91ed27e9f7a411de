"""End to end: a few steps of the whole MTKD-RL loop (``Trainer.fit``: warm-up epoch, then agent-weighted steps,
agent updates at the authors' trigger and at each epoch's end) against an independent step-by-step computation
written from docs/method.md sections 1-7 with plain torch calls, in float64 on tiny models.

The teachers' maps have two resolutions (2x2 and 8x8 around a 4x4 student map), in both orders, with the
independent and the authors' chained transfer resizing.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from standins import ExactTeachers, TinyNet

from mtkd_fast.agent import MTKDAgent
from mtkd_fast.models import FeatureTransfer
from mtkd_fast.train import TrainConfig, Trainer

pytestmark = pytest.mark.usefixtures("one_thread")

T, ALPHA, BETA, K, B = 4.0, 1.0, 5.0, 5, 6
EPOCHS, STEPS, AGENT_STEP = 2, 4, 2
LOW, HIGH = dict(width=6, stride=4), dict(width=7, stride=1)  # 2x2 and 8x8 maps on an 8x8 input


def _setup(order: str, transfer_resize: str):
    dt = torch.float64
    torch.manual_seed(0)
    student = TinyNet(K, width=5, stride=2, dropout=0.0).to(dt)
    kinds = [LOW, HIGH] if order == "low_high" else [HIGH, LOW]
    teachers = []
    for m, kind in enumerate(kinds):
        torch.manual_seed(10 + m)
        t = TinyNet(K, dropout=0.0, **kind).to(dt)
        with torch.no_grad():  # non-trivial running statistics: the teachers run in eval mode
            for mod in t.modules():
                if isinstance(mod, torch.nn.BatchNorm2d):
                    mod.running_mean.uniform_(-0.2, 0.2)
                    mod.running_var.uniform_(0.5, 1.5)
        teachers.append(t.eval())
    x = torch.randn(2, 3, 8, 8, dtype=dt)
    with torch.no_grad():
        s_map = student(x, is_feat=True)[0][-2]
        t_feats = [t(x, is_feat=True)[0] for t in teachers]
    transfer = FeatureTransfer(tuple(s_map.shape[1:]), [tuple(f[-2].shape[1:]) for f in t_feats],
                               chained_resize=transfer_resize == "chained").to(dt)
    sizes = [f[-1].shape[1] + K + 3 for f in t_feats]
    torch.manual_seed(1)
    agent = MTKDAgent(sizes, len(teachers)).to(dt)
    return student, teachers, transfer, agent


def _batches(epoch: int):
    g = torch.Generator().manual_seed(100 + epoch)
    out = []
    for s in range(STEPS):
        x = torch.randn(B, 3, 8, 8, generator=g, dtype=torch.float64)
        y = torch.randint(0, K, (B,), generator=g)
        out.append((x, y, torch.arange(s * B, (s + 1) * B)))
    return out


# ------------------------------------------------------------------ docs/method.md, written out
def _spec_transfer(heads, s_map, shapes, chained):
    """Section 1 and section 8 item 7: resize (pool when the ORIGINAL H_s >= H_m, else bilinear), then the
    head's 1x1 conv -> BN -> ReLU (train mode: batch statistics, running statistics updated by the module)."""
    h_s = s_map.shape[2]
    current, outs = s_map, []
    for head, (_, h, w) in zip(heads, shapes):
        source = current if chained else s_map
        size = (h, h) if chained else (h, w)
        r = F.adaptive_avg_pool2d(source, size) if h_s >= h else F.interpolate(source, size=size, mode="bilinear",
                                                                                 align_corners=False)
        current = r
        conv, bn = head.transfer[0], head.transfer[1]
        outs.append(F.relu(bn(F.conv2d(r, conv.weight, conv.bias))))
    return outs


def _spec_weights(agent, state, tce, kl, cos):
    """Section 4: pi = softmax heads of ReLU(W s); priors c, gl, gf; action = mean of the three."""
    M = tce.shape[1]
    h = F.relu(state @ agent.steam[0].weight.T)
    pi_l = torch.softmax(h @ agent.logit_head.weight.T + agent.logit_head.bias, 1)
    pi_f = torch.softmax(h @ agent.feature_head.weight.T + agent.feature_head.bias, 1)
    c = (1 - torch.softmax(tce, 1)) / (M - 1)
    return (pi_l + c + torch.softmax(kl, 1)) / 3, (pi_f + c + torch.softmax(cos, 1)) / 3


def _spec_agent_update(agent, opt, store):
    """Section 6: per stored mini-batch, in order, one SGD step (lr 0.1) on mean(-r log wl) + mean(-r log wf)."""
    for state, tce, kl, cos, r in store:
        wl, wf = _spec_weights(agent, state, tce, kl, cos)
        loss = (-r[:, None] * torch.log(wl)).mean() + (-r[:, None] * torch.log(wf)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    store.clear()


def _spec_run(student, teachers, transfer, agent, chained, cfg):
    """Sections 1-7 step by step; returns the per-step (loss, wl, wf, reward)."""
    params = list(student.parameters()) + list(transfer.parameters())
    opt = torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, nesterov=True, weight_decay=cfg.weight_decay)
    agent_opt = torch.optim.SGD(agent.parameters(), lr=0.1)
    shapes = transfer.teacher_shapes
    heads = transfer.heads
    store, trace = [], []
    for epoch in range(EPOCHS):
        for step, (x, y, _) in enumerate(_batches(epoch)):
            student.train()
            transfer.train()
            feats, z = student(x, is_feat=True)
            G = _spec_transfer(heads, feats[-2], shapes, chained)
            with torch.no_grad():
                outs = [t(x, is_feat=True) for t in teachers]
            zt = [o[1] for o in outs]
            emb = [o[0][-1] for o in outs]
            F_t = [o[0][-2] for o in outs]
            M = len(teachers)
            # section 2
            log_ps = F.log_softmax(z / T, 1)
            kl = torch.stack([T**2 * (F.softmax(zm / T, 1) * (F.log_softmax(zm / T, 1) - log_ps)).sum(1)
                              for zm in zt], 1)
            mse = torch.stack([((g - f) ** 2).flatten(1).mean(1) for g, f in zip(G, F_t)], 1)
            tce = torch.stack([F.cross_entropy(zm, y, reduction="none") for zm in zt], 1)
            cos = torch.stack([F.cosine_similarity(g.detach().mean((2, 3)), e, dim=1) for g, e in zip(G, emb)], 1)
            sce = F.cross_entropy(z, y, reduction="none")
            # section 4: the state (detached): per teacher [COS, KL, TCE, e_m, z_m], concatenated over teachers
            state = torch.cat([torch.cat([cos[:, m:m + 1], kl.detach()[:, m:m + 1], tce[:, m:m + 1], emb[m], zt[m]], 1)
                               for m in range(M)], 1)
            with torch.no_grad():
                if epoch == 0:  # section 7: warm-up weights are all ones
                    wl = wf = torch.ones(B, M, dtype=z.dtype)
                else:
                    wl, wf = _spec_weights(agent, state, tce, kl.detach(), cos)
            # section 3
            loss = sce.mean() + ALPHA * (wl * kl).mean(0).sum() + BETA * (wf * mse).mean(0).sum()
            # section 5: reward from this forward pass, before the step
            r = -(sce + ALPHA * (wl * kl).sum(1) + BETA * (wf * mse).sum(1)).detach()
            r_hat = ((r - r.mean()) / r.std()).clamp(0, 1)
            opt.zero_grad()
            loss.backward()
            opt.step()
            trace.append((loss.detach(), wl, wf, r_hat))
            # the store keeps float32 copies, as the authors' list of float32 tensors does
            f32 = lambda t: t.detach().float().double()  # noqa: E731
            store.append((f32(state), f32(tce), f32(kl), f32(cos), f32(r_hat)))
            if step % AGENT_STEP == 0 and step != 0:  # section 7: the authors' trigger
                _spec_agent_update(agent, agent_opt, store)
        _spec_agent_update(agent, agent_opt, store)  # and at the end of every epoch
    return trace


@pytest.mark.parametrize("order,transfer_resize,loss_backend", [
    ("low_high", "independent", "reference"), ("high_low", "independent", "reference"),
    ("low_high", "chained", "reference"), ("high_low", "chained", "reference"),
    ("low_high", "chained", "auto"), ("high_low", "independent", "auto"),  # auto: the fused kernels where built
])
def test_training_loop_matches_the_spec_step_by_step(order, transfer_resize, loss_backend, tmp_path):
    student, teachers, transfer, agent = _setup(order, transfer_resize)
    s2, t2, ft2, a2 = (copy.deepcopy(m) for m in (student, teachers, transfer, agent))
    cfg = TrainConfig(student="tiny", teachers=["lo", "hi"], strategy="mtkd_rl", loss_backend=loss_backend,
                      epochs=EPOCHS, agent_step=AGENT_STEP, lr=0.05, weight_decay=1e-4, temperature=T, alpha=ALPHA,
                      beta=BETA, progress=False, transfer_resize=transfer_resize, out_dir=str(tmp_path))
    trainer = Trainer(cfg, student, ExactTeachers(teachers), transfer, agent)
    trace = []
    original = trainer.train_step

    def recording_step(*args, **kwargs):
        out = original(*args, **kwargs)
        trace.append(out)
        return out

    trainer.train_step = recording_step
    trainer.fit(_batches, None, str(tmp_path))
    expected = _spec_run(s2, t2, ft2, a2, transfer_resize == "chained", cfg)

    assert len(trace) == len(expected) == EPOCHS * STEPS
    for n, (out, (loss, wl, wf, r_hat)) in enumerate(zip(trace, expected)):
        msg = lambda m, n=n: f"step {n}: {m}"  # noqa: E731
        torch.testing.assert_close(out["loss"], loss, rtol=1e-9, atol=1e-9, msg=msg)
        torch.testing.assert_close(out["logit_weights"].double(), wl, rtol=1e-9, atol=1e-9, msg=msg)
        torch.testing.assert_close(out["feature_weights"].double(), wf, rtol=1e-9, atol=1e-9, msg=msg)
        torch.testing.assert_close(out["reward"].double(), r_hat, rtol=1e-6, atol=1e-6, msg=msg)
    # the agent moved, its weights are not uniform, and differ between samples: the comparison means something
    later = expected[STEPS:]
    assert all(float(w.std(0).max()) > 1e-4 for _, w, _, _ in later)
    assert not torch.allclose(later[0][1], later[-1][1])
    for mod_a, mod_b in ((student, s2), (transfer, ft2), (agent, a2)):
        for (name, p), (_, q) in zip(mod_a.state_dict().items(), mod_b.state_dict().items()):
            torch.testing.assert_close(p, q, rtol=1e-8, atol=1e-9, msg=lambda m, name=name: f"{name}: {m}")


def test_transfer_resize_flag_reaches_the_feature_transfer(tmp_path, monkeypatch, capsys):
    from mtkd_fast import cli, models

    built = []

    class Recording(FeatureTransfer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            built.append(self.chained_resize)

    monkeypatch.setattr(models, "FeatureTransfer", Recording)
    tiny = ["--dataset", "bundled", "--limit-per-class", "2", "--batch-size", "8", "--epochs", "1", "--no-progress",
            "--max-steps-per-epoch", "1", "--student", "resnet8", "--teachers", "resnet8", "MobileNetV2_0_5"]
    assert cli.main(["train", "--transfer-resize", "chained", "--out-dir", str(tmp_path / "a")] + tiny) == 0
    assert cli.main(["train", "--out-dir", str(tmp_path / "b")] + tiny) == 0
    assert built == [True, False]
    capsys.readouterr()
    assert cli.main(["train", "--transfer-resize", "chain", "--out-dir", str(tmp_path / "c")] + tiny) == 2
    err = capsys.readouterr().err
    assert "transfer_resize: expected one of ['independent', 'chained'], got 'chain'" in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("order", ["low_high", "high_low"])
def test_fp32_unfolded_live_teachers_are_float32_eager_bit_for_bit(order, tmp_path):
    """``--teacher-precision fp32 --no-fold-bn``: the teacher source `mtkd-fast train` builds gives, bit for bit,
    the outputs of the float32 teachers run eagerly as given (the authors' way), and a whole MTKD-RL run with it
    ends with the same student, transfer and agent as one fed by those eager teachers."""
    from mtkd_fast.train.run import _teacher_source

    runs = []
    for live in (True, False):
        student, teachers, transfer, agent = _setup(order, "independent")
        student, transfer, agent = student.float(), transfer.float(), agent.float()
        teachers = [t.float() for t in teachers]
        cfg = TrainConfig(student="tiny", teachers=["lo", "hi"], strategy="mtkd_rl", epochs=EPOCHS,
                          agent_step=AGENT_STEP, progress=False, teacher_precision="fp32", fold_bn=False,
                          out_dir=str(tmp_path / str(live)))
        source = _teacher_source(cfg, teachers, torch.device("cpu")) if live else ExactTeachers(teachers)
        if live:
            assert source.precision_used == "fp32" and not source.fold_bn and not source.channels_last
            x = torch.randn(7, 3, 8, 8)
            got, want = source(x, None, 0), ExactTeachers(teachers)(x)
            assert torch.equal(got.logits, want.logits)
            assert all(torch.equal(a, b) for a, b in zip(got.feature_maps + got.embeddings,
                                                          want.feature_maps + want.embeddings))
        trainer = Trainer(cfg, student, source, transfer, agent)
        losses = []
        original = trainer.train_step

        def recording_step(*args, original=original, losses=losses, **kwargs):
            out = original(*args, **kwargs)
            losses.append(out["loss"].detach())
            return out

        trainer.train_step = recording_step
        trainer.fit(lambda e: [(x.float(), y, i) for x, y, i in _batches(e)], None, str(tmp_path / str(live)))
        runs.append((torch.stack(losses), [m.state_dict() for m in (student, transfer, agent)]))
    (loss_a, states_a), (loss_b, states_b) = runs
    assert loss_a.numel() == EPOCHS * STEPS and torch.equal(loss_a, loss_b)
    for sa, sb in zip(states_a, states_b):
        for name in sa:
            assert torch.equal(sa[name], sb[name]), name
    assert not torch.equal(loss_a[0], loss_a[-1])  # the run trained: the comparison means something
