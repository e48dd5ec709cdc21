//! ZeRO and gradient checkpointing for encoders, through the one loop and
//! the shared rank state the causal LMs use: BERT token classification
//! trained by 2 and 3 ranks under ZeRO stage 1 and 2 ends with the weights,
//! metrics and optimizer state of one process; a checkpointed (recomputed)
//! run ends with the weights of a plain one — with dropout on, since every
//! layer's recomputation draws the masks its forward drew — and a ZeRO
//! checkpoint written by 3 ranks resumes on 2. DeBERTa's relative-position
//! table, which every layer reads, trains the same layer by layer.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use common::{NER_DATA, free_ports, max_abs_diff, read_jsonl, read_tensors, run_python, tempdir};

fn dpo_worker() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_dpo-worker"));
    c.env("RUST_BACKTRACE", "0");
    c
}

/// A directory with a tiny BERT (no head; `dropout`) as `model/` and the
/// NER data as `data.jsonl`.
fn fixture(dropout: &str) -> tempfile::TempDir {
    fixture_of(&["--family", "bert"], dropout)
}

/// [`fixture`] with the model `tiny_encoder.py` makes with `family` (its
/// flags).
fn fixture_of(family: &[&str], dropout: &str) -> tempfile::TempDir {
    let dir = tempdir();
    let model = dir.path().join("model");
    let mut args = vec!["--out", model.to_str().expect("utf-8")];
    args.extend_from_slice(family);
    args.extend_from_slice(&["--head", "none", "--dropout", dropout, "--seed", "5"]);
    run_python("examples/tiny_encoder.py", &args);
    std::fs::write(dir.path().join("data.jsonl"), NER_DATA).expect("write data");
    dir
}

/// A token-classification spec writing to `out`, with `extra` appended to
/// its `[train]` section: 3 epochs of 6 examples in micro-batches of 1.
fn spec(dir: &Path, out: &str, extra: &str) -> PathBuf {
    let path = dir.join(format!("{out}.toml"));
    std::fs::write(
        &path,
        format!(
            "name = \"zero\"\n[model]\npath = \"model\"\n[task]\ntype = \"token-classification\"\n\
             [data]\ntrain = \"data.jsonl\"\neval = \"data.jsonl\"\nnegatives = \"random\"\nmax_length = 32\n\
             [objective]\nloss = \"combined\"\n[optim]\nlr = 0.01\n[train]\nepochs = 3\n\
             global_batch_size = 6\nmicro_batch_size = 1\noutput = \"{out}\"\n{extra}"
        ),
    )
    .expect("write spec");
    path
}

