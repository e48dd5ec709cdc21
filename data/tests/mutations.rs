//! A stable-Rust mutation harness over every dataset reader (`cargo fuzz`
//! needs a nightly toolchain): small valid files written by pyarrow and by hand
//! (Parquet with row groups, nested and zstd columns; a zstd Arrow IPC stream
//! and an Arrow IPC file, each first read whole; a
//! JSON array; JSON lines) are damaged by seeded byte changes, insertions and
//! truncations, and each damaged file is read to its end. A reader may refuse a
//! file or read garbage; it must never panic, hang or allocate without bound.
//! A failing seed replays exactly (`MUTATION_SEED=N`).

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use dpo_data::records::{self, Layout};

/// xorshift64*: the seed decides every mutation.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

fn mutate(bytes: &[u8], seed: u64) -> Vec<u8> {
    let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let mut v = bytes.to_vec();
    for _ in 0..1 + rng.below(4) {
        match rng.below(5) {
            0 | 1 => {
                let at = rng.below(v.len());
                v[at] = rng.next() as u8;
            }
            2 => {
                // A field's bytes set to an extreme (lengths, counts, offsets).
                let at = rng.below(v.len());
                let fill = if rng.below(2) == 0 { 0xff } else { 0x00 };
                for b in v.iter_mut().skip(at).take(1 + rng.below(8)) {
                    *b = fill;
                }
            }
            3 => {
                let at = rng.below(v.len());
                let extra: Vec<u8> = (0..1 + rng.below(16)).map(|_| rng.next() as u8).collect();
                v.splice(at..at, extra);
            }
            _ => {
                let keep = rng.below(v.len());
                v.truncate(keep.max(1));
            }
        }
    }
    v
}

/// Reads every record of `path`; how many were objects (panics propagate:
/// they are the bug).
fn read_all(path: &Path) -> usize {
    let layout = Layout {
        limits: dpo_proto::DataLimits {
            max_rows: 100_000,
            max_value_bytes: 1 << 20,
            max_decoded_bytes: 64 << 20,
            max_nesting: 32,
        },
        ..Layout::default()
    };
    let Ok(rows) = records::open(path, &layout, &[]) else {
        return 0;
    };
    let mut n = 0;
    for row in rows.take(200_000) {
        match row {
            Ok(r) => n += usize::from(r.value.is_ok()),
            Err(_) => return n,
        }
    }
    n
}

#[test]
fn damaged_files_of_every_format_are_refused_or_read_never_panicking() {
    let dir = tempfile::tempdir().expect("tmp");
    let script = r#"
import os, sys, json
import pyarrow as pa, pyarrow.parquet as pq, pyarrow.ipc as ipc
out = sys.argv[1]
rows = [{"prompt": f"question {i} Café 東京", "chosen": "a" * (i % 7), "rejected": "b",
         "ids": list(range(i % 5)), "meta": {"k": i, "tags": ["x", "y"][: i % 3]}} for i in range(40)]
table = pa.Table.from_pylist(rows)
pq.write_table(table, os.path.join(out, "seed.parquet"), row_group_size=15, compression="zstd")
pq.write_table(table, os.path.join(out, "seed-snappy.parquet"), row_group_size=20, compression="snappy",
               use_dictionary=False, data_page_version="2.0")
with ipc.new_stream(os.path.join(out, "seed.arrow"), table.schema,
                    options=ipc.IpcWriteOptions(compression="zstd")) as w:
    w.write_table(table, max_chunksize=16)
with ipc.new_file(os.path.join(out, "seed-file.arrow"), table.schema) as w:
    w.write_table(table, max_chunksize=16)
with open(os.path.join(out, "seed.json"), "w") as f:
    json.dump(rows, f, ensure_ascii=False)
with open(os.path.join(out, "seed.jsonl"), "w") as f:
    for r in rows:
        f.write(json.dumps(r, ensure_ascii=False) + "\n")
"#;
    common::run_script(script, dir.path(), &[]);
    let only: Option<u64> = std::env::var("MUTATION_SEED")
        .ok()
        .and_then(|s| s.parse().ok());
    let per_format: u64 = std::env::var("MUTATIONS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(400);
    let mut slowest = Duration::ZERO;
    for name in [
        "seed.parquet",
        "seed-snappy.parquet",
        "seed.arrow",
        "seed-file.arrow",
        "seed.json",
        "seed.jsonl",
    ] {
        let original = std::fs::read(dir.path().join(name)).expect("seed file");
        assert_eq!(read_all(&dir.path().join(name)), 40, "{name} read whole");
        let ext = name.rsplit('.').next().expect("extension");
        let case = dir.path().join(format!("case.{ext}"));
        let seeds: Vec<u64> = match only {
            Some(s) => vec![s],
            None => (0..per_format).collect(),
        };
        for seed in seeds {
            std::fs::write(&case, mutate(&original, seed)).expect("write");
            let start = Instant::now();
            let outcome = std::panic::catch_unwind(|| {
                read_all(&case);
            });
            slowest = slowest.max(start.elapsed());
            assert!(
                outcome.is_ok(),
                "{name}: seed {seed} panicked the reader (MUTATION_SEED={seed} replays it)"
            );
        }
    }
    eprintln!("slowest damaged file: {slowest:?}");
    assert!(slowest < Duration::from_secs(10), "{slowest:?}");
}
