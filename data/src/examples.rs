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
/// records (any file format [`crate::records`] reads), handing each to `each`
/// as it is read. With `skip_bad`, malformed records are skipped and returned
/// as errors instead. A file without any is refused.
pub fn for_each_labelled(
    path: &Path,
    layout: &Layout,
    skip_bad: bool,
    each: &mut dyn FnMut(LabelledRecord) -> Result<()>,
) -> Result<Vec<Error>> {
    let mut read = 0usize;
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
            Ok(r) => {
                read += 1;
                each(r)?;
            }
            Err(e) if skip_bad => skipped.push(e),
            Err(e) => return Err(e),
        }
    }
    if read == 0 {
        return Err(Error::File {
            path: path.to_path_buf(),
            reason: "no examples in file".into(),
        });
    }
    Ok(skipped)
}

/// [`for_each_labelled`], held: the records and the skipped lines.
pub fn read_labelled(
    path: &Path,
    layout: &Layout,
    skip_bad: bool,
) -> Result<(Vec<LabelledRecord>, Vec<Error>)> {
    let mut out = Vec::new();
    let skipped = for_each_labelled(path, layout, skip_bad, &mut |r| {
        out.push(r);
        Ok(())
    })?;
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

/// How labelled examples and negatives find each other (`id`, else the
/// prompt), as a digest: the join holds 32 bytes per key, not the text.
fn join_key(r: &LabelledRecord) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    match &r.id {
        Some(id) => {
            h.update(b"id:");
            h.update(id.as_bytes());
        }
        None => {
            h.update(b"prompt:");
            h.update(r.prompt.as_bytes());
        }
    }
    h.finalize().into()
}

/// A negative read before (or without) a labelled example of its key.
#[derive(Debug)]
struct Waiting {
    line: usize,
    key: [u8; 32],
    prompt: Vec<u32>,
    response: Vec<u32>,
}

/// Labelled examples joined with their negatives (same `id`, or the same
/// prompt when there is no id) as they are read, tokenized on the way: only
/// token ids are held (and, for `random` negatives, the distinct
/// completions they are drawn from). Several labelled answers for one prompt
/// are separate examples; negatives join the first of them. Order: labelled
/// examples in file order, then the negatives no labelled example matched,
/// in the order read (those of one key together, at the first).
pub struct LabelledJoin<'t> {
    tokenizer: &'t TextTokenizer,
    examples: Vec<Example>,
    /// Key → the first labelled example with it.
    by_key: HashMap<[u8; 32], usize>,
    /// Negatives whose key no labelled example had yet, in the order read.
    waiting: Vec<Option<Waiting>>,
    waiting_by_key: HashMap<[u8; 32], Vec<usize>>,
    /// `random` negatives: the distinct completions, and for each labelled
    /// example (in order) its completion's index and the example its
    /// negative joins.
    random: Option<RandomDraw>,
    /// A mixed file (`"label"` on some records): the first record without one.
    unlabelled: Option<usize>,
    mixed: bool,
}

impl std::fmt::Debug for LabelledJoin<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LabelledJoin")
            .field("examples", &self.examples.len())
            .field("waiting", &self.waiting.iter().flatten().count())
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Default)]
struct RandomDraw {
    index: HashMap<String, usize>,
    completions: Vec<String>,
    labelled: Vec<(usize, usize, usize)>,
}

impl<'t> LabelledJoin<'t> {
    /// A join; `random` keeps what `random` negatives are drawn from.
    pub fn new(tokenizer: &'t TextTokenizer, random: bool) -> Self {
        LabelledJoin {
            tokenizer,
            examples: Vec::new(),
            by_key: HashMap::new(),
            waiting: Vec::new(),
            waiting_by_key: HashMap::new(),
            random: random.then(RandomDraw::default),
            unlabelled: None,
            mixed: false,
        }
    }

    fn tokens(&self, path: &Path, line: usize, text: &str, prompt: bool) -> Result<Vec<u32>> {
        let encoded = if prompt {
            self.tokenizer.encode_prompt(text)
        } else {
            self.tokenizer.encode_response(text)
        };
        encoded.map_err(|e| Error::Line {
            path: path.to_path_buf(),
            line,
            reason: e.to_string(),
        })
    }

