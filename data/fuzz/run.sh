#!/usr/bin/env bash
# Fuzzes every dataset reader for SECONDS each (default 600), one after the
# other, then minimises each corpus so what is kept stays small. Needs the
# nightly toolchain and cargo-fuzz (`cargo install cargo-fuzz`). A crash is
# left under artifacts/<target>/; copy it to regressions/<target>/ once fixed,
# and data/tests/fuzz_corpus.rs replays it in `make test`.
set -euo pipefail
cd "$(dirname "$0")"
. ../../scripts/env.sh
seconds=${1:-600}
targets=${TARGETS:-parquet arrow json jsonl conll}
[ -d corpus/parquet ] || "${DPO_PYTHON:-$HOME/.cache/dpo-cluster/venv/bin/python}" seeds.py corpus
for t in $targets; do
  echo "== $t: ${seconds}s"
  # 2 GiB of resident memory, and no single allocation over 1 GiB: the
  # readers run under 64 MiB decoded-byte budgets here (src/lib.rs), so a
  # file that gets past them shows up as a crash. Leak detection is off: the
  # one leak it reports is glibc's 32-byte list of thread-exit destructors
  # (`__cxa_thread_atexit_impl`, a thread-local of a reader's thread), not a
  # reader's; the RSS limit catches memory that grows.
  cargo +nightly fuzz run -O "$t" -- -max_total_time="$seconds" -rss_limit_mb=2048 \
    -malloc_limit_mb=1024 -timeout=20 -max_len=65536 -print_final_stats=1 -detect_leaks=0
  # A loaded machine can time an input out while minimising: keep going.
  cargo +nightly fuzz cmin -O "$t" -- -rss_limit_mb=2048 -timeout=60 || echo "cmin of $t failed"
done
