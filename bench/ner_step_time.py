#!/usr/bin/env python3
"""Seconds per NER training step: `dpo-worker train` against transformers + PyTorch.

Same BERT (examples/tiny_encoder.py, random weights, no head), same synthetic NER
sentences (examples/make_tasks.py), same global batch and sequence cap, AdamW with
weight decay 0.01, gradient clipping at 1.0, f32 on CPU, same thread count, dropout
0.1 on both sides. Two objectives: cross-entropy alone (`sft`) and the combined loss
with the confusion negatives of every entity word.

- ours: `dpo-worker train` (release build), the median of `step_seconds` in
  metrics.jsonl: batching, forward, backward, clipping and the AdamW update.
- transformers: BertForTokenClassification in a plain training loop (no Trainer
  overhead: the reference is as fast as PyTorch gets), first-sub-token labels as
  run_ner.py aligns them, the loss written from its formula, torch.optim.AdamW; the
  median wall time of a step, with the same parts in it.

The first 3 steps of each side are left out (allocator warm-up). Prints a table and
the ratio transformers / ours (above 1: we are faster).

    python bench/ner_step_time.py [--hidden 256 --layers 4 --batch 32 --steps 30]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples"))


def reference_steps(model_dir: str, data: str, args, loss: str) -> list[float]:
    import torch
    import transformers

    torch.manual_seed(0)
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    labels = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-ORG", "I-ORG"]
    label2id = {l: i for i, l in enumerate(labels)}
    model = transformers.AutoModelForTokenClassification.from_pretrained(
        model_dir, num_labels=len(labels), id2label=dict(enumerate(labels)), label2id=label2id,
        attn_implementation="sdpa",
    )
    model.train()
    examples = []
    with open(data) as f:
        for line in f:
            rec = json.loads(line)
            enc = tok(rec["tokens"], is_split_into_words=True, truncation=True, max_length=args.max_length)
            first = {}
            for pos, w in enumerate(enc.word_ids()):
                if w is not None and w not in first:
                    first[w] = pos
            targets = [(first[w], label2id[t]) for w, t in enumerate(rec["tags"]) if w in first]
            negatives = []
            if loss == "combined":
                for w, t in enumerate(rec["tags"]):
                    if w in first and t != "O":
                        kind = t[2:]
                        flip = ("I-" if t.startswith("B-") else "B-") + kind
                        negatives.append((first[w], label2id[flip]))
            examples.append((enc["input_ids"], targets, negatives))
    no_decay = [p for n, p in model.named_parameters() if n.endswith("bias") or "LayerNorm.weight" in n]
    decay = [p for n, p in model.named_parameters() if not (n.endswith("bias") or "LayerNorm.weight" in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}], lr=1e-3)
    times = []
    g = args.batch
    for step in range(args.steps):
        started = time.perf_counter()
        batch = examples[(step * g) % (len(examples) - g):][:g]
        n_t = sum(len(e[1]) for e in batch)
        n_n = sum(len(e[2]) for e in batch)
        longest = max(len(e[0]) for e in batch)
        ids = torch.full((g, longest), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros((g, longest), dtype=torch.long)
        for r, e in enumerate(batch):
            ids[r, :len(e[0])] = torch.tensor(e[0])
            mask[r, :len(e[0])] = 1
        opt.zero_grad()
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
        rows = torch.tensor([r for r, e in enumerate(batch) for _ in e[1]])
        cols = torch.tensor([p for e in batch for p, _ in e[1]])
        gold = torch.tensor([l for e in batch for _, l in e[1]])
        z = logits[rows, cols]
        out = -torch.log_softmax(z, -1)[torch.arange(len(gold)), gold].sum() / n_t
        if n_n:
            rows = torch.tensor([r for r, e in enumerate(batch) for _ in e[2]])
            cols = torch.tensor([p for e in batch for p, _ in e[2]])
            wrong = torch.tensor([l for e in batch for _, l in e[2]])
            p = torch.softmax(logits[rows, cols], -1)[torch.arange(len(wrong)), wrong]
            out = out + (-torch.log1p(-p)).sum() / n_n
        out.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        times.append(time.perf_counter() - started)
    return times[3:]


def our_steps(model_dir: str, data: str, args, loss: str, work: str) -> list[float]:
    spec = os.path.join(work, f"ours-{loss}.toml")
    out = os.path.join(work, f"out-{loss}")
    negatives = 'negatives = "confusion"\n' if loss == "combined" else ""
    with open(spec, "w") as f:
        f.write(
            f'name = "bench"\n[model]\npath = "{model_dir}"\n[task]\ntype = "token-classification"\n'
            f'labels = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-ORG", "I-ORG"]\n'
            f'negatives_per_label = 1\n[data]\ntrain = "{data}"\n{negatives}max_length = {args.max_length}\n'
            f'[objective]\nloss = "{loss}"\n[optim]\nlr = 1e-3\nweight_decay = 0.01\n'
            f'[train]\nmax_steps = {args.steps}\nglobal_batch_size = {args.batch}\noutput = "{out}"\n'
        )
    binary = os.environ.get("DPO_WORKER", os.path.join(ROOT, "target/release/dpo-worker"))
    subprocess.run([binary, "train", "--config", spec, "--device", "cpu", "--json"], check=True,
                   stdout=subprocess.DEVNULL, env={**os.environ, "RUST_LOG": "warn"})
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(l)["step_seconds"] for l in f][3:]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--intermediate", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=2000)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--steps", type=int, default=30)
    args = p.parse_args()
    import torch

    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as work:
        subprocess.run([sys.executable, os.path.join(ROOT, "examples/make_tasks.py"), "--out", work,
                        "--train", "2000", "--eval", "10"], check=True, stdout=subprocess.DEVNULL)
        model = os.path.join(work, "bert")
        subprocess.run([sys.executable, os.path.join(ROOT, "examples/tiny_encoder.py"), "--out", model,
                        "--family", "bert", "--head", "none", "--hidden", str(args.hidden), "--layers",
                        str(args.layers), "--heads", str(args.heads), "--intermediate", str(args.intermediate),
                        "--vocab", str(args.vocab), "--max-positions", "128",
                        "--corpus", os.path.join(work, "ner/corpus.txt")], check=True, stdout=subprocess.DEVNULL)
        data = os.path.join(work, "ner/train.jsonl")
        rows = []
        for loss in ["sft", "combined"]:
            ours = statistics.median(our_steps(model, data, args, loss, work))
            theirs = statistics.median(reference_steps(model, data, args, loss))
            rows.append((loss, ours, theirs))
    print(f"BERT hidden {args.hidden}, {args.layers} layers, batch {args.batch}, <= {args.max_length} tokens, "
          f"{threads} threads, f32 CPU; median seconds per step")
    print(f"{'loss':<10} {'ours':>8} {'transformers':>13} {'ratio':>7}")
    for loss, ours, theirs in rows:
        print(f"{loss:<10} {ours:>8.4f} {theirs:>13.4f} {theirs / ours:>6.2f}x")


if __name__ == "__main__":
    main()
