"""Building a teacher-output cache: every teacher once on every (sample, view), in chunks.

Work is cut into units (view v, chunk c of ``chunk_size`` consecutive samples). Each unit is written into the
preallocated memory-mapped arrays, flushed, checksummed, and then recorded in ``chunks/`` (atomically), so an
interrupted build resumes at the first unrecorded unit and, because each unit is always computed in the same
batches, ends byte-identical to an uninterrupted one. Under torchrun each rank takes units
``rank, rank + world_size, ...``; rank 0 writes the manifest once every unit is recorded.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import time
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from .._io import clean_temp_files, write_json_atomic
from .._lock import DirLock
from .._validation import check_temperature
from ..teachers import LiveTeachers
from . import storage
from .manifest import (
    DIGEST_KEY,
    FORMAT,
    LAYOUT,
    MANIFEST,
    VERSION,
    CacheMismatchError,
    dataset_identity,
    first_difference,
    manifest_digest,
    read_manifest,
    teacher_identity,
    unwrap_teachers,
)
from .storage import FIELDS

CHUNKS_DIR = "chunks"


def array_names(m: int, teacher: dict, topk) -> list[str]:
    """Names of teacher m's arrays; the file of array ``a`` is ``a + '.bin'``."""
    names = []
    if topk:
        names += [f"t{m}.logits", f"t{m}.logits.idx", f"t{m}.logits.tail"]
    else:
        names.append(f"t{m}.logits")
    if "embeddings" in teacher["stored"]:
        names.append(f"t{m}.embeddings")
    if "feature_maps" in teacher["stored"]:
        names.append(f"t{m}.feature_maps")
        if teacher["feature_map_encoding"] == "int8":
            names.append(f"t{m}.feature_maps.scale")
    return names


def _array_specs(layout: dict) -> dict:
    V, N = layout["views"], layout["dataset"]["num_samples"]
    enc, topk = layout["encodings"], layout["topk"]
    specs = {}
    for m, t in enumerate(layout["teachers"]):
        K, D, (C, H, W) = t["num_classes"], t["embedding_dim"], t["feature_map_shape"]
        if topk:
            k = topk["k"]
            specs[f"t{m}.logits"] = {"dtype": enc["logits"], "shape": [V, N, k]}
            specs[f"t{m}.logits.idx"] = {"dtype": storage.index_encoding(K), "shape": [V, N, k]}
            specs[f"t{m}.logits.tail"] = {"dtype": "float32", "shape": [V, N]}
        else:
            specs[f"t{m}.logits"] = {"dtype": enc["logits"], "shape": [V, N, K]}
        if "embeddings" in t["stored"]:
            specs[f"t{m}.embeddings"] = {"dtype": enc["embeddings"], "shape": [V, N, D]}
        if "feature_maps" in t["stored"]:
            specs[f"t{m}.feature_maps"] = {"dtype": t["feature_map_encoding"], "shape": [V, N, C, H, W]}
            if t["feature_map_encoding"] == "int8":
                specs[f"t{m}.feature_maps.scale"] = {"dtype": "float16", "shape": [V, N, C]}
    for name, spec in specs.items():
        spec["file"] = name + ".bin"
    return specs


