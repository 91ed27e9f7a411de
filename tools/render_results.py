#!/usr/bin/env python3
"""Render the documents' benchmark tables from the tracked CSVs (benchmarks/results/*.csv, the schema of
mtkd_fast/bench/record.py), so no measured number in them is typed by hand.

A rendered block in README.md, benchmarks/RESULTS.md or docs/*.md is

    <!-- rendered: benchmarks/results/teachers.csv view=teachers -->
    ... (written by this script) ...
    <!-- end rendered -->

naming the CSV(s) it is made from and the view (one function below per kind of table). The script rewrites
every block from its CSVs; a rerun of a benchmark updates the docs with one command:

    python tools/render_results.py                  # re-render every block in place, print the files changed
    python tools/render_results.py --check          # change nothing; exit 1 naming each stale block
    mtkd-fast bench teachers --threads 1,2 --rounds 3 --out bench_results
    python tools/render_results.py --take bench_results/teachers_bench.csv benchmarks/results/teachers.csv
        # replace the tracked CSV by the new run's (--append: add the run's rows to it), then re-render

tests/test_doc_numbers.py runs --check's logic and checks that the numbers quoted outside the blocks come from a
tracked CSV.
"""

from __future__ import annotations

import argparse
import csv
import glob
import io
import json
import math
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from mtkd_fast._io import write_bytes_atomic  # noqa: E402
from mtkd_fast.bench.record import COLUMNS  # noqa: E402

BLOCK = re.compile(r"(?P<open><!-- rendered: (?P<spec>[^\n]*?) -->\n)(?P<body>.*?)(?P<close><!-- end rendered -->)",
                   re.S)


def documents(root: str = ROOT) -> list:
    """The documents that may hold rendered blocks and quote numbers, relative to ``root``."""
    docs = ["README.md", os.path.join("benchmarks", "RESULTS.md")]
    docs += sorted(os.path.relpath(p, root) for p in glob.glob(os.path.join(root, "docs", "*.md")))
    return [d for d in docs if os.path.exists(os.path.join(root, d))]


# ---- reading the CSVs ---------------------------------------------------------------------------------------

def read_rows(path: str) -> list:
    """The rows of a tracked CSV, which must be in the one schema (same columns, same order)."""
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header != list(COLUMNS):
            raise ValueError(f"{path}: expected the columns of mtkd_fast/bench/record.py COLUMNS, got {header}")
        rows = [dict(zip(header, cells)) for cells in reader]
    for r in rows:
        r["extra"] = json.loads(r["extra"]) if r["extra"] else {}
    return rows


def num(row: dict, col: str):
    """A column as a float, or None when empty."""
    value = row.get(col, "")
    return float(value) if value not in ("", None) and math.isfinite(float(value)) else None


def span(rows: list, col: str) -> tuple:
    """(lowest, highest) of ``col`` over ``rows`` (the runs of one case): each row's value, and the ends of a
    range a transcribed row keeps in ``extra["over_runs"]`` where only a range was quoted."""
    values = [v for v in (num(r, col) for r in rows) if v is not None]
    for r in rows:
        values += r["extra"].get("over_runs", {}).get(col, [])
    if not values:
        raise ValueError(f"no value of {col} in rows {[(r['case'], r['variant']) for r in rows]}")
    return min(values), max(values)


def sig(x: float) -> str:
    """Three significant digits, trailing zeros dropped, no exponent."""
    return f"{x:.0f}" if abs(x) >= 100 else f"{x:.3g}"


def fmt_span(lo_hi: tuple, scale: float = 1.0) -> str:
    lo, hi = (sig(v * scale) for v in lo_hi)
    return lo if lo == hi else f"{lo}-{hi}"


def ratio(x: float) -> str:
    # two decimals where the runs' spread is that small, one above (the ops' ratios vary by 10-20% between runs)
    return f"{x:.2f}x" if x < 4 else f"{x:.1f}x"


def fmt_ratio_span(values: list) -> str:
    lo, hi = ratio(min(values)), ratio(max(values))
    return lo if lo == hi else f"{lo[:-1]}-{hi}"


def table(head: list, rows: list) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * len(head)) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _keys(rows: list, *cols) -> list:
    return list(dict.fromkeys(tuple(r[c] for c in cols) for r in rows))


