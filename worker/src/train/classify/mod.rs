//! Training encoders for token classification (NER) and sequence classification
//! with negative samples — the founding document's worked example.
//!
//! One optimizer step consumes `train.global_batch_size` examples in the seeded
//! per-epoch order (the causal LMs' plan); they are cut into micro-batches whose
//! losses are normalised over the global batch (see [`objective`]), and, over a
//! world of several ranks, each rank trains a contiguous share and the gradients
//! are summed — so micro-batching and data parallelism leave a step unchanged.
//! The model is evaluated at the end of every epoch (or every `train.eval_every`
//! steps); `train.metric_for_best_model` decides early stopping and which weights
//! `final/` holds (the best evaluation's, else the last).
//!
//! In parts: `data` (files, labels, generated negatives, tokens), `objective`
//! (the combined loss), `evaluate` (predictions and reports), `checkpoint`
//! (checkpoints and resume), `step` (a step), `sync` (what a world adds to the
//! shared rank state). This file is the task and its evaluation; the
//! loop around them, early stopping and the output folder are the causal
//! LMs' too (`crate::train::run_loop`).

mod checkpoint;
mod step;
mod sync;
pub use dpo_data::task_data as data;
pub mod evaluate;
pub mod objective;

use std::path::{Path, PathBuf};

use dpo_data::TextTokenizer;
use dpo_data::batches::{EpochPlan, rank_range};
use dpo_data::tagged::Encoded;
use dpo_proto::{Loss, Negatives, RunSpec, TaskType};
use serde_json::json;
use tch::Device;

use crate::collective::Collective;
use crate::error::{Error, Result};
use crate::model::config::ModelType;
use crate::model::encoder::{Encoder, Head};
use crate::model::{checkpoint as model_io, kind_of};
use crate::optim::Optimizer;
use crate::train::checkpoint::{remove_if_exists, step_dirs, truncate_jsonl};
use crate::train::run_loop::{checkpoint_due, eval_due};
use crate::train::stage2::LayerMap;
use crate::train::{
    Evaluation, Metrics, OutputPath, RankState, RunOutput, Started, Synced, TrainingRun,
};

use data::TaskData;
use evaluate::EvalReport;
use objective::Norm;

/// Refuses a causal LM for a classification task, naming its config.
fn check_model(spec: &RunSpec) -> Result<()> {
    let dir = &spec.model.path;
    let model_type = ModelType::of_dir(dir)?;
    if model_type.is_encoder() {
        return Ok(());
    }
    Err(Error::Config {
        path: dir.join("config.json"),
        reason: format!(
            "model_type {:?} is a causal LM; task.type = {} needs an encoder ({})",
            model_type.name(),
            serde_json::to_string(&spec.task.kind).unwrap_or_default(),
            ModelType::ALL
                .into_iter()
                .filter(|t| t.is_encoder())
                .map(ModelType::name)
                .collect::<Vec<_>>()
                .join(", ")
        ),
    })
}

/// The model a run starts from: the encoder with its head (a new head drawn
/// from the seed) and, with `[lora]`, its adapters (drawn from the seed, or
/// `lora.init_from`) — the same every time, so a rollback can draw it again.
fn initial_model(
    spec: &RunSpec,
    labels: &dpo_data::tagged::Labels,
    device: Device,
) -> Result<Encoder> {
    let (mut model, report) = Encoder::load(
        &spec.model.path,
        head_of(spec.task.kind),
        Some(labels.names().to_vec()),
        kind_of(spec.model.dtype),
        device,
        spec.data.seed,
    )?;
    if !report.initialised.is_empty() {
        tracing::info!(new = ?report.initialised, labels = ?labels.names(), "a new classification head");
    }
    model.set_training(true);
    model.set_gradient_checkpointing(spec.train.gradient_checkpointing);
    if let Some(lora) = &spec.lora {
        // PEFT's LoRA for classification: adapters, and the head whole.
        model.add_lora(lora, spec.data.seed)?;
        if let Some(init) = &lora.init_from {
            model.load_adapter(init)?;
        }
    }
    Ok(model)
}

/// The head a task needs.
pub fn head_of(kind: TaskType) -> Head {
    match kind {
        TaskType::TokenClassification => Head::Token,
        _ => Head::Sequence,
    }
}

