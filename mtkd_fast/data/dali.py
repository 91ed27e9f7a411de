"""NVIDIA DALI pipelines for ImageNet-layout folders: nvJPEG decode on the GPU ("mixed"), libjpeg-turbo
on the CPU otherwise, with the replayable crops of :mod:`mtkd_fast.data.augment`.

How a replayable crop gets into DALI: the loader knows each batch's sample indices (the
``DistributedSampler`` order of :func:`~mtkd_fast.data.loader.epoch_indices`), so an ``fn.external_source``
feeds, batch by batch, the files' paths (read by DALI's threads with ``fn.io.file.read``) and the window and
flip of :func:`view_params` for those samples; ``fn.decoders.image_slice`` decodes only that window
(normalised coordinates, which DALI rounds exactly as :func:`pixel_box` does). The source ends each epoch
(``StopIteration``), so one pipeline per (dataset, batch size, device, layout) is built once and reused for
every epoch and every validation pass; the last batch of an epoch is simply smaller.

Pixels are those of the PIL path (and of the teacher cache, built from it): every decoder runs with
``jpeg_fancy_upsampling=True`` (the "mixed" nvJPEG decoder defaults to another chroma upsampling than
libjpeg-turbo and PIL) and ``adjust_orientation=False`` (PIL's ``Image.open(...).convert("RGB")`` ignores
EXIF orientation, so DALI does too: one rule for both paths).

Availability: importing DALI is not enough (a CUDA build may not run on the driver), so :func:`probe`
decodes one tiny JPEG on the device once per process and device; :func:`mtkd_fast.data.build_loader` falls
back to the torchvision path with one message when it fails (``backend="auto"``).

Hand-off: with DALI's default (dynamic) executor the outputs are not recycled, so images reach torch by a
zero-copy DLPack hand-off (on the GPU, ordered on torch's current stream); labels and indices, known on the
host, go to the GPU as one non-blocking copy from pinned memory, so a batch costs no host-device sync.

Errors: a corrupt file makes DALI fail the pipeline; the loader then raises ``ValueError`` naming the
unreadable file(s) (found with PIL) with DALI's whole message, chained. Any other failure (CUDA out of
memory, a driver error) is raised as ``RuntimeError`` with DALI's whole message, chained. DALI cannot skip
bad files: list them with ``mtkd-fast data check ROOT`` and remove them, or use the torchvision path with
``on_bad_image="skip"``.
"""

from __future__ import annotations

import io
import os
import threading
import weakref
from typing import Optional

import numpy as np
import torch

from .augment import view_params

try:
    from nvidia.dali import fn, pipeline_def, types

    DALI_AVAILABLE, DALI_IMPORT_ERROR = True, None
except ImportError as _exc:  # optional dependency: the torchvision path is used instead
    DALI_AVAILABLE, DALI_IMPORT_ERROR = False, _exc

# decoder options that make DALI's pixels PIL's (see the module docstring)
DECODER_OPTIONS = {"jpeg_fancy_upsampling": True, "adjust_orientation": False}
PREFETCH = 2


def install_hint() -> str:
    """The pip command for the DALI build matching torch's CUDA major version."""
    cuda = torch.version.cuda
    if cuda is None:
        return "pip install nvidia-dali-cuda130 (DALI's CPU mode needs no GPU)"
    major = int(cuda.split(".")[0])
    return f"pip install nvidia-dali-cuda{major}0 (torch uses CUDA {cuda})"


def require_dali() -> None:
    if not DALI_AVAILABLE:
        raise ValueError(f"backend: 'dali' needs NVIDIA DALI ({install_hint()}): {DALI_IMPORT_ERROR}")


