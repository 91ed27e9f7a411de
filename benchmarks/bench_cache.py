"""Teacher-output cache: one MTKD-RL training step with the cache against live teachers and student-only,
and the error of the compact encodings (int8 feature maps, top-k logits).

Setting: CPU, B=64, ShuffleV2 student, teachers RegNetY_400MF, RegNetX_400MF, resnet32x4,
wrn_28_4, 32x32 inputs, 100 classes (random-init teachers: timing does not depend on their weights).

- ``make bench`` (pytest-benchmark) times the three steps (group "cache-step").
- ``python benchmarks/bench_cache.py [--rounds 7] [--out results/bench_cache]`` times them interleaved (medians,
  ratios to student-only), measures the encodings' error, and writes CSV + JSON + PNG.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import torch

from mtkd_fast import models
from mtkd_fast.agent import MTKDAgent
from mtkd_fast.cache import build_cache, open_teacher_source, storage
from mtkd_fast.data import build_dataset, build_loader
from mtkd_fast.teachers import LiveTeachers
from mtkd_fast.train import TrainConfig, Trainer

TEACHERS = ["RegNetY_400MF", "RegNetX_400MF", "resnet32x4", "wrn_28_4"]
STUDENT = "ShuffleV2"
NUM_CLASSES = 100
BATCH = 64


def _dataset(per_class: int = 13):
    # bundled images (3x32x32); the models have 100 outputs, the labels (< 10) are valid classes for them
    return build_dataset("bundled", split="train", augment=True, seed=0, limit_per_class=per_class)


def _teachers():
    torch.manual_seed(1)
    return [models.create_model(n, NUM_CLASSES).eval() for n in TEACHERS]


def make_trainer(kind: str, source=None, ds=None) -> Trainer:
    """kind: "student" (cross-entropy only), or "mtkd_rl" with ``source`` (live teachers or the cache)."""
    torch.manual_seed(0)
    strategy = "none" if kind == "student" else "mtkd_rl"
    cfg = TrainConfig(student=STUDENT, teachers=TEACHERS, strategy=strategy, batch_size=BATCH, progress=False,
                      device="cpu")
    student = models.create_model(STUDENT, NUM_CLASSES)
    if kind == "student":
        return Trainer(cfg, student, None, device="cpu")
    ds.set_view(0)
    x = torch.stack([ds[i][0] for i in range(2)])
    probe = source(x, torch.arange(2), 0)
    student.eval()
    with torch.no_grad():
        s_shape = tuple(student(x, is_feat=True)[0][-2].shape[1:])
    ft = models.FeatureTransfer(student_shape=s_shape, teacher_shapes=[tuple(f.shape[1:]) for f in probe.feature_maps])
    agent = MTKDAgent([int(e.shape[1]) + NUM_CLASSES + 3 for e in probe.embeddings], len(TEACHERS))
    tr = Trainer(cfg, student, source, ft, agent, device="cpu")
    tr.begin_epoch(1, 1000)  # past the warm-up epoch: the agent runs every step
    return tr


class Setting:
    """The three trainers and a stream of batches (view 0, shuffled), built once per process."""

    def __init__(self):
        self.ds = _dataset()
        self.tmp = tempfile.TemporaryDirectory(prefix="bench_cache_")
        t0 = time.perf_counter()
        build_cache(os.path.join(self.tmp.name, "c"), self.ds, _teachers(), views=1, teacher_names=TEACHERS,
                    batch_size=64, progress=False)
        self.build_s = time.perf_counter() - t0
        cache = open_teacher_source(os.path.join(self.tmp.name, "c"), verify="full")
        self.cache = cache
        self.trainers = {
            "student_only": make_trainer("student"),
            "mtkd_rl_live": make_trainer("mtkd_rl", LiveTeachers(_teachers()), self.ds),
            "mtkd_rl_cached": make_trainer("mtkd_rl", cache, self.ds),
        }
        self.ds.set_view(0)
        self.batches = list(build_loader(self.ds, BATCH, shuffle=True, seed=0, epoch=0, drop_last=True))
        self.i = 0

    def read_cache(self) -> None:
        """The cache's own cost in a step: look up and decode one batch of the 4 teachers' outputs."""
        images, labels, idx = self.batches[self.i % len(self.batches)]
        self.i += 1
        self.cache(images, idx, 0)

    def step(self, kind: str) -> None:
        images, labels, idx = self.batches[self.i % len(self.batches)]
        self.i += 1
        out = self.trainers[kind].train_step(images, labels, idx, 0)
        float(out["loss"])


_SETTING = None


def setting() -> Setting:
    global _SETTING
    if _SETTING is None:
        _SETTING = Setting()
    return _SETTING


# ---- pytest-benchmark (make bench) ----------------------------------------------------------------------------

def _bench(benchmark, kind):
    s = setting()
    s.step(kind)  # warm-up
    benchmark.group = "cache-step"
    benchmark.pedantic(s.step, args=(kind,), rounds=5, iterations=1)


def test_step_student_only(benchmark):
    _bench(benchmark, "student_only")


def test_step_mtkd_rl_cached(benchmark):
    _bench(benchmark, "mtkd_rl_cached")


def test_cache_read_one_batch(benchmark):
    s = setting()
    benchmark.group = "cache-step"
    benchmark.pedantic(s.read_cache, rounds=20, iterations=1, warmup_rounds=2)


def test_step_mtkd_rl_live(benchmark):
    _bench(benchmark, "mtkd_rl_live")


# ---- encodings' error -----------------------------------------------------------------------------------------

def int8_error(ds, teachers) -> list[dict]:
    """int8 feature maps (per-(sample, channel) scale) against float32: relative RMS error of the maps, and the
    relative change of the per-sample feature-MSE term for a student map near the teacher's (G = F + noise at
    10% of F's RMS: the regime late in training, where quantisation error matters most)."""
    ds.set_view(0)
    x = torch.stack([ds[i][0] for i in range(128)])
    out = LiveTeachers(teachers)(x)
    rows = []
    g = torch.Generator().manual_seed(0)
    for name, f in zip(TEACHERS, out.feature_maps):
        q, s = storage.quantize_int8(f)
        fq = storage.dequantize_int8(q, s, "cpu")
        f16 = storage.decode_float(storage.encode_float(f, "float16"), "float16", "cpu")
        rms = f.pow(2).mean().sqrt()
        student = f + 0.1 * rms * torch.randn(f.shape, generator=g)
        mse = (student - f).pow(2).mean(dim=(1, 2, 3))
        mse_q = (student - fq).pow(2).mean(dim=(1, 2, 3))
        mse_16 = (student - f16).pow(2).mean(dim=(1, 2, 3))
        rows.append({"teacher": name, "map_shape": "x".join(map(str, f.shape[1:])),
                     "int8_rel_rms_error": float((fq - f).pow(2).mean().sqrt() / rms),
                     "float16_rel_rms_error": float((f16 - f).pow(2).mean().sqrt() / rms),
                     "int8_mse_term_rel_change_mean": float(((mse_q - mse) / mse).abs().mean()),
                     "float16_mse_term_rel_change_mean": float(((mse_16 - mse) / mse).abs().mean())})
    return rows


