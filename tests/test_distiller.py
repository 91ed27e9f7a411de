"""``mtkd_fast.Distiller``: a hand-written loop with it follows ``Trainer.fit``'s trajectory exactly, a state_dict
round trip mid-epoch continues bit-identically, the README's loop runs, and ``models.with_features``."""

import copy
import dataclasses
import inspect
import io
import os
import re

import pytest
import torch
import torch.nn.functional as F
from standins import ExactTeachers, make_batches, make_setup

from mtkd_fast import Distiller
from mtkd_fast.agent import MTKDAgent
from mtkd_fast.distiller import _config_options
from mtkd_fast.train import TrainConfig, Trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
F64 = torch.float64
EPOCHS, STEPS, B = 3, 5, 6


def _epoch_batches(epoch):
    batches = make_batches(STEPS, B, dtype=F64, seed=100 + epoch)
    x, y, i = batches[-1]
    batches[-1] = (x[:4], y[:4], i[:4])  # a short last batch, as a loader without drop_last gives
    return batches


def _cfg(strategy, tmp_path, **kw):
    options = dict(student="tiny", teachers=["a", "b", "c"], strategy=strategy, epochs=EPOCHS, agent_step=2,
                   progress=False, schedule="multistep", milestones=[2], lr=0.05, loss_backend="reference",
                   out_dir=str(tmp_path))
    return TrainConfig(**{**options, **kw})


def _setup(strategy):
    student, teachers, transfer, sizes = make_setup(seed=40, dtype=F64)  # dropout on: the RNG order matters
    torch.manual_seed(41)
    agent = MTKDAgent(sizes, 3, dynamic=True).to(F64) if strategy == "mtkd_rl" else None
    return student, teachers, transfer, agent


@pytest.mark.parametrize("strategy", ["mtkd_rl", "camkd"])
def test_own_loop_with_distiller_follows_trainer_fit(strategy, tmp_path):
    student, teachers, transfer, agent = _setup(strategy)
    s2, t2, ft2, a2 = (copy.deepcopy(m) for m in (student, teachers, transfer, agent))
    cfg = _cfg(strategy, tmp_path)
    heads = [t.fc for t in teachers] if strategy == "camkd" else None
    torch.manual_seed(42)
    trainer = Trainer(cfg, student, ExactTeachers(teachers), transfer, agent, teacher_heads=heads)
    trace, agents = [], []
    original_step, original_end = trainer.train_step, trainer.end_epoch
    trainer.train_step = lambda *a, **k: trace.append(original_step(*a, **k)) or trace[-1]

    def end_epoch():
        out = original_end()
        agents.append(copy.deepcopy(trainer.agent.state_dict()) if trainer.agent is not None else None)
        return out

    trainer.end_epoch = end_epoch
    trainer.fit(_epoch_batches, None, str(tmp_path))

    # ---- the user's own loop: their student, their optimiser and schedule, one Distiller
    torch.manual_seed(42)
    distiller = Distiller(strategy, feature_transfer=ft2, agent=a2,
                          teacher_heads=[t.fc for t in t2] if strategy == "camkd" else None,
                          **{name: getattr(cfg, name) for name in _config_options() if name != "strategy"})
    source = ExactTeachers(t2)
    opt = torch.optim.SGD(list(s2.parameters()) + list(distiller.parameters()), lr=cfg.lr, momentum=0.9,
                          nesterov=True, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[2], gamma=0.1)
    mine, my_agents = [], []
    for epoch in range(EPOCHS):
        batches = _epoch_batches(epoch)
        distiller.begin_epoch(epoch, len(batches))
        for x, y, _ in batches:
            t_out = source(x)
            s2.train()
            feats, logits = s2(x, is_feat=True)
            out = distiller(logits, y, t_out, student_map=feats[-2])
            opt.zero_grad()
            out.loss.backward()
            opt.step()
            mine.append(out)
        distiller.end_epoch()
        sched.step()
        my_agents.append(copy.deepcopy(distiller.agent.state_dict()) if distiller.agent is not None else None)

    assert len(trace) == len(mine) == EPOCHS * STEPS
    for n, (a, b) in enumerate(zip(trace, mine)):
        assert torch.equal(a["loss"], b.loss.detach()), n
        assert torch.equal(a["logit_weights"], b.logit_weights), n
        assert torch.equal(a["feature_weights"], b.feature_weights), n
        assert (a["reward"] is None) == (b.reward is None) and (b.reward is None or torch.equal(a["reward"], b.reward))
    for mod_a, mod_b in ((student, s2), (transfer, ft2)):
        for (name, p), (_, q) in zip(mod_a.state_dict().items(), mod_b.state_dict().items()):
            assert torch.equal(p, q), name
    # the weights are per sample and move between epochs: the comparison means something
    later = [o.logit_weights for o in mine[STEPS:]]
    assert all(float(w.std(0).max()) > 1e-6 for w in later)
    if strategy == "mtkd_rl":
        assert distiller.agent is a2 and trainer.agent is agent
        for epoch, (sa, sb) in enumerate(zip(agents, my_agents)):  # after 2-3 agent updates per epoch
            for key in sa:
                assert torch.equal(sa[key], sb[key]), (epoch, key)
        assert not torch.equal(my_agents[0]["steam.0.weight"], my_agents[-1]["steam.0.weight"])
        assert all(o.reward is not None and float(o.reward.max()) > 0 for o in mine)
    else:
        assert float(mine[-1].feature_weights.sum()) > 0 and float(mine[0].feature_weights.abs().sum()) == 0


