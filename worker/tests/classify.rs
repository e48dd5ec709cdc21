//! Training encoders with negatives, end to end through `dpo-worker train`:
//! against an independent PyTorch reference (transformers' model, the loss from
//! its formula, torch's AdamW), learning on the synthetic NER task with held-out
//! names, the combined loss driving negatives down, and bad input refused by
//! `file:line` before anything trains.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{
    NER_DATA, SENTIMENT_DATA, max_abs_diff, read_jsonl, read_tensors, run_python, tempdir,
};

const NER_LABELS: &str = "O,B-PER,I-PER,B-LOC,I-LOC";

fn dpo_worker() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_dpo-worker"));
    c.env("RUST_BACKTRACE", "0");
    c
}

/// `dpo-worker train --json` on `spec`; panics with stderr on failure.
fn train(spec: &Path) -> serde_json::Value {
    let out = dpo_worker()
        .args(["train", "--device", "cpu", "--json", "--config"])
        .arg(spec)
        .output()
        .expect("dpo-worker starts");
    assert!(
        out.status.success(),
        "train failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("a JSON summary line")
}

fn tiny_encoder(out: &Path, args: &[&str]) {
    let mut all = vec!["--out", out.to_str().expect("utf-8")];
    all.extend_from_slice(args);
    run_python("examples/tiny_encoder.py", &all);
}

/// Trains `model` on `data` for 4 steps of 4 examples in micro-batches of 2,
/// with us and with the PyTorch reference, and compares losses and weights.
fn check_against_reference(family: &str, task: &str, labels: &str, data: &str, loss: &str) {
    let dir = tempdir();
    let model = dir.path().join("model");
    let head = if task == "token-classification" {
        "token"
    } else {
        "sequence"
    };
    // `deberta-v3`/`deberta-v2`: DeBERTa with those versions' settings.
    let (family, deberta) = match family {
        "deberta-v3" => ("deberta-v2", "v3"),
        "deberta-v2" => ("deberta-v2", "v2"),
        other => (other, "v3"),
    };
    // Dropout off: the reference cannot draw our dropout masks.
    tiny_encoder(
        &model,
        &[
            "--family",
            family,
            "--deberta",
            deberta,
            "--head",
            head,
            "--labels",
            labels,
            "--dropout",
            "0",
            "--init-range",
            "0.1",
            "--seed",
            "5",
        ],
    );
    let data_path = dir.path().join("data.jsonl");
    std::fs::write(&data_path, data).expect("write data");
    let spec = dir.path().join("run.toml");
    std::fs::write(
        &spec,
        format!(
            r#"name = "reference"
[model]
path = "model"
[task]
type = "{task}"
labels = [{}]
[data]
train = "data.jsonl"
shuffle = false
max_length = 32
[objective]
loss = "{loss}"
negative_weight = 0.7
[optim]
lr = 0.01
weight_decay = 0.05
warmup_steps = 2
max_grad_norm = 1.0
[train]
epochs = 2
global_batch_size = 4
micro_batch_size = 2
output = "out"
"#,
            labels
                .split(',')
                .map(|l| format!("{l:?}"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    )
    .expect("write spec");
    let summary = train(&spec);
    assert_eq!(summary["steps"], 4);
    let settings = dir.path().join("settings.json");
    // transformers' logits of what we trained, computed by the same process.
    let final_dir = dir.path().join("out/final");
    let final_logits = dir.path().join("final.ref.safetensors");
    std::fs::write(
        &settings,
        serde_json::json!({
            "task": task, "loss": loss, "negative_weight": 0.7, "lr": 0.01, "weight_decay": 0.05,
            "betas": [0.9, 0.999], "eps": 1e-8, "max_grad_norm": 1.0, "warmup": 2, "steps": 4,
            "global_batch": 4, "micro_batch": 2, "max_length": 32,
            "logits_of": [final_dir, final_logits],
        })
        .to_string(),
    )
    .expect("write settings");
    let reference = dir.path().join("reference.safetensors");
    run_python(
        "tests/reference/encoder_reference.py",
        &[
            "train",
            model.to_str().expect("utf-8"),
            data_path.to_str().expect("utf-8"),
            settings.to_str().expect("utf-8"),
            reference.to_str().expect("utf-8"),
        ],
    );
    let theirs: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("reference.safetensors.json")).expect("losses"),
    )
    .expect("json");
    let ours = read_jsonl(&dir.path().join("out/metrics.jsonl"));
    for (step, (o, t)) in ours
        .iter()
        .zip(theirs["losses"].as_array().expect("losses"))
        .enumerate()
    {
        let (o, t) = (o["loss"].as_f64().expect("loss"), t.as_f64().expect("loss"));
        assert!(
            (o - t).abs() <= 1e-5,
            "{task} {loss} step {step}: loss {o} vs reference {t}"
        );
    }
    if loss == "combined" {
        assert!(
            ours.iter()
                .all(|m| m["negatives"].as_f64().unwrap_or(0.0) > 0.0),
            "every step has negatives"
        );
    }
    let trained = read_tensors(&dir.path().join("out/final/model.safetensors"));
    let want = read_tensors(&reference);
    let initial = read_tensors(&model.join("model.safetensors"));
    let mut worst = 0.0f64;
    let mut moved = 0.0f64;
    for (name, w) in &want {
        let Some(o) = trained.get(name) else {
            // Buffers transformers keeps in its state dict.
            assert!(
                name.ends_with("position_ids") || name.ends_with("token_type_ids"),
                "{name} missing"
            );
            continue;
        };
        let d = max_abs_diff(o, w);
        if d > 1e-5 {
            eprintln!("{name}: {d:.2e}");
        }
        if name.ends_with("attention.self.key.bias") || name.ends_with("key_proj.bias") {
            // Its gradient is zero in exact arithmetic (a key bias adds the same
            // q·b to every score of a query, which softmax ignores — DeBERTa's
            // projected positions' keys too), so what
            // AdamW applies is rounding noise divided by its own size: both
            // sides move it by up to lr per step, in directions of noise.
            assert!(d <= 2.0 * 0.01 * 4.0, "{name}: {d}");
            continue;
        }
        worst = worst.max(d);
        if let Some(i) = initial.get(name) {
            moved = moved.max(max_abs_diff(w, i));
        }
    }
    eprintln!(
        "{task} {loss}: max weight difference {worst:.2e} (largest change in training {moved:.2e})"
    );
    assert!(moved > 1e-3, "training moved the weights");
    assert!(
        worst <= 1e-5,
        "{task} {loss}: weights differ from the reference by {worst:.3e}"
    );
    loads_back_in_transformers(&final_dir, &final_logits);
}

/// What `dpo-worker train` wrote in `dir` is a model transformers loads
/// (`AutoModelFor…Classification`, its tokenizer beside it) and whose logits
/// (`reference`, written by transformers) equal ours on the reference
/// sentences.
fn loads_back_in_transformers(dir: &Path, reference: &Path) {
    use dpo_worker::model::encoder::{Encoder, Head};
    let theirs = read_tensors(reference);
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).expect("config"))
            .expect("json");
    let head = match config["architectures"][0].as_str() {
        Some(a) if a.ends_with("ForTokenClassification") => Head::Token,
        _ => Head::Sequence,
    };
    let _guard = tch::no_grad_guard();
    let (model, _) = Encoder::load(dir, head, None, tch::Kind::Float, tch::Device::Cpu, 0)
        .expect("the trained model loads");
    let mut worst = 0.0f64;
    for i in 0..theirs.len() / 2 {
        let ids = theirs[&format!("input_ids.{i}")].unsqueeze(0);
        let ours = model
            .forward(&ids, &ids.ones_like(), None)
            .expect("forward")
            .squeeze_dim(0);
        let d = max_abs_diff(&ours, &theirs[&format!("logits.{i}")]);
        assert!(d.is_finite(), "logits of sequence {i}: {d}");
        worst = worst.max(d);
    }
    assert!(
        theirs.len() >= 4,
        "transformers' logits of the trained model"
    );
    eprintln!(
        "{}: transformers' logits of the trained model within {worst:.2e} of ours",
        dir.display()
    );
    assert!(worst <= 1e-4, "trained model: logits differ by {worst:.3e}");
}

