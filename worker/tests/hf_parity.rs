//! The model against transformers: logits of single and padded batches, response
//! log-probabilities through `dpo-worker score`, and checkpoints saved back.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use common::{fixture, fixtures, max_abs_diff, read_jsonl, read_tensors, reference, tempdir};
use dpo_worker::model::checkpoint;
use tch::{Device, Kind, Tensor};

fn inputs() -> Vec<Vec<i64>> {
    let t = read_tensors(&fixtures().join("ref/inputs.safetensors"));
    (0..t.len())
        .map(|i| Vec::<i64>::try_from(&t[&format!("input_ids.{i}")]).expect("ids"))
        .collect()
}

/// Our logits for every fixture sequence: alone, in a right-padded batch and in a
/// left-padded batch — each compared with transformers' logits of the sequence alone.
fn check_logits(name: &str, kind: Kind, tolerance: f64) {
    let _guard = tch::no_grad_guard();
    let model = checkpoint::load(&fixture(name), kind, Device::Cpu).expect("model loads");
    let expected = read_tensors(&fixtures().join(format!("ref/{name}.logits.safetensors")));
    let seqs = inputs();
    let longest = seqs.iter().map(Vec::len).max().expect("inputs");
    let mut worst = 0.0f64;
    for (i, ids) in seqs.iter().enumerate() {
        let want = &expected[&format!("logits.{i}")];
        let x = Tensor::from_slice(ids).unsqueeze(0);
        let got = model.forward(&x, None).expect("forward").squeeze_dim(0);
        worst = worst.max(max_abs_diff(&got, want));
    }
    for left in [false, true] {
        let mut ids = vec![0i64; seqs.len() * longest];
        let mut mask = vec![0i64; seqs.len() * longest];
        for (row, s) in seqs.iter().enumerate() {
            let offset = if left { longest - s.len() } else { 0 };
            for (j, &t) in s.iter().enumerate() {
                ids[row * longest + offset + j] = t;
                mask[row * longest + offset + j] = 1;
            }
        }
        let shape = [seqs.len() as i64, longest as i64];
        let logits = model
            .forward(
                &Tensor::from_slice(&ids).view(shape),
                Some(&Tensor::from_slice(&mask).view(shape)),
            )
            .expect("padded forward");
        for (row, s) in seqs.iter().enumerate() {
            let offset = if left { longest - s.len() } else { 0 };
            let got = logits
                .get(row as i64)
                .narrow(0, offset as i64, s.len() as i64);
            worst = worst.max(max_abs_diff(&got, &expected[&format!("logits.{row}")]));
        }
    }
    let scale = expected["logits.0"].abs().max().double_value(&[]);
    eprintln!("{name} {kind:?}: max abs logit error {worst:.3e} (logit scale {scale:.2})");
    assert!(scale > 1.0, "fixture logits are not trivially small");
    assert!(
        worst <= tolerance,
        "{name} {kind:?}: max abs logit error {worst} > {tolerance}"
    );
}

#[test]
fn llama_logits_match_transformers() {
    // llama3 rope scaling, GQA, sharded weights, classic config.json spelling.
    check_logits("llama", Kind::Float, 1e-4);
}

#[test]
fn qwen2_logits_match_transformers() {
    // q/k/v biases, tied embeddings.
    check_logits("qwen2", Kind::Float, 1e-4);
}

#[test]
fn qwen3_logits_match_transformers() {
    // Per-head q/k RMSNorm before rotary, head_dim independent of hidden/heads,
    // no attention bias, GQA, tied embeddings.
    check_logits("qwen3", Kind::Float, 1e-4);
}

#[test]
fn phi3_logits_match_transformers() {
    // Fused qkv_proj and gate_up_proj, rotary on 3/4 of each head, LongRoPE:
    // the short factors for the inputs of 7 and 13 tokens, the long ones
    // for the 20 past its original 16 positions, cos/sin scaled by √2.
    check_logits("phi3", Kind::Float, 1e-4);
}