/// Trains `spec` on `world` ranks over the tcp ring (extra worker flags
/// `flags`); every rank must exit `want`.
fn train(spec: &Path, world: usize, flags: &[&str], want: i32) {
    let cmd = |rank: usize, peers: &str| -> Child {
        let mut c = dpo_worker();
        c.args(["train", "--device", "cpu", "--config"]).arg(spec);
        if world > 1 {
            c.args(["--peers", peers, "--rank", &rank.to_string()]);
        }
        c.args(flags)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("a rank starts")
    };
    let peers = free_ports(world);
    let ranks: Vec<Child> = (0..world).map(|r| cmd(r, &peers)).collect();
    for (r, child) in ranks.into_iter().enumerate() {
        let out = child.wait_with_output().expect("a rank ends");
        assert_eq!(
            out.status.code(),
            Some(want),
            "rank {r}:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// The largest weight difference between two runs' `final/` models, and
/// the parameter it is in.
fn weight_diff(dir: &Path, a: &str, b: &str) -> (f64, String) {
    let x = read_tensors(&dir.join(a).join("final/model.safetensors"));
    let y = read_tensors(&dir.join(b).join("final/model.safetensors"));
    assert_eq!(x.len(), y.len(), "{a} and {b} hold other parameters");
    let mut worst = (0.0f64, String::new());
    for (name, t) in &x {
        let d = max_abs_diff(t, &y[name]);
        if d > worst.0 {
            worst = (d, name.clone());
        }
    }
    worst
}

fn losses(dir: &Path, run: &str) -> Vec<f64> {
    read_jsonl(&dir.join(run).join("metrics.jsonl"))
        .iter()
        .map(|m| m["loss"].as_f64().expect("a loss"))
        .collect()
}

#[test]
fn zero_stages_1_and_2_on_two_and_three_ranks_train_the_weights_of_one_process() {
    let dir = fixture("0");
    let d = dir.path();
    train(&spec(d, "one", ""), 1, &[], 0);
    let one = losses(d, "one");
    assert_eq!(one.len(), 3);
    for (stage, world) in [(1, 2), (2, 3), (2, 2)] {
        let name = format!("zero{stage}-{world}");
        train(
            &spec(d, &name, &format!("zero_stage = {stage}\n")),
            world,
            &[],
            0,
        );
        let (worst, at) = weight_diff(d, "one", &name);
        eprintln!("ZeRO stage {stage}, {world} ranks vs one process: max |Δ| {worst:.2e} ({at})");
        // A sum over ranks in another order, then AdamW: rounding only.
        assert!(
            worst < 2e-5,
            "stage {stage}, world {world}: {worst} in {at}"
        );
        for (x, y) in one.iter().zip(losses(d, &name)) {
            assert!(
                (x - y).abs() < 1e-6,
                "stage {stage}, world {world}: loss {x} vs {y}"
            );
        }
        let metrics = read_jsonl(&d.join(&name).join("metrics.jsonl"));
        assert_eq!(metrics[0]["world_size"], world as f64);
    }
}

#[test]
fn gradient_checkpointing_recomputes_each_layer_with_the_dropout_its_forward_drew() {
    layer_by_layer_equals_plain("BERT", &["--family", "bert"], false);
}

/// Checkpointed training of the encoder `tiny_encoder.py` makes with
/// `family` equals plain autograd with dropout off (and so does ZeRO stage 2
/// on two ranks, with `zero2`); with dropout on, the recomputation must draw
/// the forward's masks: the staged backward (ZeRO stage 2's, in a world of
/// one) keeps each layer's graph instead of recomputing it, under the same
/// per-layer seeds, so the two agree only if the recomputed masks are the
/// same — and a plain run, whose masks are drawn otherwise, differs.
fn layer_by_layer_equals_plain(name: &str, family: &[&str], zero2: bool) {
    let plain = fixture_of(family, "0");
    let d = plain.path();
    train(&spec(d, "plain", ""), 1, &[], 0);
    train(
        &spec(d, "checkpointed", "gradient_checkpointing = true\n"),
        1,
        &[],
        0,
    );
    let (worst, at) = weight_diff(d, "plain", "checkpointed");
    eprintln!("{name} checkpointed vs plain (no dropout): max |Δ| {worst:.2e} ({at})");
    assert!(worst < 1e-6, "{name}: {worst} in {at}");
    if zero2 {
        train(&spec(d, "zero2", "zero_stage = 2\n"), 2, &[], 0);
        let (worst, at) = weight_diff(d, "plain", "zero2");
        eprintln!("{name} ZeRO-2 on 2 ranks vs plain: max |Δ| {worst:.2e} ({at})");
        assert!(worst < 2e-5, "{name}: {worst} in {at}");
    }
    let dropout = fixture_of(family, "0.2");
    let d = dropout.path();
    train(
        &spec(d, "checkpointed", "gradient_checkpointing = true\n"),
        1,
        &[],
        0,
    );
    train(&spec(d, "staged", "zero_stage = 2\n"), 1, &[], 0);
    train(&spec(d, "plain", ""), 1, &[], 0);
    let (worst, at) = weight_diff(d, "checkpointed", "staged");
    eprintln!("{name} checkpointed vs staged (dropout 0.2): max |Δ| {worst:.2e} ({at})");
    assert!(worst < 1e-6, "{name}: {worst} in {at}");
    let (apart, _) = weight_diff(d, "checkpointed", "plain");
    assert!(apart > 1e-4, "{name}: dropout drew nothing: {apart}");
}

/// DeBERTa's layers share one table of relative-position embeddings (and
/// its norm): when the layers' backward goes one layer at a time
/// (checkpointed, or ZeRO stage 2's staged backward on two ranks), the
/// table's gradient is summed over the layers and must reach it as plain
/// autograd's does.
#[test]
fn deberta_s_shared_position_table_trains_the_same_layer_by_layer() {
    for version in ["v3", "v2"] {
        let dir = fixture_of(&["--family", "deberta-v2", "--deberta", version], "0");
        let d = dir.path();
        train(&spec(d, "plain", ""), 1, &[], 0);
        train(
            &spec(d, "checkpointed", "gradient_checkpointing = true\n"),
            1,
            &[],
            0,
        );
        train(&spec(d, "zero2", "zero_stage = 2\n"), 2, &[], 0);
        let table = "deberta.encoder.rel_embeddings.weight";
        let before = read_tensors(&d.join("model/model.safetensors"));
        let after = read_tensors(&d.join("plain/final/model.safetensors"));
        let moved = max_abs_diff(&after[table], &before["encoder.rel_embeddings.weight"]);
        assert!(moved > 1e-4, "{version}: the table did not train ({moved})");
        let (worst, at) = weight_diff(d, "plain", "checkpointed");
        eprintln!("DeBERTa {version} checkpointed vs plain: max |Δ| {worst:.2e} ({at})");
        assert!(worst < 1e-6, "{version}: {worst} in {at}");
        let (worst, at) = weight_diff(d, "plain", "zero2");
        eprintln!("DeBERTa {version} ZeRO-2 on 2 ranks vs plain: max |Δ| {worst:.2e} ({at})");
        assert!(worst < 2e-5, "{version}: {worst} in {at}");
    }
}

/// ModernBERT's pre-norm layers (rotary, a local window, GeGLU, a final
/// norm after the stack, dropout on the embeddings, attention and MLP) go
/// layer by layer as plain autograd does.
#[test]
fn modernbert_trains_the_same_layer_by_layer() {
    layer_by_layer_equals_plain(
        "ModernBERT",
        &[
            "--family",
            "modernbert",
            "--layers",
            "3",
            "--local-attention",
            "4",
        ],
        true,
    );
}

#[test]
fn an_encoder_zero_checkpoint_of_three_ranks_resumes_on_two() {
    let dir = fixture("0");
    let d = dir.path();
    let extra = "zero_stage = 2\ncheckpoint_every = 1\n";
    train(&spec(d, "whole", "zero_stage = 2\n"), 3, &[], 0);
    let path = spec(d, "resumed", extra);
    // Three ranks stop like a crash (exit 86) after step 2, its checkpoint
    // written.
    train(&path, 3, &["--halt-after-step", "2"], 86);
    let shards = d.join("resumed/checkpoints/step-2/optimizer");
    assert!(
        shards.join("partition.json").exists(),
        "a sharded checkpoint"
    );
    train(&path, 2, &["--resume"], 0);
    let (worst, at) = weight_diff(d, "whole", "resumed");
    eprintln!("3 ranks → checkpoint → 2 ranks vs 3 ranks: max |Δ| {worst:.2e} ({at})");
    assert!(worst < 2e-5, "{worst} in {at}");
    let metrics = read_jsonl(&d.join("resumed/metrics.jsonl"));
    let steps: Vec<f64> = metrics
        .iter()
        .map(|m| m["step"].as_f64().expect("step"))
        .collect();
    assert_eq!(steps, vec![1.0, 2.0, 3.0], "every step once");
    assert_eq!(metrics[2]["world_size"], 2.0);
}
