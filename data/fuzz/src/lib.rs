//! The fuzzed entry points: one file's bytes, read the way the coordinator and
//! the workers read a dataset file, to its end. A reader may refuse the file or
//! read garbage; it must never panic, overflow its stack, hang or allocate
//! beyond the limits below (libFuzzer's `-rss_limit_mb` and `-malloc_limit_mb`
//! catch the last).
//!
//! Shared with `data/tests/fuzz_corpus.rs`, which replays the kept corpora on
//! stable Rust in `make test`.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use dpo_data::records::{self, Layout};
use dpo_data::tagged::{RawFile, Task};
use dpo_proto::{DataLimits, FileFormat};

/// The entry points, by target name.
pub const TARGETS: [&str; 5] = ["parquet", "arrow", "json", "jsonl", "conll"];

/// Limits small enough that a file the readers fail to bound shows up as an
/// allocation far beyond them.
fn layout(format: FileFormat) -> Layout {
    Layout {
        format,
        limits: DataLimits {
            max_rows: 20_000,
            max_value_bytes: 1 << 20,
            max_decoded_bytes: 64 << 20,
            max_nesting: 32,
        },
        ..Layout::default()
    }
}

/// A private folder for the file under test, made once per process.
fn scratch(target: &str) -> PathBuf {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    let dir = DIR.get_or_init(|| tempfile::tempdir().expect("a temporary folder"));
    dir.path().join(format!("case.{target}"))
}

fn read_records(path: &Path, format: FileFormat) {
    let Ok(rows) = records::open(path, &layout(format), &[]) else {
        return;
    };
    for row in rows {
        if row.is_err() {
            return;
        }
    }
}

/// Under libFuzzer, a panic that a reader's own guard catches (a decoder crate
/// that panics on a damaged file becomes a refusal, records.rs `guarded`) is
/// not a crash: libfuzzer-sys aborts on any panic through its hook, so the hook
/// is silenced, and a panic that gets past the guards still aborts the run
/// where libfuzzer-sys catches it around the target. Replaying the kept inputs
/// (data/tests/fuzz_corpus.rs) prints every panic as usual.
#[cfg(fuzzing)]
fn quiet_guarded_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| std::panic::set_hook(Box::new(|_| {})));
}

#[cfg(not(fuzzing))]
fn quiet_guarded_panics() {}

/// Reads `bytes` as a file of `target`'s format. Panics only on a bug.
pub fn read(target: &str, bytes: &[u8]) {
    quiet_guarded_panics();
    let path = scratch(target);
    std::fs::write(&path, bytes).expect("write the case");
    match target {
        "parquet" => read_records(&path, FileFormat::Parquet),
        "arrow" => read_records(&path, FileFormat::Arrow),
        "json" => read_records(&path, FileFormat::Json),
        "jsonl" => read_records(&path, FileFormat::Jsonl),
        "conll" => {
            let _ = RawFile::read(&path, Task::Token, &layout(FileFormat::Conll));
        }
        other => panic!("no fuzz target {other}"),
    }
}
