"""``train(config)`` and ``train_teacher(...)``: build models, data, teacher source, agent and Trainer from a
``TrainConfig`` and run them (under ``torchrun`` too)."""

from __future__ import annotations

import json
import os
import random
import shutil
from typing import Optional

import numpy as np
import torch
from torch import nn

from .._io import clean_temp_files, load_torch_file
from .._lock import DirLock
from .._validation import DataError, check_finite_weights
from ..agent import MTKDAgent
from ..teachers import LiveTeachers
from . import distributed as D
from .checkpoint import write_bytes_atomic
from .config import TrainConfig, teacher_config
from .strategies import get_strategy
from .trainer import CHECKPOINT_LAST, CONFIG_JSON, RUN_OUTPUTS, Trainer

__all__ = ["train", "train_teacher", "seed_everything", "checkpoint_num_classes", "build_teachers",
           "build_student_side"]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _models():
    try:
        from .. import models
    except ImportError as exc:  # the model zoo is a separate part of the package
        raise ImportError(f"mtkd_fast.models is not available ({exc}); the trainer builds its models from it") from exc
    return models


def _data():
    try:
        from .. import data
    except ImportError as exc:
        raise ImportError(f"mtkd_fast.data is not available ({exc}); "
                          "the trainer reads its datasets through it") from exc
    return data


def checkpoint_num_classes(path: str, trusted: bool = False) -> Optional[int]:
    """The class count of a classifier checkpoint ({"model": state_dict} or a bare state_dict): the output size
    of its last 2-d weight (the final linear layer)."""
    state = load_torch_file(path, trusted=trusted, what="teacher checkpoint")
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state_dict or {{'model': state_dict}}, got {type(state).__name__}")
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    last = None
    for key, value in state.items():
        if key.endswith("weight") and torch.is_tensor(value) and value.dim() == 2:
            last = int(value.shape[0])
    return last


def build_teachers(config: TrainConfig, num_classes: int, device: torch.device) -> list[nn.Module]:
    """Create the teachers and load their checkpoints, checking that every teacher has ``num_classes`` classes."""
    models = _models()
    if config.teacher_checkpoints:
        counts = {}
        for name, path in zip(config.teachers, config.teacher_checkpoints):
            if not os.path.isfile(path):
                raise FileNotFoundError(f"teacher_checkpoints: no such file {path!r} (teacher {name})")
            counts[path] = checkpoint_num_classes(path, trusted=config.trust_checkpoint)
            if counts[path] is None:  # no 2-d weight at all: not a classifier's state_dict
                raise DataError(f"teacher_checkpoints: {path} holds no classifier weights (no 2-d '*weight' "
                                f"tensor); expected {{'model': state_dict}} or a state_dict of a {name}")
        if len(set(counts.values())) > 1:
            listed = ", ".join(f"{p}: {k}" for p, k in counts.items())
            raise ValueError(f"teacher_checkpoints: the teachers have different class counts ({listed})")
        k = next(iter(counts.values()))
        if k is not None and k != num_classes:
            raise ValueError(f"teacher_checkpoints: the teachers predict {k} classes but dataset "
                             f"{config.dataset!r} has {num_classes}")
    teachers = []
    for m, name in enumerate(config.teachers):
        model = models.create_model(name, num_classes)
        if config.teacher_checkpoints:
            models.load_checkpoint(model, config.teacher_checkpoints[m], trusted=config.trust_checkpoint)
            check_finite_weights(model, f"teacher_checkpoints[{m}]: {config.teacher_checkpoints[m]}")
        teachers.append(model.to(device))
    return teachers


