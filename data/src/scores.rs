//! Evaluation reports of the encoder tasks.
//!
//! NER: entity-level precision, recall and F1, overall (micro) and per entity
//! type, by seqeval's strict IOB2 rules (`mode="strict", scheme=IOB2`): an entity
//! starts at `B-X` and runs over the `I-X` that follow; an `I-X` with no `B-X`
//! before it starts nothing. An entity is correct only when its type, start and
//! end all match. Classification: accuracy, and precision/recall/F1 per class with
//! their macro and support-weighted averages (scikit-learn's report). A ratio
//! with a zero denominator is 0, as both libraries report it.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

/// One entity: sentence, type, and the word span `[start, end)`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Entity {
    pub sentence: usize,
    pub kind: String,
    pub start: usize,
    pub end: usize,
}

/// Whether `tag` is an IOB2 tag (`O`, `B-X`, `I-X`).
pub fn is_iob2(tag: &str) -> bool {
    tag == "O"
        || tag
            .strip_prefix("B-")
            .or_else(|| tag.strip_prefix("I-"))
            .is_some_and(|t| !t.is_empty())
}

/// The entities of one sentence's tags, by the strict IOB2 rules.
pub fn entities(tags: &[&str], sentence: usize) -> Vec<Entity> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < tags.len() {
        let Some(kind) = tags[i].strip_prefix("B-") else {
            i += 1;
            continue;
        };
        let mut end = i + 1;
        while end < tags.len() && tags[end].strip_prefix("I-") == Some(kind) {
            end += 1;
        }
        out.push(Entity {
            sentence,
            kind: kind.to_string(),
            start: i,
            end,
        });
        i = end;
    }
    out
}

/// Precision, recall, F1 and counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Score {
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
    /// Gold items (entities, or examples of a class).
    pub support: u64,
    pub predicted: u64,
    pub correct: u64,
}

fn ratio(a: u64, b: u64) -> f64 {
    if b == 0 { 0.0 } else { a as f64 / b as f64 }
}

impl Score {
    pub fn of(correct: u64, predicted: u64, support: u64) -> Self {
        let precision = ratio(correct, predicted);
        let recall = ratio(correct, support);
        let f1 = if precision + recall == 0.0 {
            0.0
        } else {
            2.0 * precision * recall / (precision + recall)
        };
        Score {
            precision,
            recall,
            f1,
            support,
            predicted,
            correct,
        }
    }
}

/// Averages of per-class scores: plain (macro) and weighted by support.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Averages {
    pub macro_precision: f64,
    pub macro_recall: f64,
    pub macro_f1: f64,
    pub weighted_precision: f64,
    pub weighted_recall: f64,
    pub weighted_f1: f64,
}

fn averages<'a>(scores: impl Iterator<Item = &'a Score> + Clone) -> Averages {
    let n = scores.clone().count() as f64;
    let total: u64 = scores.clone().map(|s| s.support).sum();
    let mean = |f: fn(&Score) -> f64| {
        if n == 0.0 {
            0.0
        } else {
            scores.clone().map(f).sum::<f64>() / n
        }
    };
    let weighted = |f: fn(&Score) -> f64| {
        if total == 0 {
            0.0
        } else {
            scores.clone().map(|s| f(s) * s.support as f64).sum::<f64>() / total as f64
        }
    };
    Averages {
        macro_precision: mean(|s| s.precision),
        macro_recall: mean(|s| s.recall),
        macro_f1: mean(|s| s.f1),
        weighted_precision: weighted(|s| s.precision),
        weighted_recall: weighted(|s| s.recall),
        weighted_f1: weighted(|s| s.f1),
    }
}

/// Entity-level scores of a NER evaluation.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct EntityReport {
    /// Over all entities (seqeval's micro average: its `f1_score`).
    pub overall: Score,
    /// Per entity type, by name.
    pub per_type: BTreeMap<String, Score>,
    pub averages: Averages,
    /// Word-level accuracy (tags equal), for reference.
    pub word_accuracy: f64,
}

