//! The standalone trainer behind `dpo-worker train --config run.toml`.
//!
//! One optimizer step consumes exactly `global_batch_size` examples, taken in the
//! seeded per-epoch order; they are split into micro-batches whose losses are
//! normalised over the global batch, so accumulation equals one big batch. Chosen
//! and rejected sequences of a micro-batch go through the model in one forward.
//! Checkpoints hold everything needed to continue bit-exactly: weights, optimizer
//! moments, step (which fixes the data cursor, since the order is a function of seed
//! and epoch) and early-stopping state, with a checksummed manifest, written under a
//! temporary name, fsynced and renamed.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Instant;

use dpo_data::{Example, TextTokenizer};
use dpo_proto::{Dtype, Loss, RunSpec};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tch::{Device, Kind, Tensor};

use crate::collective::{Collective, CollectiveError, all_reduce_gradients, broadcast_tensors};
use crate::error::{Error, Result, TorchContext, io_err};
use crate::generate::{Sampling, generate};
use crate::model::{CausalLm, checkpoint};
use crate::objective::{self, MicroBatch, Normalizer, Objective, Stats};
use crate::optim::{Optimizer, learning_rate};
use dpo_data::batches::{EpochPlan, rank_share};
use dpo_data::refcache::{self, RefCache};
use dpo_data::{DataReport, dataset};

/// How often (in steps) ranks compare parameter hashes.
const PARAMETER_CHECK_EVERY: u64 = 25;

/// Shards above this size are split, as transformers does by default.
const MAX_SHARD_BYTES: u64 = 5 * 1024 * 1024 * 1024;

/// Named metric values in the order they are reported.
pub type Metrics = Vec<(String, f64)>;

/// How to run.
#[derive(Debug, Clone)]
pub struct TrainOptions {
    /// Continue from the newest checkpoint under `train.output`.
    pub resume: bool,
    pub device: Device,
    /// Fault injection for tests: stop like a crash (no final model) once this step
    /// and its checkpoint are written.
    pub halt_after_step: Option<u64>,
}

/// Progress reported to the caller (progress bar, logs).
#[derive(Debug)]
pub enum Event<'a> {
    Started {
        start_step: u64,
        total_steps: u64,
        train: Option<&'a DataReport>,
        eval: Option<&'a DataReport>,
    },
    Step {
        step: u64,
        total_steps: u64,
        metrics: &'a Metrics,
    },
    Eval {
        step: u64,
        metrics: &'a Metrics,
    },
    Checkpoint {
        step: u64,
        path: &'a Path,
    },
}

/// The end of a run.
#[derive(Debug, Clone)]
pub struct Summary {
    pub steps: u64,
    pub last: Metrics,
    pub eval: Option<Metrics>,
    pub stopped_early: bool,
    pub output: PathBuf,
    pub seconds: f64,
}

/// Reference log-probabilities per sequence.
enum Reference {
    /// Reference-free: log π_ref = 0.
    Free,
    /// A frozen model scored alongside the policy.
    Model(Box<CausalLm>),
    /// Precomputed `[chosen, rejected]` sums per example of each split.
    Cached {
        train: Vec<[f64; 2]>,
        eval: Vec<[f64; 2]>,
    },
    /// In a cluster with `reference.precompute`: the sums come with each batch
    /// from the coordinator's cache, filled by the reference stage before
    /// training. The model is held only while this worker scores its share of the
    /// stage (loaded on demand, freed at the end of it).
    Staged { model: Option<Box<CausalLm>> },
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Split {
    Train,
    Eval,
}

fn kind_of(d: Dtype) -> Kind {
    match d {
        Dtype::F32 => Kind::Float,
        Dtype::Bf16 => Kind::BFloat16,
        Dtype::F16 => Kind::Half,
    }
}

/// One rank's contiguous share of a global batch.
#[derive(Debug, Clone, Default)]
pub struct Slice {
    pub examples: Vec<Example>,
    /// Positions of the examples in their split (reference-cache keys).
    pub indices: Vec<usize>,
    /// Totals over the whole global batch.
    pub norm: Normalizer,
    /// `[chosen, rejected]` reference sums per example, when the coordinator's
    /// reference stage provides them (empty otherwise).
    pub reference: Vec<[f32; 2]>,
}

/// Where global batches come from: the run's own files (standalone) or the
/// coordinator (cluster). Either way the batch of a step is a function of the run
/// alone, never of the world size.
pub trait Batches: Send {
    /// This rank's slice of the global batch of optimizer step `step` (0-based).
    fn train(&mut self, step: u64, rank: usize, world: usize) -> Result<Slice>;
    /// This rank's slice of the whole eval set (`None`: the run has none).
    fn eval(&mut self, rank: usize, world: usize) -> Result<Option<Slice>>;
    /// Every example of a split, when they are all held here (for precomputing
    /// reference log-probabilities).
    fn all(&self, _split: Split) -> Option<&[Example]> {
        None
    }
    /// Whether every token id was checked against the model's vocabulary when the
    /// examples were loaded; otherwise each slice is checked as it arrives.
    fn ids_checked(&self) -> bool {
        false
    }
}

/// Batches of examples held in memory, in the seeded per-epoch order.
#[derive(Debug)]
pub struct LocalBatches {
    train: Vec<Example>,
    eval: Vec<Example>,
    plan: EpochPlan,
    count_negatives: bool,
}

impl LocalBatches {
    /// Fails (naming `train.global_batch_size`) when one global batch needs more
    /// examples than there are.
    pub fn new(spec: &RunSpec, train: Vec<Example>, eval: Vec<Example>) -> Result<Self> {
        let g = spec.train.global_batch_size;
        let plan =
            EpochPlan::new(train.len(), g, spec.data.seed, spec.data.shuffle).ok_or_else(|| {
                Error::Input {
                    context: "train.global_batch_size".into(),
                    reason: format!(
                        "{g} exceeds the {} usable training examples of {}",
                        train.len(),
                        spec.data.train.display()
                    ),
                }
            })?;
        Ok(LocalBatches {
            train,
            eval,
            plan,
            count_negatives: spec.objective.loss == Loss::Combined,
        })
    }

