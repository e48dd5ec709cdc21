//! Training examples: a prompt with an optional labelled (chosen) response and any
//! number of negative (rejected) responses, as token ids — one shape for every
//! objective. Preference pairs are examples with one of each; labelled + negative
//! files are joined into them by `id` or prompt; truncation happens here.

use std::collections::HashMap;
use std::path::Path;

use serde_json::Value;

use crate::error::{Error, Refusal, Result};
use crate::pairs::TokenizedPair;
use crate::records::Layout;
use crate::rng::SplitMix64;
use crate::tokenizer::TextTokenizer;

/// One training unit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Example {
    /// Line of the (first) source record, for messages.
    pub line: usize,
    pub prompt: Vec<u32>,
    pub chosen: Option<Vec<u32>>,
    pub rejected: Vec<Vec<u32>>,
}

impl Example {
    /// A preference pair: exactly one chosen and one rejected response.
    pub fn is_pair(&self) -> bool {
        self.chosen.is_some() && self.rejected.len() == 1
    }

    /// Every token id in the example.
    pub fn ids(&self) -> impl Iterator<Item = u32> + '_ {
        self.prompt
            .iter()
            .chain(self.chosen.iter().flatten())
            .chain(self.rejected.iter().flatten())
            .copied()
    }
}

/// Global-batch totals each loss term is divided by, so that micro-batches and
/// ranks add up to the loss of the whole batch.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Normalizer {
    /// Pairs (pairwise losses) or examples in the global batch.
    pub examples: f64,
    /// Labelled (chosen) response tokens in the global batch.
    pub chosen_tokens: f64,
    /// Negative response tokens in the global batch (counted only when the
    /// objective trains on negatives token by token).
    pub negative_tokens: f64,
}

impl Normalizer {
    /// Totals of a global batch.
    pub fn of(examples: &[&Example], count_negatives: bool) -> Self {
        let mut n = Normalizer {
            examples: examples.len() as f64,
            ..Default::default()
        };
        for ex in examples {
            n.chosen_tokens += ex.chosen.as_ref().map_or(0, Vec::len) as f64;
            if count_negatives {
                n.negative_tokens += ex.rejected.iter().map(Vec::len).sum::<usize>() as f64;
            }
        }
        n
    }
}

impl From<TokenizedPair> for Example {
    fn from(p: TokenizedPair) -> Self {
        Example {
            line: p.line,
            prompt: p.prompt,
            chosen: Some(p.chosen),
            rejected: vec![p.rejected],
        }
    }
}

/// A line of a labelled or negative file.
#[derive(Debug, Clone, PartialEq)]
pub struct LabelledRecord {
    pub line: usize,
    pub id: Option<String>,
    pub prompt: String,
    pub completion: String,
    /// `Some(false)` marks a negative inside a mixed file.
    pub label: Option<bool>,
}

/// Reads `{"prompt": str, "completion": str, "id"?: str|int, "label"?: bool}`
/// records (any file format [`crate::records`] reads). With `skip_bad`,
/// malformed records are skipped and returned as errors instead.
pub fn read_labelled(
    path: &Path,
    layout: &Layout,
    skip_bad: bool,
) -> Result<(Vec<LabelledRecord>, Vec<Error>)> {
    let mut out = Vec::new();
    let mut skipped = Vec::new();
    let keys = ["prompt", "completion", "id", "label"];
    for row in crate::records::open(path, layout, &keys)? {
        let row = row?;
        let n = row.at;
        let parsed = row
            .value
            .and_then(|obj| parse_labelled(&obj, n))
            .map_err(|reason| {
                let e = Error::Line {
                    path: path.to_path_buf(),
                    line: n,
                    reason: reason.0,
                };
                crate::records::explain(e, layout)
            });
        match parsed {
            Ok(r) => out.push(r),
            Err(e) if skip_bad => skipped.push(e),
            Err(e) => return Err(e),
        }
    }
    if out.is_empty() {
        return Err(Error::File {
            path: path.to_path_buf(),
            reason: "no examples in file".into(),
        });
    }
    Ok((out, skipped))
}

fn parse_labelled(
    obj: &serde_json::Map<String, Value>,
    n: usize,
) -> std::result::Result<LabelledRecord, Refusal> {
    let text = |key: &str| match obj.get(key) {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(_) => Err(Refusal::from(format!("\"{key}\" must be a string"))),
        None => Err(Refusal::from(format!("missing key \"{key}\""))),
    };
    let id = match obj.get("id") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(Value::Number(x)) => Some(x.to_string()),
        Some(_) => return Err(Refusal::from("\"id\" must be a string or a number")),
    };
    let label = match obj.get("label") {
        None | Some(Value::Null) => None,
        Some(Value::Bool(b)) => Some(*b),
        Some(_) => return Err(Refusal::from("\"label\" must be true or false")),
    };
    Ok(LabelledRecord {
        line: n,
        id,
        prompt: text("prompt")?,
        completion: text("completion")?,
        label,
    })
}

