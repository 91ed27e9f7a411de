"""One training step's distillation, forward + backward, timed the way the trainer runs it: the agent state
first (before the weights exist), then the weights, then the weighted loss and its gradients, then the
per-sample loss and the reward -- by calling ``mtkd_fast.train.step.distill_step``, the function
``Trainer.train_step`` calls. Against the authors' way, the eager reference and the compiled reference (the same
function on ``backend="reference"``), at the CIFAR and ImageNet shapes.

    .venv/bin/python -m pytest benchmarks/bench_ops.py -q --benchmark-only \
        --benchmark-columns=min,median,mean,stddev,rounds
    MTKD_BENCH_DEVICE=cuda ...   # the same on the GPU (every timed call ends with a device synchronize)
    MTKD_BENCH_THREADS=1 .venv/bin/python benchmarks/bench_ops.py   # variants interleaved round by round

Variants: ``fused`` / ``reference`` / ``compiled_reference``: ``distill_step`` on the fused backend, on the
reference backend, and ``torch.compile`` of the latter; ``authors``: ``mtkd_fast.bench.authors.authors_step``;
and, labelled apart, ``mtkdloss_cos_in_loss``: ``MTKDLoss(backend="fused")`` given the teacher embeddings, which
pools the cosine in the loss's own read of the maps -- for users of ``MTKDLoss`` outside MTKD-RL, whose weights do not
depend on the state (MTKD-RL cannot take its state from the weighted loss).

The weights come from the state as the agent's action blends them (``reference.action``: fixed policy outputs
plus the confidence, gap and similarity priors of the state); the agent's two-layer network itself is left out,
as in the authors' baseline, which takes its weights as inputs.

Besides pytest-benchmark's table (or the interleaved run's lines), the module writes
benchmarks/results/bench_ops_<N>thread.{json,csv,png} (CPU) or
bench_ops_cuda.{json,csv,png}: per shape the median time of each variant, the ratios to the fused step measured in
the same run, the step's byte floor, and for the fused ops alone the bytes they must move, the bandwidth reached
and the op's time over the memory floor (bytes / this device's copy bandwidth, measured in the same run).
"""

from __future__ import annotations

import csv
import json
import os
import tempfile
import time

import pytest
import torch

from mtkd_fast import MTKDLoss, ops
from mtkd_fast import reference as ref
from mtkd_fast.bench.authors import authors_step
from mtkd_fast.train.step import distill_step

DEVICE = torch.device(os.environ.get("MTKD_BENCH_DEVICE", "cpu"))
pytestmark = pytest.mark.skipif(not ops.available(DEVICE), reason=f"no compiled kernels for {DEVICE} (make build)")

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
# MTKD_BENCH_THREADS=1 measures single-threaded: on a shared, oversubscribed machine every parallel region
# waits for a descheduled worker thread (even a [64, 4] softmax then takes ~10 ms), which drowns the kernels
if os.environ.get("MTKD_BENCH_THREADS"):
    torch.set_num_threads(int(os.environ["MTKD_BENCH_THREADS"]))
SHAPES = {
    # B, K, per-teacher maps (C, H, W)
    "cifar": dict(B=64, K=100, maps=[(384, 8, 8), (384, 8, 8), (256, 8, 8), (256, 8, 8)], rounds=30),
    "imagenet": dict(B=256, K=1000, maps=[(2048, 7, 7)] * 3, rounds=5),
}
T, ALPHA, BETA = 4.0, 1.0, 5.0


def _inputs(shape):
    cfg = SHAPES[shape]
    B, K, maps = cfg["B"], cfg["K"], cfg["maps"]
    M = len(maps)
    g = torch.Generator().manual_seed(0)
    dev = dict(device=DEVICE)
    zs = torch.randn(B, K, generator=g).to(**dev).requires_grad_(True)
    zt = torch.randn(M, B, K, generator=g).to(**dev)  # stacked, as the trainer's teacher source hands them over
    y = torch.randint(0, K, (B,), generator=g).to(**dev)
    gs = [torch.randn(B, *s, generator=g).to(**dev).requires_grad_(True) for s in maps]
    fs = [torch.randn(B, *s, generator=g).to(**dev) for s in maps]
    emb = [f.mean(dim=(2, 3)) for f in fs]
    wl = torch.softmax(torch.randn(B, M, generator=g), 1).to(**dev)
    wf = torch.softmax(torch.randn(B, M, generator=g), 1).to(**dev)
    return zs, zt, y, gs, fs, emb, wl, wf