#[test]
fn gemma2_logits_match_transformers() {
    // (1 + w) RMSNorms, √hidden embeddings, GeGLU, norms before and after
    // attention and MLP, soft-capped attention scores and logits, a
    // sliding-window layer and a global one, query_pre_attn_scalar.
    check_logits("gemma2", Kind::Float, 1e-4);
}

#[test]
fn gemma3_logits_match_transformers() {
    // Gemma 2's layer without soft-caps, with (1 + w) q/k norms and a rotary
    // base per layer type (linear scaling on the global layers).
    check_logits("gemma3", Kind::Float, 1e-4);
}

#[test]
fn mistral_logits_match_transformers() {
    // Multi-query attention, linear rope scaling, a sliding window shorter than the inputs.
    check_logits("mistral", Kind::Float, 1e-4);
}

#[test]
fn half_precision_logits_stay_close() {
    // Against transformers run in bf16 on the same bf16 weights.
    check_logits("llama-bf16", Kind::BFloat16, 0.25);
    // f32 weights run in f16 against the f32 reference.
    check_logits("llama", Kind::Half, 0.05);
}

fn score(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_dpo-worker"))
        .arg("score")
        .args(args)
        .args(["--device", "cpu"])
        .output()
        .expect("dpo-worker starts")
}

fn run_score(
    model: &Path,
    data: &Path,
    reference: Option<&Path>,
    batch: &str,
) -> Vec<serde_json::Value> {
    let dir = tempdir();
    let out = dir.path().join("scores.jsonl");
    let mut args = vec![
        "--model",
        model.to_str().expect("utf-8"),
        "--data",
        data.to_str().expect("utf-8"),
        "--out",
        out.to_str().expect("utf-8"),
        "--batch-size",
        batch,
    ];
    if let Some(r) = reference {
        args.extend(["--reference", r.to_str().expect("utf-8")]);
    }
    let result = score(&args);
    assert!(
        result.status.success(),
        "dpo-worker score failed: {}",
        String::from_utf8_lossy(&result.stderr)
    );
    read_jsonl(&out)
}

fn f(v: &serde_json::Value, key: &str) -> f64 {
    v[key]
        .as_f64()
        .unwrap_or_else(|| panic!("{key} missing in {v}"))
}

#[test]
fn score_matches_transformers_for_text_and_token_pairs() {
    for name in ["llama", "qwen2"] {
        for kind in ["text", "tokens", "chat"] {
            let data = fixtures().join(format!("pairs_{kind}.jsonl"));
            let want = read_jsonl(&fixtures().join(format!("ref/{name}.{kind}.jsonl")));
            // Odd batch size: batches mix lengths and the last one is short.
            let got = run_score(&fixture(name), &data, None, "3");
            assert_eq!(got.len(), want.len(), "one output line per input line");
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                for key in ["chosen_logps", "rejected_logps"] {
                    let (a, b) = (f(g, key), f(w, key));
                    assert!(
                        (a - b).abs() <= 1e-4,
                        "{name} {kind} line {}: {key} {a} vs transformers {b}",
                        i + 1
                    );
                }
                for key in ["chosen_tokens", "rejected_tokens"] {
                    assert_eq!(g[key], w[key], "{name} {kind} line {}: {key}", i + 1);
                }
            }
            if kind != "tokens" {
                // The token ids themselves agree with transformers' tokenizer (BOS once
                // for Llama, none for Qwen2).
                let model =
                    checkpoint::load(&fixture(name), Kind::Float, Device::Cpu).expect("loads");
                let pairs = dpo_worker::score::load_pairs(
                    &data,
                    dpo_data::PairFormat::Auto,
                    &fixture(name),
                    model.config().vocab_size,
                )
                .expect("pairs load");
                for (p, w) in pairs.iter().zip(&want) {
                    let ids: Vec<u64> = p.prompt.iter().map(|&t| u64::from(t)).collect();
                    let want_ids: Vec<u64> = w["prompt_ids"]
                        .as_array()
                        .expect("prompt_ids")
                        .iter()
                        .map(|v| v.as_u64().expect("id"))
                        .collect();
                    assert_eq!(ids, want_ids, "{name}: prompt ids of line {}", p.line);
                }
            }
        }
    }
}

