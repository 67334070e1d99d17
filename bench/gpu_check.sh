#!/usr/bin/env bash
# The one prepared GPU check (issue 26): Triton vs reference (fp32, bf16), kernel times vs the chunked
# PyTorch path at 2K..16K tokens, HOPE vs Transformer++ tokens/s and MFU at 125m, peak memory vs the
# estimator; writes the GPU section of docs/BENCHMARKS.md. One command on one H100, under 8 minutes:
#     bash bench/gpu_check.sh
#     GPU_CHECK_DRY=1 bash bench/gpu_check.sh --out /tmp/gpu.md   # CPU, tiny, interpreter: checks the script
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
[ -x "$PY" ] || PY=python
exec "$PY" bench/gpu_check.py "$@"
