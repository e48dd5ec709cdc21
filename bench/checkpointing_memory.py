#!/usr/bin/env python3
"""Gradient checkpointing: the decoder layers' activation memory, ours against
transformers' own `gradient_checkpointing_enable()` on the same checkpoints.

Writes random Llama checkpoints of 1 and 8 layers (512 wide, vocabulary 4096, so
the LM head is small) with examples/tiny_model.py. For each side, model depth and
checkpointing on/off, one process runs a DPO-shaped step (chosen and rejected
responses scored, minus the sum of their log-probs as the loss, backward) three
times on the same random micro-batch and reports its peak resident size (VmHWM).
Activations = peak − resident size after loading − gradient bytes. What the layers
add is separated from the rest (embedding, head, loss) by the two depths: per
layer L = (A8 − A1) / 7, rest = A1 − L; the 8 layers' activations are then 8 L
without checkpointing and A8(ckpt) − rest with it.

    python bench/checkpointing_memory.py [--pairs 4 --prompt 32 --response 224]

Needs target/release/examples/memory_bench
(cargo build --release -p dpo-worker --example memory_bench) and transformers.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "target/release/examples/memory_bench")
MIB = 1 << 20

TORCH_STEP = r"""
import json, sys, time, torch, transformers
path, pairs, prompt, response, ckpt, steps = sys.argv[1], *map(int, sys.argv[2:6]), int(sys.argv[6])
torch.set_num_threads(2)
def kib(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1])
model = transformers.AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32,
                                                          attn_implementation="sdpa")
model.train()
if ckpt:
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
vocab = model.config.vocab_size
g = torch.Generator().manual_seed(0)
ids = torch.randint(3, vocab, (2 * pairs, prompt + response), generator=g)
grad_bytes = sum(p.numel() * 4 for p in model.parameters())
loaded = kib("VmRSS:")
times = []
for _ in range(steps):
    t = time.perf_counter()
    logits = model(input_ids=ids).logits[:, prompt - 1:-1]
    logps = torch.log_softmax(logits.float(), -1).gather(-1, ids[:, prompt:, None]).squeeze(-1)
    loss = -logps.sum()
    loss.backward()
    times.append(time.perf_counter() - t)
    model.zero_grad(set_to_none=False)
    del logits, logps, loss
times.sort()
print(json.dumps({"loaded_bytes": loaded * 1024, "peak_bytes": kib("VmHWM:") * 1024,
                  "grad_bytes": grad_bytes, "step_seconds": times[len(times) // 2]}))
"""


def model(out: str, layers: int) -> str:
    path = os.path.join(out, f"llama-{layers}x512-v4096")
    if not os.path.exists(os.path.join(path, "config.json")):
        subprocess.run([sys.executable, os.path.join(ROOT, "examples/tiny_model.py"), "--out", path,
                        "--layers", str(layers), "--hidden", "512", "--intermediate", "1376", "--heads", "8",
                        "--kv-heads", "8", "--model-vocab", "4096", "--max-positions", "1024"],
                       check=True, stdout=subprocess.DEVNULL)
    return path


def activations(side: str, path: str, ckpt: bool, args) -> tuple[float, float]:
    if side == "ours":
        cmd = [BENCH, "--model", path, "--pairs", str(args.pairs), "--prompt", str(args.prompt),
               "--response", str(args.response), "--head-chunk", "0", "--steps", str(args.steps)]
        if ckpt:
            cmd.append("--checkpointing")
    else:
        cmd = [sys.executable, "-c", TORCH_STEP, path, str(args.pairs), str(args.prompt), str(args.response),
               str(int(ckpt)), str(args.steps)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="2"))
    r = json.loads(out.stdout.strip().splitlines()[-1])
    return (r["peak_bytes"] - r["loaded_bytes"] - r["grad_bytes"]) / MIB, r["step_seconds"]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--pairs", type=int, default=4)
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--response", type=int, default=224)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "dpo-ckpt-memory"))
    args = p.parse_args()
    os.makedirs(args.dir, exist_ok=True)
    one, eight = model(args.dir, 1), model(args.dir, 8)
    print(f"{2 * args.pairs} sequences of {args.prompt} + {args.response} tokens; Llama 512 wide, vocab 4096; "
          f"f32, 2 threads; median of {args.steps} steps")
    print("| | 8 layers' activations, plain | with checkpointing | cut | step time, plain → checkpointing |")
    print("|---|---|---|---|---|")
    for side in ["transformers", "ours"]:
        a1, _ = activations(side, one, False, args)
        a8, t8 = activations(side, eight, False, args)
        c8, tc = activations(side, eight, True, args)
        per_layer = (a8 - a1) / 7
        rest = a1 - per_layer
        plain, ckpt = 8 * per_layer, c8 - rest
        print(f"| {side} | {plain:.0f} MiB | {ckpt:.0f} MiB | {plain / ckpt:.1f}× | "
              f"{t8:.2f} s → {tc:.2f} s ({100 * (tc / t8 - 1):+.0f} %) |")


if __name__ == "__main__":
    main()
