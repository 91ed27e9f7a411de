"""Logs on stderr, the result on stdout (issue 25): in a real process, as a shell pipe sees it, the stdout of
`train` and `eval` is their JSON alone, and what the library logs while they run is on stderr."""

import json

from safety_cli import TINY, run


def test_stdout_is_the_json_result_and_logs_are_on_stderr(tmp_path):
    out = tmp_path / "run"
    proc = run(["train", "--student", "resnet8", "--strategy", "none", "--epochs", "2", "--out-dir", out] + TINY)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)  # nothing else on stdout
    assert result["final"]["epoch"] == 2 and result["out_dir"] == str(out)
    assert "epoch 1/2: loss" in proc.stderr and "epoch 2/2: loss" in proc.stderr
    again = run(["train", "--student", "resnet8", "--strategy", "none", "--epochs", "2", "--out-dir", out, "--resume"]
                + TINY)
    assert again.returncode == 0, again.stderr
    final = json.loads(again.stdout)["final"]  # a finished run reports its last epoch again
    assert {k: final[k] for k in ("epoch", "train_loss", "val_top1")} == \
        {k: result["final"][k] for k in ("epoch", "train_loss", "val_top1")}
    assert "already at 2/2 epochs" in again.stderr
    ev = run(["eval", "--model", "resnet8", "--checkpoint", out / "student_best.pth", "--limit-per-class", "2"])
    assert ev.returncode == 0, ev.stderr
    assert json.loads(ev.stdout)["top1"] == result["best_top1"]


def test_verbs_write_their_result_through_emit():
    """Under `cli.main` a bare print() lands on stderr (it is a log there): a verb's result must go through
    commands/_output.emit / emit_json, so each module under mtkd_fast/commands/ uses no print() without file=."""
    import ast
    import os

    here = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "mtkd_fast", "commands")
    bare = []
    for name in sorted(os.listdir(here)):
        if not name.endswith(".py") or name == "_output.py":
            continue
        with open(os.path.join(here, name), encoding="utf-8") as f:
            tree = ast.parse(f.read())
        bare += [f"{name}:{node.lineno}" for node in ast.walk(tree)
                 if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print"
                 and not any(k.arg == "file" for k in node.keywords)]
    assert not bare, f"print() of a verb's result lands on stderr; use emit/emit_json: {bare}"
