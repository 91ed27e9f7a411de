"""A CPU SIMT emulator for the CUDA kernels of csrc/cuda (docs/ops.md, "The CUDA emulator").

``build()`` compiles ``csrc/cuda/*.cu`` unmodified as host C++ (only kernel launches and ``__shared__``
declarations are rewritten, in a generated copy) against include/cuda_emu.h, include/ stubs of the c10/cuda
and CUDA runtime headers, and runtime.cpp (one fiber (a user-space thread) per CUDA thread). The kernels' registration
``TORCH_LIBRARY_IMPL(mtkd_fast, CUDA, ...)`` becomes ``TORCH_LIBRARY_IMPL(mtkd_fast_cudaemu, CPU, ...)``, with
the schemas of csrc/mtkd_ops.cpp under that namespace: ``torch.ops.mtkd_fast_cudaemu.*`` run the CUDA kernels
on CPU tensors. ``as_cpu_kernels()`` routes ``torch.ops.mtkd_fast.*`` on CPU tensors to them for a while, so
the whole Python API (autograd, ops.py's checks) runs on the emulated kernels; tests/test_ops.py calls that
device ``cuda_emu``.

Environment: CUDA_EMU_CSRC (the csrc tree to compile, default the checkout's), CUDA_EMU_BUILD (build folder,
default build/cuda_emu), CUDA_EMU_ORDER (forward | reverse | random: block and fiber order), CUDA_EMU_SEED,
CUDA_EMU_SMS (multiprocessors the device reports, default 132). torch.utils.cpp_extension allows one build of
a name per process: build mutants in subprocesses (mutants.py).
"""

from __future__ import annotations

import contextlib
import inspect
import os
import re
import warnings
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
NAMESPACE = "mtkd_fast_cudaemu"
OP_NAMES = ("logit_kd", "feature_kd", "pooled_cosine", "pooled_cosine_backward", "per_sample_loss_reward",
            "agent_stats")
ORDERS = ("forward", "reverse", "random")
# cuda_info.cu asks the CUDA runtime about the machine (build_info): nothing to emulate
SKIP = {"cuda_info.cu"}

_LAUNCH = re.compile(r"([A-Za-z_]\w*(?:<[^<>;(){}]*>)?)\s*<<<(.*?)>>>\s*\(", re.S)
_EXTERN_SHARED = re.compile(r"extern\s+__shared__\s+(?:__align__\(\s*\d+\s*\)\s+)?"
                            r"([A-Za-z_][\w:]*(?:\s+[A-Za-z_]\w*)*?)\s+(\w+)\s*\[\s*\]\s*;")
_SHARED = re.compile(r"__shared__\s+([A-Za-z_][\w:<>]*)\s+([^;]+);")
_DECLARATOR = re.compile(r"^\s*(\w+)\s*((?:\[[^\]]+\]\s*)*)$")
_IMPL = re.compile(r"TORCH_LIBRARY_IMPL\(\s*mtkd_fast\s*,\s*CUDA\s*,")


def _keep_lines(old: str, new: str) -> str:
    """``new`` padded with the newlines ``old`` had, so every later line keeps its number (__LINE__)."""
    missing = old.count("\n") - new.count("\n")
    assert missing >= 0, (old, new)
    return new + "\n" * missing


def translate(text: str, rel: str) -> str:
    """One csrc/cuda file as host C++ for the emulator (rel: its path in the tree, for __FILE__)."""

    def launch(m):
        name, cfg = m.group(1), m.group(2)
        return _keep_lines(m.group(0), f'::cuda_emu::Launcher(__FILE__, __LINE__, "{name}", {cfg})({name})(')

    def extern_shared(m):
        return f"{m.group(1)}* {m.group(2)} = reinterpret_cast<{m.group(1)}*>(::cuda_emu::dynamic_smem());"

    def shared(m):
        out = []
        for decl in m.group(2).split(","):
            d = _DECLARATOR.match(decl)
            if d is None:
                raise ValueError(f"{rel}: cannot translate the __shared__ declaration {m.group(0)!r}")
            name, dims = d.group(1), d.group(2).replace(" ", "")
            site = f"emu_shared_{name}"
            out.append(f"struct {site} {{}}; auto& {name} = ::cuda_emu::shared_var<{m.group(1)}{dims}, {site}>();")
        return _keep_lines(m.group(0), " ".join(out))

    text = _LAUNCH.sub(launch, text)
    text = _EXTERN_SHARED.sub(extern_shared, text)
    text = _SHARED.sub(shared, text)
    text = _IMPL.sub(f"TORCH_LIBRARY_IMPL({NAMESPACE}, CPU,", text)
    if "__shared__" in re.sub(r"//[^\n]*", "", text):
        raise ValueError(f"{rel}: a __shared__ declaration the translator does not know")
    return f'#include "cuda_emu.h"\n#line 1 "{rel}"\n' + text


