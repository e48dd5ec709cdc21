//! Evaluation of a classifier: the loss on the eval split, predictions, and the
//! report the founding document asks for — entity-level precision/recall/F1
//! overall and per type (NER, seqeval's strict IOB2 rules), or accuracy, macro-F1
//! and the per-class report (classification). Also adversarial mining, which
//! reads the same predictions.

use serde::Serialize;
use tch::{Kind, Tensor};

use dpo_data::scores::{ClassReport, EntityReport, class_report, entity_report};
use dpo_data::tagged::{Encoded, Labels};

use super::objective::{Batch, Norm, Sums, loss_of_logits};
use crate::error::{Result, TorchContext};
use crate::model::encoder::{Encoder, Head};
use crate::train::Metrics;

/// What an evaluation measured.
#[derive(Debug, Clone, Serialize)]
pub struct EvalReport {
    pub examples: usize,
    /// The loss and its terms over the split.
    #[serde(skip)]
    pub sums: Sums,
    pub loss: f64,
    /// NER.
    pub entities: Option<EntityReport>,
    /// Classification.
    pub classes: Option<ClassReport>,
    #[serde(skip)]
    weight: Option<f64>,
}

impl EvalReport {
    /// The `eval_*` metrics of the report, with `step`.
    pub fn metrics(&self, step: u64) -> Metrics {
        let mut m: Metrics = vec![("step".into(), step as f64)];
        m.extend(self.sums.metrics(self.weight, "eval_"));
        if let Some(e) = &self.entities {
            m.push(("eval_precision".into(), e.overall.precision));
            m.push(("eval_recall".into(), e.overall.recall));
            m.push(("eval_f1".into(), e.overall.f1));
            m.push(("eval_accuracy".into(), e.word_accuracy));
            m.push(("eval_macro_f1".into(), e.averages.macro_f1));
            for (kind, s) in &e.per_type {
                m.push((format!("eval_{kind}_precision"), s.precision));
                m.push((format!("eval_{kind}_recall"), s.recall));
                m.push((format!("eval_{kind}_f1"), s.f1));
            }
        }
        if let Some(c) = &self.classes {
            m.push(("eval_accuracy".into(), c.accuracy));
            m.push(("eval_f1".into(), c.averages.macro_f1));
            m.push(("eval_macro_f1".into(), c.averages.macro_f1));
            m.push(("eval_weighted_f1".into(), c.averages.weighted_f1));
            for (label, s) in &c.per_class {
                m.push((format!("eval_{label}_f1"), s.f1));
            }
        }
        m
    }

    /// One metric by name (`eval_f1`, `eval_loss`, …).
    pub fn metric(&self, name: &str) -> Option<f64> {
        self.metrics(0)
            .into_iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v)
    }

    pub fn metric_names(&self) -> Vec<String> {
        self.metrics(0)
            .into_iter()
            .skip(1)
            .map(|(k, _)| k)
            .collect()
    }

    /// The headline figure: entity F1 (NER) or macro-F1 (classification).
    pub fn f1(&self) -> f64 {
        self.metric("eval_f1").unwrap_or(0.0)
    }

    /// The per-class table, as seqeval and scikit-learn print it.
    pub fn render(&self) -> String {
        let mut out = format!(
            "{:>14} {:>9} {:>9} {:>9} {:>9}\n",
            "", "precision", "recall", "f1-score", "support"
        );
        let row = |out: &mut String, name: &str, p: f64, r: f64, f: f64, n: u64| {
            out.push_str(&format!("{name:>14} {p:>9.4} {r:>9.4} {f:>9.4} {n:>9}\n"));
        };
        let averages = |out: &mut String, a: &dpo_data::scores::Averages, n: u64| {
            row(
                out,
                "macro avg",
                a.macro_precision,
                a.macro_recall,
                a.macro_f1,
                n,
            );
            let (p, r, f) = (a.weighted_precision, a.weighted_recall, a.weighted_f1);
            row(out, "weighted avg", p, r, f, n);
        };
        if let Some(e) = &self.entities {
            for (kind, s) in &e.per_type {
                row(&mut out, kind, s.precision, s.recall, s.f1, s.support);
            }
            let o = &e.overall;
            out.push('\n');
            row(
                &mut out,
                "micro avg",
                o.precision,
                o.recall,
                o.f1,
                o.support,
            );
            averages(&mut out, &e.averages, o.support);
            let (acc, loss) = (e.word_accuracy, self.loss);
            out.push_str(&format!("\nword accuracy {acc:.4}, loss {loss:.4}\n"));
        }
        if let Some(c) = &self.classes {
            let total: u64 = c.per_class.iter().map(|(_, s)| s.support).sum();
            for (label, s) in &c.per_class {
                row(&mut out, label, s.precision, s.recall, s.f1, s.support);
            }
            let acc = c.accuracy;
            out.push_str(&format!(
                "\n{:>14} {:>9} {:>9} {acc:>9.4} {total:>9}\n",
                "accuracy", "", ""
            ));
            averages(&mut out, &c.averages, total);
            out.push_str(&format!("\nloss {:.4}\n", self.loss));
        }
        out
    }
}