def topk_error(K: int, ks, sharpness, T: float = 4.0, B: int = 512) -> list[dict]:
    """Top-k logits against full logits on synthetic teacher logits (Gaussian, scaled so the teacher's top-1
    probability at T=1 is about ``sharpness``) and a student with correlated logits: relative error of the
    per-sample KL (T=4) and of the KL gradient w.r.t. the student logits, and absolute error of the teacher CE (T=1)."""
    from mtkd_fast import reference as ref

    g = torch.Generator().manual_seed(K)
    rows = []
    y = torch.randint(0, K, (B,), generator=g)
    base = torch.randn(B, K, generator=g)
    for target in sharpness:
        lo, hi = 0.1, 100.0
        for _ in range(60):  # scale so the mean top-1 probability is ~target
            mid = (lo * hi) ** 0.5
            z = base * mid
            z[torch.arange(B), y] += mid * 4  # the label is usually, not always, the top class
            (lo, hi) = (mid, hi) if float(torch.softmax(z, 1).max(1).values.mean()) < target else (lo, mid)
        zt = z
        zs = (0.7 * zt + 0.7 * torch.randn(B, K, generator=g) * zt.std()).requires_grad_(True)
        two = lambda t: torch.stack([t, t])  # noqa: E731  (the reference takes M >= 2 teachers)
        kl_full = ref.kl_per_sample(zs, two(zt), T)[:, 0]
        grad_full, = torch.autograd.grad(kl_full.sum(), zs)
        tce_full = ref.teacher_cross_entropy(two(zt), y)[:, 0]
        for k in ks:
            vals, idx, tail = storage.topk_encode(zt, k, T, "float16")
            zr = storage.topk_decode(vals, idx, tail, K, T, "float16", "cpu")
            kl = ref.kl_per_sample(zs, two(zr), T)[:, 0]
            grad, = torch.autograd.grad(kl.sum(), zs)
            tce = ref.teacher_cross_entropy(two(zr), y)[:, 0]
            rows.append({"K": K, "k": k, "teacher_top1_prob": round(target, 2), "T": T,
                         "kl_rel_error_mean": float(((kl - kl_full).abs() / kl_full).mean().detach()),
                         "kl_grad_rel_error": float((grad - grad_full).norm() / grad_full.norm()),
                         "teacher_ce_abs_error_mean": float((tce - tce_full).abs().mean().detach()),
                         "teacher_ce_mean": float(tce_full.mean().detach()),
                         "bytes_per_sample_topk": k * (2 + storage.ITEM_BYTES[storage.index_encoding(K)]) + 4,
                         "bytes_per_sample_full": K * 2})
    return rows


