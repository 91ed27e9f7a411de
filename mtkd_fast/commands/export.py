"""``mtkd-fast export``: a trained student as a plain torchvision state_dict (e.g. a detection backbone), or a
timm student as timm's state_dict."""

from __future__ import annotations

import os

# the classifier weight of each torchvision family: its rows are the number of classes
_CLASSIFIER_KEYS = ("fc.weight", "heads.head.weight", "head.weight")


def register(sub):
    p = sub.add_parser("export", help="write a student checkpoint as a plain torchvision state_dict (for "
                                      "torchvision.models.* and mtkd_fast.models.backbone)")
    p.add_argument("--checkpoint", required=True, help="the student's weights, e.g. RUN/student_best.pth")
    p.add_argument("--arch", required=True, help="its architecture: a torchvision-based zoo name (imagenet_*) or "
                                                 "timm:<name> (the file then loads into timm.create_model)")
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


def export_state_dict(checkpoint: str, arch: str) -> dict:
    """The weights of ``checkpoint`` checked against ``arch`` (strictly), as torchvision's state_dict of it."""
    from .. import models
    from .._io import load_torch_file
    from ..models import timm_models
    from ..models.loading import _extract_state_dict

    keys = _CLASSIFIER_KEYS
    if timm_models.is_timm_name(arch) and models.is_model(arch):
        keys = (timm_models.classifier_key(arch),)  # timm names its classifier per family
    elif not (arch.startswith("imagenet_") and arch in models.list_models()):
        valid = [n for n in models.list_models() if n.startswith("imagenet_")]
        raise ValueError(f"--arch: expected a torchvision-based model ({', '.join(valid)}) or timm:<a timm model>, "
                         f"got {arch!r}")
    if not os.path.isfile(checkpoint):
        raise FileNotFoundError(f"--checkpoint: no such file: {checkpoint}")
    obj = load_torch_file(checkpoint, what="--checkpoint",
                          hint="pass the run's student_best.pth or student_last.pth (a full training checkpoint?)")
    state = _extract_state_dict(obj, checkpoint)
    key = next((k for k in keys if k in state and state[k].dim() >= 2), None)  # ResNetV2's head is a 1x1 conv
    if key is None:
        raise ValueError(f"--checkpoint: {checkpoint} has no classifier weight ({' / '.join(keys)}); "
                         f"is it a checkpoint of {arch}?")
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
    if timm_models.is_timm_name(args.arch):
        arch = timm_models.timm_name(args.arch)
        k = int(state[timm_models.classifier_key(args.arch)].shape[0])
        print(f"wrote {args.out}: {len(state)} tensors, the state_dict of timm.create_model({arch!r}, "
              f"num_classes={k}) (load with weights_only=True)")
        return 0
    tv_name = args.arch[len("imagenet_"):]
    k = next(int(state[key].shape[0]) for key in _CLASSIFIER_KEYS if key in state)
    target = (f"torchvision.models.{tv_name}(num_classes={k})" if hasattr(torchvision.models, tv_name)
              else "torchvision's model of the same configuration")
    print(f"wrote {args.out}: {len(state)} tensors, the state_dict of {target} (load with weights_only=True)")
    if args.arch in imagenet.ARCHS:
        print(f"as a backbone: mtkd_fast.models.backbone({args.arch!r}, {args.out!r}, task='detection' | "
              f"'instance_segmentation' | 'segmentation')")
    return 0
