//! Checkpoints as people download them (`tests/reference/checkpoint_corpus.py`
//! builds one directory per quirk with transformers, tokenizers and torch): each
//! layout tokenizes a fixed set of awkward sentences to transformers'
//! `AutoTokenizer` ids, gives transformers' logits, and trains (3 SGD steps: DPO on
//! text pairs for the decoder, cross-entropy on NER for the encoder) to the weights
//! transformers trains; the layouts we refuse say what to do.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use common::{max_abs_diff, max_weight_diff, read_tensors, run_python, tempdir, train_output};
use dpo_data::TextTokenizer;
use dpo_worker::model::checkpoint;
use dpo_worker::model::encoder::{Encoder, Head};
use serde_json::Value;
use tch::{Device, Kind, Tensor};

/// The corpus, built once per test binary, and its expectations.
fn corpus() -> &'static (PathBuf, Value) {
    static CORPUS: OnceLock<(PathBuf, Value)> = OnceLock::new();
    CORPUS.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("checkpoint-corpus");
        let _ = std::fs::remove_dir_all(&dir);
        run_python(
            "tests/reference/checkpoint_corpus.py",
            &["build", dir.to_str().expect("utf-8")],
        );
        let expected = std::fs::read_to_string(dir.join("expected.json")).expect("expected.json");
        (dir, serde_json::from_str(&expected).expect("json"))
    })
}

fn layouts() -> Vec<(String, PathBuf, &'static Value)> {
    let (dir, expected) = corpus();
    expected["layouts"]
        .as_object()
        .expect("layouts")
        .iter()
        .map(|(name, e)| (name.clone(), dir.join(name), e))
        .collect()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .expect("ids")
        .iter()
        .map(|x| x.as_u64().expect("id") as u32)
        .collect()
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .expect("list")
        .iter()
        .map(|x| x.as_str().expect("string").to_string())
        .collect()
}

fn labels() -> Vec<String> {
    strings(&corpus().1["labels"])
}

#[test]
fn every_layout_tokenizes_as_transformers_or_is_refused_with_what_to_do() {
    let (_, expected) = corpus();
    let sentences = strings(&expected["sentences"]);
    let mut checked = 0;
    for (name, dir, e) in layouts() {
        if let Some(refusal) = e.get("refused").and_then(Value::as_str) {
            if name.ends_with("sentencepiece") {
                let err = TextTokenizer::from_dir(&dir)
                    .expect_err("refused")
                    .to_string();
                assert!(err.contains(refusal), "{name}: {err}");
                assert!(
                    err.contains("AutoTokenizer.from_pretrained(")
                        && err.contains(".save_pretrained("),
                    "{name}: the message names the command that writes tokenizer.json: {err}"
                );
                assert!(!TextTokenizer::present(&dir), "{name}");
            }
            if name.contains("models--org--escape") {
                // A cache snapshot whose tokenizer.json links out of its
                // repository: refused by name, never read.
                let err = TextTokenizer::from_dir(&dir)
                    .expect_err("refused")
                    .to_string();
                assert!(
                    err.contains(refusal) && err.contains("tokenizer.json"),
                    "{name}: {err}"
                );
                checked += 1;
            }
            continue;
        }
        let tok = TextTokenizer::from_dir(&dir).unwrap_or_else(|e| panic!("{name}: {e}"));
        for (i, s) in sentences.iter().enumerate() {
            assert_eq!(
                tok.encode(s).expect("encode"),
                ids(&e["plain"][i]),
                "{name}: {s:?} without special tokens"
            );
            assert_eq!(
                tok.encode_plain_with_special_tokens(s).expect("encode"),
                ids(&e["special"][i]),
                "{name}: {s:?} with special tokens"
            );
        }
        if let Some(words) = e.get("words").and_then(Value::as_array) {
            for (i, w) in words.iter().enumerate() {
                let input = strings(&expected["words"][i]);
                let enc = tok.encode_words(&input, 512).expect("encode words");
                assert_eq!(enc.ids, ids(&w["ids"]), "{name}: words {input:?}");
                let want: Vec<Option<u32>> = w["word_ids"]
                    .as_array()
                    .expect("word ids")
                    .iter()
                    .map(|x| x.as_u64().map(|x| x as u32))
                    .collect();
                assert_eq!(enc.word_ids, want, "{name}: word ids of {input:?}");
            }
        }
        if let Some(chat) = e.get("chat").and_then(Value::as_str) {
            let template = tok.chat_template().expect("a chat template");
            let messages = serde_json::json!([
                {"role": "user", "content": "Café 東京?"},
                {"role": "assistant", "content": " a dog "}
            ]);
            let prompt = serde_json::json!([messages[0].clone()]);
            assert_eq!(
                template.render(&prompt, true).expect("render"),
                chat,
                "{name}"
            );
            assert_eq!(
                template.render(&messages, false).expect("render"),
                e["chat_full"].as_str().expect("chat_full"),
                "{name}"
            );
        }
        checked += 1;
    }
    assert!(checked >= 15, "only {checked} layouts were checked");
}