/// The most likely label at each labelled position of each example, and the
/// loss sums, one micro-batch at a time without gradients.
fn predict(
    model: &mut Encoder,
    examples: &[Encoded],
    pad: i64,
    micro: usize,
    weight: Option<f64>,
    mut visit: impl FnMut(&Encoded, &Tensor) -> Result<()>,
) -> Result<Sums> {
    model.set_training(false);
    let _guard = tch::no_grad_guard();
    let norm = Norm::of(examples.iter());
    let mut sums = Sums::default();
    let refs: Vec<&Encoded> = examples.iter().collect();
    for chunk in refs.chunks(micro.max(1)) {
        let batch = Batch::new(chunk, pad, model.device());
        let logits = model.forward(&batch.input_ids, &batch.attention_mask, None)?;
        let (_, s) = loss_of_logits(&logits, model.head(), &batch, norm, weight)?;
        sums.add(&s);
        let logits = logits
            .f_to_kind(Kind::Float)
            .and_then(|l| l.f_to_device(tch::Device::Cpu))
            .op("logits to host")?;
        for (row, e) in chunk.iter().enumerate() {
            let l = logits.f_get(row as i64).op("logits row")?;
            visit(e, &l)?;
        }
    }
    Ok(sums)
}

fn argmax_at(logits: &Tensor, positions: &[u32]) -> Result<Vec<u32>> {
    let idx = Tensor::from_slice(&positions.iter().map(|&p| p as i64).collect::<Vec<_>>());
    let best = logits
        .f_index_select(0, &idx)
        .and_then(|z| z.f_argmax(-1, false))
        .op("argmax")?;
    let v = Vec::<i64>::try_from(&best).op("predictions")?;
    Ok(v.into_iter().map(|x| x as u32).collect())
}

/// What one rank's share of an evaluation found: the loss sums and, per
/// example, the gold and predicted labels (every word's for NER, one for
/// classification). Shares are put together in rank order.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize)]
pub struct Partial {
    pub sums: Sums,
    pub examples: Vec<(Vec<u32>, Vec<u32>)>,
}

/// Predicts `examples` (one rank's share of an eval split).
pub fn predict_share(
    model: &mut Encoder,
    examples: &[Encoded],
    pad: i64,
    micro: usize,
    weight: Option<f64>,
) -> Result<Partial> {
    let head = model.head();
    let mut out = Vec::with_capacity(examples.len());
    let sums = predict(model, examples, pad, micro, weight, |e, logits| {
        let pred = match head {
            Head::Token => argmax_at(logits, &e.word_starts)?,
            Head::Sequence => {
                vec![logits.f_argmax(-1, false).op("argmax")?.int64_value(&[]) as u32]
            }
        };
        out.push((e.gold.clone(), pred));
        Ok(())
    })?;
    Ok(Partial {
        sums,
        examples: out,
    })
}

/// The report of an evaluation whose shares are `parts`.
pub fn report(parts: &[Partial], labels: &Labels, head: Head, weight: Option<f64>) -> EvalReport {
    let mut sums = Sums::default();
    for p in parts {
        sums.add(&p.sums);
    }
    let all = parts.iter().flat_map(|p| p.examples.iter());
    let name = |id: &u32| labels.name(*id).unwrap_or("O");
    let (entities, classes) = match head {
        Head::Token => {
            let gold: Vec<Vec<&str>> = all
                .clone()
                .map(|(g, _)| g.iter().map(name).collect())
                .collect();
            let pred: Vec<Vec<&str>> = all.map(|(_, p)| p.iter().map(name).collect()).collect();
            (Some(entity_report(&gold, &pred)), None)
        }
        Head::Sequence => {
            let gold: Vec<u32> = all
                .clone()
                .filter_map(|(g, _)| g.first().copied())
                .collect();
            let pred: Vec<u32> = all.filter_map(|(_, p)| p.first().copied()).collect();
            (None, Some(class_report(&gold, &pred, labels.names())))
        }
    };
    EvalReport {
        examples: parts.iter().map(|p| p.examples.len()).sum(),
        loss: sums.loss(weight),
        sums,
        entities,
        classes,
        weight,
    }
}

/// Evaluates `examples` in one process: loss, predictions, and the task's report.
pub fn evaluate(
    model: &mut Encoder,
    examples: &[Encoded],
    labels: &Labels,
    pad: i64,
    micro: usize,
    weight: Option<f64>,
) -> Result<EvalReport> {
    let part = predict_share(model, examples, pad, micro, weight)?;
    Ok(report(&[part], labels, model.head(), weight))
}

/// Adversarial negatives: at every labelled position of every example, the `k`
/// wrong labels the model now finds most likely.
pub fn mine_adversarial(
    model: &mut Encoder,
    examples: &[Encoded],
    pad: i64,
    micro: usize,
    k: usize,
) -> Result<Vec<Vec<(u32, u32)>>> {
    let head = model.head();
    let mut out = Vec::with_capacity(examples.len());
    predict(model, examples, pad, micro, None, |e, logits| {
        let mut mined = Vec::new();
        for &(pos, gold) in &e.targets {
            let z = match head {
                Head::Token => logits.f_get(pos as i64),
                Head::Sequence => Ok(logits.shallow_clone()),
            }
            .op("logits at a position")?;
            let labels = z.size().first().copied().unwrap_or(0);
            let take = (k as i64).min(labels - 1);
            if take <= 0 {
                continue;
            }
            let masked = z
                .f_index_fill(0, &Tensor::from_slice(&[gold as i64]), f64::NEG_INFINITY)
                .and_then(|m| m.f_topk(take, -1, true, true))
                .op("top wrong labels")?;
            let top = Vec::<i64>::try_from(&masked.1).op("top labels")?;
            mined.extend(top.into_iter().map(|l| (pos, l as u32)));
        }
        out.push(mined);
        Ok(())
    })?;
    Ok(out)
}
