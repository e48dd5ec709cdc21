//! The memory-saving paths against the plain one on the same models and
//! micro-batches: the chunked LM head and gradient checkpointing (each, and
//! both), for per-token log-probs, sums and the gradient of every parameter (of
//! a loss over sums and per-token terms, as the combined loss uses them) to
//! 1e-6 relative in f32 — on Llama, Qwen2 (tied embeddings: the head's gradient
//! lands on the embedding), Mistral (a sliding window), Phi-3 (LongRoPE chosen
//! per packed sequence) and Gemma 2 (soft-capped scores and logits: the
//! chunked head recomputes the cap), padded and packed.
//! With chunks of 3 positions every micro-batch here spans many chunks, so the
//! deferred backward ([`dpo_worker::objective::Deferred`]) does all of the
//! head's and the layers' work. The padded path runs the layers on the real
//! tokens only; it is checked against the dense computation too.

mod common;

use common::{all_gradients, fixture, random_examples, unlikelihood, values};
use dpo_data::Example;
use dpo_worker::model::checkpoint;
use dpo_worker::model::llama::LayerGrads;
use dpo_worker::objective::{Layout, MicroBatch, SequenceScores, score};
use tch::{Device, Kind, Tensor};

/// A loss touching the sums and every per-token log-prob (through log(1 − p)).
fn loss(s: &SequenceScores) -> Tensor {
    s.sums.sum(Kind::Float) * 0.7 + unlikelihood(s).sum(Kind::Float) * 0.3
}

/// Per-token log-probs, sums and every parameter's gradient with the head run
/// on `chunk` positions at a time, the layers checkpointed or not.
fn run(
    model: &mut dpo_worker::model::CausalLm,
    mb: &MicroBatch,
    chunk: usize,
    checkpointing: bool,
) -> [Vec<f64>; 3] {
    run_with(model, mb, chunk, checkpointing, true)
}

fn run_with(
    model: &mut dpo_worker::model::CausalLm,
    mb: &MicroBatch,
    chunk: usize,
    checkpointing: bool,
    unpad: bool,
) -> [Vec<f64>; 3] {
    model.set_head_chunk(chunk);
    model.set_gradient_checkpointing(checkpointing);
    model.set_unpadding(unpad);
    for mut v in model.var_store().trainable_variables() {
        v.zero_grad();
    }
    let mut s = score(model, mb).expect("score");
    assert_eq!(
        s.deferred.head.is_some(),
        chunk > 0,
        "chunk {chunk}: deferred head"
    );
    assert_eq!(
        s.deferred.layers.is_some(),
        checkpointing,
        "deferred layers"
    );
    loss(&s).backward();
    std::mem::take(&mut s.deferred)
        .backward(model, LayerGrads::Accumulate)
        .expect("deferred backward");
    let grads: Vec<f64> = all_gradients(model);
    let lp = s.token_logps.masked_select(&s.mask.to_kind(Kind::Bool));
    [values(&lp), values(&s.sums), grads]
}

#[test]
fn the_chunked_head_and_checkpointed_layers_give_the_plain_log_probs_and_gradients() {
    for name in ["llama", "qwen2", "mistral", "phi3", "gemma2"] {
        let mut model = checkpoint::load(&fixture(name), Kind::Float, Device::Cpu).expect("model");
        let vocab = model.config().vocab_size as u32;
        let exs = random_examples(vocab, 6, 1);
        let refs: Vec<&Example> = exs.iter().collect();
        for packing in [None, Some(48)] {
            let mb = MicroBatch::new(&refs, true, false, packing, Device::Cpu).expect("mb");
            let plain = run(&mut model, &mb, 0, false);
            if let Layout::Padded(b) = &mb.layout {
                // Enough padding that the layers run on the real tokens only,
                // against the same computation on every position.
                let real = b.attention_mask.sum(Kind::Float).double_value(&[]);
                let all = b.attention_mask.numel() as f64;
                assert!(real < 0.9 * all, "{name}: {real} of {all} positions real");
                let dense = run_with(&mut model, &mb, 0, false, false);
                compare(&format!("{name} unpadded vs dense"), &dense, &plain);
            }
            for (chunk, checkpointing) in [(3, false), (0, true), (3, true)] {
                let other = run(&mut model, &mb, chunk, checkpointing);
                let case = format!(
                    "{name} packing={packing:?} chunk={chunk} checkpointing={checkpointing}"
                );
                compare(&case, &plain, &other);
            }
        }
    }
}

/// `other` against `plain`: each of log-probs, sums, gradients within 1e-6 of
/// the largest value.
fn compare(case: &str, plain: &[Vec<f64>; 3], other: &[Vec<f64>; 3]) {
    for (what, a, b) in [
        ("token log-probs", &plain[0], &other[0]),
        ("sums", &plain[1], &other[1]),
        ("gradients", &plain[2], &other[2]),
    ] {
        assert_eq!(a.len(), b.len(), "{case} {what}");
        let scale = a.iter().fold(0.0f64, |m, x| m.max(x.abs()));
        assert!(scale > 0.0, "{case}: no {what}");
        let d = a
            .iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0f64, f64::max)
            / scale;
        eprintln!("{case}: {what} differ by {d:e} of {scale:.3}");
        assert!(d <= 1e-6, "{case}: {what} differ by {d:e}");
    }
}
