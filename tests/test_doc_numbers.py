"""Every measured number in the docs comes from a tracked file.

- The rendered blocks of README.md, benchmarks/RESULTS.md and docs/*.md (``<!-- rendered: CSV view=... -->``)
  are what tools/render_results.py makes of their CSVs today.
- The tracked benchmark CSVs (benchmarks/results/*.csv) are in the one schema of mtkd_fast/bench/record.py and
  say where each row comes from (``provenance``).
- Outside the blocks, a ratio (``1.37x``, ``1.2-1.5x``) or a percentage in prose or a table must be traceable: each
  number equals, at the decimals it is written with, a tracked number of its kind (a whole number: exactly). The
  ratios: the schema's ratio columns and their inverses, ``extra``'s ratios, a rendered block's ratios (which the
  first test ties to its CSV); the percentages: ``extra``'s errors and accuracies, a block's percentages; and any
  number of a tracked CSV in another format (benchmarks/**/*.csv, docs/**/*.csv). The rule knows the values, not
  which quantity a sentence means: it catches a figure that no file holds (the docs quote about 300 ratios, so a
  random two-decimal ratio between 1 and 3 still finds a match one time in three); the blocks are exact. Fenced
  code blocks and inline code (commands, verbatim program output) are not prose and are skipped.
  What is not a measurement (a target, a test threshold, the paper's own figure) is in ALLOWED with its reason;
  measured figures still waiting for a tracked CSV are in PENDING, which may only shrink: an entry whose text is
  gone from its document fails too.
"""

from __future__ import annotations

import csv
import json
import os
import random
import re
import shutil
import subprocess
import sys

import pytest
import torch
from repo_tools import load_tool

from mtkd_fast.bench.record import COLUMNS, Record

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


rr = load_tool("render_results")

RATIO = re.compile(r"(?<![\w.])(\d+(?:\.\d+)?)(?:\s*(?:-|to)\s*(\d+(?:\.\d+)?))?x\b")
PERCENT = re.compile(r"(?<![\w.])(\d+(?:\.\d+)?)(?:\s*(?:-|to)\s*(\d+(?:\.\d+)?))?\s?%")
NUMBER = re.compile(r"(?<![\w.])\d+(?:\.\d+)?")

# (document, text as matched): why it is not a measurement
ALLOWED = {
    ("benchmarks/RESULTS.md", "8x"): "the ops target (>= 8x the authors' arithmetic)",
    ("benchmarks/RESULTS.md", "1.5x"): "the ops target (>= 1.5x torch.compile of the reference)",
    ("benchmarks/RESULTS.md", "2x"): "the live-teacher targets (>= 2x the authors' way, >= 2x float32 eager; "
                                     "'within 2x' of the byte floor on a GPU)",
    ("docs/training.md", "2x"): "the live-teacher target (>= 2x the authors' step)",
    ("docs/training.md", "50%"): "arithmetic: the bf16 buffer's MiB over the fp32 one's, both in the same table row",
    ("docs/training.md", "2%"): "a test threshold (tests/test_live_teachers.py)",
    ("docs/training.md", "3%"): "a test threshold (tests/test_live_teachers.py)",
    ("docs/cache.md", "10%"): "the setting of the measurement (a student map within 10% of the teacher's)",
    ("docs/method.md", "15%"): "the paper's figure (RTX 4090), not a measurement of this package",
    ("docs/method.md", "14%"): "the paper's figure (RTX 4090), not a measurement of this package",
    ("docs/method.md", "13%"): "the paper's figure (RTX 4090), not a measurement of this package",
    ("docs/study.md", "3x"): "arithmetic: the warm-up's weights of 1 against AVER's 1/M with M = 3 teachers",
}

