"""What every benchmark of mtkd_fast shares: the run's metadata, the interleaved-rounds timer, and one CSV schema.

Both harnesses write the same CSV: the ``mtkd-fast bench`` verbs (``ops``, ``teachers``, ``cache``, ``epoch``) and
the pytest-benchmark suite in ``benchmarks/`` (its ``conftest.py`` turns the session's statistics into these rows).
One row per (benchmark, case, variant); :data:`COLUMNS` in order:

- what: ``benchmark`` (ops, teachers, cache, epoch, or the pytest-benchmark file's name without ``bench_``),
  ``case`` (the shape or setting), ``variant``, ``label`` (a readable name), ``threads``, ``batch_size``,
  ``images`` (images per timed round);
- timing, seconds per round: ``rounds``, ``median_s``, ``mean_s``, ``min_s``, ``p25_s``, ``p75_s``, ``max_s``
  (percentiles by linear interpolation, so min <= p25 <= median <= p75 <= max), ``images_per_s`` (images / median);
- ratios to the baseline measured in the same run, case and thread count: ``baseline`` (the variant divided by),
  ``median_x_baseline`` and ``min_x_baseline`` (this variant's time over the baseline's: above 1 is slower);
- byte floor (the ops benchmark): ``bytes_mb`` (what the fused code must move), ``copy_bandwidth_gbps`` (a large
  tensor copy on this device, measured in the same run), ``floor_s`` (``bytes_mb`` at that bandwidth),
  ``median_x_floor``, ``gbps`` (``bytes_mb`` / median: the bandwidth reached by the fused code, which moves exactly
  those bytes; for the other variants, what they would need to move only the floor's bytes);
- memory and the epoch benchmark's second baseline: ``peak_rss_mib``, ``peak_device_mib``, ``time_x_student_only``,
  ``time_x_aver``, ``mem_x_student_only``, ``mem_x_aver``;
- the run (the same on every row): ``harness``, ``date`` (UTC, at the start), ``commit`` (of the mtkd_fast
  checkout, or "unknown"), ``device``, ``gpu``, ``cpu``, ``cpu_count``, ``python``, ``torch``, ``cuda``,
  ``platform``, ``hostname``, ``load_start`` and ``load_end`` (the 1, 5 and 15 minute load averages),
  ``provenance`` (``measured`` when this harness wrote the row; a row copied by hand from an older document
  says so and from where, e.g. ``transcribed from benchmarks/RESULTS.md ...``, and keeps the columns it could
  not recover empty);
- ``times_s`` (every round's seconds, in the order run) and ``extra`` (JSON: what only one benchmark records).

A column that does not apply to a row is empty; a row that measures something other than time (the cache's
encoding errors) has empty timing columns and its values in ``extra``.
"""

from __future__ import annotations

import csv
import datetime
import io
import json
import math
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional

import torch

from .._io import write_bytes_atomic
from .._optional import write_figure_atomic

__all__ = ["COLUMNS", "RUN_COLUMNS", "Record", "run_info", "summarize", "interleave", "device_sync", "plot_medians",
           "read_csv", "load_average"]

ROW_COLUMNS = (
    "benchmark", "case", "variant", "label", "threads", "batch_size", "images",
    "rounds", "median_s", "mean_s", "min_s", "p25_s", "p75_s", "max_s", "images_per_s",
    "baseline", "median_x_baseline", "min_x_baseline",
    "bytes_mb", "copy_bandwidth_gbps", "floor_s", "median_x_floor", "gbps",
    "peak_rss_mib", "peak_device_mib", "time_x_student_only", "time_x_aver", "mem_x_student_only", "mem_x_aver",
)
RUN_COLUMNS = ("harness", "date", "commit", "device", "gpu", "cpu", "cpu_count", "python", "torch", "cuda", "platform",
               "hostname", "load_start", "load_end", "provenance")
COLUMNS = ROW_COLUMNS + RUN_COLUMNS + ("times_s", "extra")
_STATS = ("rounds", "median_s", "mean_s", "min_s", "p25_s", "p75_s", "max_s")


def load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:  # not available on this platform
        return ""


