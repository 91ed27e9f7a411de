"""A user's mistake on the command line is one line without a traceback (exit 2 usage, 1 data, 130 Ctrl-C);
``--debug`` / ``MTKD_FAST_DEBUG=1`` shows the traceback; a full disk names the file and keeps the previous
checkpoint."""

import errno
import os
import signal
import subprocess
import time

import pytest
import torch
from safety_cli import ROOT, TINY, command, error_line, run

from mtkd_fast import _io, cli
from mtkd_fast._lock import LOCK_NAME
from mtkd_fast._validation import DataError

BASE = ["train", "--student", "resnet8", "--strategy", "none"] + TINY


def _ctrl_c_when(args, ready, env):
    """Runs ``mtkd-fast ARGS`` and sends it Ctrl-C once the file ``ready`` exists; (exit status, stderr stripped)."""
    # a shell that starts jobs in the background (no job control) makes them ignore SIGINT, and Python keeps an
    # ignored SIGINT ignored: give the child the default disposition, as a terminal's Ctrl-C would find it
    proc = subprocess.Popen(command() + args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while not ready.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    return proc.returncode, stderr.strip()


def _child_env():
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    env.pop("MTKD_FAST_DEBUG", None)
    return env


def test_ctrl_c_is_one_line_with_resume_hint(tmp_path):
    out = tmp_path / "run"
    args = BASE + ["--epochs", "1000", "--out-dir", str(out)]
    rc, err = _ctrl_c_when(args, out / "checkpoint_last.pt", _child_env())
    assert rc == 130, err
    # one line, the last: above it only what the run logged before the signal (logs go to stderr too, and whether
    # an epoch line came first depends on timing)
    lines = err.splitlines()
    assert "Traceback" not in err and not any(line.startswith("mtkd-fast") for line in lines[:-1]), err
    assert lines[-1].startswith("mtkd-fast train: interrupted; resume with: mtkd-fast train"), err
    assert lines[-1].endswith("--resume"), err
    assert not (out / LOCK_NAME).exists()  # released: the resume hint works at once
    assert torch.load(out / "checkpoint_last.pt", weights_only=True)["epoch"] >= 1


def test_disk_full_names_file_and_keeps_previous_checkpoint(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    assert cli.main(BASE + ["--epochs", "1", "--out-dir", str(out)]) == 0
    before = (out / "checkpoint_last.pt").read_bytes()
    capsys.readouterr()

    real_fsync = os.fsync

    def full(fd):  # the disk fills up when the checkpoint is saved
        if os.readlink(f"/proc/self/fd/{fd}").endswith(".pt"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(_io.os, "fsync", full)
    rc = cli.main(BASE + ["--epochs", "2", "--out-dir", str(out), "--resume"])
    err = error_line(capsys.readouterr().err)  # one line, after the resumed epoch's log line
    assert rc == 1
    assert (err.startswith("mtkd-fast train: error: ") and "checkpoint_last.pt" in err
            and os.strerror(errno.ENOSPC) in err and "unchanged" in err)
    assert (out / "checkpoint_last.pt").read_bytes() == before
    assert not [n for n in os.listdir(out) if n.startswith(".tmp-")] and not (out / LOCK_NAME).exists()


@pytest.mark.parametrize("content", [b"", b"\x80\x02garbage", "truncated"])
def test_broken_checkpoint_last_on_resume(tmp_path, capsys, content):
    out = tmp_path / "run"
    assert cli.main(BASE + ["--epochs", "1", "--out-dir", str(out)]) == 0
    path = out / "checkpoint_last.pt"
    path.write_bytes(path.read_bytes()[:1000] if content == "truncated" else content)
    capsys.readouterr()
    rc = cli.main(BASE + ["--epochs", "2", "--out-dir", str(out), "--resume"])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and "checkpoint_last.pt" in err and len(err.splitlines()) == 1


def test_debug_shows_the_traceback(tmp_path, capsys, monkeypatch):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    args = ["eval", "--model", "resnet8", "--checkpoint", str(bad)]
    assert cli.main(args) == 1
    with pytest.raises(DataError, match="bad.pth"):
        cli.main(["--debug"] + args)
    with pytest.raises(DataError, match="bad.pth"):
        cli.main(args + ["--debug"])  # after the verb too
    with pytest.raises(ValueError, match="--random-teachers"):
        cli.main(["cache", "build", "--out", str(tmp_path / "c"), "--teachers", "resnet8", "--debug"])
    monkeypatch.setenv("MTKD_FAST_DEBUG", "1")
    with pytest.raises(DataError, match="bad.pth"):
        cli.main(args)
    proc = run(["--debug"] + args)
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "bad.pth" in proc.stderr


def test_user_mistakes_exit_codes(tmp_path, capsys):
    # usage (2): a missing file, a bad value; data (1): a file that cannot be used as it is
    cases = [
        (["eval", "--model", "resnet8", "--checkpoint", str(tmp_path / "none.pth")], 2, "none.pth"),
        (["train", "--teachers", "resnet8", "resnet14", "--lr", "-1", "--out-dir", str(tmp_path / "o")], 2, "lr:"),
        (["cache", "info", str(tmp_path)], 2, "manifest.json"),
    ]
    (tmp_path / "empty.pth").write_bytes(b"")
    cases.append((["eval", "--model", "resnet8", "--checkpoint", str(tmp_path / "empty.pth")], 1, "empty"))
    for args, code, text in cases:
        rc = cli.main(args)
        err = capsys.readouterr().err.strip()
        assert rc == code and text in err and len(err.splitlines()) == 1, (args, err)


def test_ctrl_c_inside_a_library_clean_up_still_counts_as_interrupted(monkeypatch, capsys):
    """torch.save's zip writer turns a KeyboardInterrupt into a RuntimeError raised during its clean-up."""
    def interrupted_save(args):
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            raise RuntimeError("[enforce fail at inline_container.cc] unexpected pos")

    parser = cli.build_parser()
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    args = parser.parse_args(["info"])
    monkeypatch.setattr(args, "func", interrupted_save, raising=False)
    monkeypatch.setattr(parser, "parse_args", lambda argv: args)
    monkeypatch.delenv("MTKD_FAST_DEBUG", raising=False)
    assert cli.main(["info"]) == 130
    assert "interrupted" in capsys.readouterr().err


def test_ctrl_c_before_the_first_checkpoint_does_not_offer_a_failing_resume(tmp_path):
    out = tmp_path / "run"
    # a long first epoch: interrupted while it runs, before anything is saved
    args = ["train", "--student", "resnet8", "--strategy", "none", "--dataset", "bundled", "--limit-per-class",
            "100", "--batch-size", "8", "--no-progress", "--device", "cpu", "--epochs", "3", "--out-dir", str(out)]
    env = _child_env()
    rc, err = _ctrl_c_when(args, out / "config.json", env)  # config.json is written just before the first epoch
    assert not (out / "checkpoint_last.pt").exists(), "the epoch ended before the signal: make it longer"
    assert rc == 130 and "Traceback" not in err and len(err.splitlines()) == 1, err
    assert "--resume" not in err and "nothing to resume" in err
    assert err.endswith("run the same command again: mtkd-fast " + " ".join(args))
    # and that command is accepted in the same out_dir (it holds only config.json)
    again = subprocess.run(command() + args[:-4] + ["--epochs", "1", "--max-steps-per-epoch", "1", "--out-dir",
                                                    str(out)], env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