def _sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def _distill_step(backend):
    """The trainer's sequence (``distill_step``): state -> weights -> loss -> reward."""

    def step(zs, zt, y, gs, fs, emb, wl, wf):
        def weights(tce, state):  # the agent's action for fixed policy outputs (wl, wf): priors of the state
            a_l, a_f = ref.action(wl, wf, state.teacher_ce, state.kl, state.cos)
            return a_l, a_f, None

        return distill_step(zs, gs, y, zt, emb, fs, weights, temperature=T, alpha=ALPHA, beta=BETA, backend=backend)

    return step


def _cos_in_loss_step(zs, zt, y, gs, fs, emb, wl, wf):
    """``MTKDLoss`` with fixed weights and the cosine from the loss's read of the maps (outside MTKD-RL)."""
    out = MTKDLoss(T, ALPHA, BETA, backend="fused")(zs, zt, y, wl, gs, fs, wf, emb)
    state = ref.agent_state(out.cos, out.kl, out.teacher_ce, emb, zt)
    priors = (ref.confidence_prior(out.teacher_ce), ref.gap_prior(out.kl), ref.similarity_prior(out.cos))
    reward = ops.per_sample_loss_and_reward(out.student_ce, out.kl, wl, out.mse, wf, ALPHA, BETA).reward
    return out.loss, state, priors, reward


def _authors(zs, zt, y, gs, fs, emb, wl, wf):
    return authors_step(zs, list(zt), y, gs, fs, emb, wl, wf, T, ALPHA, BETA)


def _train_step(step, args):
    zs, zt, y, gs = args[:4]
    loss = step(*args)[0]
    torch.autograd.grad(loss, [zs, *gs])
    _sync()


_compiled = {}


def _variant(name):
    if name == "fused":
        return _distill_step("fused")
    if name == "reference":
        return _distill_step("reference")
    if name == "compiled_reference":
        if name not in _compiled:
            _compiled[name] = torch.compile(_distill_step("reference"), dynamic=False)
        return _compiled[name]
    if name == "mtkdloss_cos_in_loss":
        return _cos_in_loss_step
    return _authors


def _fused_bytes(shape):
    """Bytes the fused ops move for forward + backward (float32); the fused step moves exactly these (its floor).

    ``agent_stats`` reads the logits and the student maps; the loss ops read every input once more and write
    each gradient once. On the CPU the backward of ``loss.backward()`` (incoming gradient 1) hands out the
    saved gradients without touching them (mtkd_fast.ops._scaled); on a GPU it scales them (reading the
    incoming gradient's value would sync): one more read and write of each gradient.
    """
    cfg = SHAPES[shape]
    B, K, M = cfg["B"], cfg["K"], len(cfg["maps"])
    n_maps = sum(B * c * h * w for c, h, w in cfg["maps"])
    backward = 2 if DEVICE.type == "cuda" else 0  # passes over each gradient in the backward
    stats = (M + 1) * B * K * 4 + n_maps * 4  # read the logits and the student maps (pooled for the cosine)
    logit = (M + 1 + 1 + backward) * B * K * 4  # read student + teachers, write dloss/dz_s
    feature = (3 + backward) * n_maps * 4  # read G and F, write dloss/dG
    return dict(agent_stats=stats, logit_kd=logit, feature_kd=feature, feature_kd_cos=feature,
                step=stats + logit + feature, cos_in_loss_step=logit + feature)


def _copy_bandwidth():
    """The device's bandwidth for a large tensor copy (read + write), best of 5: the practical ceiling."""
    src = torch.randn(64 * 2**20, device=DEVICE)  # 256 MiB
    dst = torch.empty_like(src)
    dst.copy_(src)
    _sync()
    best = min(_timed(lambda: (dst.copy_(src), _sync())) for _ in range(5))
    return 2 * src.numel() * 4 / best


def _device_name():
    if DEVICE.type == "cuda":
        return torch.cuda.get_device_name(DEVICE)
    import platform

    return platform.processor() or platform.machine()


