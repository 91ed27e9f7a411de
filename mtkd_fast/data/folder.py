"""ImageNet-layout image folders (``root/train/<class>/*.JPEG``, ``root/val/<class>/*.JPEG``), decoded with
PIL and transformed with torchvision (the path used without DALI, and DALI's reference).

Bad input, and what happens (each message names the file or folder):

- missing root or split folder: ``FileNotFoundError`` when the dataset is built;
- a split with no class folders, or a class folder with no images: ``ValueError`` when it is built (an
  empty class would silently shift or drop a label, so it is never skipped);
- train and val with different class lists: ``ValueError`` listing the classes only in one of them;
- files that are not images (by extension) are ignored and counted (``ds.ignored_files``);
- a corrupt or truncated image: with ``on_bad_image="error"`` (default) reading it raises ``ValueError``
  naming the file (from a DataLoader worker, the message reaches the main process); with
  ``on_bad_image="skip"`` the sample is dropped from its batch, and the loader counts it and reports the
  files once per epoch (``loader.skipped``). :func:`find_unreadable` (``mtkd-fast data check``) lists
  them all beforehand, e.g. to remove them before using DALI, which cannot skip.
"""

from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms import InterpolationMode  # imported here, not per item: forked workers inherit it
from torchvision.transforms import functional as F

from .arrays import first_per_class
from .augment import ResizedCrop, pixel_box, view_params

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
EVAL_SPLITS = ("val", "test")


def split_folder(root, split: str) -> Path:
    """``root/split``; the evaluation split may be called ``val`` or ``test`` on disk, either name works."""
    root = Path(os.path.expanduser(str(root)))
    if not root.is_dir():
        raise FileNotFoundError(f"root: image folder {root} does not exist")
    names = EVAL_SPLITS if split in EVAL_SPLITS else (split,)
    for name in names:
        if (root / name).is_dir():
            return root / name
    raise FileNotFoundError(f"split: expected the folder {root / names[0]} (ImageNet layout: "
                            f"root/train/<class>/*.JPEG, root/val/<class>/*.JPEG)")


def class_folders(folder: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))


def scan_split(folder: Path):
    """(relative paths, labels, class names, ignored file count) of one split folder; raises on empty classes."""
    classes = class_folders(folder)
    if not classes:
        raise ValueError(f"root: {folder} has no class folders (expected {folder}/<class>/<image files>)")
    paths, labels, empty, ignored = [], [], [], 0
    for label, name in enumerate(classes):
        found = 0
        for dirpath, dirnames, filenames in os.walk(folder / name):
            dirnames.sort()
            for fn in sorted(filenames):
                if fn.lower().endswith(IMAGE_EXTENSIONS):
                    paths.append(os.path.relpath(os.path.join(dirpath, fn), folder))
                    labels.append(label)
                    found += 1
                else:
                    ignored += 1
        if not found:
            empty.append(str(folder / name))
    if empty:
        raise ValueError(f"root: {len(empty)} class folder(s) contain no images ({', '.join(IMAGE_EXTENSIONS)}): "
                         f"{', '.join(empty[:10])}{' ...' if len(empty) > 10 else ''}")
    return paths, labels, classes, ignored


def check_same_classes(root: Path, classes: list[str], folder: Path) -> None:
    """Train and val must list the same classes, or label k would mean different things in each."""
    others = [p for p in (root / "train", *(root / s for s in EVAL_SPLITS)) if p.is_dir() and p != folder]
    for other in others[:1]:
        theirs = class_folders(other)
        if theirs != classes:
            only_here = sorted(set(classes) - set(theirs))
            only_there = sorted(set(theirs) - set(classes))
            raise ValueError(f"root: class folders differ between {folder} and {other}: only in {folder.name}: "
                             f"{only_here[:10]}, only in {other.name}: {only_there[:10]}")


def eval_geometry(height: int, width: int, resize_size: int, image_size: int) -> tuple[int, int, int, int]:
    """The validation transform's geometry: (resized height, resized width, crop top, crop left).

    The shorter side becomes ``resize_size``, the longer one ``round(long * resize_size / short)``; the
    ``image_size`` crop is centred, its offset rounded half up. These are DALI's rules
    (``fn.resize(resize_shorter=..., subpixel_scale=False)``, ``fn.crop_mirror_normalize(crop=...)``), used
    by the torchvision path too (torchvision truncates the longer side and rounds the offset half to even).
    """
    short, long = min(height, width), max(height, width)
    long_new = math.floor(long * resize_size / short + 0.5)
    new_h, new_w = (resize_size, long_new) if height <= width else (long_new, resize_size)
    top = math.floor((new_h - image_size) / 2 + 0.5)
    left = math.floor((new_w - image_size) / 2 + 0.5)
    return new_h, new_w, top, left


