"""Build mtkd_fast and its C++/CUDA extension ``mtkd_fast._C``.

Environment flags:
- ``MTKD_FAST_CUDA``: ``auto`` (default: build the CUDA kernels when torch has CUDA and a toolkit is
  found), ``1`` (force; fail if impossible), ``0`` (C++ only).
- ``TORCH_CUDA_ARCH_LIST``: CUDA archs, default ``8.9;9.0+PTX`` (RTX 4090, H100/H200). nvcc 13 has no
  sm_70 or older.
- ``MAX_JOBS``: parallel compile jobs (ninja).
- ``MTKD_FAST_SKIP_EXT=1``: install the pure-Python package only (the reference path).
"""

import glob
import os
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCHS = "8.9;9.0+PTX"


def _find_cuda_home():
    # nvcc on PATH may be a wrapper script (here /usr/local/bin/nvcc), so torch's guess from `which nvcc`
    # (its parent's parent) can be wrong: prefer CUDA_HOME / CUDA_PATH, then /usr/local/cuda.
    for key in ("CUDA_HOME", "CUDA_PATH"):
        path = os.environ.get(key)
        if path and os.path.exists(os.path.join(path, "bin", "nvcc")):
            return path
    if os.path.exists("/usr/local/cuda/bin/nvcc"):
        return "/usr/local/cuda"
    return None


def _cuda_mode():
    mode = os.environ.get("MTKD_FAST_CUDA", "auto").strip().lower()
    if mode not in ("auto", "0", "1"):
        sys.exit(f"MTKD_FAST_CUDA: expected auto, 0 or 1, got {mode!r}")
    return mode


def _extensions():
    if os.environ.get("MTKD_FAST_SKIP_EXT") == "1":
        return [], {}
    cuda_home = _find_cuda_home()
    if cuda_home:
        os.environ["CUDA_HOME"] = cuda_home  # before torch.utils.cpp_extension reads it
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    mode = _cuda_mode()
    can_cuda = torch.version.cuda is not None and cuda_home is not None
    if mode == "1" and not can_cuda:
        sys.exit(
            "MTKD_FAST_CUDA=1 but CUDA cannot be built: "
            + ("this torch has no CUDA" if torch.version.cuda is None else "no CUDA toolkit (set CUDA_HOME)")
        )
    with_cuda = can_cuda and mode != "0"

    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    cxx = ["-O3", "-fopenmp", f'-DMTKD_TORCH_VERSION="{torch.__version__}"']
    kwargs = dict(name="mtkd_fast._C", include_dirs=[os.path.join(ROOT, "csrc")], extra_link_args=["-fopenmp"])
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCHS)  # no GPU here: torch cannot detect one
        archs = os.environ["TORCH_CUDA_ARCH_LIST"]
        sources += sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp"))
        # torch's pip NVIDIA packages carry the cuBLAS/cuSPARSE headers ATen's CUDA headers include;
        # a bare toolkit may lack them.
        nv = os.path.join(os.path.dirname(os.path.dirname(torch.__file__)), "nvidia", "cu13", "include")
        if os.path.isdir(nv):
            kwargs["include_dirs"].append(nv)
        defines = ["-DWITH_CUDA", f'-DMTKD_CUDA_ARCHS="{archs}"']
        kwargs["extra_compile_args"] = {
            "cxx": cxx + defines,
            "nvcc": ["-O3", "--expt-relaxed-constexpr", "-lineinfo"] + defines,
        }
        ext = CUDAExtension(sources=sources, **kwargs)
    else:
        kwargs["extra_compile_args"] = {"cxx": cxx}
        ext = CppExtension(sources=sources, **kwargs)
    print(f"mtkd_fast: building the {'C++ and CUDA' if with_cuda else 'C++-only'} extension", file=sys.stderr)
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()


def _torch_requirement() -> str:
    """A compiled extension works only with the torch release it was built against (its C++ ABI), so a wheel
    with ``mtkd_fast._C`` pins that release, as torchvision does; the pure-Python build takes any torch >= 2.4.
    The local label (``+cu130``) is dropped: ``torch==2.14.1`` accepts every build of that release."""
    if not ext_modules:
        return "torch>=2.4"
    import torch

    return "torch==" + torch.__version__.split("+")[0]


def _dali_requirement() -> str:
    """DALI is published per CUDA major version; match the torch the extension is built against."""
    try:
        import torch

        major = (torch.version.cuda or "13").split(".")[0]
    except ImportError:
        major = "13"
    return f"nvidia-dali-cuda{major}0>=2.4,<3"


# Every module-level import of the package (tests/test_packaging.py checks the list); optional parts are extras,
# and code that needs one says which (mtkd_fast/_optional.py).
# pyyaml: the paper's runs ship as YAML (configs/), so `train --config configs/...` must work on a plain install
INSTALL_REQUIRES = [_torch_requirement(), "torchvision", "numpy", "tqdm", "pillow", "pyyaml"]
EXTRAS_REQUIRE = {
    "plots": ["matplotlib"],  # PNGs of training curves, teacher weights and benchmarks
    "dali": [_dali_requirement()],  # data backend "dali" (image folders)
    "yaml": ["pyyaml"],  # kept so `pip install mtkd_fast[yaml]` still works; pyyaml is in INSTALL_REQUIRES now
    "baselines": ["scikit-learn"],  # strategy aekd with aekd_solver "libsvm" (the CA-MKD code's OneClassSVM)
    "timm": ["timm>=1.0"],  # timm:<name> teachers and students (forward_head(pre_logits=True), head_hidden_size)
    "test": ["pytest", "pytest-benchmark"],
}
EXTRAS_REQUIRE["all"] = sorted({r for name, reqs in EXTRAS_REQUIRE.items() if name != "test" for r in reqs})

setup(
    name="mtkd_fast",
    version="0.1.0",
    description="Fast multi-teacher knowledge distillation (MTKD-RL) with fused C++/CUDA kernels",
    license="MIT",
    packages=find_packages(include=["mtkd_fast", "mtkd_fast.*"]),
    package_data={"mtkd_fast": ["data/bundled/*", "data/bundled/**/*"]},
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
    entry_points={"console_scripts": ["mtkd-fast=mtkd_fast.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
