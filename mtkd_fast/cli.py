"""The ``mtkd-fast`` command line. Each verb lives in its own module under ``mtkd_fast/commands/``, which
defines ``register(subparsers)``; this file only discovers them, so adding a verb touches one new file.

A user's mistake is reported in one line, without a traceback: exit status 2 for usage (a bad option, a missing
file, a value out of range), 1 for a file or directory that cannot be used as it is (corrupt, locked, disk full),
130 for Ctrl-C. ``--debug`` (or ``MTKD_FAST_DEBUG=1``) shows the traceback instead.

A verb's result (JSON, a table, a report) goes to stdout and everything else (logs, progress, errors) to stderr
(``commands/_output.py``), so ``mtkd-fast train ... | jq`` works.
"""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import shlex
import sys

from . import __version__, commands
from ._validation import DataError
from .commands._output import route

DEBUG_ENV = "MTKD_FAST_DEBUG"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mtkd-fast",
                                     description="Fast multi-teacher knowledge distillation (MTKD-RL).")
    parser.add_argument("--debug", action="store_true",
                        help=f"show the full traceback of an error (or set {DEBUG_ENV}=1)")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}",
                        help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda i: i.name):
        module = importlib.import_module(f"{commands.__name__}.{info.name}")
        if hasattr(module, "register"):
            module.register(sub)
    _add_debug_flag(parser)
    return parser


def _add_debug_flag(parser: argparse.ArgumentParser) -> None:
    """``--debug`` after any verb too (``mtkd-fast train ... --debug``)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in set(action.choices.values()):
                if "--debug" not in child._option_string_actions:
                    child.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                                       help=f"show the full traceback of an error (or set {DEBUG_ENV}=1)")
                _add_debug_flag(child)


def _resume_hint(argv: list[str], args) -> str:
    """What to run to continue after an interruption."""
    if args.command in ("train", "train-teacher"):
        # the verb records its resolved out_dir; without a checkpoint there, --resume would only be refused
        out_dir = getattr(args, "resolved_out_dir", None)
        if out_dir is None or not os.path.isfile(os.path.join(out_dir, "checkpoint_last.pt")):
            return ("; no checkpoint was saved yet, so there is nothing to resume: run the same command again: "
                    "mtkd-fast " + " ".join(shlex.quote(a) for a in argv))
        again = [a for a in argv if a not in ("--resume", "--overwrite", "--no-resume")] + ["--resume"]
        return "; resume with: mtkd-fast " + " ".join(shlex.quote(a) for a in again)
    if args.command == "cache" and getattr(args, "cache_command", None) == "build":
        return "; run the same command again to resume the build: mtkd-fast " + " ".join(shlex.quote(a) for a in argv)
    return ""


def _one_line(exc: BaseException) -> str:
    text = str(exc)
    if isinstance(exc, OSError) and exc.strerror:  # "[Errno 28] ..." -> the message, naming the file
        text = exc.strerror if not exc.filename or str(exc.filename) in exc.strerror \
            else f"{exc.filename}: {exc.strerror}"
    return " ".join(text.split()) or type(exc).__name__


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = args.debug or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    name = f"mtkd-fast {args.command}"
    try:
        with route():  # the result on stdout, the library's logs on stderr
            return int(args.func(args) or 0)
    except BaseException as exc:
        if debug or isinstance(exc, SystemExit):
            raise
        if _interrupted(exc):
            print(f"\n{name}: interrupted{_resume_hint(argv, args)}", file=sys.stderr)
            return 130
        if isinstance(exc, DataError):  # a file or directory that cannot be used as it is
            status = 1
        elif isinstance(exc, (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError)):  # usage
            status = 2
        elif isinstance(exc, OSError):  # disk full, permissions, ...: the message names the file
            status = 1
        else:
            raise
        print(f"{name}: error: {_one_line(exc)}", file=sys.stderr)
        return status


def _interrupted(exc: BaseException) -> bool:
    """Ctrl-C, also when it struck inside a library whose clean-up then raised another error (torch.save's
    zip writer does: the KeyboardInterrupt is that error's context)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, KeyboardInterrupt):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False

if __name__ == "__main__":
    sys.exit(main())
