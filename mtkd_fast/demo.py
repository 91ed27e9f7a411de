"""The demo (``mtkd-fast demo``, ``make demo``): distil one small student from several teachers on the bundled
Fashion-MNIST subset with no distillation, AVER, CA-MKD and MTKD-RL, and show the result.

Stages:
1. teachers: three small CNNs of different families, each trained with cross-entropy on a larger part of the
   training set than the student sees (or re-used from the teacher folder when an earlier demo trained them with
   the very same recipe and the checkpoint's sha256 still matches); their test top-1 is measured.
2. cache: the teachers' logits, embeddings and feature maps over the student's training set under V augmentation
   views (``mtkd_fast.cache``), so no student run pays for teacher forward passes.
3. students: the same student, from the same seeds, with every method; all share every hyper-parameter (nothing
   is selected on the test set; the reported number is the LAST epoch's test top-1, not the best one).
4. results: a table (printed and in ``summary.txt``), CSV files, PNG plots (accuracy curves, the teacher weights
   MTKD-RL's agent chose), checkpoints.

``run_demo(DemoSettings(...), out_dir)`` is the whole job; ``DemoSettings.quick()`` the few-steps version CI runs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import io
import json
import math
import os
import platform
import shutil
import statistics
import time
from dataclasses import dataclass
from typing import Optional

import torch

from ._io import file_sha256, write_bytes_atomic, write_csv_atomic, write_json_atomic
from ._optional import write_figure_atomic

__all__ = ["DemoSettings", "run_demo", "default_teacher_dir", "METHODS", "METHOD_LABELS"]

METHODS = ("none", "aver", "camkd", "mtkd_rl")
METHOD_LABELS = {"none": "no distillation", "aver": "AVER", "camkd": "CA-MKD", "mtkd_rl": "MTKD-RL"}
TEACHER_RECIPE_FORMAT = 1


@dataclass
class DemoSettings:
    """Everything that decides the demo's numbers. The same student hyper-parameters serve every method."""

    # teachers: different families (residual, wide residual, inverted residual) so that they disagree usefully;
    # the half-width MobileNetV2, whose embedding is the pooled feats[-2] as MTKD-RL's cosine state needs (the
    # authors' width-1.0 ``MobileNetV2`` pools a map other than its feats[-2], and its forward pass takes several
    # times as long on a CPU)
    teachers: tuple = ("resnet20", "wrn_16_1", "MobileNetV2_0_5")
    teacher_per_class: int = 300  # training images per class the teachers learn from (the student sees fewer)
    teacher_epochs: int = 4
    # the student: small, on a small subset (room to overfit, where distillation helps most)
    student: str = "resnet8"
    student_per_class: int = 50
    epochs: int = 20
    seeds: tuple = (0, 1, 2)
    methods: tuple = METHODS
    views: int = 10  # augmentation views in the teacher cache; epoch e replays view e mod views
    batch_size: int = 64
    lr: float = 0.05
    weight_decay: float = 5e-4
    eval_every: int = 4  # test evaluations cost as much as training here; the last epoch is always evaluated
    test_per_class: Optional[int] = None  # None: the whole bundled test split (200 per class)
    max_steps_per_epoch: Optional[int] = None  # cut every epoch short (the quick demo)
    data_seed: int = 0  # the augmentation seed of the student's views (the cache is built for it)
    # the teachers' precision in the cache every method reads; "auto" resolves as `mtkd-fast cache build` does
    # (mtkd_fast.teachers.resolve_precision): what a training run's auto accepts for every method
    teacher_precision: str = "auto"
    device: str = "auto"

    @classmethod
    def quick(cls, **changes) -> "DemoSettings":
        """A few steps per stage: every artefact is written, nothing is meaningful (CI's smoke test)."""
        values = dict(teacher_per_class=16, teacher_epochs=1, student_per_class=8, epochs=2, seeds=(0,), views=2,
                      eval_every=1, test_per_class=10, max_steps_per_epoch=2, batch_size=16)
        values.update(changes)
        return cls(**values)

    def validate(self) -> "DemoSettings":
        from .models import list_models

        valid = set(list_models())
        for what, name in [("student", self.student)] + [(f"teachers[{i}]", t) for i, t in enumerate(self.teachers)]:
            if name not in valid:
                raise ValueError(f"{what}: unknown model {name!r}; valid names: {', '.join(sorted(valid))}")
        if len(self.teachers) < 2:
            raise ValueError(f"teachers: expected at least 2 teachers, got {list(self.teachers)}")
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise ValueError(f"methods: expected a non-empty subset of {list(METHODS)}, got {list(self.methods)}")
        if not self.seeds or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in self.seeds):
            raise ValueError(f"seeds: expected one or more non-negative integers, got {list(self.seeds)}")
        for name in ("teacher_per_class", "teacher_epochs", "student_per_class", "epochs", "batch_size", "eval_every",
                     "views"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive integer, got {value!r}")
        from .teachers import PRECISIONS

        if self.teacher_precision not in PRECISIONS:
            raise ValueError(f"teacher_precision: expected one of {list(PRECISIONS)}, got {self.teacher_precision!r}")
        for name in ("test_per_class", "max_steps_per_epoch"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name}: expected a positive integer or None, got {value!r}")
        return self


def default_teacher_dir() -> str:
    """Where trained demo teachers are kept for the next demo: ``$XDG_CACHE_HOME/mtkd_fast/demo-teachers``
    (``~/.cache/mtkd_fast/demo-teachers`` by default)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "mtkd_fast", "demo-teachers")


# ---------------------------------------------------------------------------------------------- helpers
def _say(text: str) -> None:
    print(text, flush=True)


def _mean_std(values: list[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else 0.0)


def _resolve_device(device: str) -> torch.device:
    from .train.distributed import resolve_device

    return resolve_device(device, 0)


# ---------------------------------------------------------------------------------------------- 1. teachers
def _teacher_recipe(settings: DemoSettings, arch: str, index: int, fingerprint: str) -> dict:
    """Everything a teacher's weights depend on; its sha256 names the teacher's folder."""
    import mtkd_fast

    from .train import teacher_config

    return {"format": TEACHER_RECIPE_FORMAT, "arch": arch, "seed": 1000 + index, "dataset": "bundled",
            "train_fingerprint": fingerprint, "limit_per_class": settings.teacher_per_class,
            "epochs": settings.teacher_epochs, "lr": teacher_config(arch).lr, "batch_size": settings.batch_size,
            "max_steps_per_epoch": settings.max_steps_per_epoch, "schedule": "cosine", "weight_decay": 5e-4,
            "torch": torch.__version__.split("+")[0], "mtkd_fast": mtkd_fast.__version__}


def _recipe_hash(recipe: dict) -> str:
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


def _reusable_teacher(folder: str, recipe: dict) -> Optional[str]:
    """The checkpoint in ``folder`` if it was trained with ``recipe`` and its sha256 is the one recorded."""
    info_path, ckpt = os.path.join(folder, "recipe.json"), os.path.join(folder, "teacher.pth")
    if not (os.path.isfile(info_path) and os.path.isfile(ckpt)):
        return None
    try:
        with open(info_path) as f:
            info = json.load(f)
    except (OSError, ValueError):
        return None
    if info.get("recipe") != recipe or info.get("sha256") != file_sha256(ckpt):
        return None
    return ckpt


def _train_or_load_teacher(settings: DemoSettings, arch: str, index: int, fingerprint: str, teacher_dir: str,
                           device: torch.device, retrain: bool) -> tuple[str, str]:
    """(checkpoint path, "reused" | "trained")."""
    from .train import train_teacher

    recipe = _teacher_recipe(settings, arch, index, fingerprint)
    folder = os.path.join(teacher_dir, f"{arch}-{_recipe_hash(recipe)}")
    found = None if retrain else _reusable_teacher(folder, recipe)
    if found is not None:
        return found, "reused"
    run_dir = os.path.join(folder, "run")
    with contextlib.redirect_stdout(io.StringIO()) as log:  # per-epoch lines go to the run's log; tqdm stays
        result = train_teacher(arch, dataset="bundled", limit_per_class=settings.teacher_per_class,
                               epochs=settings.teacher_epochs, lr=recipe["lr"], batch_size=settings.batch_size,
                               schedule="cosine", seed=recipe["seed"], max_steps_per_epoch=settings.max_steps_per_epoch,
                               eval_every=settings.teacher_epochs, device=str(device), out_dir=run_dir, log_every=10,
                               overwrite=True)  # a run here is one the demo found not reusable
    write_bytes_atomic(os.path.join(run_dir, "train.log"), log.getvalue().encode())
    ckpt = os.path.join(folder, "teacher.pth")
    # the LAST epoch's weights: picking the best epoch would select on the test split
    shutil.copyfile(os.path.join(result["out_dir"], "student_last.pth"), ckpt + ".tmp")
    os.replace(ckpt + ".tmp", ckpt)
    write_json_atomic(os.path.join(folder, "recipe.json"), {"recipe": recipe, "sha256": file_sha256(ckpt)})
    return ckpt, "trained"


# ---------------------------------------------------------------------------------------------- 3. students
def _student_run(settings: DemoSettings, method: str, seed: int, train_set, test_loader, cache_dir: str,
                 teacher_models: list, device: torch.device, out_dir: str) -> dict:
    """One student run through ``Trainer.fit``; returns its result (history, paths)."""
    from . import data, models
    from .cache import open_teacher_source
    from .train import TrainConfig, Trainer
    from .train.run import build_student_side
    from .train.strategies import get_strategy
    from .train.trainer import CHECKPOINT_BEST, STUDENT_BEST

    config = TrainConfig(student=settings.student, teachers=list(settings.teachers) if method != "none" else [],
                         teacher_cache=cache_dir if method != "none" else None, dataset="bundled",
                         limit_per_class=settings.student_per_class, strategy=method, epochs=settings.epochs,
                         batch_size=settings.batch_size, lr=settings.lr, weight_decay=settings.weight_decay,
                         schedule="cosine", seed=seed, data_seed=settings.data_seed,
                         max_steps_per_epoch=settings.max_steps_per_epoch, device=str(device), out_dir=out_dir,
                         eval_every=settings.eval_every, log_every=10**6,
                         progress=True)  # an epoch bar on stderr; the epoch lines go to train.log
    num_classes = int(train_set.num_classes)
    source = teacher_shapes = embedding_dims = None
    if method != "none":
        source = open_teacher_source(cache_dir, teachers=teacher_models, device=device, dataset=train_set)
        layout = source.manifest["teachers"]
        teacher_shapes = [tuple(t["feature_map_shape"]) for t in layout]
        embedding_dims = [int(t["embedding_dim"]) for t in layout]
    # train's own builder: the same student initialisation for every method, and config.json rebuilds this run
    student, feature_transfer, agent = build_student_side(config, num_classes, device, train_set.image_shape,
                                                          teacher_shapes, embedding_dims)
    heads = [models.classifier_head(t) for t in teacher_models] if get_strategy(method).needs_teacher_heads else None
    trainer = Trainer(config, student, source, feature_transfer, agent, device=device, teacher_heads=heads)

    def make_train_loader(epoch: int):
        train_set.set_view(trainer.view_for_epoch(epoch))
        return data.build_loader(train_set, settings.batch_size, shuffle=True, seed=seed, epoch=epoch,
                                 device=str(device))

    with contextlib.redirect_stdout(io.StringIO()) as log:
        result = trainer.fit(make_train_loader, test_loader, out_dir)
    write_bytes_atomic(os.path.join(out_dir, "train.log"), log.getvalue().encode())
    # the trainer's "best" files are picked on the evaluation split, which is the test split here: not kept
    for name in (CHECKPOINT_BEST, STUDENT_BEST):
        if os.path.exists(os.path.join(out_dir, name)):
            os.remove(os.path.join(out_dir, name))
    write_json_atomic(os.path.join(out_dir, "config.json"), config.to_dict())
    return result


# ---------------------------------------------------------------------------------------------- 4. results
def _plot_curves(curves: list[dict], methods: tuple, path: str) -> None:
    from ._optional import pyplot

    plt = pyplot("the accuracy-curves plot")
    if plt is None:
        return

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for method in methods:
        rows = [r for r in curves if r["method"] == method]
        for ax, key, title in ((axes[0], "test_top1", "student test top-1 (%)"),
                               (axes[1], "train_loss", "student training loss")):
            points = sorted({r["epoch"] for r in rows if isinstance(r.get(key), float) and math.isfinite(r[key])})
            if not points:
                continue
            stats = [_mean_std([r[key] for r in rows if r["epoch"] == e and isinstance(r.get(key), float)])
                     for e in points]
            mean = [s[0] for s in stats]
            line, = ax.plot(points, mean, marker="o", ms=3, label=METHOD_LABELS[method])
            if len({r["seed"] for r in rows}) > 1:
                ax.fill_between(points, [m - s[1] for m, s in zip(mean, stats)],
                                [m + s[1] for m, s in zip(mean, stats)],
                                color=line.get_color(), alpha=0.15)
            ax.set_title(title + (" (mean, band: ±1 std over seeds)" if key == "test_top1" else ""), fontsize=9)
            ax.set_xlabel("epoch")
            ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    write_figure_atomic(fig, path)


def _mean_rows(curves: list[dict], method: str, keys: list) -> list[dict]:
    """One row per epoch of ``method``'s runs: each of ``keys`` averaged over the seeds (NaN where none is
    finite)."""
    rows = [r for r in curves if r["method"] == method]
    out = []
    for e in sorted({r["epoch"] for r in rows}):
        at = [r for r in rows if r["epoch"] == e]
        row = {"epoch": e}
        for k in keys:
            values = [r[k] for r in at if isinstance(r.get(k), float) and math.isfinite(r[k])]
            row[k] = statistics.fmean(values) if values else float("nan")
        out.append(row)
    return out


def _plot_weights(curves: list[dict], teachers: tuple, path: str) -> None:
    """Mean logit / feature weight per teacher and epoch that MTKD-RL used (CA-MKD's, dashed, for comparison)."""
    from .train.diagnostics import WeightCurve, plot_teacher_weights, teacher_labels

    labels = teacher_labels(teachers, len(teachers))
    keys = [f"{k}_{label}" for k in ("wl", "wf") for label in labels]
    plot_teacher_weights([WeightCurve(METHOD_LABELS["mtkd_rl"], _mean_rows(curves, "mtkd_rl", keys), 1),
                          WeightCurve(METHOD_LABELS["camkd"], _mean_rows(curves, "camkd", keys))], labels, path,
                         title="teacher weights, mean over seeds")


def _plot_agent_diagnostics(curves: list[dict], teachers: tuple, path: str) -> None:
    """MTKD-RL's weight diagnostics per epoch (``mtkd_fast.train.diagnostics``), averaged over the seeds."""
    from .train.diagnostics import plot_diagnostics, teacher_labels

    keys = sorted({k for r in curves if r["method"] == "mtkd_rl" for k in r if k.startswith("diag_")})
    plot_diagnostics(_mean_rows(curves, "mtkd_rl", keys), teacher_labels(teachers, len(teachers)), path,
                     title="MTKD-RL's teacher weights, mean over seeds (epoch 1 = warm-up: weight 1 per teacher)")


def _format_table(teacher_rows: list[dict], method_rows: list[dict], n_seeds: int) -> str:
    lines = ["teachers (test top-1, last epoch):"]
    for r in teacher_rows:
        lines.append(f"  {r['teacher']:<14} {r['test_top1']:6.2f}%   "
                     f"({r['source']}, {r['train_images']} training images)")
    spread = "mean ± std over " + (f"{n_seeds} seeds" if n_seeds > 1 else "1 seed")
    lines += ["", f"student (test top-1 after the last epoch, {spread}):",
              f"  {'method':<16} {'top-1 %':>16} {'vs none':>8} {'epoch s':>8}"]
    for r in method_rows:
        top1 = f"{r['top1_mean']:.2f} ± {r['top1_std']:.2f}"
        gain = r["gain_vs_none"]
        gain_text = f"{gain:+8.2f}" if math.isfinite(gain) else f"{'-':>8}"  # no "none" run to compare with
        lines.append(f"  {r['label']:<16} {top1:>16} {gain_text} {r['epoch_time_s']:8.2f}")
    return "\n".join(lines)


def _verdict(method_rows: list[dict]) -> str:
    by = {r["method"]: r for r in method_rows}
    if "mtkd_rl" not in by or "aver" not in by:
        return ""
    rl, av = by["mtkd_rl"], by["aver"]
    diff = rl["top1_mean"] - av["top1_mean"]
    noise = max(rl["top1_std"], av["top1_std"])
    if diff > 0:
        text = f"MTKD-RL beat AVER on this data by {diff:.2f} points"
        if diff <= noise:
            text += f" (within the seed spread of {noise:.2f}: not a clear win)"
    else:
        text = (f"MTKD-RL did NOT beat AVER on this data ({rl['top1_mean']:.2f}% vs {av['top1_mean']:.2f}%, "
                f"{diff:+.2f} points)")
    return text + "."


# ---------------------------------------------------------------------------------------------- the job
def run_demo(settings: DemoSettings, out_dir: str = "results/demo", teacher_dir: Optional[str] = None,
             retrain_teachers: bool = False) -> dict:
    """Run the whole demo into ``out_dir``; teachers are kept in (and re-used from) ``teacher_dir``
    (default :func:`default_teacher_dir`). Returns the table's rows, the verdict and the artefact paths."""
    from . import data, models
    from .cache import build_cache
    from .train import evaluate

    settings.validate()
    start = time.perf_counter()
    device = _resolve_device(settings.device)
    teacher_dir = teacher_dir or default_teacher_dir()
    os.makedirs(out_dir, exist_ok=True)
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    machine = (f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__} "
               f"({torch.get_num_threads()} threads), device {device}")
    _say(f"mtkd-fast demo: {when}; {machine}")
    _say(f"results -> {os.path.abspath(out_dir)}; teachers kept in {teacher_dir}")
    stage_times = {}

    teacher_train = data.build_dataset("bundled", split="train", augment=True, seed=0,
                                       limit_per_class=settings.teacher_per_class)
    test_limit = {"limit_per_class": settings.test_per_class} if settings.test_per_class else {}
    test_set = data.build_dataset("bundled", split="test", augment=False, **test_limit)
    test_loader = data.build_loader(test_set, 256, shuffle=False, device=str(device))
    num_classes = int(test_set.num_classes)

    # 1. teachers
    t0 = time.perf_counter()
    _say(f"[1/4] teachers {', '.join(settings.teachers)}: {len(teacher_train)} training images, "
         f"{settings.teacher_epochs} epochs each (re-used when an earlier demo trained the same recipe)")
    teacher_models, teacher_rows, teacher_ckpts = [], [], []
    os.makedirs(os.path.join(out_dir, "teachers"), exist_ok=True)
    for index, arch in enumerate(settings.teachers):
        ckpt, how = _train_or_load_teacher(settings, arch, index, teacher_train.fingerprint, teacher_dir, device,
                                           retrain_teachers)
        model = models.create_model(arch, num_classes)
        models.load_checkpoint(model, ckpt)
        model = model.to(device).eval()
        top1 = evaluate(model, test_loader, device)["top1"]
        copy = os.path.join(out_dir, "teachers", f"t{index}_{arch}.pth")
        shutil.copyfile(ckpt, copy)
        teacher_models.append(model)
        teacher_ckpts.append(copy)
        teacher_rows.append({"index": index, "teacher": arch, "test_top1": top1, "source": how,
                             "train_images": len(teacher_train), "checkpoint": copy, "kept_at": ckpt})
        _say(f"  teacher {index} {arch}: test top-1 {top1:.2f}% ({how})")
    stage_times["teachers"] = time.perf_counter() - t0

    # 2. teacher-output cache over the student's training set
    t0 = time.perf_counter()
    student_train = data.build_dataset("bundled", split="train", augment=True, seed=settings.data_seed,
                                       limit_per_class=settings.student_per_class)
    cache_dir = os.path.join(out_dir, "teacher_cache")
    if os.path.isdir(cache_dir):  # always rebuilt: cheap, and the teachers may have changed
        shutil.rmtree(cache_dir)
    V = settings.views
    _say(f"[2/4] teacher-output cache: {len(settings.teachers)} teachers x {len(student_train)} images x {V} views "
         f"-> {cache_dir}")
    manifest = build_cache(cache_dir, student_train, teacher_models, views=V, teacher_names=list(settings.teachers),
                           checkpoints=teacher_ckpts, device=device, progress=True,
                           teacher_precision=settings.teacher_precision)
    _say(f"  teachers ran in {manifest['teacher_precision']} (--teacher-precision {settings.teacher_precision})")
    stage_times["cache"] = time.perf_counter() - t0

    # 3. students
    t0 = time.perf_counter()
    runs = [(m, s) for s in settings.seeds for m in settings.methods]
    _say(f"[3/4] student {settings.student} on {len(student_train)} training images, {settings.epochs} epochs, "
         f"methods {', '.join(METHOD_LABELS[m] for m in settings.methods)}, seeds {list(settings.seeds)} "
         f"({len(runs)} runs, identical hyper-parameters)")
    run_rows, curves = [], []
    for k, (method, seed) in enumerate(runs, 1):
        run_dir = os.path.join(out_dir, "runs", method, f"seed{seed}")
        r0 = time.perf_counter()
        result = _student_run(settings, method, seed, student_train, test_loader, cache_dir, teacher_models, device,
                              run_dir)
        history = result["history"]
        final = history[-1]
        epoch_times = [row["time_s"] for row in history]
        run_rows.append({"method": method, "seed": seed, "test_top1": final["val_top1"],
                         "train_top1": final["train_top1"], "epoch_time_s": statistics.median(epoch_times),
                         "wall_s": time.perf_counter() - r0, "checkpoint": os.path.join(run_dir, "student_last.pth")})
        for row in history:
            curve = {"method": method, "seed": seed, "epoch": row["epoch"], "test_top1": row.get("val_top1"),
                     "train_top1": row["train_top1"], "train_loss": row["train_loss"], "time_s": row["time_s"]}
            curve.update({k2: v for k2, v in row.items() if k2.startswith(("wl_", "wf_", "diag_"))})
            curves.append(curve)
        _say(f"  [{k}/{len(runs)}] {METHOD_LABELS[method]:<16} seed {seed}: test top-1 {final['val_top1']:6.2f}%  "
             f"(train top-1 {final['train_top1']:.1f}%, {statistics.median(epoch_times):.2f} s/epoch, "
             f"{time.perf_counter() - r0:.0f} s)")
    stage_times["students"] = time.perf_counter() - t0

    # 4. results
    method_rows = []
    none_mean = None
    for method in settings.methods:
        rows = [r for r in run_rows if r["method"] == method]
        mean, std = _mean_std([r["test_top1"] for r in rows])
        if method == "none":
            none_mean = mean
        method_rows.append({"method": method, "label": METHOD_LABELS[method], "top1_mean": mean, "top1_std": std,
                            "seeds": len(rows), "epoch_time_s": statistics.fmean(r["epoch_time_s"] for r in rows)})
    for r in method_rows:
        r["gain_vs_none"] = r["top1_mean"] - none_mean if none_mean is not None else float("nan")
    verdict = _verdict(method_rows)
    table = _format_table(teacher_rows, method_rows, len(settings.seeds))
    paths = {"summary": os.path.join(out_dir, "summary.txt"), "methods_csv": os.path.join(out_dir, "methods.csv"),
             "runs_csv": os.path.join(out_dir, "runs.csv"), "teachers_csv": os.path.join(out_dir, "teachers.csv"),
             "curves_csv": os.path.join(out_dir, "curves.csv"),
             "accuracy_png": os.path.join(out_dir, "accuracy_curves.png"),
             "weights_png": os.path.join(out_dir, "teacher_weights.png"),
             "diagnostics_png": os.path.join(out_dir, "agent_diagnostics.png"),
             "json": os.path.join(out_dir, "demo.json")}
    write_csv_atomic(paths["methods_csv"], method_rows)
    write_csv_atomic(paths["runs_csv"], run_rows)
    write_csv_atomic(paths["teachers_csv"], teacher_rows)
    write_csv_atomic(paths["curves_csv"], curves)
    _plot_curves(curves, settings.methods, paths["accuracy_png"])
    if "mtkd_rl" in settings.methods:
        _plot_weights(curves, settings.teachers, paths["weights_png"])
        _plot_agent_diagnostics(curves, settings.teachers, paths["diagnostics_png"])
    else:
        paths.pop("weights_png")
        paths.pop("diagnostics_png")
    total = time.perf_counter() - start
    stage_times["total"] = total
    timing = ", ".join(f"{k} {v:.0f} s" for k, v in stage_times.items())
    text = (f"mtkd-fast demo, {when}; {machine}\n"
            f"student {settings.student}: {len(student_train)} training images; teachers: {len(teacher_train)}; "
            f"test: {len(test_set)} images\n\n{table}\n\n{verdict}\nwall time: {timing}\n")
    write_bytes_atomic(paths["summary"], text.encode())
    write_json_atomic(paths["json"], {"date": when, "machine": machine, "settings": dataclasses.asdict(settings),
                                "teachers": teacher_rows, "methods": method_rows, "runs": run_rows,
                                "verdict": verdict, "stage_times_s": stage_times, "paths": paths})
    _say(f"[4/4] results in {out_dir}: summary.txt, methods.csv, runs.csv, teachers.csv, curves.csv, "
         f"accuracy_curves.png{', teacher_weights.png, agent_diagnostics.png' if 'weights_png' in paths else ''}, "
         "teachers/, runs/ "
         "(checkpoints)")
    # the demo's result (the table, the verdict, the time) on stdout, its progress above on stderr (cli.main)
    from .commands._output import emit

    emit("", table, "", *([verdict] if verdict else []), f"wall time: {timing}")
    return {"teachers": teacher_rows, "methods": method_rows, "runs": run_rows, "verdict": verdict, "table": table,
            "stage_times_s": stage_times, "paths": paths, "out_dir": out_dir}
