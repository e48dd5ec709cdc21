//! A classification run's data: the files read and checked, the label set
//! fixed, negatives generated (`random`, `confusion`) or read (a file), and the
//! words turned into tokens.

use std::path::{Path, PathBuf};

use dpo_proto::{Negatives, RunSpec, TaskType};

use crate::TextTokenizer;
use crate::error::{Error, Result};
use crate::records::{self, Layout};
use crate::rng::SplitMix64;
use crate::tagged::{self, Encoded, Encoding, JoinedNegatives, Labels, Record, SeenLabels, Task};

/// The task of a run spec, for the data layer.
pub fn task_of(spec: &RunSpec) -> Task {
    match spec.task.kind {
        TaskType::TokenClassification => Task::Token,
        _ => Task::Sequence,
    }
}

/// What was read, for the run's report.
#[derive(Debug, Clone, Default)]
pub struct DataCounts {
    pub examples: usize,
    /// Labelled positions (words for NER, texts for classification).
    pub labelled: usize,
    pub negatives: usize,
    pub truncated: usize,
}

/// A split, encoded.
#[derive(Debug, Clone)]
pub struct Split {
    pub examples: Vec<Encoded>,
    pub counts: DataCounts,
}

/// The data of a classification run.
#[derive(Debug, Clone)]
pub struct TaskData {
    pub labels: Labels,
    pub train: Split,
    pub eval: Option<Split>,
}

fn invalid(context: &str, reason: String) -> Error {
    Error::Invalid {
        context: context.to_string(),
        reason,
    }
}

/// Reads, checks and encodes a run's data. `max_positions`: the model's longest
/// sequence.
pub fn load(spec: &RunSpec, tokenizer: &TextTokenizer, max_positions: usize) -> Result<TaskData> {
    let layout = Layout::of(&spec.data);
    load_with(spec, &layout, tokenizer, max_positions).map_err(|e| {
        let files = [Some(&spec.data.train), spec.data.eval.as_ref()]
            .into_iter()
            .flatten()
            .map(PathBuf::as_path)
            .chain(spec.data.negatives.as_ref().and_then(|n| n.file()));
        files.fold(e, |e, f| records::relocate(e, f, &layout))
    })
}

fn load_with(
    spec: &RunSpec,
    layout: &Layout,
    tokenizer: &TextTokenizer,
    max_positions: usize,
) -> Result<TaskData> {
    let task = task_of(spec);
    // The files are streamed: an example is held as its tokens only, never
    // as the words or text it was read as. A negatives file is held by id
    // until its examples come by.
    let mut joined = match &spec.data.negatives {
        Some(Negatives::File(file)) => {
            let j = JoinedNegatives::read(file, task, layout)?;
            tracing::info!(file = %file.display(), negatives = j.count(), "negatives to join by id");
            Some(j)
        }
        _ => None,
    };
    let labels = if spec.task.labels.is_empty() {
        // A first pass for the label names. It has a budget of its own (the
        // same limits): the run's is spent by the pass that encodes.
        let scan = Layout {
            spent: Default::default(),
            ..layout.clone()
        };
        let mut seen = SeenLabels::new(task);
        seen.scan(&spec.data.train, task, &scan, joined.as_ref())?;
        if let Some(eval) = &spec.data.eval {
            seen.scan(eval, task, &scan, None)?;
        }
        seen.names()
    } else {
        spec.task.labels.clone()
    };
    if task == Task::Token
        && let Some(bad) = labels.iter().find(|l| !crate::scores::is_iob2(l))
    {
        return Err(invalid(
            &spec.data.train.display().to_string(),
            format!(
                "tag {bad:?} is not an IOB2 tag (O, B-TYPE, I-TYPE): entity scores need IOB2 tags"
            ),
        ));
    }
    let labels = Labels::new(labels).map_err(|r| invalid("task.labels", r.0))?;
    if labels.len() < 2 {
        return Err(invalid(
            "task.labels",
            format!(
                "a classifier needs at least 2 labels, the data has {:?}",
                labels.names()
            ),
        ));
    }
    let how = Encoding {
        max_length: spec.data.max_length.min(max_positions),
        label_all_tokens: spec.task.label_all_tokens,
    };
    let k = spec.task.negatives_per_label;
    let (negatives, seed) = (spec.data.negatives.clone(), spec.data.seed);
    let mut train = SplitBuilder::default();
    tagged::for_each_record(
        &spec.data.train,
        task,
        layout,
        &labels,
        joined.as_mut(),
        |i, mut r| {
            match negatives {
                Some(Negatives::Random) => random_negatives_of(&mut r, i, &labels, k, seed),
                Some(Negatives::Confusion) => confusion_negatives_of(&mut r, i, &labels, k, seed),
                _ => {}
            }
            train.add(&r, tokenizer, &labels, how)
        },
    )?;
    let eval = match &spec.data.eval {
        Some(path) => {
            let mut eval = SplitBuilder::default();
            tagged::for_each_record(path, task, layout, &labels, None, |_, r| {
                eval.add(&r, tokenizer, &labels, how)
            })?;
            Some(eval.finish(how))
        }
        None => None,
    };
    Ok(TaskData {
        labels,
        train: train.finish(how),
        eval,
    })
}

