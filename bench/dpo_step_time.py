#!/usr/bin/env python3
"""Steady-state seconds per DPO step: `dpo-worker train` against TRL's DPOTrainer.

Same tiny Llama (examples/tiny_model.py), same text pairs (examples/make_pairs.py,
task copy), same global batch, AdamW, linear schedule, gradient clipping at 1.0,
sigmoid loss with beta 0.1, a frozen reference model scored every step (no
precomputation on either side), f32 on CPU with the same thread count. Each side is
run for N1 and N2 optimizer steps as a whole process; the marginal time per step,
(T(N2) - T(N1)) / (N2 - N1), cancels start-up (imports, model loading, tokenizing).
Prints both and the speed-up ratio TRL / ours (above 1 means we are faster).

Needs `trl` (bench/requirements.txt; `make bench` installs it) and a release build
of dpo-worker (`make bench` builds it).
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

TRL_SCRIPT = r"""
import json, sys, torch, transformers, datasets, trl
cfg = json.loads(sys.argv[1])
torch.set_num_threads(cfg["threads"])
transformers.logging.set_verbosity_error()
model = transformers.AutoModelForCausalLM.from_pretrained(cfg["model"], dtype=torch.float32, attn_implementation="sdpa")
tok = transformers.AutoTokenizer.from_pretrained(cfg["model"])
rows = [json.loads(l) for l in open(cfg["data"])]
ds = datasets.Dataset.from_list([{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]} for r in rows])
args = trl.DPOConfig(
    output_dir=cfg["out"], per_device_train_batch_size=cfg["batch"], gradient_accumulation_steps=1,
    max_steps=cfg["steps"], learning_rate=cfg["lr"], lr_scheduler_type="linear", warmup_steps=0,
    max_grad_norm=1.0, weight_decay=0.0, beta=0.1, loss_type=["sigmoid"], max_length=cfg["max_length"],
    precompute_ref_log_probs=False, report_to=[], use_cpu=True, save_strategy="no", logging_steps=10**6,
    dataloader_num_workers=0, seed=0, disable_tqdm=True, bf16=False, fp16=False,
)
trainer = trl.DPOTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)
trainer.train()
"""


def time_trl(model: str, data: str, steps: int, args, tmp: str) -> float:
    cfg = {"model": model, "data": data, "steps": steps, "batch": args.batch, "lr": args.lr,
           "threads": args.threads, "max_length": args.max_length, "out": os.path.join(tmp, f"trl-{steps}")}
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", TRL_SCRIPT, json.dumps(cfg)], check=True, capture_output=True)
    return time.perf_counter() - t


def time_ours(model: str, data: str, steps: int, args, tmp: str) -> float:
    out = os.path.join(tmp, f"ours-{steps}-{time.monotonic_ns()}")
    spec = os.path.join(tmp, f"ours-{steps}.toml")
    with open(spec, "w") as f:
        f.write(f"""name = "bench"
[model]
path = "{model}"
[reference]
path = "same"
precompute = false
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
output = "{out}"
""")
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    t = time.perf_counter()
    subprocess.run([args.binary, "train", "--config", spec, "--device", "cpu", "--json"], check=True,
                   capture_output=True, env=env)
    return time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--binary", default=os.path.join(ROOT, "target", "release", "dpo-worker"))
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--model-vocab", type=int, default=4096)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--pairs", type=int, default=512)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--steps", type=int, nargs=2, default=[5, 25], metavar=("N1", "N2"))
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    if not os.path.exists(args.binary):
        sys.exit(f"{args.binary} not found: run `make bench`")
    n1, n2 = args.steps
    with tempfile.TemporaryDirectory() as tmp:
        model = os.path.join(tmp, "model")
        data = os.path.join(tmp, "data")
        subprocess.run([sys.executable, os.path.join(ROOT, "examples", "tiny_model.py"), "--out", model, "--arch", "llama",
                        "--hidden", str(args.hidden), "--layers", str(args.layers), "--heads", "8", "--kv-heads", "4",
                        "--intermediate", str(args.hidden * 11 // 4), "--model-vocab", str(args.model_vocab),
                        "--init-std", "0.02"], check=True, capture_output=True)
        subprocess.run([sys.executable, os.path.join(ROOT, "examples", "make_pairs.py"), "--task", "copy", "--out", data,
                        "--n", str(args.pairs)], check=True, capture_output=True)
        train = os.path.join(data, "train.jsonl")
        results = {"trl": [], "ours": []}
        for _ in range(args.repeats):
            for name, fn in (("trl", time_trl), ("ours", time_ours)):
                t1 = fn(model, train, n1, args, tmp)
                t2 = fn(model, train, n2, args, tmp)
                results[name].append(((t2 - t1) / (n2 - n1), t1, t2))
    trl_s = statistics.median(r[0] for r in results["trl"])
    ours_s = statistics.median(r[0] for r in results["ours"])
    print(f"model: llama hidden={args.hidden} layers={args.layers} vocab={args.model_vocab}; {args.pairs} text pairs "
          f"(copy task), batch {args.batch}, max_length {args.max_length}; AdamW, sigmoid beta 0.1, reference scored "
          f"every step; f32 CPU, {args.threads} threads; marginal of {n1} -> {n2} steps, median of {args.repeats}")
    for name, s in (("trl DPOTrainer", trl_s), ("dpo-worker train", ours_s)):
        runs = ", ".join(f"{t1:.1f}s/{t2:.1f}s" for _, t1, t2 in results["trl" if name.startswith("trl") else "ours"])
        print(f"{name:17}: {s * 1000:8.1f} ms/step   (whole runs N1/N2: {runs})")
    print(f"speed-up (trl / ours): {trl_s / ours_s:.2f}x")


if __name__ == "__main__":
    main()
