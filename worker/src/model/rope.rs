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
    match *scaling {
        RopeScaling::None => base.iter().map(|&f| f as f64).collect(),
        RopeScaling::Linear { factor } => {
            base.iter().map(|&f| (f / factor as f32) as f64).collect()
        }
        RopeScaling::Llama3 {
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

/// Precomputed inverse frequencies on the model's device.
#[derive(Debug)]
pub struct Rope {
    inv_freq: Tensor,
}

impl Rope {
    pub fn new(head_dim: i64, theta: f64, scaling: &RopeScaling, device: Device) -> Result<Self> {
        let freqs: Vec<f32> = inverse_frequencies(head_dim, theta, scaling)
            .into_iter()
            .map(|f| f as f32)
            .collect();
        let inv_freq = Tensor::f_from_slice(&freqs)
            .and_then(|t| t.f_to_device(device))
            .op("rope: inverse frequencies")?;
        Ok(Rope { inv_freq })
    }

    /// `(cos, sin)` of shape `[batch, 1, seq, head_dim]` for `positions` `[batch, seq]`.
    pub fn cos_sin(&self, positions: &Tensor, kind: Kind) -> Result<(Tensor, Tensor)> {
        let f = || -> std::result::Result<(Tensor, Tensor), tch::TchError> {
            let angles = positions
                .f_to_kind(Kind::Float)?
                .f_unsqueeze(-1)?
                .f_mul(&self.inv_freq.f_view([1, 1, -1])?)?;
            let emb = Tensor::f_cat(&[&angles, &angles], -1)?;
            let cos = emb.f_cos()?.f_to_kind(kind)?.f_unsqueeze(1)?;
            let sin = emb.f_sin()?.f_to_kind(kind)?.f_unsqueeze(1)?;
            Ok((cos, sin))
        };
        f().op("rope: cos/sin")
    }
}

/// `x * cos + rotate_half(x) * sin` for `x` of shape `[batch, heads, seq, head_dim]`.
pub fn apply(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let f = || -> std::result::Result<Tensor, tch::TchError> {
        let half = x.size().last().copied().unwrap_or(0) / 2;
        let x1 = x.f_narrow(-1, 0, half)?;
        let x2 = x.f_narrow(-1, half, half)?;
        let rotated = Tensor::f_cat(&[&x2.f_neg()?, &x1], -1)?;
        x.f_mul(cos)?.f_add(&rotated.f_mul(sin)?)
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
