//! The classifiers' objective, as the founding document states it:
//!
//! `loss = CE(gold) + negative_weight × mean over negative (position, label) of
//! −log(1 − p(label))`
//!
//! Both terms are normalised over the global batch — the cross-entropy by the
//! labelled positions (tokens for NER, examples for classification) of the whole
//! batch, the negative term by its negatives — so that micro-batches and ranks add
//! up to the loss of one big batch. `−log(1 − p)` is computed as
//! `logsumexp(z) − logsumexp(z without the label)`, which stays finite when `p`
//! is close to 1. `sft` is the cross-entropy alone.

use tch::{Device, Kind, Tensor};

use crate::error::{Result, TorchContext};
use crate::model::encoder::{Deferred, Encoder, Head};
use dpo_data::tagged::Encoded;

/// Global-batch totals the two terms are divided by.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Norm {
    pub targets: f64,
    pub negatives: f64,
}

impl Norm {
    pub fn of<'a>(examples: impl Iterator<Item = &'a Encoded>) -> Self {
        let mut n = Norm::default();
        for e in examples {
            n.targets += e.targets.len() as f64;
            n.negatives += e.negatives.len() as f64;
        }
        n
    }
}

/// A padded micro-batch and the positions its terms are taken at.
#[derive(Debug)]
pub struct Batch {
    pub input_ids: Tensor,
    pub attention_mask: Tensor,
    /// `(row, position, label)` of the labelled positions.
    targets: [Tensor; 3],
    /// `(row, position, label)` of the negatives.
    negatives: [Tensor; 3],
    n_targets: usize,
    n_negatives: usize,
}

fn triple(items: &[(i64, i64, i64)], device: Device) -> [Tensor; 3] {
    let col = |f: fn(&(i64, i64, i64)) -> i64| {
        Tensor::from_slice(&items.iter().map(f).collect::<Vec<_>>()).to_device(device)
    };
    [col(|t| t.0), col(|t| t.1), col(|t| t.2)]
}

impl Batch {
    /// Right-pads `examples` with `pad` into one batch on `device`.
    pub fn new(examples: &[&Encoded], pad: i64, device: Device) -> Self {
        let longest = examples
            .iter()
            .map(|e| e.input_ids.len())
            .max()
            .unwrap_or(1);
        let mut ids = vec![pad; examples.len() * longest];
        let mut mask = vec![0i64; examples.len() * longest];
        let mut targets = Vec::new();
        let mut negatives = Vec::new();
        for (row, e) in examples.iter().enumerate() {
            for (j, &t) in e.input_ids.iter().enumerate() {
                ids[row * longest + j] = t as i64;
                mask[row * longest + j] = 1;
            }
            targets.extend(
                e.targets
                    .iter()
                    .map(|&(p, l)| (row as i64, p as i64, l as i64)),
            );
            negatives.extend(
                e.negatives
                    .iter()
                    .map(|&(p, l)| (row as i64, p as i64, l as i64)),
            );
        }
        let shape = [examples.len() as i64, longest as i64];
        Batch {
            input_ids: Tensor::from_slice(&ids).view(shape).to_device(device),
            attention_mask: Tensor::from_slice(&mask).view(shape).to_device(device),
            n_targets: targets.len(),
            n_negatives: negatives.len(),
            targets: triple(&targets, device),
            negatives: triple(&negatives, device),
        }
    }
}

/// Sums over a micro-batch (or many), for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Sums {
    pub ce: f64,
    pub negative: f64,
    /// Σ p(gold) over labelled positions, Σ p(label) over negatives.
    pub p_gold: f64,
    pub p_negative: f64,
    pub targets: f64,
    pub negatives: f64,
    /// Labelled positions whose most likely label is the gold one.
    pub correct: f64,
}

impl Sums {
    pub fn add(&mut self, o: &Sums) {
        self.ce += o.ce;
        self.negative += o.negative;
        self.p_gold += o.p_gold;
        self.p_negative += o.p_negative;
        self.targets += o.targets;
        self.negatives += o.negatives;
        self.correct += o.correct;
    }

    /// The loss these sums make under `weight` (normalised by their own counts).
    pub fn loss(&self, weight: Option<f64>) -> f64 {
        let ce = if self.targets > 0.0 {
            self.ce / self.targets
        } else {
            0.0
        };
        match weight {
            Some(w) if self.negatives > 0.0 => ce + w * self.negative / self.negatives,
            _ => ce,
        }
    }

