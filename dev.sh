#!/usr/bin/env bash
# One entry point that sets everything up and runs a job:
#   ./dev.sh run     build info, self-check against torch, quick benchmark   (the Quickstart's first command)
#   ./dev.sh test    the test suite                          (the Quickstart's second command; CI runs it)
#   ./dev.sh bench   the full benchmark (python -m mha_ext.benchmark; extra arguments are passed on)
# Setup: a virtual environment in .venv with torch (TORCH_SPEC, default torch==2.13.0, a CPU build), the
# build tools and requirements-test.txt, and mha_ext installed editable with --no-build-isolation (so it compiles against
# that torch). Re-running reuses the environment and rebuilds only what changed.
set -euo pipefail
cd "$(dirname "$0")"

VENV=${MHA_EXT_VENV:-.venv}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}

setup() {
  if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
  fi
  local py="$VENV/bin/python"
  # torch first and on its own, so nothing else can pull in a different torch.
  "$py" -m pip install -q "$TORCH_SPEC" setuptools wheel ninja
  "$py" -m pip install -q -r requirements-test.txt "$TORCH_SPEC"
  MAX_JOBS=${MAX_JOBS:-2} "$py" -m pip install -q --no-build-isolation -e .
}

job=${1:-run}
shift || true
setup
case "$job" in
  run) "$VENV/bin/python" -m mha_ext && exec "$VENV/bin/python" -m mha_ext.benchmark --quick "$@" ;;
  test) exec "$VENV/bin/python" -m pytest tests -q "$@" ;;
  bench) exec "$VENV/bin/python" -m mha_ext.benchmark "$@" ;;
  *) echo "usage: ./dev.sh [run|test|bench] [args...]" >&2; exit 2 ;;
esac