/// A padded tokenizer.json is read as transformers reads it; the file we save
/// along a checkpoint keeps its settings as they came.
#[test]
fn stored_padding_is_ignored_and_kept_in_saved_checkpoints() {
    let (dir, _) = corpus();
    for kind in ["decoder", "encoder"] {
        let padded = dir.join(kind).join("padded-tokenizer");
        let clean = dir.join(kind).join("clean");
        let (a, b) = (
            TextTokenizer::from_dir(&padded).expect("padded"),
            TextTokenizer::from_dir(&clean).expect("clean"),
        );
        let text = "one short sentence";
        assert_eq!(a.encode(text).expect("ids"), b.encode(text).expect("ids"));
        assert!(
            a.encode(text).expect("ids").len() < 128,
            "{kind}: not padded to 128"
        );
        let out = tempdir();
        checkpoint::copy_side_files(&padded, out.path()).expect("copy");
        let saved: Value = serde_json::from_slice(
            &std::fs::read(out.path().join("tokenizer.json")).expect("saved tokenizer.json"),
        )
        .expect("json");
        assert_eq!(saved["padding"]["strategy"]["Fixed"], 128, "{kind}");
        assert_eq!(saved["truncation"]["max_length"], 128, "{kind}");
    }
}

fn logits_of(path: &Path) -> BTreeMap<String, Tensor> {
    read_tensors(path)
}

/// Every weight of `model` other than `skip` equals the clean checkpoint's.
fn same_as_clean(vars: BTreeMap<String, Tensor>, clean: BTreeMap<String, Tensor>, skip: &[String]) {
    for (name, t) in &vars {
        if skip.contains(name) {
            continue;
        }
        let c = clean
            .get(name)
            .unwrap_or_else(|| panic!("{name} not in the clean model"));
        assert_eq!(max_abs_diff(t, c), 0.0, "{name}");
    }
}

