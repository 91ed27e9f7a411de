"""A lock file that keeps a second writer out of a run's out_dir or a cache directory.

``DirLock(directory)`` creates ``directory/.mtkd-fast.lock`` with ``O_EXCL`` and writes the holder's pid and host
into it. A second process that finds the file is refused with a ``DataError`` naming the holder, unless the lock
is stale: written on this host by a process that no longer exists (a killed run), in which case it is replaced.
A lock from another host is never taken over (its pid cannot be checked from here); the message says which file
to delete once that run is known to be gone.
"""

from __future__ import annotations

import json
import os
import socket
from typing import Optional

from ._validation import DataError

__all__ = ["DirLock", "LOCK_NAME"]

LOCK_NAME = ".mtkd-fast.lock"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:
        return False
    return True


def _read(path: str) -> Optional[dict]:
    try:
        with open(path) as f:
            info = json.load(f)
        return info if isinstance(info, dict) else {}
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # unreadable or half-written: treated as held, unless its age says otherwise


class DirLock:
    """``with DirLock(path, what="out_dir"):`` holds ``path``'s lock for the block (``acquire``/``release`` too)."""

    def __init__(self, directory: str, what: str = "directory"):
        self.directory = directory
        self.what = what
        self.path = os.path.join(directory, LOCK_NAME)
        self.held = False

    def acquire(self) -> "DirLock":
        os.makedirs(self.directory, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname()}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                info = _read(self.path)
                if info is None:  # released meanwhile
                    continue
                pid, host = info.get("pid"), info.get("host")
                if host == me["host"] and isinstance(pid, int) and pid != me["pid"] and not _pid_alive(pid):
                    try:  # stale: its process on this host is gone
                        os.unlink(self.path)
                    except FileNotFoundError:
                        pass
                    continue
                holder = f"process {pid} on host {host}" if pid is not None else "another process"
                raise DataError(f"{self.what}: {self.directory} is in use by {holder} (lock file {self.path}); "
                                "wait for that run to end, or delete the lock file if it is gone") from None
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return self
        raise DataError(f"{self.what}: could not take the lock {self.path}")

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        info = _read(self.path)
        if info and info.get("pid") == os.getpid() and info.get("host") == socket.gethostname():
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass

    def __enter__(self) -> "DirLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
