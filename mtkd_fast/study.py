"""The teachers-stronger study of issue 27 (docs/study.md), behind ``mtkd-fast study``: teachers of three families
trained on all 60000 Fashion-MNIST training images until their test top-1 stops improving, a student that sees
only a small class-balanced subset, every weighting method with the same untuned hyper-parameters, several
seeds. Runs on one thread, resumable (finished teacher epochs and student runs are kept), seed-major (every
method of seed 0, then of seed 1, ...) so that a stopped study still has complete seeds.

Writes into ``--out``: ``teachers.csv`` (per teacher: epochs trained, why it stopped, top-1 on the student's
test subset, its per-epoch curve on the full test set), ``runs.csv`` (one row per finished run: method, seed,
test top-1, epoch time, the MTKD-RL runs' last-epoch agent diagnostics), ``summary.csv`` (mean and std per
method), ``checks.csv`` (issue 27's checks of the agent: per method and epoch, the reward and agent-update
diagnostics averaged over seeds), and with ``--report`` ``study.md`` (the tables) and ``study.png``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import statistics
import sys
import time
from typing import Optional

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
LABELS = [m[0] for m in METHODS]
# three families (ResNet, wide ResNet, MobileNetV2): the third family that trains fast enough on one CPU core
# (docs/study.md, "Setting", has the throughput of the candidates)
TEACHERS = ["resnet8", "wrn_16_1", "MobileNetV2_0_5"]
DEFAULT_DATA_ROOT = "/usr/share/datasets/fashion-mnist"
# the agent diagnostics that answer issue 27's checks (mtkd_fast/train/diagnostics.py), in the checks table's order
CHECK_COLUMNS = [
    ("diag_reward_mean", "r_hat mean"), ("diag_reward_std", "r_hat std"), ("diag_reward_pos", "r_hat > 0"),
    ("diag_reward_raw_std", "std(-l) per batch"), ("diag_reward_loss_corr", "corr(r_hat, l)"),
    ("diag_agent_grad_norm", "agent ‖g‖"), ("diag_agent_step_ratio", "lr ‖g‖ / ‖θ‖ per step"),
    ("diag_agent_rel_change", "‖Δθ‖ / ‖θ‖ per update"), ("diag_agent_move_pil", "‖Δπ_l‖₁"),
    ("diag_agent_dentropy_wl", "Δ entropy(wl)"), ("diag_entropy_wl", "entropy(wl)"),
    ("diag_policy_wl", "policy share"), ("diag_prior_wl", "prior share"),
]
TEACHERS_CSV, RUNS_CSV, SUMMARY_CSV, CHECKS_CSV = "teachers.csv", "runs.csv", "summary.csv", "checks.csv"
RESULT_JSON, PLATEAU_JSON = "result.json", "plateau.json"
DOC_BEGIN, DOC_END = "<!-- study report: begin -->", "<!-- study report: end -->"


def say(text: str) -> None:
    """A progress line on stderr (stdout stays for the report)."""
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def teacher_column(row: dict, prefix: str, m: int, label: str):
    """Teacher ``m``'s entry ``prefix`` of a metrics / diagnostics row (the one place that knows the column names):
    named by its label (``diag_corr_wl_right_resnet8``), or by index in rows written before columns were named."""
    value = row.get(f"{prefix}_{label}")
    return row.get(f"{prefix}_t{m}") if value is None else value


def read_rows(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def write_rows(path: str, rows: list[dict]) -> None:
    from ._io import write_csv_atomic

    if rows:
        write_csv_atomic(path, rows)


def plateau_reason(curve: list, min_gain: float, max_epochs: int) -> Optional[str]:
    """Why teacher training stops after the epochs of ``curve`` (test top-1 per epoch, in %), or None to go on:
    ``"plateau"`` when the last epoch gained less than ``min_gain`` points, ``"max epochs"`` at ``max_epochs``."""
    if len(curve) >= 2 and curve[-1] - curve[-2] < min_gain:
        return "plateau"
    if len(curve) >= max_epochs:
        return "max epochs"
    return None


def train_teacher_to_plateau(arch: str, out: str, max_epochs: int, min_gain: float, common: dict) -> dict:
    """Train teacher ``arch`` in ``out`` one epoch at a time (constant lr: the length is not known in advance,
    so no schedule can depend on it) until :func:`plateau_reason` says stop; resumes from the last finished
    epoch. Returns {"arch", "epochs", "stopped", "curve"}."""
    from ._io import write_json_atomic
    from .train.run import train_teacher

    done = os.path.join(out, PLATEAU_JSON)
    if os.path.exists(done):
        with open(done) as f:
            return json.load(f)
    curve = [float(r["val_top1"]) for r in read_rows(os.path.join(out, "metrics.csv")) if r.get("val_top1")]
    while (reason := plateau_reason(curve, min_gain, max_epochs)) is None:
        t0 = time.perf_counter()
        r = train_teacher(arch, epochs=len(curve) + 1, batch_size=64, schedule="constant", seed=100, out_dir=out,
                          resume=bool(curve), overwrite=not curve, eval_every=1, **common)
        curve.append(float(r["final"]["val_top1"]))
        say(f"teacher {arch}: epoch {len(curve)}, test top-1 {curve[-1]:.2f}% ({time.perf_counter() - t0:.0f} s)")
    result = {"arch": arch, "epochs": len(curve), "stopped": reason, "curve": curve}
    write_json_atomic(done, result)
    say(f"teacher {arch}: stopped after {len(curve)} epoch(s) ({reason})")
    return result


def _check_args(args) -> None:
    if len(args.teacher_epochs) not in (1, len(args.teachers)) or min(args.teacher_epochs) < 1:
        raise ValueError(f"--teacher-epochs: expected one positive integer, or one per teacher "
                         f"({len(args.teachers)}), got {args.teacher_epochs}")
    for name in ("per_class", "epochs", "test_per_class"):
        value = getattr(args, name)
        if value < 1:
            raise ValueError(f"--{name.replace('_', '-')}: expected a positive integer, got {value}")
    if args.max_steps is not None and args.max_steps < 1:
        raise ValueError(f"--max-steps: expected a positive integer, got {args.max_steps}")
    if not args.min_gain >= 0:
        raise ValueError(f"--min-gain: expected points >= 0, got {args.min_gain}")
    if any(s < 0 for s in args.seeds):
        raise ValueError(f"--seeds: expected non-negative integers, got {args.seeds}")
    unknown = [m for m in args.methods if m not in LABELS]
    if unknown:
        raise ValueError(f"--methods: expected labels among {LABELS}, got {unknown}")
    if len(set(args.teachers)) < 2 or len(set(args.teachers)) != len(args.teachers):
        raise ValueError(f"--teachers: expected two or more different models, got {args.teachers}")


def run_study(args) -> int:
    """Teachers, the cache of their outputs over the student's subset, then every (seed, method) run."""
    import torch

    from . import data, models
    from ._io import write_json_atomic
    from .cache import build_cache
    from .train import TrainConfig, evaluate, train

    _check_args(args)
    unknown = [t for t in args.teachers + [args.student] if t not in models.list_models()]
    if unknown:
        raise ValueError(f"--teachers/--student: unknown models {unknown} (see mtkd-fast info)")
    torch.set_num_threads(1)
    os.makedirs(args.out, exist_ok=True)
    device = torch.device("cpu")
    # the test subset first: a missing or unreadable data folder fails before any training
    test_set = data.build_dataset("fashion_mnist", split="test", root=args.data_root, augment=False,
                                  limit_per_class=args.test_per_class)
    test_loader = data.build_loader(test_set, 256, shuffle=False, device="cpu")
    common = dict(dataset="fashion_mnist", data_root=args.data_root, device="cpu", progress=False,
                  max_steps_per_epoch=args.max_steps)

    # 1. teachers on all 60000 training images, each until it plateaus
    teacher_rows, teacher_models, ckpts = [], [], []
    caps = args.teacher_epochs * len(args.teachers) if len(args.teacher_epochs) == 1 else args.teacher_epochs
    for arch, cap in zip(args.teachers, caps):
        out = os.path.join(args.out, "teachers", arch)
        trained = train_teacher_to_plateau(arch, out, cap, args.min_gain, common)
        ckpt = os.path.join(out, "student_last.pth")
        model = models.create_model(arch, 10)
        models.load_checkpoint(model, ckpt)
        teacher_models.append(model.eval())
        ckpts.append(ckpt)
        teacher_rows.append({"teacher": arch, "epochs": trained["epochs"], "stopped": trained["stopped"],
                             "test_top1": evaluate(model, test_loader, device)["top1"],
                             "full_test_curve": " ".join(f"{a:.2f}" for a in trained["curve"])})
    write_rows(os.path.join(args.out, TEACHERS_CSV), teacher_rows)
    say("teachers on the test subset: " + ", ".join(f"{r['teacher']} {r['test_top1']:.2f}%" for r in teacher_rows))

    # 2. the teachers' outputs over the student's subset, one view per epoch
    student_train = data.build_dataset("fashion_mnist", split="train", root=args.data_root, augment=True, seed=0,
                                       limit_per_class=args.per_class)
    cache_dir = os.path.join(args.out, "teacher_cache")
    say(f"cache: {len(args.teachers)} teachers x {len(student_train)} images x {args.epochs} views")
    # a finished cache of the same build is re-used; one of other teachers, data or views is refused, naming it
    build_cache(cache_dir, student_train, teacher_models, views=args.epochs, teacher_names=list(args.teachers),
                checkpoints=ckpts, device=device, progress=False, teacher_precision=args.teacher_precision)

    # 3. students: seed-major, every method with the same hyper-parameters
    total = len(args.seeds) * len(args.methods)
    count = 0
    for seed in args.seeds:
        for label, strategy, changes in METHODS:
            run_dir = run_folder(args.out, label, seed)
            done = os.path.join(run_dir, RESULT_JSON)
            if label not in args.methods:
                continue
            count += 1
            if os.path.exists(done):
                continue
            say(f"[{count}/{total}] {label} seed {seed}")
            distil = strategy != "none"
            cfg = TrainConfig(student=args.student, strategy=strategy, seed=seed, data_seed=0,
                              limit_per_class=args.per_class, epochs=args.epochs, batch_size=64, lr=0.05,
                              weight_decay=5e-4, schedule="cosine", eval_every=args.epochs, out_dir=run_dir,
                              overwrite=True, log_every=10**6, teachers=list(args.teachers) if distil else [],
                              teacher_checkpoints=ckpts if distil else [], teacher_cache=cache_dir if distil else None,
                              teacher_precision=args.teacher_precision if distil else "auto",
                              **common, **changes)
            t0 = time.perf_counter()
            r = train(cfg)
            student = models.create_model(args.student, 10)
            models.load_checkpoint(student, os.path.join(run_dir, "student_last.pth"))
            top1 = evaluate(student.eval(), test_loader, device)["top1"]
            last = (read_rows(os.path.join(run_dir, "metrics.csv")) or [{}])[-1]
            result = {"method": label, "seed": seed, "test_top1": top1,
                      "epoch_time_s": float(last.get("time_s") or r["final"].get("time_s") or 0),
                      "wall_s": time.perf_counter() - t0}
            if strategy == "mtkd_rl":
                result.update({k: v for k, v in (_diagnostics(run_dir) or [{}])[-1].items() if k != "epoch"})
            write_json_atomic(done, result)
            say(f"{label} seed {seed}: test top-1 {top1:.2f}% ({result['wall_s']:.0f} s)")
        collect(args.out)  # after every seed: the CSVs hold the complete seeds so far
    collect(args.out)
    return 0