#[test]
fn score_with_reference_reports_implicit_rewards() {
    let data = fixtures().join("pairs_text.jsonl");
    let policy = read_jsonl(&fixtures().join("ref/llama.text.jsonl"));
    let refs = read_jsonl(&fixtures().join("ref/llama-ref.text.jsonl"));
    let got = run_score(&fixture("llama"), &data, Some(&fixture("llama-ref")), "4");
    for ((g, p), r) in got.iter().zip(&policy).zip(&refs) {
        let beta = 0.1;
        let chosen = beta * (f(p, "chosen_logps") - f(r, "chosen_logps"));
        let rejected = beta * (f(p, "rejected_logps") - f(r, "rejected_logps"));
        assert!((f(g, "ref_chosen_logps") - f(r, "chosen_logps")).abs() <= 1e-4);
        assert!((f(g, "ref_rejected_logps") - f(r, "rejected_logps")).abs() <= 1e-4);
        assert!((f(g, "chosen_reward") - chosen).abs() <= 1e-5);
        assert!((f(g, "rejected_reward") - rejected).abs() <= 1e-5);
        assert!((f(g, "reward_margin") - (chosen - rejected)).abs() <= 2e-5);
    }
}

/// Every tensor of `a`'s checkpoint equals `b`'s bit for bit, with the same dtype.
fn assert_same_tensors(a: &Path, b: &Path) {
    let load = |dir: &Path| -> BTreeMap<String, Tensor> {
        checkpoint::weight_files(dir)
            .expect("weights")
            .iter()
            .flat_map(|f| read_tensors(f))
            .collect()
    };
    let (ta, tb) = (load(a), load(b));
    assert_eq!(ta.keys().collect::<Vec<_>>(), tb.keys().collect::<Vec<_>>());
    for (name, x) in &ta {
        let y = &tb[name];
        assert_eq!(x.kind(), y.kind(), "{name}: dtype");
        assert_eq!(x.size(), y.size(), "{name}: shape");
        // Compare the raw bits (NaN-safe, and -0.0 differs from 0.0).
        let bits = |t: &Tensor| {
            let n = t.numel();
            let mut v = vec![0u8; n * t.kind().elt_size_in_bytes()];
            t.copy_data_u8(&mut v, n);
            v
        };
        assert!(bits(x) == bits(y), "{name}: bytes differ");
    }
}

#[test]
fn checkpoints_round_trip_bit_exactly_and_load_in_transformers() {
    let dir = tempdir();
    // Sharded f32 in, single file out; then sharded out again.
    let model = checkpoint::load(&fixture("llama"), Kind::Float, Device::Cpu).expect("loads");
    let single = dir.path().join("single");
    checkpoint::save(&model, &single, Some(&fixture("llama")), u64::MAX).expect("saves");
    assert!(single.join("model.safetensors").exists());
    assert!(single.join("tokenizer.json").exists());
    assert_same_tensors(&fixture("llama"), &single);
    let sharded = dir.path().join("sharded");
    checkpoint::save(&model, &sharded, Some(&fixture("llama")), 40_000).expect("saves sharded");
    assert!(sharded.join("model.safetensors.index.json").exists());
    assert!(checkpoint::weight_files(&sharded).expect("index").len() > 1);
    assert_same_tensors(&fixture("llama"), &sharded);

    // bf16 stays bf16.
    let bf16 =
        checkpoint::load(&fixture("llama-bf16"), Kind::BFloat16, Device::Cpu).expect("loads");
    let out = dir.path().join("bf16");
    checkpoint::save(&bf16, &out, Some(&fixture("llama-bf16")), u64::MAX).expect("saves");
    assert_same_tensors(&fixture("llama-bf16"), &out);

    // transformers reads what we wrote and computes the same logits as from the original.
    let logits = dir.path().join("logits.safetensors");
    let inputs = fixtures().join("ref/inputs.safetensors");
    reference(&[
        "logits",
        sharded.to_str().expect("utf-8"),
        inputs.to_str().expect("utf-8"),
        logits.to_str().expect("utf-8"),
    ]);
    let want = read_tensors(&fixtures().join("ref/llama.logits.safetensors"));
    for (name, t) in read_tensors(&logits) {
        assert_eq!(max_abs_diff(&t, &want[&name]), 0.0, "{name}");
    }
}

