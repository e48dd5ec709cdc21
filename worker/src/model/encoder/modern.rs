//! ModernBERT's layers: pre-norm (the first layer's attention takes the
//! embeddings' norm as its own), a fused `Wqkv`, rotary positions with a base
//! per layer type, local layers that attend within a window and global ones
//! that attend everywhere, a GeGLU MLP (`Wi` gives the input and the gate,
//! `act(input) · gate`, `Wo`), a final norm, and a head of `dense`, activation
//! and norm before the classifier. Parameter paths are transformers'
//! (`model.layers.{i}.attn.Wqkv`, `head.dense`, …).

use tch::nn::Path;
use tch::{Kind, Tensor};

use super::config::{EncoderConfig, Modern};
use crate::error::TorchContext;
use crate::model::RopeScaling;
use crate::model::layers::{LayerNorm, Linear, TchResult};
use crate::model::rope::{self, Rope};

#[derive(Debug)]
pub(super) struct Layer {
    /// None in the first layer (`nn.Identity`: the embeddings end in a norm).
    pub(super) attn_norm: Option<LayerNorm>,
    pub(super) wqkv: Linear,
    pub(super) attn_out: Linear,
    pub(super) mlp_norm: LayerNorm,
    pub(super) wi: Linear,
    pub(super) mlp_out: Linear,
    /// Attends to every position (else within the window).
    pub(super) global: bool,
}

/// The classification head's `head.dense` → activation → `head.norm`.
#[derive(Debug)]
pub(super) struct Head {
    pub(super) dense: Linear,
    pub(super) norm: LayerNorm,
}

/// What the layers take besides their input: the rotary angles of both
/// layer types and the local layers' mask.
#[derive(Debug)]
pub(super) struct Attend {
    global: (Tensor, Tensor),
    local: (Tensor, Tensor),
    /// `[B, 1, T, T]`: a real key within the window of a query (a padding
    /// query sees every real key, so that no row is empty).
    local_mask: Tensor,
}

/// Rotary tables of the two layer types.
#[derive(Debug)]
pub(super) struct Rotary {
    global: Rope,
    local: Rope,
}

impl Rotary {
    pub(super) fn new(
        config: &EncoderConfig,
        m: &Modern,
        device: tch::Device,
    ) -> crate::error::Result<Self> {
        let d = config.hidden_size / config.num_attention_heads;
        Ok(Rotary {
            global: Rope::new(d, m.global_theta, &RopeScaling::None, device)?,
            local: Rope::new(d, m.local_theta, &RopeScaling::None, device)?,
        })
    }
}

impl Layer {
    pub(super) fn new(
        p: &Path,
        i: i64,
        c: &EncoderConfig,
        m: &Modern,
        kind: Kind,
    ) -> TchResult<Self> {
        let h = c.hidden_size;
        let eps = c.layer_norm_eps;
        let a = p.sub("attn");
        let mlp = p.sub("mlp");
        Ok(Layer {
            attn_norm: if i == 0 {
                None
            } else {
                Some(LayerNorm::with_bias(
                    p.sub("attn_norm"),
                    h,
                    eps,
                    m.norm_bias,
                    kind,
                )?)
            },
            wqkv: Linear::new(a.sub("Wqkv"), h, 3 * h, m.attention_bias, kind)?,
            attn_out: Linear::new(a.sub("Wo"), h, h, m.attention_bias, kind)?,
            mlp_norm: LayerNorm::with_bias(p.sub("mlp_norm"), h, eps, m.norm_bias, kind)?,
            wi: Linear::new(mlp.sub("Wi"), h, 2 * c.intermediate_size, m.mlp_bias, kind)?,
            mlp_out: Linear::new(mlp.sub("Wo"), c.intermediate_size, h, m.mlp_bias, kind)?,
            global: m.global.get(i as usize).copied().unwrap_or(true),
        })
    }

