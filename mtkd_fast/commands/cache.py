"""``mtkd-fast cache build | info | verify | size``: the teacher-output cache (``mtkd_fast.cache``)."""

from __future__ import annotations

import argparse
import json
import os

from ._output import emit


def register(sub):
    p = sub.add_parser("cache", help="teacher-output cache: build, inspect, verify, estimate its size")
    verbs = p.add_subparsers(dest="cache_command", metavar="ACTION")
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])

    b = verbs.add_parser("build", help="run every teacher once on every (training sample, view) and store the outputs "
                                       "(resumable; under torchrun the ranks split the work)")
    b.add_argument("--out", required=True, help="cache directory (created; an unfinished build there is resumed)")
    b.add_argument("--dataset", default="bundled",
                   help="bundled | cifar100 | imagefolder, as in `mtkd-fast train` (default: bundled)")
    b.add_argument("--data-root", default=None, metavar="DIR",
                   help="the dataset's folder (cifar100, imagefolder; bundled: Fashion-MNIST IDX files instead of "
                        "the shipped subset)")
    b.add_argument("--seed", type=int, default=0,
                   help="augmentation seed: view v of sample i depends on (seed, v, i); the training run's --seed "
                        "must match (default 0)")
    b.add_argument("--limit-per-class", type=int, default=None,
                   help="use the first N training samples of each class (the training run's --limit-per-class "
                        "must match; default: all)")
    b.add_argument("--teachers", nargs="+", required=True, metavar="ARCH", help="teacher model names (required)")
    b.add_argument("--checkpoints", nargs="+", default=None, metavar="FILE",
                   help='one {"model": state_dict} file per teacher, in --teachers order')
    b.add_argument("--random-teachers", action="store_true",
                   help="build from randomly initialised teachers (benchmarks only); without it --checkpoints is "
                        "required")
    b.add_argument("--trust-checkpoint", action="store_true",
                   help="allow legacy teacher checkpoints that hold Python objects besides tensors (unpickling can "
                        "run code: only for files you trust)")
    b.add_argument("--views", type=int, default=1, help="V, augmentation views per sample (default 1)")
    b.add_argument("--view-schedule", default="cyclic", choices=["cyclic", "shuffled"],
                   help="which view epoch e replays: cyclic (view e mod V) or shuffled (a seeded permutation of the "
                        "V views in each cycle of V epochs) (default cyclic)")
    b.add_argument("--schedule-seed", type=int, default=0, help="the seed of --view-schedule shuffled (default 0)")
    b.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"],
                   help="encoding of logits and embeddings (default float16)")
    b.add_argument("--feature-dtype", default=None, choices=["float16", "bfloat16", "float32", "int8"],
                   help="encoding of feature maps (default: --dtype; int8 has per-(sample, channel) scales)")
    b.add_argument("--topk", type=int, default=None,
                   help="store only the k largest logits (+ indices, tail mass) (default: all logits)")
    b.add_argument("--topk-temperature", type=float, default=4.0,
                   help="T of the stored tail mass (use the KD T; default 4)")
    b.add_argument("--fields", nargs="+", default=["logits", "embeddings", "feature_maps"],
                   choices=["logits", "embeddings", "feature_maps"],
                   help="what to store (logits always are); fields left out are computed live in training "
                        "(default all three)")
    b.add_argument("--budget", default=None, help="storage budget, e.g. 200G: fields that do not fit are left out "
                                                  "(feature maps first) and computed live in training")
    b.add_argument("--chunk-size", type=int, default=1024,
                   help="samples per unit of work, checksum and resume (default 1024)")
    b.add_argument("--batch-size", type=int, default=256,
                   help="images per teacher forward; does not change the content (default 256)")
    b.add_argument("--workers", type=int, default=0,
                   help="data loading worker processes; does not change the content (default 0)")
    b.add_argument("--device", default="auto",
                   help="auto | cpu | cuda | cuda:N (auto: CUDA when available, under torchrun the local rank's "
                        "GPU)")
    b.add_argument("--teacher-precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="the teachers' compute precision, recorded in the manifest (default auto: the precision "
                        "every strategy's auto accepts: fp32 while a strategy keeps fp32 teachers, as MTKD-RL does, "
                        "else bf16 where the device computes it fast); a training run asking another precision "
                        "explicitly refuses the cache")
    b.add_argument("--teacher-compile", action=argparse.BooleanOptionalAction, default=False,
                   help="torch.compile the teachers (default off)")
    b.add_argument("--fold-bn", action=argparse.BooleanOptionalAction, default=True,
                   help="fold the teachers' BatchNorm into their convolutions (default on)")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    b.set_defaults(func=run_build)

    i = verbs.add_parser("info", help="what a cache was made from and what it holds")
    i.add_argument("path", help="the cache directory")
    i.add_argument("--json", action="store_true", help="print the manifest without the checksums, as JSON")
    i.set_defaults(func=run_info)

    v = verbs.add_parser("verify", help="check every array's size and every chunk's checksum (exit 1 if damaged)")
    v.add_argument("path", help="the cache directory")
    v.add_argument("--no-progress", action="store_true", help="no progress bar")
    v.set_defaults(func=run_verify)

    s = verbs.add_parser("size", help="storage a cache would take, from the real models' output shapes")
    s.add_argument("--teachers", nargs="+", required=True, metavar="ARCH", help="teacher model names")
    s.add_argument("--num-classes", type=int, required=True, help="the dataset's number of classes")
    s.add_argument("--image-size", type=int, required=True, help="the (square) training image size")
    s.add_argument("--samples", type=int, required=True, help="training samples to cache")
    s.add_argument("--views", type=int, default=1, help="V, augmentation views per sample (default 1)")
    s.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"],
                   help="encoding of logits and embeddings (default float16)")
    s.add_argument("--feature-dtype", default=None, choices=["float16", "bfloat16", "float32", "int8"],
                   help="encoding of feature maps (default: --dtype)")
    s.add_argument("--topk", type=int, default=None, help="store only the k largest logits (default: all)")
    s.add_argument("--fields", nargs="+", default=["logits", "embeddings", "feature_maps"],
                   choices=["logits", "embeddings", "feature_maps"], help="what to store (default all three)")
    s.set_defaults(func=run_size)


