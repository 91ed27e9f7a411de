"""Teacher-output cache (``mtkd-fast bench cache`` and ``benchmarks/bench_cache.py``): one MTKD-RL training step
with the cache against live teachers and student-only (the baseline), the cache's own read of a batch, the error
of the compact encodings (int8 feature maps, top-k logits), and the accuracy cost of replaying V views.

Setting: CPU, B=64, ShuffleV2 student, teachers RegNetY_400MF, RegNetX_400MF, resnet32x4, wrn_28_4, 32x32
inputs, 100 classes (random-init teachers: timing does not depend on their weights), the bundled images.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time

import torch

from .. import models
from ..agent import MTKDAgent
from ..cache import build_cache, open_teacher_source, storage
from ..data import build_dataset, build_loader
from ..teachers import LiveTeachers
from ..train import TrainConfig, Trainer
from .record import Record, interleave

__all__ = ["TEACHERS", "STUDENT", "NUM_CLASSES", "BATCH", "KINDS", "BASELINE", "Setting", "make_trainer",
           "int8_error", "topk_error", "replay_experiment", "run_cache_bench"]

TEACHERS = ("RegNetY_400MF", "RegNetX_400MF", "resnet32x4", "wrn_28_4")
STUDENT = "ShuffleV2"
NUM_CLASSES = 100
BATCH = 64
KINDS = ("student_only", "mtkd_rl_live", "mtkd_rl_cached")
BASELINE = "student_only"


def _dataset(per_class: int = 13):
    # bundled images (3x32x32); the models have 100 outputs, the labels (< 10) are valid classes for them
    return build_dataset("bundled", split="train", augment=True, seed=0, limit_per_class=per_class)


def _teachers(names=TEACHERS):
    torch.manual_seed(1)
    return [models.create_model(n, NUM_CLASSES).eval() for n in names]


def make_trainer(kind: str, source=None, ds=None, student: str = STUDENT, teachers=TEACHERS,
                 batch_size: int = BATCH) -> Trainer:
    """kind: "student" (cross-entropy only), or "mtkd_rl" with ``source`` (live teachers or the cache)."""
    torch.manual_seed(0)
    strategy = "none" if kind == "student" else "mtkd_rl"
    cfg = TrainConfig(student=student, teachers=list(teachers), strategy=strategy, batch_size=batch_size,
                      progress=False, device="cpu")
    model = models.create_model(student, NUM_CLASSES)
    if kind == "student":
        return Trainer(cfg, model, None, device="cpu")
    ds.set_view(0)
    x = torch.stack([ds[i][0] for i in range(2)])
    probe = source(x, torch.arange(2), 0)
    model.eval()
    with torch.no_grad():
        s_shape = tuple(model(x, is_feat=True)[0][-2].shape[1:])
    ft = models.FeatureTransfer(student_shape=s_shape, teacher_shapes=[tuple(f.shape[1:]) for f in probe.feature_maps])
    agent = MTKDAgent([int(e.shape[1]) + NUM_CLASSES + 3 for e in probe.embeddings], len(teachers))
    tr = Trainer(cfg, model, source, ft, agent, device="cpu")
    tr.begin_epoch(1, 1000)  # past the warm-up epoch: the agent runs every step
    return tr


class Setting:
    """The three trainers and a stream of batches (view 0, shuffled), built once: the cache over the dataset is
    built first (``build_s`` seconds)."""

    def __init__(self, student: str = STUDENT, teachers=TEACHERS, batch_size: int = BATCH, per_class: int = 13):
        self.student, self.teachers, self.batch_size = student, tuple(teachers), int(batch_size)
        self.ds = _dataset(per_class)
        if len(self.ds) < self.batch_size:
            raise ValueError(f"batch_size: expected at most the {len(self.ds)} samples of --per-class {per_class}, "
                             f"got {batch_size}")
        self.tmp = tempfile.TemporaryDirectory(prefix="bench_cache_")
        t0 = time.perf_counter()
        build_cache(os.path.join(self.tmp.name, "c"), self.ds, _teachers(self.teachers), views=1,
                    teacher_names=list(self.teachers), batch_size=64, progress=False)
        self.build_s = time.perf_counter() - t0
        self.cache = open_teacher_source(os.path.join(self.tmp.name, "c"), verify="full")
        common = dict(student=student, teachers=self.teachers, batch_size=self.batch_size)
        self.trainers = {
            "student_only": make_trainer("student", **common),
            # live teachers in the precision MTKD-RL's training picks (``--teacher-precision auto``)
            "mtkd_rl_live": make_trainer("mtkd_rl", LiveTeachers(_teachers(self.teachers), precision="auto",
                                                                 strategy="mtkd_rl"), self.ds, **common),
            "mtkd_rl_cached": make_trainer("mtkd_rl", self.cache, self.ds, **common),
        }
        self.ds.set_view(0)
        self.batches = list(build_loader(self.ds, self.batch_size, shuffle=True, seed=0, epoch=0, drop_last=True))
        self.i = 0

    def read_cache(self) -> None:
        """The cache's own cost in a step: look up and decode one batch of the teachers' outputs."""
        images, labels, idx = self.batches[self.i % len(self.batches)]
        self.i += 1
        self.cache(images, idx, 0)

    def step(self, kind: str) -> None:
        images, labels, idx = self.batches[self.i % len(self.batches)]
        self.i += 1
        out = self.trainers[kind].train_step(images, labels, idx, 0)
        float(out["loss"])


# ---- encodings' error -----------------------------------------------------------------------------------------

def int8_error(ds, teachers, names=TEACHERS) -> list[dict]:
    """int8 feature maps (per-(sample, channel) scale) against float32: relative RMS error of the maps, and the
    relative change of the per-sample feature-MSE term for a student map near the teacher's (G = F + noise at
    10% of F's RMS: the regime late in training, where quantisation error matters most)."""
    ds.set_view(0)
    x = torch.stack([ds[i][0] for i in range(min(128, len(ds)))])
    out = LiveTeachers(teachers, precision="fp32")(x)  # the reference the encodings are measured against
    rows = []
    g = torch.Generator().manual_seed(0)
    for name, f in zip(names, out.feature_maps):
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
    from .. import reference as ref

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
                      teachers=("resnet14", "wrn_16_2"), record: Record | None = None) -> Record:
    """MTKD-RL on the bundled data (``per_class`` samples per class, train and test) with teachers pretrained
    here: student top-1 when epoch e replays view e mod V from a cache, against fresh augmentation every epoch
    (live teachers). Same seeds, same everything else; CPU-sized, so small models and few epochs. Models and
    caches go under ``out``; one row per run (benchmark ``cache_replay``: its seconds, ``val_top1`` in extra)."""
    from ..train import train, train_teacher

    record = record or Record("cpu", harness="mtkd-fast bench cache --replay-experiment")
    os.makedirs(out, exist_ok=True)
    ckpts = []
    for name in teachers:
        t0 = time.perf_counter()
        r = train_teacher(name, dataset="bundled", limit_per_class=per_class, epochs=teacher_epochs, seed=100,
                          milestones=[int(teacher_epochs * 0.6), int(teacher_epochs * 0.8)], device="cpu",
                          out_dir=os.path.join(out, f"teacher_{name}"), progress=False)
        ckpts.append(os.path.join(out, f"teacher_{name}", "student_best.pth"))
        row = record.add("cache_replay", "teachers", f"teacher {name}", [time.perf_counter() - t0],
                         extra=dict(seed=100, val_top1=r["final"]["val_top1"], epochs=teacher_epochs))
        print(row["variant"], row["extra"], file=sys.stderr)
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
                # the default build, which a default MTKD-RL run accepts (``--teacher-precision auto``)
                build_cache(cache, ds, tms, views=V, teacher_names=list(teachers), checkpoints=ckpts, progress=False)
            t0 = time.perf_counter()
            r = train(TrainConfig(**common, seed=seed, teacher_cache=cache,
                                  out_dir=os.path.join(out, f"student_s{seed}_v{V}")))
            row = record.add("cache_replay", f"seed {seed}", "fresh views" if V == "fresh" else f"{V} views",
                             [time.perf_counter() - t0], extra=dict(seed=seed, views=V, epochs=epochs,
                                                                    val_top1=r["final"]["val_top1"]))
            print(row["variant"], row["extra"], file=sys.stderr)
    return record


