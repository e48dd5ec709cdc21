//! DeBERTa's disentangled attention (He et al., "DeBERTa: Decoding-enhanced
//! BERT with Disentangled Attention", and v3's shared keys): a score of
//! query i for key j is the content term `q_i · k_j` plus a content-to-position
//! term `q_i · K_r[δ(i, j)]` and a position-to-content term
//! `k_j · Q_r[δ(j, i)]`, where `K_r`, `Q_r` are the layer's projections of a
//! table of relative-position embeddings every layer shares and `δ` the
//! relative distance, clamped to the table (and, with `position_buckets`,
//! log-bucketed beyond half of them). All three are divided by
//! `√(d · terms)`.
//!
//! Written out as transformers' `DisentangledSelfAttention` computes it, so
//! the numbers agree to rounding: the same bucket arithmetic in f32, the same
//! order of the sums, masked scores at the dtype's minimum (a padding query,
//! whose keys are all masked, attends evenly).

use tch::{Device, Kind, Tensor};

use super::config::Relative;
use crate::model::layers::{Linear, TchResult};

/// The relative positions of a `T`-token sequence, as the rows of the table
/// each score reads, and the table itself.
#[derive(Debug)]
pub(super) struct Positions {
    /// `[T, T]`: for query i and key j, the row of `δ(i, j) = i − j`
    /// (bucketed, shifted by the span, clamped).
    c2p: Tensor,
    /// `[T, T]`: for key j (rows) and query i (columns), the row of `δ(j, i)`.
    p2c: Tensor,
    /// `[2·span, hidden]`: the relative-position embeddings, normalised when
    /// the config says; a leaf of its own when the layers run as a stack.
    pub(super) table: Tensor,
}

impl Positions {
    pub(super) fn new(r: &Relative, t: i64, table: Tensor, device: Device) -> TchResult<Self> {
        let ids = Tensor::f_arange(t, (Kind::Int64, device))?;
        let mut delta = ids.f_unsqueeze(1)?.f_sub(&ids.f_unsqueeze(0)?)?;
        if let Some((buckets, max_position)) = r.buckets {
            delta = log_buckets(&delta, buckets, max_position)?;
        }
        let last = 2 * r.span - 1;
        Ok(Positions {
            c2p: delta.f_add_scalar(r.span)?.f_clamp(0, last)?,
            p2c: delta.f_neg()?.f_add_scalar(r.span)?.f_clamp(0, last)?,
            table,
        })
    }
}

/// DeBERTa's `make_log_bucket_position`: distances under half the buckets
/// kept, farther ones on a log scale up to `max_position`, computed in f32
/// as transformers does (a bucket is the ceiling of a float).
fn log_buckets(delta: &Tensor, buckets: i64, max_position: i64) -> TchResult<Tensor> {
    let mid = buckets / 2;
    let near = delta.f_lt(mid)?.f_logical_and(&delta.f_gt(-mid)?)?;
    let distance = delta.f_abs()?.f_masked_fill(&near, mid - 1)?;
    // transformers: torch.log(torch.tensor((max_position - 1) / mid)), an f32.
    let base = Tensor::from(((max_position - 1) as f64 / mid as f64) as f32)
        .f_log()?
        .f_to_device(delta.device())?;
    let far = distance
        .f_to_kind(Kind::Float)?
        .f_div_scalar(mid)?
        .f_log()?
        .f_div(&base)?
        .f_mul_scalar(mid - 1)?
        .f_ceil()?
        .f_add_scalar(mid)?
        .f_mul(&delta.f_sign()?)?;
    delta
        .f_to_kind(Kind::Float)?
        .f_where_self(&distance.f_le(mid)?, &far)?
        .f_to_kind(Kind::Int64)
}

/// The projections a layer turns the table with: its own `pos_query_proj`
/// and `pos_key_proj`, or (`share_att_key`) its query and key projections.
pub(super) struct Projections<'a> {
    pub query: &'a Linear,
    pub key: &'a Linear,
}

/// The smallest finite value of `kind` (a masked score).
fn lowest(kind: Kind) -> f64 {
    match kind {
        Kind::Half => -65504.0,
        Kind::BFloat16 => -3.389_531_389_251_535_5e38,
        Kind::Double => f64::MIN,
        _ => f32::MIN as f64,
    }
}

/// The attention's context `[B, heads, T, d]` for `q`, `k`, `v`
/// `[B, heads, T, d]` under `mask` `[B, 1, T, T]`; `dropout`: the attention
/// probabilities' and the table's (DeBERTa's `pos_dropout`, the hidden
/// dropout), both zero outside training.
pub(super) fn attention(
    r: &Relative,
    positions: &Positions,
    projections: Projections<'_>,
    (q, k, v): (&Tensor, &Tensor, &Tensor),
    mask: &Tensor,
    (p_attention, p_table): (f64, f64),
) -> TchResult<Tensor> {
    let (b, heads, t, d) = q.size4()?;
    // transformers: torch.sqrt(torch.tensor(d, dtype=torch.float) * factor).
    let scale = f64::from(((d * r.scale_factor()) as f32).sqrt());
    let mut scores = q.f_matmul(&k.f_transpose(-1, -2)?.f_div_scalar(scale)?)?;
    if r.c2p || r.p2c {
        let mut table = positions.table.shallow_clone();
        if p_table > 0.0 {
            table = table.f_dropout(p_table, true)?;
        }
        let rows = table.size()[0];
        // [2·span, heads·d] → [1, heads, 2·span, d].
        let per_head = |y: Tensor| -> TchResult<Tensor> {
            y.f_view([rows, heads, d])?
                .f_permute([1, 0, 2])?
                .f_unsqueeze(0)
        };
        let mut bias: Option<Tensor> = None;
        if r.c2p {
            let pos_key = per_head(projections.key.forward(&table)?)?;
            let c2p = q
                .f_matmul(&pos_key.f_transpose(-1, -2)?)?
                .f_gather(-1, &positions.c2p.f_expand([b, heads, t, t], false)?, false)?
                .f_div_scalar(scale)?;
            bias = Some(c2p);
        }
        if r.p2c {
            let pos_query = per_head(projections.query.forward(&table)?)?;
            let p2c = k
                .f_matmul(&pos_query.f_transpose(-1, -2)?)?
                .f_gather(-1, &positions.p2c.f_expand([b, heads, t, t], false)?, false)?
                .f_transpose(-1, -2)?
                .f_div_scalar(scale)?;
            bias = Some(match bias {
                Some(c2p) => c2p.f_add(&p2c)?,
                None => p2c,
            });
        }
        if let Some(bias) = bias {
            scores = scores.f_add(&bias)?;
        }
    }
    let scores = scores.f_masked_fill(&mask.f_logical_not()?, lowest(scores.kind()))?;
    let mut probs = scores.f_softmax(-1, scores.kind())?;
    if p_attention > 0.0 {
        probs = probs.f_dropout(p_attention, true)?;
    }
    probs.f_matmul(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn near_distances_are_kept_and_far_ones_share_log_buckets() {
        // DeBERTa-v3's settings: 256 buckets, 512 positions; the values are
        // transformers' make_log_bucket_position on these distances.
        let delta = Tensor::from_slice(&[0i64, 1, -1, 127, -127, 128, 200, -300, 511]);
        let got =
            Vec::<i64>::try_from(log_buckets(&delta, 256, 512).expect("buckets")).expect("ints");
        assert_eq!(got, vec![0, 1, -1, 127, -127, 128, 169, -207, 255]);
    }
}
