"""`mtkd-fast bench epoch` and the authors'-way baseline it measures against.

- The baseline is fair only if it does the same maths: the authors'-way step
  (``mtkd_fast.bench.authors.AuthorsMTKDRL``) must give the loss, teacher weights and reward of mtkd_fast's
  ``Trainer.train_step`` on the same models and batch,
  and its agent update the same agent; its loss must also equal ``authors_step``'s for the same
  weights (the phases it shares with that function).
- A tiny run of the CLI writes the table, CSV (in the benchmarks' one schema), JSON and PNG with finite numbers.
"""

from __future__ import annotations

import copy
import csv
import json
import math
import os

import torch

from mtkd_fast import models
from mtkd_fast.agent import MTKDAgent
from mtkd_fast.bench.authors import AuthorsMTKDRL, authors_step
from mtkd_fast.bench.record import COLUMNS
from mtkd_fast.cli import main
from mtkd_fast.teachers import LiveTeachers
from mtkd_fast.train import TrainConfig, Trainer

K = 10
B = 13


def _parts(seed=0):
    torch.manual_seed(seed)
    student = models.create_model("resnet8", K)
    teachers = [models.create_model(n, K).eval().requires_grad_(False) for n in ("resnet14", "resnet8x4")]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = LiveTeachers(teachers)(x)
        student.eval()
        s_shape = tuple(student(x, is_feat=True)[0][-2].shape[1:])
    ft = models.FeatureTransfer(student_shape=s_shape, teacher_shapes=[tuple(f.shape[1:]) for f in out.feature_maps])
    agent = MTKDAgent([int(e.shape[1]) + K + 3 for e in out.embeddings], len(teachers))
    return student, teachers, ft, agent


def _batches(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(B, 3, 32, 32, generator=g), torch.randint(0, K, (B,), generator=g)) for _ in range(n)]


def test_authors_way_matches_mtkd_fast_step_and_agent_update():
    student, teachers, ft, agent = _parts()
    cfg = TrainConfig(student="resnet8", teachers=["resnet14", "resnet8x4"], strategy="mtkd_rl", batch_size=B,
                      device="cpu", progress=False)
    ours = Trainer(cfg, copy.deepcopy(student), LiveTeachers(teachers, precision="fp32", fold_bn=False),
                   copy.deepcopy(ft), copy.deepcopy(agent))
    theirs = AuthorsMTKDRL(copy.deepcopy(student), teachers, copy.deepcopy(ft), copy.deepcopy(agent))
    batches = _batches(3)
    for epoch in (0, 1):  # warm-up (all-ones weights) then the agent's weights
        ours.begin_epoch(epoch, len(batches))
        theirs.begin_epoch(epoch)
        for i, (x, y) in enumerate(batches):
            a = ours.train_step(x, y, torch.arange(B), 0)
            b = theirs.train_step(x, y)
            where = f"epoch {epoch} step {i}"
            torch.testing.assert_close(a["loss"], b["loss"], rtol=2e-4, atol=1e-5, msg=where)
            torch.testing.assert_close(a["logit_weights"], b["logit_weights"], rtol=1e-4, atol=1e-6, msg=where)
            torch.testing.assert_close(a["feature_weights"], b["feature_weights"], rtol=1e-4, atol=1e-6, msg=where)
            torch.testing.assert_close(a["reward"], b["reward"], rtol=1e-3, atol=1e-4, msg=where)
            assert float(b["reward"].max()) > 0  # a reward that is all zeros would compare trivially
        ours.end_epoch()
        theirs.end_epoch()
        for (name, p), q in zip(ours.agent.named_parameters(), theirs.agent.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6, msg=f"agent {name} after epoch {epoch}")
    assert not torch.equal(ours.agent.steam[0].weight, agent.steam[0].weight)  # the agent did move


