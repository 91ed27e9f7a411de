"""The teachers-stronger study of issue 27 (docs/study.md): teachers trained on all 60000 Fashion-MNIST training
images, a student that sees only a small class-balanced subset, every weighting method with the same untuned
hyper-parameters, several seeds. Runs on one thread, resumable (finished teachers and runs are kept), seed-major
(every method of seed 0, then of seed 1, ...) so that a stopped study still has complete seeds.

    OMP_NUM_THREADS=1 python tools/study_fashion_mnist.py --out results/study [--seeds 0 1 2 3 4]

Needs the full Fashion-MNIST IDX files (Debian's dataset-fashion-mnist, or --data-root). Writes
``runs.csv`` (one row per finished run: method, seed, test top-1 on the test subset, epoch time, the MTKD-RL
runs' last-epoch agent diagnostics) and ``summary.csv`` (mean and std per method over the finished seeds).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import statistics
import sys
import time

import torch

# (label, strategy, TrainConfig changes): the methods of the study, in table order
METHODS = [
    ("none", "none", {}),
    ("AVER", "aver", {}),
    ("EB-KD", "ebkd", {}),
    ("CA-MKD", "camkd", {}),
    ("AEKD", "aekd", {}),
    ("MTKD-RL", "mtkd_rl", {}),
    ("MTKD-RL dynamic", "mtkd_rl", {"dynamic": True}),
    # the agent frozen at its initialisation (its weights are then the blend of its initial heads and the priors):
    # an lr of 1e-30 leaves every float32 weight unchanged by an SGD step
    ("MTKD-RL frozen agent", "mtkd_rl", {"agent_lr": 1e-30}),
    # issue 27's check: does the warm-up's all-ones weights (M times AVER's strength) decide the outcome?
    ("MTKD-RL uniform warm-up", "mtkd_rl", {"warmup_weights": "uniform"}),
]


def _say(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


def _write_csv(path: str, rows: list) -> None:
    if not rows:
        return
    keys = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, keys)
    writer.writeheader()
    writer.writerows(rows)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(buf.getvalue())
    os.replace(tmp, path)


def _last_row(path: str) -> dict:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return rows[-1] if rows else {}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="results/study")
    p.add_argument("--data-root", default=None, help="Fashion-MNIST IDX folder (default: Debian's)")
    p.add_argument("--teachers", nargs="+", default=["resnet8", "wrn_16_1", "resnet14"])
    p.add_argument("--teacher-epochs", type=int, default=1)
    p.add_argument("--student", default="resnet8")
    p.add_argument("--per-class", type=int, default=50, help="the student's training images per class")
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--test-per-class", type=int, default=200, help="the student's test images per class")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--methods", nargs="+", default=[m[0] for m in METHODS])
    p.add_argument("--max-steps", type=int, default=None, help="cut every epoch short (a smoke run)")
    p.add_argument("--report", action="store_true",
                   help="only write study.png and the markdown table (study.md) from the finished runs")
    args = p.parse_args(argv)
    if args.report:
        return _report(args.out)

    from mtkd_fast import data, models
    from mtkd_fast.cache import build_cache
    from mtkd_fast.train import TrainConfig, evaluate, train
    from mtkd_fast.train.run import train_teacher

    torch.set_num_threads(1)
    os.makedirs(args.out, exist_ok=True)
    device = torch.device("cpu")
    common = dict(dataset="fashion_mnist", data_root=args.data_root, device="cpu", progress=False,
                  max_steps_per_epoch=args.max_steps)

    # 1. teachers on all 60000 training images
    ckpts = []
    for arch in args.teachers:
        out = os.path.join(args.out, "teachers", arch)
        ckpt = os.path.join(out, "student_last.pth")
        if not os.path.exists(ckpt):
            _say(f"teacher {arch}: {args.teacher_epochs} epoch(s) on the 60000 training images")
            t0 = time.perf_counter()
            r = train_teacher(arch, epochs=args.teacher_epochs, batch_size=64, schedule="cosine", seed=100,
                              out_dir=out, overwrite=True, eval_every=args.teacher_epochs, **common)
            _say(f"teacher {arch}: test top-1 {r['final']['val_top1']:.2f}% in {time.perf_counter() - t0:.0f}s")
        ckpts.append(ckpt)
    test_set = data.build_dataset("fashion_mnist", split="test", root=args.data_root, augment=False,
                                  limit_per_class=args.test_per_class)
    test_loader = data.build_loader(test_set, 256, shuffle=False, device="cpu")
    teacher_models, teacher_rows = [], []
    for arch, ckpt in zip(args.teachers, ckpts):
        model = models.create_model(arch, 10)
        models.load_checkpoint(model, ckpt)
        teacher_models.append(model.eval())
        teacher_rows.append({"teacher": arch, "test_top1": evaluate(model, test_loader, device)["top1"]})
    _write_csv(os.path.join(args.out, "teachers.csv"), teacher_rows)
    _say("teachers on the test subset: " + ", ".join(f"{r['teacher']} {r['test_top1']:.2f}%" for r in teacher_rows))

    # 2. the teachers' outputs over the student's subset, one view per epoch
    student_train = data.build_dataset("fashion_mnist", split="train", root=args.data_root, augment=True, seed=0,
                                       limit_per_class=args.per_class)
    cache_dir = os.path.join(args.out, "teacher_cache")
    if not os.path.exists(os.path.join(cache_dir, "manifest.json")):
        _say(f"cache: {len(args.teachers)} teachers x {len(student_train)} images x {args.epochs} views")
        build_cache(cache_dir, student_train, teacher_models, views=args.epochs, teacher_names=list(args.teachers),
                    checkpoints=ckpts, device=device, progress=False, teacher_precision="fp32")

    # 3. students: seed-major, every method with the same hyper-parameters
    rows_path = os.path.join(args.out, "runs.csv")
    rows = []
    for seed in args.seeds:
        for label, strategy, changes in METHODS:
            run_dir = os.path.join(args.out, "runs", label.replace(" ", "_"), f"seed{seed}")
            done = os.path.join(run_dir, "result.json")
            if label not in args.methods and not os.path.exists(done):  # finished runs stay in the tables
                continue
            if not os.path.exists(done):
                cfg = TrainConfig(student=args.student, strategy=strategy, seed=seed, data_seed=0,
                                  limit_per_class=args.per_class, epochs=args.epochs, batch_size=64, lr=0.05,
                                  weight_decay=5e-4, schedule="cosine", eval_every=args.epochs, out_dir=run_dir,
                                  overwrite=True, log_every=10**6,
                                  teachers=list(args.teachers) if strategy != "none" else [],
                                  teacher_checkpoints=ckpts if strategy != "none" else [],
                                  teacher_cache=cache_dir if strategy != "none" else None, **common, **changes)
                t0 = time.perf_counter()
                r = train(cfg)
                student = models.create_model(args.student, 10)
                models.load_checkpoint(student, os.path.join(run_dir, "student_last.pth"))
                top1 = evaluate(student.eval(), test_loader, device)["top1"]
                last = _last_row(os.path.join(run_dir, "metrics.csv"))
                result = {"method": label, "seed": seed, "test_top1": top1,
                          "epoch_time_s": float(last.get("time_s") or r["final"].get("time_s") or 0),
                          "wall_s": time.perf_counter() - t0}
                diag = os.path.join(run_dir, "agent_diagnostics.csv")
                if strategy == "mtkd_rl" and os.path.exists(diag):
                    result.update({k: v for k, v in _last_row(diag).items() if k != "epoch"})
                with open(done + ".tmp", "w") as f:
                    json.dump(result, f)
                os.replace(done + ".tmp", done)
                _say(f"{label} seed {seed}: test top-1 {top1:.2f}% ({result['wall_s']:.0f}s)")
            with open(done) as f:
                rows.append(json.load(f))
            _write_csv(rows_path, rows)
            summary = []
            for lab, _, _ in METHODS:
                accs = [r["test_top1"] for r in rows if r["method"] == lab]
                if accs:
                    summary.append({"method": lab, "seeds": len(accs), "mean": statistics.fmean(accs),
                                    "std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                                    "epoch_time_s": statistics.fmean(r["epoch_time_s"] for r in rows
                                                                     if r["method"] == lab)})
            _write_csv(os.path.join(args.out, "summary.csv"), summary)
    return 0


def _report(out: str) -> int:
    """study.md (the table: mean ± std per method over the finished seeds, epoch time, MTKD-RL's agent
    diagnostics) and study.png (every run's test top-1) from runs.csv."""
    from mtkd_fast._optional import pyplot

    with open(os.path.join(out, "runs.csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    labels = [m[0] for m in METHODS if any(r["method"] == m[0] for r in rows)]
    diag_keys = [("diag_entropy_wl", "entropy"), ("diag_policy_wl", "policy share"), ("diag_prior_wl", "prior share")]
    # the teacher's label follows the prefix (a label may hold "_": resnet8_1; runs before the naming: t0)
    prefix = "diag_corr_wl_right_"
    diag_keys += [(k, "corr(w, right) " + k[len(prefix):]) for k in rows[0] if k.startswith(prefix)]
    lines = ["| method | seeds | test top-1 (mean ± std) | per seed | epoch time (s) | "
             + " | ".join(name for _, name in diag_keys) + " |",
             "| --- " * (5 + len(diag_keys)) + "|"]
    for label in labels:
        rs = [r for r in rows if r["method"] == label]
        accs = [float(r["test_top1"]) for r in rs]
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        cells = [label, str(len(accs)), f"{statistics.fmean(accs):.2f} ± {std:.2f}",
                 ", ".join(f"{a:.1f}" for a in accs), f"{statistics.fmean(float(r['epoch_time_s']) for r in rs):.1f}"]
        for key, _ in diag_keys:
            vals = [float(r[key]) for r in rs if r.get(key) not in (None, "")]
            cells.append(f"{statistics.fmean(vals):.3f}" if vals else "")
        lines.append("| " + " | ".join(cells) + " |")
    with open(os.path.join(out, "study.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    plt = pyplot("the study plot")
    if plt is not None:
        fig, ax = plt.subplots(figsize=(9, 3.6))
        for i, label in enumerate(labels):
            accs = [float(r["test_top1"]) for r in rows if r["method"] == label]
            ax.scatter([i] * len(accs), accs, s=14, color="tab:blue")
            ax.errorbar(i + 0.15, statistics.fmean(accs), yerr=statistics.stdev(accs) if len(accs) > 1 else 0,
                        fmt="o", color="black", capsize=3)
        ax.set_xticks(range(len(labels)), labels, rotation=20, fontsize=8)
        ax.set_ylabel("test top-1 (%)")
        ax.set_title("student resnet8 on 50 images per class; teachers on all 60000 (dots: seeds; bars: mean ± std)",
                     fontsize=9)
        fig.tight_layout()
        fig.savefig(os.path.join(out, "study.png"), dpi=110)
    return 0


if __name__ == "__main__":
    sys.exit(main())
