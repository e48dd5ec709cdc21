#!/usr/bin/env python3
"""Steady-state seconds per DPO step: `dpo-worker train` against TRL's DPOTrainer.

Same tiny Llama (examples/tiny_model.py), same text pairs, same global batch, AdamW,
linear schedule, gradient clipping at 1.0, sigmoid loss with beta 0.1, f32 on CPU
with the same thread count. Each configuration runs for N1 and N2 optimizer steps as
a whole process; the marginal time per step, (T(N2) - T(N1)) / (N2 - N1), cancels
start-up (imports, model loading, tokenizing) and any one-time reference scoring.

Configurations:
  trl              TRL DPOTrainer, reference model scored every step (its default)
  trl-precompute   TRL with precompute_ref_log_probs=True (scored once, up front)
  ours             dpo-worker train, reference scored every step, padded rows
  ours-packing     + train.packing (pair-aware packing)
  ours-cache       + reference.precompute from a warm reference cache
  ours-cache-packing  both
Each is reported with its speed-up over `trl` (equal settings) and over
`trl-precompute`. The reference cache's one-time cost (a cold run minus a warm
one) is printed too.

Throughput: tokens per step are read from our runs' metrics.jsonl (`tokens`: prompt +
response of every sequence, a prompt counted once per response — the same work for
every configuration); tokens/s = tokens of the extra steps / their marginal time.
With --peak-tflops, MFU = (6N + 2N) x tokens/s / peak, N = every parameter of the
model (embeddings included): policy forward + backward (6N) and reference forward
(2N) per token — the work of a DPO step. For cached configurations the reference
forward is not executed each step, so their figure is work-equivalent MFU.

GPU: --device cuda --dtype bf16 runs both sides on the GPU in bf16 with f32 master
weights (TRL: f32 weights under bf16 autocast, `bf16=True`), e.g. a 0.5B Llama:
--hidden 1024 --layers 24 --heads 16 --kv-heads 8 --intermediate 2816 --model-vocab 32000
--peak-tflops 989 (H100 SXM bf16 dense).

Tasks: `long` (default) — prompts of 8-120 words and responses of 4-120 words, so
lengths vary as in real preference data; `copy` — the short pairs of
examples/make_pairs.py used for the issue-3 figure.

Needs `trl` (bench/requirements.txt; `make bench` installs it) and a release build
of dpo-worker (`make bench` builds it).
"""

from __future__ import annotations

import argparse
import json
import os
import random

import numpy as np
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TRL_SCRIPT = r"""
import json, sys, torch, transformers, datasets, trl
cfg = json.loads(sys.argv[1])
torch.set_num_threads(cfg["threads"])
transformers.logging.set_verbosity_error()
model = transformers.AutoModelForCausalLM.from_pretrained(cfg["model"], dtype=torch.float32, attn_implementation="sdpa")
if cfg["device"] != "cpu":
    model = model.to(cfg["device"])
tok = transformers.AutoTokenizer.from_pretrained(cfg["model"])
rows = [json.loads(l) for l in open(cfg["data"])]
ds = datasets.Dataset.from_list([{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]} for r in rows])
args = trl.DPOConfig(
    output_dir=cfg["out"], per_device_train_batch_size=cfg["batch"], gradient_accumulation_steps=1,
    max_steps=cfg["steps"], learning_rate=cfg["lr"], lr_scheduler_type="linear", warmup_steps=0,
    max_grad_norm=1.0, weight_decay=0.0, beta=0.1, loss_type=["sigmoid"], max_length=cfg["max_length"],
    precompute_ref_log_probs=cfg["precompute"], report_to=[], use_cpu=cfg["device"] == "cpu", save_strategy="no", logging_steps=10**6,
    dataloader_num_workers=0, seed=0, disable_tqdm=True, bf16=cfg["dtype"] == "bf16", fp16=False,
)
trainer = trl.DPOTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)
trainer.train()
"""


def time_trl(model: str, data: str, steps: int, args, tmp: str, precompute: bool = False) -> float:
    cfg = {"model": model, "data": data, "steps": steps, "batch": args.batch, "lr": args.lr,
           "threads": args.threads, "max_length": args.max_length, "precompute": precompute,
           "device": args.device, "dtype": args.dtype,
           "out": os.path.join(tmp, f"trl-{steps}")}
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", TRL_SCRIPT, json.dumps(cfg)], check=True, capture_output=True)
    return time.perf_counter() - t


