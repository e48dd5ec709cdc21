//! Data for the encoder tasks: named-entity recognition (a tag per word) and text
//! classification (a label per text), each example with its known-wrong labels
//! (negatives).
//!
//! Formats:
//! - NER as JSONL, `{"tokens": [...], "tags": [...]}` (tags as strings, or as ids
//!   into the run's `labels`), with an optional `id` and `negatives`: one or more
//!   full tag sequences (`[["B-LOC", "O", ...], ...]`) or a list of
//!   `{"position": i, "tag": t}`. A full negative sequence says the sentence is not
//!   tagged that way: the words where it differs from gold are its negatives.
//! - NER as CoNLL: one `token … tag` per line (first column the word, last the
//!   tag), a blank line between sentences, `-DOCSTART-` lines skipped. A
//!   sentence's id is its number, from 0.
//! - Classification as JSONL, `{"text": ..., "label": ...}` with an optional `id`
//!   and `negatives` (a list of wrong labels).
//! - Negatives in a separate JSONL file, `{"id": ..., "negatives": ...}`, joined to
//!   the examples by `id`.
//!
//! A problem names `file:line` and the reason: a tag not in the labels, tokens and
//! tags of different lengths, an empty sentence, a CoNLL line without a tag, a
//! negative equal to the gold label, an id the data does not have. Nothing is
//! trained on a file with a bad line.
//!
//! Words become sub-word tokens as transformers' token-classification examples
//! do it: the first token of a word carries its label, the rest are ignored
//! (`label_all_tokens` gives them the label too, `B-` made `I-`); negatives sit on
//! a word's first token.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::error::{Error, Refusal, Result};
use crate::lines::{self, LineError};
use crate::records::{self, Layout};
use crate::tokenizer::TextTokenizer;
use dpo_proto::FileFormat;

/// The label vocabulary of a task, in id order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Labels {
    names: Vec<String>,
    index: HashMap<String, u32>,
}

impl Labels {
    /// Labels in the given order; duplicates are refused.
    pub fn new(names: Vec<String>) -> std::result::Result<Self, Refusal> {
        if names.is_empty() {
            return Err(Refusal::from("no labels"));
        }
        let mut index = HashMap::new();
        for (i, n) in names.iter().enumerate() {
            if n.is_empty() {
                return Err(Refusal::from(format!("label {i} is empty")));
            }
            if index.insert(n.clone(), i as u32).is_some() {
                return Err(Refusal::from(format!("label {n:?} appears twice")));
            }
        }
        Ok(Labels { names, index })
    }

    pub fn names(&self) -> &[String] {
        &self.names
    }

    pub fn len(&self) -> usize {
        self.names.len()
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    pub fn id(&self, name: &str) -> Option<u32> {
        self.index.get(name).copied()
    }

    pub fn name(&self, id: u32) -> Option<&str> {
        self.names.get(id as usize).map(String::as_str)
    }

    /// For `label_all_tokens`: the id of `I-X` for `B-X` (itself otherwise).
    pub fn inside_of(&self, id: u32) -> u32 {
        self.name(id)
            .and_then(|n| n.strip_prefix("B-"))
            .and_then(|t| self.id(&format!("I-{t}")))
            .unwrap_or(id)
    }
}

/// Which task a file is read for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Task {
    /// Named-entity recognition: a tag per word.
    Token,
    /// Text classification: a label per text.
    Sequence,
}

/// A label as written in a file: a name, or an id into the run's labels.
#[derive(Debug, Clone, PartialEq, Eq)]
enum RawLabel {
    Name(String),
    Id(u64),
}

/// A negative as read, before labels are known.
#[derive(Debug, Clone, PartialEq, Eq)]
enum RawNegative {
    /// A whole tag sequence (NER).
    Sequence(Vec<RawLabel>),
    /// One wrong tag at a word (NER), or a wrong label (classification, no position).
    At(Option<usize>, RawLabel),
}

/// A record as read, labels still as written.
#[derive(Debug, Clone)]
struct RawRecord {
    line: usize,
    id: Option<String>,
    words: Vec<String>,
    text: String,
    gold: Vec<RawLabel>,
    negatives: Vec<RawNegative>,
}

/// One example of a task, in words and label ids.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Where it came from (`file:line` of its first line).
    pub path: PathBuf,
    pub line: usize,
    pub id: Option<String>,
    /// NER: the words. Classification: empty.
    pub words: Vec<String>,
    /// Classification: the text. NER: empty.
    pub text: String,
    /// A label per word (NER) or one (classification).
    pub gold: Vec<u32>,
    /// Known-wrong labels: `(word, label)` for NER, `(0, label)` for
    /// classification; none equals the gold label there; sorted, no duplicates.
    pub negatives: Vec<(u32, u32)>,
}

fn line_err(path: &Path, line: usize, reason: impl Into<String>) -> Error {
    Error::Line {
        path: path.to_path_buf(),
        line,
        reason: reason.into(),
    }
}

fn read_err(path: &Path, line: usize, e: LineError) -> Error {
    match e {
        LineError::Io(source) => Error::Io {
            path: path.to_path_buf(),
            source,
        },
        LineError::NotUtf8 => line_err(path, line, "not valid UTF-8"),
        LineError::TooLong => line_err(path, line, lines::too_long()),
    }
}

fn raw_label(v: &Value, what: &str) -> std::result::Result<RawLabel, Refusal> {
    match v {
        Value::String(s) if !s.is_empty() => Ok(RawLabel::Name(s.clone())),
        Value::Number(n) => n.as_u64().map(RawLabel::Id).ok_or_else(|| {
            Refusal::from(format!(
                "{what} {n} is not a label id (a non-negative integer)"
            ))
        }),
        other => Err(Refusal::from(format!(
            "{what} must be a label name or id, found {other}"
        ))),
    }
}

