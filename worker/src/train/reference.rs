//! Where a run's reference log-probabilities come from. Every mode is one
//! implementation of [`ReferenceSource`]: none (reference-free), a frozen model
//! scored alongside the policy, sums precomputed once (through the reference
//! cache), or sums sent with each batch by the coordinator after the cluster's
//! reference stage. A new mode (e.g. the policy with its adapters disabled) is
//! one more implementation; the policy is handed to every call for that reason.

use std::path::PathBuf;
use std::time::Instant;

use dpo_data::Example;
use dpo_data::refcache::{self, RefCache};
use dpo_proto::RunSpec;
use tch::{Device, Kind, Tensor};

use super::batches::Split;
use crate::error::{Error, Result, TorchContext};
use crate::model::{CausalLm, checkpoint};
use crate::objective::{self, MicroBatch};

/// Where a micro-batch sits: its split, its examples' positions in that split,
/// and the sums the coordinator sent with it (cluster reference stage).
#[derive(Debug, Clone, Copy)]
pub struct BatchPosition<'a> {
    pub split: Split,
    pub indices: &'a [usize],
    pub given: Option<&'a [[f32; 2]]>,
}

/// Reference log-probability sums per sequence.
pub trait ReferenceSource: Send {
    /// Σ log π_ref of each sequence of `mb` (chosen, then rejected — the
    /// micro-batch's layout), on the policy's device; `None`: reference-free.
    fn sums(
        &mut self,
        policy: &CausalLm,
        mb: &MicroBatch,
        at: BatchPosition<'_>,
    ) -> Result<Option<Tensor>>;

    /// The frozen reference model, when this source scores one every step
    /// (precomputing replaces the source with its sums).
    fn frozen_model(&self) -> Option<&CausalLm> {
        None
    }

    /// Whether the reference is the policy itself with its adapters off
    /// (precomputing then scores with the policy, adapters off).
    fn policy_base(&self) -> bool {
        false
    }

    /// Whether the sums come from the cluster's reference stage.
    fn staged(&self) -> bool {
        false
    }

    /// The reference stage: each sequence's cache key and Σ log π_ref, chosen
    /// then rejected per example.
    fn score_stage(
        &mut self,
        _examples: &[Example],
        _packing: Option<usize>,
    ) -> Result<Vec<(refcache::Key, f32)>> {
        Err(Error::Input {
            context: "reference.precompute".into(),
            reason: "this run has no reference stage".into(),
        })
    }

    /// This worker's part of the reference stage is over: free what it held.
    fn end_stage(&mut self) {}
}

/// Reference-free: log π_ref = 0.
#[derive(Debug)]
pub struct NoReference;

impl ReferenceSource for NoReference {
    fn sums(
        &mut self,
        _: &CausalLm,
        _: &MicroBatch,
        _: BatchPosition<'_>,
    ) -> Result<Option<Tensor>> {
        Ok(None)
    }
}

/// A frozen model scored alongside the policy.
pub struct FrozenModel(pub Box<CausalLm>);

impl std::fmt::Debug for FrozenModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FrozenModel")
    }
}

impl ReferenceSource for FrozenModel {
    fn sums(
        &mut self,
        _: &CausalLm,
        mb: &MicroBatch,
        _: BatchPosition<'_>,
    ) -> Result<Option<Tensor>> {
        let _guard = tch::no_grad_guard();
        Ok(Some(objective::score(&self.0, mb)?.sums))
    }

    fn frozen_model(&self) -> Option<&CausalLm> {
        Some(&self.0)
    }
}

/// The policy with its LoRA adapters off: the base it started from
/// (`reference.path = "same"` with `[lora]`), with no second model in memory.
#[derive(Debug)]
pub struct PolicyBase;

impl ReferenceSource for PolicyBase {
    fn sums(
        &mut self,
        policy: &CausalLm,
        mb: &MicroBatch,
        _: BatchPosition<'_>,
    ) -> Result<Option<Tensor>> {
        let _guard = tch::no_grad_guard();
        let _off = policy.adapters_off();
        Ok(Some(objective::score(policy, mb)?.sums))
    }

    fn policy_base(&self) -> bool {
        true
    }
}

/// `[chosen, rejected]` sums per example of each split, computed once.
#[derive(Debug)]
pub struct Precomputed {
    train: Vec<[f64; 2]>,
    eval: Vec<[f64; 2]>,
}

/// Builds a tensor of sums on `device`, laid out chosen then rejected.
fn sums_tensor(sums: &[f32], device: Device) -> Result<Option<Tensor>> {
    Ok(Some(
        Tensor::f_from_slice(sums)
            .and_then(|t| t.f_to_device(device))
            .op("cached reference")?,
    ))
}

impl ReferenceSource for Precomputed {
    fn sums(
        &mut self,
        policy: &CausalLm,
        _: &MicroBatch,
        at: BatchPosition<'_>,
    ) -> Result<Option<Tensor>> {
        let cache = if at.split == Split::Train {
            &self.train
        } else {
            &self.eval
        };
        let idx = at.indices;
        let sums: Vec<f32> = idx
            .iter()
            .map(|&i| cache[i][0] as f32)
            .chain(idx.iter().map(|&i| cache[i][1] as f32))
            .collect();
        sums_tensor(&sums, policy.device())
    }
}

