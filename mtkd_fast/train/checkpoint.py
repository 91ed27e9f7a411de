"""Atomic checkpoints, RNG state capture, and strict state loading with errors that name the file and key."""

from __future__ import annotations

import os
import random

import numpy as np
import torch
from torch import nn

from .._io import save_atomic, write_bytes_atomic  # re-exported: the trainer's checkpoint API

__all__ = ["save_atomic", "write_bytes_atomic", "load_checkpoint_file", "rng_state", "set_rng_state", "load_module_state"]


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