def _pick(rows: list, **where) -> list:
    return [r for r in rows if all((r[k] if k in r else r["extra"].get(k)) == v for k, v in where.items())]


def _one(rows: list, **where) -> dict:
    """The one row matching ``where``; a view that shows one run refuses a CSV holding several."""
    found = _pick(rows, **where)
    if len(found) != 1:
        raise ValueError(f"expected one row with {where}, found {len(found)} (this view shows one run: --take "
                         "without --append replaces the tracked CSV's run)")
    return found[0]


# ---- views: one per kind of table -----------------------------------------------------------------------------

def _per_run_ratios(rows: list, variant: str) -> list:
    return [num(r, "median_x_baseline") for r in _pick(rows, variant=variant) if num(r, "median_x_baseline")]


def view_ops(sources: list) -> str:
    """The distillation step per backend: medians over the runs, the per-run speed-ups of fused over the authors'
    arithmetic and over compiled reference, fused over its byte floor; then the MTKDLoss-outside-MTKD-RL row."""
    (rows,) = sources
    out, loss = [], []
    for case, threads in _keys(rows, "case", "threads"):
        mine = _pick(rows, case=case, threads=threads)
        fused = _pick(mine, variant="fused")

        def ms(variant):  # a run of `bench ops --variants ...` may leave variants out
            rows_v = _pick(mine, variant=variant)
            return f"{fmt_span(span(rows_v, 'median_s'), 1e3)} ms" if rows_v else "-"

        floor = [v for v in (num(r, "median_x_floor") for r in fused) if v is not None]
        out.append([
            "CIFAR" if case == "cifar" else "ImageNet" if case == "imagenet" else case, threads,
            f"{fmt_span(span(fused, 'median_s'), 1e3)} / {fmt_span(span(fused, 'min_s'), 1e3)} ms",
            *(ms(v) for v in ("authors", "compiled_reference", "reference")),
            ", ".join(ratio(x) for x in _per_run_ratios(mine, "authors")) or "-",
            ", ".join(ratio(x) for x in _per_run_ratios(mine, "compiled_reference")) or "-",
            fmt_ratio_span(floor) if floor else "-",
        ])
        cos = _pick(mine, variant="mtkdloss_cos_in_loss")
        if cos:
            loss.append(f"{out[-1][0]} {fmt_span(span(cos, 'median_s'), 1e3)} ms ({threads} thread"
                        f"{'s' if threads != '1' else ''})")
    text = table(["shape", "threads", "fused (median / min)", "authors (median)", "compiled reference (median)",
                  "eager reference (median)", "vs authors (median, per run)", "vs compiled ref (median, per run)",
                  "fused over its byte floor"], out)
    if loss:
        text += "\nThe separate \"MTKDLoss outside MTKD-RL\" row, medians: " + "; ".join(loss) + ".\n"
    return text


def view_teachers(sources: list) -> str:
    """Each teacher-engine variant's median / min per thread count and its speed-up over the baseline."""
    (rows,) = sources
    threads = list(dict.fromkeys(r["threads"] for r in rows))
    head = ["variant"]
    for t in threads:
        head += [f"{t} thread{'s' if t != '1' else ''} median / min ms",
                 f"speed-up over {rows[0]['baseline']} (median / min)"]
    out = []
    for (variant,) in _keys(rows, "variant"):
        line = [_pick(rows, variant=variant)[0]["label"] or variant]
        for t in threads:
            r = _one(rows, variant=variant, threads=t)
            b = _one(rows, variant=r["baseline"], threads=t)
            line += [f"{num(r, 'median_s') * 1e3:.0f} / {num(r, 'min_s') * 1e3:.0f}",
                     f"{ratio(num(b, 'median_s') / num(r, 'median_s'))} / {ratio(num(b, 'min_s') / num(r, 'min_s'))}"]
        out.append(line)
    return table(head, out)


def _steps(rows: list) -> str:
    steps = sorted({str(r["extra"].get("steps", "")) for r in rows})
    return steps[0] if len(steps) == 1 else ""


