"""The MTKD-RL trainer: alternating student / agent optimisation (docs/method.md section 7) and the baselines.

``Trainer`` is a :class:`mtkd_fast.Distiller` (the method: strategy, feature transfer, agent, its optimiser and
replay buffer) plus the student's data, optimisation, metrics and checkpoints; ``Trainer.train_step`` is one
student step (the Distiller runs the agent update when it falls due) and never waits for the device;
``Trainer.fit`` runs epochs with progress, evaluation, CSV/PNG logs and atomic checkpoints. ``train(config)``
builds everything from a ``TrainConfig``.
"""

from __future__ import annotations

import math
import os
import time
from typing import Callable, Iterable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._io import file_sha256, save_atomic, write_csv_atomic
from .._validation import DataError, check_finite_weights
from ..agent import MTKDAgent
from ..distiller import Distiller, _config_options
from . import distributed as D
from .checkpoint import load_checkpoint_file, load_module_state, rng_state, set_rng_state
from .config import TrainConfig
from .diagnostics import (
    AgentUpdateDiagnostics,
    WeightCurve,
    WeightDiagnostics,
    plot_teacher_weights,
    rename_index_columns,
    teacher_labels,
    write_diagnostics,
)
from .step import feature_kl_per_sample
from .strategies import NoDistillation, get_strategy

__all__ = ["Trainer", "StudentWithTransfer", "evaluate", "feature_kl_per_sample", "NonFiniteTrainingError",
           "CHECKPOINT_LAST", "CHECKPOINT_BEST", "STUDENT_BEST", "METRICS_CSV", "WEIGHTS_PNG"]

CHECKPOINT_LAST = "checkpoint_last.pt"
CHECKPOINT_BEST = "checkpoint_best.pt"
STUDENT_BEST = "student_best.pth"
STUDENT_LAST = "student_last.pth"
METRICS_CSV = "metrics.csv"
WEIGHTS_PNG = "teacher_weights.png"
CONFIG_JSON = "config.json"
# what a run writes into its out_dir (a run is there when any of these is)
RUN_OUTPUTS = (CHECKPOINT_LAST, CHECKPOINT_BEST, STUDENT_BEST, STUDENT_LAST, METRICS_CSV, WEIGHTS_PNG, CONFIG_JSON)
# What a resume does with each TrainConfig field (docs/safety.md, "Resuming", holds the same table; a test checks
# that every field is in exactly one group). RESUME_FIXED: what defines the run (its data, models, method,
# optimiser and their hyper-parameters, whose state the checkpoint restores): a resume with another value is
# refused naming the field, since the restored optimiser, agent and RNG would silently ignore the new value or
# the run would go on as another one. RESUME_APPLIED: how the run executes (length, device, speed, logging): the
# new value is used from the resumed epoch on and recorded in config.json. RESUME_CONTROL: what the command does
# with the out_dir, not part of the run.
RESUME_FIXED = ("student", "teachers", "teacher_checkpoints", "teacher_cache", "dataset", "limit_per_class",
                "val_split", "strategy", "aekd_nu", "aekd_solver", "camkd_weight_grad", "temperature", "alpha",
                "beta", "feature_kd", "warmup_weights", "dynamic", "agent_step", "agent_lr", "agent_update",
                "agent_buffer_dtype", "transfer_resize", "batch_size", "optimizer", "lr", "momentum", "nesterov",
                "weight_decay", "schedule", "milestones", "lr_decay", "seed", "data_seed", "amp", "teacher_precision")
RESUME_APPLIED = ("epochs", "max_steps_per_epoch", "data_root", "num_workers", "data_backend", "loss_backend",
                  "device", "channels_last", "compile", "teacher_compile", "fold_bn", "trust_checkpoint",
                  "log_every", "progress", "tensorboard", "eval_every")
RESUME_CONTROL = ("out_dir", "resume", "overwrite")

_AMP_DTYPES = {None: None, "bf16": torch.bfloat16, "fp16": torch.float16}
# device-side running sums, read back once per log interval / epoch
_METERS = ("loss", "ce", "kd", "feat", "top1", "top5", "count", "agent_loss", "agent_batches")


class StudentWithTransfer(nn.Module):
    """The trainable part of a step: the student and its feature transfer, as one module (one DDP wrapper)."""

    def __init__(self, student: nn.Module, feature_transfer: Optional[nn.Module] = None):
        super().__init__()
        self.student = student
        self.feature_transfer = feature_transfer

    def forward(self, images: Tensor):
        feats, logits = self.student(images, is_feat=True)
        maps = self.feature_transfer(feats[-2]) if self.feature_transfer is not None else None
        return logits, maps