/// How to run.
#[derive(Debug, Clone, Copy)]
pub struct ClassifyOptions {
    pub device: Device,
    /// Continue from the newest checkpoint under `train.output`.
    pub resume: bool,
}

/// Where a cluster rank's batches come from (the coordinator, in `cluster`).
pub trait TaggedSource: Send {
    /// This rank's share of the global batch of `step`, and the batch's totals.
    fn train(&mut self, step: u64, rank: usize, world: usize) -> Result<(Vec<Encoded>, Norm)>;
    /// This rank's share of the eval split.
    fn eval(&mut self, rank: usize, world: usize) -> Result<Vec<Encoded>>;
}

/// The examples of a run: held here (standalone), or served by the coordinator.
enum Feed {
    Local {
        data: Box<TaskData>,
        plan: EpochPlan,
    },
    Remote(Box<dyn TaggedSource>),
}

/// The weights at the start of an epoch, which its adversarial negatives are
/// mined with (in the optimizer's parameter order).
struct Miner {
    epoch: u64,
    params: Vec<tch::Tensor>,
}

/// The shape of a cluster run, as the coordinator sends it.
#[derive(Debug, Clone, Copy)]
pub struct ClusterShape {
    pub steps_per_epoch: u64,
    pub total_steps: u64,
    pub has_eval: bool,
}

/// A classification run being trained.
pub struct ClassifierTrainer {
    spec: RunSpec,
    /// This rank's share: its world, the optimizer, the step and early
    /// stopping, ZeRO's share.
    world: RankState,
    model: Encoder,
    tokenizer_dir: PathBuf,
    labels: dpo_data::tagged::Labels,
    feed: Feed,
    has_eval: bool,
    total_steps: u64,
    steps_per_epoch: u64,
    pad: i64,
    /// The negative term's weight (`None`: `sft`, cross-entropy only).
    weight: Option<f64>,
    /// The generation of the world (0 standalone; set by the coordinator).
    generation: u64,
    resume: bool,
    /// The output folder, held open for the run.
    out: RunOutput,
    /// Adversarial negatives: the weights of the start of the current epoch,
    /// which every rank mines its share of each batch with.
    miner: Option<Miner>,
    /// ZeRO stage 2: the encoder layers' parameters, to reduce layer by layer.
    layer_map: Option<LayerMap>,
}

impl std::fmt::Debug for ClassifierTrainer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClassifierTrainer")
            .field("run", &self.spec.name)
            .field("step", &self.world.state.step)
            .field("total_steps", &self.total_steps)
            .finish()
    }
}

impl ClassifierTrainer {
    /// Loads the model, tokenizer and data of a classification run spec.
    pub fn new(
        spec: RunSpec,
        opts: ClassifyOptions,
        collective: Box<dyn Collective>,
    ) -> Result<Self> {
        check_model(&spec)?;
        let tokenizer = TextTokenizer::from_dir(&spec.model.path)?;
        tokenizer.warn_if_longer_than_model(spec.data.max_length);
        let max_positions = data::max_positions(&spec.model.path)?;
        let data = data::load(&spec, &tokenizer, max_positions)?;
        let global = spec.train.global_batch_size;
        let n = data.train.examples.len();
        let plan =
            EpochPlan::new(n, global, spec.data.seed, spec.data.shuffle).ok_or_else(|| {
                Error::Input {
                    context: "train.global_batch_size".into(),
                    reason: format!("{global} is more than the {n} training examples"),
                }
            })?;
        let steps_per_epoch = plan.steps_per_epoch();
        let shape = ClusterShape {
            steps_per_epoch,
            total_steps: spec.total_steps(steps_per_epoch),
            has_eval: data.eval.is_some(),
        };
        if spec.objective.loss == Loss::Combined
            && data.train.counts.negatives == 0
            && !matches!(spec.data.negatives, Some(Negatives::Adversarial))
        {
            tracing::warn!(
                "objective.loss = \"combined\" but the training data has no negatives: only the cross-entropy trains"
            );
        }
        let labels = data.labels.clone();
        let out = RunOutput::open(&spec.train.output, OutputPath::Trusted)?;
        Self::assemble(
            spec,
            opts,
            collective,
            labels,
            Feed::Local {
                data: Box::new(data),
                plan,
            },
            shape,
            out,
        )
    }