#[test]
fn every_layout_gives_transformers_logits() {
    let _guard = tch::no_grad_guard();
    let (dir, _) = corpus();
    let labels = labels();
    let mut compared = 0;
    for (name, path, e) in layouts() {
        let refused = e.get("refused").and_then(Value::as_str);
        let missing = e.get("missing").map(strings).unwrap_or_default();
        if name.starts_with("decoder/") {
            let loaded = checkpoint::load(&path, Kind::Float, Device::Cpu);
            if let Some(refusal) = refused {
                if name.contains("pytorch-bin") {
                    let Err(err) = loaded else {
                        panic!("{name}: loaded, but should be refused");
                    };
                    let err = err.to_string();
                    assert!(err.contains(refusal), "{name}: {err}");
                    if name.ends_with("legacy") {
                        assert!(err.contains("torch.save(torch.load("), "{name}: {err}");
                    }
                    assert!(!path.join("PWNED").exists(), "{name}: the pickle ran code");
                    compared += 1;
                }
                continue;
            }
            let model = loaded.unwrap_or_else(|e| panic!("{name}: {e}"));
            if !missing.is_empty() {
                // A base model: transformers initialises the head anew, so do we
                // (seeded); everything else is the clean model's.
                assert_eq!(missing, ["lm_head.weight"], "{name}");
                let clean = checkpoint::load(&dir.join("decoder/clean"), Kind::Float, Device::Cpu)
                    .expect("clean");
                let vars: BTreeMap<_, _> = model.var_store().variables().into_iter().collect();
                let head = &vars["lm_head.weight"];
                let std = head.std(true).double_value(&[]);
                assert!((std - 0.02).abs() < 0.002, "{name}: new head std {std}");
                same_as_clean(
                    vars,
                    clean.var_store().variables().into_iter().collect(),
                    &missing,
                );
                compared += 1;
                continue;
            }
            let want = logits_of(Path::new(e["logits"].as_str().expect("logits")));
            for (i, s) in e["special"].as_array().expect("special").iter().enumerate() {
                let x =
                    Tensor::from_slice(&ids(s).iter().map(|&t| i64::from(t)).collect::<Vec<_>>())
                        .unsqueeze(0);
                let got = model.forward(&x, None).expect("forward").squeeze_dim(0);
                let d = max_abs_diff(&got, &want[&format!("logits.{i}")]);
                assert!(d <= 1e-4, "{name}: sentence {i}: logits differ by {d}");
            }
        } else {
            let (model, report) = Encoder::load(
                &path,
                Head::Token,
                Some(labels.clone()),
                Kind::Float,
                Device::Cpu,
                3,
            )
            .unwrap_or_else(|e| panic!("{name}: {e}"));
            let mut initialised = report.initialised.clone();
            initialised.sort();
            assert_eq!(initialised, missing, "{name}: newly initialised tensors");
            if !missing.is_empty() {
                let (clean, _) = Encoder::load(
                    &dir.join("encoder/clean"),
                    Head::Token,
                    Some(labels.clone()),
                    Kind::Float,
                    Device::Cpu,
                    3,
                )
                .expect("clean");
                same_as_clean(
                    model.var_store().variables().into_iter().collect(),
                    clean.var_store().variables().into_iter().collect(),
                    &missing,
                );
                compared += 1;
                continue;
            }
            let want = logits_of(Path::new(e["logits"].as_str().expect("logits")));
            for (i, s) in e["special"].as_array().expect("special").iter().enumerate() {
                let v: Vec<i64> = ids(s).iter().map(|&t| i64::from(t)).collect();
                let x = Tensor::from_slice(&v).unsqueeze(0);
                let mask = x.ones_like();
                let got = model
                    .forward(&x, &mask, None)
                    .expect("forward")
                    .squeeze_dim(0);
                let d = max_abs_diff(&got, &want[&format!("logits.{i}")]);
                assert!(d <= 1e-5, "{name}: sentence {i}: logits differ by {d}");
            }
        }
        compared += 1;
    }
    assert!(compared >= 17, "only {compared} layouts compared");
}

/// The layouts a run can start from, and a directory transformers can train from
/// the same initial weights (a base model's new head is ours, saved).
fn trainable(kind: &str) -> Vec<(String, PathBuf, PathBuf, &'static Value)> {
    let labels = labels();
    let init_root = Path::new(env!("CARGO_TARGET_TMPDIR")).join("checkpoint-corpus-init");
    layouts()
        .into_iter()
        .filter(|(name, _, e)| name.starts_with(kind) && e.get("refused").is_none())
        .map(|(name, dir, e)| {
            let missing = e.get("missing").map(strings).unwrap_or_default();
            let start = if missing.is_empty() {
                dir.clone()
            } else {
                let out = init_root.join(&name);
                let _ = std::fs::remove_dir_all(&out);
                if kind == "decoder" {
                    let model = checkpoint::load(&dir, Kind::Float, Device::Cpu).expect("load");
                    checkpoint::save(&model, &out, Some(&dir), u64::MAX).expect("save");
                } else {
                    let (model, _) = Encoder::load(
                        &dir,
                        Head::Token,
                        Some(labels.clone()),
                        Kind::Float,
                        Device::Cpu,
                        SEED,
                    )
                    .expect("load");
                    model.save(&out, Some(&dir), u64::MAX).expect("save");
                }
                out
            };
            (name, dir, start, e)
        })
        .collect()
}

const SEED: u64 = 11;
const STEPS: u64 = 3;

fn trained(out: &Path) -> BTreeMap<String, Tensor> {
    read_tensors(&out.join("final/model.safetensors"))
}

