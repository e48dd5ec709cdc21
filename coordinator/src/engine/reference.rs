//! The reference stage: before training, the generation's ranks score the
//! examples whose reference log-prob sums the run's cache lacks, each rank a
//! round-robin share in micro-batch chunks; the sums come back and are stored.
//! The plan lives with the run's data (its own lock), so cutting chunks never
//! holds the engine; the engine only keeps the run's progress counts.

use std::path::Path;

use dpo_data::Example;
use dpo_data::refcache::{self, RefCache};
use dpo_proto::{RunSpec, v1};

use super::runs::RunData;
use super::{Engine, Refusal, Result};

/// The reference log-prob cache of a run's namespace, and the plan of what the
/// current generation's ranks still score.
#[derive(Debug)]
pub struct ReferenceStage {
    pub cache: std::sync::Mutex<RefCache>,
    /// (generation, the examples the cache lacked when that generation first
    /// asked), made once per generation so every rank splits the same list.
    plan: std::sync::Mutex<Option<(u64, Vec<StageItem>)>>,
}

/// An example of the reference stage: `(is_eval, index in its split)`.
type StageItem = (bool, usize);

/// A chunk of a rank's share, and the stage's size when this request made the
/// generation's plan (`(total, cached)`).
pub type StageChunk = (v1::ReferenceWorkResponse, Option<(u64, u64)>);

impl ReferenceStage {
    /// Opens the run's namespace under `root` (when the run precomputes).
    pub fn open(spec: &RunSpec, root: &Path) -> std::result::Result<Option<Self>, dpo_data::Error> {
        if !refcache::precomputes(spec) {
            return Ok(None);
        }
        let ns = refcache::namespace_of(spec, Some(root))?;
        let cache = RefCache::open(root, &ns)?;
        tracing::info!(namespace = %ns, records = cache.len(), "reference cache");
        Ok(Some(ReferenceStage {
            cache: std::sync::Mutex::new(cache),
            plan: std::sync::Mutex::new(None),
        }))
    }

    /// Chunk `chunk` of rank `rank`'s share of `generation`'s plan, making the
    /// plan if this request is the generation's first (under the plan's lock,
    /// so every rank cuts from the same list).
    pub fn work(
        &self,
        data: &RunData,
        generation: u64,
        rank: usize,
        chunk: u64,
        world: usize,
        micro: usize,
    ) -> Result<StageChunk> {
        let mut plan = self
            .plan
            .lock()
            .map_err(|_| Refusal::Internal("poisoned reference plan".into()))?;
        let mut progress = None;
        if plan.as_ref().is_none_or(|(g, _)| *g != generation) {
            let cache = self
                .cache
                .lock()
                .map_err(|_| Refusal::Internal("poisoned reference cache".into()))?;
            let (mut total, mut missing) = (0usize, Vec::<StageItem>::new());
            let items = (data.train.iter().enumerate().map(|(i, e)| (false, i, e)))
                .chain(data.eval.iter().enumerate().map(|(i, e)| (true, i, e)));
            for (eval, i, e) in items {
                if let Some([c, r]) = refcache::pair_keys(e) {
                    total += 1;
                    if !cache.contains(&c) || !cache.contains(&r) {
                        missing.push((eval, i));
                    }
                }
            }
            tracing::info!(
                generation,
                to_score = missing.len(),
                cached = total - missing.len(),
                "reference stage"
            );
            progress = Some((total as u64, (total - missing.len()) as u64));
            *plan = Some((generation, missing));
        }
        let items = plan.as_ref().map_or(&[][..], |(_, m)| m.as_slice());
        Ok((chunk_of(data, items, rank, chunk, world, micro), progress))
    }

