"""One training step's distillation, forward + backward, as the trainer runs it (``mtkd_fast.train.step.distill_step``
per backend, against the authors' way and the compiled reference; the cases and what each variant is:
``mtkd_fast/bench/ops.py``), plus each fused op alone (the bytes it must move, the bandwidth reached, its time over
the memory floor).

    .venv/bin/python -m pytest benchmarks/bench_ops.py -q --benchmark-only --benchmark-columns=min,median,mean,rounds
    MTKD_BENCH_DEVICE=cuda ...   # the same on the GPU (every timed call ends with a device synchronize)
    MTKD_BENCH_THREADS=1 ...     # one thread

The variants interleaved round by round, the robust comparison on a shared machine: ``mtkd-fast bench ops``.
"""

from __future__ import annotations

import os

import pytest
import torch

from mtkd_fast import ops
from mtkd_fast.bench import ops as bench_ops

DEVICE = torch.device(os.environ.get("MTKD_BENCH_DEVICE", "cpu"))
pytestmark = pytest.mark.skipif(not ops.available(DEVICE), reason=f"no compiled kernels for {DEVICE} (make build)")

# MTKD_BENCH_THREADS=1 measures single-threaded: on a shared, oversubscribed machine every parallel region
# waits for a descheduled worker thread (even a [64, 4] softmax then takes ~10 ms), which drowns the kernels
if os.environ.get("MTKD_BENCH_THREADS"):
    torch.set_num_threads(int(os.environ["MTKD_BENCH_THREADS"]))


@pytest.fixture(scope="module")
def copy_bw():
    return bench_ops.copy_bandwidth(DEVICE)


def _describe(benchmark, shape, name, copy_bw, baseline):
    """The row this case gives in the benchmarks' CSV (benchmarks/conftest.py): case, variant, byte floor."""
    B = bench_ops.SHAPES[shape]["B"]
    benchmark.extra_info.update(case=shape, variant=name, label=bench_ops.LABELS.get(name, f"ops.{name}"),
                                baseline=baseline, batch_size=B, images=B,
                                **bench_ops.floor_columns(shape, name, copy_bw, DEVICE))


@pytest.mark.parametrize("variant", bench_ops.VARIANTS)
@pytest.mark.parametrize("shape", list(bench_ops.SHAPES))
def test_step(benchmark, copy_bw, shape, variant):
    args = bench_ops.inputs(shape, DEVICE)
    step = bench_ops.variant(variant)
    bench_ops.train_step(step, args)  # warm-up (and compilation for the compiled reference)
    benchmark.group = f"step-{shape}"
    _describe(benchmark, shape, variant, copy_bw, bench_ops.BASELINE)
    benchmark.pedantic(bench_ops.train_step, args=(step, args), rounds=bench_ops.SHAPES[shape]["rounds"],
                       warmup_rounds=1)


@pytest.mark.parametrize("op", bench_ops.OPS)
@pytest.mark.parametrize("shape", list(bench_ops.SHAPES))
def test_fused_op(benchmark, copy_bw, shape, op):
    run = bench_ops.fused_op(op, bench_ops.inputs(shape, DEVICE))
    run()
    benchmark.group = f"op-{shape}"
    _describe(benchmark, shape, op, copy_bw, None)
    benchmark.pedantic(run, rounds=bench_ops.SHAPES[shape]["rounds"] * 2, warmup_rounds=1)
