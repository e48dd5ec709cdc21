//! ZeRO stages 1 and 2: the optimizer state (and, stage 2, the gradients)
//! partitioned across the ranks of a world.
//!
//! The parameters, in the optimizer's order, fall into buckets of at most
//! [`crate::collective::BUCKET_ELEMENTS`] elements that never mix two decoder layers; rank `r`
//! of `W` owns chunk `r` of every bucket's flattened elements (the chunks
//! differ in size by at most one element). A rank keeps AdamW moments and f32
//! master weights for what it owns only — `(4 + 4 + 4)/W` bytes per parameter
//! instead of 12 — while every rank still holds the whole model.
//!
//! Stage 1, a step: after the backward (every rank holding the whole
//! gradient), the gradients are reduce-scattered bucket by bucket (each rank
//! receives the global sum of its chunk — half an all-reduce's traffic); the
//! gradient norm is the square root of the ranks' sums of squares over their
//! own chunks, added in rank order, so clipping is the global clipping; each
//! rank updates its chunks; the updated parameters are all-gathered bucket by
//! bucket. Owning whole chunks of every bucket (rather than one contiguous
//! range of the flattened parameters) keeps every ring step of every bucket
//! balanced.
//!
//! Stage 2 reduces each decoder layer's buckets as soon as that layer's
//! backward is done, into f32 gradient shards the optimizer holds
//! ([`Partition::reduce_scatter_into`], `crate::train`'s `stage2`): the whole
//! gradient of the layers never exists, only one layer's at a time.

use std::ops::Range;

use tch::Tensor;

use crate::collective::{
    Collective, chunk, ensure_gradients, flat_gradient_tensor, write_gradient_chunk,
    write_gradient_range,
};
use crate::error::{Result, TorchContext};

/// Receives a rank's summed gradient chunks: `(parameter index, replica,
/// offset, values)` ([`Partition::reduce_scatter_into`]).
pub type ShardSink<'a> = dyn FnMut(usize, bool, i64, &[f32]) -> Result<()> + 'a;

/// Which elements of which parameters this rank owns.
#[derive(Debug, Clone)]
pub struct Partition {
    world: usize,
    rank: usize,
    buckets: Vec<Range<usize>>,
    /// `train.zero_replicas = 2`: each rank also keeps, and updates alike, a
    /// copy of its predecessor's share (rank `r − 1`, around the ring).
    replicas: bool,
}

impl Partition {
    /// The partition of `params` (the optimizer's order, named `names`) for
    /// rank `rank` of `world`, with a replica of the predecessor's share when
    /// `replicas`. No bucket holds parameters of two decoder layers, so a
    /// layer's gradients can be reduced as soon as its backward is done
    /// (stage 2, [`Partition::reduce_scatter_into`]).
    pub fn new(
        params: &[Tensor],
        names: &[String],
        world: usize,
        rank: usize,
        replicas: bool,
    ) -> Self {
        Partition {
            world,
            rank,
            buckets: layer_buckets(params, names),
            replicas: replicas && world > 1,
        }
    }

    /// Whether this rank keeps a replica of its predecessor's share.
    pub fn replicas(&self) -> bool {
        self.replicas
    }

    /// The rank whose share this rank replicates.
    fn buddy(&self) -> usize {
        (self.rank + self.world - 1) % self.world
    }

    /// The pieces of the replica this rank keeps (none without replicas).
    pub fn replica_pieces(&self, params: &[Tensor]) -> Vec<(usize, i64, i64)> {
        if self.replicas {
            self.owners_pieces(params, self.buddy())
        } else {
            Vec::new()
        }
    }

