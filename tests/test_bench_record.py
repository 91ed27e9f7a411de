"""The benchmarks' one harness (``mtkd_fast.bench.record``) and the ``mtkd-fast bench`` verbs that use it.

- ``summarize`` against numpy's percentiles in float64 on random odd-sized samples; ``interleave`` takes the
  variants in turn and rotates the order; a tiny real run's CSV has the schema's header, one row per variant, the
  run's metadata, ordered percentiles and the ratios to the baseline.
- ``mtkd-fast bench ops | teachers | cache`` on tiny settings write that CSV (and a PNG); bad options are
  one-line usage errors.
- The pytest-benchmark suite writes the same schema (benchmarks/conftest.py), and nothing under
  ``--benchmark-disable``, which times nothing.
No timing is asserted: only that times are positive and finite.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from mtkd_fast.bench import record as rec
from mtkd_fast.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STATS = ("min_s", "p25_s", "median_s", "p75_s", "max_s")


@pytest.mark.parametrize("n", [1, 2, 7, 30])
def test_summarize_matches_numpy_percentiles(n):
    times = np.random.default_rng(n).exponential(0.01, n) + 1e-4
    got = rec.summarize(times.tolist())
    assert got["rounds"] == n
    for key, q in (("min_s", 0), ("p25_s", 25), ("median_s", 50), ("p75_s", 75), ("max_s", 100)):
        assert got[key] == pytest.approx(np.percentile(times.astype(np.float64), q), rel=1e-12, abs=0), key
    assert got["mean_s"] == pytest.approx(times.mean(), rel=1e-12)
    with pytest.raises(ValueError, match="times: expected at least one round"):
        rec.summarize([])


def test_interleave_takes_turns_and_rotates():
    calls = []
    variants = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    times = rec.interleave(variants, rounds=4, warmup=2)
    assert calls[:6] == list("abcabc")  # warm-up, untimed
    assert calls[6:] == list("abc" "bca" "cab" "abc")
    assert {k: len(v) for k, v in times.items()} == {"a": 4, "b": 4, "c": 4}
    assert all(t >= 0 and math.isfinite(t) for v in times.values() for t in v)
    with pytest.raises(ValueError, match="rounds: expected a positive integer"):
        rec.interleave(variants, rounds=0)


def test_record_csv_schema_on_a_tiny_real_run(tmp_path):
    x = torch.randn(301, 257)
    variants = {"matmul": lambda: x @ x.T, "add": lambda: x + x, "sum": lambda: x.sum(1)}
    times = rec.interleave(variants, rounds=5)
    record = rec.Record("cpu", harness="test")
    for name in variants:
        record.add("tiny", "301x257", name, times[name], baseline="matmul", images=301, extra={"note": name})
    with pytest.raises(ValueError, match="columns: unknown"):
        record.add("tiny", "301x257", "x", [1.0], median_speed=3)
    path = record.write(str(tmp_path / "out" / "tiny.csv"))
    with open(path) as f:
        assert f.readline().strip().split(",") == list(rec.COLUMNS)
    rows = rec.read_csv(path)
    assert [r["variant"] for r in rows] == list(variants)
    for r in rows:
        assert r["benchmark"] == "tiny" and r["harness"] == "test" and r["torch"] == torch.__version__
        assert r["device"] == "cpu" and r["cpu"] and r["commit"] and r["date"].endswith("Z")
        assert len(r["load_start"].split()) == 3 and len(r["load_end"].split()) == 3
        assert int(r["rounds"]) == 5 and len(r["times_s"].split()) == 5
        values = [float(r[k]) for k in STATS]
        assert all(math.isfinite(v) and v > 0 for v in values)
        assert values == sorted(values), values
        assert float(r["images_per_s"]) == pytest.approx(301 / float(r["median_s"]), rel=1e-9)
        assert float(r["median_x_baseline"]) == pytest.approx(
            float(r["median_s"]) / float(rows[0]["median_s"]), rel=1e-9)
        assert json.loads(r["extra"]) == {"note": r["variant"]}
        assert r["peak_rss_mib"] == "" and r["bytes_mb"] == ""  # not measured here: empty
    assert float(rows[0]["median_x_baseline"]) == 1.0 and float(rows[0]["min_x_baseline"]) == 1.0


def test_record_ratios_use_the_baseline_of_the_same_thread_count(tmp_path):
    # a run that times two thread counts (bench teachers --threads 1,2): each row is divided by its own
    # thread count's baseline, not by whichever baseline row came last
    record = rec.Record("cpu", harness="test")
    g = torch.Generator().manual_seed(3)
    times = {}
    for threads in (1, 2):
        for variant in ("base", "fast"):
            times[threads, variant] = (torch.rand(7, generator=g, dtype=torch.float64) + threads).tolist()
            record.add("tiny", "case", variant, times[threads, variant], baseline="base", threads=threads)
    rows = rec.read_csv(record.write(str(tmp_path / "threads.csv")))
    assert [(r["threads"], r["variant"]) for r in rows] == [("1", "base"), ("1", "fast"), ("2", "base"), ("2", "fast")]
    for r in rows:
        base = rec.summarize(times[int(r["threads"]), "base"])
        mine = rec.summarize(times[int(r["threads"]), r["variant"]])
        assert float(r["median_x_baseline"]) == pytest.approx(mine["median_s"] / base["median_s"], rel=1e-9)
        assert float(r["min_x_baseline"]) == pytest.approx(mine["min_s"] / base["min_s"], rel=1e-9)
    assert [float(r["median_x_baseline"]) for r in rows if r["variant"] == "base"] == [1.0, 1.0]


def _check_csv(path, benchmark, variants, baseline):
    with open(path) as f:
        assert f.readline().strip().split(",") == list(rec.COLUMNS)
    rows = rec.read_csv(path)
    timed = [r for r in rows if r["benchmark"] == benchmark]
    assert [r["variant"] for r in timed] == variants
    for r in timed:
        values = [float(r[k]) for k in STATS]
        assert all(math.isfinite(v) and v > 0 for v in values) and values == sorted(values), (r["variant"], values)
        assert r["baseline"] == baseline and r["threads"] == "1" and r["torch"] == torch.__version__
    base = next(r for r in timed if r["variant"] == baseline)
    assert float(base["median_x_baseline"]) == 1.0
    with open(os.path.join(os.path.dirname(path), f"{os.path.basename(path)[:-4]}.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    return rows


def test_bench_ops_cli(tmp_path, capsys):
    from mtkd_fast import ops

    if not ops.available(torch.device("cpu")):
        pytest.skip("no compiled kernels (make build)")
    assert main(["bench", "ops", "--rounds", "2", "--shapes", "cifar", "--variants", "fused,reference",
                 "--threads", "1", "--out", str(tmp_path)]) == 0
    assert "wrote" in capsys.readouterr().out
    rows = _check_csv(str(tmp_path / "ops_bench.csv"), "ops", ["fused", "reference"], "fused")
    # the fused CIFAR step's byte floor: the logits (4 teachers + student) and the student maps read for the state;
    # student + teachers' logits read and the gradient written; maps G and F read, dL/dG written (float32)
    maps = 64 * (2 * 384 + 2 * 256) * 8 * 8
    floor = (5 * 64 * 100 + maps) * 4 + 6 * 64 * 100 * 4 + 3 * maps * 4
    for r in rows:
        assert float(r["bytes_mb"]) == pytest.approx(floor / 1e6, rel=1e-12)
        assert float(r["floor_s"]) * float(r["copy_bandwidth_gbps"]) * 1e9 == pytest.approx(floor, rel=1e-9)
        assert r["case"] == "cifar" and int(r["batch_size"]) == 64 and r["label"].startswith("distill_step")


def test_bench_teachers_cli_always_runs_the_baseline(tmp_path):
    assert main(["bench", "teachers", "--rounds", "2", "--threads", "1", "--variants", "bf16_fold_nhwc",
                 "--teachers", "resnet8,resnet14", "--batch-size", "4", "--out", str(tmp_path)]) == 0
    rows = _check_csv(str(tmp_path / "teachers_bench.csv"), "teachers", ["fp32_eager", "bf16_fold_nhwc"],
                      "fp32_eager")
    extra = json.loads(rows[1]["extra"])
    assert extra["teachers"] == "resnet8 resnet14" and extra["fold_bn"] is True and extra["first_call_s"] > 0


def test_bench_cache_cli_steps_read_and_encodings(tmp_path):
    assert main(["bench", "cache", "--rounds", "2", "--threads", "1", "--student", "resnet8", "--teachers",
                 "resnet8,resnet14", "--batch-size", "8", "--per-class", "2", "--out", str(tmp_path)]) == 0
    rows = rec.read_csv(str(tmp_path / "cache_bench.csv"))
    steps = [r for r in rows if r["benchmark"] == "cache"]
    assert [r["variant"] for r in steps] == ["student_only", "mtkd_rl_live", "mtkd_rl_cached",
                                             "cache_read_one_batch"]
    assert all(float(r["median_s"]) > 0 for r in steps) and steps[3]["baseline"] == ""
    assert float(steps[0]["median_x_baseline"]) == 1.0 and json.loads(steps[2]["extra"])["cache_build_s"] > 0
    encodings = [r for r in rows if r["benchmark"] == "cache_encoding"]
    assert [r["variant"] for r in encodings[:2]] == ["int8 resnet8", "int8 resnet14"]
    for r in encodings:  # errors, not timings: empty timing columns, the values in extra
        assert r["median_s"] == "" and r["rounds"] == ""
        e = json.loads(r["extra"])
        err = e.get("int8_rel_rms_error", e.get("kl_grad_rel_error"))
        assert 0 < err < 2, e


@pytest.mark.parametrize("argv, message", [
    (["ops", "--shapes", "cifar,nope"], "--shapes: expected a comma-separated list of cifar, imagenet"),
    (["ops", "--variants", "fused,fast"], "--variants: expected a comma-separated list of fused"),
    (["ops", "--rounds", "0"], "--rounds: expected a positive integer, got 0"),
    (["ops", "--device", "tpu"], "--device: expected 'cpu' or 'cuda[:N]', got 'tpu'"),
    (["teachers", "--threads", "1,0"], "--threads: expected comma-separated positive integers, got '1,0'"),
    (["teachers", "--threads", "two"], "--threads: expected comma-separated positive integers, got 'two'"),
    (["teachers", "--variants", "fp64"], "--variants: expected a comma-separated list of fp32_eager"),
    (["teachers", "--teachers", "resnet8,nope"], "--teachers: expected a comma-separated list of"),
    (["teachers", "--batch-size", "0"], "--batch-size: expected a positive integer, got 0"),
    (["cache", "--rounds", "0"], "--rounds: expected a positive integer, got 0"),
    (["cache", "--per-class", "0"], "--per-class: expected a positive integer, got 0"),
    (["cache", "--student", "nope"], "--student: unknown model 'nope'; valid names: "),
    (["cache", "--replay-experiment", "/tmp/unused", "--views", "1,x"],
     "--views: expected comma-separated positive integers, got '1,x'"),
])
def test_bench_verbs_bad_options_are_one_line_errors(argv, message, capsys, tmp_path):
    assert main(["bench", *argv, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mtkd-fast bench: error: ") and message in err, err
    assert err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


def _pytest_bench(tmp_path, *args):
    env = {**os.environ, "MTKD_BENCH_OUT": str(tmp_path), "MTKD_BENCH_THREADS": "1", "PYTHONPATH": ROOT}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "benchmarks/bench_ops.py",
                           "-k", "test_step and cifar and (fused or reference) and not compiled", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_pytest_benchmark_suite_writes_the_same_schema(tmp_path):
    from mtkd_fast import ops

    if not ops.available(torch.device("cpu")):
        pytest.skip("no compiled kernels (make build)")
    out = _pytest_bench(tmp_path, "--benchmark-disable")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "no CSV written" in out.stdout and not (tmp_path / "pytest_bench.csv").exists()
    out = _pytest_bench(tmp_path, "--benchmark-only")
    assert out.returncode == 0, out.stdout + out.stderr
    with open(tmp_path / "pytest_bench.csv") as f:
        assert f.readline().strip().split(",") == list(rec.COLUMNS)
    rows = rec.read_csv(str(tmp_path / "pytest_bench.csv"))
    assert sorted(r["variant"] for r in rows) == ["fused", "reference"]
    for r in rows:
        assert r["benchmark"] == "ops" and r["case"] == "cifar" and r["harness"] == "pytest-benchmark"
        assert r["baseline"] == "fused" and r["threads"] == "1" and int(r["rounds"]) == 30
        values = [float(r[k]) for k in STATS]
        assert values == sorted(values) and values[0] > 0
        assert float(r["bytes_mb"]) > 0 and json.loads(r["extra"])["test"].startswith("test_step[cifar-")
    fused = next(r for r in rows if r["variant"] == "fused")
    assert float(fused["median_x_baseline"]) == 1.0