def run_folder(out: str, label: str, seed: int) -> str:
    return os.path.join(out, "runs", label.replace(" ", "_"), f"seed{seed}")


def _diagnostics(run_dir: str) -> list[dict]:
    from .train.diagnostics import DIAGNOSTICS_CSV

    return read_rows(os.path.join(run_dir, DIAGNOSTICS_CSV))


def _finished(out: str) -> list[dict]:
    """result.json of every finished run, in table order (method, then seed)."""
    rows = []
    for label in LABELS:
        folder = os.path.join(out, "runs", label.replace(" ", "_"))
        seeds = sorted(int(d[4:]) for d in os.listdir(folder) if d.startswith("seed")) if os.path.isdir(folder) else []
        for seed in seeds:
            path = os.path.join(run_folder(out, label, seed), RESULT_JSON)
            if os.path.exists(path):
                with open(path) as f:
                    rows.append(json.load(f))
    return rows


def _mean_std(values: list) -> tuple:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def collect(out: str) -> None:
    """runs.csv, summary.csv and checks.csv from the finished runs."""
    rows = _finished(out)
    write_rows(os.path.join(out, RUNS_CSV), rows)
    summary = []
    for label in LABELS:
        rs = [r for r in rows if r["method"] == label]
        if rs:
            mean, std = _mean_std([float(r["test_top1"]) for r in rs])
            summary.append({"method": label, "seeds": len(rs), "mean": mean, "std": std,
                            "epoch_time_s": statistics.fmean(float(r["epoch_time_s"]) for r in rs)})
    write_rows(os.path.join(out, SUMMARY_CSV), summary)
    write_rows(os.path.join(out, CHECKS_CSV), _checks(out, rows))


