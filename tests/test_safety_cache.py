"""The teacher cache refuses what would give silent garbage or a half-finished directory: an edited manifest
(its own content is checksummed), a second concurrent build into one folder (a lock with pid and host), a build
of random-init teachers without ``--random-teachers``; temp files a killed build left are cleaned."""

import json
import os
import socket
import subprocess

import pytest
from safety_cli import run

from mtkd_fast import cli
from mtkd_fast._lock import LOCK_NAME, DirLock
from mtkd_fast._validation import DataError
from mtkd_fast.cache import CacheCorruptError, open_teacher_source, read_manifest

BUILD = ["--teachers", "resnet8", "resnet8", "--limit-per-class", "1", "--chunk-size", "4", "--batch-size", "8",
         "--no-progress", "--device", "cpu", "--random-teachers"]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    path = tmp_path_factory.mktemp("cache") / "c"
    assert cli.main(["cache", "build", "--out", str(path)] + BUILD) == 0
    return path


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_edited_manifest_is_caught(built, tmp_path, capsys):
    path = _copy(built, tmp_path / "edited")
    m = json.loads((path / "manifest.json").read_text())
    m["encodings"]["logits"] = "bfloat16"
    m["arrays"]["t0.logits"]["dtype"] = "bfloat16"
    (path / "manifest.json").write_text(json.dumps(m, indent=1))
    proc = run(["cache", "verify", path, "--no-progress"])
    assert proc.returncode == 1 and "manifest" in proc.stdout and "checksum" in proc.stdout, proc.stdout
    assert "Traceback" not in proc.stderr
    with pytest.raises(CacheCorruptError, match="edited or damaged"):
        open_teacher_source(str(path))
    # a cache that is fine still verifies and opens
    assert cli.main(["cache", "verify", str(built), "--no-progress"]) == 0
    assert read_manifest(str(built))["views"] == 1 and open_teacher_source(str(built)).num_teachers == 2


@pytest.mark.parametrize("content", ["[]", "{without arrays}"])
def test_broken_manifest_one_line(built, tmp_path, capsys, content):
    path = _copy(built, tmp_path / "broken")
    if content == "[]":
        (path / "manifest.json").write_text("[]")
    else:
        m = json.loads((path / "manifest.json").read_text())
        del m["arrays"]
        (path / "manifest.json").write_text(json.dumps(m))
    for verb in (["info", str(path)], ["verify", str(path), "--no-progress"]):
        rc = cli.main(["cache"] + verb)
        out = capsys.readouterr()
        assert rc == 1 and "manifest.json" in out.out + out.err, out


def test_second_concurrent_build_is_refused(built, tmp_path, capsys):
    path = tmp_path / "busy"
    holder = subprocess.Popen(["sleep", "60"])  # a live process on this host holds the lock
    try:
        path.mkdir()
        (path / LOCK_NAME).write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname()}))
        rc = cli.main(["cache", "build", "--out", str(path)] + BUILD)
        err = capsys.readouterr().err.strip()
        assert rc == 1 and f"process {holder.pid}" in err and LOCK_NAME in err and len(err.splitlines()) == 1
        assert sorted(os.listdir(path)) == [LOCK_NAME]  # nothing written beside the holder's lock
    finally:
        holder.kill()
        holder.wait()
    # the holder is gone: its lock is stale, replaced, and the build finishes cleanly
    (path / ".tmp-abc.json").write_text("left by a killed build")
    assert cli.main(["cache", "build", "--out", str(path)] + BUILD) == 0
    names = sorted(os.listdir(path))
    assert LOCK_NAME not in names and "chunks" not in names and ".tmp-abc.json" not in names
    assert cli.main(["cache", "verify", str(path), "--no-progress"]) == 0


def test_lock_from_another_host_is_not_taken_over(tmp_path):
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": 1, "host": "elsewhere.example"}))
    with pytest.raises(DataError, match="elsewhere.example"):
        DirLock(str(tmp_path), "cache").acquire()
    os.unlink(tmp_path / LOCK_NAME)
    with DirLock(str(tmp_path), "cache"):
        with pytest.raises(DataError, match=f"process {os.getpid()}"):
            DirLock(str(tmp_path), "cache").acquire()
    assert not (tmp_path / LOCK_NAME).exists()