def view_epoch(sources: list) -> str:
    """The epoch benchmark's table (time per N steps, images/s, ratios to student-only and AVER), columns that no
    row has left out; then the cache build times."""
    (rows,) = sources
    cols = [("images_per_s", "images/s", ".1f"), ("time_x_student_only", "x student-only", ".2f"),
            ("time_x_aver", "x AVER", ".2f"), ("peak_rss_mib", "peak RSS MiB", ".0f"),
            ("peak_device_mib", "peak GPU MiB", ".0f"), ("mem_x_aver", "mem x AVER", ".2f")]
    cols = [c for c in cols if any(num(r, c[0]) is not None for r in rows)]
    head = ["student", "configuration", "teachers ran in", f"s / {_steps(rows)} steps"] + [c[1] for c in cols]
    out = [[r["extra"].get("student", r["case"]), r["label"] or r["variant"], r["extra"].get("teacher_precision", "-"),
            f"{num(r, 'median_s'):.2f}"] + [format(num(r, c), spec) if num(r, c) is not None else "-"
                                            for c, _, spec in cols] for r in rows]
    text = table(head, out)
    extra = rows[0]["extra"]
    if extra.get("cache_build_s"):
        text += (f"\nTeacher cache build ({extra.get('cache_samples', '?')} samples x 1 view): "
                 f"**{extra['cache_build_s']:.2f} s with the engine")
        if extra.get("cache_build_fp32_s"):
            text += (f", {extra['cache_build_fp32_s']:.2f} s with float32 eager teachers** "
                     f"({ratio(extra['cache_build_fp32_s'] / extra['cache_build_s'])})")
        else:
            text += "**"
        text += ".\n"
    return text


def _vs_authors(rows: list, config: str):
    """{(run, student): authors' median / ``config``'s median} for the runs that have both."""
    out = {}
    for r in _pick(rows, variant=config):
        authors = [a for a in _pick(rows, variant="mtkd_rl_authors", case=r["case"])
                   if a["extra"].get("run") == r["extra"].get("run")]
        if authors:
            out[(r["extra"].get("run"), r["extra"].get("student", r["case"]))] = \
                num(authors[0], "median_s") / num(r, "median_s")
    return out


def view_epoch_vs_authors(sources: list) -> str:
    """The MTKD-RL rows of epoch runs, each live row as the authors' time over its own (same run, same student)."""
    (rows,) = sources
    steps = _steps(rows)
    has_x = any(num(r, "time_x_student_only") is not None for r in rows)
    head = ["student", "configuration", "teachers ran in", f"s / {steps} steps" if steps else "median s (steps)"]
    head += ["x student-only"] * has_x + ["authors' way / this"]
    out = []
    for r in rows:
        if r["variant"] not in ("mtkd_rl_authors", "mtkd_rl_live", "mtkd_rl_cached"):
            continue
        authors = [a for a in _pick(rows, variant="mtkd_rl_authors", case=r["case"])
                   if a["extra"].get("run") == r["extra"].get("run")]
        t = f"{num(r, 'median_s'):.2f}" + ("" if steps else f" ({r['extra'].get('steps')} steps)")
        line = [r["extra"].get("student", r["case"]), r["label"] or r["variant"],
                r["extra"].get("teacher_precision", "-"), t]
        if has_x:
            line.append(f"{num(r, 'time_x_student_only'):.2f}" if num(r, "time_x_student_only") is not None else "-")
        line.append(f"{num(authors[0], 'median_s') / num(r, 'median_s'):.2f}" if authors else "-")
        out.append(line)
    return table(head, out)


def view_epoch_targets(sources: list) -> str:
    """The development targets of the epoch benchmark, per student: the first CSV's run (the default teachers)
    and, if given, a second run with bf16 teachers."""
    rows, bf16 = sources[0], (sources[1] if len(sources) > 1 else [])
    students = list(dict.fromkeys(r["extra"].get("student", r["case"]) for r in rows))
    live, live_bf16 = _vs_authors(rows, "mtkd_rl_live"), _vs_authors(bf16, "mtkd_rl_live")
    cached = _vs_authors(rows, "mtkd_rl_cached")

    def verdict(value, ok):
        return f"**{'met' if ok else 'NOT met'}** ({ratio(value)})"

    out = []
    line = ["live-teacher MTKD-RL >= 2x faster than the authors' way"]
    for s in students:
        cell = [f"fp32 teachers: {verdict(v, v >= 2)}" for (run, st), v in live.items() if st == s]
        cell += [f"bf16 teachers: {verdict(v, v >= 2)}" for (run, st), v in live_bf16.items() if st == s]
        line.append("; ".join(cell) or "-")
    out.append(line)
    within = [(s, [num(r, "time_x_student_only") for r in _pick(rows, variant="mtkd_rl_cached")
                   if r["extra"].get("student", r["case"]) == s]) for s in students]
    if any(v for _, v in within):
        out.append(["cached MTKD-RL within 1.3x of student-only"]
                   + [verdict(v[0], v[0] <= 1.3) if v else "-" for _, v in within])
    if cached:
        out.append(["cached MTKD-RL >= 5x faster than the authors' way"]
                   + [next((verdict(v, v >= 5) for (run, st), v in cached.items() if st == s), "-") for s in students])
    return table(["target"] + students, out)


