//! BERT, RoBERTa, XLM-RoBERTa and DeBERTa-v2/v3 against transformers: logits of both heads alone and in padded
//! batches, a new head on a checkpoint without one, and a saved model that
//! transformers' pipelines load and agree with.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use common::{max_abs_diff, python, read_tensors, repo_root, run_python, tempdir};
use dpo_worker::model::encoder::{Encoder, Head};
use tch::{Device, Kind, Tensor};

const LABELS: &str = "O,B-PER,I-PER,B-LOC,I-LOC";

fn labels() -> Vec<String> {
    LABELS.split(',').map(str::to_string).collect()
}

/// `{bert,roberta,xlm-roberta,deberta-v3,deberta-v2,modernbert,modernbert-b}-{none,token,sequence}`,
/// built once per test binary, with transformers' logits for the head models.
fn fixtures() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("encoder-fixtures");
        let _ = std::fs::remove_dir_all(&dir);
        // DeBERTa twice: v3's settings (shared keys, log buckets, normed
        // table, no absolute positions) and v2's older ones (position
        // projections of their own, clamped distances, absolute positions,
        // token types, narrower embeddings).
        // ModernBERT twice: as published (no biases, a global layer every
        // third, mean pooling for the sequence head) and with biases, a
        // global layer every second and the first token pooled; both with a
        // window of 8 (4 either side), shorter than the test sentences.
        let deberta_v3: &[&str] = &["--deberta", "v3"];
        let deberta_v2: &[&str] = &["--deberta", "v2"];
        let modern: &[&str] = &["--layers", "4", "--local-attention", "8"];
        let modern_b: &[&str] = &[
            "--layers",
            "4",
            "--local-attention",
            "8",
            "--biases",
            "--global-every",
            "2",
            "--pooling",
            "cls",
        ];
        // Every model in one Python process, then every reference in one more
        // (each process pays for importing torch and transformers).
        let mut jobs: Vec<Vec<String>> = Vec::new();
        let mut heads: Vec<PathBuf> = Vec::new();
        for (name, family, extra) in [
            ("bert", "bert", &[][..]),
            ("roberta", "roberta", &[]),
            ("xlm-roberta", "xlm-roberta", &[]),
            ("deberta-v3", "deberta-v2", deberta_v3),
            ("deberta-v2", "deberta-v2", deberta_v2),
            ("modernbert", "modernbert", modern),
            ("modernbert-b", "modernbert", modern_b),
        ] {
            for head in ["none", "token", "sequence"] {
                let out = dir.join(format!("{name}-{head}"));
                // A larger init range than BERT's 0.02, so that logits are O(1)
                // and a wrong layer shows.
                let mut args: Vec<String> = [
                    "--out",
                    out.to_str().expect("utf-8 path"),
                    "--family",
                    family,
                    "--head",
                    head,
                    "--labels",
                    LABELS,
                    "--init-range",
                    "0.2",
                    "--seed",
                    "3",
                ]
                .iter()
                .map(|s| s.to_string())
                .collect();
                args.extend(extra.iter().map(|s| s.to_string()));
                jobs.push(args);
                if head != "none" {
                    heads.push(out);
                }
            }
        }
        // ModernBERT's base as it is published: its masked-LM model, whose
        // `head.` the classification heads share.
        jobs.push(
            [
                "--out",
                dir.join("modernbert-mlm").to_str().expect("utf-8 path"),
                "--family",
                "modernbert",
                "--head",
                "mlm",
                "--layers",
                "4",
                "--init-range",
                "0.2",
                "--seed",
                "3",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect(),
        );
        std::fs::create_dir_all(&dir).expect("fixture dir");
        let list = dir.join("jobs.json");
        std::fs::write(&list, serde_json::to_string(&jobs).expect("json")).expect("write jobs");
        run_python(
            "examples/tiny_encoder.py",
            &["--batch", list.to_str().expect("utf-8 path")],
        );
        // The same model with the config.json the published ModernBERT
        // checkpoints have (transformers 4.48's keys).
        let hub = dir.join("modernbert-hub-token");
        copy_dir(&dir.join("modernbert-b-token"), &hub);
        hub_modernbert_config(&hub.join("config.json"));
        heads.push(hub);
        let mut pairs: Vec<String> = vec!["logits".into()];
        for h in &heads {
            let h = h.to_str().expect("utf-8 path");
            pairs.push(h.to_string());
            pairs.push(format!("{h}.ref.safetensors"));
        }
        run_python("tests/reference/encoder_reference.py", &pairs);
        dir
    })
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for entry in std::fs::read_dir(from).expect("read dir") {
        let entry = entry.expect("entry");
        std::fs::copy(entry.path(), to.join(entry.file_name())).expect("copy");
    }
}

