"""``mtkd-fast info``: what the installed extension was built with."""

import json


def register(sub):
    p = sub.add_parser("info", help="show what the compiled extension contains (build_info)")
    p.set_defaults(func=run)


def run(args):
    import mtkd_fast

    print(json.dumps(mtkd_fast.build_info(), indent=2))
    return 0
