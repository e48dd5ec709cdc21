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

/// The LM head's backward, deferred: [`head_logps`] computed the log-probs in
/// chunks without keeping any logits, so after the loss's backward has filled
/// the gradient of the log-probs, [`HeadGrad::backward`] recomputes each chunk's
/// logits with their graph, back-propagates that chunk into the head's weight
/// and the hidden rows, and finally sends the rows' gradient through the model.
#[derive(Debug)]
pub struct HeadGrad {
    /// The hidden rows, in the model's graph.
    rows: Tensor,
    /// The same rows cut from the graph, collecting the chunks' gradients.
    leaf: Tensor,
    /// The log-probs handed to the loss (a leaf: the loss's backward fills its
    /// gradient).
    logps: Tensor,
    targets: Tensor,
    weight: Tensor,
    chunk: i64,
    softcap: Option<f64>,
}

/// `c · tanh(z / c)`: logits soft-capped to (−c, c) (Gemma 2), in their dtype.
pub fn softcap(logits: &Tensor, cap: f64) -> std::result::Result<Tensor, tch::TchError> {
    logits.f_div_scalar(cap)?.f_tanh()?.f_mul_scalar(cap)
}

/// The head's logits of `rows`, soft-capped when the model caps them.
fn head_logits(
    rows: &Tensor,
    weight: &Tensor,
    cap: Option<f64>,
) -> std::result::Result<Tensor, tch::TchError> {
    let logits = rows.f_linear(weight, None::<&Tensor>)?;
    match cap {
        Some(c) => softcap(&logits, c),
        None => Ok(logits),
    }
}

impl HeadGrad {
    /// The rest of the backward, once the loss's backward has run.
    pub fn backward(self) -> Result<()> {
        let f = || -> std::result::Result<(), tch::TchError> {
            let grad = self.logps.grad();
            if !grad.defined() {
                return Ok(());
            }
            let n = self.leaf.size().first().copied().unwrap_or(0);
            let mut start = 0;
            while start < n {
                let len = self.chunk.min(n - start);
                let logits = head_logits(
                    &self.leaf.f_narrow(0, start, len)?,
                    &self.weight,
                    self.softcap,
                )?;
                let lp = picked_logps(&logits, &self.targets.f_narrow(0, start, len)?)?;
                lp.f_mul(&grad.f_narrow(0, start, len)?)?
                    .f_sum(Kind::Float)?
                    .f_backward()?;
                start += len;
            }
            let rows_grad = self.leaf.grad();
            if rows_grad.defined() && self.rows.requires_grad() {
                self.rows
                    .f_mul(&rows_grad.f_to_kind(self.rows.kind())?)?
                    .f_sum(Kind::Float)?
                    .f_backward()?;
            }
            Ok(())
        };
        f().op("LM head backward (chunked)")
    }
}

/// `log softmax(logits)[target]` per row of `[n, vocab]` logits, in f32,
/// without materialising the full log-softmax.
fn picked_logps(logits: &Tensor, targets: &Tensor) -> std::result::Result<Tensor, tch::TchError> {
    let logits = logits.f_to_kind(Kind::Float)?;
    let picked = logits
        .f_gather(-1, &targets.f_unsqueeze(-1)?, false)?
        .f_squeeze_dim(-1)?;
    picked.f_sub(&logits.f_logsumexp(&[-1i64][..], false)?)
}

/// Log-probs `[n]` of `targets` under the LM head `weight` applied to hidden
/// `rows` (`[n, hidden]`). At most `chunk` rows' logits exist at once (`chunk`
/// ≤ 0: all rows at once, through plain autograd). When `rows` needs a
/// gradient and there is more than one chunk, the head's backward is deferred:
/// the returned log-probs are a leaf, and the [`HeadGrad`] must be run after
/// the loss's backward.
pub fn head_logps(
    rows: &Tensor,
    weight: &Tensor,
    targets: &Tensor,
    chunk: i64,
    softcap: Option<f64>,
) -> Result<(Tensor, Option<HeadGrad>)> {
    let f = || -> std::result::Result<(Tensor, Option<HeadGrad>), tch::TchError> {
        let n = rows.size().first().copied().unwrap_or(0);
        if chunk <= 0 || n <= chunk {
            let logits = head_logits(rows, weight, softcap)?;
            return Ok((picked_logps(&logits, targets)?, None));
        }
        let values = {
            let _guard = tch::no_grad_guard();
            let mut parts = Vec::new();
            let mut start = 0;
            while start < n {
                let len = chunk.min(n - start);
                let logits = head_logits(&rows.f_narrow(0, start, len)?, weight, softcap)?;
                parts.push(picked_logps(&logits, &targets.f_narrow(0, start, len)?)?);
                start += len;
            }
            Tensor::f_cat(&parts, 0)?
        };
        // A view of the weight needs a gradient only where autograd is on.
        let grad_wanted = rows.requires_grad() || weight.f_narrow(0, 0, 1)?.requires_grad();
        if !grad_wanted {
            return Ok((values, None));
        }
        let logps = values.f_detach()?.set_requires_grad(true);
        let head = HeadGrad {
            rows: rows.shallow_clone(),
            leaf: rows.f_detach()?.set_requires_grad(true),
            logps: logps.shallow_clone(),
            targets: targets.shallow_clone(),
            weight: weight.shallow_clone(),
            chunk,
            softcap,
        };
        Ok((logps, Some(head)))
    };
    f().op("LM head log-probabilities")
}