def _teacher_source(config: TrainConfig, teachers: list[nn.Module], device: torch.device, dataset=None):
    # the teachers' precision is their own option, independent of the student's --amp; resolved (with the
    # strategy) by mtkd_fast.teachers.resolve_precision, the policy every command shares
    live = LiveTeachers(teachers, precision=config.teacher_precision, fold_bn=config.fold_bn,
                        compile=config.teacher_compile, strategy=config.strategy) if teachers else None
    if config.teacher_cache:
        try:
            from ..cache import open_teacher_source
        except ImportError as exc:
            raise ImportError(f"teacher_cache: mtkd_fast.cache is not available ({exc})") from exc
        if not os.path.exists(config.teacher_cache):
            raise FileNotFoundError(f"teacher_cache: no such directory {config.teacher_cache!r}")
        return open_teacher_source(config.teacher_cache, teachers=live, device=device, dataset=dataset,
                                   precision=config.teacher_precision, strategy=config.strategy)
    return live


TEACHERS_JSON = "teachers.json"  # what the run's teachers ran in (config.json holds the choice, "auto" say)


def teacher_precision_record(config: TrainConfig, source) -> dict:
    """The run's metadata on its teachers' precision: the choice, and what the outputs were computed in."""
    record = {"teacher_precision": config.teacher_precision, "strategy": config.strategy}
    if isinstance(source, LiveTeachers):
        record.update(source="live", precision_used=source.precision_used, fold_bn=source.fold_bn)
    else:
        record.update(source="cache", cache=config.teacher_cache, precision_used=source.teacher_precision,
                      fold_bn=bool(source.manifest.get("fold_bn", False)))
        if source.live_teachers:  # fields the cache left out, computed live
            record.update(live_teachers=source.live_teachers, live_precision_used=source.live_precision)
    return record


def _check_model_names(config: TrainConfig) -> None:
    """Fail before any data is read when a model name is unknown (the error lists the valid names)."""
    models = _models()
    for what, name in [("student", config.student)] + [(f"teachers[{m}]", t) for m, t in enumerate(config.teachers)]:
        if not models.is_model(name):
            raise ValueError(f"{what}: unknown model {name!r}; valid names: {', '.join(models.list_models())}, "
                             "or timm:<a timm model>")


def _check_data_root(config: TrainConfig) -> None:
    if config.data_root is not None and not os.path.exists(config.data_root):
        raise FileNotFoundError(f"data_root: no such directory {config.data_root!r} (dataset {config.dataset!r})")


def _claim_out_dir(config: TrainConfig) -> Optional[DirLock]:
    """Lock ``out_dir`` against a second writer, remove temporary files a killed run left, and refuse an out_dir
    that already holds a run unless ``resume`` or ``overwrite`` (which removes the old run's outputs) is set.
    Only the main process (RANK 0) does this; returns the held lock (None on other ranks)."""
    if int(os.environ.get("RANK", "0")) != 0:
        return None
    lock = DirLock(config.out_dir, "out_dir").acquire()
    try:
        clean_temp_files(config.out_dir)
        present = [name for name in RUN_OUTPUTS if os.path.exists(os.path.join(config.out_dir, name))]
        if present == [CONFIG_JSON]:  # a run stopped before its first epoch ended: nothing to keep
            present = []
        if config.resume:
            if not os.path.isfile(os.path.join(config.out_dir, CHECKPOINT_LAST)):
                raise FileNotFoundError(f"resume: no {CHECKPOINT_LAST} in out_dir {config.out_dir!r} to resume from")
        elif present and not config.overwrite:
            raise ValueError(f"out_dir: {config.out_dir} already holds a run ({', '.join(present)}); pass --resume "
                             "to continue it, --overwrite to replace it, or choose another --out-dir")
        elif present:
            for name in present:
                os.unlink(os.path.join(config.out_dir, name))
            shutil.rmtree(os.path.join(config.out_dir, "tensorboard"), ignore_errors=True)
    except BaseException:
        lock.release()
        raise
    return lock


