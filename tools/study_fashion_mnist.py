"""The teachers-stronger study of issue 27, now ``mtkd-fast study`` (mtkd_fast/study.py, docs/study.md); this
script is kept for the callers that import it (``main``, ``METHODS``) or run it:

    OMP_NUM_THREADS=1 python tools/study_fashion_mnist.py --out results/study [--seeds 0 1 2 3 4]
"""

from __future__ import annotations

import sys

from mtkd_fast.study import METHODS, main

__all__ = ["METHODS", "main"]

if __name__ == "__main__":
    sys.exit(main())