    /// Optimizer steps in one pass over the training examples.
    pub fn steps_per_epoch(&self) -> u64 {
        self.plan.steps_per_epoch()
    }

    fn slice_of(
        pool: &[Example],
        idx: &[usize],
        count_negatives: bool,
        rank: usize,
        world: usize,
    ) -> Slice {
        let (examples, indices, norm) = rank_share(pool, idx, count_negatives, rank, world);
        Slice {
            examples,
            indices,
            norm,
            reference: Vec::new(),
        }
    }
}

impl Batches for LocalBatches {
    fn train(&mut self, step: u64, rank: usize, world: usize) -> Result<Slice> {
        let idx = self.plan.indices(step);
        Ok(Self::slice_of(
            &self.train,
            &idx,
            self.count_negatives,
            rank,
            world,
        ))
    }

    fn eval(&mut self, rank: usize, world: usize) -> Result<Option<Slice>> {
        if self.eval.is_empty() {
            return Ok(None);
        }
        let idx: Vec<usize> = (0..self.eval.len()).collect();
        Ok(Some(Self::slice_of(
            &self.eval,
            &idx,
            self.count_negatives,
            rank,
            world,
        )))
    }

    /// `Trainer::new` loads them with the policy's vocabulary size.
    fn ids_checked(&self) -> bool {
        true
    }

    fn all(&self, split: Split) -> Option<&[Example]> {
        Some(match split {
            Split::Train => &self.train,
            Split::Eval => &self.eval,
        })
    }
}

/// Train examples and report, eval examples and report.
type LoadedData = (Vec<Example>, DataReport, Vec<Example>, Option<DataReport>);

/// Loads the run's train and eval files as examples (negatives sampled from the
/// reference model, or the initial policy, when `data.negatives = "policy"`).
fn load_examples(
    spec: &RunSpec,
    policy: &CausalLm,
    reference_model: Option<&CausalLm>,
) -> Result<LoadedData> {
    let vocab = policy.config().vocab_size;
    // Pre-tokenized data needs no tokenizer; a tokenizer that is there but
    // broken is an error all the same.
    let tokenizer = if spec.model.path.join("tokenizer.json").exists() {
        Some(TextTokenizer::from_dir(&spec.model.path)?)
    } else {
        None
    };
    let mut stop: Vec<u32> = policy
        .config()
        .eos_token_ids
        .iter()
        .filter_map(|&id| u32::try_from(id).ok())
        .collect();
    stop.extend(tokenizer.as_ref().and_then(TextTokenizer::eos_id));
    let sampling_model = reference_model.unwrap_or(policy);
    let mut rng = dpo_data::rng::SplitMix64::new(spec.data.seed ^ 0x706F_6C69_6379);
    let max_length = spec.data.max_length;
    let mut sampler =
        |e: &Example| -> std::result::Result<Option<Vec<u32>>, dpo_data::SamplerError> {
            let Some(label) = &e.chosen else {
                return Ok(None);
            };
            let room = max_length.saturating_sub(e.prompt.len());
            let budget = (2 * label.len()).max(16).min(room);
            // Sampled at temperature 1; a sample equal to the label is drawn again.
            for _ in 0..4 {
                let sample = generate(
                    sampling_model,
                    &e.prompt,
                    budget,
                    &stop,
                    Sampling::Temperature(1.0),
                    &mut rng,
                )?;
                if !sample.is_empty() && sample != *label {
                    return Ok(Some(sample));
                }
            }
            Ok(None)
        };
    let (train, train_report) = dataset::load(
        spec,
        &spec.data.train,
        tokenizer.as_ref(),
        Some(vocab),
        true,
        Some(&mut sampler),
    )?;
    let (eval, eval_report) = match &spec.data.eval {
        Some(path) => {
            let (e, r) = dataset::load(
                spec,
                path,
                tokenizer.as_ref(),
                Some(vocab),
                false,
                Some(&mut sampler),
            )?;
            (e, Some(r))
        }
        None => (Vec::new(), None),
    };
    Ok((train, train_report, eval, eval_report))
}

/// The models of a run: the policy, and the reference when it is a separate directory.
struct Models {
    objective: Objective,
    policy: CausalLm,
    /// The reference directory's model (when given and needed).
    reference_model: Option<CausalLm>,
    wants_reference: bool,
}

impl Models {
    /// `staged`: the reference is scored by the cluster's reference stage, which
    /// loads it on demand — not here.
    fn load(spec: &RunSpec, device: Device, staged: bool) -> Result<Self> {
        let kind = kind_of(spec.model.dtype);
        let objective = Objective::from_spec(&spec.objective);
        let policy = checkpoint::load(&spec.model.path, kind, device)?;
        let vocab = policy.config().vocab_size;
        // The reference model, when the objective uses one or when negatives are
        // sampled from it; "same" and "none" sample from the initial policy.
        let reference_dir = match spec.reference.path.as_str() {
            "same" | "none" => None,
            other => Some(PathBuf::from(other)),
        };
        let wants_reference = objective.needs_reference() && spec.reference.path != "none";
        let samples_policy = spec.data.negatives.as_deref() == Some("policy");
        let reference_model = match &reference_dir {
            Some(dir) if (wants_reference && !staged) || samples_policy => {
                Some(checkpoint::load_reference(dir, kind, device, vocab)?)
            }
            _ => None,
        };
        Ok(Models {
            objective,
            policy,
            reference_model,
            wants_reference,
        })
    }
}

/// The shape of a run: how many steps, and whether it evaluates.
#[derive(Debug, Clone)]
pub struct RunShape {
    pub steps_per_epoch: u64,
    pub total_steps: u64,
    pub has_eval: bool,
    pub train_report: Option<DataReport>,
    pub eval_report: Option<DataReport>,
}

/// A run being trained.
pub struct Trainer {
    spec: RunSpec,
    /// The ranks training this run together (a world of one standalone).
    collective: Box<dyn Collective>,
    /// The generation of the world (0 standalone; set by the coordinator).
    generation: u64,
    halt_after_step: Option<u64>,
    /// Whether rank 0 writes metrics.jsonl and eval.jsonl (standalone); in a
    /// cluster the coordinator writes them from the ranks' reports.
    writes_metrics: bool,
    objective: Objective,
    policy: CausalLm,
    reference: Reference,
    optimizer: Optimizer,
    batches: Box<dyn Batches>,
    shape: RunShape,
    /// Optimizer steps completed.
    step: u64,
    best_eval: Option<f64>,
    bad_evals: u64,
    stopped_early: bool,
}

impl std::fmt::Debug for Trainer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trainer")
            .field("run", &self.spec.name)
            .field("step", &self.step)
            .field("total_steps", &self.shape.total_steps)
            .finish()
    }
}

