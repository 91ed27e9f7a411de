"""Configure, build and test the CMake build of the extension (``make cmake-check`` runs it with --cuda=off).

Then imports the CMake-built module in a subprocess and checks it reports what it was built with.
"""

import argparse
import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(cmd, **kw):
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, **kw)


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--cuda", choices=["on", "off"], default="off")
    ap.add_argument("--build-dir", default=os.path.join(ROOT, "build-cmake"))
    args = ap.parse_args()
    build = os.path.join(args.build_dir, f"cuda-{args.cuda}")
    gen = (["-G", "Ninja"] if shutil.which("ninja")
           or os.path.exists(os.path.join(os.path.dirname(sys.executable), "ninja")) else [])
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    # torch's CMake config detects GPUs to pick archs and fails with none: name them (setup.py's default).
    env.setdefault("TORCH_CUDA_ARCH_LIST", "8.9;9.0+PTX")
    run(["cmake", "-S", ROOT, "-B", build, *gen, f"-DPython3_EXECUTABLE={sys.executable}",
         f"-DMTKD_FAST_CUDA={'ON' if args.cuda == 'on' else 'OFF'}"], env=env)
    run(["cmake", "--build", build, "-j", str(os.cpu_count() or 2)], env=env)
    run(["ctest", "--test-dir", build, "--output-on-failure"], env=env)
    # The CMake-built module must import and report the same build facts as setup.py's.
    check = (
        "import importlib.util, sys, glob, torch\n"
        f"path = glob.glob({build!r} + '/_C*.so')[0]\n"
        "spec = importlib.util.spec_from_file_location('_C', path)\n"
        "mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)\n"
        "info = mod.build_info()\n"
        f"assert info['cuda_compiled'] == {args.cuda == 'on'}, info\n"
        "assert info['torch_version'] == torch.__version__, info\n"
        "print('cmake build ok:', dict(info))\n"
    )
    run([sys.executable, "-c", check], env=env)


if __name__ == "__main__":
    main()