/// Rewrites a ModernBERT `config.json` as transformers 4.48 wrote it (the
/// published checkpoints' form): the layer pattern as
/// `global_attn_every_n_layers`, the rotary bases as `global_rope_theta` and
/// `local_rope_theta`, BERT's unused `position_embedding_type`, no
/// `layer_types` or `rope_parameters`.
fn hub_modernbert_config(path: &Path) {
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).expect("config")).expect("json");
    let obj = config.as_object_mut().expect("object");
    let types = obj.remove("layer_types").expect("layer_types");
    let every = types
        .as_array()
        .expect("list")
        .iter()
        .skip(1)
        .position(|t| t == "full_attention")
        .expect("a second global layer")
        + 1;
    obj.insert("global_attn_every_n_layers".into(), every.into());
    let rope = obj.remove("rope_parameters").expect("rope_parameters");
    obj.insert(
        "global_rope_theta".into(),
        rope["full_attention"]["rope_theta"].clone(),
    );
    obj.insert(
        "local_rope_theta".into(),
        rope["sliding_attention"]["rope_theta"].clone(),
    );
    obj.insert("position_embedding_type".into(), "absolute".into());
    obj.insert("transformers_version".into(), "4.48.0".into());
    std::fs::write(path, serde_json::to_string_pretty(&config).expect("json")).expect("write");
}

/// A right-padded batch of `seqs` with `pad`: (ids, mask).
fn pad_batch(seqs: &[Vec<i64>], pad: i64) -> (Tensor, Tensor) {
    let longest = seqs.iter().map(Vec::len).max().expect("sequences");
    let mut ids = vec![pad; seqs.len() * longest];
    let mut mask = vec![0i64; seqs.len() * longest];
    for (row, s) in seqs.iter().enumerate() {
        for (j, &t) in s.iter().enumerate() {
            ids[row * longest + j] = t;
            mask[row * longest + j] = 1;
        }
    }
    let shape = [seqs.len() as i64, longest as i64];
    (
        Tensor::from_slice(&ids).view(shape),
        Tensor::from_slice(&mask).view(shape),
    )
}