def _timed(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _write_atomic(path, write):
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@pytest.fixture(scope="module")
def report():
    medians: dict = {}
    yield medians
    if not medians:
        return
    copy_bw = _copy_bandwidth()
    rows = []
    for shape in SHAPES:
        got = medians.get(shape, {})
        if "fused" not in got:
            continue
        # medians, and minima (robust when other processes share the cores)
        fused, fused_min = got["fused"]["median"], got["fused"]["min"]
        nbytes = _fused_bytes(shape)
        row = dict(shape=shape, device=_device_name(), threads=torch.get_num_threads(), torch=torch.__version__,
                   copy_bandwidth_GBps=copy_bw / 1e9)
        for name, t in got.items():
            row[f"{name}_ms"] = t["median"] * 1e3
            row[f"{name}_min_ms"] = t["min"] * 1e3
            if not name.startswith("op_") and name != "fused":
                row[f"speedup_vs_{name}"] = t["median"] / fused
                row[f"speedup_vs_{name}_min"] = t["min"] / fused_min
        for op in ("agent_stats", "logit_kd", "feature_kd", "feature_kd_cos"):
            if f"op_{op}" in got:
                row[f"{op}_MB"] = nbytes[op] / 1e6
                row[f"{op}_GBps"] = nbytes[op] / got[f"op_{op}"]["median"] / 1e9
                row[f"{op}_GBps_min"] = nbytes[op] / got[f"op_{op}"]["min"] / 1e9
                row[f"{op}_x_floor"] = got[f"op_{op}"]["median"] / (nbytes[op] / copy_bw)  # 1 = at the copy bandwidth
        row["step_MB"] = nbytes["step"] / 1e6
        row["fused_step_GBps"] = nbytes["step"] / fused / 1e9
        row["step_floor_ms"] = nbytes["step"] / copy_bw * 1e3  # the fused step's bytes at the copy bandwidth
        if "authors" in got:  # the best ratio the byte floor allows
            row["authors_over_floor"] = got["authors"]["median"] / (nbytes["step"] / copy_bw)
        rows.append(row)
    _write_rows(rows)
    for r in rows:
        print("\n" + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()))


def _write_rows(rows):
    """benchmarks/results/bench_ops_<N>thread.{json,csv,png} (CPU) or bench_ops_<device>.* (GPU)."""
    os.makedirs(RESULTS, exist_ok=True)
    tag = f"_{torch.get_num_threads()}thread" if DEVICE.type == "cpu" else f"_{DEVICE.type}"
    _write_atomic(os.path.join(RESULTS, f"bench_ops{tag}.json"), lambda p: json.dump(rows, open(p, "w"), indent=2))
    fields = sorted({k for r in rows for k in r}, key=lambda k: (k != "shape", k))

    def write_csv(p):
        with open(p, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=fields)
            w.writeheader()
            w.writerows(rows)

    _write_atomic(os.path.join(RESULTS, f"bench_ops{tag}.csv"), write_csv)
    _plot(rows, tag)


def _plot(rows, tag):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = ["authors", "reference", "compiled_reference", "mtkdloss_cos_in_loss", "fused"]
    fig, axes = plt.subplots(1, len(rows), figsize=(5 * len(rows), 3.5), squeeze=False)
    for ax, r in zip(axes[0], rows):
        names = [v for v in variants if f"{v}_ms" in r]
        colors = {"authors": "#999", "reference": "#69c", "compiled_reference": "#36a", "mtkdloss_cos_in_loss": "#e96",
                  "fused": "#c33"}
        ax.bar(names, [r[f"{v}_ms"] for v in names], color=[colors[v] for v in names])
        where = f"CPU, {r['threads']} thr" if DEVICE.type == "cpu" else r["device"]
        ax.set_title(f"{r['shape']}: state, weights, loss + grads, reward ({where})", fontsize=9)
        ax.set_ylabel("ms (median)")
        ax.tick_params(axis="x", labelrotation=20)
    fig.tight_layout()
    _write_atomic(os.path.join(RESULTS, f"bench_ops{tag}.png"), lambda p: fig.savefig(p, dpi=120, format="png"))
    plt.close(fig)


