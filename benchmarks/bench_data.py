"""Image-folder loading on the CPU: NVIDIA DALI (libjpeg-turbo decode of the crop window, resize, flip,
normalise) against torchvision's DataLoader (PIL decode, the same crop, resize, flip, normalise) at equal
threads, on real JPEGs: the bundled Fashion-MNIST training images exported at 375x500 (ImageNet-like size)
by ``mtkd_fast.data.export``. One round = one epoch of the training loader (batch 64, 224x224 crops,
random resized crop + flip); the DALI pipeline is built in the warm-up round and reused by the timed
ones, as a training run reuses it every epoch; both produce the same batches. The DALI test
records images/s and its speed as a ratio of torchvision's measured in the same run
(``extra_info["speedup_vs_torchvision"]``). Wall time suffers when other work shares the cores, so each test
also records the CPU time it used per image (this process and its DataLoader workers, from getrusage):
``extra_info["cpu_ms_per_image"]`` and, for DALI, ``cpu_ratio_vs_torchvision``.

    .venv/bin/python -m pytest benchmarks/bench_data.py --benchmark-only -q
"""

from __future__ import annotations

import os
import resource

import pytest

from mtkd_fast.data import build_dataset, build_loader
from mtkd_fast.data import dali as dali_module
from mtkd_fast.data.export import export_dataset

THREADS = int(os.environ.get("MTKD_BENCH_THREADS", min(2, os.cpu_count() or 1)))
PER_CLASS = 40  # 400 images per epoch
SIZE = (375, 500)
_medians: dict[str, float] = {}


@pytest.fixture(scope="module")
def jpeg_train(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench_jpeg")
    export_dataset("bundled", root, size=SIZE, quality=90, limit_per_class=PER_CLASS, progress=False)
    return build_dataset("imagefolder", root=root, split="train", augment=True, seed=0)


def _cpu_seconds() -> float:
    """CPU time of this process and of its finished children (the DataLoader workers, joined each epoch)."""
    return sum(r.ru_utime + r.ru_stime for r in (resource.getrusage(resource.RUSAGE_SELF),
                                                  resource.getrusage(resource.RUSAGE_CHILDREN)))


def _epoch(ds, backend, cpu_log):
    n = 0
    start = _cpu_seconds()
    for images, _, _ in build_loader(ds, 64, shuffle=True, seed=0, epoch=0, num_workers=THREADS, backend=backend):
        n += images.shape[0]
    cpu_log.append((_cpu_seconds() - start) / n)
    return n


@pytest.mark.parametrize("backend", ["torchvision", "dali"])  # torchvision first: dali reads its median
def test_image_folder_epoch(benchmark, jpeg_train, backend):
    if backend == "dali" and not dali_module.DALI_AVAILABLE:
        pytest.skip("NVIDIA DALI is not installed")
    benchmark.group = f"image folder epoch, CPU, {len(jpeg_train)} JPEGs {SIZE[0]}x{SIZE[1]} -> 224, {THREADS} threads"
    cpu_log = []
    benchmark.extra_info.update(case=f"{len(jpeg_train)} JPEGs", variant=backend, baseline="torchvision")
    n = benchmark.pedantic(_epoch, args=(jpeg_train, backend, cpu_log), rounds=3, warmup_rounds=1)
    assert n == len(jpeg_train)
    if benchmark.stats is None:  # --benchmark-disable: ran once, nothing timed
        return
    median = benchmark.stats.stats.median
    cpu_ms = 1000 * sorted(cpu_log)[len(cpu_log) // 2]
    _medians[backend] = (median, cpu_ms)
    benchmark.extra_info.update(loader_threads=THREADS, images=n, images_per_s=round(n / median, 1),
                                cpu_ms_per_image=round(cpu_ms, 3))
    print(f"\n{backend}: {n / median:.0f} images/s, {cpu_ms:.2f} CPU ms/image ({THREADS} threads)")
    if backend == "dali" and "torchvision" in _medians:
        speedup = _medians["torchvision"][0] / median
        cpu_ratio = cpu_ms / _medians["torchvision"][1]
        benchmark.extra_info.update(speedup_vs_torchvision=round(speedup, 3),
                                    cpu_ratio_vs_torchvision=round(cpu_ratio, 3))
        print(f"dali / torchvision: {speedup:.2f}x the speed, {cpu_ratio:.2f}x the CPU time per image")


# In-memory data (the bundled set, as CIFAR-100 is used): mtkd_fast's batched augmentation against the
# usual per-sample torchvision transforms (PIL RandomCrop(32, padding=4), flip, ToTensor, Normalize) in a
# DataLoader, both in this process, one epoch of 10000 images in batches of 64.
_array_medians: dict[str, float] = {}


class _PerSampleTorchvision:
    def __init__(self, ds):
        from torchvision import transforms as T

        self.images = ds.images.expand(-1, 3, -1, -1).permute(0, 2, 3, 1).numpy()  # [N, 28, 28, 3] uint8
        self.labels = ds.labels
        self.transform = T.Compose([T.Pad(2), T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(),
                                    T.ToTensor(), T.Normalize(ds.mean, ds.std)])

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        from PIL import Image

        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i]), i


def _array_epoch(loader):
    return sum(images.shape[0] for images, _, _ in loader)


@pytest.mark.parametrize("path", ["torchvision_per_sample", "batched"])
def test_in_memory_epoch(benchmark, path):
    import torch

    ds = build_dataset("bundled", split="train", augment=True, seed=0)
    if path == "batched":
        make = lambda: build_loader(ds, 64, shuffle=True, seed=0, epoch=0)  # noqa: E731
    else:
        baseline = _PerSampleTorchvision(ds)
        make = lambda: torch.utils.data.DataLoader(baseline, batch_size=64, shuffle=True)  # noqa: E731
    benchmark.group = "in-memory epoch, CPU, bundled train (10000 images), batch 64, 1 process"
    benchmark.extra_info.update(case="bundled train", variant=path, baseline="torchvision_per_sample",
                                batch_size=64, images=len(ds))
    n = benchmark.pedantic(lambda: _array_epoch(make()), rounds=3, warmup_rounds=1)
    assert n == len(ds)
    if benchmark.stats is None:  # --benchmark-disable: ran once, nothing timed
        return
    median = benchmark.stats.stats.median
    _array_medians[path] = median
    print(f"\n{path}: {n / median:.0f} images/s")
    if path == "batched" and "torchvision_per_sample" in _array_medians:
        speedup = _array_medians["torchvision_per_sample"] / median
        benchmark.extra_info["speedup_vs_torchvision_per_sample"] = round(speedup, 2)
        print(f"batched / per-sample torchvision speed: {speedup:.1f}x")
