//! Sampling continuations from a model with a KV cache — the small generate path
//! behind `data.negatives = "policy"`. Random draws come from our seeded generator,
//! so the same seed gives the same negatives on every machine.

use dpo_data::rng::SplitMix64;
use tch::{Device, Kind, Tensor};

use crate::error::{Result, TorchContext};
use crate::model::CausalLm;

/// How the next token is chosen.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Sampling {
    Greedy,
    /// Softmax of logits / temperature.
    Temperature(f64),
}

fn pick(logits: &Tensor, sampling: Sampling, rng: &mut SplitMix64) -> Result<u32> {
    let logits = logits
        .f_to_kind(Kind::Double)
        .and_then(|t| t.f_to_device(Device::Cpu))
        .op("generate: logits")?;
    let index = match sampling {
        Sampling::Greedy => logits
            .f_argmax(-1, false)
            .op("generate: argmax")?
            .int64_value(&[]),
        Sampling::Temperature(t) => {
            let probs = logits
                .f_div_scalar(t.max(1e-6))
                .and_then(|l| l.f_softmax(-1, Kind::Double))
                .op("generate: softmax")?;
            let probs = Vec::<f64>::try_from(&probs).op("generate: probabilities")?;
            // Inverse-CDF draw with 53 random bits.
            let u = rng.unit();
            let mut acc = 0.0;
            let mut chosen = probs.len().saturating_sub(1);
            for (i, p) in probs.iter().enumerate() {
                acc += p;
                if u < acc {
                    chosen = i;
                    break;
                }
            }
            chosen as i64
        }
    };
    Ok(index as u32)
}

/// Generates up to `max_new_tokens` after `prompt`, stopping after any token in
/// `stop` (which is kept, as responses end with EOS).
pub fn generate(
    model: &CausalLm,
    prompt: &[u32],
    max_new_tokens: usize,
    stop: &[u32],
    sampling: Sampling,
    rng: &mut SplitMix64,
) -> Result<Vec<u32>> {
    let _guard = tch::no_grad_guard();
    let mut cache = model.new_cache();
    let ids: Vec<i64> = prompt.iter().map(|&t| i64::from(t)).collect();
    let input = Tensor::f_from_slice(&ids)
        .and_then(|t| t.f_view([1, -1]))
        .and_then(|t| t.f_to_device(model.device()))
        .op("generate: prompt")?;
    let mut logits = model.forward_cached(&input, &mut cache)?;
    let mut out = Vec::with_capacity(max_new_tokens);
    while out.len() < max_new_tokens {
        let last = logits
            .f_select(1, -1)
            .and_then(|t| t.f_squeeze_dim(0))
            .op("generate: last logits")?;
        let token = pick(&last, sampling, rng)?;
        out.push(token);
        if stop.contains(&token) || out.len() == max_new_tokens {
            break;
        }
        let next = Tensor::f_from_slice(&[i64::from(token)])
            .and_then(|t| t.f_view([1, 1]))
            .and_then(|t| t.f_to_device(model.device()))
            .op("generate: next token")?;
        logits = model.forward_cached(&next, &mut cache)?;
    }
    Ok(out)
}
