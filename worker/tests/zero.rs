//! ZeRO stages 1 and 2 over the tcp collective: W processes each holding 1/W
//! of the AdamW moments and f32 master weights (stage 2: and of the gradients)
//! train the weights of one process (f32, and bf16 with f32 masters), with
//! global-norm clipping active; the optimizer state assembled from the ranks'
//! checkpoint files equals one process's; and a run checkpointed by 2 ranks
//! resumes on 3 ranks and on one process to the same weights.

mod common;

use std::path::Path;
use std::process::Child;

use common::{fixture, fixtures, free_ports, max_weight_diff, read_jsonl, tempdir, train_process};
use dpo_worker::model::checkpoint::read_tensors;
use dpo_worker::train::read_optimizer_state;

/// AdamW with a small clipping norm (so clipping acts on every step), 6 steps —
/// `extra` in `[train]`. ε = 1e-3: AdamW's first update is about g / (|g| + ε),
/// so at the usual 1e-8 a near-zero gradient that another summation order
/// changes by 1e-9 moves its weight by a sizeable part of the learning rate;
/// a larger ε keeps the comparison about the partition, not about rounding.
fn spec(dir: &Path, name: &str, dtype: &str, extra: &str) -> std::path::PathBuf {
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(
        &path,
        format!(
            "name = \"zero\"\n[model]\npath = \"{}\"\ndtype = \"{dtype}\"\n[data]\ntrain = \"{}\"\nseed = 5\n\
             [objective]\nloss = \"sigmoid\"\n\
             [optim]\nname = \"adamw\"\nlr = 0.01\neps = 1e-3\nweight_decay = 0.1\nmax_grad_norm = 0.05\nschedule = \"constant\"\n\
             [train]\nmax_steps = 6\nglobal_batch_size = 4\nmicro_batch_size = 2\noutput = \"{}\"\n{extra}\n",
            fixture("qwen2").display(),
            fixtures().join("pairs_tokens.jsonl").display(),
            dir.join(name).display(),
        ),
    )
    .expect("write spec");
    path
}