#[test]
fn tokenizer_adds_bos_once_and_eos_to_responses() {
    let llama = dpo_data::TextTokenizer::from_dir(&fixture("llama")).expect("tokenizer");
    let bos = llama.bos_id().expect("llama has BOS");
    let eos = llama.eos_id().expect("llama has EOS");
    let plain = llama.encode_prompt("one two").expect("encodes");
    assert_eq!(plain[0], bos);
    assert_eq!(plain.iter().filter(|&&t| t == bos).count(), 1);
    assert_eq!(
        llama.encode_prompt("<s>one two").expect("encodes"),
        plain,
        "no double BOS"
    );
    assert_eq!(
        llama.encode_response(" two").expect("encodes").last(),
        Some(&eos)
    );

    let qwen = dpo_data::TextTokenizer::from_dir(&fixture("qwen2")).expect("tokenizer");
    assert!(qwen.bos_id().is_none() && !qwen.adds_bos());
    assert_eq!(
        qwen.encode_prompt("one two").expect("encodes"),
        qwen.encode("one two").expect("encodes")
    );
}

#[test]
fn cached_generation_matches_full_forward_and_transformers_greedy() {
    use dpo_worker::generate::{Sampling, generate};
    let _guard = tch::no_grad_guard();
    // Mistral's window (6) is shorter than the prompt (13): prefill and decoding
    // both have to apply it.
    for name in [
        "llama", "qwen2", "qwen3", "phi3", "gemma2", "gemma3", "mistral",
    ] {
        let model = checkpoint::load(&fixture(name), Kind::Float, Device::Cpu).expect("loads");
        let want: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(fixtures().join(format!("ref/{name}.greedy.json")))
                .expect("read"),
        )
        .expect("json");
        let ids = |k: &str| -> Vec<u32> {
            want[k]
                .as_array()
                .expect("list")
                .iter()
                .map(|v| v.as_u64().expect("id") as u32)
                .collect()
        };
        let (prompt, tokens) = (ids("prompt"), ids("tokens"));
        let mut rng = dpo_data::rng::SplitMix64::new(0);
        let got = generate(
            &model,
            &prompt,
            tokens.len(),
            &[],
            Sampling::Greedy,
            &mut rng,
        )
        .expect("generates");
        assert_eq!(
            got, tokens,
            "{name}: greedy tokens differ from transformers"
        );

        // Step by step, the cached logits equal a full forward over the
        // sequence so far (LongRoPE: a sequence's factors follow its length,
        // so a prefix is the sequence to compare with, not the whole).
        let all: Vec<i64> = prompt
            .iter()
            .chain(&tokens)
            .map(|&t| i64::from(t))
            .collect();
        let full = |n: usize| {
            model
                .forward(&Tensor::from_slice(&all[..n]).unsqueeze(0), None)
                .expect("forward")
                .squeeze_dim(0)
        };
        let mut cache = model.new_cache();
        let p = prompt.len();
        let first = model
            .forward_cached(&Tensor::from_slice(&all[..p]).unsqueeze(0), &mut cache)
            .expect("prefill")
            .squeeze_dim(0);
        let mut worst = max_abs_diff(&first, &full(p));
        for (i, &t) in all.iter().enumerate().skip(p) {
            let step = model
                .forward_cached(&Tensor::from_slice(&[t]).unsqueeze(0), &mut cache)
                .expect("decode")
                .squeeze_dim(0);
            worst = worst.max(max_abs_diff(&step, &full(i + 1).narrow(0, i as i64, 1)));
        }
        assert!(worst <= 1e-4, "{name}: cached logits differ by {worst}");
    }
}
