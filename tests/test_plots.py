"""The run's plots and metrics.csv (issue 25): teachers named by architecture in the columns, integer epoch ticks,
MTKD-RL's warm-up shaded and kept off the y-scale, one colour per teacher and one line style/marker per logit vs
feature weights, legends outside the data, and no empty memory panel in the epoch benchmark's plot."""

import csv
import math
import random

import pytest
import torch
from standins import make_batches, make_setup

from mtkd_fast.agent import MTKDAgent
from mtkd_fast.bench.report import plot as plot_bench
from mtkd_fast.teachers import LiveTeachers
from mtkd_fast.train import TrainConfig, Trainer
from mtkd_fast.train.checkpoint import load_checkpoint_file, save_atomic
from mtkd_fast.train.diagnostics import (
    WeightCurve,
    WeightDiagnostics,
    plot_diagnostics,
    plot_teacher_weights,
    rename_index_columns,
    teacher_labels,
)

matplotlib = pytest.importorskip("matplotlib")
from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.colors import to_rgba  # noqa: E402


# ---------------------------------------------------------------------------------------------- column names
def test_teacher_labels_name_by_architecture_and_number_repeats():
    assert teacher_labels(["resnet8", "wrn_16_1"], 2) == ["resnet8", "wrn_16_1"]
    assert teacher_labels(["resnet8", "resnet14", "resnet8"], 3) == ["resnet8_1", "resnet14", "resnet8_2"]
    # a numbered label never takes a name a teacher already has
    assert teacher_labels(["resnet8", "resnet8_1", "resnet8"], 3) == ["resnet8_2", "resnet8_1", "resnet8_3"]
    assert teacher_labels(["timm:vit/b 16", "a,b"], 2) == ["timm_vit_b_16", "a_b"]  # safe in a CSV header
    assert teacher_labels(None, 3) == ["t0", "t1", "t2"]
    assert teacher_labels(["resnet8"], 2) == ["t0", "t1"]  # names that do not cover every teacher


def test_old_index_columns_renamed():
    row = {"epoch": 3, "wl_t0": 0.25, "wf_t1": 0.5, "diag_corr_wl_right_t1": -0.1, "diag_entropy_wl": 0.9,
           "wl_t7": 1.0, "lr": 0.1}
    out = rename_index_columns(row, ["resnet8_1", "resnet8_2"])
    assert out == {"epoch": 3, "wl_resnet8_1": 0.25, "wf_resnet8_2": 0.5, "diag_corr_wl_right_resnet8_2": -0.1,
                   "diag_entropy_wl": 0.9, "wl_t7": 1.0, "lr": 0.1}
    assert list(out) == ["epoch", "wl_resnet8_1", "wf_resnet8_2", "diag_corr_wl_right_resnet8_2", "diag_entropy_wl",
                         "wl_t7", "lr"]  # the column order kept


def test_diagnostics_columns_take_the_labels_and_refuse_a_wrong_count():
    diag = WeightDiagnostics(2, labels=["resnet8_1", "resnet8_2"])
    g = torch.Generator().manual_seed(3)
    w = torch.rand(7, 2, generator=g, dtype=torch.float64)
    diag.update(w, w.flip(1), torch.randn(2, 7, 5, generator=g), torch.randint(0, 5, (7,), generator=g))
    out = diag.compute()
    assert {f"diag_corr_{k}_right_resnet8_{i}" for k in ("wl", "wf") for i in (1, 2)} <= set(out)
    assert not [k for k in out if k.endswith(("_t0", "_t1"))]
    with pytest.raises(ValueError, match=r"^labels: expected 2 teacher labels, got \['a'\]$"):
        WeightDiagnostics(2, labels=["a"])


DATA = make_batches(12, 6, seed=31)


def _trainer(out_dir, epochs, teachers):
    student, live, transfer, sizes = make_setup(seed=30)
    cfg = TrainConfig(student="tiny", teachers=teachers, strategy="mtkd_rl", epochs=epochs, agent_step=2,
                      progress=False, out_dir=str(out_dir), lr=0.05, loss_backend="reference")
    return Trainer(cfg, student, LiveTeachers(live), transfer, MTKDAgent(sizes, 3))


def _fit(trainer):
    return trainer.fit(lambda epoch: DATA[:4], DATA[:2])