    /// Checks reported `(key, sum)` pairs and stores them; returns how many
    /// records were new (blocking file I/O: the cache appends fsynced segments).
    pub fn store(&self, keys: &[Vec<u8>], sums: &[f32]) -> Result<usize> {
        let records = check_sums(keys, sums)?;
        self.cache
            .lock()
            .map_err(|_| Refusal::Internal("poisoned reference cache".into()))?
            .insert(&records)
            .map_err(|e| Refusal::Internal(e.to_string()))
    }

    /// The reference sums `[chosen, rejected]` of `examples`, when the cache
    /// holds them all.
    pub fn sums_of(&self, examples: &[Example]) -> Result<Option<Vec<[f32; 2]>>> {
        let cache = self
            .cache
            .lock()
            .map_err(|_| Refusal::Internal("poisoned reference cache".into()))?;
        Ok(examples
            .iter()
            .map(|e| {
                let [c, r] = refcache::pair_keys(e)?;
                Some([cache.get(&c)?, cache.get(&r)?])
            })
            .collect())
    }
}

/// Reported keys and sums, checked: pairwise, 16-byte keys, finite sums ≤ 0.
pub fn check_sums(keys: &[Vec<u8>], sums: &[f32]) -> Result<Vec<(refcache::Key, f32)>> {
    if keys.len() != sums.len() {
        return Err(Refusal::Invalid(format!(
            "{} keys but {} sums",
            keys.len(),
            sums.len()
        )));
    }
    let mut records = Vec::with_capacity(keys.len());
    for (k, &v) in keys.iter().zip(sums) {
        let key: refcache::Key = k.as_slice().try_into().map_err(|_| {
            Refusal::Invalid(format!(
                "a reference key has {} bytes, not {}",
                k.len(),
                refcache::KEY_BYTES
            ))
        })?;
        if !v.is_finite() || v > 0.0 {
            return Err(Refusal::Invalid(format!(
                "a reference log-prob sum must be finite and ≤ 0, found {v}"
            )));
        }
        records.push((key, v));
    }
    Ok(records)
}

/// Chunk `chunk` of rank `rank`'s share of `plan`: the rank takes every
/// `world`-th item from its rank on, `micro` of them per chunk.
fn chunk_of(
    data: &RunData,
    plan: &[StageItem],
    rank: usize,
    chunk: u64,
    world: usize,
    micro: usize,
) -> v1::ReferenceWorkResponse {
    let share_len = plan.len().saturating_sub(rank).div_ceil(world.max(1));
    let start = (chunk as usize).saturating_mul(micro);
    let end = start.saturating_add(micro).min(share_len);
    let examples = (start..end)
        .filter_map(|k| plan.get(rank + k * world))
        .filter_map(|&(eval, i)| {
            if eval {
                data.eval.get(i)
            } else {
                data.train.get(i)
            }
        })
        .map(to_proto_example)
        .collect();
    v1::ReferenceWorkResponse {
        examples,
        done: start >= share_len,
        planned: plan.len() as u64,
    }
}

pub fn to_proto_example(e: &Example) -> v1::Example {
    v1::Example {
        line: e.line as u64,
        prompt: e.prompt.clone(),
        chosen: e.chosen.clone().map(|ids| v1::Sequence { ids }),
        rejected: e
            .rejected
            .iter()
            .map(|ids| v1::Sequence { ids: ids.clone() })
            .collect(),
    }
}

impl Engine {
    /// A generation planned the run's stage: `total` examples need sums,
    /// `cached` of them are in the cache.
    pub fn reference_planned(&mut self, run: &str, total: u64, cached: u64) {
        if let Some(r) = self.runs.get_mut(run) {
            r.reference_total = total;
            r.reference_cached = cached;
        }
        self.emit(run, None);
    }

    /// Sums for `sequences` sequences (two per example) were stored.
    pub fn reference_stored(&mut self, run: &str, sequences: u64) {
        if let Some(r) = self.runs.get_mut(run) {
            r.reference_cached = (r.reference_cached + sequences / 2).min(r.reference_total);
        }
        self.emit(run, None);
    }
}
