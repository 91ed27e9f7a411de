"""Frozen-teacher inference engine (``mtkd_fast.teachers.LiveTeachers``; ``mtkd-fast bench teachers`` and
``benchmarks/bench_teachers.py``): the forward pass of the four-teacher CIFAR pool (RegNetY_400MF, RegNetX_400MF,
resnet32x4, wrn_28_4; 100 classes, 32x32) at B=64, float32 eager (the authors' way, the baseline) against the
engine's variants. Random-init teachers: timing does not depend on the weights."""

from __future__ import annotations

import time

import torch

from .. import models
from ..teachers import LiveTeachers
from .record import Record, interleave

__all__ = ["TEACHERS", "NUM_CLASSES", "BATCH", "VARIANTS", "BASELINE", "teachers", "images", "engine",
           "run_teachers_bench"]

TEACHERS = ("RegNetY_400MF", "RegNetX_400MF", "resnet32x4", "wrn_28_4")
NUM_CLASSES = 100
BATCH = 64
BASELINE = "fp32_eager"  # what the authors run

# name -> LiveTeachers options
VARIANTS = {
    "fp32_eager": dict(precision="fp32", fold_bn=False, channels_last=False),
    "fp32_fold": dict(precision="fp32", fold_bn=True, channels_last=False),
    "fp32_fold_nhwc": dict(precision="fp32", fold_bn=True, channels_last=True),
    "bf16": dict(precision="bf16", fold_bn=False, channels_last=False),
    "bf16_nhwc": dict(precision="bf16", fold_bn=False, channels_last=True),
    "bf16_fold": dict(precision="bf16", fold_bn=True, channels_last=False),
    "bf16_fold_nhwc": dict(precision="bf16", fold_bn=True, channels_last=True),
    "fp32_fold_compile": dict(precision="fp32", fold_bn=True, channels_last=False, compile=True),
    "bf16_fold_nhwc_compile": dict(precision="bf16", fold_bn=True, channels_last=True, compile=True),
}


def teachers(names=TEACHERS):
    torch.manual_seed(1)
    return [models.create_model(n, NUM_CLASSES).eval() for n in names]


def images(batch: int = BATCH):
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(0))


_ENGINES: dict = {}


def engine(variant: str, names=TEACHERS) -> LiveTeachers:
    """The engine of a variant over the teachers ``names``, built once per process."""
    if variant not in VARIANTS:
        raise ValueError(f"variants: expected names from {list(VARIANTS)}, got {variant!r}")
    key = (variant, tuple(names))
    if key not in _ENGINES:
        _ENGINES[key] = LiveTeachers(teachers(names), **VARIANTS[variant])
    return _ENGINES[key]


def run_teachers_bench(variants=tuple(VARIANTS), threads=(1, 2), rounds=5, batch_size=BATCH, names=TEACHERS,
                       log=print) -> Record:
    """Per thread count, the variants (the baseline always among them) interleaved round by round after one
    untimed call each (which compiles where asked; its seconds are the row's ``first_call_s``)."""
    for v in variants:
        if v not in VARIANTS:
            raise ValueError(f"variants: expected names from {list(VARIANTS)}, got {v!r}")
    for n in threads:
        if int(n) < 1:
            raise ValueError(f"threads: expected positive integers, got {n!r}")
    if int(batch_size) < 1:
        raise ValueError(f"batch_size: expected a positive integer, got {batch_size!r}")
    for n in names:
        models.create_model(n, NUM_CLASSES)  # an unknown name fails here, before any timing
    variants = list(dict.fromkeys([BASELINE, *variants]))
    x = images(batch_size)
    record = Record("cpu", harness="mtkd-fast bench teachers")
    old = torch.get_num_threads()
    try:
        for n in threads:
            torch.set_num_threads(int(n))
            first_call = {}
            for v in variants:
                t0 = time.perf_counter()
                engine(v, names)(x)  # warm-up, compile
                first_call[v] = time.perf_counter() - t0
            times = interleave({v: (lambda v=v: engine(v, names)(x)) for v in variants}, rounds, warmup=0)
            for v in variants:
                live = engine(v, names)
                record.add("teachers", f"B={batch_size}", v, times[v], baseline=BASELINE, threads=int(n),
                           batch_size=batch_size, images=batch_size,
                           extra=dict(teachers=" ".join(names), precision_used=live.precision_used,
                                      fold_bn=live.fold_bn, folded_bn=live.folded_bn,
                                      channels_last=live.channels_last, compile=live.compile,
                                      first_call_s=first_call[v]))
            log("\n".join(record.format().splitlines()[-len(variants):]))
    finally:
        torch.set_num_threads(old)
    return record
