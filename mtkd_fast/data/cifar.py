"""CIFAR-100 from its distributed python format (the ``cifar-100-python`` folder: ``train``, ``test``,
``meta`` pickles), with the authors' augmentation and normalisation (docs/method.md section 7)."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np

MEAN = (0.5071, 0.4867, 0.4408)
STD = (0.2675, 0.2565, 0.2761)


def _unpickle(path: Path) -> dict:
    if not path.exists():
        raise FileNotFoundError(f"root: expected the CIFAR-100 file {path} (the cifar-100-python folder)")
    try:
        with open(path, "rb") as f:
            return pickle.load(f, encoding="bytes")
    except Exception as exc:  # truncated or foreign files raise many different errors
        raise ValueError(f"{path}: not a readable CIFAR-100 pickle: {type(exc).__name__}: {exc}") from exc


def load_arrays(split: str, root):
    """(images [N,3,32,32] uint8, fine labels [N] int64, class names) of ``split`` in {train, test}."""
    if root is None:
        raise ValueError("root: expected the path of the cifar-100-python folder for dataset 'cifar100', got None")
    root = Path(os.path.expanduser(str(root)))
    if not root.is_dir():
        raise FileNotFoundError(f"root: CIFAR-100 folder {root} does not exist")
    path = root / split
    batch = _unpickle(path)
    meta = _unpickle(root / "meta")
    try:
        data = np.asarray(batch[b"data"], dtype=np.uint8)
        labels = np.asarray(batch[b"fine_labels"], dtype=np.int64)
        names = [n.decode() if isinstance(n, bytes) else str(n) for n in meta[b"fine_label_names"]]
    except (KeyError, TypeError) as exc:
        raise ValueError(f"{path}: expected keys b'data' and b'fine_labels' (and b'fine_label_names' in meta), "
                         f"missing {exc}") from exc
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(labels) != len(data):
        raise ValueError(f"{path}: expected data [N, 3072] and N fine labels, got {data.shape} and {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= len(names)):
        raise ValueError(f"{path}: expected fine labels in [0, {len(names) - 1}], "
                         f"found [{labels.min()}, {labels.max()}]")
    return data.reshape(-1, 3, 32, 32), labels, names