def _built(seed):
    """A Distiller built from shapes (its own FeatureTransfer and agent), the tiny student and teachers."""
    student, teachers, _, _ = make_setup(seed=50, dtype=F64)
    torch.manual_seed(seed)
    x = make_batches(1, 2, dtype=F64)[0][0]
    distiller = Distiller.from_config(_cfg("mtkd_rl", "unused", agent_update="policy_gradient", agent_step=3),
                                      student, teachers, example_input=x).to(F64)
    opt = torch.optim.SGD(list(student.parameters()) + list(distiller.parameters()), lr=0.05, momentum=0.9)
    return student, ExactTeachers(teachers), distiller, opt


def _run(student, source, distiller, opt, batches):
    losses = []
    for x, y, _ in batches:
        feats, logits = student(x, is_feat=True)
        t = source(x)
        out = distiller(logits, y, t.logits, t.embeddings, feats[-2], t.feature_maps)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.detach())
    return losses


def test_state_dict_round_trip_mid_epoch_continues_bit_identically():
    batches = make_batches(9, 7, dtype=F64, seed=60)
    student, source, distiller, opt = _built(61)
    distiller.begin_epoch(1, steps=9)
    _run(student, source, distiller, opt, batches[:5])  # an update after batch 3; batch 4 waits in the buffer
    assert len(distiller.buffer) == 1 and distiller.step_in_epoch == 5
    buf = io.BytesIO()
    torch.save({"student": student.state_dict(), "distiller": distiller.state_dict(), "opt": opt.state_dict(),
                "rng": torch.get_rng_state()}, buf)
    straight = _run(student, source, distiller, opt, batches[5:])
    distiller.end_epoch()

    student2, source2, distiller2, opt2 = _built(99)  # another agent and transfer init: all must come from the file
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    student2.load_state_dict(saved["student"])
    distiller2.load_state_dict(saved["distiller"])
    opt2.load_state_dict(saved["opt"])
    torch.set_rng_state(saved["rng"])  # the policy-gradient option samples its weights
    assert len(distiller2.buffer) == 1 and distiller2.step_in_epoch == 5 and distiller2.epoch == 1
    resumed = _run(student2, source2, distiller2, opt2, batches[5:])
    distiller2.end_epoch()
    assert all(torch.equal(a, b) for a, b in zip(straight, resumed))
    for a, b in ((student, student2), (distiller, distiller2), (distiller.agent, distiller2.agent)):
        for (name, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items()):
            if torch.is_tensor(p):
                assert torch.equal(p, q), name
    assert torch.equal(distiller.agent.steam[0].weight, distiller2.agent.steam[0].weight)