def test_metrics_csv_names_teachers_and_reads_back_an_old_checkpoint(tmp_path, one_thread):
    teachers = ["resnet8", "resnet14", "resnet8"]
    labels = ["resnet8_1", "resnet14", "resnet8_2"]
    torch.manual_seed(0)
    _fit(_trainer(tmp_path, 1, teachers))
    with open(tmp_path / "metrics.csv", newline="") as f:
        header = next(csv.reader(f))
    for label in labels:
        assert {f"wl_{label}", f"wf_{label}", f"diag_corr_wl_right_{label}", f"diag_corr_wf_right_{label}"} <= \
            set(header)
    assert not [c for c in header if c.endswith(("_t0", "_t1", "_t2"))]

    # a checkpoint from before the naming: its history under wl_t0, ...; the resumed CSV has one set of columns
    path = tmp_path / "checkpoint_last.pt"
    ckpt = load_checkpoint_file(str(path))
    old = {label: f"t{m}" for m, label in enumerate(labels)}
    for key in list(ckpt["history"][0]):
        for label, index in old.items():
            if key.endswith("_" + label) and key.startswith(("wl_", "wf_", "diag_corr_")):
                ckpt["history"][0][key[:-len(label)] + index] = ckpt["history"][0].pop(key)
                break
    assert "wl_t2" in ckpt["history"][0] and "wl_resnet8_2" not in ckpt["history"][0]
    warmup = ckpt["history"][0]["wl_t2"]
    save_atomic(ckpt, str(path))
    resumed = _trainer(tmp_path, 2, teachers)
    resumed.resume(str(path))
    _fit(resumed)
    with open(tmp_path / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert not [c for c in rows[0] if c.endswith(("_t0", "_t1", "_t2"))]
    assert float(rows[0]["wl_resnet8_2"]) == warmup == 1.0 and 0.0 < float(rows[1]["wl_resnet8_2"]) < 1.0
    assert all(rows[1][c] != "" for c in rows[1])  # every column filled in both epochs
    assert all(rows[0][f"wl_{label}"] != "" for label in labels)


# ---------------------------------------------------------------------------------------------- figures
def _legends(fig):
    return [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None] + list(fig.legends)


def _assert_legends_outside_the_data(fig):
    """Every legend lies inside the figure and overlaps no panel's data area."""
    canvas = FigureCanvasAgg(fig)  # the saved figure was closed: lay it out again as savefig did
    canvas.draw()
    renderer = canvas.get_renderer()
    legends = _legends(fig)
    assert legends
    page = fig.bbox
    for legend in legends:
        box = legend.get_window_extent(renderer)
        assert page.x0 - 1 <= box.x0 and box.x1 <= page.x1 + 1 and page.y0 - 1 <= box.y0 and box.y1 <= page.y1 + 1
        for ax in fig.axes:
            assert not box.overlaps(ax.get_window_extent(renderer)), (legend.get_texts()[0].get_text(), ax.get_title())


def _assert_integer_epoch_ticks(ax):
    lo, hi = ax.get_xlim()
    ticks = [t for t in ax.get_xticks() if lo <= t <= hi]
    assert ticks and all(float(t).is_integer() for t in ticks), ticks


def _weights_history(labels, epochs, warmup, rng):
    rows = []
    for e in range(1, epochs + 1):
        row = {"epoch": e}
        for label in labels:
            row[f"wl_{label}"] = 1.0 if e <= warmup else rng.uniform(0.31, 0.35)
            row[f"wf_{label}"] = 1.0 if e <= warmup else rng.uniform(0.30, 0.36)
        rows.append(row)
    return rows


def test_teacher_weights_plot_integer_ticks_warmup_shaded_off_scale(tmp_path):
    rng = random.Random(5)
    labels = ["resnet20", "wrn_16_1", "MobileNetV2_0_5"]
    history = _weights_history(labels, 3, 1, rng)
    path = tmp_path / "teacher_weights.png"
    fig = plot_teacher_weights([WeightCurve("", history, warmup_epochs=1)], labels, str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(fig.axes) == 2
    for ax, key in zip(fig.axes, ("wl", "wf")):
        _assert_integer_epoch_ticks(ax)
        after = [r[f"{key}_{label}"] for r in history[1:] for label in labels]
        lo, hi = ax.get_ylim()
        # the post-warm-up weights fill the axis; the warm-up's 1 is not on it
        assert lo <= min(after) and max(after) <= hi and hi < 1.0
        assert (hi - lo) < 3 * (max(after) - min(after))
        spans = [p for p in ax.patches if p.get_x() <= 1 <= p.get_x() + p.get_width()]
        assert spans and all(p.get_x() + p.get_width() < 2 for p in spans)  # epoch 1 shaded, epoch 2 not
        assert any("warm-up" in t.get_text() and "weight 1" in t.get_text() for t in ax.texts)
        colors = {to_rgba(line.get_color()) for line in ax.get_lines() if len(line.get_xdata())}
        assert len(colors) == len(labels)  # one colour per teacher
    legend_texts = [t.get_text() for t in _legends(fig)[0].get_texts()]
    assert legend_texts[:3] == labels
    _assert_legends_outside_the_data(fig)


def test_teacher_weights_plot_two_methods_distinct_styles(tmp_path):
    rng = random.Random(6)
    labels = ["a", "b"]
    curves = [WeightCurve("MTKD-RL", _weights_history(labels, 4, 1, rng), 1),
              WeightCurve("CA-MKD", _weights_history(labels, 4, 0, rng))]
    fig = plot_teacher_weights(curves, labels, str(tmp_path / "w.png"))
    for ax in fig.axes:
        lines = [line for line in ax.get_lines() if line.get_linestyle() not in ("None", "none", "")]
        assert {line.get_linestyle() for line in lines} == {"-", "--"}
        # CA-MKD has no warm-up: its epoch 1 weight is on the y-scale
        ca = [r[f"{k}_{t}"] for r in curves[1].rows for k in ("wl", "wf") if ax is fig.axes[("wl", "wf").index(k)]
              for t in labels]
        lo, hi = ax.get_ylim()
        assert lo <= min(ca) and max(ca) <= hi
    texts = [t.get_text() for t in _legends(fig)[0].get_texts()]
    assert "MTKD-RL" in texts and "CA-MKD" in texts
    assert "MTKD-RL warm-up (fixed weights)" in texts  # the shading is MTKD-RL's, not CA-MKD's
    _assert_legends_outside_the_data(fig)


def test_diagnostics_plot_colour_per_teacher_style_per_kind(tmp_path):
    rng = random.Random(7)
    labels = ["resnet8_1", "resnet8_2", "vgg8"]
    rows = []
    for e in range(1, 4):
        row = {"epoch": e}
        for key in ("wl", "wf"):
            row[f"diag_entropy_{key}"] = rng.uniform(0.8, 1.0)
            for part in ("policy", "prior", "shift"):
                row[f"diag_{part}_{key}"] = rng.uniform(0.0, 0.3)
            for label in labels:
                row[f"diag_corr_{key}_right_{label}"] = rng.uniform(-0.5, 0.5)
        rows.append(row)
    path = tmp_path / "agent_diagnostics.png"
    fig = plot_diagnostics(rows, labels, str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(fig.axes) == 3
    corr = fig.axes[1]
    lines = [line for line in corr.get_lines() if len(line.get_xdata()) == len(rows)]
    assert len(lines) == 2 * len(labels)
    by_color = {}
    for line in lines:
        by_color.setdefault(to_rgba(line.get_color()), []).append(line)
    assert len(by_color) == len(labels)  # one colour per teacher ...
    for pair in by_color.values():  # ... its logit and feature series told apart by line style and marker
        assert len(pair) == 2
        assert pair[0].get_linestyle() != pair[1].get_linestyle() and pair[0].get_marker() != pair[1].get_marker()
    # the y-values are the teachers' own series
    for m, label in enumerate(labels):
        ys = sorted(tuple(line.get_ydata()) for line in by_color[to_rgba(f"C{m}")])
        assert ys == sorted(tuple(r[f"diag_corr_{k}_right_{label}"] for r in rows) for k in ("wl", "wf"))
    assert any(t.get_text() == "vgg8" for t in corr.get_legend().get_texts())
    for ax in fig.axes:
        _assert_integer_epoch_ticks(ax)
    _assert_legends_outside_the_data(fig)


def _bench_result(memory: bool, rng):
    rows = []
    for student in ("resnet8", "resnet14"):
        for config in ("student_only", "aver", "mtkd_rl_cached"):
            mem = rng.uniform(300, 500) if memory else float("nan")
            rows.append({"student": student, "config": config, "label": config, "median_s": rng.uniform(0.5, 2.0),
                         "time_x_student_only": rng.uniform(1, 2), "mem_x_aver": 1.1 if memory else float("nan"),
                         "peak_rss_mib": mem, "peak_device_mib": float("nan"), "steps": 3, "batch_size": 5})
    return {"rows": rows, "meta": {"device": "cpu", "gpu": None, "cpu": "test cpu", "torch": torch.__version__,
                                   "commit": "abc"}}


@pytest.mark.parametrize("memory", [False, True])
def test_epoch_bench_plot_memory_panel_only_with_data(tmp_path, memory):
    result = _bench_result(memory, random.Random(8))
    fig = plot_bench(result, str(tmp_path / "epoch_bench.png"))
    assert len(fig.axes) == (2 if memory else 1)
    if memory:
        widths = sorted(p.get_width() for p in fig.axes[1].patches)
        assert widths == pytest.approx(sorted(r["peak_rss_mib"] for r in result["rows"]))
        assert all(math.isfinite(w) for w in widths)
    assert "median seconds" in fig.axes[0].get_xlabel()
    _assert_legends_outside_the_data(fig)
