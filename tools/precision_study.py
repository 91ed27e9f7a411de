#!/usr/bin/env python3
"""Paired non-inferiority study of the teachers' compute precision (issue 22; docs/training.md "Teacher precision").

Two settings (``--setting``):

- ``demo`` (the default): the demo's (``mtkd_fast.demo.DemoSettings``: the bundled Fashion-MNIST subset, its three
  teachers, the resnet8 student, 20 epochs);
- ``study``: the teachers-stronger study of issue 27 (docs/study.md "Setting", ``mtkd-fast study``: teachers
  trained on all 60000 Fashion-MNIST images, the resnet8 student on 500, 12 epochs). The study itself trains the
  teachers, builds the float32 cache and runs every student, so its recipe is used as it is (today's: teachers
  to a plateau; the tracked pairs ran on its earlier setting, docs/training.md says which).

Every (strategy, seed) is trained twice: once from a teacher-output cache whose teachers ran in float32 and once
from one whose teachers ran in bf16. The two runs share the seed, the student's initialisation, the data order and
the augmentation views; only the teachers' precision differs. The paired difference d = top1(bf16) - top1(fp32)
is summarised per (setting, strategy) as mean, standard error (std / sqrt(n)) and the verdict: **harm** when
mean(d) < -2 SE (bf16 is worse beyond noise), otherwise **no harm shown**.

Resumable: rows already in ``runs.csv`` are skipped, so a killed study continues where it stopped (on the study's
setting, a run the study's script finished is read, not run again). Seed-major on the study's setting (every
strategy's pair of seed 0, then of seed 1, ...), so a stopped study has complete seeds.

    OMP_NUM_THREADS=1 python tools/precision_study.py --out results/precision_study            # mtkd_rl, 5 seeds
    OMP_NUM_THREADS=1 python tools/precision_study.py --strategies mtkd_rl aver camkd --seeds 0 1 2 3 4
    OMP_NUM_THREADS=1 python tools/precision_study.py --setting study --strategies mtkd_rl aver ebkd camkd aekd
    python tools/precision_study.py --summarise-only --out results/precision_study               # the table only
    python tools/precision_study.py --summarise-only --out A --merge B      # B's runs join A's runs.csv and table
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

PRECISIONS = ("fp32", "bf16")
STRATEGIES = ("mtkd_rl", "aver", "ebkd", "camkd", "aekd")
SETTINGS = ("demo", "study")
MIN_SEEDS = 5  # issue 22: a decision rests on at least 5 paired seeds per setting
# the study's script runs no student for a label that names none of its methods: it then only trains the
# teachers and builds the float32 cache
# the study's smoke options (--quick): every stage runs, nothing is meaningful
_STUDY_QUICK = ["--epochs", "2", "--per-class", "4", "--test-per-class", "4", "--max-steps", "2"]


def _read_rows(path: str) -> list[dict]:
    import csv

    if not os.path.isfile(path):
        return []
    with open(path, newline="") as f:  # rows written before the setting column are the demo's
        return [{"setting": "demo", **{k: v for k, v in r.items() if v}, "seed": int(r["seed"]),
                 "test_top1": float(r["test_top1"])} for r in csv.DictReader(f)]


def summarise(rows: list[dict]) -> list[dict]:
    """Per (setting, strategy): the paired differences bf16 - fp32 over the seeds that have both runs, and the
    verdict."""
    out = []
    for setting, strategy in dict.fromkeys((r.get("setting", "demo"), r["strategy"]) for r in rows):
        by = {(r["seed"], r["precision"]): r["test_top1"] for r in rows
              if r["strategy"] == strategy and r.get("setting", "demo") == setting}
        seeds = sorted(s for s, p in by if p == "fp32" and (s, "bf16") in by)
        if not seeds:
            continue
        d = [by[(s, "bf16")] - by[(s, "fp32")] for s in seeds]
        mean = statistics.fmean(d)
        se = statistics.stdev(d) / math.sqrt(len(d)) if len(d) > 1 else float("nan")
        fp32 = [by[(s, "fp32")] for s in seeds]
        bf16 = [by[(s, "bf16")] for s in seeds]
        harm = len(d) > 1 and mean < -2 * se
        verdict = "harm: keep fp32" if harm else ("no harm shown: bf16" if len(d) > 1 else "one seed")
        if 1 < len(d) < MIN_SEEDS:
            verdict += f" (provisional: under {MIN_SEEDS} seeds)"
        out.append({"setting": setting, "strategy": strategy, "seeds": len(seeds),
                    "fp32_mean": statistics.fmean(fp32), "bf16_mean": statistics.fmean(bf16), "diff_mean": mean,
                    "diff_se": se, "diffs": " ".join(f"{x:+.2f}" for x in d),
                    "verdict": verdict})
    return out


def format_table(summary: list[dict]) -> str:
    """One markdown table per setting, in the order the settings first appear."""
    blocks = []
    for setting in dict.fromkeys(r.get("setting", "demo") for r in summary):
        lines = [f"Setting `{setting}`:", "",
                 "| strategy | seeds | fp32 top-1 | bf16 top-1 | bf16 - fp32 (mean ± SE) | per seed | verdict |",
                 "|---|---|---|---|---|---|---|"]
        for r in summary:
            if r.get("setting", "demo") == setting:
                se = "n/a" if math.isnan(r["diff_se"]) else f"{r['diff_se']:.2f}"  # one seed has no spread
                lines.append(f"| {r['strategy']} | {r['seeds']} | {r['fp32_mean']:.2f} | {r['bf16_mean']:.2f} | "
                             f"{r['diff_mean']:+.2f} ± {se} | {r['diffs']} | {r['verdict']} |")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def _write_summary(out: str, rows: list[dict]) -> str:
    from mtkd_fast._io import write_bytes_atomic, write_csv_atomic

    summary = summarise(rows)
    table = format_table(summary)
    if summary:
        write_csv_atomic(os.path.join(out, "paired.csv"), summary)
    write_bytes_atomic(os.path.join(out, "summary.md"), (table + "\n").encode())
    return table


def _record(out: str, rows: list[dict], row: dict) -> None:
    from mtkd_fast._io import write_csv_atomic

    rows.append(row)
    write_csv_atomic(os.path.join(out, "runs.csv"), rows)
    print(f"{row['setting']} {row['strategy']} seed {row['seed']} {row['precision']}: test top-1 "
          f"{row['test_top1']:.2f}% ({row['wall_s']:.0f} s)", flush=True)


def _study_script():
    """The study (``mtkd_fast.study``: its ``main``, ``METHODS``)."""
    from mtkd_fast import study

    return study


def _run_study(script, argv: list) -> None:
    """One run of ``mtkd-fast study``; its one-line errors stop this tool too (main returns the exit status)."""
    status = script.main(argv)
    if status:
        raise SystemExit(f"mtkd-fast study {' '.join(argv)}: exit status {status} (its error is above)")


def study_labels(methods) -> dict:
    """strategy -> the study's label of that strategy with its defaults (no TrainConfig changes)."""
    labels: dict = {}
    for label, strategy, changes in methods:
        if not changes:
            labels.setdefault(strategy, label)
    return labels


