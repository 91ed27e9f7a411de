"""A look inside the teacher weighting, per epoch: what the weights are and whether they follow the teachers.

Columns name each teacher by its architecture (:func:`teacher_labels`: ``wl_resnet8``, ``wf_resnet8``, two
resnet8 teachers ``resnet8_1`` and ``resnet8_2``; ``t0``, ``t1``, ... when the names are unknown). The trainer's
``wl_<teacher>`` / ``wf_<teacher>`` are the epoch's mean logit / feature weight of the teacher.

``WeightDiagnostics`` accumulates on the device, one ``update`` per training step and one read-back per epoch:

- ``diag_entropy_wl`` / ``diag_entropy_wf``: the mean over samples of the entropy of the sample's logit / feature
  weights (each row normalised to sum to 1), divided by log M: 1 = uniform over the teachers, 0 = one teacher.
  Rows whose weights are all 0 (no feature distillation) are left out; NaN if every row is.
- ``diag_corr_wl_right_<teacher>`` / ``diag_corr_wf_right_<teacher>``: over the epoch's samples, the Pearson
  correlation between teacher m's weight and whether teacher m is right on the sample (its top-1 class is the
  label). NaN when either does not vary (e.g. a teacher right on every sample, or constant weights).
- MTKD-RL only (``state`` and ``agent`` given): the action is a blend of the agent's softmax pi and the priors
  (docs/method.md section 4), w = l_1 pi + l_2 c + l_3 g with blend coefficients l (1/3 each, or softmax(lambda)
  with ``dynamic``). Its distance from uniform u splits into the policy's and the priors' parts:
  ``diag_policy_wl`` = mean_i l_1 ||pi_i - u||_1 and ``diag_prior_wl`` = mean_i ||l_2 (c_i - u) + l_3 (g_i - u)||_1
  (likewise ``_wf`` with the feature head and g = gf), and ``diag_shift_wl`` = mean_i ||w_i - w_prior,i||_1, how
  far the weights move from what the priors alone (renormalised, (l_2 c + l_3 g) / (l_2 + l_3)) would give.
  In the warm-up epoch these describe the agent's action although the student used weight 1 per teacher.
- MTKD-RL's reward (issue 27's check of its sign and scale; ``per_sample_loss`` and ``reward`` given), over the
  epoch's student steps: ``diag_reward_mean`` / ``diag_reward_std`` / ``diag_reward_pos`` (mean, std and share
  > 0 of r_hat), ``diag_reward_raw_std`` (the mean over batches of the Bessel std of r = -l, the scale that
  r_hat divides out) and ``diag_reward_loss_corr`` (Pearson(r_hat, l): negative when lower-loss samples are
  rewarded, as docs/method.md section 5 says).

``AgentUpdateDiagnostics`` looks at the agent updates themselves (the Distiller calls it from ``update_agent``):
``diag_agent_grad_norm`` (the mean over SGD steps of the agent's gradient norm ||g||), ``diag_agent_step_ratio``
(the mean over steps of lr ||g|| / ||theta||), ``diag_agent_rel_change`` (the mean over updates of
||theta_after - theta_before|| / ||theta_before||), ``diag_agent_move_pil`` / ``_pif`` (the mean over the stored
samples of ||pi_after - pi_before||_1 of each head's softmax) and ``diag_agent_dentropy_wl`` / ``_wf`` (the mean
change of the blended weights' entropy / log M over the update: > 0 when the update moves them toward uniform).
"""

from __future__ import annotations

import math
import re
from typing import Callable, NamedTuple, Optional, Sequence

import torch
from torch import Tensor

from ..agent import confidence_prior, gap_prior, similarity_prior

__all__ = ["WeightDiagnostics", "AgentUpdateDiagnostics", "DIAGNOSTICS_PNG", "DIAGNOSTICS_CSV", "diagnostic_columns",
           "plot_diagnostics", "write_diagnostics", "teacher_labels", "rename_index_columns", "plot_teacher_weights",
           "WeightCurve"]

DIAGNOSTICS_PNG = "agent_diagnostics.png"
DIAGNOSTICS_CSV = "agent_diagnostics.csv"

