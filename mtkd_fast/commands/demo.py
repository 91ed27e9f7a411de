"""``mtkd-fast demo`` (``make demo``): train small teachers on the bundled Fashion-MNIST subset (or re-use the ones
an earlier demo trained with the same recipe), cache their outputs, then train the same student from the same
seeds with no distillation, AVER, CA-MKD and MTKD-RL and print a table: teacher accuracies, student test top-1
per method (mean ± std over seeds) and epoch time. Writes CSV, PNG plots and checkpoints into ``--out``.

Every method uses the same hyper-parameters; the student's number is its test top-1 after the LAST epoch
(nothing is selected on the test split). The first demo (teachers included) measured about 470 s of one core's
CPU time: an estimated 4-7 minutes on a quiet 2-core machine; later demos re-use the teachers.
"""

from __future__ import annotations

import argparse


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def register(sub):
    from mtkd_fast.demo import METHODS, default_teacher_dir

    p = sub.add_parser("demo", help="distil a student from several teachers on the bundled data and show the result",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a few steps per stage (smoke test; numbers mean nothing)")
    p.add_argument("--seeds", type=int, nargs="+", help="student seeds (default: 0 1 2; --quick: 0)")
    p.add_argument("--epochs", type=_positive_int, help="student epochs (default 20; --quick: 2)")
    p.add_argument("--teacher-epochs", type=_positive_int, help="teacher epochs (default 4; --quick: 1)")
    p.add_argument("--methods", nargs="+", choices=METHODS, help=f"methods to compare (default: {' '.join(METHODS)})")
    p.add_argument("--student-per-class", type=_positive_int,
                   help="training images per class the student learns from (default 50; --quick: 8)")
    p.add_argument("--views", type=_positive_int,
                   help="augmentation views in the teacher cache (default 10; --quick: 2)")
    p.add_argument("--out", default="results/demo", help="results folder (default: results/demo)")
    p.add_argument("--teacher-dir", default=None,
                   help=f"where trained teachers are kept and re-used from (default: {default_teacher_dir()})")
    p.add_argument("--retrain-teachers", action="store_true", help="train the teachers even if a matching one is kept")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    p.set_defaults(func=run)


def run(args):
    from mtkd_fast.demo import DemoSettings, run_demo

    changes = {"device": args.device}
    for name in ("epochs", "teacher_epochs", "student_per_class", "views", "methods", "seeds"):
        value = getattr(args, name)
        if value is not None:
            changes[name] = tuple(value) if isinstance(value, list) else value
    settings = DemoSettings.quick(**changes) if args.quick else DemoSettings(**changes)
    run_demo(settings, out_dir=args.out, teacher_dir=args.teacher_dir, retrain_teachers=args.retrain_teachers)
    return 0