#[test]
fn ner_cross_entropy_training_equals_pytorch() {
    check_against_reference("bert", "token-classification", NER_LABELS, NER_DATA, "sft");
}

/// XLM-RoBERTa (RoBERTa's architecture, a Unigram tokenizer whose words start
/// with a `▁` piece of their own): each word's label sits on its first piece
/// as transformers' `word_ids()` puts it, so training equals the reference.
#[test]
fn xlm_roberta_ner_training_equals_pytorch() {
    check_against_reference(
        "xlm-roberta",
        "token-classification",
        NER_LABELS,
        NER_DATA,
        "combined",
    );
}

/// DeBERTa-v3 (shared keys, log-bucketed relative positions, no absolute
/// positions, a Unigram tokenizer) for NER with negatives, and DeBERTa-v2's
/// older settings (position projections of their own, absolute positions,
/// narrower embeddings, its pooler) for sequence classification.
#[test]
fn deberta_training_equals_pytorch() {
    check_against_reference(
        "deberta-v3",
        "token-classification",
        NER_LABELS,
        NER_DATA,
        "combined",
    );
    check_against_reference(
        "deberta-v2",
        "sequence-classification",
        "neg,neu,pos",
        SENTIMENT_DATA,
        "combined",
    );
}

/// ModernBERT (pre-norm, rotary, a local layer after a global one, GeGLU,
/// no biases, a byte-level BPE without a prefix space) for NER with
/// negatives, and sequence classification over the real tokens' mean.
#[test]
fn modernbert_training_equals_pytorch() {
    check_against_reference(
        "modernbert",
        "token-classification",
        NER_LABELS,
        NER_DATA,
        "combined",
    );
    check_against_reference(
        "modernbert",
        "sequence-classification",
        "neg,neu,pos",
        SENTIMENT_DATA,
        "combined",
    );
}

