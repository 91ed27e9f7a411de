"""``mtkd-fast train``: MTKD-RL distillation (or a baseline) from a config file and/or flags.

Every ``TrainConfig`` field is a flag (``--batch-size``, ``--teachers a b c``, ``--dynamic/--no-dynamic``, ...);
flags override the config file (JSON, or YAML with pyyaml installed).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os

OPTIONAL_INT = {"max_steps_per_epoch", "limit_per_class"}
OPTIONAL_FLOAT = {"aekd_nu"}
LIST_OF_INT = {"milestones"}


def add_config_flags(parser: argparse.ArgumentParser, skip: tuple = ()) -> None:
    """One flag per TrainConfig field; unset flags stay out of the namespace (the file or the default wins)."""
    from mtkd_fast.train import TrainConfig

    group = parser.add_argument_group("training options (TrainConfig fields; see docs/training.md)")
    for f in dataclasses.fields(TrainConfig):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        kw = dict(dest=f.name, default=argparse.SUPPRESS)
        if isinstance(default, bool):
            group.add_argument(flag, action=argparse.BooleanOptionalAction, help=f"(default {default})", **kw)
        elif isinstance(default, list):
            group.add_argument(flag, nargs="*", type=int if f.name in LIST_OF_INT else str,
                               help=f"(default {default})", **kw)
        elif f.name in OPTIONAL_INT:
            group.add_argument(flag, type=int, help="(default: not set)", **kw)
        elif f.name in OPTIONAL_FLOAT:
            group.add_argument(flag, type=float, help="(default: not set)", **kw)
        elif isinstance(default, (int, float)) and not isinstance(default, bool):
            group.add_argument(flag, type=type(default), help=f"(default {default})", **kw)
        else:
            group.add_argument(flag, type=str, help=f"(default {default})", **kw)


def overrides_from_args(args: argparse.Namespace) -> dict:
    from mtkd_fast.train import TrainConfig

    names = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {k: v for k, v in vars(args).items() if k in names}
    if values.get("amp") in ("none", "None", ""):
        values["amp"] = None
    return values


def config_from_args(args: argparse.Namespace):
    from mtkd_fast.train import TrainConfig

    overrides = overrides_from_args(args)
    if getattr(args, "config", None):
        return TrainConfig.load(args.config, **overrides)
    return TrainConfig(**overrides)


def register(sub):
    p = sub.add_parser("train", help="distil a student from several teachers (MTKD-RL or a baseline strategy)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="a JSON (or YAML) file of TrainConfig options; flags override it")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    add_config_flags(p)
    p.set_defaults(func=run)


def print_result(result: dict) -> None:
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun only rank 0 reports
        return
    summary = {k: v for k, v in result.items() if k != "history"}
    print(json.dumps(summary, indent=2, default=str))


def run(args):
    config = config_from_args(args)
    args.resolved_out_dir = config.out_dir  # for the CLI's Ctrl-C hint
    if args.print_config:
        print(json.dumps(config.to_dict(), indent=2))
        return 0
    from mtkd_fast.train import train

    print_result(train(config))
    return 0

