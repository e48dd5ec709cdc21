#!/usr/bin/env python3
"""The GPU check: everything dpo-cluster must prove on a CUDA machine, in one run.

    python3 scripts/gpu_check.py OUT_DIR [--bin DIR] [--device cuda] [--skip bench,...]
                                         [--budget-s 420]

Run by `scripts/gpu-check.sh` (which finds the bundle's binaries and libtorch).
Each check writes its log under OUT_DIR/logs/ and its figures into
OUT_DIR/summary.json, which is rewritten after every check (a run cut short
still leaves what it did). Checks, in order:

  logits        our logits on the GPU vs transformers' on the GPU, f32 (≤ 1e-4)
                and bf16 (our error against f32 no larger than transformers'
                bf16 error, ×2), one sequence at a time and as a padded batch,
                on the Llama, Qwen2 and Mistral test checkpoints
  dpo           a short DPO run (AdamW, clipping, micro-batches of 2 in 4) vs
                the PyTorch reference trained on the same GPU (weights ≤ 1e-4)
  packing       packed vs padded: the same step's log-probs and loss (≤ 1e-4)
  bf16          bf16 training with f32 masters vs the f32 run (within bf16's
                rounding), masters kept in f32 in the checkpoint
  nccl          a world of one through NCCL: each operation's result, and a
                generation abort freeing a rank stuck forming a world of two
  cluster-nccl  coordinator + one GPU worker, cluster.backend = "nccl"
  cluster-tcp   coordinator + two ranks on the one GPU over the tcp ring with
                CUDA tensors: the same weights as one process (≤ 1e-5)
  bench         bench/gpu_dpo.py: tokens/s, MFU and peak memory, ours vs TRL

`--device cpu` runs the same checks on the CPU (NCCL ones are then skipped):
how the script itself is tested on machines without a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable


class Check:
    def __init__(self, out: Path, args):
        self.out = out
        self.args = args
        self.logs = out / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.work = out / "work"
        self.work.mkdir(parents=True, exist_ok=True)
        self.bin = Path(args.bin)
        self.device = args.device
        self.summary = {"device": args.device, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                        "checks": {}}
        self.t0 = time.time()

    def save(self) -> None:
        self.summary["seconds"] = round(time.time() - self.t0, 1)
        (self.out / "summary.json").write_text(json.dumps(self.summary, indent=2) + "\n")

    def run(self, name: str, args: list, log: str, env=None, timeout=300, check=True):
        with open(self.logs / f"{log}.log", "a") as f:
            f.write(f"$ {' '.join(map(str, args))}\n")
            f.flush()
            p = subprocess.run([str(a) for a in args], stdout=subprocess.PIPE, stderr=f, env=env,
                               timeout=timeout, text=True)
        if check and p.returncode != 0:
            raise RuntimeError(f"{name}: exit {p.returncode} (see logs/{log}.log)")
        return p


def environment(c: Check) -> dict:
    import torch
    import transformers
    info = {"torch": torch.__version__, "transformers": transformers.__version__, "python": sys.version.split()[0]}
    if c.device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
        info["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
    return info


def fixtures(c: Check) -> Path:
    out = c.work / "fixtures"
    if not (out / "pairs_tokens.jsonl").exists():
        c.run("fixtures", [PY, ROOT / "tests/reference/hf_reference.py", "fixtures", out], "fixtures")
    return out


def check_logits(c: Check, fx: Path) -> dict:
    import torch
    import transformers
    from safetensors.torch import load_file
    inputs = fx / "ref" / "inputs.safetensors"
    seqs = load_file(str(inputs))
    n = len(seqs)
    res = {}
    worst = 0.0
    for arch in ["llama", "qwen2", "mistral"]:
        model_dir = fx / arch
        theirs = {}
        for dtype in ["f32", "bf16"]:
            tdtype = torch.float32 if dtype == "f32" else torch.bfloat16
            m = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=tdtype,
                                                                  attn_implementation="eager").to(c.device).eval()
            with torch.no_grad():
                theirs[dtype] = [m(input_ids=seqs[f"input_ids.{i}"].long()[None].to(c.device)).logits[0].float().cpu()
                                 for i in range(n)]
            del m
            ours_path = c.work / f"logits-{arch}-{dtype}.safetensors"
            c.run("logits", [c.bin / "cuda_check", "logits", "--model", model_dir, "--inputs", inputs,
                             "--out", ours_path, "--device", c.device, "--dtype", dtype], "logits")
            ours = load_file(str(ours_path))
            for mode in ["logits", "padded"]:
                diffs = [float((ours[f"{mode}.{i}"] - theirs[dtype][i]).abs().max()) for i in range(n)]
                res[f"{arch}/{dtype}/{mode}"] = max(diffs)
        for mode in ["logits", "padded"]:
            # bf16: our error against transformers' f32 logits vs theirs in bf16.
            ours_bf = load_file(str(c.work / f"logits-{arch}-bf16.safetensors"))
            ours_err = max(float((ours_bf[f"{mode}.{i}"] - theirs["f32"][i]).abs().max()) for i in range(n))
            their_err = max(float((theirs["bf16"][i] - theirs["f32"][i]).abs().max()) for i in range(n))
            res[f"{arch}/bf16/{mode}/our_error_vs_f32"] = ours_err
            res[f"{arch}/bf16/{mode}/transformers_error_vs_f32"] = their_err
            if ours_err > 2 * their_err + 1e-3:
                raise RuntimeError(f"{arch} bf16 {mode}: our error {ours_err:.3g} vs transformers' {their_err:.3g}")
        for mode in ["logits", "padded"]:
            worst = max(worst, res[f"{arch}/f32/{mode}"])
    res["max_f32_abs_diff"] = worst
    if worst > 1e-4:
        raise RuntimeError(f"f32 logits differ by {worst:.3g} > 1e-4")
    return res


def spec_text(name: str, model: Path, data: Path, out: Path, *, dtype="f32", packing=False, steps=3,
              backend="auto", extra="") -> str:
    return f"""name = "{name}"
