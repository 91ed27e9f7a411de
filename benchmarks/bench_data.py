"""Image-folder loading on the CPU: NVIDIA DALI (libjpeg-turbo decode of the crop window, resize, flip,
normalise) against torchvision's DataLoader (PIL decode, the same crop, resize, flip, normalise) at equal
threads, on real JPEGs: the bundled Fashion-MNIST training images exported at 375x500 (ImageNet-like size)
by ``mtkd_fast.data.export``. One round = one epoch of the training loader (batch 64, 224x224 crops,
random resized crop + flip), pipeline start included; both produce the same batches. The DALI test
records images/s and its speed as a ratio of torchvision's measured in the same run
(``extra_info["speedup_vs_torchvision"]``).

    .venv/bin/python -m pytest benchmarks/bench_data.py --benchmark-only -q
"""

from __future__ import annotations

import os

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


def _epoch(ds, backend):
    n = 0
    for images, _, _ in build_loader(ds, 64, shuffle=True, seed=0, epoch=0, num_workers=THREADS, backend=backend):
        n += images.shape[0]
    return n


@pytest.mark.parametrize("backend", ["torchvision", "dali"])  # torchvision first: dali reads its median
def test_image_folder_epoch(benchmark, jpeg_train, backend):
    if backend == "dali" and not dali_module.DALI_AVAILABLE:
        pytest.skip("NVIDIA DALI is not installed")
    benchmark.group = f"image folder epoch, CPU, {len(jpeg_train)} JPEGs {SIZE[0]}x{SIZE[1]} -> 224, {THREADS} threads"
    n = benchmark.pedantic(_epoch, args=(jpeg_train, backend), rounds=3, warmup_rounds=1)
    assert n == len(jpeg_train)
    median = benchmark.stats.stats.median
    _medians[backend] = median
    benchmark.extra_info.update(threads=THREADS, images=n, images_per_s=round(n / median, 1))
    print(f"\n{backend}: {n / median:.0f} images/s ({THREADS} threads)")
    if backend == "dali" and "torchvision" in _medians:
        speedup = _medians["torchvision"] / median
        benchmark.extra_info["speedup_vs_torchvision"] = round(speedup, 3)
        print(f"dali / torchvision speed: {speedup:.2f}x")
