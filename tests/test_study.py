"""``mtkd-fast study`` (mtkd_fast/study.py) end to end at a tiny size, on small IDX files written here: teachers
to a plateau, the cache, the runs, resuming, the CSVs, the report into a document, and its one-line errors."""

import csv
import importlib.util
import os
import re

import numpy as np
import pytest
from test_data_fashion_mnist import _write_idx

from mtkd_fast.cli import main
from mtkd_fast.study import DOC_BEGIN, DOC_END, METHODS, plateau_reason

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def idx_root(tmp_path):
    rng = np.random.default_rng(3)
    root = tmp_path / "fmnist"
    root.mkdir()
    y = rng.permutation(np.repeat(np.arange(10, dtype=np.uint8), 5))
    _write_idx(root / "train-images-idx3-ubyte.gz", rng.integers(0, 256, (50, 28, 28), dtype=np.uint8), True)
    _write_idx(root / "train-labels-idx1-ubyte.gz", y, True)
    _write_idx(root / "t10k-images-idx3-ubyte", rng.integers(0, 256, (30, 28, 28), dtype=np.uint8), False)
    _write_idx(root / "t10k-labels-idx1-ubyte", np.repeat(np.arange(10, dtype=np.uint8), 3), False)
    return root


def test_plateau_rule():
    assert plateau_reason([], 0.5, 3) is None
    assert plateau_reason([80.0], 0.5, 3) is None  # one epoch: nothing to compare yet
    assert plateau_reason([80.0, 84.0], 0.5, 3) is None
    assert plateau_reason([80.0, 84.0, 84.3], 0.5, 5) == "plateau"
    assert plateau_reason([80.0, 84.0, 83.0], 0.5, 5) == "plateau"  # a worse epoch stops it too
    assert plateau_reason([80.0, 84.0, 86.0], 0.5, 3) == "max epochs"
    assert plateau_reason([80.0], 0.5, 1) == "max epochs"


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_study_end_to_end_resumes_and_reports(idx_root, tmp_path, capsys):
    out = tmp_path / "study"
    argv = ["study", "--out", str(out), "--data-root", str(idx_root), "--teachers", "resnet8", "wrn_16_1",
            "--teacher-epochs", "2", "1", "--per-class", "3", "--epochs", "2", "--test-per-class", "2",
            "--seeds", "0", "1", "--methods", "none", "MTKD-RL", "--max-steps", "1"]
    assert main(argv) == 0, capsys.readouterr().err
    err = capsys.readouterr().err
    assert "teacher wrn_16_1: stopped after 1 epoch(s) (max epochs)" in err and "[4/4] MTKD-RL seed 1" in err
    teachers = _rows(out / "teachers.csv")
    assert [t["teacher"] for t in teachers] == ["resnet8", "wrn_16_1"]
    assert [(t["epochs"], len(t["full_test_curve"].split())) for t in teachers] == [("2", 2), ("1", 1)]  # per cap
    runs = _rows(out / "runs.csv")
    assert [(r["method"], r["seed"]) for r in runs] == [("none", "0"), ("none", "1"), ("MTKD-RL", "0"),
                                                         ("MTKD-RL", "1")]
    assert all(0 <= float(r["test_top1"]) <= 100 for r in runs)
    assert runs[2]["diag_reward_loss_corr"] != "" and runs[0].get("diag_reward_loss_corr", "") == ""
    summary = _rows(out / "summary.csv")
    assert [(s["method"], s["seeds"]) for s in summary] == [("none", "2"), ("MTKD-RL", "2")]
    checks = _rows(out / "checks.csv")
    assert [(c["method"], c["epoch"], c["seeds"]) for c in checks] == [("MTKD-RL", "1", "2"), ("MTKD-RL", "2", "2")]
    assert float(checks[1]["diag_agent_grad_norm"]) > 0

    # resumable: nothing is trained again
    stamps = {p: os.path.getmtime(p) for p in out.glob("runs/*/seed*/result.json")}
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "seed 0" not in err and "epoch 1" not in err
    assert stamps == {p: os.path.getmtime(p) for p in out.glob("runs/*/seed*/result.json")}

    # the report: tables on stdout, in study.md and between a document's markers
    doc = tmp_path / "doc.md"
    doc.write_text(f"# head\n\n{DOC_BEGIN}\nold table\n{DOC_END}\n\ntail\n")
    assert main(["study", "--out", str(out), "--report", "--doc", str(doc)]) == 0
    table = capsys.readouterr().out
    assert re.search(r"\| MTKD-RL \| 2 \| \d+\.\d\d ± \d+\.\d\d \|", table)
    assert "| MTKD-RL - none | 2 |" in table and "| MTKD-RL | 2 | 2 |" in table  # paired; checks per epoch
    text = doc.read_text()
    assert "old table" not in text and table in text and text.startswith("# head") and text.endswith("tail\n")
    assert (out / "study.md").read_text() == table

    # a seed that not every method has finished is left out of the tables, and said so
    os.remove(out / "runs" / "none" / "seed1" / "result.json")
    assert main(["study", "--out", str(out), "--report"]) == 0
    table = capsys.readouterr().out
    assert "| MTKD-RL | 1 |" in table and "Left out: seed(s) 1" in table


def test_study_errors_are_one_line(idx_root, tmp_path, capsys):
    base = ["study", "--out", str(tmp_path / "s")]
    cases = [(base + ["--data-root", str(tmp_path / "nowhere")], "nowhere"),
             (base + ["--data-root", str(idx_root), "--methods", "MTKD"], "--methods"),
             (base + ["--data-root", str(idx_root), "--per-class", "0"], "--per-class"),
             (base + ["--data-root", str(idx_root), "--teachers", "resnet8"], "--teachers"),
             (base + ["--data-root", str(idx_root), "--teacher-epochs", "2", "1"], "--teacher-epochs"),
             (base + ["--report"], "no finished runs")]
    for argv, name in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and name in err[0], err
    assert not (tmp_path / "s" / "runs").exists()


def test_the_old_script_still_exports_its_names():
    spec = importlib.util.spec_from_file_location("study_fashion_mnist",
                                                  os.path.join(ROOT, "tools", "study_fashion_mnist.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.METHODS is METHODS and callable(module.main)