#[test]
fn decoder_layouts_train_the_dpo_weights_transformers_trains() {
    let (_, expected) = corpus();
    let pairs = expected["pairs"].as_str().expect("pairs");
    let work = tempdir();
    let mut cases = Vec::new();
    let mut runs = Vec::new();
    for (name, dir, start, e) in trainable("decoder") {
        let tag = name.replace('/', "-");
        let out = work.path().join(&tag);
        let spec = work.path().join(format!("{tag}.toml"));
        std::fs::write(
            &spec,
            format!(
                r#"name = "{tag}"
[model]
path = "{model}"
[reference]
path = "same"
[data]
train = "{pairs}"
shuffle = false
seed = {SEED}
max_length = 512
max_prompt_length = 256
[objective]
loss = "sigmoid"
beta = 0.1
[optim]
name = "sgd"
lr = 2.0
max_grad_norm = 0.0
schedule = "constant"
[train]
max_steps = {STEPS}
global_batch_size = 2
micro_batch_size = 1
output = "{out}"
"#,
                model = dir.display(),
                out = out.display(),
            ),
        )
        .expect("spec");
        let run = train_output(&spec, &[]);
        assert!(
            run.status.success(),
            "{name}: dpo-worker train failed:\n{}",
            String::from_utf8_lossy(&run.stderr)
        );
        let reference = work.path().join(format!("{tag}.reference.safetensors"));
        cases.push(serde_json::json!({
            "name": tag, "model": start, "data": e["pairs_tokens"], "loss": "sigmoid", "beta": 0.1,
            "label_smoothing": 0.0, "nll_weight": 0.0, "negative_weight": 0.0, "optimizer": "sgd",
            "lr": 2.0, "weight_decay": 0.0, "max_grad_norm": 0.0, "warmup_steps": 0,
            "schedule": "constant", "steps": STEPS, "global_batch_size": 2, "reference_free": false,
            "out": reference,
        }));
        runs.push((name, out, reference, start));
    }
    let cases_json = work.path().join("cases.json");
    std::fs::write(&cases_json, serde_json::json!({"cases": cases}).to_string()).expect("cases");
    run_python(
        "tests/reference/dpo_reference.py",
        &[cases_json.to_str().expect("utf-8")],
    );
    for (name, out, reference, start) in &runs {
        let ours = trained(out);
        let theirs = read_tensors(reference);
        let d = max_weight_diff(&ours, &theirs);
        let initial = checkpoint::load(start, Kind::Float, Device::Cpu).expect("initial");
        let norm = &initial.var_store().variables()["model.norm.weight"];
        let moved = max_abs_diff(&ours["model.norm.weight"], norm);
        eprintln!(
            "{name}: max weight difference {d:.2e} (training moved model.norm by {moved:.2e})"
        );
        assert!(moved > 1e-3, "{name}: training moved the weights");
        assert!(
            d <= 2e-5,
            "{name}: weights differ from transformers' by {d}"
        );
    }
    // The padded tokenizer.json trains what the clean one does.
    let by_name = |n: &str| &runs.iter().find(|r| r.0 == n).expect("run").1;
    let d = max_weight_diff(
        &trained(by_name("decoder/padded-tokenizer")),
        &trained(by_name("decoder/clean")),
    );
    assert!(d <= 1e-6, "padded and clean tokenizers train apart: {d}");
}

const NER: &str = r#"{"tokens": ["Ann", "Lee", "lives", "in", "Oslo"], "tags": ["B-PER", "I-PER", "O", "O", "B-LOC"]}
{"tokens": ["Zoë", "visited", "Zürich", "and", "東京"], "tags": ["B-PER", "O", "B-LOC", "O", "B-LOC"]}
{"tokens": ["the", "cat", "sees", "Ångström", "Café"], "tags": ["O", "O", "O", "B-PER", "B-LOC"]}
{"tokens": ["an", "unknownword", "🙂", "near", "北京"], "tags": ["O", "O", "O", "O", "B-LOC"]}
{"tokens": ["Bo", "Varna", "met", "résumé", "writers"], "tags": ["B-PER", "I-PER", "O", "O", "O"]}
{"tokens": ["one", "two", "three", "Lima"], "tags": ["O", "O", "O", "B-LOC"]}
"#;

