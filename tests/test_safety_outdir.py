"""A finished run is never overwritten by accident, two runs never write one out_dir at once, and temporary files
a killed run left are cleaned on the next start."""

import json
import os
import socket
import subprocess
import time

import torch
from safety_cli import TINY

from mtkd_fast import cli
from mtkd_fast._lock import LOCK_NAME

BASE = ["train", "--student", "resnet8", "--strategy", "none", "--epochs", "1"] + TINY


def _files(d):
    return {name: (d / name).read_bytes() for name in sorted(os.listdir(d)) if (d / name).is_file()}


def test_finished_run_is_not_overwritten(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(BASE + ["--out-dir", str(out)]) == 0
    before = _files(out)
    assert {"checkpoint_last.pt", "checkpoint_best.pt", "student_best.pth", "metrics.csv"} <= set(before)
    capsys.readouterr()
    rc = cli.main(BASE + ["--out-dir", str(out), "--lr", "0.2"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "already holds a run" in err and "--resume" in err and "--overwrite" in err
    assert len(err.splitlines()) == 1
    assert _files(out) == before  # byte for byte
    # --overwrite replaces it, old outputs included
    assert cli.main(BASE + ["--out-dir", str(out), "--lr", "0.2", "--overwrite"]) == 0
    assert json.loads((out / "config.json").read_text())["lr"] == 0.2
    assert (out / "student_best.pth").read_bytes() != before["student_best.pth"]
    assert not (out / LOCK_NAME).exists()


def test_second_concurrent_run_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    first = subprocess.Popen(["sleep", "60"])  # stands for a live run on this host
    try:
        (out / LOCK_NAME).write_text(json.dumps({"pid": first.pid, "host": socket.gethostname()}))
        rc = cli.main(BASE + ["--out-dir", str(out)])
        err = capsys.readouterr().err.strip()
        assert rc == 1 and f"process {first.pid}" in err and "in use" in err and len(err.splitlines()) == 1
        assert sorted(os.listdir(out)) == [LOCK_NAME]
    finally:
        first.kill()
        first.wait()
    # that process is gone: the stale lock is replaced; a temp file a killed save left is removed
    (out / ".tmp-x1y2.pt").write_bytes(b"half a checkpoint")
    assert cli.main(BASE + ["--out-dir", str(out)]) == 0
    names = os.listdir(out)
    assert ".tmp-x1y2.pt" not in names and LOCK_NAME not in names and "checkpoint_last.pt" in names


def test_two_real_runs_into_one_out_dir(tmp_path, capsys):
    """Through the console script: while one run writes the out_dir, a second is refused; the first finishes
    and its outputs are its own."""
    out = tmp_path / "run"
    slow = ["train", "--student", "resnet8", "--strategy", "none", "--epochs", "8", "--out-dir", out, "--lr", "0.07"] \
        + [a for a in TINY if a not in ("--max-steps-per-epoch", "1")] + ["--max-steps-per-epoch", "2"]
    from safety_cli import ROOT, command

    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    first = subprocess.Popen(command() + [str(a) for a in slow], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (out / LOCK_NAME).exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert (out / LOCK_NAME).exists(), first.communicate()
        rc = cli.main(BASE + ["--out-dir", str(out), "--lr", "0.3"])
        err = capsys.readouterr().err
        assert rc == 1 and "in use" in err
    finally:
        stdout, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr
    assert json.loads((out / "config.json").read_text())["lr"] == 0.07
    ckpt = torch.load(out / "checkpoint_last.pt", weights_only=True)
    assert ckpt["config"]["lr"] == 0.07 and ckpt["epoch"] == 8
