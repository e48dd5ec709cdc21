//! Which keys each query may see: causal, padded, sliding-window masks, and
//! the unpadded layout (a padded batch's real tokens only).

use super::*;

/// What each query position may attend to.
#[derive(Debug)]
pub(super) enum AttentionMask {
    /// Every key (a single new query against the cache).
    All,
    /// Plain causal attention over an unpadded batch: SDPA's `is_causal` fast path.
    Causal,
    /// Boolean `[batch, 1, seq, seq]`, true where attention is allowed.
    Explicit(Tensor),
}

#[derive(Debug)]
pub(super) struct Masks {
    pub(super) full: AttentionMask,
    pub(super) windowed: AttentionMask,
    /// The layers hold only the real tokens of a padded batch (see [`Unpadded`]).
    pub(super) unpadded: Option<Unpadded>,
}

/// A padded batch's real tokens: between the layers the hidden states are
/// `[tokens, hidden]`, so the projections, norms and MLP never compute on
/// padding; attention scatters its queries, keys and values back to
/// `[batch, seq]` around SDPA (padding rows zero, masked out) and gathers its
/// output again. The real tokens' results are those of the padded
/// computation.
#[derive(Debug)]
pub(super) struct Unpadded {
    /// Flat positions (`row × seq + column`) of the real tokens, int64.
    idx: Tensor,
    pub(super) batch: i64,
    pub(super) seq: i64,
}

impl Unpadded {
    /// Unpads when at least a tenth of the batch is padding (below that the
    /// scatter and gather cost more than they save).
    pub(super) fn of(attention_mask: Option<&Tensor>) -> TchResult<Option<Self>> {
        let Some(m) = attention_mask else {
            return Ok(None);
        };
        let (batch, seq) = m.size2()?;
        let idx = m.f_reshape([-1])?.f_nonzero()?.f_squeeze_dim(1)?;
        let real = idx.size()[0];
        if real * 10 > batch * seq * 9 {
            return Ok(None);
        }
        Ok(Some(Unpadded { idx, batch, seq }))
    }

    /// `[tokens, k]` → `[batch, seq, k]`, zeros at the padding.
    pub(super) fn pad(&self, t: &Tensor) -> TchResult<Tensor> {
        let k = *t.size().last().unwrap_or(&0);
        Tensor::f_zeros([self.batch * self.seq, k], (t.kind(), t.device()))?
            .f_index_copy(0, &self.idx, t)?
            .f_view([self.batch, self.seq, k])
    }

    /// `[batch, seq, k]` → `[tokens, k]`.
    pub(super) fn unpad(&self, t: &Tensor) -> TchResult<Tensor> {
        let k = *t.size().last().unwrap_or(&0);
        t.f_reshape([self.batch * self.seq, k])?
            .f_index_select(0, &self.idx)
    }

    /// The real tokens of `[batch, seq]` ids, `[tokens]`.
    pub(super) fn ids(&self, input_ids: &Tensor) -> TchResult<Tensor> {
        input_ids.f_reshape([-1])?.f_index_select(0, &self.idx)
    }
}

impl CausalLm {
    pub(super) fn masks(
        &self,
        b: i64,
        l: i64,
        attention_mask: Option<&Tensor>,
    ) -> TchResult<Masks> {
        let window = self
            .config
            .sliding_windows
            .iter()
            .flatten()
            .copied()
            .min()
            .filter(|&w| w < l);
        if attention_mask.is_none() && window.is_none() {
            return Ok(Masks {
                full: AttentionMask::Causal,
                windowed: AttentionMask::Causal,
                unpadded: None,
            });
        }
        let device = self.device();
        let idx = Tensor::f_arange(l, (Kind::Int64, device))?;
        let q = idx.f_view([l, 1])?;
        let k = idx.f_view([1, l])?;
        let causal = k.f_le_tensor(&q)?;
        let full = match attention_mask {
            Some(m) => {
                let keys = m.f_to_kind(Kind::Bool)?.f_view([b, 1, 1, l])?;
                // A query may always see itself, so padding rows never become fully
                // masked (which would turn their outputs, and gradients, into NaN).
                causal
                    .f_logical_and(&keys)?
                    .f_logical_or(&Tensor::f_eye(l, (Kind::Bool, device))?)?
            }
            None => causal.f_view([1, 1, l, l])?.f_expand([b, 1, l, l], false)?,
        };
        let windowed = match window {
            Some(w) => {
                // Key j is visible from query i when i - j < w (transformers' convention).
                let recent = q.f_sub(&k)?.f_lt(w)?;
                AttentionMask::Explicit(full.f_logical_and(&recent)?)
            }
            None => AttentionMask::Explicit(full.shallow_clone()),
        };
        Ok(Masks {
            full: AttentionMask::Explicit(full),
            windowed,
            unpadded: None,
        })
    }
}