def test_distiller_options_are_the_train_config_options_with_its_defaults():
    params = inspect.signature(Distiller).parameters
    fields = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    for name in _config_options():
        assert params[name].default == fields[name], name


def test_parameters_hold_the_transfer_not_the_agent():
    student, source, distiller, _ = _built(62)
    names = [n for n, _ in distiller.named_parameters()]
    assert names and all(n.startswith("feature_transfer.") for n in names)
    agent_params = {id(p) for p in distiller.agent.parameters()}
    assert not agent_params & {id(p) for p in distiller.parameters()}
    distiller.float()  # the agent moves with the module
    assert distiller.agent.steam[0].weight.dtype == torch.float32


def test_autocast_losses_and_agent_run_in_float32():
    student, teachers, _, _ = make_setup(seed=63)
    (x, y, _), = make_batches(1, 8, seed=64)
    distiller = Distiller.from_config(_cfg("mtkd_rl", "unused", agent_step=1), student, teachers, example_input=x)
    source = ExactTeachers(teachers)
    distiller.begin_epoch(1)
    for _ in range(2):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            feats, logits = student(x, is_feat=True)
            out = distiller(logits, y, source(x), student_map=feats[-2])
        assert logits.dtype == torch.bfloat16
        assert out.loss.dtype == torch.float32 and out.logit_weights.dtype == torch.float32
        assert out.reward.dtype == torch.float32 and torch.isfinite(out.loss)
        out.loss.backward()
    assert distiller.agent_batches == 2 and distiller.agent.steam[0].weight.dtype == torch.float32  # after batch 1


def test_buffer_grows_for_longer_epochs_and_larger_batches():
    student, source, distiller, opt = _built(65)
    distiller.begin_epoch(1, steps=1)  # sized for one batch of 3; the loop gives more and larger ones
    batches = make_batches(1, 3, dtype=F64, seed=66) + make_batches(2, 8, dtype=F64, seed=67)
    _run(student, source, distiller, opt, batches)
    assert len(distiller.buffer) == 3 and distiller.buffer.batch_size == 8
    assert distiller.end_epoch()["agent_batches"] == 3 and len(distiller.buffer) == 0


def test_distiller_argument_errors():
    with pytest.raises(ValueError, match="^strategy: expected one of"):
        Distiller("mmkd")
    with pytest.raises(ValueError, match="^num_classes, teacher_dims:"):
        Distiller("mtkd_rl")
    with pytest.raises(ValueError, match="^feature_kd:"):
        Distiller("aver", feature_kd="l1")
    with pytest.raises(ValueError, match="^agent_step:"):
        Distiller("aver", agent_step=0)
    with pytest.raises(ValueError, match="^student_map_shape, teacher_map_shapes:"):
        Distiller("aver", student_map_shape=(4, 2, 2))
    with pytest.raises(ValueError, match="^teacher_heads:"):
        Distiller("camkd")
    d = Distiller("aver")
    z, zt, y = torch.randn(3, 5), torch.randn(2, 3, 5), torch.randint(0, 5, (3,))
    with pytest.raises(ValueError, match="^student_map: this Distiller has no feature transfer"):
        d(z, y, zt, student_map=torch.randn(3, 4, 2, 2))
    student, teachers, _, _ = make_setup(seed=68)
    (x, y, _), = make_batches(1, 3, seed=69)
    t_out = ExactTeachers(teachers)(x)
    with pytest.raises(ValueError, match="^teacher_embeddings, teacher_maps: given twice"):
        d(z, y, t_out, t_out.embeddings)
    rl = Distiller("mtkd_rl", num_classes=5, teacher_dims=[6, 8, 7])
    with pytest.raises(ValueError, match="^teacher_embeddings: strategy 'mtkd_rl' needs"):
        rl(student(x), y, t_out.logits)
    with pytest.raises(ValueError, match="^state_dict: saved by a 'aver' Distiller"):
        rl.load_state_dict(d.state_dict())