def build_student_side(config: TrainConfig, num_classes: int, device, image_shape,
                       teacher_map_shapes: Optional[list] = None, embedding_dims: Optional[list] = None) -> tuple:
    """``(student, feature_transfer, agent)`` for ``config``, initialised from ``config.seed`` in one fixed order
    (student, transfer, agent) whatever ran before: the one place ``train`` and the demo build them, so a run's
    saved config.json rebuilds the same modules (issue 27). ``teacher_map_shapes`` (C, H, W) per teacher: build
    the feature transfer (None: no teachers, student only); ``embedding_dims``: the agent's (a strategy that
    needs one, mtkd_rl)."""
    models = _models()
    seed_everything(config.seed)
    student = models.create_model(config.student, num_classes).to(device)
    feature_transfer = agent = None
    if teacher_map_shapes is not None:
        student.eval()
        with torch.no_grad():  # the shape of the map the transfer reads (eval: no RNG, no BatchNorm update)
            feats, _ = student(torch.zeros(1, *image_shape, device=device), is_feat=True)
        feature_transfer = models.FeatureTransfer(student_shape=tuple(feats[-2].shape[1:]),
                                                  teacher_shapes=[tuple(s) for s in teacher_map_shapes],
                                                  chained_resize=config.transfer_resize == "chained")
        if get_strategy(config.strategy).needs_agent:
            if embedding_dims is None or len(embedding_dims) != len(teacher_map_shapes):
                raise ValueError(f"embedding_dims: strategy {config.strategy} needs one embedding width per teacher")
            sizes = [int(d) + num_classes + 3 for d in embedding_dims]
            agent = MTKDAgent(sizes, len(sizes), dynamic=config.dynamic, update=config.agent_update)
    return student, feature_transfer, agent


def train(config: TrainConfig) -> dict:
    """Run ``config`` to the end (or from its last checkpoint with ``resume``). Returns the final metrics and the
    paths of the CSV, the PNG and the checkpoints (see docs/training.md for the layout).

    The out_dir is locked while the run writes to it; one that already holds a run is refused unless
    ``resume`` (continue it) or ``overwrite`` (replace it) is set."""
    config.validate()
    lock = _claim_out_dir(config)
    try:
        return _train(config)
    finally:
        if lock is not None:
            lock.release()


