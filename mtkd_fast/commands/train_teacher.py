"""``mtkd-fast train-teacher``: pretrain one teacher the authors' way (plain cross-entropy; SGD lr 0.05, 0.01 for
MobileNetV2/ShuffleNets; weight decay 5e-4), saved as ``{"model": state_dict}`` (``student_best.pth`` in the
output directory: the file ``--teacher-checkpoints`` of ``mtkd-fast train`` takes)."""

from __future__ import annotations

import argparse

from .train import add_config_flags, overrides_from_args, print_result


def register(sub):
    p = sub.add_parser("train-teacher", help="pretrain a teacher with cross-entropy (the authors' settings)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="model name (see `mtkd-fast train-teacher --model list`)")
    add_config_flags(p, skip=("student", "teachers", "teacher_checkpoints", "teacher_cache", "strategy", "alpha",
                              "beta", "temperature", "feature_kd", "warmup_weights", "dynamic", "agent_step",
                              "agent_lr", "agent_update", "agent_buffer_dtype", "loss_backend"))
    p.set_defaults(func=run)


def run(args):
    from mtkd_fast.models import list_models
    from mtkd_fast.train import train_teacher

    if args.model == "list":
        print("\n".join(list_models()))
        return 0
    from mtkd_fast.train.config import teacher_config

    overrides = overrides_from_args(args)
    args.resolved_out_dir = teacher_config(args.model, **overrides).out_dir  # for the CLI's Ctrl-C hint
    print_result(train_teacher(args.model, **overrides))
    return 0
