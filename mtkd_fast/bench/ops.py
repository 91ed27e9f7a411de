"""One training step's distillation, forward + backward, timed the way the trainer runs it (``mtkd-fast bench ops``
and ``benchmarks/bench_ops.py``): the agent state first (before the weights exist), then the weights, then the
weighted loss and its gradients, then the per-sample loss and the reward -- by calling
``mtkd_fast.train.step.distill_step``, the function ``Trainer.train_step`` calls. Against the authors' way, the
eager reference and the compiled reference (the same function on ``backend="reference"``), at the CIFAR and
ImageNet shapes.

Variants: ``fused`` / ``reference`` / ``compiled_reference``: ``distill_step`` on the fused backend, on the
reference backend, and ``torch.compile`` of the latter; ``authors``: ``mtkd_fast.bench.authors.authors_step``;
and, labelled apart, ``mtkdloss_cos_in_loss``: ``MTKDLoss(backend="fused")`` given the teacher embeddings, which
pools the cosine in the loss's own read of the maps -- for users of ``MTKDLoss`` outside MTKD-RL, whose weights do
not depend on the state (MTKD-RL cannot take its state from the weighted loss).

The weights come from the state as the agent's action blends them (``mtkd_fast.agent.action``: fixed policy outputs
plus the confidence, gap and similarity priors of the state); the agent's two-layer network itself is left out,
as in the authors' baseline, which takes its weights as inputs.

Each row also carries the fused step's byte floor: the bytes it must move (:func:`fused_bytes`), that amount at
this device's copy bandwidth measured in the same run (:func:`copy_bandwidth`), and the time over that floor.
"""

from __future__ import annotations

import time

import torch

from .. import MTKDLoss, agent, ops
from ..train.step import distill_step
from .authors import authors_step
from .record import Record, device_sync, interleave

__all__ = ["SHAPES", "VARIANTS", "LABELS", "OPS", "inputs", "variant", "train_step", "fused_op", "fused_bytes",
           "copy_bandwidth", "step_bytes", "run_ops_bench"]

SHAPES = {
    # B, K, per-teacher maps (C, H, W); rounds: the default number of timed rounds
    "cifar": dict(B=64, K=100, maps=[(384, 8, 8), (384, 8, 8), (256, 8, 8), (256, 8, 8)], rounds=30),
    "imagenet": dict(B=256, K=1000, maps=[(2048, 7, 7)] * 3, rounds=5),
}
T, ALPHA, BETA = 4.0, 1.0, 5.0
VARIANTS = ("fused", "authors", "reference", "compiled_reference", "mtkdloss_cos_in_loss")
LABELS = {"fused": "distill_step, fused", "authors": "authors' way", "reference": "distill_step, reference",
          "compiled_reference": "distill_step, reference, torch.compile",
          "mtkdloss_cos_in_loss": "MTKDLoss outside MTKD-RL (cosine in the loss)"}
OPS = ("agent_stats", "logit_kd", "feature_kd", "feature_kd_cos")
BASELINE = "fused"  # the ratios are each variant's time over the fused step's


def inputs(shape: str, device="cpu"):
    """(zs, zt, y, gs, fs, emb, wl, wf) of ``shape``: student logits and maps (requiring grad), stacked teacher
    logits (as the trainer's teacher source hands them over), labels, teacher maps and embeddings, weights."""
    cfg = SHAPES[shape]
    B, K, maps = cfg["B"], cfg["K"], cfg["maps"]
    M = len(maps)
    g = torch.Generator().manual_seed(0)
    dev = dict(device=torch.device(device))
    zs = torch.randn(B, K, generator=g).to(**dev).requires_grad_(True)
    zt = torch.randn(M, B, K, generator=g).to(**dev)
    y = torch.randint(0, K, (B,), generator=g).to(**dev)
    gs = [torch.randn(B, *s, generator=g).to(**dev).requires_grad_(True) for s in maps]
    fs = [torch.randn(B, *s, generator=g).to(**dev) for s in maps]
    emb = [f.mean(dim=(2, 3)) for f in fs]
    wl = torch.softmax(torch.randn(B, M, generator=g), 1).to(**dev)
    wf = torch.softmax(torch.randn(B, M, generator=g), 1).to(**dev)
    return zs, zt, y, gs, fs, emb, wl, wf


