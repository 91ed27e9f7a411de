"""Fashion-MNIST: the bundled class-balanced subset (no network) or the IDX files of the full set.

The bundled subset (``bundled/fashion_mnist_subset.npz.xz``, made by ``tools/make_bundled_fashion_mnist.py``
from Debian's ``dataset-fashion-mnist``) holds the first 1000 training and first 200 test images of each
of the 10 classes, 28x28 uint8. Images are delivered as 3x32x32 (grayscale replicated to 3 channels,
zero-padded by 2 pixels) so CIFAR models run on them unchanged, normalised with the subset's training
mean and std (also used for the full set: they differ from its own by under 0.003).
"""

from __future__ import annotations

import functools
import gzip
import io
import lzma
import os
import struct
from pathlib import Path

import numpy as np

BUNDLED_PATH = Path(__file__).resolve().parent / "bundled" / "fashion_mnist_subset.npz.xz"
CLASS_NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
               "Ankle boot"]
# where Debian's dataset-fashion-mnist package puts the full set's IDX files (gzip-compressed)
DEBIAN_ROOT = Path("/usr/share/datasets/fashion-mnist")
IDX_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


@functools.lru_cache(maxsize=1)
def load_bundled() -> dict:
    """The bundled subset's arrays: {train,test}_{images,labels}, mean, std (read once per process)."""
    if not BUNDLED_PATH.exists():
        raise FileNotFoundError(f"bundled dataset: {BUNDLED_PATH} is missing (a broken install?)")
    with np.load(io.BytesIO(lzma.decompress(BUNDLED_PATH.read_bytes()))) as z:
        return {k: z[k] for k in z.files}


def read_idx(path) -> np.ndarray:
    """An IDX file (MNIST format; gzip-compressed or not) as a uint8 array."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
        magic, = struct.unpack(">I", data[:4])
        if magic >> 8 != 0x08 or not 1 <= magic & 0xFF <= 4:  # 0x08: unsigned byte
            raise ValueError(f"magic number {magic:#x} is not an unsigned-byte IDX file")
        ndim = magic & 0xFF
        dims = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
        expected = 4 + 4 * ndim + int(np.prod(dims))
        if len(data) != expected:
            raise ValueError(f"expected {expected} bytes for shape {dims}, found {len(data)} (truncated?)")
        return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(dims)
    except (OSError, EOFError, struct.error, ValueError) as exc:
        raise ValueError(f"{path}: not a readable IDX file: {exc}") from exc


def _find(root: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        if (root / name).exists():
            return root / name
    raise FileNotFoundError(f"root: expected {stem}[.gz] in {root} (Fashion-MNIST IDX files)")


def full_root(root=None) -> Path:
    """The folder of the full set's IDX files: ``root``, or :data:`DEBIAN_ROOT` when ``root`` is None and it
    exists (else a one-line error naming both ways to provide it)."""
    if root is not None:
        return Path(os.path.expanduser(str(root)))
    if DEBIAN_ROOT.is_dir():
        return DEBIAN_ROOT
    raise FileNotFoundError(f"root: dataset 'fashion_mnist' needs the folder of its IDX files (--data-root DIR), "
                            f"or Debian's dataset-fashion-mnist package ({DEBIAN_ROOT})")


def load_arrays(split: str, root=None):
    """(images [N,1,28,28] uint8, labels [N] uint8, mean, std, source) for ``split`` in {train, test}."""
    bundled = load_bundled()
    mean, std = bundled["mean"], bundled["std"]
    if root is None:
        return (bundled[f"{split}_images"][:, None], bundled[f"{split}_labels"], mean, std,
                f"bundled:{BUNDLED_PATH.name}")
    root = Path(os.path.expanduser(str(root)))
    if not root.is_dir():
        raise FileNotFoundError(f"root: Fashion-MNIST folder {root} does not exist")
    img_path, lab_path = (_find(root, stem) for stem in IDX_FILES[split])
    images, labels = read_idx(img_path), read_idx(lab_path)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(f"{img_path}, {lab_path}: expected images [N,28,28] and labels [N], got {images.shape} "
                         f"and {labels.shape}")
    if labels.size and labels.max() >= len(CLASS_NAMES):
        raise ValueError(f"{lab_path}: expected labels in [0, 9], found {labels.max()}")
    return images[:, None], labels, mean, std, f"idx:{root}"
