//! The decoder's self-attention: q, k and v (separate or fused), per-head
//! q/k norms, rotary embeddings, grouped-query heads, the KV cache of
//! generation, and the fused kernel (or, with logit soft-capping, the
//! explicit product).

use tch::nn::Path;
use tch::{Kind, Tensor};

use super::masks::{AttentionMask, Unpadded};
use crate::error::{Result, TorchContext};
use crate::model::config::ModelConfig;
use crate::model::layers::{Linear, RmsNorm, TchResult};
use crate::model::rope;

/// Logs, once per kind of mask, which fused attention kernel libtorch picks
/// on a GPU (`flash`, `efficient`, `cudnn`, or the slow `math` fallback): the
/// figure the GPU benchmark reports for each path.
fn report_kernel(q: &Tensor, k: &Tensor, v: &Tensor, mask: &AttentionMask) {
    use std::sync::atomic::{AtomicBool, Ordering};
    static SEEN: [AtomicBool; 3] = [const { AtomicBool::new(false) }; 3];
    if !q.device().is_cuda() {
        return;
    }
    let (slot, name, m, causal) = match mask {
        AttentionMask::All => (0, "none", None, false),
        AttentionMask::Causal => (1, "causal", None, true),
        AttentionMask::Explicit(m) => (2, "explicit (padding or packing)", Some(m), false),
    };
    if SEEN[slot].swap(true, Ordering::Relaxed) {
        return;
    }
    let kernel = match Tensor::f_internal_fused_sdp_choice(q, k, v, m, 0.0, causal, None, false) {
        Ok(0) => "math".to_string(),
        Ok(1) => "flash".to_string(),
        Ok(2) => "efficient".to_string(),
        Ok(3) => "cudnn".to_string(),
        Ok(other) => format!("backend {other}"),
        Err(e) => format!("unknown ({e})"),
    };
    tracing::info!(mask = name, %kernel, dtype = ?q.kind(), "attention kernel");
}

/// q, k and v: three projections, or one (`qkv_proj`, Phi-3) whose output
/// is q, k and v side by side.
#[derive(Debug)]
pub(super) enum Qkv {
    Separate {
        q_proj: Linear,
        k_proj: Linear,
        v_proj: Linear,
    },
    Fused(Linear),
}

#[derive(Debug)]
pub(super) struct Attention {
    pub(super) qkv: Qkv,
    pub(super) o_proj: Linear,
    /// Qwen3: RMSNorm over each head's q and k, before rotary.
    pub(super) q_norm: Option<RmsNorm>,
    pub(super) k_norm: Option<RmsNorm>,
    pub(super) num_heads: i64,
    pub(super) num_kv_heads: i64,
    pub(super) head_dim: i64,
    /// The scores' scale when not `1/√head_dim` (Gemma).
    pub(super) scale: Option<f64>,
    /// Scores soft-capped, `c·tanh(s/c)`, before the mask (Gemma 2): no
    /// fused kernel does that, so the product is written out.
    pub(super) softcap: Option<f64>,
}

/// The rotary angles of a forward: the global layers', and the
/// sliding-window layers' when they have a base of their own (Gemma 3).
#[derive(Debug)]
pub(super) struct Angles {
    pub(super) cos: Tensor,
    pub(super) sin: Tensor,
    pub(super) local: Option<(Tensor, Tensor)>,
}

impl Angles {
    /// The angles a layer turns q and k by.
    pub(super) fn of(&self, sliding: bool) -> (&Tensor, &Tensor) {
        match (&self.local, sliding) {
            (Some((cos, sin)), true) => (cos, sin),
            _ => (&self.cos, &self.sin),
        }
    }
}

