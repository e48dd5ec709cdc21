//! Big datasets are streamed, not loaded: reading every record of a ~190 MB
//! Parquet file (pyarrow's own, one row group) and of a JSON array of the same
//! records raises this process's peak memory by a small fraction of the file.
//! One test per binary, so nothing else moves the peak.

mod common;

use std::path::Path;

use dpo_data::records::{self, Layout};

/// A line of `/proc/self/status` in bytes (`VmHWM`: the peak resident size,
/// `VmRSS`: the current one).
fn status(key: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc");
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .expect("a /proc/self/status line")
        * 1024
}

/// Reads every record; the number of records and of bytes of text in them.
fn read_all(path: &Path) -> (usize, usize) {
    let mut n = 0;
    let mut bytes = 0;
    for row in records::open(path, &Layout::default(), &[]).expect("opens") {
        let obj = row.expect("row").value.expect("an object");
        bytes += obj
            .values()
            .filter_map(|v| v.as_str())
            .map(str::len)
            .sum::<usize>();
        n += 1;
    }
    (n, bytes)
}

#[test]
fn a_big_parquet_file_and_json_array_are_read_in_bounded_memory() {
    let dir = tempfile::tempdir().expect("tmp");
    let rows = 60_000usize;
    let script = r#"
import json, os, random, sys
import pyarrow as pa, pyarrow.parquet as pq
out, rows = sys.argv[1], int(sys.argv[2])
rng = random.Random(0)
words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))) for _ in range(5000)]
def text(n): return " ".join(rng.choice(words) for _ in range(n))
recs = [{"prompt": text(120), "chosen": text(200), "rejected": text(200)} for _ in range(rows)]
pq.write_table(pa.Table.from_pylist(recs), os.path.join(out, "big.parquet"), compression="zstd")
with open(os.path.join(out, "big.json"), "w") as f:
    json.dump(recs, f)
"#;
    common::run_script(script, dir.path(), &[&rows.to_string()]);
    let json = dir.path().join("big.json");
    let text_bytes = std::fs::metadata(&json).expect("json").len();
    assert!(text_bytes > 150 << 20, "a big file: {text_bytes} bytes");

    for name in ["big.json", "big.parquet"] {
        let path = dir.path().join(name);
        // Reset the peak to the current size (Linux: clear_refs 5).
        std::fs::write("/proc/self/clear_refs", "5").expect("clear_refs");
        let before = status("VmRSS:");
        let (n, bytes) = read_all(&path);
        let grew = status("VmHWM:").saturating_sub(before);
        eprintln!(
            "{name}: {} MB on disk, {n} records, {} MB of text; peak memory +{} MB",
            std::fs::metadata(&path).expect("file").len() >> 20,
            bytes >> 20,
            grew >> 20
        );
        assert_eq!(n, rows);
        assert!(bytes as u64 > 150 << 20);
        // Held whole, the text alone would be over 150 MB.
        assert!(
            grew < 48 << 20,
            "{name}: peak memory grew {} MB",
            grew >> 20
        );
    }
}