/// How labelled examples and negatives find each other.
fn join_key(r: &LabelledRecord) -> String {
    match &r.id {
        Some(id) => format!("id:{id}"),
        None => format!("prompt:{}", r.prompt),
    }
}

/// Joins labelled examples with their negatives (same `id`, or same prompt when
/// there is no id) into examples, tokenizing on the way. Negatives with no labelled
/// partner become examples of their own (no chosen response). Order: labelled
/// examples in file order, then unmatched negatives in file order.
pub fn join_labelled(
    path: &Path,
    labelled: &[LabelledRecord],
    negatives: &[LabelledRecord],
    tokenizer: &TextTokenizer,
) -> Result<Vec<Example>> {
    let at = |line: usize| {
        let path = path.to_path_buf();
        move |e: Error| Error::Line {
            path,
            line,
            reason: e.to_string(),
        }
    };
    let mut by_key: HashMap<String, usize> = HashMap::new();
    let mut out: Vec<Example> = Vec::with_capacity(labelled.len());
    for r in labelled {
        // Several labelled answers for one prompt are separate examples; negatives
        // join the first of them.
        by_key.entry(join_key(r)).or_insert(out.len());
        out.push(Example {
            line: r.line,
            prompt: tokenizer.encode_prompt(&r.prompt).map_err(at(r.line))?,
            chosen: Some(
                tokenizer
                    .encode_response(&r.completion)
                    .map_err(at(r.line))?,
            ),
            rejected: Vec::new(),
        });
    }
    for r in negatives {
        let response = tokenizer
            .encode_response(&r.completion)
            .map_err(at(r.line))?;
        let key = join_key(r);
        match by_key.get(&key) {
            Some(&i) => out[i].rejected.push(response),
            None => {
                by_key.insert(key, out.len());
                out.push(Example {
                    line: r.line,
                    prompt: tokenizer.encode_prompt(&r.prompt).map_err(at(r.line))?,
                    chosen: None,
                    rejected: vec![response],
                });
            }
        }
    }
    Ok(out)
}

/// Splits one mixed file (`"label": true|false`) into labelled and negatives.
pub fn split_by_label(
    path: &Path,
    records: Vec<LabelledRecord>,
) -> Result<(Vec<LabelledRecord>, Vec<LabelledRecord>)> {
    let mut pos = Vec::new();
    let mut neg = Vec::new();
    for r in records {
        match r.label {
            Some(true) => pos.push(r),
            Some(false) => neg.push(r),
            None => {
                return Err(Error::Line {
                    path: path.to_path_buf(),
                    line: r.line,
                    reason: "missing key \"label\": a file that mixes labelled and negative examples marks each with \"label\": true|false".into(),
                });
            }
        }
    }
    Ok((pos, neg))
}

/// Random negatives: for each labelled example, another example's completion that
/// differs from its own. When the completions form a small label set (classification)
/// this picks a wrong label uniformly. Examples whose completion is the only one in
/// the data get no negative.
pub fn random_negatives(labelled: &[LabelledRecord], seed: u64) -> Vec<LabelledRecord> {
    let mut distinct: Vec<&str> = labelled.iter().map(|r| r.completion.as_str()).collect();
    distinct.sort_unstable();
    distinct.dedup();
    let mut rng = SplitMix64::new(seed ^ 0x6E65_6761_7469_7665);
    let mut out = Vec::with_capacity(labelled.len());
    for r in labelled {
        if distinct.len() < 2 {
            break;
        }
        // Draw from the other labels: index into distinct without r's own completion.
        let own = distinct.binary_search(&r.completion.as_str()).unwrap_or(0);
        let mut k = rng.below(distinct.len() - 1);
        if k >= own {
            k += 1;
        }
        out.push(LabelledRecord {
            line: r.line,
            id: r.id.clone(),
            prompt: r.prompt.clone(),
            completion: distinct[k].to_string(),
            label: Some(false),
        });
    }
    out
}