impl Precomputed {
    /// Scores every train and eval example once with `model` — or takes the
    /// sums from the reference cache of `spec`, scoring only what it lacks.
    pub fn compute(
        spec: &RunSpec,
        model: &CausalLm,
        train_all: &[Example],
        eval_all: &[Example],
        packing: Option<usize>,
    ) -> Result<Self> {
        let t = Instant::now();
        let m = spec.micro_batch_size();
        let mut cache = match spec.reference_cache_dir() {
            Some(root) => {
                let ns = refcache::namespace_of(spec, Some(&root))?;
                let cache = RefCache::open(&root, &ns)?;
                tracing::info!(dir = %cache.dir().display(), records = cache.len(), "reference cache");
                Some(cache)
            }
            None => None,
        };
        let mut scored = 0usize;
        let mut score_all = |examples: &[Example]| -> Result<Vec<[f64; 2]>> {
            let mut out: Vec<Option<[f64; 2]>> = examples
                .iter()
                .map(|e| {
                    let c = cache.as_ref()?;
                    let [kc, kr] = refcache::pair_keys(e)?;
                    Some([f64::from(c.get(&kc)?), f64::from(c.get(&kr)?)])
                })
                .collect();
            let missing: Vec<usize> = (0..examples.len()).filter(|&i| out[i].is_none()).collect();
            for chunk in missing.chunks(m) {
                let refs: Vec<&Example> = chunk.iter().map(|&i| &examples[i]).collect();
                let sums = objective::pair_sums(model, &refs, packing)?;
                let mut records = Vec::with_capacity(2 * chunk.len());
                for (&i, s) in chunk.iter().zip(sums) {
                    if let Some([kc, kr]) = refcache::pair_keys(&examples[i]) {
                        records.push((kc, s[0] as f32));
                        records.push((kr, s[1] as f32));
                    }
                    // What the cache will hand back next time (f32), so a run
                    // that computes and one that reuses train identically.
                    out[i] = Some([f64::from(s[0] as f32), f64::from(s[1] as f32)]);
                }
                if let Some(c) = cache.as_mut() {
                    c.insert(&records)?;
                }
                scored += chunk.len();
            }
            Ok(out.into_iter().map(|s| s.unwrap_or([0.0; 2])).collect())
        };
        let train = score_all(train_all)?;
        let eval = score_all(eval_all)?;
        let total = train.len() + eval.len();
        tracing::info!(
            examples = total,
            scored,
            from_cache = total - scored,
            seconds = t.elapsed().as_secs_f64(),
            "reference log-probabilities ready; the reference model is freed"
        );
        Ok(Precomputed { train, eval })
    }
}

/// In a cluster with `reference.precompute`: the sums come with each batch from
/// the coordinator's cache, filled by the reference stage before training. The
/// model is held only while this worker scores its share of the stage (loaded
/// on demand, freed at the end of it).
pub struct Staged {
    model: Option<Box<CausalLm>>,
    /// The reference weights: the policy's initial directory or another one.
    dir: PathBuf,
    /// Whether `dir` is a separate reference (checked against the policy's
    /// vocabulary) rather than the policy's own directory.
    separate: bool,
    kind: Kind,
    device: Device,
    vocab: i64,
}

impl std::fmt::Debug for Staged {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Staged")
            .field("dir", &self.dir)
            .field("loaded", &self.model.is_some())
            .finish()
    }
}

impl Staged {
    pub fn new(spec: &RunSpec, kind: Kind, device: Device, vocab: i64) -> Self {
        let dir = spec.reference.path.weights(&spec.model.path).to_path_buf();
        let separate = spec.reference.path.dir().is_some();
        Staged {
            model: None,
            dir,
            separate,
            kind,
            device,
            vocab,
        }
    }
}

impl ReferenceSource for Staged {
    fn sums(
        &mut self,
        policy: &CausalLm,
        _: &MicroBatch,
        at: BatchPosition<'_>,
    ) -> Result<Option<Tensor>> {
        let given = at.given.unwrap_or(&[]);
        if given.len() != at.indices.len() {
            return Err(Error::Input {
                context: "reference.precompute".into(),
                reason: format!(
                    "the coordinator sent {} reference sums for {} examples: its reference stage is incomplete",
                    given.len(),
                    at.indices.len()
                ),
            });
        }
        let sums: Vec<f32> = given
            .iter()
            .map(|v| v[0])
            .chain(given.iter().map(|v| v[1]))
            .collect();
        sums_tensor(&sums, policy.device())
    }

    fn staged(&self) -> bool {
        true
    }

    fn score_stage(
        &mut self,
        examples: &[Example],
        packing: Option<usize>,
    ) -> Result<Vec<(refcache::Key, f32)>> {
        if self.model.is_none() {
            let t = Instant::now();
            let loaded = if self.separate {
                checkpoint::load_reference(&self.dir, self.kind, self.device, self.vocab)?
            } else {
                checkpoint::load(&self.dir, self.kind, self.device)?
            };
            tracing::info!(
                seconds = t.elapsed().as_secs_f64(),
                "loaded the reference model for the reference stage"
            );
            self.model = Some(Box::new(loaded));
        }
        let Some(model) = self.model.as_deref() else {
            return Ok(Vec::new());
        };
        let refs: Vec<&Example> = examples.iter().collect();
        let mut out = Vec::with_capacity(2 * examples.len());
        for (e, s) in examples
            .iter()
            .zip(objective::pair_sums(model, &refs, packing)?)
        {
            let Some([kc, kr]) = refcache::pair_keys(e) else {
                return Err(Error::Input {
                    context: "reference stage".into(),
                    reason: format!("example of line {} is not a pair", e.line),
                });
            };
            out.push((kc, s[0] as f32));
            out.push((kr, s[1] as f32));
        }
        Ok(out)
    }

    fn end_stage(&mut self) {
        if self.model.take().is_some() {
            tracing::info!("reference stage done; the reference model is freed");
        }
    }
}