# (document, text as matched): measured figures without a tracked CSV yet (the runs' files were not kept, or the
# figure comes from a test or a study whose results are not tracked); each is debt, to be replaced by a rendered
# block or a tracked CSV, and removed from here
PENDING = {
    ("benchmarks/RESULTS.md", "2-3x"): "the loaded 2026-12-06 runs' round-to-round spread (rounds not kept)",
    ("docs/demo.md", "87.7%"): "the long demo run's output (quoted verbatim above it; its CSVs not kept)",
    ("docs/demo.md", "72-78%"): "the long demo run's teachers (quoted verbatim above it; its CSVs not kept)",
    ("docs/ops.md", "3x"): "swapcontext against the emulator's fibers (measured while building it)",
    ("docs/study.md", "83.25%"): "the study's teachers' top-1 (the study's CSVs are not tracked)",
    ("docs/study.md", "86.60%"): "the study's teachers' top-1",
    ("docs/study.md", "84.75%"): "the study's teachers' top-1",
    ("docs/study.md", "65%"): "the study's student alone",
    ("docs/study.md", "83-87%"): "the study's teachers' top-1",
    ("docs/training.md", "2.1-2.4%"): "the CA-MKD gradient check (a test's numbers)",
    ("docs/training.md", "5.7%"): "the issue's check on the authors' own models",
    # the precision section's error table (tests/test_live_teachers.py's measurements)
    **{("docs/training.md", t): "the bf16 error table (tests/test_live_teachers.py)" for t in (
        "1.01%", "0.89%", "2.45%", "99.2%", "0.45%", "0.43%", "1.13%", "100%", "1.08%", "0.75%", "1.81%", "98.4%",
        "3.92%", "3.38%", "9.03%", "96.9%")},
}


def _blank(m) -> str:
    return re.sub(r"[^\n]", " ", m.group(0))


def prose(text: str) -> str:
    """The text outside rendered blocks, fenced code and inline code (those blanked, so lines keep their numbers)."""
    text = rr.BLOCK.sub(_blank, text)
    text = re.sub(r"```.*?```", _blank, text, flags=re.S)
    return re.sub(r"`[^`\n]*`", _blank, text)


def _numbers_in(value, out: set) -> None:
    if isinstance(value, bool) or value is None:
        return
    if isinstance(value, (int, float)):
        out.add(float(value))
    elif isinstance(value, dict):
        for v in value.values():
            _numbers_in(v, out)
    elif isinstance(value, (list, tuple)):
        for v in value:
            _numbers_in(v, out)
    elif isinstance(value, str):
        out.update(float(n) for n in NUMBER.findall(value))


def tracked_csvs(root: str = ROOT) -> list:
    out = []
    for top in ("benchmarks", "docs"):
        for dirpath, _, files in os.walk(os.path.join(root, top)):
            out += [os.path.join(dirpath, f) for f in files if f.endswith(".csv")]
    return sorted(out)


# the schema's ratio columns (a speed-up is quoted either way round, so their inverses count too)
RATIO_COLUMNS = ("median_x_baseline", "min_x_baseline", "median_x_floor", "time_x_student_only", "time_x_aver",
                 "mem_x_student_only", "mem_x_aver")
RATIO_HEADER = re.compile(r"(^|\s)x\s|speed-up|/ this|\bvs\b|over its")  # a rendered table's ratio columns
RATIO_KEY = re.compile(r"ratio|_x_")  # a ratio in ``extra``
PERCENT_KEY = re.compile(r"pct|percent|top1|top5|acc")  # a percentage (an error, an accuracy) in ``extra``


def _extra_values(extra: str, key_pattern: re.Pattern, out: set) -> None:
    if extra:
        for key, value in json.loads(extra).items():
            if key_pattern.search(key):
                _numbers_in(value, out)


