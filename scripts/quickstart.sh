#!/usr/bin/env bash
# The main job on a fresh machine: set up, build a real offline corpus (the Python standard
# library's sources and docs), train a BPE tokenizer on it, write Megatron .bin/.idx, train the
# tiny HOPE for a few hundred steps on CPU and plot its loss. Extra arguments go to pretrain.py.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
D=data/stdlib
mkdir -p "$D"
[ -s "$D/corpus.jsonl" ] || python -m data_prep.corpus --out "$D/corpus.jsonl"
[ -s "$D/tokenizer.json" ] || python -m data_prep.train_tokenizer --input "$D/corpus.jsonl" \
    --vocab-size 4096 --out "$D/tokenizer.json"
[ -s "$D/stdlib.idx" ] || python -m data_prep.tokenize --input "$D/corpus.jsonl" \
    --tokenizer "$D/tokenizer.json" --output-prefix "$D/stdlib" --workers 2
RUN_DIR=runs/tiny
for arg in "$@"; do [[ $arg == --run_dir=* ]] && RUN_DIR=${arg#--run_dir=}; done
torchrun --standalone --nproc_per_node=1 hope_dist/pretrain.py --config configs/tiny.yaml "$@"
python -m tools.plot_metrics "$RUN_DIR" --out "$RUN_DIR/loss.png"
