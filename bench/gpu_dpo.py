#!/usr/bin/env python3
"""DPO on one GPU: `dpo-worker train` against TRL's DPOTrainer, same model, pairs and batch.

    python bench/gpu_dpo.py --bin target/release --device cuda --out bench.json [--budget-s 240]
    python bench/gpu_dpo.py --tiny --device cpu ...   (the script's own test, on a CPU)

Model: a random Llama-shaped model made on the spot (examples/tiny_model.py): 16 layers,
hidden 2048, 16 heads with 4 KV heads (GQA), MLP 8192, vocabulary 32000, untied head —
1.1 B parameters — in bf16 with f32 master weights (TRL: f32 weights under bf16 autocast,
`bf16=True`, its mixed-precision recipe). Pairs: random words, prompts and responses long
enough that sequences run 1024-2048 tokens (max_length 2048). Global batch 8 pairs, one
micro-batch, AdamW, sigmoid loss, beta 0.1.

Configurations (one run each; seconds per step = median over the steps after the first
`--warmup`):
  ours                reference model scored every step, padded rows
  ours-packing        + train.packing (pair-aware packing)
  ours-cache          reference log-probs precomputed (reference.precompute)
  ours-cache-packing  both
  trl                 TRL DPOTrainer, reference scored every step
  trl-precompute      TRL, precompute_ref_log_probs=True

Throughput: tokens per step are our runs' `tokens` (prompt + response of every sequence,
a prompt counted once per response, no padding); TRL's steps draw from the same pairs,
so the mean over our run is the work of one step for both. MFU = (6N per trained token
+ 2N per reference token scored in the step) x tokens/s / 989 TFLOP/s (H100/H200 bf16
dense peak), N = every parameter; cached configurations score no reference tokens in
the step, so they are counted at 6N. Peak memory: the device's memory in use
(total - free), sampled every 2 ms on both sides (libtorch's and PyTorch's caches and
the CUDA context included); TRL's torch.cuda.max_memory_reserved is reported too.
Attention kernels: ours from the worker's log ("attention kernel", libtorch's own
choice for each mask kind); TRL's from torch._fused_sdp_choice on its padded batch.
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
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEAK = 989e12

TRL_SCRIPT = r"""
import json, sys, threading, time, torch, transformers, datasets, trl
cfg = json.loads(sys.argv[1])
transformers.logging.set_verbosity_error()
dev = cfg["device"]
cuda = dev.startswith("cuda")
peak = [0]
stop = [False]
def sample():
    while not stop[0]:
        free, total = torch.cuda.mem_get_info()
        peak[0] = max(peak[0], total - free)
        time.sleep(0.002)
if cuda:
    threading.Thread(target=sample, daemon=True).start()
model = transformers.AutoModelForCausalLM.from_pretrained(cfg["model"], dtype=torch.float32, attn_implementation="sdpa")
if dev != "cpu":
    model = model.to(dev)
tok = transformers.AutoTokenizer.from_pretrained(cfg["model"])
rows = [json.loads(l) for l in open(cfg["data"])]
ds = datasets.Dataset.from_list([{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]} for r in rows])
times = []
class Clock(transformers.TrainerCallback):
    def on_step_end(self, args, state, control, **kw):
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter())
args = trl.DPOConfig(
    output_dir=cfg["out"], per_device_train_batch_size=cfg["batch"], gradient_accumulation_steps=1,
    max_steps=cfg["steps"], learning_rate=1e-6, lr_scheduler_type="linear", warmup_steps=0,
    max_grad_norm=1.0, weight_decay=0.0, beta=0.1, loss_type=["sigmoid"], max_length=cfg["max_length"],
    precompute_ref_log_probs=cfg["precompute"], report_to=[], use_cpu=not cuda, save_strategy="no",
    logging_steps=10**6, dataloader_num_workers=0, seed=0, disable_tqdm=True, bf16=cfg["bf16"], fp16=False,
)
trainer = trl.DPOTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, callbacks=[Clock()])
trainer.train()
stop[0] = True
out = {"step_end_times": times}
if cuda:
    out["peak_bytes"] = peak[0]
    out["max_memory_reserved"] = torch.cuda.max_memory_reserved()
    out["max_memory_allocated"] = torch.cuda.max_memory_allocated()
    # The kernel SDPA picks for a padded batch like TRL's (a boolean padding mask).
    c = model.config
    h, kv, d = c.num_attention_heads, c.num_key_value_heads, c.hidden_size // c.num_attention_heads
    q = torch.randn(2, h, 1024, d, device=dev, dtype=torch.bfloat16)
    k = torch.randn(2, h, 1024, d, device=dev, dtype=torch.bfloat16)
    m = torch.ones(2, 1, 1024, 1024, device=dev, dtype=torch.bool).tril()
    m[1, :, :, 700:] = False
    names = {0: "math", 1: "flash", 2: "efficient", 3: "cudnn"}
    out["attention_kernel_padded"] = names.get(torch._fused_sdp_choice(q, k, k, attn_mask=m), "other")
    out["attention_kernel_causal"] = names.get(torch._fused_sdp_choice(q, k, k, is_causal=True), "other")