def _block_values(body: str, ratios: set, percents: set) -> None:
    """A rendered block's ratios (written with x, or in a ratio column of its tables) and percentages."""
    for m in RATIO.finditer(body):
        _numbers_in([n for n in m.groups() if n], ratios)
    for m in PERCENT.finditer(body):
        _numbers_in([n for n in m.groups() if n], percents)
    head = None
    for line in body.splitlines():
        if not line.startswith("|"):
            head = None
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if head is None:
            head = cells
        elif not set("".join(cells)) <= set("-: "):
            for h, cell in zip(head, cells):
                if RATIO_HEADER.search(h):
                    _numbers_in(cell, ratios)


def tracked_values(root: str = ROOT) -> dict:
    """{"x": the tracked ratios, "%": the tracked percentages}: the schema's ratio columns (and their inverses)
    and ``extra``'s ratios and percentages in benchmarks/results/; every number of a CSV in another format (a
    study's accuracies); the ratios and percentages of the rendered blocks."""
    ratios, percents = set(), set()
    for path in tracked_csvs(root):
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            schema = reader.fieldnames == list(COLUMNS)
            for row in reader:
                if not schema:
                    for cell in row.values():
                        _numbers_in(cell, percents)
                        _numbers_in(cell, ratios)
                    continue
                for col in RATIO_COLUMNS:
                    if row[col] not in ("", "nan") and float(row[col]) > 0:
                        ratios.update((float(row[col]), 1 / float(row[col])))
                _extra_values(row["extra"], RATIO_KEY, ratios)
                _extra_values(row["extra"], PERCENT_KEY, percents)
    for rel in rr.documents(root):
        with open(os.path.join(root, rel), encoding="utf-8") as f:
            for m in rr.BLOCK.finditer(f.read()):
                _block_values(m.group("body"), ratios, percents)
    return {"x": ratios, "%": percents}


def traceable(number: str, values: set) -> bool:
    """``number`` as written equals a tracked value at its own decimals (a whole number: exactly)."""
    decimals = len(number.partition(".")[2])
    x = float(number)
    if decimals == 0:
        return any(abs(v - x) < 1e-9 for v in values)
    half = 0.5 * 10 ** -decimals * (1 + 1e-9)  # a value on the rounding boundary may be written either way
    return any(abs(v - x) <= half for v in values)


def untraced(root: str = ROOT) -> list:
    """['doc:line: text'] for each ratio or percentage outside the blocks that no tracked file gives."""
    values, out = tracked_values(root), []
    for rel in rr.documents(root):
        with open(os.path.join(root, rel), encoding="utf-8") as f:
            text = prose(f.read())
        key_rel = rel.replace(os.sep, "/")
        for pattern, kind in ((RATIO, "x"), (PERCENT, "%")):
            for m in pattern.finditer(text):
                literal = m.group(0).replace(" ", "")
                if (key_rel, literal) in ALLOWED or (key_rel, literal) in PENDING:
                    continue
                if not all(traceable(n, values[kind]) for n in m.groups() if n):
                    out.append(f"{rel}:{text.count(chr(10), 0, m.start()) + 1}: {m.group(0)}")
    return out


# ---- the repository's documents ---------------------------------------------------------------------------------

def test_rendered_blocks_match_their_csvs():
    stale, seen = [], 0
    for rel in rr.documents():
        with open(os.path.join(ROOT, rel), encoding="utf-8") as f:
            text = f.read()
        seen += len(rr.blocks(text))
        _, bad = rr.render_text(text, ROOT, rel)
        stale += [f"{rel}:{line}: {spec}" for line, spec in bad]
    assert seen >= 10, f"expected the rendered blocks of RESULTS.md, README.md and docs/cache.md, found {seen}"
    assert not stale, "stale rendered blocks (run python tools/render_results.py):\n" + "\n".join(stale)


def test_readme_headline_and_results_are_rendered():
    for rel, view in (("README.md", "view=headline"), ("benchmarks/RESULTS.md", "view=ops"),
                      ("benchmarks/RESULTS.md", "view=teachers"), ("benchmarks/RESULTS.md", "view=epoch")):
        with open(os.path.join(ROOT, rel), encoding="utf-8") as f:
            assert view in f.read(), f"{rel}: no rendered block with {view}"


