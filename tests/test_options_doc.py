"""docs/options.md is rendered from the verbs' parsers (TrainConfig's field metadata for train and train-teacher) by
tools/render_options.py: it is up to date, lists every field with its help, choices and the verb's own default,
and docs/training.md sends users to it (issue 25)."""

import dataclasses
import os
import re

from repo_tools import load_tool

from mtkd_fast.commands._options import field_default, show
from mtkd_fast.train.config import GROUPS, TEACHER_DEFAULTS, TrainConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGE = os.path.join(ROOT, "docs", "options.md")


render_options = load_tool("render_options")


def _sections(text: str) -> dict:
    """{"train": {"model options": {"--student": [option, choices, default, what]}}, ...} from the page's tables."""
    out, verb, group = {}, None, None
    for line in text.splitlines():
        if line.startswith("## mtkd-fast "):
            verb, group = line[len("## mtkd-fast "):], None
            out[verb] = {}
        elif line.startswith("### ") and verb is not None:
            group = line[4:]
            out[verb][group] = {}
        elif line.startswith("| `--") and group is not None:
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
            out[verb][group][re.match(r"`(--[a-z0-9-]+)", cells[0]).group(1)] = cells
    return out


def test_options_page_is_up_to_date():
    with open(PAGE, encoding="utf-8") as f:
        assert f.read() == render_options.render(), "docs/options.md is stale: run python tools/render_options.py"


def test_check_flag_fails_on_a_stale_page_and_passes_after_a_rewrite(tmp_path, capsys):
    page = tmp_path / "options.md"
    page.write_text("# Command-line options\n\nold\n")
    assert render_options.main(["--check", "--out", str(page)]) == 1
    assert capsys.readouterr().err.strip() == f"{page}: stale; run python tools/render_options.py"
    assert render_options.main(["--out", str(page)]) == 0
    assert render_options.main(["--check", "--out", str(page)]) == 0
    assert render_options.main(["--check", "--out", str(tmp_path / "missing.md")]) == 1


def test_every_field_in_its_group_with_help_choices_and_default():
    sections = _sections(render_options.render())
    assert list(sections) == ["train", "train-teacher", "cache build", "bench epoch"]
    train = sections["train"]
    assert [g for g in train if g != "options"] == [f"{g} options" for g in GROUPS]  # --help's order
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        row = train[f"{f.metadata['group']} options"].get(flag)
        assert row is not None, f"{flag} not in the {f.metadata['group']} table"
        option, choices, default, what = row
        assert what == " ".join(f.metadata["help"].split()).replace("|", "\\|"), flag
        assert default == show(field_default(f)), flag
        if f.metadata.get("choices"):
            assert choices == ", ".join(f"`{show(c)}`" for c in f.metadata["choices"]), flag


def test_train_teacher_table_shows_its_own_defaults_and_options():
    teacher = _sections(render_options.render())["train-teacher"]
    rows = {flag: row for group in teacher.values() for flag, row in group.items()}
    train_wd = field_default(TrainConfig.__dataclass_fields__["weight_decay"])
    assert rows["--weight-decay"][2] == show(TEACHER_DEFAULTS["weight_decay"]) != show(train_wd)
    # --model or a --config file naming the model: the usage line says so, the help names the rule
    assert "required unless the --config file names it" in rows["--model"][3]
    assert "--config" in rows
    for flag in ("--aekd-nu", "--transfer-resize", "--teacher-precision", "--strategy", "--student"):
        assert flag not in rows, flag  # not an option of a teacher's pretraining


def test_cache_and_bench_tables_list_their_own_options():
    sections = _sections(render_options.render())
    build = sections["cache build"]["options"]
    assert build["--out"][2] == "required" and build["--views"][2] == "1"
    assert build["--dtype"][1] == "`float16`, `bfloat16`, `float32`"
    bench = sections["bench epoch"]["options"]
    assert bench["--memory-steps"][2] == "2" and "`mtkd_rl_cached`" in bench["--configs"][1]
    assert "--debug" not in build and "--help" not in bench


def test_training_doc_links_the_options_page():
    with open(os.path.join(ROOT, "docs", "training.md"), encoding="utf-8") as f:
        text = f.read()
    assert "[options.md](options.md)" in text
    assert os.path.isfile(os.path.join(ROOT, "docs", "options.md"))