    /// In a cluster: batches come from the coordinator (`source`), the run's
    /// shape and labels too (the labels in the spec it sends).
    pub fn for_cluster(
        spec: RunSpec,
        device: Device,
        source: Box<dyn TaggedSource>,
        shape: ClusterShape,
    ) -> Result<Self> {
        check_model(&spec)?;
        let labels = dpo_data::tagged::Labels::new(spec.task.labels.clone()).map_err(|reason| {
            Error::Input {
                context: "task.labels from the coordinator".into(),
                reason: reason.0,
            }
        })?;
        let opts = ClassifyOptions {
            device,
            resume: false,
        };
        let out = RunOutput::open(&spec.train.output, OutputPath::Confined)?;
        Self::assemble(
            spec,
            opts,
            Box::new(crate::collective::Solo),
            labels,
            Feed::Remote(source),
            shape,
            out,
        )
    }

    fn assemble(
        spec: RunSpec,
        opts: ClassifyOptions,
        collective: Box<dyn Collective>,
        labels: dpo_data::tagged::Labels,
        feed: Feed,
        shape: ClusterShape,
        out: RunOutput,
    ) -> Result<Self> {
        let device = opts.device;
        crate::cuda::check_device(device)?;
        let dir = spec.model.path.clone();
        let mut model = initial_model(&spec, &labels, device)?;
        let pad = TextTokenizer::from_dir(&dir)?
            .pad_id()
            .map_or(model.config().pad_token_id, i64::from);
        let optimizer = Optimizer::new(&spec.optim, model.trainable_parameters())?;
        let layers = model.config().num_hidden_layers as usize;
        let layer_map = (spec.train.zero_stage == 2).then(|| LayerMap::new(&optimizer, layers));
        model.set_staged_backward(layer_map.is_some());
        let weight = match spec.objective.loss {
            Loss::Combined => Some(spec.objective.negative_weight),
            _ => None,
        };
        let mut world = RankState::new(&spec, optimizer);
        world.collective = collective;
        Ok(ClassifierTrainer {
            tokenizer_dir: dir,
            world,
            spec,
            model,
            labels,
            feed,
            has_eval: shape.has_eval,
            total_steps: shape.total_steps,
            steps_per_epoch: shape.steps_per_epoch,
            pad,
            weight,
            generation: 0,
            resume: opts.resume,
            out,
            miner: None,
            layer_map,
        })
    }

    pub fn model(&self) -> &Encoder {
        &self.model
    }

    pub fn labels(&self) -> &[String] {
        self.labels.names()
    }

    fn adversarial(&self) -> bool {
        self.spec.data.negatives == Some(Negatives::Adversarial)
    }

    /// Evaluates the eval split: each rank predicts its share, the shares are
    /// gathered in rank order and every rank builds the same report.
    pub fn evaluate(&mut self) -> Result<Option<EvalReport>> {
        if !self.has_eval {
            return Ok(None);
        }
        let (world, rank) = (
            self.world.collective.world_size(),
            self.world.collective.rank(),
        );
        let mine = match &mut self.feed {
            Feed::Local { data, .. } => match &data.eval {
                Some(eval) => {
                    let (start, len) = rank_range(eval.examples.len(), world, rank);
                    eval.examples[start..start + len].to_vec()
                }
                None => return Ok(None),
            },
            Feed::Remote(source) => source.eval(rank, world)?,
        };
        let part = evaluate::predict_share(
            &mut self.model,
            &mine,
            self.pad,
            self.spec.micro_batch_size(),
            self.weight,
        )?;
        self.model.set_training(true);
        let parts = if world == 1 {
            vec![part]
        } else {
            let bytes = serde_json::to_vec(&part).map_err(|e| Error::Input {
                context: "evaluation".into(),
                reason: e.to_string(),
            })?;
            self.world
                .collective
                .all_gather(&bytes)?
                .into_iter()
                .enumerate()
                .map(|(r, b)| {
                    serde_json::from_slice::<evaluate::Partial>(&b).map_err(|e| Error::Input {
                        context: format!("evaluation share of rank {r}"),
                        reason: e.to_string(),
                    })
                })
                .collect::<Result<Vec<_>>>()?
        };
        Ok(Some(evaluate::report(
            &parts,
            &self.labels,
            self.model.head(),
            self.weight,
        )))
    }

