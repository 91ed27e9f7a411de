#!/usr/bin/env python3
"""Paired non-inferiority study of the teachers' compute precision (issue 22; docs/training.md "Teacher precision").

On the demo's setting (``mtkd_fast.demo.DemoSettings``: the bundled Fashion-MNIST subset, its three teachers, the
resnet8 student, 20 epochs), every (strategy, seed) is trained twice: once from a teacher-output cache whose
teachers ran in float32 and once from one whose teachers ran in bf16. The two runs share the seed, the student's
initialisation, the data order and the augmentation views; only the teachers' precision differs. The paired
difference d = top1(bf16) - top1(fp32) is summarised per strategy as mean, standard error (std / sqrt(n)) and the
verdict: **harm** when mean(d) < -2 SE (bf16 is worse beyond noise), otherwise **no harm shown**.

Resumable: rows already in ``runs.csv`` are skipped, so a killed study continues where it stopped.

    OMP_NUM_THREADS=1 python tools/precision_study.py --out results/precision_study            # mtkd_rl, 5 seeds
    OMP_NUM_THREADS=1 python tools/precision_study.py --strategies mtkd_rl aver camkd --seeds 0 1 2 3 4
    python tools/precision_study.py --summarise-only --out results/precision_study               # the table only
    python tools/precision_study.py --summarise-only --out A --merge B      # two studies run side by side
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
STRATEGIES = ("mtkd_rl", "aver", "camkd")


def _read_rows(path: str) -> list[dict]:
    import csv

    if not os.path.isfile(path):
        return []
    with open(path, newline="") as f:
        return [{**r, "seed": int(r["seed"]), "test_top1": float(r["test_top1"])} for r in csv.DictReader(f)]


def summarise(rows: list[dict]) -> list[dict]:
    """Per strategy: the paired differences bf16 - fp32 over the seeds that have both runs, and the verdict."""
    out = []
    for strategy in dict.fromkeys(r["strategy"] for r in rows):
        by = {(r["seed"], r["precision"]): r["test_top1"] for r in rows if r["strategy"] == strategy}
        seeds = sorted(s for s, p in by if p == "fp32" and (s, "bf16") in by)
        if not seeds:
            continue
        d = [by[(s, "bf16")] - by[(s, "fp32")] for s in seeds]
        mean = statistics.fmean(d)
        se = statistics.stdev(d) / math.sqrt(len(d)) if len(d) > 1 else float("nan")
        fp32 = [by[(s, "fp32")] for s in seeds]
        bf16 = [by[(s, "bf16")] for s in seeds]
        harm = len(d) > 1 and mean < -2 * se
        out.append({"strategy": strategy, "seeds": len(seeds), "fp32_mean": statistics.fmean(fp32),
                    "bf16_mean": statistics.fmean(bf16), "diff_mean": mean, "diff_se": se,
                    "diffs": " ".join(f"{x:+.2f}" for x in d),
                    "verdict": "harm: keep fp32" if harm else ("no harm shown: bf16" if len(d) > 1 else "one seed")})
    return out


def format_table(summary: list[dict]) -> str:
    lines = ["| strategy | seeds | fp32 top-1 | bf16 top-1 | bf16 - fp32 (mean ± SE) | per seed | verdict |",
             "|---|---|---|---|---|---|---|"]
    for r in summary:
        lines.append(f"| {r['strategy']} | {r['seeds']} | {r['fp32_mean']:.2f} | {r['bf16_mean']:.2f} | "
                     f"{r['diff_mean']:+.2f} ± {r['diff_se']:.2f} | {r['diffs']} | {r['verdict']} |")
    return "\n".join(lines)


def _write_summary(out: str, rows: list[dict]) -> str:
    from mtkd_fast._io import write_bytes_atomic, write_csv_atomic

    summary = summarise(rows)
    table = format_table(summary)
    if summary:
        write_csv_atomic(os.path.join(out, "paired.csv"), summary)
    write_bytes_atomic(os.path.join(out, "summary.md"), (table + "\n").encode())
    return table


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--strategies", nargs="+", choices=STRATEGIES, default=["mtkd_rl"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--out", default="results/precision_study")
    p.add_argument("--teacher-dir", default=None, help="where the demo's teachers are kept (default: the demo's)")
    p.add_argument("--quick", action="store_true", help="the demo's quick settings (a smoke test; means nothing)")
    p.add_argument("--summarise-only", action="store_true", help="print the table of the runs so far")
    p.add_argument("--merge", nargs="+", default=[], metavar="DIR",
                   help="with --summarise-only: also the runs of these study folders (studies run side by side); "
                        "a (strategy, seed, precision) already read is not read again")
    args = p.parse_args(argv)
    if any(s < 0 for s in args.seeds):
        p.error("--seeds: expected non-negative integers")
    out = args.out
    if args.summarise_only:
        rows, seen = [], set()
        for folder in [out] + args.merge:
            for r in _read_rows(os.path.join(folder, "runs.csv")):
                if (r["strategy"], r["seed"], r["precision"]) not in seen:
                    seen.add((r["strategy"], r["seed"], r["precision"]))
                    rows.append(r)
        print(_write_summary(out, rows))
        return 0

    import torch

    from mtkd_fast import data, models
    from mtkd_fast._io import write_csv_atomic
    from mtkd_fast.cache import build_cache
    from mtkd_fast.demo import DemoSettings, _student_run, _train_or_load_teacher, default_teacher_dir

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    changes = dict(seeds=tuple(args.seeds), methods=tuple(args.strategies), device="cpu")
    settings = (DemoSettings.quick(**changes) if args.quick else DemoSettings(**changes)).validate()
    device = torch.device("cpu")
    os.makedirs(out, exist_ok=True)
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

    runs_csv = os.path.join(out, "runs.csv")
    rows = _read_rows(runs_csv)
    done = {(r["strategy"], r["seed"], r["precision"]) for r in rows}
    for strategy in settings.methods:
        for seed in settings.seeds:
            for precision in PRECISIONS:  # interleaved: a stopped study leaves complete pairs
                if (strategy, seed, precision) in done:
                    continue
                run_dir = os.path.join(out, "runs", strategy, f"seed{seed}", precision)
                t0 = time.perf_counter()
                result = _student_run(settings, strategy, seed, student_train, test_loader, caches[precision],
                                      teacher_models, device, run_dir)
                final = result["history"][-1]
                rows.append({"strategy": strategy, "seed": seed, "precision": precision,
                             "test_top1": final["val_top1"], "train_top1": final["train_top1"],
                             "wall_s": round(time.perf_counter() - t0, 1)})
                write_csv_atomic(runs_csv, rows)
                print(f"{strategy} seed {seed} {precision}: test top-1 {final['val_top1']:.2f}% "
                      f"({time.perf_counter() - t0:.0f} s)", flush=True)
            _write_summary(out, rows)
    print(_write_summary(out, rows), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
