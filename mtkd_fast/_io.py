"""Atomic file writes and file hashes shared by the trainer, the cache, the demo and the benchmarks.

Every file is written to a temporary file in the destination's directory, flushed to disk and moved onto the
destination with ``os.replace``, so a crash never leaves a half-written checkpoint, manifest or CSV behind.
"""

from __future__ import annotations

import csv
import errno
import hashlib
import io
import json
import os
import shutil
import tempfile
from typing import Any, BinaryIO, Callable

import torch

__all__ = ["write_atomic", "write_bytes_atomic", "write_json_atomic", "write_csv_atomic", "save_atomic", "file_sha256",
           "load_torch_file", "clean_temp_files", "TRUST_HINT"]

TEMP_PREFIX = ".tmp-"
# the documented opt-in for a trusted file that holds more than tensors and plain containers
TRUST_HINT = "if you trust this file, pass --trust-checkpoint"


def _public_mode() -> int:
    """rw-r--r-- under the usual umask (mkstemp creates files readable by the owner only)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def write_atomic(path: str, write: Callable[[BinaryIO], Any]) -> None:
    """Call ``write(f)`` on a binary temporary file beside ``path``, then move it onto ``path``."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=os.path.splitext(path)[1], dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _public_mode())
        os.replace(tmp, path)
    except BaseException as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        # a full disk (or any failed write) names the file and the free space; the previous version of ``path``
        # is untouched
        if isinstance(exc, OSError) and not isinstance(exc, FileNotFoundError):
            reason = exc.strerror or str(exc)
            raise OSError(exc.errno, f"{path}: could not write ({reason}{_free_note(directory)}); the previous "
                                     "file is unchanged") from exc
        # torch's zip writer turns a failed write into a RuntimeError ("file write failed", or "unexpected pos"
        # when the short write is noticed later)
        text = str(exc).lower()
        if isinstance(exc, RuntimeError) and ("write" in text or "unexpected pos" in text):
            raise OSError(errno.EIO, f"{path}: could not write ({' '.join(str(exc).split())[:200]}"
                                     f"{_free_note(directory)}); the previous file is unchanged") from exc
        raise


def _free_note(directory: str) -> str:
    try:
        free = shutil.disk_usage(directory).free
    except OSError:
        return ""
    return f"; {free / 2**20:.1f} MiB free on the disk"


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


def clean_temp_files(directory: str) -> list[str]:
    """Remove the ``.tmp-*`` files a killed writer left in ``directory`` (call it while holding the directory's
    lock, so no live writer's file is removed). Returns the removed paths."""
    removed = []
    if not os.path.isdir(directory):
        return removed
    for name in os.listdir(directory):
        full = os.path.join(directory, name)
        if name.startswith(TEMP_PREFIX) and os.path.isfile(full):
            try:
                os.unlink(full)
                removed.append(full)
            except OSError:
                pass
    return removed


def load_torch_file(path: str, map_location="cpu", trusted: bool = False, what: str = "checkpoint",
                    hint: str = TRUST_HINT):
    """``torch.load`` a file a user handed us, with ``weights_only=True`` unless ``trusted``.

    Every failure is one ``DataError`` line naming the file: missing, empty, not a PyTorch file, truncated, or
    holding Python objects a weights-only load refuses (those are never unpickled, so no code in them runs);
    ``hint`` ends that last message (what the user can do instead).
    """
    import pickle

    from ._validation import DataError

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what}: no such file {path!r}")
    if os.path.getsize(path) == 0:
        raise DataError(f"{path}: the {what} file is empty")
    with open(path, "rb") as f:
        magic = f.read(4)
    # torch.save writes a zip archive; files from torch < 1.6 are a bare pickle (protocol 2+ opens with 0x80)
    if magic != b"PK\x03\x04" and magic[:1] != b"\x80":
        raise DataError(f"{path}: not a readable PyTorch {what} (not a torch.save file)")
    try:
        return torch.load(path, map_location=map_location, weights_only=not trusted)
    except pickle.UnpicklingError as exc:
        if not trusted and "weights only load failed" in str(exc).lower():
            raise DataError(f"{path}: refused: the {what} holds Python objects besides tensors and plain "
                            f"containers, and loading them could run code; {hint}") from None
        raise DataError(f"{path}: not a readable PyTorch {what} (corrupt or not a torch.save file: "
                        f"{_first_line(exc)})") from None
    except (EOFError, RuntimeError, ValueError, OSError, AttributeError, ImportError, IndexError, KeyError,
            TypeError, MemoryError) as exc:
        if isinstance(exc, (FileNotFoundError, PermissionError)):
            raise
        raise DataError(f"{path}: not a readable PyTorch {what} (corrupt or truncated: "
                        f"{type(exc).__name__}: {_first_line(exc)})") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else "no details")[:200]
