#!/usr/bin/env bash
# The GPU check and table of issue 13 in one command (about 5 minutes on one H100/H200):
#   bash benchmarks/gpu.sh [--repeats N] [--skip-checks] [--device cuda:1]
# Needs a CUDA build of torch and numba-cuda (pip install -e ".[cuda]").  See benchmarks/gpu.py.
set -euo pipefail
cd "$(dirname "$0")/.."
export NUMBA_CACHE_DIR="${NUMBA_CACHE_DIR:-$PWD/.numba_cache}"
exec python benchmarks/gpu.py "$@"