#[test]
fn ner_combined_training_equals_pytorch() {
    check_against_reference(
        "bert",
        "token-classification",
        NER_LABELS,
        NER_DATA,
        "combined",
    );
}

#[test]
fn classification_combined_training_equals_pytorch() {
    check_against_reference(
        "roberta",
        "sequence-classification",
        "neg,neu,pos",
        SENTIMENT_DATA,
        "combined",
    );
}

/// The synthetic NER task made by examples/make_tasks.py and a from-scratch
/// BERT whose tokenizer learnt the training text only.
fn ner_task(dir: &Path) -> PathBuf {
    run_python(
        "examples/make_tasks.py",
        &[
            "--out",
            dir.to_str().expect("utf-8"),
            "--train",
            "1000",
            "--eval",
            "150",
        ],
    );
    let model = dir.join("bert");
    let corpus = dir.join("ner/corpus.txt");
    tiny_encoder(
        &model,
        &[
            "--family",
            "bert",
            "--head",
            "none",
            "--hidden",
            "64",
            "--layers",
            "2",
            "--heads",
            "4",
            "--intermediate",
            "128",
            "--vocab",
            "600",
            "--corpus",
            corpus.to_str().expect("utf-8"),
        ],
    );
    model
}

fn ner_spec(dir: &Path, name: &str, loss: &str, negatives: &str, epochs: u32) -> PathBuf {
    let spec = dir.join(format!("{name}.toml"));
    std::fs::write(
        &spec,
        format!(
            r#"name = "{name}"
[model]
path = "bert"
[task]
type = "token-classification"
[data]
train = "ner/train.jsonl"
eval = "ner/dev.jsonl"
negatives = "{negatives}"
max_length = 64
[objective]
loss = "{loss}"
negative_weight = 1.0
[optim]
lr = 3e-3
weight_decay = 0.01
warmup_steps = 10
[train]
epochs = {epochs}
global_batch_size = 16
metric_for_best_model = "eval_f1"
output = "out-{name}"
"#
        ),
    )
    .expect("write spec");
    spec
}

