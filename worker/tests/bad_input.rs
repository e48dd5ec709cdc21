//! Bad models and bad data: each gives one clear error naming the file (and line),
//! a non-zero exit, no panic and no output file.

mod common;

use std::path::Path;
use std::process::Command;

use common::{fixture, tempdir};

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for entry in std::fs::read_dir(from).expect("read_dir") {
        let entry = entry.expect("entry");
        std::fs::copy(entry.path(), to.join(entry.file_name())).expect("copy");
    }
}

fn edit_config(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = dir.join("config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("read")).expect("json");
    edit(&mut v);
    std::fs::write(&path, v.to_string()).expect("write");
}

/// Runs `score` and returns its stderr, asserting it failed cleanly.
fn score_fails(model: &Path, data: &Path) -> String {
    let dir = tempdir();
    let out = dir.path().join("out.jsonl");
    let result = Command::new(env!("CARGO_BIN_EXE_dpo-worker"))
        .args(["score", "--device", "cpu", "--model"])
        .arg(model)
        .arg("--data")
        .arg(data)
        .arg("--out")
        .arg(&out)
        .output()
        .expect("dpo-worker starts");
    let stderr = String::from_utf8_lossy(&result.stderr).into_owned();
    assert!(!result.status.success(), "must fail; stderr: {stderr}");
    assert_eq!(
        result.status.code(),
        Some(1),
        "an error exit, not a crash: {stderr}"
    );
    assert!(!stderr.contains("panicked"), "no panic: {stderr}");
    assert!(!out.exists(), "no output on failure");
    stderr
}

fn good_data() -> std::path::PathBuf {
    common::fixtures().join("pairs_text.jsonl")
}

#[test]
fn missing_config_is_named() {
    let dir = tempdir();
    let err = score_fails(dir.path(), &good_data());
    let config = dir.path().join("config.json");
    assert!(
        err.contains(&format!("{}: No such file", config.display())),
        "{err}"
    );
}

#[test]
fn unsupported_model_type_is_named() {
    let dir = tempdir();
    copy_dir(&fixture("qwen2"), dir.path());
    edit_config(dir.path(), |c| c["model_type"] = "gpt2".into());
    let err = score_fails(dir.path(), &good_data());
    assert!(
        err.contains("config.json: unsupported model_type \"gpt2\""),
        "{err}"
    );
}

#[test]
fn wrong_tensor_shape_names_tensor_and_file() {
    let dir = tempdir();
    copy_dir(&fixture("qwen2"), dir.path());
    edit_config(dir.path(), |c| c["intermediate_size"] = 96.into());
    let err = score_fails(dir.path(), &good_data());
    let file = dir.path().join("model.safetensors");
    assert!(
        err.contains(&format!("{}: tensor model.layers.", file.display())),
        "{err}"
    );
    assert!(
        err.contains("expected shape [") && err.contains("96") && err.contains("160"),
        "{err}"
    );
}

#[test]
fn missing_tensor_is_named() {
    let dir = tempdir();
    copy_dir(&fixture("qwen2"), dir.path());
    // An untied model needs lm_head.weight, which a tied checkpoint does not have.
    edit_config(dir.path(), |c| c["tie_word_embeddings"] = false.into());
    let err = score_fails(dir.path(), &good_data());
    assert!(
        err.contains("checkpoint has no tensor lm_head.weight"),
        "{err}"
    );
}

#[test]
fn malformed_json_line_names_file_and_line() {
    let dir = tempdir();
    let data = dir.path().join("pairs.jsonl");
    let good = r#"{"prompt": "a", "chosen": " b", "rejected": " c"}"#;
    std::fs::write(
        &data,
        format!("{good}\n{good}\n{{\"prompt\": \"a\", \"chosen\"\n"),
    )
    .expect("write");
    let err = score_fails(&fixture("llama"), &data);
    assert!(
        err.contains(&format!("{}:3: invalid JSON", data.display())),
        "{err}"
    );
}

#[test]
fn out_of_vocabulary_token_names_line() {
    let dir = tempdir();
    let data = dir.path().join("pairs.jsonl");
    std::fs::write(
        &data,
        "{\"prompt_ids\":[1,2],\"chosen_ids\":[3],\"rejected_ids\":[4]}\n{\"prompt_ids\":[1],\"chosen_ids\":[99999],\"rejected_ids\":[4]}\n",
    )
    .expect("write");
    let err = score_fails(&fixture("llama"), &data);
    assert!(
        err.contains(&format!(
            "{}:2: token id 99999 is out of range",
            data.display()
        )),
        "{err}"
    );
}

#[test]
fn a_broken_tokenizer_config_is_named_when_training() {
    let dir = tempdir();
    let model = dir.path().join("model");
    copy_dir(&fixture("qwen2"), &model);
    std::fs::write(model.join("tokenizer_config.json"), "{ not json").expect("write");
    let spec = dir.path().join("run.toml");
    std::fs::write(
        &spec,
        format!(
            "name = \"t\"\n[model]\npath = \"{}\"\n[data]\ntrain = \"{}\"\n[train]\noutput = \"{}\"\n",
            model.display(),
            common::fixtures().join("pairs_tokens.jsonl").display(),
            dir.path().join("out").display()
        ),
    )
    .expect("write");
    let out = Command::new(env!("CARGO_BIN_EXE_dpo-worker"))
        .args(["train", "--device", "cpu", "--config"])
        .arg(&spec)
        .output()
        .expect("starts");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "{}: invalid JSON",
            model.join("tokenizer_config.json").display()
        )),
        "{stderr}"
    );
}