def test_authors_way_loss_is_authors_step_loss():
    """The step's three phases are authors_step's: same loss and reward for the same weights."""
    student, teachers, ft, agent = _parts(seed=3)
    (x, y), = _batches(1, seed=4)
    run = AuthorsMTKDRL(copy.deepcopy(student), teachers, copy.deepcopy(ft), agent)
    run.begin_epoch(1)
    # the same forward as the step's (train-mode BatchNorm uses batch statistics: same outputs)
    s, f = copy.deepcopy(student).train(), copy.deepcopy(ft).train()
    feats, logits = s(x, is_feat=True)
    maps = f.forward_plain(feats[-2])
    with torch.no_grad():
        t_out = [t(x, is_feat=True) for t in teachers]
    got = run.train_step(x, y)
    ref = authors_step(logits, [z for _, z in t_out], y, maps, [fs[-2] for fs, _ in t_out],
                       [fs[-1] for fs, _ in t_out], got["logit_weights"], got["feature_weights"])
    torch.testing.assert_close(got["loss"], ref.loss.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got["reward"], ref.reward, rtol=1e-5, atol=1e-6)
    assert len(run.memory) == 1 and run.memory[0][0].dtype == torch.float32  # the growing float32 list


def _read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_bench_epoch_cli_writes_table_csv_png(tmp_path, capsys):
    out = tmp_path / "bench"
    rc = main(["bench", "epoch", "--students", "resnet8", "--teachers", "resnet8", "resnet14", "--steps", "1",
               "--repetitions", "2", "--batch-size", "5", "--memory-steps", "0", "--threads", "1", "--no-progress",
               "--out", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "MTKD-RL, authors' way" in text and "teacher cache build" in text
    # a user's run: the table and the ratios only; the project's targets are a development check (--targets)
    assert "targets" not in text and "NOT met" not in text and "targets" not in (out / "epoch_bench.md").read_text()
    from mtkd_fast.bench import format_table

    result = json.loads((out / "epoch_bench.json").read_text())
    with_targets = format_table(result, targets=True)
    assert with_targets.startswith(format_table(result)) and "\ntargets:\n" in with_targets
    assert len(result["targets"]) == 5 and with_targets.count(" -> ") == 5
    rows = _read_csv(out / "epoch_bench.csv")
    assert [r["variant"] for r in rows] == ["student_only", "aver", "ebkd", "camkd", "mtkd_rl_authors", "mtkd_rl_live",
                                           "mtkd_rl_cached"]
    for r in rows:
        for key in ("median_s", "images_per_s", "time_x_student_only", "time_x_aver"):
            assert math.isfinite(float(r[key])) and float(r[key]) > 0, (r["variant"], key, r[key])
        assert int(r["images"]) == 5 and r["torch"] == torch.__version__ and r["commit"]
        assert len(r["times_s"].split()) == 2 and r["harness"] == "mtkd-fast bench epoch"
        assert float(r["min_s"]) <= float(r["p25_s"]) <= float(r["median_s"]) <= float(r["p75_s"]) <= float(r["max_s"])
        assert r["benchmark"] == "epoch" and r["case"] == "cifar resnet8" and r["baseline"] == "student_only"
        assert r["median_x_baseline"] == r["time_x_student_only"]
        assert json.loads(r["extra"])["student"] == "resnet8"
    with open(out / "epoch_bench.csv") as f:  # the benchmarks' one schema (mtkd_fast.bench.record)
        assert f.readline().strip().split(",") == list(COLUMNS)
    assert float(rows[0]["time_x_student_only"]) == 1.0 and float(rows[1]["time_x_aver"]) == 1.0
    with open(out / "epoch_bench.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.path.getsize(out / "epoch_bench.json") > 0 and (out / "epoch_bench.md").read_text().startswith("cpu")


def test_bench_epoch_peak_memory_in_fresh_processes(tmp_path, capsys):
    out = tmp_path / "bench"
    rc = main(["bench", "epoch", "--students", "resnet8", "--teachers", "resnet8", "resnet14", "--steps", "1",
               "--repetitions", "1", "--batch-size", "4", "--memory-steps", "1", "--threads", "1", "--no-progress",
               "--configs", "aver", "mtkd_rl_cached", "--out", str(out)])
    assert rc == 0
    rows = _read_csv(out / "epoch_bench.csv")
    for r in rows:
        # a python process with torch imported holds well over 50 MiB; one that size is not a real measurement
        assert 50 < float(r["peak_rss_mib"]) < 20000, r
    assert math.isnan(float(rows[0]["time_x_student_only"]))  # student-only was not run: no ratio to it


def test_bench_epoch_bad_input(capsys):
    assert main(["bench", "epoch", "--students", "nope", "--out", "/tmp/unused"]) == 2
    assert "students: unknown model 'nope'" in capsys.readouterr().err
    assert main(["bench", "epoch", "--steps", "0"]) == 2
    assert "steps: expected a positive integer" in capsys.readouterr().err
