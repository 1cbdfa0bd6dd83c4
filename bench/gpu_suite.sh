#!/usr/bin/env bash
# One-shot GPU figures of fxprune: kernel tests, block-sparse linear, gathered attention, end-to-end ViT-B/16
# (block-sparse and PaPr, eager and torch.compile) and the latency-target plan for resnet50, in one markdown report.
#
#   bash bench/gpu_suite.sh [--out report.md]            # on a CUDA machine (<= 8 minutes)
#   bash bench/gpu_suite.sh --dry-run [--out report.md]  # on CPU in CI: every provider resolves, tiny problems
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export FXPRUNE_CACHE_DIR="${FXPRUNE_CACHE_DIR:-$(mktemp -d)}"
if [[ " $* " == *" --dry-run "* ]]; then
  export TRITON_INTERPRET=1 OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
else
  export TRITON_INTERPRET=0
fi
exec timeout 480 python3 bench/gpu_suite.py "$@"
