"""tools/precision_study.py (issue 22; docs/training.md "Does bf16 harm accuracy?"): pairs are formed within a
setting, the summary per (setting, strategy) is the paired two-standard-error rule, rows of either schema are
read, and the teachers-stronger setting (``--setting study``) runs through the study's own script with a bf16
cache that differs from its float32 one in the precision only."""

import csv
import importlib.util
import json
import math
import os

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FASHION_MNIST_DEBIAN = "/usr/share/datasets/fashion-mnist"


def _load():
    spec = importlib.util.spec_from_file_location("precision_study", os.path.join(ROOT, "tools", "precision_study.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


study = _load()


def _rows(setting, strategy, fp32, bf16, seeds=None):
    seeds = range(len(fp32)) if seeds is None else seeds
    return [r for s, a, b in zip(seeds, fp32, bf16) for r in (
        {"setting": setting, "strategy": strategy, "seed": s, "precision": "fp32", "test_top1": a},
        {"setting": setting, "strategy": strategy, "seed": s, "precision": "bf16", "test_top1": b})]


def test_pairs_are_formed_within_a_setting_and_summarised_against_a_float64_reference():
    g = torch.Generator().manual_seed(7)
    cases = {}  # (setting, strategy) -> (fp32, bf16): odd numbers of seeds, the same strategy in both settings
    for setting, strategy, n, shift in (("demo", "aver", 5, 0.0), ("study", "aver", 7, -0.4),
                                        ("study", "mtkd_rl", 3, -1.5)):
        fp32 = 70 + 10 * torch.rand(n, generator=g, dtype=torch.float64)
        bf16 = fp32 + shift + 0.3 * torch.randn(n, generator=g, dtype=torch.float64)
        cases[(setting, strategy)] = (fp32, bf16)
    rows = [r for (setting, strategy), (a, b) in cases.items()
            for r in _rows(setting, strategy, a.tolist(), b.tolist())]
    # a study run whose partner is missing, under a seed the demo has: not paired across settings
    rows.append({"setting": "study", "strategy": "mtkd_rl", "seed": 4, "precision": "bf16", "test_top1": 1.0})
    out = {(r["setting"], r["strategy"]): r for r in study.summarise(rows)}
    assert set(out) == set(cases)
    for key, (a, b) in cases.items():
        d = b - a
        mean, se = d.mean().item(), (d.std(correction=1) / math.sqrt(len(d))).item()
        r = out[key]
        assert r["seeds"] == len(d)
        assert math.isclose(r["fp32_mean"], a.mean().item(), rel_tol=1e-12)
        assert math.isclose(r["bf16_mean"], b.mean().item(), rel_tol=1e-12)
        assert math.isclose(r["diff_mean"], mean, rel_tol=1e-9, abs_tol=1e-12)
        assert math.isclose(r["diff_se"], se, rel_tol=1e-9)
        assert r["verdict"].startswith("harm") == (mean < -2 * se)
        assert ("provisional" in r["verdict"]) == (len(d) < 5)
    table = study.format_table(list(out.values()))
    assert table.count("Setting `") == 2 and "| mtkd_rl | 3 |" in table.split("Setting `study`")[1]


def test_summarise_only_reads_both_schemas_and_merges_folders(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    # a runs.csv from before the setting column: its rows are the demo's
    with open(a / "runs.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["strategy", "seed", "precision", "test_top1", "train_top1", "wall_s"])
        w.writerows([["aver", 0, "fp32", 75.4, 80.0, 1], ["aver", 0, "bf16", 75.15, 80.0, 1],
                     ["aver", 1, "fp32", 72.35, 80.0, 1], ["aver", 1, "bf16", 73.05, 80.0, 1]])
    new = _rows("study", "aver", [81.5, 80.25, 82.0], [81.0, 80.75, 81.25])
    dup = {**new[0], "test_top1": 0.0}  # already read from the first folder: not read again
    with open(b / "runs.csv", "w", newline="") as f:
        w = csv.DictWriter(f, list(new[0]))
        w.writeheader()
        w.writerows(new)
    c = tmp_path / "c"
    c.mkdir()
    with open(c / "runs.csv", "w", newline="") as f:
        w = csv.DictWriter(f, list(dup))
        w.writeheader()
        w.writerow(dup)
    assert study.main(["--summarise-only", "--out", str(a), "--merge", str(b), str(c)]) == 0
    with open(a / "paired.csv", newline="") as f:
        paired = {(r["setting"], r["strategy"]): r for r in csv.DictReader(f)}
    assert set(paired) == {("demo", "aver"), ("study", "aver")}
    assert math.isclose(float(paired[("demo", "aver")]["diff_mean"]), ((75.15 - 75.4) + (73.05 - 72.35)) / 2)
    assert math.isclose(float(paired[("study", "aver")]["diff_mean"]), (-0.5 + 0.5 - 0.75) / 3)
    assert "Setting `demo`" in capsys.readouterr().out
    merged = study._read_rows(str(a / "runs.csv"))  # every run the table summarises, in the new schema
    assert len(merged) == 4 + 6 and {r["setting"] for r in merged} == {"demo", "study"}
    assert 0.0 not in [r["test_top1"] for r in merged]


def test_bad_setting_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        study.main(["--setting", "cifar", "--summarise-only"])
    assert e.value.code == 2 and "--setting" in capsys.readouterr().err


def test_study_labels_are_the_study_scripts_plain_methods():
    methods = study._study_script().METHODS
    labels = study.study_labels(methods)
    for strategy in study.STRATEGIES:  # the method itself, not a variant of it (MTKD-RL, not "MTKD-RL dynamic")
        assert (labels[strategy], strategy, {}) in [tuple(m) for m in methods]


def test_study_row_reads_a_finished_run_and_nothing_else(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    assert study.study_row(str(run), "aver", 3, "bf16") is None
    (run / "result.json").write_text(json.dumps({"method": "AVER", "seed": 3, "test_top1": 81.35, "wall_s": 47.26}))
    with open(run / "metrics.csv", "w", newline="") as f:
        csv.writer(f).writerows([["epoch", "train_top1"], [1, 40.5], [2, 77.25]])
    assert study.study_row(str(run), "aver", 3, "bf16") == {
        "setting": "study", "strategy": "aver", "seed": 3, "precision": "bf16", "test_top1": 81.35,
        "train_top1": 77.25, "wall_s": 47.3}


def test_same_build_ignores_only_the_precision_and_its_checksums():
    from mtkd_fast.cache.manifest import DIGEST_KEY

    a = {"views": 12, "dataset": {"fingerprint": "x"}, "teacher_precision": "fp32", "checksums": {"t0": [1]},
         DIGEST_KEY: "p"}
    assert study._same_build(a, {**a, "teacher_precision": "bf16", "checksums": {"t0": [2]}, DIGEST_KEY: "q"}) == []
    assert study._same_build(a, {**a, "views": 11, "dataset": {"fingerprint": "y"}}) == ["dataset", "views"]


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir(FASHION_MNIST_DEBIAN), reason="needs Debian's dataset-fashion-mnist")
def test_study_setting_quick_pairs_every_run_and_resumes(tmp_path):
    out = str(tmp_path / "ps")
    args = ["--setting", "study", "--quick", "--strategies", "mtkd_rl", "--seeds", "1", "--out", out]
    assert study.main(args) == 0
    rows = study._read_rows(os.path.join(out, "runs.csv"))
    assert [(r["setting"], r["strategy"], r["seed"], r["precision"]) for r in rows] == [
        ("study", "mtkd_rl", 1, "fp32"), ("study", "mtkd_rl", 1, "bf16")]
    manifests = {}
    for precision, folder in study.study_dirs(out).items():
        with open(os.path.join(folder, "teacher_cache", "manifest.json")) as f:
            manifests[precision] = json.load(f)
        with open(os.path.join(folder, "runs", "MTKD-RL", "seed1", "teachers.json")) as f:
            record = json.load(f)  # what the run's teachers' outputs were computed in, and nothing live
        assert record["source"] == "cache" and record["precision_used"] == precision
        with open(os.path.join(folder, "runs", "MTKD-RL", "seed1", "config.json")) as f:
            assert json.load(f)["teacher_precision"] == precision  # asked for explicitly (`mtkd-fast study`)
        assert "live_teachers" not in record
    assert manifests["fp32"]["teacher_precision"] == "fp32" and manifests["bf16"]["teacher_precision"] == "bf16"
    assert study._same_build(manifests["fp32"], manifests["bf16"]) == []
    assert manifests["fp32"]["checksums"] != manifests["bf16"]["checksums"]
    assert study.main(args) == 0  # resumed: nothing left to run
    assert len(study._read_rows(os.path.join(out, "runs.csv"))) == 2


def test_the_docs_table_and_paired_csv_are_the_tracked_runs_summary():
    """docs/training.md's paired tables are the tool's rendering of benchmarks/precision_study/runs.csv, and
    paired.csv is its summary: no number typed by hand, none left behind when runs are added."""
    folder = os.path.join(ROOT, "benchmarks", "precision_study")
    summary = study.summarise(study._read_rows(os.path.join(folder, "runs.csv")))
    with open(os.path.join(ROOT, "docs", "training.md")) as f:
        assert study.format_table(summary) in f.read()
    with open(os.path.join(folder, "paired.csv"), newline="") as f:
        paired = list(csv.DictReader(f))
    assert [(r["setting"], r["strategy"], int(r["seeds"]), r["verdict"]) for r in paired] == \
        [(r["setting"], r["strategy"], r["seeds"], r["verdict"]) for r in summary]
    for got, want in zip(paired, summary):
        assert math.isclose(float(got["diff_mean"]), want["diff_mean"], rel_tol=1e-12, abs_tol=1e-12)