/// A split's examples, encoded one record at a time.
#[derive(Debug, Default)]
struct SplitBuilder {
    examples: Vec<Encoded>,
    truncated: usize,
}

impl SplitBuilder {
    fn add(
        &mut self,
        r: &Record,
        tokenizer: &TextTokenizer,
        labels: &Labels,
        how: Encoding,
    ) -> Result<()> {
        let (e, cut) = tagged::encode_one(r, tokenizer, labels, how)?;
        self.truncated += usize::from(cut);
        self.examples.push(e);
        Ok(())
    }

    fn finish(self, how: Encoding) -> Split {
        let SplitBuilder {
            examples,
            truncated,
        } = self;
        let counts = DataCounts {
            examples: examples.len(),
            labelled: examples.iter().map(|e| e.gold.len()).sum(),
            negatives: examples.iter().map(|e| e.negatives.len()).sum(),
            truncated,
        };
        if truncated > 0 {
            tracing::warn!(
                truncated,
                max_length = how.max_length,
                "examples were cut to max_length: the words past it are neither trained nor scored"
            );
        }
        Split { examples, counts }
    }
}

/// Encodes the records of a split.
pub fn encode_split(
    records: &[Record],
    tokenizer: &TextTokenizer,
    labels: &Labels,
    how: Encoding,
) -> Result<Split> {
    let mut split = SplitBuilder::default();
    for r in records {
        split.add(r, tokenizer, labels, how)?;
    }
    Ok(split.finish(how))
}

/// Up to `k` distinct labels out of `candidates`, chosen by `rng`.
fn pick(candidates: &mut Vec<u32>, k: usize, rng: &mut SplitMix64) -> Vec<u32> {
    let mut out = Vec::with_capacity(k);
    while out.len() < k && !candidates.is_empty() {
        let i = rng.below(candidates.len());
        out.push(candidates.swap_remove(i));
    }
    out
}

/// `random`: `k` wrong labels per text (classification) or per entity word (NER:
/// words whose gold tag is not `O`), uniformly among the wrong ones, seeded.
pub fn random_negatives(records: &mut [Record], labels: &Labels, k: usize, seed: u64) {
    for (i, r) in records.iter_mut().enumerate() {
        random_negatives_of(r, i, labels, k, seed);
    }
}

