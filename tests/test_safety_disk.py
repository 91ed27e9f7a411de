"""A full disk stops ``cache build`` and ``train`` with one line naming the file and the free space (exit 1),
never SIGBUS or a traceback, and the partial build / run resumes once there is space. Where a small tmpfs can be
mounted (root) the disk is really full; the free-space query is also replaced in-process, which runs anywhere.
``export`` never overwrites without ``--overwrite``, and never a training checkpoint."""

import os
import subprocess

import pytest
import torch
from safety_cli import TINY, one_line_error, run

from mtkd_fast import _io, cli
from mtkd_fast.cache import storage
from mtkd_fast.models import create_model


@pytest.fixture(scope="module")
def teacher_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("teachers")
    paths = []
    for seed, arch in enumerate(("resnet8", "resnet14")):
        torch.manual_seed(seed)
        paths.append(d / f"{arch}.pth")
        torch.save({"model": create_model(arch, 10).state_dict()}, paths[-1])
    return paths


def build_args(teacher_files, out, per_class):
    """The same teachers every time (files), so a stopped build can resume."""
    return ["cache", "build", "--teachers", "resnet8", "resnet14", "--checkpoints", *teacher_files, "--no-progress",
            "--device", "cpu", "--batch-size", "64", "--out", out, "--limit-per-class", str(per_class)]


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs of 2 MiB at tmp_path/disk, grown by calling the returned function; skipped where mount fails."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    try:
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True)
    except OSError:
        pytest.skip("no mount command")
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.decode().strip()}")

    def grow(size="128m"):
        subprocess.run(["mount", "-o", f"remount,size={size}", str(mnt)], check=True)

    yield mnt, grow
    subprocess.run(["umount", str(mnt)], check=False)


def test_cache_build_on_a_full_disk_is_one_line_and_resumes(small_disk, teacher_files):
    mnt, grow = small_disk
    out = mnt / "cache"
    args = build_args(teacher_files, out, 30)  # ~5 MB of feature maps: more than the disk
    proc = run(args, timeout=300)
    err = one_line_error(proc)
    assert proc.returncode == 1, proc.stderr  # not 135 (SIGBUS)
    assert err.startswith("mtkd-fast cache: error: ") and str(out) in err and ".bin: no space" in err, err
    assert "no space left on the device" in err and "free" in err and "run the same command again" in err
    grow()
    proc = run(args, timeout=300)
    assert proc.returncode == 0, proc.stderr
    verify = run(["cache", "verify", out, "--no-progress"])
    assert verify.returncode == 0 and "OK" in verify.stdout, verify.stdout


def test_cache_build_checks_free_space_before_growing_the_map(tmp_path, capsys, monkeypatch, teacher_files):
    monkeypatch.setattr(storage, "free_bytes", lambda directory: 1000)
    out = tmp_path / "cache"
    args = [str(a) for a in build_args(teacher_files, out, 2)]
    assert cli.main(args) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(out) in err and "1000 B free" in err, err
    monkeypatch.undo()
    assert cli.main(args) == 0  # resumes once there is space
    assert cli.main(["cache", "verify", str(out), "--no-progress"]) == 0


def test_train_on_a_full_disk_is_one_line_and_resumes(small_disk):
    mnt, grow = small_disk
    grow("700k")  # config.json and one checkpoint fit; the next files do not
    out = mnt / "run"
    args = ["train", "--student", "resnet8", "--strategy", "none", "--epochs", "2", "--out-dir", out] + TINY
    proc = run(args, timeout=300)
    err = one_line_error(proc)
    assert proc.returncode == 1, proc.stderr
    assert err.startswith("mtkd-fast train: error: ") and str(out) in err and "MiB free" in err, err
    assert "unchanged" in err
    grow()
    proc = run(args + (["--resume"] if (out / "checkpoint_last.pt").exists() else []), timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert torch.load(out / "checkpoint_last.pt", weights_only=True)["epoch"] == 2


def test_torch_zip_writer_error_on_a_full_disk_is_one_line(tmp_path, capsys, monkeypatch):
    """torch.save reports a short write later as "unexpected pos": still the file and the free space."""
    def full(obj, f):
        f.write(b"PK")
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 4736 vs 4624")

    monkeypatch.setattr(_io.torch, "save", full)
    out = tmp_path / "run"
    rc = cli.main(["train", "--student", "resnet8", "--strategy", "none", "--epochs", "1", "--out-dir", str(out)]
                  + TINY)
    err = capsys.readouterr().err.strip()
    assert rc == 1 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert "checkpoint_last.pt: could not write (" in err and "unexpected pos" in err and "MiB free" in err


def _student_file(path):
    torch.save({"model": create_model("imagenet_resnet18", 10).state_dict()}, path)
    return path


def test_export_refuses_an_existing_file_without_overwrite(tmp_path):
    src = _student_file(tmp_path / "student.pth")
    target = tmp_path / "out.pth"
    target.write_bytes(b"keep me")
    args = ["export", "--checkpoint", src, "--arch", "imagenet_resnet18", "--out", target]
    proc = run(args)
    err = one_line_error(proc)
    assert proc.returncode == 2 and "already exists; pass --overwrite" in err and target.read_bytes() == b"keep me"
    proc = run(args + ["--overwrite"])
    assert proc.returncode == 0, proc.stderr
    assert "fc.weight" in torch.load(target, weights_only=True)


def test_export_never_replaces_a_training_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    assert cli.main(["train", "--student", "resnet8", "--strategy", "none", "--epochs", "1", "--out-dir",
                     str(run_dir)] + TINY) == 0
    ckpt = run_dir / "checkpoint_last.pt"
    before = ckpt.read_bytes()
    src = _student_file(tmp_path / "student.pth")
    proc = run(["export", "--checkpoint", src, "--arch", "imagenet_resnet18", "--out", ckpt, "--overwrite"])
    err = one_line_error(proc)
    assert proc.returncode == 2 and "is a training checkpoint; export never replaces one" in err, err
    assert ckpt.read_bytes() == before and os.path.isfile(ckpt)
