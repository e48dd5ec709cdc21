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

/// Tokens an example costs in a forward pass: its prompt and every response.
fn cost(e: &Example) -> usize {
    e.prompt.len()
        + e.chosen.as_ref().map_or(0, Vec::len)
        + e.rejected.iter().map(Vec::len).sum::<usize>()
}

/// The rank of each of `lengths`' elements: longest first, each to the rank with
/// the fewest tokens so far (ties: the fewest examples, then the lower rank) —
/// every rank's forward costs about the same, so no rank waits for a straggler
/// at the all-reduce. With at least `world` elements every rank gets one.
/// O(n log n + n log world): the least-loaded rank comes off a heap.
pub fn balance(lengths: &[usize], world: usize) -> Vec<usize> {
    use std::cmp::Reverse;
    use std::collections::BinaryHeap;
    let world = world.max(1);
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    order.sort_by(|&a, &b| lengths[b].cmp(&lengths[a]).then(a.cmp(&b)));
    // (tokens, examples, rank), least first.
    let mut load: BinaryHeap<Reverse<(usize, usize, usize)>> =
        (0..world).map(|r| Reverse((0, 0, r))).collect();
    let mut rank_of = vec![0; lengths.len()];
    for i in order {
        let Some(Reverse((tokens, examples, r))) = load.pop() else {
            break;
        };
        rank_of[i] = r;
        load.push(Reverse((tokens + lengths[i], examples + 1, r)));
    }
    rank_of
}

/// How a global batch is split among `world` ranks: each rank's examples
/// (positions in the pool, in batch order) and the whole batch's totals.
#[derive(Debug, Clone, PartialEq)]
pub struct Shares {
    pub by_rank: Vec<Vec<usize>>,
    pub norm: Normalizer,
}

/// The split of the examples `idx` of `pool` among `world` ranks
/// (length-balanced by [`balance`]): computed once per step, however many
/// ranks ask for their share.
pub fn shares(pool: &[Example], idx: &[usize], count_negatives: bool, world: usize) -> Shares {
    let picked: Vec<(usize, &Example)> = idx
        .iter()
        .filter_map(|&i| pool.get(i).map(|e| (i, e)))
        .collect();
    let all: Vec<&Example> = picked.iter().map(|(_, e)| *e).collect();
    let norm = Normalizer::of(&all, count_negatives);
    let lengths: Vec<usize> = all.iter().map(|e| cost(e)).collect();
    let ranks = balance(&lengths, world);
    let mut by_rank = vec![Vec::new(); world.max(1)];
    for ((i, _), r) in picked.iter().zip(&ranks) {
        by_rank[*r].push(*i);
    }
    Shares { by_rank, norm }
}

/// Rank `rank`'s share of the examples `idx` of `pool` (length-balanced across
/// ranks by [`balance`], in batch order), with the totals of the whole batch (for
/// normalising losses): `(examples, indices, totals)`. Every term is normalised by
/// the whole batch's totals, so how the batch is split changes no gradient.
pub fn rank_share(
    pool: &[Example],
    idx: &[usize],
    count_negatives: bool,
    rank: usize,
    world: usize,
) -> (Vec<Example>, Vec<usize>, Normalizer) {
    let s = shares(pool, idx, count_negatives, world);
    let indices = s.by_rank.get(rank).cloned().unwrap_or_default();
    let examples = indices
        .iter()
        .filter_map(|&i| pool.get(i).cloned())
        .collect();
    (examples, indices, s.norm)
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
                seen.sort_unstable();
                let mut want = idx.clone();
                want.sort_unstable();
                assert_eq!(seen, want, "world {world}");
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

    /// The definition `balance` must keep: each element, longest first, to
    /// the rank least loaded by (tokens, examples, rank), found by a scan.
    fn balance_by_scan(lengths: &[usize], world: usize) -> Vec<usize> {
        let mut order: Vec<usize> = (0..lengths.len()).collect();
        order.sort_by(|&a, &b| lengths[b].cmp(&lengths[a]).then(a.cmp(&b)));
        let mut load = vec![(0usize, 0usize); world];
        let mut rank_of = vec![0; lengths.len()];
        for i in order {
            let r = (0..world)
                .min_by_key(|&r| (load[r].0, load[r].1, r))
                .unwrap_or(0);
            load[r].0 += lengths[i];
            load[r].1 += 1;
            rank_of[i] = r;
        }
        rank_of
    }

    #[test]
    fn the_heap_balances_exactly_as_the_scan_did() {
        let mut rng = crate::rng::SplitMix64::new(5);
        for world in [1, 2, 3, 7, 64] {
            for n in [0, 1, 5, 64, 300] {
                let lengths: Vec<usize> = (0..n).map(|_| 1 + rng.below(40)).collect();
                assert_eq!(
                    balance(&lengths, world),
                    balance_by_scan(&lengths, world),
                    "world {world}, {n} elements"
                );
            }
        }
    }

    #[test]
    fn shares_balance_tokens_not_counts() {
        // One long example and several short ones: the long one's rank gets
        // fewer examples.
        let lengths = [40, 5, 6, 7, 8, 9, 10, 5];
        let ranks = balance(&lengths, 2);
        let tokens = |r: usize| -> usize {
            lengths
                .iter()
                .zip(&ranks)
                .filter(|(_, x)| **x == r)
                .map(|(l, _)| l)
                .sum()
        };
        assert_eq!((tokens(0), tokens(1)), (45, 45));
        assert_eq!(ranks.iter().filter(|&&r| r == 0).count(), 2);
        // Contiguous halves would have been 58 against 32.
        // Every rank gets an example when there are enough.
        let ranks = balance(&[1, 1, 1, 100], 4);
        let mut sorted = ranks.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, vec![0, 1, 2, 3]);
        assert_eq!(balance(&[3, 2], 1), vec![0, 0]);
    }
}