fn check_logits(name: &str, head: Head) {
    let _guard = tch::no_grad_guard();
    let dir = fixtures().join(name);
    let (model, report) =
        Encoder::load(&dir, head, None, Kind::Float, Device::Cpu, 0).expect("encoder loads");
    assert!(report.initialised.is_empty(), "{:?}", report.initialised);
    assert_eq!(model.labels(), labels().as_slice());
    let reference = read_tensors(&fixtures().join(format!("{name}.ref.safetensors")));
    let n = reference.len() / 2;
    let seqs: Vec<Vec<i64>> = (0..n)
        .map(|i| Vec::<i64>::try_from(&reference[&format!("input_ids.{i}")]).expect("ids"))
        .collect();
    let mut worst = 0.0f64;
    // Each sequence alone.
    for (i, s) in seqs.iter().enumerate() {
        let ids = Tensor::from_slice(s).unsqueeze(0);
        let mask = ids.ones_like();
        let got = model
            .forward(&ids, &mask, None)
            .expect("forward")
            .squeeze_dim(0);
        worst = worst.max(max_abs_diff(&got, &reference[&format!("logits.{i}")]));
    }
    // All of them in one right-padded batch: the real positions are unchanged.
    let (ids, mask) = pad_batch(&seqs, model.config().pad_token_id);
    let logits = model.forward(&ids, &mask, None).expect("padded forward");
    for (i, s) in seqs.iter().enumerate() {
        let want = &reference[&format!("logits.{i}")];
        let got = match head {
            Head::Token => logits.get(i as i64).narrow(0, 0, s.len() as i64),
            Head::Sequence => logits.get(i as i64),
        };
        worst = worst.max(max_abs_diff(&got, want));
    }
    let scale = reference["logits.1"].abs().max().double_value(&[]);
    eprintln!("{name}: max abs logit error {worst:.3e} (logit scale {scale:.2})");
    assert!(
        scale > 0.3,
        "fixture logits are not trivially small ({scale})"
    );
    assert!(
        worst <= 1e-4,
        "{name}: logits differ from transformers by {worst:.3e}"
    );
}

#[test]
fn bert_token_classification_logits_equal_transformers() {
    check_logits("bert-token", Head::Token);
}

#[test]
fn bert_sequence_classification_logits_equal_transformers() {
    check_logits("bert-sequence", Head::Sequence);
}

#[test]
fn roberta_token_classification_logits_equal_transformers() {
    check_logits("roberta-token", Head::Token);
}

#[test]
fn roberta_sequence_classification_logits_equal_transformers() {
    check_logits("roberta-sequence", Head::Sequence);
}

#[test]
fn xlm_roberta_token_and_sequence_classification_logits_equal_transformers() {
    check_logits("xlm-roberta-token", Head::Token);
    check_logits("xlm-roberta-sequence", Head::Sequence);
}

#[test]
fn deberta_v3_token_and_sequence_classification_logits_equal_transformers() {
    check_logits("deberta-v3-token", Head::Token);
    check_logits("deberta-v3-sequence", Head::Sequence);
}

#[test]
fn deberta_v2_token_and_sequence_classification_logits_equal_transformers() {
    check_logits("deberta-v2-token", Head::Token);
    check_logits("deberta-v2-sequence", Head::Sequence);
}

#[test]
fn modernbert_token_and_sequence_classification_logits_equal_transformers() {
    check_logits("modernbert-token", Head::Token);
    check_logits("modernbert-sequence", Head::Sequence);
    check_logits("modernbert-b-token", Head::Token);
    check_logits("modernbert-b-sequence", Head::Sequence);
}

/// The `config.json` of the published ModernBERT checkpoints (transformers
/// 4.48's keys) means the same model: logits equal transformers' on it.
#[test]
fn modernbert_config_as_published_reads_the_same() {
    check_logits("modernbert-hub-token", Head::Token);
}