def replay_summary(record: Record) -> str:
    """Mean +- standard deviation of the students' top-1 per V over the seeds."""
    import json

    acc: dict = {}
    for r in record.rows:
        if r["benchmark"] == "cache_replay" and r["case"].startswith("seed"):
            acc.setdefault(r["variant"], []).append(json.loads(r["extra"])["val_top1"])
    return "\n".join(f"{v}: top-1 {statistics.mean(a):.2f} +- {statistics.stdev(a) if len(a) > 1 else 0:.2f} "
                     f"over {len(a)} seeds: {a}" for v, a in acc.items())


# ---- the timed benchmark ----------------------------------------------------------------------------------------

def run_cache_bench(rounds: int = 7, reads: int = 20, encodings: bool = True, student: str = STUDENT,
                    teachers=TEACHERS, batch_size: int = BATCH, per_class: int = 13, log=print) -> Record:
    """The three steps interleaved round by round (one warm-up step each), ratios to student-only; then ``reads``
    reads of one batch from the cache; then (``encodings``) the encodings' error, as rows without timings."""
    if int(rounds) < 1:
        raise ValueError(f"rounds: expected a positive integer, got {rounds!r}")
    if int(reads) < 1:
        raise ValueError(f"reads: expected a positive integer, got {reads!r}")
    if int(per_class) < 1:
        raise ValueError(f"per_class: expected a positive integer, got {per_class!r}")
    for n in (student, *teachers):
        models.create_model(n, NUM_CLASSES)  # an unknown name fails here, before the cache is built
    s = Setting(student, teachers, batch_size, per_class)
    record = Record("cpu", harness="mtkd-fast bench cache")
    case = f"{student} B={s.batch_size}"
    setting = dict(student=student, teachers=" ".join(s.teachers), cache_build_s=s.build_s,
                   cache_build_samples=len(s.ds))
    times = interleave({k: (lambda k=k: s.step(k)) for k in KINDS}, rounds, warmup=1,
                       after=lambda k, t: log(f"  {k} {t * 1e3:.0f} ms"))
    for k in KINDS:
        record.add("cache", case, k, times[k], baseline=BASELINE, batch_size=s.batch_size, images=s.batch_size,
                   extra=setting)
    read_times = interleave({"read": s.read_cache}, reads, warmup=2)["read"]
    record.add("cache", case, "cache_read_one_batch", read_times, batch_size=s.batch_size, images=s.batch_size,
               label="cache read of one batch", extra=setting)
    log(record.format())
    log(f"cache build of {len(s.ds)} samples x 1 view: {s.build_s:.1f} s")
    if encodings:
        for r in int8_error(s.ds, _teachers(s.teachers), s.teachers):
            record.add("cache_encoding", r["map_shape"], f"int8 {r['teacher']}", extra=r)
        for r in topk_error(1000, [5, 10, 20, 50], [0.3, 0.6, 0.9]) + topk_error(100, [5, 10, 20], [0.6, 0.9]):
            record.add("cache_encoding", f"K={r['K']} p_top1={r['teacher_top1_prob']}", f"top-{r['k']}", extra=r)
        log(_format_encodings(record))
    return record


