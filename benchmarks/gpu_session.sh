#!/usr/bin/env bash
# The GPU tests and benchmarks in one command (see benchmarks/gpu_session.py for the plan):
#   bash benchmarks/gpu_session.sh            # on a CUDA machine; results in $OUT
#   bash benchmarks/gpu_session.sh --dry-run  # the same plan on the CPU
# $OUT receives gpu_session.tar.gz (every log and JSON) and summary.txt, rewritten after each step.
set -uo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python}" benchmarks/gpu_session.py "$@"