fn raw_id(v: Option<&Value>) -> std::result::Result<Option<String>, Refusal> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(Value::Number(n)) => Ok(Some(n.to_string())),
        Some(other) => Err(Refusal::from(format!(
            "\"id\" must be a string or number, found {other}"
        ))),
    }
}

/// `negatives` of a record (or of a negatives-file line) for `task`.
fn raw_negatives(v: &Value, task: Task) -> std::result::Result<Vec<RawNegative>, Refusal> {
    let Value::Array(items) = v else {
        return Err(Refusal::from(format!(
            "\"negatives\" must be a list, found {v}"
        )));
    };
    let mut out = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let neg = match (task, item) {
            (Task::Token, Value::Array(tags)) => RawNegative::Sequence(
                tags.iter()
                    .map(|t| raw_label(t, &format!("negatives[{i}] tag")))
                    .collect::<std::result::Result<_, _>>()?,
            ),
            (Task::Token, Value::Object(o)) => {
                let position = o.get("position").and_then(Value::as_u64).ok_or_else(|| {
                    Refusal::from(format!("negatives[{i}] needs \"position\", a word index"))
                })?;
                let tag = o
                    .get("tag")
                    .ok_or_else(|| Refusal::from(format!("negatives[{i}] needs \"tag\"")))?;
                RawNegative::At(
                    Some(position as usize),
                    raw_label(tag, &format!("negatives[{i}].tag"))?,
                )
            }
            (Task::Token, other) => {
                return Err(Refusal::from(format!(
                    "negatives[{i}] must be a tag sequence or {{\"position\", \"tag\"}}, found {other}"
                )));
            }
            (Task::Sequence, label) => {
                RawNegative::At(None, raw_label(label, &format!("negatives[{i}]"))?)
            }
        };
        out.push(neg);
    }
    Ok(out)
}

fn parse_json_record(
    o: &serde_json::Map<String, Value>,
    task: Task,
) -> std::result::Result<RawRecord, Refusal> {
    let id = raw_id(o.get("id"))?;
    let negatives = match o.get("negatives") {
        None | Some(Value::Null) => Vec::new(),
        Some(n) => raw_negatives(n, task)?,
    };
    match task {
        Task::Token => {
            let words: Vec<String> = match o.get("tokens") {
                Some(Value::Array(ws)) => ws
                    .iter()
                    .enumerate()
                    .map(|(i, w)| match w {
                        Value::String(s) if !s.trim().is_empty() => Ok(s.clone()),
                        Value::String(_) => Err(Refusal::from(format!("tokens[{i}] is empty"))),
                        other => Err(Refusal::from(format!(
                            "tokens[{i}] must be a string, found {other}"
                        ))),
                    })
                    .collect::<std::result::Result<_, _>>()?,
                Some(other) => {
                    return Err(Refusal::from(format!(
                        "\"tokens\" must be a list, found {other}"
                    )));
                }
                None => return Err(Refusal::from("missing \"tokens\"")),
            };
            let gold: Vec<RawLabel> = match o.get("tags").or_else(|| o.get("ner_tags")) {
                Some(Value::Array(ts)) => ts
                    .iter()
                    .enumerate()
                    .map(|(i, t)| raw_label(t, &format!("tags[{i}]")))
                    .collect::<std::result::Result<_, _>>()?,
                Some(other) => {
                    return Err(Refusal::from(format!(
                        "\"tags\" must be a list, found {other}"
                    )));
                }
                None => return Err(Refusal::from("missing \"tags\"")),
            };
            Ok(RawRecord {
                line: 0,
                id,
                words,
                text: String::new(),
                gold,
                negatives,
            })
        }
        Task::Sequence => {
            let text = match o.get("text") {
                Some(Value::String(s)) if !s.trim().is_empty() => s.clone(),
                Some(Value::String(_)) => return Err(Refusal::from("\"text\" is empty")),
                Some(other) => {
                    return Err(Refusal::from(format!(
                        "\"text\" must be a string, found {other}"
                    )));
                }
                None => return Err(Refusal::from("missing \"text\"")),
            };
            let label = o.get("label").ok_or("missing \"label\"")?;
            Ok(RawRecord {
                line: 0,
                id,
                words: Vec::new(),
                text,
                gold: vec![raw_label(label, "\"label\"")?],
                negatives,
            })
        }
    }
}

/// The record keys the encoder tasks read.
const TASK_KEYS: &[&str] = &[
    "id",
    "tokens",
    "tags",
    "ner_tags",
    "text",
    "label",
    "negatives",
];

fn read_records(
    path: &Path,
    task: Task,
    layout: &Layout,
    each: &mut dyn FnMut(RawRecord) -> Result<()>,
) -> Result<usize> {
    let mut count = 0;
    for row in records::open(path, layout, TASK_KEYS)? {
        let row = row?;
        let n = row.at;
        let mut r = row
            .value
            .and_then(|o| parse_json_record(&o, task))
            .map_err(|reason| records::explain(line_err(path, n, reason), layout))?;
        r.line = n;
        each(r)?;
        count += 1;
    }
    Ok(count)
}

