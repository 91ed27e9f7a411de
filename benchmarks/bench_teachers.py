"""Frozen-teacher inference engine (``mtkd_fast.teachers.LiveTeachers``): the forward pass of the four-teacher
CIFAR pool at B=64 on the CPU, float32 eager (the authors' way, the baseline) against the engine's variants, with 1
and 2 threads (the cases and variants: ``mtkd_fast/bench/teachers.py``). Group "teachers-<n>t", one entry per
variant; the compiled variants' first call takes minutes.

    .venv/bin/python -m pytest benchmarks/bench_teachers.py -q --benchmark-only

The variants interleaved round by round: ``mtkd-fast bench teachers``.
"""

from __future__ import annotations

import pytest
import torch

from mtkd_fast.bench import teachers as bench_teachers


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("variant", list(bench_teachers.VARIANTS))
def test_teacher_forward(benchmark, variant, threads):
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        live, x = bench_teachers.engine(variant), bench_teachers.images()
        live(x)  # warm-up (compiles where asked)
        if bench_teachers.VARIANTS[variant].get("compile") and not live.compile:
            pytest.skip(f"compile unavailable: {live.compile_error}")
        benchmark.group = f"teachers-{threads}t"
        benchmark.extra_info.update(case=f"B={bench_teachers.BATCH}", variant=variant, threads=threads,
                                    baseline=bench_teachers.BASELINE, batch_size=bench_teachers.BATCH,
                                    images=bench_teachers.BATCH, precision_used=live.precision_used)
        benchmark.pedantic(live, args=(x,), rounds=5, iterations=1)
    finally:
        torch.set_num_threads(old)
