//! Shared set-up for the worker's integration tests: the Python interpreter of the
//! test venv and the tiny checkpoints (with transformers' reference outputs) that
//! `tests/reference/hf_reference.py` builds.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("worker/ has a parent")
        .to_path_buf()
}

/// The venv python with torch and transformers (set up by `scripts/setup.sh`).
pub fn python() -> PathBuf {
    let path = std::env::var_os("DPO_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let home = std::env::var_os("HOME").expect("HOME is set");
            PathBuf::from(home).join(".cache/dpo-cluster/venv/bin/python")
        });
    assert!(
        path.exists(),
        "{} not found: run `make test` (or scripts/setup.sh) to create the test venv",
        path.display()
    );
    path
}

/// Runs a Python script of the repository (path relative to its root) with the
/// test venv; panics with its stderr on failure.
pub fn run_python<S: AsRef<std::ffi::OsStr>>(script: &str, args: &[S]) {
    let out = Command::new(python())
        .arg(repo_root().join(script))
        .args(args)
        .output()
        .expect("python starts");
    assert!(
        out.status.success(),
        "{script} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs the transformers reference script.
pub fn reference(args: &[&str]) {
    run_python("tests/reference/hf_reference.py", args);
}

/// The fixture directory, built once per test binary.
pub fn fixtures() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        // One directory per test binary (`hf_parity-<hash>`); those of older builds
        // of the same test are removed.
        let stem = std::env::current_exe()
            .ok()
            .and_then(|p| p.file_stem().map(|s| s.to_string_lossy().into_owned()))
            .unwrap_or_default();
        let test = stem
            .rsplit_once('-')
            .map_or(stem.as_str(), |(t, _)| t)
            .to_string();
        let tmp = Path::new(env!("CARGO_TARGET_TMPDIR"));
        if let Ok(entries) = std::fs::read_dir(tmp) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.starts_with(&format!("hf-fixtures-{test}-")) {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
        let dir = tmp.join(format!("hf-fixtures-{stem}"));
        reference(&["fixtures", dir.to_str().expect("utf-8 path")]);
        dir
    })
}

pub fn fixture(name: &str) -> PathBuf {
    fixtures().join(name)
}

/// A fresh temporary directory under the target dir.
pub fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("dpo-test-")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .expect("temp dir")
}

pub fn read_jsonl(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .map(|l| serde_json::from_str(l).expect("valid JSON line"))
        .collect()
}

/// Every tensor of a safetensors file, by name.
pub fn read_tensors(path: &Path) -> std::collections::BTreeMap<String, tch::Tensor> {
    tch::Tensor::read_safetensors(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .into_iter()
        .collect()
}

/// Largest absolute difference between two tensors of the same shape.
pub fn max_abs_diff(a: &tch::Tensor, b: &tch::Tensor) -> f64 {
    assert_eq!(a.size(), b.size());
    (a.to_kind(tch::Kind::Double) - b.to_kind(tch::Kind::Double))
        .abs()
        .max()
        .double_value(&[])
}

/// Largest absolute difference between two sets of named tensors (same names).
pub fn max_weight_diff(
    a: &std::collections::BTreeMap<String, tch::Tensor>,
    b: &std::collections::BTreeMap<String, tch::Tensor>,
) -> f64 {
    assert_eq!(
        a.keys().collect::<Vec<_>>(),
        b.keys().collect::<Vec<_>>(),
        "same tensors"
    );
    a.iter()
        .map(|(k, x)| max_abs_diff(x, &b[k]))
        .fold(0.0, f64::max)
}

/// Deterministic pseudo-random examples: prompts of 0..9 tokens, responses of
/// 1..13, some examples with several negatives.
pub fn random_examples(vocab: u32, n: usize, negatives: usize) -> Vec<dpo_data::Example> {
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = |m: u32| -> u32 {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state % u64::from(m)) as u32
    };
    (0..n)
        .map(|i| {
            let mut seq = |lo: u32, hi: u32| -> Vec<u32> {
                let len = lo + next(hi - lo);
                (0..len).map(|_| 3 + next(vocab - 3)).collect()
            };
            // The first example has no prompt at all.
            let prompt = if i == 0 { Vec::new() } else { seq(1, 10) };
            dpo_data::Example {
                line: i + 1,
                prompt,
                chosen: Some(seq(1, 14)),
                rejected: (0..negatives.max(1)).map(|_| seq(1, 14)).collect(),
            }
        })
        .collect()
}

