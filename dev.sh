#!/usr/bin/env bash
# One entry point that sets everything up and runs a job:
#   ./dev.sh run     build info, self-check against torch, quick benchmark   (the Quickstart's first command)
#   ./dev.sh test    the test suite; extra arguments go to pytest  (the Quickstart's second command; CI runs it)
#   ./dev.sh bench   the full benchmark (python -m mha_ext.benchmark; extra arguments are passed on)
#   ./dev.sh setup   only the setup below
# Setup: a virtual environment in .venv with torch (TORCH_SPEC, default scripts/torch_pins.sh's CPU build), the
# build tools and requirements-test.txt, and mha_ext installed editable with --no-build-isolation (so it
# compiles against that torch). The packages are installed again only when TORCH_SPEC or a requirements
# file changed; the extension is rebuilt by ninja in build/, which recompiles only the sources that changed
# (the first build takes about 1.5 minutes on 2 cores, a rebuild with nothing changed a few seconds).
set -euo pipefail
cd "$(dirname "$0")"

source scripts/torch_pins.sh
VENV=${MHA_EXT_VENV:-.venv}
TORCH_SPEC=${TORCH_SPEC:-$TORCH_CPU_SPEC}
PY="$VENV/bin/python"

usage() { echo "usage: ./dev.sh [run|test|bench|setup] [args...]" >&2; }

install_packages() {
  local stamp="$VENV/.mha_ext_packages" want
  want="$TORCH_SPEC $(cat requirements-test.txt pyproject.toml | sha256sum)"
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    return
  fi
  echo "dev.sh: installing $TORCH_SPEC and the test requirements into $VENV"
  # torch first and on its own, so nothing else can pull in a different torch.
  "$PY" -m pip install -q "$TORCH_SPEC" setuptools wheel ninja
  "$PY" -m pip install -q -r requirements-test.txt "$TORCH_SPEC"
  rm -f "$VENV/.mha_ext_editable"  # a new torch needs a new build and install
  echo "$want" > "$stamp"
}

# Prints the compile steps ninja reports ("[3/14] csrc/cpu/forward.cpp") and any compiler diagnostics; the
# whole log is in build/dev-build.log.
show_progress() {
  tee build/dev-build.log | sed -nE -e "s#$PWD/##g" \
    -e 's#^ *\[([0-9]+/[0-9]+)\] .* -c (-c )?([^ ]+) -o .*#  [\1] compiling \3#p' \
    -e '/(error|warning):/p'
}

build() {
  mkdir -p build
  local stamp="$VENV/.mha_ext_editable" status
  echo "dev.sh: building mha_ext (ninja recompiles only what changed; the first build takes about 1.5 minutes on 2 cores)"
  set +e
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$(sha256sum setup.py)" ]; then
    # Installed editable already: rebuilding the extension in place is all that is needed.
    MAX_JOBS=${MAX_JOBS:-2} "$PY" setup.py build_ext --inplace 2>&1 | show_progress
  else
    MAX_JOBS=${MAX_JOBS:-2} "$PY" -m pip install -v --no-deps --no-build-isolation -e . 2>&1 | show_progress
  fi
  status=${PIPESTATUS[0]}
  set -e
  if [ "$status" -ne 0 ]; then
    tail -n 40 build/dev-build.log >&2
    echo "dev.sh: the build failed (full log: build/dev-build.log)" >&2
    exit "$status"
  fi
  sha256sum setup.py > "$stamp"
}

job=${1:-run}
shift || true
case "$job" in
  run|test|bench|setup) ;;
  *) usage; exit 2 ;;
esac

if [ ! -x "$PY" ]; then
  python3 -m venv "$VENV"
fi
install_packages
build

case "$job" in
  run) "$PY" -m mha_ext && exec "$PY" -m mha_ext.benchmark --quick "$@" ;;
  test) exec "$PY" -m pytest tests -q "$@" ;;
  bench) exec "$PY" -m mha_ext.benchmark "$@" ;;
  setup) ;;
esac
