"""Loading weights from a local file into a model, with errors that say which file and which key."""

from __future__ import annotations

import os
from collections.abc import Mapping

from torch import Tensor, nn


def _extract_state_dict(obj, path: str) -> dict[str, Tensor]:
    """``{"model": sd}`` (RepDistiller lineage), ``{"state_dict": sd}`` or a bare state_dict."""
    if isinstance(obj, Mapping):
        for key in ("model", "state_dict"):
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ValueError(
            f"{path}: expected a state_dict, {{'model': state_dict}} or {{'state_dict': state_dict}}, "
            f"got {type(obj).__name__}" + (f" with keys {list(obj)[:8]}" if isinstance(obj, Mapping) else "")
        )
    state = dict(obj)
    # DataParallel / DistributedDataParallel checkpoints prefix every key with "module."
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def load_checkpoint(model: nn.Module, path: str | os.PathLike, trusted: bool = False) -> nn.Module:
    """Load the weights stored at ``path`` into ``model`` (in place; returns ``model``).

    Accepts ``{"model": state_dict}`` (the RepDistiller / CA-MKD / MTKD-RL teacher format), ``{"state_dict":
    state_dict}`` or a bare state_dict (torchvision's files), with or without DataParallel's ``module.``
    prefix. Files are read with ``weights_only=True``; ``trusted=True`` allows full unpickling for old
    checkpoints that store other Python objects (only for files you trust).

    Raises FileNotFoundError naming ``path`` when it does not exist, and ValueError naming the file and the
    first missing, mismatched or unexpected key when the weights do not fit the architecture.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint: no such file: {path}")
    from .._io import load_torch_file  # one-line errors for empty, corrupt and non-weights-only files

    obj = load_torch_file(path, trusted=trusted)
    state = _extract_state_dict(obj, path)
    expected = model.state_dict()
    arch = type(model).__name__
    for key, ref in expected.items():
        if key not in state:
            raise ValueError(f"{path}: checkpoint does not match {arch}: missing key '{key}' "
                             f"(shape {tuple(ref.shape)})")
        if tuple(state[key].shape) != tuple(ref.shape):
            raise ValueError(
                f"{path}: checkpoint does not match {arch}: key '{key}' has shape {tuple(state[key].shape)}, "
                f"the model expects {tuple(ref.shape)}"
            )
    unexpected = [k for k in state if k not in expected]
    if unexpected:
        raise ValueError(
            f"{path}: checkpoint does not match {arch}: unexpected key '{unexpected[0]}' "
            f"({len(unexpected)} unexpected in all)"
        )
    model.load_state_dict(state, strict=True)
    return model
