"""``mtkd_fast.train.step.distill_step``: the state -> weights -> loss -> reward sequence the trainer runs (and
benchmarks/bench_ops.py times), on the fused backend against the reference backend in float64, and the
trainer's fused path running on kernels only."""

import pytest
import torch
from standins import make_batches, make_setup

from mtkd_fast import ops
from mtkd_fast import reference as ref
from mtkd_fast.agent import MTKDAgent
from mtkd_fast.teachers import LiveTeachers
from mtkd_fast.train import TrainConfig, Trainer
from mtkd_fast.train.step import distill_step

pytestmark = pytest.mark.skipif(not ops.available("cpu"), reason="compiled extension not built (make build)")

F64 = torch.float64


def _inputs(B=7, K=9, shapes=((5, 4, 4), (3, 2, 2), (6, 1, 3)), seed=0):
    g = torch.Generator().manual_seed(seed)
    zs = (3 * torch.randn(B, K, generator=g, dtype=F64)).requires_grad_(True)
    zt = 3 * torch.randn(len(shapes), B, K, generator=g, dtype=F64)
    y = torch.randint(0, K, (B,), generator=g)
    gs = [torch.randn(B, *s, generator=g, dtype=F64).requires_grad_(True) for s in shapes]
    fs = [torch.randn(B, *s, generator=g, dtype=F64) for s in shapes]
    emb = [torch.randn(B, s[0], generator=g, dtype=F64) for s in shapes]
    pi = torch.softmax(torch.randn(B, len(shapes), generator=g, dtype=F64), 1)
    return zs, zt, y, gs, fs, emb, pi


def _weights(pi):
    def choose(tce, state):  # the agent's action for fixed policy outputs: reads the whole state
        wl, wf = ref.action(pi, pi.flip(1), state.teacher_ce, state.kl, state.cos)
        return wl, wf, None

    return choose


@pytest.mark.parametrize("feature_kd", ["mse", "kl", None])
def test_fused_and_reference_backends_agree(feature_kd):
    zs, zt, y, gs, fs, emb, pi = _inputs(seed=1)
    results = {}
    for backend in ("fused", "reference"):
        maps = None if feature_kd is None else gs
        out = distill_step(zs, maps, y, zt, emb, fs if maps is not None else None, _weights(pi), temperature=3.0,
                           alpha=0.7, beta=2.0, feature_kd=feature_kd or "mse", backend=backend)
        grads = torch.autograd.grad(out.loss, [zs] + (gs if maps is not None else []))
        results[backend] = (out, grads)
    (a, ga), (b, gb) = results["fused"], results["reference"]
    for name in ("loss", "per_sample_loss", "reward", "logit_weights", "feature_weights", "student_ce", "kl",
                 "feature_stat"):
        x, z = getattr(a, name), getattr(b, name)
        assert (x is None) == (z is None), name
        if x is not None:
            torch.testing.assert_close(x, z, rtol=1e-10, atol=1e-12, msg=lambda m: f"{name}: {m}")
    torch.testing.assert_close(a.state.features, b.state.features, rtol=1e-10, atol=1e-12)
    for x, z in zip(ga, gb):
        torch.testing.assert_close(x, z, rtol=1e-10, atol=1e-12)
    assert float(a.reward.max()) > 0
    if feature_kd is None:  # no maps: the state's cosine is 0
        assert torch.equal(a.state.cos, torch.zeros_like(a.state.cos))


def test_fused_backend_reads_no_reference_statistics(monkeypatch):
    # the fused path is kernels end to end: the reference's statistics and reward are never called
    def refuse(*args, **kwargs):
        raise AssertionError("a reference statistic was called on the fused path")

    for name in ("agent_stats", "kl_per_sample", "teacher_cross_entropy", "pooled_cosine", "mtkd_logit_kd",
                 "mtkd_feature_kd", "per_sample_loss", "normalized_reward"):
        monkeypatch.setattr(ref, name, refuse)
    zs, zt, y, gs, fs, emb, pi = _inputs(seed=2)
    out = distill_step(zs, gs, y, zt, emb, fs, _weights(pi), backend="fused")
    out.loss.backward()
    assert out.reward is not None and zs.grad is not None
    with pytest.raises(AssertionError, match="reference statistic"):
        distill_step(zs, gs, y, zt, emb, fs, _weights(pi), backend="reference")


def test_trainer_fused_step_takes_the_reward_from_the_loss_op():
    student, teachers, transfer, sizes = make_setup(seed=20)
    student.drop.p = 0.0
    torch.manual_seed(21)
    cfg = TrainConfig(student="tiny", teachers=["t0", "t1", "t2"], strategy="mtkd_rl", loss_backend="fused",
                      progress=False, agent_step=5)
    trainer = Trainer(cfg, student, LiveTeachers(teachers), transfer, MTKDAgent(sizes, 3))
    trainer.begin_epoch(1, steps=2)
    (x, y, idx), = make_batches(1, 8, seed=22)
    calls = []
    original = ops.per_sample_loss_and_reward

    def spy(*args, **kwargs):
        calls.append(original(*args, **kwargs))
        return calls[-1]

    import mtkd_fast.ops as ops_module

    ops_module.per_sample_loss_and_reward = spy
    try:
        out = trainer.train_step(x, y, idx, 1)
    finally:
        ops_module.per_sample_loss_and_reward = original
    assert len(calls) == 1
    assert out["reward"] is calls[0].reward  # no second normalisation of the per-sample loss
    assert len(trainer.buffer) == 1


def test_trainer_fused_path_calls_nothing_in_reference(monkeypatch):
    # every function of mtkd_fast.reference refuses to run; the trainer's fused MTKD-RL steps, the agent update
    # and the epoch's diagnostics still run (the agent's maths lives in mtkd_fast.agent)
    import inspect

    def refuse(*args, **kwargs):
        raise AssertionError("mtkd_fast.reference was called on the fused path")

    for name in ref.__all__:
        if inspect.isfunction(getattr(ref, name)):
            monkeypatch.setattr(ref, name, refuse)
    student, teachers, transfer, sizes = make_setup(seed=30)
    cfg = TrainConfig(student="tiny", teachers=["t0", "t1", "t2"], strategy="mtkd_rl", loss_backend="fused",
                      progress=False, agent_step=2)
    trainer = Trainer(cfg, student, LiveTeachers(teachers), transfer, MTKDAgent(sizes, 3))
    trainer.begin_epoch(1, steps=3)
    for b, (x, y, idx) in enumerate(make_batches(3, 8, seed=31)):
        trainer.train_step(x, y, idx, b + 1)
    metrics = trainer.end_epoch()
    assert metrics["agent_loss"] == metrics["agent_loss"] and metrics["diag_policy_wl"] >= 0  # updated, diagnosed
    with pytest.raises(AssertionError, match="reference was called"):
        ref.agent_stats()


def test_train_package_imports_reference_only_for_its_reference_backend():
    # static check of the same: the one import of mtkd_fast.reference under mtkd_fast/train/ (and in
    # mtkd_fast/agent.py, mtkd_fast/step.py, mtkd_fast/distiller.py) is distill_step's backend="reference" branch
    import ast
    import pathlib

    import mtkd_fast

    root = pathlib.Path(mtkd_fast.__file__).parent
    found = []
    for path in sorted((root / "train").glob("*.py")) + [root / "agent.py", root / "step.py", root / "distiller.py"]:
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""] + [a.name for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            if any(n == "reference" or n.endswith(".reference") for n in names):
                found.append((path.name, node.col_offset > 0))
    assert found == [("step.py", True)], found