# per weight kind (wl, wf): entropy sum, entropy count, 3 agent parts (policy, prior, shift) and their count
_SCALARS = 6
# per weight kind and teacher: n, sum w, sum w^2, sum r, sum r^2, sum w r
_MOMENTS = 6
# the reward: n, sum r_hat, sum r_hat^2, count r_hat > 0, sum l, sum l^2, sum l r_hat, sum of per-batch std(-l),
# batches
_REWARD = 9
# the per-teacher columns; the part before the teacher's label
_TEACHER_PREFIXES = ("wl_", "wf_", "diag_corr_wl_right_", "diag_corr_wf_right_")


def teacher_labels(names: Optional[Sequence[str]], num_teachers: int) -> list[str]:
    """One column label per teacher: its architecture name (characters other than letters, digits, ``.``, ``-``
    and ``_`` become ``_``), repeated names numbered from 1 (``resnet8_1``, ``resnet8_2``); ``t0``, ``t1``, ...
    when ``names`` is None or does not name every teacher."""
    if names is None or len(names) != num_teachers:
        return [f"t{m}" for m in range(num_teachers)]
    clean = [re.sub(r"[^A-Za-z0-9_.-]", "_", str(n)) or "teacher" for n in names]
    used = {n for n in clean if clean.count(n) == 1}  # kept as they are; a numbered label must not take one
    numbered: dict = {}
    labels = []
    for name in clean:
        if clean.count(name) == 1:
            labels.append(name)
            continue
        numbered[name] = numbered.get(name, 0) + 1
        while f"{name}_{numbered[name]}" in used:
            numbered[name] += 1
        label = f"{name}_{numbered[name]}"
        used.add(label)
        labels.append(label)
    return labels


def rename_index_columns(row: dict, labels: Sequence[str]) -> dict:
    """``row`` with the per-teacher columns of the old index naming (``wl_t0``, ``diag_corr_wl_right_t0``, from
    metrics rows saved before the columns were named) under ``labels``' names; other keys unchanged."""
    out = {}
    for key, value in row.items():
        for prefix in _TEACHER_PREFIXES:
            match = re.fullmatch(re.escape(prefix) + r"t(\d+)", key)
            if match and int(match.group(1)) < len(labels):
                key = prefix + labels[int(match.group(1))]
                break
        out[key] = value
    return out


