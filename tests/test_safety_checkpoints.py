"""Checkpoints are read weights-only: a file whose pickle runs code is refused before any of it runs, the
trainer's own checkpoints load that way, and broken files give one line naming the file (no traceback)."""

import argparse
import os

import pytest
import torch
from safety_cli import TINY, Marker, one_line_error, run

from mtkd_fast import cli
from mtkd_fast._io import load_torch_file
from mtkd_fast._validation import DataError
from mtkd_fast.models import create_model
from mtkd_fast.train.checkpoint import load_checkpoint_file, rng_state, set_rng_state


def _evil(path, marker):
    torch.save({"model": create_model("resnet8", 10).state_dict(), "hook": Marker(str(marker))}, path)


def test_eval_refuses_code_in_checkpoint(tmp_path):
    evil, marker = tmp_path / "evil.pth", tmp_path / "pwned"
    _evil(evil, marker)
    proc = run(["eval", "--model", "resnet8", "--checkpoint", evil, "--limit-per-class", "1"])
    assert not marker.exists(), "the checkpoint's pickle ran"
    err = one_line_error(proc)
    assert proc.returncode == 1 and "evil.pth" in err and "--trust-checkpoint" in err and "trusted=True" not in err


def test_resume_refuses_code_in_checkpoint_last(tmp_path, capsys):
    out, marker = tmp_path / "run", tmp_path / "pwned"
    out.mkdir()
    torch.save({"student": {}, "optimizer": {}, "scheduler": {}, "epoch": 1, "rng": Marker(str(marker))},
               out / "checkpoint_last.pt")
    rc = cli.main(["train", "--strategy", "none", "--out-dir", str(out), "--resume", "--epochs", "2"] + TINY)
    err = capsys.readouterr().err.strip()
    assert not marker.exists(), "the checkpoint's pickle ran"
    assert rc == 1 and "checkpoint_last.pt" in err and "--trust-checkpoint" in err and len(err.splitlines()) == 1


def test_teacher_checkpoint_with_objects_is_refused_unless_trusted(tmp_path, capsys):
    # a legacy teacher file holding its training options (an argparse.Namespace) besides the weights
    legacy = tmp_path / "legacy.pth"
    torch.save({"model": create_model("resnet8", 10).state_dict(), "opt": argparse.Namespace(lr=0.05)}, legacy)
    base = ["train", "--student", "resnet8", "--teachers", "resnet8", "resnet8", "--teacher-checkpoints", str(legacy),
            str(legacy), "--strategy", "aver", "--epochs", "1"] + TINY
    rc = cli.main(base + ["--out-dir", str(tmp_path / "a")])
    err = capsys.readouterr().err
    assert rc == 1 and "legacy.pth" in err and "--trust-checkpoint" in err and "trusted=True" not in err
    rc = cli.main(base + ["--out-dir", str(tmp_path / "b"), "--trust-checkpoint"])
    assert rc == 0, capsys.readouterr().err
    # the same file in `cache build`, and in `eval` (through the console script)
    rc = cli.main(["cache", "build", "--out", str(tmp_path / "c"), "--teachers", "resnet8", "--checkpoints",
                   str(legacy), "--limit-per-class", "1", "--no-progress", "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 1 and "--trust-checkpoint" in err and "trusted=True" not in err
    proc = run(["eval", "--model", "resnet8", "--checkpoint", legacy, "--limit-per-class", "1", "--trust-checkpoint"])
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("content", [b"", b"this is not a checkpoint\n" * 10, "truncated"])
def test_broken_checkpoint_one_line_naming_file(tmp_path, capsys, content):
    bad = tmp_path / "bad.pth"
    if content == "truncated":
        torch.save({"model": create_model("resnet8", 10).state_dict()}, bad)
        bad.write_bytes(bad.read_bytes()[: os.path.getsize(bad) // 2])
    else:
        bad.write_bytes(content)
    with pytest.raises(DataError, match="bad.pth"):
        load_torch_file(str(bad))
    rc = cli.main(["eval", "--model", "resnet8", "--checkpoint", str(bad), "--limit-per-class", "1"])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and "bad.pth" in err and len(err.splitlines()) == 1
    rc = cli.main(["train", "--student", "resnet8", "--teachers", "resnet8", "resnet8", "--teacher-checkpoints",
                   str(bad), str(bad), "--out-dir", str(tmp_path / "t"), "--epochs", "1"] + TINY)
    err = capsys.readouterr().err.strip()
    assert rc == 1 and "bad.pth" in err and len(err.splitlines()) == 1


def test_training_checkpoint_loads_weights_only(tmp_path, capsys):
    out = tmp_path / "run"
    rc = cli.main(["train", "--student", "resnet8", "--teachers", "resnet8", "resnet8", "--strategy", "mtkd_rl",
                   "--out-dir", str(out), "--epochs", "1", "--agent-step", "1"] + TINY)
    assert rc == 0, capsys.readouterr().err
    for name in ("checkpoint_last.pt", "checkpoint_best.pt", "student_best.pth"):
        state = torch.load(out / name, map_location="cpu", weights_only=True)
        assert isinstance(state, dict)
    assert isinstance(state["model"], dict)
    ckpt = load_checkpoint_file(str(out / "checkpoint_last.pt"), require_training=True)
    assert ckpt["config"]["teachers"] == ["resnet8", "resnet8"] and isinstance(ckpt["config"], dict)


def test_rng_state_round_trips_through_weights_only(tmp_path):
    import random

    import numpy as np

    np.random.seed(7)
    np.random.standard_normal()  # a cached gaussian in the state
    random.seed(3)
    torch.save(rng_state(), tmp_path / "rng.pt")
    expect = (random.random(), float(np.random.standard_normal()), float(np.random.rand()), float(torch.rand(())))
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    got = (random.random(), float(np.random.standard_normal()), float(np.random.rand()), float(torch.rand(())))
    assert got == expect


def test_not_a_training_checkpoint_is_named(tmp_path):
    p = tmp_path / "weights.pth"
    torch.save({"model": create_model("resnet8", 10).state_dict()}, p)
    with pytest.raises(DataError, match="weights.pth.*not a training checkpoint"):
        load_checkpoint_file(str(p), require_training=True)
