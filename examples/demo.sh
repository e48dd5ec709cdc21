#!/usr/bin/env bash
# The demo behind `make demo`: a tiny Llama (tokenizer trained on the spot, random
# weights), a synthetic preference set, and dpo-worker scoring it against itself as
# reference. Run through make, which sets up the venv and builds the binary.
set -euo pipefail
out=${1:-out/demo}
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
py=${DPO_PYTHON:-python3}
bin=${DPO_WORKER:-$root/target/debug/dpo-worker}
mkdir -p "$out"

if [ ! -f "$out/model/config.json" ]; then
    echo "==> writing a tiny random Llama to $out/model"
    "$py" "$root/examples/tiny_model.py" --out "$out/model" --arch llama --hidden 64 --layers 2 >/dev/null
fi
if [ ! -f "$out/data/train.jsonl" ]; then
    echo "==> writing synthetic preference pairs to $out/data"
    "$py" "$root/examples/make_pairs.py" --out "$out/data" --n 400 --eval-n 100
fi
echo "==> dpo-worker score (the model against itself as reference: every reward is 0)"
"$bin" score --model "$out/model" --reference "$out/model" --data "$out/data/eval.jsonl" \
    --out "$out/eval_scores.jsonl" --device cpu
echo "==> first scored pairs:"
head -n 3 "$out/eval_scores.jsonl"