impl Trainer {
    /// Standalone: loads the model(s) and data, prepares the output directory, and
    /// restores the newest checkpoint when `opts.resume`.
    pub fn new(
        spec: RunSpec,
        opts: &TrainOptions,
        collective: Box<dyn Collective>,
    ) -> Result<Self> {
        let models = Models::load(&spec, opts.device, false)?;
        let (train, train_report, eval, eval_report) =
            load_examples(&spec, &models.policy, models.reference_model.as_ref())?;
        let local = LocalBatches::new(&spec, train, eval)?;
        let steps_per_epoch = local.steps_per_epoch();
        let shape = RunShape {
            steps_per_epoch,
            total_steps: spec.total_steps(steps_per_epoch),
            has_eval: eval_report.is_some(),
            train_report: Some(train_report),
            eval_report,
        };
        let mut trainer = Self::assemble(
            spec,
            opts,
            collective,
            models,
            Box::new(local),
            shape,
            false,
        )?;
        trainer.writes_metrics = true;
        trainer.prepare_output(opts.resume)?;
        if trainer.spec.reference.precompute {
            trainer.precompute_reference()?;
        }
        Ok(trainer)
    }

    /// In a cluster: loads the model(s); batches come from `batches` (the
    /// coordinator), the run's shape from the coordinator too. Starts at step 0
    /// with the initial weights; `restore_checkpoint` and `sync_world` move it on.
    pub fn for_cluster(
        spec: RunSpec,
        opts: &TrainOptions,
        batches: Box<dyn Batches>,
        shape: RunShape,
    ) -> Result<Self> {
        if spec.data.negatives.as_deref() == Some("policy") {
            return Err(Error::Input {
                context: "data.negatives".into(),
                reason: "\"policy\" negatives are sampled by `dpo-worker train` (standalone); the coordinator cannot sample them yet".into(),
            });
        }
        let staged = refcache::precomputes(&spec);
        let models = Models::load(&spec, opts.device, staged)?;
        let out = spec.train.output.clone();
        std::fs::create_dir_all(&out).map_err(io_err(&out))?;
        Self::assemble(
            spec,
            opts,
            Box::new(crate::collective::Solo),
            models,
            batches,
            shape,
            staged,
        )
    }

    fn assemble(
        spec: RunSpec,
        opts: &TrainOptions,
        collective: Box<dyn Collective>,
        models: Models,
        batches: Box<dyn Batches>,
        shape: RunShape,
        staged: bool,
    ) -> Result<Self> {
        let Models {
            objective,
            policy,
            reference_model,
            wants_reference,
        } = models;
        let reference = if !wants_reference {
            Reference::Free
        } else if staged {
            Reference::Staged { model: None }
        } else {
            match reference_model {
                Some(model) => Reference::Model(Box::new(model)),
                None => Reference::Model(Box::new(checkpoint::load(
                    &spec.model.path,
                    kind_of(spec.model.dtype),
                    opts.device,
                )?)),
            }
        };
        let mut params: Vec<(String, Tensor)> =
            policy.var_store().variables().into_iter().collect();
        params.sort_by(|a, b| a.0.cmp(&b.0));
        let optimizer = Optimizer::new(&spec.optim, params)?;
        Ok(Trainer {
            spec,
            collective,
            generation: 0,
            halt_after_step: opts.halt_after_step,
            writes_metrics: false,
            objective,
            policy,
            reference,
            optimizer,
            batches,
            shape,
            step: 0,
            best_eval: None,
            bad_evals: 0,
            stopped_early: false,
        })
    }