def view_cache(sources: list) -> str:
    """`bench cache`'s training steps against student-only, and the cache's read of one batch."""
    (rows,) = sources
    steps = [r for r in rows if r["benchmark"] == "cache" and r["baseline"]]
    out = []
    for r in steps:
        b = _one(rows, benchmark="cache", variant=r["baseline"])
        x = ("1.00" if r is b else f"{num(r, 'median_s') / num(b, 'median_s'):.2f} / "
             f"{num(r, 'min_s') / num(b, 'min_s'):.2f}")
        out.append([r["label"] or r["variant"], f"{num(r, 'median_s') * 1e3:.0f} ms", f"{num(r, 'min_s') * 1e3:.0f} ms",
                    x])
    text = table(["training step", "median", "min", "x student-only (median / min)"], out)
    for r in _pick(rows, benchmark="cache", variant="read"):
        text += (f"\nReading one batch from the cache: {num(r, 'min_s') * 1e3:.1f}-{num(r, 'median_s') * 1e3:.1f} ms "
                 f"(min-median of {r['rounds']})")
        if r["extra"].get("cache_build_s"):
            text += f"; building it over {r['extra'].get('cache_samples')} samples: {r['extra']['cache_build_s']} s"
        text += ".\n"
    return text


def view_headline(sources: list) -> str:
    """README's headline table: from ops, teachers, the epoch run (default teachers) and the epoch run with bf16
    teachers, in that order."""
    ops, teachers, epoch, epoch_bf16 = sources

    def ops_span(case, threads, variant):
        return fmt_ratio_span(_per_run_ratios(_pick(ops, case=case, threads=threads), variant))

    def engine(threads):
        b = _one(teachers, variant="fp32_eager", threads=threads)
        r = _one(teachers, variant="bf16_fold_nhwc", threads=threads)
        return ratio(num(b, "median_s") / num(r, "median_s"))

    students = list(dict.fromkeys(r["extra"].get("student") for r in epoch))
    live, live_bf16 = _vs_authors(epoch, "mtkd_rl_live"), _vs_authors(epoch_bf16, "mtkd_rl_live")
    by_student = lambda d: " / ".join(ratio(v) for s in students for (_, st), v in d.items() if st == s)  # noqa: E731
    cached = " / ".join(ratio(num(r, "time_x_student_only")) for s in students
                        for r in _pick(epoch, variant="mtkd_rl_cached") if r["extra"].get("student") == s)
    names = " / ".join(students)
    out = [
        ["MTKD-RL's distillation step in its own order (state, weights, loss, reward), fused vs the authors' "
         "arithmetic, CIFAR shape", f"{ops_span('cifar', '1', 'authors')} (1 thread), "
                                   f"{ops_span('cifar', '2', 'authors')} (2 threads)"],
        ["the same vs `torch.compile` of the reference", f"{ops_span('cifar', '1', 'compiled_reference')} (1 thread), "
                                                        f"{ops_span('cifar', '2', 'compiled_reference')} (2 threads)"],
        ["the same at the ImageNet shape, vs the authors / vs compiled",
         f"{ops_span('imagenet', '1', 'authors')} / {ops_span('imagenet', '1', 'compiled_reference')} (1 thread)"],
        ["forward of four CIFAR teachers, B=64: `LiveTeachers` (bf16, BatchNorm folded, channels_last) vs float32 "
         "eager", f"{engine('1')} (1 thread), {engine('2')} (2 threads)"],
        [f"MTKD-RL training step with live teachers vs the authors' step ({names} student): fp32 teachers "
         "(MTKD-RL's default) / bf16 (opt-in)", f"{by_student(live)}; {by_student(live_bf16)}"],
        [f"time of an MTKD-RL training step from the teacher cache over a student-only step ({names})", cached],
    ]
    return table(["what", "number"], out)