def _choose_stored_fields(teachers: list[dict], fields: Sequence[str], V: int, N: int, enc: dict, topk,
                          budget_bytes: int | None) -> None:
    """Set ``stored`` of each teacher: the requested fields, minus what does not fit ``budget_bytes``
    (feature maps of the largest teachers first, then embeddings). Logits are always stored."""
    for t in teachers:
        t["stored"] = [f for f in FIELDS if f in fields or f == "logits"]

    def total():
        return V * N * sum(storage.per_sample_bytes(
            t["num_classes"], t["embedding_dim"], t["feature_map_shape"], logits=enc["logits"],
            embeddings=enc["embeddings"] if "embeddings" in t["stored"] else None,
            feature_maps=t["feature_map_encoding"] if "feature_maps" in t["stored"] else None,
            topk=topk["k"] if topk else None) for t in teachers)

    if budget_bytes is None:
        return
    for field in ("feature_maps", "embeddings"):
        size_of = (lambda t: int(np.prod(t["feature_map_shape"]))) if field == "feature_maps" else \
            (lambda t: t["embedding_dim"])
        for t in sorted(teachers, key=size_of, reverse=True):
            if total() <= budget_bytes:
                return
            if field in t["stored"]:
                t["stored"].remove(field)
    if total() > budget_bytes:
        raise ValueError(f"budget: the logits alone need {storage.format_bytes(total())} for V={V} views of {N} "
                         f"samples, more than the budget of {storage.format_bytes(budget_bytes)}; store top-k "
                         "logits (topk=...) or fewer views")