    /// A record of the labelled file (of `path`): a labelled example, or in
    /// a mixed file (`"label": false`) a negative.
    pub fn labelled(&mut self, path: &Path, r: LabelledRecord) -> Result<()> {
        match r.label {
            Some(false) => {
                self.mixed = true;
                return self.negative(path, r);
            }
            Some(true) => self.mixed = true,
            None => {
                self.unlabelled.get_or_insert(r.line);
            }
        }
        let key = join_key(&r);
        let index = self.examples.len();
        let target = *self.by_key.entry(key).or_insert(index);
        let prompt = self.tokens(path, r.line, &r.prompt, true)?;
        let chosen = self.tokens(path, r.line, &r.completion, false)?;
        let mut rejected = Vec::new();
        if target == index {
            // Negatives read before it join it now, in the order read.
            for w in self.waiting_by_key.remove(&key).unwrap_or_default() {
                if let Some(w) = self.waiting[w].take() {
                    rejected.push(w.response);
                }
            }
        }
        if let Some(draw) = self.random.as_mut() {
            let next = draw.completions.len();
            let c = *draw.index.entry(r.completion.clone()).or_insert(next);
            if c == next {
                draw.completions.push(r.completion);
            }
            draw.labelled.push((r.line, c, target));
        }
        self.examples.push(Example {
            line: r.line,
            prompt,
            chosen: Some(chosen),
            rejected,
        });
        Ok(())
    }

    /// A negative (of `path`): joins its labelled example, or waits for one.
    pub fn negative(&mut self, path: &Path, r: LabelledRecord) -> Result<()> {
        let response = self.tokens(path, r.line, &r.completion, false)?;
        let key = join_key(&r);
        if let Some(&i) = self.by_key.get(&key) {
            self.examples[i].rejected.push(response);
            return Ok(());
        }
        let prompt = match self.waiting_by_key.get(&key).and_then(|w| w.first()) {
            // The prompt of the first negative of its key stands for all.
            Some(_) => Vec::new(),
            None => self.tokens(path, r.line, &r.prompt, true)?,
        };
        self.waiting_by_key
            .entry(key)
            .or_default()
            .push(self.waiting.len());
        self.waiting.push(Some(Waiting {
            line: r.line,
            key,
            prompt,
            response,
        }));
        Ok(())
    }

    /// The examples (of the labelled file `path`): `random` negatives drawn
    /// (seeded: for each labelled example another example's completion that
    /// differs from its own, so with a small label set a wrong label
    /// uniformly; none when the data has one completion only), then the
    /// negatives no labelled example matched, as examples of their own.
    pub fn finish(mut self, path: &Path, seed: u64) -> Result<Vec<Example>> {
        if self.mixed
            && let Some(line) = self.unlabelled
        {
            return Err(Error::Line {
                path: path.to_path_buf(),
                line,
                reason: "missing key \"label\": a file that mixes labelled and negative examples marks each with \"label\": true|false".into(),
            });
        }
        if let Some(draw) = self.random.take() {
            let mut order: Vec<usize> = (0..draw.completions.len()).collect();
            order.sort_unstable_by(|&a, &b| draw.completions[a].cmp(&draw.completions[b]));
            let mut rank = vec![0usize; order.len()];
            for (r, &c) in order.iter().enumerate() {
                rank[c] = r;
            }
            let mut tokens: Vec<Option<Vec<u32>>> = vec![None; order.len()];
            let mut rng = SplitMix64::new(seed ^ 0x6E65_6761_7469_7665);
            let distinct = order.len();
            for &(line, c, target) in &draw.labelled {
                if distinct < 2 {
                    break;
                }
                // Draw from the other completions: a rank that skips its own.
                let own = rank[c];
                let mut k = rng.below(distinct - 1);
                if k >= own {
                    k += 1;
                }
                let chosen = order[k];
                if tokens[chosen].is_none() {
                    tokens[chosen] =
                        Some(self.tokens(path, line, &draw.completions[chosen], false)?);
                }
                if let Some(t) = &tokens[chosen] {
                    self.examples[target].rejected.push(t.clone());
                }
            }
        }
        // The negatives no labelled example matched: one example per key, at
        // its first negative.
        let mut own: HashMap<[u8; 32], usize> = HashMap::new();
        for w in self.waiting.into_iter().flatten() {
            match own.get(&w.key) {
                Some(&i) => self.examples[i].rejected.push(w.response),
                None => {
                    own.insert(w.key, self.examples.len());
                    self.examples.push(Example {
                        line: w.line,
                        prompt: w.prompt,
                        chosen: None,
                        rejected: vec![w.response],
                    });
                }
            }
        }
        Ok(self.examples)
    }
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

    fn record(
        line: usize,
        id: Option<&str>,
        prompt: &str,
        completion: &str,
        label: Option<bool>,
    ) -> LabelledRecord {
        LabelledRecord {
            line,
            id: id.map(str::to_string),
            prompt: prompt.into(),
            completion: completion.into(),
            label,
        }
    }