class WeightDiagnostics:
    """Per-epoch weight diagnostics (module docstring), summed on ``device``; ``num_teachers`` = M, ``labels``
    the teachers' column labels (:func:`teacher_labels`; ``t0``, ``t1``, ... by default)."""

    def __init__(self, num_teachers: int, device="cpu", labels: Optional[Sequence[str]] = None):
        if isinstance(num_teachers, bool) or not isinstance(num_teachers, int) or num_teachers < 1:
            raise ValueError(f"num_teachers: expected a positive int, got {num_teachers!r}")
        if labels is not None and len(labels) != num_teachers:
            raise ValueError(f"labels: expected {num_teachers} teacher labels, got {list(labels)}")
        self.num_teachers = num_teachers
        self.labels = list(labels) if labels is not None else teacher_labels(None, num_teachers)
        self.device = torch.device(device)
        self.reset()

    def reset(self) -> None:
        M = self.num_teachers
        self.scalars = torch.zeros(2, _SCALARS, dtype=torch.float64, device=self.device)
        self.moments = torch.zeros(2, M, _MOMENTS, dtype=torch.float64, device=self.device)
        self.reward = torch.zeros(_REWARD, dtype=torch.float64, device=self.device)

    @torch.no_grad()
    def update(self, logit_weights: Tensor, feature_weights: Tensor, teacher_logits: Tensor, labels: Tensor,
               state=None, agent=None, per_sample_loss: Optional[Tensor] = None,
               reward: Optional[Tensor] = None) -> None:
        """Add one batch: weights [B, M], teacher logits [M, B, K], labels [B]; ``state`` (an ``AgentState``) and
        ``agent`` (an ``MTKDAgent``) for the policy/prior split; ``per_sample_loss`` l and ``reward`` r_hat [B]
        (MTKD-RL) for the reward's statistics. Nothing is read back to the host."""
        M = self.num_teachers
        if logit_weights.dim() != 2 or logit_weights.shape[1] != M:
            raise ValueError(f"logit_weights: expected [B, {M}], got {tuple(logit_weights.shape)}")
        right = (teacher_logits.argmax(-1) == labels.unsqueeze(0)).T.to(torch.float64)  # [B, M]
        parts = None
        if state is not None and agent is not None:
            parts = self._agent_parts(state, agent, logit_weights, feature_weights)
        log_m = math.log(M) if M > 1 else 1.0
        for k, w in enumerate((logit_weights, feature_weights)):
            w = w.detach().to(torch.float64)
            total = w.sum(1, keepdim=True)
            valid = (total > 0).squeeze(1)
            p = w / torch.where(total > 0, total, torch.ones_like(total))
            entropy = -(p * torch.log(p.clamp_min(1e-300))).sum(1) / log_m
            self.scalars[k, 0] += torch.where(valid, entropy, torch.zeros_like(entropy)).sum()
            self.scalars[k, 1] += valid.sum()
            if parts is not None:
                self.scalars[k, 2:5] += parts[k]
                self.scalars[k, 5] += w.shape[0]
            n = torch.full_like(w, 1.0)
            self.moments[k] += torch.stack([n, w, w * w, right, right * right, w * right], dim=-1).sum(0)
        if per_sample_loss is not None and reward is not None:
            loss, r = per_sample_loss.detach().to(torch.float64), reward.detach().to(torch.float64)
            raw_std = loss.std() if loss.numel() > 1 else torch.zeros((), dtype=torch.float64, device=loss.device)
            self.reward += torch.stack([torch.full_like(loss, 1.0).sum(), r.sum(), (r * r).sum(), (r > 0).sum(),
                                        loss.sum(), (loss * loss).sum(), (loss * r).sum(), raw_std,
                                        torch.ones_like(raw_std)])

    @staticmethod
    def _agent_parts(state, agent, logit_weights: Tensor, feature_weights: Tensor) -> list[Tensor]:
        """Per head: sums over the batch of (policy part, prior part, distance from the priors-only weights)."""
        pi_l, pi_f = agent.policy(state)
        dt = torch.float64
        tce, kl, cos = state.teacher_ce.to(dt), state.kl.to(dt), state.cos.to(dt)
        c = confidence_prior(tce)
        M = tce.shape[1]
        u = torch.full_like(c, 1.0 / M)
        out = []
        for pi, g, lam in ((pi_l, gap_prior(kl), getattr(agent, "logit_weight_factor", None)),
                           (pi_f, similarity_prior(cos), getattr(agent, "feature_weight_factor", None))):
            coef = torch.softmax(lam.detach().to(dt), 0) if (agent.dynamic and lam is not None) \
                else torch.full((3,), 1.0 / 3, dtype=dt, device=c.device)
            pi = pi.to(dt)
            action = coef[0] * pi + coef[1] * c + coef[2] * g
            prior_only = (coef[1] * c + coef[2] * g) / (coef[1] + coef[2])
            out.append(torch.stack([(coef[0] * (pi - u)).abs().sum(1).sum(),
                                    (coef[1] * (c - u) + coef[2] * (g - u)).abs().sum(1).sum(),
                                    (action - prior_only).abs().sum(1).sum()]))
        return out

    def compute(self, reduce: Optional[Callable[[Tensor], Tensor]] = None, reset: bool = True) -> dict:
        """The epoch's diagnostics as a dict of floats (one read-back), then (``reset``) start over; ``reduce``
        sums over processes (DDP)."""
        scalars, moments, reward = self.scalars.clone(), self.moments.clone(), self.reward.clone()
        if reset:
            self.reset()
        if reduce is not None:
            scalars, moments, reward = reduce(scalars), reduce(moments), reduce(reward)
        s, mo = scalars.tolist(), moments.tolist()
        nan = float("nan")
        out = {}
        for k, key in enumerate(("wl", "wf")):
            out[f"diag_entropy_{key}"] = s[k][0] / s[k][1] if s[k][1] else nan
            for j, name in enumerate(("policy", "prior", "shift")):
                out[f"diag_{name}_{key}"] = s[k][2 + j] / s[k][5] if s[k][5] else nan
            for m, label in enumerate(self.labels):
                n, sw, sww, sr, srr, swr = mo[k][m]
                out[f"diag_corr_{key}_right_{label}"] = _pearson(n, sw, sww, sr, srr, swr)
        n, sr, srr, pos, sl, sll, slr, raw_std, batches = reward.tolist()
        if n:  # MTKD-RL only: the other strategies have no reward
            out["diag_reward_mean"] = sr / n
            out["diag_reward_std"] = math.sqrt(max(n * srr - sr * sr, 0.0) / (n * (n - 1))) if n > 1 else nan
            out["diag_reward_pos"] = pos / n
            out["diag_reward_raw_std"] = raw_std / batches
            out["diag_reward_loss_corr"] = _pearson(n, sr, srr, sl, sll, slr)
        return out


