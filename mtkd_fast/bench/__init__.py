"""Benchmarks of whole training epochs (``mtkd-fast bench epoch``): student-only, AVER, EB-KD, CA-MKD, MTKD-RL the
authors' way, and mtkd_fast's MTKD-RL with live teachers and with the teacher cache, on the same data, models and
batch size; medians of interleaved repetitions, peak memory, ratios to student-only and to AVER."""

from .epoch import CONFIGS, SETTINGS, BenchSpec, Run, run_epoch_bench
from .report import format_table, plot, write_csv

__all__ = ["CONFIGS", "SETTINGS", "BenchSpec", "Run", "run_epoch_bench", "format_table", "write_csv", "plot"]
