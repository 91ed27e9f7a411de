"""The cache manifest (``manifest.json``): what a cache was made from and how it is stored.

It records the dataset (name, size, fingerprint, augmentation recipe and seed), every teacher (architecture,
hash of its weights, checkpoint file hash when built from a file, output shapes), V and the view schedule,
encodings, array shapes and per-chunk checksums. A cache is used only if what the caller has matches it
field by field: a mismatch raises :class:`CacheMismatchError` naming the first differing field.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Callable, Iterable, Optional

import numpy as np
import torch
from torch import nn

from .._io import file_sha256
from .._validation import DataError

FORMAT = "mtkd_fast.teacher_cache"
VERSION = 1
MANIFEST = "manifest.json"
LAYOUT = "layout.json"  # written when a build starts; becomes manifest.json (plus checksums) when it ends
DIGEST_KEY = "manifest_sha256"  # the manifest's checksum of its own content (see manifest_digest)


class CacheMismatchError(ValueError):
    """The cache was made from other teachers, data or settings than the caller's."""


class CacheCorruptError(DataError):
    """A cache file is missing bytes or its content does not match the recorded checksum."""


def read_manifest(cache_dir: str) -> dict:
    path = os.path.join(cache_dir, MANIFEST)
    if not os.path.isdir(cache_dir):
        raise FileNotFoundError(f"path: no teacher cache at {cache_dir} (not a directory)")
    if not os.path.exists(path):
        hint = " (a build was started but not finished: run `mtkd-fast cache build` again to resume it)" \
            if os.path.exists(os.path.join(cache_dir, LAYOUT)) else ""
        raise FileNotFoundError(f"path: {cache_dir} has no {MANIFEST}{hint}")
    try:
        with open(path) as f:
            m = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CacheCorruptError(f"{path}: manifest is not valid JSON ({exc})") from None
    if not isinstance(m, dict):
        raise CacheCorruptError(f"{path}: expected a JSON object, got {type(m).__name__}; rebuild the cache")
    if m.get("format") != FORMAT:
        raise ValueError(f"path: {path} is not an mtkd_fast teacher cache (format {m.get('format')!r})")
    if m.get("version") != VERSION:
        raise ValueError(f"path: cache format version {m.get('version')} is not supported (expected {VERSION})")
    check_manifest_digest(m, path)
    return m


def manifest_digest(manifest: dict) -> str:
    """SHA-256 of the manifest's canonical JSON (sorted keys, no spaces) without its own digest entry: every
    array's dtype, shape and file, the encodings and the chunk checksums are covered by it."""
    body = {k: v for k, v in manifest.items() if k != DIGEST_KEY}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def check_manifest_digest(manifest: dict, path: str) -> None:
    """Raise CacheCorruptError if ``manifest`` was edited (or damaged) after the build wrote it."""
    recorded = manifest.get(DIGEST_KEY)
    if recorded is None:
        raise CacheCorruptError(f"{path}: the manifest has no checksum of its own content ({DIGEST_KEY}); it was "
                                "edited or written by an older version: rebuild the cache")
    if recorded != manifest_digest(manifest):
        raise CacheCorruptError(f"{path}: the manifest's content does not match its checksum ({DIGEST_KEY}): the "
                                "file was edited or damaged; rebuild the cache")


def first_difference(expected: Any, actual: Any, prefix: str = "") -> tuple[str, Any, Any] | None:
    """The dotted path of the first field where two JSON-like values differ, with both values."""
    if isinstance(expected, dict) and isinstance(actual, dict):
        # in the record's own order: what a cache is made from comes before what is derived from it
        for key in list(expected) + [k for k in actual if k not in expected]:
            sub = f"{prefix}.{key}" if prefix else str(key)
            if key not in expected or key not in actual:
                return sub, expected.get(key, "<absent>"), actual.get(key, "<absent>")
            d = first_difference(expected[key], actual[key], sub)
            if d:
                return d
        return None
    if isinstance(expected, list) and isinstance(actual, list):
        if len(expected) != len(actual):
            return f"{prefix} (length)", len(expected), len(actual)
        for i, (a, b) in enumerate(zip(expected, actual)):
            d = first_difference(a, b, f"{prefix}[{i}]")
            if d:
                return d
        return None
    return None if expected == actual else (prefix, expected, actual)