def test_build_without_checkpoints_needs_random_teachers(tmp_path, capsys):
    args = [a for a in BUILD if a != "--random-teachers"]
    rc = cli.main(["cache", "build", "--out", str(tmp_path / "r")] + args)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "--random-teachers" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_verify_reports_a_nan_teacher_cache(tmp_path, dtype):
    """A teacher with NaN weights gives a cache whose checksums are intact: verify must still call it damaged.
    (``cache build`` refuses such a checkpoint file; the Python API builds from whatever models it is given.)"""
    import torch

    from mtkd_fast.cache import build_cache
    from mtkd_fast.data import build_dataset
    from mtkd_fast.models import create_model

    teachers = [create_model("resnet8", 10), create_model("resnet14", 10)]
    with torch.no_grad():
        teachers[1].fc.bias.fill_(float("nan"))
    ds = build_dataset("bundled", split="train", augment=True, seed=0, limit_per_class=1)
    out = tmp_path / "c"
    build_cache(str(out), ds, teachers, dtype=dtype, progress=False)
    proc = run(["cache", "verify", out, "--no-progress"])
    assert proc.returncode == 1 and "DAMAGED" in proc.stdout, proc.stdout
    assert "NaN/Inf value(s)" in proc.stdout and "t1.logits" in proc.stdout and "t0.logits" not in proc.stdout


def test_build_refuses_a_nan_teacher_checkpoint(tmp_path):
    import torch

    from mtkd_fast.models import create_model

    files = []
    for m, arch in enumerate(("resnet8", "resnet14")):
        state = create_model(arch, 10).state_dict()
        if m == 1:
            state["fc.bias"] = torch.full_like(state["fc.bias"], float("nan"))
        files.append(tmp_path / f"{arch}.pth")
        torch.save({"model": state}, files[-1])
    proc = run(["cache", "build", "--out", tmp_path / "c", "--teachers", "resnet8", "resnet14", "--checkpoints",
                *files, "--limit-per-class", "1", "--no-progress", "--device", "cpu"])
    err = proc.stderr.strip()
    assert proc.returncode == 1 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert f"--checkpoints: {files[1]}: the weights hold NaN/Inf values (in fc.bias)" in err


@pytest.mark.parametrize("encoding", ["float16", "bfloat16", "float32"])
def test_encode_float_refuses_what_the_encoding_cannot_hold(encoding):
    """float16 turns a finite 1e5 into Inf; the cache refuses it naming the array, instead of storing an Inf that
    fails a training step epochs later. bfloat16 and float32 hold it. A teacher's own NaN is stored as it is."""
    import torch

    from mtkd_fast.cache import storage

    g = torch.Generator().manual_seed(7)
    x = torch.randn(5, 13, generator=g, dtype=torch.float32) * 3
    x[3, 11] = 1.0e5 * (1 if torch.rand((), generator=g) < 0.5 else -1)
    if encoding == "float16":
        with pytest.raises(ValueError, match=r"^teacher 1: logits: values up to 1e\+05 overflow float16 .*--dtype"):
            storage.encode_float(x, encoding, "teacher 1: logits")
    else:
        back = storage.decode_float(storage.encode_float(x, encoding, "teacher 1: logits"), encoding, "cpu")
        assert torch.isfinite(back).all() and torch.allclose(back, x, rtol=2 ** -7)
    x[0, 0] = float("nan")  # the teacher's own NaN: kept (verify reports it), not an overflow
    x[3, 11] = 2.5
    assert torch.isnan(storage.decode_float(storage.encode_float(x, encoding), encoding, "cpu")[0, 0])


def test_int8_scales_that_overflow_are_refused():
    import torch

    from mtkd_fast.cache import storage

    x = torch.randn(2, 3, 4, 5, generator=torch.Generator().manual_seed(3))
    storage.quantize_int8(x * 1.0e6)  # scale 1e6 / 127 fits float16
    with pytest.raises(ValueError, match="overflow int8's float16 scales.*--feature-dtype"):
        storage.quantize_int8(x * 1.0e8)


def test_build_names_the_teacher_whose_outputs_overflow_float16(tmp_path):
    """A teacher whose logits exceed float16's range (a randomly initialised ResNet-101's embeddings reach 1.8e5):
    `cache build` stops in one line naming the teacher, the array and the flag, and --dtype bfloat16 builds it."""
    import torch

    from mtkd_fast.models import create_model

    files = []
    for m, arch in enumerate(("resnet8", "resnet14")):
        state = create_model(arch, 10).state_dict()
        if m == 1:
            state["fc.weight"] = state["fc.weight"] * 1.0e6
        files.append(tmp_path / f"{arch}.pth")
        torch.save({"model": state}, files[-1])
    args = ["--teachers", "resnet8", "resnet14", "--checkpoints", *files, "--limit-per-class", "1", "--no-progress",
            "--device", "cpu"]
    proc = run(["cache", "build", "--out", tmp_path / "c16", *args])
    err = proc.stderr.strip()
    assert proc.returncode == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert "teacher 1 (resnet14), view 0" in err and "logits: values up to" in err and "overflow float16" in err
    assert "--dtype bfloat16" in err
    proc = run(["cache", "build", "--out", tmp_path / "cbf16", *args, "--dtype", "bfloat16"])
    assert proc.returncode == 0, proc.stderr
    assert read_manifest(str(tmp_path / "cbf16"))["encodings"]["logits"] == "bfloat16"
