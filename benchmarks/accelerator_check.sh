#!/usr/bin/env bash
# One command for a lent GPU or TPU machine: the accelerator check's table (benchmarks/accelerator_check.py) in
# under 8 minutes. Run from the repository root with the package installed; arguments pass through (--tiny).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=3
exec timeout 480 python benchmarks/accelerator_check.py "$@"