def test_tracked_results_are_in_the_one_schema_with_provenance():
    paths = [p for p in tracked_csvs() if os.sep + "results" + os.sep in p]
    assert len(paths) >= 8, paths
    for path in paths:
        rows = rr.read_rows(path)  # refuses another header
        assert rows, path
        for row in rows:
            assert row["provenance"] == "measured" or row["provenance"].startswith("transcribed from "), \
                f"{path}: provenance {row['provenance']!r}"
            assert row["date"] and row["commit"], f"{path}: a row without the run's date and commit"


def test_numbers_outside_blocks_are_traceable():
    bad = untraced()
    assert not bad, ("ratios or percentages that no tracked CSV or rendered block gives (render them, add the run's "
                     "CSV, or, for what is not a measurement, ALLOWED with a reason):\n" + "\n".join(bad))


def test_allowed_and_pending_entries_still_occur():
    texts = {}
    for rel in rr.documents():
        with open(os.path.join(ROOT, rel), encoding="utf-8") as f:
            texts[rel.replace(os.sep, "/")] = prose(f.read())
    gone = []
    for rel, literal in list(ALLOWED) + list(PENDING):
        found = any(m.group(0).replace(" ", "") == literal
                    for pattern in (RATIO, PERCENT) for m in pattern.finditer(texts.get(rel, "")))
        if not found:
            gone.append(f"{rel}: {literal}")
    assert not gone, "entries whose text is gone from their document (remove them):\n" + "\n".join(gone)


def test_docstrings_cite_results_instead_of_figures():
    """Code comments and docstrings point at RESULTS.md / the docs for speed-ups instead of carrying them (a
    measured ratio has decimals, or says faster/slower/more/less; "1x" as ShuffleNetV2's width is not one)."""
    bad = []
    for dirpath, _, files in os.walk(os.path.join(ROOT, "mtkd_fast")):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(dirpath, name)
                with open(path, encoding="utf-8") as f:
                    for i, line in enumerate(f, 1):
                        if re.search(r"(?<![\w.])(?:\d+\.\d+x\b|\d+x (?:faster|slower|more|less|as long)\b)", line):
                            bad.append(f"{os.path.relpath(path, ROOT)}:{i}: {line.strip()}")
    assert not bad, "\n".join(bad)


# ---- the rule and the renderer on made-up files -----------------------------------------------------------------

def test_traceable_rounds_to_the_written_decimals():
    values = {1.3689, 7.0, 0.045}
    assert traceable("1.37", values) and traceable("1.4", values) and traceable("7", values)
    assert not traceable("1.36", values) and not traceable("1.23", values) and not traceable("1", values)
    assert traceable("0.05", values) and traceable("0.04", values) and not traceable("0.03", values)


def test_a_drifted_number_is_found(tmp_path):
    os.makedirs(tmp_path / "benchmarks" / "results")
    rec = Record(meta={"harness": "test", "date": "2026-01-01T00:00:00Z", "commit": "abc", "provenance": "measured"})
    rec.add("cache", "cifar", "student_only", [0.4, 0.5, 0.45], baseline="student_only", label="student only")
    rec.add("cache", "cifar", "mtkd_rl_cached", [0.6, 0.55, 0.5], baseline="student_only", label="cached")
    rec.write(str(tmp_path / "benchmarks" / "results" / "cache.csv"))
    block = "<!-- rendered: benchmarks/results/cache.csv view=cache -->\n<!-- end rendered -->\n"
    (tmp_path / "README.md").write_text("# x\n\n" + block + "\nThe cached step costs 1.22x student-only; "
                                        "also 1.37x and 12% by hand.\n")
    assert rr.main(["--root", str(tmp_path), "--check"]) == 1  # the empty block is stale
    assert rr.main(["--root", str(tmp_path)]) == 0
    assert rr.main(["--root", str(tmp_path), "--check"]) == 0
    # 0.55 / 0.45 = 1.22: in the block; 1.37x and 12% come from nowhere
    assert [b.split(": ", 1)[1] for b in untraced(str(tmp_path))] == ["1.37x", "12%"]
    text = (tmp_path / "README.md").read_text()
    assert "| 1.22 / 1.25 |" in text  # 0.55 / 0.45 and 0.5 / 0.4
    (tmp_path / "README.md").write_text(text.replace("| 1.22 / 1.25 |", "| 1.21 / 1.25 |"))
    assert rr.main(["--root", str(tmp_path), "--check"]) == 1


