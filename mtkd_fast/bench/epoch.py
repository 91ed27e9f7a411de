"""The epoch-cost benchmark: the same data, student, teachers and batch size through every configuration.

Timing runs in this process, the configurations interleaved repetition by repetition (the order rotates, so
none always runs first or last after another), each repetition one "epoch" of ``steps`` steps plus the
epoch-end work (the agent update); medians over repetitions. Peak memory comes from one fresh process per
configuration (the peak RSS of a process only grows, and configurations sharing one process would share
it): process peak RSS on the CPU, ``torch.cuda.max_memory_allocated`` on a GPU.

Models start from random weights and the images are random: the time of a step does not depend on either,
and every configuration does its real work (teacher forwards, losses, agent, optimiser steps).
"""

from __future__ import annotations

import copy
import os
import resource
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch

from .record import interleave, load_average, run_info, summarize

CONFIGS = ("student_only", "aver", "ebkd", "camkd", "mtkd_rl_authors", "mtkd_rl_live", "mtkd_rl_cached")
CONFIG_LABELS = {
    "student_only": "student only (CE)",
    "aver": "AVER",
    "ebkd": "EB-KD",
    "camkd": "CA-MKD",
    "mtkd_rl_authors": "MTKD-RL, authors' way",
    "mtkd_rl_live": "MTKD-RL, mtkd_fast, live teachers",
    "mtkd_rl_cached": "MTKD-RL, mtkd_fast, teacher cache",
}
_STRATEGY = {"student_only": "none", "aver": "aver", "ebkd": "ebkd", "camkd": "camkd", "mtkd_rl_live": "mtkd_rl",
             "mtkd_rl_cached": "mtkd_rl"}


@dataclass(frozen=True)
class Setting:
    """A benchmark setting: image size, classes, teachers, students and the default batch size."""

    image_size: int
    num_classes: int
    teachers: tuple
    students: tuple
    batch_size: int
    mean: tuple = (0.5071, 0.4867, 0.4408)
    std: tuple = (0.2675, 0.2565, 0.2761)


