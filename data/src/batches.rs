//! Which examples each optimizer step consumes, and which share of them each rank
//! trains. The global batch of step `s` is a function of the run alone (seed,
//! shuffle, dataset size, batch size) — never of the number of workers — so any
//! world, or a world that changes between steps, trains the same sequence of
//! batches. The coordinator serves batches by this plan and the standalone
//! trainer follows the same plan.

use crate::examples::{Example, Normalizer};
use crate::rng::epoch_order;

/// Splits `n` elements into `parts` contiguous chunks whose sizes differ by at most
/// one: `(start, len)` of chunk `i` (the first `n % parts` chunks get one more).
pub fn rank_range(n: usize, parts: usize, i: usize) -> (usize, usize) {
    let parts = parts.max(1);
    let base = n / parts;
    let extra = n % parts;
    let start = i * base + i.min(extra);
    (start, base + usize::from(i < extra))
}

/// The per-epoch order of a split and the global batches cut from it.
#[derive(Debug, Clone)]
pub struct EpochPlan {
    len: usize,
    global_batch: usize,
    seed: u64,
    shuffle: bool,
    cached: Option<(u64, Vec<usize>)>,
}

impl EpochPlan {
    /// `None` when one global batch needs more examples than there are.
    pub fn new(len: usize, global_batch: usize, seed: u64, shuffle: bool) -> Option<Self> {
        (global_batch > 0 && len >= global_batch).then_some(EpochPlan {
            len,
            global_batch,
            seed,
            shuffle,
            cached: None,
        })
    }

    /// Optimizer steps in one pass (a last partial batch is dropped).
    pub fn steps_per_epoch(&self) -> u64 {
        (self.len / self.global_batch) as u64
    }

    /// The epoch of step `step` (0-based) and the position of its batch in that
    /// epoch's order.
    pub fn position(&self, step: u64) -> (u64, usize) {
        let spe = self.steps_per_epoch().max(1);
        (step / spe, ((step % spe) as usize) * self.global_batch)
    }

    /// The examples (positions in the split) of the global batch of `step`.
    pub fn indices(&mut self, step: u64) -> Vec<usize> {
        let (epoch, start) = self.position(step);
        if self.cached.as_ref().map(|(e, _)| *e) != Some(epoch) {
            self.cached = Some((epoch, epoch_order(self.len, self.seed, epoch, self.shuffle)));
        }
        match &self.cached {
            Some((_, order)) => order[start..start + self.global_batch].to_vec(),
            None => Vec::new(),
        }
    }
}

/// Rank `rank`'s contiguous share of the examples `idx` of `pool`, with the totals
/// of the whole batch (for normalising losses): `(examples, indices, totals)`.
pub fn rank_share(
    pool: &[Example],
    idx: &[usize],
    count_negatives: bool,
    rank: usize,
    world: usize,
) -> (Vec<Example>, Vec<usize>, Normalizer) {
    let all: Vec<&Example> = idx.iter().filter_map(|&i| pool.get(i)).collect();
    let norm = Normalizer::of(&all, count_negatives);
    let (start, len) = rank_range(all.len(), world, rank);
    let end = (start + len).min(all.len());
    let start = start.min(end);
    (
        all[start..end].iter().map(|&e| e.clone()).collect(),
        idx[start..end].to_vec(),
        norm,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ex(n: usize) -> Example {
        Example {
            line: n,
            prompt: vec![1],
            chosen: Some(vec![2; n + 1]),
            rejected: vec![vec![3]],
        }
    }

    #[test]
    fn shares_cover_the_batch_exactly_once_for_any_world() {
        let pool: Vec<Example> = (0..10).map(ex).collect();
        let mut plan = EpochPlan::new(10, 4, 7, true).expect("plan");
        assert_eq!(plan.steps_per_epoch(), 2);
        for step in 0..6 {
            let idx = plan.indices(step);
            assert_eq!(idx.len(), 4);
            let whole = rank_share(&pool, &idx, false, 0, 1);
            for world in 1..=5 {
                let mut seen = Vec::new();
                for rank in 0..world {
                    let (e, i, norm) = rank_share(&pool, &idx, false, rank, world);
                    assert_eq!(norm, whole.2, "totals are of the whole batch");
                    assert_eq!(e.len(), i.len());
                    seen.extend(i);
                }
                assert_eq!(seen, idx, "world {world}");
            }
        }
    }

    #[test]
    fn epochs_reshuffle_and_batches_do_not_repeat_within_one() {
        let mut plan = EpochPlan::new(12, 3, 1, true).expect("plan");
        let mut first: Vec<usize> = (0..4).flat_map(|s| plan.indices(s)).collect();
        let second: Vec<usize> = (4..8).flat_map(|s| plan.indices(s)).collect();
        assert_ne!(first, second);
        first.sort_unstable();
        assert_eq!(first, (0..12).collect::<Vec<_>>());
        assert!(EpochPlan::new(2, 3, 1, true).is_none());
    }
}