def _format_encodings(record: Record) -> str:
    import json

    lines = ["encodings (errors against float32 teacher outputs):"]
    for r in record.rows:
        if r["benchmark"] != "cache_encoding":
            continue
        e = json.loads(r["extra"])
        if "int8_rel_rms_error" in e:
            lines.append(f"  {e['teacher']:<14} {e['map_shape']:<9} "
                         f"rel RMS error int8 {e['int8_rel_rms_error']:.4f} "
                         f"(float16 {e['float16_rel_rms_error']:.5f}); |rel change| of MSE term int8 "
                         f"{e['int8_mse_term_rel_change_mean']:.4f} "
                         f"(float16 {e['float16_mse_term_rel_change_mean']:.5f})")
        else:
            lines.append(f"  K={e['K']:<5} k={e['k']:<3} p_top1={e['teacher_top1_prob']:<4} "
                         f"KL {e['kl_rel_error_mean']:.4f}"
                         f"  dKL/dz {e['kl_grad_rel_error']:.4f}  TCE abs err {e['teacher_ce_abs_error_mean']:.4f} "
                         f"(TCE {e['teacher_ce_mean']:.3f})  bytes {e['bytes_per_sample_topk']} vs "
                         f"{e['bytes_per_sample_full']}")
    return "\n".join(lines)