    fn output(&self) -> &Path {
        &self.spec.train.output
    }

    fn checkpoints_dir(&self) -> PathBuf {
        self.output().join("checkpoints")
    }

    /// Optimizer steps completed.
    pub fn step(&self) -> u64 {
        self.step
    }

    pub fn total_steps(&self) -> u64 {
        self.shape.total_steps
    }

    /// Whether early stopping ended the run.
    pub fn stopped_early(&self) -> bool {
        self.stopped_early
    }

    /// Whether the run has nothing left to train.
    pub fn finished(&self) -> bool {
        self.step >= self.shape.total_steps || self.stopped_early
    }

    pub fn rank(&self) -> usize {
        self.collective.rank()
    }

    /// Joins a new world (generation): later collectives go to `collective`.
    pub fn set_collective(&mut self, collective: Box<dyn Collective>, generation: u64) {
        self.collective = collective;
        self.generation = generation;
    }

    /// Creates the output directory, refusing to mix two runs in one directory.
    fn prepare_output(&mut self, resume: bool) -> Result<()> {
        let out = self.output().to_path_buf();
        if self.collective.rank() != 0 {
            // Rank 0 owns the output directory; the others only read checkpoints.
            if resume && let Some((step, dir)) = latest_checkpoint(&self.checkpoints_dir())? {
                self.restore(step, &dir)?;
            }
            return Ok(());
        }
        std::fs::create_dir_all(&out).map_err(io_err(&out))?;
        let latest = latest_checkpoint(&self.checkpoints_dir())?;
        let metrics = out.join("metrics.jsonl");
        if resume {
            if let Some((step, dir)) = latest {
                self.restore(step, &dir)?;
                truncate_jsonl(&metrics, step)?;
                truncate_jsonl(&out.join("eval.jsonl"), step)?;
                tracing::info!(step, dir = %dir.display(), "resumed from checkpoint");
            } else {
                tracing::info!("no checkpoint to resume from; starting at step 0");
                remove_if_exists(&metrics)?;
                remove_if_exists(&out.join("eval.jsonl"))?;
            }
        } else if latest.is_some() || metrics.exists() {
            return Err(Error::Input {
                context: out.display().to_string(),
                reason: "this output directory already holds a run: pass --resume to continue it, or set train.output to a new directory".into(),
            });
        }
        let run = json!({
            "spec": serde_json::to_value(&self.spec).unwrap_or(Value::Null),
            "data": {"train": &self.shape.train_report, "eval": &self.shape.eval_report},
            "steps_per_epoch": self.shape.steps_per_epoch,
            "total_steps": self.shape.total_steps,
        });
        checkpoint::write_json(&out.join("run.json"), &run)
    }

    /// Loads the checkpoint `dir` (weights, optimizer state, step, early-stopping
    /// state) after verifying its manifest.
    pub fn restore_checkpoint(&mut self, dir: &Path) -> Result<()> {
        let state = checkpoint::read_json(&dir.join("trainer_state.json"))?;
        let step = state
            .get("step")
            .and_then(Value::as_u64)
            .ok_or_else(|| Error::Config {
                path: dir.join("trainer_state.json"),
                reason: "missing step".into(),
            })?;
        self.restore(step, dir)
    }

    fn restore(&mut self, step: u64, dir: &Path) -> Result<()> {
        verify_manifest(dir)?;
        checkpoint::load_weights(&self.policy, &dir.join("model"))?;
        let state = checkpoint::read_json(&dir.join("trainer_state.json"))?;
        let optim_path = dir.join("optimizer.safetensors");
        let tensors = checkpoint::read_tensors(&optim_path)?;
        let device = self.policy.device();
        let tensors = tensors
            .into_iter()
            .map(|(k, t)| t.f_to_device(device).map(|t| (k, t)))
            .collect::<std::result::Result<BTreeMap<_, _>, _>>()
            .op("optimizer state to device")?;
        self.optimizer.load_state(step, tensors)?;
        self.step = step;
        self.best_eval = state.get("best_eval_loss").and_then(Value::as_f64);
        self.bad_evals = state
            .get("evals_without_improvement")
            .and_then(Value::as_u64)
            .unwrap_or(0);
        Ok(())
    }

