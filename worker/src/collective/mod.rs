//! Collectives among the ranks of one generation: sum all-reduce (gradients),
//! all-gather (parameter hashes, metric sums), barrier, and abort — which makes every
//! pending and later operation fail at once, so a dead peer never leaves the
//! survivors hanging. `tcp` serves CPU workers and tests; `nccl` serves GPUs.
//! The tensor operations (`*_tensor`) take the data where it lives: NCCL works
//! on the GPU's memory, the tcp ring through the host.

pub mod nccl;
pub mod tcp;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Why a collective operation failed.
#[derive(Debug, thiserror::Error)]
pub enum CollectiveError {
    #[error("collective aborted")]
    Aborted,
    #[error("rank {rank}: {op}: {source}")]
    Io {
        rank: usize,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("rank {rank}: {reason}")]
    Protocol { rank: usize, reason: String },
    #[error("rank {rank}: no peer within {timeout:?}: {reason}")]
    Timeout {
        rank: usize,
        timeout: Duration,
        reason: String,
    },
}

/// Aborts a generation's collective from any thread: sets a flag every operation
/// checks and shuts down the sockets registered with it, so a rank blocked in a
/// receive (or still forming the ring) returns `Aborted` at once. The coordinator
/// side of a worker holds a clone; the collective holds another.
#[derive(Debug, Clone, Default)]
pub struct AbortSignal {
    flag: Arc<AtomicBool>,
    sockets: Arc<Mutex<Vec<std::net::TcpStream>>>,
}

impl AbortSignal {
    pub fn abort(&self) {
        self.flag.store(true, Ordering::SeqCst);
        if let Ok(sockets) = self.sockets.lock() {
            for s in sockets.iter() {
                let _ = s.shutdown(std::net::Shutdown::Both);
            }
        }
    }

    pub fn is_aborted(&self) -> bool {
        self.flag.load(Ordering::SeqCst)
    }

    /// Shuts `socket` down when the signal fires (at once if it already has).
    pub fn register(&self, socket: std::net::TcpStream) {
        if let Ok(mut sockets) = self.sockets.lock() {
            sockets.push(socket);
        }
        if self.is_aborted() {
            self.abort();
        }
    }
}

