"""``mtkd-fast train-teacher``: pretrain one teacher the authors' way (plain cross-entropy; SGD lr 0.05, 0.01 for
MobileNetV2/ShuffleNets; weight decay 5e-4), saved as ``{"model": state_dict}`` (``student_best.pth`` in the
output directory: the file ``--teacher-checkpoints`` of ``mtkd-fast train`` takes)."""

from __future__ import annotations

import argparse

from ._options import add_config_flags, overrides_from_args
from ._output import emit
from .train import print_result

# what a teacher's pretraining uses of TrainConfig: no teachers, no distillation method, no agent
GROUPS = ("model", "data", "optimisation", "output")


def register(sub):
    from mtkd_fast.train import config

    p = sub.add_parser("train-teacher", help="pretrain a teacher with cross-entropy (the authors' settings)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                       usage="%(prog)s (--model MODEL | --config FILE) [options]")
    p.add_argument("--model",
                   help="the model to train (`--model list` prints every name and exits); required unless the "
                        "--config file names it")
    p.add_argument("--config", metavar="FILE",
                   help="a JSON (or YAML) file of options as for `mtkd-fast train`, naming the model with "
                        '"model" (configs/cifar100/teacher_*.yaml); --model and the flags override it')
    # the defaults teacher_config gives, not TrainConfig's
    shown = dict(config.TEACHER_DEFAULTS, out_dir=config.teacher_out_dir("MODEL"),
                 lr=f"{config.TEACHER_LR}, or {config.SMALL_TEACHER_LR} for {', '.join(config.SMALL_LR_TEACHERS)}")
    add_config_flags(p, skip=("student",), groups=GROUPS, defaults=shown)
    p.set_defaults(func=run)


def run(args):
    from mtkd_fast.models import list_models
    from mtkd_fast.train import train_teacher

    if args.model == "list":
        emit("\n".join(list_models()))
        return 0
    from mtkd_fast.train.config import TEACHER_MODEL_KEY, read_config, teacher_config

    values = read_config(args.config, extra=(TEACHER_MODEL_KEY,)) if args.config else {}
    if "student" in values:  # the trained model is the file's "model", as --model replaces --student here
        raise ValueError(f"config: {args.config!r} gives 'student'; a train-teacher config names the model to "
                         f"train with {TEACHER_MODEL_KEY!r}")
    model = args.model or values.get(TEACHER_MODEL_KEY)
    values.pop(TEACHER_MODEL_KEY, None)
    if not model:
        raise ValueError("model: give --model MODEL, or a --config file with a \"model\" entry")
    options = {**values, **overrides_from_args(args)}
    args.resolved_out_dir = teacher_config(model, **options).out_dir  # for the CLI's Ctrl-C hint
    print_result(train_teacher(model, **options))
    return 0