    /// Scores every train and eval example once with the reference model — or
    /// takes the sums from the reference cache, scoring only what it lacks — then
    /// frees the model.
    fn precompute_reference(&mut self) -> Result<()> {
        let Reference::Model(model) = &self.reference else {
            return Ok(());
        };
        let (Some(train_all), Some(eval_all)) = (
            self.batches.all(Split::Train),
            self.batches.all(Split::Eval),
        ) else {
            return Ok(());
        };
        let t = Instant::now();
        let m = self.spec.micro_batch_size();
        let packing = self.packing();
        let mut cache = match self.spec.reference_cache_dir() {
            Some(root) => {
                let ns = refcache::namespace_of(&self.spec, Some(&root))?;
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
        self.reference = Reference::Cached { train, eval };
        Ok(())
    }

    /// Whether this trainer takes its reference sums from the coordinator's
    /// reference stage.
    pub fn reference_staged(&self) -> bool {
        matches!(self.reference, Reference::Staged { .. })
    }

    /// The reference stage: scores `examples` (pairs) with the reference model,
    /// loading it first if this worker holds none. Returns each sequence's cache
    /// key and Σ log π_ref, chosen then rejected per example.
    pub fn score_reference(&mut self, examples: &[Example]) -> Result<Vec<(refcache::Key, f32)>> {
        let packing = self.packing();
        let kind = kind_of(self.spec.model.dtype);
        let device = self.policy.device();
        let Reference::Staged { model } = &mut self.reference else {
            return Err(Error::Input {
                context: "reference.precompute".into(),
                reason: "this run has no reference stage".into(),
            });
        };
        if model.is_none() {
            let t = Instant::now();
            let loaded = match self.spec.reference.path.as_str() {
                "same" | "none" => checkpoint::load(&self.spec.model.path, kind, device)?,
                dir => checkpoint::load_reference(
                    Path::new(dir),
                    kind,
                    device,
                    self.policy.config().vocab_size,
                )?,
            };
            tracing::info!(
                seconds = t.elapsed().as_secs_f64(),
                "loaded the reference model for the reference stage"
            );
            *model = Some(Box::new(loaded));
        }
        let Some(model) = model.as_deref() else {
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

    /// Ends this worker's part of the reference stage: frees the model and waits
    /// for every rank (so nobody trains before every share is stored).
    pub fn finish_reference_stage(&mut self) -> Result<()> {
        if let Reference::Staged { model } = &mut self.reference
            && model.take().is_some()
        {
            tracing::info!("reference stage done; the reference model is freed");
        }
        Ok(self.collective.barrier()?)
    }

    /// Row length for pair-aware packing, when the spec asks for it.
    fn packing(&self) -> Option<usize> {
        self.spec
            .train
            .packing
            .then(|| 2 * self.spec.data.max_length)
    }

    /// Reference sums for the micro-batch, laid out as its sequences.
    fn reference_sums(
        &mut self,
        mb: &MicroBatch,
        split: Split,
        idx: &[usize],
        given: Option<&[[f32; 2]]>,
    ) -> Result<Option<Tensor>> {
        let device = self.policy.device();
        // Sums of the cached kinds, laid out chosen then rejected.
        let sums: Vec<f32> = match &mut self.reference {
            Reference::Free => return Ok(None),
            Reference::Model(model) => {
                let _guard = tch::no_grad_guard();
                return Ok(Some(objective::score(model, mb)?.sums));
            }
            Reference::Staged { .. } => {
                let given = given.unwrap_or(&[]);
                if given.len() != idx.len() {
                    return Err(Error::Input {
                        context: "reference.precompute".into(),
                        reason: format!(
                            "the coordinator sent {} reference sums for {} examples: its reference stage is incomplete",
                            given.len(),
                            idx.len()
                        ),
                    });
                }
                given
                    .iter()
                    .map(|v| v[0])
                    .chain(given.iter().map(|v| v[1]))
                    .collect()
            }
            Reference::Cached { train, eval } => {
                let cache = if split == Split::Train { train } else { eval };
                idx.iter()
                    .map(|&i| cache[i][0] as f32)
                    .chain(idx.iter().map(|&i| cache[i][1] as f32))
                    .collect()
            }
        };
        Ok(Some(
            Tensor::f_from_slice(&sums)
                .and_then(|t| t.f_to_device(device))
                .op("cached reference")?,
        ))
    }

    /// Runs this rank's slice of a global batch in micro-batches; every term is
    /// normalised over the whole batch and (with `backward`) gradients are summed
    /// across ranks — so any world size computes the gradient of the same global
    /// batch. Returns the metric sums of the whole batch.
    fn run_slice(&mut self, split: Split, slice: &Slice, backward: bool) -> Result<Stats> {
        if !self.batches.ids_checked() {
            let vocab = self.policy.config().vocab_size;
            let file = match split {
                Split::Train => &self.spec.data.train,
                Split::Eval => self
                    .spec
                    .data
                    .eval
                    .as_ref()
                    .unwrap_or(&self.spec.data.train),
            };
            for e in &slice.examples {
                dpo_data::check_vocabulary(file, e.line, e.ids(), vocab)?;
            }
        }
        let pairwise = self.objective.loss.is_pairwise();
        let with_negatives = self.objective.loss == Loss::Combined;
        let mut stats = Stats::default();
        let m = self.spec.micro_batch_size();
        let refs: Vec<&Example> = slice.examples.iter().collect();
        for (k, (micro, micro_idx)) in refs.chunks(m).zip(slice.indices.chunks(m)).enumerate() {
            let given = slice
                .reference
                .get(k * m..(k * m + micro.len()).min(slice.reference.len()));
            let mb = MicroBatch::new(
                micro,
                pairwise,
                with_negatives,
                self.packing(),
                self.policy.device(),
            )?;
            let reference = self.reference_sums(&mb, split, micro_idx, given)?;
            let (loss, s) = if backward {
                let scores = objective::score(&self.policy, &mb)?;
                let (loss, s) = self.objective.micro_batch_loss(
                    &mb,
                    &scores,
                    reference.as_ref(),
                    &slice.norm,
                )?;
                loss.f_backward().op("backward")?;
                (loss, s)
            } else {
                let _guard = tch::no_grad_guard();
                let scores = objective::score(&self.policy, &mb)?;
                self.objective
                    .micro_batch_loss(&mb, &scores, reference.as_ref(), &slice.norm)?
            };
            drop(loss);
            stats.add(&s);
        }
        if backward {
            all_reduce_gradients(self.optimizer.params(), self.collective.as_mut())?;
        }
        self.sum_across_ranks(&stats)
    }

    /// Adds every rank's metric sums, in rank order (so every rank gets the same bits).
    fn sum_across_ranks(&mut self, stats: &Stats) -> Result<Stats> {
        if self.collective.world_size() == 1 {
            return Ok(stats.clone());
        }
        let bytes: Vec<u8> = stats
            .to_vec()
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        let blocks = self.collective.all_gather(&bytes)?;
        let mut total = vec![0.0f64; stats.to_vec().len()];
        for block in blocks {
            for (t, b) in total.iter_mut().zip(block.chunks_exact(8)) {
                let mut a = [0u8; 8];
                a.copy_from_slice(b);
                *t += f64::from_le_bytes(a);
            }
        }
        Ok(Stats::from_slice(&total))
    }

    /// A cheap hash (FNV-1a) of every parameter's bytes.
    fn parameter_hash(&self) -> Result<u64> {
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        for p in self.optimizer.params() {
            let t = p
                .f_detach()
                .and_then(|t| t.f_to_device(tch::Device::Cpu))
                .and_then(|t| t.f_contiguous())
                .op("parameter hash")?;
            let n = t.numel();
            let mut bytes = vec![0u8; n * t.kind().elt_size_in_bytes()];
            t.f_copy_data_u8(&mut bytes, n).op("parameter hash")?;
            for b in bytes {
                hash = (hash ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
            }
        }
        Ok(hash)
    }

    /// Fails loudly if the ranks' parameters are no longer identical (compared by a
    /// hash of their bytes).
    fn check_parameters_agree(&mut self, step: u64) -> Result<()> {
        if self.collective.world_size() == 1 {
            return Ok(());
        }
        let hash = self.parameter_hash()?;
        let hashes = self.collective.all_gather(&hash.to_le_bytes())?;
        if hashes.iter().any(|h| h.as_slice() != hash.to_le_bytes()) {
            return Err(Error::Diverged { step, hashes });
        }
        Ok(())
    }

    /// Makes this rank's training state that of rank `root`: parameters, optimizer
    /// moments and step, position in the run and early-stopping state.
    pub fn sync_from(&mut self, root: usize) -> Result<()> {
        if self.collective.world_size() == 1 {
            return Ok(());
        }
        let state = json!({
            "step": self.step,
            "optimizer_step": self.optimizer.step,
            "best_eval": self.best_eval,
            "bad_evals": self.bad_evals,
            "stopped_early": self.stopped_early,
        })
        .to_string();
        let got = self.collective.broadcast(state.as_bytes(), root)?;
        let state: Value = serde_json::from_slice(&got).map_err(|e| CollectiveError::Protocol {
            rank: self.collective.rank(),
            reason: format!("state from rank {root}: {e}"),
        })?;
        self.step = state["step"].as_u64().unwrap_or(0);
        self.optimizer.step = state["optimizer_step"].as_u64().unwrap_or(0);
        self.best_eval = state["best_eval"].as_f64();
        self.bad_evals = state["bad_evals"].as_u64().unwrap_or(0);
        self.stopped_early = state["stopped_early"].as_bool().unwrap_or(false);
        let params: Vec<Tensor> = self
            .optimizer
            .params()
            .iter()
            .map(Tensor::shallow_clone)
            .collect();
        broadcast_tensors(&params, root, self.collective.as_mut())?;
        if self.optimizer.step > 0 {
            let moments = self.optimizer.moments_mut()?;
            broadcast_tensors(&moments, root, self.collective.as_mut())?;
        }
        tracing::info!(
            rank = self.collective.rank(),
            root,
            step = self.step,
            "synchronised training state"
        );
        Ok(())
    }

    /// Brings every rank of a (new) world to the same state: the ranks compare
    /// (steps completed, parameter hash); if they differ, the lowest rank among those
    /// furthest ahead sends its state to the others (a joiner, or a survivor that
    /// missed the last step of a broken generation). Returns that root.
    pub fn sync_world(&mut self) -> Result<Option<usize>> {
        if self.collective.world_size() == 1 {
            return Ok(None);
        }
        let mut mine = self.step.to_le_bytes().to_vec();
        mine.extend(self.parameter_hash()?.to_le_bytes());
        let all = self.collective.all_gather(&mine)?;
        let step_of = |b: &[u8]| -> u64 {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[..8.min(b.len())]);
            u64::from_le_bytes(a)
        };
        if all.iter().any(|b| b.len() != 16) {
            return Err(CollectiveError::Protocol {
                rank: self.collective.rank(),
                reason: "malformed state summary from a peer".into(),
            }
            .into());
        }
        if all.iter().all(|b| *b == all[0]) {
            return Ok(None);
        }
        let max = all.iter().map(|b| step_of(b)).max().unwrap_or(0);
        let root = all.iter().position(|b| step_of(b) == max).unwrap_or(0);
        self.sync_from(root)?;
        Ok(Some(root))
    }

    /// Trains one optimizer step (the global batch of step `self.step()`) and
    /// returns its metrics. On an error nothing of the step is applied unless the
    /// optimizer already stepped (then `step()` says so).
    pub fn train_step(&mut self) -> Result<Metrics> {
        let t = Instant::now();
        let step = self.step;
        let (rank, world) = (self.collective.rank(), self.collective.world_size());
        let slice = self.batches.train(step, rank, world)?;
        self.optimizer.zero_grad()?;
        let stats = self.run_slice(Split::Train, &slice, true)?;
        let grad_norm = self
            .optimizer
            .clip_grad_norm(self.spec.optim.max_grad_norm)?;
        let o = &self.spec.optim;
        let lr = learning_rate(
            o.schedule,
            o.lr,
            o.warmup_steps,
            step,
            self.shape.total_steps,
        );
        self.optimizer.apply(lr)?;
        self.step = step + 1;
        let step = self.step;
        if !stats.loss.is_finite() {
            return Err(Error::Input {
                context: format!("step {step}"),
                reason: format!(
                    "the loss is {} — lower optim.lr or check the data",
                    stats.loss
                ),
            });
        }
        let secs = t.elapsed().as_secs_f64();
        let spe = self.shape.steps_per_epoch.max(1);
        let mut m: Metrics = vec![
            ("step".into(), step as f64),
            ("epoch".into(), step as f64 / spe as f64),
            ("generation".into(), self.generation as f64),
            ("world_size".into(), world as f64),
        ];
        m.extend(
            stats
                .metrics(&self.objective)
                .into_iter()
                .map(|(k, v)| (k.to_string(), v)),
        );
        m.extend([
            ("grad_norm".into(), grad_norm),
            ("learning_rate".into(), lr),
            ("tokens".into(), stats.tokens),
            ("tokens_per_second".into(), stats.tokens / secs.max(1e-9)),
        ]);
        if step % PARAMETER_CHECK_EVERY == 0 || step == self.shape.total_steps {
            self.check_parameters_agree(step)?;
        }
        Ok(m)
    }

    /// Evaluates when the step calls for it (`eval_every`, or the last step) and
    /// updates the early-stopping state; returns the eval metrics (with `step`).
    pub fn maybe_evaluate(&mut self) -> Result<Option<Metrics>> {
        let step = self.step;
        let every = self.spec.train.eval_every;
        if !self.shape.has_eval
            || !((every > 0 && step % every == 0) || step == self.shape.total_steps)
        {
            return Ok(None);
        }
        let (rank, world) = (self.collective.rank(), self.collective.world_size());
        let Some(slice) = self.batches.eval(rank, world)? else {
            return Ok(None);
        };
        let stats = self.run_slice(Split::Eval, &slice, false)?;
        let mut e: Metrics = vec![("step".into(), step as f64)];
        e.extend(
            stats
                .metrics(&self.objective)
                .into_iter()
                .map(|(k, v)| (format!("eval_{k}"), v)),
        );
        let loss = e.iter().find(|(k, _)| k == "eval_loss").map(|(_, v)| *v);
        if let Some(loss) = loss {
            if self.best_eval.is_none_or(|b| loss < b) {
                self.best_eval = Some(loss);
                self.bad_evals = 0;
            } else {
                self.bad_evals += 1;
            }
        }
        let patience = self.spec.train.early_stopping_patience;
        if patience > 0 && self.bad_evals >= patience && step < self.shape.total_steps {
            tracing::info!(step, patience, best = ?self.best_eval, "early stopping: eval loss stopped improving");
            self.stopped_early = true;
        }
        Ok(Some(e))
    }

    /// Rank 0 writes a checkpoint when `checkpoint_every` calls for one.
    pub fn maybe_checkpoint(&self) -> Result<Option<PathBuf>> {
        let step = self.step;
        let ck = self.spec.train.checkpoint_every;
        if self.collective.rank() == 0
            && ck > 0
            && step % ck == 0
            && step < self.shape.total_steps
            && !self.stopped_early
        {
            return self.write_checkpoint(step).map(Some);
        }
        Ok(None)
    }

    /// Rank 0 writes the final model under `train.output/final`.
    pub fn save_final(&self) -> Result<Option<PathBuf>> {
        if self.collective.rank() != 0 {
            return Ok(None);
        }
        let dir = self.output().join("final");
        checkpoint::save(
            &self.policy,
            &dir,
            Some(&self.spec.model.path),
            MAX_SHARD_BYTES,
        )?;
        Ok(Some(dir))
    }

    /// Trains to the end (or early stop), reporting through `on_event`.
    pub fn run(&mut self, on_event: &mut dyn FnMut(Event<'_>)) -> Result<Summary> {
        let started = Instant::now();
        self.sync_from(0)?;
        on_event(Event::Started {
            start_step: self.step,
            total_steps: self.shape.total_steps,
            train: self.shape.train_report.as_ref(),
            eval: self.shape.eval_report.as_ref(),
        });
        let out = self.output().to_path_buf();
        let writer = self.collective.rank() == 0 && self.writes_metrics;
        let mut metrics_file = if writer {
            Some(append(&out.join("metrics.jsonl"))?)
        } else {
            None
        };
        let mut eval_file = if writer {
            Some(append(&out.join("eval.jsonl"))?)
        } else {
            None
        };
        let mut last: Metrics = Vec::new();
        let mut last_eval = None;
        let total_steps = self.shape.total_steps;
        while !self.finished() {
            let m = self.train_step()?;
            let step = self.step;
            if let Some(f) = metrics_file.as_mut() {
                write_line(f, &out.join("metrics.jsonl"), &m)?;
            }
            on_event(Event::Step {
                step,
                total_steps,
                metrics: &m,
            });
            last = m;
            if let Some(e) = self.maybe_evaluate()? {
                if let Some(f) = eval_file.as_mut() {
                    write_line(f, &out.join("eval.jsonl"), &e)?;
                }
                on_event(Event::Eval { step, metrics: &e });
                last_eval = Some(e);
            }
            if let Some(dir) = self.maybe_checkpoint()? {
                on_event(Event::Checkpoint { step, path: &dir });
            }
            if self.halt_after_step == Some(step) && !self.finished() {
                return Err(Error::Halted { step });
            }
        }
        self.save_final()?;
        Ok(Summary {
            steps: self.step,
            last,
            eval: last_eval,
            stopped_early: self.stopped_early,
            output: out,
            seconds: started.elapsed().as_secs_f64(),
        })
    }

    /// Writes `checkpoints/step-N`: model, optimizer moments, trainer state and a
    /// manifest of SHA-256 checksums — under a temporary name, fsynced, renamed.
    fn write_checkpoint(&self, step: u64) -> Result<PathBuf> {
        let root = self.checkpoints_dir();
        std::fs::create_dir_all(&root).map_err(io_err(&root))?;
        let tmp = root.join(format!(".step-{step}.tmp-{}", std::process::id()));
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(io_err(&tmp))?;
        }
        checkpoint::save(
            &self.policy,
            &tmp.join("model"),
            Some(&self.spec.model.path),
            MAX_SHARD_BYTES,
        )?;
        checkpoint::write_tensors(&tmp.join("optimizer.safetensors"), &self.optimizer.state())?;
        let epoch = step / self.shape.steps_per_epoch.max(1);
        let state = json!({
            "step": step,
            "data_cursor": {"epoch": epoch, "batch_in_epoch": step % self.shape.steps_per_epoch.max(1), "seed": self.spec.data.seed},
            "best_eval_loss": self.best_eval,
            "evals_without_improvement": self.bad_evals,
        });
        checkpoint::write_json(&tmp.join("trainer_state.json"), &state)?;
        let mut files = serde_json::Map::new();
        for rel in list_files(&tmp)? {
            files.insert(rel.clone(), Value::String(sha256_file(&tmp.join(&rel))?));
        }
        checkpoint::write_json(
            &tmp.join("manifest.json"),
            &json!({"step": step, "files": files}),
        )?;
        sync_dir(&tmp.join("model"))?;
        sync_dir(&tmp)?;
        let dir = root.join(format!("step-{step}"));
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(io_err(&dir))?;
        }
        dpo_data::atomic::rename(&tmp, &dir).map_err(io_err(&dir))?;
        tracing::info!(step, dir = %dir.display(), "checkpoint written");
        Ok(dir)
    }
}

fn remove_if_exists(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io_err(path)(e)),
        _ => Ok(()),
    }
}

fn append(path: &Path) -> Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(io_err(path))
}

