#!/usr/bin/env python3
"""Ranks that share a host must share its cores: steps/s of one `dpo-worker
train` process against 1, 2 and 4 workers on this host (`dpoctl local
--workers N`: a coordinator on the embedded store and N CPU workers), the same
DPO run (tiny Llama: hidden 128, 4 layers, f32, SGD, global batch 16,
micro-batch 4), measured in one run:

  - "shared": as the workers choose by themselves (each takes the usable cores
    divided by the ranks of its generation on its host, `worker/src/threads.rs`);
  - "every core": `--threads` (DPO_THREADS) set to the host's cores for every
    process, which is what each rank's libtorch took before (every rank takes
    every core; libtorch's default is one intra-op thread per core).

Steps/s are timed between the 5th and the last step (polling metrics.jsonl), so
start-up is not counted.

    python bench/host_threads.py              # after `cargo build`
    DPO_BIN=target/release python bench/host_threads.py
Prints one JSON object; docs/BENCHMARKS.md records its output.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(os.environ.get("DPO_BIN", ROOT / "target" / "debug"))
PY = sys.executable
WARMUP = 5


def spec(work: Path, name: str, steps: int, extra: str = "") -> Path:
    path = work / f"{name}.toml"
    path.write_text(f"""name = "{name}"
[model]
path = "{work / 'model'}"
dtype = "f32"
[data]
train = "{work / 'data' / 'train.jsonl'}"
max_length = 64
max_prompt_length = 32
[objective]
loss = "sigmoid"
[optim]
name = "sgd"
lr = 0.01
[train]
max_steps = {steps}
global_batch_size = 16
micro_batch_size = 4
checkpoint_every = 0
output = "{work / name}"
{extra}
""")
    return path


def timed(cmd: list, metrics: Path, steps: int, env: dict) -> float:
    """Runs `cmd` and returns steps/s from step WARMUP to the last step."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t_warm = t_end = None
    while True:
        try:
            n = sum(1 for l in metrics.read_text().splitlines() if l.strip())
        except FileNotFoundError:
            n = 0
        now = time.monotonic()
        if t_warm is None and n >= WARMUP:
            t_warm = now
        if n >= steps:
            t_end = now
            break
        if proc.poll() is not None:
            raise SystemExit(f"{cmd[0]} exited {proc.returncode} after {n} steps")
        time.sleep(0.01)
    proc.wait(timeout=120)
    return (steps - WARMUP) / (t_end - t_warm)


def main() -> None:
    work = ROOT / "out" / "bench-threads"
    subprocess.run(["rm", "-rf", str(work)], check=True)
    work.mkdir(parents=True)
    subprocess.run([PY, ROOT / "examples/tiny_model.py", "--out", work / "model", "--arch", "llama",
                    "--hidden", "128", "--layers", "4"], check=True, stdout=subprocess.DEVNULL)
    subprocess.run([PY, ROOT / "examples/make_pairs.py", "--task", "copy", "--out", work / "data",
                    "--n", "512", "--eval-n", "16"], check=True, stdout=subprocess.DEVNULL)
    cores = os.cpu_count() or 1
    base = {k: v for k, v in os.environ.items()
            if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "DPO_THREADS")}
    every = dict(base, DPO_THREADS=str(cores))
    result = {"cores": cores, "binaries": str(BIN), "steps_per_second": {}}
    rates = result["steps_per_second"]
    steps = int(os.environ.get("STEPS", "200"))
    name = "one-process"
    rates[name] = timed([BIN / "dpo-worker", "train", "--device", "cpu", "--config",
                         spec(work, name, steps)], work / name / "metrics.jsonl", steps, base)
    for n in (1, 2, 4):
        for label, env, k in (("shared", base, steps), ("every-core", every, 25)):
            name = f"{n}-workers-{label}"
            rates[name] = timed([BIN / "dpoctl", "local", spec(work, name, k), "--workers", str(n),
                                 "--data-dir", work / f"{name}-coordinator"],
                                work / name / "metrics.jsonl", k, env)
    # The third row: ZeRO stage 1 with replicas, 4 workers.
    for label, env, k in (("shared", base, steps), ("every-core", every, 25)):
        name = f"4-workers-zero1-replicas-{label}"
        rates[name] = timed([BIN / "dpoctl", "local", spec(work, name, k, "zero_stage = 1\nzero_replicas = 2"),
                             "--workers", "4", "--data-dir", work / f"{name}-coordinator"],
                            work / name / "metrics.jsonl", k, env)
    one = rates["one-process"]
    result["ratio_to_one_process"] = {k: round(v / one, 3) for k, v in rates.items()}
    result["steps_per_second"] = {k: round(v, 2) for k, v in rates.items()}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