def require_match(cached: Any, given: Any, what: str, field: str,
                  hint: Optional[Callable[[str, Any, Any], str]] = None) -> None:
    """Raise CacheMismatchError if ``given`` differs from the cache's record ``cached`` of ``field``; ``hint(path,
    cached_value, given_value)`` adds what to change (the flag to pass) to the message."""
    d = first_difference(cached, given, field)
    if d:
        path, a, b = d
        advice = hint(path, a, b) if hint else ""
        raise CacheMismatchError(f"{what}: the teacher cache was made with a different {path}: "
                                 f"cache has {a!r}, given {b!r}" + (f"; {advice}" if advice else ""))


# ---- identities ----------------------------------------------------------------------------------------------

def weights_sha256(model: nn.Module) -> str:
    """Hash of a model's parameters and buffers (names, dtypes, shapes, values): identifies the teacher's
    weights whether they came from a checkpoint file or not."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.dtype == torch.bfloat16:
            t = t.view(torch.int16)
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def teacher_identity(model: nn.Module, arch: str | None = None, checkpoint: str | None = None) -> dict:
    return {
        "arch": arch or type(model).__name__,
        "weights_sha256": weights_sha256(model),
        "checkpoint_sha256": file_sha256(checkpoint) if checkpoint else None,
    }


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return float(x)
    if isinstance(x, torch.Tensor):
        return _jsonable(x.tolist())
    if hasattr(x, "to_dict"):  # augmentation recipes
        return _jsonable(x.to_dict())
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    return repr(x)


def dataset_identity(dataset, sample_count: int = 64) -> dict:
    """Name, size, fingerprint, augmentation recipe and seed of a dataset with replayable views.

    ``mtkd_fast.data`` datasets describe themselves (``describe()``: source, recipe, normalisation, seed,
    fingerprint of pixels and labels). Otherwise the dataset's ``fingerprint`` / ``recipe`` / ``seed`` /
    ``name`` attributes are used, and without a ``fingerprint`` one is computed from the labels and pixels
    of up to ``sample_count`` evenly spaced samples under view 0.
    """
    n = len(dataset)
    describe = getattr(dataset, "describe", None)
    if callable(describe):
        d = _jsonable(describe())
        d["num_samples"] = n
        return {k: d.get(k) for k in ("name", "num_samples", "fingerprint", "recipe", "seed")} | \
            {k: v for k, v in sorted(d.items()) if k not in ("name", "num_samples", "fingerprint", "recipe", "seed")}
    name = getattr(dataset, "name", None) or type(dataset).__name__
    recipe = getattr(dataset, "recipe", None)
    seed = getattr(dataset, "seed", None)
    fp = getattr(dataset, "fingerprint", None)
    if fp is None:
        h = hashlib.sha256(f"{name}|{n}|".encode())
        set_view = getattr(dataset, "set_view", None)
        old_view = getattr(dataset, "view", None)
        if set_view:
            set_view(0)
        try:
            for i in sorted({int(j) for j in np.linspace(0, n - 1, min(n, sample_count))}):
                img, label = dataset[i][:2]
                h.update(torch.as_tensor(img).detach().cpu().float().contiguous().numpy().tobytes())
                h.update(str(int(label)).encode())
        finally:
            if set_view and old_view is not None:
                set_view(old_view)
        fp = "sampled:" + h.hexdigest()
    return {"name": str(name), "num_samples": n, "fingerprint": str(fp), "recipe": _jsonable(recipe),
            "seed": _jsonable(seed)}


def unwrap_teachers(teachers) -> list[nn.Module]:
    """A LiveTeachers, an nn.ModuleList or a sequence of models -> list of the teacher models."""
    inner = getattr(teachers, "teachers", None)
    if isinstance(inner, Iterable):
        return list(inner)
    if isinstance(teachers, nn.Module) and not isinstance(teachers, nn.ModuleList):
        raise ValueError("teachers: expected a LiveTeachers, an nn.ModuleList or a list of teacher models, "
                         f"got a single {type(teachers).__name__}")
    return list(teachers)
