"""``Distiller``: MTKD-RL (or a baseline weighting) as one module for any training loop (docs/distiller.md).

It owns what the method adds to a student step: the feature transfer E_m (trainable, in ``parameters()`` for the
caller's optimiser), the weighting strategy, and for ``"mtkd_rl"`` the agent, its optimiser, its replay buffer,
the warm-up epoch and the agent update at the authors' trigger. ``distiller(...)`` runs the one step chain of
:mod:`mtkd_fast.step` (state -> weights -> loss -> reward); ``mtkd_fast.train.Trainer`` is this module plus data,
optimisation and checkpoints.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from typing import TYPE_CHECKING, NamedTuple, Optional, Sequence

import torch
from torch import Tensor, nn

from ._validation import stack_teachers
from .agent import AgentReplayBuffer, AgentState, MTKDAgent, normalized_reward
from .step import BACKENDS, distill_step, resolve_backend

if TYPE_CHECKING:
    from .train.config import TrainConfig

__all__ = ["Distiller", "DistillerOutput", "STRATEGIES"]  # noqa: F822 (STRATEGIES: the module __getattr__)

# the one definition of each method option's allowed values (TrainConfig and the CLI import them from here);
# STRATEGIES, the strategies with teachers, is the registry's (mtkd_fast.train.strategies; module __getattr__ below)
FEATURE_KD = ("mse", "kl")
WARMUP_WEIGHTS = ("ones", "uniform")
AGENT_UPDATES = ("bce", "policy_gradient")
TRANSFER_RESIZE = ("independent", "chained")
_BUFFER_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
BUFFER_DTYPES = tuple(_BUFFER_DTYPES)
_LOW_PRECISION = (torch.float16, torch.bfloat16)
# the TrainConfig options of the method, with TrainConfig's defaults (tests/test_distiller.py keeps them equal)
# how strategy aekd solves its dual: exactly, or with the CA-MKD code's libsvm (train/strategies.py)
AEKD_SOLVERS = ("exact", "libsvm")
_CHOICES = {"feature_kd": FEATURE_KD, "warmup_weights": WARMUP_WEIGHTS, "agent_update": AGENT_UPDATES,
            "agent_buffer_dtype": BUFFER_DTYPES, "loss_backend": BACKENDS, "transfer_resize": TRANSFER_RESIZE,
            "aekd_solver": AEKD_SOLVERS}
_EXTRA_FORMAT = 1


class DistillerOutput(NamedTuple):
    """One batch's distillation. ``loss`` is what the caller backpropagates (float32 or the inputs' wider dtype);
    everything else is detached."""

    loss: Tensor  # scalar: mean_i SCE_i + alpha * logit KD + beta * feature KD
    logit_weights: Tensor  # [B, M] the teacher weights of the KL terms
    feature_weights: Tensor  # [B, M] the teacher weights of the feature terms
    kl: Tensor  # [B, M] KL_{i,m} (with T^2)
    teacher_ce: Tensor  # [B, M] TCE_{i,m}
    student_ce: Tensor  # [B] SCE_i
    per_sample_loss: Tensor  # [B] l_i (docs/method.md section 5)
    reward: Optional[Tensor]  # [B] the agent's reward r_hat (mtkd_rl only, normalised over the global batch)
    feature_stat: Optional[Tensor]  # [B, M] the feature term per sample (MSE or feature KL); None without maps
    state: Optional[AgentState]  # the agent state (mtkd_rl only)


class Distiller(nn.Module):
    """Multi-teacher distillation with its weighting method inside: ``out = distiller(student_logits, targets,
    teacher_logits, teacher_embeddings, student_map, teacher_maps)``, then ``out.loss.backward()``.

    Built from shapes, not models (``from_config`` reads them from models). Every option is the
    :class:`mtkd_fast.train.TrainConfig` option of the same name, with its default.

    Args:
        strategy: ``"mtkd_rl"`` (the agent), ``"aver"``, ``"ebkd"``, ``"camkd"``, ``"aekd"`` or any other
            strategy with teachers in the registry (``mtkd_fast.train.strategies.list_strategies``).
        num_classes: K (a strategy that needs the agent, ``"mtkd_rl"``: sizes the agent's input).
        teacher_dims: [D_1..D_M], each teacher's pooled embedding width (``"mtkd_rl"``).
        student_map_shape: (C, H, W) of the student's last map, and ``teacher_map_shapes`` [(C_m, H_m, W_m)...]:
            build the feature transfer (omit both to distil logits only).
        teacher_heads: each teacher's final linear layer (a strategy that needs them, ``"camkd"``: its feature
            weights apply them).
        feature_transfer / agent: modules of your own instead of the ones built from the shapes.
    """

    def __init__(self, strategy: str = "mtkd_rl", num_classes: Optional[int] = None,
                 teacher_dims: Optional[Sequence[int]] = None, student_map_shape: Optional[Sequence[int]] = None,
                 teacher_map_shapes: Optional[Sequence[Sequence[int]]] = None, *, temperature: float = 4.0,
                 alpha: float = 1.0, beta: float = 5.0, feature_kd: str = "mse", warmup_weights: str = "ones",
                 dynamic: bool = False, agent_step: int = 1000, agent_lr: float = 0.1, agent_update: str = "bce",
                 agent_buffer_dtype: str = "float32", loss_backend: str = "auto",
                 transfer_resize: str = "independent", aekd_nu: Optional[float] = None,
                 aekd_solver: str = "exact", camkd_weight_grad: bool = False,
                 teacher_heads: Optional[Sequence[nn.Module]] = None, feature_transfer: Optional[nn.Module] = None,
                 agent: Optional[MTKDAgent] = None):
        super().__init__()
        from ._validation import check_scale, check_temperature
        from .train.strategies import DISTILLING_STRATEGIES, get_strategy

        if strategy not in DISTILLING_STRATEGIES:
            raise ValueError(f"strategy: expected one of {list(DISTILLING_STRATEGIES)}, got {strategy!r}")
        given = locals()  # the arguments (a comprehension's own locals() would not see them)
        options = {name: given[name] for name in _config_options()}
        kind = get_strategy(strategy)
        for name, allowed in _CHOICES.items():
            if locals()[name] not in allowed:
                raise ValueError(f"{name}: expected one of {list(allowed)}, got {locals()[name]!r}")
        check_temperature(temperature)
        check_scale("alpha", alpha), check_scale("beta", beta)
        if isinstance(agent_step, bool) or not isinstance(agent_step, int) or agent_step < 1:
            raise ValueError(f"agent_step: expected a positive integer, got {agent_step!r}")
        if not (isinstance(agent_lr, (int, float)) and math.isfinite(agent_lr) and agent_lr > 0):
            raise ValueError(f"agent_lr: expected a finite positive number, got {agent_lr!r}")
        self.strategy_name = strategy
        self.temperature, self.alpha, self.beta = float(temperature), float(alpha), float(beta)
        self.feature_kd, self.loss_backend = feature_kd, loss_backend
        self.agent_step, self.agent_lr = agent_step, float(agent_lr)
        self.agent_buffer_dtype = agent_buffer_dtype

        if feature_transfer is None and (student_map_shape is not None or teacher_map_shapes is not None):
            if student_map_shape is None or teacher_map_shapes is None:
                raise ValueError("student_map_shape, teacher_map_shapes: the feature transfer needs both")
            from .models.transfer import FeatureTransfer

            feature_transfer = FeatureTransfer(student_shape=tuple(student_map_shape),
                                               teacher_shapes=[tuple(s) for s in teacher_map_shapes],
                                               chained_resize=transfer_resize == "chained")
        self.feature_transfer = feature_transfer

        if kind.needs_agent and agent is None:
            if num_classes is None or not teacher_dims:
                raise ValueError(f"num_classes, teacher_dims: strategy {strategy!r} builds its agent from the class "
                                 "count K and each teacher's embedding width D_m (or pass agent=)")
            if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
                raise ValueError(f"num_classes: expected a positive int, got {num_classes!r}")
            sizes = [int(d) + num_classes + 3 for d in teacher_dims]
            agent = MTKDAgent(sizes, len(sizes), dynamic=dynamic, update=agent_update)
        agent = agent if kind.needs_agent else None
        # the agent is not a submodule: it learns from its own loss and optimiser only, so the caller's optimiser
        # (over parameters()) and a DDP wrapper never see it; _apply moves it with the module and the extra state
        # saves it
        object.__setattr__(self, "_agent", agent)
        object.__setattr__(self, "strategy", kind.build(options, agent=agent, teacher_heads=teacher_heads))
        self.agent_optimizer = torch.optim.SGD(agent.parameters(), lr=self.agent_lr) if agent is not None else None
        if agent is not None:
            agent.eval()
        self.buffer: Optional[AgentReplayBuffer] = None
        self.epoch = 0
        self.step_in_epoch = 0
        self.steps_this_epoch: Optional[int] = None
        self._agent_loss_sum: Optional[Tensor] = None
        self.agent_batches = 0
        # an observer of the agent updates (the trainer's AgentUpdateDiagnostics): begin / step / end, or None
        self.update_probe = None
        D = _distributed()
        if D.is_distributed():  # every rank starts from rank 0's agent and transfer
            for module in (agent, feature_transfer):
                if module is not None:
                    D.broadcast_module(module)

    # ------------------------------------------------------------------ construction from models
    @classmethod
    def from_config(cls, cfg: Optional["TrainConfig"], student: nn.Module, teachers: Sequence[nn.Module],
                    example_input: Optional[Tensor] = None, **overrides) -> "Distiller":
        """A Distiller with ``cfg``'s method options (a :class:`mtkd_fast.train.TrainConfig`; None: the defaults,
        which are TrainConfig's), its shapes read
        from one forward of ``student`` and ``teachers`` (models with the ``(feats, logits)`` contract, see
        :func:`mtkd_fast.models.with_features`) on ``example_input`` (default: two zero images of cfg.dataset's
        size); for a strategy that needs them (``"camkd"``) the teachers' classifier heads. ``overrides`` win
        over ``cfg``."""
        from .models import classifier_head
        from .train.strategies import get_strategy

        if example_input is None:
            size = {"imagefolder": (3, 224, 224)}.get(getattr(cfg, "dataset", None), (3, 32, 32))
            example_input = torch.zeros(2, *size)
        device = next(iter(student.parameters())).device
        x = example_input.to(device)
        with torch.no_grad():
            was = student.training
            student.eval()
            s_feats, s_logits = student(x, is_feat=True)
            student.train(was)
            t_out = []
            for t in teachers:
                was = t.training
                t.eval()
                t_out.append(t(x, is_feat=True))
                t.train(was)
        K = int(s_logits.shape[1])
        for m, (feats, logits) in enumerate(t_out):
            if logits.shape[1] != K:
                raise ValueError(f"teachers[{m}]: predicts {logits.shape[1]} classes, the student {K}")
        if cfg is None:
            defaults = inspect.signature(cls.__init__).parameters
            options = {name: defaults[name].default for name in _config_options()}
        else:
            options = {name: getattr(cfg, name) for name in _config_options()}
        options.update(overrides)
        distil_maps = options["beta"] > 0
        if get_strategy(options["strategy"]).needs_teacher_heads and "teacher_heads" not in options:
            options["teacher_heads"] = [classifier_head(t) for t in teachers]
        return cls(num_classes=K, teacher_dims=[int(f[-1].shape[1]) for f, _ in t_out],
                   student_map_shape=tuple(s_feats[-2].shape[1:]) if distil_maps else None,
                   teacher_map_shapes=[tuple(f[-2].shape[1:]) for f, _ in t_out] if distil_maps else None,
                   **options).to(device)

    # ------------------------------------------------------------------ the agent, moved with the module
    @property
    def agent(self) -> Optional[MTKDAgent]:
        """The MTKD-RL agent (None for the other strategies); trained by the Distiller itself."""
        return self._agent

    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        if self._agent is not None:
            self._agent._apply(fn, *args, **kwargs)
        return self

    def extra_repr(self) -> str:
        return (f"strategy={self.strategy_name!r}, temperature={self.temperature}, alpha={self.alpha}, "
                f"beta={self.beta}, feature_kd={self.feature_kd!r}, agent_step={self.agent_step}")

    # ------------------------------------------------------------------ one batch
    def forward(self, student_logits: Tensor, targets: Tensor, teacher_logits, teacher_embeddings=None,
                student_map: Optional[Tensor] = None, teacher_maps=None) -> DistillerOutput:
        """Distil one batch.

        Args:
            student_logits: [B, K] (any autocast dtype; the losses run in float32).
            targets: [B] int64 labels.
            teacher_logits: [M, B, K] (or M tensors [B, K]), or a ``TeacherOutputs`` (``LiveTeachers``, a
                cache), which also gives the embeddings and maps.
            teacher_embeddings: M pooled teacher embeddings [B, D_m] (``"mtkd_rl"``: the agent state).
            student_map: the student's own last map [B, C, H, W]; the Distiller's feature transfer maps it to
                each teacher (None: logits only).
            teacher_maps: M teacher maps [B, C_m, H_m, W_m] (with ``student_map``).
        """
        teacher_logits, teacher_embeddings, teacher_maps = _unpack(teacher_logits, teacher_embeddings, teacher_maps)
        maps = None
        if student_map is not None:
            if self.feature_transfer is None:
                raise ValueError("student_map: this Distiller has no feature transfer (give student_map_shape and "
                                 "teacher_map_shapes, or feature_transfer=, to distil features)")
            with _float32(student_map.device):
                maps = self.feature_transfer(_widen(student_map))
        return self.step(student_logits, targets, teacher_logits, teacher_embeddings, maps, teacher_maps)

    def step(self, student_logits: Tensor, targets: Tensor, teacher_logits, teacher_embeddings=None,
             maps: Optional[Sequence[Tensor]] = None, teacher_maps=None) -> DistillerOutput:
        """:meth:`forward` with the student maps already transferred (``maps``: G_m, one per teacher), for a
        caller that runs the transfer inside its own (DDP) module, as ``Trainer`` does."""
        teacher_logits, teacher_embeddings, teacher_maps = _unpack(teacher_logits, teacher_embeddings, teacher_maps)
        if maps is not None and teacher_maps is None:
            raise ValueError("teacher_maps: feature distillation needs the teachers' maps with the student's")
        with _float32(student_logits.device):
            logits = _widen(student_logits)
            maps = [_widen(g) for g in maps] if maps is not None else None
            tl = stack_teachers("teacher_logits", teacher_logits, logits)
            if self.strategy.needs_state and teacher_embeddings is None:
                raise ValueError(f"teacher_embeddings: strategy {self.strategy_name!r} needs the teachers' pooled "
                                 "embeddings (the agent state)")
            dtypes = (logits.dtype,) + ((maps[0].dtype,) if maps else ())
            strategy, epoch = self.strategy, self.epoch
            graded = []  # feature weights that carry a gradient (camkd_weight_grad)

            def choose_weights(tce, state):
                wl, wf, actions = strategy.weights(epoch, tl, tce, state, student_logits=logits.detach(),
                                                   student_maps=maps, labels=targets)
                if wf.requires_grad:  # the loss ops take their weights detached; the term below adds d wf
                    graded.append(wf)
                    wf = wf.detach()
                return wl, wf, actions

            out = distill_step(
                logits, maps, targets, tl, teacher_embeddings, teacher_maps, choose_weights,
                temperature=self.temperature, alpha=self.alpha, beta=self.beta, feature_kd=self.feature_kd,
                needs_state=strategy.needs_state, needs_teacher_ce=strategy.needs_teacher_ce,
                backend=resolve_backend(self.loss_backend, logits.device, dtypes),
                with_reward=self._agent is not None,
            )
            loss = out.loss
            if graded and out.feature_stat is not None:
                # the product rule's other half, as the CA-MKD code's undetached weights give it: the value is 0,
                # the gradient beta * mean_i sum_m feature_stat_im * d wf_im
                wf = graded[0]
                loss = loss + self.beta * ((wf - wf.detach()) * out.feature_stat).mean(0).sum()
            reward = out.reward
            if self._agent is not None and self.training:
                if _distributed().is_distributed():  # normalised over the global batch
                    gathered, offset = _distributed().all_gather_cat(out.per_sample_loss)
                    reward = normalized_reward(gathered)[offset:offset + out.per_sample_loss.shape[0]]
                self._store(out.state, reward, out.actions)
                # the authors' trigger: after batch index agent_step, 2 agent_step, ... (and at the epoch's end)
                if self.step_in_epoch % self.agent_step == 0 and self.step_in_epoch != 0:
                    self.update_agent()
            if self.training:
                self.step_in_epoch += 1
        return DistillerOutput(loss, out.logit_weights, out.feature_weights, out.kl, out.teacher_ce,
                               out.student_ce, out.per_sample_loss, reward, out.feature_stat, out.state)

    # ------------------------------------------------------------------ epochs and the agent update
    def begin_epoch(self, epoch: int, steps: Optional[int] = None) -> None:
        """Start epoch ``epoch`` (0 is MTKD-RL's warm-up, which uses fixed weights while the agent already
        learns); ``steps``, the epoch's batch count when known, sizes the replay buffer. An epoch left without
        :meth:`end_epoch` is flushed first."""
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch: expected a non-negative integer, got {epoch!r}")
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
            raise ValueError(f"steps: expected a positive integer (or None), got {steps!r}")
        self.update_agent()
        self.epoch, self.step_in_epoch, self.steps_this_epoch = epoch, 0, steps
        if self.buffer is not None and self.buffer.capacity != self._capacity():
            self.buffer = None  # empty after the flush: re-made at this epoch's size on the first store

    def end_epoch(self) -> dict:
        """The epoch's last agent update (as the authors do at an epoch's end); moves on to the next epoch.
        Returns this epoch's agent-update statistics: ``agent_loss_sum`` (a float64 device tensor, the summed
        update losses) and ``agent_batches`` (how many stored batches the agent learned from)."""
        self.update_agent()
        stats = {"agent_loss_sum": self._agent_loss_sum if self._agent_loss_sum is not None
                 else torch.zeros((), dtype=torch.float64), "agent_batches": self.agent_batches}
        self._agent_loss_sum, self.agent_batches = None, 0
        self.epoch, self.step_in_epoch, self.steps_this_epoch = self.epoch + 1, 0, None
        return stats

    def _capacity(self) -> int:
        # the trigger stores agent_step + 1 batches before the first update of an epoch, agent_step after it
        capacity = self.agent_step + 1
        return min(capacity, self.steps_this_epoch) if self.steps_this_epoch else capacity

    def _store(self, state: AgentState, reward: Tensor, actions) -> None:
        B, width = state.features.shape
        buf = self.buffer
        if buf is None or len(buf) >= buf.capacity or B > buf.batch_size:
            new = AgentReplayBuffer(max(self._capacity(), len(buf) + 1 if buf is not None else 1),
                                    max(B, buf.batch_size if buf is not None else 1), width, state.kl.shape[1],
                                    dtype=_BUFFER_DTYPES[self.agent_buffer_dtype], device=state.features.device,
                                    store_actions=actions is not None)
            for stored in (buf if buf is not None else ()):  # a longer epoch or a larger batch than sized for
                new.append(*stored)
            self.buffer = buf = new
        buf.append(state, reward, actions)

    def update_agent(self) -> None:
        """One SGD step of the agent per stored mini-batch, in order, then clear the store (docs/method.md
        section 6). Under ``torch.distributed`` the gradients are averaged over ranks, so the agents stay equal.
        Runs by itself at the authors' trigger and in :meth:`end_epoch`."""
        if self._agent is None or self.buffer is None or len(self.buffer) == 0:
            return
        agent = self._agent
        agent.train()
        params = list(agent.parameters())
        total = torch.zeros((), dtype=torch.float64, device=params[0].device)
        probe = self.update_probe
        with torch.enable_grad(), _float32(params[0].device):
            if probe is not None:
                probe.begin(agent, self.buffer)
            for state, reward, actions in self.buffer:
                loss = agent.loss(state, reward, actions)
                self.agent_optimizer.zero_grad(set_to_none=True)
                loss.backward()
                _distributed().average_gradients(params)
                if probe is not None:
                    probe.step(params, self.agent_optimizer.param_groups[0]["lr"])
                self.agent_optimizer.step()
                total += loss.detach().double()
            if probe is not None:
                probe.end(agent, self.buffer)
        self.agent_optimizer.zero_grad(set_to_none=True)
        self._agent_loss_sum = total if self._agent_loss_sum is None else self._agent_loss_sum + total
        self.agent_batches += len(self.buffer)
        self.buffer.clear()
        agent.eval()

    # ------------------------------------------------------------------ checkpoints
    def get_extra_state(self) -> dict:
        """The agent, its optimiser, the stored (state, reward) batches and the counters (a snapshot: training on
        after ``state_dict()`` does not change it); plain tensors and numbers, so ``weights_only`` loads it."""
        buf = None
        if self.buffer is not None:
            b, n = self.buffer, len(self.buffer)
            buf = {"capacity": b.capacity, "batch_size": b.batch_size, "dtype": str(b.features.dtype).split(".")[-1],
                   "sizes": list(b.sizes[:n]), "features": b.features[:n].clone(), "stats": b.stats[:n].clone(),
                   "reward": b.reward[:n].clone(),
                   "actions": b.actions[:n].clone() if b.actions is not None else None}
        agent = self._agent
        return {"format": _EXTRA_FORMAT, "strategy": self.strategy_name, "epoch": self.epoch,
                "step_in_epoch": self.step_in_epoch, "steps_this_epoch": self.steps_this_epoch,
                "agent": {k: v.clone() for k, v in agent.state_dict().items()} if agent is not None else None,
                "agent_optimizer": _clone(self.agent_optimizer.state_dict()) if agent is not None else None,
                "buffer": buf, "agent_loss_sum": self._agent_loss_sum, "agent_batches": self.agent_batches}

    def set_extra_state(self, extra: dict) -> None:
        if not isinstance(extra, dict) or extra.get("format") != _EXTRA_FORMAT:
            raise ValueError(f"state_dict: not a Distiller state of format {_EXTRA_FORMAT} (got "
                             f"{extra.get('format') if isinstance(extra, dict) else type(extra).__name__!r})")
        if extra.get("strategy") != self.strategy_name:
            raise ValueError(f"state_dict: saved by a {extra.get('strategy')!r} Distiller, this one is "
                             f"{self.strategy_name!r}")
        if self._agent is not None:
            from .train.checkpoint import load_module_state

            load_module_state(self._agent, extra["agent"], "state_dict", "agent")
            self.agent_optimizer.load_state_dict(extra["agent_optimizer"])
        self.epoch, self.step_in_epoch = int(extra["epoch"]), int(extra["step_in_epoch"])
        self.steps_this_epoch = extra["steps_this_epoch"]
        self._agent_loss_sum, self.agent_batches = extra["agent_loss_sum"], int(extra["agent_batches"])
        self.buffer = None
        saved = extra.get("buffer")
        if saved is not None and self._agent is not None:
            device = next(self._agent.parameters()).device
            features = saved["features"]
            buf = AgentReplayBuffer(int(saved["capacity"]), int(saved["batch_size"]), features.shape[-1],
                                    saved["stats"].shape[-1], dtype=getattr(torch, saved["dtype"]), device=device,
                                    store_actions=saved["actions"] is not None)
            n = len(saved["sizes"])
            buf.features[:n].copy_(features)
            buf.stats[:n].copy_(saved["stats"])
            buf.reward[:n].copy_(saved["reward"])
            if buf.actions is not None:
                buf.actions[:n].copy_(saved["actions"])
            buf.sizes[:n] = [int(s) for s in saved["sizes"]]
            buf.count = n
            self.buffer = buf


