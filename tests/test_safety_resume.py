"""Resuming refuses a run that differs from its checkpoint in what defines it (naming the field), and a new
number of epochs refits a cosine schedule instead of running at the old schedule's learning rates."""

import csv
import json
import math

import pytest
import torch
from safety_cli import TINY, error_line

from mtkd_fast import cli
from mtkd_fast.models import create_model


@pytest.fixture(scope="module")
def teacher_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("teachers")
    paths = []
    for seed, arch in ((1, "resnet8"), (2, "resnet14"), (3, "resnet8")):
        torch.manual_seed(seed)
        p = d / f"{arch}_{seed}.pth"
        torch.save({"model": create_model(arch, 10).state_dict()}, p)
        paths.append(str(p))
    return paths  # the run's two teachers, and another resnet8


@pytest.fixture(scope="module")
def finished(tmp_path_factory, teacher_files):
    out = tmp_path_factory.mktemp("run") / "r"
    args = ["train", "--student", "resnet8", "--teachers", "resnet8", "resnet14", "--teacher-checkpoints",
            teacher_files[0], teacher_files[1], "--strategy", "aver", "--epochs", "1", "--out-dir", str(out)] + TINY
    return out, args


@pytest.mark.parametrize("change,field", [
    (lambda a, t: a + ["--teachers", "resnet14", "resnet8", "--teacher-checkpoints", t[1], t[0]], "teachers"),
    (lambda a, t: _swap(a, t[0], t[2]), "teacher_checkpoints[0]"),  # another file of the same architecture
    (lambda a, t: a + ["--student", "resnet14"], "student"),
    (lambda a, t: a + ["--strategy", "camkd"], "strategy"),
    (lambda a, t: a + ["--limit-per-class", "3"], "limit_per_class"),
    (lambda a, t: a + ["--schedule", "cosine"], "schedule"),
    # ignored before (the restored optimiser / agent won) but recorded as the new values in config.json
    (lambda a, t: a + ["--weight-decay", "0.001"], "weight_decay"),
    (lambda a, t: a + ["--momentum", "0.5"], "momentum"),
    (lambda a, t: a + ["--no-nesterov"], "nesterov"),
    (lambda a, t: a + ["--agent-lr", "0.5"], "agent_lr"),
    # applied without a word before
    (lambda a, t: a + ["--temperature", "2"], "temperature"),
    (lambda a, t: a + ["--alpha", "0.5"], "alpha"),
    (lambda a, t: a + ["--beta", "1"], "beta"),
    (lambda a, t: a + ["--agent-step", "5"], "agent_step"),
    (lambda a, t: a + ["--seed", "3"], "seed"),
    (lambda a, t: a + ["--teacher-precision", "bf16"], "teacher_precision"),
    (lambda a, t: a + ["--batch-size", "4"], "batch_size"),
])
def test_resume_refuses_another_run(finished, teacher_files, capsys, change, field):
    out, args = finished
    if not (out / "checkpoint_last.pt").exists():
        assert cli.main(args) == 0
    before = (out / "checkpoint_last.pt").read_bytes()
    capsys.readouterr()
    rc = cli.main(change(list(args), teacher_files) + ["--resume", "--epochs", "2"])
    err = error_line(capsys.readouterr().err)  # after the run's log lines, if any: one line
    assert rc == 2 and err.startswith(f"mtkd-fast train: error: {field}:"), err
    assert (out / "checkpoint_last.pt").read_bytes() == before


def _swap(args, a, b):
    return [b if x == a else a if x == b else x for x in args]


def test_resume_with_more_epochs_refits_cosine(tmp_path, capsys):
    out = tmp_path / "run"
    base = ["train", "--student", "resnet8", "--strategy", "none", "--schedule", "cosine", "--lr", "0.05",
            "--out-dir", str(out)] + TINY
    assert cli.main(base + ["--epochs", "3"]) == 0
    capsys.readouterr()
    assert cli.main(base + ["--epochs", "5", "--resume"]) == 0
    text = capsys.readouterr().err  # a log line: stderr
    assert "epochs changed from 3" in text and "refitted to 5 epochs" in text
    lrs = [float(r["lr"]) for r in csv.DictReader(open(out / "metrics.csv"))]
    expect = [0.05 * (1 + math.cos(math.pi * e / 5)) / 2 for e in range(5)]
    assert lrs[:3] == pytest.approx([0.05 * (1 + math.cos(math.pi * e / 3)) / 2 for e in range(3)])
    assert lrs[3:] == pytest.approx(expect[3:], rel=1e-9)  # 0.0095, 0.0024: not 0 and 0.0125