def test_check_names_the_stale_block_from_the_command_line(tmp_path):
    os.makedirs(tmp_path / "docs")
    shutil.copytree(os.path.join(ROOT, "benchmarks", "results"), tmp_path / "benchmarks" / "results")
    tracked = tmp_path / "benchmarks" / "results" / "teachers.csv"
    data = tracked.read_text()
    assert ",3,2.823,," in data
    tracked.write_text(data.replace(",3,2.823,,", ",3,2.9,,", 1))
    with open(os.path.join(ROOT, "benchmarks", "RESULTS.md"), encoding="utf-8") as f:
        (tmp_path / "docs" / "t.md").write_text(f.read())
    tool = os.path.join(ROOT, "tools", "render_results.py")
    out = subprocess.run([sys.executable, tool, "--root", str(tmp_path), "--check"], capture_output=True, text=True)
    assert out.returncode == 1
    assert "docs/t.md:" in out.stdout and "teachers.csv view=teachers' is stale" in out.stdout, out.stdout
    assert "Traceback" not in out.stderr


def test_take_reads_what_the_harness_writes_and_the_views_agree_with_float64(tmp_path, capsys):
    """A run's CSV as Record writes it goes in with --take; the speed-ups rendered equal baseline / variant in
    float64 at the table's decimals."""
    rng = random.Random(7)
    rec = Record("cpu", harness="test")
    variants = [f"v{i}" for i in range(5)]
    medians = {}
    for threads in (1, 3, 2):
        for v in variants:
            times = [rng.uniform(0.05, 3.0) for _ in range(7)]
            medians[(threads, v)] = sorted(times)[3], min(times)
            rec.add("teachers", "pool", v, times, baseline="v0", threads=threads, label=f"label {v}")
    run = tmp_path / "run.csv"
    rec.write(str(run))
    os.makedirs(tmp_path / "benchmarks" / "results")
    tracked = tmp_path / "benchmarks" / "results" / "teachers.csv"
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "x.md").write_text("<!-- rendered: benchmarks/results/teachers.csv view=teachers -->\n"
                                           "<!-- end rendered -->\n")
    assert rr.main(["--root", str(tmp_path), "--take", str(run), str(tracked)]) == 0
    body = (tmp_path / "docs" / "x.md").read_text()
    for v in variants:
        line = next(ln for ln in body.splitlines() if ln.startswith(f"| label {v} |"))
        cells = [c.strip() for c in line.strip("|").split("|")]
        for k, threads in enumerate((1, 3, 2)):
            med, low = medians[(threads, v)]
            b_med, b_low = medians[(threads, "v0")]
            assert cells[1 + 2 * k] == f"{med * 1e3:.0f} / {low * 1e3:.0f}"
            assert cells[2 + 2 * k] == f"{rr.ratio(b_med / med)} / {rr.ratio(b_low / low)}"
    # a second run appended: this view shows one run and says so in one line
    capsys.readouterr()
    assert rr.main(["--root", str(tmp_path), "--take", str(run), str(tracked), "--append"]) == 1
    assert len(rr.read_rows(str(tracked))) == 2 * 3 * len(variants)
    err = capsys.readouterr().err
    assert "this view shows one run" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="expected the columns"):
        rr.read_rows(str(bad))
    assert rr.main(["--root", str(tmp_path), "--take", str(bad), str(tracked)]) == 1