impl Attention {
    pub(super) fn new(p: Path, cfg: &ModelConfig, kind: Kind) -> TchResult<Self> {
        let (h, d) = (cfg.hidden_size, cfg.head_dim);
        let q_dim = cfg.num_attention_heads * d;
        let kv_dim = cfg.num_key_value_heads * d;
        let qkv = if cfg.fused_qkv {
            Qkv::Fused(Linear::new(
                &p / "qkv_proj",
                h,
                q_dim + 2 * kv_dim,
                cfg.qkv_bias,
                kind,
            )?)
        } else {
            Qkv::Separate {
                q_proj: Linear::new(&p / "q_proj", h, q_dim, cfg.qkv_bias, kind)?,
                k_proj: Linear::new(&p / "k_proj", h, kv_dim, cfg.qkv_bias, kind)?,
                v_proj: Linear::new(&p / "v_proj", h, kv_dim, cfg.qkv_bias, kind)?,
            }
        };
        Ok(Attention {
            qkv,
            o_proj: Linear::new(&p / "o_proj", q_dim, h, cfg.o_bias, kind)?,
            q_norm: match cfg.qk_norm {
                true => Some(RmsNorm::of(&p / "q_norm", d, cfg, kind)?),
                false => None,
            },
            k_norm: match cfg.qk_norm {
                true => Some(RmsNorm::of(&p / "k_norm", d, cfg, kind)?),
                false => None,
            },
            num_heads: cfg.num_attention_heads,
            num_kv_heads: cfg.num_key_value_heads,
            head_dim: d,
            scale: cfg.attn_scale,
            softcap: cfg.attn_softcap,
        })
    }

    /// `rope`: the RoPE angles' cosines and sines.
    pub(super) fn forward(
        &self,
        xs: &Tensor,
        (cos, sin): (&Tensor, &Tensor),
        mask: &AttentionMask,
        cache: Option<&mut LayerCache>,
        window: Option<i64>,
        unpadded: Option<&Unpadded>,
    ) -> Result<Tensor> {
        let (b, l) = match unpadded {
            Some(u) => (u.batch, u.seq),
            None => {
                let (b, l, _) = xs.size3().op("attention: input shape")?;
                (b, l)
            }
        };
        let heads = |t: TchResult<Tensor>, n: i64, norm: Option<&RmsNorm>| -> TchResult<Tensor> {
            let t = match unpadded {
                Some(u) => u.pad(&t?)?,
                None => t?,
            };
            let t = t.f_view([b, l, n, self.head_dim])?;
            let t = match norm {
                Some(norm) => norm.forward(&t)?,
                None => t,
            };
            t.f_transpose(1, 2)
        };
        let (q, k, v) = match &self.qkv {
            Qkv::Separate {
                q_proj,
                k_proj,
                v_proj,
            } => (q_proj.forward(xs), k_proj.forward(xs), v_proj.forward(xs)),
            Qkv::Fused(qkv_proj) => {
                let q_dim = self.num_heads * self.head_dim;
                let kv_dim = self.num_kv_heads * self.head_dim;
                let all = qkv_proj.forward(xs).op("attention: qkv_proj")?;
                (
                    all.f_narrow(-1, 0, q_dim),
                    all.f_narrow(-1, q_dim, kv_dim),
                    all.f_narrow(-1, q_dim + kv_dim, kv_dim),
                )
            }
        };
        let q = heads(q, self.num_heads, self.q_norm.as_ref()).op("attention: q")?;
        let k = heads(k, self.num_kv_heads, self.k_norm.as_ref()).op("attention: k")?;
        let v = heads(v, self.num_kv_heads, None).op("attention: v")?;
        let q = rope::apply(&q, cos, sin)?;
        let mut k = rope::apply(&k, cos, sin)?;
        let mut v = v;
        if let Some(cache) = cache {
            // Generation: keys and values of earlier positions come from the cache.
            if let (Some(ck), Some(cv)) = (&cache.k, &cache.v) {
                k = Tensor::f_cat(&[ck, &k], 2).op("kv cache: append k")?;
                v = Tensor::f_cat(&[cv, &v], 2).op("kv cache: append v")?;
            }
            cache.k = Some(k.shallow_clone());
            cache.v = Some(v.shallow_clone());
            // A single new query sees everything cached, or the last `window` keys.
            let total = k.size()[2];
            if let Some(w) = window.filter(|&w| l == 1 && total > w) {
                k = k.f_narrow(2, total - w, w).op("kv cache: window")?;
                v = v.f_narrow(2, total - w, w).op("kv cache: window")?;
            }
        }
        let kv_len = k.size()[2];
        let n_rep = self.num_heads / self.num_kv_heads;
        let repeat = |t: Tensor| -> TchResult<Tensor> {
            if n_rep == 1 {
                return Ok(t);
            }
            t.f_unsqueeze(2)?
                .f_expand([b, self.num_kv_heads, n_rep, kv_len, self.head_dim], false)?
                .f_reshape([b, self.num_heads, kv_len, self.head_dim])
        };
        let k = repeat(k).op("attention: repeat kv")?;
        let v = repeat(v).op("attention: repeat kv")?;
        let out = match self.softcap {
            Some(cap) => {
                let scale = self.scale.unwrap_or(1.0 / (self.head_dim as f64).sqrt());
                softcapped_attention(&q, &k, &v, mask, scale, cap)
            }
            None => {
                report_kernel(&q, &k, &v, mask);
                let (m, causal) = match mask {
                    AttentionMask::All => (None, false),
                    AttentionMask::Causal => (None, true),
                    AttentionMask::Explicit(m) => (Some(m), false),
                };
                Tensor::f_scaled_dot_product_attention(
                    &q, &k, &v, m, 0.0, causal, self.scale, false,
                )
            }
        }
        .op("attention: scaled_dot_product_attention")?;
        let out = out
            .f_transpose(1, 2)
            .and_then(|t| t.f_reshape([b, l, self.num_heads * self.head_dim]))
            .and_then(|t| match unpadded {
                Some(u) => u.unpad(&t),
                None => Ok(t),
            })
            .op("attention: merge heads")?;
        self.o_proj.forward(&out).op("attention: o_proj")
    }
}