def test_every_option_has_one_resume_rule_and_the_docs_table_lists_it():
    import dataclasses
    import os
    import re

    from mtkd_fast.train import TrainConfig
    from mtkd_fast.train.trainer import RESUME_APPLIED, RESUME_CONTROL, RESUME_FIXED

    fields = [f.name for f in dataclasses.fields(TrainConfig)]
    groups = list(RESUME_FIXED) + list(RESUME_APPLIED) + list(RESUME_CONTROL)
    assert sorted(groups) == sorted(fields)  # each field exactly once
    doc = open(os.path.join(os.path.dirname(__file__), "..", "docs", "safety.md")).read()
    rows = {row.split("|")[1].strip(): set(re.findall(r"`([a-z_0-9]+)`", row.split("|")[2]))
            for row in doc.splitlines() if row.startswith("| ") and row.count("|") == 4}
    assert rows["refused if different"] == set(RESUME_FIXED)
    assert rows["applied"] == set(RESUME_APPLIED)
    assert rows["command only"] == set(RESUME_CONTROL)


def test_resume_of_a_finished_run_keeps_config_json(finished, capsys):
    out, args = finished
    if not (out / "checkpoint_last.pt").exists():
        assert cli.main(args) == 0
    config_before = (out / "config.json").read_bytes()
    ckpt_before = (out / "checkpoint_last.pt").read_bytes()
    capsys.readouterr()
    # 1 of 1 epochs done: exit 0 (a script's `--resume` after the end succeeds), one line saying what to pass, and
    # the run's result on stdout with its last epoch as "final" (not "final": {})
    assert cli.main(args + ["--resume", "--log-every", "7"]) == 0
    got = capsys.readouterr()
    lines = [line for line in got.err.splitlines() if "already at" in line]
    assert lines == [f"resume: {out} is already at 1/1 epochs; nothing to train: pass --epochs M (M > 1) to continue"]
    result = json.loads(got.out)
    assert result["final"]["epoch"] == 1 and result["final"]["val_top1"] == result["best_top1"]
    assert (out / "config.json").read_bytes() == config_before
    assert (out / "checkpoint_last.pt").read_bytes() == ckpt_before


def test_resume_applies_and_records_a_run_option(tmp_path, capsys):
    import json

    out = tmp_path / "run"
    base = ["train", "--student", "resnet8", "--strategy", "none", "--out-dir", str(out)] + TINY
    assert cli.main(base + ["--epochs", "1"]) == 0
    capsys.readouterr()
    assert cli.main(base + ["--epochs", "2", "--resume", "--eval-every", "2"]) == 0
    assert "resume: applying the new eval_every 1 -> 2 from epoch 2" in capsys.readouterr().err
    assert json.loads((out / "config.json").read_text())["eval_every"] == 2


def test_resume_from_config_json_of_a_run_started_with_overwrite(tmp_path, capsys):
    """config.json stores resume/overwrite off: `--config RUN/config.json --resume` is not `--resume --overwrite`."""
    out = tmp_path / "run"
    base = ["train", "--student", "resnet8", "--strategy", "none", "--out-dir", str(out)] + TINY
    assert cli.main(base + ["--epochs", "1"]) == 0
    assert cli.main(base + ["--epochs", "1", "--overwrite"]) == 0
    capsys.readouterr()
    assert cli.main(["train", "--config", str(out / "config.json"), "--epochs", "2", "--resume"]) == 0, \
        capsys.readouterr().err
    assert torch.load(out / "checkpoint_last.pt", weights_only=True)["epoch"] == 2