SETTINGS = {
    # docs/method.md section 8's CIFAR-100 teachers; two of its students
    "cifar": Setting(32, 100, ("RegNetY_400MF", "RegNetX_400MF", "resnet32x4", "wrn_28_4"),
                     ("ShuffleV2", "resnet56"), 64),
    "imagenet": Setting(224, 1000, ("imagenet_resnet34", "imagenet_resnet50", "imagenet_resnet101"),
                        ("imagenet_resnet18",), 256, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


@dataclass
class BenchSpec:
    """What one ``mtkd-fast bench epoch`` invocation measures (resolved from the CLI options)."""

    setting: str = "cifar"
    students: Sequence[str] = ()
    teachers: Sequence[str] = ()
    steps: int = 10
    repetitions: int = 3
    batch_size: int = 0  # 0: the setting's
    configs: Sequence[str] = CONFIGS
    device: str = "auto"
    memory_steps: int = 2
    seed: int = 0
    amp: Optional[str] = None
    channels_last: bool = False
    teacher_precision: str = "auto"  # the live teachers' engine (mtkd_fast.teachers.LiveTeachers)
    teacher_compile: bool = False
    fold_bn: bool = True
    progress: bool = True
    extra: dict = field(default_factory=dict)

    def resolved(self) -> "BenchSpec":
        if self.setting not in SETTINGS:
            raise ValueError(f"setting: expected one of {sorted(SETTINGS)}, got {self.setting!r}")
        s = SETTINGS[self.setting]
        spec = copy.copy(self)
        spec.students = tuple(self.students) or s.students
        spec.teachers = tuple(self.teachers) or s.teachers
        spec.batch_size = int(self.batch_size) or s.batch_size
        spec.configs = tuple(self.configs)
        spec.device = _resolve_device(self.device)
        for name in ("steps", "repetitions", "batch_size"):
            if int(getattr(spec, name)) < 1:
                raise ValueError(f"{name}: expected a positive integer, got {getattr(spec, name)!r}")
        if spec.memory_steps < 0:
            raise ValueError(f"memory_steps: expected an integer >= 0, got {spec.memory_steps!r}")
        unknown = [c for c in spec.configs if c not in CONFIGS]
        if unknown or not spec.configs:
            raise ValueError(f"configs: expected a non-empty subset of {list(CONFIGS)}, got {list(spec.configs)}")
        if len(spec.teachers) < 2:
            raise ValueError(f"teachers: expected at least 2 teachers, got {list(spec.teachers)}")
        from .. import models

        for what, name in [("students", n) for n in spec.students] + [("teachers", n) for n in spec.teachers]:
            if not models.is_model(name):
                raise ValueError(f"{what}: unknown model {name!r}; valid names: {', '.join(models.list_models())}, "
                                 "or timm:<a timm model>")
        if spec.amp not in (None, "bf16", "fp16"):
            raise ValueError(f"amp: expected None, 'bf16' or 'fp16', got {spec.amp!r}")
        from ..teachers import resolve_precision

        resolve_precision(spec.teacher_precision, spec.device)  # a bad value fails here, naming the option
        return spec


def _resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device: {device!r} requested but torch.cuda.is_available() is False")
    if device != "cpu" and not device.startswith("cuda"):
        raise ValueError(f"device: expected 'auto', 'cpu' or 'cuda[:N]', got {device!r}")
    return device


# ---------------------------------------------------------------------------------------------- building
def random_dataset(spec: BenchSpec):
    """``steps * batch_size`` random uint8 images with random labels, as an in-memory dataset with the
    setting's augmentation (pad-4 random crop + flip, normalisation): the real loading work of a CIFAR epoch."""
    from ..data.arrays import ArrayDataset

    s = SETTINGS[spec.setting]
    n = spec.steps * spec.batch_size
    g = torch.Generator().manual_seed(spec.seed)
    images = torch.randint(0, 256, (n, 3, s.image_size, s.image_size), generator=g, dtype=torch.uint8).numpy()
    labels = torch.randint(0, s.num_classes, (n,), generator=g).numpy()
    return ArrayDataset(f"random-{spec.setting}", "train", images, labels, [str(k) for k in range(s.num_classes)],
                        s.mean, s.std, augment=True, seed=spec.seed, source=f"random seed {spec.seed}")


def build_teachers(spec: BenchSpec, device) -> list:
    from .. import models

    torch.manual_seed(spec.seed + 1)
    k = SETTINGS[spec.setting].num_classes
    return [models.create_model(n, k).to(device).eval().requires_grad_(False) for n in spec.teachers]


def build_student(spec: BenchSpec, name: str):
    from .. import models

    torch.manual_seed(spec.seed + 2)
    return models.create_model(name, SETTINGS[spec.setting].num_classes)


def _probe(spec: BenchSpec, ds, source, student, device):
    """Shapes the feature transfer and the agent are sized from: one small batch through both."""
    images, _, indices = ds.get_batch(torch.arange(2), device=device)
    out = source(images, indices, 0)
    was_training = student.training
    student.eval()
    with torch.no_grad():
        feats, _ = student.to(device)(images, is_feat=True)
    student.train(was_training)
    return tuple(feats[-2].shape[1:]), [tuple(f.shape[1:]) for f in out.feature_maps], \
        [int(e.shape[1]) for e in out.embeddings]


def _transfer_and_agent(spec: BenchSpec, student_shape, teacher_shapes, embed_dims):
    from .. import models
    from ..agent import MTKDAgent

    torch.manual_seed(spec.seed + 3)
    ft = models.FeatureTransfer(student_shape=student_shape, teacher_shapes=teacher_shapes)
    k = SETTINGS[spec.setting].num_classes
    agent = MTKDAgent([d + k + 3 for d in embed_dims], len(embed_dims))
    return ft, agent


class Run:
    """One configuration, ready to run epochs: ``epoch(ds, epoch_index)`` trains one pass over ``ds``."""

    def __init__(self, name: str, spec: BenchSpec, student_name: str, ds, teachers=None, cache_dir=None):
        from .. import models
        from ..teachers import LiveTeachers
        from ..train import Trainer
        from ..train.strategies import get_strategy

        self.name, self.spec, self.student_name = name, spec, student_name
        device = spec.device
        student = build_student(spec, student_name)
        self.authors = None
        self.teacher_precision = "-"
        if name == "student_only":
            cfg = self._config("none")
            self.trainer = Trainer(cfg, student, None, device=device)
            return
        if name == "mtkd_rl_cached":
            from ..cache import open_teacher_source

            # no teacher models: the cache holds every field
            source = open_teacher_source(cache_dir, device=device, verify="lazy")
        else:
            # the precision `mtkd-fast train` would run this strategy's teachers in (the shared resolver)
            strategy = "mtkd_rl" if name.startswith("mtkd_rl") else name
            source = LiveTeachers(teachers, precision=spec.teacher_precision, fold_bn=spec.fold_bn,
                                  compile=spec.teacher_compile, strategy=strategy)
        # what the teachers computed in, for the table
        self.teacher_precision = ("fp32 eager" if name == "mtkd_rl_authors" else
                                  f"cache ({source.teacher_precision})" if name == "mtkd_rl_cached" else
                                  source.precision_used + (" +fold" if source.fold_bn else "") +
                                  (" +NHWC" if source.channels_last else "") + (" +compile" if source.compile else ""))
        shapes = _probe(spec, ds, source, student, device)
        ft, agent = _transfer_and_agent(spec, *shapes)
        if name == "mtkd_rl_authors":
            from .authors import AuthorsMTKDRL

            self.authors = AuthorsMTKDRL(student, teachers, ft, agent, device=device)
            self.trainer = None
            return
        cfg = self._config(_STRATEGY[name])
        kind = get_strategy(_STRATEGY[name])  # what the strategy needs (its declaration in the registry)
        heads = [models.classifier_head(t) for t in teachers] if kind.needs_teacher_heads else None
        self.trainer = Trainer(cfg, student, source, ft, agent if kind.needs_agent else None,
                               device=device, teacher_heads=heads)

    def _config(self, strategy: str):
        from ..train import TrainConfig

        s = self.spec
        return TrainConfig(student=self.student_name, teachers=list(s.teachers), strategy=strategy,
                           batch_size=s.batch_size, device=s.device, amp=s.amp, channels_last=s.channels_last,
                           progress=False, seed=s.seed)

    @property
    def runner(self):
        return self.authors if self.authors is not None else self.trainer

    def begin_epoch(self, epoch_index: int, steps: int) -> None:
        """Start an epoch of ``steps`` steps (the replay buffer is sized by the first epoch's length)."""
        if self.authors is not None:
            self.authors.begin_epoch(epoch_index)
        else:
            self.trainer.begin_epoch(epoch_index, steps)

    def step(self, images, labels, indices) -> dict:
        """One training step on a batch of view 0 (the agent update included when it falls due)."""
        if self.authors is not None:
            return self.authors.train_step(images, labels)
        return self.trainer.train_step(images, labels, indices, 0)

    def epoch(self, ds, epoch_index: int, max_steps: Optional[int] = None) -> int:
        """One epoch (epoch index >= 1: past MTKD-RL's warm-up, so the agent acts) over ``ds`` in view 0, the
        epoch-end agent update included; waits for the device. Returns the number of images."""
        from ..data import build_loader

        spec = self.spec
        loader = build_loader(ds, spec.batch_size, shuffle=True, seed=spec.seed, epoch=epoch_index, drop_last=True,
                              device=spec.device)
        images_seen = 0
        self.begin_epoch(epoch_index, len(loader))
        for i, (images, labels, indices) in enumerate(loader):
            if max_steps is not None and i >= max_steps:
                break
            self.step(images, labels, indices)
            images_seen += int(images.shape[0])
        self.runner.end_epoch()
        _synchronize(spec.device)
        return images_seen


def _amp_dtype(amp):
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)


def _synchronize(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize(device)


def build_cache_for(spec: BenchSpec, ds, teachers, cache_dir: str, engine: bool = True) -> float:
    """Build the teacher cache over the benchmark's samples (one view); returns the seconds it took. ``engine``:
    the teachers run with the settings the configuration asks for; otherwise float32 eager, BatchNorm unfolded."""
    from ..cache import build_cache
    from ..teachers import LiveTeachers

    opts = dict(teacher_precision=spec.teacher_precision, fold_bn=spec.fold_bn, teacher_compile=spec.teacher_compile)
    if not engine:
        opts = {}
        teachers = LiveTeachers(teachers, precision="fp32", fold_bn=False, channels_last=False)
    t0 = time.perf_counter()
    build_cache(cache_dir, ds, teachers, views=1, teacher_names=list(spec.teachers), batch_size=spec.batch_size,
                device=spec.device, progress=False, **opts)
    _synchronize(spec.device)
    return time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------- memory
def _memory_child(spec: BenchSpec, name: str, student_name: str, cache_dir: Optional[str], queue) -> None:
    """In a fresh process: build configuration ``name`` and run ``memory_steps`` steps and the epoch end;
    report its peak memory."""
    try:
        torch.set_num_threads(spec.extra.get("threads", torch.get_num_threads()))
        ds = random_dataset(spec)
        ds.set_view(0)
        cuda = spec.device.startswith("cuda")
        teachers = build_teachers(spec, spec.device) if name not in ("student_only", "mtkd_rl_cached") else None
        run = Run(name, spec, student_name, ds, teachers, cache_dir)
        if cuda:
            torch.cuda.reset_peak_memory_stats(spec.device)
        run.epoch(ds, 1, max_steps=spec.memory_steps)
        peak_rss = peak_rss_bytes()
        peak_device = float(torch.cuda.max_memory_allocated(spec.device)) if cuda else float("nan")
        queue.put({"peak_rss_bytes": float(peak_rss), "peak_device_bytes": peak_device})
    except BaseException as exc:  # reported to the parent, which raises
        queue.put({"error": f"{type(exc).__name__}: {exc}"})


def peak_rss_bytes() -> float:
    """This process's peak resident set size: VmHWM of /proc/self/status (the high-water mark of this address
    space; ``ru_maxrss`` is no use in a spawned child, since Linux carries it over from the forking parent across
    exec), or ``ru_maxrss`` where /proc is missing."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return float(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale)


def measure_memory(spec: BenchSpec, name: str, student_name: str, cache_dir: Optional[str]) -> dict:
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_memory_child, args=(spec, name, student_name, cache_dir, queue))
    proc.start()
    result = queue.get()
    proc.join()
    if "error" in result:
        raise RuntimeError(f"memory measurement of {name!r} ({student_name}) failed: {result['error']}")
    return result


# ---------------------------------------------------------------------------------------------- the benchmark
def run_epoch_bench(spec: BenchSpec) -> dict:
    """Run the benchmark; returns {"rows": one dict per (student, configuration), "meta": machine and run facts,
    "cache_build_s": seconds or None}."""
    from tqdm.auto import tqdm

    spec = spec.resolved()
    spec.extra.setdefault("threads", torch.get_num_threads())
    device = spec.device
    meta = run_info(device, harness="mtkd-fast bench epoch")
    ds = random_dataset(spec)
    ds.set_view(0)
    needs_teachers = any(c not in ("student_only",) for c in spec.configs)
    teachers = build_teachers(spec, device) if needs_teachers else None
    tmp = tempfile.mkdtemp(prefix="mtkd_bench_cache_")
    cache_dir, cache_build_s, cache_build_fp32_s = None, None, None
    try:
        if "mtkd_rl_cached" in spec.configs:
            cache_dir = os.path.join(tmp, "cache")
            cache_build_fp32_s = build_cache_for(spec, ds, teachers, os.path.join(tmp, "cache_fp32"), engine=False)
            cache_build_s = build_cache_for(spec, ds, teachers, cache_dir)
        rows = []
        for student_name in spec.students:
            runs = {c: Run(c, spec, student_name, ds, teachers, cache_dir) for c in spec.configs}
            teacher_precision = {c: r.teacher_precision for c, r in runs.items()}
            for run in runs.values():  # warm-up: one step each (allocator, kernels, lazy checksum checks)
                run.epoch(ds, 1, max_steps=1)
            epochs = {c: iter(range(1, spec.repetitions + 1)) for c in spec.configs}
            seen = {}

            def one_epoch(c, runs=runs):
                seen[c] = runs[c].epoch(ds, next(epochs[c]))

            bar = tqdm(total=spec.repetitions * len(spec.configs), desc=f"bench {spec.setting} {student_name}",
                       unit="run", disable=not spec.progress, leave=False)

            def after(c, seconds):
                bar.set_postfix_str(f"{c} {seconds:.1f}s")
                bar.update(1)

            # run.epoch waits for the device itself
            times = interleave({c: (lambda c=c: one_epoch(c)) for c in spec.configs}, spec.repetitions, warmup=0,
                               after=after)
            images = seen[spec.configs[-1]]
            bar.close()
            del runs
            for c in spec.configs:
                mem = (measure_memory(spec, c, student_name, cache_dir) if spec.memory_steps > 0
                       else {"peak_rss_bytes": float("nan"), "peak_device_bytes": float("nan")})
                stats = summarize(times[c])
                rows.append({"setting": spec.setting, "student": student_name, "config": c,
                             "label": CONFIG_LABELS[c], "teacher_precision": teacher_precision[c],
                             "steps": spec.steps, "batch_size": spec.batch_size,
                             "images": images, "repetitions": spec.repetitions, **stats,
                             "images_per_s": images / stats["median_s"],
                             "peak_rss_mib": mem["peak_rss_bytes"] / 2**20,
                             "peak_device_mib": mem["peak_device_bytes"] / 2**20,
                             "times_s": " ".join(repr(t) for t in times[c])})
        add_ratios(rows, device)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    meta.update(threads=torch.get_num_threads(), load_end=load_average(), cache_build_s=cache_build_s,
                cache_build_fp32_s=cache_build_fp32_s, cache_samples=len(ds), memory_steps=spec.memory_steps,
                teachers=" ".join(spec.teachers), amp=spec.amp or "none", channels_last=spec.channels_last,
                teacher_precision=spec.teacher_precision, fold_bn=spec.fold_bn, teacher_compile=spec.teacher_compile)
    return {"rows": rows, "meta": meta, "targets": check_targets(rows, device)}


def memory_key(device: str) -> str:
    return "peak_device_mib" if str(device).startswith("cuda") else "peak_rss_mib"


def add_ratios(rows: list, device: str) -> None:
    """Per student: time and memory ratios to student-only and to AVER (NaN when those were not run)."""
    mkey = memory_key(device)
    for student in {r["student"] for r in rows}:
        mine = {r["config"]: r for r in rows if r["student"] == student}
        for r in mine.values():
            for base in ("student_only", "aver"):
                b = mine.get(base)
                r[f"time_x_{base}"] = r["median_s"] / b["median_s"] if b else float("nan")
                r[f"mem_x_{base}"] = r[mkey] / b[mkey] if b else float("nan")


def check_targets(rows: list, device: str) -> list:
    """The epoch-cost targets, per student: (what, value, met) with met None when a configuration is missing."""
    mkey = memory_key(device)
    out = []
    for student in dict.fromkeys(r["student"] for r in rows):
        mine = {r["config"]: r for r in rows if r["student"] == student}

        def ratio(a, b, key="median_s"):
            return mine[a][key] / mine[b][key] if a in mine and b in mine else float("nan")

        checks = [
            ("cached MTKD-RL time / student-only time <= 1.3", ratio("mtkd_rl_cached", "student_only"), 1.3, "le"),
            ("authors' MTKD-RL time / cached MTKD-RL time >= 5", ratio("mtkd_rl_authors", "mtkd_rl_cached"), 5.0, "ge"),
            ("authors' MTKD-RL time / live MTKD-RL time >= 2", ratio("mtkd_rl_authors", "mtkd_rl_live"), 2.0, "ge"),
            ("live MTKD-RL peak memory / AVER's <= 1", ratio("mtkd_rl_live", "aver", mkey), 1.0, "le"),
            ("cached MTKD-RL peak memory / AVER's <= 1", ratio("mtkd_rl_cached", "aver", mkey), 1.0, "le"),
        ]
        for what, value, bound, op in checks:
            met = None if not np.isfinite(value) else {"le": value <= bound, "ge": value >= bound,
                                                        "gt": value > bound}[op]
            out.append({"student": student, "target": what, "value": value, "met": met})
    return out


def machine_info(device: str) -> dict:
    """The run's metadata (:func:`mtkd_fast.bench.record.run_info`) with the thread count."""
    return {**run_info(device), "threads": torch.get_num_threads()}