def _commit() -> str:
    """The commit of the mtkd_fast checkout this module runs from; "unknown" for an installed package (whose
    parent folder may sit inside some other git repository)."""
    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists() or not (root / "setup.py").exists():
        return "unknown"
    try:
        out = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=root)
        return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run_info(device: str = "cpu", harness: str = "") -> dict:
    """The run's metadata (:data:`RUN_COLUMNS`; ``load_end`` is left for :meth:`Record.write` to fill in)."""
    device = str(device)
    gpu = torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else ""
    return {"harness": harness, "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "commit": _commit(), "device": device, "gpu": gpu, "cpu": _cpu_name(), "cpu_count": os.cpu_count(),
            "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda or "none",
            "platform": platform.platform(), "hostname": platform.node(), "load_start": load_average(), "load_end": "",
            "provenance": "measured"}


def _quantile(sorted_times: list, q: float) -> float:
    """Linear interpolation between the closest ranks (numpy's default), so the quantiles stay ordered."""
    pos = q * (len(sorted_times) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_times) - 1)
    return sorted_times[lo] + (sorted_times[hi] - sorted_times[lo]) * (pos - lo)


def summarize(times: Iterable[float]) -> dict:
    """rounds, median_s, mean_s, min_s, p25_s, p75_s, max_s of a list of per-round seconds."""
    t = sorted(float(x) for x in times)
    if not t:
        raise ValueError("times: expected at least one round, got none")
    return {"rounds": len(t), "median_s": statistics.median(t), "mean_s": statistics.fmean(t), "min_s": t[0],
            "p25_s": _quantile(t, 0.25), "p75_s": _quantile(t, 0.75), "max_s": t[-1]}


def device_sync(device) -> Callable[[], None]:
    """A function that waits for ``device`` (a no-op on the CPU): call it inside the timed region."""
    device = torch.device(device)
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def interleave(variants: Mapping[str, Callable[[], Any]], rounds: int, warmup: int = 1,
               sync: Optional[Callable[[], None]] = None,
               after: Optional[Callable[[str, float], None]] = None) -> dict:
    """Seconds of each of ``rounds`` calls of every variant, the variants taking turns round by round and the
    order rotating each round (so load that changes on a shared machine hits every variant alike, and none always
    runs first). ``warmup`` untimed calls of each variant first; ``sync`` (e.g. :func:`device_sync`) is called
    after each call, inside the timed region; ``after(name, seconds)`` after each timed call (progress)."""
    if int(rounds) < 1:
        raise ValueError(f"rounds: expected a positive integer, got {rounds!r}")
    sync = sync or (lambda: None)
    names = list(variants)
    for _ in range(warmup):
        for name in names:
            variants[name]()
            sync()
    times: dict = {name: [] for name in names}
    for r in range(int(rounds)):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            t0 = time.perf_counter()
            variants[name]()
            sync()
            times[name].append(time.perf_counter() - t0)
            if after is not None:
                after(name, times[name][-1])
    return times


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "nan" if math.isnan(value) else repr(value)
    return str(value)