def _train(config: TrainConfig) -> dict:
    config.validate()
    device = D.resolve_device(config.device, int(os.environ.get("LOCAL_RANK", "0")))
    dist_info = D.init_distributed(device)
    if config.batch_size % dist_info.world_size:
        raise ValueError(f"batch_size: the global batch {config.batch_size} must divide over "
                         f"{dist_info.world_size} processes")
    local_batch = config.batch_size // dist_info.world_size
    _check_model_names(config)
    _check_data_root(config)
    kind = get_strategy(config.strategy)  # what the strategy needs (its declaration in the registry)
    if kind.needs_teacher_heads and (not config.teachers or (config.teacher_cache and not config.teacher_checkpoints)):
        raise ValueError(f"strategy: {config.strategy!r} applies each teacher's classifier to the transformed student "
                         "features, so it needs the teacher models: give teachers (and, with a teacher_cache, their "
                         "teacher_checkpoints)")
    if kind.needs_teachers and config.teachers and not config.teacher_checkpoints and dist_info.is_main:
        print("warning: no teacher_checkpoints given: the teachers keep their random initial weights", flush=True)
    data = _data()
    seed_everything(config.seed)
    subset = {"limit_per_class": config.limit_per_class} if config.limit_per_class else {}
    train_set = data.build_dataset(config.dataset, split="train", root=config.data_root, augment=True,
                                   seed=config.seed if config.data_seed is None else config.data_seed, **subset)
    val_set = data.build_dataset(config.dataset, split=config.val_split, root=config.data_root, augment=False,
                                 seed=config.seed, **subset)
    num_classes = int(train_set.num_classes)

    models = _models()
    teachers = build_teachers(config, num_classes, device) if kind.needs_teachers else []
    source = _teacher_source(config, teachers, device, train_set) if kind.needs_teachers else None
    if source is not None and dist_info.is_main:
        print(source.describe(), flush=True)

    teacher_shapes = embedding_dims = None
    if source is not None:
        # probe one small batch for the map shapes, embedding widths and class count
        train_set.set_view(0)
        items = [train_set[i] for i in range(min(2, len(train_set)))]
        images = torch.stack([torch.as_tensor(it[0]) for it in items]).to(device)
        indices = torch.tensor([int(it[2]) for it in items])
        probe = source(images, indices, 0)
        if probe.logits.shape[-1] != num_classes:
            raise ValueError(f"teachers: predict {probe.logits.shape[-1]} classes but dataset {config.dataset!r} "
                             f"has {num_classes}")
        teacher_shapes = [tuple(f.shape[1:]) for f in probe.feature_maps]
        embedding_dims = [int(e.shape[1]) for e in probe.embeddings]
        if kind.needs_state:
            for m, (e, f) in enumerate(zip(probe.embeddings, probe.feature_maps)):
                if e.shape[1] != f.shape[1]:
                    name = config.teachers[m] if m < len(config.teachers) else f"teacher {m}"
                    raise ValueError(f"teachers[{m}]: {name}'s embedding ({e.shape[1]} values) is not the pooled "
                                     f"feats[-2] ({f.shape[1]} channels), which MTKD-RL's cosine state needs")
    student, feature_transfer, agent = build_student_side(config, num_classes, device, train_set.image_shape,
                                                          teacher_shapes, embedding_dims)
    heads = [models.classifier_head(t) for t in teachers] if kind.needs_teacher_heads else None
    trainer = Trainer(config, student, source, feature_transfer, agent, device=device, dist_info=dist_info,
                      teacher_heads=heads)
    if config.resume:
        path = os.path.join(config.out_dir, CHECKPOINT_LAST)
        trainer.resume(path)
        done = trainer.start_epoch
        if done >= config.epochs and dist_info.is_main:  # not an error: a script's `--resume` after the end succeeds
            print(f"resume: {config.out_dir} is already at {done}/{config.epochs} epochs; nothing to train: pass "
                  f"--epochs M (M > {done}) to continue", flush=True)
    # config.json describes what the run trained with: a resume that trains nothing leaves it as it is
    if dist_info.is_main and trainer.start_epoch < config.epochs:
        os.makedirs(config.out_dir, exist_ok=True)
        # --resume / --overwrite say what this command did with the out_dir, not how the run trains: stored off,
        # so `train --config RUN/config.json --resume` works for a run started with --overwrite
        record = {**config.to_dict(), "resume": False, "overwrite": False}
        write_bytes_atomic(os.path.join(config.out_dir, CONFIG_JSON), json.dumps(record, indent=2).encode())
        if source is not None:
            write_bytes_atomic(os.path.join(config.out_dir, TEACHERS_JSON),
                               json.dumps(teacher_precision_record(config, source), indent=2).encode())

    def make_train_loader(epoch: int):
        train_set.set_view(trainer.view_for_epoch(epoch))
        return data.build_loader(train_set, local_batch, shuffle=True, seed=config.seed, epoch=epoch,
                                 num_workers=config.num_workers, drop_last=dist_info.enabled,
                                 rank=dist_info.rank, world_size=dist_info.world_size, device=str(device),
                                 backend=config.data_backend)

    val_loader = data.build_loader(val_set, local_batch, shuffle=False, seed=config.seed,
                                   num_workers=config.num_workers,
                                   rank=dist_info.rank, world_size=dist_info.world_size, device=str(device),
                                   backend=config.data_backend)
    try:
        result = trainer.fit(make_train_loader, val_loader, config.out_dir)
    except BaseException:
        D.cleanup(barrier=False)
        raise
    D.cleanup()
    return result


def train_teacher(model: str, **options) -> dict:
    """Pretrain ``model`` as a teacher the authors' way (plain cross-entropy; lr 0.05, 0.01 for MobileNetV2 and
    ShuffleNets; weight decay 5e-4; the student's schedule). ``options`` override any ``TrainConfig`` field.
    The weights are saved as ``{"model": state_dict}`` in ``out_dir/student_best.pth`` (best validation top-1)
    and ``student_last.pth``, the format the teacher loaders read."""
    return train(teacher_config(model, **options))