# ---- accuracy cost of replaying V views ----------------------------------------------------------------------

def replay_experiment(out: str, views=(1, 2, 4), seeds=(0, 1, 2), per_class: int = 100, epochs: int = 15,
                      teacher_epochs: int = 15, student: str = "resnet8",
                      teachers=("resnet14", "wrn_16_2")) -> list[dict]:
    """MTKD-RL on the bundled data (``per_class`` samples per class, train and test) with teachers pretrained
    here: student top-1 when epoch e replays view e mod V from a cache, against fresh augmentation every epoch
    (live teachers). Same seeds, same everything else; CPU-sized, so small models and few epochs."""
    from mtkd_fast.train import train, train_teacher

    os.makedirs(out, exist_ok=True)
    ckpts, rows = [], []
    for name in teachers:
        r = train_teacher(name, dataset="bundled", limit_per_class=per_class, epochs=teacher_epochs, seed=100,
                          milestones=[int(teacher_epochs * 0.6), int(teacher_epochs * 0.8)], device="cpu",
                          out_dir=os.path.join(out, f"teacher_{name}"), progress=False)
        ckpts.append(os.path.join(out, f"teacher_{name}", "student_best.pth"))
        rows.append({"run": f"teacher {name}", "views": "", "seed": 100, "val_top1": r["final"]["val_top1"],
                     "seconds": ""})
        print(rows[-1], file=sys.stderr)
    common = dict(student=student, teachers=list(teachers), teacher_checkpoints=ckpts, dataset="bundled",
                  limit_per_class=per_class, epochs=epochs, milestones=[int(epochs * 0.6), int(epochs * 0.8)],
                  device="cpu", progress=False, eval_every=epochs)
    for seed in seeds:
        for V in list(views) + ["fresh"]:
            cache = None
            if V != "fresh":
                cache = os.path.join(out, f"cache_s{seed}_v{V}")
                ds = build_dataset("bundled", split="train", augment=True, seed=seed, limit_per_class=per_class)
                tms = [models.create_model(n, ds.num_classes) for n in teachers]
                for t, c in zip(tms, ckpts):
                    models.load_checkpoint(t, c)
                build_cache(cache, ds, tms, views=V, teacher_names=list(teachers), checkpoints=ckpts, progress=False)
            t0 = time.perf_counter()
            r = train(TrainConfig(**common, seed=seed, teacher_cache=cache,
                                  out_dir=os.path.join(out, f"student_s{seed}_v{V}")))
            rows.append({"run": "mtkd_rl", "views": V, "seed": seed, "val_top1": r["final"]["val_top1"],
                         "seconds": time.perf_counter() - t0})
            print(rows[-1], file=sys.stderr)
    _write_csv(os.path.join(out, "replay_views.csv"), rows)
    return rows