def _pearson(n: float, sx: float, sxx: float, sy: float, syy: float, sxy: float) -> float:
    """Pearson correlation from sums; NaN when either side does not vary (variances that are rounding noise
    count as none, by a relative threshold)."""
    cov = n * sxy - sx * sy
    var_x, var_y = n * sxx - sx * sx, n * syy - sy * sy
    ok = n > 1 and var_x > 1e-12 * max(n * sxx, 1e-300) and var_y > 1e-12 * max(n * syy, 1e-300)
    return cov / math.sqrt(var_x * var_y) if ok else float("nan")


# per epoch: updates, SGD steps, sum ||g||, sum lr ||g|| / ||theta||, sum ||d theta|| / ||theta||, samples,
# sum ||d pi_l||_1, sum ||d pi_f||_1, sum d entropy(wl), sum d entropy(wf)
_UPDATE = 10


class AgentUpdateDiagnostics:
    """Per-epoch statistics of the agent updates (module docstring), summed on ``device``. The Distiller calls
    ``begin(agent, buffer)`` before an update, ``step(params, lr)`` after each backward and ``end(agent, buffer)``
    after the update; nothing is read back to the host before ``compute``."""

    def __init__(self, device="cpu"):
        self.device = torch.device(device)
        self.reset()

    def reset(self) -> None:
        self.sums = torch.zeros(_UPDATE, dtype=torch.float64, device=self.device)
        self._theta = self._outputs = None

    @staticmethod
    def _flat(params) -> Tensor:
        return torch.cat([p.detach().reshape(-1).to(torch.float64) for p in params])

    @staticmethod
    @torch.no_grad()
    def _outputs_of(agent, buffer) -> list:
        """Per stored batch: the heads' softmaxes and the blended weights' entropy / log M (float64)."""
        log_m = math.log(agent.num_teachers)
        out = []
        for state, _, _ in buffer:
            pi = [p.to(torch.float64) for p in agent.policy(state)]
            ent = [-(w * torch.log(w.clamp_min(1e-300))).sum(1) / log_m for w in (x.to(torch.float64)
                                                                                  for x in agent(state))]
            out.append((pi, ent))
        return out

    def begin(self, agent, buffer) -> None:
        self._theta = self._flat(agent.parameters())
        self._outputs = self._outputs_of(agent, buffer)

    def step(self, params, lr: float) -> None:
        grads = [p.grad for p in params if p.grad is not None]
        g = torch.cat([x.reshape(-1).to(torch.float64) for x in grads]).norm() if grads else \
            torch.zeros((), dtype=torch.float64, device=self.device)
        theta = self._flat(params).norm()
        self.sums[1:4] += torch.stack([torch.ones_like(g), g, lr * g / theta.clamp_min(1e-300)])

    def end(self, agent, buffer) -> None:
        theta = self._flat(agent.parameters())
        rel = (theta - self._theta).norm() / self._theta.norm().clamp_min(1e-300)
        moves = torch.zeros(5, dtype=torch.float64, device=self.device)
        for (pi0, ent0), (pi1, ent1) in zip(self._outputs, self._outputs_of(agent, buffer)):
            moves += torch.stack([torch.full((), float(pi0[0].shape[0]), dtype=torch.float64, device=self.device),
                                  (pi1[0] - pi0[0]).abs().sum(), (pi1[1] - pi0[1]).abs().sum(),
                                  (ent1[0] - ent0[0]).sum(), (ent1[1] - ent0[1]).sum()])
        self.sums[0] += 1
        self.sums[4] += rel
        self.sums[5:] += moves
        self._theta = self._outputs = None

    def compute(self, reduce: Optional[Callable[[Tensor], Tensor]] = None, reset: bool = True) -> dict:
        """The epoch's statistics as a dict of floats (empty when the agent was not updated), then (``reset``)
        start over; ``reduce`` sums over processes (DDP: every rank's agent takes the same steps, so the sums are
        divided by the rank count through the update count)."""
        sums = self.sums.clone()
        if reset:
            self.reset()
        if reduce is not None:
            sums = reduce(sums)
        updates, steps, g, ratio, rel, n, pil, pif, dwl, dwf = sums.tolist()
        if not updates:
            return {}
        return {"diag_agent_grad_norm": g / steps, "diag_agent_step_ratio": ratio / steps,
                "diag_agent_rel_change": rel / updates, "diag_agent_move_pil": pil / n, "diag_agent_move_pif": pif / n,
                "diag_agent_dentropy_wl": dwl / n, "diag_agent_dentropy_wf": dwf / n}


