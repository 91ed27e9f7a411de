"""Optional dependencies (the extras of setup.py): import them where they are used, and name the extra that
provides one when it is missing.

- :func:`require` raises :class:`MissingExtra`, a one-line error the CLI prints without a traceback.
- :func:`pyplot` returns matplotlib's pyplot (Agg backend), or None after a one-line note: a run that would only
  lose a PNG goes on without it.
- :func:`write_figure_atomic` writes a figure as a PNG atomically and closes it: every plot saves through it.
"""

from __future__ import annotations

import importlib
import sys

__all__ = ["MissingExtra", "require", "pyplot", "write_figure_atomic"]

_noted: set = set()


class MissingExtra(ImportError, ValueError):
    """An optional dependency is not installed. A ValueError too, so the CLI reports it in one line."""


def require(module: str, extra: str, purpose: str):
    """Import ``module``; if it is missing, raise MissingExtra naming ``purpose`` and ``pip install
    mtkd_fast[extra]``."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingExtra(f"{purpose} needs {module.split('.')[0]}, which is not installed: "
                           f"pip install mtkd_fast[{extra}]") from exc


def pyplot(purpose: str):
    """matplotlib.pyplot with the Agg backend, or None (with a note on stderr, once per ``purpose``) when
    matplotlib is missing."""
    try:
        matplotlib = importlib.import_module("matplotlib")
    except ImportError:
        if purpose not in _noted:
            _noted.add(purpose)
            print(f"mtkd-fast: {purpose} skipped: matplotlib is not installed (pip install mtkd_fast[plots])",
                  file=sys.stderr, flush=True)
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_figure_atomic(fig, path: str, dpi: int = 100) -> None:
    """``fig`` as a PNG at ``path``, written atomically, then closed (pyplot keeps every open figure alive)."""
    import io

    from ._io import write_bytes_atomic

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    importlib.import_module("matplotlib.pyplot").close(fig)
    write_bytes_atomic(path, buf.getvalue())
