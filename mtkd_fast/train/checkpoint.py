"""Atomic checkpoints, RNG state capture, and strict state loading with errors that name the file and key."""

from __future__ import annotations

import os
import random
import tempfile
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = ["save_atomic", "write_bytes_atomic", "load_checkpoint_file", "rng_state", "set_rng_state", "load_module_state"]


def save_atomic(obj: Any, path: str) -> None:
    """``torch.save`` to a temporary file in the same directory, then ``os.replace`` it onto ``path``: a crash
    never leaves a half-written checkpoint."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp_", suffix=".pt", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
        os.chmod(tmp, public_mode())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_bytes_atomic(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same directory and ``os.replace``."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp_", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, public_mode())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def public_mode() -> int:
    """rw-r--r-- under the usual umask (mkstemp creates files readable by the owner only)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def load_checkpoint_file(path: str, map_location="cpu") -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint: no such file {path!r}")
    # our own training checkpoints hold optimiser states, RNG states and config dicts: not weights-only
    return torch.load(path, map_location=map_location, weights_only=False)


def rng_state() -> dict:
    """Every RNG a training step may draw from (python, numpy, torch CPU and CUDA)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_module_state(module: nn.Module, state: dict, path: str, what: str) -> None:
    """``module.load_state_dict(state)`` (strict) with a ValueError naming ``path`` and the first key that is
    missing, unexpected or of another shape."""
    own = module.state_dict()
    for key, value in own.items():
        if key not in state:
            raise ValueError(f"{path}: the {what} in this checkpoint does not match the architecture: "
                             f"missing key {key!r}")
        if tuple(state[key].shape) != tuple(value.shape):
            raise ValueError(f"{path}: the {what} in this checkpoint does not match the architecture: key {key!r} "
                             f"has shape {tuple(state[key].shape)}, the model expects {tuple(value.shape)}")
    for key in state:
        if key not in own:
            raise ValueError(f"{path}: the {what} in this checkpoint does not match the architecture: "
                             f"unexpected key {key!r}")
    module.load_state_dict(state)