/// Reads a CoNLL file within `data.limits`: its bytes count against
/// `max_decoded_bytes`, its sentences against `max_rows`, and each line is at
/// most `max_value_bytes` long.
fn read_conll(
    path: &Path,
    layout: &Layout,
    each: &mut dyn FnMut(RawRecord) -> Result<()>,
) -> Result<usize> {
    let limits = &layout.limits;
    let size = std::fs::metadata(path)
        .map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?
        .len();
    // The run's earlier datasets count too.
    let (earlier_rows, earlier_bytes) = layout.spent.get();
    let decoded = records::text_budget(path, size, earlier_bytes, limits)?;
    let mut count = 0usize;
    let mut current: Option<RawRecord> = None;
    let mut finish = |r: Option<RawRecord>, count: &mut usize| -> Result<()> {
        if let Some(mut r) = r {
            r.id = Some(count.to_string());
            *count += 1;
            each(r)?;
        }
        Ok(())
    };
    for (i, line) in lines::open(path)?.enumerate() {
        let n = i + 1;
        if records::cancelled() {
            return Err(Error::File {
                path: path.to_path_buf(),
                reason: "reading stopped: the submission was abandoned (its client went away)"
                    .into(),
            });
        }
        let line = line.map_err(|e| read_err(path, n, e))?;
        if line.len() as u64 > limits.max_value_bytes {
            return Err(line_err(
                path,
                n,
                format!(
                    "a line of {} bytes, more than data.limits.max_value_bytes = {}",
                    line.len(),
                    limits.max_value_bytes
                ),
            ));
        }
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.is_empty() || fields[0] == "-DOCSTART-" {
            finish(current.take(), &mut count)?;
            continue;
        }
        if fields.len() < 2 {
            return Err(line_err(
                path,
                n,
                format!("{:?} has no tag (a CoNLL line is `token … tag`)", fields[0]),
            ));
        }
        if current.is_none() && earlier_rows + count as u64 >= limits.max_rows {
            let earlier = match earlier_rows {
                0 => String::new(),
                n => format!(" (with the {n} of the run's earlier datasets)"),
            };
            return Err(line_err(
                path,
                n,
                format!(
                    "more than data.limits.max_rows = {} sentences{earlier}",
                    limits.max_rows
                ),
            ));
        }
        let r = current.get_or_insert_with(|| RawRecord {
            line: n,
            id: None,
            words: Vec::new(),
            text: String::new(),
            gold: Vec::new(),
            negatives: Vec::new(),
        });
        r.words.push(fields[0].to_string());
        r.gold
            .push(RawLabel::Name(fields[fields.len() - 1].to_string()));
    }
    finish(current.take(), &mut count)?;
    layout.spent.set(earlier_rows + count as u64, decoded);
    Ok(count)
}

/// Streams the records of `path` (a file, glob or folder) for `task` to
/// `each`, labels still as written: CoNLL for NER by extension or
/// `data.file_format`, records (JSON lines, JSON, Parquet, Arrow) otherwise.
/// A dataset without any is refused.
fn each_raw(
    path: &Path,
    task: Task,
    layout: &Layout,
    each: &mut dyn FnMut(RawRecord) -> Result<()>,
) -> Result<usize> {
    let count = if task == Task::Token && is_conll(path, layout) {
        read_conll(path, layout, each)?
    } else {
        read_records(path, task, layout, each)?
    };
    if count == 0 {
        return Err(Error::File {
            path: path.to_path_buf(),
            reason: "no examples".into(),
        });
    }
    Ok(count)
}

/// Whether `path` is read as CoNLL (`data.file_format`, else by its
/// extension) rather than as records.
pub fn is_conll(path: &Path, layout: &Layout) -> bool {
    match layout.format {
        FileFormat::Conll => true,
        FileFormat::Auto => {
            !records::is_multi(path)
                && matches!(
                    path.extension().and_then(|e| e.to_str()),
                    Some("conll" | "txt" | "iob" | "bio")
                )
        }
        _ => false,
    }
}

/// A dataset file as read and held, labels still as written (for tools and
/// tests; a run streams its files: [`for_each_record`]).
#[derive(Debug, Clone)]
pub struct RawFile {
    path: PathBuf,
    task: Task,
    records: Vec<RawRecord>,
}

impl RawFile {
    /// Reads `path` (a file, glob or folder) for `task` (see [`each_raw`]).
    pub fn read(path: &Path, task: Task, layout: &Layout) -> Result<Self> {
        let mut records = Vec::new();
        each_raw(path, task, layout, &mut |r| {
            records.push(r);
            Ok(())
        })?;
        Ok(RawFile {
            path: path.to_path_buf(),
            task,
            records,
        })
    }

    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// Resolves labels against `labels` and checks every record.
    pub fn resolve(&self, labels: &Labels) -> Result<Vec<Record>> {
        let mut ids = HashMap::new();
        self.records
            .iter()
            .map(|r| resolve_one(&self.path, self.task, r.clone(), labels, &mut ids))
            .collect()
    }
}

/// A negatives file (`{"id": ..., "negatives": ...}` per line), held by id
/// (with the line that named it) until the examples it joins are read.
#[derive(Debug)]
pub struct JoinedNegatives {
    path: PathBuf,
    by_id: HashMap<String, (usize, Vec<RawNegative>)>,
    count: usize,
}

impl JoinedNegatives {
    /// Reads `path` for `task`'s examples.
    pub fn read(path: &Path, task: Task, layout: &Layout) -> Result<Self> {
        let mut by_id: HashMap<String, (usize, Vec<RawNegative>)> = HashMap::new();
        let mut count = 0;
        for row in records::open(path, layout, &["id", "negatives"])? {
            let row = row?;
            let n = row.at;
            let parse = |o: serde_json::Map<String, Value>| -> std::result::Result<(String, Vec<RawNegative>), Refusal> {
                let id = raw_id(o.get("id"))?.ok_or("missing \"id\"")?;
                let negs = raw_negatives(o.get("negatives").ok_or("missing \"negatives\"")?, task)?;
                Ok((id, negs))
            };
            let (id, negs) = row
                .value
                .and_then(parse)
                .map_err(|reason| records::explain(line_err(path, n, reason), layout))?;
            count += negs.len();
            by_id
                .entry(id)
                .or_insert_with(|| (n, Vec::new()))
                .1
                .extend(negs);
        }
        Ok(JoinedNegatives {
            path: path.to_path_buf(),
            by_id,
            count,
        })
    }

