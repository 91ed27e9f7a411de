"""The README's bundled-data walk (teachers -> cache -> student -> eval) runs as written (issue 25).

The block under the README heading ``WALK_HEADING`` is run command by command, in a temporary directory, through
the same ``main`` the ``mtkd-fast`` script calls, with the README's size rule applied: ``SHRINK`` appended to each
verb's command (the last flag wins, so only the sizes change). A README edit that breaks a command, renames a flag
or a path, or adds a step that is not an ``mtkd-fast`` command fails here. Each command's stdout is its JSON result
alone and its logs are on stderr (so ``| jq`` works on them)."""

import json
import os
import shlex

import pytest

from mtkd_fast import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WALK_HEADING = "## From teachers to a student, on the bundled data"
# the README states this rule (the paragraph after the block); keep both in step
SHRINK = {
    "train-teacher": ["--epochs", "1", "--limit-per-class", "3", "--no-progress"],
    "cache build": ["--views", "2", "--limit-per-class", "3", "--no-progress"],
    "train": ["--epochs", "2", "--limit-per-class", "3", "--no-progress"],
    "eval": ["--limit-per-class", "3"],
}


def walk_commands(readme: str) -> list[list[str]]:
    """The argv lists of the first ```bash block after ``WALK_HEADING`` (``\\`` continuations joined, comments
    dropped); each must be an ``mtkd-fast`` command."""
    assert WALK_HEADING in readme, f"README.md has no section {WALK_HEADING!r}"
    section = readme.split(WALK_HEADING, 1)[1]
    assert "```bash\n" in section, "the walk-through section has no ```bash block"
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    commands = []
    for line in block.replace("\\\n", " ").splitlines():
        argv = shlex.split(line, comments=True)
        if not argv:
            continue
        assert argv[0] == "mtkd-fast", f"the walk-through runs only mtkd-fast commands, got: {line.strip()}"
        commands.append(argv[1:])
    return commands


def verb(argv: list[str]) -> str:
    return "cache build" if argv[:2] == ["cache", "build"] else argv[0]


def test_readme_walk_names_each_stage_once_and_the_rule_is_stated():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    verbs = [verb(a) for a in walk_commands(readme)]
    assert verbs.count("train-teacher") >= 2 and set(verbs) == set(SHRINK), verbs
    assert verbs.index("cache build") > max(i for i, v in enumerate(verbs) if v == "train-teacher")
    assert verbs.index("train") > verbs.index("cache build") and verbs[-1] == "eval"
    # the README states how this test shrinks its commands, and states SHRINK
    rule = " ".join(readme.split(WALK_HEADING, 1)[1].split("\n## ", 1)[0].split())
    assert "tests/test_readme_walkthrough.py" in rule
    for name, flags in SHRINK.items():
        stated = " ".join(f for f in flags if f != "--no-progress")
        assert f"`{stated}` to `{name}`" in rule, (name, stated)


def test_readme_walk_runs_as_written(tmp_path, monkeypatch, capsys):
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        commands = walk_commands(f.read())
    monkeypatch.chdir(tmp_path)  # the README's relative paths land here
    monkeypatch.setenv("COLUMNS", "200")
    results = {}
    for argv in commands:
        full = argv + SHRINK[verb(argv)]
        rc = cli.main(full)
        out = capsys.readouterr()
        assert rc == 0, f"`mtkd-fast {shlex.join(argv)}` failed ({rc}): {out.err}"
        if verb(argv) == "cache build":
            assert "teacher cache written to" in out.out
            continue
        result = json.loads(out.out)  # stdout is the JSON result alone: `| jq` reads it
        results.setdefault(verb(argv), []).append(result)
        if verb(argv) != "eval":
            assert "epoch 1/" in out.err and "epoch 1/" not in out.out  # the per-epoch log lines: stderr
    student = results["train"][0]
    assert student["final"]["epoch"] == 2 and os.path.isfile(student["student_checkpoint"])
    assert all(os.path.isfile(t["student_checkpoint"]) for t in results["train-teacher"])
    # eval of the student the walk trained: its top-1 is the run's last validation top-1 (same split, same subset)
    top1 = results["eval"][0]["top1"]
    assert 0.0 <= top1 <= 100.0
    assert top1 == pytest.approx(student["best_top1"], abs=1e-6)
