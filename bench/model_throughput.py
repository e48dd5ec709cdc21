#!/usr/bin/env python3
"""Forward+backward tokens/s of dpo-cluster's model against PyTorch eager (transformers).

`--arch` picks the family (Llama by default; Qwen3, Phi-3, Gemma 2 and 3 too: Gemma 2
runs transformers' eager attention on both sides, as its soft-capping requires). An
encoder family (bert, roberta, xlm-roberta, deberta-v2 — DeBERTa-v3's settings —,
modernbert — its published settings: a global layer every third, a window of 128) is
written by examples/tiny_encoder.py with a token head of `--labels` classes and timed
as NER trains it: token-classification cross-entropy against random labels
(transformers has no SDPA path for DeBERTa: its eager attention).

Same checkpoint (written here by examples/tiny_model.py), same batch of random token
ids, same loss (next-token cross-entropy), same thread count, f32 on CPU. Each side
runs `--repeats` times, alternating, and the median is reported with the ratio
ours / PyTorch (above 1 means faster). Run through `make bench`, which builds
target/release/examples/fwd_bwd first.
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


ENCODERS = ("bert", "roberta", "xlm-roberta", "deberta-v2", "modernbert")


def torch_step_seconds(model_dir: str, batch: int, seq: int, steps: int, warmup: int, threads: int,
                       attn: str = "sdpa", encoder: bool = False) -> float:
    if encoder:
        load = "AutoModelForTokenClassification"
        loss = """
    labels = torch.randint(m.config.num_labels, ids.shape, generator=torch.Generator().manual_seed(1))
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1))"""
    else:
        load = "AutoModelForCausalLM"
        loss = """
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))"""
    code = f"""
import json, time, torch, transformers
torch.set_num_threads({threads})
torch.manual_seed(0)
m = transformers.{load}.from_pretrained({model_dir!r}, dtype=torch.float32, attn_implementation={attn!r})
m.train()
ids = torch.randint(m.config.vocab_size, ({batch}, {seq}))
def step():
    logits = m(input_ids=ids).logits{loss}
    loss.backward()
    m.zero_grad(set_to_none=False)
for _ in range({warmup}):
    step()
t = time.perf_counter()
for _ in range({steps}):
    step()
print(json.dumps({{"seconds_per_step": (time.perf_counter() - t) / {steps}}}))
"""
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["seconds_per_step"]


def ours_step_seconds(binary: str, model_dir: str, batch: int, seq: int, steps: int, warmup: int, threads: int) -> float:
    cmd = [binary, "--model", model_dir, "--batch", str(batch), "--seq", str(seq), "--steps", str(steps),
           "--warmup", str(warmup), "--threads", str(threads)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["seconds_per_step"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--binary", default=os.path.join(ROOT, "target", "release", "examples", "fwd_bwd"))
    p.add_argument("--arch", default="llama",
                   help="any examples/tiny_model.py architecture: llama, qwen3, phi3, gemma2, gemma3_text, …")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--intermediate", type=int, default=688)
    p.add_argument("--model-vocab", type=int, default=4096)
    p.add_argument("--labels", type=int, default=9, help="classes of an encoder's token head")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    if not os.path.exists(args.binary):
        sys.exit(f"{args.binary} not found: run `make bench`")

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = os.path.join(tmp, "model")
        encoder = args.arch in ENCODERS
        if encoder:
            # The tokenizer's vocabulary is what the synthetic corpus gives (a few
            # hundred pieces): the embedding lookup costs little either way.
            labels = ",".join(["O"] + [f"{b}-E{i}" for i in range((args.labels - 1) // 2) for b in "BI"])
            subprocess.run(
                [sys.executable, os.path.join(ROOT, "examples", "tiny_encoder.py"), "--out", model_dir,
                 "--family", args.arch, "--head", "token", "--labels", labels, "--hidden", str(args.hidden),
                 "--layers", str(args.layers), "--heads", str(args.heads), "--intermediate", str(args.intermediate),
                 "--max-positions", str(max(512, args.seq))]
                + (["--local-attention", "128"] if args.arch == "modernbert" else []),
                check=True, capture_output=True,
            )
        else:
            subprocess.run(
                [sys.executable, os.path.join(ROOT, "examples", "tiny_model.py"), "--out", model_dir, "--arch",
                 args.arch, "--hidden", str(args.hidden), "--layers", str(args.layers), "--heads", str(args.heads),
                 "--kv-heads", str(args.kv_heads), "--intermediate", str(args.intermediate),
                 "--model-vocab", str(args.model_vocab), "--init-std", "0.02"],
                check=True, capture_output=True,
            )
        torch_s, ours_s = [], []
        for _ in range(args.repeats):
            # Gemma 2's soft-capping has no fused kernel, DeBERTa no SDPA path:
            # transformers' eager attention.
            attn = "eager" if args.arch in ("gemma2", "deberta-v2") else "sdpa"
            torch_s.append(torch_step_seconds(model_dir, args.batch, args.seq, args.steps, args.warmup, args.threads,
                                              attn, encoder))
            ours_s.append(ours_step_seconds(args.binary, model_dir, args.batch, args.seq, args.steps, args.warmup, args.threads))
    tokens = args.batch * args.seq
    t, o = statistics.median(torch_s), statistics.median(ours_s)
    shape = (f"token head of {args.labels} labels" if args.arch in ENCODERS
             else f"heads={args.heads}/{args.kv_heads} vocab={args.model_vocab}")
    print(f"model: {args.arch} hidden={args.hidden} layers={args.layers} heads={args.heads} {shape} "
          f"intermediate={args.intermediate}; batch {args.batch} x {args.seq} tokens; "
          f"{args.threads} threads; f32 CPU; median of {args.repeats} x {args.steps} steps")
    print(f"pytorch eager : {tokens / t:10.0f} tokens/s  ({t * 1000:.1f} ms/step)  runs {[round(x * 1000, 1) for x in torch_s]}")
    print(f"dpo-cluster   : {tokens / o:10.0f} tokens/s  ({o * 1000:.1f} ms/step)  runs {[round(x * 1000, 1) for x in ours_s]}")
    print(f"ratio (dpo-cluster / pytorch): {t / o:.3f}")


if __name__ == "__main__":
    main()