def _distill_step(backend):
    """The trainer's sequence (``distill_step``): state -> weights -> loss -> reward."""

    def step(zs, zt, y, gs, fs, emb, wl, wf):
        def weights(tce, state):  # the agent's action for fixed policy outputs (wl, wf): priors of the state
            a_l, a_f = agent.action(wl, wf, state.teacher_ce, state.kl, state.cos)
            return a_l, a_f, None

        return distill_step(zs, gs, y, zt, emb, fs, weights, temperature=T, alpha=ALPHA, beta=BETA, backend=backend)

    return step


def _cos_in_loss_step(zs, zt, y, gs, fs, emb, wl, wf):
    """``MTKDLoss`` with fixed weights and the cosine from the loss's read of the maps (outside MTKD-RL)."""
    out = MTKDLoss(T, ALPHA, BETA, backend="fused")(zs, zt, y, wl, gs, fs, wf, emb)
    state = agent.agent_state(out.cos, out.kl, out.teacher_ce, emb, zt)
    priors = (agent.confidence_prior(out.teacher_ce), agent.gap_prior(out.kl), agent.similarity_prior(out.cos))
    reward = ops.per_sample_loss_and_reward(out.student_ce, out.kl, wl, out.mse, wf, ALPHA, BETA).reward
    return out.loss, state, priors, reward


def _authors(zs, zt, y, gs, fs, emb, wl, wf):
    return authors_step(zs, list(zt), y, gs, fs, emb, wl, wf, T, ALPHA, BETA)


_compiled: dict = {}


def variant(name: str):
    """The step function of a variant (``compiled_reference`` is compiled once per process)."""
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
    if name == "authors":
        return _authors
    raise ValueError(f"variant: expected one of {list(VARIANTS)}, got {name!r}")


def train_step(step, args) -> None:
    """What is timed: the step's loss, its gradients w.r.t. the student logits and maps, and a device sync."""
    zs, zt, y, gs = args[:4]
    loss = step(*args)[0]
    torch.autograd.grad(loss, [zs, *gs])
    device_sync(zs.device)()


def fused_op(op: str, args):
    """One fused op alone, forward + backward where it has one (the rows that give the per-op bandwidth)."""
    zs, zt, y, gs, fs, emb, wl, wf = args
    sync = device_sync(zs.device)
    if op == "agent_stats":
        def run():
            ops.agent_stats(zs, zt, y, gs, emb, T)
            sync()
    elif op == "logit_kd":
        def run():
            torch.autograd.grad(ops.mtkd_logit_kd(zs, zt, y, wl, T, ALPHA).loss, zs)
            sync()
    elif op == "feature_kd":
        def run():
            torch.autograd.grad(ops.mtkd_feature_kd(gs, fs, wf, BETA).loss, gs)
            sync()
    elif op == "feature_kd_cos":  # the same with the agent state's cosine from the same read of the maps
        def run():
            torch.autograd.grad(ops.feature_kd_and_cosine(gs, fs, wf, BETA, emb)[0], gs)
            sync()
    else:
        raise ValueError(f"op: expected one of {list(OPS)}, got {op!r}")
    return run


