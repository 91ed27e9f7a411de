"""``mtkd-fast train``: MTKD-RL distillation (or a baseline) from a config file and/or flags.

Every ``TrainConfig`` field is a flag (``--batch-size``, ``--teachers a b c``, ``--dynamic/--no-dynamic``, ...);
flags override the config file (JSON or YAML; the paper's runs are in configs/).
"""

from __future__ import annotations

import argparse
import os

from ._options import add_config_flags, overrides_from_args
from ._output import emit_json

__all__ = ["add_config_flags", "overrides_from_args", "config_from_args", "print_result"]


def config_from_args(args: argparse.Namespace):
    from mtkd_fast.train import TrainConfig

    overrides = overrides_from_args(args)
    if getattr(args, "config", None):
        return TrainConfig.load(args.config, **overrides)
    return TrainConfig(**overrides)


def register(sub):
    p = sub.add_parser("train", help="distil a student from several teachers (MTKD-RL or a baseline strategy)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                       usage="%(prog)s [--config FILE] [--print-config] [options]")
    p.add_argument("--config", metavar="FILE",
                   help="a JSON (or YAML) file of options, named as the flags with _ for - "
                        '({"student": "resnet8", "batch_size": 64}); flags override it')
    p.add_argument("--print-config", action="store_true", help="print the resolved options as JSON and exit")
    add_config_flags(p)
    p.set_defaults(func=run)


def print_result(result: dict) -> None:
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun only rank 0 reports
        return
    summary = {k: v for k, v in result.items() if k != "history"}
    emit_json(summary)


def run(args):
    config = config_from_args(args)
    args.resolved_out_dir = config.out_dir  # for the CLI's Ctrl-C hint
    if args.print_config:
        emit_json(config.to_dict())
        return 0
    from mtkd_fast.train import train

    print_result(train(config))
    return 0