[model]
path = "{model}"
dtype = "{dtype}"
[reference]
path = "same"
[data]
train = "{data}"
shuffle = false
max_length = 512
max_prompt_length = 256
[objective]
loss = "sigmoid"
beta = 0.1
[optim]
name = "adamw"
lr = 1e-3
weight_decay = 0.0
max_grad_norm = 1.0
schedule = "constant"
warmup_steps = 0
[train]
max_steps = {steps}
global_batch_size = 4
micro_batch_size = 2
packing = {str(packing).lower()}
output = "{out}"
{extra}
[cluster]
backend = "{backend}"
"""


def weights(path: Path) -> dict:
    """The tensors of a safetensors file, or of every shard in a model folder, as f32."""
    from safetensors.torch import load_file
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
    return {k: v.float() for f in files for k, v in load_file(str(f)).items()}


def max_diff(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a if k in b)


def train(c: Check, name: str, spec: str, log: str, timeout=300) -> Path:
    path = c.work / f"{name}.toml"
    path.write_text(spec)
    c.run(name, [c.bin / "dpo-worker", "train", "--config", path, "--device", c.device, "--json"], log,
          timeout=timeout)
    return c.work / name


def check_dpo(c: Check, fx: Path) -> dict:
    model, data = fx / "llama", fx / "pairs_tokens.jsonl"
    out = train(c, "dpo", spec_text("dpo", model, data, c.work / "dpo"), "dpo")
    case = {"name": "dpo", "loss": "sigmoid", "beta": 0.1, "label_smoothing": 0.0, "nll_weight": 0.0,
            "negative_weight": 0.5, "optimizer": "adamw", "lr": 1e-3, "weight_decay": 0.0, "max_grad_norm": 1.0,
            "warmup_steps": 0, "schedule": "constant_with_warmup", "steps": 3, "global_batch_size": 4,
            "reference_free": False, "out": str(c.work / "dpo.reference.safetensors")}
    cases = c.work / "dpo-cases.json"
    cases.write_text(json.dumps({"model": str(model), "data": str(data), "device": c.device, "cases": [case]}))
    c.run("reference", [PY, ROOT / "tests/reference/dpo_reference.py", cases], "dpo")
    ours, theirs = weights(out / "final/model.safetensors"), weights(c.work / "dpo.reference.safetensors")
    diff = max_diff(ours, theirs)
    res = {"max_weight_diff_vs_pytorch": diff, "weights_moved": max_diff(ours, weights(model))}
    if diff > 1e-4:
        raise RuntimeError(f"DPO weights differ from PyTorch's by {diff:.3g} > 1e-4")
    return res


def metrics(out: Path) -> list:
    return [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if l.strip()]


def check_packing(c: Check, fx: Path) -> dict:
    model, data = fx / "llama", fx / "pairs_tokens.jsonl"
    padded = metrics(train(c, "padded", spec_text("padded", model, data, c.work / "padded", steps=1), "packing"))
    packed = metrics(train(c, "packed", spec_text("packed", model, data, c.work / "packed", steps=1, packing=True),
                           "packing"))
    res = {}
    for k in ["logps/chosen", "logps/rejected", "loss"]:
        a, b = padded[0][k], packed[0][k]
        res[k] = abs(a - b) / max(1.0, abs(a))
    if max(res.values()) > 1e-4:
        raise RuntimeError(f"packed vs padded: {res}")
    return res


def check_bf16(c: Check, fx: Path) -> dict:
    from safetensors import safe_open
    model, data = fx / "llama", fx / "pairs_tokens.jsonl"
    extra = "checkpoint_every = 2\n"
    f32 = train(c, "f32", spec_text("f32", model, data, c.work / "f32", extra=extra), "bf16")
    bf = train(c, "bf16", spec_text("bf16", model, data, c.work / "bf16", dtype="bf16", extra=extra), "bf16")
    a, b = weights(f32 / "final/model.safetensors"), weights(bf / "final/model.safetensors")
    rel = max(float((a[k] - b[k]).abs().max() / a[k].abs().max().clamp(min=1e-6)) for k in a)
    moved = max_diff(a, weights(model))
    masters = {}
    for p in sorted((bf / "checkpoints").rglob("optimizer*.safetensors")):
        with safe_open(str(p), "pt") as f:
            for k in f.keys():
                if "master" in k:
                    masters[k] = str(f.get_slice(k).get_dtype())
    res = {"max_rel_diff_bf16_vs_f32": rel, "f32_weights_moved": moved, "master_tensors": len(masters),
           "master_dtypes": sorted(set(masters.values()))}
    if not masters or set(masters.values()) != {"F32"}:
        raise RuntimeError(f"no f32 masters in the bf16 checkpoint: {res}")
    if rel > 2e-2:
        raise RuntimeError(f"bf16 run strays from f32 by {rel:.3g} (relative) > 2e-2")
    return res


def check_nccl(c: Check) -> dict:
    p = c.run("nccl", [c.bin / "cuda_check", "nccl", "--device", c.device], "nccl", timeout=180)
    res = json.loads(p.stdout.strip().splitlines()[-1])
    bad = [k for k, v in res["max_abs_diff"].items() if (v is not True and v != 0.0 and not isinstance(v, bool))
           or v is False]
    if bad:
        raise RuntimeError(f"NCCL results differ: {bad}")
    if not res["abort_returned"] or res["abort_seconds"] > 2.0:
        raise RuntimeError(f"the abort did not free the rank promptly: {res}")
    if not res["deadline_returned"]:
        raise RuntimeError(f"the deadline did not free the rank: {res}")
    return res


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cluster(c: Check, name: str, spec: str, devices: list, log: str, timeout=300) -> Path:
    """A coordinator on loopback, one worker per entry of `devices`, one run; waits for its end."""
    work = c.work / name
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    spec_path = work / "run.toml"
    spec_path.write_text(spec)
    port = free_port()
    env = dict(os.environ)
    env.pop("DPO_TOKEN", None)
    procs = []
    logf = open(c.logs / f"{log}.log", "a")
    try:
        procs.append(subprocess.Popen([c.bin / "dpo-coordinator", "--listen", f"127.0.0.1:{port}",
                                       "--data-dir", work / "coord", "--allow-path", c.work],
                                      stdout=logf, stderr=logf, env=env))
        time.sleep(0.5)
        for i, d in enumerate(devices):
            procs.append(subprocess.Popen([c.bin / "dpo-worker", "--coordinator", f"http://127.0.0.1:{port}",
                                           "--device", d, "--worker-id", f"{name}-{i}"],
                                          stdout=logf, stderr=logf, env=env))
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 60
        while time.time() < deadline:
            p = subprocess.run([c.bin / "dpoctl", "--coordinator", url, "--output", "json", "workers"],
                               capture_output=True, text=True, env=env)
            if len(p.stdout.splitlines()) >= len(devices):
                break
            time.sleep(0.2)
        p = subprocess.run([c.bin / "dpoctl", "--coordinator", url, "--output", "json", "submit", spec_path],
                           capture_output=True, text=True, env=env)
        logf.write(p.stdout + p.stderr)
        if p.returncode != 0:
            raise RuntimeError(f"{name}: submit failed: {p.stderr[-500:]}")
        run_id = json.loads(p.stdout.strip().splitlines()[-1])["id"]
        end = time.time() + timeout
        state = ""
        while time.time() < end:
            p = subprocess.run([c.bin / "dpoctl", "--coordinator", url, "--output", "json", "status", run_id],
                               capture_output=True, text=True, env=env)
            try:
                state = str(json.loads(p.stdout.strip().splitlines()[-1]).get("state", ""))
            except (json.JSONDecodeError, IndexError):
                pass
            if state in ("succeeded", "failed", "cancelled"):
                break
            time.sleep(0.5)
        logf.write(f"final state: {state}\n")
        if state != "succeeded":
            raise RuntimeError(f"{name}: run ended as {state or 'unknown'} (see logs/{log}.log)")
        return work
    finally:
        for p in procs[::-1]:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
        logf.close()


def check_cluster_nccl(c: Check, fx: Path) -> dict:
    out = c.work / "cluster-nccl-out"
    spec = spec_text("cluster-nccl", fx / "llama", fx / "pairs_tokens.jsonl", out, backend="nccl")
    cluster(c, "cluster-nccl", spec, [c.device], "cluster-nccl")
    log = (c.logs / "cluster-nccl.log").read_text()
    ready = "NCCL communicator ready" in log
    m = metrics(out)
    if not ready:
        raise RuntimeError("the worker never formed an NCCL communicator")
    return {"steps": len(m), "nccl_communicator_ready": ready, "last_loss": m[-1]["loss"]}


def check_cluster_tcp(c: Check, fx: Path) -> dict:
    out = c.work / "cluster-tcp-out"
    spec = spec_text("cluster-tcp", fx / "llama", fx / "pairs_tokens.jsonl", out, backend="tcp",
                     extra="").replace("[cluster]\n", "[cluster]\nmin_workers = 2\nmax_workers = 2\n")
    cluster(c, "cluster-tcp", spec, [c.device, c.device], "cluster-tcp")
    solo = c.work / "dpo"
    if not (solo / "final/model.safetensors").exists():
        train(c, "dpo", spec_text("dpo", fx / "llama", fx / "pairs_tokens.jsonl", solo), "cluster-tcp")
    diff = max_diff(weights(out / "final/model.safetensors"), weights(solo / "final/model.safetensors"))
    worlds = sorted({l.get("world_size") for l in metrics(out)})
    if diff > 1e-5:
        raise RuntimeError(f"two ranks over tcp differ from one process by {diff:.3g} > 1e-5")
    return {"max_weight_diff_vs_one_process": diff, "world_sizes": worlds}


def check_bench(c: Check) -> dict:
    args = [PY, ROOT / "bench/gpu_dpo.py", "--bin", c.bin, "--device", c.device,
            "--out", c.out / "bench.json", "--budget-s", str(c.args.bench_budget_s)]
    if c.device == "cpu":
        args.append("--tiny")
    c.run("bench", args, "bench", timeout=c.args.bench_budget_s + 120)
    return json.loads((c.out / "bench.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--bin", default=str(ROOT / "target/release"))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--skip", default="", help="comma-separated checks to skip")
    ap.add_argument("--bench-budget-s", type=int, default=240)
    args = ap.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    c = Check(out, args)
    skip = set(filter(None, args.skip.split(",")))
    try:
        c.summary["environment"] = environment(c)
    except Exception as e:  # noqa: BLE001 - recorded, not fatal
        c.summary["environment"] = {"error": repr(e)}
    c.save()
    fx = fixtures(c)
    gpu = c.device.startswith("cuda")
    checks = [
        ("logits", lambda: check_logits(c, fx)),
        ("dpo", lambda: check_dpo(c, fx)),
        ("packing", lambda: check_packing(c, fx)),
        ("bf16", lambda: check_bf16(c, fx)),
        ("nccl", (lambda: check_nccl(c)) if gpu else None),
        ("cluster-nccl", (lambda: check_cluster_nccl(c, fx)) if gpu else None),
        ("cluster-tcp", lambda: check_cluster_tcp(c, fx)),
        ("bench", lambda: check_bench(c)),
    ]
    failed = 0
    for name, fn in checks:
        if name in skip or fn is None:
            c.summary["checks"][name] = {"ok": None, "skipped": "asked" if name in skip else "needs CUDA"}
            c.save()
            continue
        t = time.time()
        print(f"== {name}", flush=True)
        try:
            res = fn()
            c.summary["checks"][name] = {"ok": True, "seconds": round(time.time() - t, 1), **res}
        except Exception as e:  # noqa: BLE001 - each check reports its own failure
            failed += 1
            c.summary["checks"][name] = {"ok": False, "seconds": round(time.time() - t, 1), "error": str(e),
                                         "trace": traceback.format_exc()[-2000:]}
        print(json.dumps({name: c.summary["checks"][name]}, default=str)[:2000], flush=True)
        c.save()
    c.summary["failed"] = failed
    c.save()
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
