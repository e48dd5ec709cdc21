//! Pair-aware packing against the unpacked (padded) path on the same models and
//! examples: every token's log-prob and the gradients of a loss over sums and
//! per-token terms to 1e-5 in f32, token counts exactly, sums up to the rounding
//! of their summation order —
//! on Llama (llama3 RoPE scaling), Qwen2 (biases, tied embeddings) and Mistral
//! (a sliding window of 6, shorter than the sequences, so the window logic counts).

mod common;

use common::{all_gradients, fixture, random_examples, unlikelihood, values};
use dpo_data::Example;
use dpo_worker::model::checkpoint;
use dpo_worker::objective::{Layout, MicroBatch, SequenceScores, score};
use tch::{Device, Kind};

fn max_diff(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

/// Every scored token's log-prob in sequence order (both layouts keep a sequence's
/// tokens in order along its row of `mask`), and per-sequence Σ log(1 − p) over
/// `mask` — layout-independent views of the per-token terms.
fn per_token_terms(s: &SequenceScores) -> (Vec<f64>, Vec<f64>) {
    let lp = s.token_logps.masked_select(&s.mask.to_kind(Kind::Bool));
    let ul = unlikelihood(s).sum_dim_intlist(&[-1i64][..], false, Kind::Float);
    (values(&lp), values(&ul))
}

fn check(model_name: &str, pairwise: bool, negatives: usize, capacity: usize) {
    let model = checkpoint::load(&fixture(model_name), Kind::Float, Device::Cpu).expect("model");
    let vocab = model.config().vocab_size as u32;
    let exs = random_examples(vocab, 7, negatives);
    let refs: Vec<&Example> = exs.iter().collect();
    let with_negatives = !pairwise;
    let padded = MicroBatch::new(&refs, pairwise, with_negatives, None, Device::Cpu).expect("mb");
    let packed =
        MicroBatch::new(&refs, pairwise, with_negatives, Some(capacity), Device::Cpu).expect("mb");
    let Layout::Packed(p) = &packed.layout else {
        panic!("not packed")
    };
    let Layout::Padded(b) = &padded.layout else {
        panic!("not padded")
    };
    let padded_cost = b.input_ids.size().iter().product::<i64>() as usize;
    assert!(
        p.computed_tokens() < padded_cost,
        "{model_name}: packing computes {} positions, padding {padded_cost}",
        p.computed_tokens()
    );
    assert_eq!(packed.tokens, padded.tokens);
    assert_eq!(
        (packed.chosen, packed.rejected),
        (padded.chosen, padded.rejected)
    );

    let mut grads = Vec::new();
    let mut results = Vec::new();
    for mb in [&padded, &packed] {
        for mut v in model.var_store().trainable_variables() {
            v.zero_grad();
        }
        let s = score(&model, mb).expect("score");
        // A loss touching sums, counts and the per-token terms.
        let (lp, ul) = per_token_terms(&s);
        let loss = s.sums.sum(Kind::Float) + unlikelihood(&s).sum(Kind::Float) * 0.5;
        loss.backward();
        let g: Vec<f64> = all_gradients(&model);
        grads.push(g);
        results.push((values(&s.sums), values(&s.counts), lp, ul));
    }
    let (a, b) = (&results[0], &results[1]);
    // Sums of ~10 f32 terms agree up to the summation order's rounding: a couple
    // of ulps of the sum (7.6e-6 per ulp at |Σ| ≈ 100).
    for (x, y) in a.0.iter().zip(&b.0) {
        assert!(
            (x - y).abs() <= 1e-5 + 2.5e-7 * x.abs(),
            "{model_name}: sums {x} vs {y}"
        );
    }
    let d_sums = max_diff(&a.0, &b.0);
    assert_eq!(a.1, b.1, "{model_name}: token counts");
    let d_lp = max_diff(&a.2, &b.2);
    let d_ul = max_diff(&a.3, &b.3);
    // Gradients relative to the largest one (the loss is a sum over ~30
    // sequences, so its gradients are O(10), not O(1)).
    let g_max = grads[0].iter().fold(0.0f64, |m, g| m.max(g.abs()));
    assert!(g_max > 0.0, "{model_name}: no gradient");
    let d_grad = max_diff(&grads[0], &grads[1]) / g_max;
    eprintln!(
        "{model_name} pairwise={pairwise} negatives={negatives} capacity={capacity}: rows {} × {} vs {padded_cost} padded; max |Δ| sums {d_sums:e}, token log-probs {d_lp:e}, unlikelihood {d_ul:e}, grads {d_grad:e} of max |g| {g_max:.3}",
        p.rows, p.row_len
    );
    assert!(a.0.iter().all(|x| x.is_finite() && *x < 0.0));
    for (what, d) in [
        ("per-token log-probs", d_lp),
        ("unlikelihood", d_ul),
        ("gradients (relative to the largest)", d_grad),
    ] {
        assert!(d <= 1e-5, "{model_name}: {what} differ by {d}");
    }
}

#[test]
fn packed_pairs_give_the_unpacked_log_probs_and_gradients() {
    for model in ["llama", "qwen2", "mistral"] {
        // Rows that hold several pairs, and rows too short for any (one each).
        check(model, true, 1, 64);
        check(model, true, 1, 8);
    }
}

#[test]
fn packed_examples_with_several_negatives_match_too() {
    for model in ["llama", "mistral"] {
        check(model, false, 3, 96);
    }
}