# ---- standalone run -------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=7, help="interleaved repetitions of each step (median)")
    p.add_argument("--out", default="results/bench_cache", help="output prefix for .csv/.json/.png")
    p.add_argument("--replay-experiment", default=None, metavar="DIR",
                   help="instead: the accuracy cost of replaying V views (trains teachers and students; long)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (1 is robust when other jobs share the cores)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--per-class", type=int, default=100, help="bundled samples per class (train and test)")
    p.add_argument("--views", type=int, nargs="+", default=[1, 2, 4], help="values of V to compare with fresh views")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.replay_experiment:
        rows = replay_experiment(args.replay_experiment, views=tuple(args.views), seeds=tuple(range(args.seeds)),
                                 per_class=args.per_class, epochs=args.epochs, teacher_epochs=args.epochs)
        for V in sorted({r["views"] for r in rows if r["run"] == "mtkd_rl"}, key=str):
            acc = [r["val_top1"] for r in rows if r["run"] == "mtkd_rl" and r["views"] == V]
            print(f"V={V}: top-1 {statistics.mean(acc):.2f} +- {statistics.stdev(acc) if len(acc) > 1 else 0:.2f} "
                  f"over {len(acc)} seeds: {acc}")
        return 0
    s = setting()
    kinds = list(s.trainers)
    times = {k: [] for k in kinds}
    for k in kinds:
        s.step(k)
    for r in range(args.rounds):
        for k in kinds:
            t0 = time.perf_counter()
            s.step(k)
            times[k].append(time.perf_counter() - t0)
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{k} {times[k][-1] * 1e3:.0f} ms" for k in kinds),
              file=sys.stderr)
    reads = []
    for _ in range(20):
        t0 = time.perf_counter()
        s.read_cache()
        reads.append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    step_rows = [{"config": k, "median_ms": med[k] * 1e3, "min_ms": min(times[k]) * 1e3,
                  "ratio_to_student_only": med[k] / med["student_only"]} for k in kinds]
    print(f"\nCPU {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; B={BATCH}, {STUDENT} student, teachers {', '.join(TEACHERS)}")
    print(f"cache build of {len(s.ds)} samples x 1 view: {s.build_s:.1f} s")
    print(f"cache read of one batch (4 teachers' logits, embeddings, maps; float16 -> float32): median "
          f"{statistics.median(reads) * 1e3:.1f} ms, min {min(reads) * 1e3:.1f} ms")
    print(f"{'config':<18}{'median ms':>12}{'min ms':>10}{'x student':>11}")
    for r in step_rows:
        print(f"{r['config']:<18}{r['median_ms']:>12.0f}{r['min_ms']:>10.0f}{r['ratio_to_student_only']:>11.2f}")
    int8_rows = int8_error(s.ds, _teachers())
    print("\nint8 feature maps (random-init teachers, bundled images):")
    for r in int8_rows:
        print(f"  {r['teacher']:<14} {r['map_shape']:<9} rel RMS error int8 {r['int8_rel_rms_error']:.4f} "
              f"(float16 {r['float16_rel_rms_error']:.5f}); |rel change| of MSE term int8 "
              f"{r['int8_mse_term_rel_change_mean']:.4f} (float16 {r['float16_mse_term_rel_change_mean']:.5f})")
    topk_rows = topk_error(1000, [5, 10, 20, 50], [0.3, 0.6, 0.9]) + topk_error(100, [5, 10, 20], [0.6, 0.9])
    print("\ntop-k logits (synthetic Gaussian teacher logits; errors against the full float32 logits):")
    for r in topk_rows:
        print(f"  K={r['K']:<5} k={r['k']:<3} p_top1={r['teacher_top1_prob']:<4} KL {r['kl_rel_error_mean']:.4f}  "
              f"dKL/dz {r['kl_grad_rel_error']:.4f}  TCE abs err {r['teacher_ce_abs_error_mean']:.4f} "
              f"(TCE {r['teacher_ce_mean']:.3f})  "
              f"bytes {r['bytes_per_sample_topk']} vs {r['bytes_per_sample_full']}")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine(),
            "batch": BATCH, "student": STUDENT, "teachers": TEACHERS, "rounds": args.rounds,
            "cache_build_s": s.build_s, "cache_build_samples": len(s.ds),
            "cache_read_batch_ms_median": statistics.median(reads) * 1e3, "cache_read_batch_ms_min": min(reads) * 1e3}
    _write_csv(args.out + "_steps.csv", step_rows)
    _write_csv(args.out + "_int8.csv", int8_rows)
    _write_csv(args.out + "_topk.csv", topk_rows)
    with open(args.out + ".json", "w") as f:
        json.dump({"meta": meta, "steps": step_rows, "int8": int8_rows, "topk": topk_rows}, f, indent=1)
    _plot(step_rows, args.out + ".png")
    print(f"\nwrote {args.out}.json, {args.out}_steps.csv, {args.out}_int8.csv, {args.out}_topk.csv, {args.out}.png")
    return 0


def _write_csv(path, rows):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def _plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3))
    ax.barh([r["config"] for r in rows], [r["median_ms"] for r in rows], color=["#999", "#c44", "#48c"])
    for i, r in enumerate(rows):
        ax.text(r["median_ms"], i, f" {r['ratio_to_student_only']:.2f}x", va="center")
    ax.set_xlabel("median ms per training step (CPU, B=64)")
    ax.set_title("MTKD-RL step: teacher cache vs live teachers")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
