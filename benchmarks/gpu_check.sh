#!/usr/bin/env bash
# The GPU checks of mtkd_fast, staged to fit the short GPU loans (from the repository root):
#
#     bash benchmarks/gpu_check.sh                 # the default stages: a verdict within ~6 minutes (one call)
#     STAGES=rest bash benchmarks/gpu_check.sh     # every other stage (a second call; the build is incremental)
#     STAGES="build tests dali" bash benchmarks/gpu_check.sh
#
# Default stages (limits 210 + 45 + 100 s: under 6 minutes on a bare 16-core machine):
#   build     the extension for sm_90 (TORCH_CUDA_ARCH_LIST=9.0, the H100/H200; set it for your GPU) with every core,
#             against whatever torch the machine has (the summary names it), then build_info
#   selftest  `mtkd-fast selftest --device cuda`: every fused op against the float64 reference, all dtypes, both
#             layouts, shapes that reach the CUDA kernels' multi-chunk, long-row and C >= 256 walks
#   tests     the CUDA op tests (every test file that uses the GPU, the data tests aside; ids [cuda], not the CPU
#             emulator's [cuda_emu]; -rs lists what was skipped)
# The rest (STAGES=rest):
#   dali      the DALI GPU data-path tests (nvJPEG "mixed" decode): colour 4:2:0 JPEGs against the torchvision path
#             (training crops, rank 0 of 1 and rank 1 of 2), the validation pipeline, EXIF-tagged JPEGs,
#             channels_last, pipeline reuse; they skip (and the summary says so) where NVIDIA DALI is not installed
#   memcheck  compute-sanitizer --tool memcheck (PYTORCH_NO_CUDA_MEMORY_CACHING=1, so every allocation is its own
#             and an out-of-bounds access is caught) over a small subset of the CUDA op tests that reaches every walk
#   ops       the op benchmarks on the GPU (benchmarks/bench_ops.py, MTKD_BENCH_DEVICE=cuda: fused vs the authors'
#             way vs the eager and compiled reference; bytes, bandwidth and time over the memory floor per op;
#             rows in the benchmarks' one CSV schema, mtkd_fast/bench/record.py)
#   epoch     `mtkd-fast bench epoch` on the GPU: the CIFAR-like setting (ShuffleV2, B=64) and the ImageNet-like
#             setting (ResNet-18 student, ResNet-34/50/101 teachers, B=128), sized to a couple of minutes each
# STAGES names a subset (names: build selftest tests dali memcheck ops epoch-cifar epoch-imagenet; "default" and
# "rest" are the two groups). Each stage runs under its own time limit; a failing stage is logged and the next
# one still runs; the exit status is 1 when any stage failed or timed out.
#
# Everything lands in $OUT (default ./gpu_check_out): gpu_check.log (all output), gpu_check.md (the summary:
# device, torch, stage results, both epoch tables -- paste into benchmarks/RESULTS.md), epoch_cifar.csv/.png,
# epoch_imagenet.csv/.png, bench_ops.csv, and everything else in gpu_check_files.tar.gz.
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_check_out}
mkdir -p "$OUT"
WORK=$(mktemp -d)
LOG=$OUT/gpu_check.log
SUMMARY=$OUT/gpu_check.md
DEFAULT_STAGES="build selftest tests"
REST_STAGES="dali memcheck ops epoch-cifar epoch-imagenet"
STAGES=${STAGES:-default}
STAGES=${STAGES//default/$DEFAULT_STAGES}
STAGES=${STAGES//rest/$REST_STAGES}
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-$(nproc)}
# the checkout's .venv when present, else the python3 on PATH (PY=... overrides)
if [ -x .venv/bin/python ]; then PY=${PY:-.venv/bin/python}; else PY=${PY:-python3}; fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
SANITIZER=$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")

: >"$LOG"
{
  echo "# GPU check of mtkd_fast"
  echo
  echo "- date: $(date -u +%Y-%m-%dT%H:%M:%SZ); commit $(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)"
  echo "- device: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo 'nvidia-smi failed')"
  echo "- python: $($PY -c 'import sys, torch; print(sys.version.split()[0], "torch", torch.__version__, "(the build stage builds against it), CUDA", torch.version.cuda, "GPU visible:", torch.cuda.is_available())' 2>&1)"
  echo "- NVIDIA DALI: $($PY -c 'import nvidia.dali as d; print(d.__version__)' 2>/dev/null || echo 'not installed: the dali stage skips its tests')"
  echo "- TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST, stages: $STAGES"
  echo
  echo "| stage | result | seconds |"
  echo "|---|---|---|"
} >"$SUMMARY"

FAILED=0
# stage NAME LIMIT_S COMMAND...: run under `timeout`, output to the log, one line in the summary
stage() {
  local name=$1 limit=$2
  shift 2
  case " $STAGES " in *" $name "*) ;; *) return 0 ;; esac
  echo "===== $name (limit ${limit}s): $*" | tee -a "$LOG"
  local t0=$SECONDS rc
  timeout --kill-after=10 "$limit" "$@" >>"$LOG" 2>&1
  rc=$?
  local verdict="ok"
  [ $rc -ne 0 ] && verdict="FAILED (exit $rc)"
  [ $rc -eq 124 ] && verdict="TIMED OUT after ${limit}s"
  [ $rc -ne 0 ] && FAILED=1
  echo "| $name | $verdict | $((SECONDS - t0)) |" >>"$SUMMARY"
  echo "===== $name: $verdict in $((SECONDS - t0)) s" | tee -a "$LOG"
  tail -n 3 "$LOG" | sed 's/^/    /'
  return 0
}

