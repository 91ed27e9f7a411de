"""NVIDIA DALI pipelines for ImageNet-layout folders: nvJPEG decode on the GPU ("mixed"), libjpeg-turbo
on the CPU otherwise, with the replayable crops of :mod:`mtkd_fast.data.augment`.

How a replayable crop gets into DALI: ``fn.readers.file`` reads this epoch's files in a fixed order (the
``DistributedSampler`` order of :func:`epoch_indices`, laid out so that shard ``rank`` of ``world_size`` is
exactly that rank's list; ``random_shuffle=False``, ``pad_last_batch=True``) with each file's *sample index*
as its label. Because the order is known, an ``fn.external_source`` feeds, batch by batch, the window and
flip of :func:`view_params` for the same samples; ``fn.decoders.image_slice`` decodes only that window
(normalised coordinates, which DALI rounds exactly as :func:`pixel_box` does). The loader checks every
batch's indices from the reader against the ones it fed, so a mismatch cannot pass silently.

DALI 2.4 facts this relies on: a CPU-only pipeline needs ``device_id=None``; the ``"mixed"`` decoder needs
a GPU. A corrupt file makes DALI fail the pipeline; the loader then raises ``ValueError`` naming the
unreadable file(s) of the failing batches (found with PIL). DALI cannot skip bad files: list them all
with ``mtkd-fast data check ROOT`` and remove them, or use the torchvision path with
``on_bad_image="skip"``.
"""

from __future__ import annotations

import numpy as np
import torch

from .augment import view_params
from .loader import split_batches

try:
    from nvidia.dali import fn, pipeline_def, types

    DALI_AVAILABLE, DALI_IMPORT_ERROR = True, None
except ImportError as _exc:  # optional dependency: the torchvision path is used instead
    DALI_AVAILABLE, DALI_IMPORT_ERROR = False, _exc


def require_dali() -> None:
    if not DALI_AVAILABLE:
        raise ValueError(f"backend: 'dali' needs NVIDIA DALI (pip install nvidia-dali-cuda130): {DALI_IMPORT_ERROR}")


def _positions(batch: int, batch_size: int, shard_len: int) -> np.ndarray:
    """Positions in the shard list of the samples DALI's reader returns in pipeline iteration ``batch``.

    With ``pad_last_batch=True`` the last batch of an epoch repeats the last sample, and the next epoch
    starts at a batch boundary; prefetching runs ahead into that next epoch.
    """
    per_epoch = -(-shard_len // batch_size)
    q = (batch % per_epoch) * batch_size + np.arange(batch_size)
    return np.minimum(q, shard_len - 1)


def build_pipeline(ds, files, labels, shard_list, *, batch_size, rank, world_size, num_threads, device,
                   channels_last=False, prefetch=2):
    """The DALI pipeline for ``ds`` (an ImageFolderDataset): training (``ds.augment``: replayable resized
    crop + flip) or validation (resize the shorter side to ``ds.resize_size``, centre crop
    ``ds.image_size``). Outputs: images [B,3,S,S] float normalised ([B,S,S,3] with ``channels_last``),
    sample indices [B,1] int32, and (training) the indices the crops were made for."""
    require_dali()
    gpu = torch.device(device).type == "cuda"
    if gpu:
        index = torch.device(device).index
        device_id = torch.cuda.current_device() if index is None else index
    else:
        device_id = None  # a CPU-only pipeline (types.CPU_ONLY_DEVICE_ID fails in DALI 2.4)
    S = ds.image_size
    layout = "HWC" if channels_last else "CHW"
    mean = [255.0 * m for m in ds.mean]
    std = [255.0 * s for s in ds.std]
    seed, view, recipe = ds.seed, ds.view, ds.recipe
    shard_len = len(shard_list)

    def crop_source(info):
        idx = shard_list[_positions(info.iteration, batch_size, shard_len)]
        p = view_params(seed, view, idx, recipe)
        anchor = np.stack([p.top, p.left], 1).astype(np.float32)  # exact: multiples of 1/4096
        shape = np.stack([p.height, p.width], 1).astype(np.float32)
        return anchor, shape, p.flip.astype(np.int32), idx.astype(np.int32)

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=0,
                  prefetch_queue_depth=prefetch)
    def pipeline():
        jpegs, index = fn.readers.file(files=files, labels=labels, shard_id=rank, num_shards=world_size,
                                       random_shuffle=False, pad_last_batch=True, stick_to_shard=True,
                                       name="reader")
        decoder = "mixed" if gpu else "cpu"
        if ds.augment:
            anchor, shape, flip, fed = fn.external_source(source=crop_source, num_outputs=4, batch=True,
                                                          batch_info=True)
            images = fn.decoders.image_slice(jpegs, anchor, shape, axis_names="HW", device=decoder,
                                             output_type=types.RGB)
            images = fn.resize(images, resize_x=S, resize_y=S, interp_type=types.INTERP_LINEAR, antialias=True)
            images = fn.crop_mirror_normalize(images, mirror=flip, mean=mean, std=std, dtype=types.FLOAT,
                                              output_layout=layout)
            return images, index, fed
        images = fn.decoders.image(jpegs, device=decoder, output_type=types.RGB)
        # stretch to whole pixels as PIL does (subpixel_scale=False); see folder.eval_geometry
        images = fn.resize(images, resize_shorter=ds.resize_size, interp_type=types.INTERP_LINEAR, antialias=True,
                           subpixel_scale=False)
        images = fn.crop_mirror_normalize(images, crop=(S, S), mean=mean, std=std, dtype=types.FLOAT,
                                          output_layout=layout)
        return images, index

    return pipeline()