/// `n` free loopback addresses, comma-separated (bound and released).
pub fn free_ports(n: usize) -> String {
    let listeners: Vec<_> = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("bind"))
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().expect("addr").to_string())
        .collect::<Vec<_>>()
        .join(",")
}

/// `dpo-worker train` on `spec` (CPU) with `extra` flags, run to its end.
pub fn train_output(spec: &Path, extra: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_dpo-worker"))
        .args(["train", "--device", "cpu", "--config"])
        .arg(spec)
        .args(extra)
        .output()
        .expect("dpo-worker starts")
}

/// `dpo-worker train` on `spec` (CPU) with `extra` flags; stderr kept for errors.
pub fn train_process(spec: &Path, extra: &[String]) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_dpo-worker"))
        .args(["train", "--device", "cpu", "--config"])
        .arg(spec)
        .args(extra)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("dpo-worker starts")
}

/// log(1 − p) of every scored token (0 elsewhere), as the combined loss uses it.
pub fn unlikelihood(s: &dpo_worker::objective::SequenceScores) -> tch::Tensor {
    s.token_logps
        .exp()
        .neg()
        .f_add_scalar(1.0)
        .expect("1 - p")
        .clamp_min(1e-6)
        .log()
        .f_mul(&s.mask)
        .expect("mask")
}

/// A tensor's values, flattened, as f64.
pub fn values(t: &tch::Tensor) -> Vec<f64> {
    Vec::<f64>::try_from(t.to_kind(tch::Kind::Double).view([-1])).expect("values")
}

/// Every variable's gradient of `model`, in name order, flattened.
pub fn all_gradients(model: &dpo_worker::model::CausalLm) -> Vec<f64> {
    model
        .var_store()
        .variables()
        .into_iter()
        .collect::<std::collections::BTreeMap<_, _>>()
        .values()
        .flat_map(|v| values(&v.grad()))
        .collect()
}

/// A small NER set with negatives (IOB2 tags of PER and LOC).
pub const NER_DATA: &str = r#"{"tokens": ["Ann", "Lee", "lives", "in", "Oslo"], "tags": ["B-PER", "I-PER", "O", "O", "B-LOC"], "negatives": [{"position": 0, "tag": "B-LOC"}, {"position": 4, "tag": "I-LOC"}]}
{"tokens": ["the", "cat", "sees", "Rome"], "tags": ["O", "O", "O", "B-LOC"], "negatives": [{"position": 3, "tag": "B-PER"}]}
{"tokens": ["Bo", "visited", "New", "Varna", "today"], "tags": ["B-PER", "O", "B-LOC", "I-LOC", "O"]}
{"tokens": ["Kiran", "Tuvalesco", "likes", "big", "red", "houses"], "tags": ["B-PER", "I-PER", "O", "O", "O", "O"], "negatives": [{"position": 1, "tag": "B-PER"}, {"position": 2, "tag": "B-LOC"}, {"position": 0, "tag": "O"}]}
{"tokens": ["one", "two", "three"], "tags": ["O", "O", "O"], "negatives": [{"position": 1, "tag": "B-PER"}]}
{"tokens": ["Lima", "is", "far", "from", "Ann"], "tags": ["B-LOC", "O", "O", "O", "B-PER"], "negatives": [{"position": 0, "tag": "B-PER"}]}
{"tokens": ["a", "dog"], "tags": ["O", "O"]}
{"tokens": ["Zed", "Quorn", "met", "Lee", "in", "East", "Ridge"], "tags": ["B-PER", "I-PER", "O", "B-PER", "O", "B-LOC", "I-LOC"], "negatives": [{"position": 5, "tag": "B-PER"}, {"position": 6, "tag": "B-LOC"}]}
"#;

/// A small sentiment set with negatives (neg, neu, pos).
pub const SENTIMENT_DATA: &str = r#"{"text": "the film was great and fun", "label": "pos", "negatives": ["neg"]}
{"text": "a dull and boring book", "label": "neg", "negatives": ["pos", "neu"]}
{"text": "a long french show", "label": "neu"}
{"text": "i found this album superb, really moving", "label": "pos", "negatives": ["neu"]}
{"text": "terrible. painful. that is the game", "label": "neg", "negatives": ["pos"]}
{"text": "the second series was short", "label": "neu", "negatives": ["neg"]}
{"text": "charming play, brilliant too", "label": "pos"}
{"text": "tedious novel", "label": "neg", "negatives": ["neu"]}
"#;
