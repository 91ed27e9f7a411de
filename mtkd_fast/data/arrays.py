"""Datasets held in memory as uint8 arrays (CIFAR-100, Fashion-MNIST), augmented a batch at a time.

The augmentation (zero pad, crop, flip, normalise) is done on whole batches of tensors, on the CPU or on
the training device, with the crop windows and flips of :func:`mtkd_fast.data.augment.view_params`;
``ds[i]`` is the same code on a batch of one, so the per-sample and batched paths cannot disagree.
"""

from __future__ import annotations

import contextlib
import hashlib

import numpy as np
import torch
from torch.utils.data import Dataset

from .augment import PadCrop, view_params


@contextlib.contextmanager
def _one_intraop_thread():
    """Run a batch's small CPU ops on one thread: at ~200k values per op, waking OpenMP threads costs more
    than it saves, and far more when other processes share the cores (measured on the shared 2-core VM)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def first_per_class(labels, limit: int) -> np.ndarray:
    """Indices of the first ``limit`` samples of each class, in the stored order (class-balanced, deterministic)."""
    labels = np.asarray(labels)
    picks = [np.flatnonzero(labels == k)[:limit] for k in np.unique(labels)]
    return np.sort(np.concatenate(picks)) if picks else np.zeros(0, dtype=np.int64)


class ArrayDataset(Dataset):
    """Images ``[N, C, H, W]`` uint8 with labels; see :func:`mtkd_fast.data.build_dataset`.

    ``base_padding`` zero pixels are added on each side before everything else (Fashion-MNIST: 28 -> 32),
    so ``image_shape`` is ``(C, H + 2 * base_padding, W + 2 * base_padding)``; ``recipe`` then applies to
    that image. ``channels``: replicate single-channel images to this many channels (grayscale -> RGB).
    """

    def __init__(self, name, split, images, labels, class_names, mean, std, *, augment=True, seed=0,
                 recipe=PadCrop(), base_padding=0, channels=None, source=""):
        if images.dtype != np.uint8 or images.ndim != 4:
            raise ValueError(f"images: expected a uint8 array [N, C, H, W], got {images.dtype} {images.shape}")
        if labels.shape != (images.shape[0],):
            raise ValueError(f"labels: expected shape ({images.shape[0]},), got {labels.shape}")
        self.name, self.split, self.source = name, split, source
        self.images = torch.from_numpy(np.require(images, requirements=["C", "W"]))  # copies read-only buffers
        self.labels = torch.from_numpy(labels.astype(np.int64))
        self.class_names = list(class_names)
        self.num_classes = len(self.class_names)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.augment = bool(augment)
        self.seed = int(seed)
        self.recipe = recipe
        self.base_padding = int(base_padding)
        self.view = 0
        C, H, W = images.shape[1:]
        if channels is not None and C != channels:
            if C != 1:
                raise ValueError(f"channels: can only replicate 1-channel images, got {C} channels")
            C = int(channels)
        if len(self.mean) != C or len(self.std) != C:
            raise ValueError(f"mean, std: expected {C} values each, got {len(self.mean)} and {len(self.std)}")
        self.image_shape = (C, H + 2 * self.base_padding, W + 2 * self.base_padding)
        self._fingerprint = None
        self._device_images = None  # (device, uint8 copy of all images there), made on first use

    def __getstate__(self):  # DataLoader workers get the CPU arrays only
        state = self.__dict__.copy()
        state["_device_images"] = None
        return state

    def __len__(self) -> int:
        return self.images.shape[0]

    def set_view(self, view: int) -> None:
        if isinstance(view, bool) or not isinstance(view, (int, np.integer)) or view < 0:
            raise ValueError(f"view: expected an int >= 0, got {view!r}")
        self.view = int(view)

    @property
    def fingerprint(self) -> str:
        """sha256 of the pixels, labels and class names: which samples index i means (for caches)."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            h.update(repr((self.name, self.split, self.class_names, self.images.shape)).encode())
            h.update(self.images.numpy().tobytes())
            h.update(self.labels.numpy().tobytes())
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    def describe(self) -> dict:
        """What a cache manifest records about this data: source, recipe, normalisation, seed, fingerprint."""
        return {"name": self.name, "split": self.split, "source": self.source, "num_samples": len(self),
                "num_classes": self.num_classes, "image_shape": list(self.image_shape),
                "augment": self.augment, "seed": self.seed, "base_padding": self.base_padding,
                "recipe": self.recipe.to_dict(), "mean": list(self.mean), "std": list(self.std),
                "fingerprint": self.fingerprint}

    def __getitem__(self, index):
        if index < 0 or index >= len(self):
            raise IndexError(f"index: expected 0 <= index < {len(self)}, got {index}")
        images, labels, indices = self.get_batch(torch.tensor([int(index)]))
        return images[0], int(labels[0]), int(indices[0])

    def get_batch(self, indices, device="cpu"):
        """``(images [B,C,H,W] float32, labels [B] int64, indices [B] int64)`` on ``device``.

        On a GPU the whole uint8 array is copied there once (CIFAR-100: 150 MB) and the batch is gathered
        and augmented there.
        """
        indices = torch.as_tensor(indices, dtype=torch.int64).reshape(-1)
        device = torch.device(device)
        if device.type != "cpu":
            return self._augment(indices, device)
        with _one_intraop_thread():
            return self._augment(indices, device)

    def _augment(self, indices, device):
        C, H, W = self.image_shape
        if device.type == "cpu":
            raw = self.images[indices]
        else:
            if self._device_images is None or self._device_images[0] != device:
                self._device_images = (device, self.images.to(device))
            raw = self._device_images[1][indices.to(device)]
        raw = raw.expand(-1, C, -1, -1)
        if self.augment:
            pad = self.recipe.padding
            p = view_params(self.seed, self.view, indices.numpy(), self.recipe, image_size=(H, W))
            top = torch.from_numpy(p.top + pad).to(device)
            left = torch.from_numpy(p.left + pad).to(device)
            flip = torch.from_numpy(p.flip).to(device)
        else:
            pad = 0
            top = left = torch.zeros(len(indices), dtype=torch.int64, device=device)
            flip = torch.zeros(len(indices), dtype=torch.bool, device=device)
        total = self.base_padding + pad
        padded = torch.nn.functional.pad(raw, (total, total, total, total))  # zeros, like torchvision's RandomCrop
        rows = top[:, None] + torch.arange(H, device=device)  # [B, H]
        cols = left[:, None] + torch.arange(W, device=device)  # [B, W]
        cols = torch.where(flip[:, None], cols.flip(1), cols)
        b = torch.arange(len(indices), device=device)[:, None, None]
        crops = padded.permute(0, 2, 3, 1)[b, rows[:, :, None], cols[:, None, :]]  # [B, H, W, C]
        crops = crops.permute(0, 3, 1, 2).float().div_(255.0)
        mean = torch.tensor(self.mean, device=device).view(1, C, 1, 1)
        std = torch.tensor(self.std, device=device).view(1, C, 1, 1)
        images = crops.sub_(mean).div_(std).contiguous()
        return images, self.labels[indices].to(device), indices.to(device)
