"""mtkd_fast's benchmarks (``mtkd-fast bench epoch | ops | teachers | cache``, and the cases of the pytest-benchmark
suite in ``benchmarks/``), on one harness: :mod:`.record` (the run's metadata, the interleaved-rounds timer, the one
CSV schema). :mod:`.epoch`: whole training epochs of student-only, AVER, EB-KD, CA-MKD, MTKD-RL the authors' way,
and mtkd_fast's MTKD-RL with live teachers and with the teacher cache, on the same data, models and batch size;
medians of interleaved repetitions, peak memory, ratios to student-only and to AVER. :mod:`.ops`, :mod:`.teachers`,
:mod:`.cache`: the distillation step per backend, the live-teacher engine, the teacher cache. :mod:`.authors`: the
authors' way of running a step, the baseline."""

from .epoch import CONFIGS, SETTINGS, BenchSpec, Run, run_epoch_bench
from .record import COLUMNS, Record, interleave, summarize
from .report import format_table, plot, write_csv

__all__ = ["CONFIGS", "SETTINGS", "BenchSpec", "Run", "run_epoch_bench", "format_table", "write_csv", "plot",
           "COLUMNS", "Record", "interleave", "summarize"]
