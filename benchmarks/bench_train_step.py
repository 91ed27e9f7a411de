"""One training step of each configuration of ``mtkd-fast bench epoch`` (pytest-benchmark, group "train-step").

CIFAR-like setting: B=64, 32x32 random images, 100 classes, teachers RegNetY_400MF, RegNetX_400MF, resnet32x4,
wrn_28_4 (random init: a step's time does not depend on the weights), student ShuffleV2 (MTKD_BENCH_STUDENT
overrides it, e.g. resnet56). Compare the medians within one run: student-only and AVER are the baselines, the
authors' way is what mtkd_fast replaces.

    .venv/bin/python -m pytest benchmarks/bench_train_step.py -q -o python_files='bench_*.py' --benchmark-only

The whole-epoch view (interleaved repetitions, peak memory, ratios, CSV/PNG) is ``mtkd-fast bench epoch``.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest
import torch

from mtkd_fast.bench.epoch import CONFIGS, BenchSpec, Run, build_cache_for, build_teachers, random_dataset
from mtkd_fast.data import build_loader

ROUNDS = 3


class _Setting:
    """Data, teachers, the cache and one Run per configuration, built once per session."""

    def __init__(self):
        self.spec = BenchSpec(setting="cifar", students=(os.environ.get("MTKD_BENCH_STUDENT", "ShuffleV2"),),
                              steps=2, progress=False).resolved()
        self.ds = random_dataset(self.spec)
        self.ds.set_view(0)
        self.teachers = build_teachers(self.spec, self.spec.device)
        self.tmp = tempfile.mkdtemp(prefix="bench_train_step_")
        self.cache_dir = os.path.join(self.tmp, "cache")
        self.cache_build_s = build_cache_for(self.spec, self.ds, self.teachers, self.cache_dir)
        self.batches = list(build_loader(self.ds, self.spec.batch_size, shuffle=True, seed=0, drop_last=True))
        self.runs = {}
        self.i = 0

    def run(self, config: str) -> Run:
        if config not in self.runs:
            run = Run(config, self.spec, self.spec.students[0], self.ds, self.teachers, self.cache_dir)
            run.begin_epoch(1, 1000)  # past the warm-up epoch; room for every step of the session
            self.runs[config] = run
        return self.runs[config]

    def step(self, config: str) -> None:
        images, labels, indices = self.batches[self.i % len(self.batches)]
        self.i += 1
        out = self.run(config).step(images, labels, indices)
        float(out["loss"])  # wait for the device
        if self.spec.device.startswith("cuda"):
            torch.cuda.synchronize()


_SETTING = None


@pytest.fixture(scope="module")
def setting():
    global _SETTING
    if _SETTING is None:
        _SETTING = _Setting()
    yield _SETTING
    shutil.rmtree(_SETTING.tmp, ignore_errors=True)


@pytest.mark.parametrize("config", CONFIGS)
def test_train_step(benchmark, setting, config):
    setting.step(config)  # warm-up: builds the configuration, allocator and kernels
    benchmark.group = f"train-step cifar {setting.spec.students[0]} B={setting.spec.batch_size}"
    benchmark.extra_info.update(case=f"cifar {setting.spec.students[0]}", variant=config, baseline="student_only",
                                batch_size=setting.spec.batch_size, images=setting.spec.batch_size,
                                cache_build_s=setting.cache_build_s)
    benchmark.pedantic(setting.step, args=(config,), rounds=ROUNDS, iterations=1)
