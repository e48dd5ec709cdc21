//! `dpo-worker score`: log-probabilities of preference pairs under a model (and
//! optionally a reference), written as one JSON line per input pair.

use std::path::{Path, PathBuf};

use dpo_data::{Example, PairFormat, TextTokenizer, TokenizedPair};
use serde_json::json;
use tch::{Device, Kind};

use crate::error::Result;
use crate::model::{CausalLm, checkpoint};
use crate::objective::pair_sums;

/// What to score and how.
#[derive(Debug, Clone)]
pub struct ScoreRequest {
    pub model: PathBuf,
    pub reference: Option<PathBuf>,
    pub data: PathBuf,
    pub out: PathBuf,
    pub format: PairFormat,
    /// Pairs per forward pass (each pair is two sequences).
    pub batch_size: usize,
    /// β of the implicit reward `β (log π − log π_ref)`.
    pub beta: f64,
    pub kind: Kind,
    pub device: Device,
}

/// Log-probabilities of one pair.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PairScore {
    pub chosen_logps: f64,
    pub rejected_logps: f64,
    pub chosen_tokens: usize,
    pub rejected_tokens: usize,
    /// `(chosen, rejected)` under the reference model.
    pub reference: Option<(f64, f64)>,
}

/// Totals printed at the end of a run.
#[derive(Debug, Clone, Default)]
pub struct ScoreSummary {
    pub pairs: usize,
    pub mean_chosen_logps: f64,
    pub mean_rejected_logps: f64,
    /// With a reference: fraction of pairs whose chosen reward exceeds the rejected.
    pub reward_accuracy: Option<f64>,
    pub mean_reward_margin: Option<f64>,
}

/// Reads and tokenizes a pair file, checking every token id against the model's
/// vocabulary so that a bad id is reported by line instead of failing in libtorch.
pub fn load_pairs(
    data: &Path,
    format: PairFormat,
    model_dir: &Path,
    vocab_size: i64,
) -> Result<Vec<TokenizedPair>> {
    let records = dpo_data::read_pairs(data, &dpo_data::records::Layout::default(), format)?;
    let needs_tokenizer = records
        .iter()
        .any(|r| !matches!(r.value, dpo_data::Pair::Tokens { .. }));
    let tokenizer = if needs_tokenizer {
        Some(TextTokenizer::from_dir(model_dir)?)
    } else {
        None
    };
    let pairs = dpo_data::tokenize_pairs(data, records, tokenizer.as_ref())?;
    for p in &pairs {
        let ids = p.prompt.iter().chain(&p.chosen).chain(&p.rejected).copied();
        dpo_data::check_vocabulary(data, p.line, ids, vocab_size)?;
    }
    Ok(pairs)
}

/// Scores `pairs` in batches of similar length; results come back in input order.
/// `progress` is called with the number of pairs finished by each batch.
pub fn score_pairs(
    model: &CausalLm,
    pairs: &[TokenizedPair],
    batch_size: usize,
    progress: &mut dyn FnMut(usize),
) -> Result<Vec<(f64, f64)>> {
    let mut order: Vec<usize> = (0..pairs.len()).collect();
    // Longest first: batches of similar length waste little on padding, and a
    // memory problem shows up on the first batch rather than the last.
    order.sort_by_key(|&i| {
        let p = &pairs[i];
        std::cmp::Reverse(p.prompt.len() + p.chosen.len().max(p.rejected.len()))
    });
    let mut out = vec![(0.0, 0.0); pairs.len()];
    for chunk in order.chunks(batch_size.max(1)) {
        let examples: Vec<Example> = chunk
            .iter()
            .map(|&i| Example::from(pairs[i].clone()))
            .collect();
        let refs: Vec<&Example> = examples.iter().collect();
        for (&i, [c, r]) in chunk.iter().zip(pair_sums(model, &refs, None)?) {
            out[i] = (c, r);
        }
        progress(chunk.len());
    }
    Ok(out)
}

fn score_line(s: &PairScore, beta: f64) -> serde_json::Value {
    let mut line = json!({
        "chosen_logps": s.chosen_logps,
        "rejected_logps": s.rejected_logps,
        "chosen_tokens": s.chosen_tokens,
        "rejected_tokens": s.rejected_tokens,
    });
    if let (Some((rc, rr)), Some(obj)) = (s.reference, line.as_object_mut()) {
        let chosen_reward = beta * (s.chosen_logps - rc);
        let rejected_reward = beta * (s.rejected_logps - rr);
        obj.insert("ref_chosen_logps".into(), json!(rc));
        obj.insert("ref_rejected_logps".into(), json!(rr));
        obj.insert("chosen_reward".into(), json!(chosen_reward));
        obj.insert("rejected_reward".into(), json!(rejected_reward));
        obj.insert(
            "reward_margin".into(),
            json!(chosen_reward - rejected_reward),
        );
    }
    line
}

/// Runs a whole scoring job. `progress` receives `(done, total)` after each batch,
/// over the policy pass and then the reference pass.
pub fn run(req: &ScoreRequest, progress: &mut dyn FnMut(usize, usize)) -> Result<ScoreSummary> {
    let policy = checkpoint::load(&req.model, req.kind, req.device)?;
    let vocab = policy.config().vocab_size;
    let reference = match &req.reference {
        Some(dir) => {
            let r = checkpoint::load_reference(dir, req.kind, req.device, vocab)?;
            Some(r)
        }
        None => None,
    };
    let pairs = load_pairs(&req.data, req.format, &req.model, vocab)?;
    let passes = if reference.is_some() { 2 } else { 1 };
    let total = pairs.len() * passes;
    let mut done = 0;
    let mut tick = |n: usize| {
        done += n;
        progress(done, total);
    };
    tracing::info!(pairs = pairs.len(), model = %req.model.display(), "scoring");
    let policy_scores = score_pairs(&policy, &pairs, req.batch_size, &mut tick)?;
    drop(policy);
    let reference_scores = match &reference {
        Some(r) => Some(score_pairs(r, &pairs, req.batch_size, &mut tick)?),
        None => None,
    };

    let mut text = String::new();
    let mut summary = ScoreSummary {
        pairs: pairs.len(),
        ..Default::default()
    };
    let (mut correct, mut margin_sum) = (0usize, 0.0f64);
    for (i, pair) in pairs.iter().enumerate() {
        let (c, r) = policy_scores[i];
        let s = PairScore {
            chosen_logps: c,
            rejected_logps: r,
            chosen_tokens: pair.chosen.len(),
            rejected_tokens: pair.rejected.len(),
            reference: reference_scores.as_ref().map(|rs| rs[i]),
        };
        summary.mean_chosen_logps += c;
        summary.mean_rejected_logps += r;
        if let Some((rc, rr)) = s.reference {
            let margin = req.beta * ((c - rc) - (r - rr));
            margin_sum += margin;
            correct += usize::from(margin > 0.0);
        }
        text.push_str(&score_line(&s, req.beta).to_string());
        text.push('\n');
    }
    let n = pairs.len().max(1) as f64;
    summary.mean_chosen_logps /= n;
    summary.mean_rejected_logps /= n;
    if reference_scores.is_some() {
        summary.reward_accuracy = Some(correct as f64 / n);
        summary.mean_reward_margin = Some(margin_sum / n);
    }
    if let Some(parent) = req.out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(crate::error::io_err(parent))?;
    }
    checkpoint::write_atomically(&req.out, text.as_bytes())?;
    Ok(summary)
}
