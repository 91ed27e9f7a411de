"""``mtkd-fast info``: the package version and what the installed extension was built with."""

import json


def register(sub):
    p = sub.add_parser("info", help="show the version and what the compiled extension contains (build_info)")
    p.set_defaults(func=run)


def run(args):
    import torch

    import mtkd_fast
    from mtkd_fast.teachers import cpu_has_fast_bf16, resolve_precision

    info = {"version": mtkd_fast.__version__, **mtkd_fast.build_info()}
    # what --teacher-precision auto picks on this machine's devices
    info["teacher_precision_auto"] = {"cpu": resolve_precision("auto", "cpu"), "cpu_native_bf16": cpu_has_fast_bf16()}
    if torch.cuda.is_available():
        info["teacher_precision_auto"]["cuda"] = resolve_precision("auto", "cuda")
    print(json.dumps(info, indent=2))
    return 0