/// Scores `predicted` tag sequences against `gold` (same lengths, sentence by
/// sentence).
pub fn entity_report<S: AsRef<str>>(gold: &[Vec<S>], predicted: &[Vec<S>]) -> EntityReport {
    let mut gold_set: BTreeSet<Entity> = BTreeSet::new();
    let mut pred_set: BTreeSet<Entity> = BTreeSet::new();
    let (mut words, mut same) = (0u64, 0u64);
    for (i, (g, p)) in gold.iter().zip(predicted).enumerate() {
        let g: Vec<&str> = g.iter().map(AsRef::as_ref).collect();
        let p: Vec<&str> = p.iter().map(AsRef::as_ref).collect();
        gold_set.extend(entities(&g, i));
        pred_set.extend(entities(&p, i));
        words += g.len() as u64;
        same += g.iter().zip(&p).filter(|(a, b)| a == b).count() as u64;
    }
    let kinds: BTreeSet<&str> = gold_set
        .iter()
        .chain(&pred_set)
        .map(|e| e.kind.as_str())
        .collect();
    let count = |set: &BTreeSet<Entity>, k: &str| set.iter().filter(|e| e.kind == k).count() as u64;
    let per_type: BTreeMap<String, Score> = kinds
        .iter()
        .map(|&k| {
            let correct = gold_set
                .iter()
                .filter(|e| e.kind == k && pred_set.contains(*e))
                .count() as u64;
            (
                k.to_string(),
                Score::of(correct, count(&pred_set, k), count(&gold_set, k)),
            )
        })
        .collect();
    let correct = gold_set.intersection(&pred_set).count() as u64;
    EntityReport {
        overall: Score::of(correct, pred_set.len() as u64, gold_set.len() as u64),
        averages: averages(per_type.values()),
        per_type,
        word_accuracy: ratio(same, words),
    }
}

/// Scores of a classification evaluation.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ClassReport {
    pub accuracy: f64,
    /// Per class, in label order (every label of the task, seen or not).
    pub per_class: Vec<(String, Score)>,
    pub averages: Averages,
}

/// Scores predicted label ids against gold ones; `labels` names the ids.
pub fn class_report(gold: &[u32], predicted: &[u32], labels: &[String]) -> ClassReport {
    let n = labels.len();
    let mut correct = vec![0u64; n];
    let mut support = vec![0u64; n];
    let mut pred = vec![0u64; n];
    let mut right = 0u64;
    for (&g, &p) in gold.iter().zip(predicted) {
        if let Some(s) = support.get_mut(g as usize) {
            *s += 1;
        }
        if let Some(s) = pred.get_mut(p as usize) {
            *s += 1;
        }
        if g == p {
            right += 1;
            if let Some(c) = correct.get_mut(g as usize) {
                *c += 1;
            }
        }
    }
    let per_class: Vec<(String, Score)> = labels
        .iter()
        .enumerate()
        .map(|(i, l)| (l.clone(), Score::of(correct[i], pred[i], support[i])))
        .collect();
    ClassReport {
        accuracy: ratio(right, gold.len() as u64),
        averages: averages(per_class.iter().map(|(_, s)| s)),
        per_class,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tags(s: &str) -> Vec<&str> {
        s.split_whitespace().collect()
    }

    #[test]
    fn strict_iob2_entities() {
        let e = entities(
            &tags("B-PER I-PER O B-LOC I-PER I-LOC B-LOC B-LOC I-LOC"),
            0,
        );
        let spans: Vec<(&str, usize, usize)> = e
            .iter()
            .map(|e| (e.kind.as_str(), e.start, e.end))
            .collect();
        // I-PER after B-LOC ends the LOC and starts nothing; so does the I-LOC after it.
        assert_eq!(
            spans,
            vec![("PER", 0, 2), ("LOC", 3, 4), ("LOC", 6, 7), ("LOC", 7, 9)]
        );
        assert!(entities(&tags("I-PER I-PER O"), 0).is_empty());
    }

    #[test]
    fn an_entity_counts_only_with_its_exact_span_and_type() {
        let gold = vec![tags("B-PER I-PER O B-LOC"), tags("B-ORG O")];
        let pred = vec![tags("B-PER O O B-LOC"), tags("B-ORG O")];
        let r = entity_report(&gold, &pred);
        assert_eq!(
            (r.overall.correct, r.overall.predicted, r.overall.support),
            (2, 3, 3)
        );
        assert!((r.overall.f1 - 2.0 / 3.0).abs() < 1e-12);
        assert_eq!(r.per_type["PER"].f1, 0.0);
        assert_eq!(r.per_type["LOC"].f1, 1.0);
        let c = class_report(
            &[0, 1, 1, 2],
            &[0, 1, 0, 0],
            &["a".into(), "b".into(), "c".into()],
        );
        assert_eq!(c.accuracy, 0.5);
        assert_eq!(c.per_class[2].1.f1, 0.0);
        assert!((c.per_class[0].1.precision - 1.0 / 3.0).abs() < 1e-12);
    }
}
