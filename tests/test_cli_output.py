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
