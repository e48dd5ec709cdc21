//! Rotary position embeddings, computed exactly as transformers does: inverse
//! frequencies in f32, angles `position * inv_freq` in f32, `cos`/`sin` cast to the
//! activations' dtype, and the "rotate half" convention (not interleaved pairs).

use std::f64::consts::PI;

use tch::{Device, Kind, Tensor};

use super::config::RopeScaling;
use crate::error::{Result, TorchContext};

/// Inverse frequencies for one head dimension, after any long-context rescaling.
pub fn inverse_frequencies(head_dim: i64, theta: f64, scaling: &RopeScaling) -> Vec<f64> {
    // transformers computes base ** (arange(0, dim, 2, int64).float() / dim) in f32;
    // doing the same in f32 keeps the frequencies bit-identical.
    let base: Vec<f32> = (0..head_dim / 2)
        .map(|i| {
            let exponent = (2 * i) as f32 / head_dim as f32;
            1.0f32 / (theta as f32).powf(exponent)
        })
        .collect();
    match scaling {
        RopeScaling::None => base.iter().map(|&f| f as f64).collect(),
        // The short factors: what a forward within the original context uses
        // (see `Rope::cos_sin` for the long ones).
        RopeScaling::LongRope { short_factor, .. } => longrope(head_dim, theta, short_factor),
        RopeScaling::Linear { factor } => {
            base.iter().map(|&f| (f / *factor as f32) as f64).collect()
        }
        &RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings: old_ctx,
        } => {
            let low_freq_wavelen = old_ctx / low_freq_factor;
            let high_freq_wavelen = old_ctx / high_freq_factor;
            base.iter()
                .map(|&f| {
                    let f = f as f64;
                    let wavelen = 2.0 * PI / f;
                    if wavelen > low_freq_wavelen {
                        f / factor
                    } else if wavelen < high_freq_wavelen {
                        f
                    } else {
                        let smooth = (old_ctx / wavelen - low_freq_factor)
                            / (high_freq_factor - low_freq_factor);
                        (1.0 - smooth) * f / factor + smooth * f
                    }
                })
                .collect()
        }
    }
}

/// LongRoPE's frequencies for `factors` (one per frequency), in f32 as
/// transformers: `1 / (factor · theta^(2i/dim))`.
fn longrope(dim: i64, theta: f64, factors: &[f64]) -> Vec<f64> {
    (0..dim / 2)
        .map(|i| {
            let exponent = (2 * i) as f32 / dim as f32;
            let factor = factors.get(i as usize).copied().unwrap_or(1.0) as f32;
            (1.0f32 / (factor * (theta as f32).powf(exponent))) as f64
        })
        .collect()
}

fn frequencies_tensor(freqs: Vec<f64>, device: Device) -> Result<Tensor> {
    let freqs: Vec<f32> = freqs.into_iter().map(|f| f as f32).collect();
    Tensor::f_from_slice(&freqs)
        .and_then(|t| t.f_to_device(device))
        .op("rope: inverse frequencies")
}

/// LongRoPE's other half: the frequencies of a forward past the original
/// context, and the scale of `cos` and `sin`.
#[derive(Debug)]
struct LongContext {
    inv_freq: Tensor,
    original_max_position_embeddings: f64,
    attention_factor: f64,
}

/// Precomputed inverse frequencies on the model's device, for the leading
/// `dim` dimensions of each head.
#[derive(Debug)]
pub struct Rope {
    inv_freq: Tensor,
    long: Option<LongContext>,
}

impl Rope {
    pub fn new(dim: i64, theta: f64, scaling: &RopeScaling, device: Device) -> Result<Self> {
        let inv_freq = frequencies_tensor(inverse_frequencies(dim, theta, scaling), device)?;
        let long = match scaling {
            RopeScaling::LongRope {
                long_factor,
                original_max_position_embeddings,
                attention_factor,
                ..
            } => Some(LongContext {
                inv_freq: frequencies_tensor(longrope(dim, theta, long_factor), device)?,
                original_max_position_embeddings: *original_max_position_embeddings,
                attention_factor: *attention_factor,
            }),
            _ => None,
        };
        Ok(Rope { inv_freq, long })
    }

