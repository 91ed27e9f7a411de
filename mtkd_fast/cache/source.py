"""``CachedTeachers``: a TeacherSource that reads the teachers' outputs from a cache built by ``build_cache``."""

from __future__ import annotations

import os

import numpy as np
import torch
from torch import Tensor

from ..teachers import TeacherOutputs
from . import storage
from .manifest import (
    CacheCorruptError,
    CacheMismatchError,
    dataset_identity,
    read_manifest,
    require_match,
    unwrap_teachers,
    weights_sha256,
)

VERIFY_MODES = ("lazy", "full", "none")


def open_arrays(path: str, manifest: dict) -> dict:
    arrays = {}
    for name, spec in manifest["arrays"].items():
        try:
            arrays[name] = storage.open_array(os.path.join(path, spec["file"]), spec["dtype"], spec["shape"])
        except ValueError as exc:
            raise CacheCorruptError(str(exc)) from None
    return arrays


def chunk_bounds(manifest: dict, c: int) -> tuple[int, int]:
    cs, N = manifest["chunk_size"], manifest["dataset"]["num_samples"]
    return c * cs, min(N, (c + 1) * cs)


def verify_chunk(manifest: dict, arrays: dict, v: int, c: int, path: str = "") -> list[str]:
    """Names of the arrays whose (view v, chunk c) block does not match its recorded checksum."""
    s, e = chunk_bounds(manifest, c)
    return [name for name, a in arrays.items() if storage.checksum(a[v, s:e]) != manifest["checksums"][name][v][c]]


def verify_cache(path: str, progress: bool = False) -> dict:
    """Check every array's size and every chunk's checksum. Returns ``{"ok": bool, "problems": [str, ...],
    "chunks_checked": int}``; never raises for a damaged cache (that is what it reports)."""
    try:
        manifest = read_manifest(path)
    except CacheCorruptError as exc:  # an edited or damaged manifest: nothing else can be trusted
        return {"ok": False, "problems": [str(exc)], "chunks_checked": 0}
    problems = []
    arrays = {}
    for name, spec in manifest["arrays"].items():
        try:
            arrays[name] = storage.open_array(os.path.join(path, spec["file"]), spec["dtype"], spec["shape"])
        except (ValueError, FileNotFoundError) as exc:
            problems.append(str(exc))
    units = [(v, c) for v in range(manifest["views"]) for c in range(manifest["num_chunks"])]
    it = units
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(units, unit="chunk", desc="cache verify")
    for v, c in it:
        s, e = chunk_bounds(manifest, c)
        for name in verify_chunk(manifest, arrays, v, c):
            problems.append(f"{os.path.join(path, manifest['arrays'][name]['file'])}: checksum mismatch in view {v}, "
                            f"chunk {c} (samples {s}..{e - 1})")
        # intact bytes can still be wrong outputs: a teacher with NaN weights gives a NaN cache whose checksums
        # match, and training on it would go non-finite
        for name, a in arrays.items():
            bad = storage.count_non_finite(a[v, s:e], manifest["arrays"][name]["dtype"])
            if bad:
                problems.append(f"{os.path.join(path, manifest['arrays'][name]['file'])}: {bad} NaN/Inf value(s) in "
                                f"view {v}, chunk {c} (samples {s}..{e - 1}); the teachers' outputs were not finite")
    return {"ok": not problems, "problems": problems, "chunks_checked": len(units)}