def test_appended_runs_render_as_spans_and_per_run_ratios(tmp_path):
    """Three ops runs (as the harness writes them) appended to one tracked CSV: the block shows each variant's
    lowest-highest median over the runs and each run's speed-up, as computed in float64 from the times."""
    rng = random.Random(11)
    os.makedirs(tmp_path / "benchmarks" / "results")
    tracked = tmp_path / "benchmarks" / "results" / "ops.csv"
    (tmp_path / "README.md").write_text("<!-- rendered: benchmarks/results/ops.csv view=ops -->\n"
                                        "<!-- end rendered -->\n")
    med = {}
    for run in range(3):
        rec = Record("cpu", harness="test")
        for v in ("fused", "authors", "compiled_reference", "reference"):
            times = [rng.uniform(0.001, 0.09) for _ in range(5)]
            med[(run, v)] = sorted(times)[2]
            rec.add("ops", "cifar", v, times, baseline="fused", threads=1, floor_s=0.0007)
        rec.write(str(tmp_path / f"run{run}.csv"))
        assert rr.main(["--root", str(tmp_path), "--take", str(tmp_path / f"run{run}.csv"), str(tracked)]
                       + ["--append"] * (run > 0)) == 0
    line = next(ln for ln in (tmp_path / "README.md").read_text().splitlines() if ln.startswith("| CIFAR |"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    for col, v in ((3, "authors"), (4, "compiled_reference"), (5, "reference")):
        values = [med[(r, v)] * 1e3 for r in range(3)]
        assert cells[col] == f"{rr.fmt_span((min(values), max(values)))} ms"
    assert cells[6] == ", ".join(rr.ratio(med[(r, "authors")] / med[(r, "fused")]) for r in range(3))
    floors = [med[(r, "fused")] / 0.0007 for r in range(3)]
    assert cells[8] == rr.fmt_ratio_span(floors)


def test_a_bench_run_updates_the_docs_with_one_command(tmp_path, capsys):
    """`mtkd-fast bench ops --out DIR` writes the CSV that --take puts under benchmarks/results/ and renders."""
    from mtkd_fast import ops
    from mtkd_fast.cli import main

    if not ops.available(torch.device("cpu")):
        pytest.skip("no compiled kernels (make build)")
    assert main(["bench", "ops", "--rounds", "3", "--shapes", "cifar", "--variants", "fused,reference",
                 "--threads", "1", "--out", str(tmp_path / "run")]) == 0
    capsys.readouterr()
    os.makedirs(tmp_path / "benchmarks" / "results")
    tracked = tmp_path / "benchmarks" / "results" / "ops.csv"
    (tmp_path / "README.md").write_text("<!-- rendered: benchmarks/results/ops.csv view=ops -->\n"
                                        "<!-- end rendered -->\n")
    assert rr.main(["--root", str(tmp_path), "--take", str(tmp_path / "run" / "ops_bench.csv"), str(tracked)]) == 0
    rows = {r["variant"]: r for r in rr.read_rows(str(tracked))}
    line = next(ln for ln in (tmp_path / "README.md").read_text().splitlines() if ln.startswith("| CIFAR | 1 |"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    fused, ref = float(rows["fused"]["median_s"]) * 1e3, float(rows["reference"]["median_s"]) * 1e3
    assert cells[2].startswith(f"{rr.sig(fused)} / ") and cells[5] == f"{rr.sig(ref)} ms"
    assert cells[3] == cells[4] == cells[6] == cells[7] == "-"  # variants this run left out
    assert rr.main(["--root", str(tmp_path), "--check"]) == 0


def test_an_epoch_run_as_the_harness_writes_it_renders_against_float64(tmp_path):
    """An epoch benchmark's rows through the harness's own CSV writer (report.write_csv), then the epoch, the
    vs-authors and the targets views: each time and ratio is the float64 one at the table's decimals."""
    from mtkd_fast.bench.epoch import add_ratios
    from mtkd_fast.bench.record import run_info, summarize
    from mtkd_fast.bench.report import write_csv

    rng = random.Random(3)
    configs = ("student_only", "aver", "mtkd_rl_authors", "mtkd_rl_live", "mtkd_rl_cached")
    rows = []
    for student in ("ShuffleV2", "resnet56", "resnet8"):
        for c in configs:
            times = [rng.uniform(0.3, 9.0) for _ in range(5)]
            rows.append({"setting": "cifar", "student": student, "config": c, "label": f"L {c}",
                         "teacher_precision": "fp32", "steps": 3, "batch_size": 7, "images": 21, "repetitions": 5,
                         **summarize(times), "images_per_s": 21 / summarize(times)["median_s"],
                         "peak_rss_mib": float("nan"), "peak_device_mib": float("nan"),
                         "times_s": " ".join(repr(t) for t in times)})
    add_ratios(rows, "cpu")
    meta = {**run_info("cpu", harness="test"), "threads": 1, "cache_build_s": 1.5, "cache_build_fp32_s": 4.25,
            "cache_samples": 21}
    os.makedirs(tmp_path / "benchmarks" / "results")
    write_csv({"rows": rows, "meta": meta}, str(tmp_path / "benchmarks" / "results" / "e.csv"))
    tracked = rr.read_rows(str(tmp_path / "benchmarks" / "results" / "e.csv"))

    epoch = rr.view_epoch([tracked])
    med = {(r["student"], r["config"]): r["median_s"] for r in rows}
    for (student, c), m in med.items():
        line = next(ln for ln in epoch.splitlines() if ln.startswith(f"| {student} | L {c} |"))
        cells = [x.strip() for x in line.strip("|").split("|")]
        assert cells[3] == f"{m:.2f}" and cells[4] == f"{21 / m:.1f}"
        assert cells[5] == f"{m / med[(student, 'student_only')]:.2f}"
        assert cells[6] == f"{m / med[(student, 'aver')]:.2f}"
    assert "s / 3 steps" in epoch and "peak RSS" not in epoch  # memory not measured: no column
    assert "1.50 s with the engine, 4.25 s with float32 eager teachers** (2.83x)" in epoch

    targets = rr.view_epoch_targets([tracked])
    head = [x.strip() for x in targets.splitlines()[0].strip("|").split("|")]
    assert head == ["target", "ShuffleV2", "resnet56", "resnet8"]
    for name, (a, b, bound, ge) in {"live-teacher": ("mtkd_rl_authors", "mtkd_rl_live", 2, True),
                                    "within 1.3x": ("mtkd_rl_cached", "student_only", 1.3, False),
                                    "cached MTKD-RL >= 5x": ("mtkd_rl_authors", "mtkd_rl_cached", 5, True)}.items():
        line = next(ln for ln in targets.splitlines() if name in ln)
        cells = [x.strip() for x in line.strip("|").split("|")][1:]
        for student, cell in zip(head[1:], cells):
            value = med[(student, a)] / med[(student, b)]
            met = value >= bound if ge else value <= bound
            assert f"**{'met' if met else 'NOT met'}** ({rr.ratio(value)})" in cell, (name, student, cell)


def test_schema_has_provenance_and_harness_rows_say_measured(tmp_path):
    assert "provenance" in COLUMNS
    rec = Record("cpu", harness="test")
    rec.add("ops", "cifar", "fused", [0.1, 0.2, 0.3])
    rows = rr.read_rows(rec.write(str(tmp_path / "r.csv")))
    assert rows[0]["provenance"] == "measured" and rows[0]["load_end"]
