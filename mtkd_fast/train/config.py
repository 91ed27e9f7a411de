"""``TrainConfig``: every knob of a training run, with the CIFAR-100 parity defaults of docs/method.md section 7."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

from .._validation import check_device_name, check_int_range, check_temperature
from ..data import BACKENDS as DATA_BACKENDS
from ..data import DATASETS
from ..distiller import AEKD_SOLVERS, AGENT_UPDATES, BUFFER_DTYPES, FEATURE_KD, TRANSFER_RESIZE, WARMUP_WEIGHTS
from ..step import BACKENDS as LOSS_BACKENDS
from ..teachers import PRECISIONS
from .strategies import STRATEGY_NAMES, check_strategy_options

# the registry's strategy names (a live view: a strategy registered later is a choice too)
STRATEGIES = STRATEGY_NAMES
SCHEDULES = ("multistep", "cosine", "constant")
OPTIMIZERS = ("sgd", "adamw")
AMP = (None, "bf16", "fp16")
INT64_MAX = 2**63 - 1
SEED_MAX = 2**32 - 1  # numpy's seed range; torch takes it too
# the largest learning rate accepted (lr, agent_lr): beyond it one SGD step of an O(1) gradient moves a weight by
# more than any trainable network tolerates, and --lr 1e300 overflows the weights to inf in the first step
MAX_LR = 10.0
_INT_RANGES = {"seed": (0, SEED_MAX)}

# the option groups of `mtkd-fast train --help`, in order
GROUPS = {
    "model": "the network being trained and how it runs",
    "data": "the dataset and its loading",
    "method": "how the teachers are weighted and distilled",
    "agent": "the MTKD-RL agent (strategy mtkd_rl)",
    "optimisation": "the student's optimiser, schedule and run length",
    "teachers": "where the teachers' outputs come from",
    "output": "the run directory, logs and resuming",
}


def _option(default=dataclasses.MISSING, *, group: str, help: str, choices=None, factory=None, metavar=None):
    """A TrainConfig field with what the CLI, its help and the config-file validator need to know about it."""
    metadata = {"group": group, "help": help}
    if choices is not None:  # kept as given: a tuple, or the strategy registry's live view
        metadata["choices"] = choices if isinstance(choices, Sequence) else tuple(choices)
    if metavar is not None:
        metadata["metavar"] = metavar
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@functools.lru_cache(maxsize=None)
def field_kind(name: str) -> tuple[type, bool, bool]:
    """``(element type, optional, is_list)`` of a TrainConfig field, read from its annotation."""
    hint = typing.get_type_hints(TrainConfig)[name]
    optional = False
    if typing.get_origin(hint) is typing.Union:
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
        optional = True
    if typing.get_origin(hint) is list:
        return typing.get_args(hint)[0], optional, True
    return hint, optional, False


def _check_types(cfg: "TrainConfig") -> None:
    """Every field of the type its annotation gives: a config file's ``{"lr": "0.1"}`` gets the same one-line
    error as a bad flag (``lr: expected a number, got '0.1'``), not a TypeError deep in the trainer."""
    for f in dataclasses.fields(cfg):
        name = f.name
        value = getattr(cfg, name)
        kind, optional, is_list = field_kind(name)
        if is_list:
            if not isinstance(value, (list, tuple)) or not all(
                    isinstance(v, kind) and not isinstance(v, bool) for v in value):
                what = "strings" if kind is str else "integers"
                raise ValueError(f"{name}: expected a list of {what}, got {value!r}")
            if kind is int:
                for v in value:
                    check_int_range(name, v, -INT64_MAX - 1, INT64_MAX)
            setattr(cfg, name, list(value))
            continue
        if optional and value is None:
            continue
        none = " (or none)" if optional else ""
        if kind is bool:
            if not isinstance(value, bool):
                raise ValueError(f"{name}: expected true or false, got {value!r}")
        elif kind is int:
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"{name}: expected an integer{none}, got {value!r}")
            # torch and numpy take 64-bit integers; the seed numpy's 32 bits
            check_int_range(name, value, *_INT_RANGES.get(name, (-INT64_MAX - 1, INT64_MAX)))
        elif kind is float:
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise ValueError(f"{name}: expected a number{none}, got {value!r}")
            if not math.isfinite(value):
                raise ValueError(f"{name}: expected a finite number, got {value!r}")
        elif kind is str and not isinstance(value, str):
            raise ValueError(f"{name}: expected a string{none}, got {value!r}")


@dataclass
class TrainConfig:
    """A distillation (or plain training) run. Defaults are the authors' CIFAR-100 settings (parity mode).

    ``batch_size`` is the GLOBAL batch: under ``torchrun`` with N processes each takes ``batch_size / N``.
    Each field's ``metadata`` holds its ``group``, ``help`` and, where it has them, its ``choices``:
    ``mtkd-fast train --help`` and the validator are generated from them.
    """

    # models and data
    student: str = _option(
        "resnet8", group="model", metavar="MODEL",
        help="the student's model name (all names: mtkd-fast train-teacher --model list)")
    teachers: list[str] = _option(
        group="teachers", factory=list, metavar="MODEL",
        help="the teachers' model names, at least 2 (may be left out with --teacher-cache)")
    teacher_checkpoints: list[str] = _option(
        group="teachers", factory=list, metavar="FILE",
        help='one {"model": state_dict} file per teacher, in --teachers order (train-teacher writes them); '
             "without them the teachers are randomly initialised (a warning says so)")
    teacher_cache: Optional[str] = _option(
        None, group="teachers", metavar="DIR",
        help="a teacher-output cache (mtkd-fast cache build) to read the teachers' outputs from instead of "
             "running them; fields it left out are computed live")
    dataset: str = _option(
        "bundled", group="data", choices=DATASETS,
        help="bundled: the Fashion-MNIST subset shipped with the package (10 classes, 3x32x32); fashion_mnist: the "
             "full set (60000/10000) from --data-root's IDX files or Debian's dataset-fashion-mnist; cifar100: "
             "--data-root is the cifar-100-python folder; imagefolder: --data-root holds train/ and val/ class "
             "folders (ImageNet layout)")
    data_root: Optional[str] = _option(
        None, group="data", metavar="DIR",
        help="the dataset's folder (cifar100, imagefolder; for bundled: Fashion-MNIST IDX files to use instead of "
             "the shipped subset)")
    val_split: str = _option(
        "test", group="data", metavar="SPLIT",
        help="the split evaluated after each epoch: test or val (both the evaluation split), or train")
    limit_per_class: Optional[int] = _option(
        None, group="data",
        help="keep the first N samples of each class, in training and evaluation (every dataset; image folders: "
             "sorted file names): quick runs")
    num_workers: int = _option(
        0, group="data",
        help="loader worker processes for in-memory data on the CPU and for image folders without DALI; DALI's "
             "threads (0: DALI's default)")
    data_backend: str = _option(
        "auto", group="data", choices=DATA_BACKENDS,
        help="image folders only: auto (DALI when it is installed and decodes on the device, else torchvision), "
             "dali or torchvision")
    # method
    strategy: str = _option(
        "mtkd_rl", group="method", choices=STRATEGIES,
        help="teacher weighting: mtkd_rl (the agent), the baselines aver, ebkd, camkd, aekd, or none (plain "
             "cross-entropy, no teachers)")
    aekd_nu: Optional[float] = _option(
        None, group="method",
        help="strategy aekd: the nu-SVM parameter in (0, 1], bounding each teacher's weight by 1 / (nu M); "
             "none: 1 / (0.6 M), the CA-MKD code's default")
    aekd_solver: str = _option(
        "exact", group="method", choices=AEKD_SOLVERS,
        help="strategy aekd: exact (the true min-norm weights) or libsvm (scikit-learn's OneClassSVM as the CA-MKD "
             "code runs it, which stops at its starting point when the gradients are tiny; needs "
             "mtkd_fast[baselines])")
    camkd_weight_grad: bool = _option(
        False, group="method",
        help="strategy camkd: let the gradient flow through the feature weights into the student, as the CA-MKD "
             "code does (default: the weights are detached)")
    temperature: float = _option(4.0, group="method", help="the KD temperature T of the logit KL (and feature_kd kl)")
    alpha: float = _option(1.0, group="method", help="weight of the logit KD term")
    beta: float = _option(5.0, group="method", help="weight of the feature KD term (0: the logit terms only)")
    feature_kd: str = _option(
        "mse", group="method", choices=FEATURE_KD,
        help="the feature term: mse (the paper's, parity) or kl (the authors' code's per-channel spatial-softmax "
             "KL at T)")
    warmup_weights: str = _option(
        "ones", group="method", choices=WARMUP_WEIGHTS,
        help="mtkd_rl's teacher weights in epoch 0, the warm-up: ones (every weight 1, parity) or uniform (1/M)")
    dynamic: bool = _option(
        False, group="agent",
        help="the dynamic variant: mix the agent's heads and the two priors (teacher confidence, teacher-student "
             "gap) with learnable proportions instead of their plain average")
    agent_step: int = _option(
        1000, group="agent",
        help="update the agent after every N batches (and at each epoch's end), over the batches stored since")
    agent_lr: float = _option(0.1, group="agent", help="the agent's learning rate (plain SGD)")
    agent_update: str = _option(
        "bce", group="agent", choices=AGENT_UPDATES,
        help="bce: the authors' reward-weighted binary cross-entropy (parity); policy_gradient: REINFORCE on a "
             "Dirichlet policy around the weights (the paper's description)")
    agent_buffer_dtype: str = _option(
        "float32", group="agent", choices=BUFFER_DTYPES,
        help="storage of the agent states kept until the update; bfloat16 and float16 halve its memory")
    loss_backend: str = _option(
        "auto", group="method", choices=LOSS_BACKENDS,
        help="the distillation loss: auto (the fused kernels where the extension has them), fused or "
             "reference (pure PyTorch)")
    # feature transfer resize: "independent" (each teacher resizes the student's own map) or "chained" (the
    # authors' code: each teacher resizes the previous teacher's resized map; docs/method.md section 8, item 7)
    transfer_resize: str = _option(
        "independent", group="method", choices=TRANSFER_RESIZE,
        help="how each teacher's feature transfer resizes the student's map: independent (from the student's own "
             "map) or chained (from the previous teacher's resized map, as the authors' code does)")
    # optimisation
    epochs: int = _option(240, group="optimisation", help="training epochs")
    batch_size: int = _option(
        64, group="optimisation", help="the global batch (under torchrun split evenly over the processes)")
    optimizer: str = _option("sgd", group="optimisation", choices=OPTIMIZERS, help="the student's optimiser")
    lr: float = _option(0.05, group="optimisation", help="the student's initial learning rate")
    momentum: float = _option(0.9, group="optimisation", help="SGD momentum (adamw: unused)")
    nesterov: bool = _option(True, group="optimisation", help="Nesterov momentum (SGD with momentum > 0 only)")
    weight_decay: float = _option(1e-4, group="optimisation", help="weight decay of the student (and transfer)")
    schedule: str = _option(
        "multistep", group="optimisation", choices=SCHEDULES,
        help="the learning-rate schedule: multistep (x lr_decay at each milestone), cosine (to 0 over the "
             "epochs) or constant")
    milestones: list[int] = _option(
        group="optimisation", factory=lambda: [150, 180, 210],
        help="epochs at which multistep multiplies the learning rate by lr_decay")
    lr_decay: float = _option(0.1, group="optimisation", help="multistep's factor at each milestone")
    seed: int = _option(
        0, group="optimisation", help="seeds the initialisation, the data order and the augmentation")
    data_seed: Optional[int] = _option(
        None, group="optimisation",
        help="seeds the training images' augmentation instead of seed (none: seed); a teacher cache holds the "
             "views of one augmentation seed, so runs of several seeds over one cache share it")
    max_steps_per_epoch: Optional[int] = _option(
        None, group="optimisation", help="cut every epoch short after N steps (smoke tests, demos)")
    # speed
    device: str = _option(
        "auto", group="model", metavar="DEVICE",
        help="where to train: auto (CUDA when available, else the CPU), cpu, cuda or cuda:N; under torchrun "
             "auto and cuda take the local rank's GPU")
    amp: Optional[str] = _option(
        None, group="model", choices=AMP,
        help="autocast of the student's forward (the loss is computed in float32; fp16 adds a gradient "
             "scaler); none: float32")
    channels_last: bool = _option(
        False, group="model",
        help="the student, its feature transfer and the images in channels_last (NHWC) memory format (the live "
             "teachers choose their own: channels_last, except float32 teachers with --no-fold-bn, which run "
             "exactly as given)")
    compile: bool = _option(False, group="model", help="torch.compile the student with its feature transfer")
    teacher_precision: str = _option(
        "auto", group="teachers", choices=PRECISIONS,
        help="the live teachers' compute precision; auto: bf16 where the device computes it fast, but fp32 for "
             "strategy mtkd_rl (a paired study: docs/training.md, Teacher precision); a cache built with auto is "
             "fp32, which every strategy's auto accepts; a cache of another precision is refused; fp16 on CUDA "
             "only")
    teacher_compile: bool = _option(False, group="teachers", help="torch.compile the live teachers")
    fold_bn: bool = _option(
        True, group="teachers",
        help="fold the live teachers' BatchNorm into their convolutions (exact up to rounding)")
    # output
    out_dir: str = _option(
        "runs/mtkd", group="output", metavar="DIR",
        help="the run directory: checkpoints, student weights, metrics.csv, plots, config.json")
    resume: bool = _option(False, group="output", help="continue the run in out_dir from its checkpoint_last.pt")
    overwrite: bool = _option(
        False, group="output", help="replace a run already in out_dir (without it or resume, such an out_dir "
                                    "is refused)")
    trust_checkpoint: bool = _option(
        False, group="output",
        help="allow full unpickling of legacy checkpoint files (teacher checkpoints, the resumed checkpoint) "
             "that hold Python objects besides tensors: it can run code, so only for files you trust")
    log_every: int = _option(50, group="output", help="refresh the progress bar's loss every N steps")
    progress: bool = _option(True, group="output", help="show a progress bar per epoch")
    tensorboard: bool = _option(False, group="output", help="also write TensorBoard logs to out_dir/tensorboard")
    eval_every: int = _option(
        1, group="output", help="evaluate every N epochs (and always after the last)")

    def __post_init__(self):
        self.validate()

    def validate(self) -> "TrainConfig":
        _check_types(self)

        def one_of(name, allowed):
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"{name}: expected one of {list(allowed)}, got {value!r}")

        for f in dataclasses.fields(self):
            if "choices" in f.metadata:
                one_of(f.name, f.metadata["choices"])
        for name in ("epochs", "batch_size", "agent_step", "log_every", "eval_every"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name}: expected a positive integer, got {getattr(self, name)!r}")
        check_temperature(self.temperature)
        check_device_name(self.device)
        if self.resume and self.overwrite:
            raise ValueError("resume, overwrite: give one (--resume continues the run in out_dir, --overwrite "
                             "deletes it and starts again)")
        for name in ("limit_per_class", "max_steps_per_epoch"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name}: expected a positive integer (or none), got {getattr(self, name)!r}")
        if self.num_workers < 0:
            raise ValueError(f"num_workers: expected a non-negative integer, got {self.num_workers}")
        for name in ("lr", "agent_lr"):
            if not 0 < getattr(self, name) <= MAX_LR:
                raise ValueError(f"{name}: expected a number in (0, {MAX_LR:g}], got {getattr(self, name)}")
        # lr_decay multiplies the learning rate at each milestone: 0 or less would stop or invert training, and
        # more than 1 grows it (--milestones 1 --lr-decay 1e6 overflows the weights)
        if not 0 < self.lr_decay <= 1:
            raise ValueError(f"lr_decay: expected a number in (0, 1], got {self.lr_decay}")
        if any(m < 0 for m in self.milestones):  # epoch numbers (MultiStepLR counts a repeated one twice)
            raise ValueError(f"milestones: expected non-negative epoch numbers, got {list(self.milestones)}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum: expected a number in [0, 1), got {self.momentum}")
        check_strategy_options(self)
        if self.weight_decay < 0 or self.alpha < 0 or self.beta < 0:
            raise ValueError("weight_decay, alpha, beta: expected non-negative numbers, got "
                             f"{self.weight_decay}, {self.alpha}, {self.beta}")
        if self.teacher_checkpoints and len(self.teacher_checkpoints) != len(self.teachers):
            raise ValueError(
                f"teacher_checkpoints: expected one checkpoint per teacher ({len(self.teachers)}), "
                f"got {len(self.teacher_checkpoints)}"
            )
        if self.strategy != "none" and not self.teachers and not self.teacher_cache:
            raise ValueError(f"teachers: strategy {self.strategy!r} needs at least 2 teachers (or a teacher_cache)")
        if self.teachers and len(self.teachers) < 2 and self.strategy != "none":
            raise ValueError("teachers: expected at least 2 teachers for multi-teacher distillation, "
                             f"got {self.teachers}")
        return self

    # ---- serialisation ----
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        check_keys(values)
        return cls(**values)

    @classmethod
    def load(cls, path: str, **overrides) -> "TrainConfig":
        """Read a JSON or YAML config file (:func:`read_config`); ``overrides`` win over the file."""
        return cls.from_dict({**read_config(path), **overrides})

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)


# the key a train-teacher config names its model with (`mtkd-fast train-teacher --model`); every other key is a
# TrainConfig field
TEACHER_MODEL_KEY = "model"


def check_keys(values: dict, extra: tuple = ()) -> None:
    """Refuse a config mapping with a key that is not a TrainConfig field (nor one of ``extra``), naming it."""
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - known - set(extra))
    if unknown:
        # a teacher config run by `train` would otherwise only hear that "model" is unknown
        hint = (f"; {TEACHER_MODEL_KEY!r} names the model of a teacher config: run it with mtkd-fast train-teacher "
                "--config" if TEACHER_MODEL_KEY in unknown and not extra else "")
        raise ValueError(f"config: unknown option(s) {unknown}{hint}; valid options are {sorted(known | set(extra))}")


def read_config(path: str, extra: tuple = ()) -> dict[str, Any]:
    """The options of a JSON (``.json`` or any other name) or YAML (``.yaml``, ``.yml``) config file, every key
    checked (:func:`check_keys`); the types and ranges are checked when a TrainConfig is built from them."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config: no such file {path!r}")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as exc:
        raise ValueError(f"config: {path!r} is not a text file ({exc.reason} at byte {exc.start})") from exc
    if path.endswith((".yaml", ".yml")):
        import yaml  # a dependency (setup.py): the configs/ of the paper's runs are YAML

        try:
            values = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:  # a syntax error, several documents, a !!python tag safe_load refuses
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            what = getattr(exc, "problem", None) or str(exc)
            raise ValueError(f"config: {path!r} is not a valid YAML config{where} ({' '.join(what.split())})") \
                from exc
    else:
        try:
            values = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"config: {path!r} is not valid JSON ({exc})") from exc
    if not isinstance(values, dict):
        raise ValueError(f"config: expected a mapping of options in {path!r}, got {type(values).__name__}")
    check_keys(values, extra)
    return values


# The authors' teacher pretraining (docs/method.md section 7): SGD lr 0.05 (0.01 for MobileNetV2/ShuffleNet), weight
# decay 5e-4, the student's schedule, plain cross-entropy.
SMALL_LR_TEACHERS = ("MobileNetV2", "MobileNetV2_0_5", "ShuffleV1", "ShuffleV2")
TEACHER_LR, SMALL_TEACHER_LR = 0.05, 0.01
# what teacher_config changes from TrainConfig's defaults besides lr and out_dir (train-teacher --help shows them)
TEACHER_DEFAULTS = {"strategy": "none", "weight_decay": 5e-4}


def teacher_out_dir(model: str) -> str:
    return f"runs/teacher_{model}"


def teacher_config(model: str, **overrides) -> TrainConfig:
    """A :class:`TrainConfig` for pretraining ``model`` as a teacher with the authors' settings."""
    values = dict(TEACHER_DEFAULTS, student=model, out_dir=teacher_out_dir(model),
                  lr=SMALL_TEACHER_LR if model in SMALL_LR_TEACHERS else TEACHER_LR)
    values.update(overrides)
    return TrainConfig(**values)