    /// Evaluates when the step calls for it (end of an epoch, `eval_every`, the
    /// last step) and judges the result; rank 0 keeps the best weights in
    /// `best/`.
    fn evaluate_if_due(&mut self) -> Result<Option<Evaluation>> {
        if !self.world.evaluation_pending()
            || !eval_due(
                &self.spec,
                self.world.state.step,
                self.steps_per_epoch,
                self.total_steps,
            )
        {
            return Ok(None);
        }
        let Some(report) = self.evaluate()? else {
            return Ok(None);
        };
        let metrics = report.metrics(self.world.state.step);
        let best = self.world.state.stopping.observe(
            &self.spec,
            self.world.state.step,
            self.total_steps,
            &metrics,
        )?;
        if best && self.world.collective.rank() == 0 {
            self.save_model("best")?;
        }
        self.world.evaluated();
        Ok(Some(Evaluation {
            step: self.world.state.step,
            metrics,
            report: Some(report),
            best,
        }))
    }

    /// Writes the checkpoint of this step when `train.checkpoint_every` calls
    /// for it (rank 0; not at the last step, which writes `final/`).
    fn checkpoint_if_due(&mut self) -> Result<Option<PathBuf>> {
        let due = checkpoint_due(
            &self.spec,
            self.world.state.step,
            self.total_steps,
            self.world.state.stopping.stopped_early,
        );
        if !due {
            return Ok(None);
        }
        // Every rank: under ZeRO each writes its share of the optimizer state.
        self.write_checkpoint()
    }

    /// Saves the model as an HF directory, whole or not at all.
    /// With LoRA: the adapter and head in PEFT's format, and with
    /// `lora.merge` the merged model in `merged/`.
    fn save_model(&self, name: &str) -> Result<PathBuf> {
        let source = Some(self.tokenizer_dir.as_path());
        self.out.publish(name, |dir| match &self.spec.lora {
            Some(lora) => {
                self.model.save_adapter(dir, &self.spec.model.path)?;
                if lora.merge {
                    self.model
                        .save_merged(&dir.join("merged"), source, 5 << 30)?;
                }
                Ok(())
            }
            None => self.model.save(dir, source, 5 << 30),
        })
    }

    /// Standalone: resumes from the newest checkpoint (`--resume`), or makes
    /// sure the output holds no other run, and writes `run.json` (rank 0).
    fn prepare_output(&mut self) -> Result<()> {
        let writer = self.world.collective.rank() == 0;
        let latest = step_dirs(&self.checkpoints_dir())?
            .into_iter()
            .max_by_key(|(n, _)| *n);
        if self.resume {
            if let Some((_, dir)) = &latest {
                self.restore(dir)?;
            } else {
                tracing::info!("no checkpoint to resume from; starting at step 0");
            }
        }
        if !writer {
            return Ok(());
        }
        let out = self.out.io();
        if self.resume {
            for f in ["metrics.jsonl", "eval.jsonl"] {
                if latest.is_some() {
                    truncate_jsonl(&out.join(f), self.world.state.step)?;
                } else {
                    remove_if_exists(&out.join(f))?;
                }
            }
        } else if self.out.holds("metrics.jsonl") || self.out.holds("final") || latest.is_some() {
            return Err(Error::Input {
                context: self.out.named().display().to_string(),
                reason: "this output directory already holds a run: pass --resume to continue it, or set train.output to a new directory".into(),
            });
        }
        let (train, eval) = match &self.feed {
            Feed::Local { data, .. } => (
                Some(counts_json(&data.train.counts)),
                data.eval.as_ref().map(|e| counts_json(&e.counts)),
            ),
            Feed::Remote(_) => (None, None),
        };
        let run = json!({
            "spec": serde_json::to_value(&self.spec).unwrap_or_default(),
            "labels": self.labels.names(),
            "data": {"train": train, "eval": eval},
            "steps_per_epoch": self.steps_per_epoch,
            "total_steps": self.total_steps,
        });
        model_io::write_json(&out.join("run.json"), &run)
    }
}