    /// How many negatives the file holds.
    pub fn count(&self) -> usize {
        self.count
    }

    /// The negatives held for `r`'s id.
    fn of(&self, r: &RawRecord) -> &[RawNegative] {
        r.id.as_ref()
            .and_then(|id| self.by_id.get(id))
            .map_or(&[], |(_, n)| n.as_slice())
    }

    /// Moves the negatives held for `r`'s id into it.
    fn attach(&mut self, r: &mut RawRecord) {
        if let Some((_, negs)) = r.id.as_ref().and_then(|id| self.by_id.remove(id)) {
            r.negatives.extend(negs);
        }
    }

    /// After every example of `data` was read: an id it did not have is
    /// refused at the line that named it (the first such line).
    fn all_joined(&self, data: &Path) -> Result<()> {
        match self.by_id.iter().min_by_key(|(_, (line, _))| *line) {
            None => Ok(()),
            Some((id, (line, _))) => Err(line_err(
                &self.path,
                *line,
                format!("no example with id {id:?} in {}", data.display()),
            )),
        }
    }
}

/// Label names in first-seen order (gold, then negatives), for a run that
/// does not list its labels; NER puts `O` first. Gathered record by record.
#[derive(Debug)]
pub struct SeenLabels {
    gold: Vec<String>,
    negatives: Vec<String>,
    seen: BTreeSet<String>,
    seen_negative: BTreeSet<String>,
}

impl SeenLabels {
    pub fn new(task: Task) -> Self {
        let mut s = SeenLabels {
            gold: Vec::new(),
            negatives: Vec::new(),
            seen: BTreeSet::new(),
            seen_negative: BTreeSet::new(),
        };
        if task == Task::Token {
            s.gold.push("O".into());
            s.seen.insert("O".into());
        }
        s
    }

    /// Reads `path`'s labels (and those of the negatives `joined` holds for
    /// its examples), without holding its records.
    pub fn scan(
        &mut self,
        path: &Path,
        task: Task,
        layout: &Layout,
        joined: Option<&JoinedNegatives>,
    ) -> Result<()> {
        each_raw(path, task, layout, &mut |r| {
            self.add(&r, joined);
            Ok(())
        })
        .map(|_| ())
    }

    fn add(&mut self, r: &RawRecord, joined: Option<&JoinedNegatives>) {
        for l in &r.gold {
            if let RawLabel::Name(n) = l
                && self.seen.insert(n.clone())
            {
                self.gold.push(n.clone());
            }
        }
        let negatives = r
            .negatives
            .iter()
            .chain(joined.map_or(&[][..], |j| j.of(r)));
        for neg in negatives {
            let labels: &[RawLabel] = match neg {
                RawNegative::Sequence(tags) => tags,
                RawNegative::At(_, l) => std::slice::from_ref(l),
            };
            for l in labels {
                if let RawLabel::Name(n) = l
                    && self.seen_negative.insert(n.clone())
                {
                    self.negatives.push(n.clone());
                }
            }
        }
    }

    /// The names: every gold label in the order first seen, then the
    /// labels only negatives used.
    pub fn names(self) -> Vec<String> {
        let SeenLabels {
            mut gold,
            negatives,
            seen,
            ..
        } = self;
        gold.extend(negatives.into_iter().filter(|n| !seen.contains(n)));
        gold
    }
}

/// Streams the examples of `path` (see [`each_raw`]) to `each`, one at a
/// time, with their index: each resolved against `labels` and checked, the
/// negatives `joined` holds for its id added. Ids must be unique; every id
/// of `joined` must be found. Returns how many there were.
pub fn for_each_record(
    path: &Path,
    task: Task,
    layout: &Layout,
    labels: &Labels,
    mut joined: Option<&mut JoinedNegatives>,
    mut each: impl FnMut(usize, Record) -> Result<()>,
) -> Result<usize> {
    let mut ids = HashMap::new();
    let mut i = 0;
    each_raw(path, task, layout, &mut |mut r| {
        if let Some(j) = joined.as_deref_mut() {
            j.attach(&mut r);
        }
        let record = resolve_one(path, task, r, labels, &mut ids)?;
        each(i, record)?;
        i += 1;
        Ok(())
    })?;
    if let Some(j) = joined {
        j.all_joined(path)?;
    }
    Ok(i)
}