def _checks(out: str, rows: list[dict]) -> list[dict]:
    """Per MTKD-RL method and epoch, the agent diagnostics of CHECK_COLUMNS averaged over the runs ``rows``."""
    checks = []
    for label, strategy, _ in METHODS:
        if strategy != "mtkd_rl":
            continue
        per_seed = [_diagnostics(run_folder(out, label, int(r["seed"]))) for r in rows if r["method"] == label]
        per_seed = [d for d in per_seed if d]
        for e in range(min((len(d) for d in per_seed), default=0)):
            row = {"method": label, "epoch": per_seed[0][e]["epoch"], "seeds": len(per_seed)}
            for key, _ in CHECK_COLUMNS:
                vals = [float(d[e][key]) for d in per_seed if d[e].get(key) not in (None, "")]
                vals = [v for v in vals if math.isfinite(v)]
                row[key] = statistics.fmean(vals) if vals else ""
            checks.append(row)
    return checks


def _fmt(value) -> str:
    """Three significant digits below 1 (the diagnostics span 1e-33 to 1), two decimals above."""
    if value in (None, ""):
        return ""
    v = float(value)
    return f"{v:.2f}" if abs(v) >= 1 else f"{v:.3g}"


def report(out: str, doc: Optional[str] = None) -> str:
    """The study's tables as markdown (teachers, results, paired differences, the agent checks), written to
    ``out/study.md`` and, with ``doc``, between the report markers of that file; and ``out/study.png``."""
    from ._io import write_bytes_atomic
    from .train.diagnostics import teacher_labels

    collect(out)
    rows = _finished(out)
    if not rows:
        raise FileNotFoundError(f"--out: no finished runs in {out} (run the study first)")
    # only seeds that every method present has finished: means over different seed sets would not compare
    present = {r["method"] for r in rows}
    seeds = sorted({r["seed"] for r in rows})
    complete = [s for s in seeds if {r["method"] for r in rows if r["seed"] == s} == present]
    rows = [r for r in rows if r["seed"] in complete]
    teachers = read_rows(os.path.join(out, TEACHERS_CSV))
    names = [t["teacher"] for t in teachers]
    lines = ["| teacher | epochs | stopped by | test top-1 (subset) | full test set top-1 per epoch |",
             "| --- | --- | --- | --- | --- |"]
    lines += [f"| {t['teacher']} | {t['epochs']} | {t['stopped']} | {float(t['test_top1']):.2f} | "
              f"{t['full_test_curve']} |" for t in teachers]
    labels = [lab for lab in LABELS if any(r["method"] == lab for r in rows)]
    diag = [("diag_entropy_wl", "weight entropy"), ("diag_policy_wl", "policy share"),
            ("diag_prior_wl", "prior share")]
    diag += [(("diag_corr_wl_right", m, lab), f"corr(w, right) {n}")
             for m, (lab, n) in enumerate(zip(teacher_labels(names, len(names)), names))]
    lines += ["", "| method | seeds | test top-1 (mean ± std) | per seed | epoch time (s) | "
              + " | ".join(name for _, name in diag) + " |", "| --- " * (5 + len(diag)) + "|"]
    by = {lab: [r for r in rows if r["method"] == lab] for lab in labels}
    for label in labels:
        rs = by[label]
        mean, std = _mean_std([float(r["test_top1"]) for r in rs])
        cells = [label, str(len(rs)), f"{mean:.2f} ± {std:.2f}",
                 ", ".join(f"{float(r['test_top1']):.1f}" for r in rs),
                 f"{statistics.fmean(float(r['epoch_time_s']) for r in rs):.1f}"]
        for key, _ in diag:
            vals = [float(v) for r in rs for v in [teacher_column(r, *key) if isinstance(key, tuple)
                                                    else r.get(key)] if v not in (None, "")]
            vals = [v for v in vals if math.isfinite(v)]
            cells.append(f"{statistics.fmean(vals):.3f}" if vals else "")
        lines.append("| " + " | ".join(cells) + " |")
    pairs = [("MTKD-RL", "AVER"), ("MTKD-RL", "none"), ("MTKD-RL", "MTKD-RL frozen agent"),
             ("MTKD-RL dynamic", "MTKD-RL"), ("MTKD-RL uniform warm-up", "MTKD-RL"),
             ("MTKD-RL uniform warm-up", "AVER"), ("AVER", "none")]
    lines += ["", "| comparison (paired by seed) | seeds | per seed | mean ± std |", "| --- | --- | --- | --- |"]
    for a, b in pairs:
        ta = {r["seed"]: float(r["test_top1"]) for r in by.get(a, [])}
        tb = {r["seed"]: float(r["test_top1"]) for r in by.get(b, [])}
        common = sorted(set(ta) & set(tb))
        if common:
            d = [ta[s] - tb[s] for s in common]
            mean, std = _mean_std(d)
            lines.append(f"| {a} - {b} | {len(d)} | {', '.join(f'{x:+.2f}' for x in d)} | {mean:+.2f} ± {std:.2f} |")
    checks = _checks(out, rows)
    if checks:
        lines += ["", "| method | epoch | seeds | " + " | ".join(n for _, n in CHECK_COLUMNS) + " |",
                  "| --- " * (3 + len(CHECK_COLUMNS)) + "|"]
        last = {c["method"]: c["epoch"] for c in checks}
        for c in checks:  # MTKD-RL's every epoch, the variants' last
            if c["method"] != "MTKD-RL" and c["epoch"] != last[c["method"]]:
                continue
            lines.append(f"| {c['method']} | {c['epoch']} | {c['seeds']} | "
                         + " | ".join(_fmt(c[k]) for k, _ in CHECK_COLUMNS) + " |")
    left = [s for s in seeds if s not in complete]
    if left:
        lines += ["", f"Left out: seed(s) {', '.join(map(str, left))}, which not every method has finished."]
    text = "\n".join(lines) + "\n"
    write_bytes_atomic(os.path.join(out, "study.md"), text.encode())
    _plot(out, labels, by, names)
    if doc is not None:
        with open(doc) as f:
            old = f.read()
        if DOC_BEGIN not in old or DOC_END not in old:
            raise ValueError(f"--doc: {doc} has no '{DOC_BEGIN}' ... '{DOC_END}' markers to put the report between")
        head, rest = old.split(DOC_BEGIN, 1)
        write_bytes_atomic(doc, (head + DOC_BEGIN + "\n" + text + DOC_END + rest.split(DOC_END, 1)[1]).encode())
    return text


