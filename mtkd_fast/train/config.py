"""``TrainConfig``: every knob of a training run, with the CIFAR-100 parity defaults of docs/method.md section 7."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Optional

from .._validation import check_device_name, check_int_range, check_temperature

STRATEGIES = ("none", "aver", "ebkd", "camkd", "aekd", "mtkd_rl")
SCHEDULES = ("multistep", "cosine", "constant")
OPTIMIZERS = ("sgd", "adamw")
FEATURE_KD = ("mse", "kl")
WARMUP_WEIGHTS = ("ones", "uniform")
AMP = (None, "bf16", "fp16")
AGENT_UPDATES = ("bce", "policy_gradient")
BUFFER_DTYPES = ("float32", "bfloat16", "float16")
TRANSFER_RESIZE = ("independent", "chained")
INT64_MAX = 2**63 - 1
SEED_MAX = 2**32 - 1  # numpy's seed range; torch takes it too
# the largest learning rate accepted (lr, agent_lr): beyond it one SGD step of an O(1) gradient moves a weight by
# more than any trainable network tolerates, and --lr 1e300 overflows the weights to inf in the first step
MAX_LR = 10.0
_INT_RANGES = {"seed": (0, SEED_MAX)}

# the type of each field, as a config file must give it (flags are converted by argparse)
_OPTIONAL_INT = ("limit_per_class", "max_steps_per_epoch")
_OPTIONAL_STR = ("teacher_cache", "data_root", "amp")
_LIST_OF = {"teachers": str, "teacher_checkpoints": str, "milestones": int}


def _check_types(cfg: "TrainConfig") -> None:
    """Every field of the type its default has: a config file's ``{"lr": "0.1"}`` gets the same one-line
    error as a bad flag (``lr: expected a number, got '0.1'``), not a TypeError deep in the trainer."""
    for f in dataclasses.fields(cfg):
        name = f.name
        value = getattr(cfg, name)
        if name in _LIST_OF:
            kind = _LIST_OF[name]
            if not isinstance(value, (list, tuple)) or not all(
                    isinstance(v, kind) and not isinstance(v, bool) for v in value):
                what = "strings" if kind is str else "integers"
                raise ValueError(f"{name}: expected a list of {what}, got {value!r}")
            if kind is int:
                for v in value:
                    check_int_range(name, v, -INT64_MAX - 1, INT64_MAX)
            setattr(cfg, name, list(value))
            continue
        if name in _OPTIONAL_INT:
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
                raise ValueError(f"{name}: expected an integer (or none), got {value!r}")
            if value is not None:
                check_int_range(name, value, -INT64_MAX - 1, INT64_MAX)
            continue
        if name in _OPTIONAL_STR:
            if value is not None and not isinstance(value, str):
                raise ValueError(f"{name}: expected a string (or none), got {value!r}")
            continue
        default = f.default
        if isinstance(default, bool):
            if not isinstance(value, bool):
                raise ValueError(f"{name}: expected true or false, got {value!r}")
        elif isinstance(default, int):
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"{name}: expected an integer, got {value!r}")
            # torch and numpy take 64-bit integers; the seed numpy's 32 bits
            check_int_range(name, value, *_INT_RANGES.get(name, (-INT64_MAX - 1, INT64_MAX)))
        elif isinstance(default, float):
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise ValueError(f"{name}: expected a number, got {value!r}")
            if not math.isfinite(value):
                raise ValueError(f"{name}: expected a finite number, got {value!r}")
        elif isinstance(default, str) and not isinstance(value, str):
            raise ValueError(f"{name}: expected a string, got {value!r}")



@dataclass
class TrainConfig:
    """A distillation (or plain training) run. Defaults are the authors' CIFAR-100 settings (parity mode).

    ``batch_size`` is the GLOBAL batch: under ``torchrun`` with N processes each takes ``batch_size / N``.
    """

    # models and data
    student: str = "resnet8"
    teachers: list = field(default_factory=list)  # model names, one per teacher
    teacher_checkpoints: list = field(default_factory=list)  # {"model": state_dict} files, one per teacher
    teacher_cache: Optional[str] = None  # a mtkd_fast.cache directory to read teacher outputs from
    dataset: str = "bundled"  # "bundled" | "cifar100" | "imagefolder"
    data_root: Optional[str] = None
    val_split: str = "test"
    limit_per_class: Optional[int] = None  # keep the first N samples per class (bundled, cifar100): quick runs
    num_workers: int = 0
    data_backend: str = "auto"  # image folders: auto (DALI when it runs on the device) | dali | torchvision
    # method
    strategy: str = "mtkd_rl"  # teacher weighting: none | aver | ebkd | camkd | mtkd_rl
    # strategy "aekd" is valid too; its nu-SVM parameter: None gives 1 / (0.6 M), the CA-MKD code's default
    aekd_nu: Optional[float] = None
    temperature: float = 4.0
    alpha: float = 1.0
    beta: float = 5.0
    feature_kd: str = "mse"  # "mse" (parity) or "kl" (per-channel spatial softmax KL at T)
    warmup_weights: str = "ones"  # epoch-0 weights of mtkd_rl: "ones" (parity) or "uniform" (1/M)
    dynamic: bool = False
    agent_step: int = 1000
    agent_lr: float = 0.1
    agent_update: str = "bce"  # "bce" (parity) or "policy_gradient"
    agent_buffer_dtype: str = "float32"  # the replay buffer's state storage; bfloat16/float16 halve it
    loss_backend: str = "auto"  # MTKDLoss backend: auto | fused | reference
    # feature transfer resize: "independent" (each teacher resizes the student's own map) or "chained" (the
    # authors' code: each teacher resizes the previous teacher's resized map; docs/method.md section 8, item 7)
    transfer_resize: str = "independent"
    # optimisation
    epochs: int = 240
    batch_size: int = 64
    optimizer: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 1e-4
    schedule: str = "multistep"
    milestones: list = field(default_factory=lambda: [150, 180, 210])
    lr_decay: float = 0.1
    seed: int = 0
    max_steps_per_epoch: Optional[int] = None  # cut epochs short (smoke tests, demos)
    # speed
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: Optional[str] = None  # None | "bf16" | "fp16"
    channels_last: bool = False
    compile: bool = False
    # live teachers' compute precision: auto | fp32 | bf16 | fp16 (docs/training.md "Teacher precision")
    teacher_precision: str = "auto"
    teacher_compile: bool = False  # torch.compile the live teachers
    fold_bn: bool = True  # fold the live teachers' BatchNorm into their convolutions (exact up to rounding)
    # output
    out_dir: str = "runs/mtkd"
    resume: bool = False  # continue from out_dir/checkpoint_last.pt
    overwrite: bool = False  # replace a run already in out_dir (without it or resume, such an out_dir is refused)
    trust_checkpoint: bool = False  # allow full unpickling of trusted legacy checkpoint files (may run code)
    log_every: int = 50
    progress: bool = True
    tensorboard: bool = False
    eval_every: int = 1

    def __post_init__(self):
        self.validate()

    def validate(self) -> "TrainConfig":
        _check_types(self)

        def one_of(name, allowed):
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"{name}: expected one of {list(allowed)}, got {value!r}")

        one_of("strategy", STRATEGIES)
        one_of("schedule", SCHEDULES)
        one_of("optimizer", OPTIMIZERS)
        one_of("feature_kd", FEATURE_KD)
        one_of("warmup_weights", WARMUP_WEIGHTS)
        one_of("transfer_resize", TRANSFER_RESIZE)
        one_of("amp", AMP)
        one_of("agent_update", AGENT_UPDATES)
        one_of("agent_buffer_dtype", BUFFER_DTYPES)
        one_of("loss_backend", ("auto", "fused", "reference"))
        one_of("data_backend", ("auto", "dali", "torchvision"))
        one_of("teacher_precision", ("auto", "fp32", "bf16", "fp16"))
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
        if self.aekd_nu is not None and not 0 < self.aekd_nu <= 1:
            raise ValueError(f"aekd_nu: expected a number in (0, 1] or None, got {self.aekd_nu}")
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
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"config: unknown option(s) {unknown}; valid options are {sorted(known)}")
        return cls(**values)

    @classmethod
    def load(cls, path: str, **overrides) -> "TrainConfig":
        """Read a JSON (or, with pyyaml installed, YAML) config file; ``overrides`` win over the file."""
        if not os.path.isfile(path):
            raise FileNotFoundError(f"config: no such file {path!r}")
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except UnicodeDecodeError as exc:
            raise ValueError(f"config: {path!r} is not a text file ({exc.reason} at byte {exc.start})") from exc
        if path.endswith((".yaml", ".yml")):
            try:
                import yaml
            except ImportError as exc:  # pragma: no cover - depends on the environment
                raise ValueError(f"config: {path!r} is YAML but pyyaml is not installed; use JSON") from exc
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
        values.update(overrides)
        return cls.from_dict(values)

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)


# The authors' teacher pretraining (docs/method.md section 7): SGD lr 0.05 (0.01 for MobileNetV2/ShuffleNet), weight
# decay
# 5e-4, the student's schedule, plain cross-entropy.
SMALL_LR_TEACHERS = ("MobileNetV2", "MobileNetV2_0_5", "ShuffleV1", "ShuffleV2")


def teacher_config(model: str, **overrides) -> TrainConfig:
    """A :class:`TrainConfig` for pretraining ``model`` as a teacher with the authors' settings."""
    values = dict(student=model, strategy="none", weight_decay=5e-4, out_dir=f"runs/teacher_{model}",
                  lr=0.01 if model in SMALL_LR_TEACHERS else 0.05)
    values.update(overrides)
    return TrainConfig(**values)