/// One record of `path` resolved against `labels` and checked (`ids`: the
/// ids seen so far in its file, with their lines).
fn resolve_one(
    path: &Path,
    task: Task,
    r: RawRecord,
    labels: &Labels,
    ids: &mut HashMap<String, usize>,
) -> Result<Record> {
    let bad = |reason: String| line_err(path, r.line, reason);
    if let Some(id) = &r.id
        && let Some(first) = ids.insert(id.clone(), r.line)
    {
        return Err(bad(format!("id {id:?} was already used at line {first}")));
    }
    let resolve = |l: &RawLabel, what: &str| -> Result<u32> {
        match l {
            RawLabel::Name(n) => labels.id(n).ok_or_else(|| {
                bad(format!(
                    "{what} {n:?} is not one of the labels {:?}",
                    labels.names()
                ))
            }),
            RawLabel::Id(i) if (*i as usize) < labels.len() => Ok(*i as u32),
            RawLabel::Id(i) => Err(bad(format!(
                "{what} id {i} is out of range: there are {} labels",
                labels.len()
            ))),
        }
    };
    let gold: Vec<u32> = match task {
        Task::Token => {
            if r.words.is_empty() {
                return Err(bad("empty sentence (no tokens)".into()));
            }
            if r.words.len() != r.gold.len() {
                return Err(bad(format!(
                    "{} tokens but {} tags",
                    r.words.len(),
                    r.gold.len()
                )));
            }
            r.gold
                .iter()
                .enumerate()
                .map(|(i, t)| resolve(t, &format!("tag {i}")))
                .collect::<Result<_>>()?
        }
        Task::Sequence => vec![resolve(&r.gold[0], "label")?],
    };
    let mut negatives: BTreeSet<(u32, u32)> = BTreeSet::new();
    for (k, neg) in r.negatives.iter().enumerate() {
        match neg {
            RawNegative::Sequence(tags) => {
                if tags.len() != gold.len() {
                    return Err(bad(format!(
                        "negative {k} has {} tags for {} tokens",
                        tags.len(),
                        gold.len()
                    )));
                }
                let mut differs = false;
                for (w, t) in tags.iter().enumerate() {
                    let t = resolve(t, &format!("negative {k} tag {w}"))?;
                    if t != gold[w] {
                        negatives.insert((w as u32, t));
                        differs = true;
                    }
                }
                if !differs {
                    return Err(bad(format!(
                        "negative {k} equals the gold tags: a negative must be wrong somewhere"
                    )));
                }
            }
            RawNegative::At(position, label) => {
                let w = position.unwrap_or(0);
                if w >= gold.len() {
                    return Err(bad(format!(
                        "negative {k} is at word {w}, the sentence has {} words",
                        gold.len()
                    )));
                }
                let t = resolve(label, &format!("negative {k}"))?;
                if t == gold[w] {
                    let name = labels.name(t).unwrap_or("?");
                    return Err(bad(match task {
                        Task::Token => {
                            format!("negative {k} ({name:?} at word {w}) equals the gold tag")
                        }
                        Task::Sequence => {
                            format!("negative {k} ({name:?}) equals the gold label")
                        }
                    }));
                }
                negatives.insert((w as u32, t));
            }
        }
    }
    Ok(Record {
        path: path.to_path_buf(),
        line: r.line,
        id: r.id,
        words: r.words,
        text: r.text,
        gold,
        negatives: negatives.into_iter().collect(),
    })
}

/// The tokens `Record`s become, for either task.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Encoded {
    /// `file:line` of the record.
    pub line: usize,
    /// With the tokenizer's special tokens (`[CLS] … [SEP]`, `<s> … </s>`).
    pub input_ids: Vec<u32>,
    /// `(token position, label)` the cross-entropy is taken over: a word's first
    /// token (every token with `label_all_tokens`) for NER, `(0, label)` for
    /// classification.
    pub targets: Vec<(u32, u32)>,
    /// `(token position, wrong label)`.
    pub negatives: Vec<(u32, u32)>,
    /// NER: the first token of each word kept after truncation (evaluation reads
    /// predictions there); classification: empty.
    pub word_starts: Vec<u32>,
    /// NER: the gold tag of each word kept. Classification: the label.
    pub gold: Vec<u32>,
}

/// How records become tokens.
#[derive(Debug, Clone, Copy)]
pub struct Encoding {
    /// Longest sequence, special tokens included (the model's position limit or less).
    pub max_length: usize,
    /// NER: every sub-token of a word carries its label (`B-` as `I-`).
    pub label_all_tokens: bool,
}

/// Encodes records with the model's tokenizer. Returns the encoded examples and
/// how many were truncated.
pub fn encode(
    records: &[Record],
    tokenizer: &TextTokenizer,
    labels: &Labels,
    how: Encoding,
) -> Result<(Vec<Encoded>, usize)> {
    let mut out = Vec::with_capacity(records.len());
    let mut truncated = 0;
    for r in records {
        let (e, cut) = encode_one(r, tokenizer, labels, how)?;
        truncated += usize::from(cut);
        out.push(e);
    }
    Ok((out, truncated))
}

/// One record's tokens (see [`encode`]), and whether `max_length` cut it.
pub fn encode_one(
    r: &Record,
    tokenizer: &TextTokenizer,
    labels: &Labels,
    how: Encoding,
) -> Result<(Encoded, bool)> {
    let bad = |reason: String| line_err(&r.path, r.line, reason);
    if r.words.is_empty() {
        let ids = tokenizer.encode_with_special_tokens(&r.text, how.max_length)?;
        return Ok((
            Encoded {
                line: r.line,
                input_ids: ids.ids,
                targets: vec![(0, r.gold[0])],
                negatives: r.negatives.iter().map(|&(_, l)| (0, l)).collect(),
                word_starts: Vec::new(),
                gold: r.gold.clone(),
            },
            ids.truncated,
        ));
    }
    let enc = tokenizer.encode_words(&r.words, how.max_length)?;
    // First token of every word, and every token's word.
    let mut starts: Vec<Option<u32>> = vec![None; r.words.len()];
    let mut targets = Vec::new();
    for (pos, w) in enc.word_ids.iter().enumerate() {
        let Some(w) = *w else { continue };
        let w = w as usize;
        let Some(slot) = starts.get_mut(w) else {
            return Err(bad(format!(
                "the tokenizer reported word {w} of {}",
                r.words.len()
            )));
        };
        if slot.is_none() {
            *slot = Some(pos as u32);
            targets.push((pos as u32, r.gold[w]));
        } else if how.label_all_tokens {
            targets.push((pos as u32, labels.inside_of(r.gold[w])));
        }
    }
    let kept = starts.iter().take_while(|s| s.is_some()).count();
    if kept == 0 {
        return Err(bad(format!(
            "no word fits in max_length {} tokens",
            how.max_length
        )));
    }
    // Words past `kept` were cut by max_length, unless a later word still
    // has tokens: then word `kept` itself gave none (the tokenizer dropped it).
    if starts[kept..].iter().any(Option::is_some) {
        return Err(bad(format!(
            "word {kept} ({:?}) gives no tokens with this tokenizer",
            r.words.get(kept).map_or("", String::as_str)
        )));
    }
    let word_starts: Vec<u32> = starts[..kept].iter().flatten().copied().collect();
    let negatives = r
        .negatives
        .iter()
        .filter(|(w, _)| (*w as usize) < kept)
        .map(|&(w, l)| (word_starts[w as usize], l))
        .collect();
    Ok((
        Encoded {
            line: r.line,
            input_ids: enc.ids,
            targets,
            negatives,
            word_starts,
            gold: r.gold[..kept].to_vec(),
        },
        enc.truncated,
    ))
}

