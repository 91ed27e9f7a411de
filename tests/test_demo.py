"""The demo (``mtkd-fast demo``): the quick version writes every artefact and its table holds only finite numbers;
teachers are re-used only when their recipe and checkpoint hash match."""

import csv
import json
import math
import os

import pytest

from mtkd_fast.cli import main
from mtkd_fast.demo import METHODS, DemoSettings

ARTEFACTS = ("summary.txt", "methods.csv", "runs.csv", "teachers.csv", "curves.csv", "accuracy_curves.png",
             "teacher_weights.png", "demo.json")


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    out, teachers = str(root / "out"), str(root / "teachers")
    argv = ["demo", "--quick", "--out", out, "--teacher-dir", teachers, "--device", "cpu"]
    assert main(argv) == 0
    return {"out": out, "teachers": teachers, "argv": argv}


def test_quick_demo_writes_every_artefact(quick_demo, capsys):
    out = quick_demo["out"]
    for name in ARTEFACTS:
        path = os.path.join(out, name)
        assert os.path.isfile(path) and os.path.getsize(path) > 0, name
    for name in ("accuracy_curves.png", "teacher_weights.png"):
        with open(os.path.join(out, name), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n", name
    settings = DemoSettings.quick()
    for index, arch in enumerate(settings.teachers):
        assert os.path.isfile(os.path.join(out, "teachers", f"t{index}_{arch}.pth"))
    for method in METHODS:
        run = os.path.join(out, "runs", method, "seed0")
        for name in ("student_last.pth", "checkpoint_last.pt", "metrics.csv", "config.json", "train.log"):
            assert os.path.isfile(os.path.join(run, name)), (method, name)
        # nothing picked on the test split is left behind
        assert not os.path.exists(os.path.join(run, "student_best.pth"))
    assert os.path.isfile(os.path.join(out, "teacher_cache", "manifest.json"))


def test_quick_demo_table_is_finite_and_complete(quick_demo):
    out = quick_demo["out"]
    methods = _rows(os.path.join(out, "methods.csv"))
    assert [r["method"] for r in methods] == list(METHODS)
    for r in methods:
        for key in ("top1_mean", "top1_std", "epoch_time_s", "gain_vs_none"):
            assert math.isfinite(float(r[key])), (r["method"], key, r[key])
        assert 0.0 <= float(r["top1_mean"]) <= 100.0
        assert float(r["epoch_time_s"]) > 0.0
    teachers = _rows(os.path.join(out, "teachers.csv"))
    assert [r["teacher"] for r in teachers] == list(DemoSettings.quick().teachers)
    assert all(math.isfinite(float(r["test_top1"])) for r in teachers)
    runs = _rows(os.path.join(out, "runs.csv"))
    assert len(runs) == len(METHODS) and all(math.isfinite(float(r["test_top1"])) for r in runs)
    # the agent's weights over training: one logit and one feature weight per teacher and epoch, rows summing to 1
    curves = [r for r in _rows(os.path.join(out, "curves.csv")) if r["method"] == "mtkd_rl"]
    assert len(curves) == DemoSettings.quick().epochs
    for r in curves:
        for key in ("wl", "wf"):
            weights = [float(r[f"{key}_{t['teacher']}"]) for t in teachers]  # columns named by architecture
            assert all(math.isfinite(w) and w > 0 for w in weights)
            # epoch 1 is the warm-up (weight 1 per teacher), later epochs use the agent's normalised weights
            assert sum(weights) == pytest.approx(len(teachers) if r["epoch"] == "1" else 1.0, rel=1e-4)
    summary = open(os.path.join(out, "summary.txt")).read()
    for label in ("no distillation", "AVER", "CA-MKD", "MTKD-RL"):
        assert label in summary
    assert "MTKD-RL" in json.load(open(os.path.join(out, "demo.json")))["verdict"]


def test_teachers_are_reused_only_when_recipe_and_hash_match(quick_demo, tmp_path, capsys):
    out = str(tmp_path / "again")
    argv = quick_demo["argv"][:]
    argv[argv.index("--out") + 1] = out
    argv += ["--methods", "none"]
    capsys.readouterr()
    assert main(argv) == 0
    assert {r["source"] for r in _rows(os.path.join(out, "teachers.csv"))} == {"reused"}
    # the result (the table and the time) on stdout, the progress on stderr: `mtkd-fast demo > result.txt` works
    stdout, stderr = capsys.readouterr()
    table = open(os.path.join(out, "summary.txt")).read()
    assert "no distillation" in stdout and "wall time:" in stdout and "[1/4]" not in stdout
    assert "[1/4] teachers" in stderr and "wall time:" not in stderr
    assert all(line in stdout for line in table.splitlines() if "no distillation" in line)
    # a damaged checkpoint no longer matches its recorded sha256: that teacher is trained again
    kept = _rows(os.path.join(out, "teachers.csv"))[0]["kept_at"]
    with open(kept, "ab") as f:
        f.write(b"\0")
    assert main(argv) == 0
    assert [r["source"] for r in _rows(os.path.join(out, "teachers.csv"))] == ["trained", "reused", "reused"]


def test_bad_settings_are_refused(tmp_path, capsys):
    assert main(["demo", "--quick", "--out", str(tmp_path), "--seeds", "-1"]) == 2
    assert "seeds" in capsys.readouterr().err
    with pytest.raises(ValueError, match="student"):
        DemoSettings(student="no_such_model").validate()
    with pytest.raises(ValueError, match="teachers"):
        DemoSettings(teachers=("resnet8",)).validate()


def test_student_per_class_flag_reaches_the_settings(tmp_path, monkeypatch):
    import mtkd_fast.demo as demo_module

    seen = {}
    monkeypatch.setattr(demo_module, "run_demo", lambda settings, **kw: seen.setdefault("settings", settings))
    assert main(["demo", "--student-per-class", "200", "--epochs", "60", "--out", str(tmp_path)]) == 0
    assert seen["settings"].student_per_class == 200 and seen["settings"].epochs == 60
