//! Padded sequence batches and token log-probabilities: the pieces every
//! per-sequence log-probability (`objective::score`) is built from.
//!
//! A sequence is `prompt ++ response`; its log-probability is the sum over response
//! tokens of `log p(token | everything before it)`, with prompt and padding masked.

use tch::{Device, Kind, Tensor};

use crate::error::{Result, TorchContext};

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
