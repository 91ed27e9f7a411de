"""``mtkd-fast eval``: top-1/top-5 accuracy of a model checkpoint on a dataset's evaluation split."""

from __future__ import annotations

import os

from ._output import emit_json


def register(sub):
    p = sub.add_parser("eval", help="evaluate a checkpoint (top-1/top-5 accuracy)")
    p.add_argument("--model", required=True,
                   help="model name, e.g. resnet8x4 (see `mtkd-fast train-teacher --model list`)")
    p.add_argument("--checkpoint", required=True,
                   help="{'model': state_dict} file (teacher/student weights) or a training checkpoint_*.pt")
    p.add_argument("--dataset", default="bundled", help="bundled | cifar100 | imagefolder (default bundled)")
    p.add_argument("--data-root", default=None, help="dataset folder (cifar100, imagefolder)")
    p.add_argument("--split", default="test", help="test/val (default) or train")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--limit-per-class", type=int, default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="allow a legacy checkpoint that holds Python objects besides tensors (unpickling it can run "
                        "code: only for a file you trust); by default such a file is refused")
    p.set_defaults(func=run)


def run(args):

    from mtkd_fast import data, models
    from mtkd_fast._validation import check_device_name, check_finite_weights
    from mtkd_fast.train import evaluate
    from mtkd_fast.train.checkpoint import load_checkpoint_file, load_module_state
    from mtkd_fast.train.distributed import resolve_device

    # the same rules as train's twins (--limit-per-class 0 would otherwise mean "everything")
    if args.limit_per_class is not None and args.limit_per_class < 1:
        raise ValueError(f"--limit-per-class: expected a positive integer, got {args.limit_per_class}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size: expected a positive integer, got {args.batch_size}")
    check_device_name(args.device, "--device")
    if not os.path.isfile(args.checkpoint):
        raise FileNotFoundError(f"checkpoint: no such file {args.checkpoint!r}")
    if args.data_root is not None and not os.path.exists(args.data_root):
        raise FileNotFoundError(f"data_root: no such directory {args.data_root!r}")
    state = load_checkpoint_file(args.checkpoint, trusted=args.trust_checkpoint)  # before reading any data
    device = resolve_device(args.device)
    subset = {"limit_per_class": args.limit_per_class} if args.limit_per_class is not None else {}
    ds = data.build_dataset(args.dataset, split=args.split, root=args.data_root, augment=False, **subset)
    model = models.create_model(args.model, int(ds.num_classes))
    if isinstance(state, dict) and "student" in state and "optimizer" in state:  # a training checkpoint
        load_module_state(model, state["student"], args.checkpoint, "student")
    else:
        models.load_checkpoint(model, args.checkpoint, trusted=args.trust_checkpoint)
    check_finite_weights(model, args.checkpoint)  # NaN outputs would give a meaningless top-1
    model.to(device)
    loader = data.build_loader(ds, args.batch_size, shuffle=False, device=str(device))
    result = evaluate(model, loader, device)
    emit_json({"model": args.model, "checkpoint": args.checkpoint, "dataset": args.dataset, "split": args.split,
               **result})
    return 0
