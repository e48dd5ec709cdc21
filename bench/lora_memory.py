#!/usr/bin/env python3
"""Full-parameter DPO against LoRA on the same model: trainable parameters, training
state, peak memory and step time.

Writes a random Llama (16 layers x 512 wide, vocabulary 8000) with
examples/tiny_model.py and random token-id pairs, then runs `dpo-worker train`
(f32, AdamW, reference "same": for the full run a frozen copy of the model, for
LoRA the model with its adapters off; one process, or W ranks of `--peers` for
the sharded base of ZeRO stage 3) once per configuration and reads
`metrics.jsonl` (`memory/peak_bytes`, `memory/state_bytes_per_parameter`, step
tokens/s) and the log's count of trained parameters. Prints a Markdown table.

    python bench/lora_memory.py [--steps 6]

Needs target/release/dpo-worker (cargo build --release -p dpo-worker).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile

import zero_memory  # free_ports (this directory is on sys.path when run as a script)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BINARY = os.path.join(ROOT, "target/release/dpo-worker")
MIB = 1 << 20

LORA16 = '[lora]\nr = 16\nalpha = 32.0\ntarget_modules = "all-linear"'
STAGE3 = "zero_stage = 3\ngradient_checkpointing = true\n"
# name: (ranks, spec lines)
CONFIGS = {
    "full": (1, ""),
    "LoRA r=16, all-linear": (1, LORA16),
    "LoRA r=8, q_proj+v_proj": (1, '[lora]\nr = 8\nalpha = 16.0\ntarget_modules = ["q_proj", "v_proj"]'),
    "LoRA r=16, checkpointing": (1, "gradient_checkpointing = true\n" + LORA16),
    "LoRA r=16, base sharded over 2 (stage 3)": (2, STAGE3 + LORA16),
    "LoRA r=16, base sharded over 3 (stage 3)": (3, STAGE3 + LORA16),
}


def model(out: str) -> str:
    path = os.path.join(out, "llama-16x512-v8000")
    if not os.path.exists(os.path.join(path, "config.json")):
        subprocess.run([sys.executable, os.path.join(ROOT, "examples/tiny_model.py"), "--out", path,
                        "--layers", "16", "--hidden", "512", "--intermediate", "1408", "--heads", "8",
                        "--kv-heads", "8", "--model-vocab", "8000", "--max-positions", "512"],
                       check=True, stdout=subprocess.DEVNULL)
    return path


def free_ports(n: int) -> str:
    return ",".join(f"127.0.0.1:{p}" for p in zero_memory.free_ports(n))


def run(tmp: str, path: str, data: str, name: str, world: int, extra: str, steps: int) -> dict:
    out = os.path.join(tmp, re.sub(r"\W+", "-", name))
    spec = out + ".toml"
    with open(spec, "w") as f:
        f.write(f"""name = "bench"
[model]
path = "{path}"
dtype = "f32"
[reference]
path = "same"
[data]
train = "{data}"
[objective]
loss = "sigmoid"
[optim]
name = "adamw"
lr = 1e-4
[train]
max_steps = {steps}
global_batch_size = {4 * world}
micro_batch_size = 4
output = "{out}"
{extra}
""")
    cmd = [BINARY, "train", "--config", spec, "--device", "cpu"]
    threads = str(max(1, 2 // world))
    # glibc raises its mmap threshold as large blocks are freed, after which
    # freed transient buffers (a layer gathered under stage 3, a step's
    # activations) stay in the heap and count in the peak; a fixed threshold
    # returns them, for every configuration alike.
    env = dict(os.environ, OMP_NUM_THREADS=threads, MALLOC_MMAP_THRESHOLD_="65536")
    if world > 1:
        peers = free_ports(world)
        procs = [subprocess.Popen(cmd + ["--peers", peers, "--rank", str(r)], stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, text=True, env=env)
                 for r in range(world)]
        errs = [p.communicate()[1] for p in procs]
        if any(p.returncode != 0 for p in procs):
            sys.exit(f"{name}: {errs[0][-3000:]}")
        stderr = errs[0]
    else:
        p = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if p.returncode != 0:
            sys.exit(f"{name}: exit {p.returncode}\n{p.stderr[-3000:]}")
        stderr = p.stderr
    log = re.sub(r"\x1b\[[0-9;]*m", "", stderr)
    trained = int(re.search(r"model state of this rank parameters=(\d+)", log).group(1))
    with open(os.path.join(out, "metrics.jsonl")) as f:
        lines = [json.loads(line) for line in f]
    steady = lines[1:] or lines
    return {"name": name, "trained": trained,
            "state": lines[-1]["memory/state_bytes_per_parameter"] * trained,
            "peak": lines[-1]["memory/peak_bytes"],
            "step": statistics.median(m["tokens"] / m["tokens_per_second"] for m in steady)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "dpo-lora-bench"))
    args = p.parse_args()
    os.makedirs(args.dir, exist_ok=True)
    path = model(args.dir)
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "pairs.jsonl")
        rng = random.Random(0)
        with open(data, "w") as f:
            for _ in range(64):
                ids = lambda k: [rng.randrange(10, 8000) for _ in range(k)]
                f.write(json.dumps({"prompt_ids": ids(32), "chosen_ids": ids(64), "rejected_ids": ids(64)}) + "\n")
        rows = [run(tmp, path, data, name, world, extra, args.steps) for name, (world, extra) in CONFIGS.items()]
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    full = rows[0]
    print(f"Llama {cfg['num_hidden_layers']} x {cfg['hidden_size']}, vocab {cfg['vocab_size']}; f32 AdamW; "
          f"4 pairs of 32 + 64 tokens per rank per step, reference 'same'; rank 0's figures; "
          f"median of {args.steps - 1} steps")
    print("| configuration | trained parameters | training state | peak RSS | step time |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['name']} | {r['trained'] / 1e6:.2f} M ({100 * r['trained'] / full['trained']:.2f} %) | "
              f"{r['state'] / MIB:.0f} MiB | {r['peak'] / MIB:.0f} MiB | {r['step']:.2f} s "
              f"({r['step'] / full['step']:.2f}×) |")


if __name__ == "__main__":
    main()