def _logits_of(output):
    return output[-1] if isinstance(output, (tuple, list)) else output


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, device=None, amp: Optional[str] = None,
             channels_last: bool = False) -> dict:
    """Top-1/top-5 accuracy (in %) and mean cross-entropy of ``model`` over ``loader`` (batches of (images,
    labels[, indices])). Sums are all-reduced when running distributed (each rank evaluates its shard)."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, top1, top5, count
    dtype = _AMP_DTYPES[amp]
    for batch in loader:
        images, labels = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            logits = _logits_of(model(images)).float()
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices
        hit = top == labels.unsqueeze(1)
        sums += torch.stack([F.cross_entropy(logits, labels, reduction="sum").double(), hit[:, 0].sum().double(),
                             hit.any(1).sum().double(), torch.tensor(float(labels.shape[0]), device=device,
                                                                     dtype=torch.float64)])
    D.all_reduce_sum(sums)
    model.train(was_training)
    loss, top1, top5, count = sums.tolist()
    count = max(count, 1.0)
    return {"loss": loss / count, "top1": 100.0 * top1 / count, "top5": 100.0 * top5 / count, "count": int(count)}


class Trainer:
    """One run: student, teacher source, the method as a :class:`mtkd_fast.Distiller` (built from ``config`` with
    the ``feature_transfer``, ``agent`` and ``teacher_heads`` given here; None for strategy "none"), optimiser.

    Args:
        config: the run's :class:`TrainConfig` (method, optimisation and output options).
        student: a model returning ``(feats, logits)`` with ``is_feat=True``.
        teachers: a :class:`mtkd_fast.teachers.TeacherSource` (live teachers or a cache); None for strategy "none".
        feature_transfer: maps the student's last map to one map per teacher (needed when beta > 0).
        agent: the :class:`MTKDAgent` (strategy "mtkd_rl" only).
        device: where the student trains.
        dist_info: rank/world size when running under torchrun (see ``distributed``).
        teacher_heads: each teacher's final linear layer (``models.classifier_head``; strategy "camkd" only).
    """

    def __init__(self, config: TrainConfig, student: nn.Module, teachers=None,
                 feature_transfer: Optional[nn.Module] = None,
                 agent: Optional[MTKDAgent] = None, device="cpu", dist_info: Optional[D.DistInfo] = None,
                 teacher_heads: Optional[Sequence[nn.Module]] = None):
        self.config = config
        self.device = torch.device(device)
        self.dist = dist_info or D.DistInfo()
        # the method (strategy, transfer, agent, its optimiser and buffer) is one Distiller; "none" has none
        self.distiller: Optional[Distiller] = None
        kind = get_strategy(config.strategy)  # what the strategy needs (its declaration in the registry)
        if kind.needs_teachers:
            if teachers is None:
                raise ValueError(f"teachers: strategy {config.strategy!r} needs a teacher source")
            if feature_transfer is None and config.beta > 0:
                raise ValueError("feature_transfer: feature distillation (beta > 0) needs a feature transfer module")
            if kind.needs_agent and agent is None:
                raise ValueError(f"agent: the {config.strategy} strategy needs an MTKDAgent")
            options = {name: getattr(config, name) for name in _config_options()}
            self.distiller = Distiller(feature_transfer=feature_transfer, agent=agent, teacher_heads=teacher_heads,
                                       **options).to(self.device)
        self.teachers = teachers if self.distiller is not None else None
        self.student = student.to(self.device)
        self.net = StudentWithTransfer(self.student, self.feature_transfer)
        if config.channels_last:
            self.net.to(memory_format=torch.channels_last)
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.train_module: nn.Module = DDP(self.net, device_ids=ids)
        else:
            self.train_module = self.net
        if config.compile:
            self.train_module = torch.compile(self.train_module)
        self.optimizer = _build_optimizer(config, self.net.parameters())
        self.scheduler = _build_scheduler(config, self.optimizer)
        self.amp_dtype = _AMP_DTYPES[config.amp]
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=config.amp == "fp16")
        self.num_teachers = getattr(self.teachers, "num_teachers", 0) if self.teachers is not None else 0
        # metrics.csv names the teachers' columns by architecture (wl_resnet8), t0, t1, ... if unknown
        self.teacher_labels = teacher_labels(_teacher_names(config, self.teachers), self.num_teachers)
        self.diagnostics = WeightDiagnostics(max(self.num_teachers, 1), self.device, self.teacher_labels or None)
        self.update_diagnostics = AgentUpdateDiagnostics(self.device)
        if self.distiller is not None and self.agent is not None:
            self.distiller.update_probe = self.update_diagnostics
        self.epoch = 0
        self.start_epoch = 0
        self.step_in_epoch = 0
        self.steps_this_epoch: Optional[int] = None
        self.best_top1 = -math.inf
        self.history: list[dict] = []
        self._reset_meters()

    # the Distiller's parts, under the names the trainer has always had
    @property
    def strategy(self):
        return self.distiller.strategy if self.distiller is not None else NoDistillation()

    @property
    def agent(self) -> Optional[MTKDAgent]:
        return self.distiller.agent if self.distiller is not None else None

    @property
    def agent_optimizer(self):
        return self.distiller.agent_optimizer if self.distiller is not None else None

    @property
    def feature_transfer(self) -> Optional[nn.Module]:
        return self.distiller.feature_transfer if self.distiller is not None else None

    @property
    def buffer(self):
        return self.distiller.buffer if self.distiller is not None else None

    # ------------------------------------------------------------------ one step
    def _reset_meters(self):
        self.meters = torch.zeros(len(_METERS), dtype=torch.float64, device=self.device)
        self.weight_sums = torch.zeros(2, max(self.num_teachers, 1), dtype=torch.float64, device=self.device)

    def begin_epoch(self, epoch: int, steps: Optional[int] = None) -> None:
        """Start epoch ``epoch`` (0 is the warm-up); ``steps`` sizes the agent's replay buffer."""
        self.epoch = epoch
        self.step_in_epoch = 0
        self.steps_this_epoch = steps
        if self.distiller is not None:
            self.distiller.begin_epoch(epoch, steps)
        self._reset_meters()

    def train_step(self, images: Tensor, labels: Tensor, indices: Optional[Tensor] = None, view: int = 0) -> dict:
        """One student step on a batch (and the agent update when it falls due). Returns device tensors
        (``loss``, ``logit_weights``, ``feature_weights``, ``reward``); nothing here reads back to the host."""
        cfg = self.config
        images = images.to(self.device, non_blocking=True)
        labels = labels.to(self.device, non_blocking=True)
        if cfg.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        self.net.train()
        t_out = self.teachers(images, indices, view) if self.teachers is not None else None  # CUDA: on its own stream
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            logits, maps = self.train_module(images)
        t_out = _on_device(t_out, self.device) if t_out is not None else None  # first read: waits for the teachers
        wl = wf = reward = None
        zero = torch.zeros((), device=self.device)
        if t_out is None:
            logits = logits.float() if self.amp_dtype is not None else logits  # the loss in float32
            loss = F.cross_entropy(logits, labels)
            ce, kd, feat = loss.detach(), zero, zero
        else:
            # state -> weights -> loss -> reward, and the agent's store and update (mtkd_fast/step.py via Distiller)
            out = self.distiller.step(logits, labels, t_out, maps=maps)
            loss, reward, wl, wf = out.loss, out.reward, out.logit_weights, out.feature_weights
            self.diagnostics.update(wl, wf, t_out.logits, labels, out.state, self.agent, out.per_sample_loss,
                                    reward)
            ce = out.student_ce.mean()
            kd = cfg.alpha * (wl * out.kl).mean(0).sum()
            feat = cfg.beta * (wf * out.feature_stat).mean(0).sum() if out.feature_stat is not None else zero
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()

        self.step_in_epoch += 1
        with torch.no_grad():
            B = labels.shape[0]
            k = min(5, logits.shape[1])
            hit = logits.detach().topk(k, dim=1).indices == labels.unsqueeze(1)
            self.meters += torch.stack([loss.detach() * B, ce * B, kd * B, feat * B, hit[:, 0].sum(), hit.any(1).sum(),
                                        torch.tensor(float(B), device=self.device), zero, zero]).double()
            if wl is not None:
                self.weight_sums += torch.stack([wl.sum(0), wf.sum(0)]).double()
        return {"loss": loss.detach(), "logit_weights": wl, "feature_weights": wf, "reward": reward}

    def update_agent(self) -> None:
        """The agent update now (the Distiller runs it by itself at the authors' trigger and each epoch's end)."""
        if self.distiller is not None:
            self.distiller.update_agent()

    def end_epoch(self) -> dict:
        """Final agent update of the epoch, learning-rate schedule step, and the epoch's training metrics."""
        if self.distiller is not None:  # the epoch's last agent update
            agent = self.distiller.end_epoch()
            self.meters[_METERS.index("agent_loss")] += agent["agent_loss_sum"].to(self.meters)
            self.meters[_METERS.index("agent_batches")] += agent["agent_batches"]
        lr = self.optimizer.param_groups[0]["lr"]
        self.scheduler.step()
        sums = D.all_reduce_sum(self.meters.clone())
        weights = D.all_reduce_sum(self.weight_sums.clone())
        m = dict(zip(_METERS, sums.tolist()))
        n = max(m["count"], 1.0)
        metrics = {"lr": lr, "train_loss": m["loss"] / n, "train_ce": m["ce"] / n, "train_kd": m["kd"] / n,
                   "train_feat": m["feat"] / n, "train_top1": 100 * m["top1"] / n, "train_top5": 100 * m["top5"] / n,
                   "agent_loss": m["agent_loss"] / m["agent_batches"] if m["agent_batches"] else float("nan"),
                   "images": int(m["count"])}
        if self.num_teachers and self.strategy.needs_teachers:
            w = (weights / n).tolist()
            for t, label in enumerate(self.teacher_labels):
                metrics[f"wl_{label}"] = w[0][t]
                metrics[f"wf_{label}"] = w[1][t]
            metrics.update(self.diagnostics.compute(D.all_reduce_sum))
            metrics.update(self.update_diagnostics.compute(D.all_reduce_sum))
        return metrics

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        return {
            "format": 1,
            "epoch": self.epoch + 1,  # epochs completed
            "student": self.student.state_dict(),
            "feature_transfer": self.feature_transfer.state_dict() if self.feature_transfer is not None else None,
            "agent": self.agent.state_dict() if self.agent is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "agent_optimizer": self.agent_optimizer.state_dict() if self.agent_optimizer is not None else None,
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "best_top1": self.best_top1,
            "history": self.history,
            "config": self.config.to_dict(),
            "teacher_checkpoint_sha256": self._teacher_checkpoint_hashes(),
            "rng": rng_state(),
        }

    def _teacher_checkpoint_hashes(self) -> list:
        """SHA-256 of each teacher checkpoint file (computed once): a resumed run must use the same files."""
        if getattr(self, "_teacher_hashes", None) is None:
            self._teacher_hashes = [file_sha256(p) if os.path.isfile(p) else None
                                    for p in self.config.teacher_checkpoints]
        return self._teacher_hashes

    def check_resume_config(self, ckpt: dict, path: str) -> None:
        """Refuse, naming the field, to resume with other teachers (or their order or checkpoints), student, data,
        method or optimiser settings than the checkpoint's: the run would go on silently as another one."""
        saved = ckpt.get("config")
        if not isinstance(saved, dict):
            raise DataError(f"{path}: has no run config; cannot check that this run matches it")
        now = self.config.to_dict()
        for name in RESUME_FIXED:
            if name == "teacher_checkpoints":
                continue
            same = saved.get(name) == now[name]
            if name == "teacher_cache" and saved.get(name) and now[name]:  # the same directory, however written
                same = os.path.realpath(saved[name]) == os.path.realpath(now[name])
            if name in saved and not same:
                raise ValueError(f"{name}: the checkpoint {path} was trained with {saved[name]!r}, this run has "
                                 f"{now[name]!r}; resume with the same {name} or start a new run in another out_dir")
        old_paths = list(saved.get("teacher_checkpoints") or [])
        new_paths = list(self.config.teacher_checkpoints)
        old_hashes = ckpt.get("teacher_checkpoint_sha256")
        if len(old_paths) != len(new_paths):
            raise ValueError(f"teacher_checkpoints: the checkpoint {path} was trained with {old_paths!r}, this run "
                             f"has {new_paths!r}")
        new_hashes = self._teacher_checkpoint_hashes() if old_hashes else None
        for m, (a, b) in enumerate(zip(old_paths, new_paths)):
            same = (old_hashes[m] == new_hashes[m]) if old_hashes and old_hashes[m] and new_hashes[m] \
                else os.path.normpath(a) == os.path.normpath(b)
            if not same:
                raise ValueError(f"teacher_checkpoints[{m}]: the checkpoint {path} was trained with teacher weights "
                                 f"from {a!r}, this run gives {b!r} (other content); resume with the same files")
        changed = [f"{n} {saved[n]!r} -> {now[n]!r}" for n in RESUME_APPLIED
                   if n != "epochs" and n in saved and saved[n] != now[n]]  # epochs: _refit_schedule says it
        if changed and self.dist.is_main:
            print(f"resume: applying the new {', '.join(changed)} from epoch {int(ckpt.get('epoch', 0)) + 1}",
                  flush=True)

    def _refit_schedule(self, saved_epochs: int, path: str) -> None:
        """The checkpoint's schedule was fitted to ``saved_epochs``; with another ``epochs`` a cosine schedule is
        rebuilt for the new length at the resumed epoch (multistep and constant do not depend on it)."""
        cfg = self.config
        if saved_epochs == cfg.epochs:
            return
        if cfg.schedule == "cosine":
            self.scheduler = _build_scheduler(cfg, self.optimizer)
            self.scheduler.last_epoch = self.start_epoch
            for group in self.optimizer.param_groups:
                group["lr"] = group["initial_lr"] * (1 + math.cos(math.pi * min(self.start_epoch, cfg.epochs)
                                                                  / cfg.epochs)) / 2
            self.scheduler._last_lr = [g["lr"] for g in self.optimizer.param_groups]
            note = (f"the cosine schedule is refitted to {cfg.epochs} epochs "
                    f"(lr {self.optimizer.param_groups[0]['lr']:.6g} for epoch {self.start_epoch + 1})")
        else:
            note = f"the {cfg.schedule} schedule does not depend on the number of epochs"
        if self.dist.is_main:
            print(f"resume: epochs changed from {saved_epochs} (in {path}) to {cfg.epochs}; {note}", flush=True)

    def load_state_dict(self, ckpt: dict, path: str = "<checkpoint>") -> None:
        self.check_resume_config(ckpt, path)
        load_module_state(self.student, ckpt["student"], path, "student")
        check_finite_weights(self.student, f"{path} (student)")  # it would only train NaN onwards
        if self.feature_transfer is not None:
            if ckpt.get("feature_transfer") is None:
                raise ValueError(f"{path}: has no feature transfer state, but this run distils features")
            load_module_state(self.feature_transfer, ckpt["feature_transfer"], path, "feature transfer")
        if self.agent is not None:
            if ckpt.get("agent") is None:
                raise ValueError(f"{path}: has no agent state, but this run uses strategy {self.config.strategy!r}")
            load_module_state(self.agent, ckpt["agent"], path, "agent")
            self.agent_optimizer.load_state_dict(ckpt["agent_optimizer"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        self.start_epoch = int(ckpt["epoch"])
        self.epoch = self.start_epoch
        self.best_top1 = float(ckpt["best_top1"])
        # a checkpoint saved before the columns were named by architecture: its rows under the new names
        self.history = [rename_index_columns(row, self.teacher_labels) for row in ckpt["history"]]
        set_rng_state(ckpt["rng"])
        self._refit_schedule(int(ckpt["config"].get("epochs", self.config.epochs)), path)

    def resume(self, path: str, trusted: Optional[bool] = None) -> None:
        """Continue from ``path`` (read weights-only; ``trusted`` defaults to ``config.trust_checkpoint``)."""
        trusted = self.config.trust_checkpoint if trusted is None else trusted
        self.load_state_dict(load_checkpoint_file(path, map_location=self.device, trusted=trusted,
                                                  require_training=True), path)

    # ------------------------------------------------------------------ epochs
    def view_for_epoch(self, epoch: int) -> int:
        """The augmentation view of epoch ``epoch``: the epoch itself with live teachers; the cache's schedule
        (``mtkd_fast.cache.view_for_epoch``: epoch mod V for a cyclic cache of V views) with a teacher cache."""
        if hasattr(self.teachers, "manifest"):
            from ..cache import view_for_epoch

            return view_for_epoch(self.teachers, epoch)
        return epoch

    def fit(self, make_train_loader: Callable[[int], Iterable], val_loader: Optional[Iterable] = None,
            out_dir: Optional[str] = None) -> dict:
        """Train epochs ``start_epoch .. config.epochs - 1``. ``make_train_loader(epoch)`` gives the epoch's
        batches (images, labels, indices), already in view ``view_for_epoch(epoch)``. Writes the CSV, the PNG and
        the checkpoints into ``out_dir`` (rank 0) and returns the final metrics and paths."""
        from tqdm.auto import tqdm

        cfg = self.config
        out_dir = out_dir or cfg.out_dir
        main = self.dist.is_main
        if main:
            os.makedirs(out_dir, exist_ok=True)
        writer = _tensorboard_writer(os.path.join(out_dir, "tensorboard")) if (cfg.tensorboard and main) else None
        last = self.history[-1] if self.history else {}  # a resumed finished run reports its last epoch
        for epoch in range(self.start_epoch, cfg.epochs):
            loader = make_train_loader(epoch)
            view = self.view_for_epoch(epoch)
            steps = len(loader) if hasattr(loader, "__len__") else None
            if cfg.max_steps_per_epoch:
                steps = min(steps, cfg.max_steps_per_epoch) if steps is not None else cfg.max_steps_per_epoch
            self.begin_epoch(epoch, steps)
            per_step = (cfg.batch_size // self.dist.world_size) * self.dist.world_size
            # counted in images, so the bar's rate is images/s and its ETA the epoch's remaining time
            bar = tqdm(total=steps * per_step if steps is not None else None, desc=f"epoch {epoch + 1}/{cfg.epochs}",
                       unit="img", unit_scale=True, disable=not (cfg.progress and main),
                       dynamic_ncols=True, leave=False)
            t0 = time.perf_counter()
            # the first step (0-based) whose loss was not finite, kept on the device: no read-back per step
            first_bad = torch.full((), -1, dtype=torch.long, device=self.device)
            i = -1
            for i, (images, labels, indices) in enumerate(loader):
                if steps is not None and i >= steps:
                    break
                try:
                    out = self.train_step(images, labels, indices, view)
                except Exception as exc:  # e.g. the agent's BCE refusing NaN probabilities: name the cause instead
                    self._stop_if_non_finite(epoch, first_bad, i, out_dir, exc)
                    raise
                first_bad = torch.where((first_bad < 0) & ~torch.isfinite(out["loss"]), i, first_bad)
                bar.update(images.shape[0] * self.dist.world_size)
                if (i + 1) % cfg.log_every == 0:  # the only per-interval host read-back
                    self._stop_if_non_finite(epoch, first_bad, i, out_dir)
                    n = max(float(self.meters[_METERS.index("count")]), 1.0)
                    bar.set_postfix(loss=f"{float(self.meters[0]) / n:.3f}")
            bar.close()
            self._stop_if_non_finite(epoch, first_bad, i, out_dir)  # before anything is saved
            metrics = self.end_epoch()
            seconds = time.perf_counter() - t0
            row = {"epoch": epoch + 1, **metrics, "time_s": seconds,
                   "images_per_s": metrics["images"] / max(seconds, 1e-9)}
            if val_loader is not None and ((epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs):
                val = evaluate(self.student, val_loader, self.device, cfg.amp, cfg.channels_last)
                row.update(val_loss=val["loss"], val_top1=val["top1"], val_top5=val["top5"])
            is_best = "val_top1" in row and row["val_top1"] > self.best_top1
            if is_best:
                self.best_top1 = row["val_top1"]
            self.history.append(row)
            if main:
                self._write_outputs(out_dir, is_best, writer)
                print(_summary_line(row, cfg.epochs), flush=True)
            D.barrier()
            last = row
        if writer is not None:
            writer.close()
        return {
            "out_dir": out_dir,
            "epochs": cfg.epochs,
            "final": last,
            "best_top1": self.best_top1 if self.best_top1 > -math.inf else None,
            "history": self.history,
            "csv": os.path.join(out_dir, METRICS_CSV),
            "png": os.path.join(out_dir, WEIGHTS_PNG) if self.num_teachers else None,
            "checkpoint": os.path.join(out_dir, CHECKPOINT_LAST),
            "best_checkpoint": os.path.join(out_dir, CHECKPOINT_BEST),
            "student_checkpoint": os.path.join(out_dir, STUDENT_BEST),
        }

    def _stop_if_non_finite(self, epoch: int, first_bad: Tensor, step: int, out_dir: str,
                            cause: Optional[BaseException] = None) -> None:
        """Raise :class:`NonFiniteTrainingError` when a loss, the epoch's meters or a weight of the student, its
        feature transfer or the agent is NaN/Inf (one read-back). A NaN step poisons every later one and the
        checkpoint it would write, so the run stops before saving, naming the last good checkpoint."""
        params = [p.detach() for p in self.net.parameters()]
        if self.agent is not None:
            params += [p.detach() for p in self.agent.parameters()]
        checks = [torch.isfinite(t).all() for t in [self.meters, *params]] + [first_bad < 0]
        if bool(torch.stack(checks).all()):  # one read-back
            return
        bad = int(first_bad)
        where = f"step {bad + 1}" if bad >= 0 else f"step {step + 1}"
        last = os.path.join(out_dir, CHECKPOINT_LAST)
        if os.path.isfile(last):
            saved = load_checkpoint_file(last, map_location="cpu", trusted=self.config.trust_checkpoint,
                                         require_training=True)
            good = f"the last good checkpoint is {last} (epoch {int(saved['epoch'])})"
        else:
            good = "no checkpoint was written yet"
        raise NonFiniteTrainingError(
            f"training: the loss or the weights became NaN/Inf at epoch {epoch + 1}, {where}; stopped before saving: "
            f"{good} (check the teachers' weights and the inputs, or lower --lr, --temperature, --alpha, --beta)"
        ) from cause

    def _write_outputs(self, out_dir: str, is_best: bool, writer) -> None:
        state = self.state_dict()
        save_atomic(state, os.path.join(out_dir, CHECKPOINT_LAST))
        save_atomic({"model": self.student.state_dict()}, os.path.join(out_dir, STUDENT_LAST))
        if is_best:
            save_atomic(state, os.path.join(out_dir, CHECKPOINT_BEST))
            save_atomic({"model": self.student.state_dict()}, os.path.join(out_dir, STUDENT_BEST))
        write_csv_atomic(os.path.join(out_dir, METRICS_CSV), self.history)
        if self.num_teachers:
            warmup = 1 if self.config.strategy == "mtkd_rl" else 0  # epoch 1 uses fixed weights (warmup_weights)
            plot_teacher_weights([WeightCurve("", self.history, warmup)], self.teacher_labels,
                                 os.path.join(out_dir, WEIGHTS_PNG))
            write_diagnostics(self.history, self.teacher_labels, out_dir)
        if writer is not None:
            row = self.history[-1]
            for key, value in row.items():
                if key != "epoch" and isinstance(value, (int, float)) and math.isfinite(value):
                    writer.add_scalar(key, value, row["epoch"])
            writer.flush()


# ---------------------------------------------------------------------- helpers
class NonFiniteTrainingError(DataError):
    """Training produced a NaN/Inf loss or weight; the command line reports it in one line (exit status 1)."""


def _on_device(t_out, device):
    """Teacher outputs on the student's device (a cache may hand them over on the CPU)."""
    if t_out.logits.device == device:
        return t_out
    move = lambda t: t.to(device, non_blocking=True)  # noqa: E731
    return type(t_out)(move(t_out.logits), [move(e) for e in t_out.embeddings], [move(f) for f in t_out.feature_maps])


def _build_optimizer(cfg: TrainConfig, params):
    params = [p for p in params if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0,
                               weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _build_scheduler(cfg: TrainConfig, optimizer):
    """Stepped once per epoch: multistep (x lr_decay at each milestone), cosine to 0 over the epochs, constant."""
    if cfg.schedule == "multistep":
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(cfg.milestones), gamma=cfg.lr_decay)
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 1.0)


def _summary_line(row: dict, epochs: int) -> str:
    text = (f"epoch {row['epoch']}/{epochs}: loss {row['train_loss']:.4f} train top-1 {row['train_top1']:.2f}% "
            f"lr {row['lr']:.4g} {row['images_per_s']:.0f} img/s")
    if "val_top1" in row:
        text += f" | val top-1 {row['val_top1']:.2f}% top-5 {row['val_top5']:.2f}%"
    return text


def _teacher_names(config: TrainConfig, source) -> Optional[list]:
    """The teachers' architecture names: the run's ``teachers``, else those a cache's manifest records."""
    if config.teachers:
        return list(config.teachers)
    manifest = getattr(source, "manifest", None)
    return [t.get("arch") for t in manifest["teachers"]] if manifest else None


def _tensorboard_writer(log_dir: str):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        print("tensorboard: not installed, skipping (pip install tensorboard)", flush=True)
        return None
    return SummaryWriter(log_dir)