    /// A tokenizer of one id per byte (bytes as their own vocabulary), `</s>`
    /// its end of sequence.
    fn byte_tokenizer(dir: &Path) -> TextTokenizer {
        let vocab: serde_json::Map<String, Value> = (0u32..256)
            .map(|b| (format!("<0x{b:02X}>"), Value::from(b)))
            .collect();
        let json = serde_json::json!({
            "version": "1.0",
            "model": {"type": "BPE", "vocab": vocab, "merges": [], "byte_fallback": true, "unk_token": null},
            "pre_tokenizer": null,
            "normalizer": null,
            "decoder": {"type": "ByteFallback"},
            "added_tokens": [{"id": 256, "content": "</s>", "single_word": false, "lstrip": false,
                              "rstrip": false, "normalized": false, "special": true}]
        });
        std::fs::write(dir.join("tokenizer.json"), json.to_string()).expect("write");
        std::fs::write(
            dir.join("tokenizer_config.json"),
            r#"{"eos_token": "</s>"}"#,
        )
        .expect("write");
        TextTokenizer::from_dir(dir).expect("tokenizer")
    }

    #[test]
    fn labelled_records_join_their_negatives_as_they_come() {
        let dir = tempfile::tempdir().expect("tmp");
        let tok = byte_tokenizer(dir.path());
        let path = Path::new("d.jsonl");
        let ids = |s: &str| tok.encode_response(s).expect("encode");
        let mut join = LabelledJoin::new(&tok, false);
        // A negative before its labelled example, one after, one without any,
        // two labelled answers of one prompt, and one joined by id.
        join.labelled(path, record(1, None, "p", "x", Some(false)))
            .expect("join");
        join.labelled(path, record(2, None, "p", "good", Some(true)))
            .expect("join");
        join.labelled(path, record(3, None, "p", "also good", Some(true)))
            .expect("join");
        join.labelled(path, record(4, None, "p", "y", Some(false)))
            .expect("join");
        join.labelled(path, record(5, None, "q", "lonely", Some(false)))
            .expect("join");
        join.labelled(path, record(6, Some("7"), "r", "fine", Some(true)))
            .expect("join");
        join.negative(
            Path::new("n.jsonl"),
            record(1, Some("7"), "other", "bad", None),
        )
        .expect("join");
        join.labelled(path, record(7, None, "q", "lonelier", Some(false)))
            .expect("join");
        let out = join.finish(path, 1).expect("finish");
        let lines: Vec<usize> = out.iter().map(|e| e.line).collect();
        assert_eq!(lines, vec![2, 3, 6, 5]);
        assert_eq!(out[0].rejected, vec![ids("x"), ids("y")]);
        assert!(
            out[1].rejected.is_empty(),
            "negatives join the first answer"
        );
        assert_eq!(out[2].rejected, vec![ids("bad")]);
        assert_eq!(out[3].chosen, None);
        assert_eq!(out[3].rejected, vec![ids("lonely"), ids("lonelier")]);
        // A mixed file with an unmarked record: refused at its line.
        let mut join = LabelledJoin::new(&tok, false);
        join.labelled(path, record(1, None, "p", "a", None))
            .expect("join");
        join.labelled(path, record(2, None, "p", "b", Some(false)))
            .expect("join");
        let e = join.finish(path, 1).expect_err("unmarked").to_string();
        assert!(e.contains("d.jsonl:1: missing key \"label\""), "{e}");
    }

    #[test]
    fn random_negatives_are_other_labels() {
        let dir = tempfile::tempdir().expect("tmp");
        let tok = byte_tokenizer(dir.path());
        let path = Path::new("d.jsonl");
        let labels = ["pos", "neg", "neutral"];
        let draw = |seed: u64| {
            let mut join = LabelledJoin::new(&tok, true);
            for i in 0..200 {
                join.labelled(
                    path,
                    record(i + 1, None, &format!("q{i}"), labels[i % 3], None),
                )
                .expect("join");
            }
            join.finish(path, seed).expect("finish")
        };
        let out = draw(3);
        assert_eq!(out.len(), 200);
        let mut seen = std::collections::HashSet::new();
        for e in &out {
            assert_eq!(e.rejected.len(), 1);
            assert_ne!(
                e.chosen.as_ref(),
                Some(&e.rejected[0]),
                "a negative is never the label"
            );
            seen.insert(e.rejected[0].clone());
        }
        assert_eq!(seen.len(), 3, "every other label gets drawn");
        assert_eq!(out, draw(3), "seeded");
        assert_ne!(out, draw(4));
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