def default_threads(num_workers: int = 0) -> int:
    """DALI's CPU threads: ``num_workers`` when given, else half this process's share of the CPUs (at least 2;
    nvJPEG's host stage and the file reads starve on one thread)."""
    if num_workers and num_workers > 0:
        return int(num_workers)
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 2
    local_procs = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(2, cpus // (2 * local_procs))


def _device_id(device: torch.device) -> Optional[int]:
    if device.type != "cuda":
        return None  # a CPU-only pipeline (types.CPU_ONLY_DEVICE_ID fails in DALI 2.4)
    return torch.cuda.current_device() if device.index is None else device.index


def _device_key(device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return f"cuda:{_device_id(device)}"
    return device.type


# --------------------------------------------------------------------------------------------
# probe: can DALI decode on this device?
# --------------------------------------------------------------------------------------------

_probe_lock = threading.Lock()
_probe_results: dict = {}  # device key -> None (works) or the exception


def _tiny_jpeg() -> np.ndarray:
    from PIL import Image

    rgb = (np.arange(8 * 10 * 3, dtype=np.uint8).reshape(8, 10, 3) * 7)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=75)
    return np.frombuffer(buf.getvalue(), dtype=np.uint8)


def probe(device) -> Optional[BaseException]:
    """None when DALI builds and runs a one-image decode pipeline on ``device``, else the exception (cached
    per process and device)."""
    key = _device_key(device)
    with _probe_lock:
        if key in _probe_results:
            return _probe_results[key]
        if not DALI_AVAILABLE:
            result = DALI_IMPORT_ERROR
        else:
            result = None
            try:
                _run_probe(torch.device(key))
            except Exception as exc:  # DALI raises RuntimeError, but a broken install can raise anything
                result = exc
        _probe_results[key] = result
        return result


def _run_probe(device: torch.device) -> None:
    jpeg = _tiny_jpeg()
    gpu = device.type == "cuda"

    @pipeline_def(batch_size=1, num_threads=1, device_id=_device_id(device), seed=0, prefetch_queue_depth=1)
    def tiny():
        data = fn.external_source(source=lambda: [jpeg], batch=True)
        return fn.decoders.image(data, device="mixed" if gpu else "cpu", output_type=types.RGB, **DECODER_OPTIONS)

    pipe = tiny()
    pipe.build()
    (out,) = pipe.run()
    shape = tuple(out.as_tensor().shape())
    if shape != (1, 8, 10, 3):
        raise RuntimeError(f"DALI probe decoded an 8x10 JPEG to shape {shape}")
    del pipe


# --------------------------------------------------------------------------------------------
# the pipeline, built once per (dataset, batch size, device, layout, threads)
# --------------------------------------------------------------------------------------------


class _Feed:
    """The external source's state: this epoch's batches, and which one comes next. Holds no reference to the
    dataset (the pipeline cache is keyed weakly by it)."""

    def __init__(self, folder: str, paths, seed, recipe, augment):
        self.folder, self.paths = folder, paths  # the dataset's list, not a copy
        self.seed, self.recipe, self.augment = seed, recipe, augment
        self.view = 0
        self.batches: list = []
        self.next = 0
        self.lock = threading.Lock()

    def __call__(self):
        with self.lock:
            if self.next >= len(self.batches):
                raise StopIteration  # the end of the epoch; the pipeline is reset for the next one
            idx = self.batches[self.next]
            self.next += 1
        files = [np.frombuffer(os.path.join(self.folder, self.paths[i]).encode(), dtype=np.uint8) for i in idx.tolist()]
        if not self.augment:
            return (files,)
        p = view_params(self.seed, self.view, idx, self.recipe)
        anchor = np.stack([p.top, p.left], 1).astype(np.float32)  # exact: multiples of 1/4096
        shape = np.stack([p.height, p.width], 1).astype(np.float32)
        return files, anchor, shape, p.flip.astype(np.int32)


def build_pipeline(ds, feed: _Feed, *, batch_size, num_threads, device, channels_last=False, prefetch=PREFETCH):
    """The DALI pipeline for ``ds`` (an ImageFolderDataset) fed by ``feed``: training (``ds.augment``:
    replayable resized crop + flip) or validation (resize the shorter side to ``ds.resize_size``, centre
    crop ``ds.image_size``). Output: images [b,3,S,S] float normalised ([b,S,S,3] with ``channels_last``),
    b <= ``batch_size``."""
    require_dali()
    device = torch.device(device)
    gpu = device.type == "cuda"
    S = ds.image_size
    layout = "HWC" if channels_last else "CHW"
    mean = [255.0 * m for m in ds.mean]
    std = [255.0 * s for s in ds.std]
    resize_size = ds.resize_size
    decoder = "mixed" if gpu else "cpu"

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=_device_id(device), seed=0,
                  prefetch_queue_depth=prefetch)
    def pipeline():
        if feed.augment:
            paths, anchor, shape, flip = fn.external_source(source=feed, num_outputs=4, batch=True)
            jpegs = fn.io.file.read(paths)
            images = fn.decoders.image_slice(jpegs, anchor, shape, axis_names="HW", device=decoder,
                                             output_type=types.RGB, **DECODER_OPTIONS)
            images = fn.resize(images, resize_x=S, resize_y=S, interp_type=types.INTERP_LINEAR, antialias=True)
            return fn.crop_mirror_normalize(images, mirror=flip, mean=mean, std=std, dtype=types.FLOAT,
                                            output_layout=layout)
        (paths,) = fn.external_source(source=feed, num_outputs=1, batch=True)
        jpegs = fn.io.file.read(paths)
        images = fn.decoders.image(jpegs, device=decoder, output_type=types.RGB, **DECODER_OPTIONS)
        # stretch to whole pixels as PIL does (subpixel_scale=False); see folder.eval_geometry
        images = fn.resize(images, resize_shorter=resize_size, interp_type=types.INTERP_LINEAR, antialias=True,
                           subpixel_scale=False)
        return fn.crop_mirror_normalize(images, crop=(S, S), mean=mean, std=std, dtype=types.FLOAT,
                                        output_layout=layout)

    pipe = pipeline()
    pipe.build()
    return pipe