def diagnostic_columns(row: dict) -> dict:
    """The diagnostics' entries of a metrics row."""
    return {k: v for k, v in row.items() if k.startswith("diag_")}




def write_diagnostics(history: list[dict], labels: Sequence[str], out_dir: str) -> None:
    """``agent_diagnostics.csv`` (epoch + the diag_ columns) and ``agent_diagnostics.png`` in ``out_dir``;
    ``labels``: the teachers' column labels."""
    import os

    from .._io import write_csv_atomic

    rows = [{"epoch": r["epoch"], **diagnostic_columns(r)} for r in history if diagnostic_columns(r)]
    if not rows:
        return
    write_csv_atomic(os.path.join(out_dir, DIAGNOSTICS_CSV), rows)
    plot_diagnostics(rows, labels, os.path.join(out_dir, DIAGNOSTICS_PNG))


# the plots: logit weights solid with circles, feature weights dashed with squares; colour = teacher
KIND_STYLES = {"wl": ("logit", "-", "o"), "wf": ("feature", "--", "s")}
# the diagnostics' policy/prior/shift parts: colours of their own, neither a teacher's nor the black of the
# logit/feature legend entries
_PART_COLORS = {"policy": "teal", "prior": "darkgoldenrod", "shift": "mediumorchid"}


def _teacher_color(m: int) -> str:
    return f"C{m % 10}"


def _outside_legend(ax, handles: list, below: bool = False, ncol: int = 1) -> None:
    """The legend beside (or below) ``ax``, never over its data; tight_layout makes room for it."""
    if below:
        ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.16), fontsize=7, ncol=ncol,
                  frameon=False)
    else:
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, fontsize=7,
                  frameon=False)


def _integer_epochs(ax, epochs: list) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if epochs:
        ax.set_xlim(min(epochs) - 0.5, max(epochs) + 0.5)
    ax.set_xlabel("epoch")
    ax.grid(alpha=0.3)


def plot_diagnostics(rows: list[dict], labels: Sequence[str], path: str, title: str = ""):
    """Three panels over epochs: weight entropy; correlation of each teacher's weight with its being right;
    policy vs prior parts of the weights' distance from uniform (MTKD-RL). Colour = teacher (or part), line and
    marker = logit or feature weights; legends below the panels. Returns the figure (None without matplotlib)."""
    from .._optional import pyplot

    plt = pyplot("the agent-diagnostics plot")
    if plt is None:
        return None
    from matplotlib.lines import Line2D

    from .._optional import write_figure_atomic

    epochs = [r["epoch"] for r in rows]
    get = lambda key: [r.get(key, float("nan")) for r in rows]  # noqa: E731
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6))
    for key, (kind, style, marker) in KIND_STYLES.items():
        axes[0].plot(epochs, get(f"diag_entropy_{key}"), style, marker=marker, ms=4, color="black")
        for m, label in enumerate(labels):
            axes[1].plot(epochs, get(f"diag_corr_{key}_right_{label}"), style, marker=marker, ms=4,
                         color=_teacher_color(m))
        for part, color in _PART_COLORS.items():
            axes[2].plot(epochs, get(f"diag_{part}_{key}"), style, marker=marker, ms=4, color=color)
    kinds = [Line2D([], [], color="black", ls=style, marker=marker, ms=4, label=f"{kind} weights")
             for kind, style, marker in KIND_STYLES.values()]
    teachers = [Line2D([], [], color=_teacher_color(m), lw=2, label=label) for m, label in enumerate(labels)]
    parts = [Line2D([], [], color=c, lw=2, label=text) for c, text in
             zip(_PART_COLORS.values(), ("policy part", "prior part", "L1 from priors-only weights"))]
    _outside_legend(axes[0], kinds, below=True, ncol=2)
    _outside_legend(axes[1], teachers + kinds, below=True, ncol=3)
    _outside_legend(axes[2], parts + kinds, below=True, ncol=3)
    axes[0].set_title("mean weight entropy / log M (1 = uniform)", fontsize=9)
    axes[1].set_title("corr(teacher's weight, teacher is right)", fontsize=9)
    axes[1].axhline(0.0, color="grey", lw=0.8)
    axes[2].set_title("L1 distance of the weights from uniform: policy vs priors", fontsize=9)
    for ax in axes:
        _integer_epochs(ax, epochs)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    write_figure_atomic(fig, path)
    return fig


