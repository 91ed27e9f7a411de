"""Proof that the emulated CUDA op tests can fail: plants kernel bugs, one at a time, in a copy of csrc/ and
shows each one caught by the cuda_emu cases of tests/test_ops.py (`make mutants`, part of `make ci`).

Each mutant is rebuilt (incrementally, in build/cuda_emu_mutants) and tested in a subprocess: one build of an
extension name per process. The unmutated copy runs first and must pass the same tests. Exit status 1 when a
mutant survives or the baseline fails.

    python tests/cuda_emu/mutants.py [--only NAME ...]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# (name, file under csrc/, text, replacement, the cuda_emu tests that must catch it, what the failure must say)
MUTANTS = [
    ("warp reduction skips its last step", "cuda/common.cuh",
     "for (int offset = kWarp / 2; offset > 0; offset >>= 1)", "for (int offset = kWarp / 2; offset > 1; offset >>= 1)",
     "test_logit_kd_on_device_masked_classes", None),
    ("missing __syncthreads before reading the partial sums", "cuda/pool.cuh",
     "    part[threadIdx.x] = sum;\n    __syncthreads();\n", "    part[threadIdx.x] = sum;\n",
     "test_agent_stats_on_device_matches_reference and True", None),
    ("k <= K loop", "cuda/agent_stats.cu",
     "  for (int k = lane; k < K; k += kWarp) {\n    const acc_t xs",
     "  for (int k = lane; k <= K; k += kWarp) {\n    const acc_t xs",
     "test_agent_stats_on_device_matches_reference", None),
    ("early return before a barrier", "cuda/state_ops.cu",
     "  __syncthreads();  // every channel mean is in x",
     "  if (threadIdx.x >= C) return;\n  __syncthreads();  // every channel mean is in x",
     "test_pooled_cosine_on_device_matches_reference", r"barrier deadlock"),
    ("shuffle inside a divergent loop", "cuda/agent_stats.cu",
     "    tmax = max(tmax, static_cast<acc_t>(zt[k]));\n  }\n  smax = warp_reduce(smax, MaxOp{});",
     "    tmax = max(tmax, static_cast<acc_t>(zt[k]));\n    smax = warp_reduce(smax, MaxOp{});\n  }",
     "test_agent_stats_on_device_matches_reference", r"different call sites|warp collective mismatch"),
    ("an all-NaN chunk skipped like an all -inf one (NaN masked)", "cuda/logit_kd.cu",
     "if (h == -inf && __ldcg(rec + 1) == 0) continue;", "if (h == -inf) continue;",
     "test_non_finite_logits_give_nan_rows_on_device", None),
]


def run_tests(csrc: Path, build: Path, select: str) -> tuple[int, str]:
    env = dict(os.environ, CUDA_EMU_CSRC=str(csrc), CUDA_EMU_BUILD=str(build), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "tests/test_ops.py",
           "-k", f"cuda_emu and ({select})"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    return proc.returncode, proc.stdout + proc.stderr


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", default=None, help="mutant names (substrings) to run")
    args = parser.parse_args(argv)
    mutants = [m for m in MUTANTS if args.only is None or any(o in m[0] for o in args.only)]
    build = REPO / "build" / "cuda_emu_mutants"
    failed = 0
    with tempfile.TemporaryDirectory(prefix="cuda_emu_mutants_") as tmp:
        csrc = Path(tmp) / "csrc"
        shutil.copytree(REPO / "csrc", csrc)
        start = time.perf_counter()
        rc, out = run_tests(csrc, build, " or ".join(sorted({m[4] for m in mutants})))
        print(f"baseline (no mutant): {'passes' if rc == 0 else 'FAILS'} ({time.perf_counter() - start:.0f} s)")
        if rc != 0:
            print(out[-4000:])
            return 1
        for name, rel, old, new, select, says in mutants:
            path = csrc / rel
            original = path.read_text()
            if original.count(old) != 1:
                print(f"{name}: the text to mutate is not once in csrc/{rel} (update mutants.py)")
                failed += 1
                continue
            path.write_text(original.replace(old, new))
            start = time.perf_counter()
            rc, out = run_tests(csrc, build, select)
            path.write_text(original)
            caught = rc not in (0, 5) and (says is None or re.search(says, out) is not None)
            detail = next((line.strip() for line in out.splitlines() if "cuda_emu:" in line and "Error" in line), "")
            if not detail:
                detail = next((line.strip() for line in out.splitlines() if line.startswith("FAILED")), "")
            print(f"{name} (csrc/{rel}): {'caught' if caught else 'SURVIVED'} "
                  f"({time.perf_counter() - start:.0f} s){': ' + detail[:300] if detail else ''}")
            if not caught:
                print(out[-3000:])
                failed += 1
    print(f"{len(mutants) - failed} of {len(mutants)} planted bugs caught")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
