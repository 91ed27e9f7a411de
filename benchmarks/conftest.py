"""pytest-benchmark suite (`make bench`). Each file benchmarks one part against its baseline in the same run.

At the end of a session that timed something, the statistics of every benchmark go to ``bench_results/
pytest_bench.csv`` (``MTKD_BENCH_OUT`` names another directory), in the one CSV schema of ``mtkd-fast bench``
(``mtkd_fast.bench.record``): one row per test, the percentiles from its rounds, the run's device, versions,
threads and load. A test describes its row through ``benchmark.extra_info``: ``case``, ``variant`` and ``baseline``
(the variant of the same file and case the ratio columns divide by), any other schema column by name; the rest
goes to the ``extra`` field. Without them the case is the benchmark's group and the variant its parameter.
"""

from __future__ import annotations

import os

from mtkd_fast.bench.record import ROW_COLUMNS, Record

_RECORD_KEY = "_mtkd_bench_record"


def pytest_sessionstart(session):
    device = os.environ.get("MTKD_BENCH_DEVICE", "cpu")
    setattr(session.config, _RECORD_KEY, Record(device, harness="pytest-benchmark"))


def _row(record: Record, bench) -> None:
    info = dict(bench.extra_info)
    module = bench.fullname.split("::")[0].rsplit("/", 1)[-1].removesuffix(".py").removeprefix("bench_")
    case = str(info.pop("case", bench.group or ""))
    variant = str(info.pop("variant", bench.param or bench.name))
    baseline = info.pop("baseline", None)
    columns = {k: info.pop(k) for k in list(info) if k in ROW_COLUMNS and k not in ("benchmark", "case", "variant")}
    columns.pop("images_per_s", None)  # computed from images and the median
    info["test"] = bench.name
    record.add(module, case, variant, bench.stats.data, baseline=baseline, extra=info, **columns)


def pytest_sessionfinish(session, exitstatus):
    record = getattr(session.config, _RECORD_KEY, None)
    bs = getattr(session.config, "_benchmarksession", None)
    if record is None or bs is None:
        return
    for bench in bs.benchmarks:
        if bench.stats:  # a benchmark that ran (none does under --benchmark-disable)
            _row(record, bench)
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    say = reporter.write_line if reporter is not None else print
    if not record.rows:
        say("benchmarks: no timings recorded (benchmarks disabled or none ran): no CSV written")
        return
    out = os.environ.get("MTKD_BENCH_OUT") or os.path.join(str(session.config.rootpath), "bench_results")
    path = record.write(os.path.join(out, "pytest_bench.csv"))
    say(f"benchmarks: {len(record.rows)} rows written to {path}")