def view_for_epoch(manifest_or_source, epoch: int) -> int:
    """The augmentation view that epoch ``epoch`` (0-based) replays: ``epoch mod V`` for a "cyclic" cache; for a
    "shuffled" one, position ``epoch mod V`` of a permutation of the V views drawn from (seed, epoch // V)."""
    m = getattr(manifest_or_source, "manifest", manifest_or_source)
    if not isinstance(epoch, int) or epoch < 0:
        raise ValueError(f"epoch: expected a non-negative integer, got {epoch!r}")
    V = m["views"]
    sched = m["view_schedule"]
    if sched["kind"] == "cyclic":
        return epoch % V
    g = torch.Generator().manual_seed(int(sched["seed"]) * 1_000_003 + epoch // V)
    return int(torch.randperm(V, generator=g)[epoch % V])


# ---- what to change when a cache does not match the run: the flags of `mtkd-fast train` (cache build's twins:
# --seed for --data-seed, --checkpoints for --teacher-checkpoints, the others the same names)
_REBUILD = "or rebuild the cache with the run's"


def _dataset_hint(record: dict):
    """``hint`` for :func:`require_match` of the cache's dataset ``record``: the flag that makes the run match."""
    def hint(path: str, cached, given) -> str:
        key = path.split(".")[1].split(" ")[0] if "." in path else ""
        if key == "name":
            return f"pass --dataset {cached}, {_REBUILD} --dataset {given}"
        if key == "num_samples":
            k = record.get("num_classes")
            per = (f"--limit-per-class {cached // k}" if isinstance(k, int) and k > 0 and cached % k == 0
                   else "the --limit-per-class it was built with")
            return f"pass {per} (the cache's {cached} images), {_REBUILD} --limit-per-class"
        if key == "seed":  # the augmentation seed: train's --data-seed (default --seed), cache build's --seed
            return f"pass --data-seed {cached}, or rebuild the cache with --seed {given}"
        if key in ("fingerprint", "source", "split", "num_classes", "image_shape"):
            return ("other images: pass the --dataset, --data-root and --limit-per-class the cache was built from, "
                    f"{_REBUILD}")
        # the augmentation recipe and normalisation are the dataset's own, not options
        return "no option of the run sets it (another mtkd_fast version built the cache?): rebuild the cache"
    return hint


def _checkpoint_hint(i: int, record: dict, archs: list):
    def hint(path: str, cached, given) -> str:
        sha = record.get("checkpoint_sha256")
        which = f" (sha256 {sha[:12]}...)" if sha else ""
        return (f"pass the file the cache was built from{which} as --teacher-checkpoints' {_ordinal(i)} "
                f"({record['arch']}; the cache's teachers, in order: {' '.join(archs)}), {_REBUILD} "
                "--checkpoints")
    return hint


def _ordinal(i: int) -> str:
    return {0: "first", 1: "second", 2: "third"}.get(i, f"{i + 1}th")


class CachedTeachers:
    """TeacherSource backed by a teacher-output cache.

    ``source(images, indices, view)`` returns the M teachers' outputs for dataset samples ``indices`` under
    augmentation view ``view`` as float32 tensors on ``device``. Fields the cache left out (storage budget) are
    computed by running those teachers live on ``images``.

    Args:
        path: cache directory.
        teachers: the teacher models (or a LiveTeachers). Checked against the cache (weights hash); required
            when the cache leaves fields out.
        device: where outputs go.
        dataset: the training set; checked against the cache (fingerprint, size, augmentation recipe, seed).
        precision, strategy: the run's teacher-precision choice and strategy, checked against the precision the
            cache's teachers ran in (:meth:`check_precision`); default: those of ``teachers`` (a LiveTeachers).
        verify: "lazy" (check each chunk's checksum the first time a batch reads it; default), "full" (check
            everything now) or "none" (sizes only).
    """

    def __init__(self, path: str, teachers=None, device="cpu", dataset=None, verify: str = "lazy", *,
                 precision: str | None = None, strategy: str | None = None):
        if verify not in VERIFY_MODES:
            raise ValueError(f"verify: expected one of {VERIFY_MODES}, got {verify!r}")
        self.path = path
        self.manifest = read_manifest(path)
        self.device = torch.device(device)
        self.verify = verify
        self.arrays = open_arrays(path, self.manifest)
        self._verified: set[tuple[int, int]] = set()
        m = self.manifest
        self.views = m["views"]
        self.num_samples = m["dataset"]["num_samples"]
        self._topk = m["topk"]
        self._live = None
        self._live_index: list[int] = []  # teachers run live (those with fields left out)
        missing = [(i, f) for i, t in enumerate(m["teachers"]) for f in storage.FIELDS if f not in t["stored"]]
        # the run's teacher-precision choice (default: the LiveTeachers'), checked with or without teachers
        self.check_precision(precision if precision is not None else getattr(teachers, "precision", "auto"),
                             strategy if strategy is not None else getattr(teachers, "strategy", None))
        if teachers is not None:
            self.check_teachers(teachers)
            models = unwrap_teachers(teachers)
            self._live_index = sorted({i for i, _ in missing})
            if self._live_index:
                self._live = [models[i].eval().requires_grad_(False) for i in self._live_index]
                self._live_autocast = getattr(teachers, "autocast_dtype", None)
                self._engine = teachers if hasattr(teachers, "run_subset") else None  # same numerics as live
        elif missing:
            i, f = missing[0]
            raise ValueError(f"teachers: the cache at {path} leaves out teachers[{i}] ({m['teachers'][i]['arch']}) "
                             f"field {f!r} (storage budget); pass the teacher models to compute it live")
        if dataset is not None:
            self.check_dataset(dataset)
        if verify == "full":
            for v in range(self.views):
                for c in range(m["num_chunks"]):
                    self._verify(v, c)

    @property
    def num_teachers(self) -> int:
        return len(self.manifest["teachers"])

    def check_teachers(self, teachers) -> None:
        models = unwrap_teachers(teachers)
        rec = self.manifest["teachers"]
        archs = [t["arch"] for t in rec]
        if len(models) != len(rec):
            raise CacheMismatchError(f"teachers: the teacher cache was made with a different teachers (length): "
                                     f"cache has {len(rec)}, given {len(models)}; pass --teachers {' '.join(archs)} "
                                     f"with their --teacher-checkpoints, {_REBUILD} --teachers")
        for i, (t, model) in enumerate(zip(rec, models)):
            require_match(t["weights_sha256"], weights_sha256(model), "teachers", f"teachers[{i}].weights_sha256 "
                          f"(checkpoint of {t['arch']})", hint=_checkpoint_hint(i, t, archs))

    @property
    def teacher_precision(self) -> str:
        """The precision the cache's teachers ran in (caches from before it was recorded: fp32)."""
        return self.manifest.get("teacher_precision", "fp32")

    def check_precision(self, precision: str, strategy: str | None = None) -> None:
        """A run asking a teacher precision ("fp32", "bf16", "fp16") gets only a cache built in it. "auto" gets any
        cache, unless the precision policy keeps float32 teachers for ``strategy``
        (``mtkd_fast.teachers.AUTO_FP32_STRATEGIES``): then a float32 one."""
        from ..teachers import AUTO_FP32_STRATEGIES, PRECISIONS  # read at call time: the policy is one table

        if precision not in PRECISIONS:
            raise ValueError(f"teacher_precision: expected one of {list(PRECISIONS)}, got {precision!r}")
        if precision == "auto" and strategy in AUTO_FP32_STRATEGIES and self.teacher_precision != "fp32":
            raise CacheMismatchError(
                f"teacher_precision: auto keeps float32 teachers for strategy {strategy!r}, but the teacher cache was "
                f"made with teacher_precision {self.teacher_precision!r}; rebuild it with --teacher-precision fp32 "
                f"or ask --teacher-precision {self.teacher_precision} explicitly")
        if precision != "auto":
            require_match(self.teacher_precision, precision, "teacher_precision", "teacher_precision",
                          hint=lambda _, cached, given: f"pass --teacher-precision {cached}, {_REBUILD} "
                                                        f"--teacher-precision {given}")

    def describe(self) -> str:
        """One line for logs: where the outputs come from and the precision they were computed in."""
        m = self.manifest
        text = (f"teachers: cache {self.path} ({m['views']} views), outputs computed in {self.teacher_precision} "
                f"(BatchNorm {'folded' if m.get('fold_bn') else 'unfolded'})")
        if self._live_index:
            left = sorted({f for i in self._live_index for f in storage.FIELDS
                           if f not in m["teachers"][i]["stored"]})
            text += (f"; {' and '.join(left)} of teachers {self._live_index} left out of it, computed live in "
                     f"{self.live_precision}")
        return text

    @property
    def live_teachers(self) -> list[int]:
        """The teachers some of whose fields the cache left out, computed live."""
        return list(self._live_index)

    @property
    def live_precision(self) -> str | None:
        """The precision the left-out fields are computed in (None: nothing is computed live)."""
        if not self._live_index:
            return None
        engine = getattr(self, "_engine", None)
        if engine is not None:
            return engine.precision_used
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self._live_autocast]

    def check_dataset(self, dataset) -> None:
        require_match(self.manifest["dataset"], dataset_identity(dataset), "dataset", "dataset",
                      hint=_dataset_hint(self.manifest["dataset"]))

    def _verify(self, v: int, c: int) -> None:
        bad = verify_chunk(self.manifest, self.arrays, v, c)
        if bad:
            s, e = chunk_bounds(self.manifest, c)
            f = os.path.join(self.path, self.manifest["arrays"][bad[0]]["file"])
            raise CacheCorruptError(f"{f}: teacher cache data does not match its checksum in view {v}, chunk {c} "
                                    f"(samples {s}..{e - 1}); rebuild the cache (`mtkd-fast cache verify` lists "
                                    "every damaged chunk)")
        self._verified.add((v, c))

    def _take(self, name: str, view: int, idx: np.ndarray) -> np.ndarray:
        return self.arrays[name][view][idx]

    def __call__(self, images: Tensor | None, indices, view: int) -> TeacherOutputs:
        if not isinstance(view, (int, np.integer)) or not 0 <= int(view) < self.views:
            raise ValueError(f"view: expected an integer in [0, {self.views}) (the cache has V={self.views} views), "
                             f"got {view!r}")
        view = int(view)
        idx = torch.as_tensor(indices).detach().cpu().long().numpy()
        if idx.ndim != 1:
            raise ValueError(f"indices: expected a 1-d tensor of dataset indices, got shape {tuple(idx.shape)}")
        if images is not None and images.shape[0] != idx.shape[0]:
            raise ValueError(f"indices: expected {images.shape[0]} indices (one per image), got {idx.shape[0]}")
        if idx.size and (idx.min() < 0 or idx.max() >= self.num_samples):
            raise ValueError(f"indices: expected dataset indices in [0, {self.num_samples - 1}], got values in "
                             f"[{idx.min()}, {idx.max()}]")
        if self.verify == "lazy":
            for c in np.unique(idx // self.manifest["chunk_size"]).tolist():
                if (view, c) not in self._verified:
                    self._verify(view, c)
        live_out = self._run_live(images) if self._live else {}
        dev, enc = self.device, self.manifest["encodings"]
        logits, embeddings, maps = [], [], []
        for m, t in enumerate(self.manifest["teachers"]):
            if self._topk:
                logits.append(storage.topk_decode(
                    self._take(f"t{m}.logits", view, idx), self._take(f"t{m}.logits.idx", view, idx),
                    self._take(f"t{m}.logits.tail", view, idx), t["num_classes"], self._topk["temperature"],
                    enc["logits"], dev))
            else:
                logits.append(storage.decode_float(self._take(f"t{m}.logits", view, idx), enc["logits"], dev))
            if "embeddings" in t["stored"]:
                embeddings.append(storage.decode_float(self._take(f"t{m}.embeddings", view, idx),
                                                       enc["embeddings"], dev))
            else:
                embeddings.append(live_out[m].embeddings)
            if "feature_maps" not in t["stored"]:
                maps.append(live_out[m].feature_maps)
            elif t["feature_map_encoding"] == "int8":
                maps.append(storage.dequantize_int8(self._take(f"t{m}.feature_maps", view, idx),
                                                    self._take(f"t{m}.feature_maps.scale", view, idx), dev))
            else:
                maps.append(storage.decode_float(self._take(f"t{m}.feature_maps", view, idx),
                                                 t["feature_map_encoding"], dev))
        return TeacherOutputs(torch.stack(logits), embeddings, maps)

    def _run_live(self, images: Tensor | None) -> dict:
        """Outputs of the teachers whose fields were left out, on ``images`` (to the cache's device)."""
        if images is None:
            raise ValueError("images: this cache leaves teacher fields out, which are computed live from the images; "
                             "got images=None")
        if getattr(self, "_engine", None) is not None:
            o = self._engine.run_subset(images, self._live_index)
            return {i: _LiveFields(e.to(self.device), f.to(self.device))
                    for i, e, f in zip(self._live_index, o.embeddings, o.feature_maps)}
        out = {}
        with torch.inference_mode():
            ac = self._live_autocast
            with torch.autocast(images.device.type, dtype=ac, enabled=ac is not None):
                for i, model in zip(self._live_index, self._live):
                    feats, _ = model(images, is_feat=True)
                    out[i] = (feats[-1].float(), feats[-2].float())
        with torch.inference_mode(False):  # usable as constants in the student's graph
            return {i: _LiveFields(e.clone().to(self.device), f.clone().to(self.device)) for i, (e, f) in out.items()}


class _LiveFields:
    __slots__ = ("embeddings", "feature_maps")

    def __init__(self, embeddings: Tensor, feature_maps: Tensor):
        self.embeddings, self.feature_maps = embeddings, feature_maps


def open_teacher_source(path: str, teachers=None, device="cpu", *, dataset=None, verify: str = "lazy",
                        precision: str | None = None, strategy: str | None = None) -> CachedTeachers:
    """Open the teacher-output cache at ``path`` as a TeacherSource (see :class:`CachedTeachers`).

    Pass ``teachers`` to check the cache was made with them (and to compute any field the cache left out) and
    ``dataset`` to check it was made from the same data, augmentation recipe and seed. ``precision`` / ``strategy``:
    the run's teacher-precision choice, checked against the cache's (:meth:`CachedTeachers.check_precision`;
    default: those of ``teachers`` when it is a LiveTeachers, else "auto").
    """
    return CachedTeachers(path, teachers=teachers, device=device, dataset=dataset, verify=verify, precision=precision,
                          strategy=strategy)
