"""`mtkd-fast train`, `train-teacher` and `eval`: config handling, clear errors, and a tiny end-to-end run on the
bundled data with the real model zoo."""

import csv
import json
import os

import pytest
import torch

from mtkd_fast import cli
from mtkd_fast.commands.train import config_from_args
from mtkd_fast.models import create_model

TINY = ["--dataset", "bundled", "--limit-per-class", "2", "--batch-size", "8", "--epochs", "1", "--no-progress",
        "--max-steps-per-epoch", "2"]


def run_cli(argv, capsys):
    rc = cli.main(argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_config_file_and_flag_overrides(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"student": "resnet8", "teachers": ["resnet14", "resnet20"], "epochs": 3, "lr": 0.1}))
    args = cli.build_parser().parse_args(["train", "--config", str(path), "--epochs", "5", "--dynamic",
                                          "--milestones", "2", "4"])
    cfg = config_from_args(args)
    assert (cfg.epochs, cfg.lr, cfg.dynamic, cfg.milestones, cfg.teachers) == (5, 0.1, True,
                                                                               [2, 4], ["resnet14", "resnet20"])
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"studnet": "resnet8"}))
    with pytest.raises(ValueError, match="studnet"):
        config_from_args(cli.build_parser().parse_args(["train", "--config", str(bad)]))


def test_unknown_model_lists_valid_names(capsys, tmp_path):
    rc, _, err = run_cli(["train", "--student", "resnet9", "--teachers", "resnet14", "resnet20",
                          "--out-dir", str(tmp_path)] + TINY, capsys)
    assert rc == 2 and "resnet9" in err and "resnet8x4" in err and "valid names" in err


def test_missing_data_path(capsys, tmp_path):
    rc, _, err = run_cli(["train", "--student", "resnet8", "--teachers", "resnet14", "resnet20", "--dataset",
                          "cifar100", "--data-root", str(tmp_path / "nowhere"), "--out-dir", str(tmp_path)], capsys)
    assert rc == 2 and "nowhere" in err and "no such directory" in err


def test_teachers_with_different_class_counts(capsys, tmp_path):
    paths = []
    for name, k in (("resnet8", 10), ("resnet14", 7)):
        p = tmp_path / f"{name}.pth"
        torch.save({"model": create_model(name, k).state_dict()}, p)
        paths.append(str(p))
    rc, _, err = run_cli(["train", "--student", "resnet8", "--teachers", "resnet8", "resnet14",
                          "--teacher-checkpoints", *paths, "--out-dir", str(tmp_path)] + TINY, capsys)
    assert rc == 2 and "different class counts" in err and "resnet14.pth: 7" in err


def test_eval_checkpoint_mismatch_names_file_and_key(capsys, tmp_path):
    p = tmp_path / "r8.pth"
    torch.save({"model": create_model("resnet8", 10).state_dict()}, p)
    rc, _, err = run_cli(["eval", "--model", "resnet8x4", "--checkpoint", str(p), "--limit-per-class", "1"], capsys)
    assert rc == 2 and "r8.pth" in err and "key" in err
    rc, _, err = run_cli(["eval", "--model", "resnet8", "--checkpoint", str(tmp_path / "none.pth")], capsys)
    assert rc == 2 and "none.pth" in err


@pytest.mark.slow
def test_train_teacher_then_distil_then_eval(capsys, tmp_path):
    """The whole pipeline at toy size: pretrain two teachers, distil with MTKD-RL, resume, evaluate."""
    ckpts = []
    for name in ("resnet8", "resnet14"):
        rc, out, err = run_cli(["train-teacher", "--model", name, "--out-dir", str(tmp_path / name)] + TINY, capsys)
        assert rc == 0, err
        ckpts.append(str(tmp_path / name / "student_best.pth"))
        assert set(torch.load(ckpts[-1], weights_only=True)) == {"model"}
    run_dir = tmp_path / "run"
    base = ["train", "--student", "resnet8", "--teachers", "resnet8", "resnet14", "--teacher-checkpoints", *ckpts,
            "--out-dir", str(run_dir), "--agent-step", "1"] + TINY
    rc, out, err = run_cli(base, capsys)
    assert rc == 0, err
    result = json.loads(out[out.index("{"):])
    assert os.path.isfile(result["csv"]) and os.path.isfile(result["png"]) and os.path.isfile(result["checkpoint"])
    rc, out, err = run_cli(base + ["--epochs", "2", "--resume"], capsys)  # the last flag wins
    assert rc == 0, err
    rows = list(csv.DictReader(open(run_dir / "metrics.csv")))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert float(rows[0]["wl_resnet8"]) == 1.0 and float(rows[1]["wl_resnet8"]) != 1.0  # named by architecture
    rc, out, err = run_cli(["eval", "--model", "resnet8", "--checkpoint", str(run_dir / "student_last.pth"),
                            "--limit-per-class", "2"], capsys)
    assert rc == 0, err
    metrics = json.loads(out[out.index("{"):])
    assert metrics["count"] == 20 and 0 <= metrics["top1"] <= 100
