//! Shared by the dataset tests: the test venv's Python, which writes the files
//! (pyarrow's Parquet and Arrow, JSON) the readers are tested on.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

/// The venv python with pyarrow (set up by `scripts/setup.sh`).
pub fn python() -> PathBuf {
    std::env::var_os("DPO_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let home = std::env::var_os("HOME").expect("HOME is set");
            PathBuf::from(home).join(".cache/dpo-cluster/venv/bin/python")
        })
}

/// Runs a Python `script` with `dir` and `args` as its arguments; panics with
/// its stderr when it fails.
pub fn run_script(script: &str, dir: &Path, args: &[&str]) {
    let out = Command::new(python())
        .args(["-c", script])
        .arg(dir)
        .args(args)
        .output()
        .expect("python starts");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
