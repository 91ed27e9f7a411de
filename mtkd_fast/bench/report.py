"""Outputs of the epoch benchmark: a text table, a CSV in the benchmarks' one schema (:mod:`mtkd_fast.bench.record`:
the machine, versions, commit and load on every row) and a PNG bar chart. Files are written atomically."""

from __future__ import annotations

import math

from .._optional import write_figure_atomic
from .epoch import memory_key
from .record import Record

# what only the epoch benchmark records: the CSV's ``extra`` field
_ROW_EXTRA = ("setting", "student", "teacher_precision", "steps")
_META_EXTRA = ("cache_build_s", "cache_build_fp32_s", "cache_samples", "memory_steps", "teachers", "amp",
               "channels_last", "teacher_precision", "fold_bn", "teacher_compile")


def _fmt(x, spec=".2f"):
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def format_table(result: dict, targets: bool = False) -> str:
    """The rows as a Markdown table (readable on a terminal too), then the cache build time; with ``targets``, the
    project's epoch-cost targets, met or not (a development check: ``bench epoch --targets``)."""
    rows, meta = result["rows"], result["meta"]
    mkey = memory_key(meta["device"])
    mem_name = "peak GPU MiB" if mkey == "peak_device_mib" else "peak RSS MiB"
    steps = rows[0]["steps"] if rows else 0
    head = ["student", "configuration", "teachers ran in", f"s / {steps} steps", "images/s", "x student-only", "x AVER",
            mem_name, "mem x AVER"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * len(head)) + "|"]
    for r in rows:
        lines.append("| " + " | ".join([
            r["student"], r["label"], r.get("teacher_precision", "-"), _fmt(r["median_s"], ".2f"),
            _fmt(r["images_per_s"], ".1f"),
            _fmt(r["time_x_student_only"]), _fmt(r["time_x_aver"]), _fmt(r[mkey], ".0f"), _fmt(r["mem_x_aver"]),
        ]) + " |")
    out = "\n".join(lines)
    if meta.get("cache_build_s") is not None:
        out += (f"\n\nteacher cache build ({meta['cache_samples']} samples x 1 view, all teachers): "
                f"{meta['cache_build_s']:.2f} s (not included in the cached configuration's time)")
        if meta.get("cache_build_fp32_s") is not None:
            out += (f"; the same build with float32 eager teachers (BatchNorm unfolded): "
                    f"{meta['cache_build_fp32_s']:.2f} s")
    if targets and result.get("targets"):
        out += "\n\ntargets:"
        for t in result["targets"]:
            verdict = {True: "met", False: "NOT met", None: "not measured"}[t["met"]]
            out += f"\n  {t['student']}: {t['target']}: {_fmt(t['value'])} -> {verdict}"
    return out


def to_record(result: dict) -> Record:
    """The rows in the benchmarks' one CSV schema (:mod:`mtkd_fast.bench.record`): benchmark ``epoch``, case
    ``<setting> <student>``, the ratios to student-only (and to AVER, and the memory ratios, as their own columns);
    the run's options in ``extra``."""
    meta = result["meta"]
    record = Record(meta=meta)
    run_extra = {k: meta[k] for k in _META_EXTRA if k in meta}
    for r in result["rows"]:
        times = [float(t) for t in r["times_s"].split()]
        extra = {**run_extra, **{k: r[k] for k in _ROW_EXTRA}}
        record.add("epoch", f"{r['setting']} {r['student']}", r["config"], times, baseline="student_only",
                   extra=extra, label=r["label"], threads=meta.get("threads", ""), batch_size=r["batch_size"],
                   images=r["images"], **{k: r[k] for k in _EPOCH_COLUMNS})
    return record


_EPOCH_COLUMNS = ("peak_rss_mib", "peak_device_mib", "time_x_student_only", "time_x_aver", "mem_x_student_only",
                  "mem_x_aver")


def write_csv(result: dict, path: str) -> None:
    """One row per (student, configuration) in the benchmarks' one CSV schema, written atomically."""
    to_record(result).write(path)


def plot(result: dict, path: str):
    """Bars of the median time per epoch of N steps (annotated with the ratio to student-only) and, when memory
    was measured (``--memory-steps`` > 0), of the peak memory; one group of bars per student. Returns the figure
    (None without matplotlib)."""
    from .._optional import pyplot

    plt = pyplot("the benchmark plot")
    if plt is None:
        return None

    rows, meta = result["rows"], result["meta"]
    mkey = memory_key(meta["device"])
    students = list(dict.fromkeys(r["student"] for r in rows))
    configs = list(dict.fromkeys(r["config"] for r in rows))
    labels = {r["config"]: r["label"] for r in rows}
    colors = plt.get_cmap("tab10")
    # an empty panel would read as "no memory used"
    panels = ["median_s"] + ([mkey] if any(math.isfinite(float(r[mkey])) for r in rows) else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels) + 1.5, 0.9 + 0.45 * len(configs) * len(students)),
                             squeeze=False)
    axes = list(axes[0])
    height = 0.8 / max(len(students), 1)
    for s_i, student in enumerate(students):
        mine = {r["config"]: r for r in rows if r["student"] == student}
        ys = [c_i + s_i * height for c_i in range(len(configs))]
        for ax, key in zip(axes, panels):
            vals = [mine[c][key] if c in mine else float("nan") for c in configs]
            ax.barh(ys, vals, height=height, color=colors(s_i), label=student)
            for y, c, v in zip(ys, configs, vals):
                ratio = mine[c]["time_x_student_only"] if key == "median_s" else mine[c]["mem_x_aver"]
                tag = "x student" if key == "median_s" else "x AVER"
                if math.isfinite(v):
                    ax.text(v, y, f" {_fmt(ratio)}{tag}", va="center", fontsize=7)
    for ax in axes:
        ax.set_yticks([c_i + height * (len(students) - 1) / 2 for c_i in range(len(configs))])
        ax.set_yticklabels([labels[c] for c in configs], fontsize=8)
        ax.invert_yaxis()
        ax.grid(axis="x", alpha=0.3)
    steps = rows[0]["steps"] if rows else 0
    axes[0].set_xlabel(f"median seconds per epoch of {steps} steps (batch {rows[0]['batch_size'] if rows else 0})")
    if len(axes) > 1:
        axes[1].set_xlabel("peak GPU memory allocated (MiB)" if mkey == "peak_device_mib" else "peak process RSS (MiB)")
        axes[1].set_yticklabels([])
    # beside the last panel, not over the bars
    axes[-1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, frameon=False)
    where = meta["gpu"] or meta["cpu"]
    fig.suptitle(f"epoch cost, {meta['device']} ({where}), torch {meta['torch']}, commit {meta['commit']}", fontsize=9)
    fig.tight_layout()
    write_figure_atomic(fig, path, dpi=110)
    return fig