def study_dirs(out: str) -> dict:
    """precision -> the study folder (its teachers, its ``teacher_cache``, its runs) of that precision."""
    return {p: os.path.join(out, "study", p) for p in PRECISIONS}


def study_row(run_dir: str, strategy: str, seed: int, precision: str) -> dict | None:
    """The runs.csv row of one finished run of the study's script (None while it has not finished)."""
    import csv
    import json

    done = os.path.join(run_dir, "result.json")
    if not os.path.exists(done):
        return None
    with open(done) as f:
        result = json.load(f)
    train_top1 = ""
    metrics = os.path.join(run_dir, "metrics.csv")
    if os.path.exists(metrics):
        with open(metrics, newline="") as f:
            last = (list(csv.DictReader(f)) or [{}])[-1]
        train_top1 = float(last["train_top1"]) if last.get("train_top1") else ""
    return {"setting": "study", "strategy": strategy, "seed": seed, "precision": precision,
            "test_top1": float(result["test_top1"]), "train_top1": train_top1,
            "wall_s": round(float(result["wall_s"]), 1)}


def _same_build(a: dict, b: dict) -> list[str]:
    """The manifest fields in which two caches' builds differ, apart from the teachers' precision and what
    follows from it (the outputs' checksums)."""
    from mtkd_fast.cache.manifest import DIGEST_KEY

    skip = {"teacher_precision", "checksums", DIGEST_KEY}
    return sorted(k for k in set(a) | set(b) if k not in skip and a.get(k) != b.get(k))