/// A fine-tuned DeBERTa-v3 as such checkpoints are published: a
/// `pytorch_model.bin` (torch.save's zip, read by our restricted unpickler)
/// still holding the pre-training heads (`lm_predictions.`,
/// `mask_predictions.`) and the absolute position table v3 never adds
/// (`position_biased_input = false`), and `pos_att_type` as one string. The
/// extras are ignored, by name, and the logits are transformers'.
#[test]
fn deberta_v3_as_published_reads_the_same() {
    let src = fixtures().join("deberta-v3-token");
    let name = "deberta-v3-published-token";
    let dir = fixtures().join(name);
    copy_dir(&src, &dir);
    std::fs::copy(
        fixtures().join("deberta-v3-token.ref.safetensors"),
        fixtures().join(format!("{name}.ref.safetensors")),
    )
    .expect("copy reference");
    let code = r#"
import json, sys, torch
from safetensors.torch import load_file
d = sys.argv[1]
state = load_file(f"{d}/model.safetensors")
h = state["deberta.embeddings.word_embeddings.weight"].shape[1]
g = torch.Generator().manual_seed(0)
extra = {
    "deberta.embeddings.position_embeddings.weight": (64, h),
    "lm_predictions.lm_head.dense.weight": (h, h),
    "lm_predictions.lm_head.dense.bias": (h,),
    "lm_predictions.lm_head.LayerNorm.weight": (h,),
    "lm_predictions.lm_head.LayerNorm.bias": (h,),
    "lm_predictions.lm_head.bias": (state["deberta.embeddings.word_embeddings.weight"].shape[0],),
    "mask_predictions.dense.weight": (h, h),
    "mask_predictions.dense.bias": (h,),
    "mask_predictions.LayerNorm.weight": (h,),
    "mask_predictions.LayerNorm.bias": (h,),
    "mask_predictions.classifier.weight": (1, h),
    "mask_predictions.classifier.bias": (1,),
}
for k, shape in extra.items():
    state[k] = torch.randn(shape, generator=g)
torch.save(state, f"{d}/pytorch_model.bin")
import os
os.remove(f"{d}/model.safetensors")
with open(f"{d}/config.json") as f:
    config = json.load(f)
config["pos_att_type"] = "p2c|c2p"
with open(f"{d}/config.json", "w") as f:
    json.dump(config, f, indent=2)
"#;
    let out = Command::new(python())
        .args(["-c", code, dir.to_str().expect("utf-8")])
        .output()
        .expect("python starts");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!dir.join("model.safetensors").exists());
    let (_, report) =
        Encoder::load(&dir, Head::Token, None, Kind::Float, Device::Cpu, 0).expect("loads");
    assert_eq!(report.ignored.len(), 12, "{:?}", report.ignored);
    assert!(
        report
            .ignored
            .iter()
            .any(|n| n == "deberta.embeddings.position_embeddings.weight"),
        "{:?}",
        report.ignored
    );
    check_logits(name, Head::Token);
}

/// ModernBERT's new head: from its published masked-LM checkpoint only the
/// classifier is new (`head.dense` and `head.norm` are the MLM's, its
/// `decoder.` ignored); from a bare `ModernBertModel` the whole head is,
/// drawn as transformers draws it — normals cut at `initializer_cutoff_factor`
/// standard deviations (1/√hidden for the classifier, `initializer_range /
/// √(2 · layers)` for `head.dense`), the norm's weight one.
#[test]
fn modernbert_new_head_is_drawn_as_transformers_draws_it() {
    let mlm = fixtures().join("modernbert-mlm");
    let (model, report) = Encoder::load(
        &mlm,
        Head::Token,
        Some(labels()),
        Kind::Float,
        Device::Cpu,
        7,
    )
    .expect("loads");
    assert_eq!(report.initialised, ["classifier.bias", "classifier.weight"]);
    assert!(
        report.ignored.iter().any(|n| n.starts_with("decoder.")),
        "{:?}",
        report.ignored
    );
    let file = read_tensors(&mlm.join("model.safetensors"));
    let vars = model.var_store().variables();
    assert_eq!(
        max_abs_diff(&vars["head.dense.weight"], &file["head.dense.weight"]),
        0.0
    );

    let (model, report) = Encoder::load(
        &fixtures().join("modernbert-none"),
        Head::Sequence,
        Some(labels()),
        Kind::Float,
        Device::Cpu,
        7,
    )
    .expect("loads");
    assert_eq!(
        report.initialised,
        [
            "classifier.bias",
            "classifier.weight",
            "head.dense.weight",
            "head.norm.weight"
        ]
    );
    let vars = model.var_store().variables();
    let c = model.config();
    let h = c.hidden_size as f64;
    let layers = c.num_hidden_layers as f64;
    // A normal cut at ±2σ keeps 0.880σ of its spread.
    for (name, sigma) in [
        ("classifier.weight", h.powf(-0.5)),
        (
            "head.dense.weight",
            c.initializer_range / (2.0 * layers).sqrt(),
        ),
    ] {
        let t = &vars[name];
        let std = t.std(true).double_value(&[]);
        let max = t.abs().max().double_value(&[]);
        assert!(
            (std - 0.880 * sigma).abs() < 0.12 * sigma,
            "{name}: std {std}, want {}",
            0.880 * sigma
        );
        assert!(
            max <= 2.0 * sigma + 1e-7,
            "{name}: {max} beyond the cut {}",
            2.0 * sigma
        );
        assert!(max > 1.5 * sigma, "{name}: {max}: the tails are drawn");
    }
    assert_eq!(vars["head.norm.weight"].min().double_value(&[]), 1.0);
    assert_eq!(vars["head.norm.weight"].max().double_value(&[]), 1.0);
    assert_eq!(vars["classifier.bias"].abs().max().double_value(&[]), 0.0);
}