LAST_OURS_OUT = {}


def time_ours(model: str, data: str, steps: int, args, tmp: str, precompute: bool = False,
              packing: bool = False, cache: str = "none") -> float:
    out = os.path.join(tmp, f"ours-{steps}-{time.monotonic_ns()}")
    spec = os.path.join(tmp, f"ours-{steps}.toml")
    with open(spec, "w") as f:
        f.write(f"""name = "bench"
[model]
path = "{model}"
dtype = "{args.dtype}"
[reference]
path = "same"
precompute = {str(precompute).lower()}
cache = "{cache}"
[data]
train = "{data}"
shuffle = false
max_length = {args.max_length}
max_prompt_length = {args.max_length // 2}
[objective]
loss = "sigmoid"
beta = 0.1
[optim]
name = "adamw"
lr = {args.lr}
schedule = "linear"
max_grad_norm = 1.0
[train]
max_steps = {steps}
global_batch_size = {args.batch}
packing = {str(packing).lower()}
output = "{out}"
""")
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    t = time.perf_counter()
    subprocess.run([args.binary, "train", "--config", spec, "--device", args.device, "--json"], check=True,
                   capture_output=True, env=env)
    elapsed = time.perf_counter() - t
    LAST_OURS_OUT[steps] = out
    return elapsed


def step_tokens(out: str) -> dict:
    """`tokens` of every step of one of our runs (metrics.jsonl)."""
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return {int(r["step"]): r["tokens"] for r in map(json.loads, f)}


def parameter_count(model: str) -> int:
    from safetensors import safe_open
    n = 0
    for name in os.listdir(model):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(model, name), "np") as f:
                for k in f.keys():
                    n += int(np.prod(f.get_slice(k).get_shape()))
    return n


WORDS = sorted({w for ws in (
    "red blue green white black yellow cat dog bird fish horse cow one two three four five six".split(),
    "the a and or is was will can good bad small big fast slow runs sits sees eats likes".split()) for w in ws})


