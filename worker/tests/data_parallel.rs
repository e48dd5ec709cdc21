//! Data-parallel training over the tcp collective: W processes, each training its
//! slice of every global batch, end with the weights and metrics of one process.

mod common;

use std::path::Path;
use std::process::Child;

use common::{fixture, fixtures, free_ports, max_weight_diff, read_jsonl, tempdir, train_process};
use dpo_worker::model::checkpoint::read_tensors;

fn spec(dir: &Path, name: &str, loss: &str) -> std::path::PathBuf {
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(
        &path,
        format!(
            "name = \"dp\"\n[model]\npath = \"{}\"\n[data]\ntrain = \"{}\"\neval = \"{}\"\nseed = 3\n\
             [objective]\nloss = \"{loss}\"\nnll_weight = {nll}\n\
             [optim]\nname = \"sgd\"\nlr = 1.0\nmax_grad_norm = 1.0\nschedule = \"constant\"\n\
             [train]\nepochs = 2\nglobal_batch_size = 4\nmicro_batch_size = 1\neval_every = 2\noutput = \"{}\"\n",
            fixture("qwen2").display(),
            fixtures().join("pairs_tokens.jsonl").display(),
            fixtures().join("pairs_tokens.jsonl").display(),
            dir.join(name).display(),
            nll = if loss == "sigmoid" { "0.5" } else { "0.0" },
        ),
    )
    .expect("write spec");
    path
}

fn wait_ok(child: Child) {
    let out = child.wait_with_output().expect("wait");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn compare(dir: &Path, a: &str, b: &str) -> f64 {
    let x = read_tensors(&dir.join(a).join("final/model.safetensors")).expect("weights");
    let y = read_tensors(&dir.join(b).join("final/model.safetensors")).expect("weights");
    max_weight_diff(&x, &y)
}

#[test]
fn two_and_three_ranks_train_the_weights_of_one_process() {
    for loss in ["sigmoid", "combined"] {
        let dir = tempdir();
        wait_ok(train_process(&spec(dir.path(), "one", loss), &[]));
        for world in [2usize, 3] {
            let name = format!("w{world}");
            let path = spec(dir.path(), &name, loss);
            let peers = free_ports(world);
            // Global batch 4 over 3 ranks: slices of 2, 1 and 1 examples.
            let children: Vec<Child> = (0..world)
                .map(|r| {
                    train_process(
                        &path,
                        &[
                            "--peers".into(),
                            peers.clone(),
                            "--rank".into(),
                            r.to_string(),
                        ],
                    )
                })
                .collect();
            children.into_iter().for_each(wait_ok);
            let diff = compare(dir.path(), "one", &name);
            eprintln!("{loss}, {world} ranks: max |weights - one process| = {diff:.2e}");
            assert!(diff <= 1e-5, "{loss}, world {world}: {diff}");

            let one = read_jsonl(&dir.path().join("one/metrics.jsonl"));
            let many = read_jsonl(&dir.path().join(&name).join("metrics.jsonl"));
            assert_eq!(one.len(), many.len(), "every step logged once, by rank 0");
            for (x, y) in one.iter().zip(&many) {
                let (lx, ly) = (
                    x["loss"].as_f64().expect("loss"),
                    y["loss"].as_f64().expect("loss"),
                );
                assert!(
                    (lx - ly).abs() <= 1e-5 * lx.abs().max(1.0),
                    "step {}: loss {lx} vs {ly}",
                    x["step"]
                );
                // Metrics are over the global batch, not one rank's slice.
                assert_eq!(x["rewards/accuracies"], y["rewards/accuracies"]);
                assert_eq!(
                    x["logps/chosen"].as_f64().map(|v| (v * 1e3).round()),
                    y["logps/chosen"].as_f64().map(|v| (v * 1e3).round())
                );
            }
            let evals = read_jsonl(&dir.path().join(&name).join("eval.jsonl"));
            assert_eq!(evals.len(), 3, "eval at steps 2, 4, 6");
        }
    }
}

#[test]
fn every_rank_starts_from_rank_zero_state() {
    // Rank 1 is pointed at a model with other weights (same shapes): the run must
    // still train rank 0's model, as a joining worker receives rank 0's state.
    // Reference-free, because a "same" reference is each rank's own initial model
    // (in a cluster every worker loads the run's model, so they agree).
    let dir = tempdir();
    let reference_free = |path: &Path| {
        let text = std::fs::read_to_string(path).expect("read");
        assert!(text.contains("[data]"));
        std::fs::write(
            path,
            text.replace("[data]", "[reference]\npath = \"none\"\n[data]"),
        )
        .expect("write");
    };
    let one = spec(dir.path(), "one", "sigmoid");
    reference_free(&one);
    wait_ok(train_process(&one, &[]));
    let rank0 = spec(dir.path(), "two", "sigmoid");
    reference_free(&rank0);
    let rank1 = dir.path().join("two-rank1.toml");
    let text = std::fs::read_to_string(&rank0).expect("read");
    let other = text.replace(
        &fixture("qwen2").display().to_string(),
        &fixture("qwen2-other").display().to_string(),
    );
    assert_ne!(text, other, "rank 1 really starts from other weights");
    std::fs::write(&rank1, other).expect("write");
    let peers = free_ports(2);
    let children = vec![
        train_process(
            &rank0,
            &["--peers".into(), peers.clone(), "--rank".into(), "0".into()],
        ),
        train_process(
            &rank1,
            &["--peers".into(), peers, "--rank".into(), "1".into()],
        ),
    ];
    children.into_iter().for_each(wait_ok);
    let diff = compare(dir.path(), "one", "two");
    assert!(diff <= 1e-5, "rank 1 trained from rank 0's weights: {diff}");
    let metrics = read_jsonl(&dir.path().join("two/metrics.jsonl"));
    assert!(
        metrics.iter().all(|m| m["world_size"] == 2),
        "world_size is logged"
    );
}

#[test]
fn a_dead_rank_makes_the_survivor_fail_at_once_not_hang() {
    let dir = tempdir();
    let path = spec(dir.path(), "dead", "sigmoid");
    let peers = free_ports(2);
    let started = std::time::Instant::now();
    let survivor = train_process(
        &path,
        &["--peers".into(), peers.clone(), "--rank".into(), "0".into()],
    );
    // Rank 1 exits as if killed right after step 2.
    let victim = train_process(
        &path,
        &[
            "--peers".into(),
            peers,
            "--rank".into(),
            "1".into(),
            "--halt-after-step".into(),
            "2".into(),
        ],
    );
    let v = victim.wait_with_output().expect("wait");
    assert_eq!(
        v.status.code(),
        Some(86),
        "{}",
        String::from_utf8_lossy(&v.stderr)
    );
    let s = survivor.wait_with_output().expect("wait");
    let stderr = String::from_utf8_lossy(&s.stderr);
    assert_eq!(s.status.code(), Some(1), "the survivor fails: {stderr}");
    assert!(stderr.contains("collective"), "and says why: {stderr}");
    // Well before any I/O timeout (300 s): the peer's closed socket is noticed at once.
    assert!(
        started.elapsed() < std::time::Duration::from_secs(60),
        "{:?}",
        started.elapsed()
    );
}
