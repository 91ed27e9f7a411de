"""Where a verb's output goes: its result (the JSON of ``train``, ``eval``, ``info``; the table of ``bench``; the
report of ``cache info``) to stdout, everything else the library prints while the verb runs (per-epoch lines,
resume notes, warnings, progress) to stderr, so ``mtkd-fast train ... | jq`` reads only the result.

``cli.main`` runs each verb inside :func:`route`; a command module writes its result with :func:`emit` or
:func:`emit_json`, never with a bare ``print`` (which lands on stderr there)."""

from __future__ import annotations

import contextlib
import json
import sys
from typing import Any, Iterator, Optional, TextIO

_result_stream: Optional[TextIO] = None  # the real stdout while a verb runs under route()


@contextlib.contextmanager
def route() -> Iterator[None]:
    """Run a verb with ``sys.stdout`` pointing at stderr; :func:`emit` keeps writing to the real stdout."""
    global _result_stream
    previous = _result_stream
    _result_stream = sys.stdout
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        _result_stream = previous


def emit(*lines: str) -> None:
    """Write the verb's result, one line each, to stdout."""
    stream = _result_stream if _result_stream is not None else sys.stdout
    for line in lines:
        print(line, file=stream, flush=True)


def emit_json(obj: Any) -> None:
    """The verb's result as indented JSON on stdout (non-JSON values as their ``str``)."""
    emit(json.dumps(obj, indent=2, default=str))