    /// The layer on `x` `[B, T, H]`; `mask` `[B, 1, T, T]` is the global
    /// layers' (real keys); `(p_attn, p_mlp)` the dropouts drawn (zero when
    /// not training).
    pub(super) fn forward(
        &self,
        x: &Tensor,
        c: &EncoderConfig,
        mask: &Tensor,
        attend: &Attend,
        (p_attn, p_mlp): (f64, f64),
    ) -> TchResult<Tensor> {
        let (b, t, h) = x.size3()?;
        let heads = c.num_attention_heads;
        let d = h / heads;
        let normed = match &self.attn_norm {
            Some(norm) => norm.forward(x)?,
            None => x.shallow_clone(),
        };
        // `[B, T, 3, heads, d]` → q, k, v of `[B, heads, T, d]`.
        let qkv = self.wqkv.forward(&normed)?.f_view([b, t, 3, heads, d])?;
        let part = |i: i64| -> TchResult<Tensor> { qkv.f_select(2, i)?.f_transpose(1, 2) };
        let ((cos, sin), mask) = if self.global {
            (&attend.global, mask)
        } else {
            (&attend.local, &attend.local_mask)
        };
        let turn = |x: Tensor| -> TchResult<Tensor> {
            rope::apply(&x, cos, sin).map_err(|e| tch::TchError::Torch(e.to_string()))
        };
        let q = turn(part(0)?)?;
        let k = turn(part(1)?)?;
        let v = part(2)?;
        let a = Tensor::f_scaled_dot_product_attention(
            &q,
            &k,
            &v,
            Some(mask),
            p_attn,
            false,
            None,
            false,
        )?
        .f_transpose(1, 2)?
        .f_reshape([b, t, h])?;
        let mut a = self.attn_out.forward(&a)?;
        if p_attn > 0.0 {
            a = a.f_dropout(p_attn, true)?;
        }
        let x = x.f_add(&a)?;
        let inner = self.wi.forward(&self.mlp_norm.forward(&x)?)?;
        let halves = inner.f_chunk(2, -1)?;
        let (input, gate) = match halves.as_slice() {
            [input, gate] => (input, gate),
            _ => return Err(tch::TchError::Shape("ModernBERT's Wi: two halves".into())),
        };
        let mut g = c.hidden_act.apply(input)?.f_mul(gate)?;
        if p_mlp > 0.0 {
            g = g.f_dropout(p_mlp, true)?;
        }
        x.f_add(&self.mlp_out.forward(&g)?)
    }
}

impl Attend {
    /// Positions `0..T` turned by both tables, and the local mask of
    /// `keys` (`[B, T]`, true for real tokens) within `window`.
    pub(super) fn new(
        rotary: &Rotary,
        keys: &Tensor,
        window: i64,
        kind: Kind,
    ) -> crate::error::Result<Self> {
        let (b, t) = keys.size2().op("ModernBERT positions")?;
        let device = keys.device();
        let positions = Tensor::f_arange(t, (Kind::Int64, device))
            .and_then(|p| p.f_unsqueeze(0))
            .and_then(|p| p.f_expand([b, t], false))
            .op("ModernBERT positions")?;
        let global = rotary.global.cos_sin(&positions, kind)?;
        let local = rotary.local.cos_sin(&positions, kind)?;
        let local_mask = local_mask(keys, window).op("ModernBERT positions")?;
        Ok(Attend {
            global,
            local,
            local_mask,
        })
    }
}

/// `[B, 1, T, T]`: key `j` is real and `|i - j| ≤ window`, for a real query
/// `i`; every real key for a padding query.
fn local_mask(keys: &Tensor, window: i64) -> TchResult<Tensor> {
    let (b, t) = keys.size2()?;
    let i = Tensor::f_arange(t, (Kind::Int64, keys.device()))?;
    let distance = i.f_unsqueeze(1)?.f_sub(&i.f_unsqueeze(0)?)?.f_abs()?;
    let near = distance.f_le(window)?.f_view([1, 1, t, t])?;
    let padding_query = keys.f_logical_not()?.f_view([b, 1, t, 1])?;
    let k = keys.f_view([b, 1, 1, t])?;
    near.f_logical_or(&padding_query)?.f_logical_and(&k)
}
