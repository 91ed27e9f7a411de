"""``mtkd-fast study``: the teachers-stronger study of issue 27 (docs/study.md). Teachers of three families are
trained on all 60000 Fashion-MNIST training images until their test top-1 stops improving, their outputs over the
student's small subset are cached, then every weighting method trains the same student from the same seeds with
the same hyper-parameters. Progress goes to stderr; runs.csv, summary.csv, checks.csv and (--report) study.md and
study.png to --out. Resumable: run the same command again and finished teacher epochs and runs are kept.
"""

from __future__ import annotations

import argparse


def register(sub):
    from mtkd_fast.study import add_arguments

    p = sub.add_parser("study", help="the teachers-stronger study (Fashion-MNIST, every method, several seeds)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=run)


def run(args):
    from mtkd_fast.study import run as run_study

    return run_study(args)
