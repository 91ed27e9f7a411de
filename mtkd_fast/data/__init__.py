"""Data for mtkd_fast: the bundled Fashion-MNIST subset, CIFAR-100 and ImageNet-layout folders, with
replayable augmentation (view ``v`` of sample ``i`` is a pure function of ``(seed, v, i)``).

    from mtkd_fast.data import build_dataset, build_loader, view_params
    ds = build_dataset("bundled", split="train", augment=True, seed=0)
    ds.set_view(epoch % V)
    for images, labels, indices in build_loader(ds, 64, shuffle=True, seed=0, epoch=epoch):
        ...

Loaders: in-memory datasets are augmented a batch at a time (on the training device when it is a GPU);
image folders go through NVIDIA DALI when it is installed and decodes on the device (GPU decode with a GPU,
CPU decode otherwise; probed once) and through PIL + torchvision DataLoader workers when it does not (the
user is told once why).
"""

from __future__ import annotations

import sys

from .augment import PadCrop, ResizedCrop, ViewParams, pixel_box, view_params
from .loader import ArrayLoader, FolderLoader, epoch_indices, split_batches

__all__ = ["build_dataset", "build_loader", "view_params", "pixel_box", "PadCrop", "ResizedCrop", "ViewParams",
           "epoch_indices", "DATASETS", "dali_available"]

DATASETS = ("bundled", "fashion_mnist", "cifar100", "imagefolder")
BACKENDS = ("auto", "dali", "torchvision")
_told_no_dali: set = set()  # the reasons already reported (once per process each)


def _check_split(split: str) -> str:
    if split == "train":
        return "train"
    if split in ("test", "val"):
        return "test"
    raise ValueError(f"split: expected 'train', 'test' or 'val' ('test' and 'val' both mean the evaluation split), "
                     f"got {split!r}")


def _check_limit(limit_per_class):
    if limit_per_class is not None and (isinstance(limit_per_class, bool) or not isinstance(limit_per_class, int)
                                        or limit_per_class < 1):
        raise ValueError(f"limit_per_class: expected an int >= 1 or None, got {limit_per_class!r}")
    return limit_per_class


def _limit_per_class(images, labels, limit_per_class):
    from .arrays import first_per_class

    if _check_limit(limit_per_class) is None:
        return images, labels
    keep = first_per_class(labels, limit_per_class)
    return images[keep], labels[keep]


def build_dataset(name: str, split: str = "train", root=None, augment: bool = True, seed: int = 0, *,
                  limit_per_class: int | None = None, **options):
    """A dataset whose items are ``(image FloatTensor[C,H,W] normalised, label int, index int)``.

    ``name``: ``"bundled"`` (the Fashion-MNIST subset in the package, 10 classes, 1000 train / 200 test
    images per class, delivered 3x32x32; ``root`` = a folder of Fashion-MNIST IDX files uses those
    instead), ``"fashion_mnist"`` (the full Fashion-MNIST, 60000 / 10000, from the IDX files in ``root``; None:
    Debian's ``dataset-fashion-mnist`` folder, :data:`fashion_mnist.DEBIAN_ROOT`), ``"cifar100"`` (``root`` =
    the ``cifar-100-python`` folder) or ``"imagefolder"`` (``root`` = an ImageNet-layout folder with ``train/``
    and ``val/``; options: ``image_size`` (224),
    ``resize_size`` (256), ``mean``, ``std``, ``on_bad_image`` ('error' or 'skip'), ``scale``, ``ratio``).
    ``split``: ``"train"``, or ``"test"``/``"val"`` (same meaning). ``augment=False``: the deterministic
    eval transform. ``limit_per_class``: keep the first N samples of each class (stored order; sorted file
    names for image folders), a cheap smaller class-balanced subset. Attributes: ``num_classes``,
    ``image_shape``, ``class_names``, ``recipe``, ``seed``, ``view``, ``fingerprint``, ``describe()``;
    ``set_view(v)`` selects view v.
    """
    from .arrays import ArrayDataset
    from .augment import _check_nonneg_int

    seed = _check_nonneg_int("seed", seed)
    split_key = _check_split(split)
    if name == "imagefolder":
        from .folder import ImageFolderDataset

        if root is None:
            raise ValueError("root: expected the path of an ImageNet-layout folder for dataset 'imagefolder', got None")
        _check_limit(limit_per_class)
        return ImageFolderDataset(root, "train" if split_key == "train" else "val", augment=augment, seed=seed,
                                  limit_per_class=limit_per_class, **options)
    if options:
        raise ValueError(f"options: {sorted(options)} apply only to 'imagefolder', not to {name!r}")
    if name in ("bundled", "fashion_mnist"):
        from . import fashion_mnist

        if name == "fashion_mnist":
            root = fashion_mnist.full_root(root)
        images, labels, mean, std, source = fashion_mnist.load_arrays(split_key, root)
        images, labels = _limit_per_class(images, labels, limit_per_class)
        return ArrayDataset(name, split_key, images, labels, fashion_mnist.CLASS_NAMES, list(mean) * 3,
                            list(std) * 3, augment=augment, seed=seed, recipe=PadCrop(padding=4), base_padding=2,
                            channels=3, source=source)
    if name == "cifar100":
        from . import cifar

        images, labels, class_names = cifar.load_arrays(split_key, root)
        images, labels = _limit_per_class(images, labels, limit_per_class)
        return ArrayDataset("cifar100", split_key, images, labels, class_names, cifar.MEAN, cifar.STD,
                            augment=augment, seed=seed, recipe=PadCrop(padding=4), source=f"cifar-100-python:{root}")
    raise ValueError(f"name: expected one of {DATASETS}, got {name!r}")


