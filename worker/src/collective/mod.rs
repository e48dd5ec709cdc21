//! Collectives among the ranks of one generation: sum all-reduce (gradients),
//! all-gather (parameter hashes, metric sums), barrier, and abort — which makes every
//! pending and later operation fail at once, so a dead peer never leaves the
//! survivors hanging. `tcp` serves CPU workers and tests; `nccl` (GPUs) follows.

pub mod tcp;

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

/// Operations every rank of a generation calls in the same order.
pub trait Collective: Send {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// Element-wise sum across ranks, in place; every rank ends with identical bits.
    fn all_reduce_sum(&mut self, data: &mut [f32]) -> Result<(), CollectiveError>;
    /// Every rank's bytes, indexed by rank.
    fn all_gather(&mut self, data: &[u8]) -> Result<Vec<Vec<u8>>, CollectiveError>;
    /// Returns once every rank has called it.
    fn barrier(&mut self) -> Result<(), CollectiveError> {
        self.all_gather(&[]).map(|_| ())
    }
    /// Fails every pending and future operation of this rank; peers blocked on it
    /// fail too (their connections are closed).
    fn abort(&self);
}

/// Splits `n` elements into `parts` contiguous chunks whose sizes differ by at most
/// one: `(start, len)` of chunk `i`.
pub fn chunk(n: usize, parts: usize, i: usize) -> (usize, usize) {
    let base = n / parts;
    let extra = n % parts;
    let start = i * base + i.min(extra);
    (start, base + usize::from(i < extra))
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
