#!/usr/bin/env python3
"""Peak memory per rank of ZeRO stages 0, 1 and 2 on the same DPO run.

Writes a random Llama checkpoint (16 layers x 512 wide, vocabulary 8000) with
examples/tiny_model.py and a set of token-id pairs, then trains a few steps with
`dpo-worker train --peers ... --rank r` (W processes on this machine, the tcp
ring) once per configuration, and reads rank 0's `metrics.jsonl`: the model state
it holds per parameter (`memory/state_bytes_per_parameter`) and its peak resident
size (`memory/peak_bytes`, the process's VmHWM). Prints a Markdown table.

    python bench/zero_memory.py [--world 2,3] [--steps 3]

Needs target/release/dpo-worker (cargo build --release -p dpo-worker).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BINARY = os.path.join(ROOT, "target/release/dpo-worker")
MIB = 1 << 20


def model(out: str, args) -> str:
    path = os.path.join(out, f"llama-{args.layers}x{args.hidden}-v{args.vocab}")
    if not os.path.exists(os.path.join(path, "config.json")):
        subprocess.run([sys.executable, os.path.join(ROOT, "examples/tiny_model.py"), "--out", path,
                        "--layers", str(args.layers), "--hidden", str(args.hidden),
                        "--intermediate", str(args.hidden * 11 // 4), "--heads", "8", "--kv-heads", "8",
                        "--model-vocab", str(args.vocab), "--max-positions", "512"],
                       check=True, stdout=subprocess.DEVNULL)
    return path


def pairs(path: str, vocab: int, n: int) -> None:
    rng = random.Random(0)
    with open(path, "w") as f:
        for _ in range(n):
            ids = lambda k: [rng.randrange(10, vocab) for _ in range(k)]
            f.write(json.dumps({"prompt_ids": ids(24), "chosen_ids": ids(40), "rejected_ids": ids(40)}) + "\n")


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def run(tmp: str, path: str, data: str, world: int, stage: int, args) -> dict:
    name = f"w{world}-s{stage}"
    out = os.path.join(tmp, name)
    spec = os.path.join(tmp, f"{name}.toml")
    with open(spec, "w") as f:
        f.write(f"""name = "{name}"
[model]
path = "{path}"
dtype = "f32"
[reference]
path = "same"
precompute = true
[data]
train = "{data}"
[objective]
loss = "sigmoid"
[optim]
name = "adamw"
lr = 1e-5
[train]
max_steps = {args.steps}
global_batch_size = {2 * world}
micro_batch_size = 1
zero_stage = {stage}
output = "{out}"
""")
    peers = ",".join(f"127.0.0.1:{p}" for p in free_ports(world))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([BINARY, "train", "--config", spec, "--device", "cpu", "--peers", peers,
                               "--rank", str(r)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
             for r in range(world)]
    for p in procs:
        _, err = p.communicate()
        if p.returncode != 0:
            sys.exit(f"{name}: exit {p.returncode}\n{err.decode()[-3000:]}")
    with open(os.path.join(out, "metrics.jsonl")) as f:
        last = [json.loads(line) for line in f][-1]
    return {"world": world, "stage": stage, "bytes": last["memory/state_bytes_per_parameter"],
            "peak": last["memory/peak_bytes"]}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--world", default="2,3")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--vocab", type=int, default=8000)
    p.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "dpo-zero-memory"))
    args = p.parse_args()
    os.makedirs(args.dir, exist_ok=True)
    path = model(args.dir, args)
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "pairs.jsonl")
        pairs(data, args.vocab, 64)
        rows = [run(tmp, path, data, int(w), stage, args) for w in args.world.split(",") for stage in (0, 1, 2)]
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    print(f"Llama {cfg['num_hidden_layers']} layers x {cfg['hidden_size']}, vocab {cfg['vocab_size']}; f32 AdamW; "
          f"one pair per micro-batch, 2 per rank per step; {args.steps} steps; rank 0's figures")
    print("| ranks | zero_stage | model state / parameter | peak RSS of rank 0 | vs stage 0 |")
    print("|---|---|---|---|---|")
    for r in rows:
        base = next(x for x in rows if x["world"] == r["world"] and x["stage"] == 0)
        print(f"| {r['world']} | {r['stage']} | {r['bytes']:.2f} B | {r['peak'] / MIB:.0f} MiB | "
              f"{(r['peak'] - base['peak']) / MIB:+.0f} MiB |")


if __name__ == "__main__":
    main()
