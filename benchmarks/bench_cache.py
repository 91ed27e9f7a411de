"""Teacher-output cache: one MTKD-RL training step with the cache against live teachers and student-only (the
baseline), and the cache's own read of one batch (group "cache-step"; the setting and the trainers:
``mtkd_fast/bench/cache.py``).

    .venv/bin/python -m pytest benchmarks/bench_cache.py -q --benchmark-only

The steps interleaved round by round, the encodings' error and the replay experiment: ``mtkd-fast bench cache``.
"""

from __future__ import annotations

import pytest

from mtkd_fast.bench import cache as bench_cache


@pytest.fixture(scope="module")
def setting():
    return bench_cache.Setting()


def _describe(benchmark, s, variant, baseline):
    benchmark.group = "cache-step"
    benchmark.extra_info.update(case=f"{s.student} B={s.batch_size}", variant=variant, baseline=baseline,
                                batch_size=s.batch_size, images=s.batch_size, cache_build_s=s.build_s)


@pytest.mark.parametrize("kind", bench_cache.KINDS)
def test_step(benchmark, setting, kind):
    setting.step(kind)  # warm-up
    _describe(benchmark, setting, kind, bench_cache.BASELINE)
    benchmark.pedantic(setting.step, args=(kind,), rounds=5, iterations=1)


def test_cache_read_one_batch(benchmark, setting):
    _describe(benchmark, setting, "cache_read_one_batch", None)
    benchmark.pedantic(setting.read_cache, rounds=20, iterations=1, warmup_rounds=2)