/// A classification run's encoded data as the coordinator stores it: one JSON
/// object (`labels`, `train`, `eval`) and a line `sha256:HEX` of it, so a
/// truncated or altered file is refused.
pub fn write_shard(
    path: &Path,
    labels: &[String],
    train: &[Encoded],
    eval: &[Encoded],
) -> Result<()> {
    use sha2::{Digest, Sha256};
    let body = serde_json::json!({"labels": labels, "train": train, "eval": eval}).to_string();
    let digest: String = Sha256::digest(body.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let text = format!("{body}\nsha256:{digest}\n");
    crate::atomic::write(path, text.as_bytes()).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// The data and labels written by [`write_shard`].
pub type Shard = (Vec<String>, Vec<Encoded>, Vec<Encoded>);

/// Reads a file written by [`write_shard`], checking its digest.
pub fn read_shard(path: &Path) -> Result<Shard> {
    use sha2::{Digest, Sha256};
    let bad = |reason: &str| Error::File {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    };
    let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let (body, tail) = text
        .trim_end()
        .rsplit_once('\n')
        .ok_or_else(|| bad("no digest line: truncated"))?;
    let want = tail
        .strip_prefix("sha256:")
        .ok_or_else(|| bad("no digest line: truncated"))?;
    let got: String = Sha256::digest(body.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    if got != want {
        return Err(bad("digest mismatch: the file is corrupt"));
    }
    #[derive(serde::Deserialize)]
    struct Body {
        labels: Vec<String>,
        train: Vec<Encoded>,
        eval: Vec<Encoded>,
    }
    let b: Body = serde_json::from_str(body).map_err(|e| bad(&format!("invalid: {e}")))?;
    Ok((b.labels, b.train, b.eval))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn file(dir: &tempfile::TempDir, name: &str, text: &str) -> PathBuf {
        let p = dir.path().join(name);
        let mut f = std::fs::File::create(&p).expect("create");
        f.write_all(text.as_bytes()).expect("write");
        p
    }

    fn ner_labels() -> Labels {
        Labels::new(
            ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
                .iter()
                .map(|s| s.to_string())
                .collect(),
        )
        .expect("labels")
    }

    fn resolve(task: Task, name: &str, text: &str) -> Result<Vec<Record>> {
        let dir = tempfile::tempdir().expect("tmp");
        let p = file(&dir, name, text);
        let labels = match task {
            Task::Token => ner_labels(),
            Task::Sequence => Labels::new(vec!["neg".into(), "pos".into()]).expect("labels"),
        };
        RawFile::read(&p, task, &Layout::default())?.resolve(&labels)
    }

    fn error(task: Task, name: &str, text: &str) -> String {
        resolve(task, name, text).expect_err("refused").to_string()
    }

    #[test]
    fn ner_jsonl_reads_tags_by_name_and_id_and_both_kinds_of_negatives() {
        let rs = resolve(
            Task::Token,
            "a.jsonl",
            concat!(
                r#"{"tokens": ["Ann", "lives", "in", "Rome"], "tags": ["B-PER", "O", "O", "B-LOC"], "#,
                r#""negatives": [["B-LOC", "O", "O", "B-LOC"], {"position": 1, "tag": "I-PER"}]}"#,
                "\n\n",
                r#"{"id": "x", "tokens": ["Bo"], "tags": [1]}"#,
                "\n"
            ),
        )
        .expect("reads");
        assert_eq!(rs.len(), 2);
        assert_eq!(rs[0].gold, vec![1, 0, 0, 3]);
        // The full negative differs from gold only at word 0.
        assert_eq!(rs[0].negatives, vec![(0, 3), (1, 2)]);
        assert_eq!(rs[1].line, 3);
        assert_eq!(rs[1].gold, vec![1]);
        assert_eq!(rs[1].id.as_deref(), Some("x"));
    }

    #[test]
    fn conll_skips_docstart_and_splits_on_blank_lines() {
        let rs = resolve(
            Task::Token,
            "a.conll",
            "-DOCSTART- -X- O O\n\nAnn NNP B-PER\nRome NNP B-LOC\n\n\nBo NNP I-PER\n",
        )
        .expect("reads");
        assert_eq!(rs.len(), 2);
        assert_eq!(rs[0].words, vec!["Ann", "Rome"]);
        assert_eq!(rs[0].gold, vec![1, 3]);
        assert_eq!(rs[0].line, 3);
        assert_eq!(rs[1].id.as_deref(), Some("1"));
        assert_eq!(rs[1].line, 7);
    }

    #[test]
    fn bad_ner_input_names_file_line_and_reason() {
        let cases = [
            (
                "a.jsonl",
                "{\"tokens\": [\"a\"], \"tags\": [\"O\"]}\n{\"tokens\": [\"a\"], \"tags\": [\"B-ORG\"]}\n",
                ":2: tag 0 \"B-ORG\" is not one of the labels",
            ),
            (
                "a.jsonl",
                "{\"tokens\": [\"a\", \"b\"], \"tags\": [\"O\"]}\n",
                ":1: 2 tokens but 1 tags",
            ),
            (
                "a.jsonl",
                "{\"tokens\": [], \"tags\": []}\n",
                ":1: empty sentence",
            ),
            ("a.conll", "Ann B-PER\nRome\n", ":2: \"Rome\" has no tag"),
            (
                "a.jsonl",
                "{\"tokens\": [\"a\"], \"tags\": [\"O\"], \"negatives\": [{\"position\": 0, \"tag\": \"O\"}]}\n",
                ":1: negative 0 (\"O\" at word 0) equals the gold tag",
            ),
            (
                "a.jsonl",
                "{\"tokens\": [\"a\"], \"tags\": [\"O\"], \"negatives\": [[\"O\"]]}\n",
                ":1: negative 0 equals the gold tags",
            ),
            (
                "a.jsonl",
                "{\"tokens\": [\"a\"], \"tags\": [7]}\n",
                ":1: tag 0 id 7 is out of range",
            ),
            (
                "a.jsonl",
                "{\"tokens\": [\"a\"], \"tags\": [\"O\"], \"negatives\": [{\"position\": 3, \"tag\": \"B-PER\"}]}\n",
                ":1: negative 0 is at word 3",
            ),
            ("a.jsonl", "not json\n", ":1: invalid JSON"),
        ];
        for (name, text, want) in cases {
            let msg = error(Task::Token, name, text);
            assert!(
                msg.contains(name) && msg.contains(want),
                "{msg:?} lacks {want:?}"
            );
        }
    }

    #[test]
    fn classification_reads_labels_and_refuses_a_negative_equal_to_gold() {
        let rs = resolve(
            Task::Sequence,
            "c.jsonl",
            "{\"text\": \"good\", \"label\": \"pos\", \"negatives\": [\"neg\"]}\n{\"text\": \"bad\", \"label\": 0}\n",
        )
        .expect("reads");
        assert_eq!(rs[0].gold, vec![1]);
        assert_eq!(rs[0].negatives, vec![(0, 0)]);
        assert_eq!(rs[1].gold, vec![0]);
        let msg = error(
            Task::Sequence,
            "c.jsonl",
            "{\"text\": \"ok\", \"label\": \"pos\"}\n{\"text\": \"good\", \"label\": \"pos\", \"negatives\": [\"pos\"]}\n",
        );
        assert!(
            msg.contains("c.jsonl:2: negative 0 (\"pos\") equals the gold label"),
            "{msg}"
        );
        let msg = error(
            Task::Sequence,
            "c.jsonl",
            "{\"text\": \"\", \"label\": \"pos\"}\n",
        );
        assert!(msg.contains("c.jsonl:1: \"text\" is empty"), "{msg}");
    }

    #[test]
    fn a_negatives_file_joins_by_id_and_names_an_unknown_id() {
        let dir = tempfile::tempdir().expect("tmp");
        let data = file(
            &dir,
            "d.jsonl",
            "{\"id\": 1, \"tokens\": [\"Ann\"], \"tags\": [\"B-PER\"]}\n{\"id\": \"b\", \"tokens\": [\"x\"], \"tags\": [\"O\"]}\n",
        );
        let negs = file(
            &dir,
            "n.jsonl",
            "{\"id\": \"1\", \"negatives\": [{\"position\": 0, \"tag\": \"B-LOC\"}]}\n",
        );
        let read = |negs: &Path| -> Result<Vec<Record>> {
            let layout = Layout::default();
            let mut joined = JoinedNegatives::read(negs, Task::Token, &layout)?;
            let mut out = Vec::new();
            for_each_record(
                &data,
                Task::Token,
                &layout,
                &ner_labels(),
                Some(&mut joined),
                |_, r| {
                    out.push(r);
                    Ok(())
                },
            )?;
            Ok(out)
        };
        let rs = read(&negs).expect("joins");
        assert_eq!(rs[0].negatives, vec![(0, 3)]);
        assert!(rs[1].negatives.is_empty());
        let bad = file(&dir, "m.jsonl", "\n{\"id\": \"zz\", \"negatives\": []}\n");
        let msg = read(&bad).expect_err("unknown id").to_string();
        assert!(
            msg.contains("m.jsonl:2: no example with id \"zz\""),
            "{msg}"
        );
    }

    #[test]
    fn examples_stream_to_the_caller_one_at_a_time() {
        // A run's examples are handed over as they are read (it keeps their
        // tokens only): the records before a bad line come first, NER in
        // CoNLL and classification in JSON lines alike.
        let dir = tempfile::tempdir().expect("tmp");
        let cases = [
            (
                Task::Token,
                file(&dir, "a.conll", "Ann B-PER\n\nRome B-LOC\n\nBo\n"),
                ner_labels(),
                ":5:",
            ),
            (
                Task::Sequence,
                file(
                    &dir,
                    "c.jsonl",
                    "{\"text\": \"good\", \"label\": \"pos\"}\n{\"text\": \"bad\", \"label\": \"neg\"}\n{\"text\": 3}\n",
                ),
                Labels::new(vec!["neg".into(), "pos".into()]).expect("labels"),
                ":3:",
            ),
        ];
        for (task, path, labels, at) in cases {
            let mut seen = Vec::new();
            let e = for_each_record(&path, task, &Layout::default(), &labels, None, |i, r| {
                seen.push((i, r.line));
                Ok(())
            })
            .expect_err("a bad record last");
            assert_eq!(seen.len(), 2, "{seen:?}");
            assert_eq!(seen[0].0, 0);
            assert_eq!(seen[1].0, 1);
            assert!(e.to_string().contains(at), "{e}");
        }
    }

    #[test]
    fn a_shard_reads_back_and_a_corrupt_one_is_refused() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("tagged.shard");
        let e = Encoded {
            line: 3,
            input_ids: vec![2, 40, 41, 3],
            targets: vec![(1, 1), (2, 0)],
            negatives: vec![(1, 3)],
            word_starts: vec![1, 2],
            gold: vec![1, 0],
        };
        let labels = vec!["O".to_string(), "B-PER".to_string()];
        write_shard(&path, &labels, std::slice::from_ref(&e), &[]).expect("writes");
        let (l, train, eval) = read_shard(&path).expect("reads");
        assert_eq!((l, train, eval), (labels, vec![e], vec![]));
        let text = std::fs::read_to_string(&path).expect("read");
        std::fs::write(&path, text.replace("[2,40,41,3]", "[2,40,42,3]")).expect("write");
        assert!(
            read_shard(&path)
                .expect_err("corrupt")
                .to_string()
                .contains("digest mismatch")
        );
        std::fs::write(&path, &text[..text.len() / 2]).expect("write");
        assert!(read_shard(&path).is_err());
    }

    #[test]
    fn labels_seen_in_data_come_in_first_seen_order_with_o_first() {
        let dir = tempfile::tempdir().expect("tmp");
        let p = file(&dir, "a.conll", "Ann B-PER\nin O\nRome B-LOC\n\nBo I-PER\n");
        let mut seen = SeenLabels::new(Task::Token);
        seen.scan(&p, Task::Token, &Layout::default(), None)
            .expect("reads");
        assert_eq!(seen.names(), vec!["O", "B-PER", "B-LOC", "I-PER"]);
        // Gold labels first (of every file), then those only negatives use.
        let q = file(
            &dir,
            "b.jsonl",
            "{\"tokens\": [\"x\"], \"tags\": [\"B-ORG\"], \"negatives\": [[\"B-MISC\"]]}\n{\"tokens\": [\"y\"], \"tags\": [\"B-LOC\"]}\n",
        );
        let mut seen = SeenLabels::new(Task::Token);
        seen.scan(&q, Task::Token, &Layout::default(), None)
            .expect("reads");
        seen.scan(&p, Task::Token, &Layout::default(), None)
            .expect("reads");
        assert_eq!(
            seen.names(),
            vec!["O", "B-ORG", "B-LOC", "B-PER", "I-PER", "B-MISC"]
        );
        let labels = ner_labels();
        assert_eq!(labels.inside_of(1), 2);
        assert_eq!(labels.inside_of(0), 0);
        assert!(Labels::new(vec!["a".into(), "a".into()]).is_err());
    }
}

#[cfg(test)]
mod limit_tests {
    use super::*;

    fn limits(rows: u64, value: u64, decoded: u64) -> Layout {
        Layout {
            limits: dpo_proto::DataLimits {
                max_rows: rows,
                max_value_bytes: value,
                max_decoded_bytes: decoded,
                max_nesting: 32,
            },
            ..Layout::default()
        }
    }

    #[test]
    fn conll_files_are_read_within_data_limits_naming_line_and_key() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("train.conll");
        std::fs::write(&path, "EU B-ORG\n\nPeter B-PER\n\nrejects O\n").expect("write");
        let read = |layout: &Layout| {
            RawFile::read(&path, Task::Token, layout)
                .map(|f| f.len())
                .map_err(|e| e.to_string())
        };
        assert_eq!(read(&limits(3, 100, 1000)), Ok(3));
        let rows = read(&limits(2, 100, 1000)).expect_err("three sentences");
        assert!(
            rows.contains("train.conll:5:") && rows.contains("data.limits.max_rows = 2"),
            "{rows}"
        );
        let value = read(&limits(3, 8, 1000)).expect_err("an 11-byte line");
        assert!(
            value.contains("train.conll:3:") && value.contains("data.limits.max_value_bytes = 8"),
            "{value}"
        );
        let bytes = read(&limits(3, 100, 20)).expect_err("33 bytes");
        assert!(
            bytes.contains("train.conll")
                && bytes.contains("33 bytes pass")
                && bytes.contains("data.limits.max_decoded_bytes = 20"),
            "{bytes}"
        );
    }

    #[test]
    fn json_lines_files_count_their_bytes_against_the_decoded_budget() {
        let dir = tempfile::tempdir().expect("tmp");
        for (name, text) in [
            ("a.jsonl", "{\"text\": \"x\", \"label\": \"A\"}\n"),
            ("b.jsonl", "{\"text\": \"y\", \"label\": \"B\"}\n"),
        ] {
            std::fs::write(dir.path().join(name), text).expect("write");
        }
        let glob = dir.path().join("*.jsonl");
        let read = |layout: &Layout| {
            RawFile::read(&glob, Task::Sequence, layout)
                .map(|f| f.len())
                .map_err(|e| e.to_string())
        };
        // 28 bytes a file: both fit in 56, the second passes 55.
        assert_eq!(read(&limits(10, 10_000, 56)), Ok(2));
        let err = read(&limits(10, 10_000, 55)).expect_err("56 bytes");
        assert!(
            err.contains("b.jsonl")
                && err.contains("after 28 in earlier files")
                && err.contains("data.limits.max_decoded_bytes = 55"),
            "{err}"
        );
    }
}
