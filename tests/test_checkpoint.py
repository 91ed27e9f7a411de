"""Atomic checkpoints and exact resume: 2 epochs straight == 1 epoch + resume + 1 epoch, bit for bit (CPU)."""

import csv
import os

import pytest
import torch
from standins import TinyNet, make_batches, make_setup

from mtkd_fast.agent import MTKDAgent
from mtkd_fast.teachers import LiveTeachers
from mtkd_fast.train import TrainConfig, Trainer
from mtkd_fast.train.checkpoint import load_checkpoint_file, load_module_state, save_atomic

DATA = make_batches(12, 6, seed=21)


def epoch_loader(epoch):
    order = torch.randperm(len(DATA), generator=torch.Generator().manual_seed(100 + epoch))
    return [DATA[i] for i in order[:5]]


def val_loader():
    return DATA[:3]


def build(out_dir, epochs, strategy="mtkd_rl", **kw):
    student, teachers, transfer, sizes = make_setup(seed=20)  # dropout on: the RNG state matters
    agent = MTKDAgent(sizes, 3, dynamic=True)
    cfg = TrainConfig(student="tiny", teachers=["a", "b", "c"], strategy=strategy, epochs=epochs, agent_step=2,
                      progress=False, out_dir=str(out_dir), schedule="multistep", milestones=[1], lr=0.05,
                      loss_backend="reference", **kw)
    heads = [t.fc for t in teachers] if strategy == "camkd" else None
    return Trainer(cfg, student, LiveTeachers(teachers), transfer, agent if strategy == "mtkd_rl" else None,
                   teacher_heads=heads), student


@pytest.mark.parametrize("strategy,kw", [("mtkd_rl", {}), ("camkd", {"feature_kd": "kl"})])
def test_resume_is_bit_identical(tmp_path, strategy, kw):
    torch.manual_seed(0)
    straight, s_straight = build(tmp_path / "a", 2, strategy, **kw)
    res = straight.fit(epoch_loader, val_loader())

    torch.manual_seed(0)
    first, _ = build(tmp_path / "b", 1, strategy, **kw)
    first.fit(epoch_loader, val_loader())
    torch.manual_seed(123)  # whatever happens in between, resume restores every RNG
    torch.rand(7)
    resumed, s_resumed = build(tmp_path / "b", 2, strategy, **kw)
    resumed.resume(str(tmp_path / "b" / "checkpoint_last.pt"))
    assert resumed.start_epoch == 1
    res2 = resumed.fit(epoch_loader, val_loader())

    for (k, a), (_, b) in zip(s_straight.state_dict().items(), s_resumed.state_dict().items()):
        assert torch.equal(a, b), k
    for mod_a, mod_b in ((straight.feature_transfer, resumed.feature_transfer), (straight.agent, resumed.agent)):
        if mod_a is not None:
            for (k, a), (_, b) in zip(mod_a.state_dict().items(), mod_b.state_dict().items()):
                assert torch.equal(a, b), k
    assert straight.optimizer.param_groups[0]["lr"] == resumed.optimizer.param_groups[0]["lr"] == pytest.approx(0.005)
    # the CSV carries on across the resume
    rows = list(csv.DictReader(open(res2["csv"])))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert rows[1]["val_top1"] == list(csv.DictReader(open(res["csv"])))[1]["val_top1"]
    if strategy == "mtkd_rl":
        assert float(rows[0]["wl_a"]) == 1.0 and float(rows[1]["wl_a"]) < 1.0  # warm-up, then the agent
        assert os.path.getsize(res2["png"]) > 1000


def test_checkpoint_contents(tmp_path):
    trainer, _ = build(tmp_path, 1)
    trainer.fit(epoch_loader, val_loader())
    ckpt = load_checkpoint_file(str(tmp_path / "checkpoint_last.pt"))
    for key in ("student", "feature_transfer", "agent", "optimizer", "agent_optimizer", "scheduler", "rng", "epoch",
                "best_top1", "config", "history"):
        assert key in ckpt, key
    assert ckpt["epoch"] == 1 and "steam.0.weight" in ckpt["agent"]
    student_file = torch.load(tmp_path / "student_best.pth", weights_only=True)
    assert set(student_file) == {"model"}
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp_")]  # no temporary files left behind


def test_atomic_save_keeps_old_file_on_failure(tmp_path):
    path = str(tmp_path / "c.pt")
    save_atomic({"x": torch.ones(2)}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        save_atomic({"x": Unpicklable()}, path)
    assert torch.equal(torch.load(path)["x"], torch.ones(2))
    assert os.listdir(tmp_path) == ["c.pt"]


def test_mismatched_checkpoint_names_file_and_key(tmp_path):
    trainer, _ = build(tmp_path, 1)
    trainer.fit(epoch_loader, val_loader())
    path = str(tmp_path / "checkpoint_last.pt")
    ckpt = load_checkpoint_file(path)
    with pytest.raises(ValueError, match=r"checkpoint_last\.pt.*'fc\.weight'"):
        load_module_state(TinyNet(num_classes=7, width=5), ckpt["student"], path, "student")
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        trainer.resume(str(tmp_path / "nope.pt"))
