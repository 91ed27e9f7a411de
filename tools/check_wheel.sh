#!/usr/bin/env bash
# Build the wheel, install it with its declared dependencies into a fresh virtual environment, and use it from
# outside the checkout: the compiled extension loads, `mtkd-fast demo --quick` runs on the bundled data, and an
# MTKDLoss step matches the pure-PyTorch reference.
#
#   tools/check_wheel.sh [WORKDIR]
#
# PYTHON: the interpreter that builds the wheel; it needs torch installed (default: .venv/bin/python, else
#   python3). The wheel compiles against that torch and pins it (setup.py), so the fresh venv installs the same
#   torch release through pip's usual configuration (index, find-links, constraints).
# WORKDIR: where the wheel, the venv and the demo's output go (default: a new temporary folder, removed at the
#   end unless KEEP=1). MTKD_FAST_CUDA, TORCH_CUDA_ARCH_LIST and MAX_JOBS pass through to the build (setup.py).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
WORK=${1:-$(mktemp -d -t mtkd-wheel.XXXXXX)}
mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd)
if [ -z "${1:-}" ] && [ "${KEEP:-0}" != 1 ]; then trap 'rm -rf "$WORK"' EXIT; fi
stamp() { printf '[check_wheel %s] %s\n' "$(date -u +%H:%M:%S)" "$*"; }
T0=$SECONDS

stamp "building the wheel with $PYTHON ($("$PYTHON" -c 'import torch; print("torch", torch.__version__)'))"
rm -rf "$WORK/dist"
"$PYTHON" -m pip wheel . --no-build-isolation --no-deps -q -w "$WORK/dist"
WHEEL=$(ls "$WORK"/dist/mtkd_fast-*.whl)
stamp "built $(basename "$WHEEL") in $((SECONDS - T0)) s"
"$PYTHON" - "$WHEEL" <<'EOF'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    names = z.namelist()
    meta = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
requires = [l.split(":", 1)[1].strip() for l in meta.splitlines() if l.startswith("Requires-Dist:")]
print("  Requires-Dist:", "; ".join(requires))
assert any(n.startswith("mtkd_fast/_C") and n.endswith(".so") for n in names), "the wheel lacks mtkd_fast/_C*.so"
assert any(n.startswith("mtkd_fast/data/bundled/") for n in names), "the wheel lacks the bundled data"
assert any(r.replace(" ", "").startswith("torch==") for r in requires), "the wheel does not pin its torch"
EOF

T1=$SECONDS
stamp "installing it with its dependencies into a fresh venv"
rm -rf "$WORK/venv"
BASE=$("$PYTHON" -c 'import sys; print(sys._base_executable)')
"$BASE" -m venv "$WORK/venv"
"$WORK/venv/bin/python" -m pip install -q "$WHEEL"
stamp "installed in $((SECONDS - T1)) s"

T2=$SECONDS
cd "$WORK"  # outside the checkout: nothing may come from $ROOT
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
"$WORK/venv/bin/python" - "$ROOT" <<'EOF'
import os, sys
import torch
import mtkd_fast
from mtkd_fast import MTKDLoss, reference

root = os.path.realpath(sys.argv[1])
assert not os.path.realpath(mtkd_fast.__file__).startswith(root + os.sep), mtkd_fast.__file__
info = mtkd_fast.build_info()
assert info["extension_loaded"], info.get("load_error")
torch.manual_seed(0)
B, K, M = 13, 37, 3
student = torch.randn(B, K, dtype=torch.float64, requires_grad=True)
teachers = torch.randn(M, B, K, dtype=torch.float64)
targets = torch.randint(0, K, (B,))
w = torch.softmax(torch.randn(B, M, dtype=torch.float64), 1)
maps = [torch.randn(B, c, 5, 3, dtype=torch.float64, requires_grad=True) for c in (7, 9, 11)]
tmaps = [torch.randn_like(m) for m in maps]
fused = MTKDLoss(temperature=4.0, alpha=1.0, beta=5.0)(student, teachers, targets, w, maps, tmaps, w)
fused.loss.backward()
grad = student.grad.clone()
student.grad = None
ref = MTKDLoss(temperature=4.0, alpha=1.0, beta=5.0, backend="reference")(student, teachers, targets, w, maps, tmaps, w)
ref.loss.backward()
torch.testing.assert_close(fused.loss, ref.loss)
torch.testing.assert_close(grad, student.grad)
print(f"  MTKDLoss: fused = reference = {fused.loss.item():.6f}; mtkd_fast from {os.path.dirname(mtkd_fast.__file__)}, "
      f"CPU kernels: {', '.join(info['cpu_kernels'])}")
EOF
stamp "MTKDLoss checked in $((SECONDS - T2)) s"

T3=$SECONDS
"$WORK/venv/bin/mtkd-fast" demo --quick --out "$WORK/demo" --teacher-dir "$WORK/teachers" --device cpu
test -s "$WORK/demo/demo.json"
stamp "demo --quick ran in $((SECONDS - T3)) s"
stamp "all checks passed in $((SECONDS - T0)) s"