#[test]
fn encoder_layouts_train_the_weights_transformers_trains() {
    let work = tempdir();
    let data = work.path().join("ner.jsonl");
    std::fs::write(&data, NER).expect("data");
    let labels = labels();
    let settings = work.path().join("settings.json");
    std::fs::write(
        &settings,
        serde_json::json!({
            "task": "token-classification", "loss": "ce", "negative_weight": 0.0, "optimizer": "sgd",
            "schedule": "constant", "lr": 0.5, "weight_decay": 0.0, "betas": [0.9, 0.999], "eps": 1e-8,
            "max_grad_norm": 0.0, "warmup": 0, "steps": STEPS, "global_batch": 2, "micro_batch": 1,
            "max_length": 64,
        })
        .to_string(),
    )
    .expect("settings");
    let mut results = Vec::new();
    for (name, dir, start, _) in trainable("encoder") {
        let tag = name.replace('/', "-");
        let out = work.path().join(&tag);
        let spec = work.path().join(format!("{tag}.toml"));
        std::fs::write(
            &spec,
            format!(
                r#"name = "{tag}"
[model]
path = "{model}"
[task]
type = "token-classification"
labels = [{labels}]
[data]
train = "{data}"
shuffle = false
seed = {SEED}
max_length = 64
[objective]
loss = "sft"
[optim]
name = "sgd"
lr = 0.5
max_grad_norm = 0.0
schedule = "constant"
[train]
max_steps = {STEPS}
global_batch_size = 2
micro_batch_size = 1
output = "{out}"
"#,
                model = dir.display(),
                data = data.display(),
                out = out.display(),
                labels = labels
                    .iter()
                    .map(|l| format!("{l:?}"))
                    .collect::<Vec<_>>()
                    .join(", "),
            ),
        )
        .expect("spec");
        let run = train_output(&spec, &[]);
        assert!(
            run.status.success(),
            "{name}: dpo-worker train failed:\n{}",
            String::from_utf8_lossy(&run.stderr)
        );
        let reference = work.path().join(format!("{tag}.reference.safetensors"));
        run_python(
            "tests/reference/encoder_reference.py",
            &[
                "train",
                start.to_str().expect("utf-8"),
                data.to_str().expect("utf-8"),
                settings.to_str().expect("utf-8"),
                reference.to_str().expect("utf-8"),
            ],
        );
        let ours = trained(&out);
        let theirs = read_tensors(&reference);
        let mut worst = 0.0f64;
        for (n, w) in &theirs {
            match ours.get(n) {
                Some(o) => worst = worst.max(max_abs_diff(o, w)),
                None => assert!(
                    n.ends_with("position_ids") || n.ends_with("token_type_ids"),
                    "{name}: {n} missing from our checkpoint"
                ),
            }
        }
        eprintln!("{name}: max weight difference {worst:.2e}");
        assert!(
            worst <= 1e-5,
            "{name}: weights differ from transformers' by {worst}"
        );
        results.push((name, ours));
    }
    let get = |n: &str| &results.iter().find(|r| r.0 == n).expect("layout").1;
    let d = max_weight_diff(get("encoder/padded-tokenizer"), get("encoder/clean"));
    assert!(d <= 1e-6, "padded and clean tokenizers train apart: {d}");
}

/// A damaged `pytorch_model.bin` (truncated, or bytes of its pickle changed) is
/// an error or, where the change happens to leave a valid file, loads: it never
/// panics, hangs or runs anything.
#[test]
fn damaged_torch_files_are_errors_not_panics() {
    let (dir, _) = corpus();
    let source = dir.join("decoder/pytorch-bin");
    let bytes = std::fs::read(source.join("pytorch_model.bin")).expect("read");
    let work = tempdir();
    let case = work.path().join("model");
    std::fs::create_dir_all(&case).expect("mkdir");
    checkpoint::copy_side_files(&source, &case).expect("side files");
    std::fs::copy(source.join("config.json"), case.join("config.json")).expect("config");
    let mut errors = 0;
    let mut variants: Vec<Vec<u8>> = [7, 64, bytes.len() / 3, bytes.len() - 30]
        .iter()
        .map(|&n| bytes[..n].to_vec())
        .collect();
    // The pickle is the archive's first entry: change one byte at a time in it.
    for at in (40..1500).step_by(23) {
        let mut v = bytes.clone();
        v[at] ^= 0x5a;
        variants.push(v);
    }
    for v in &variants {
        std::fs::write(case.join("pytorch_model.bin"), v).expect("write");
        if checkpoint::load(&case, Kind::Float, Device::Cpu).is_err() {
            errors += 1;
        }
    }
    assert!(
        errors >= 4,
        "every truncated file is an error ({errors} errors)"
    );
}