    /// Metric lines under `prefix` (`""` or `"eval_"`).
    pub fn metrics(&self, weight: Option<f64>, prefix: &str) -> Vec<(String, f64)> {
        let per = |a: f64, n: f64| if n > 0.0 { a / n } else { 0.0 };
        let mut m = vec![
            (format!("{prefix}loss"), self.loss(weight)),
            (format!("{prefix}ce"), per(self.ce, self.targets)),
            (format!("{prefix}p_gold"), per(self.p_gold, self.targets)),
            (
                format!("{prefix}label_accuracy"),
                per(self.correct, self.targets),
            ),
        ];
        if self.negatives > 0.0 {
            m.push((
                format!("{prefix}negative_loss"),
                per(self.negative, self.negatives),
            ));
            m.push((
                format!("{prefix}p_negative"),
                per(self.p_negative, self.negatives),
            ));
            m.push((format!("{prefix}negatives"), self.negatives));
        }
        m
    }
}

/// Logits at `(row, position)` pairs: `[N, L]`.
fn gather(
    logits: &Tensor,
    head: Head,
    at: &[Tensor; 3],
) -> std::result::Result<Tensor, tch::TchError> {
    match head {
        Head::Token => logits.f_index(&[Some(&at[0]), Some(&at[1])]),
        Head::Sequence => logits.f_index_select(0, &at[0]),
    }
}

/// The micro-batch's share of the global loss (a scalar with a graph when
/// gradients are on) and its sums. `weight`: the negative term's weight
/// (`None` for `sft`). With gradient checkpointing or ZeRO stage 2 the
/// layers' backward is left to do after the loss's: the third value, for
/// [`Encoder::backward_deferred`].
pub fn micro_batch_loss(
    model: &Encoder,
    batch: &Batch,
    norm: Norm,
    weight: Option<f64>,
) -> Result<(Tensor, Sums, Option<Deferred>)> {
    let (logits, deferred) = model.forward_deferred(&batch.input_ids, &batch.attention_mask)?;
    let (loss, sums) = loss_of_logits(&logits, model.head(), batch, norm, weight)?;
    Ok((loss, sums, deferred))
}

/// [`micro_batch_loss`] from the model's logits of `batch`.
pub fn loss_of_logits(
    logits: &Tensor,
    head: Head,
    batch: &Batch,
    norm: Norm,
    weight: Option<f64>,
) -> Result<(Tensor, Sums)> {
    let inner = || -> std::result::Result<(Tensor, Sums), tch::TchError> {
        let logits = logits.f_to_kind(Kind::Float)?;
        let device = logits.device();
        let mut loss = Tensor::f_zeros([], (Kind::Float, device))?;
        let mut sums = Sums {
            targets: batch.n_targets as f64,
            negatives: batch.n_negatives as f64,
            ..Sums::default()
        };
        if batch.n_targets > 0 {
            let z = gather(&logits, head, &batch.targets)?;
            let logp = z.f_log_softmax(-1, Kind::Float)?;
            let gold = logp
                .f_gather(1, &batch.targets[2].f_unsqueeze(1)?, false)?
                .f_squeeze_dim(1)?;
            let ce = gold.f_neg()?.f_sum(Kind::Float)?;
            loss = loss.f_add(&ce.f_div_scalar(norm.targets.max(1.0))?)?;
            let _g = tch::no_grad_guard();
            sums.ce = ce.f_double_value(&[])?;
            sums.p_gold = gold.f_exp()?.f_sum(Kind::Float)?.f_double_value(&[])?;
            let best = z.f_argmax(-1, false)?;
            sums.correct = best
                .f_eq_tensor(&batch.targets[2])?
                .f_sum(Kind::Float)?
                .f_double_value(&[])?;
        }
        if batch.n_negatives > 0 {
            let z = gather(&logits, head, &batch.negatives)?;
            let label = batch.negatives[2].f_unsqueeze(1)?;
            let all = z.f_logsumexp([-1], false)?;
            // The label's logit set to −∞: the log of the other labels' mass.
            let others = z
                .f_scatter_value(1, &label, f64::NEG_INFINITY)?
                .f_logsumexp([-1], false)?;
            // −log(1 − p) = logsumexp(z) − logsumexp(z without the label).
            let term = all.f_sub(&others)?;
            let neg = term.f_sum(Kind::Float)?;
            if let Some(w) = weight {
                loss = loss.f_add(&neg.f_mul_scalar(w / norm.negatives.max(1.0))?)?;
            }
            let _g = tch::no_grad_guard();
            sums.negative = neg.f_double_value(&[])?;
            sums.p_negative = z
                .f_log_softmax(-1, Kind::Float)?
                .f_gather(1, &label, false)?
                .f_exp()?
                .f_sum(Kind::Float)?
                .f_double_value(&[])?;
        }
        Ok((loss, sums))
    };
    inner().op("classification loss")
}