/// Attention with soft-capped scores, written out as transformers' eager
/// path does (Gemma 2): `s = q·kᵀ × scale`, `s = c·tanh(s/c)`, masked
/// positions set to the dtype's lowest value, softmax in f32, cast back,
/// `× v`.
fn softcapped_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &AttentionMask,
    scale: f64,
    cap: f64,
) -> TchResult<Tensor> {
    let kind = q.kind();
    let scores = q.f_matmul(&k.f_transpose(-2, -1)?)?.f_mul_scalar(scale)?;
    let scores = crate::logps::softcap(&scores, cap)?;
    let lowest = match kind {
        Kind::BFloat16 => -3.389_531_389_251_535_5e38,
        Kind::Half => -65504.0,
        _ => f32::MIN as f64,
    };
    let (lq, lk) = (q.size()[2], k.size()[2]);
    let allowed = match mask {
        AttentionMask::All => None,
        // Causal with the queries at the end of the keys (a cached prefill
        // has as many of each).
        AttentionMask::Causal => {
            Some(Tensor::f_ones([lq, lk], (Kind::Bool, q.device()))?.f_tril(lk - lq)?)
        }
        AttentionMask::Explicit(m) => Some(m.shallow_clone()),
    };
    let scores = match allowed {
        Some(a) => scores.f_masked_fill(&a.f_logical_not()?, lowest)?,
        None => scores,
    };
    scores
        .f_softmax(-1, Kind::Float)?
        .f_to_kind(kind)?
        .f_matmul(v)
}

/// Keys and values of the positions generated so far, for one layer.
#[derive(Debug, Default)]
pub struct LayerCache {
    pub(super) k: Option<Tensor>,
    pub(super) v: Option<Tensor>,
}

/// The KV cache of one sequence being generated.
#[derive(Debug, Default)]
pub struct KvCache {
    pub(super) layers: Vec<LayerCache>,
    /// Positions already in the cache.
    pub len: i64,
    /// Their tokens (to turn them again when LongRoPE's factors change).
    pub(super) tokens: Vec<i64>,
}