class ImageFolderDataset(Dataset):
    """An ImageNet-layout split; see :func:`mtkd_fast.data.build_dataset` and this module's docstring."""

    def __init__(self, root, split="train", *, augment=True, seed=0, image_size=224, resize_size=256,
                 mean=IMAGENET_MEAN, std=IMAGENET_STD, on_bad_image="error", scale=(0.08, 1.0),
                 ratio=(3.0 / 4.0, 4.0 / 3.0), limit_per_class=None):
        if on_bad_image not in ("error", "skip"):
            raise ValueError(f"on_bad_image: expected 'error' or 'skip', got {on_bad_image!r}")
        if image_size < 1 or resize_size < image_size:
            raise ValueError(f"image_size, resize_size: expected 1 <= image_size <= resize_size, got "
                             f"{image_size}, {resize_size}")
        self.root = Path(os.path.expanduser(str(root)))
        self.folder = split_folder(self.root, split)
        paths, labels, classes, ignored = scan_split(self.folder)
        check_same_classes(self.root, classes, self.folder)
        if limit_per_class is not None:  # the first N files of each class in sorted order
            keep = first_per_class(labels, limit_per_class)
            paths, labels = [paths[k] for k in keep], [labels[k] for k in keep]
        self.name, self.split = "imagefolder", split
        self.paths = paths
        self.labels = torch.tensor(labels, dtype=torch.int64)
        self.class_names = classes
        self.num_classes = len(classes)
        self.ignored_files = ignored
        self.augment, self.seed, self.view = bool(augment), int(seed), 0
        self.image_size, self.resize_size = int(image_size), int(resize_size)
        self.image_shape = (3, self.image_size, self.image_size)
        self.mean, self.std = tuple(mean), tuple(std)
        self.on_bad_image = on_bad_image
        self.recipe = ResizedCrop(size=self.image_size, scale=tuple(scale), ratio=tuple(ratio))
        self._fingerprint = None

    def __len__(self) -> int:
        return len(self.paths)

    def set_view(self, view: int) -> None:
        if isinstance(view, bool) or not isinstance(view, (int, np.integer)) or view < 0:
            raise ValueError(f"view: expected an int >= 0, got {view!r}")
        self.view = int(view)

    def path(self, index: int) -> str:
        return str(self.folder / self.paths[index])

    @property
    def fingerprint(self) -> str:
        """sha256 of the relative paths, labels and class names (not the pixels: too slow at ImageNet scale)."""
        if self._fingerprint is None:
            h = hashlib.sha256(repr((self.split, self.class_names)).encode())
            h.update("\n".join(self.paths).encode())
            h.update(self.labels.numpy().tobytes())
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    def describe(self) -> dict:
        return {"name": self.name, "split": self.split, "source": str(self.folder), "num_samples": len(self),
                "num_classes": self.num_classes, "image_shape": list(self.image_shape),
                "augment": self.augment, "seed": self.seed, "resize_size": self.resize_size,
                "recipe": self.recipe.to_dict(), "mean": list(self.mean), "std": list(self.std),
                "ignored_files": self.ignored_files, "fingerprint": self.fingerprint}

    def load_rgb(self, index: int) -> Image.Image:
        path = self.path(index)
        try:
            with Image.open(path) as img:
                return img.convert("RGB")  # forces the full decode, so truncation is caught here
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            raise ValueError(f"imagefolder: cannot decode {path} (sample {index}): {exc}") from exc

    def __getitem__(self, index: int):
        """(image [3,S,S] float, label, index); ``None`` for an unreadable image when on_bad_image='skip'."""
        try:
            img = self.load_rgb(index)
        except ValueError:
            if self.on_bad_image == "skip":
                return None
            raise
        S = self.image_size
        if self.augment:
            p = view_params(self.seed, self.view, int(index), self.recipe)
            top, left, h, w = pixel_box(p, img.height, img.width)
            img = F.resized_crop(img, top, left, h, w, [S, S], InterpolationMode.BILINEAR, antialias=True)
            if p.flip:
                img = F.hflip(img)
        else:
            new_h, new_w, top, left = eval_geometry(img.height, img.width, self.resize_size, S)
            img = F.resize(img, [new_h, new_w], InterpolationMode.BILINEAR, antialias=True)
            img = F.crop(img, top, left, S, S)
        x = F.normalize(F.to_tensor(img), self.mean, self.std)
        return x, int(self.labels[index]), int(index)


def _unreadable_reason(path: str):
    try:
        with Image.open(path) as img:
            img.convert("RGB")
        return None
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        return f"{type(exc).__name__}: {exc}"


def find_unreadable(ds: ImageFolderDataset, num_workers: int = 0, progress: bool = True) -> list[tuple[str, str]]:
    """Decode every image of ``ds`` with PIL; return (path, reason) for each one that fails."""
    from concurrent.futures import ProcessPoolExecutor

    from tqdm import tqdm

    paths = [ds.path(i) for i in range(len(ds))]
    bar = dict(total=len(paths), desc=f"check {ds.split}", unit="img", disable=not progress)
    if num_workers > 0:
        with ProcessPoolExecutor(num_workers) as pool:
            reasons = list(tqdm(pool.map(_unreadable_reason, paths, chunksize=64), **bar))
    else:
        reasons = [_unreadable_reason(p) for p in tqdm(paths, **bar)]
    return [(p, r) for p, r in zip(paths, reasons) if r is not None]
