//! The trainer: `dpo-worker train --config run.toml` standalone, and each
//! rank's training in a cluster.
//!
//! One optimizer step consumes exactly `global_batch_size` examples, taken in the
//! seeded per-epoch order; they are split into micro-batches whose losses are
//! normalised over the global batch, so accumulation equals one big batch. Chosen
//! and rejected sequences of a micro-batch go through the model in one forward.
//! Checkpoints hold everything needed to continue bit-exactly: weights, optimizer
//! moments, step (which fixes the data cursor, since the order is a function of seed
//! and epoch) and early-stopping state, with a checksummed manifest, written under a
//! temporary name, fsynced and renamed.
//!
//! In parts: `run_loop` (the one loop every task trains through, and early
//! stopping), `rank_state` (what every task's rank holds alike: its world, the
//! optimizer, the `TrainerState` ranks exchange and checkpoints store, ZeRO's
//! share — and keeping ranks identical), `stage2` (ZeRO stage 2 over any layer
//! stack), `output` (the output folder, held open for the run), `metrics`
//! (metric lines and files), `classify` (the classification task); for the
//! causal LM, `batches` (where a rank's share of a global batch comes from),
//! `reference` (where reference log-probs come from: one `ReferenceSource` per
//! mode) and `checkpoint` (checkpoints, resume, the output directory). This
//! file is the causal-LM task: its models, its step and its evaluation.

mod batches;
pub(crate) mod checkpoint;
pub mod classify;
pub(crate) mod metrics;
pub mod output;
pub(crate) mod rank_state;
mod reference;
pub mod run_loop;
pub(crate) mod stage2;
mod training_run;

use std::time::Instant;

use dpo_data::refcache;
use dpo_data::{DataReport, Example};
use dpo_proto::{Loss, Negatives, ReferenceModel, RunSpec};
use tch::{Device, Tensor};

use crate::collective::Collective;
use crate::error::{Error, Result, TorchContext};
use crate::model::llama::LayerGrads;
use crate::model::{CausalLm, checkpoint as model_io, kind_of};
use crate::objective::{self, MicroBatch, Objective, Stats};
use crate::optim::{Optimizer, learning_rate};

pub use batches::{Batches, LocalBatches, Slice, Split};
pub use checkpoint::{latest_checkpoint, read_optimizer_state, verify_manifest};
pub use metrics::Metrics;
pub use output::{OutputPath, RunOutput};
pub use rank_state::{RankState, Rollback, Synced, TrainerState, WorldSync};
pub use reference::{BatchPosition, ReferenceSource};
pub use run_loop::{EarlyStopping, Evaluation, Event, Started, Summary, TrainingRun};

use batches::load_examples;
use metrics::{StepFacts, eval_metrics, step_metrics};
use rank_state::PARAMETER_CHECK_EVERY;
use reference::{FrozenModel, NoReference, PolicyBase, Precomputed, Staged};

/// ZeRO stage 3's [`LayerGather`](crate::model::llama::LayerGather): a
/// layer's shares all-gathered over the world's collective.
struct WorldGather(Box<dyn Collective>);

impl crate::model::llama::LayerGather for WorldGather {
    fn gather(&mut self, n: usize, start: usize, share: &[f32]) -> Result<Vec<f32>> {
        let mut values = vec![0.0f32; n];
        values
            .get_mut(start..start + share.len())
            .ok_or(Error::State("ZeRO stage 3: a share outside its layer"))?
            .copy_from_slice(share);
        self.0.all_gather_chunks(&mut values)?;
        Ok(values)
    }

    fn into_any(self: Box<Self>) -> Box<dyn std::any::Any> {
        self
    }
}