class WeightCurve(NamedTuple):
    """One run's (or one method's mean) per-epoch rows for :func:`plot_teacher_weights`: ``name`` ("" for a
    single run), ``rows`` with ``epoch`` and the ``wl_<teacher>`` / ``wf_<teacher>`` columns, and its first
    ``warmup_epochs`` epochs, whose weights are fixed (MTKD-RL's warm-up) rather than the method's."""
    name: str
    rows: list
    warmup_epochs: int = 0


def _weight_limits(values: list[float]) -> tuple[float, float]:
    """y-limits around ``values`` with a margin, so that differences of 0.01 between teachers show."""
    lo, hi = min(values), max(values)
    pad = (hi - lo) * 0.15 if hi > lo else max(abs(hi) * 0.05, 1e-3)
    return lo - pad, hi + pad


def plot_teacher_weights(curves: Sequence[WeightCurve], labels: Sequence[str], path: str, title: str = ""):
    """Mean logit and feature weight per teacher and epoch (one panel each; colour = teacher, line style =
    curve). The warm-up epochs are shaded with their fixed weight written in, and the y-axis spans the weights
    after the warm-up, so a warm-up weight of 1 does not squash differences of a few hundredths. Returns the
    figure (None without matplotlib)."""
    from .._optional import pyplot

    plt = pyplot("the teacher-weights plot")
    if plt is None:
        return None
    from matplotlib.lines import Line2D

    from .._optional import write_figure_atomic

    styles = ("-", "--", ":", "-.")
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    all_epochs = sorted({r["epoch"] for c in curves for r in c.rows})
    warmup = max((c.warmup_epochs for c in curves), default=0)
    # whose warm-up the shading is, when curves without one share the panel
    whose = " and ".join(c.name for c in curves if c.warmup_epochs and c.name)
    warmup_name = f"{whose} warm-up" if whose and len(curves) > 1 else "warm-up"
    for ax, key in zip(axes, ("wl", "wf")):
        kept, fixed = [], []
        for c_i, curve in enumerate(curves):
            epochs = [r["epoch"] for r in curve.rows]
            for m, label in enumerate(labels):
                values = [float(r.get(f"{key}_{label}", float("nan"))) for r in curve.rows]
                after = [(e, v) for e, v in zip(epochs, values) if e > curve.warmup_epochs]
                before = [(e, v) for e, v in zip(epochs, values) if e <= curve.warmup_epochs]
                style = dict(color=_teacher_color(m), ms=4, marker="o" if c_i == 0 else "s")
                if after:
                    ax.plot(*zip(*after), ls=styles[c_i % len(styles)], **style)
                if before:  # not joined to the method's weights: a different quantity
                    ax.plot(*zip(*before), ls="none", **style)
                kept += [v for _, v in after if math.isfinite(v)]
                fixed += [v for _, v in before if math.isfinite(v)]
        shown = kept or fixed
        if shown:
            ax.set_ylim(*_weight_limits(shown))
        if warmup:
            ax.axvspan(0.5, warmup + 0.5, color="grey", alpha=0.15, lw=0)
            if fixed:
                lo, hi = min(fixed), max(fixed)
                text = f"{lo:.3g}" if hi - lo < 1e-9 else f"{lo:.3g}-{hi:.3g}"
                ax.text((warmup + 1) / 2, 0.97, f"warm-up:\nweight {text}", transform=ax.get_xaxis_transform(),
                        ha="center", va="top", fontsize=7)
        ax.set_title(f"mean {KIND_STYLES[key][0]} KD weight per teacher", fontsize=9)
        _integer_epochs(ax, all_epochs)
    axes[0].set_ylabel("weight")
    handles = [Line2D([], [], color=_teacher_color(m), lw=2, label=label) for m, label in enumerate(labels)]
    if len(curves) > 1:
        handles += [Line2D([], [], color="black", ls=styles[c_i % len(styles)], marker="o" if c_i == 0 else "s",
                           ms=4, label=c.name) for c_i, c in enumerate(curves)]
    if warmup:
        from matplotlib.patches import Patch

        handles.append(Patch(color="grey", alpha=0.15, label=f"{warmup_name} (fixed weights)"))
    _outside_legend(axes[1], handles)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    write_figure_atomic(fig, path)
    return fig