def test_logits_only_distiller_without_maps():
    d = Distiller("mtkd_rl", num_classes=5, teacher_dims=[4, 3])
    g = torch.Generator().manual_seed(70)
    z = torch.randn(6, 5, generator=g, requires_grad=True)
    zt = torch.randn(2, 6, 5, generator=g)
    emb = [torch.randn(6, 4, generator=g), torch.randn(6, 3, generator=g)]
    y = torch.randint(0, 5, (6,), generator=g)
    d.begin_epoch(1)
    out = d(z, y, zt, emb)
    out.loss.backward()
    assert out.feature_stat is None and torch.equal(out.state.cos, torch.zeros(6, 2))
    # the logit term with the agent's weights, written out: SCE + alpha * mean_i sum_m w_im KL_im
    kl = torch.stack([16 * F.kl_div(F.log_softmax(z / 4, 1), F.log_softmax(zt[m] / 4, 1), reduction="none",
                                    log_target=True).sum(1) for m in range(2)], 1)
    expected = F.cross_entropy(z, y) + (out.logit_weights * kl).mean(0).sum()
    torch.testing.assert_close(out.loss, expected)


def _readme_loop() -> str:
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    section = re.search(r"## MTKD-RL in your own loop\n(.*?)\n## ", text, re.S)
    assert section, "README.md: no 'MTKD-RL in your own loop' section"
    code = re.search(r"```python\n(.*?)```", section.group(1), re.S)
    assert code, "README.md: the section has no python block"
    return code.group(1)


def test_readme_own_loop_example_runs():
    code = _readme_loop()
    assert len(code.strip().splitlines()) <= 22
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)
    distiller = namespace["distiller"]
    assert distiller.agent_batches > 0 or distiller.epoch > 0
    assert distiller.agent is not None


def test_with_features_gives_torchvision_models_the_contract():
    import torchvision

    from mtkd_fast import models

    torch.manual_seed(71)
    net = torchvision.models.resnet18(num_classes=7).eval()
    wrapped = models.with_features(net)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats, logits = wrapped(x, is_feat=True)
        h = net.maxpool(net.relu(net.bn1(net.conv1(x))))
        layer4 = net.layer4(net.layer3(net.layer2(net.layer1(h))))
        torch.testing.assert_close(feats[-2], layer4)
        torch.testing.assert_close(feats[-1], layer4.mean((2, 3)))
        torch.testing.assert_close(logits, net(x))
        torch.testing.assert_close(net.fc(feats[-1]), logits)  # feats[-1] is what the classifier reads
        assert torch.equal(wrapped(x), logits)
        clone = copy.deepcopy(wrapped)  # LiveTeachers copies its teachers: the hook must come along
        torch.testing.assert_close(clone(x, is_feat=True)[0][-2], layer4)
    assert models.with_features(models.create_model("resnet8", 5)).__class__.__name__ != "WithFeatures"

    class Mine(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Sequential(torch.nn.Conv2d(4, 5, 1)))
            self.head = torch.nn.Linear(5, 3)

        def forward(self, x):
            return self.head(self.body(x).amax((2, 3)))

    mine = Mine()
    feats, _ = models.with_features(mine, "body.1", map_fn=torch.relu)(x, is_feat=True)
    torch.testing.assert_close(feats[-2], torch.relu(mine.body(x)))
    with pytest.raises(ValueError, match="^map_layer: cannot tell"):
        models.with_features(Mine())
    with pytest.raises(ValueError, match="^map_layer: Mine has no submodule 'nope'"):
        models.with_features(mine, "nope")


def test_distiller_deepcopies_with_its_agent():
    _, _, distiller, _ = _built(72)
    clone = copy.deepcopy(distiller)
    assert clone.agent is not distiller.agent and clone.strategy.agent is clone.agent
    assert torch.equal(clone.agent.steam[0].weight, distiller.agent.steam[0].weight)
    assert clone.agent_optimizer.param_groups[0]["params"][0] is next(clone.agent.parameters())