/// SplitMix64's finaliser: mixes seeds into well-spread ones.
pub(crate) fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// How to run.
#[derive(Debug, Clone)]
pub struct TrainOptions {
    /// Continue from the newest checkpoint under `train.output`.
    pub resume: bool,
    pub device: Device,
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
        // Loads libtorch's CUDA half for a CUDA device, or names why it cannot.
        crate::cuda::check_device(device)?;
        let model_type = crate::model::config::ModelType::of_dir(&spec.model.path)?;
        if model_type.is_encoder() {
            return Err(Error::Config {
                path: spec.model.path.join("config.json"),
                reason: format!(
                    "model_type {:?} is an encoder: set [task] type = \"token-classification\" or \"sequence-classification\"",
                    model_type.name()
                ),
            });
        }
        let kind = kind_of(spec.model.dtype);
        let objective = Objective::from_spec(&spec.objective);
        // ZeRO stage 3: the decoder layers come as this rank's share once the
        // world is known (`shard_base_for_world`).
        let mut policy = if spec.train.zero_stage == 3 {
            model_io::load_sharded(&spec.model.path, kind, device)?
        } else {
            model_io::load(&spec.model.path, kind, device)?
        };
        policy.set_head_chunk(spec.train.head_chunk_tokens);
        policy.set_gradient_checkpointing(spec.train.gradient_checkpointing);
        if let Some(lora) = &spec.lora {
            policy.add_lora(lora, spec.data.seed)?;
            if let Some(dir) = &lora.init_from {
                crate::model::peft::load_adapter(&policy, dir, "lora.init_from")?;
            }
        } else if !spec.train.freeze.is_empty() {
            policy.freeze(&spec.train.freeze)?;
        }
        let vocab = policy.config().vocab_size;
        // The reference model, when the objective uses one or when negatives are
        // sampled from it; "same" and "none" sample from the initial policy.
        let wants_reference =
            objective.needs_reference() && spec.reference.path != ReferenceModel::None;
        let samples_policy = spec.data.negatives == Some(Negatives::Policy);
        let reference_model = match spec.reference.path.dir() {
            Some(dir) if (wants_reference && !staged) || samples_policy => {
                let mut reference = model_io::load_reference(dir, kind, device, vocab)?;
                reference.set_head_chunk(spec.train.head_chunk_tokens);
                Some(reference)
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
    /// This rank's share: its world, the optimizer, the step, ZeRO's share.
    world: RankState,
    /// The generation of the world (0 standalone; set by the coordinator).
    generation: u64,
    /// Whether rank 0 writes metrics.jsonl and eval.jsonl (standalone); in a
    /// cluster the coordinator writes them from the ranks' reports.
    writes_metrics: bool,
    /// The output folder, held open for the run.
    out: RunOutput,
    objective: Objective,
    policy: CausalLm,
    reference: Box<dyn ReferenceSource>,
    batches: Box<dyn Batches>,
    shape: RunShape,
    /// Stage 2: the decoder layers' parameters, to reduce layer by layer.
    layer_map: Option<stage2::LayerMap>,
    /// The device's memory in use, sampled (CUDA ranks).
    cuda_memory: Option<crate::cuda::PeakSampler>,
    /// The LoRA adapters as the run started (for a rollback to the initial
    /// weights; adapters are small).
    initial_adapters: Vec<(String, Tensor)>,
}

impl std::fmt::Debug for Trainer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trainer")
            .field("run", &self.spec.name)
            .field("step", &self.world.state.step)
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
        metrics::reset_peak_resident();
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
        let out = RunOutput::open(&spec.train.output, OutputPath::Trusted)?;
        let mut trainer = Self::assemble(spec, opts, models, Box::new(local), shape, false, out)?;
        trainer.world.collective = collective;
        trainer.shard_base_for_world()?;
        trainer.writes_metrics = true;
        trainer.prepare_output(opts.resume)?;
        if trainer.spec.reference.precompute {
            trainer.with_lent_collective(|t| t.precompute_reference())?;
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
        if spec.data.negatives == Some(Negatives::Policy) {
            return Err(Error::Input {
                context: "data.negatives".into(),
                reason: "\"policy\" negatives are sampled by `dpo-worker train` (standalone); the coordinator cannot sample them yet".into(),
            });
        }
        // A worker serves run after run: this run's peak is its own.
        metrics::reset_peak_resident();
        let staged = refcache::precomputes(&spec);
        let models = Models::load(&spec, opts.device, staged)?;
        let out = RunOutput::open(&spec.train.output, OutputPath::Confined)?;
        Self::assemble(spec, opts, models, batches, shape, staged, out)
    }

    /// The trainer of a world of one (`set_collective` joins it to another).
    fn assemble(
        spec: RunSpec,
        opts: &TrainOptions,
        models: Models,
        batches: Box<dyn Batches>,
        shape: RunShape,
        staged: bool,
        out: RunOutput,
    ) -> Result<Self> {
        let Models {
            objective,
            policy,
            reference_model,
            wants_reference,
        } = models;
        let reference: Box<dyn ReferenceSource> = if !wants_reference {
            Box::new(NoReference)
        } else if policy.adapters().is_some()
            && spec.reference.path == ReferenceModel::Same
            && !staged
        {
            Box::new(PolicyBase)
        } else if staged {
            let vocab = policy.config().vocab_size;
            Box::new(Staged::new(
                &spec,
                kind_of(spec.model.dtype),
                opts.device,
                vocab,
            ))
        } else {
            let model = match reference_model {
                Some(model) => model,
                None => model_io::load(&spec.model.path, kind_of(spec.model.dtype), opts.device)?,
            };
            Box::new(FrozenModel(Box::new(model)))
        };
        // What trains: the adapters (LoRA), or the parameters not frozen.
        let params = policy.trainable_parameters();
        let initial_adapters = match policy.adapters() {
            Some(_) => params
                .iter()
                // `× 1` makes a copy that later steps do not touch.
                .map(|(n, t)| {
                    t.f_detach()
                        .and_then(|t| t.f_mul_scalar(1.0))
                        .map(|c| (n.clone(), c))
                })
                .collect::<std::result::Result<Vec<_>, _>>()
                .op("the initial adapters")?,
            None => Vec::new(),
        };
        // The metric early stopping watches must be one this objective reports.
        let name = &spec.train.metric_for_best_model;
        let known: Vec<String> = Stats::default()
            .metrics(&objective)
            .into_iter()
            .map(|(k, _)| format!("eval_{k}"))
            .collect();
        if !known.contains(name) {
            return Err(Error::Input {
                context: "train.metric_for_best_model".into(),
                reason: format!(
                    "{name:?} is not among this run's eval metrics: {}",
                    known.join(", ")
                ),
            });
        }
        let optimizer = Optimizer::new(&spec.optim, params)?;
        let layers = policy.config().num_hidden_layers as usize;
        let layer_map =
            (spec.train.zero_stage == 2).then(|| stage2::LayerMap::new(&optimizer, layers));
        let mut policy = policy;
        policy.set_staged_backward(layer_map.is_some());
        let cuda_memory = match policy.device() {
            Device::Cuda(i) => crate::cuda::PeakSampler::start(i)
                .map_err(|e| tracing::warn!(error = %e, "no GPU memory figures"))
                .ok(),
            _ => None,
        };
        Ok(Trainer {
            world: RankState::new(&spec, optimizer),
            spec,
            generation: 0,
            writes_metrics: false,
            out,
            objective,
            policy,
            reference,
            batches,
            shape,
            layer_map,
            cuda_memory,
            initial_adapters,
        })
    }

    pub fn rank(&self) -> usize {
        self.world.collective.rank()
    }

    /// Puts the LoRA adapters back to how the run started (a rollback to the
    /// initial weights).
    fn reset_adapters(&mut self) -> Result<()> {
        let _guard = tch::no_grad_guard();
        let current = self.policy.trainable_parameters();
        for ((name, t), (initial_name, initial)) in current.iter().zip(&self.initial_adapters) {
            if name != initial_name {
                return Err(Error::State("the adapters changed since the run started"));
            }
            t.shallow_clone()
                .f_copy_(initial)
                .op("resetting the adapters")?;
        }
        Ok(())
    }

    /// ZeRO stage 3: gives this rank its share of the frozen base for the
    /// current world (read from the model's files; a no-op when it has it).
    fn shard_base_for_world(&mut self) -> Result<()> {
        if !self.policy.is_sharded() {
            return Ok(());
        }
        let files = model_io::TensorIndex::open_causal_lm(&self.spec.model.path)?;
        let (world, rank) = (
            self.world.collective.world_size(),
            self.world.collective.rank(),
        );
        self.policy.shard_base(&files, world, rank)
    }

    /// Runs `f` with the world's all-gather lent to the policy (ZeRO stage 3
    /// makes each layer whole through it), and takes the collective back
    /// whatever happens.
    fn with_lent_collective<T>(&mut self, f: impl FnOnce(&mut Self) -> Result<T>) -> Result<T> {
        if !self.policy.is_sharded() {
            return f(self);
        }
        let c = std::mem::replace(
            &mut self.world.collective,
            Box::new(crate::collective::Solo),
        );
        self.policy.lend_gather(Box::new(WorldGather(c)));
        let out = f(self);
        let back = self
            .policy
            .take_gather()
            .and_then(|g| g.into_any().downcast::<WorldGather>().ok());
        match back {
            Some(g) => self.world.collective = g.0,
            None => return Err(Error::State("ZeRO stage 3: the lent collective was lost")),
        }
        out
    }

    /// Scores every train and eval example once with the frozen reference
    /// model (or takes the sums from the reference cache), then frees the model.
    fn precompute_reference(&mut self) -> Result<()> {
        let base = self.reference.policy_base();
        let _off = base.then(|| self.policy.adapters_off());
        let Some(model) = self
            .reference
            .frozen_model()
            .or(base.then_some(&self.policy))
        else {
            return Ok(());
        };
        let (Some(train_all), Some(eval_all)) = (
            self.batches.all(Split::Train),
            self.batches.all(Split::Eval),
        ) else {
            return Ok(());
        };
        let sums = Precomputed::compute(&self.spec, model, train_all, eval_all, self.packing())?;
        self.reference = Box::new(sums);
        Ok(())
    }

    /// Row length for pair-aware packing, when the spec asks for it.
    fn packing(&self) -> Option<usize> {
        self.spec
            .train
            .packing
            .then(|| 2 * self.spec.data.max_length)
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
        let m = self.spec.micro_batch_size();
        let refs: Vec<&Example> = slice.examples.iter().collect();
        // Stage 2 reduces every micro-batch: as many rounds as the rank with
        // the most micro-batches has.
        let stage2 = backward && self.world.zero.is_some() && self.layer_map.is_some();
        let rounds = if stage2 {
            self.world
                .most_micro_batches(refs.chunks(m).count() as u64)?
        } else {
            0
        };
        let rank = self.world.collective.rank();
        let (stats, done) =
            self.with_lent_collective(|t| t.micro_batches(split, slice, backward, stage2, rank))?;
        if let Some(map) = &self.layer_map {
            map.reduce_missing(done, rounds, &mut self.world)?;
        }
        if backward && !stage2 {
            let t = Instant::now();
            self.world.reduce_gradients()?;
            tracing::debug!(
                ms = t.elapsed().as_secs_f64() * 1e3,
                "gradients all-reduced"
            );
        }
        Ok(Stats::from_slice(&self.world.sum_across(&stats.to_vec())?))
    }

    /// The micro-batches of this rank's slice: forward, loss, and (with
    /// `backward`) the backward of each. Returns the metric sums and how many
    /// micro-batches ran. Under ZeRO stage 3 the world's collective is lent
    /// to the policy meanwhile.
    fn micro_batches(
        &mut self,
        split: Split,
        slice: &Slice,
        backward: bool,
        stage2: bool,
        rank: usize,
    ) -> Result<(Stats, u64)> {
        let pairwise = self.objective.loss.is_pairwise();
        let with_negatives = self.objective.loss == Loss::Combined;
        let m = self.spec.micro_batch_size();
        let refs: Vec<&Example> = slice.examples.iter().collect();
        let mut stats = Stats::default();
        let mut done = 0u64;
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
            let at = BatchPosition {
                split,
                indices: micro_idx,
                given,
            };
            let reference = self.reference.sums(&self.policy, &mb, at)?;
            if backward && self.spec.lora.as_ref().is_some_and(|l| l.dropout > 0.0) {
                // LoRA dropout: masks fixed by (seed, step, rank, micro-batch),
                // so a resumed run draws the same ones.
                let mix = [self.world.state.step, rank as u64, k as u64]
                    .iter()
                    .fold(self.spec.data.seed, |h, &x| splitmix(h ^ x));
                tch::manual_seed(mix as i64);
            }
            let (loss, s) = if backward {
                let mut scores = objective::score(&self.policy, &mb)?;
                let (loss, s) = self.objective.micro_batch_loss(
                    &mb,
                    &scores,
                    reference.as_ref(),
                    &slice.norm,
                )?;
                loss.f_backward().op("backward")?;
                let deferred = std::mem::take(&mut scores.deferred);
                match (&self.layer_map, &self.world.zero) {
                    (Some(map), Some(zero)) if stage2 => map.backward(
                        |grads| {
                            let layered = deferred.layers.is_some();
                            deferred.backward(&self.policy, grads)?;
                            Ok(layered)
                        },
                        zero,
                        &mut self.world.optimizer,
                        self.world.collective.as_mut(),
                    )?,
                    _ => deferred.backward(&self.policy, LayerGrads::Accumulate)?,
                }
                done += 1;
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
        Ok((stats, done))
    }

    /// Trains one optimizer step (the global batch of step `self.world.state.step()`) and
    /// returns its metrics. On an error nothing of the step is applied unless the
    /// optimizer already stepped (then `step()` says so).
    pub fn train_step(&mut self) -> Result<Metrics> {
        let t = Instant::now();
        let step = self.world.state.step;
        let (rank, world) = (
            self.world.collective.rank(),
            self.world.collective.world_size(),
        );
        let slice = self.batches.train(step, rank, world)?;
        tracing::debug!(step, ms = t.elapsed().as_secs_f64() * 1e3, "batch fetched");
        self.world.optimizer.zero_grad()?;
        let stats = self.run_slice(Split::Train, &slice, true)?;
        self.world.exchange_leavers()?;
        let grad_norm = self.world.clip_gradient(self.spec.optim.max_grad_norm)?;
        let o = &self.spec.optim;
        let lr = learning_rate(
            o.schedule,
            o.lr,
            o.warmup_steps,
            step,
            self.shape.total_steps,
        );
        // `log`: report the model state in the log (once, after the update
        // of the first step, when the moments exist).
        let facts = |trainer: &Self, log: bool| StepFacts {
            step: step + 1,
            steps_per_epoch: trainer.shape.steps_per_epoch,
            generation: trainer.generation,
            world,
            grad_norm,
            learning_rate: lr,
            seconds: t.elapsed().as_secs_f64(),
            peak_bytes: trainer.peak_bytes(),
            state_bytes_per_parameter: trainer.state_bytes_per_parameter(step + 1, log),
        };
        let torn = step_metrics(&stats, &self.objective, facts(self, false));
        self.world.apply(lr, torn)?;
        let step = self.world.state.step;
        if !stats.loss.is_finite() {
            return Err(Error::Input {
                context: format!("step {step}"),
                reason: format!(
                    "the loss is {} — lower optim.lr or check the data",
                    stats.loss
                ),
            });
        }
        let m = step_metrics(&stats, &self.objective, facts(self, true));
        if step % PARAMETER_CHECK_EVERY == 0 || step == self.shape.total_steps {
            self.world.check_parameters_agree(step)?;
        }
        Ok(m)
    }

    /// The rank's peak memory: the peak resident size on CPU; on a GPU the
    /// peak of the device's memory in use (`total − free`, as nvidia-smi
    /// shows it: libtorch's cached blocks and the CUDA context included),
    /// sampled every 2 ms.
    fn peak_bytes(&self) -> Option<u64> {
        match (&self.cuda_memory, self.policy.device()) {
            (Some(s), _) => Some(s.peak()),
            (None, tch::Device::Cpu) => metrics::peak_resident_bytes(),
            _ => None,
        }
    }

    /// Model-state bytes per trained parameter; logged at the first step.
    fn state_bytes_per_parameter(&self, step: u64, log: bool) -> f64 {
        let (parameters, bytes) = self.world.optimizer.state_bytes();
        let per = bytes as f64 / parameters.max(1) as f64;
        if log && step == 1 {
            tracing::info!(
                parameters,
                state_bytes = bytes,
                bytes_per_parameter = per,
                peak_bytes = ?self.peak_bytes(),
                "model state of this rank"
            );
        }
        per
    }

    /// Evaluates when the step calls for it (`eval_every`, or the last step) and
    /// updates the early-stopping state.
    fn evaluate_if_due(&mut self) -> Result<Option<Evaluation>> {
        let step = self.world.state.step;
        if !self.shape.has_eval
            || !self.world.evaluation_pending()
            || !run_loop::eval_due(
                &self.spec,
                step,
                self.shape.steps_per_epoch,
                self.shape.total_steps,
            )
        {
            return Ok(None);
        }
        let (rank, world) = (
            self.world.collective.rank(),
            self.world.collective.world_size(),
        );
        let Some(slice) = self.batches.eval(rank, world)? else {
            return Ok(None);
        };
        let stats = self.run_slice(Split::Eval, &slice, false)?;
        let metrics = eval_metrics(&stats, &self.objective, step);
        let best = self.world.state.stopping.observe(
            &self.spec,
            step,
            self.shape.total_steps,
            &metrics,
        )?;
        self.world.evaluated();
        Ok(Some(Evaluation {
            step,
            metrics,
            report: None,
            best,
        }))
    }
}
