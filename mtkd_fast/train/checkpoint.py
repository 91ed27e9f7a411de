"""Atomic checkpoints, RNG state capture, and strict state loading with errors that name the file and key."""

from __future__ import annotations

import random

import numpy as np
import torch
from torch import nn

from .._io import load_torch_file, save_atomic, write_bytes_atomic  # re-exported: the trainer's checkpoint API
from .._validation import DataError

__all__ = ["save_atomic", "write_bytes_atomic", "load_checkpoint_file",
           "rng_state", "set_rng_state", "load_module_state"]


TRAINING_KEYS = ("student", "optimizer", "scheduler", "epoch", "rng")


def load_checkpoint_file(path: str, map_location="cpu", trusted: bool = False, require_training: bool = False):
    """Read a checkpoint with ``weights_only=True`` (training checkpoints hold only tensors, numbers, strings and
    plain containers). ``trusted=True`` (CLI: ``--trust-checkpoint``) allows full unpickling of a legacy file.
    With ``require_training``, a file without the training state (``student``, ``optimizer``, ...) is refused."""
    state = load_torch_file(path, map_location=map_location, trusted=trusted)
    if require_training:
        missing = [k for k in TRAINING_KEYS if not isinstance(state, dict) or k not in state]
        if missing:
            raise DataError(f"{path}: not a training checkpoint (no {missing[0]!r} entry); resume needs the "
                            "checkpoint_last.pt a training run writes")
    return state


def rng_state() -> dict:
    """Every RNG a training step may draw from (python, numpy, torch CPU and CUDA), as tensors, numbers and
    plain containers only, so the checkpoint loads with ``weights_only=True``."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(),
             "numpy": {"name": str(name), "keys": [int(k) for k in keys], "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]) if isinstance(py, (list, tuple)) else py)
    npy = state["numpy"]
    if isinstance(npy, dict):
        npy = (npy["name"], np.asarray(npy["keys"], dtype=np.uint32), npy["pos"], npy["has_gauss"],
               npy["cached_gaussian"])
    np.random.set_state(npy)
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
