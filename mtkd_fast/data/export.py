"""Write an array dataset (the bundled one, CIFAR-100, or any uint8 arrays) as an ImageNet-layout JPEG
folder, ``out/{train,val}/<NNN_class>/<index>.JPEG``, so the image-folder and DALI paths can be tried
without ImageNet. Class folders are prefixed with the zero-padded class index, so their sorted order (the
order image folders assign labels in) keeps the original labels."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from PIL import Image

from .._io import write_atomic


def class_folder_name(label: int, name: str, num_classes: int) -> str:
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "class"
    return f"{label:0{len(str(max(num_classes - 1, 0)))}d}_{safe}"


def write_jpeg(path, image: np.ndarray, quality: int = 90, size=None) -> None:
    """Write one uint8 image ([H,W], [H,W,C] or [C,H,W] with C in 1, 3) as an RGB JPEG, atomically.

    ``size``: (height, width) to resize to first (bicubic), or None.
    """
    img = np.asarray(image)
    if img.dtype != np.uint8:
        raise ValueError(f"image: expected uint8 pixels, got {img.dtype}")
    if img.ndim == 3 and img.shape[0] in (1, 3) and img.shape[-1] not in (1, 3):
        img = img.transpose(1, 2, 0)  # CHW -> HWC
    if img.ndim == 3 and img.shape[-1] == 1:
        img = img[..., 0]
    if img.ndim not in (2, 3):
        raise ValueError(f"image: expected [H,W], [H,W,C] or [C,H,W], got shape {img.shape}")
    pil = Image.fromarray(img).convert("RGB")
    if size is not None:
        pil = pil.resize((int(size[1]), int(size[0])), Image.BICUBIC)
    write_atomic(str(path), lambda f: pil.save(f, format="JPEG", quality=quality))


def export_arrays(images: np.ndarray, labels, class_names, out_dir, split: str, *, quality: int = 90, size=None,
                  progress: bool = True) -> int:
    """Write ``images`` (uint8 [N,...]) into ``out_dir/split/<class>/<i>.JPEG``; return the count written.

    Every class gets a folder, so train and val list the same classes.
    """
    from tqdm import tqdm

    labels = np.asarray(labels)
    if len(images) != len(labels):
        raise ValueError(f"labels: expected {len(images)} labels (one per image), got {len(labels)}")
    K = len(class_names)
    if labels.size and (labels.min() < 0 or labels.max() >= K):
        raise ValueError(f"labels: expected values in [0, {K - 1}], got [{labels.min()}, {labels.max()}]")
    split_dir = Path(out_dir) / split
    folders = [split_dir / class_folder_name(k, n, K) for k, n in enumerate(class_names)]
    for f in folders:
        f.mkdir(parents=True, exist_ok=True)
    for i in tqdm(range(len(images)), desc=f"export {split}", unit="img", disable=not progress):
        write_jpeg(folders[int(labels[i])] / f"{i:07d}.JPEG", images[i], quality=quality, size=size)
    return len(images)


def export_dataset(name: str, out_dir, *, root=None, size=None, quality: int = 90, limit_per_class=None,
                   progress: bool = True) -> dict:
    """Export the train and test splits of ``build_dataset(name, root=root)`` (bundled or cifar100) as
    ``out_dir/train`` and ``out_dir/val``, the stored pixels before any padding or augmentation."""
    from . import build_dataset

    counts = {}
    for split, folder in (("train", "train"), ("test", "val")):
        ds = build_dataset(name, split=split, root=root, augment=False, limit_per_class=limit_per_class)
        counts[folder] = export_arrays(ds.images.numpy(), ds.labels.numpy(), ds.class_names, out_dir, folder,
                                       quality=quality, size=size, progress=progress)
    return counts
