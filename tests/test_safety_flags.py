"""Every flag is validated like its ``train`` twin, through the real console script: one line naming the option
(exit 2), never a traceback, a silently different value or a negative size."""

import pytest
import torch
from safety_cli import TINY, one_line_error, run

from mtkd_fast.models import create_model

TRAIN = ["train", "--student", "resnet8", "--strategy", "none"] + TINY


@pytest.mark.parametrize("flags,start", [
    (["--lr-decay", "-1"], "lr_decay: expected a number in (0, 1]"),
    (["--lr-decay", "0"], "lr_decay: expected a number in (0, 1]"),
    (["--milestones", "1", "--lr-decay", "1e6"], "lr_decay: expected a number in (0, 1]"),
    (["--milestones", "5", "-2"], "milestones: expected non-negative epoch numbers"),
    (["--lr", "1e300"], "lr: expected a number in (0, 10]"),
    (["--temperature", "1e30"], "temperature: expected a number in [0.01, 100]"),
    (["--seed", "99999999999999999999"], "seed: expected an integer in [0, 4294967295]"),
    (["--epochs", "99999999999999999999"], "epochs: expected an integer in"),
    (["--device", "bogus"], "device: expected auto, cpu, cuda or cuda:N, got 'bogus'"),
    (["--device", "mps"], "device: expected auto, cpu, cuda or cuda:N, got 'mps'"),
])
def test_train_flags(tmp_path, flags, start):
    proc = run(TRAIN + flags + ["--out-dir", tmp_path / "o"])
    err = one_line_error(proc)
    assert proc.returncode == 2 and err.startswith(f"mtkd-fast train: error: {start}"), err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("changes,start", [
    ({"milestones": [-1]}, "milestones: expected non-negative epoch numbers"),
    ({"momentum": 1.0}, "momentum: expected a number in [0, 1)"),
    ({"seed": -1}, "seed: expected an integer in [0, 4294967295]"),
    ({"agent_lr": 1e300}, "agent_lr: expected a number in (0, 10]"),
    ({"limit_per_class": 2**64}, "limit_per_class: expected an integer in"),
    ({"milestones": [2**64]}, "milestones: expected an integer in"),
    ({"device": "cuda:x"}, "device: expected auto, cpu, cuda or cuda:N"),
])
def test_config_ranges(changes, start):
    """The same checks in the Python API (and config files), without a process per case."""
    from mtkd_fast.train import TrainConfig

    with pytest.raises(ValueError) as info:
        TrainConfig(**changes)
    assert str(info.value).startswith(start), str(info.value)


def test_resume_with_overwrite_is_a_usage_error(tmp_path):
    proc = run(TRAIN + ["--out-dir", tmp_path / "o", "--resume", "--overwrite"])
    err = one_line_error(proc)
    assert proc.returncode == 2 and err.startswith("mtkd-fast train: error: resume, overwrite: give one"), err


@pytest.mark.parametrize("flags,start", [
    (["--limit-per-class", "0"], "--limit-per-class: expected a positive integer"),
    (["--device", "bogus"], "--device: expected auto, cpu, cuda or cuda:N"),
    (["--device", "mps"], "--device: expected auto, cpu, cuda or cuda:N"),
])
def test_eval_flags(tmp_path, flags, start):
    ckpt = tmp_path / "s.pth"
    torch.save({"model": create_model("resnet8", 10).state_dict()}, ckpt)
    proc = run(["eval", "--model", "resnet8", "--checkpoint", ckpt] + flags)
    err = one_line_error(proc)
    assert proc.returncode == 2 and err.startswith(f"mtkd-fast eval: error: {start}"), err


SIZE = ["cache", "size", "--teachers", "resnet8", "resnet14", "--num-classes", "10", "--image-size", "32",
        "--samples", "100"]


@pytest.mark.parametrize("flags,start", [
    (["--views", "0"], "--views: expected an integer >= 1"),
    (["--views", "-1"], "--views: expected an integer >= 1"),
    (["--samples", "-5"], "--samples: expected an integer >= 1"),
    (["--topk", "0"], "--topk: expected an integer in [1, 10]"),
    (["--topk", "-1"], "--topk: expected an integer in [1, 10]"),
    (["--topk", "11"], "--topk: expected an integer in [1, 10]"),
    (["--image-size", "0"], "--image-size: expected an integer >= 1"),
])
def test_cache_size_flags(flags, start):
    proc = run(SIZE + flags)
    err = one_line_error(proc)
    assert proc.returncode == 2 and err.startswith(f"mtkd-fast cache: error: {start}"), err
    assert "-" not in proc.stdout  # no negative size printed


def test_cache_size_still_works():
    proc = run(SIZE + ["--topk", "10", "--views", "2"])
    assert proc.returncode == 0 and "total:" in proc.stdout, proc.stderr


@pytest.mark.parametrize("flags,start", [
    (["--device", "bogus"], "--device: expected auto, cpu, cuda or cuda:N"),
    (["--device", "mps"], "--device: expected auto, cpu, cuda or cuda:N"),
    (["--seed", "99999999999999999999"], "--seed: expected an integer in [0, 4294967295]"),
    (["--topk-temperature", "1e30"], "--topk-temperature: expected a number in [0.01, 100]"),
])
def test_cache_build_flags(tmp_path, flags, start):
    proc = run(["cache", "build", "--out", tmp_path / "c", "--teachers", "resnet8", "resnet14",
                "--random-teachers", "--limit-per-class", "1", "--no-progress"] + flags)
    err = one_line_error(proc)
    assert proc.returncode == 2 and err.startswith(f"mtkd-fast cache: error: {start}"), err


@pytest.mark.parametrize("flags,start", [
    (["--batch-size", "0"], "--batch-size: expected a positive integer, got 0"),
    (["--device", "mps"], "--device: expected auto, cpu, cuda or cuda:N"),
])
def test_bench_epoch_flags(tmp_path, flags, start):
    proc = run(["bench", "epoch", "--out", tmp_path / "b", "--no-progress"] + flags)
    err = one_line_error(proc)
    assert proc.returncode == 2 and err.startswith(f"mtkd-fast bench: error: {start}"), err


@pytest.mark.parametrize("text,where", [
    ("teachers: [resnet8, resnet14\n", "unclosed list"),
    ("lr: 0.1\n---\nlr: 0.2\n", "two documents"),
    ("teachers:\n\t- resnet8\n", "a tab"),
    ("lr: !!python/object/apply:os.system ['true']\n", "a python tag"),
])
def test_yaml_errors_are_one_line_naming_the_file(tmp_path, text, where):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    proc = run(["train", "--config", path, "--out-dir", tmp_path / "o"])
    err = one_line_error(proc)
    assert proc.returncode == 2, (where, proc.stderr)
    assert err.startswith(f"mtkd-fast train: error: config: '{path}' is not a valid YAML config"), (where, err)


def test_teacher_file_with_wrong_keys_is_named(tmp_path):
    good = tmp_path / "good.pth"
    torch.save({"model": create_model("resnet8", 10).state_dict()}, good)
    bad = tmp_path / "bad.pth"
    torch.save({"model": {"something": torch.zeros(3)}}, bad)
    proc = run(["train", "--student", "resnet8", "--teachers", "resnet8", "resnet14", "--teacher-checkpoints",
                good, bad, "--strategy", "aver", "--out-dir", tmp_path / "o"] + TINY)
    err = one_line_error(proc)
    assert proc.returncode == 1 and f"{bad} holds no classifier weights" in err, err
    assert "class counts" not in err