/// Expands examples into preference pairs (one per negative) for pairwise losses.
/// Returns the pairs and how many examples could not form one (no chosen or no
/// negative).
pub fn into_pairs(examples: Vec<Example>) -> (Vec<Example>, usize) {
    let mut pairs = Vec::new();
    let mut unusable = 0;
    for ex in examples {
        match (&ex.chosen, ex.rejected.len()) {
            (Some(_), n) if n >= 1 => {
                for r in &ex.rejected {
                    pairs.push(Example {
                        line: ex.line,
                        prompt: ex.prompt.clone(),
                        chosen: ex.chosen.clone(),
                        rejected: vec![r.clone()],
                    });
                }
            }
            _ => unusable += 1,
        }
    }
    (pairs, unusable)
}

/// Length limits applied to every example.
#[derive(Debug, Clone, Copy)]
pub struct Truncation {
    pub max_length: usize,
    pub max_prompt_length: usize,
    /// Keep the end of over-long prompts (the part next to the response).
    pub keep_end: bool,
}

impl Truncation {
    /// Cuts the prompt to `max_prompt_length` (its start or its end), then every
    /// response so that prompt + response fits `max_length`. Returns false when the
    /// example is left with no response token to train on.
    pub fn apply(&self, ex: &mut Example) -> bool {
        if ex.prompt.len() > self.max_prompt_length {
            if self.keep_end {
                let cut = ex.prompt.len() - self.max_prompt_length;
                ex.prompt.drain(..cut);
            } else {
                ex.prompt.truncate(self.max_prompt_length);
            }
        }
        let room = self.max_length.saturating_sub(ex.prompt.len());
        for r in ex.chosen.iter_mut().chain(ex.rejected.iter_mut()) {
            r.truncate(room);
        }
        ex.rejected.retain(|r| !r.is_empty());
        if ex.chosen.as_ref().is_some_and(Vec::is_empty) {
            ex.chosen = None;
        }
        !ex.prompt.is_empty() && (ex.chosen.is_some() || !ex.rejected.is_empty())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ex(prompt: usize, chosen: usize, rejected: usize) -> Example {
        Example {
            line: 1,
            prompt: (0..prompt as u32).collect(),
            chosen: Some((100..100 + chosen as u32).collect()),
            rejected: vec![(200..200 + rejected as u32).collect()],
        }
    }

    #[test]
    fn truncation_cuts_prompt_side_then_responses() {
        let keep_end = Truncation {
            max_length: 8,
            max_prompt_length: 4,
            keep_end: true,
        };
        let mut e = ex(6, 3, 6);
        assert!(keep_end.apply(&mut e));
        assert_eq!(
            e.prompt,
            vec![2, 3, 4, 5],
            "keep_end keeps the prompt's end"
        );
        assert_eq!(e.chosen, Some(vec![100, 101, 102]), "fits, untouched");
        assert_eq!(
            e.rejected,
            vec![vec![200, 201, 202, 203]],
            "cut to max_length"
        );

        let keep_start = Truncation {
            keep_end: false,
            ..keep_end
        };
        let mut e = ex(6, 3, 3);
        assert!(keep_start.apply(&mut e));
        assert_eq!(e.prompt, vec![0, 1, 2, 3]);
    }

    fn rec(line: usize, id: Option<&str>, prompt: &str, completion: &str) -> LabelledRecord {
        LabelledRecord {
            line,
            id: id.map(str::to_string),
            prompt: prompt.into(),
            completion: completion.into(),
            label: None,
        }
    }

    #[test]
    fn random_negatives_are_other_labels() {
        let labelled: Vec<_> = (0..200)
            .map(|i| {
                rec(
                    i + 1,
                    None,
                    &format!("q{i}"),
                    ["pos", "neg", "neutral"][i % 3],
                )
            })
            .collect();
        let negs = random_negatives(&labelled, 3);
        assert_eq!(negs.len(), 200);
        let mut seen = std::collections::HashSet::new();
        for (l, n) in labelled.iter().zip(&negs) {
            assert_ne!(l.completion, n.completion, "a negative is never the label");
            assert_eq!(l.prompt, n.prompt);
            seen.insert(n.completion.clone());
        }
        assert_eq!(seen.len(), 3, "every other label gets drawn");
        assert_eq!(negs, random_negatives(&labelled, 3), "seeded");
    }

    #[test]
    fn pairs_expand_per_negative_and_count_unusable() {
        let mut a = ex(2, 1, 1);
        a.rejected.push(vec![9]);
        let b = Example {
            chosen: None,
            ..ex(2, 1, 1)
        };
        let (pairs, unusable) = into_pairs(vec![a, b]);
        assert_eq!(pairs.len(), 2);
        assert!(pairs.iter().all(Example::is_pair));
        assert_eq!(pairs[1].rejected, vec![vec![9]]);
        assert_eq!(unusable, 1);
    }
}