def _to_torch(tensor_list, device) -> torch.Tensor:
    """Copy a pipeline output into a new torch tensor (DALI reuses its output buffers on the next run)."""
    from nvidia.dali.tensors import TensorGPU

    t = tensor_list.as_tensor()
    on_gpu = isinstance(t, TensorGPU)
    if on_gpu and torch.device(device).type == "cuda":
        from nvidia.dali.plugin.pytorch import feed_ndarray, to_torch_type

        out = torch.empty(t.shape(), dtype=to_torch_type[t.dtype], device=device)
        feed_ndarray(t, out, cuda_stream=torch.cuda.current_stream(out.device))
        return out
    if on_gpu:  # a GPU output asked for on the CPU
        t = t.as_cpu()
    return torch.from_numpy(np.array(t)).to(device)  # np.array copies


class DaliLoader:
    """Batches ``(images, labels, indices)`` of an ImageFolderDataset through DALI, in the same order and
    with the same crops as the torchvision loader for the same (seed, epoch, rank, world_size, view)."""

    def __init__(self, ds, rank_indices, *, all_ranks_indices, batch_size, drop_last, rank, world_size,
                 num_threads, device, channels_last=False):
        require_dali()
        self.channels_last = channels_last
        self.ds, self.device = ds, torch.device(device)
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.num_threads = max(1, int(num_threads))
        self.shard_list = rank_indices
        self.batches = split_batches(rank_indices, batch_size, drop_last)
        # shard r of the reader's list must be rank r's list: concatenate the ranks' (equal-length) lists
        self.files = [ds.paths[i] for i in all_ranks_indices]
        self.labels = [int(i) for i in all_ranks_indices]

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        if not self.batches:
            return
        pipe = build_pipeline(self.ds, [str(self.ds.folder / f) for f in self.files], self.labels,
                              self.shard_list, batch_size=self.batch_size, rank=self.rank,
                              world_size=self.world_size, num_threads=self.num_threads, device=self.device,
                              channels_last=self.channels_last)
        try:
            pipe.build()
            for k, expected in enumerate(self.batches):
                try:
                    out = pipe.run()
                except RuntimeError as exc:
                    raise self._decode_error(k, exc) from exc
                n = len(expected)
                images = _to_torch(out[0], self.device)[:n]
                if self.channels_last:  # [B,H,W,C] -> an NCHW view with channels_last strides
                    images = images.permute(0, 3, 1, 2)
                index = _to_torch(out[1], "cpu").reshape(-1)[:n].to(torch.int64)
                fed = _to_torch(out[2], "cpu").reshape(-1)[:n].to(torch.int64) if len(out) > 2 else index
                if not (torch.equal(index, torch.from_numpy(expected)) and torch.equal(fed, index)):
                    raise RuntimeError(f"DALI reader order differs from the expected sample order in batch {k}: "
                                       f"got {index[:8].tolist()}..., expected {expected[:8].tolist()}...")
                labels = self.ds.labels[index]
                yield images, labels.to(self.device), index.to(self.device)
        finally:
            del pipe

    def _decode_error(self, k, exc):
        """Name the unreadable file(s) among the batches the pipeline may have been working on."""
        suspects = np.concatenate(self.batches[k:k + 4])
        bad = []
        for i in dict.fromkeys(suspects.tolist()):
            try:
                self.ds.load_rgb(int(i))
            except ValueError as err:
                bad.append(str(err))
        if bad:
            return ValueError("DALI could not decode batch {}: {} (`mtkd-fast data check {}` lists every unreadable "
                              "image)".format(k, "; ".join(bad[:5]), self.ds.root))
        first = str(exc).strip().splitlines()
        return ValueError(f"DALI pipeline failed in batch {k} (no unreadable file found by PIL among batches "
                          f"{k}..{k + 3}): {first[-1] if first else exc}")