def dali_available(device=None) -> bool:
    """True when NVIDIA DALI is installed and, with ``device``, decodes a test JPEG there (probed once)."""
    from . import dali

    if device is None:
        return dali.DALI_AVAILABLE
    return dali.probe(device) is None


def _tell_once(reason: str, message: str) -> None:
    if reason not in _told_no_dali:
        _told_no_dali.add(reason)
        print(message, file=sys.stderr)


def _use_dali(ds, backend: str, device) -> bool:
    """Whether an image folder goes through DALI: ``"dali"`` demands it (a clear error when it cannot run),
    ``"auto"`` takes it when it is installed, runs on ``device`` and ``on_bad_image="error"``, and otherwise
    says once why the torchvision path is used."""
    from . import dali

    if backend == "torchvision":
        return False
    if backend == "dali":
        dali.require_dali()
        err = dali.probe(device)
        if err is not None:
            raise ValueError(f"backend: 'dali' cannot run on {device}: {type(err).__name__}: {err} "
                             f"(use backend 'torchvision', or reinstall DALI: {dali.install_hint()})") from err
        return True
    if ds.on_bad_image != "error":
        return False  # DALI cannot skip bad images
    if not dali.DALI_AVAILABLE:
        _tell_once("not installed", f"mtkd_fast.data: NVIDIA DALI is not installed ({dali.DALI_IMPORT_ERROR}); image "
                   f"folders are decoded with PIL + torchvision instead ({dali.install_hint()} for DALI)")
        return False
    err = dali.probe(device)
    if err is not None:
        first = (str(err).strip().splitlines() or [""])[0]
        _tell_once(f"probe {device}", f"mtkd_fast.data: NVIDIA DALI is installed but cannot decode on {device} "
                   f"({type(err).__name__}: {first}); image folders are decoded with PIL + torchvision instead "
                   f"(for DALI: {dali.install_hint()}; data_backend='torchvision' silences this)")
        return False
    return True


def build_loader(ds, batch_size: int, shuffle: bool = True, seed: int = 0, epoch: int = 0, num_workers: int = 0,
                 drop_last: bool = False, rank: int = 0, world_size: int = 1, device="cpu", *, backend: str = "auto",
                 channels_last: bool = False):
    """An iterable of ``(images [B,C,H,W] float, labels [B] int64, indices [B] int64)`` on ``device``.

    The order is ``DistributedSampler``'s for (seed, epoch, rank, world_size) (so runs are reproducible and
    ranks see disjoint shards, padded by wrapping to equal length); ``len(loader)`` is the number of
    batches. ``backend`` (image folders only): ``"auto"`` (DALI when it is installed, decodes on
    ``device`` (probed once) and ``on_bad_image="error"``, else torchvision, saying why once),
    ``"dali"`` or ``"torchvision"``; DALI uses ``num_workers`` threads, or
    :func:`mtkd_fast.data.dali.default_threads` with ``num_workers=0``. ``channels_last=True``: images in
    ``torch.channels_last`` memory format (DALI writes them so directly).
    """
    from .arrays import ArrayDataset
    from .folder import ImageFolderDataset

    if backend not in BACKENDS:
        raise ValueError(f"backend: expected 'auto', 'dali' or 'torchvision', got {backend!r}")
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise ValueError(f"num_workers: expected an int >= 0, got {num_workers!r}")
    indices = epoch_indices(len(ds), shuffle=shuffle, seed=seed, epoch=epoch, rank=rank, world_size=world_size)
    batches = split_batches(indices, batch_size, drop_last)
    if isinstance(ds, ArrayDataset):
        return _in_format(ArrayLoader(ds, batches, num_workers=num_workers, device=device), channels_last)
    if not isinstance(ds, ImageFolderDataset):
        raise TypeError(f"ds: expected a dataset from build_dataset, got {type(ds).__name__}")
    if _use_dali(ds, backend, device):
        from . import dali

        return _in_format(dali.DaliLoader(ds, batches, batch_size=batch_size, device=device,
                                          num_threads=dali.default_threads(num_workers),
                                          channels_last=channels_last), channels_last)
    return _in_format(FolderLoader(ds, batches, num_workers=num_workers, device=device), channels_last)


class _ChannelsLast:
    """A loader whose images come in ``torch.channels_last`` memory format (a no-op where they already do)."""

    def __init__(self, loader):
        self.loader = loader

    def __len__(self):
        return len(self.loader)

    def __getattr__(self, name):  # e.g. FolderLoader.skipped
        return getattr(self.loader, name)

    def __iter__(self):
        import torch

        for images, labels, indices in self.loader:
            yield images.contiguous(memory_format=torch.channels_last), labels, indices


def _in_format(loader, channels_last: bool):
    return _ChannelsLast(loader) if channels_last else loader