/// [`random_negatives`] of record `i`.
pub fn random_negatives_of(r: &mut Record, i: usize, labels: &Labels, k: usize, seed: u64) {
    let outside = labels.id("O");
    let mut rng = SplitMix64::new(seed ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    for (w, &gold) in r.gold.iter().enumerate() {
        if !r.words.is_empty() && Some(gold) == outside {
            continue;
        }
        let mut wrong: Vec<u32> = (0..labels.len() as u32).filter(|&l| l != gold).collect();
        for l in pick(&mut wrong, k, &mut rng) {
            r.negatives.push((w as u32, l));
        }
    }
    r.negatives.sort_unstable();
    r.negatives.dedup();
}

/// `confusion` (NER): for every entity word, the tag of the other boundary of
/// its type (`B-X`↔`I-X`) and up to `k` tags of the same boundary with another
/// type (the same span called something else).
pub fn confusion_negatives(records: &mut [Record], labels: &Labels, k: usize, seed: u64) {
    for (i, r) in records.iter_mut().enumerate() {
        confusion_negatives_of(r, i, labels, k, seed);
    }
}

/// [`confusion_negatives`] of record `i`.
pub fn confusion_negatives_of(r: &mut Record, i: usize, labels: &Labels, k: usize, seed: u64) {
    let names = labels.names();
    let mut rng = SplitMix64::new(seed ^ (i as u64).wrapping_mul(0xBF58_476D_1CE4_E5B9));
    for (w, &gold) in r.gold.iter().enumerate() {
        let Some(name) = labels.name(gold) else {
            continue;
        };
        let (prefix, kind) = match name.split_once('-') {
            Some((p @ ("B" | "I"), kind)) => (p, kind),
            _ => continue,
        };
        let flipped = if prefix == "B" { "I" } else { "B" };
        if let Some(l) = labels.id(&format!("{flipped}-{kind}")) {
            r.negatives.push((w as u32, l));
        }
        let mut swaps: Vec<u32> = names
            .iter()
            .filter_map(|n| {
                let (p, t) = n.split_once('-')?;
                (p == prefix && t != kind).then(|| labels.id(n)).flatten()
            })
            .collect();
        for l in pick(&mut swaps, k, &mut rng) {
            r.negatives.push((w as u32, l));
        }
    }
    r.negatives.sort_unstable();
    r.negatives.dedup();
}

/// The longest sequence an encoder checkpoint's position table holds, from its
/// `config.json` (RoBERTa's first `pad_token_id + 1` rows are not positions).
pub fn max_positions(model_dir: &Path) -> Result<usize> {
    let path = model_dir.join("config.json");
    let text = crate::confined::read_to_string(&path).map_err(|source| Error::Io {
        path: path.clone(),
        source,
    })?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::File {
        path: path.clone(),
        reason: format!("invalid JSON: {e}"),
    })?;
    let n = v
        .get("max_position_embeddings")
        .and_then(serde_json::Value::as_i64)
        .ok_or_else(|| Error::File {
            path: path.clone(),
            reason: "missing key max_position_embeddings".into(),
        })?;
    let n = match v.get("model_type").and_then(serde_json::Value::as_str) {
        Some("roberta") => {
            n - v
                .get("pad_token_id")
                .and_then(serde_json::Value::as_i64)
                .unwrap_or(1)
                - 1
        }
        _ => n,
    };
    Ok(n.max(1) as usize)
}

/// Reads and encodes one dataset (a file, glob or folder; its format by
/// extension) for evaluation with a trained model's labels.
pub fn load_eval_file(
    path: &Path,
    task: Task,
    tokenizer: &TextTokenizer,
    labels: &Labels,
    how: Encoding,
) -> Result<Split> {
    let layout = Layout::default();
    let read = || -> Result<Split> {
        let mut split = SplitBuilder::default();
        tagged::for_each_record(path, task, &layout, labels, None, |_, r| {
            split.add(&r, tokenizer, labels, how)
        })?;
        Ok(split.finish(how))
    };
    read().map_err(|e| records::relocate(e, path, &layout))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels() -> Labels {
        Labels::new(
            ["O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-ORG", "I-ORG"]
                .iter()
                .map(|s| s.to_string())
                .collect(),
        )
        .expect("labels")
    }

    fn record(gold: Vec<u32>) -> Record {
        Record {
            path: "x".into(),
            line: 1,
            id: None,
            words: gold.iter().map(|_| "w".to_string()).collect(),
            text: String::new(),
            gold,
            negatives: Vec::new(),
        }
    }

    #[test]
    fn random_negatives_are_wrong_distinct_seeded_and_only_on_entities() {
        let mut a = vec![record(vec![1, 2, 0, 3])];
        random_negatives(&mut a, &labels(), 2, 7);
        let mut b = vec![record(vec![1, 2, 0, 3])];
        random_negatives(&mut b, &labels(), 2, 7);
        assert_eq!(a, b);
        let negs = &a[0].negatives;
        assert_eq!(negs.len(), 6, "{negs:?}");
        for &(w, l) in negs {
            assert_ne!(w, 2, "no negatives on O words");
            assert_ne!(l, a[0].gold[w as usize]);
        }
    }

    #[test]
    fn confusion_negatives_flip_the_boundary_and_swap_the_type() {
        let mut rs = vec![record(vec![1, 2, 0])];
        confusion_negatives(&mut rs, &labels(), 1, 0);
        let negs = &rs[0].negatives;
        // B-PER: I-PER and one of B-LOC/B-ORG; I-PER: B-PER and one of I-LOC/I-ORG.
        assert!(negs.contains(&(0, 2)) && negs.contains(&(1, 1)), "{negs:?}");
        assert_eq!(negs.len(), 4);
        assert!(negs.iter().any(|&(w, l)| w == 0 && (l == 3 || l == 5)));
        assert!(negs.iter().any(|&(w, l)| w == 1 && (l == 4 || l == 6)));
    }
}
