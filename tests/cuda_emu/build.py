"""Builds the CPU SIMT emulator of csrc/cuda (tests/cuda_emu) into build/cuda_emu: `make emu`."""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cuda_emu  # noqa: E402

if __name__ == "__main__":
    start = time.perf_counter()
    cuda_emu.build(verbose="-v" in sys.argv)
    print(f"cuda_emu: built in {time.perf_counter() - start:.0f} s")