/// Waits for `child`; returns its exit code, failing with its log unless it is `want`.
fn wait_for(child: Child, want: i32) {
    let out = child.wait_with_output().expect("wait");
    assert_eq!(
        out.status.code(),
        Some(want),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Trains `spec` on `world` ranks with `extra` flags each; every rank exits `want`.
fn train(spec: &Path, world: usize, extra: &[&str], want: i32) {
    let peers = free_ports(world);
    let children: Vec<Child> = (0..world)
        .map(|r| {
            let mut args: Vec<String> = vec![
                "--peers".into(),
                peers.clone(),
                "--rank".into(),
                r.to_string(),
            ];
            args.extend(extra.iter().map(|s| s.to_string()));
            train_process(spec, &args)
        })
        .collect();
    for c in children {
        wait_for(c, want);
    }
}

fn diff(dir: &Path, a: &str, b: &str, file: &str) -> f64 {
    let x = read_tensors(&dir.join(a).join(file)).expect("tensors");
    let y = read_tensors(&dir.join(b).join(file)).expect("tensors");
    max_weight_diff(&x, &y)
}

/// Max |Δ| between the optimizer states of two runs' checkpoints of `step`,
/// each whole or sharded (then assembled from the ranks' files), flattened.
fn state_diff(dir: &Path, a: &str, b: &str, step: u64) -> f64 {
    let read = |run: &str| {
        let ck = dir.join(run).join(format!("checkpoints/step-{step}"));
        read_optimizer_state(&ck)
            .expect("optimizer state")
            .into_iter()
            .map(|(k, t)| (k, t.reshape([-1])))
            .collect()
    };
    max_weight_diff(&read(a), &read(b))
}

#[test]
fn zero_stage_1_trains_the_weights_and_optimizer_state_of_one_process() {
    for dtype in ["f32", "bf16"] {
        let dir = tempdir();
        wait_for(
            train_process(&spec(dir.path(), "one", dtype, "checkpoint_every = 5"), &[]),
            0,
        );
        for world in [2usize, 3] {
            let name = format!("zero{world}");
            let path = spec(
                dir.path(),
                &name,
                dtype,
                "checkpoint_every = 5\nzero_stage = 1",
            );
            train(&path, world, &[], 0);
            // In bf16 the gradients themselves are bf16, summed over
            // micro-batches and ranks in an order that depends on the world:
            // the reference is then the same world without ZeRO.
            let reference = if dtype == "f32" {
                "one".to_string()
            } else {
                let plain = format!("plain{world}");
                let path = spec(dir.path(), &plain, dtype, "checkpoint_every = 5");
                train(&path, world, &[], 0);
                plain
            };
            let d_state = state_diff(dir.path(), &reference, &name, 5);
            let d_weights = diff(dir.path(), &reference, &name, "final/model.safetensors");
            eprintln!(
                "{dtype}, {world} ranks against {reference}: max |Δ| optimizer state at step 5 \
                 {d_state:.2e}, final weights {d_weights:.2e}"
            );
            // Moments and (bf16) f32 masters, assembled from the shares.
            assert!(
                d_state <= 1e-5,
                "{dtype} world {world}: optimizer state {d_state}"
            );
            assert!(
                d_weights <= 1e-5,
                "{dtype} world {world}: weights {d_weights}"
            );
            let base = read_jsonl(&dir.path().join(&reference).join("metrics.jsonl"));
            let many = read_jsonl(&dir.path().join(&name).join("metrics.jsonl"));
            assert_eq!(base.len(), many.len());
            for (x, y) in base.iter().zip(&many) {
                let norm = |m: &serde_json::Value| m["grad_norm"].as_f64().expect("norm");
                let (gx, gy) = (norm(x), norm(y));
                // The global norm (before clipping, which acts: it is > 0.05).
                assert!(gx > 0.05, "clipping acts: {gx}");
                assert!(
                    (gx - gy).abs() <= 1e-5 * gx,
                    "step {}: norm {gx} vs {gy}",
                    x["step"]
                );
                // Each rank holds its share of the moments (and masters):
                // parameters + gradients + (moments + masters) / W.
                let bytes = |m: &serde_json::Value| {
                    m["memory/state_bytes_per_parameter"]
                        .as_f64()
                        .expect("bytes")
                };
                let params_and_grads = if dtype == "f32" { 8.0 } else { 4.0 };
                let want = params_and_grads + (16.0 - params_and_grads) / world as f64;
                assert!(
                    (bytes(y) - want).abs() < 0.05,
                    "{dtype} world {world}: {} bytes per parameter, want {want}",
                    bytes(y)
                );
            }
            let one = read_jsonl(&dir.path().join("one/metrics.jsonl"));
            assert!(
                (one[0]["memory/state_bytes_per_parameter"]
                    .as_f64()
                    .expect("bytes")
                    - 16.0)
                    .abs()
                    < 0.01,
                "one process holds 16 bytes per parameter"
            );
        }
    }
}

#[test]
fn replicas_update_alike_and_cost_a_copy_of_one_share() {
    let dir = tempdir();
    wait_for(
        train_process(&spec(dir.path(), "one", "f32", "checkpoint_every = 5"), &[]),
        0,
    );
    let path = spec(
        dir.path(),
        "copies",
        "f32",
        "checkpoint_every = 5\nzero_stage = 1\nzero_replicas = 2",
    );
    train(&path, 3, &[], 0);
    let d_state = state_diff(dir.path(), "one", "copies", 5);
    let d_weights = diff(dir.path(), "one", "copies", "final/model.safetensors");
    eprintln!("f32, 3 ranks with replicas: optimizer state {d_state:.2e}, weights {d_weights:.2e}");
    assert!(
        d_state <= 1e-5 && d_weights <= 1e-5,
        "{d_state} {d_weights}"
    );
    let one = read_jsonl(&dir.path().join("one/metrics.jsonl"));
    let copies = read_jsonl(&dir.path().join("copies/metrics.jsonl"));
    for (x, y) in one.iter().zip(&copies) {
        let norm = |m: &serde_json::Value| m["grad_norm"].as_f64().expect("norm");
        // The replicas' gradients do not count twice in the norm.
        assert!((norm(x) - norm(y)).abs() <= 1e-5 * norm(x), "{x} {y}");
        let bytes = y["memory/state_bytes_per_parameter"]
            .as_f64()
            .expect("bytes");
        // Parameters + gradients + two shares of the moments.
        let want = 8.0 + 2.0 * 8.0 / 3.0;
        assert!(
            (bytes - want).abs() < 0.05,
            "{bytes} bytes per parameter, want {want}"
        );
    }
}

#[test]
fn a_zero_checkpoint_of_two_ranks_resumes_on_three() {
    let dir = tempdir();
    wait_for(
        train_process(&spec(dir.path(), "one", "f32", "checkpoint_every = 3"), &[]),
        0,
    );
    let path = spec(
        dir.path(),
        "moved",
        "f32",
        "checkpoint_every = 3\nzero_stage = 1",
    );
    // Two ranks stop after step 4 (exit 86, as if killed); step 3 was checkpointed.
    train(&path, 2, &["--halt-after-step", "4"], 86);
    // Each rank wrote its own share; nobody assembled the whole state.
    let ck = dir.path().join("moved/checkpoints/step-3");
    assert!(!ck.join("optimizer.safetensors").exists());
    let shares: Vec<u64> = (0..2)
        .map(|r| {
            let f = ck.join(format!("optimizer/rank-{r:05}-of-00002.safetensors"));
            std::fs::metadata(&f).expect("a rank's share").len()
        })
        .collect();
    let whole = std::fs::metadata(
        dir.path()
            .join("one/checkpoints/step-3/optimizer.safetensors"),
    )
    .expect("one process's state")
    .len();
    eprintln!("optimizer state at step 3: one process {whole} bytes; shares of 2 ranks {shares:?}");
    for s in &shares {
        assert!(
            (*s as f64 - whole as f64 / 2.0).abs() < 0.05 * whole as f64,
            "{shares:?} vs {whole}"
        );
    }
    // The same checkpoint resumed by one process (the shares assembled).
    let solo = spec(dir.path(), "moved1", "f32", "checkpoint_every = 3");
    std::fs::create_dir_all(dir.path().join("moved1/checkpoints")).expect("dir");
    let copied = std::process::Command::new("cp")
        .arg("-r")
        .arg(&ck)
        .arg(dir.path().join("moved1/checkpoints/step-3"))
        .status()
        .expect("cp");
    assert!(copied.success());
    std::fs::copy(
        dir.path().join("moved/metrics.jsonl"),
        dir.path().join("moved1/metrics.jsonl"),
    )
    .expect("metrics");
    wait_for(train_process(&solo, &["--resume".to_string()]), 0);
    let d1 = diff(dir.path(), "one", "moved1", "final/model.safetensors");
    eprintln!("2 ranks' sharded checkpoint resumed by one process: max |Δ| weights {d1:.2e}");
    assert!(d1 <= 1e-5, "{d1}");
    train(&path, 3, &["--resume"], 0);
    let d = diff(dir.path(), "one", "moved", "final/model.safetensors");
    eprintln!("2 ranks, checkpoint at step 3, resumed on 3 ranks: max |Δ| weights {d:.2e}");
    assert!(d <= 1e-5, "{d}");
    let metrics = read_jsonl(&dir.path().join("moved/metrics.jsonl"));
    let steps: Vec<u64> = metrics
        .iter()
        .map(|m| m["step"].as_u64().expect("step"))
        .collect();
    assert_eq!(steps, (1..=6).collect::<Vec<_>>(), "every step once");
    assert_eq!(metrics[5]["world_size"], 3);
}

/// Writes `spec`'s file again with `micro_batch_size = micro`.
fn with_micro_batch(path: &Path, micro: usize) {
    let text = std::fs::read_to_string(path).expect("spec");
    let text = text.replace(
        "micro_batch_size = 2",
        &format!("micro_batch_size = {micro}"),
    );
    std::fs::write(path, text).expect("spec");
}

#[test]
fn zero_stage_2_in_bf16_with_f32_masters_follows_the_same_world_without_zero() {
    // bf16 parameters with f32 masters, 2 ranks, one micro-batch each. Both
    // reduce the same bf16 gradients in f32; the plain path rounds the sum
    // back into the bf16 `.grad` (and clips and steps from it), stage 2 keeps
    // it in its f32 shards. So the f32 masters may differ by what one bf16
    // rounding of the summed gradient (2^-9 relative) does to five AdamW
    // steps of lr 0.01: far below one step (1e-2). (The bf16 weights then
    // round to the same or a neighbouring bf16 value.)
    let dir = tempdir();
    let run = |name: &str, extra: &str| {
        let path = spec(
            dir.path(),
            name,
            "bf16",
            &format!("checkpoint_every = 5\n{extra}"),
        );
        with_micro_batch(&path, 2);
        train(&path, 2, &[], 0);
    };
    run("plain", "");
    run("stage2", "zero_stage = 2");
    let masters = |run: &str| -> std::collections::BTreeMap<String, tch::Tensor> {
        read_optimizer_state(&dir.path().join(run).join("checkpoints/step-5"))
            .expect("optimizer state")
            .into_iter()
            .filter(|(k, _)| k.starts_with("master."))
            .map(|(k, t)| (k, t.reshape([-1])))
            .collect()
    };
    let (a, b) = (masters("plain"), masters("stage2"));
    assert!(!a.is_empty(), "bf16 runs keep f32 masters");
    let d_masters = max_weight_diff(&a, &b);
    let d_weights = diff(dir.path(), "plain", "stage2", "final/model.safetensors");
    eprintln!(
        "bf16, 2 ranks, stage 2 against no ZeRO: f32 masters at step 5 {d_masters:.2e}, \
         final bf16 weights {d_weights:.2e}"
    );
    assert!(d_masters <= 1e-3, "masters {d_masters}");
    let norms = |run: &str| -> Vec<f64> {
        read_jsonl(&dir.path().join(run).join("metrics.jsonl"))
            .iter()
            .map(|m| m["grad_norm"].as_f64().expect("norm"))
            .collect()
    };
    for (x, y) in norms("plain").iter().zip(norms("stage2")) {
        assert!((x - y).abs() <= 4e-3 * x, "gradient norm {x} vs {y}");
    }
}

#[test]
fn zero_stage_2_reduces_layer_by_layer_to_the_same_weights_and_holds_a_share_of_the_gradients() {
    let dir = tempdir();
    wait_for(
        train_process(&spec(dir.path(), "one", "f32", "checkpoint_every = 5"), &[]),
        0,
    );
    // Parameters inside the decoder layers (gradients sharded) and outside
    // them (embedding, final norm, head: still whole `.grad` on every rank).
    let weights = read_tensors(&dir.path().join("one/final/model.safetensors")).expect("weights");
    let (mut layered, mut rest) = (0usize, 0usize);
    for (name, t) in &weights {
        if name.starts_with("model.layers.") {
            layered += t.numel();
        } else {
            rest += t.numel();
        }
    }
    let total = (layered + rest) as f64;
    let cases = [
        // 3 ranks, one pair per micro-batch: rank 0 has two micro-batches and
        // the others one (they reduce zeros for the second); recomputed layers.
        (
            "ckpt3",
            3usize,
            1usize,
            "gradient_checkpointing = true",
            1.0,
        ),
        // 2 ranks, staged layer graphs without recomputation, with replicas.
        ("staged2", 2, 2, "zero_replicas = 2", 2.0),
    ];
    for (name, world, micro, extra, shares) in cases {
        let path = spec(
            dir.path(),
            name,
            "f32",
            &format!("checkpoint_every = 5\nzero_stage = 2\n{extra}"),
        );
        with_micro_batch(&path, micro);
        train(&path, world, &[], 0);
        let d_state = state_diff(dir.path(), "one", name, 5);
        let d_weights = diff(dir.path(), "one", name, "final/model.safetensors");
        eprintln!(
            "stage 2, {world} ranks ({extra}): max |Δ| optimizer state {d_state:.2e}, weights {d_weights:.2e}"
        );
        assert!(d_state <= 1e-5, "{name}: optimizer state {d_state}");
        assert!(d_weights <= 1e-5, "{name}: weights {d_weights}");
        let one = read_jsonl(&dir.path().join("one/metrics.jsonl"));
        let got = read_jsonl(&dir.path().join(name).join("metrics.jsonl"));
        assert_eq!(one.len(), got.len());
        for (x, y) in one.iter().zip(&got) {
            let norm = |m: &serde_json::Value| m["grad_norm"].as_f64().expect("norm");
            assert!(
                (norm(x) - norm(y)).abs() <= 1e-5 * norm(x),
                "{name} step {}: norm {} vs {}",
                x["step"],
                norm(x),
                norm(y)
            );
            // Parameters (4) + the whole gradient of the parameters outside
            // the layers (4) + shares of gradient, moments (4 + 8).
            let want = 4.0 + 4.0 * rest as f64 / total + shares * 12.0 / world as f64;
            let bytes = y["memory/state_bytes_per_parameter"]
                .as_f64()
                .expect("bytes");
            assert!(
                (bytes - want).abs() < 0.05,
                "{name}: {bytes} bytes per parameter, want {want}"
            );
        }
    }
}
