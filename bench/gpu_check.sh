#!/usr/bin/env bash
# The GPU check (bench/gpu_check.py says what and why): --dry-run on any machine, "first" and
# "second" on a GPU machine, one command each.  PYTHON picks the interpreter (default python3).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python3}" -m bench.gpu_check "$@"