def plan_cache(dataset, teachers, *, views: int = 1, teacher_names: Sequence[str] | None = None,
               checkpoints: Sequence[str | None] | None = None, dtype: str = "float16",
               feature_dtype: str | None = None, topk: int | None = None, topk_temperature: float = 4.0,
               fields: Sequence[str] = FIELDS, budget_bytes: int | None = None, chunk_size: int = 1024,
               view_schedule: str = "cyclic", schedule_seed: int = 0, device="cpu", teacher_precision: str = "fp32",
               fold_bn: bool = False) -> dict:
    """The layout of the cache ``build_cache`` would write (everything the manifest holds but checksums).
    ``teacher_precision`` / ``fold_bn``: how the teachers are run (a resolved precision), recorded."""
    if not isinstance(views, int) or views < 1:
        raise ValueError(f"views: expected a positive integer number of augmentation views, got {views!r}")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size: expected a positive integer, got {chunk_size!r}")
    storage.check_encoding("dtype", dtype, storage.FLOAT_ENCODINGS)
    feature_dtype = storage.check_encoding("feature_dtype", feature_dtype or dtype, storage.FEATURE_ENCODINGS)
    for f in fields:
        storage.check_encoding("fields", f, FIELDS)
    if view_schedule not in ("cyclic", "shuffled"):
        raise ValueError(f"view_schedule: expected 'cyclic' or 'shuffled', got {view_schedule!r}")
    if views > 1 and not hasattr(dataset, "set_view"):
        raise ValueError("dataset: expected a dataset with replayable views (a set_view method) for views > 1")
    models = unwrap_teachers(teachers)
    M = len(models)
    if M < 2:
        raise ValueError(f"teachers: expected at least 2 teacher models, got {M}")
    for arg, seq in (("teacher_names", teacher_names), ("checkpoints", checkpoints)):
        if seq is not None and len(seq) != M:
            raise ValueError(f"{arg}: expected {M} entries (one per teacher), got {len(seq)}")
    N = len(dataset)
    if N < 1:
        raise ValueError("dataset: expected at least one sample")

    # output shapes, from one forward pass on sample 0 (view 0)
    if hasattr(dataset, "set_view"):
        dataset.set_view(0)
    x = torch.as_tensor(dataset[0][0])[None].to(device)
    tdesc = []
    with torch.inference_mode():
        for m, model in enumerate(models):
            model.eval()
            feats, z = model(x, is_feat=True)
            if z.dim() != 2 or feats[-1].dim() != 2 or feats[-2].dim() != 4:
                raise ValueError(f"teachers[{m}]: expected (feats, logits) with logits [B, K], feats[-1] [B, D] and "
                                 f"feats[-2] [B, C, H, W], got logits {tuple(z.shape)}, feats[-1] "
                                 f"{tuple(feats[-1].shape)}, feats[-2] {tuple(feats[-2].shape)}")
            ident = teacher_identity(model, teacher_names[m] if teacher_names else None,
                                     checkpoints[m] if checkpoints else None)
            tdesc.append({**ident, "num_classes": int(z.shape[1]), "embedding_dim": int(feats[-1].shape[1]),
                          "feature_map_shape": [int(s) for s in feats[-2].shape[1:]],
                          "feature_map_encoding": feature_dtype})
    if topk is not None:
        K = min(t["num_classes"] for t in tdesc)
        if not isinstance(topk, int) or not 1 <= topk <= K:
            raise ValueError(f"topk: expected an integer in [1, {K}] (the number of classes), got {topk!r}")
        check_temperature(topk_temperature, "topk_temperature")
    enc = {"logits": dtype, "embeddings": dtype, "feature_maps": feature_dtype}
    topk_rec = {"k": topk, "temperature": float(topk_temperature)} if topk else None
    _choose_stored_fields(tdesc, fields, views, N, enc, topk_rec, budget_bytes)
    layout = {
        "format": FORMAT, "version": VERSION,
        "dataset": dataset_identity(dataset),
        "views": views,
        "view_schedule": {"kind": view_schedule, "seed": schedule_seed if view_schedule == "shuffled" else None},
        "teachers": tdesc,
        "teacher_precision": teacher_precision,  # the compute precision the teachers ran in (LiveTeachers)
        "fold_bn": bool(fold_bn),
        "encodings": enc,
        "topk": topk_rec,
        "chunk_size": chunk_size,
        "num_chunks": -(-N // chunk_size),
    }
    layout["arrays"] = _array_specs(layout)
    layout["total_bytes"] = int(sum(int(np.prod(s["shape"])) * storage.ITEM_BYTES[s["dtype"]]
                                    for s in layout["arrays"].values()))
    return layout


# the `mtkd-fast cache build` flags behind each top-level entry of the layout: what a resume that differs changes
_BUILD_FLAGS = {"dataset": "--dataset, --data-root, --limit-per-class or --seed", "views": "--views",
                "view_schedule": "--view-schedule or --schedule-seed",
                "teachers": "--teachers, --checkpoints, --fields, --budget or --feature-dtype",
                "teacher_precision": "--teacher-precision", "fold_bn": "--fold-bn",
                "encodings": "--dtype or --feature-dtype", "topk": "--topk or --topk-temperature",
                "chunk_size": "--chunk-size"}


def _build_flag_hint(field: str, recorded) -> str:
    """What to pass for the build to match ``recorded``, the value of layout entry ``field`` on disk."""
    flag = _BUILD_FLAGS.get(field.split(".")[0].split("[")[0].split(" ")[0])
    if flag is None:
        return ""
    if isinstance(recorded, bool):  # --fold-bn / --no-fold-bn
        return f"pass {flag if recorded else flag.replace('--', '--no-', 1)}"
    if " " not in flag and isinstance(recorded, (int, str)):
        return f"pass {flag} {recorded}"
    return f"check {flag}"


def _chunk_record_path(path: str, v: int, c: int) -> str:
    return os.path.join(path, CHUNKS_DIR, f"v{v:05d}_c{c:07d}.json")


def _chunk_checksums(arrays: dict, v: int, s: int, e: int) -> dict:
    return {name: storage.checksum(a[v, s:e]) for name, a in arrays.items()}


def _write_unit(live: LiveTeachers, layout: dict, arrays: dict, dataset, v: int, s: int, e: int, batch_size: int,
                num_workers: int, device, pbar) -> None:
    topk = layout["topk"]
    enc = layout["encodings"]
    if hasattr(dataset, "set_view"):
        dataset.set_view(v)
    for pos, images in _batches(dataset, s, e, batch_size, num_workers, device):
        b = images.shape[0]
        out = live(images)
        for m, t in enumerate(layout["teachers"]):
            who = f"teacher {m} ({t['arch']}), view {v}, samples {pos}-{pos + b - 1}"
            if topk:
                vals, idx, tail = storage.topk_encode(out.logits[m], topk["k"], topk["temperature"],
                                                     enc["logits"], f"{who}: logits")
                arrays[f"t{m}.logits"][v, pos:pos + b] = vals
                arrays[f"t{m}.logits.idx"][v, pos:pos + b] = idx
                arrays[f"t{m}.logits.tail"][v, pos:pos + b] = tail
            else:
                arrays[f"t{m}.logits"][v, pos:pos + b] = storage.encode_float(out.logits[m], enc["logits"],
                                                                                  f"{who}: logits")
            if "embeddings" in t["stored"]:
                arrays[f"t{m}.embeddings"][v, pos:pos + b] = storage.encode_float(out.embeddings[m],
                                                                                  enc["embeddings"],
                                                                                  f"{who}: embeddings")
            if "feature_maps" in t["stored"]:
                if t["feature_map_encoding"] == "int8":
                    q, scale = storage.quantize_int8(out.feature_maps[m])
                    arrays[f"t{m}.feature_maps"][v, pos:pos + b] = q
                    arrays[f"t{m}.feature_maps.scale"][v, pos:pos + b] = scale
                else:
                    arrays[f"t{m}.feature_maps"][v, pos:pos + b] = storage.encode_float(
                        out.feature_maps[m], t["feature_map_encoding"], f"{who}: feature maps")
        if pbar is not None:
            pbar.update(b)


def _batches(dataset, s: int, e: int, batch_size: int, num_workers: int, device):
    """(first index, images) of samples s..e-1 of the current view, in batches of ``batch_size``."""
    get_batch = getattr(dataset, "get_batch", None)
    if get_batch is not None:  # mtkd_fast.data datasets augment whole batches at once (same pixels as ds[i])
        for pos in range(s, e, batch_size):
            images = get_batch(torch.arange(pos, min(e, pos + batch_size)), device=device)[0]
            yield pos, images
        return
    loader = DataLoader(Subset(dataset, range(s, e)), batch_size=batch_size, shuffle=False, num_workers=num_workers)
    pos = s
    for batch in loader:
        images = batch[0]
        b = images.shape[0]
        if len(batch) >= 3:
            got = torch.as_tensor(batch[2]).long()
            if not torch.equal(got, torch.arange(pos, pos + b)):
                raise ValueError(f"dataset: expected item i to return index i as its third element, got indices "
                                 f"{got[:4].tolist()}... for items {pos}..{pos + b - 1}")
        yield pos, images.to(device)
        pos += b
    if pos != e:
        raise ValueError(f"dataset: expected {e - s} samples for items {s}..{e - 1}, the loader gave {pos - s}")


def _build_cache(path: str, dataset, teachers, *, views: int = 1, teacher_names: Sequence[str] | None = None,
                checkpoints: Sequence[str | None] | None = None, dtype: str = "float16",
                feature_dtype: str | None = None, topk: int | None = None, topk_temperature: float = 4.0,
                fields: Sequence[str] = FIELDS, budget_bytes: int | None = None, chunk_size: int = 1024,
                batch_size: int = 256, num_workers: int = 0, device="cpu", view_schedule: str = "cyclic",
                schedule_seed: int = 0, rank: int | None = None, world_size: int | None = None,
                progress: bool = True, wait_timeout_s: float = 7 * 24 * 3600.0, teacher_precision: str = "auto",
                fold_bn: bool = True, teacher_compile: bool = False) -> dict | None:
    """Build (or resume building) the teacher-output cache at ``path``.

    Args:
        path: cache directory (created if missing).
        dataset: training set with replayable views: ``set_view(v)`` and ``dataset[i] -> (image, label, i)``
            (``mtkd_fast.data.build_dataset(..., augment=True)``).
        teachers: the M frozen teacher models (or a LiveTeachers); run once per (sample, view).
        views: V, the number of augmentation views stored per sample.
        teacher_names / checkpoints: architecture names and checkpoint files, recorded in the manifest.
        dtype: encoding of logits and embeddings ("float16", "bfloat16", "float32").
        feature_dtype: encoding of feature maps (the above or "int8" with per-(sample, channel) scales);
            default: ``dtype``.
        topk: store only the k largest logits per sample, with their indices and the tail's softmax mass at
            ``topk_temperature`` (set it to the distillation temperature T).
        fields: which of ("logits", "embeddings", "feature_maps") to store; logits always are.
        budget_bytes: drop feature maps (largest teachers first), then embeddings, until the cache fits;
            a trainer computes dropped fields live.
        chunk_size: samples per unit of work, checksum and resume.
        batch_size, num_workers, device: how teachers are run; changing them does not change the content.
        view_schedule: "cyclic" (epoch e replays view e mod V) or "shuffled" (a seeded permutation of the V
            views in each cycle of V epochs); see ``view_for_epoch``.
        rank, world_size: this process's share of the work (default: torch.distributed's, else 0 and 1).
        teacher_precision, fold_bn, teacher_compile: how the teachers run (``LiveTeachers``; ignored when
            ``teachers`` is a LiveTeachers, whose own settings are used). ``teacher_precision="auto"`` is the
            precision a training run's "auto" accepts for every strategy (``mtkd_fast.teachers.resolve_precision``
            with no strategy). The manifest records the precision used.

    Returns the manifest (on the rank that finished the build; None on the others).
    """
    if rank is None or world_size is None:
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized():
            rank, world_size = dist.get_rank(), dist.get_world_size()
        else:
            rank, world_size = 0, 1
    if not 0 <= rank < world_size:
        raise ValueError(f"rank: expected 0 <= rank < world_size ({world_size}), got {rank}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected a positive integer, got {batch_size!r}")
    models = unwrap_teachers(teachers)
    for model in models:
        model.to(device)
    live = teachers.to(device) if isinstance(teachers, LiveTeachers) else \
        LiveTeachers(models, precision=teacher_precision, fold_bn=fold_bn, compile=teacher_compile)
    # the manifest hashes the teachers' weights now; the outputs must come from those weights (live re-reads them
    # before each batch) and a change during the build is refused below
    live.refresh()
    weights_key = live.weights_key()
    layout = plan_cache(dataset, models, views=views, teacher_names=teacher_names, checkpoints=checkpoints,
                        dtype=dtype, feature_dtype=feature_dtype, topk=topk, topk_temperature=topk_temperature,
                        fields=fields, budget_bytes=budget_bytes, chunk_size=chunk_size,
                        view_schedule=view_schedule, schedule_seed=schedule_seed, device=device,
                        teacher_precision=live.precision_used, fold_bn=live.fold_bn)
    os.makedirs(os.path.join(path, CHUNKS_DIR), exist_ok=True)
    if os.path.exists(os.path.join(path, MANIFEST)):
        done = read_manifest(path)
        d = first_difference({k: v for k, v in done.items() if k not in ("checksums", DIGEST_KEY)}, layout)
        if d:
            hint = _build_flag_hint(d[0], d[1])
            raise CacheMismatchError(f"path: {path} already holds a finished cache made with a different {d[0]}: "
                                     f"cache has {d[1]!r}, this build has {d[2]!r}; choose another path"
                                     + (f" (or {hint} to reuse it)" if hint else ""))
        return done if rank == 0 else None
    layout_path = os.path.join(path, LAYOUT)
    if os.path.exists(layout_path):
        with open(layout_path) as f:
            started = json.load(f)
        d = first_difference(started, layout)
        if d:
            hint = _build_flag_hint(d[0], d[1])
            raise CacheMismatchError(f"path: the unfinished cache build at {path} was started with a different "
                                     f"{d[0]}: started with {d[1]!r}, this build has {d[2]!r}; resume it with the "
                                     f"same settings{f' ({hint})' if hint else ''} or choose another path")
    else:
        write_json_atomic(layout_path, layout)
    arrays = {}
    for name, spec in layout["arrays"].items():
        f = os.path.join(path, spec["file"])
        storage.create_array_file(f, int(np.prod(spec["shape"])) * storage.ITEM_BYTES[spec["dtype"]])
        arrays[name] = storage.open_array(f, spec["dtype"], spec["shape"], mode="r+")

    N, cs = layout["dataset"]["num_samples"], layout["chunk_size"]
    units = [(v, c) for v in range(layout["views"]) for c in range(layout["num_chunks"])][rank::world_size]
    todo = []
    for v, c in units:  # a recorded unit is skipped only if its data still matches its record
        rec = _chunk_record_path(path, v, c)
        if os.path.exists(rec):
            with open(rec) as f:
                if json.load(f) == _chunk_checksums(arrays, v, c * cs, min(N, (c + 1) * cs)):
                    continue
        todo.append((v, c))
    pbar = None
    if progress:
        from tqdm.auto import tqdm
        total = sum(min(N, (c + 1) * cs) - c * cs for v, c in todo)
        pbar = tqdm(total=total, unit="img", desc=f"cache build{f' rank {rank}' if world_size > 1 else ''}",
                    disable=not todo)
    try:
        for v, c in todo:
            s, e = c * cs, min(N, (c + 1) * cs)
            _write_unit(live, layout, arrays, dataset, v, s, e, batch_size, num_workers, device, pbar)
            if live.weights_key() != weights_key:  # this unit may mix weights: do not record it
                raise ValueError("teachers: their weights changed during the cache build, so the outputs would not "
                                 "match the hashed weights; build again with fixed teachers")
            for a in arrays.values():
                a.flush()
            write_json_atomic(_chunk_record_path(path, v, c), _chunk_checksums(arrays, v, s, e))
    finally:
        if pbar is not None:
            pbar.close()
        del arrays

    dist = torch.distributed
    if world_size > 1 and dist.is_available() and dist.is_initialized():
        dist.barrier()
    if rank != 0:
        return None
    return _finalize(path, layout, wait_timeout_s if world_size > 1 else 0.0)


@functools.wraps(_build_cache)
def build_cache(path: str, dataset, teachers, **options) -> dict | None:
    # one writer per cache directory: a second build into it is refused (the ranks of one torchrun job share
    # rank 0's lock); temporary files a killed build left are removed under the lock
    rank = options.get("rank")
    if rank is None or options.get("world_size") is None:
        dist = torch.distributed
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    lock = DirLock(path, "cache").acquire() if rank == 0 else None
    try:
        if lock is not None:
            clean_temp_files(path)
            clean_temp_files(os.path.join(path, CHUNKS_DIR))
        return _build_cache(path, dataset, teachers, **options)
    finally:
        if lock is not None:
            lock.release()


def _finalize(path: str, layout: dict, wait_timeout_s: float) -> dict:
    """Gather every unit's checksums into manifest.json (waiting for other ranks' records up to the timeout)."""
    V, C = layout["views"], layout["num_chunks"]
    deadline = time.monotonic() + wait_timeout_s
    while True:
        missing = [(v, c) for v in range(V) for c in range(C) if not os.path.exists(_chunk_record_path(path, v, c))]
        if not missing or time.monotonic() >= deadline:
            break
        time.sleep(1.0)
    if missing:
        raise RuntimeError(f"cache build at {path}: {len(missing)} of {V * C} chunks are not built yet (first: view "
                           f"{missing[0][0]}, chunk {missing[0][1]}); run the build again to finish them")
    checksums = {name: [[None] * C for _ in range(V)] for name in layout["arrays"]}
    for v in range(V):
        for c in range(C):
            with open(_chunk_record_path(path, v, c)) as f:
                rec = json.load(f)
            for name in layout["arrays"]:
                checksums[name][v][c] = rec[name]
    manifest = {**layout, "checksums": checksums}
    manifest[DIGEST_KEY] = manifest_digest(manifest)
    write_json_atomic(os.path.join(path, MANIFEST), manifest)
    os.unlink(os.path.join(path, LAYOUT))
    shutil.rmtree(os.path.join(path, CHUNKS_DIR), ignore_errors=True)
    return manifest
