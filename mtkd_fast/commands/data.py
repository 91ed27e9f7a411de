"""``mtkd-fast data``: look at a dataset (``info``) and write one as an ImageNet-layout JPEG folder
(``export-jpeg``), so the image-folder / DALI path can be tried without ImageNet."""

from ._output import emit, emit_json


def register(sub):
    p = sub.add_parser("data", help="datasets: info, export-jpeg, check")
    verbs = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)

    info = verbs.add_parser("info", help="size, classes, image shape, augmentation recipe and fingerprint of a dataset")
    info.add_argument("--dataset", default="bundled", choices=["bundled", "cifar100", "imagefolder"])
    info.add_argument("--root", default=None, help="IDX folder (bundled), cifar-100-python folder, or image folder")
    info.add_argument("--split", default="train", choices=["train", "test", "val"])
    info.add_argument("--limit-per-class", type=int, default=None)
    info.set_defaults(func=run_info)

    export = verbs.add_parser("export-jpeg", help="write bundled/cifar100 as OUT/{train,val}/<class>/<i>.JPEG")
    export.add_argument("out", help="output folder (created)")
    export.add_argument("--dataset", default="bundled", choices=["bundled", "cifar100"])
    export.add_argument("--root", default=None, help="IDX folder (bundled) or cifar-100-python folder")
    export.add_argument("--size", default=None,
                        help="resize every image to SIZE (square) or HxW, e.g. 400 or 375x500; default: as stored")
    export.add_argument("--quality", type=int, default=90, help="JPEG quality 1-95 (default 90)")
    export.add_argument("--limit-per-class", type=int, default=None)
    export.set_defaults(func=run_export)

    check = verbs.add_parser("check", help="decode every image of an image folder and list the unreadable ones")
    check.add_argument("root", help="ImageNet-layout folder (train/ and val/)")
    check.add_argument("--split", default=None, choices=["train", "val"], help="default: both that exist")
    check.add_argument("--workers", type=int, default=0, help="decoding processes (default 0: this one)")
    check.set_defaults(func=run_check)


def _parse_size(text):
    if text is None:
        return None
    try:
        parts = [int(v) for v in str(text).lower().split("x")]
    except ValueError:
        parts = []
    if len(parts) not in (1, 2) or min(parts) < 1:
        raise ValueError(f"--size: expected N or HxW with positive ints, got {text!r}")
    return (parts[0], parts[-1])


def run_info(args):
    from mtkd_fast.data import build_dataset, dali_available

    ds = build_dataset(args.dataset, split=args.split, root=args.root, limit_per_class=args.limit_per_class)
    d = ds.describe()
    counts = [int(c) for c in __import__("torch").bincount(ds.labels, minlength=ds.num_classes)]
    d["samples_per_class"] = {"min": min(counts), "max": max(counts)} if counts else {}
    d["class_names"] = ds.class_names[:20] + (["..."] if ds.num_classes > 20 else [])
    d["dali_available"] = dali_available()
    emit_json(d)
    return 0


def run_export(args):
    from mtkd_fast.data.export import export_dataset

    if not 1 <= args.quality <= 95:
        raise ValueError(f"--quality: expected 1..95, got {args.quality}")
    counts = export_dataset(args.dataset, args.out, root=args.root, size=_parse_size(args.size),
                            quality=args.quality, limit_per_class=args.limit_per_class)
    emit(f"wrote {counts['train']} train and {counts['val']} val JPEGs under {args.out}")
    return 0


def run_check(args):
    """Exit status 1 when some image is unreadable, so scripts can test it."""
    from pathlib import Path

    from mtkd_fast.data import build_dataset
    from mtkd_fast.data.folder import find_unreadable

    splits = [args.split] if args.split else [s for s in ("train", "val") if (Path(args.root) / s).is_dir()]
    if not splits:
        raise FileNotFoundError(f"root: expected {args.root}/train or {args.root}/val")
    bad_total = 0
    for split in splits:
        ds = build_dataset("imagefolder", root=args.root, split=split, augment=False)
        bad = find_unreadable(ds, num_workers=args.workers)
        bad_total += len(bad)
        emit(f"{split}: {len(ds)} images, {len(bad)} unreadable, {ds.ignored_files} non-image files ignored")
        for path, reason in bad:
            emit(f"  {path}: {reason}")
    return 1 if bad_total else 0