/// A plain `BertModel` checkpoint: its encoder is read as-is (names without the
/// `bert.` prefix), its pooler ignored by the token head, and the head is new,
/// initialised as transformers does (normal weights, zero biases).
#[test]
fn a_checkpoint_without_a_head_gets_a_new_one() {
    for (family, head, new_params) in [
        (
            "bert",
            Head::Token,
            vec!["classifier.bias", "classifier.weight"],
        ),
        (
            "roberta",
            Head::Sequence,
            vec![
                "classifier.dense.bias",
                "classifier.dense.weight",
                "classifier.out_proj.bias",
                "classifier.out_proj.weight",
            ],
        ),
        // DeBERTa's pooler sits beside its base, part of the new head.
        (
            "deberta-v3",
            Head::Sequence,
            vec![
                "classifier.bias",
                "classifier.weight",
                "pooler.dense.bias",
                "pooler.dense.weight",
            ],
        ),
    ] {
        let dir = fixtures().join(format!("{family}-none"));
        let (model, report) =
            Encoder::load(&dir, head, Some(labels()), Kind::Float, Device::Cpu, 7).expect("loads");
        assert_eq!(report.initialised, new_params, "{family}");
        let prefix = model.config().family.name();
        if prefix == "bert" || prefix == "roberta" {
            assert!(
                report.ignored.iter().any(|n| n.starts_with("pooler.")),
                "{family}: the base's pooler is not used: {:?}",
                report.ignored
            );
        }
        let file = read_tensors(&dir.join("model.safetensors"));
        let vars = model.var_store().variables();
        let mut read = 0;
        for (name, value) in &file {
            if let Some(ours) = vars.get(&format!("{prefix}.{name}")) {
                assert_eq!(max_abs_diff(ours, value), 0.0, "{name}");
                read += 1;
            }
        }
        assert!(read > 10, "{family}: only {read} tensors compared");
        let range = model.config().initializer_range;
        for name in &new_params {
            let t = &vars[*name];
            if name.ends_with("bias") {
                assert_eq!(t.abs().max().double_value(&[]), 0.0, "{name}");
            } else {
                let std = t.std(true).double_value(&[]);
                assert!(
                    (std - range).abs() < range * 0.35,
                    "{name}: std {std} is not the init range {range}"
                );
            }
        }
    }
}

#[test]
fn a_head_with_other_labels_is_refused_by_name() {
    let dir = fixtures().join("bert-token");
    let other = vec!["O".to_string(), "B-ORG".into(), "I-ORG".into()];
    let err = Encoder::load(&dir, Head::Token, Some(other), Kind::Float, Device::Cpu, 0)
        .expect_err("other labels");
    let msg = err.to_string();
    assert!(
        msg.contains("config.json") && msg.contains("B-ORG") && msg.contains("B-PER"),
        "{msg}"
    );
}

