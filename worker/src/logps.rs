//! Per-sequence log-probabilities: the quantity every preference loss is built on.
//!
//! A sequence is `prompt ++ response`; its log-probability is the sum over response
//! tokens of `log p(token | everything before it)`, with prompt and padding masked.
//! Chosen and rejected sequences of a batch of pairs go through the model in one
//! forward pass (chosen first, then rejected), as TRL's concatenated forward does.

use tch::{Device, Kind, Tensor};

use crate::error::{Error, Result, TorchContext};
use crate::model::CausalLm;
use dpo_data::TokenizedPair;

/// Right-padded token sequences with the mask of the tokens to score.
#[derive(Debug)]
pub struct SequenceBatch {
    /// `[batch, seq]` int64.
    pub input_ids: Tensor,
    /// `[batch, seq]` int64, 1 for real tokens.
    pub attention_mask: Tensor,
    /// `[batch, seq]` bool, true for response tokens.
    pub response_mask: Tensor,
}

impl SequenceBatch {
    /// Builds the batch from `(prompt, response)` pieces.
    pub fn new(seqs: &[(&[u32], &[u32])], device: Device) -> Result<Self> {
        let len = seqs
            .iter()
            .map(|(p, r)| p.len() + r.len())
            .max()
            .unwrap_or(0);
        let n = seqs.len();
        let mut ids = vec![0i64; n * len];
        let mut attn = vec![0i64; n * len];
        let mut resp = vec![false; n * len];
        for (row, (prompt, response)) in seqs.iter().enumerate() {
            let base = row * len;
            for (i, &t) in prompt.iter().chain(response.iter()).enumerate() {
                ids[base + i] = i64::from(t);
                attn[base + i] = 1;
                resp[base + i] = i >= prompt.len();
            }
        }
        let shape = [n as i64, len as i64];
        let make = |t: std::result::Result<Tensor, tch::TchError>| {
            t.and_then(|t| t.f_view(shape))
                .and_then(|t| t.f_to_device(device))
                .op("building sequence batch")
        };
        Ok(SequenceBatch {
            input_ids: make(Tensor::f_from_slice(&ids))?,
            attention_mask: make(Tensor::f_from_slice(&attn))?,
            response_mask: make(Tensor::f_from_slice(&resp))?,
        })
    }

    /// Chosen sequences of `pairs` followed by their rejected sequences.
    pub fn from_pairs(pairs: &[&TokenizedPair], device: Device) -> Result<Self> {
        let seqs: Vec<(&[u32], &[u32])> = pairs
            .iter()
            .map(|p| (p.prompt.as_slice(), p.chosen.as_slice()))
            .chain(
                pairs
                    .iter()
                    .map(|p| (p.prompt.as_slice(), p.rejected.as_slice())),
            )
            .collect();
        Self::new(&seqs, device)
    }
}

/// `log softmax(logits)[target]` for every position, in f32, without materialising
/// the full log-softmax.
pub fn token_logps(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let f = || -> std::result::Result<Tensor, tch::TchError> {
        let logits = logits.f_to_kind(Kind::Float)?;
        let picked = logits
            .f_gather(-1, &targets.f_unsqueeze(-1)?, false)?
            .f_squeeze_dim(-1)?;
        picked.f_sub(&logits.f_logsumexp(&[-1i64][..], false)?)
    };
    f().op("token log-probabilities")
}

/// Sum of response-token log-probabilities `[batch]` (f32) and the number of
/// response tokens `[batch]`, from logits `[batch, seq, vocab]`.
pub fn sequence_logps(logits: &Tensor, batch: &SequenceBatch) -> Result<(Tensor, Tensor)> {
    let l = batch.input_ids.size().get(1).copied().unwrap_or(0);
    if l < 2 {
        return Err(Error::Input {
            context: "sequence log-probabilities".into(),
            reason: "sequences need at least two tokens".into(),
        });
    }
    // Position i predicts token i + 1.
    let shifted = logits.f_narrow(1, 0, l - 1).op("shift logits")?;
    let targets = batch.input_ids.f_narrow(1, 1, l - 1).op("shift targets")?;
    let mask = batch.response_mask.f_narrow(1, 1, l - 1).op("shift mask")?;
    let per_token = token_logps(&shifted, &targets)?;
    let sums = per_token
        .f_mul(&mask.f_to_kind(Kind::Float).op("mask")?)
        .and_then(|t| t.f_sum_dim_intlist(&[-1i64][..], false, Kind::Float))
        .op("sum log-probabilities")?;
    let counts = mask
        .f_sum_dim_intlist(&[-1i64][..], false, Kind::Int64)
        .op("count response tokens")?;
    Ok((sums, counts))
}

/// Scores one batch of pairs: `(chosen_logps, rejected_logps)` per pair.
pub fn pair_logps(model: &CausalLm, pairs: &[&TokenizedPair]) -> Result<Vec<(f64, f64)>> {
    let batch = SequenceBatch::from_pairs(pairs, model.device())?;
    let logits = model.forward(&batch.input_ids, Some(&batch.attention_mask))?;
    let (sums, _) = sequence_logps(&logits, &batch)?;
    let sums: Vec<f64> = sums
        .f_to_kind(Kind::Double)
        .and_then(|t| t.f_to_device(Device::Cpu))
        .and_then(|t| Vec::<f64>::try_from(&t))
        .op("reading log-probabilities")?;
    let n = pairs.len();
    Ok((0..n).map(|i| (sums[i], sums[n + i])).collect())
}