impl TrainingRun for ClassifierTrainer {
    fn spec(&self) -> &RunSpec {
        &self.spec
    }

    fn world(&self) -> &RankState {
        &self.world
    }

    fn world_mut(&mut self) -> &mut RankState {
        &mut self.world
    }

    fn total_steps(&self) -> u64 {
        self.total_steps
    }

    fn output(&self) -> &RunOutput {
        &self.out
    }

    fn has_eval(&self) -> bool {
        self.has_eval
    }

    fn writes_metrics(&self) -> bool {
        matches!(self.feed, Feed::Local { .. }) && self.world.collective.rank() == 0
    }

    fn begin(&mut self) -> Result<()> {
        self.prepare_output()?;
        self.world.enter_zero()
    }

    fn started(&self) -> Started {
        let (train, eval) = match &self.feed {
            Feed::Local { data, .. } => (
                Some(&data.train.counts),
                data.eval.as_ref().map(|e| &e.counts),
            ),
            Feed::Remote(_) => (None, None),
        };
        Started {
            start_step: self.world.state.step,
            total_steps: self.total_steps,
            train_examples: train.map(|c| c.examples),
            eval_examples: eval.map(|c| c.examples),
            labels: self.labels.names().to_vec(),
            labelled: train.map(|c| c.labelled),
            negatives: train.map(|c| c.negatives),
            trained_parameters: numel(self.model.trainable_parameters().iter().map(|(_, t)| t)),
            total_parameters: numel(self.model.var_store().variables().values())
                + self
                    .model
                    .adapters()
                    .map_or(0, |(store, _)| numel(store.variables().values())),
        }
    }

    /// The model before training, for the before/after report (not judged:
    /// `best/` holds trained weights only).
    fn initial_evaluation(&mut self) -> Result<Option<Evaluation>> {
        if self.world.state.step != 0 {
            return Ok(None);
        }
        Ok(self.evaluate()?.map(|report| Evaluation {
            step: 0,
            metrics: report.metrics(0),
            report: Some(report),
            best: false,
        }))
    }

    fn set_collective(&mut self, collective: Box<dyn Collective>, generation: u64) {
        self.world.collective = collective;
        self.generation = generation;
    }

    fn restore_checkpoint(&mut self, dir: &Path) -> Result<()> {
        // Read through the held output folder, not by the name.
        let dir = self.out.resolve(dir);
        self.restore(&dir)
    }

    fn restore_initial(&mut self) -> Result<()> {
        ClassifierTrainer::restore_initial(self)
    }

    fn sync_world(&mut self, checkpoint: Option<(&Path, u64)>) -> Result<Synced> {
        let synced = crate::train::run_loop::sync_world(self, checkpoint)?;
        self.sync_miner(synced.root)?;
        Ok(synced)
    }

    fn train_step(&mut self) -> Result<Metrics> {
        ClassifierTrainer::train_step(self)
    }

    fn maybe_evaluate(&mut self) -> Result<Option<Evaluation>> {
        self.evaluate_if_due()
    }

    fn maybe_checkpoint(&mut self) -> Result<Option<PathBuf>> {
        Ok(self.checkpoint_if_due()?.map(|dir| self.out.named_of(&dir)))
    }

    fn prune_checkpoints(&self) -> Result<()> {
        ClassifierTrainer::prune_checkpoints(self)
    }

    /// `final/` (rank 0): the best evaluation's weights (`best/`), else the
    /// current ones.
    fn save_final(&self) -> Result<()> {
        if self.world.collective.rank() != 0 {
            return Ok(());
        }
        if self.out.holds("best") {
            self.out.publish_copy("best", "final")?;
        } else {
            self.save_model("final")?;
        }
        Ok(())
    }
}

fn numel<'a>(tensors: impl Iterator<Item = &'a tch::Tensor>) -> u64 {
    tensors.map(|t| t.numel() as u64).sum()
}

fn counts_json(c: &data::DataCounts) -> serde_json::Value {
    json!({
        "examples": c.examples,
        "labelled": c.labelled,
        "negatives": c.negatives,
        "truncated": c.truncated,
    })
}