    pub fn world(&self) -> usize {
        self.world
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    /// `(parameter index, offset, len)` of every piece this rank owns, in
    /// parameter order, at most one per parameter.
    pub fn pieces(&self, params: &[Tensor]) -> Vec<(usize, i64, i64)> {
        self.owners_pieces(params, self.rank)
    }

    /// The pieces `rank` owns.
    pub fn owners_pieces(&self, params: &[Tensor], rank: usize) -> Vec<(usize, i64, i64)> {
        let mut out = Vec::new();
        for bucket in &self.buckets {
            let n: usize = params[bucket.clone()].iter().map(|p| p.numel()).sum();
            let (start, len) = chunk(n, self.world, rank);
            let end = start + len;
            let mut at = 0usize;
            for i in bucket.clone() {
                let size = params[i].numel();
                let (from, to) = (start.max(at), end.min(at + size));
                if from < to {
                    out.push((i, (from - at) as i64, (to - from) as i64));
                }
                at += size;
            }
        }
        out
    }

    /// Sums every rank's gradients, keeping on each rank the sum of its own
    /// chunks (written into those elements of the gradients; the rest of
    /// each gradient is left as this rank's own, and is not read).
    pub fn reduce_scatter_gradients(
        &self,
        params: &[Tensor],
        collective: &mut dyn Collective,
    ) -> Result<()> {
        ensure_gradients(params)?;
        let _guard = tch::no_grad_guard();
        for bucket in &self.buckets {
            let ps = &params[bucket.clone()];
            let mut flat = flat_gradient_tensor(ps)?;
            collective.reduce_scatter_tensor(&mut flat)?;
            let n = flat.numel();
            let (start, len) = chunk(n, self.world, self.rank);
            if self.replicas {
                // The predecessor's summed chunk, for the replica of its share.
                let (bs, bl) = chunk(n, self.world, self.buddy());
                let mine = host_range(&flat, start, len)?;
                let got = self.exchange_replica(collective, &mine, bl)?;
                let got = Tensor::f_from_slice(&got).op("gradient chunk")?;
                write_gradient_chunk(ps, &got, bs)?;
            }
            write_gradient_range(ps, &flat, start, len)?;
        }
        Ok(())
    }

    /// ZeRO stage 2: reduces the gradients `grads` (`(parameter index,
    /// gradient)`; an undefined gradient counts as zeros) of every bucket
    /// whose parameters they cover — a decoder layer's, as soon as its
    /// backward is done — and hands this rank's summed chunk (and, with
    /// replicas, its predecessor's) to `add` as `(parameter index, replica,
    /// offset, values)`; the full-size gradients can then be dropped. Every
    /// rank must reduce the same buckets in the same order.
    pub fn reduce_scatter_into(
        &self,
        params: &[Tensor],
        grads: &[(usize, Tensor)],
        collective: &mut dyn Collective,
        add: &mut ShardSink<'_>,
    ) -> Result<()> {
        let _guard = tch::no_grad_guard();
        let covered = |i: usize| grads.iter().any(|(j, _)| *j == i);
        for bucket in self.buckets.iter().filter(|b| covered(b.start)) {
            let n: usize = params[bucket.clone()].iter().map(|p| p.numel()).sum();
            let mut parts = Vec::with_capacity(bucket.len());
            for i in bucket.clone() {
                let g = grads.iter().find(|(j, _)| *j == i).map(|(_, g)| g);
                parts.push(match g.filter(|g| g.defined()) {
                    Some(g) => g
                        .f_to_kind(tch::Kind::Float)
                        .and_then(|g| g.f_reshape([-1]))
                        .op("gradient bucket")?,
                    None => Tensor::f_zeros(
                        [params[i].numel() as i64],
                        (tch::Kind::Float, params[i].device()),
                    )
                    .op("gradient bucket")?,
                });
            }
            let mut flat = Tensor::f_cat(&parts, 0).op("gradient bucket")?;
            drop(parts);
            collective.reduce_scatter_tensor(&mut flat)?;
            let (start, len) = chunk(n, self.world, self.rank);
            let mine = host_range(&flat, start, len)?;
            drop(flat);
            let mut targets = vec![(false, start, len)];
            let mut replica_values = Vec::new();
            if self.replicas {
                let (bs, bl) = chunk(n, self.world, self.buddy());
                replica_values = self.exchange_replica(collective, &mine, bl)?;
                targets.push((true, bs, bl));
            }
            for (replica, start, len) in targets {
                let values = if replica { &replica_values } else { &mine };
                let mut at = 0usize;
                for i in bucket.clone() {
                    let size = params[i].numel();
                    let (from, to) = (start.max(at), (start + len).min(at + size));
                    if from < to {
                        add(
                            i,
                            replica,
                            (from - at) as i64,
                            &values[from - start..to - start],
                        )?;
                    }
                    at += size;
                }
            }
        }
        Ok(())
    }

    /// Sends this rank's summed chunk to its successor and returns the
    /// predecessor's (`expect` values), for the replica of its share.
    fn exchange_replica(
        &self,
        collective: &mut dyn Collective,
        mine: &[f32],
        expect: usize,
    ) -> Result<Vec<f32>> {
        let bytes: Vec<u8> = mine.iter().flat_map(|x| x.to_le_bytes()).collect();
        let got = collective.shift(&bytes)?;
        if got.len() != expect * 4 {
            return Err(crate::collective::CollectiveError::Protocol {
                rank: self.rank,
                reason: format!("replica chunk of {} bytes for {expect} values", got.len()),
            }
            .into());
        }
        Ok(got
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect())
    }

    /// Sends each rank's updated chunks to every rank: the parameters end
    /// whole and identical everywhere.
    pub fn all_gather_parameters(
        &self,
        params: &[Tensor],
        collective: &mut dyn Collective,
    ) -> Result<()> {
        let _guard = tch::no_grad_guard();
        for bucket in &self.buckets {
            let ps = &params[bucket.clone()];
            let parts = ps
                .iter()
                .map(|p| p.f_detach()?.f_to_kind(tch::Kind::Float)?.f_reshape([-1]))
                .collect::<std::result::Result<Vec<_>, _>>()
                .op("parameter bucket")?;
            let mut flat = Tensor::f_cat(&parts, 0).op("parameter bucket")?;
            drop(parts);
            collective.all_gather_tensor_chunks(&mut flat)?;
            write_parameter_tensor(ps, &flat)?;
        }
        Ok(())
    }

    /// Makes the parameters whole from pieces held by different ranks: each
    /// rank passes the pieces (`(parameter index, offset, len)`) whose current
    /// values it contributes — every element by exactly one rank — and every
    /// rank ends with all of them. Bucket by bucket, through `collective`
    /// (any world: the pieces need not be this partition's world's).
    pub fn assemble_parameters(
        &self,
        params: &[Tensor],
        pieces: &[(usize, i64, i64)],
        collective: &mut dyn Collective,
    ) -> Result<()> {
        let _guard = tch::no_grad_guard();
        for bucket in &self.buckets {
            let ps = &params[bucket.clone()];
            let n: usize = ps.iter().map(|p| p.numel()).sum();
            let mut flat = vec![0.0f32; n];
            let mut at = 0usize;
            for i in bucket.clone() {
                for &(_, offset, len) in pieces.iter().filter(|(j, _, _)| *j == i) {
                    let values = Vec::<f32>::try_from(
                        &params[i]
                            .f_detach()
                            .and_then(|t| t.f_reshape([-1]))
                            .and_then(|t| t.f_narrow(0, offset, len))
                            .and_then(|t| t.f_to_kind(tch::Kind::Float))
                            .and_then(|t| t.f_to_device(tch::Device::Cpu))
                            .op("parameter piece")?,
                    )
                    .op("parameter piece")?;
                    let from = at + offset as usize;
                    flat[from..from + values.len()].copy_from_slice(&values);
                }
                at += params[i].numel();
            }
            collective.all_reduce_sum(&mut flat)?;
            write_parameters(ps, &flat)?;
        }
        Ok(())
    }

    /// Every rank's `x`, added in rank order (so every rank gets the same bits).
    pub fn sum_across(&self, collective: &mut dyn Collective, x: f64) -> Result<f64> {
        let all = collective.all_gather(&x.to_le_bytes())?;
        let mut total = 0.0f64;
        for block in all {
            let mut b = [0u8; 8];
            if block.len() == 8 {
                b.copy_from_slice(&block);
            }
            total += f64::from_le_bytes(b);
        }
        Ok(total)
    }
}

/// A rank's state under a new partition: its own share and, with replicas,
/// its copy of its predecessor's; `(kind, parameter index, values)`.
#[derive(Debug, Default)]
pub struct Repartitioned {
    pub own: Vec<(&'static str, usize, Tensor)>,
    pub replica: Vec<(&'static str, usize, Tensor)>,
}

impl Partition {
    /// This rank's share of the optimizer state under this (new) partition,
    /// from the shares the ranks held under the old one: each rank passes the
    /// pieces it held (`old`, [`crate::optim::Optimizer::piece_states`]; none
    /// if it holds no share, or another rank contributes the same one), and
    /// every element, contributed by exactly one rank, reaches its new owner.
    /// Bucket by bucket and kind by kind (`exp_avg`, `exp_avg_sq` when
    /// `moments`; `master` for half-precision parameters): at most one bucket's
    /// state is staged at a time. Returns the new pieces' state, by kind, in
    /// [`Partition::pieces`] order.
    pub fn repartition(
        &self,
        params: &[Tensor],
        old: &[(&'static str, usize, i64, Tensor)],
        moments: bool,
        collective: &mut dyn Collective,
    ) -> Result<Repartitioned> {
        let mut out = Repartitioned::default();
        for bucket in &self.buckets {
            let ps = &params[bucket.clone()];
            let n: usize = ps.iter().map(|p| p.numel()).sum();
            let half = ps.iter().any(|p| p.kind() != tch::Kind::Float);
            let kinds: Vec<&'static str> = [
                ("exp_avg", moments),
                ("exp_avg_sq", moments),
                ("master", half),
            ]
            .iter()
            .filter(|(_, on)| *on)
            .map(|(k, _)| *k)
            .collect();
            let chunks = [(false, self.rank)]
                .into_iter()
                .chain(self.replicas.then_some((true, self.buddy())));
            let chunks: Vec<(bool, (usize, usize))> = chunks
                .map(|(replica, r)| (replica, chunk(n, self.world, r)))
                .collect();
            for kind in kinds {
                let mut flat = bucket_of(params, bucket, old, kind)?;
                collective.all_reduce_sum(&mut flat)?;
                for &(replica, (start, len)) in &chunks {
                    let mut at = 0usize;
                    for (i, p) in bucket.clone().zip(ps) {
                        let size = p.numel();
                        let (from, to) = (start.max(at), (start + len).min(at + size));
                        if from < to && (kind != "master" || p.kind() != tch::Kind::Float) {
                            let piece = Tensor::f_from_slice(&flat[from..to])
                                .and_then(|t| t.f_to_device(p.device()))
                                .op("optimizer state")?;
                            let dest = if replica {
                                &mut out.replica
                            } else {
                                &mut out.own
                            };
                            dest.push((kind, i, piece));
                        }
                        at += size;
                    }
                }
            }
        }
        Ok(out)
    }
}

/// The layer of a stack (a decoder's, an encoder's) a parameter belongs to,
/// from its name: the number after its first `layers` or `layer` component
/// (`model.layers.N.…`, `bert.encoder.layer.N.…`); `None` for the
/// embeddings, final norm, pooler and heads.
pub fn layer_of(name: &str) -> Option<usize> {
    let mut parts = name.split('.');
    while let Some(part) = parts.next() {
        if part == "layers" || part == "layer" {
            return parts.next()?.parse().ok();
        }
    }
    None
}

/// Consecutive parameters in buckets of at most [`crate::collective::BUCKET_ELEMENTS`] elements
/// (a larger parameter is a bucket of its own), never two decoder layers'
/// parameters in one bucket.
fn layer_buckets(params: &[Tensor], names: &[String]) -> Vec<Range<usize>> {
    crate::collective::buckets_by(params, &|i| names.get(i).and_then(|n| layer_of(n)))
}

/// A bucket's flattened optimizer state of `kind`, holding the values of
/// `pieces` (`(kind, parameter index, offset, values)`) and zeros elsewhere.
fn bucket_of(
    params: &[Tensor],
    bucket: &Range<usize>,
    pieces: &[(&'static str, usize, i64, Tensor)],
    kind: &str,
) -> Result<Vec<f32>> {
    let n: usize = params[bucket.clone()].iter().map(|p| p.numel()).sum();
    let mut flat = vec![0.0f32; n];
    let mut at = 0usize;
    for i in bucket.clone() {
        for (_, _, offset, t) in pieces
            .iter()
            .filter(|(k, index, _, _)| *k == kind && *index == i)
        {
            let values = Vec::<f32>::try_from(
                &t.f_to_kind(tch::Kind::Float)
                    .and_then(|t| t.f_to_device(tch::Device::Cpu))
                    .op("optimizer state")?,
            )
            .op("optimizer state")?;
            let from = at + *offset as usize;
            flat[from..from + values.len()].copy_from_slice(&values);
        }
        at += params[i].numel();
    }
    Ok(flat)
}

/// Writes a bucket's flattened values (a tensor on any device) into its
/// parameters `ps`, whole.
fn write_parameter_tensor(ps: &[Tensor], flat: &Tensor) -> Result<()> {
    let mut at = 0i64;
    for p in ps {
        let size = p.numel() as i64;
        let whole = flat
            .f_narrow(0, at, size)
            .and_then(|t| t.f_view(p.size().as_slice()))
            .and_then(|t| t.f_to_kind(p.kind()))
            .and_then(|t| t.f_to_device(p.device()))
            .op("parameter bucket")?;
        p.shallow_clone().f_copy_(&whole).op("parameter bucket")?;
        at += size;
    }
    Ok(())
}

/// Writes a bucket's flattened values into its parameters `ps`, whole.
fn write_parameters(ps: &[Tensor], flat: &[f32]) -> Result<()> {
    let flat = Tensor::f_from_slice(flat).op("parameter bucket")?;
    write_parameter_tensor(ps, &flat)
}

/// `flat[start..start + len]`, on the host.
fn host_range(flat: &Tensor, start: usize, len: usize) -> Result<Vec<f32>> {
    Vec::<f32>::try_from(
        &flat
            .f_narrow(0, start as i64, len as i64)
            .and_then(|t| t.f_to_kind(tch::Kind::Float))
            .and_then(|t| t.f_to_device(tch::Device::Cpu))
            .op("gradient chunk")?,
    )
    .op("gradient chunk")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ranks_pieces_cover_every_element_once() {
        let params: Vec<Tensor> = [7i64, 1, 30, 2, 11]
            .iter()
            .map(|&n| Tensor::zeros([n], (tch::Kind::Float, tch::Device::Cpu)))
            .collect();
        let names: Vec<String> = [
            "lm_head.weight",
            "model.layers.0.a",
            "model.layers.0.b",
            "model.layers.1.a",
            "model.norm.weight",
        ]
        .map(String::from)
        .to_vec();
        for world in 1..5 {
            let mut seen: Vec<Vec<u32>> = params.iter().map(|p| vec![0; p.numel()]).collect();
            for rank in 0..world {
                let part = Partition::new(&params, &names, world, rank, false);
                let pieces = part.pieces(&params);
                let mut indices: Vec<usize> = pieces.iter().map(|p| p.0).collect();
                indices.dedup();
                assert_eq!(indices.len(), pieces.len(), "one piece per parameter");
                for (i, offset, len) in pieces {
                    for e in offset..offset + len {
                        seen[i][e as usize] += 1;
                    }
                }
            }
            assert!(seen.iter().flatten().all(|&c| c == 1), "world {world}");
        }
    }

    #[test]
    fn no_bucket_mixes_two_layers() {
        let params: Vec<Tensor> = [3i64, 4, 5, 6, 2]
            .iter()
            .map(|&n| Tensor::zeros([n], (tch::Kind::Float, tch::Device::Cpu)))
            .collect();
        let names: Vec<String> = [
            "model.embed_tokens.weight",
            "model.layers.0.mlp.up_proj.weight",
            "model.layers.0.self_attn.q_proj.weight",
            "model.layers.10.mlp.up_proj.weight",
            "model.norm.weight",
        ]
        .map(String::from)
        .to_vec();
        assert_eq!(layer_of(&names[3]), Some(10));
        assert_eq!(layer_of(&names[0]), None);
        assert_eq!(layer_buckets(&params, &names), vec![0..1, 1..3, 3..4, 4..5]);
    }
}
