"""A run's saved config.json reproduces it bit for bit with the same thread count (issue 27): the demo and
`mtkd-fast train` build student, feature transfer and agent through one function in one order
(``mtkd_fast.train.run.build_student_side``), and a demo run of any seed trains on the augmentation seed its
cache was built for (``data_seed``)."""

import glob
import json
import os

import pytest
import torch

from mtkd_fast.cli import main
from mtkd_fast.demo import DemoSettings, run_demo

pytestmark = pytest.mark.usefixtures("one_thread")


def _weights(run_dir):
    return torch.load(os.path.join(run_dir, "student_last.pth"), weights_only=True)["model"]


def _assert_same_weights(a, b):
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def _train_losses(run_dir):
    with open(os.path.join(run_dir, "metrics.csv")) as f:
        header, *rows = [line.strip().split(",") for line in f]
    col = header.index("train_loss")
    return [r[col] for r in rows]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("repro")
    out = str(root / "out")
    # seed 1: a seed other than the cache's augmentation seed (data_seed 0)
    run_demo(DemoSettings.quick(seeds=(1,), methods=("none", "aver", "mtkd_rl"), device="cpu"), out_dir=out,
             teacher_dir=str(root / "teachers"))
    return out


@pytest.mark.parametrize("method", ["mtkd_rl", "aver", "none"])
def test_a_demo_run_reruns_from_its_saved_config(demo, method, tmp_path, capsys):
    run_dir = os.path.join(demo, "runs", method, "seed1")
    with open(os.path.join(run_dir, "config.json")) as f:
        saved = json.load(f)
    assert saved["seed"] == 1 and saved["data_seed"] == 0
    checkpoints = sorted(glob.glob(os.path.join(demo, "teachers", "*.pth")))
    argv = ["train", "--config", os.path.join(run_dir, "config.json"), "--out-dir", str(tmp_path / "rerun"),
            "--no-progress"]
    if method != "none":
        argv += ["--teacher-checkpoints", *checkpoints]
    assert main(argv) == 0, capsys.readouterr().err
    _assert_same_weights(run_dir, tmp_path / "rerun")
    assert _train_losses(run_dir) == _train_losses(tmp_path / "rerun")


def test_a_cli_run_reruns_from_its_saved_config(tmp_path, capsys):
    first = tmp_path / "first"
    argv = ["train", "--student", "resnet8", "--teachers", "resnet8", "resnet14", "--strategy", "mtkd_rl",
            "--limit-per-class", "3", "--epochs", "2", "--batch-size", "8", "--max-steps-per-epoch", "2",
            "--device", "cpu", "--seed", "2", "--no-progress", "--out-dir", str(first)]
    assert main(argv) == 0, capsys.readouterr().err
    again = tmp_path / "again"
    assert main(["train", "--config", str(first / "config.json"), "--out-dir", str(again)]) == 0
    _assert_same_weights(first, again)
    assert _train_losses(first) == _train_losses(again)
    # and the check can fail: another seed gives other weights
    other = tmp_path / "other"
    assert main(["train", "--config", str(first / "config.json"), "--out-dir", str(other), "--seed", "3"]) == 0
    with pytest.raises(AssertionError):
        _assert_same_weights(first, other)
