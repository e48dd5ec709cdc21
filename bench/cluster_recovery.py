#!/usr/bin/env python3
"""How fast the cluster repairs itself, and whether the coordinator keeps up.

Starts a real coordinator (embedded store, /metrics on), three CPU workers and a
DPO run on a tiny model, then:
  1. kill -9 of one worker (rank 0) mid-run: time from the kill to the next step
     recorded in metrics.jsonl (its process died: its stream closes at once);
  2. SIGSTOP of another worker (a frozen process, like a network cut: its sockets
     stay open, it just stops answering): time from the stop to the next step
     (the coordinator must notice the lease lapse, `--lease-ttl-ms`);
and reports the steady step time before and after, and the coordinator's batch
serving time against the rate at which the workers consume batches.

    python bench/cluster_recovery.py            # after `cargo build`
Prints one JSON object; docs/BENCHMARKS.md records its output.
"""

import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(os.environ.get("DPO_BIN", ROOT / "target" / "debug"))
PY = sys.executable
LEASE_MS = 2000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def lines(path: Path):
    try:
        return [json.loads(l) for l in path.read_text().splitlines() if l.strip()]
    except (FileNotFoundError, json.JSONDecodeError):
        return []


def main() -> None:
    work = ROOT / "out" / "bench-cluster"
    subprocess.run(["rm", "-rf", str(work)], check=True)
    work.mkdir(parents=True)
    subprocess.run([PY, ROOT / "examples/tiny_model.py", "--out", work / "model", "--hidden", "64",
                    "--layers", "2"], check=True, stdout=subprocess.DEVNULL)
    subprocess.run([PY, ROOT / "examples/make_pairs.py", "--task", "copy", "--out", work / "data",
                    "--n", "512", "--eval-n", "16"], check=True, stdout=subprocess.DEVNULL)
    spec = work / "run.toml"
    spec.write_text(f"""name = "recovery"
[model]
path = "{work / 'model'}"
[data]
train = "{work / 'data/train.jsonl'}"
max_length = 64
max_prompt_length = 32
[objective]
loss = "sigmoid"
[optim]
name = "adamw"
lr = 1e-3
[train]
max_steps = 400
global_batch_size = 16
micro_batch_size = 4
output = "{work / 'out'}"
[cluster]
min_workers = 1
max_workers = 3
""")
    port, mport = free_port(), free_port()
    logs = work / "logs"
    logs.mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("DPO_TOKEN", None)
    procs = []

    def start(name, args):
        p = subprocess.Popen([str(BIN / args[0])] + args[1:], stdout=subprocess.DEVNULL,
                             stderr=open(logs / f"{name}.log", "w"), env=env)
        procs.append(p)
        return p

    try:
        start("coordinator", ["dpo-coordinator", "--listen", f"127.0.0.1:{port}", "--data-dir",
                              str(work / "coord"), "--lease-ttl-ms", str(LEASE_MS),
                              "--metrics-listen", f"127.0.0.1:{mport}"])
        time.sleep(0.5)
        workers = [start(f"w{i}", ["dpo-worker", "--coordinator", f"http://127.0.0.1:{port}",
                                   "--device", "cpu", "--worker-id", f"w{i}"]) for i in range(3)]
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 60
        while time.time() < deadline:
            out = subprocess.run([str(BIN / "dpoctl"), "--coordinator", url, "--output", "json",
                                  "workers"], capture_output=True, text=True, env=env)
            if len(out.stdout.splitlines()) == 3:
                break
            time.sleep(0.1)
        subprocess.run([str(BIN / "dpoctl"), "--coordinator", url, "submit", str(spec)],
                       check=True, stdout=subprocess.DEVNULL, env=env)
        metrics = work / "out" / "metrics.jsonl"
        seen = {}  # step -> wall time first seen

        def poll_until(pred, timeout=120):
            end = time.time() + timeout
            while time.time() < end:
                for l in lines(metrics):
                    seen.setdefault(l["step"], (time.time(), l))
                if pred():
                    return
                time.sleep(0.005)
            raise SystemExit("timed out; see " + str(logs))

        def step_times(lo, hi):
            ts = [seen[s][0] for s in range(lo, hi + 1) if s in seen]
            return statistics.median([b - a for a, b in zip(ts, ts[1:])])

        poll_until(lambda: len(seen) >= 60)
        steady3 = step_times(30, 60)
        before = max(seen)
        t_kill = time.time()
        workers[0].send_signal(signal.SIGKILL)
        poll_until(lambda: any(s > before and l["world_size"] == 2 for s, (_, l) in seen.items()))
        first2 = min(s for s, (_, l) in seen.items() if s > before and l["world_size"] == 2)
        kill_to_step = seen[first2][0] - t_kill
        poll_until(lambda: max(seen) >= first2 + 40)
        steady2 = step_times(first2 + 10, first2 + 40)
        before = max(seen)
        t_stop = time.time()
        workers[1].send_signal(signal.SIGSTOP)
        poll_until(lambda: any(s > before and l["world_size"] == 1 for s, (_, l) in seen.items()))
        first1 = min(s for s, (_, l) in seen.items() if s > before and l["world_size"] == 1)
        stop_to_step = seen[first1][0] - t_stop
        workers[1].send_signal(signal.SIGCONT)
        poll_until(lambda: max(seen) >= first1 + 20)
        prom = urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=5).read().decode()
        vals = {l.split()[0]: float(l.split()[1]) for l in prom.splitlines()
                if l and not l.startswith("#") and "{" not in l}
        served = vals["dpo_batches_served_total"]
        serve_s = vals["dpo_batch_serve_seconds_total"] / served
        # Consumption: each rank fetches one batch per step.
        consumed_per_s = 2 / steady2
        result = {
            "steady_step_seconds": {"world_3": round(steady3, 4), "world_2": round(steady2, 4)},
            "kill9_to_next_step_seconds": round(kill_to_step, 3),
            "sigstop_to_next_step_seconds": round(stop_to_step, 3),
            "lease_ttl_seconds": LEASE_MS / 1000,
            "batches_served": int(served),
            "mean_batch_serve_ms": round(serve_s * 1000, 3),
            "serving_capacity_batches_per_s": round(1 / serve_s, 1),
            "consumption_batches_per_s_world_2": round(consumed_per_s, 1),
            "serving_over_consumption": round((1 / serve_s) / consumed_per_s, 1),
            "generations": sorted({l["generation"] for _, l in seen.values()}),
        }
        print(json.dumps(result, indent=1))
    finally:
        for p in procs:
            try:
                p.send_signal(signal.SIGCONT)
                p.kill()
                p.wait(timeout=5)
            except Exception:
                pass


if __name__ == "__main__":
    main()