/// Dev entity F1 ≥ 0.9 on names never seen in training; the combined loss
/// drives the probability of the (confusion) negatives down ≥ 10× while the F1
/// holds against cross-entropy alone.
#[test]
fn ner_learns_held_out_names_and_the_combined_loss_drives_negatives_down() {
    let dir = tempdir();
    ner_task(dir.path());
    let combined = train(&ner_spec(
        dir.path(),
        "combined",
        "combined",
        "confusion",
        8,
    ));
    let sft = train(&ner_spec(dir.path(), "sft", "sft", "confusion", 8));
    let f1 = |s: &serde_json::Value| s["best_eval"]["eval_f1"].as_f64().expect("eval_f1");
    let p_neg = |s: &serde_json::Value, which: &str| s[which]["eval_p_negative"].as_f64();
    eprintln!(
        "entity F1: combined {:.4}, sft {:.4}; before {:.4}",
        f1(&combined),
        f1(&sft),
        combined["initial_eval"]["eval_f1"].as_f64().unwrap_or(0.0)
    );
    assert!(
        f1(&combined) >= 0.9,
        "combined: dev entity F1 {}",
        f1(&combined)
    );
    assert!(f1(&sft) >= 0.9, "sft: dev entity F1 {}", f1(&sft));
    assert!(
        f1(&combined) >= f1(&sft) - 0.02,
        "the combined loss keeps the gold F1"
    );
    // Mean p(negative label) at the training negatives, first step vs last.
    let metrics = read_jsonl(&dir.path().join("out-combined/metrics.jsonl"));
    let first = metrics[0]["p_negative"].as_f64().expect("p_negative");
    let tail: Vec<f64> = metrics[metrics.len() - 10..]
        .iter()
        .map(|m| m["p_negative"].as_f64().expect("p_negative"))
        .collect();
    let last = tail.iter().sum::<f64>() / tail.len() as f64;
    let sft_metrics = read_jsonl(&dir.path().join("out-sft/metrics.jsonl"));
    let sft_tail: Vec<f64> = sft_metrics[sft_metrics.len() - 10..]
        .iter()
        .map(|m| m["p_negative"].as_f64().expect("p_negative"))
        .collect();
    let sft_last = sft_tail.iter().sum::<f64>() / sft_tail.len() as f64;
    eprintln!("mean p(negative): {first:.4} at the start, {last:.2e} combined, {sft_last:.2e} sft");
    assert!(
        first / last >= 10.0,
        "p(negative) fell {:.1}x",
        first / last
    );
    assert!(
        last < sft_last,
        "the negative term lowers p(negative) below what CE alone does"
    );
    assert!(
        p_neg(&combined, "best_eval").is_none(),
        "dev has no negatives"
    );
    // final/ is an HF directory that `dpo-worker evaluate` reads back to the
    // same F1 (on the CoNLL copy of the test split too).
    let final_dir = dir.path().join("out-combined/final");
    let out = dpo_worker()
        .args(["evaluate", "--device", "cpu", "--output", "json", "--model"])
        .arg(&final_dir)
        .arg("--data")
        .arg(dir.path().join("ner/dev.jsonl"))
        .output()
        .expect("evaluate runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let again = report["metrics"]["eval_f1"].as_f64().expect("f1");
    assert!(
        (again - f1(&combined)).abs() < 1e-9,
        "evaluate {again} vs training {}",
        f1(&combined)
    );
    let conll = dpo_worker()
        .args(["evaluate", "--device", "cpu", "--model"])
        .arg(&final_dir)
        .arg("--data")
        .arg(dir.path().join("ner/test.conll"))
        .output()
        .expect("evaluate runs");
    assert!(
        conll.status.success(),
        "{}",
        String::from_utf8_lossy(&conll.stderr)
    );
    let text = String::from_utf8_lossy(&conll.stdout);
    assert!(text.contains("micro avg") && text.contains("PER"), "{text}");
}

/// Each kind of bad input is refused before training, naming `file:line` and
/// the reason, and leaves no model behind.
#[test]
fn bad_input_is_refused_by_file_and_line_and_nothing_trains() {
    let dir = tempdir();
    let model = dir.path().join("model");
    tiny_encoder(&model, &["--family", "bert", "--head", "none"]);
    let good = r#"{"tokens": ["Ann", "runs"], "tags": ["B-PER", "O"]}"#;
    let cases: [(&str, &str, &str); 6] = [
        (
            "tags.jsonl",
            r#"{"tokens": ["Ann"], "tags": ["B-FOO"]}"#,
            r#"tags.jsonl:2: tag 0 "B-FOO" is not one of the labels"#,
        ),
        (
            "len.jsonl",
            r#"{"tokens": ["Ann", "x"], "tags": ["B-PER"]}"#,
            "len.jsonl:2: 2 tokens but 1 tags",
        ),
        (
            "empty.jsonl",
            r#"{"tokens": [], "tags": []}"#,
            "empty.jsonl:2: empty sentence",
        ),
        ("notag.conll", "Ann", r#"notag.conll:3: "Ann" has no tag"#),
        (
            "gold.jsonl",
            r#"{"tokens": ["Ann"], "tags": ["B-PER"], "negatives": [{"position": 0, "tag": "B-PER"}]}"#,
            r#"gold.jsonl:2: negative 0 ("B-PER" at word 0) equals the gold tag"#,
        ),
        (
            "seq.jsonl",
            r#"{"tokens": ["Ann"], "tags": ["B-PER"], "negatives": [["B-PER"]]}"#,
            "seq.jsonl:2: negative 0 equals the gold tags",
        ),
    ];
    for (name, bad, want) in cases {
        let first = if name.ends_with(".conll") {
            "Ann B-PER\nruns O\n"
        } else {
            good
        };
        let data = dir.path().join(name);
        std::fs::write(&data, format!("{}\n{bad}\n", first.trim_end())).expect("write");
        let spec = dir.path().join("run.toml");
        std::fs::write(
            &spec,
            format!(
                "name = \"bad\"\n[model]\npath = \"model\"\n[task]\ntype = \"token-classification\"\nlabels = [\"O\", \"B-PER\", \"I-PER\"]\n[data]\ntrain = \"{name}\"\n[train]\nglobal_batch_size = 1\noutput = \"out-{name}\"\n"
            ),
        )
        .expect("write spec");
        let out = dpo_worker()
            .args(["train", "--device", "cpu", "--config"])
            .arg(&spec)
            .output()
            .expect("runs");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{name}: trained on bad input");
        assert!(err.contains(want), "{name}: {err}");
        assert!(
            !dir.path().join(format!("out-{name}/final")).exists()
                && !dir
                    .path()
                    .join(format!("out-{name}/metrics.jsonl"))
                    .exists(),
            "{name}: nothing is written"
        );
    }
    // A bad run spec names the key.
    let spec = dir.path().join("key.toml");
    std::fs::write(
        &spec,
        "name = \"k\"\n[model]\npath = \"model\"\n[task]\ntype = \"token-classification\"\nlabels = [\"O\", \"PER\"]\n[data]\ntrain = \"tags.jsonl\"\n",
    )
    .expect("write");
    let out = dpo_worker()
        .args(["train", "--device", "cpu", "--config"])
        .arg(&spec)
        .output()
        .expect("runs");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("task.labels") && err.contains("\"PER\" is not an IOB2 tag"),
        "{err}"
    );
}

/// A directory with a tiny BERT (no head; `dropout`, `seed`) as `model/` and
/// [`NER_DATA`] as `data.jsonl`.
fn ner_fixture(dropout: &str, seed: &str) -> tempfile::TempDir {
    let dir = tempdir();
    tiny_encoder(
        &dir.path().join("model"),
        &[
            "--family",
            "bert",
            "--head",
            "none",
            "--dropout",
            dropout,
            "--seed",
            seed,
        ],
    );
    std::fs::write(dir.path().join("data.jsonl"), NER_DATA).expect("write data");
    dir
}

/// Two ranks over the tcp ring (`--peers`/`--rank`) train the weights of one
/// process: each rank takes a share of every global batch, losses are normalised
/// over the whole batch and gradients summed.
#[test]
fn two_ranks_train_the_weights_of_one_process() {
    let dir = ner_fixture("0", "9");
    let spec = |out: &str| {
        let path = dir.path().join(format!("{out}.toml"));
        std::fs::write(
            &path,
            format!(
                "name = \"dp\"\n[model]\npath = \"model\"\n[task]\ntype = \"token-classification\"\n\
                 [data]\ntrain = \"data.jsonl\"\neval = \"data.jsonl\"\nnegatives = \"random\"\nmax_length = 32\n[objective]\nloss = \"combined\"\n\
                 [optim]\nlr = 0.01\n[train]\nepochs = 3\nglobal_batch_size = 4\nmicro_batch_size = 1\noutput = \"{out}\"\n"
            ),
        )
        .expect("write spec");
        path
    };
    let one = spec("one");
    train(&one);
    let two = spec("two");
    let peers = common::free_ports(2);
    let ranks: Vec<std::process::Child> = (0..2)
        .map(|r| {
            dpo_worker()
                .args(["train", "--device", "cpu", "--config"])
                .arg(&two)
                .args(["--peers", &peers, "--rank", &r.to_string()])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("rank starts")
        })
        .collect();
    for (r, child) in ranks.into_iter().enumerate() {
        let out = child.wait_with_output().expect("rank ends");
        assert!(
            out.status.success(),
            "rank {r}:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let a = read_tensors(&dir.path().join("one/final/model.safetensors"));
    let b = read_tensors(&dir.path().join("two/final/model.safetensors"));
    let mut worst = 0.0f64;
    for (name, x) in &a {
        let d = max_abs_diff(x, &b[name]);
        if name.ends_with("attention.self.key.bias") {
            // Zero gradient in exact arithmetic: AdamW steps on rounding noise
            // (see check_against_reference).
            continue;
        }
        worst = worst.max(d);
    }
    eprintln!("two ranks vs one process: max weight difference {worst:.2e}");
    assert!(worst <= 1e-5, "{worst}");
    let m1 = read_jsonl(&dir.path().join("one/metrics.jsonl"));
    let m2 = read_jsonl(&dir.path().join("two/metrics.jsonl"));
    assert_eq!(m1.len(), 6);
    assert_eq!(m2.len(), 6);
    for (x, y) in m1.iter().zip(&m2) {
        assert!(
            (x["loss"].as_f64().expect("loss") - y["loss"].as_f64().expect("loss")).abs() < 1e-6
        );
        assert_eq!(y["world_size"], 2.0);
        assert_eq!(
            x["negatives"], y["negatives"],
            "both count the negatives of the whole batch"
        );
    }
    // Each rank evaluated its share of the eval split; the gathered report is
    // the one process's.
    let e1 = read_jsonl(&dir.path().join("one/eval.jsonl"));
    let e2 = read_jsonl(&dir.path().join("two/eval.jsonl"));
    assert_eq!(e1.len(), 4, "before training and after each of 3 epochs");
    for (x, y) in e1.iter().zip(&e2) {
        let (x, y) = (
            x.as_object().expect("object"),
            y.as_object().expect("object"),
        );
        assert_eq!(x.keys().collect::<Vec<_>>(), y.keys().collect::<Vec<_>>());
        for (k, v) in x {
            let (a, b) = (v.as_f64().expect("number"), y[k].as_f64().expect("number"));
            assert!((a - b).abs() < 1e-6, "{k}: {a} vs {b}");
        }
    }
}

/// A run killed after step 3 (mid-epoch; a checkpoint every step) and resumed
/// ends with the weights, metrics and evaluations of a run never interrupted,
/// bit for bit — with dropout on and adversarial negatives mined with the
/// weights of each epoch's start (which the checkpoint carries).
#[test]
fn a_killed_run_resumes_to_the_weights_of_an_uninterrupted_one() {
    killed_run_resumes("", "model.safetensors");
}

/// The same with LoRA (adapter dropout on): checkpoints hold the adapters
/// and the head, and the resumed run ends with the uninterrupted one's.
#[test]
fn a_killed_lora_run_resumes_to_the_adapters_of_an_uninterrupted_one() {
    killed_run_resumes(
        "[lora]\nr = 4\ndropout = 0.1\ntarget_modules = [\"query\", \"key\", \"value\"]\n",
        "adapter_model.safetensors",
    );
}

/// Trains the NER fixture (dropout and adversarial negatives on) in one go,
/// and again killed after step 3 and resumed; `extra` ends the spec, `file`
/// is what `final/` holds.
fn killed_run_resumes(extra: &str, file: &str) {
    let dir = ner_fixture("0.1", "4");
    let spec = |out: &str| {
        let path = dir.path().join(format!("{out}.toml"));
        std::fs::write(
            &path,
            format!(
                "name = \"resume\"\n[model]\npath = \"model\"\n[task]\ntype = \"token-classification\"\n\
                 negatives_per_label = 2\n[data]\ntrain = \"data.jsonl\"\neval = \"data.jsonl\"\n\
                 negatives = \"adversarial\"\nmax_length = 32\n[optim]\nlr = 0.01\n[train]\nepochs = 3\n\
                 global_batch_size = 4\nmicro_batch_size = 2\ncheckpoint_every = 1\nsave_total_limit = 1\n\
                 metric_for_best_model = \"eval_f1\"\noutput = \"{out}\"\n{extra}"
            ),
        )
        .expect("write spec");
        path
    };
    let whole = spec("whole");
    train(&whole);
    let broken = spec("broken");
    let halted = dpo_worker()
        .args([
            "train",
            "--device",
            "cpu",
            "--halt-after-step",
            "3",
            "--config",
        ])
        .arg(&broken)
        .output()
        .expect("runs");
    assert_eq!(
        halted.status.code(),
        Some(86),
        "{}",
        String::from_utf8_lossy(&halted.stderr)
    );
    assert!(!dir.path().join("broken/final").exists());
    assert_eq!(
        read_jsonl(&dir.path().join("broken/metrics.jsonl")).len(),
        3
    );
    // Without --resume the directory is refused, not overwritten.
    let again = dpo_worker()
        .args(["train", "--device", "cpu", "--config"])
        .arg(&broken)
        .output()
        .expect("runs");
    assert!(String::from_utf8_lossy(&again.stderr).contains("pass --resume"));
    let resumed = dpo_worker()
        .args(["train", "--device", "cpu", "--resume", "--json", "--config"])
        .arg(&broken)
        .output()
        .expect("runs");
    assert!(
        resumed.status.success(),
        "{}",
        String::from_utf8_lossy(&resumed.stderr)
    );
    let a = read_tensors(&dir.path().join("whole/final").join(file));
    let b = read_tensors(&dir.path().join("broken/final").join(file));
    assert!(!a.is_empty());
    assert_eq!(
        common::max_weight_diff(&a, &b),
        0.0,
        "bit-identical weights"
    );
    let drop_time = |v: Vec<serde_json::Value>| -> Vec<serde_json::Value> {
        v.into_iter()
            .map(|mut m| {
                m.as_object_mut().map(|o| o.remove("step_seconds"));
                m
            })
            .collect()
    };
    let m1 = drop_time(read_jsonl(&dir.path().join("whole/metrics.jsonl")));
    let m2 = drop_time(read_jsonl(&dir.path().join("broken/metrics.jsonl")));
    assert_eq!(m1.len(), 6);
    assert_eq!(m1, m2, "every step once, with the same figures");
    assert!(
        m1.iter()
            .all(|m| m["negatives"].as_f64().unwrap_or(0.0) > 0.0),
        "mined negatives train"
    );
    assert_eq!(
        read_jsonl(&dir.path().join("whole/eval.jsonl")),
        read_jsonl(&dir.path().join("broken/eval.jsonl"))
    );
    let kept: Vec<_> = std::fs::read_dir(dir.path().join("broken/checkpoints"))
        .expect("checkpoints")
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect();
    // The last step writes final/, not a checkpoint; older ones are pruned.
    assert_eq!(kept, vec!["step-5"], "save_total_limit = 1");
}

/// A task and a model that do not fit are refused naming the model's config.
#[test]
fn a_causal_lm_for_a_classification_task_and_the_reverse_are_refused() {
    let dir = tempdir();
    tiny_encoder(
        &dir.path().join("bert"),
        &["--family", "bert", "--head", "none"],
    );
    run_python(
        "examples/tiny_model.py",
        &[
            "--out",
            dir.path().join("llama").to_str().expect("utf-8"),
            "--arch",
            "llama",
        ],
    );
    std::fs::write(dir.path().join("data.jsonl"), NER_DATA).expect("write");
    std::fs::write(
        dir.path().join("pairs.jsonl"),
        "{\"prompt\": \"a\", \"chosen\": \"b\", \"rejected\": \"c\"}\n",
    )
    .expect("write");
    for (model, task, data, want) in [
        (
            "llama",
            "[task]\ntype = \"token-classification\"\n",
            "data.jsonl",
            "is a causal LM; task.type = \"token-classification\" needs an encoder",
        ),
        ("bert", "", "pairs.jsonl", "is an encoder: set [task] type"),
    ] {
        let spec = dir.path().join("run.toml");
        std::fs::write(
            &spec,
            format!("name = \"x\"\n[model]\npath = \"{model}\"\n{task}[data]\ntrain = \"{data}\"\n[train]\nglobal_batch_size = 1\noutput = \"out-{model}\"\n"),
        )
        .expect("write");
        let out = dpo_worker()
            .args(["train", "--device", "cpu", "--config"])
            .arg(&spec)
            .output()
            .expect("runs");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert!(
            err.contains(want) && err.contains("config.json"),
            "{model}: {err}"
        );
    }
}