def fused_bytes(shape: str, device="cpu") -> dict:
    """Bytes the fused ops move for forward + backward (float32); the fused step moves exactly these (its floor).

    ``agent_stats`` reads the logits and the student maps; the loss ops read every input once more and write
    each gradient once. On the CPU the backward of ``loss.backward()`` (incoming gradient 1) hands out the
    saved gradients without touching them (mtkd_fast.ops._scaled); on a GPU it scales them (reading the
    incoming gradient's value would sync): one more read and write of each gradient.
    """
    cfg = SHAPES[shape]
    B, K, M = cfg["B"], cfg["K"], len(cfg["maps"])
    n_maps = sum(B * c * h * w for c, h, w in cfg["maps"])
    backward = 2 if torch.device(device).type == "cuda" else 0  # passes over each gradient in the backward
    stats = (M + 1) * B * K * 4 + n_maps * 4  # read the logits and the student maps (pooled for the cosine)
    logit = (M + 1 + 1 + backward) * B * K * 4  # read student + teachers, write dloss/dz_s
    feature = (3 + backward) * n_maps * 4  # read G and F, write dloss/dG
    return dict(agent_stats=stats, logit_kd=logit, feature_kd=feature, feature_kd_cos=feature,
                step=stats + logit + feature, cos_in_loss_step=logit + feature)


def step_bytes(shape: str, name: str, device="cpu") -> int:
    """The byte floor a row is measured against: a step variant's is the fused MTKD-RL step's (the fused
    ``MTKDLoss`` row's its own), a fused op's its own."""
    nbytes = fused_bytes(shape, device)
    if name in nbytes:
        return nbytes[name]
    return nbytes["cos_in_loss_step" if name == "mtkdloss_cos_in_loss" else "step"]


def copy_bandwidth(device="cpu") -> float:
    """The device's bandwidth in bytes/s for a large tensor copy (read + write), best of 5: the practical ceiling."""
    sync = device_sync(device)
    src = torch.randn(64 * 2**20, device=torch.device(device))  # 256 MiB
    dst = torch.empty_like(src)
    dst.copy_(src)
    sync()
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        dst.copy_(src)
        sync()
        best = min(best, time.perf_counter() - t0)
    return 2 * src.numel() * 4 / best


def floor_columns(shape: str, name: str, copy_bw: float, device="cpu") -> dict:
    """The byte-floor columns of a row (:mod:`mtkd_fast.bench.record`, which adds ``median_x_floor`` and ``gbps``)."""
    nbytes = step_bytes(shape, name, device)
    return dict(bytes_mb=nbytes / 1e6, copy_bandwidth_gbps=copy_bw / 1e9, floor_s=nbytes / copy_bw)


def run_ops_bench(shapes=tuple(SHAPES), variants=VARIANTS, rounds=None, device="cpu", log=print) -> Record:
    """Every variant's step per shape, the variants interleaved round by round (two warm-up calls each, which
    also compile the compiled reference); ``rounds`` defaults to the shape's own. One row per (shape, variant),
    the ratios to the fused step when it ran."""
    for s in shapes:
        if s not in SHAPES:
            raise ValueError(f"shapes: expected names from {list(SHAPES)}, got {s!r}")
    for v in variants:
        if v not in VARIANTS:
            raise ValueError(f"variants: expected names from {list(VARIANTS)}, got {v!r}")
    if rounds is not None and int(rounds) < 1:
        raise ValueError(f"rounds: expected a positive integer, got {rounds!r}")
    try:
        device = str(torch.device(device))
    except RuntimeError as exc:
        raise ValueError(f"device: expected 'cpu' or 'cuda[:N]', got {device!r}") from exc
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device: {device!r} requested but torch.cuda.is_available() is False")
    if not ops.available(torch.device(device)):
        raise ValueError(f"device: no compiled kernels for {device} (make build)")
    record = Record(device, harness="mtkd-fast bench ops")
    copy_bw = copy_bandwidth(device)
    for shape in shapes:
        args = inputs(shape, device)
        steps = {v: variant(v) for v in variants}
        times = interleave({v: (lambda v=v: train_step(steps[v], args)) for v in variants},
                           rounds or SHAPES[shape]["rounds"], warmup=2)
        for v in variants:
            record.add("ops", shape, v, times[v], baseline=BASELINE if BASELINE in variants else None,
                             label=LABELS[v], batch_size=SHAPES[shape]["B"], images=SHAPES[shape]["B"],
                             **floor_columns(shape, v, copy_bw, device))
        log("\n".join(record.format().splitlines()[-len(variants):]))
    return record