def _check_study_caches(dirs: dict) -> None:
    """The bf16 cache the study built is the float32 one's build in bf16: the same dataset, views and teachers,
    every output stored (nothing runs live), only the precision (and so the checksums) differ."""
    import json

    manifests = {}
    for precision in PRECISIONS:
        cache = os.path.join(dirs[precision], "teacher_cache")
        with open(os.path.join(cache, "manifest.json")) as f:
            manifests[precision] = json.load(f)
        _check_complete(manifests[precision], cache)
    differ = _same_build(manifests["fp32"], manifests["bf16"])
    if differ or manifests["bf16"]["teacher_precision"] != "bf16":
        raise SystemExit(f"study bf16 cache in {dirs['bf16']}: expected the float32 cache's build in bf16, but "
                         f"{differ or ['teacher_precision']} differ; remove it and run again")


def _check_complete(manifest: dict, cache: str) -> None:
    """Every teacher's every field is in the cache: the run computes nothing live, in any precision."""
    from mtkd_fast.cache import storage

    left = [(t["arch"], f) for t in manifest["teachers"] for f in storage.FIELDS if f not in t["stored"]]
    if left:
        raise SystemExit(f"study cache {cache}: leaves out {left}; the pairs need every output cached")


def run_study_setting(args, out: str, rows: list[dict]) -> None:
    """The teachers-stronger setting through the study's own script: its teachers and float32 cache in
    ``<out>/study/fp32``, the same teachers (linked) and a bf16 cache in ``<out>/study/bf16``, then every
    strategy of seed 0 in fp32 and in bf16, then of seed 1, ..."""
    script = _study_script()
    labels = study_labels(script.METHODS)
    dirs = study_dirs(out)
    extra = (["--data-root", args.data_root] if args.data_root else []) + (_STUDY_QUICK if args.quick else [])
    first_seed = [str(args.seeds[0])]
    _run_study(script, ["--out", dirs["fp32"], "--methods", "--seeds", *first_seed, *extra])  # teachers, cache
    os.makedirs(dirs["bf16"], exist_ok=True)
    link = os.path.join(dirs["bf16"], "teachers")
    if not os.path.lexists(link):  # the very same teacher files: the script then trains none
        os.symlink(os.path.join("..", "fp32", "teachers"), link)
    _run_study(script, ["--out", dirs["bf16"], "--methods", "--seeds", *first_seed, "--teacher-precision", "bf16",
                        *extra])  # the very same teachers (linked), their bf16 cache
    _check_study_caches(dirs)
    done = {(r["strategy"], r["seed"], r["precision"]) for r in rows if r["setting"] == "study"}
    for seed in args.seeds:
        # one run of the script per (seed, precision), every strategy of it: each run of the script loads the
        # data and evaluates the teachers again, which costs more than a student run on a loaded machine
        for precision in PRECISIONS:
            todo = [s for s in args.strategies if (s, seed, precision) not in done]
            if not todo:
                continue
            _run_study(script, ["--out", dirs[precision], "--methods", *[labels[s] for s in todo], "--seeds",
                                str(seed), "--teacher-precision", precision, *extra])
            for strategy in todo:
                run_dir = os.path.join(dirs[precision], "runs", labels[strategy].replace(" ", "_"), f"seed{seed}")
                row = study_row(run_dir, strategy, seed, precision)
                if row is None:
                    raise SystemExit(f"study run {run_dir}: finished without result.json")
                _record(out, rows, row)
            _write_summary(out, rows)


