//! Where a rank's share of each global batch comes from: the run's own files
//! (standalone, `LocalBatches`) or the coordinator (cluster). Either way the
//! batch of a step is a function of the run alone, never of the world size.

use dpo_data::batches::{EpochPlan, rank_share};
use dpo_data::{DataReport, Example, TextTokenizer, dataset};
use dpo_proto::{Loss, RunSpec};

use crate::error::{Error, Result};
use crate::generate::{Sampling, generate};
use crate::model::CausalLm;
use crate::objective::Normalizer;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Split {
    Train,
    Eval,
}

/// One rank's share of a global batch.
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
pub(super) type LoadedData = (Vec<Example>, DataReport, Vec<Example>, Option<DataReport>);

/// Loads the run's train and eval files as examples (negatives sampled from the
/// reference model, or the initial policy, when `data.negatives = "policy"`).
pub(super) fn load_examples(
    spec: &RunSpec,
    policy: &CausalLm,
    reference_model: Option<&CausalLm>,
) -> Result<LoadedData> {
    let vocab = policy.config().vocab_size;
    // Pre-tokenized data needs no tokenizer; a tokenizer that is there but
    // broken is an error all the same.
    let tokenizer = if TextTokenizer::present(&spec.model.path) {
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
    if let Some(t) = &tokenizer {
        t.warn_if_longer_than_model(spec.data.max_length);
    }
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
    // One layout for the run's datasets: data.limits bound them together.
    let layout = dpo_data::records::Layout::of(&spec.data);
    let (train, train_report) = dataset::load(
        spec,
        &layout,
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
                &layout,
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
