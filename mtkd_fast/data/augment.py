"""Replayable augmentation: view ``v`` of sample ``i`` is a pure function of ``(seed, v, i)``.

Every random choice (crop window, flip) comes from a counter-based hash of ``(seed, view, index, draw)``
rather than from a stateful generator, so any process, worker, rank or data path (torchvision, DALI,
on-device batches) reproduces exactly the image a teacher cache saw, in any order.

Two recipes:

- :class:`PadCrop` (CIFAR, docs/method.md section 7): pad ``padding`` zero pixels on each side, take a crop of the
  original size at a uniformly random offset, flip horizontally with probability 1/2. The window is given
  in pixels of the (unpadded) image: ``top, left`` in ``[-padding, padding]``, ``height, width`` = the
  image size.
- :class:`ResizedCrop` (ImageNet): torchvision's RandomResizedCrop rule (area fraction in ``scale``,
  log-uniform aspect ratio in ``ratio``, 10 attempts, then the whole image) drawn in coordinates *relative
  to the image* (fractions of its height and width, on a 1/4096 grid), so the window is known without
  reading the image and both decoders turn it into the same pixels: ``pixel_box`` rounds
  ``top * H`` and ``(top + height) * H`` half up, exactly as DALI's slice does for normalised windows.
  (The aspect ratio is therefore relative to the image's own aspect ratio, unlike torchvision's.)
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import NamedTuple

import numpy as np

__all__ = ["PadCrop", "ResizedCrop", "ViewParams", "view_params", "pixel_box", "hash_uniforms"]

_GRID = 4096  # relative windows are multiples of 1/4096: k * size / 4096 is exact in float32 for size <= 4096
_U64 = np.uint64
_GOLDEN = _U64(0x9E3779B97F4A7C15)
_MIX1 = _U64(0xBF58476D1CE4E5B9)
_MIX2 = _U64(0x94D049BB133111EB)


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on a uint64 array (arithmetic wraps mod 2**64)."""
    x = (x ^ (x >> _U64(30))) * _MIX1
    x = (x ^ (x >> _U64(27))) * _MIX2
    return x ^ (x >> _U64(31))


def _check_nonneg_int(name: str, value) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name}: expected a non-negative int, got {type(value).__name__}")
    if not 0 <= int(value) < 2**63:
        raise ValueError(f"{name}: expected a non-negative int below 2**63, got {value}")
    return int(value)


def hash_uniforms(seed: int, view: int, indices, n_draws: int) -> np.ndarray:
    """Uniforms in [0, 1) of shape ``[len(indices), n_draws]``, a pure function of (seed, view, index, draw)."""
    seed = _check_nonneg_int("seed", seed)
    view = _check_nonneg_int("view", view)
    idx = np.asarray(indices)
    if idx.ndim != 1 or (idx.size and (not np.issubdtype(idx.dtype, np.integer) or idx.min() < 0)):
        raise ValueError(f"index: expected non-negative integer sample indices, got {idx!r:.80}")
    with np.errstate(over="ignore"):
        key = _mix64(np.full(1, seed, dtype=_U64) ^ _GOLDEN)
        key = _mix64(key ^ _U64(view))
        key = _mix64(key ^ idx.astype(_U64))  # [N]
        draws = (np.arange(1, n_draws + 1, dtype=_U64) * _GOLDEN)[None, :]
        bits = _mix64(key[:, None] + draws)  # [N, n_draws]
    return (bits >> _U64(11)).astype(np.float64) * 2.0**-53


@dataclass(frozen=True)
class PadCrop:
    """CIFAR augmentation: zero-pad ``padding``, random crop back to the image size, random h-flip."""

    padding: int = 4
    flip: bool = True

    def to_dict(self) -> dict:
        return {"kind": "pad_crop", **asdict(self)}


@dataclass(frozen=True)
class ResizedCrop:
    """ImageNet augmentation: random resized crop (relative window) to ``size`` x ``size``, random h-flip."""

    size: int = 224
    scale: tuple = (0.08, 1.0)
    ratio: tuple = (3.0 / 4.0, 4.0 / 3.0)
    flip: bool = True
    attempts: int = 10

    def to_dict(self) -> dict:
        d = asdict(self)
        d["scale"], d["ratio"] = list(self.scale), list(self.ratio)
        return {"kind": "resized_crop", "grid": _GRID, **d}


