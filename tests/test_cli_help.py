"""The command line explains itself: every TrainConfig field carries its help, group and choices, and `train`,
`train-teacher`, the config-file validator, `cache build` and `bench epoch` are built from them (issue 25)."""

import argparse
import dataclasses
import json
import re

import pytest

import mtkd_fast
from mtkd_fast import cli, data, distiller, step, teachers
from mtkd_fast.commands._options import field_default, show
from mtkd_fast.commands.train import config_from_args
from mtkd_fast.train import config as C
from mtkd_fast.train.config import GROUPS, TrainConfig, teacher_config

FIELDS = dataclasses.fields(TrainConfig)
TEACHER_ONLY_SKIPPED = {"aekd_nu", "transfer_resize", "teacher_precision", "strategy", "teachers", "agent_step"}


def _subparser(parser, *path):
    for name in path:
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = sub.choices[name]
    return parser


def _help(monkeypatch, *path) -> str:
    monkeypatch.setenv("COLUMNS", "2000")  # one line per option
    return _subparser(cli.build_parser(), *path).format_help()


def _options_by_section(text: str) -> dict:
    """{section title: {flag: its help line}} of an argparse help text printed one option a line."""
    sections, current, flag = {}, None, None
    for line in text.splitlines():
        if line and not line.startswith(" ") and line.endswith(":"):
            current, flag = sections.setdefault(line[:-1], {}), None
        elif current is not None and line.startswith("  --"):
            flag = line.split()[0].rstrip(",")
            current[flag] = line
        elif flag is not None and line.startswith("    "):  # the help under a long flag
            current[flag] += " " + line.strip()
    return sections


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def test_every_field_has_help_a_group_and_valid_choices():
    assert len(FIELDS) > 40
    for f in FIELDS:
        assert f.metadata.get("help", "").strip(), f"{f.name}: no help text"
        assert f.metadata.get("group") in GROUPS, f"{f.name}: group {f.metadata.get('group')!r}"
        choices = f.metadata.get("choices")
        if choices is not None:
            assert field_default(f) in choices, f.name


def test_choice_lists_have_one_definition():
    by_name = {f.name: f.metadata.get("choices") for f in FIELDS}
    assert by_name["loss_backend"] is step.BACKENDS
    assert by_name["data_backend"] is data.BACKENDS
    assert by_name["dataset"] is data.DATASETS
    assert by_name["teacher_precision"] is teachers.PRECISIONS
    for name in ("feature_kd", "warmup_weights", "agent_update", "agent_buffer_dtype", "transfer_resize",
                 "loss_backend"):
        assert by_name[name] == distiller._CHOICES[name], name
    assert set(C.STRATEGIES) == set(distiller.STRATEGIES) | {"none"}


def test_train_help_shows_every_field_with_help_default_and_choices_in_its_group(monkeypatch):
    sections = _options_by_section(_help(monkeypatch, "train"))
    assert [s for s in sections if s.endswith(" options") and s[:-8] in GROUPS] == [f"{g} options" for g in GROUPS]
    for f in FIELDS:
        section = sections[f"{f.metadata['group']} options"]
        line = section.get(_flag(f.name))
        assert line is not None, f"{_flag(f.name)} missing from its group {f.metadata['group']}"
        assert " ".join(f.metadata["help"].split()) in line, f.name
        assert line.endswith(f"(default: {show(field_default(f))})"), line
        for choice in f.metadata.get("choices") or ():
            assert re.search(r"\{[^}]*\b%s\b[^}]*\}" % re.escape(show(choice)), line), (f.name, choice)


def test_validator_follows_the_metadata():
    def make(**values):
        return TrainConfig(**{"teachers": ["resnet14", "resnet20"], **values})

    for f in FIELDS:
        if "choices" in f.metadata:
            with pytest.raises(ValueError, match=f"^{f.name}: expected one of"):
                make(**{f.name: "no-such-choice"})
        kind, optional, is_list = C.field_kind(f.name)
        if is_list:
            wrong = [1.5]
        elif kind is str:
            wrong = 3
        else:
            wrong = "3"
        with pytest.raises(ValueError, match=f"^{f.name}: expected"):
            make(**{f.name: wrong})
        if optional:
            assert getattr(make(**{f.name: None}), f.name) is None