VIEWS = {"ops": view_ops, "teachers": view_teachers, "epoch": view_epoch, "epoch_vs_authors": view_epoch_vs_authors,
         "epoch_targets": view_epoch_targets, "cache": view_cache, "headline": view_headline}


# ---- blocks -------------------------------------------------------------------------------------------------

def parse_spec(spec: str) -> tuple:
    """('view name', [CSV paths]) from a block's opening line."""
    paths, view = [], None
    for token in spec.split():
        if token.startswith("view="):
            view = token[len("view="):]
        else:
            paths.append(token)
    if view not in VIEWS:
        raise ValueError(f"rendered block {spec!r}: view: expected one of {sorted(VIEWS)}, got {view!r}")
    if not paths:
        raise ValueError(f"rendered block {spec!r}: expected at least one CSV path")
    return view, paths


def render_text(text: str, root: str = ROOT, name: str = "") -> tuple:
    """(the text with every block re-rendered, [(line, spec) of each block whose body changed])."""
    stale, out, pos = [], [], 0
    for m in BLOCK.finditer(text):
        view, paths = parse_spec(m.group("spec"))
        sources = []
        for p in paths:
            full = os.path.join(root, p)
            if not os.path.exists(full):
                raise ValueError(f"{name}: rendered block {m.group('spec')!r}: no file {p}")
            sources.append(read_rows(full))
        body = VIEWS[view](sources)
        if body != m.group("body"):
            stale.append((text.count("\n", 0, m.start()) + 1, m.group("spec")))
        out += [text[pos:m.start()], m.group("open"), body, m.group("close")]
        pos = m.end()
    out.append(text[pos:])
    return "".join(out), stale


def blocks(text: str) -> list:
    """[(start, end)] character spans of the rendered blocks (markers included)."""
    return [(m.start(), m.end()) for m in BLOCK.finditer(text)]


def take(run_csv: str, tracked: str, append: bool) -> None:
    """Make ``tracked`` the rows of ``run_csv`` (a benchmark run's CSV), or add them to it with ``append``."""
    def cells(path):
        read_rows(path)  # the one schema, or refuse before writing anything
        with open(path, newline="", encoding="utf-8") as f:
            return list(csv.reader(f))[1:]

    new = cells(run_csv)
    if not new:
        raise ValueError(f"{run_csv}: expected at least one row")
    old = cells(tracked) if append and os.path.exists(tracked) else []
    buf = io.StringIO()
    csv.writer(buf).writerows([list(COLUMNS)] + old + new)
    write_bytes_atomic(tracked, buf.getvalue().encode("utf-8"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="change nothing; exit 1 naming each stale block")
    ap.add_argument("--take", nargs=2, metavar=("RUN_CSV", "TRACKED_CSV"),
                    help="copy a benchmark run's CSV onto a tracked one (benchmarks/results/...) before rendering")
    ap.add_argument("--append", action="store_true", help="with --take: add the run's rows instead of replacing")
    ap.add_argument("--root", default=ROOT, help="the checkout whose documents are rendered (default: this one)")
    args = ap.parse_args(argv)
    if args.append and not args.take:
        ap.error("--append: only with --take")
    try:
        if args.take:
            if args.check:
                ap.error("--take: not with --check")
            take(*args.take, append=args.append)
        failed = 0
        for rel in documents(args.root):
            path = os.path.join(args.root, rel)
            with open(path, encoding="utf-8") as f:
                text = f.read()
            new, stale = render_text(text, args.root, rel)
            for line, spec in stale:
                print(f"{rel}:{line}: rendered block '{spec}' is stale" if args.check else f"{rel}:{line}: {spec}")
            if stale and not args.check:
                write_bytes_atomic(path, new.encode("utf-8"))
            failed += len(stale)
    except (OSError, ValueError, KeyError, csv.Error) as e:
        print(f"render_results: {e}", file=sys.stderr)
        return 1
    return 1 if args.check and failed else 0


if __name__ == "__main__":
    sys.exit(main())