class ViewParams(NamedTuple):
    """The crop window and flip of one view. Scalars for one index, numpy arrays for an array of indices.

    Units: pixels of the image for :class:`PadCrop`; fractions of the image's height/width for
    :class:`ResizedCrop` (use :func:`pixel_box`).
    """

    top: object
    left: object
    height: object
    width: object
    flip: object


def view_params(seed: int, view: int, index, recipe=PadCrop(), image_size=None) -> ViewParams:
    """Augmentation parameters of view ``view`` of sample(s) ``index``, a pure function of its arguments.

    ``index``: an int, or a 1-D array of ints (then every field is an array). ``image_size``: (H, W) of
    the image the recipe applies to; required for :class:`PadCrop` (the window's size), ignored for
    :class:`ResizedCrop` (relative window).
    """
    scalar = isinstance(index, (int, np.integer)) and not isinstance(index, bool)
    idx = np.asarray([index] if scalar else index, dtype=np.int64)
    if isinstance(recipe, PadCrop):
        if image_size is None:
            raise ValueError("image_size: expected (H, W) for the PadCrop recipe, got None")
        H, W = int(image_size[0]), int(image_size[1])
        u = hash_uniforms(seed, view, idx, 3)
        span = 2 * recipe.padding + 1
        top = np.floor(u[:, 0] * span).astype(np.int64) - recipe.padding
        left = np.floor(u[:, 1] * span).astype(np.int64) - recipe.padding
        height = np.full_like(top, H)
        width = np.full_like(top, W)
        flip = (u[:, 2] < 0.5) & recipe.flip
    elif isinstance(recipe, ResizedCrop):
        top, left, height, width = _relative_resized_crop(seed, view, idx, recipe)
        flip = (hash_uniforms(seed, view, idx, 4 * recipe.attempts + 1)[:, -1] < 0.5) & recipe.flip
    else:
        raise TypeError(f"recipe: expected PadCrop or ResizedCrop, got {type(recipe).__name__}")
    out = ViewParams(top, left, height, width, flip.astype(bool))
    if scalar:
        return ViewParams(*(v[0].item() for v in out))
    return out


def _relative_resized_crop(seed, view, idx, recipe: ResizedCrop):
    A = recipe.attempts
    u = hash_uniforms(seed, view, idx, 4 * A + 1)[:, : 4 * A].reshape(len(idx), A, 4)
    area = recipe.scale[0] + u[..., 0] * (recipe.scale[1] - recipe.scale[0])
    log_lo, log_hi = math.log(recipe.ratio[0]), math.log(recipe.ratio[1])
    ratio = np.exp(log_lo + u[..., 1] * (log_hi - log_lo))
    # sizes in grid units (1/4096 of the image side)
    w_units = np.floor(np.sqrt(area * ratio) * _GRID + 0.5).astype(np.int64)
    h_units = np.floor(np.sqrt(area / ratio) * _GRID + 0.5).astype(np.int64)
    ok = (w_units >= 1) & (w_units <= _GRID) & (h_units >= 1) & (h_units <= _GRID)
    first = np.argmax(ok, axis=1)  # first accepted attempt; rows with none fall back to the whole image
    rows = np.arange(len(idx))
    any_ok = ok[rows, first]
    h = np.where(any_ok, h_units[rows, first], _GRID)
    w = np.where(any_ok, w_units[rows, first], _GRID)
    top = np.floor(u[rows, first, 2] * (_GRID - h + 1)).astype(np.int64)
    left = np.floor(u[rows, first, 3] * (_GRID - w + 1)).astype(np.int64)
    top, left = np.where(any_ok, top, 0), np.where(any_ok, left, 0)
    return top / _GRID, left / _GRID, h / _GRID, w / _GRID


def pixel_box(params: ViewParams, image_height: int, image_width: int) -> tuple[int, int, int, int]:
    """(top, left, height, width) in pixels of a relative :class:`ResizedCrop` window on an H x W image.

    Rounds each edge half up, as DALI does for normalised slice windows: top = round(t * H),
    bottom = round((t + h) * H), height = bottom - top (at least 1 pixel).
    """
    top = math.floor(params.top * image_height + 0.5)
    bottom = math.floor((params.top + params.height) * image_height + 0.5)
    left = math.floor(params.left * image_width + 0.5)
    right = math.floor((params.left + params.width) * image_width + 0.5)
    return top, left, max(1, bottom - top), max(1, right - left)
