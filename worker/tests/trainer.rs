//! `dpo-worker train` against an independent PyTorch implementation of every loss,
//! exact resume after a crash, and run-spec errors.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{
    fixture, fixtures, max_weight_diff, read_jsonl, run_python, tempdir, train_output as train,
};
use dpo_worker::model::checkpoint::read_tensors;
use serde_json::json;

fn train_ok(config: &Path, extra: &[&str]) {
    let out = train(config, extra);
    assert!(
        out.status.success(),
        "dpo-worker train {} failed:\n{}",
        config.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// One comparison case: our TOML sections and the reference script's parameters.
struct Case {
    name: &'static str,
    loss: &'static str,
    beta: f64,
    label_smoothing: f64,
    nll_weight: f64,
    optimizer: &'static str,
    lr: f64,
    weight_decay: f64,
    max_grad_norm: f64,
    warmup_steps: u64,
    schedule: &'static str,
    reference: &'static str,
    precompute: bool,
    /// Pair-aware packing (the PyTorch reference computes unpacked rows).
    packing: bool,
}

const BASE: Case = Case {
    name: "",
    loss: "sigmoid",
    beta: 0.1,
    label_smoothing: 0.0,
    nll_weight: 0.0,
    optimizer: "sgd",
    lr: 2.0,
    weight_decay: 0.0,
    max_grad_norm: 0.0,
    warmup_steps: 0,
    schedule: "constant",
    reference: "same",
    precompute: false,
    packing: false,
};

const STEPS: u64 = 3;
const GLOBAL: usize = 4;

fn write_spec(dir: &Path, model: &Path, data: &Path, c: &Case) -> PathBuf {
    let spec = format!(
        r#"name = "{name}"
[model]
path = "{model}"
[reference]
path = "{reference}"
precompute = {precompute}
cache = "{cache}"
[data]
train = "{data}"
shuffle = false
max_length = 512
max_prompt_length = 256
[objective]
loss = "{loss}"
beta = {beta}
label_smoothing = {ls}
nll_weight = {nll}
negative_weight = 0.5
[optim]
name = "{opt}"
lr = {lr}
weight_decay = {wd}
max_grad_norm = {clip}
schedule = "{schedule}"
warmup_steps = {warmup}
[train]
max_steps = {STEPS}
global_batch_size = {GLOBAL}
micro_batch_size = 2
packing = {packing}
output = "{out}"
"#,
        name = c.name,
        model = model.display(),
        reference = c.reference,
        precompute = c.precompute,
        cache = dir.join("reference-cache").display(),
        data = data.display(),
        loss = c.loss,
        beta = c.beta,
        ls = c.label_smoothing,
        nll = c.nll_weight,
        opt = c.optimizer,
        lr = c.lr,
        wd = c.weight_decay,
        clip = c.max_grad_norm,
        schedule = c.schedule,
        warmup = c.warmup_steps,
        packing = c.packing,
        out = dir.join(c.name).display(),
    );
    let path = dir.join(format!("{}.toml", c.name));
    std::fs::write(&path, spec).expect("write spec");
    path
}

/// DPO on fixture `family` (the run named `name`): 3 SGD steps (at `lr`) equal
/// PyTorch's on transformers' model, which scores each sequence alone (as
/// the worker's log-probs of a sequence do not depend on its batch); `has`
/// names a parameter only that family's checkpoint holds.
fn dpo_matches_the_pytorch_reference(family: &str, name: &'static str, has: &str, lr: f64) {
    let model = fixture(family);
    let data = fixtures().join("pairs_tokens.jsonl");
    let dir = tempdir();
    let c = Case { name, lr, ..BASE };
    train_ok(&write_spec(dir.path(), &model, &data, &c), &[]);
    let theirs = dir.path().join(format!("{name}.reference.safetensors"));
    let cases_json = dir.path().join("cases.json");
    std::fs::write(
        &cases_json,
        json!({"model": model, "data": data, "per_sequence": true, "cases": [{
            "name": c.name, "loss": c.loss, "beta": c.beta, "label_smoothing": 0.0,
            "nll_weight": 0.0, "negative_weight": 0.5, "optimizer": c.optimizer, "lr": c.lr,
            "weight_decay": 0.0, "max_grad_norm": 0.0, "warmup_steps": 0,
            "schedule": "constant_with_warmup", "steps": STEPS, "global_batch_size": GLOBAL,
            "reference_free": false, "out": theirs,
        }]})
        .to_string(),
    )
    .expect("write");
    run_python("tests/reference/dpo_reference.py", &[&cases_json]);
    let initial = read_tensors(&model.join("model.safetensors")).expect("initial weights");
    let ours = read_tensors(&dir.path().join(c.name).join("final/model.safetensors"))
        .expect("our weights");
    let theirs = read_tensors(&theirs).expect("reference");
    let (moved, diff) = (
        max_weight_diff(&ours, &initial),
        max_weight_diff(&ours, &theirs),
    );
    eprintln!("{family} dpo: weights moved {moved:.2e}, max |ours - pytorch| {diff:.2e}");
    assert!(moved > 1e-3, "training moved the weights: {moved}");
    assert!(diff <= 1e-5, "max weight difference {diff} > 1e-5");
    assert!(ours.keys().any(|k| k.ends_with(has)), "{:?}", ours.keys());
    loads_back_in_transformers(family, &dir.path().join(c.name).join("final"));
}

/// What `dpo-worker train` wrote in `final` is a model transformers loads
/// (`AutoModelForCausalLM`), whose logits equal ours on two sequences.
fn loads_back_in_transformers(family: &str, final_dir: &Path) {
    use tch::{Device, Kind, Tensor};
    let _guard = tch::no_grad_guard();
    let model = dpo_worker::model::checkpoint::load(final_dir, Kind::Float, Device::Cpu)
        .expect("the trained model loads");
    let vocab = model.config().vocab_size;
    let seqs: Vec<Tensor> = (0..2i64)
        .map(|i| {
            let ids: Vec<i64> = (1..=12i64).map(|t| (t * 7 + i * 3) % vocab).collect();
            Tensor::from_slice(&ids)
        })
        .collect();
    let scratch = tempdir();
    let inputs = scratch.path().join("inputs.safetensors");
    let named: Vec<(String, &Tensor)> = seqs
        .iter()
        .enumerate()
        .map(|(i, t)| (format!("input_ids.{i}"), t))
        .collect();
    Tensor::write_safetensors(&named, &inputs).expect("write inputs");
    let out = scratch.path().join("logits.safetensors");
    run_python(
        "tests/reference/hf_reference.py",
        &[
            "logits",
            final_dir.to_str().expect("utf-8"),
            inputs.to_str().expect("utf-8"),
            out.to_str().expect("utf-8"),
        ],
    );
    let theirs = read_tensors(&out).expect("transformers' logits");
    let mut worst = 0.0f64;
    for (i, ids) in seqs.iter().enumerate() {
        let ours = model
            .forward(&ids.unsqueeze(0), None)
            .expect("forward")
            .squeeze_dim(0);
        let want = &theirs[&format!("logits.{i}")];
        assert_eq!(ours.size(), want.size(), "{family}: logits' shape");
        let d = (&ours - want).abs().max().double_value(&[]);
        let scale = want.abs().max().double_value(&[]);
        assert!(
            d.is_finite() && scale > 1e-3,
            "{family}: logits {d} at scale {scale}"
        );
        worst = worst.max(d);
    }
    eprintln!("{family}: transformers' logits of the trained model within {worst:.2e} of ours");
    assert!(
        worst <= 1e-4,
        "{family}: trained model's logits differ by {worst:.3e}"
    );
}

/// Qwen3: per-head q/k norms, head_dim apart from hidden/heads, no
/// attention bias.
#[test]
fn qwen3_dpo_matches_the_pytorch_reference() {
    dpo_matches_the_pytorch_reference("qwen3", "qwen3-dpo", "self_attn.q_norm.weight", BASE.lr);
}

/// Phi-3 (as Phi-4-mini): fused qkv_proj and gate_up_proj, rotary on 3/4
/// of each head, LongRoPE (the pairs pass its original context of 16).
#[test]
fn phi3_dpo_matches_the_pytorch_reference() {
    dpo_matches_the_pytorch_reference("phi3", "phi3-dpo", "mlp.gate_up_proj.weight", BASE.lr);
}

/// Gemma 2: soft-capped attention scores and logits (their gradients
/// through tanh), (1 + w) norms, four norms a layer, √hidden embeddings,
/// a sliding-window layer.
#[test]
fn gemma2_dpo_matches_the_pytorch_reference() {
    dpo_matches_the_pytorch_reference(
        "gemma2",
        "gemma2-dpo",
        "pre_feedforward_layernorm.weight",
        1.0,
    );
}

/// Gemma 3 (text): (1 + w) q/k norms, a rotary base per layer type.
#[test]
fn gemma3_dpo_matches_the_pytorch_reference() {
    // At lr 2 this model's three steps move the weights by 18 and rounding
    // differences grow with them (9.9e-3 apart); at 0.1 they move by 0.08
    // and agree to 1.2e-6.
    dpo_matches_the_pytorch_reference("gemma3", "gemma3-dpo", "self_attn.q_norm.weight", 0.1);
}

#[test]
fn every_loss_matches_the_pytorch_reference() {
    let model = fixture("qwen2"); // biases (no weight decay) and tied embeddings
    let data = fixtures().join("pairs_tokens.jsonl");
    let cases = [
        Case {
            name: "dpo",
            ..BASE
        },
        Case {
            name: "cdpo",
            label_smoothing: 0.2,
            ..BASE
        },
        Case {
            name: "robust",
            loss: "robust",
            label_smoothing: 0.2,
            ..BASE
        },
        Case {
            name: "ipo",
            loss: "ipo",
            lr: 0.05,
            ..BASE
        },
        Case {
            name: "hinge",
            loss: "hinge",
            ..BASE
        },
        Case {
            name: "rpo",
            nll_weight: 0.5,
            lr: 0.5,
            ..BASE
        },
        Case {
            name: "sft",
            loss: "sft",
            lr: 0.5,
            ..BASE
        },
        Case {
            name: "combined",
            loss: "combined",
            lr: 0.5,
            ..BASE
        },
        Case {
            name: "dpo-packed",
            packing: true,
            ..BASE
        },
        Case {
            name: "combined-packed",
            loss: "combined",
            lr: 0.5,
            packing: true,
            ..BASE
        },
        Case {
            name: "reference-free",
            reference: "none",
            ..BASE
        },
        Case {
            name: "adamw",
            optimizer: "adamw",
            lr: 1e-3,
            weight_decay: 0.1,
            max_grad_norm: 0.5,
            warmup_steps: 1,
            schedule: "linear",
            precompute: true,
            ..BASE
        },
        Case {
            name: "cosine-sgd-clip",
            max_grad_norm: 0.05,
            warmup_steps: 1,
            schedule: "cosine",
            weight_decay: 0.01,
            precompute: true,
            ..BASE
        },
    ];
    let dir = tempdir();
    let mut py_cases = Vec::new();
    for c in &cases {
        let spec = write_spec(dir.path(), &model, &data, c);
        train_ok(&spec, &[]);
        py_cases.push(json!({
            "name": c.name, "loss": c.loss, "beta": c.beta, "label_smoothing": c.label_smoothing,
            "nll_weight": c.nll_weight, "negative_weight": 0.5, "optimizer": c.optimizer, "lr": c.lr,
            "weight_decay": c.weight_decay, "max_grad_norm": c.max_grad_norm,
            "warmup_steps": c.warmup_steps,
            "schedule": if c.schedule == "constant" { "constant_with_warmup" } else { c.schedule },
            "steps": STEPS, "global_batch_size": GLOBAL, "reference_free": c.reference == "none",
            "out": dir.path().join(format!("{}.reference.safetensors", c.name)),
        }));
    }
    let cases_json = dir.path().join("cases.json");
    std::fs::write(
        &cases_json,
        json!({"model": model, "data": data, "cases": py_cases}).to_string(),
    )
    .expect("write");
    run_python("tests/reference/dpo_reference.py", &[&cases_json]);

    let initial = read_tensors(&model.join("model.safetensors")).expect("initial weights");
    let ours = |name: &str| {
        read_tensors(&dir.path().join(name).join("final/model.safetensors")).expect("weights")
    };
    // The added terms matter: unlikelihood changes SFT, the NLL term changes DPO.
    assert!(max_weight_diff(&ours("combined"), &ours("sft")) > 1e-4);
    assert!(max_weight_diff(&ours("rpo"), &ours("dpo")) > 1e-4);
    assert!(max_weight_diff(&ours("reference-free"), &ours("dpo")) > 1e-4);
    for c in &cases {
        let ours = read_tensors(&dir.path().join(c.name).join("final/model.safetensors"))
            .expect("our weights");
        let theirs = read_tensors(&dir.path().join(format!("{}.reference.safetensors", c.name)))
            .expect("reference");
        let moved = max_weight_diff(&ours, &initial);
        let diff = max_weight_diff(&ours, &theirs);
        eprintln!(
            "{:>16}: weights moved {moved:.2e}, max |ours - pytorch| {diff:.2e}",
            c.name
        );
        assert!(
            moved > 1e-3,
            "{}: training must move the weights well beyond the tolerance",
            c.name
        );
        assert!(
            diff <= 1e-5,
            "{}: max weight difference {diff} > 1e-5",
            c.name
        );
    }
}

fn metrics_steps(path: &Path) -> Vec<u64> {
    read_jsonl(path)
        .iter()
        .map(|m| m["step"].as_u64().expect("step"))
        .collect()
}

#[test]
fn a_run_killed_after_a_checkpoint_resumes_to_the_same_weights() {
    let model = fixture("llama");
    let data = fixtures().join("pairs_tokens.jsonl");
    let dir = tempdir();
    let spec_with = |name: &str, dtype: &str| {
        let c = Case {
            name: "x",
            optimizer: "adamw",
            lr: 1e-3,
            weight_decay: 0.1,
            max_grad_norm: 1.0,
            warmup_steps: 1,
            schedule: "linear",
            ..BASE
        };
        let path = write_spec(dir.path(), &model, &data, &c);
        // Shuffled, two epochs of three steps, checkpoints every two steps.
        let text = std::fs::read_to_string(&path)
            .expect("read")
            .replace("shuffle = false", "shuffle = true\nseed = 5")
            .replace(&format!("max_steps = {STEPS}"), "epochs = 2")
            .replace(
                "micro_batch_size = 2",
                "micro_batch_size = 2\ncheckpoint_every = 2\neval_every = 2",
            )
            .replace(
                &format!("\"{}\"", dir.path().join("x").display()),
                &format!("\"{}\"", dir.path().join(name).display()),
            );
        let text = text
            .replacen(
                "[data]\n",
                &format!("[data]\neval = \"{}\"\n", data.display()),
                1,
            )
            .replacen("[model]\n", &format!("[model]\ndtype = \"{dtype}\"\n"), 1);
        let p = dir.path().join(format!("{name}.toml"));
        std::fs::write(&p, text).expect("write");
        p
    };
    let spec = |name: &str| spec_with(name, "f32");

    // bf16 weights: the checkpoint carries the optimizer's f32 master weights,
    // so a resumed run continues from them and ends bit-identical too.
    let whole16 = spec_with("whole16", "bf16");
    train_ok(&whole16, &[]);
    let crashed16 = spec_with("crashed16", "bf16");
    let out = train(&crashed16, &["--halt-after-step", "4"]);
    assert_eq!(
        out.status.code(),
        Some(86),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let optim = read_tensors(
        &dir.path()
            .join("crashed16/checkpoints/step-4/optimizer.safetensors"),
    )
    .expect("optimizer state");
    assert!(
        optim.keys().any(|k| k.starts_with("master.")),
        "no master weights saved"
    );
    train_ok(&crashed16, &["--resume"]);
    let a = read_tensors(&dir.path().join("whole16/final/model.safetensors")).expect("whole");
    let b = read_tensors(&dir.path().join("crashed16/final/model.safetensors")).expect("resumed");
    for (name, t) in &a {
        assert!(t.equal(&b[name]), "bf16 {name}: resumed weights differ");
    }

    let whole = spec("whole");
    train_ok(&whole, &[]);

    // train.save_total_limit keeps only the newest checkpoints (here: one of
    // steps 2 and 4) and changes nothing of the training.
    let kept = spec("kept");
    let text = std::fs::read_to_string(&kept).expect("read").replace(
        "checkpoint_every = 2",
        "checkpoint_every = 2\nsave_total_limit = 1",
    );
    std::fs::write(&kept, text).expect("write");
    train_ok(&kept, &[]);
    let mut left: Vec<String> = std::fs::read_dir(dir.path().join("kept/checkpoints"))
        .expect("checkpoints")
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect();
    left.sort();
    assert_eq!(left, vec!["step-4".to_string()]);
    let a = read_tensors(&dir.path().join("whole/final/model.safetensors")).expect("whole");
    let b = read_tensors(&dir.path().join("kept/final/model.safetensors")).expect("kept");
    for (name, t) in &a {
        assert!(t.equal(&b[name]), "{name}: retention changed training");
    }

    let crashed = spec("crashed");
    let out = train(&crashed, &["--halt-after-step", "5"]);
    assert_eq!(
        out.status.code(),
        Some(86),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out_dir = dir.path().join("crashed");
    assert!(
        !out_dir.join("final").exists(),
        "a crashed run has no final model"
    );
    assert_eq!(
        metrics_steps(&out_dir.join("metrics.jsonl")),
        vec![1, 2, 3, 4, 5]
    );

    // Without --resume the directory is refused rather than overwritten.
    let out = train(&crashed, &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("pass --resume"));

    train_ok(&crashed, &["--resume"]);
    assert_eq!(
        metrics_steps(&out_dir.join("metrics.jsonl")),
        vec![1, 2, 3, 4, 5, 6]
    );
    assert_eq!(metrics_steps(&out_dir.join("eval.jsonl")), vec![2, 4, 6]);

    let a = read_tensors(&dir.path().join("whole/final/model.safetensors")).expect("whole");
    let b = read_tensors(&out_dir.join("final/model.safetensors")).expect("resumed");
    for (name, t) in &a {
        assert!(
            t.equal(&b[name]),
            "{name}: resumed weights differ from the uninterrupted run"
        );
    }
    // Same metrics, step for step.
    let ma = read_jsonl(&dir.path().join("whole/metrics.jsonl"));
    let mb = read_jsonl(&out_dir.join("metrics.jsonl"));
    for (x, y) in ma.iter().zip(&mb) {
        assert_eq!(x["loss"], y["loss"], "step {}", x["step"]);
    }

    // A corrupted checkpoint is detected, not silently loaded.
    let ck = out_dir.join("checkpoints/step-4/optimizer.safetensors");
    let mut bytes = std::fs::read(&ck).expect("read");
    let last = bytes.len() - 1;
    bytes[last] ^= 0xFF;
    std::fs::write(&ck, bytes).expect("write");
    std::fs::remove_dir_all(out_dir.join("checkpoints/step-6")).ok();
    let out = train(&crashed, &["--resume"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("checksum does not match"), "{stderr}");
}

#[test]
fn spec_errors_name_the_key() {
    let dir = tempdir();
    let base = format!(
        "name = \"t\"\n[model]\npath = \"{}\"\n[data]\ntrain = \"{}\"\n",
        fixture("qwen2").display(),
        fixtures().join("pairs_tokens.jsonl").display()
    );
    let run = |extra: &str, env: &[(&str, &str)]| {
        let path = dir.path().join("spec.toml");
        std::fs::write(&path, format!("{base}{extra}")).expect("write");
        let out = Command::new(env!("CARGO_BIN_EXE_dpo-worker"))
            .args(["train", "--device", "cpu", "--config"])
            .arg(&path)
            .envs(env.iter().copied())
            .output()
            .expect("starts");
        assert_eq!(out.status.code(), Some(1));
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let e = run("[train]\nbatch_size = 4\n", &[]);
    assert!(
        e.contains("unknown field `batch_size`") && e.contains("for key `train`"),
        "{e}"
    );
    let e = run("[objective]\nloss = \"dpo\"\n", &[]);
    assert!(e.contains("objective.loss: unknown value \"dpo\""), "{e}");
    let e = run("", &[("DPO__OPTIM__LR", "-0.5")]);
    assert!(e.contains("optim.lr: must be > 0, found -0.5"), "{e}");
    let e = run("[train]\nglobal_batch_size = 64\n", &[]);
    assert!(
        e.contains("train.global_batch_size: 64 exceeds the 12 usable training examples"),
        "{e}"
    );
}

#[test]
fn policy_negatives_are_sampled_deterministically_and_train_dpo() {
    let dir = tempdir();
    let data = dir.path().join("labelled.jsonl");
    let rows: String = (0..24)
        .map(|i| {
            let kind = ["colour", "animal", "number"][i % 3];
            format!("{{\"prompt\": \"kind of word {i} ?\", \"completion\": \" {kind}\"}}\n")
        })
        .collect();
    std::fs::write(&data, rows).expect("write");
    let spec = |name: &str| {
        let path = dir.path().join(format!("{name}.toml"));
        std::fs::write(
            &path,
            format!(
                "name = \"p\"\n[model]\npath = \"{}\"\n[data]\ntrain = \"{}\"\nnegatives = \"policy\"\nseed = 9\n\
                 [optim]\nlr = 1e-3\n[train]\nglobal_batch_size = 8\noutput = \"{}\"\n",
                fixture("llama-ref").display(),
                data.display(),
                dir.path().join(name).display()
            ),
        )
        .expect("write");
        path
    };
    train_ok(&spec("a"), &[]);
    train_ok(&spec("b"), &[]);
    let run: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("a/run.json")).expect("run.json"),
    )
    .expect("json");
    let report = &run["data"]["train"];
    assert_eq!(report["format"], "labelled");
    assert_eq!(
        report["examples"].as_u64(),
        Some(24),
        "every labelled example got a negative: {report}"
    );
    let a = read_jsonl(&dir.path().join("a/metrics.jsonl"));
    let b = read_jsonl(&dir.path().join("b/metrics.jsonl"));
    assert_eq!(a.len(), 3);
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(x["loss"], y["loss"], "same seed, same negatives, same run");
        assert_eq!(x["logps/rejected"], y["logps/rejected"]);
    }
    // The sampled negatives are not the labels: the rejected log-probabilities differ
    // from the chosen ones.
    assert_ne!(a[0]["logps/chosen"], a[0]["logps/rejected"]);
}

#[test]
fn early_stopping_ends_the_run_when_eval_loss_stops_improving() {
    let dir = tempdir();
    // Evaluate on the training pairs with chosen and rejected swapped: the better the
    // policy fits the training preferences, the worse its eval loss.
    let train_file = fixtures().join("pairs_tokens.jsonl");
    let swapped: String = read_jsonl(&train_file)
        .iter()
        .map(|p| {
            json!({"prompt_ids": p["prompt_ids"], "chosen_ids": p["rejected_ids"], "rejected_ids": p["chosen_ids"]})
                .to_string()
                + "\n"
        })
        .collect();
    let eval_file = dir.path().join("swapped.jsonl");
    std::fs::write(&eval_file, swapped).expect("write");
    let spec = dir.path().join("spec.toml");
    std::fs::write(
        &spec,
        format!(
            "name = \"es\"\n[model]\npath = \"{}\"\n[data]\ntrain = \"{}\"\neval = \"{}\"\n[optim]\nname = \"sgd\"\nlr = 1.0\n\
             schedule = \"constant\"\n[train]\nepochs = 10\nglobal_batch_size = 4\neval_every = 1\n\
             early_stopping_patience = 2\noutput = \"{}\"\n",
            fixture("qwen2").display(),
            train_file.display(),
            eval_file.display(),
            dir.path().join("out").display()
        ),
    )
    .expect("write");
    let out = Command::new(env!("CARGO_BIN_EXE_dpo-worker"))
        .args(["train", "--device", "cpu", "--json", "--config"])
        .arg(&spec)
        .output()
        .expect("starts");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json summary");
    assert_eq!(summary["stopped_early"], true, "{summary}");
    let evals = read_jsonl(&dir.path().join("out/eval.jsonl"));
    let losses: Vec<f64> = evals
        .iter()
        .map(|e| e["eval_loss"].as_f64().expect("loss"))
        .collect();
    // Stopped at the second evaluation in a row without a new best, long before 30 steps.
    assert_eq!(losses.len(), 3, "{losses:?}");
    assert!(
        losses[1] >= losses[0] && losses[2] >= losses[0],
        "{losses:?}"
    );
    assert_eq!(summary["steps"], 3);
    assert!(dir.path().join("out/final/model.safetensors").exists());

    // The same watching the reward margin instead (larger is better: it falls
    // on the swapped pairs too); a metric the objective does not report is
    // refused by key before anything trains.
    for (metric, out) in [("eval_rewards/margins", "margins"), ("eval_f1", "bad")] {
        let text = std::fs::read_to_string(&spec)
            .expect("spec")
            .replace(
                "early_stopping_patience = 2\n",
                &format!("early_stopping_patience = 2\nmetric_for_best_model = \"{metric}\"\n"),
            )
            .replace("/out\"", &format!("/{out}\""));
        let path = dir.path().join(format!("{out}.toml"));
        std::fs::write(&path, text).expect("write");
        let run = Command::new(env!("CARGO_BIN_EXE_dpo-worker"))
            .args(["train", "--device", "cpu", "--json", "--config"])
            .arg(&path)
            .output()
            .expect("starts");
        if out == "bad" {
            let err = String::from_utf8_lossy(&run.stderr);
            assert!(!run.status.success());
            assert!(
                err.contains(
                    "train.metric_for_best_model: \"eval_f1\" is not among this run's eval metrics"
                ),
                "{err}"
            );
            assert!(
                !dir.path().join("bad/metrics.jsonl").exists(),
                "nothing trained"
            );
            continue;
        }
        assert!(
            run.status.success(),
            "{}",
            String::from_utf8_lossy(&run.stderr)
        );
        let summary: serde_json::Value = serde_json::from_slice(&run.stdout).expect("json summary");
        assert_eq!(summary["stopped_early"], true, "{summary}");
        assert!(summary["steps"].as_u64().expect("steps") < 30, "{summary}");
    }
}

/// Total bytes of the cache's segment files (20 bytes a record).
fn cache_bytes(root: &Path) -> u64 {
    let mut total = 0;
    for ns in std::fs::read_dir(root).expect("cache root").flatten() {
        if !ns.path().is_dir() {
            continue; // fingerprints.json
        }
        for seg in std::fs::read_dir(ns.path()).expect("namespace").flatten() {
            total += seg.metadata().expect("meta").len();
        }
    }
    total
}

#[test]
fn the_reference_cache_is_reused_across_runs_and_changes_nothing() {
    let model = fixture("qwen2");
    let data = fixtures().join("pairs_tokens.jsonl");
    let dir = tempdir();
    let cache = dir.path().join("reference-cache");
    let weights = |name: &str| {
        read_tensors(&dir.path().join(name).join("final/model.safetensors")).expect("weights")
    };
    // A β = 0.1 DPO run fills the cache: two sums per example (12 pairs).
    let first = Case {
        name: "first",
        precompute: true,
        ..BASE
    };
    train_ok(&write_spec(dir.path(), &model, &data, &first), &[]);
    assert_eq!(cache_bytes(&cache), 12 * 2 * 20);

    // A β sweep with packing on reuses every sum (nothing appended) and trains
    // exactly as the same run that recomputes its reference (cache = "none").
    let sweep = Case {
        name: "sweep",
        beta: 0.3,
        precompute: true,
        packing: true,
        ..BASE
    };
    train_ok(&write_spec(dir.path(), &model, &data, &sweep), &[]);
    assert_eq!(cache_bytes(&cache), 12 * 2 * 20, "the sweep scored nothing");
    let fresh = Case {
        name: "fresh",
        ..sweep
    };
    let spec = write_spec(dir.path(), &model, &data, &fresh);
    let text = std::fs::read_to_string(&spec).expect("spec");
    let text = text.replace(
        &format!("cache = \"{}\"", cache.display()),
        "cache = \"none\"",
    );
    std::fs::write(&spec, text).expect("spec");
    train_ok(&spec, &[]);
    let d = max_weight_diff(&weights("sweep"), &weights("fresh"));
    // The cached sums were computed unpacked, the fresh ones packed: the same up
    // to the summation order's rounding (see tests/packing.rs).
    assert!(d <= 1e-5, "cached and recomputed references differ: {d}");
    assert!(max_weight_diff(&weights("sweep"), &weights("first")) > 1e-3);

    // The numbers really come from the cache: shifted sums change the training.
    let ns = std::fs::read_dir(&cache)
        .expect("root")
        .flatten()
        .map(|e| e.path())
        .find(|p| p.is_dir())
        .expect("a namespace");
    assert!(
        cache.join("fingerprints.json").exists(),
        "weights digests remembered"
    );
    let mut shifted = Vec::new();
    for seg in std::fs::read_dir(&ns).expect("ns").flatten() {
        let bytes = std::fs::read(seg.path()).expect("segment");
        for rec in bytes.chunks_exact(20) {
            shifted.extend_from_slice(&rec[..16]);
            let v = f32::from_le_bytes(rec[16..].try_into().expect("4 bytes"));
            // Chosen and rejected both shift, by different amounts per key.
            shifted.extend_from_slice(&(v - f32::from(rec[0] % 7)).to_le_bytes());
        }
        std::fs::remove_file(seg.path()).expect("remove");
    }
    std::fs::write(ns.join("0-edited.seg"), shifted).expect("write");
    let edited = Case {
        name: "edited",
        ..sweep
    };
    train_ok(&write_spec(dir.path(), &model, &data, &edited), &[]);
    assert!(
        max_weight_diff(&weights("edited"), &weights("sweep")) > 1e-4,
        "the run ignored the cache"
    );
    assert_eq!(cache_bytes(&cache), 12 * 2 * 20);
}

/// What a person and a log collector read: with `--log-format json` every
/// step is a JSON log line (step, loss) and no progress bar is drawn; as text
/// on a pipe (no terminal for the bar) a step line every twentieth of the run.
#[test]
fn json_logs_carry_every_step_and_text_logs_a_twentieth() {
    let dir = tempdir();
    let spec = dir.path().join("spec.toml");
    let write = |out: &str| {
        std::fs::write(
            &spec,
            format!(
                "name = \"logs\"\n[model]\npath = \"{}\"\n[data]\ntrain = \"{}\"\n[optim]\nname = \"sgd\"\nlr = 0.1\n\
                 [train]\nepochs = 5\nglobal_batch_size = 2\noutput = \"{}\"\n",
                fixture("qwen2").display(),
                fixtures().join("pairs_tokens.jsonl").display(),
                dir.path().join(out).display()
            ),
        )
        .expect("write");
    };
    let run = |format: &str| {
        let out = Command::new(env!("CARGO_BIN_EXE_dpo-worker"))
            .args([
                "--log-format",
                format,
                "train",
                "--device",
                "cpu",
                "--config",
            ])
            .arg(&spec)
            .output()
            .expect("starts");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    write("json");
    let logs = run("json");
    let steps = read_jsonl(&dir.path().join("json/metrics.jsonl")).len() as u64;
    assert!(steps >= 20, "a run of {steps} steps");
    let step_lines: Vec<serde_json::Value> = logs
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("every line is JSON"))
        .filter(|v| v["fields"]["message"] == "step")
        .collect();
    let logged: Vec<u64> = step_lines
        .iter()
        .map(|v| v["fields"]["step"].as_u64().expect("a step number"))
        .collect();
    assert_eq!(
        logged,
        (1..=steps).collect::<Vec<_>>(),
        "every step, once, in order"
    );
    assert!(step_lines.iter().all(|v| v["fields"]["loss"].is_number()));
    write("text");
    let logs = run("text");
    let text_steps = logs.lines().filter(|l| l.contains(" step ")).count() as u64;
    assert_eq!(
        text_steps,
        steps / steps.div_ceil(20),
        "step lines in a run of {steps}:\n{logs}"
    );
    assert!(
        !logs.contains('\x1b'),
        "no colour codes in a log that is not a terminal: {logs}"
    );
}
