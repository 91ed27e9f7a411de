"""``mtkd-fast bench``: ``epoch`` (the cost of an epoch of each multi-teacher method, side by side), ``ops`` (the
distillation step per backend), ``teachers`` (the live-teacher engine's variants) and ``cache`` (a training step
with the teacher cache, live teachers and none). Each times its variants interleaved round by round and writes
``<what>_bench.csv`` in the benchmarks' one schema (``mtkd_fast.bench.record``) and a PNG to ``--out``."""

from __future__ import annotations

import argparse
import json
import os

from ._output import emit


def register(sub):
    p = sub.add_parser("bench", help="benchmarks: epoch | ops | teachers | cache (interleaved rounds, medians, "
                                     "ratios to the baseline; CSV + PNG in bench_results/)")
    verbs = p.add_subparsers(dest="bench_command", metavar="WHAT")
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])

    from ..bench.epoch import CONFIGS, SETTINGS

    e = verbs.add_parser(
        "epoch", help="wall time, images/s and peak memory of an epoch (or N steps) of: student only, AVER, EB-KD, "
                      "CA-MKD, MTKD-RL the authors' way, mtkd_fast MTKD-RL with live teachers and with the teacher "
                      "cache; interleaved repetitions, medians, ratios to student-only and AVER")
    e.add_argument("--setting", default="cifar", choices=sorted(SETTINGS),
                   help="cifar: 32x32, 100 classes, teachers RegNetY_400MF RegNetX_400MF resnet32x4 wrn_28_4, "
                        "students ShuffleV2 resnet56, batch 64; imagenet: 224x224, 1000 classes, teachers ResNet-34/50/"
                        "101, student ResNet-18, batch 256")
    e.add_argument("--steps", type=int, default=10,
                   help="steps per measured epoch (the random dataset has steps x batch-size samples; default 10)")
    e.add_argument("--repetitions", type=int, default=3, help="interleaved repetitions per configuration (median)")
    e.add_argument("--batch-size", type=int, default=None,
                   help="images per step (default: the setting's, cifar 64, imagenet 256)")
    e.add_argument("--students", nargs="+", default=None, metavar="ARCH",
                   help="student model names, space-separated, each benchmarked in turn (default: the setting's)")
    e.add_argument("--teachers", nargs="+", default=None, metavar="ARCH",
                   help="teacher model names, space-separated (default: the setting's)")
    e.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS), metavar="CONFIG",
                   help=f"which configurations, space-separated (default all: {' '.join(CONFIGS)})")
    e.add_argument("--memory-steps", type=int, default=2,
                   help="steps run in the fresh process that measures each configuration's peak memory (0: skip)")
    e.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto: CUDA when available)")
    e.add_argument("--amp", default=None, choices=["bf16", "fp16"],
                   help="autocast for the mtkd_fast configurations (the authors' way stays float32; default: none)")
    e.add_argument("--channels-last", action="store_true",
                   help="channels_last for the mtkd_fast configurations' students (default off)")
    e.add_argument("--teacher-precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="compute precision of the live teachers in the mtkd_fast configurations (default auto: "
                        "what `mtkd-fast train` picks for the strategy on this device)")
    e.add_argument("--teacher-compile", action=argparse.BooleanOptionalAction, default=False,
                   help="torch.compile the live teachers (default off)")
    e.add_argument("--fold-bn", action=argparse.BooleanOptionalAction, default=True,
                   help="fold the live teachers' BatchNorm into their convolutions (default on)")
    e.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    e.add_argument("--seed", type=int, default=0,
                   help="seed of the random dataset, the models' initialisation and the data order (default 0)")
    e.add_argument("--out", default="bench_results",
                   help="output directory for epoch_bench.csv/.png/.json/.md (default bench_results)")
    e.add_argument("--targets", action="store_true",
                   help="also print the project's epoch-cost targets, met or not (a development check)")
    e.add_argument("--no-progress", action="store_true", help="no progress bars")
    e.set_defaults(func=run_epoch)
    _register_ops(verbs)
    _register_teachers(verbs)
    _register_cache(verbs)


def run_epoch(args):
    import torch

    from .._io import write_bytes_atomic
    from .._validation import check_device_name
    from ..bench import BenchSpec, format_table, plot, run_epoch_bench, write_csv

    # an explicit --batch-size 0 is refused like train's (BenchSpec's 0 means "the setting's")
    if args.batch_size is not None and args.batch_size < 1:
        raise ValueError(f"--batch-size: expected a positive integer, got {args.batch_size}")
    check_device_name(args.device, "--device")
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads: expected a positive integer, got {args.threads}")
        torch.set_num_threads(args.threads)
    spec = BenchSpec(setting=args.setting, students=tuple(args.students or ()), teachers=tuple(args.teachers or ()),
                     steps=args.steps, repetitions=args.repetitions, batch_size=args.batch_size or 0,
                     configs=tuple(args.configs), device=args.device, memory_steps=args.memory_steps, seed=args.seed,
                     amp=args.amp, channels_last=args.channels_last, progress=not args.no_progress,
                     teacher_precision=args.teacher_precision, teacher_compile=args.teacher_compile,
                     fold_bn=args.fold_bn)
    result = run_epoch_bench(spec)
    table = format_table(result, targets=args.targets)
    m = result["meta"]
    header = (f"{m['device']} ({m['gpu'] or m['cpu']}), {m['threads']} threads, torch {m['torch']}, CUDA {m['cuda']}, "
              f"commit {m['commit']}; load average at the start {m['load_start']}, at the end {m['load_end']}")
    emit(header)
    emit(table)
    os.makedirs(args.out, exist_ok=True)
    paths = {k: os.path.join(args.out, f"epoch_bench.{k}") for k in ("csv", "png", "json", "md")}
    write_csv(result, paths["csv"])
    plot(result, paths["png"])
    write_bytes_atomic(paths["json"], json.dumps(result, indent=1, default=str).encode())
    write_bytes_atomic(paths["md"], (header + "\n\n" + table + "\n").encode())
    emit("wrote " + ", ".join(paths.values()))
    return 0


# ---------------------------------------------------------------------------------------------- ops, teachers, cache
_OUT_HELP = "output directory for {name}_bench.csv and .png (default bench_results)"


def _threads(value):
    if value is not None:
        import torch

        if value < 1:
            raise ValueError(f"--threads: expected a positive integer, got {value}")
        torch.set_num_threads(value)


def _names(value: str, valid, what: str) -> list:
    """A comma-separated list of names, each from ``valid``."""
    names = [v.strip() for v in value.split(",") if v.strip()]
    bad = [n for n in names if n not in valid]
    if bad or not names:
        raise ValueError(f"--{what}: expected a comma-separated list of {', '.join(valid)}; got {value!r}")
    return names


def _finish(record, out: str, name: str, title: str) -> int:
    from ..bench.record import plot_medians

    csv_path = record.write(os.path.join(out, f"{name}_bench.csv"))
    png = plot_medians(record, os.path.join(out, f"{name}_bench.png"), title)
    emit(f"{record.header()}, at the end {record.meta['load_end']}")
    emit("wrote " + ", ".join(p for p in (csv_path, png) if p))
    return 0


def _register_ops(verbs):
    from ..bench.ops import SHAPES, VARIANTS

    o = verbs.add_parser(
        "ops", help="the distillation step as the trainer runs it (mtkd_fast.train.step.distill_step: state, "
                    "weights, loss + gradients, reward) per backend, against the authors' way and the (compiled) "
                    "reference; ratios to the fused step and its byte floor")
    o.add_argument("--shapes", default=",".join(SHAPES),
                   help=f"comma-separated, from {', '.join(SHAPES)} (default all)")
    o.add_argument("--variants", default=",".join(VARIANTS),
                   help=f"comma-separated, from {', '.join(VARIANTS)} (default all; the ratios need fused)")
    o.add_argument("--rounds", type=int, default=None,
                   help="interleaved rounds per shape (default: " +
                        ", ".join(f"{k} {v['rounds']}" for k, v in SHAPES.items()) + ")")
    o.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (1 is robust when other jobs share the cores; default: torch's)")
    o.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (every timed call ends with a device sync)")
    o.add_argument("--out", default="bench_results", help=_OUT_HELP.format(name="ops"))
    o.set_defaults(func=run_ops)


def run_ops(args):
    from ..bench.ops import SHAPES, VARIANTS, run_ops_bench

    shapes = _names(args.shapes, list(SHAPES), "shapes")
    variants = _names(args.variants, list(VARIANTS), "variants")
    if args.rounds is not None and args.rounds < 1:
        raise ValueError(f"--rounds: expected a positive integer, got {args.rounds}")
    if args.device != "cpu" and not args.device.startswith("cuda"):
        raise ValueError(f"--device: expected 'cpu' or 'cuda[:N]', got {args.device!r}")
    _threads(args.threads)
    record = run_ops_bench(shapes, variants, args.rounds, args.device)
    return _finish(record, args.out, "ops", "distill_step per backend")


def _register_teachers(verbs):
    from ..bench.teachers import BATCH, TEACHERS, VARIANTS

    t = verbs.add_parser(
        "teachers", help="the live-teacher engine (mtkd_fast.teachers.LiveTeachers): the four-teacher CIFAR pool's "
                         "forward, float32 eager (the authors' way) against precision, BatchNorm folding, "
                         "channels_last and torch.compile; CPU")
    t.add_argument("--variants", default=",".join(v for v in VARIANTS if "compile" not in v),
                   help=f"comma-separated, from {', '.join(VARIANTS)} (default: all but the compiled ones, whose "
                        "first call takes minutes; fp32_eager, the baseline, always runs)")
    t.add_argument("--threads", default="1,2", help="comma-separated thread counts, each run in turn (default 1,2)")
    t.add_argument("--rounds", type=int, default=5, help="interleaved rounds per thread count (default 5)")
    t.add_argument("--batch-size", type=int, default=BATCH, help=f"images per forward (default {BATCH})")
    t.add_argument("--teachers", default=",".join(TEACHERS),
                   help="comma-separated model names (default the CIFAR pool: " + ", ".join(TEACHERS) + ")")
    t.add_argument("--out", default="bench_results", help=_OUT_HELP.format(name="teachers"))
    t.set_defaults(func=run_teachers)


def run_teachers(args):
    from .. import models
    from ..bench.teachers import VARIANTS, run_teachers_bench

    variants = _names(args.variants, list(VARIANTS), "variants")
    try:
        threads = [int(n) for n in args.threads.split(",") if n.strip()]
    except ValueError:
        threads = []
    if not threads or min(threads) < 1:
        raise ValueError(f"--threads: expected comma-separated positive integers, got {args.threads!r}")
    teachers = _names(args.teachers, models.list_models(), "teachers")
    for name, value in (("--rounds", args.rounds), ("--batch-size", args.batch_size)):
        if value < 1:
            raise ValueError(f"{name}: expected a positive integer, got {value}")
    record = run_teachers_bench(variants, threads, args.rounds, args.batch_size, teachers)
    return _finish(record, args.out, "teachers", "teacher forward")


def _register_cache(verbs):
    from ..bench.cache import BATCH, STUDENT, TEACHERS

    c = verbs.add_parser(
        "cache", help="one MTKD-RL training step with the teacher cache against live teachers and student-only "
                      "(CPU), the cache's read of a batch, the error of the int8 and top-k encodings; or "
                      "--replay-experiment: the accuracy cost of replaying V views")
    c.add_argument("--rounds", type=int, default=7, help="interleaved rounds of each step (default 7)")
    c.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (1 is robust when other jobs share the cores; default: torch's)")
    c.add_argument("--encodings", action=argparse.BooleanOptionalAction, default=True,
                   help="also measure the int8 and top-k encodings' error (default on)")
    c.add_argument("--student", default=STUDENT, help=f"the step's student (default {STUDENT})")
    c.add_argument("--teachers", default=",".join(TEACHERS),
                   help="the step's teachers, comma-separated model names (default " + ", ".join(TEACHERS) + ")")
    c.add_argument("--batch-size", type=int, default=BATCH, help=f"default {BATCH}")
    c.add_argument("--per-class", type=int, default=None,
                   help="bundled samples per class: cached for the step (default 13), or, with "
                        "--replay-experiment, train and test (default 100)")
    c.add_argument("--replay-experiment", default=None, metavar="DIR",
                   help="instead: the accuracy cost of replaying V views (trains teachers and students under DIR; "
                        "long)")
    c.add_argument("--seeds", type=int, default=3, help="--replay-experiment: seeds 0..N-1 (default 3)")
    c.add_argument("--epochs", type=int, default=15, help="--replay-experiment: epochs of every run (default 15)")
    c.add_argument("--views", default="1,2,4",
                   help="--replay-experiment: comma-separated values of V to compare with fresh views (default 1,2,4)")
    c.add_argument("--out", default="bench_results", help=_OUT_HELP.format(name="cache"))
    c.set_defaults(func=run_cache)


def run_cache(args):
    from .. import models
    from ..bench import cache

    _threads(args.threads)
    for name in ("rounds", "batch_size", "seeds", "epochs"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')}: expected a positive integer, got {getattr(args, name)}")
    if args.per_class is not None and args.per_class < 1:
        raise ValueError(f"--per-class: expected a positive integer, got {args.per_class}")
    valid = models.list_models()
    teachers = _names(args.teachers, valid, "teachers")
    if args.student not in valid:
        raise ValueError(f"--student: unknown model {args.student!r}; valid names: {', '.join(valid)}")
    if args.replay_experiment:
        try:
            views = [int(v) for v in args.views.split(",") if v.strip()]
        except ValueError:
            views = []
        if not views or min(views) < 1:
            raise ValueError(f"--views: expected comma-separated positive integers, got {args.views!r}")
        record = cache.replay_experiment(args.replay_experiment, views=tuple(views), seeds=tuple(range(args.seeds)),
                                         per_class=args.per_class or 100, epochs=args.epochs,
                                         teacher_epochs=args.epochs)
        emit(cache.replay_summary(record))
        return _finish(record, args.out, "cache_replay", "training run")
    record = cache.run_cache_bench(args.rounds, encodings=args.encodings, student=args.student, teachers=teachers,
                                   batch_size=args.batch_size, per_class=args.per_class or 13)
    return _finish(record, args.out, "cache", "MTKD-RL training step")
