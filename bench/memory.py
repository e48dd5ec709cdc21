#!/usr/bin/env python3
"""Peak memory of a DPO-shaped step with the memory-saving paths on and off.

Writes random Llama checkpoints (8 layers x 512 wide; vocabularies of 32k and
128k rows) with examples/tiny_model.py, then runs target/release/examples/
memory_bench once per configuration (the peak resident size is a process's) on
the same micro-batch of random pairs. "Activations" is the peak resident size
minus the size after loading minus the gradients (which every configuration
holds): what the forward and backward add. Prints a Markdown table.

    python bench/memory.py [--pairs 4 --prompt 32 --response 96]
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


def model(out: str, vocab: int) -> str:
    path = os.path.join(out, f"llama-8x512-v{vocab}")
    if not os.path.exists(os.path.join(path, "config.json")):
        subprocess.run([sys.executable, os.path.join(ROOT, "examples/tiny_model.py"), "--out", path,
                        "--layers", "8", "--hidden", "512", "--intermediate", "1376", "--heads", "8",
                        "--kv-heads", "8", "--model-vocab", str(vocab), "--max-positions", "1024"],
                       check=True, stdout=subprocess.DEVNULL)
    return path


def run(path: str, args, chunk: int, checkpointing: bool) -> dict:
    cmd = [BENCH, "--model", path, "--pairs", str(args.pairs), "--prompt", str(args.prompt),
           "--response", str(args.response), "--head-chunk", str(chunk), "--steps", str(args.steps)]
    if checkpointing:
        cmd.append("--checkpointing")
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    r = json.loads(out.strip().splitlines()[-1])
    r["activations"] = r["peak_bytes"] - r["loaded_bytes"] - r["grad_bytes"]
    return r


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--pairs", type=int, default=4)
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--response", type=int, default=96)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--chunk", type=int, default=128, help="LM-head positions at a time when chunked")
    p.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "dpo-memory-bench"))
    args = p.parse_args()
    os.makedirs(args.dir, exist_ok=True)
    rows = []
    small = model(args.dir, 32000)
    c = args.chunk
    for chunk, ckpt in [(0, False), (c, False), (0, True), (c, True)]:
        rows.append(run(small, args, chunk, ckpt))
    large = model(args.dir, 128000)
    for chunk, ckpt in [(0, False), (c, False), (c, True)]:
        rows.append(run(large, args, chunk, ckpt))
    seqs = 2 * args.pairs
    print(f"{seqs} sequences of {args.prompt} + {args.response} tokens, f32, 2 threads; "
          f"activations = peak RSS - RSS after load - gradients")
    print("| vocab | head chunk | checkpointing | peak RSS | activations | step |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['vocab']} | {r['head_chunk'] or 'all'} | {'yes' if r['checkpointing'] else 'no'} | "
              f"{r['peak_bytes'] / MIB:.0f} MiB | {r['activations'] / MIB:.0f} MiB | {r['step_seconds']:.2f} s |")


if __name__ == "__main__":
    main()