def _record(report, shape, name, benchmark):
    if benchmark.stats is not None:
        stats = benchmark.stats.stats
        report.setdefault(shape, {})[name] = dict(median=stats.median, min=stats.min)


@pytest.mark.parametrize("variant", ["fused", "authors", "reference", "compiled_reference", "mtkdloss_cos_in_loss"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_step(benchmark, report, shape, variant):
    args = _inputs(shape)
    step = _variant(variant)
    _train_step(step, args)  # warm-up (and compilation for the compiled reference)
    benchmark.group = f"step-{shape}"
    benchmark.pedantic(_train_step, args=(step, args), rounds=SHAPES[shape]["rounds"], warmup_rounds=1)
    _record(report, shape, variant, benchmark)


@pytest.mark.parametrize("op", ["agent_stats", "logit_kd", "feature_kd", "feature_kd_cos"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_fused_op(benchmark, report, shape, op):
    zs, zt, y, gs, fs, emb, wl, wf = _inputs(shape)
    if op == "agent_stats":
        def run():
            ops.agent_stats(zs, zt, y, gs, emb, T)
            _sync()
    elif op == "logit_kd":
        def run():
            torch.autograd.grad(ops.mtkd_logit_kd(zs, zt, y, wl, T, ALPHA).loss, zs)
            _sync()
    elif op == "feature_kd":
        def run():
            torch.autograd.grad(ops.mtkd_feature_kd(gs, fs, wf, BETA).loss, gs)
            _sync()
    else:  # the same with the agent state's cosine from the same read of the maps
        def run():
            torch.autograd.grad(ops.feature_kd_and_cosine(gs, fs, wf, BETA, emb)[0], gs)
            _sync()
    run()
    _sync()
    benchmark.group = f"op-{shape}"
    benchmark.pedantic(run, rounds=SHAPES[shape]["rounds"] * 2, warmup_rounds=1)
    _record(report, shape, f"op_{op}", benchmark)


# --------------------------------------------------------------------------------------------
# interleaved rounds (python benchmarks/bench_ops.py): robust to load that drifts during a run
# --------------------------------------------------------------------------------------------

VARIANTS = ("fused", "authors", "reference", "compiled_reference", "mtkdloss_cos_in_loss")


def interleaved(shape, rounds, variants=VARIANTS):
    """Median and minimum seconds of each variant's step, the variants taking turns round by round (so a load
    change on a shared machine hits every variant alike)."""
    import statistics

    args = _inputs(shape)
    steps = {v: _variant(v) for v in variants}
    for v in variants:
        _train_step(steps[v], args)  # warm-up (and compilation)
        _train_step(steps[v], args)
    times = {v: [] for v in variants}
    for _ in range(rounds):
        for v in variants:
            times[v].append(_timed(lambda: _train_step(steps[v], args)))
    return {v: dict(median=statistics.median(t), min=min(t)) for v, t in times.items()}


def main(argv=None):
    import argparse

    parser = argparse.ArgumentParser(description="Interleaved step timings of the fused ops and the baselines.")
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--rounds", type=int, default=None, help="rounds per shape (default: the shape's own)")
    args = parser.parse_args(argv)
    load = os.getloadavg()
    copy_bw = _copy_bandwidth()
    rows = []
    for shape in args.shapes:
        got = interleaved(shape, args.rounds or SHAPES[shape]["rounds"])
        nbytes = _fused_bytes(shape)
        fused = got["fused"]
        row = dict(shape=shape, threads=torch.get_num_threads(), device=_device_name(), load_before=load,
                   load_after=os.getloadavg(), copy_bandwidth_GBps=copy_bw / 1e9,
                   step_floor_ms=nbytes["step"] / copy_bw * 1e3, step_MB=nbytes["step"] / 1e6)
        for v, t in got.items():
            row[f"{v}_ms"], row[f"{v}_min_ms"] = t["median"] * 1e3, t["min"] * 1e3
            if v != "fused":
                row[f"{v}_over_fused"] = t["median"] / fused["median"]
                row[f"{v}_over_fused_min"] = t["min"] / fused["min"]
        row["authors_over_floor"] = got["authors"]["median"] / (nbytes["step"] / copy_bw)
        rows.append(row)
        print(", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
    _write_rows(rows)


if __name__ == "__main__":
    main()