def _other_value(f):
    """A valid value of field ``f`` other than its default, and how it is typed on the command line."""
    default = field_default(f)
    special = {"teachers": ["resnet14", "resnet20"], "teacher_checkpoints": ["a.pth", "b.pth"],
               "milestones": [3, 7], "student": "resnet20", "device": "cpu", "val_split": "val",
               "aekd_nu": 0.25, "limit_per_class": 3, "max_steps_per_epoch": 5, "teacher_cache": "cache_dir",
               "data_root": "data_dir", "data_seed": 3, "out_dir": "elsewhere"}
    if f.name in special:
        value = special[f.name]
    elif "choices" in f.metadata:
        value = next(c for c in f.metadata["choices"] if c != default)
    elif isinstance(default, bool):
        value = not default
    elif isinstance(default, int):
        value = default + 3
    elif isinstance(default, float):  # half the default stays inside every validated range (momentum < 1, ...)
        value = default / 2 if default else 0.375
    else:
        raise AssertionError(f"no test value for {f.name}")
    if isinstance(value, bool):
        argv = [_flag(f.name) if value else "--no-" + _flag(f.name)[2:]]
    elif isinstance(value, list):
        argv = [_flag(f.name), *map(str, value)]
    else:
        argv = [_flag(f.name), show(value)]
    return value, argv


def test_every_flag_sets_its_field():
    parser = cli.build_parser()
    for f in FIELDS:
        value, argv = _other_value(f)
        base = [] if f.name == "teachers" else ["--teachers", "resnet14", "resnet20"]
        cfg = config_from_args(parser.parse_args(["train", *base, *argv]))
        assert getattr(cfg, f.name) == value, f.name
        assert value != field_default(f), f.name


def test_amp_none_on_the_command_line():
    cfg = config_from_args(cli.build_parser().parse_args(["train", "--teachers", "a", "b", "--amp", "bf16"]))
    assert cfg.amp == "bf16"
    cfg = config_from_args(cli.build_parser().parse_args(["train", "--teachers", "a", "b", "--amp", "none"]))
    assert cfg.amp is None


def test_train_teacher_help_shows_its_own_options_and_real_defaults(monkeypatch):
    text = _help(monkeypatch, "train-teacher")
    flags = {flag: line for section in _options_by_section(text).values() for flag, line in section.items()}
    for name in TEACHER_ONLY_SKIPPED | {"student", "teacher_checkpoints", "teacher_cache", "dynamic", "alpha"}:
        assert _flag(name) not in flags, name
    real = teacher_config("resnet8")
    assert real.weight_decay == 5e-4
    assert flags["--weight-decay"].endswith("(default: 0.0005)")
    assert "0.0001" not in flags["--weight-decay"]
    assert f"(default: {real.lr}, or {teacher_config('ShuffleV2').lr} for " in flags["--lr"]
    assert "runs/teacher_MODEL" in flags["--out-dir"] and real.out_dir == "runs/teacher_resnet8"
    shown = 0
    for f in FIELDS:
        line = flags.get(_flag(f.name))
        if line is None or f.name in ("lr", "out_dir"):
            continue
        assert line.endswith(f"(default: {show(getattr(real, f.name))})"), line
        shown += 1
    assert shown > 25


def test_train_teacher_flags_reach_the_run(monkeypatch):
    calls = {}
    import mtkd_fast.train as T

    monkeypatch.setattr(T, "train_teacher", lambda model, **kw: calls.update(model=model, **kw) or {"final": {}})
    rc = cli.main(["train-teacher", "--model", "resnet8", "--weight-decay", "0.001", "--epochs", "2", "--no-progress"])
    assert rc == 0
    assert calls == {"model": "resnet8", "weight_decay": 0.001, "epochs": 2, "progress": False}
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["train-teacher", "--model", "resnet8", "--aekd-nu", "0.5"])


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"mtkd-fast {mtkd_fast.__version__}"


def test_info_shows_the_version(capsys):
    assert cli.main(["info"]) == 0
    assert json.loads(capsys.readouterr().out)["version"] == mtkd_fast.__version__


@pytest.mark.parametrize("path", [("train",), ("train-teacher",), ("cache", "build"), ("cache", "size"),
                                  ("cache", "info"), ("cache", "verify"), ("bench", "epoch")])
def test_every_flag_of_a_verb_has_help(path):
    parent = _subparser(cli.build_parser(), *path[:-1])
    sub = next(a for a in parent._actions if isinstance(a, argparse._SubParsersAction))
    line = next(a for a in sub._choices_actions if a.dest == path[-1])
    assert line.help and line.help.strip(), f"{' '.join(path)}: no one-line description"
    parser = sub.choices[path[-1]]
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
            continue
        assert action.help and action.help.strip(), f"{' '.join(path)}: {action.option_strings or action.dest}"