class _Cached:
    """A built pipeline, its feed, and whether an epoch is in flight."""

    def __init__(self, pipe, feed):
        self.pipe, self.feed = pipe, feed
        self.in_epoch = False
        self.generation = 0
        self.builds = 1


_pipelines: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # dataset -> {key: _Cached}


def _zero_copy(pipe) -> bool:
    return bool(getattr(pipe, "exec_dynamic", False))


def _to_torch(tensor_list, device: torch.device, zero_copy: bool) -> torch.Tensor:
    """A pipeline output as a torch tensor: zero-copy through DLPack when DALI does not recycle its outputs
    (the dynamic executor), else a copy (DALI reuses its buffers on the next run)."""
    from nvidia.dali.tensors import TensorGPU

    t = tensor_list.as_tensor()
    on_gpu = isinstance(t, TensorGPU)
    if zero_copy:
        if on_gpu:
            with torch.cuda.device(device):
                return torch.from_dlpack(t)  # DALI's stream is ordered before torch's current stream
        return torch.from_dlpack(t)
    from nvidia.dali.plugin.pytorch import feed_ndarray, to_torch_type

    out = torch.empty(t.shape(), dtype=to_torch_type[t.dtype], device=device if on_gpu else "cpu")
    feed_ndarray(t, out, cuda_stream=torch.cuda.current_stream(out.device) if on_gpu else None)
    return out