# tests/test_ops.py takes its CUDA skip from tests/op_samples.py: its cases on the GPU are the ones with id [cuda]
CUDA_TESTS=$(grep -lE "cuda.is_available|from op_samples import" tests/test_*.py | grep -v "tests/test_data_" | tr '\n' ' ')

stage build 210 bash -c "$PY setup.py -q build_ext --inplace && $PY -c 'import json, mtkd_fast; i = mtkd_fast.build_info(); print(json.dumps(i, indent=1)); assert i[\"extension_loaded\"] and i[\"cuda_compiled\"], i'"
stage selftest 45 $PY -m mtkd_fast.cli selftest --device cuda
stage tests 100 $PY -m pytest -q -rs -p no:cacheprovider $CUDA_TESTS -k "(cuda or gpu or CUDA) and not cuda_emu"
stage dali 120 $PY -m pytest -q -rs -p no:cacheprovider tests/test_data_dali.py tests/test_data_folder.py -k "gpu"
stage memcheck 150 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" --tool memcheck --error-exitcode 3 --print-limit 20 \
  $PY -m pytest -q -x -p no:cacheprovider tests/test_ops.py -k "cuda and not cuda_emu and (multi_chunk_flat or \
  chunk_max_underflows or masked_classes or pooled_cosine_on_device or agent_stats_opcheck or channels_last_small_c)"
stage ops 150 env MTKD_BENCH_DEVICE=cuda MTKD_BENCH_OUT="$WORK/ops" $PY -m pytest -q -s -p no:cacheprovider benchmarks/bench_ops.py \
  -o python_files='bench_*.py' --benchmark-only --benchmark-columns=min,median,rounds
stage epoch-cifar 100 $PY -m mtkd_fast.cli bench epoch --setting cifar --students ShuffleV2 --steps 40 --repetitions 3 \
  --memory-steps 3 --no-progress --targets --out "$WORK/epoch_cifar"
stage epoch-imagenet 150 $PY -m mtkd_fast.cli bench epoch --setting imagenet --batch-size 128 --steps 8 --repetitions 3 \
  --memory-steps 2 --no-progress --targets --out "$WORK/epoch_imagenet"

for s in cifar imagenet; do
  if [ -f "$WORK/epoch_$s/epoch_bench.md" ]; then
    { echo; echo "## Epoch cost, $s-like setting"; echo; cat "$WORK/epoch_$s/epoch_bench.md"; } >>"$SUMMARY"
    cp "$WORK/epoch_$s/epoch_bench.csv" "$OUT/epoch_$s.csv"
    cp "$WORK/epoch_$s/epoch_bench.png" "$OUT/epoch_$s.png"
  fi
done
[ -f "$WORK/ops/pytest_bench.csv" ] && cp "$WORK/ops/pytest_bench.csv" "$OUT/bench_ops.csv"
tar -czf "$OUT/gpu_check_files.tar.gz" -C "$WORK" .
rm -rf "$WORK"
echo "| all stages | $([ $FAILED -eq 0 ] && echo ok || echo FAILED) | $SECONDS |" >>"$SUMMARY"
cat "$SUMMARY"
exit $FAILED
