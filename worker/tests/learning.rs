//! Training learns: DPO on a synthetic rule generalises to held-out prompts, and the
//! labelled + negative objective raises the labelled answer while pushing the
//! probability of negatives down.

mod common;

use std::path::Path;
use std::process::Command;

use common::{fixture, read_jsonl, run_python, tempdir};

fn run(args: &[&str]) {
    let out = Command::new(env!("CARGO_BIN_EXE_dpo-worker"))
        .args(args)
        .args(["--device", "cpu"])
        .output()
        .expect("dpo-worker starts");
    assert!(
        out.status.success(),
        "dpo-worker {args:?}:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn make_data(task: &str, dir: &Path) {
    let dir = p(dir);
    let args = [
        "--task", task, "--n", "512", "--eval-n", "100", "--seed", "3", "--out", dir,
    ];
    run_python("examples/make_pairs.py", &args);
}

/// (accuracy, mean p(chosen), mean p(rejected)) of `model` on pairs `data`.
fn preference(model: &Path, data: &Path, dir: &Path) -> (f64, f64, f64) {
    let out = dir.join("scores.jsonl");
    run(&[
        "score",
        "--model",
        p(model),
        "--data",
        p(data),
        "--out",
        p(&out),
    ]);
    let rows = read_jsonl(&out);
    let n = rows.len() as f64;
    let f = |r: &serde_json::Value, k: &str| r[k].as_f64().expect("number");
    let acc = rows
        .iter()
        .filter(|r| f(r, "chosen_logps") > f(r, "rejected_logps"))
        .count() as f64
        / n;
    let pc = rows.iter().map(|r| f(r, "chosen_logps").exp()).sum::<f64>() / n;
    let pr = rows
        .iter()
        .map(|r| f(r, "rejected_logps").exp())
        .sum::<f64>()
        / n;
    (acc, pc, pr)
}

fn p(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

/// A run spec: `body` holds the data/objective sections; `epochs` epochs of
/// AdamW with a cosine schedule, global batch 16.
fn spec(dir: &Path, name: &str, model: &Path, body: &str, epochs: u64) -> std::path::PathBuf {
    let path = dir.join(format!("{name}.toml"));
    let text = format!(
        "name = \"{name}\"\n[model]\npath = \"{}\"\n{body}\n[optim]\nlr = 3e-3\nschedule = \"cosine\"\nwarmup_steps = 5\n[train]\nepochs = {epochs}\nglobal_batch_size = 16\neval_every = 32\noutput = \"{}\"\n",
        model.display(),
        dir.join(name).display()
    );
    std::fs::write(&path, text).expect("write spec");
    path
}

#[test]
fn dpo_learns_a_rule_that_holds_on_unseen_prompts() {
    let dir = tempdir();
    let data = dir.path().join("copy");
    make_data("copy", &data);
    let model = fixture("llama-ref");
    let (before, _, _) = preference(&model, &data.join("eval.jsonl"), dir.path());
    let body = format!(
        "[reference]\nprecompute = true\n[data]\ntrain = \"{}\"\neval = \"{}\"\n[objective]\nloss = \"sigmoid\"\nbeta = 0.1\n",
        data.join("train.jsonl").display(),
        data.join("eval.jsonl").display()
    );
    let path = spec(dir.path(), "dpo", &model, &body, 4);
    run(&["train", "--config", p(&path)]);
    let evals = read_jsonl(&dir.path().join("dpo/eval.jsonl"));
    let last = evals.last().expect("eval lines");
    let acc = last["eval_rewards/accuracies"].as_f64().expect("accuracy");
    let (after, _, _) = preference(
        &dir.path().join("dpo/final"),
        &data.join("eval.jsonl"),
        dir.path(),
    );
    eprintln!(
        "held-out reward accuracy {acc:.3}; policy preference accuracy {before:.3} -> {after:.3}"
    );
    assert!(acc > 0.9, "held-out reward accuracy {acc}");
    assert!(
        before < 0.75,
        "the untrained model does not already know the rule ({before})"
    );
    assert!(
        after > 0.9,
        "the trained policy prefers the right answer on unseen prompts ({after})"
    );
}

#[test]
fn combined_objective_raises_labels_and_lowers_negatives() {
    let dir = tempdir();
    let data = dir.path().join("classify");
    make_data("classify", &data);
    let pairs = data.join("eval_pairs.jsonl");
    let model = fixture("llama-ref");
    let (acc0, _, _) = preference(&model, &pairs, dir.path());

    // Supervised first: the model learns the answer format (and so gives negatives
    // some mass too); then the combined objective with random wrong labels.
    let body = |extra: &str| {
        format!(
            "[data]\ntrain = \"{}\"\neval = \"{}\"\nformat = \"labelled\"\n{extra}",
            data.join("train.jsonl").display(),
            data.join("eval.jsonl").display()
        )
    };
    let sft = spec(
        dir.path(),
        "sft",
        &model,
        &(body("") + "[objective]\nloss = \"sft\"\n"),
        3,
    );
    run(&["train", "--config", p(&sft)]);
    let (acc1, label1, neg1) = preference(&dir.path().join("sft/final"), &pairs, dir.path());
    let combined = spec(
        dir.path(),
        "combined",
        &dir.path().join("sft/final"),
        &(body("negatives = \"random\"\n")
            + "[objective]\nloss = \"combined\"\nnegative_weight = 1.0\n"),
        3,
    );
    run(&["train", "--config", p(&combined)]);
    let (acc2, label2, neg2) = preference(&dir.path().join("combined/final"), &pairs, dir.path());
    eprintln!(
        "accuracy {acc0:.2} -> sft {acc1:.2} -> combined {acc2:.2}; p(label) {label1:.3} -> {label2:.3}; p(negative) {neg1:.3e} -> {neg2:.3e}"
    );
    assert!(acc0 < 0.75, "untrained accuracy is near chance ({acc0})");
    assert!(acc2 > 0.9, "accuracy of the labelled answer rises ({acc2})");
    assert!(label2 > 0.5, "the labelled answer stays likely ({label2})");
    assert!(neg2 < neg1 / 100.0, "negatives fall ({neg1} -> {neg2})");
    let metrics = read_jsonl(&dir.path().join("combined/metrics.jsonl"));
    let ul = |m: &serde_json::Value| {
        m["unlikelihood_loss"]
            .as_f64()
            .expect("unlikelihood_loss logged")
    };
    assert!(
        ul(metrics.last().expect("lines")) < ul(&metrics[0]),
        "unlikelihood loss falls"
    );
}