print("RESULT " + json.dumps(out))
"""

WORDS = ("red blue green white black yellow cat dog bird fish horse cow one two three four five six the a "
         "and or is was will can good bad small big fast slow runs sits sees eats likes").split()


def pairs(path: str, n: int, prompt: tuple, response: tuple, seed: int = 0) -> None:
    rng = random.Random(seed)
    text = lambda lo, hi: " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))
    with open(path, "w") as f:
        for _ in range(n):
            f.write(json.dumps({"prompt": text(*prompt) + " :", "chosen": " " + text(*response),
                                "rejected": " " + text(*response)}) + "\n")


def parameter_count(model: str) -> int:
    from safetensors import safe_open
    n = 0
    for name in os.listdir(model):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(model, name), "np") as f:
                for k in f.keys():
                    shape = f.get_slice(k).get_shape()
                    size = 1
                    for s in shape:
                        size *= s
                    n += size
    return n


def run_ours(a, model, data, tmp, name, packing, precompute, cache):
    out = os.path.join(tmp, name)
    spec = os.path.join(tmp, f"{name}.toml")
    with open(spec, "w") as f:
        f.write(f"""name = "{name}"
[model]
path = "{model}"
dtype = "{a.dtype}"
[reference]
path = "same"
precompute = {str(precompute).lower()}
cache = "{cache}"
[data]
train = "{data}"
shuffle = false
max_length = {a.max_length}
max_prompt_length = {a.max_length // 2}
[objective]
loss = "sigmoid"
beta = 0.1
[optim]
name = "adamw"
lr = 1e-6
schedule = "linear"
max_grad_norm = 1.0
[train]
max_steps = {a.steps}
global_batch_size = {a.batch}
micro_batch_size = {a.batch}
packing = {str(packing).lower()}
output = "{out}"
""")
    log = os.path.join(tmp, f"{name}.log")
    with open(log, "w") as lf:
        p = subprocess.run([os.path.join(a.bin, "dpo-worker"), "train", "--config", spec, "--device", a.device,
                            "--json"], stdout=subprocess.PIPE, stderr=lf, text=True, timeout=a.budget_s + 60)
    text = open(log).read()
    if p.returncode != 0:
        raise RuntimeError(f"{name}: exit {p.returncode}: {text[-1500:]}")
    rows = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl"))]
    secs = [r["tokens"] / r["tokens_per_second"] for r in rows[a.warmup:]]
    kernels = sorted(set(re.findall(r"attention kernel.*?mask=\"?([^\"]+?)\"? kernel=(\w+)", text)))
    return {"seconds_per_step": statistics.median(secs), "tokens_per_step": statistics.mean(r["tokens"] for r in rows),
            "peak_bytes": max(r.get("memory/peak_bytes", 0) for r in rows), "steps": len(rows),
            "attention_kernels": {m: k for m, k in kernels}}


def run_trl(a, model, data, tmp, name, precompute):
    cfg = {"model": model, "data": data, "steps": a.steps, "batch": a.batch, "max_length": a.max_length,
           "precompute": precompute, "device": a.device, "bf16": a.dtype == "bf16", "out": os.path.join(tmp, name)}
    p = subprocess.run([sys.executable, "-c", TRL_SCRIPT, json.dumps(cfg)], capture_output=True, text=True,
                       timeout=a.budget_s + 60)
    with open(os.path.join(tmp, f"{name}.log"), "w") as f:
        f.write(p.stderr)
    if p.returncode != 0:
        raise RuntimeError(f"{name}: exit {p.returncode}: {p.stderr[-1500:]}")
    res = json.loads([l for l in p.stdout.splitlines() if l.startswith("RESULT ")][-1][7:])
    t = res.pop("step_end_times")
    gaps = [b - a_ for a_, b in zip(t, t[1:])][max(0, a.warmup - 1):]
    return {"seconds_per_step": statistics.median(gaps), **res}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", default=os.path.join(ROOT, "target", "release"))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default=None, help="write the results here (JSON)")
    ap.add_argument("--budget-s", type=int, default=240, help="skip configurations once this is spent")
    ap.add_argument("--tiny", action="store_true", help="a tiny model and short pairs (testing the script)")
    ap.add_argument("--configs", default="ours,ours-packing,ours-cache,ours-cache-packing,trl,trl-precompute")
    a = ap.parse_args()
    if a.tiny:
        shape = dict(layers=2, hidden=64, heads=4, kv=2, inter=176, vocab=512)
        a.max_length, a.batch, a.steps, a.warmup, a.dtype = 256, 4, 4, 1, "f32"
        prompt, response, n = (10, 40), (10, 60), 32
    else:
        shape = dict(layers=16, hidden=2048, heads=16, kv=4, inter=8192, vocab=32000)
        a.max_length, a.batch, a.steps, a.warmup, a.dtype = 2048, 8, 10, 3, "bf16"
        # ~1.3 tokens per word: prompts 300-600 tokens, responses 450-1000.
        prompt, response, n = (250, 450), (350, 750), 160
    start = time.time()
    result = {"model": shape, "batch_pairs": a.batch, "max_length": a.max_length, "dtype": a.dtype,
              "device": a.device, "steps": a.steps, "warmup_steps": a.warmup, "peak_flops": PEAK, "configs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        model = os.path.join(tmp, "model")
        subprocess.run([sys.executable, os.path.join(ROOT, "examples", "tiny_model.py"), "--out", model,
                        "--arch", "llama", "--hidden", str(shape["hidden"]), "--layers", str(shape["layers"]),
                        "--heads", str(shape["heads"]), "--kv-heads", str(shape["kv"]),
                        "--intermediate", str(shape["inter"]), "--model-vocab", str(shape["vocab"]),
                        "--max-positions", str(a.max_length), "--init-std", "0.02"]
                       + ([] if a.tiny else ["--dtype", "bfloat16"]),
                       check=True, capture_output=True)
        data = os.path.join(tmp, "pairs.jsonl")
        pairs(data, n, prompt, response)
        N = parameter_count(model)
        result["parameters"] = N
        cache = os.path.join(tmp, "reference-cache")
        runners = {
            "ours": lambda: run_ours(a, model, data, tmp, "ours", False, False, "none"),
            "ours-packing": lambda: run_ours(a, model, data, tmp, "ours-packing", True, False, "none"),
            "ours-cache": lambda: run_ours(a, model, data, tmp, "ours-cache", False, True, cache),
            "ours-cache-packing": lambda: run_ours(a, model, data, tmp, "ours-cache-packing", True, True, cache),
            "trl": lambda: run_trl(a, model, data, tmp, "trl", False),
            "trl-precompute": lambda: run_trl(a, model, data, tmp, "trl-precompute", True),
        }
        for name in [c for c in a.configs.split(",") if c]:
            if time.time() - start > a.budget_s:
                result["configs"][name] = {"skipped": f"budget of {a.budget_s} s spent"}
                continue
            t = time.time()
            try:
                result["configs"][name] = runners[name]()
            except Exception as e:  # noqa: BLE001 - recorded per configuration
                result["configs"][name] = {"error": str(e)[-2000:]}
            result["configs"][name]["wall_seconds"] = round(time.time() - t, 1)
            print(name, json.dumps(result["configs"][name]), flush=True)
    tokens = next((c["tokens_per_step"] for c in result["configs"].values() if "tokens_per_step" in c), None)
    result["tokens_per_step"] = tokens
    for name, c in result["configs"].items():
        if "seconds_per_step" not in c or not tokens:
            continue
        cached = "cache" in name or "precompute" in name
        flops = (6 * N + (0 if cached else 2 * N)) * tokens
        c["tokens_per_second"] = tokens / c["seconds_per_step"]
        c["mfu"] = flops / c["seconds_per_step"] / PEAK
    sec = {k: v.get("seconds_per_step") for k, v in result["configs"].items()}
    for ours, trl in [("ours", "trl"), ("ours-packing", "trl"), ("ours-cache", "trl-precompute"),
                      ("ours-cache-packing", "trl-precompute")]:
        if sec.get(ours) and sec.get(trl):
            result["configs"][ours][f"speedup_vs_{trl}"] = sec[trl] / sec[ours]
    result["seconds"] = round(time.time() - start, 1)
    text = json.dumps(result, indent=2)
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
