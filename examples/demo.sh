#!/usr/bin/env bash
# The demo behind `make demo`: a tiny Llama (tokenizer trained on the spot, random
# weights), a synthetic preference task with a learnable rule, DPO training with
# `dpoctl local`: a coordinator (embedded store) and two CPU worker processes training
# data-parallel (progress bar, metrics, checkpoints, summary), then the trained policy
# scored on held-out prompts against the initial model as reference.
# With a second argument `lora` (`make demo-lora`) it trains LoRA adapters instead
# (examples/runs/dpo-lora.toml: PEFT-format adapter, reference = adapters off) and
# scores the merged model.
# Then (full mode) the founding document's worked example: a tiny BERT trained for
# NER with confusion negatives (examples/runs/ner.toml), the entity report printed
# before and after training, and the trained model evaluated on a CoNLL file;
# then the same task with LoRA (examples/runs/ner-lora.toml): the fraction of
# parameters trained and the entity report.
# Run it through make, which sets up the venv and builds the binary.
set -euo pipefail
out=${1:-out/demo}
mode=${2:-full}
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
py=${DPO_PYTHON:-python3}
bin=${DPO_WORKER:-$root/target/debug/dpo-worker}
ctl=${DPOCTL:-$root/target/debug/dpoctl}
mkdir -p "$out"

if [ ! -f "$out/model/config.json" ]; then
    echo "==> writing a tiny random Llama to $out/model"
    "$py" "$root/examples/tiny_model.py" --out "$out/model" --arch llama --hidden 64 --layers 2 >/dev/null
fi
if [ ! -f "$out/data/train.jsonl" ]; then
    echo "==> writing synthetic preference pairs to $out/data (rule: answer with the prompt's first word)"
    "$py" "$root/examples/make_pairs.py" --task copy --out "$out/data" --n 512 --eval-n 100
fi
if [ "$mode" = lora ]; then
    run=dpo-lora
    trained="$out/dpo-lora/final/merged"
else
    run=dpo
    trained="$out/dpo/final"
fi
# The demo run starts fresh each time (a real run would continue with --resume).
rm -rf "${out:?}/$run"
echo "==> dpoctl local examples/runs/$run.toml --workers 2"
"$ctl" local "$root/examples/runs/$run.toml" --workers 2
echo "==> dpo-worker score: the trained policy on held-out prompts, initial model as reference"
"$bin" score --model "$trained" --reference "$out/model" --data "$out/data/eval.jsonl" \
    --out "$out/eval_scores.jsonl" --device cpu
echo "==> outputs: $out/$run/{metrics.jsonl,eval.jsonl,checkpoints/,final/}, $out/eval_scores.jsonl"
[ -d "$out/$run/runs" ] && echo "==> TensorBoard events: tensorboard --logdir $out/$run/runs"
[ "$mode" = lora ] && exit 0

# The founding document's worked example: NER with negative samples on an encoder.
if [ ! -f "$out/tasks/ner/train.jsonl" ]; then
    echo "==> writing the synthetic NER and sentiment tasks to $out/tasks (dev/test names never occur in train)"
    "$py" "$root/examples/make_tasks.py" --out "$out/tasks" --train 1000 --eval 150
fi
if [ ! -f "$out/bert/config.json" ]; then
    echo "==> writing a tiny random BERT (no head; WordPiece learnt from the train text) to $out/bert"
    "$py" "$root/examples/tiny_encoder.py" --out "$out/bert" --family bert --head none --hidden 64 \
        --layers 2 --heads 4 --intermediate 128 --vocab 600 --corpus "$out/tasks/ner/corpus.txt" >/dev/null
fi
rm -rf "${out:?}/ner"
echo "==> dpo-worker train examples/runs/ner.toml: entity report before and after training"
"$bin" train --config "$root/examples/runs/ner.toml" --device cpu
echo "==> dpo-worker evaluate: the trained model (final/) on the CoNLL test split"
"$bin" evaluate --model "$out/ner/final" --data "$out/tasks/ner/test.conll" --device cpu
echo "==> outputs: $out/ner/{metrics.jsonl,eval.jsonl,best/,final/} (final/ loads in transformers.pipeline(\"token-classification\"))"
rm -rf "${out:?}/ner-lora"
echo "==> dpo-worker train examples/runs/ner-lora.toml: the same task with LoRA (adapters on query/key/value, the head whole)"
"$bin" train --config "$root/examples/runs/ner-lora.toml" --device cpu
echo "==> outputs: $out/ner-lora/final/ (a PEFT adapter: PeftModel.from_pretrained), final/merged/ (a plain transformers model)"
