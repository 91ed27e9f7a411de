"""``mtkd-fast info``: the package version and what the installed extension was built with."""

from ._output import emit_json


def register(sub):
    p = sub.add_parser("info", help="show the version and what the compiled extension contains (build_info)")
    p.set_defaults(func=run)


def run(args):
    import torch

    import mtkd_fast
    from mtkd_fast.teachers import cpu_has_fast_bf16, resolve_precision
    from mtkd_fast.train.config import STRATEGIES

    info = {"version": mtkd_fast.__version__, **mtkd_fast.build_info()}
    # what --teacher-precision auto picks on this machine's devices, per strategy ("cache": cache build's)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    info["teacher_precision_auto"] = {
        d: {**{s: resolve_precision("auto", d, s) for s in STRATEGIES if s != "none"},
            "cache": resolve_precision("auto", d)} for d in devices}
    info["teacher_precision_auto"]["cpu_native_bf16"] = cpu_has_fast_bf16()
    emit_json(info)
    return 0
