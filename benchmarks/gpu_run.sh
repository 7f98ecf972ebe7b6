#!/usr/bin/env bash
# Everything a session with a GPU runs in one go, from the repository root: build with the CUDA kernels
# for the local GPU, run the CUDA tests, the compute-sanitizer memcheck, the CUDA benchmark, then the rest
# of the test suite. Logs and results go to $OUT (default benchmarks/out/gpu).
#
# Needs a CUDA build of torch in the active Python and a CUDA toolkit (CUDA_HOME or nvcc on PATH).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${OUT:-$ROOT/benchmarks/out/gpu}"
mkdir -p "$OUT"
cd "$ROOT"
status=0
step() {  # step NAME COMMAND...: runs it, logs to $OUT/NAME.log, remembers a failure, goes on
  local name="$1"; shift
  echo "== $name: $*"
  local start=$SECONDS
  if "$@" > "$OUT/$name.log" 2>&1; then
    echo "   ok ($((SECONDS - start)) s)"
  else
    echo "   FAILED ($((SECONDS - start)) s), last lines of $OUT/$name.log:"; tail -n 30 "$OUT/$name.log"
    status=1
  fi
}

nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
step build env MAX_JOBS="${MAX_JOBS:-$(nproc)}" pip install --no-build-isolation -v -e .
step build_info python -c 'import mha_ext, torch; i = mha_ext.build_info(); print(i, torch.cuda.get_device_name()); assert i["cuda"] and torch.cuda.is_available()'
[[ $status -eq 0 ]] || { echo "gpu_run: the CUDA build is not usable; stopping"; exit 1; }
step tests_cuda python -m pytest tests -q -rs -m "gpu" -k "not compute_sanitizer_memcheck"
step memcheck python -m pytest tests/test_cuda_device.py -q -rs -k compute_sanitizer_memcheck
# The CUDA suite at 0.2 s of timing per implementation and case (BENCH_BUDGET), to leave device time for the
# rest; the other tests last (the CPU rows, and the emulated-CUDA tests on the CPU).
step benchmark python -m mha_ext.benchmark --device cuda --budget "${BENCH_BUDGET:-0.2}" --out "$OUT/benchmark"
step tests_all python -m pytest tests/ -x -q -rs -m "not gpu"
echo "gpu_run: done, logs in $OUT (exit $status)"
exit $status