# ---------------------------------------------------------------------- helpers
def _distributed():
    # imported when used: mtkd_fast.train imports this module (and a module object in an attribute would not copy)
    from .train import distributed

    return distributed


def _config_options() -> tuple:
    """The method's TrainConfig options, i.e. Distiller's keyword options."""
    return ("strategy", "temperature", "alpha", "beta", "feature_kd", "warmup_weights", "dynamic", "agent_step",
            "agent_lr", "agent_update", "agent_buffer_dtype", "loss_backend", "transfer_resize", "aekd_nu",
            "aekd_solver", "camkd_weight_grad")


def _unpack(teacher_logits, teacher_embeddings, teacher_maps):
    """(logits, embeddings, maps) from a TeacherOutputs-like tuple or the three arguments."""
    if hasattr(teacher_logits, "logits") and hasattr(teacher_logits, "feature_maps"):
        if teacher_embeddings is not None or teacher_maps is not None:
            raise ValueError("teacher_embeddings, teacher_maps: given twice (teacher_logits is a TeacherOutputs, "
                             "which holds them)")
        t = teacher_logits
        return t.logits, t.embeddings, t.feature_maps
    return teacher_logits, teacher_embeddings, teacher_maps


def _widen(t: Tensor) -> Tensor:
    """float32 for an autocast half/bfloat16 tensor: the losses and the agent state run in float32."""
    return t.float() if t.dtype in _LOW_PRECISION else t


def _float32(device: torch.device):
    """Autocast off for the distillation (inside a caller's autocast region the ops would run in half)."""
    if torch.is_autocast_enabled(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def _clone(obj):
    if isinstance(obj, Tensor):
        return obj.clone()
    if isinstance(obj, dict):
        return {k: _clone(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_clone(v) for v in obj)
    return obj


def __getattr__(name: str):
    # STRATEGIES comes from the registry, which imports this module: looked up when first read, a live view
    if name == "STRATEGIES":
        from .train.strategies import DISTILLING_STRATEGIES

        return DISTILLING_STRATEGIES
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