def _plot(out: str, labels: list, by: dict, names: list) -> None:
    from ._io import write_bytes_atomic
    from ._optional import pyplot

    plt = pyplot("the study plot")
    if plt is None:
        return
    import io

    fig, ax = plt.subplots(figsize=(9, 3.6))
    for i, label in enumerate(labels):
        accs = [float(r["test_top1"]) for r in by[label]]
        mean, std = _mean_std(accs)
        ax.scatter([i] * len(accs), accs, s=14, color="tab:blue")
        ax.errorbar(i + 0.15, mean, yerr=std, fmt="o", color="black", capsize=3)
    ax.set_xticks(range(len(labels)), labels, rotation=20, fontsize=8)
    ax.set_ylabel("test top-1 (%)")
    ax.set_title(f"student on a small subset; teachers {', '.join(names)} on all 60000 "
                 "(dots: seeds; bars: mean ± std)", fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    write_bytes_atomic(os.path.join(out, "study.png"), buf.getvalue())


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The study's options (``mtkd-fast study`` and tools/study_fashion_mnist.py)."""
    p.add_argument("--out", default="results/study", help="results folder (default: results/study)")
    p.add_argument("--data-root", default=DEFAULT_DATA_ROOT,
                   help=f"the folder of the Fashion-MNIST IDX files (default: {DEFAULT_DATA_ROOT})")
    p.add_argument("--teachers", nargs="+", default=list(TEACHERS), help="teacher models (default: %(default)s)")
    p.add_argument("--teacher-epochs", type=int, nargs="+", default=[5], metavar="N",
                   help="the most epochs a teacher trains: one for all, or one per teacher (default: 5)")
    p.add_argument("--min-gain", type=float, default=0.5,
                   help="a teacher stops when an epoch gains fewer test top-1 points (default: %(default)s)")
    p.add_argument("--student", default="resnet8", help="the student model (default: %(default)s)")
    p.add_argument("--per-class", type=int, default=50, help="the student's training images per class (default 50)")
    p.add_argument("--epochs", type=int, default=12, help="student epochs (default 12)")
    p.add_argument("--test-per-class", type=int, default=200, help="the student's test images per class (default 200)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="student seeds (default 0-4)")
    p.add_argument("--methods", nargs="*", default=list(LABELS), metavar="LABEL",
                   help="methods to run, by label (default: all; none given: only the teachers and the cache): "
                        + ", ".join(LABELS))
    p.add_argument("--max-steps", type=int, default=None, help="cut every epoch short (a smoke run)")
    p.add_argument("--teacher-precision", choices=("fp32", "bf16"), default="fp32",
                   help="what the teachers' cached outputs are computed in, for every method (default fp32: "
                        "MTKD-RL's auto; tools/precision_study.py runs the study in both)")
    p.add_argument("--report", action="store_true",
                   help="only write the tables (study.md, to stdout too) and study.png from the finished runs")
    p.add_argument("--doc", default=None, help="with --report: also put the tables between the report markers "
                                               "of this markdown file (docs/study.md)")


def run(args) -> int:
    if args.report:
        from .commands._output import emit

        emit(report(args.out, args.doc).rstrip("\n"))  # the result: stdout, also under cli.main's routing
        return 0
    return run_study(args)


def main(argv=None) -> int:
    """tools/study_fashion_mnist.py's entry point: ``mtkd-fast study``'s options and errors."""
    from .cli import main as cli_main

    return cli_main(["study"] + list(sys.argv[1:] if argv is None else argv))
