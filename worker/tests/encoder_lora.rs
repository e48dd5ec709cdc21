//! LoRA on the encoders against PEFT itself
//! (`tests/reference/encoder_reference.py`): PEFT makes an adapter for BERT
//! token classification and RoBERTa sequence classification (its head in
//! `modules_to_save`), we train it for 3 SGD steps through `dpo-worker train`,
//! PEFT trains the same adapter the same way (transformers' model, the loss
//! from its formula); losses, adapters and heads must agree to 1e-5, PEFT
//! must load what we wrote and give the logits of the adapter it trained, and
//! our merged model (our base with our adapters folded in) must give the
//! logits of PEFT's `merge_and_unload()` of our adapter onto the original
//! base — so the base did not move.

mod common;

use std::path::Path;

use common::{
    NER_DATA, SENTIMENT_DATA, max_abs_diff, read_jsonl, read_tensors, run_python, tempdir,
};

const STEPS: u64 = 3;
const LR: f64 = 0.5;

fn reference(args: &[&str]) {
    run_python("tests/reference/encoder_reference.py", args);
}

fn train(spec: &Path) -> serde_json::Value {
    let out = common::train_output(spec, &["--json"]);
    assert!(
        out.status.success(),
        "train failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("a JSON summary line")
}

fn check_against_peft(
    task: &str,
    family: &str,
    labels: &str,
    data: &str,
    loss: &str,
    targets: &[&str],
    spec_targets: &[&str],
) {
    let dir = tempdir();
    // `deberta-v3`/`deberta-v2`: DeBERTa with those versions' settings.
    let (family, deberta) = match family {
        "deberta-v3" => ("deberta-v2", "v3"),
        "deberta-v2" => ("deberta-v2", "v2"),
        other => (other, "v3"),
    };
    let model = dir.path().join("model");
    let head = if task == "token-classification" {
        "token"
    } else {
        "sequence"
    };
    // Dropout off: PEFT cannot draw our dropout masks.
    run_python(
        "examples/tiny_encoder.py",
        &[
            "--out",
            model.to_str().expect("utf-8"),
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
    let init = dir.path().join("init");
    reference(&[
        "lora-init",
        model.to_str().expect("utf-8"),
        init.to_str().expect("utf-8"),
        "4",
        "8",
        &targets.join(","),
    ]);
    std::fs::write(dir.path().join("data.jsonl"), data).expect("write data");
    let quoted = |v: &[&str]| {
        v.iter()
            .map(|l| format!("{l:?}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let label_list: Vec<&str> = labels.split(',').collect();
    let spec = dir.path().join("run.toml");
    std::fs::write(
        &spec,
        format!(
            r#"name = "lora"
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
name = "sgd"
lr = {LR}
max_grad_norm = 0.0
schedule = "constant"
[train]
max_steps = {STEPS}
global_batch_size = 4
micro_batch_size = 2
output = "out"
[lora]
r = 4
alpha = 8.0
target_modules = [{}]
init_from = "init"
merge = true
"#,
            quoted(&label_list),
            quoted(spec_targets),
        ),
    )
    .expect("write spec");
    let summary = train(&spec);
    assert_eq!(summary["steps"], STEPS);
    let settings = dir.path().join("settings.json");
    std::fs::write(
        &settings,
        serde_json::json!({
            "task": task, "loss": loss, "negative_weight": 0.7, "lr": LR, "weight_decay": 0.0,
            "optimizer": "sgd", "schedule": "constant", "max_grad_norm": 0.0, "warmup": 0,
            "steps": STEPS, "global_batch": 4, "micro_batch": 2, "max_length": 32,
            "lora_init": init,
        })
        .to_string(),
    )
    .expect("write settings");
    let theirs = dir.path().join("reference.safetensors");
    reference(&[
        "train",
        model.to_str().expect("utf-8"),
        dir.path().join("data.jsonl").to_str().expect("utf-8"),
        settings.to_str().expect("utf-8"),
        theirs.to_str().expect("utf-8"),
    ]);
    let losses: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("reference.safetensors.json")).expect("losses"),
    )
    .expect("json");
    let ours = read_jsonl(&dir.path().join("out/metrics.jsonl"));
    assert_eq!(ours.len() as u64, STEPS);
    for (step, (o, t)) in ours
        .iter()
        .zip(losses["losses"].as_array().expect("losses"))
        .enumerate()
    {
        let (o, t) = (o["loss"].as_f64().expect("loss"), t.as_f64().expect("loss"));
        assert!(
            (o - t).abs() <= 1e-5,
            "{task} step {step}: loss {o} vs PEFT {t}"
        );
    }
    // The adapter and head we wrote, tensor by tensor, against PEFT's.
    let final_dir = dir.path().join("out/final");
    let adapter = read_tensors(&final_dir.join("adapter_model.safetensors"));
    let peft = read_tensors(
        &dir.path()
            .join("reference.safetensors.adapter/adapter_model.safetensors"),
    );
    let start = read_tensors(&init.join("adapter_model.safetensors"));
    assert_eq!(
        adapter.keys().collect::<Vec<_>>(),
        peft.keys().collect::<Vec<_>>(),
        "the same tensors under the same names as PEFT's"
    );
    assert!(
        adapter.keys().any(|k| k.contains("classifier")),
        "the head is saved with the adapters"
    );
    let (mut worst, mut moved) = (0.0f64, 0.0f64);
    for (name, t) in &peft {
        worst = worst.max(max_abs_diff(&adapter[name], t));
        moved = moved.max(max_abs_diff(t, &start[name]));
    }
    eprintln!(
        "{task}: adapters and head within {worst:.2e} of PEFT's (largest change {moved:.2e})"
    );
    assert!(moved > 1e-3, "training moved the adapters");
    assert!(
        worst <= 1e-5,
        "{task}: adapters differ from PEFT's by {worst:.3e}"
    );
    let config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(final_dir.join("adapter_config.json")).expect("config"),
    )
    .expect("json");
    let want_type = if head == "token" {
        "TOKEN_CLS"
    } else {
        "SEQ_CLS"
    };
    assert_eq!(config["task_type"], want_type);
    assert_eq!(config["modules_to_save"], serde_json::json!(["classifier"]));
    // PEFT loads ours and gives the logits of what it trained; our merged
    // model gives the logits of PEFT's merge of ours.
    let results = dir.path().join("results.json");
    reference(&[
        "lora-check",
        model.to_str().expect("utf-8"),
        final_dir.to_str().expect("utf-8"),
        dir.path()
            .join("reference.safetensors.adapter")
            .to_str()
            .expect("utf-8"),
        results.to_str().expect("utf-8"),
    ]);
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&results).expect("results")).expect("json");
    eprintln!("{task}: {r}");
    assert!(
        r["reference_vs_base"].as_f64().expect("base") > 1e-3,
        "training changed the logits"
    );
    assert!(
        r["peft_vs_reference"].as_f64().expect("peft") <= 1e-5,
        "{r}"
    );
    assert!(r["merged_vs_peft"].as_f64().expect("merged") <= 1e-5, "{r}");
}

#[test]
fn bert_ner_lora_equals_peft_and_peft_loads_it() {
    check_against_peft(
        "token-classification",
        "bert",
        "O,B-PER,I-PER,B-LOC,I-LOC",
        NER_DATA,
        "sft",
        &["query", "value"],
        &["query", "value"],
    );
}

#[test]
fn roberta_sequence_classification_lora_equals_peft_and_peft_loads_it() {
    check_against_peft(
        "sequence-classification",
        "roberta",
        "neg,neu,pos",
        SENTIMENT_DATA,
        "combined",
        &["query", "key", "value"],
        &["query", "key", "value"],
    );
}

/// DeBERTa-v3's projections are `query_proj`, `key_proj`, `value_proj`; with
/// shared attention keys the adapters on the query and key projections also
/// turn the relative positions, in PEFT as here. A spec's BERT names (the
/// default `query`, `value`) stand for them; the adapter carries DeBERTa's.
#[test]
fn deberta_lora_equals_peft_and_peft_loads_it() {
    check_against_peft(
        "token-classification",
        "deberta-v3",
        "O,B-PER,I-PER,B-LOC,I-LOC",
        NER_DATA,
        "combined",
        &["query_proj", "key_proj", "value_proj"],
        &["query_proj", "key", "value_proj"],
    );
    check_against_peft(
        "sequence-classification",
        "deberta-v2",
        "neg,neu,pos",
        SENTIMENT_DATA,
        "combined",
        &["query_proj", "value_proj"],
        &["query", "value"],
    );
}

/// ModernBERT: adapters on its fused `Wqkv`, both `Wo` (the attention's and
/// the MLP's, one name in PEFT as here) and `Wi`, for NER; the spec's
/// `query`/`value` standing for `Wqkv` for mean-pooled sequence
/// classification.
#[test]
fn modernbert_lora_equals_peft_and_peft_loads_it() {
    check_against_peft(
        "token-classification",
        "modernbert",
        "O,B-PER,I-PER,B-LOC,I-LOC",
        NER_DATA,
        "combined",
        &["Wqkv", "Wo", "Wi"],
        &["Wqkv", "Wo", "Wi"],
    );
    check_against_peft(
        "sequence-classification",
        "modernbert",
        "neg,neu,pos",
        SENTIMENT_DATA,
        "combined",
        &["Wqkv"],
        &["query", "value"],
    );
}

/// A module the model does not have is refused by name, not skipped.
#[test]
fn a_lora_target_the_encoder_lacks_is_refused() {
    let dir = tempdir();
    let model = dir.path().join("model");
    run_python(
        "examples/tiny_encoder.py",
        &[
            "--out",
            model.to_str().expect("utf-8"),
            "--family",
            "bert",
            "--head",
            "token",
            "--labels",
            "O,B-PER,I-PER",
        ],
    );
    let (mut encoder, _) = dpo_worker::model::encoder::Encoder::load(
        &model,
        dpo_worker::model::encoder::Head::Token,
        None,
        tch::Kind::Float,
        tch::Device::Cpu,
        0,
    )
    .expect("loads");
    let spec = dpo_proto::LoraSpec {
        target_modules: dpo_proto::TargetModules::Names(vec!["query".into(), "Wqkv".into()]),
        ..Default::default()
    };
    let err = encoder
        .add_lora(&spec, 0)
        .expect_err("Wqkv is ModernBERT's");
    let msg = err.to_string();
    assert!(
        msg.contains("lora.target_modules")
            && msg.contains("\"Wqkv\"")
            && msg.contains("query, value"),
        "{msg}"
    );
}
