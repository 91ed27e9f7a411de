"""``TrainConfig`` fields as command-line flags, generated from the fields themselves: the annotation gives the
flag's type, the metadata its help, group and choices (``mtkd_fast.train.config``), so a new field is a flag with
its help without touching the CLI. Shared by ``train`` and ``train-teacher``."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any, Optional

_METAVARS = {int: "N", float: "X"}


def show(value: Any) -> str:
    """A default or a choice as the user types it."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (list, tuple)):
        return " ".join(map(str, value)) or "none"
    return str(value)


def field_default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def add_config_flags(parser: argparse.ArgumentParser, *, skip: tuple = (), groups: Optional[tuple] = None,
                     defaults: Optional[dict] = None) -> None:
    """One flag per TrainConfig field, in one argument group per ``config.GROUPS`` entry (only ``groups``, when
    given; fields in ``skip`` left out). Unset flags stay out of the namespace, so the config file or the default
    wins. ``defaults``: the default to show where the verb's own differs from TrainConfig's (a value or a text)."""
    from mtkd_fast.train.config import GROUPS, TrainConfig, field_kind

    defaults = defaults or {}
    fields = [f for f in dataclasses.fields(TrainConfig)
              if f.name not in skip and (groups is None or f.metadata["group"] in groups)]
    sections = {}
    for name, what in GROUPS.items():
        if any(f.metadata["group"] == name for f in fields):
            sections[name] = parser.add_argument_group(f"{name} options", what[0].upper() + what[1:] + ".")
    for f in fields:
        kind, _, is_list = field_kind(f.name)
        choices = f.metadata.get("choices")
        default = defaults.get(f.name, field_default(f))
        text = f"{f.metadata['help']} (default: {default if isinstance(default, str) else show(default)})"
        kw = dict(dest=f.name, default=argparse.SUPPRESS, help=text.replace("%", "%%"),
                  metavar=f.metadata.get("metavar", _METAVARS.get(kind, "VALUE")))
        if choices:
            kw["metavar"] = "{" + ",".join(show(c) for c in choices) + "}"
        flag = "--" + f.name.replace("_", "-")
        group = sections[f.metadata["group"]]
        if kind is bool:
            del kw["metavar"]
            group.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif is_list:
            group.add_argument(flag, nargs="*", type=kind, **kw)
        else:
            group.add_argument(flag, type=kind, **kw)


def overrides_from_args(args: argparse.Namespace) -> dict:
    """The TrainConfig fields given on the command line (``--amp none`` is None)."""
    from mtkd_fast.train import TrainConfig

    names = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {k: v for k, v in vars(args).items() if k in names}
    if values.get("amp") in ("none", "None", ""):
        values["amp"] = None
    return values
