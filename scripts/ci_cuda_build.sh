#!/usr/bin/env bash
# Compiles and links the CUDA build of mha_ext on a machine without a GPU, then imports it and checks that
# the ops have CUDA kernels. The build happens in a copy of the tree (build/cuda-ci/src), so the CPU build
# in the working tree is left alone; re-runs are incremental.
#
# Environment: MHA_EXT_CUDA_VENV (default .venv-cuda) is the venv holding the CUDA build of torch;
# TORCH_CUDA_ARCH_LIST (default "8.0;9.0") and MAX_JOBS (default 2) are passed to the build; CUDA_HOME
# defaults to the root of the toolkit whose nvcc is on PATH.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/torch_pins.sh"
VENV="${MHA_EXT_CUDA_VENV:-$ROOT/.venv-cuda}"
WORK="$ROOT/build/cuda-ci"
SRC="$WORK/src"
START=$SECONDS

if [[ ! -x "$VENV/bin/python" ]]; then
  python3 -m venv "$VENV"
fi
"$VENV/bin/pip" install -q "$TORCH_CUDA_SPEC" ninja setuptools wheel

# The nvcc on PATH may be a wrapper script; `nvcc --dryrun` names the real bin directory as _HERE_.
if [[ -z "${CUDA_HOME:-}" ]]; then
  nvcc_bin="$(nvcc --dryrun -c -x cu /dev/null 2>&1 | sed -n 's/^#\$ _HERE_=//p' | head -n1)"
  [[ -n "$nvcc_bin" ]] || { echo "ci_cuda_build: cannot find the CUDA toolkit (no nvcc on PATH?)" >&2; exit 1; }
  CUDA_HOME="$(cd "$nvcc_bin/.." && pwd)"
fi
export CUDA_HOME
echo "ci_cuda_build: CUDA_HOME=$CUDA_HOME ($("$CUDA_HOME/bin/nvcc" --version | tail -n1))"

# torch's CUDA headers include cuBLAS/cuSPARSE/cuSOLVER, which come with the nvidia-* wheels.
NVIDIA_INCLUDE="$("$VENV/bin/python" -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13", "include"))')"
export CPATH="$NVIDIA_INCLUDE${CPATH:+:$CPATH}"

# Copy the sources (tracked and untracked, minus ignored files and venvs); copy2 keeps mtimes, so ninja
# rebuilds only what changed since the last run.
mkdir -p "$SRC"
python3 - "$ROOT" "$SRC" <<'PY'
import os, shutil, subprocess, sys
root, dst = sys.argv[1:]
listing = subprocess.run(["git", "-C", root, "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                         check=True, capture_output=True).stdout
for rel in filter(None, listing.decode().split("\0")):
    if rel.split("/")[0].startswith(".venv"):
        continue
    src, out = os.path.join(root, rel), os.path.join(dst, rel)
    if os.path.isfile(src) and not (os.path.exists(out) and os.path.getmtime(out) == os.path.getmtime(src)):
        os.makedirs(os.path.dirname(out), exist_ok=True)
        shutil.copy2(src, out)
PY

(
  cd "$SRC"
  MHA_EXT_FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;9.0}" MAX_JOBS="${MAX_JOBS:-2}" \
    "$VENV/bin/pip" install --no-build-isolation --no-deps . 2>&1 | tail -n 20
)

# Import from outside both trees so the installed package, not a source directory, is what loads.
(
  cd "$WORK"
  "$VENV/bin/python" - <<'PY'
import torch
import mha_ext

info = mha_ext.build_info()
assert info["cuda"] is True, f"mha_ext was built without CUDA: {info}"
for op in ("attention_forward", "attention_backward", "attention_weights"):
    name = f"mha_ext::{op}"
    for key in ("CUDA", "CPU"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(name, key), f"{name} has no {key} kernel"
print(f"ci_cuda_build: OK: torch {torch.__version__}, build_info {info}, CUDA kernels registered")
PY
)
echo "ci_cuda_build: finished in $((SECONDS - START)) s"
