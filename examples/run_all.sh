#!/usr/bin/env bash
# Runs every example program (CI); stops with a non-zero exit status at the first one that fails.
set -euo pipefail
cd "$(dirname "$0")"
for example in *.py; do
    echo "== $example"
    "${PYTHON:-python}" "$example"
done