    /// `(cos, sin)` of shape `[batch, 1, seq, dim]` for `positions` `[batch, seq]`.
    ///
    /// LongRoPE: a sequence longer than the original context turns with the
    /// long factors, a shorter one with the short factors, both scaled by the
    /// attention factor. The choice is made per sequence — by the length its
    /// positions reach, a row of packed sequences each on its own — so a
    /// sequence's log-probs do not depend on what shares its batch (and one
    /// process equals any split into micro-batches and ranks). transformers
    /// chooses per forward, by the batch's longest: the same for a sequence
    /// alone and for batches that stay within the original context.
    pub fn cos_sin(&self, positions: &Tensor, kind: Kind) -> Result<(Tensor, Tensor)> {
        let f = || -> std::result::Result<(Tensor, Tensor), tch::TchError> {
            let positions_f = positions.f_to_kind(Kind::Float)?.f_unsqueeze(-1)?;
            let (angles, scale) = match &self.long {
                None => (positions_f.f_mul(&self.inv_freq.f_view([1, 1, -1])?)?, 1.0),
                Some(long) => {
                    let past = past_original(positions, long.original_max_position_embeddings)?
                        .f_unsqueeze(-1)?;
                    let short = positions_f.f_mul(&self.inv_freq.f_view([1, 1, -1])?)?;
                    let longer = positions_f.f_mul(&long.inv_freq.f_view([1, 1, -1])?)?;
                    (longer.f_where_self(&past, &short)?, long.attention_factor)
                }
            };
            let emb = Tensor::f_cat(&[&angles, &angles], -1)?;
            let (mut cos, mut sin) = (emb.f_cos()?, emb.f_sin()?);
            if scale != 1.0 {
                cos = cos.f_mul_scalar(scale)?;
                sin = sin.f_mul_scalar(scale)?;
            }
            Ok((
                cos.f_to_kind(kind)?.f_unsqueeze(1)?,
                sin.f_to_kind(kind)?.f_unsqueeze(1)?,
            ))
        };
        f().op("rope: cos/sin")
    }
}

impl Rope {
    /// Whether the factors change with a sequence's length (LongRoPE).
    pub fn has_long_factors(&self) -> bool {
        self.long.is_some()
    }

    /// LongRoPE: whether a sequence of `len` positions turns with the long
    /// factors (false for every other rotary kind).
    pub fn is_long(&self, len: i64) -> bool {
        self.long
            .as_ref()
            .is_some_and(|l| len as f64 > l.original_max_position_embeddings)
    }
}

/// For `positions` `[batch, seq]`: whether each token's sequence reaches past
/// `original` positions. A sequence is a run of positions that count up; a
/// position that does not (0 after packing, or padding) starts the next. A
/// lone position `p` (a cached decoding step) stands for a sequence of
/// `p + 1`.
fn past_original(positions: &Tensor, original: f64) -> std::result::Result<Tensor, tch::TchError> {
    let (b, l) = positions.size2()?;
    let flat = positions
        .f_to_kind(Kind::Int64)?
        .f_to_device(Device::Cpu)?
        .f_contiguous()?;
    let values = Vec::<i64>::try_from(&flat.f_view([-1])?)?;
    let mut past = vec![false; values.len()];
    for row in values.chunks(l.max(1) as usize).enumerate() {
        let (r, row) = row;
        let base = r * l as usize;
        let mut start = 0;
        for i in 1..=row.len() {
            if i == row.len() || row[i] != row[i - 1] + 1 {
                let reach = row[start..i].iter().copied().max().unwrap_or(0) + 1;
                let long = reach as f64 > original;
                past[base + start..base + i].fill(long);
                start = i;
            }
        }
    }
    Tensor::f_from_slice(&past)?
        .f_view([b, l])?
        .f_to_device(positions.device())
}

/// `x * cos + rotate_half(x) * sin` for `x` of shape `[batch, heads, seq,
/// head_dim]`; when `cos` is narrower than a head (`partial_rotary_factor`)
/// only the leading dimensions turn, the rest pass through.
pub fn apply(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let f = || -> std::result::Result<Tensor, tch::TchError> {
        let width = x.size().last().copied().unwrap_or(0);
        let dim = cos.size().last().copied().unwrap_or(width);
        let turn = |x: &Tensor| -> std::result::Result<Tensor, tch::TchError> {
            let half = dim / 2;
            let x1 = x.f_narrow(-1, 0, half)?;
            let x2 = x.f_narrow(-1, half, half)?;
            let rotated = Tensor::f_cat(&[&x2.f_neg()?, &x1], -1)?;
            x.f_mul(cos)?.f_add(&rotated.f_mul(sin)?)
        };
        if dim == width {
            return turn(x);
        }
        let turned = turn(&x.f_narrow(-1, 0, dim)?)?;
        Tensor::f_cat(&[&turned, &x.f_narrow(-1, dim, width - dim)?], -1)
    };
    f().op("rope: apply")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama3_scaling_keeps_high_and_divides_low_frequencies() {
        let scaling = RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 64.0,
        };
        let plain = inverse_frequencies(16, 10000.0, &RopeScaling::None);
        let scaled = inverse_frequencies(16, 10000.0, &scaling);
        for (p, s) in plain.iter().zip(&scaled) {
            let wavelen = 2.0 * PI / p;
            if wavelen < 16.0 {
                assert_eq!(p, s, "high frequencies are kept");
            } else if wavelen > 64.0 {
                assert!((s - p / 8.0).abs() < 1e-12, "low frequencies are divided");
            } else {
                assert!(
                    *s < *p && *s > p / 8.0,
                    "medium frequencies are interpolated"
                );
            }
        }
        // The first frequency is always 1 (theta^0) and stays unscaled.
        assert_eq!(scaled[0], 1.0);
    }
}