def _positive(option: str, value, allow_none: bool = False, lo: int = 1):
    """An integer option >= ``lo`` (the same rule as its train twin), named as the user typed it."""
    if value is None and allow_none:
        return value
    if value is None or value < lo:
        raise ValueError(f"{option}: expected an integer >= {lo}, got {value}")
    return value


def _device(name: str):
    import torch

    from mtkd_fast._validation import check_device_name

    check_device_name(name, "--device")
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cpu")
    return torch.device(name)


def run_build(args):
    import torch
    import torch.distributed as dist

    from mtkd_fast import models
    from mtkd_fast.cache import build_cache
    from mtkd_fast.cache.storage import format_bytes, parse_bytes
    from mtkd_fast.data import build_dataset

    if args.checkpoints is None and not args.random_teachers:
        raise ValueError("--checkpoints: no teacher checkpoints given; a cache of randomly initialised teachers is "
                         "only useful for benchmarks: pass --random-teachers to build one")
    if args.checkpoints is not None and len(args.checkpoints) != len(args.teachers):
        raise ValueError(f"--checkpoints: expected {len(args.teachers)} files (one per teacher), "
                         f"got {len(args.checkpoints)}")
    for path in args.checkpoints or []:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--checkpoints: no such file {path!r}")
    from mtkd_fast._validation import check_finite_weights, check_int_range, check_temperature
    from mtkd_fast.train.config import SEED_MAX

    check_int_range("--seed", args.seed, 0, SEED_MAX)
    check_int_range("--schedule-seed", args.schedule_seed, 0, SEED_MAX)
    _positive("--limit-per-class", args.limit_per_class, allow_none=True)
    for option, value in (("--views", args.views), ("--chunk-size", args.chunk_size),
                          ("--batch-size", args.batch_size)):
        _positive(option, value)
    _positive("--workers", args.workers, lo=0)
    _positive("--topk", args.topk, allow_none=True)
    check_temperature(args.topk_temperature, "--topk-temperature")
    device = _device(args.device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    started_dist = False
    if world > 1 and not dist.is_initialized():  # under torchrun
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        started_dist = True
    try:
        ds = build_dataset(args.dataset, split="train", root=args.data_root, augment=True, seed=args.seed,
                           limit_per_class=args.limit_per_class)
        teachers = []
        for m, name in enumerate(args.teachers):
            model = models.create_model(name, int(ds.num_classes))
            if args.checkpoints:
                models.load_checkpoint(model, args.checkpoints[m], trusted=args.trust_checkpoint)
                check_finite_weights(model, f"--checkpoints: {args.checkpoints[m]}")
            teachers.append(model)
        manifest = build_cache(
            args.out, ds, teachers, views=args.views, teacher_names=args.teachers, checkpoints=args.checkpoints,
            dtype=args.dtype, feature_dtype=args.feature_dtype, topk=args.topk,
            topk_temperature=args.topk_temperature, fields=args.fields,
            budget_bytes=parse_bytes(args.budget) if args.budget else None, chunk_size=args.chunk_size,
            batch_size=args.batch_size, num_workers=args.workers, device=device, view_schedule=args.view_schedule,
            schedule_seed=args.schedule_seed, progress=not args.no_progress,
            teacher_precision=args.teacher_precision, fold_bn=args.fold_bn, teacher_compile=args.teacher_compile)
    finally:
        if started_dist:
            dist.destroy_process_group()
    if manifest is not None:
        emit(f"teacher cache written to {args.out}: {manifest['views']} view(s) x "
              f"{manifest['dataset']['num_samples']} samples, {format_bytes(manifest['total_bytes'])}; teachers ran "
              f"in {manifest['teacher_precision']}")
        _print_left_out(manifest)
    return 0


def _print_left_out(manifest) -> None:
    for m, t in enumerate(manifest["teachers"]):
        left = [f for f in ("embeddings", "feature_maps") if f not in t["stored"]]
        if left:
            emit(f"  teachers[{m}] {t['arch']}: {', '.join(left)} left out (computed live in training)")


def run_info(args):
    from mtkd_fast.cache import read_manifest
    from mtkd_fast.cache.storage import format_bytes

    m = read_manifest(args.path)
    if args.json:
        emit(json.dumps({k: v for k, v in m.items() if k != "checksums"}, indent=1))
        return 0
    d = m["dataset"]
    emit(f"teacher cache {args.path}")
    emit(f"  dataset: {d['name']}, {d['num_samples']} samples, seed {d['seed']}, "
          f"fingerprint {str(d['fingerprint'])[:16]}")
    emit(f"  recipe: {json.dumps(d['recipe'])}")
    sched = m["view_schedule"]
    emit(f"  views: V={m['views']} ({sched['kind']}{'' if sched['seed'] is None else ', seed %d' % sched['seed']})")
    enc = m["encodings"]
    topk = m["topk"]
    emit(f"  encodings: logits {enc['logits']}{' top-%d (T=%g)' % (topk['k'], topk['temperature']) if topk else ''}, "
          f"embeddings {enc['embeddings']}, feature maps {enc['feature_maps']}")
    for i, t in enumerate(m["teachers"]):
        emit(f"  teachers[{i}] {t['arch']}: K={t['num_classes']} D={t['embedding_dim']} "
              f"map={'x'.join(map(str, t['feature_map_shape']))} stored={','.join(t['stored'])} "
              f"weights {t['weights_sha256'][:12]}")
    emit(f"  teachers ran in: {m.get('teacher_precision', 'fp32')}, BatchNorm "
          f"{'folded' if m.get('fold_bn') else 'unfolded'}")
    emit(f"  size: {format_bytes(m['total_bytes'])} in {len(m['arrays'])} arrays, "
          f"{m['num_chunks']} chunks of {m['chunk_size']} samples per view")
    return 0


def run_verify(args):
    from mtkd_fast.cache import verify_cache

    report = verify_cache(args.path, progress=not args.no_progress)
    if report["ok"]:
        emit(f"{args.path}: OK ({report['chunks_checked']} chunks checked)")
        return 0
    for line in report["problems"]:
        emit(line)
    emit(f"{args.path}: DAMAGED ({len(report['problems'])} problem(s)); rebuild the damaged cache")
    return 1


def run_size(args):
    import torch

    from mtkd_fast import models
    from mtkd_fast.cache.storage import format_bytes, per_sample_bytes

    _positive("--num-classes", args.num_classes, lo=2)
    for option, value in (("--image-size", args.image_size), ("--samples", args.samples), ("--views", args.views)):
        _positive(option, value)
    if args.topk is not None and not 1 <= args.topk <= args.num_classes:
        raise ValueError(f"--topk: expected an integer in [1, {args.num_classes}] (the number of classes), "
                         f"got {args.topk}")
    total = 0
    feature_dtype = args.feature_dtype or args.dtype
    for name in args.teachers:
        # shapes only: meta tensors skip initialising and running the real network (ViT-L: 300M parameters)
        with torch.device("meta"), torch.no_grad():
            model = models.create_model(name, args.num_classes).eval()
            try:
                feats, z = model(torch.zeros(1, 3, args.image_size, args.image_size), is_feat=True)
            except (ValueError, RuntimeError) as err:  # a ViT's fixed size; a map pooled or convolved below 1x1
                raise ValueError(f"--image-size: {name}: {str(err).splitlines()[0]}") from err
        K, D, shape = z.shape[1], feats[-1].shape[1], tuple(feats[-2].shape[1:])
        b = per_sample_bytes(K, D, shape, logits=args.dtype,
                             embeddings=args.dtype if "embeddings" in args.fields else None,
                             feature_maps=feature_dtype if "feature_maps" in args.fields else None, topk=args.topk)
        total += b
        emit(f"{name}: K={K} D={D} map={'x'.join(map(str, shape))}: {b} bytes per (sample, view)")
    emit(f"total: {total} bytes per (sample, view) x {args.samples} samples x {args.views} view(s) = "
          f"{format_bytes(total * args.samples * args.views)}")
    return 0
