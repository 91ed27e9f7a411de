"""Fused ops vs the authors' way, the eager reference and the compiled reference (forward + backward of one
step's loss, agent state, priors and reward), at the CIFAR and ImageNet shapes of the brief.

    .venv/bin/python -m pytest benchmarks/bench_ops.py -q --benchmark-only \
        --benchmark-columns=min,median,mean,stddev,rounds
    MTKD_BENCH_DEVICE=cuda ...   # the same on the GPU (every timed call ends with a device synchronize)

Besides pytest-benchmark's table, the module writes benchmarks/results/bench_ops_<N>thread.{json,csv,png} (CPU) or
bench_ops_cuda.{json,csv,png}: per shape the median time of each variant, the ratios to the fused step measured in
the same run, and for the fused ops alone the bytes they must move, the bandwidth reached and the op's time over
the memory floor (bytes / this device's copy bandwidth, measured in the same run).
"""

from __future__ import annotations

import csv
import json
import os
import tempfile
import time

import pytest
import torch

from mtkd_fast import MTKDLoss, ops, reference as ref

try:
    from authors_way import authors_step
except ImportError:  # run from the repository root as a package path
    from benchmarks.authors_way import authors_step

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
    zt = list(torch.randn(M, B, K, generator=g).to(**dev))
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


def _module_step(backend):
    crit = MTKDLoss(T, ALPHA, BETA, backend=backend)

    def step(zs, zt, y, gs, fs, emb, wl, wf):
        out = crit(zs, zt, y, wl, gs, fs, wf, emb)
        state = ref.agent_state(out.cos, out.kl, out.teacher_ce, emb, zt)
        priors = (ref.confidence_prior(out.teacher_ce), ref.gap_prior(out.kl), ref.similarity_prior(out.cos))
        if backend == "fused":
            reward = ops.per_sample_loss_and_reward(out.student_ce, out.kl, wl, out.mse, wf, ALPHA, BETA).reward
        else:
            reward = ref.normalized_reward(out.per_sample_loss)
        return out.loss, state, priors, reward

    return step


def _authors(zs, zt, y, gs, fs, emb, wl, wf):
    return authors_step(zs, zt, y, gs, fs, emb, wl, wf, T, ALPHA, BETA)


def _train_step(step, args):
    zs, zt, y, gs = args[:4]
    loss = step(*args)[0]
    torch.autograd.grad(loss, [zs, *gs])
    _sync()


_compiled = {}


def _variant(name):
    if name == "fused":
        return _module_step("fused")
    if name == "reference":
        return _module_step("reference")
    if name == "compiled_reference":
        if name not in _compiled:
            _compiled[name] = torch.compile(_module_step("reference"), dynamic=False)
        return _compiled[name]
    return _authors


def _fused_bytes(shape):
    """Bytes the fused ops move for forward + backward (float32); the step moves exactly these (its floor).

    The forward reads every input once and writes each gradient once; on the CPU the backward of
    ``loss.backward()`` (incoming gradient 1) hands out the saved gradients without touching them
    (mtkd_fast.ops._scaled), on a GPU it scales them (reading the incoming gradient's value would sync): one
    more read and write of each gradient.
    """
    cfg = SHAPES[shape]
    B, K, M = cfg["B"], cfg["K"], len(cfg["maps"])
    n_maps = sum(B * c * h * w for c, h, w in cfg["maps"])
    backward = 2 if DEVICE.type == "cuda" else 0  # passes over each gradient in the backward
    logit = (M + 1 + 1 + backward) * B * K * 4  # read student + teachers, write dloss/dz_s
    feature = (3 + backward) * n_maps * 4  # read G and F, write dloss/dG; the state's cosine pools G in that read
    return dict(logit_kd=logit, feature_kd=feature, feature_kd_cos=feature, step=logit + feature)


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
    os.makedirs(RESULTS, exist_ok=True)
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
        for op in ("logit_kd", "feature_kd", "feature_kd_cos"):
            if f"op_{op}" in got:
                row[f"{op}_MB"] = nbytes[op] / 1e6
                row[f"{op}_GBps"] = nbytes[op] / got[f"op_{op}"]["median"] / 1e9
                row[f"{op}_GBps_min"] = nbytes[op] / got[f"op_{op}"]["min"] / 1e9
                row[f"{op}_x_floor"] = got[f"op_{op}"]["median"] / (nbytes[op] / copy_bw)  # 1 = at the copy bandwidth
        row["step_MB"] = nbytes["step"] / 1e6
        row["fused_step_GBps"] = nbytes["step"] / fused / 1e9
        rows.append(row)
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
    for r in rows:
        print("\n" + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()))


def _plot(rows, tag):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = ["authors", "reference", "compiled_reference", "fused"]
    fig, axes = plt.subplots(1, len(rows), figsize=(5 * len(rows), 3.5), squeeze=False)
    for ax, r in zip(axes[0], rows):
        names = [v for v in variants if f"{v}_ms" in r]
        ax.bar(names, [r[f"{v}_ms"] for v in names], color=["#999", "#69c", "#36a", "#c33"][: len(names)])
        where = f"CPU, {r['threads']} threads" if DEVICE.type == "cpu" else r["device"]
        ax.set_title(f"{r['shape']}: one step, forward + backward ({where})")
        ax.set_ylabel("ms (median)")
        ax.tick_params(axis="x", labelrotation=20)
    fig.tight_layout()
    _write_atomic(os.path.join(RESULTS, f"bench_ops{tag}.png"), lambda p: fig.savefig(p, dpi=120, format="png"))
    plt.close(fig)


def _record(report, shape, name, benchmark):
    if benchmark.stats is not None:
        stats = benchmark.stats.stats
        report.setdefault(shape, {})[name] = dict(median=stats.median, min=stats.min)


@pytest.mark.parametrize("variant", ["fused", "authors", "reference", "compiled_reference"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_step(benchmark, report, shape, variant):
    args = _inputs(shape)
    step = _variant(variant)
    _train_step(step, args)  # warm-up (and compilation for the compiled reference)
    benchmark.group = f"step-{shape}"
    benchmark.pedantic(_train_step, args=(step, args), rounds=SHAPES[shape]["rounds"], warmup_rounds=1)
    _record(report, shape, variant, benchmark)


@pytest.mark.parametrize("op", ["logit_kd", "feature_kd", "feature_kd_cos"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_fused_op(benchmark, report, shape, op):
    zs, zt, y, gs, fs, emb, wl, wf = _inputs(shape)
    if op == "logit_kd":
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