/// What we save is an HF model directory: transformers' pipelines load it, and
/// its logits equal ours.
#[test]
fn a_saved_encoder_runs_in_transformers_pipelines() {
    for (name, head, task) in [
        ("bert-none", Head::Token, "token-classification"),
        ("roberta-none", Head::Sequence, "text-classification"),
        // Saved as XLMRobertaForTokenClassification, model_type xlm-roberta.
        ("xlm-roberta-none", Head::Token, "token-classification"),
        // Saved as DebertaV2For…Classification, model_type deberta-v2.
        ("deberta-v3-none", Head::Token, "token-classification"),
        ("deberta-v2-none", Head::Sequence, "text-classification"),
        // ModernBertFor…Classification, its new head's dense layer and norm included.
        ("modernbert-none", Head::Token, "token-classification"),
        ("modernbert-b-none", Head::Sequence, "text-classification"),
    ] {
        let src = fixtures().join(name);
        let (model, _) =
            Encoder::load(&src, head, Some(labels()), Kind::Float, Device::Cpu, 11).expect("loads");
        let out = tempdir();
        model.save(out.path(), Some(&src), u64::MAX).expect("saves");
        let text = "Alice sees the river";
        let run = Command::new(python())
            .arg(repo_root().join("tests/reference/encoder_reference.py"))
            .args(["pipeline", out.path().to_str().expect("utf-8"), task, text])
            .output()
            .expect("python starts");
        assert!(
            run.status.success(),
            "{}",
            String::from_utf8_lossy(&run.stderr)
        );
        let json: serde_json::Value =
            serde_json::from_slice(&run.stdout).expect("pipeline prints JSON");
        assert!(
            json["result"].as_array().is_some_and(|r| !r.is_empty()),
            "{name}: the pipeline predicts: {json}"
        );
        let ids: Vec<i64> = json["input_ids"]
            .as_array()
            .expect("ids")
            .iter()
            .map(|v| v.as_i64().expect("id"))
            .collect();
        let theirs: Vec<f64> = json["logits"]
            .as_array()
            .expect("logits")
            .iter()
            .flat_map(|row| match row.as_array() {
                Some(r) => r.iter().map(|v| v.as_f64().expect("f64")).collect(),
                None => vec![row.as_f64().expect("f64")],
            })
            .collect();
        let _guard = tch::no_grad_guard();
        let x = Tensor::from_slice(&ids).unsqueeze(0);
        let ours = model
            .forward(&x, &x.ones_like(), None)
            .expect("forward")
            .flatten(0, -1);
        let ours = Vec::<f64>::try_from(ours.to_kind(Kind::Double)).expect("values");
        assert_eq!(ours.len(), theirs.len(), "{name}");
        let worst = ours
            .iter()
            .zip(&theirs)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        assert!(
            worst <= 1e-4,
            "{name}: saved model's logits differ by {worst:.3e}"
        );
        let config: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(out.path().join("config.json")).expect("config"),
        )
        .expect("json");
        assert_eq!(config["id2label"]["1"], "B-PER");
        assert_eq!(config["label2id"]["I-LOC"], 4);
    }
}