def _write_if_changed(path: Path, text: str) -> None:
    # unchanged files keep their mtime, so ninja recompiles only what a change touched
    if path.exists() and path.read_text() == text:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def generate(csrc: Path, gen: Path) -> list[Path]:
    """Writes the translated tree under gen/ and returns the sources to compile."""
    sources = []
    for src in sorted((csrc / "cuda").iterdir()):
        if src.suffix not in (".cu", ".cuh") or src.name in SKIP:
            continue
        out = gen / "cuda" / (src.name + ".cpp" if src.suffix == ".cu" else src.name)
        _write_if_changed(out, translate(src.read_text(), f"csrc/cuda/{src.name}"))
        if src.suffix == ".cu":
            sources.append(out)
    schemas = (csrc / "mtkd_ops.cpp").read_text()
    if "TORCH_LIBRARY(mtkd_fast, m)" not in schemas:
        raise ValueError("csrc/mtkd_ops.cpp: no TORCH_LIBRARY(mtkd_fast, m) block to copy the schemas from")
    schemas = schemas.replace("TORCH_LIBRARY(mtkd_fast, m)", f"TORCH_LIBRARY({NAMESPACE}, m)")
    _write_if_changed(gen / "schemas.cpp", schemas)
    return sources + [gen / "schemas.cpp", HERE / "runtime.cpp"]


def build(csrc: str | os.PathLike | None = None, build_dir: str | os.PathLike | None = None,
          verbose: bool = False) -> None:
    """Compiles (incrementally) and loads the emulated kernels into this process."""
    from torch.utils import cpp_extension

    csrc = Path(csrc or os.environ.get("CUDA_EMU_CSRC") or REPO / "csrc").resolve()
    build_dir = Path(build_dir or os.environ.get("CUDA_EMU_BUILD") or REPO / "build" / "cuda_emu").resolve()
    sources = generate(csrc, build_dir / "gen")
    build_dir.mkdir(parents=True, exist_ok=True)
    cpp_extension.load(
        name=NAMESPACE,
        sources=[str(s) for s in sources],
        extra_include_paths=[str(HERE / "include"), str(build_dir / "gen"), str(csrc)],
        # -g and frame pointers: a failure names the call chain of the collective (runtime.cpp, addr2line);
        # -Dmtkd: the kernels' namespace differs from the extension's (both live in one process)
        extra_cflags=["-O2", "-g", "-fno-omit-frame-pointer", "-std=c++20", "-fvisibility=hidden",
                      "-Wno-unknown-pragmas", "-Dmtkd=mtkd_cudaemu"],
        build_directory=str(build_dir),
        is_python_module=False,
        with_cuda=False,
        verbose=verbose,
    )


_loaded = False


def load() -> None:
    """build() once per process, then configure() from the environment."""
    global _loaded
    if not _loaded:
        build()
        _loaded = True
        configure(os.environ.get("CUDA_EMU_ORDER", "forward"), int(os.environ.get("CUDA_EMU_SEED", "0")),
                  int(os.environ.get("CUDA_EMU_SMS", "132")))


def configure(order: str = "forward", seed: int = 0, sms: int = 132) -> None:
    """Block and fiber order of the following launches (forward | reverse | random, seeded) and the number of
    multiprocessors the emulated device reports (the logit_kd kernel sizes its grid by it)."""
    torch.ops.mtkd_fast_cudaemu.emu_configure(order, seed, sms)


def _forward(name):
    def kernel(*args, **kwargs):
        return getattr(torch.ops.mtkd_fast_cudaemu, name)(*args, **kwargs)

    return kernel


@contextlib.contextmanager
def as_cpu_kernels():
    """Within the block, ``torch.ops.mtkd_fast.*`` on CPU tensors run the emulated CUDA kernels; the
    extension's own CPU kernels are back afterwards."""
    load()
    lib = torch.library.Library("mtkd_fast", "IMPL")
    extra = {"allow_override": True} if "allow_override" in inspect.signature(lib.impl).parameters else {}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "overriding a previously registered kernel": on purpose
            for name in OP_NAMES:
                lib.impl(name, _forward(name), "CPU", **extra)
        yield
    finally:
        lib._destroy()
