#!/usr/bin/env bash
# The GPU check, one command: bash scripts/gpu-check.sh OUT_DIR [gpu_check.py options]
#
# Runs on the GPU machine from the repository root, with the folder `make
# gpu-bundle` built here (GPU_BUNDLE, default gpu-bundle/): its binaries run
# against that machine's PyTorch (LD_LIBRARY_PATH → its torch/lib), its wheels
# (trl and what it needs) go into a scratch site folder. Everything lands in
# OUT_DIR: summary.json (every check's figures; rewritten after each check),
# bench.json and logs.tar.gz. Made to finish in under 8 minutes on an H200.
# On a machine without a GPU: bash scripts/gpu-check.sh OUT --device cpu
# (NCCL checks skipped) — how this script is tested.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: scripts/gpu-check.sh OUT_DIR [--device cuda] [--skip a,b]}
shift
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
BUNDLE=${GPU_BUNDLE:-gpu-bundle}
PY=${DPO_PYTHON:-python3}
if [ -d "$BUNDLE/bin" ]; then
    BIN=$(cd "$BUNDLE/bin" && pwd)
else
    BIN=$(pwd)/target/release
fi
TORCH_LIB=$("$PY" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')
export LD_LIBRARY_PATH="$TORCH_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
if ! "$PY" -c 'import trl' 2>/dev/null && [ -d "$BUNDLE/wheels" ]; then
    SITE=$(mktemp -d)
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" "$BUNDLE"/wheels/*.whl
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
{
    echo "host: $(hostname); $(date -u +%FT%TZ)"
    nvidia-smi 2>/dev/null || echo "no nvidia-smi"
    "$BIN/dpo-worker" --version
} > "$OUT/environment.txt" 2>&1
"$PY" scripts/gpu_check.py "$OUT" --bin "$BIN" "$@"
rc=$?
tar -czf "$OUT/logs.tar.gz" -C "$OUT" logs && rm -rf "$OUT/logs"
rm -rf "$OUT/work"
exit $rc
