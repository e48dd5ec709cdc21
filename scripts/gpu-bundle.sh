#!/usr/bin/env bash
# Builds what scripts/gpu-check.sh needs on a GPU machine that has PyTorch but no
# Rust, no network and no trl, into one git-ignored folder (default gpu-bundle/):
#   bin/      dpo-worker, dpo-coordinator, dpoctl, cuda_check — release, stripped
#   wheels/   trl and the packages it needs that the GPU image lacks
#             (datasets, dill, multiprocess), for CPython 3.12
# and checks that it stays under 60 MiB (the device tool carries at most 64 MiB).
# Used by `make gpu-bundle`; the device run then carries this folder:
#   bash scripts/gpu-check.sh "$OUT"      (from the repository root, there)
set -euo pipefail
cd "$(dirname "$0")/.."
BUNDLE=${1:-gpu-bundle}
. scripts/env.sh
rm -rf "$BUNDLE"
mkdir -p "$BUNDLE/bin" "$BUNDLE/wheels"
cargo build --release -p dpo-worker -p dpo-coordinator -p dpoctl --bins --example cuda_check
for b in dpo-worker dpo-coordinator dpoctl; do
    strip -o "$BUNDLE/bin/$b" "target/release/$b"
done
strip -o "$BUNDLE/bin/cuda_check" target/release/examples/cuda_check
# The versions this repository's bench venv uses (bench/requirements.txt).
"$DPO_PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$BUNDLE/wheels" \
    trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
size=$(du -sb "$BUNDLE" | cut -f1)
echo "$BUNDLE: $((size / 1048576)) MiB"
ls -la "$BUNDLE/bin" "$BUNDLE/wheels"
if [ "$size" -gt $((60 * 1048576)) ]; then
    echo "$BUNDLE is over 60 MiB" >&2
    exit 1
fi