def run_demo_setting(args, out: str, rows: list[dict]) -> None:
    import torch

    from mtkd_fast import data, models
    from mtkd_fast.cache import build_cache
    from mtkd_fast.demo import DemoSettings, _student_run, _train_or_load_teacher, default_teacher_dir

    changes = dict(seeds=tuple(args.seeds), device="cpu")  # the strategies are looped here (the demo runs fewer)
    settings = (DemoSettings.quick(**changes) if args.quick else DemoSettings(**changes)).validate()
    device = torch.device("cpu")
    teacher_train = data.build_dataset("bundled", split="train", augment=True, seed=0,
                                       limit_per_class=settings.teacher_per_class)
    test_limit = {"limit_per_class": settings.test_per_class} if settings.test_per_class else {}
    test_set = data.build_dataset("bundled", split="test", augment=False, **test_limit)
    test_loader = data.build_loader(test_set, 256, shuffle=False, device="cpu")
    teacher_models, ckpts = [], []
    for index, arch in enumerate(settings.teachers):
        ckpt, how = _train_or_load_teacher(settings, arch, index, teacher_train.fingerprint,
                                           args.teacher_dir or default_teacher_dir(), device, False)
        model = models.create_model(arch, int(test_set.num_classes))
        models.load_checkpoint(model, ckpt)
        teacher_models.append(model.eval())
        ckpts.append(ckpt)
        print(f"teacher {index} {arch}: {how} ({ckpt})", flush=True)
    student_train = data.build_dataset("bundled", split="train", augment=True, seed=settings.data_seed,
                                       limit_per_class=settings.student_per_class)
    caches = {}
    for precision in PRECISIONS:  # the same build but for the teachers' precision; an existing one is re-used
        caches[precision] = os.path.join(out, f"cache_{precision}")
        m = build_cache(caches[precision], student_train, teacher_models, views=settings.views,
                        teacher_names=list(settings.teachers), checkpoints=ckpts, device=device, progress=False,
                        teacher_precision=precision)
        print(f"cache {precision}: {caches[precision]} (teachers ran in {m['teacher_precision']})", flush=True)

    done = {(r["strategy"], r["seed"], r["precision"]) for r in rows if r["setting"] == "demo"}
    for strategy in args.strategies:
        for seed in settings.seeds:
            for precision in PRECISIONS:  # interleaved: a stopped study leaves complete pairs
                if (strategy, seed, precision) in done:
                    continue
                run_dir = os.path.join(out, "runs", strategy, f"seed{seed}", precision)
                t0 = time.perf_counter()
                result = _student_run(settings, strategy, seed, student_train, test_loader, caches[precision],
                                      teacher_models, device, run_dir)
                final = result["history"][-1]
                _record(out, rows, {"setting": "demo", "strategy": strategy, "seed": seed, "precision": precision,
                                    "test_top1": final["val_top1"], "train_top1": final["train_top1"],
                                    "wall_s": round(time.perf_counter() - t0, 1)})
            _write_summary(out, rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--setting", choices=SETTINGS, default="demo",
                   help="demo: the demo's setting; study: the teachers-stronger study's (docs/study.md)")
    p.add_argument("--strategies", nargs="+", choices=STRATEGIES, default=["mtkd_rl"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--out", default="results/precision_study")
    p.add_argument("--teacher-dir", default=None, help="demo: where the demo's teachers are kept (default: the demo's)")
    p.add_argument("--data-root", default=None, help="study: the Fashion-MNIST IDX folder (default: the study's)")
    p.add_argument("--quick", action="store_true", help="a few steps per stage (a smoke test; means nothing)")
    p.add_argument("--summarise-only", action="store_true", help="print the table of the runs so far")
    p.add_argument("--merge", nargs="+", default=[], metavar="DIR",
                   help="with --summarise-only: also the runs of these study folders (studies run side by side), "
                        "written into --out's runs.csv; a (setting, strategy, seed, precision) already read is not "
                        "read again")
    args = p.parse_args(argv)
    if any(s < 0 for s in args.seeds):
        p.error("--seeds: expected non-negative integers")
    out = args.out
    if args.summarise_only:
        rows, seen = [], set()
        for folder in [out] + args.merge:
            for r in _read_rows(os.path.join(folder, "runs.csv")):
                key = (r["setting"], r["strategy"], r["seed"], r["precision"])
                if key not in seen:
                    seen.add(key)
                    rows.append(r)
        if args.merge:  # the table and the runs it summarises stay together
            from mtkd_fast._io import write_csv_atomic

            os.makedirs(out, exist_ok=True)
            write_csv_atomic(os.path.join(out, "runs.csv"), rows)
        print(_write_summary(out, rows))
        return 0

    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    os.makedirs(out, exist_ok=True)
    rows = _read_rows(os.path.join(out, "runs.csv"))
    (run_study_setting if args.setting == "study" else run_demo_setting)(args, out, rows)
    print(_write_summary(out, rows), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