def long_pairs(path: str, n: int, seed: int = 0) -> None:
    """Pairs whose lengths vary as in real preference data (in words; ~1-2 tokens each)."""
    rng = random.Random(seed)
    text = lambda lo, hi: " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))
    with open(path, "w") as f:
        for _ in range(n):
            row = {"prompt": text(8, 120) + " :", "chosen": " " + text(4, 120), "rejected": " " + text(4, 120)}
            f.write(json.dumps(row) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--binary", default=os.path.join(ROOT, "target", "release", "dpo-worker"))
    p.add_argument("--task", choices=["long", "copy"], default="long")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--model-vocab", type=int, default=4096)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--pairs", type=int, default=512)
    p.add_argument("--max-length", type=int, default=None, help="default: 512 (long), 128 (copy)")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--steps", type=int, nargs=2, default=[5, 25], metavar=("N1", "N2"))
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--configs", default="trl,trl-precompute,ours,ours-packing,ours-cache,ours-cache-packing")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (both sides)")
    p.add_argument("--dtype", choices=["f32", "bf16"], default="f32")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--intermediate", type=int, default=None, help="default: hidden * 11 / 4")
    p.add_argument("--peak-tflops", type=float, default=None, help="the device's peak (dense) for MFU")
    args = p.parse_args()
    if args.max_length is None:
        args.max_length = 512 if args.task == "long" else 128
    if not os.path.exists(args.binary):
        sys.exit(f"{args.binary} not found: run `make bench`")
    n1, n2 = args.steps
    configs = [c for c in args.configs.split(",") if c]
    with tempfile.TemporaryDirectory() as tmp:
        model = os.path.join(tmp, "model")
        data = os.path.join(tmp, "data")
        os.makedirs(data)
        subprocess.run([sys.executable, os.path.join(ROOT, "examples", "tiny_model.py"), "--out", model, "--arch", "llama",
                        "--hidden", str(args.hidden), "--layers", str(args.layers), "--heads", str(args.heads),
                        "--kv-heads", str(args.kv_heads),
                        "--intermediate", str(args.intermediate or args.hidden * 11 // 4), "--model-vocab", str(args.model_vocab),
                        "--max-positions", str(max(1024, args.max_length)), "--init-std", "0.02"],
                       check=True, capture_output=True)
        train = os.path.join(data, "train.jsonl")
        if args.task == "long":
            long_pairs(train, args.pairs)
        else:
            subprocess.run([sys.executable, os.path.join(ROOT, "examples", "make_pairs.py"), "--task", "copy", "--out",
                            data, "--n", str(args.pairs)], check=True, capture_output=True)
        cache = os.path.join(tmp, "reference-cache")
        runners = {
            "trl": lambda n: time_trl(model, train, n, args, tmp),
            "trl-precompute": lambda n: time_trl(model, train, n, args, tmp, precompute=True),
            "ours": lambda n: time_ours(model, train, n, args, tmp),
            "ours-packing": lambda n: time_ours(model, train, n, args, tmp, packing=True),
            "ours-cache": lambda n: time_ours(model, train, n, args, tmp, precompute=True, cache=cache),
            "ours-cache-packing": lambda n: time_ours(model, train, n, args, tmp, precompute=True, packing=True,
                                                      cache=cache),
        }
        unknown = [c for c in configs if c not in runners]
        if unknown:
            sys.exit(f"unknown configs: {unknown}")
        one_time = None
        if any(c.startswith("ours-cache") for c in configs):
            # Cold (scores every pair into the cache) against warm (reads it back).
            cold = time_ours(model, train, 1, args, tmp, precompute=True, cache=cache)
            warm = time_ours(model, train, 1, args, tmp, precompute=True, cache=cache)
            one_time = (cold - warm, cold, warm)
        results = {c: [] for c in configs}
        tokens = None
        for _ in range(args.repeats):
            for c in configs:
                t1 = runners[c](n1)
                t2 = runners[c](n2)
                results[c].append(((t2 - t1) / (n2 - n1), t1, t2))
                if tokens is None and c.startswith("ours"):
                    per_step_tokens = step_tokens(LAST_OURS_OUT[n2])
                    tokens = sum(per_step_tokens[s] for s in range(n1 + 1, n2 + 1)) / (n2 - n1)
        params = parameter_count(model)
    per_step = {c: statistics.median(r[0] for r in results[c]) for c in configs}
    task = (f"{args.pairs} pairs, prompts 8-120 words, responses 4-120 words" if args.task == "long"
            else f"{args.pairs} copy-task pairs")
    print(f"model: llama hidden={args.hidden} layers={args.layers} vocab={args.model_vocab}; {task}; batch "
          f"{args.batch}, max_length {args.max_length}; AdamW, sigmoid beta 0.1; {args.dtype} on {args.device}, "
          f"{args.threads} threads; marginal of {n1} -> {n2} steps, median of {args.repeats}")
    if tokens:
        print(f"{params / 1e6:.1f} M parameters; {tokens:.0f} tokens per step (prompt + response per sequence)")
    print(f"{'config':20} {'ms/step':>9} {'tokens/s':>9} {'MFU':>6} {'vs trl':>8} {'vs trl-precompute':>18}   "
          "whole runs N1/N2")
    for c in configs:
        runs = ", ".join(f"{t1:.1f}s/{t2:.1f}s" for _, t1, t2 in results[c])
        vs = lambda ref: f"{per_step[ref] / per_step[c]:.2f}x" if ref in per_step else "-"
        tps = tokens / per_step[c] if tokens else float("nan")
        mfu = f"{8 * params * tps / (args.peak_tflops * 1e12) * 100:.1f}%" if args.peak_tflops and tokens else "-"
        print(f"{c:20} {per_step[c] * 1000:9.1f} {tps:9.0f} {mfu:>6} {vs('trl'):>8} {vs('trl-precompute'):>18}   {runs}")
    if one_time:
        print(f"reference cache, one time: {one_time[0]:.1f} s to score {args.pairs} pairs "
              f"(cold 1-step run {one_time[1]:.1f} s, warm {one_time[2]:.1f} s)")


if __name__ == "__main__":
    main()
