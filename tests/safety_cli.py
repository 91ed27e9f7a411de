"""Running ``mtkd-fast`` the way a user does (the installed console script in a child process, this checkout
first on the path) for the safety tests, and small files those tests hand it."""

from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--dataset", "bundled", "--limit-per-class", "2", "--batch-size", "8", "--no-progress",
        "--max-steps-per-epoch", "1", "--device", "cpu"]


def command() -> list[str]:
    script = os.path.join(os.path.dirname(sys.executable), "mtkd-fast")
    return [script] if os.path.isfile(script) else [sys.executable, "-m", "mtkd_fast.cli"]


def run(args, cwd=None, env=None, timeout=120) -> subprocess.CompletedProcess:
    full_env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    full_env.pop("MTKD_FAST_DEBUG", None)
    full_env.update(env or {})
    return subprocess.run(command() + [str(a) for a in args], cwd=cwd, env=full_env, capture_output=True, text=True,
                          timeout=timeout)


def error_line(err: str) -> str:
    """The error in a refused command's stderr: one ``mtkd-fast VERB: error: ...`` line, the last, no traceback.
    The lines above it, if any, are what the run logged before (logs go to stderr, the result to stdout)."""
    err = err.strip()
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("mtkd-fast ") and ": error: " in line]
    assert len(errors) == 1 and err.endswith(errors[0]), err
    return errors[0]


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    """The error line of a refused command (:func:`error_line`)."""
    return error_line(proc.stderr)


class Marker:
    """Unpickling this creates the file ``path``: stands for a checkpoint whose pickle runs code."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))
