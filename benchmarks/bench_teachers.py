"""Frozen-teacher inference engine (``mtkd_fast.teachers.LiveTeachers``): the forward pass of the four-teacher
CIFAR pool (RegNetY_400MF, RegNetX_400MF, resnet32x4, wrn_28_4; 100 classes, 32x32) at B=64 on the CPU, float32
eager (the authors' way) against the engine's variants, with 1 and 2 threads.

- ``make bench`` (pytest-benchmark): group "teachers-<n>t", one entry per variant.
- ``python benchmarks/bench_teachers.py [--rounds 5] [--threads 1 2] [--variants ...] [--out results/bench_teachers]``
  times the variants interleaved round by round (the order rotates), prints medians and ratios to float32
  eager, and writes JSON. Random-init teachers: timing does not depend on the weights.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import pytest
import torch

from mtkd_fast import models
from mtkd_fast.teachers import LiveTeachers

TEACHERS = ["RegNetY_400MF", "RegNetX_400MF", "resnet32x4", "wrn_28_4"]
NUM_CLASSES = 100
BATCH = 64

# name -> LiveTeachers options; "fp32_eager" is the baseline (what the authors run)
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


def teachers():
    torch.manual_seed(1)
    return [models.create_model(n, NUM_CLASSES).eval() for n in TEACHERS]


def images(batch: int = BATCH):
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(0))


_ENGINES: dict = {}


def engine(variant: str) -> LiveTeachers:
    if variant not in _ENGINES:
        _ENGINES[variant] = LiveTeachers(teachers(), **VARIANTS[variant])
    return _ENGINES[variant]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_teacher_forward(benchmark, variant, threads):
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        live, x = engine(variant), images()
        live(x)  # warm-up (compiles where asked)
        if VARIANTS[variant].get("compile") and not live.compile:
            pytest.skip(f"compile unavailable: {live.compile_error}")
        benchmark.group = f"teachers-{threads}t"
        benchmark.extra_info["precision_used"] = live.precision_used
        benchmark.pedantic(live, args=(x,), rounds=5, iterations=1)
    finally:
        torch.set_num_threads(old)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--batch-size", type=int, default=BATCH)
    p.add_argument("--out", default=None, help="directory for bench_teachers.json")
    args = p.parse_args()
    variants = list(dict.fromkeys(["fp32_eager"] + args.variants))
    x = images(args.batch_size)
    result = {"load_before": os.getloadavg(), "batch": args.batch_size, "rounds": args.rounds, "rows": []}
    for threads in args.threads:
        torch.set_num_threads(threads)
        t_setup = {}
        for v in variants:
            t0 = time.perf_counter()
            engine(v)(x)  # warm-up, compile
            t_setup[v] = time.perf_counter() - t0
        times = {v: [] for v in variants}
        for r in range(args.rounds):
            order = variants[r % len(variants):] + variants[:r % len(variants)]
            for v in order:
                t0 = time.perf_counter()
                engine(v)(x)
                times[v].append(time.perf_counter() - t0)
        base = statistics.median(times["fp32_eager"])
        for v in variants:
            live = engine(v)
            med = statistics.median(times[v])
            row = {"threads": threads, "variant": v, "precision_used": live.precision_used, "fold_bn": live.fold_bn,
                   "folded_bn": live.folded_bn, "channels_last": live.channels_last, "compile": live.compile,
                   "median_ms": med * 1e3, "min_ms": min(times[v]) * 1e3, "max_ms": max(times[v]) * 1e3,
                   "speedup_vs_fp32_eager": base / med, "first_call_s": t_setup[v]}
            result["rows"].append(row)
            print(f"{threads}t {v:24s} {med * 1e3:8.1f} ms  x{base / med:5.2f}  (min {min(times[v]) * 1e3:.1f}, "
                  f"max {max(times[v]) * 1e3:.1f}; first call {t_setup[v]:.1f} s)", flush=True)
    result["load_after"] = os.getloadavg()
    print(f"load average before {result['load_before']}, after {result['load_after']}")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "bench_teachers.json"), "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