class DaliLoader:
    """Batches ``(images, labels, indices)`` of an ImageFolderDataset through DALI, in the same order and
    with the same crops as the torchvision loader for the same (seed, epoch, rank, world_size, view).

    ``batches``: this rank's sample indices, batch by batch. ``num_threads``: DALI's CPU threads
    (:func:`default_threads` when None). The pipeline is shared by every loader of the same dataset,
    batch size, device, layout and thread count, built on the first iteration.
    """

    def __init__(self, ds, batches, *, batch_size, device, num_threads=None, channels_last=False):
        require_dali()
        self.ds, self.device = ds, torch.device(device)
        self.batches = [np.asarray(b, dtype=np.int64) for b in batches]
        self.batch_size = int(batch_size)
        self.num_threads = default_threads(0) if num_threads is None else max(1, int(num_threads))
        self.channels_last = bool(channels_last)

    def __len__(self):
        return len(self.batches)

    def _key(self):
        ds = self.ds
        # what the dataset fixes (files, geometry, seed, recipe) is per dataset: the cache is keyed by it
        return (_device_key(self.device), self.batch_size, self.channels_last, self.num_threads, ds.image_size,
                ds.resize_size, ds.mean, ds.std)

    def _cached(self) -> _Cached:
        per_ds = _pipelines.setdefault(self.ds, {})
        key = self._key()
        cached = per_ds.get(key)
        if cached is None:
            ds = self.ds
            feed = _Feed(str(ds.folder), ds.paths, ds.seed, ds.recipe, ds.augment)
            pipe = build_pipeline(ds, feed, batch_size=self.batch_size, num_threads=self.num_threads,
                                  device=self.device, channels_last=self.channels_last)
            cached = per_ds[key] = _Cached(pipe, feed)
        return cached

    def _forget(self):
        per_ds = _pipelines.get(self.ds, {})
        per_ds.pop(self._key(), None)

    @staticmethod
    def _drain(cached: _Cached) -> None:
        """Finish an epoch that was left part-way (e.g. ``max_steps_per_epoch``): stop the feed, discard the
        prefetched batches, reset."""
        with cached.feed.lock:
            cached.feed.next = len(cached.feed.batches)
        try:
            while True:
                cached.pipe.run()
        except StopIteration:
            pass
        cached.pipe.reset()
        cached.in_epoch = False

    def __iter__(self):
        if not self.batches:
            return
        cached = self._cached()
        if cached.in_epoch:
            self._drain(cached)
        cached.generation += 1
        generation = cached.generation
        with cached.feed.lock:
            cached.feed.batches, cached.feed.next, cached.feed.view = self.batches, 0, self.ds.view
        cached.in_epoch = True
        zero_copy = _zero_copy(cached.pipe)
        pin = self.device.type == "cuda"
        for k, idx in enumerate(self.batches):
            if cached.generation != generation:
                raise RuntimeError("DaliLoader: another iteration over the same DALI pipeline started before this "
                                   "one finished; iterate over one loader of a dataset at a time")
            try:
                (out,) = cached.pipe.run()
            except StopIteration:
                raise RuntimeError(f"DALI pipeline ended after {k} of {len(self.batches)} batches") from None
            except Exception as exc:
                self._forget()  # a failed pipeline is not reused
                raise self._decode_error(k, exc) from exc
            images = _to_torch(out, self.device, zero_copy)
            if len(images) != len(idx):
                raise RuntimeError(f"DALI returned {len(images)} images for batch {k} of {len(idx)} samples")
            if self.channels_last:  # [B,H,W,C] -> an NCHW view with channels_last strides
                images = images.permute(0, 3, 1, 2)
            index = torch.from_numpy(idx)
            pair = torch.stack([self.ds.labels[index], index])  # one host->device copy for both
            if pin:
                pair = pair.pin_memory().to(self.device, non_blocking=True)
            yield images, pair[0], pair[1]
        # the source's StopIteration closes the epoch; reset for the next one
        try:
            cached.pipe.run()
        except StopIteration:
            cached.pipe.reset()
            cached.in_epoch = False
        else:  # pragma: no cover - the feed holds exactly len(self.batches) batches
            raise RuntimeError("DALI pipeline returned more batches than were fed")

    def _decode_error(self, k, exc) -> Exception:
        """The error for a failure of batch ``k``: the unreadable file(s) among the batches the pipeline may
        have been working on (found with PIL), else DALI's own error, both with DALI's whole message."""
        suspects = np.concatenate(self.batches[k:k + PREFETCH + 2])
        bad = []
        for i in dict.fromkeys(suspects.tolist()):
            try:
                self.ds.load_rgb(int(i))
            except ValueError as err:
                bad.append(str(err))
        message = str(exc).strip()
        if bad:
            return ValueError("DALI could not decode batch {}: {} (`mtkd-fast data check {}` lists every unreadable "
                              "image). DALI's error: {}".format(k, "; ".join(bad[:5]), self.ds.root, message))
        return RuntimeError(f"DALI pipeline failed in batch {k} on {self.device} (PIL reads every file of "
                            f"batches {k}..{k + PREFETCH + 1}, so this is not a bad image): {type(exc).__name__}: "
                            f"{message}")