/// Words become tokens and labels exactly as transformers' token-classification
/// examples align them (first sub-token labelled, or all with `B-` as `I-`),
/// special tokens and truncation included, for WordPiece and byte-level BPE.
#[test]
fn word_labels_align_with_tokens_as_transformers_does() {
    use dpo_data::TextTokenizer;
    use dpo_data::tagged::{Encoding, Labels, RawFile, Task, encode};
    let dir = tempdir();
    let data = dir.path().join("ner.jsonl");
    std::fs::write(
        &data,
        concat!(
            r#"{"tokens": ["Alice", "visited", "Ravenholm", "and", "Zorblatt-Kiev", "yesterday"], "tags": ["B-PER", "O", "B-LOC", "O", "B-LOC", "O"]}"#,
            "\n",
            r#"{"tokens": ["the", "cat"], "tags": ["O", "O"]}"#,
            "\n",
            r#"{"tokens": ["Bob", "Smithsonianly", "sees", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"], "tags": ["B-PER", "I-PER", "O", "O", "O", "O", "O", "O", "O", "O", "O", "O"]}"#,
            "\n"
        ),
    )
    .expect("write");
    let labels = Labels::new(labels()).expect("labels");
    for name in [
        "bert-token",
        "roberta-token",
        "xlm-roberta-token",
        "deberta-v3-token",
        // Byte-level BPE without a prefix space: each word encoded as if
        // it began the text.
        "modernbert-token",
    ] {
        let model = fixtures().join(name);
        let tokenizer = TextTokenizer::from_dir(&model).expect("tokenizer");
        let records = RawFile::read(&data, Task::Token, &Default::default())
            .expect("reads")
            .resolve(&labels)
            .expect("resolves");
        for (max_length, label_all) in [(64usize, false), (64, true), (12, false)] {
            let how = Encoding {
                max_length,
                label_all_tokens: label_all,
            };
            let (ours, truncated) = encode(&records, &tokenizer, &labels, how).expect("encodes");
            let out = Command::new(python())
                .arg(repo_root().join("tests/reference/encoder_reference.py"))
                .args([
                    "align",
                    model.to_str().expect("utf-8"),
                    data.to_str().expect("utf-8"),
                    &max_length.to_string(),
                    &label_all.to_string(),
                ])
                .output()
                .expect("python starts");
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            let theirs: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
                .lines()
                .map(|l| serde_json::from_str(l).expect("json"))
                .collect();
            assert_eq!(ours.len(), theirs.len());
            for (o, t) in ours.iter().zip(&theirs) {
                let ids: Vec<u32> = o.input_ids.clone();
                let want_ids: Vec<u32> =
                    serde_json::from_value(t["input_ids"].clone()).expect("ids");
                assert_eq!(ids, want_ids, "{name} max_length {max_length}: token ids");
                let mut labels_per_token = vec![-100i64; ids.len()];
                for &(pos, label) in &o.targets {
                    labels_per_token[pos as usize] = label as i64;
                }
                let want: Vec<i64> = serde_json::from_value(t["labels"].clone()).expect("labels");
                assert_eq!(
                    labels_per_token, want,
                    "{name} max_length {max_length} label_all {label_all}: labels"
                );
            }
            // The sentence of 12 words does not fit in 12 tokens.
            assert_eq!(
                truncated > 0,
                max_length == 12,
                "{name}: {truncated} truncated"
            );
        }
    }
}

