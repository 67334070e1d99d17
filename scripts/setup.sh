#!/usr/bin/env bash
# Create .venv and install hope_dist with its test extras (dev; eval = lm-eval + transformers,
# tests/integration/test_lm_eval.py; deepspeed = DeepSpeed 0.19 without prebuilt ops, tests/integration/test_deepspeed.py;
# override with EXTRAS=dev). Installs the CPU torch 2.13.0 wheel first (a
# fresh machine has it locally) so nothing pulls a CUDA build; on a GPU machine set TORCH_SPEC to
# the torch you want, e.g. TORCH_SPEC="torch==2.13.0" with the CUDA index.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
DS_BUILD_OPS=${DS_BUILD_OPS:-0} python -m pip install -q -e ".[${EXTRAS:-dev,eval,deepspeed}]"
python -c "import torch, tokenizers, hope_dist; print(f'hope_dist env ready: torch {torch.__version__}')"
