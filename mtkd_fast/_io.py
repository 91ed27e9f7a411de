"""Atomic file writes and file hashes shared by the trainer, the cache, the demo and the benchmarks.

Every file is written to a temporary file in the destination's directory, flushed to disk and moved onto the
destination with ``os.replace``, so a crash never leaves a half-written checkpoint, manifest or CSV behind.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import tempfile
from typing import Any, BinaryIO, Callable

import torch

__all__ = ["write_atomic", "write_bytes_atomic", "write_json_atomic", "write_csv_atomic", "save_atomic", "file_sha256"]


def _public_mode() -> int:
    """rw-r--r-- under the usual umask (mkstemp creates files readable by the owner only)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def write_atomic(path: str, write: Callable[[BinaryIO], Any]) -> None:
    """Call ``write(f)`` on a binary temporary file beside ``path``, then move it onto ``path``."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.splitext(path)[1], dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _public_mode())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_bytes_atomic(path: str, data: bytes) -> None:
    write_atomic(path, lambda f: f.write(data))


def write_json_atomic(path: str, obj: Any, indent: int = 2) -> None:
    write_bytes_atomic(path, (json.dumps(obj, indent=indent, default=str) + "\n").encode())


def write_csv_atomic(path: str, rows: list[dict]) -> None:
    """One row per dict; the columns are the union of the rows' keys in first-seen order."""
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns)
    writer.writeheader()
    for row in rows:
        writer.writerow({k: row.get(k, "") for k in columns})
    write_bytes_atomic(path, buf.getvalue().encode())


def save_atomic(obj: Any, path: str) -> None:
    """``torch.save`` atomically."""
    write_atomic(path, lambda f: torch.save(obj, f))


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
