"""``mtkd-fast bench epoch``: the cost of an epoch of each multi-teacher method, side by side (``mtkd_fast.bench``)."""

from __future__ import annotations

import argparse
import json
import os


def register(sub):
    p = sub.add_parser("bench", help="benchmarks: `bench epoch` times an epoch of each distillation method")
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
    e.add_argument("--batch-size", type=int, default=0, help="default: the setting's (cifar 64, imagenet 256)")
    e.add_argument("--students", nargs="+", default=None, metavar="ARCH", help="default: the setting's")
    e.add_argument("--teachers", nargs="+", default=None, metavar="ARCH", help="default: the setting's")
    e.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS), metavar="CONFIG",
                   help=f"which configurations (default all: {' '.join(CONFIGS)})")
    e.add_argument("--memory-steps", type=int, default=2,
                   help="steps run in the fresh process that measures each configuration's peak memory (0: skip)")
    e.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    e.add_argument("--amp", default=None, choices=["bf16", "fp16"],
                   help="autocast for the mtkd_fast configurations (the authors' way stays float32)")
    e.add_argument("--channels-last", action="store_true", help="channels_last for the mtkd_fast configurations")
    e.add_argument("--teacher-precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="compute precision of the live teachers in the mtkd_fast configurations (default auto)")
    e.add_argument("--teacher-compile", action=argparse.BooleanOptionalAction, default=False,
                   help="torch.compile the live teachers")
    e.add_argument("--fold-bn", action=argparse.BooleanOptionalAction, default=True,
                   help="fold the live teachers' BatchNorm into their convolutions (default on)")
    e.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--out", default="bench_results", help="output directory for epoch_bench.csv/.png/.json/.md")
    e.add_argument("--no-progress", action="store_true")
    e.set_defaults(func=run_epoch)


def run_epoch(args):
    import torch

    from .._io import write_bytes_atomic
    from ..bench import BenchSpec, format_table, plot, run_epoch_bench, write_csv

    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads: expected a positive integer, got {args.threads}")
        torch.set_num_threads(args.threads)
    spec = BenchSpec(setting=args.setting, students=tuple(args.students or ()), teachers=tuple(args.teachers or ()),
                     steps=args.steps, repetitions=args.repetitions, batch_size=args.batch_size,
                     configs=tuple(args.configs), device=args.device, memory_steps=args.memory_steps, seed=args.seed,
                     amp=args.amp, channels_last=args.channels_last, progress=not args.no_progress,
                     teacher_precision=args.teacher_precision, teacher_compile=args.teacher_compile,
                     fold_bn=args.fold_bn)
    result = run_epoch_bench(spec)
    table = format_table(result)
    m = result["meta"]
    header = (f"{m['device']} ({m['gpu'] or m['cpu']}), {m['threads']} threads, torch {m['torch']}, CUDA {m['cuda']}, "
              f"commit {m['commit']}; load average before {m['load_before']}, after {m['load_after']}")
    print(header)
    print(table)
    os.makedirs(args.out, exist_ok=True)
    paths = {k: os.path.join(args.out, f"epoch_bench.{k}") for k in ("csv", "png", "json", "md")}
    write_csv(result, paths["csv"])
    plot(result, paths["png"])
    write_bytes_atomic(paths["json"], json.dumps(result, indent=1, default=str).encode())
    write_bytes_atomic(paths["md"], (header + "\n\n" + table + "\n").encode())
    print("wrote " + ", ".join(paths.values()))
    return 0
