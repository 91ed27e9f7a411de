"""``mtkd-fast selftest``: check the fused ops against the float64 reference on this machine.

Every fused op, every dtype (float32, float64, float16, bfloat16), contiguous and channels_last maps, forward
values and gradients, on small random inputs. Exit status 0 when everything matches, 1 on a mismatch.
"""

from __future__ import annotations

import argparse

from ._output import emit

DTYPES = ("float32", "float64", "float16", "bfloat16")


def register(sub):
    p = sub.add_parser("selftest", help="check the fused kernels against the reference on a device",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=None,
                   help="the device to check, e.g. cuda:0 or cpu (default: cuda when a GPU is visible, else cpu)")
    p.add_argument("--dtypes", nargs="+", choices=DTYPES, default=list(DTYPES), help="dtypes to check (default: all)")
    p.add_argument("--verbose", "-v", action="store_true", help="print every compared output, not only mismatches")
    p.set_defaults(func=run)


def run(args):
    import torch

    from mtkd_fast import selftest

    name = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ValueError(f"--device: expected a device such as cpu, cuda or cuda:N, got {name!r}") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device: {name} asked for, but no CUDA device is visible")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device: {name} does not exist ({torch.cuda.device_count()} CUDA device(s) visible)")
    report = selftest.check_device(device, [getattr(torch, d) for d in args.dtypes])
    n_cases = len(report.results) + len(report.errors)
    if args.verbose or not report.ok:
        emit(report.format(only_failures=not args.verbose))
    if report.ok:
        emit(f"selftest {report.device}: ok ({n_cases} outputs of {len(selftest.active_checks())} ops match the "
              f"reference; dtypes {', '.join(args.dtypes)})")
        return 0
    emit(f"selftest {report.device}: MISMATCH in {len(report.failures) + len(report.errors)} of {n_cases} outputs; "
          "use --backend reference (loss_backend='reference') on this device and please report it")
    return 1
