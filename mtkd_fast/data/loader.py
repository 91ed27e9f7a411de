"""Batch iteration: seeded, sharded sample order and the in-memory / torchvision loaders."""

from __future__ import annotations

import math
import sys

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler


def epoch_indices(n: int, *, shuffle: bool, seed: int, epoch: int, rank: int, world_size: int) -> np.ndarray:
    """This rank's sample indices for one epoch, exactly as ``DistributedSampler`` (drop_last=False) orders
    them: a permutation seeded by ``seed + epoch`` (or 0..n-1), padded by wrapping to a multiple of
    ``world_size``, then every ``world_size``-th element from ``rank``."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank, world_size: expected 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    sampler = DistributedSampler(range(n), num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed)
    sampler.set_epoch(epoch)
    return np.fromiter(iter(sampler), dtype=np.int64, count=len(sampler))


def split_batches(indices: np.ndarray, batch_size: int, drop_last: bool) -> list[np.ndarray]:
    if batch_size < 1:
        raise ValueError(f"batch_size: expected an int >= 1, got {batch_size}")
    n_batches = len(indices) // batch_size if drop_last else math.ceil(len(indices) / batch_size)
    return [indices[b * batch_size:(b + 1) * batch_size] for b in range(n_batches)]


class _BatchesOf(Dataset):
    """Item k of this is a whole batch of an ArrayDataset, so DataLoader workers build batches at once."""

    def __init__(self, ds, batches):
        self.ds, self.batches = ds, batches

    def __len__(self):
        return len(self.batches)

    def __getitem__(self, k):
        return self.ds.get_batch(torch.from_numpy(self.batches[k]))


class ArrayLoader:
    """Batches of an in-memory dataset. On a CUDA device the uint8 pixels move there and the augmentation
    runs on the device; on the CPU it runs in this process (``num_workers=0``) or in worker processes."""

    def __init__(self, ds, batches, *, num_workers, device):
        self.ds, self.batches, self.num_workers, self.device = ds, batches, num_workers, torch.device(device)

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        if self.device.type != "cpu" or self.num_workers == 0:
            for idx in self.batches:
                yield self.ds.get_batch(torch.from_numpy(idx), device=self.device)
            return
        loader = DataLoader(_BatchesOf(self.ds, self.batches), batch_size=None, shuffle=False,
                            num_workers=self.num_workers)
        yield from loader


def _collate_dropping_skipped(samples):
    kept = [s for s in samples if s is not None]
    skipped = len(samples) - len(kept)
    if not kept:
        return None, skipped
    images = torch.stack([s[0] for s in kept])
    labels = torch.tensor([s[1] for s in kept], dtype=torch.int64)
    indices = torch.tensor([s[2] for s in kept], dtype=torch.int64)
    return (images, labels, indices), skipped


class FolderLoader:
    """Batches of an image folder decoded by PIL + torchvision in DataLoader workers.

    Unreadable images dropped by ``on_bad_image="skip"`` are listed in ``skipped`` (paths, this epoch) and
    reported on stderr at the end of the epoch; a batch whose every image was unreadable is not yielded.
    """

    def __init__(self, ds, batches, *, num_workers, device):
        self.ds, self.batches, self.num_workers, self.device = ds, batches, num_workers, torch.device(device)
        self.skipped: list[str] = []

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        self.skipped = []
        loader = DataLoader(self.ds, batch_sampler=[b.tolist() for b in self.batches], num_workers=self.num_workers,
                            collate_fn=_collate_dropping_skipped, pin_memory=self.device.type == "cuda")
        for batch_idx, (batch, n_skipped) in zip(self.batches, loader):
            if n_skipped:
                got = set() if batch is None else set(batch[2].tolist())
                self.skipped += [self.ds.path(int(i)) for i in batch_idx if int(i) not in got]
            if batch is not None:
                yield tuple(t.to(self.device, non_blocking=True) for t in batch)
        if self.skipped:
            shown = ", ".join(self.skipped[:5]) + (" ..." if len(self.skipped) > 5 else "")
            print(f"mtkd_fast.data: skipped {len(self.skipped)} unreadable image(s) this epoch: {shown}",
                  file=sys.stderr)
