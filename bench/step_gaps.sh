#!/usr/bin/env bash
# Where a 2-worker world's step time goes, on the embedded store (`dpoctl local`)
# and on etcd: runs the demo's tiny Llama for 400 / 600 steps with release
# binaries and per-step debug timings, then prints the gap between consecutive
# steps and the time spent in the coordinator's step report (p50 / p95 / max).
# Needs `make demo` once (the model and pairs under out/demo) and etcd on PATH.
# Usage: bench/step_gaps.sh [WORKDIR]
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
work=${1:-$(mktemp -d)}
bin=$root/target/release
py=${DPO_PYTHON:-python3}
cargo build --release -p dpo-coordinator -p dpo-worker -p dpoctl --bins >&2
mkdir -p "$work"
spec() { # $1 output, $2 steps
    cat <<TOML
name = "stall"
[model]
path = "$root/out/demo/model"
dtype = "f32"
[data]
train = "$root/out/demo/data/train.jsonl"
max_length = 64
max_prompt_length = 32
[objective]
loss = "sigmoid"
beta = 0.1
[optim]
lr = 1e-3
[train]
max_steps = $2
global_batch_size = 16
micro_batch_size = 8
checkpoint_every = 0
output = "$1"
[cluster]
min_workers = 2
max_workers = 2
TOML
}

# 1. The embedded store, through dpoctl local.
rm -rf "$work/local"
spec "$work/local" 400 > "$work/local.toml"
RUST_LOG=info,dpo_worker=debug "$bin/dpoctl" local "$work/local.toml" --workers 2 >&2
local_log=$work/local/.dpoctl-local/logs/worker-0.log

# 2. etcd on loopback.
rm -rf "$work/etcd-data" "$work/etcd-out" "$work/coord"
mkdir -p "$work/logs"
etcd --data-dir "$work/etcd-data" --listen-client-urls http://127.0.0.1:23790 \
    --advertise-client-urls http://127.0.0.1:23790 --listen-peer-urls http://127.0.0.1:23800 \
    > "$work/logs/etcd.log" 2>&1 &
pids=($!)
trap 'kill "${pids[@]}" 2>/dev/null || true' EXIT
sleep 2
"$bin/dpo-coordinator" --listen 127.0.0.1:7791 --store etcd --etcd http://127.0.0.1:23790 \
    --data-dir "$work/coord" --allow-path "$work" --allow-path "$root/out/demo" \
    > "$work/logs/coordinator.log" 2>&1 &
pids+=($!)
sleep 2
for i in 0 1; do
    RUST_LOG=info,dpo_worker=debug OMP_NUM_THREADS=1 "$bin/dpo-worker" \
        --coordinator http://127.0.0.1:7791 --device cpu --worker-id "w$i" > "$work/logs/w$i.log" 2>&1 &
    pids+=($!)
done
spec "$work/etcd-out" 600 > "$work/etcd.toml"
"$bin/dpoctl" --coordinator http://127.0.0.1:7791 submit "$work/etcd.toml" --watch >&2

"$py" - "$local_log" "$work/logs/w0.log" <<'PY'
import datetime, re, sys
for label, path in zip(["embedded", "etcd"], sys.argv[1:]):
    gaps, report, prev = [], [], None
    for line in open(path):
        line = re.sub(r"\x1b\[[0-9;]*m", "", line)
        if "step timings" not in line:
            continue
        t = datetime.datetime.fromisoformat(line.split()[0]).timestamp()
        report.append(float(re.search(r"report_ms=([\d.]+)", line).group(1)))
        if prev is not None:
            gaps.append((t - prev) * 1e3)
        prev = t
    q = lambda a, p: sorted(a)[min(len(a) - 1, int(len(a) * p))]
    print(f"{label}: {len(report)} steps; gap p50/p95/max {q(gaps,.5):.0f}/{q(gaps,.95):.0f}/{max(gaps):.0f} ms; "
          f"report p50/p95/max {q(report,.5):.1f}/{q(report,.95):.1f}/{max(report):.1f} ms; "
          f"gaps > 300 ms: {sum(g > 300 for g in gaps)}")
PY