fn write_line(file: &mut File, path: &Path, m: &Metrics) -> Result<()> {
    dpo_data::metrics_log::append(file, m).map_err(io_err(path))
}

/// Keeps only the lines of a metrics file whose `step` is at most `step`.
fn truncate_jsonl(path: &Path, step: u64) -> Result<()> {
    dpo_data::metrics_log::keep_through(path, step).map_err(io_err(path))
}

/// The newest `checkpoints/step-N` directory.
pub fn latest_checkpoint(root: &Path) -> Result<Option<(u64, PathBuf)>> {
    if !root.exists() {
        return Ok(None);
    }
    let mut best: Option<(u64, PathBuf)> = None;
    for entry in std::fs::read_dir(root).map_err(io_err(root))? {
        let entry = entry.map_err(io_err(root))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(n) = name
            .strip_prefix("step-")
            .and_then(|n| n.parse::<u64>().ok())
            && best.as_ref().is_none_or(|(b, _)| n > *b)
        {
            best = Some((n, entry.path()));
        }
    }
    Ok(best)
}

fn list_files(dir: &Path) -> Result<Vec<String>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).map_err(io_err(&d))? {
            let path = entry.map_err(io_err(&d))?.path();
            if path.is_dir() {
                stack.push(path);
            } else if let Ok(rel) = path.strip_prefix(dir) {
                out.push(rel.to_string_lossy().into_owned());
            }
        }
    }
    out.sort();
    Ok(out)
}

fn sha256_file(path: &Path) -> Result<String> {
    let mut file = File::open(path).map_err(io_err(path))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(io_err(path))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// Checks every file listed in a checkpoint's manifest against its checksum.
pub fn verify_manifest(dir: &Path) -> Result<()> {
    let path = dir.join("manifest.json");
    let manifest = checkpoint::read_json(&path)?;
    let files = manifest
        .get("files")
        .and_then(Value::as_object)
        .ok_or_else(|| Error::Config {
            path: path.clone(),
            reason: "missing object files".into(),
        })?;
    for (rel, want) in files {
        let got = sha256_file(&dir.join(rel))?;
        if Some(got.as_str()) != want.as_str() {
            return Err(Error::Config {
                path: dir.join(rel),
                reason: "checksum does not match the checkpoint manifest (corrupt or partial checkpoint)".into(),
            });
        }
    }
    Ok(())
}

fn sync_dir(dir: &Path) -> Result<()> {
    dpo_data::atomic::sync_dir(dir).map_err(io_err(dir))
}
