"""``mtkd-fast export``: a trained student's weights as a plain state_dict of its architecture: torchvision's for
the ImageNet zoo (e.g. a detection backbone), timm's for ``timm:<name>``, the zoo's own (``create_model``) for the
CIFAR zoo."""

from __future__ import annotations

import os

from ._output import emit


def register(sub):
    p = sub.add_parser("export", help="write a student checkpoint as a plain state_dict of its architecture "
                                      "(torchvision.models.* and mtkd_fast.models.backbone for imagenet_*, timm for "
                                      "timm:<name>, mtkd_fast.models.create_model for any other zoo model)")
    p.add_argument("--checkpoint", required=True, help="the student's weights, e.g. RUN/student_best.pth")
    p.add_argument("--arch", required=True, help="its architecture: any zoo name (`mtkd-fast train-teacher --model "
                                                 "list`; imagenet_* load into torchvision's model) or timm:<name> "
                                                 "(the file then loads into timm.create_model)")
    p.add_argument("--out", required=True, help="output file (written atomically; an existing file is refused "
                                                 "unless --overwrite, and a training checkpoint always)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file (never a training "
                                                            "checkpoint)")
    p.set_defaults(func=run)


def check_out(path: str, overwrite: bool) -> None:
    """Refuse to replace an existing file without ``overwrite``, and a run's training checkpoint (its optimiser,
    agent and RNG state: the run could no longer be resumed) even with it."""
    from .._io import load_torch_file
    from .._validation import DataError

    if os.path.isdir(path):
        raise IsADirectoryError(f"--out: {path} is a directory; give a file name")
    if not os.path.exists(path):
        return
    try:
        existing = load_torch_file(path, what="--out file")
    except DataError:
        existing = None  # not a loadable checkpoint: only --overwrite matters
    if isinstance(existing, dict) and "student" in existing and "optimizer" in existing:
        raise ValueError(f"--out: {path} is a training checkpoint; export never replaces one (choose another file)")
    if not overwrite:
        raise ValueError(f"--out: {path} already exists; pass --overwrite to replace it or choose another file")


def classifier_weight_key(arch: str) -> str:
    """The state_dict key of ``arch``'s classifier weight (its rows are the classes), read from a model built on the
    meta device (names only)."""
    import torch

    from .. import models
    from ..models import timm_models

    if timm_models.is_timm_name(arch):
        return timm_models.classifier_key(arch)  # timm names its classifier per family (ResNetV2's is a 1x1 conv)
    with torch.device("meta"):
        probe = models.create_model(arch, 2)
    weight = models.classifier_head(probe).weight
    return next(k for k, p in probe.named_parameters() if p is weight)


def export_state_dict(checkpoint: str, arch: str) -> dict:
    """The weights of ``checkpoint`` checked against ``arch`` (strictly), as the state_dict of ``arch``."""
    from .. import models
    from .._io import load_torch_file
    from ..models.loading import _extract_state_dict

    if not models.is_model(arch):
        raise ValueError(f"--arch: expected a zoo model ({', '.join(models.list_models())}) or timm:<a timm model>, "
                         f"got {arch!r}")
    if not os.path.isfile(checkpoint):
        raise FileNotFoundError(f"--checkpoint: no such file: {checkpoint}")
    obj = load_torch_file(checkpoint, what="--checkpoint",
                          hint="pass the run's student_best.pth or student_last.pth (a full training checkpoint?)")
    state = _extract_state_dict(obj, checkpoint)
    key = classifier_weight_key(arch)
    if key not in state or state[key].dim() < 2:
        raise ValueError(f"--checkpoint: {checkpoint} has no classifier weight ({key}); is it a checkpoint of {arch}?")
    model = models.create_model(arch, int(state[key].shape[0]))
    models.load_checkpoint(model, checkpoint)  # strict, errors name the file and the key
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def run(args):
    import torchvision

    from .._io import save_atomic
    from ..models import imagenet, timm_models

    check_out(args.out, args.overwrite)  # before the export's work
    state = export_state_dict(args.checkpoint, args.arch)
    save_atomic(state, args.out)
    k = int(state[classifier_weight_key(args.arch)].shape[0])
    if timm_models.is_timm_name(args.arch):
        target = f"timm.create_model({timm_models.timm_name(args.arch)!r}, num_classes={k})"
    elif args.arch.startswith("imagenet_"):
        tv_name = args.arch[len("imagenet_"):]
        target = (f"torchvision.models.{tv_name}(num_classes={k})" if hasattr(torchvision.models, tv_name)
                  else "torchvision's model of the same configuration")
    else:
        target = f"mtkd_fast.models.create_model({args.arch!r}, {k})"
    emit(f"wrote {args.out}: {len(state)} tensors, the state_dict of {target} (load with weights_only=True)")
    if args.arch in imagenet.ARCHS:
        emit(f"as a backbone: mtkd_fast.models.backbone({args.arch!r}, {args.out!r}, task='detection' | "
             f"'instance_segmentation' | 'segmentation')")
    return 0