class Record:
    """The rows of one benchmark run and its metadata; :meth:`write` adds the ratios and writes the CSV."""

    def __init__(self, device: str = "cpu", harness: str = "", meta: Optional[Mapping] = None):
        """``meta``: the run's metadata when it was taken already (:func:`run_info`); else it is read now."""
        self.meta = ({**{k: meta.get(k, "") for k in RUN_COLUMNS}, "provenance": meta.get("provenance") or "measured"}
                     if meta is not None else run_info(device, harness))
        self.rows: list = []

    def add(self, benchmark: str, case: str, variant: str, times: Optional[Iterable[float]] = None, *,
            baseline: Optional[str] = None, extra: Optional[Mapping] = None, **columns) -> dict:
        """One row. ``times``: the per-round seconds (their statistics fill the timing columns); ``baseline``: the
        variant of the same benchmark, case and thread count whose times the ratio columns divide by; ``columns``:
        any of :data:`ROW_COLUMNS`; ``extra``: anything else (written as JSON)."""
        unknown = sorted(set(columns) - set(ROW_COLUMNS))
        if unknown:
            raise ValueError(f"columns: unknown {unknown}; expected names from {ROW_COLUMNS}")
        row = {"benchmark": benchmark, "case": case, "variant": variant, "baseline": baseline or "",
               "threads": torch.get_num_threads(), **columns}
        if times is not None:
            times = [float(t) for t in times]
            row.update(summarize(times))
            row["times_s"] = " ".join(f"{t:.6g}" for t in times)
            if row.get("images"):
                row["images_per_s"] = row["images"] / row["median_s"]
            if row.get("floor_s"):
                row["median_x_floor"] = row["median_s"] / row["floor_s"]
            if row.get("bytes_mb"):
                row["gbps"] = row["bytes_mb"] / 1e3 / row["median_s"]
        row["extra"] = json.dumps(dict(extra), sort_keys=True, default=str) if extra else ""
        self.rows.append(row)
        return row

    def _ratios(self) -> None:
        # the baseline of the same benchmark, case and thread count (a run may time several thread counts)
        by_key = {(r["benchmark"], r["case"], r["threads"], r["variant"]): r for r in self.rows}
        for r in self.rows:
            base = by_key.get((r["benchmark"], r["case"], r["threads"], r["baseline"])) if r["baseline"] else None
            if base is None or not r.get("median_s") or not base.get("median_s"):
                continue
            r["median_x_baseline"] = r["median_s"] / base["median_s"]
            if r.get("min_s") and base.get("min_s"):  # a row transcribed from a document may quote no minimum
                r["min_x_baseline"] = r["min_s"] / base["min_s"]

    def csv_text(self) -> str:
        self._ratios()
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(COLUMNS)
        for r in self.rows:
            full = {**self.meta, **r}
            w.writerow([_cell(full.get(c)) for c in COLUMNS])
        return buf.getvalue()

    def write(self, path: str) -> str:
        """Write the CSV atomically (the load average at the end is read now, for a run measured now); returns
        ``path``."""
        if not self.meta["load_end"] and self.meta["provenance"] == "measured":
            self.meta["load_end"] = load_average()
        write_bytes_atomic(path, self.csv_text().encode())
        return path

    def format(self) -> str:
        """One line per row: median, min and the ratio to the baseline (for the terminal)."""
        self._ratios()
        lines = []
        for r in self.rows:
            if not r.get("median_s"):
                continue
            ratio = r.get("median_x_baseline")
            tag = f"  x{ratio:.2f} {r['baseline']} (min x{r['min_x_baseline']:.2f})" if ratio is not None else ""
            lines.append(f"{r['benchmark']} {r['case']:<12} {r['variant']:<24} {r['threads']}t "
                         f"median {r['median_s'] * 1e3:9.2f} ms  min {r['min_s'] * 1e3:9.2f} ms  "
                         f"({r['rounds']} rounds){tag}")
        return "\n".join(lines)

    def header(self) -> str:
        m = self.meta
        return (f"{m['device']} ({m['gpu'] or m['cpu']}), torch {m['torch']}, CUDA {m['cuda']}, commit {m['commit']}, "
                f"{m['date']}; load average at the start {m['load_start']}")


def read_csv(path: str) -> list:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def plot_medians(record: Record, path: str, title: str) -> Optional[str]:
    """Bars of each variant's median per case (one panel per case), annotated with the ratio to the baseline.
    Written atomically; skipped (returns None) without matplotlib."""
    from .._optional import pyplot

    plt = pyplot("the benchmark plot")
    rows = [r for r in record.rows if r.get("median_s")]
    if plt is None or not rows:
        return None
    record._ratios()
    cases = list(dict.fromkeys((r["case"], r["threads"]) for r in rows))
    fig, axes = plt.subplots(1, len(cases), figsize=(max(7.0, 4.8 * len(cases)), 1.3 + 0.38 * max(
        sum(1 for r in rows if (r["case"], r["threads"]) == c) for c in cases)), squeeze=False)
    for ax, (case, threads) in zip(axes[0], cases):
        mine = [r for r in rows if (r["case"], r["threads"]) == (case, threads)]
        ys = list(range(len(mine)))
        ax.barh(ys, [r["median_s"] * 1e3 for r in mine],
                color=["#c33" if r["variant"] == r["baseline"] else "#69c" for r in mine])
        for y, r in zip(ys, mine):
            if r.get("median_x_baseline") is not None:
                ax.text(r["median_s"] * 1e3, y, f" x{r['median_x_baseline']:.2f}", va="center", fontsize=7)
        ax.set_yticks(ys)
        ax.set_yticklabels([r.get("label") or r["variant"] for r in mine], fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("median ms per round")
        ax.set_title(f"{case}, {threads} thread(s)", fontsize=9)
    m = record.meta
    fig.suptitle(f"{title}: {m['device']} ({m['gpu'] or m['cpu']}), torch {m['torch']}, commit {m['commit']}\n"
                 f"median of interleaved rounds, ratio to the baseline (red)", fontsize=8)
    fig.tight_layout()
    write_figure_atomic(fig, path, dpi=110)
    return path