/// Operations every rank of a generation calls in the same order.
pub trait Collective: Send {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// Element-wise sum across ranks, in place; every rank ends with identical bits.
    fn all_reduce_sum(&mut self, data: &mut [f32]) -> Result<(), CollectiveError>;
    /// Element-wise sum across ranks of this rank's chunk only: afterwards
    /// `data[chunk(n, world, rank)]` holds the sum (ZeRO: a rank's share of the
    /// gradient); the rest of `data` is unspecified. Half the traffic of an
    /// all-reduce.
    fn reduce_scatter_sum(&mut self, data: &mut [f32]) -> Result<(), CollectiveError> {
        self.all_reduce_sum(data)
    }
    /// The inverse: each rank's `data[chunk(n, world, rank)]` reaches every
    /// rank, so `data` ends whole and identical everywhere (ZeRO: the updated
    /// parameters).
    fn all_gather_chunks(&mut self, data: &mut [f32]) -> Result<(), CollectiveError> {
        let (w, r) = (self.world_size(), self.rank());
        let (start, len) = chunk(data.len(), w, r);
        let mine: Vec<u8> = data[start..start + len]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        let blocks = self.all_gather(&mine)?;
        for (owner, block) in blocks.iter().enumerate() {
            let (s, l) = chunk(data.len(), w, owner);
            if block.len() != l * 4 {
                return Err(CollectiveError::Protocol {
                    rank: r,
                    reason: format!("rank {owner} sent {} bytes for {l} values", block.len()),
                });
            }
            for (d, b) in data[s..s + l].iter_mut().zip(block.chunks_exact(4)) {
                *d = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
        Ok(())
    }
    /// Sends `data` to the next rank (`rank + 1`, around the ring) and returns
    /// what the previous rank sent (ZeRO replicas: each rank keeps a copy of
    /// its predecessor's share).
    fn shift(&mut self, data: &[u8]) -> Result<Vec<u8>, CollectiveError> {
        let (w, r) = (self.world_size(), self.rank());
        let mut blocks = self.all_gather(data)?;
        Ok(std::mem::take(&mut blocks[(r + w - 1) % w]))
    }
    /// Every rank's bytes, indexed by rank.
    fn all_gather(&mut self, data: &[u8]) -> Result<Vec<Vec<u8>>, CollectiveError>;
    /// Rank `root`'s bytes, on every rank (`data` is ignored elsewhere).
    fn broadcast(&mut self, data: &[u8], root: usize) -> Result<Vec<u8>, CollectiveError>;
    /// Returns once every rank has called it.
    fn barrier(&mut self) -> Result<(), CollectiveError> {
        self.all_gather(&[]).map(|_| ())
    }
    /// Fails every pending and future operation of this rank; peers blocked on it
    /// fail too (their connections are closed).
    fn abort(&self);
    /// [`Collective::all_reduce_sum`] of a contiguous f32 tensor, in place,
    /// wherever it lives (default: through the host).
    fn all_reduce_tensor(&mut self, t: &mut tch::Tensor) -> Result<(), CollectiveError> {
        let rank = self.rank();
        through_host(rank, t, &mut |d| self.all_reduce_sum(d))
    }
    /// [`Collective::reduce_scatter_sum`] of a contiguous f32 tensor.
    fn reduce_scatter_tensor(&mut self, t: &mut tch::Tensor) -> Result<(), CollectiveError> {
        let rank = self.rank();
        through_host(rank, t, &mut |d| self.reduce_scatter_sum(d))
    }
    /// [`Collective::all_gather_chunks`] of a contiguous f32 tensor.
    fn all_gather_tensor_chunks(&mut self, t: &mut tch::Tensor) -> Result<(), CollectiveError> {
        let rank = self.rank();
        through_host(rank, t, &mut |d| self.all_gather_chunks(d))
    }
}

type HostOp<'a> = dyn FnMut(&mut [f32]) -> Result<(), CollectiveError> + 'a;

/// Runs a host operation on a one-dimensional f32 tensor: copies it to the
/// host, applies `op`, writes the result back in place.
fn through_host(
    rank: usize,
    t: &mut tch::Tensor,
    op: &mut HostOp<'_>,
) -> Result<(), CollectiveError> {
    let torch = |e: tch::TchError| CollectiveError::Protocol {
        rank,
        reason: format!("staging a tensor on the host: {e}"),
    };
    if t.kind() != tch::Kind::Float {
        return Err(CollectiveError::Protocol {
            rank,
            reason: format!("expected an f32 tensor, got {:?}", t.kind()),
        });
    }
    let mut host = Vec::<f32>::try_from(
        &t.f_detach()
            .and_then(|x| x.f_to_device(tch::Device::Cpu))
            .and_then(|x| x.f_reshape([-1]))
            .map_err(torch)?,
    )
    .map_err(torch)?;
    op(&mut host)?;
    let back = tch::Tensor::f_from_slice(&host)
        .and_then(|x| x.f_view(t.size().as_slice()))
        .and_then(|x| x.f_to_device(t.device()))
        .map_err(torch)?;
    t.f_copy_(&back).map_err(torch)?;
    Ok(())
}

/// The collective of a world of one: every operation returns at once.
#[derive(Debug, Default)]
pub struct Solo;

impl Collective for Solo {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn all_reduce_sum(&mut self, _data: &mut [f32]) -> Result<(), CollectiveError> {
        Ok(())
    }
    fn all_gather(&mut self, data: &[u8]) -> Result<Vec<Vec<u8>>, CollectiveError> {
        Ok(vec![data.to_vec()])
    }
    fn broadcast(&mut self, data: &[u8], _root: usize) -> Result<Vec<u8>, CollectiveError> {
        Ok(data.to_vec())
    }
    fn abort(&self) {}
}

/// Makes every rank's tensors equal to rank `root`'s, in order (same names and
/// shapes on every rank): how a joining worker receives parameters and optimizer
/// state from the generation's rank 0.
pub fn broadcast_tensors(
    tensors: &[tch::Tensor],
    root: usize,
    collective: &mut dyn Collective,
) -> crate::Result<()> {
    use crate::error::TorchContext;
    if collective.world_size() == 1 {
        return Ok(());
    }
    let _guard = tch::no_grad_guard();
    for t in tensors {
        let host = t
            .f_detach()
            .and_then(|x| x.f_to_device(tch::Device::Cpu))
            .and_then(|x| x.f_contiguous())
            .op("broadcast: read")?;
        let n = host.numel();
        let kind = host.kind();
        let mut bytes = vec![0u8; n * kind.elt_size_in_bytes()];
        if collective.rank() == root {
            host.f_copy_data_u8(&mut bytes, n).op("broadcast: read")?;
        }
        let got = collective.broadcast(&bytes, root)?;
        if got.len() != bytes.len() {
            return Err(CollectiveError::Protocol {
                rank: collective.rank(),
                reason: format!(
                    "broadcast: received {} bytes for a tensor of {}",
                    got.len(),
                    bytes.len()
                ),
            }
            .into());
        }
        if collective.rank() != root {
            let src = tch::Tensor::f_from_data_size(&got, &host.size(), kind)
                .and_then(|x| x.f_to_device(t.device()))
                .op("broadcast: write")?;
            t.shallow_clone().f_copy_(&src).op("broadcast: write")?;
        }
    }
    Ok(())
}

/// Elements per gradient bucket: large enough to amortise a ring pass, small enough
/// to bound the staging copy.
pub const BUCKET_ELEMENTS: usize = 4 << 20;

/// Sums the gradients of `params` across ranks, in buckets of flattened f32
/// on the parameters' device (NCCL reduces them there; the tcp ring stages
/// them through the host). A rank with an empty slice of the batch
/// contributes zeros.
pub fn all_reduce_gradients(
    params: &[tch::Tensor],
    collective: &mut dyn Collective,
) -> crate::Result<()> {
    if collective.world_size() == 1 {
        return Ok(());
    }
    ensure_gradients(params)?;
    let _guard = tch::no_grad_guard();
    for bucket in buckets(params) {
        let ps = &params[bucket];
        let mut flat = flat_gradient_tensor(ps)?;
        collective.all_reduce_tensor(&mut flat)?;
        write_gradient_range(ps, &flat, 0, flat.numel())?;
    }
    Ok(())
}

/// The gradients of `params` (all defined), flattened into one f32 tensor on
/// their device.
pub fn flat_gradient_tensor(params: &[tch::Tensor]) -> crate::Result<tch::Tensor> {
    use crate::error::TorchContext;
    let parts = params
        .iter()
        .map(|p| p.grad().f_to_kind(tch::Kind::Float)?.f_reshape([-1]))
        .collect::<std::result::Result<Vec<_>, _>>()
        .op("gradient bucket")?;
    tch::Tensor::f_cat(&parts, 0).op("gradient bucket")
}

/// Writes `flat[start..start + len]` (a bucket's flattened gradients, on any
/// device) into those elements of the gradients of `params`.
pub fn write_gradient_range(
    params: &[tch::Tensor],
    flat: &tch::Tensor,
    start: usize,
    len: usize,
) -> crate::Result<()> {
    use crate::error::TorchContext;
    let piece = flat
        .f_narrow(0, start as i64, len as i64)
        .op("gradient bucket")?;
    write_gradient_chunk(params, &piece, start)
}

/// Writes `piece`, the elements `start..start + piece.numel()` of a bucket's
/// flattened gradients, into the gradients of `params` (the bucket's).
pub fn write_gradient_chunk(
    params: &[tch::Tensor],
    piece: &tch::Tensor,
    start: usize,
) -> crate::Result<()> {
    use crate::error::TorchContext;
    let len = piece.numel();
    let mut at = 0usize;
    for p in params {
        let size = p.numel();
        let (from, to) = (start.max(at), (start + len).min(at + size));
        if from < to {
            let src = piece
                .f_narrow(0, (from - start) as i64, (to - from) as i64)
                .and_then(|t| t.f_to_device(p.device()))
                .op("gradient bucket")?;
            p.grad()
                .f_view([-1])
                .and_then(|g| g.f_narrow(0, (from - at) as i64, (to - from) as i64))
                .and_then(|mut g| g.f_copy_(&src))
                .op("gradient bucket")?;
        }
        at += size;
    }
    Ok(())
}

/// Groups `params` (in order) into buckets of whole parameters of at most
/// [`BUCKET_ELEMENTS`] elements (a larger parameter is a bucket of its own):
/// the unit of every gradient and parameter exchange, and of ZeRO's partition.
pub fn buckets(params: &[tch::Tensor]) -> Vec<std::ops::Range<usize>> {
    buckets_by(params, &|_| None)
}

/// [`buckets`] that also starts a new bucket wherever `group` (of a
/// parameter's index) changes, e.g. at each decoder layer.
pub fn buckets_by(
    params: &[tch::Tensor],
    group: &dyn Fn(usize) -> Option<usize>,
) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let mut start = 0;
    while start < params.len() {
        let mut end = start;
        let mut elements = 0;
        while end < params.len()
            && (end == start
                || (elements + params[end].numel() <= BUCKET_ELEMENTS
                    && group(end) == group(start)))
        {
            elements += params[end].numel();
            end += 1;
        }
        out.push(start..end);
        start = end;
    }
    out
}

/// Gives every parameter a gradient (zeros where a rank had nothing to
/// back-propagate, its slice of the batch being empty), so every rank
/// contributes to every exchange.
pub fn ensure_gradients(params: &[tch::Tensor]) -> crate::Result<()> {
    use crate::error::TorchContext;
    if params.iter().any(|p| !p.grad().defined()) {
        // This rank had nothing to backpropagate (its slice of the batch is empty):
        // give every parameter a zero gradient through a no-op backward.
        let mut touch = tch::Tensor::f_zeros([], (tch::Kind::Float, params[0].device()))
            .op("zero gradients")?;
        for p in params {
            touch = touch
                .f_add(
                    &p.f_sum(tch::Kind::Float)
                        .and_then(|s| s.f_mul_scalar(0.0))
                        .op("zero gradients")?,
                )
                .op("zero gradients")?;
        }
        touch.f_backward().op("zero gradients")?;
    }
    Ok(())
}

/// Splits `n` elements into `parts` contiguous chunks whose sizes differ by at most
/// one: `(start, len)` of chunk `i`.
pub fn chunk(n: usize, parts: usize, i: usize) -> (usize, usize) {
    dpo_data::batches::rank_range(n, parts, i)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_cover_exactly_once() {
        for n in [0, 1, 5, 7, 100] {
            for parts in 1..5 {
                let mut next = 0;
                for i in 0..parts {
                    let (s, l) = chunk(n, parts, i);
                    assert_eq!(s, next);
                    next += l;
                }
                assert_eq!(next, n);
            }
        }
    }
}