/// Entity scores equal Python seqeval's (strict IOB2) and classification scores
/// scikit-learn's, on random predictions full of broken spans.
#[test]
fn entity_and_class_scores_equal_seqeval_and_scikit_learn() {
    use dpo_data::rng::SplitMix64;
    use dpo_data::scores::{class_report, entity_report};
    let tags = [
        "O", "O", "O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-ORG", "I-ORG",
    ];
    let mut rng = SplitMix64::new(42);
    let mut pick = |n: usize| (rng.next_u64() % n as u64) as usize;
    let mut gold: Vec<Vec<&str>> = Vec::new();
    let mut pred: Vec<Vec<&str>> = Vec::new();
    for _ in 0..300 {
        let len = 1 + pick(12);
        let g: Vec<&str> = (0..len).map(|_| tags[pick(tags.len())]).collect();
        // Mostly right, with spans broken at random.
        let p: Vec<&str> = g
            .iter()
            .map(|t| {
                if pick(5) == 0 {
                    tags[pick(tags.len())]
                } else {
                    t
                }
            })
            .collect();
        gold.push(g);
        pred.push(p);
    }
    let class_labels: Vec<String> = ["neg", "neu", "pos", "never"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let gold_ids: Vec<u32> = (0..200).map(|_| pick(3) as u32).collect();
    let pred_ids: Vec<u32> = gold_ids
        .iter()
        .map(|&g| if pick(3) == 0 { pick(4) as u32 } else { g })
        .collect();
    let dir = tempdir();
    let input = dir.path().join("scores.json");
    std::fs::write(
        &input,
        serde_json::json!({
            "gold": gold, "pred": pred, "gold_ids": gold_ids, "pred_ids": pred_ids,
            "labels": class_labels,
        })
        .to_string(),
    )
    .expect("write");
    let out = Command::new(python())
        .arg(repo_root().join("tests/reference/encoder_reference.py"))
        .args(["scores", input.to_str().expect("utf-8")])
        .output()
        .expect("python starts");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let theirs: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let close = |a: f64, b: &serde_json::Value, what: &str| {
        let b = b.as_f64().unwrap_or_else(|| panic!("{what}: {b}"));
        assert!((a - b).abs() < 1e-12, "{what}: ours {a}, theirs {b}");
    };
    let ours = entity_report(&gold, &pred);
    let ner = &theirs["ner"];
    close(ours.overall.f1, &ner["f1_score"], "f1");
    close(
        ours.overall.precision,
        &ner["micro avg"]["precision"],
        "micro precision",
    );
    close(
        ours.overall.recall,
        &ner["micro avg"]["recall"],
        "micro recall",
    );
    close(
        ours.averages.macro_f1,
        &ner["macro avg"]["f1-score"],
        "macro f1",
    );
    close(
        ours.averages.weighted_f1,
        &ner["weighted avg"]["f1-score"],
        "weighted f1",
    );
    assert_eq!(ours.per_type.len(), 3);
    for (kind, s) in &ours.per_type {
        close(s.precision, &ner[kind]["precision"], kind);
        close(s.recall, &ner[kind]["recall"], kind);
        close(s.f1, &ner[kind]["f1-score"], kind);
        close(s.support as f64, &ner[kind]["support"], kind);
    }
    assert!(
        ours.overall.f1 > 0.3 && ours.overall.f1 < 0.95,
        "{}",
        ours.overall.f1
    );
    let c = class_report(&gold_ids, &pred_ids, &class_labels);
    let cls = &theirs["cls"];
    close(c.accuracy, &cls["accuracy"], "accuracy");
    close(
        c.averages.macro_f1,
        &cls["macro avg"]["f1-score"],
        "class macro f1",
    );
    close(
        c.averages.weighted_f1,
        &cls["weighted avg"]["f1-score"],
        "class weighted f1",
    );
    for (label, s) in &c.per_class {
        close(s.precision, &cls[label]["precision"], label);
        close(s.recall, &cls[label]["recall"], label);
        close(s.f1, &cls[label]["f1-score"], label);
    }
}

/// A word the tokenizer drops entirely (a zero-width space, removed by BERT's
/// normaliser) is refused by file:line and word, not silently unlabelled.
#[test]
fn a_word_that_gives_no_tokens_is_named() {
    use dpo_data::TextTokenizer;
    use dpo_data::tagged::{Encoding, Labels, RawFile, Task, encode};
    let dir = tempdir();
    let data = dir.path().join("ner.jsonl");
    std::fs::write(
        &data,
        "{\"tokens\": [\"Ann\", \"runs\"], \"tags\": [\"B-PER\", \"O\"]}\n{\"tokens\": [\"Ann\", \"\\u200b\", \"runs\"], \"tags\": [\"B-PER\", \"O\", \"O\"]}\n",
    )
    .expect("write");
    let labels = Labels::new(labels()).expect("labels");
    let tokenizer = TextTokenizer::from_dir(&fixtures().join("bert-token")).expect("tokenizer");
    let records = RawFile::read(&data, Task::Token, &Default::default())
        .expect("reads")
        .resolve(&labels)
        .expect("resolves");
    let how = Encoding {
        max_length: 64,
        label_all_tokens: false,
    };
    let err = encode(&records, &tokenizer, &labels, how)
        .expect_err("refused")
        .to_string();
    assert!(
        err.contains("ner.jsonl:2: word 1 (\"\\u{200b}\") gives no tokens"),
        "{err}"
    );
}
