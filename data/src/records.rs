//! Dataset records from any of the files users have: JSON lines, a JSON array,
//! Parquet (one file, a glob of shards, or a folder of them, as the Hub stores
//! datasets) and Arrow IPC (`datasets.save_to_disk` folders). Every record comes
//! out as a JSON object with `data.columns` renames applied, so one parser per
//! record shape serves every file format.
//!
//! Columnar files are streamed a batch of rows at a time (only the columns asked
//! for are decoded), and a JSON array is parsed element by element: no file is
//! held in memory whole. Integer columns that `datasets` marks as `ClassLabel`
//! (e.g. CoNLL-2003's `ner_tags`) come out as their label names.
//!
//! A record's position is its line in a JSON-lines file and its row (counting
//! from 1) in the other formats. A dataset of several files numbers its records
//! on from one file to the next; [`relocate`] turns such a position back into
//! the file and its own line or row, for messages.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{BufReader, Read, Seek};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};

use arrow_array::cast::AsArray;
use arrow_array::types::{
    Float16Type, Float32Type, Float64Type, Int8Type, Int16Type, Int32Type, Int64Type, UInt8Type,
    UInt16Type, UInt32Type, UInt64Type,
};
use arrow_array::{Array, RecordBatch};
use arrow_schema::{ArrowError, DataType};
use dpo_proto::{DataLimits, FileFormat};
use serde_json::{Map, Value};

use crate::error::{Error, Refusal, Result};
use crate::lines::{self, LineError, Lines};

thread_local! {
    /// Set while this thread reads on behalf of someone who may go away (the
    /// coordinator preparing a client's submission): once it is true, every
    /// dataset read on this thread stops at its next record.
    static CANCEL: std::cell::RefCell<Option<std::sync::Arc<std::sync::atomic::AtomicBool>>> =
        const { std::cell::RefCell::new(None) };
}

/// Makes this thread's dataset reads stop (with an error) once `flag` is set,
/// until the returned guard is dropped (also when the work panics: the thread
/// may be a pool's, reused for other work).
pub fn stop_reading_when(flag: std::sync::Arc<std::sync::atomic::AtomicBool>) -> StopGuard {
    CANCEL.with(|c| *c.borrow_mut() = Some(flag));
    StopGuard(())
}

/// Lifts [`stop_reading_when`] when dropped.
#[derive(Debug)]
pub struct StopGuard(());

impl Drop for StopGuard {
    fn drop(&mut self) {
        CANCEL.with(|c| *c.borrow_mut() = None);
    }
}

pub(crate) fn cancelled() -> bool {
    CANCEL.with(|c| {
        c.borrow()
            .as_ref()
            .is_some_and(|f| f.load(std::sync::atomic::Ordering::Relaxed))
    })
}

/// Runs a call into a decoder crate (parquet, arrow-ipc), turning its panic
/// into an error: they trust their input, and a damaged file makes some of
/// their `unwrap`s fail (found by `tests/mutations.rs`). Stack overflows and
/// allocations are bounded before these calls (parquet_check, arrow_check).
fn guarded<T>(f: impl FnOnce() -> T) -> std::result::Result<T, Refusal> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(|panic| {
        let what = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic".into());
        Refusal(format!("the decoder failed on this file ({what})"))
    })
}

/// Rows decoded at a time from a columnar file.
const BATCH_ROWS: usize = 512;

/// How a dataset is read: its file format and column renames.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Layout {
    pub format: FileFormat,
    /// Record key → the file's column name.
    pub columns: BTreeMap<String, String>,
    /// What reading may cost (`data.limits`).
    pub limits: DataLimits,
    /// What the run's datasets read so far (shared by the clones of one
    /// layout): `data.limits.max_rows` and `max_decoded_bytes` hold for a
    /// run's train, eval and negatives together, not for each.
    pub spent: std::sync::Arc<Spent>,
}

/// Records and decoded bytes a run's datasets used, added as each dataset
/// is read to its end.
#[derive(Debug, Default)]
pub struct Spent {
    records: std::sync::atomic::AtomicU64,
    decoded: std::sync::atomic::AtomicU64,
}

/// Equal when they hold the same totals.
impl PartialEq for Spent {
    fn eq(&self, other: &Self) -> bool {
        self.get() == other.get()
    }
}

impl Eq for Spent {}

impl Spent {
    /// `(records, decoded bytes)` so far.
    pub fn get(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering::SeqCst;
        (self.records.load(SeqCst), self.decoded.load(SeqCst))
    }

    /// A dataset read to its end leaves the run's totals at `records`, `decoded`.
    pub(crate) fn set(&self, records: u64, decoded: u64) {
        use std::sync::atomic::Ordering::SeqCst;
        self.records.store(records, SeqCst);
        self.decoded.store(decoded, SeqCst);
    }
}

impl Layout {
    /// The layout of one run's datasets: read them all through clones of
    /// it, so the run's budgets are shared.
    pub fn of(spec: &dpo_proto::DataSpec) -> Self {
        Layout {
            format: spec.file_format,
            columns: spec.columns.clone(),
            limits: spec.limits.clone(),
            spent: std::sync::Arc::default(),
        }
    }

    /// The file's name for record key `key`.
    fn source<'a>(&'a self, key: &'a str) -> &'a str {
        self.columns.get(key).map_or(key, String::as_str)
    }
}

/// One record: its position and the object (or why it is not one).
#[derive(Debug)]
pub struct Row {
    pub at: usize,
    pub value: std::result::Result<Map<String, Value>, Refusal>,
}

fn file_err(path: &Path, reason: impl Into<String>) -> Error {
    Error::File {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

fn at_err(path: &Path, line: usize, reason: impl Into<String>) -> Error {
    Error::Line {
        path: path.to_path_buf(),
        line,
        reason: reason.into(),
    }
}

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn has_glob(path: &Path) -> bool {
    path.to_string_lossy().contains(['*', '?', '['])
}

/// Whether `path` names a dataset of several files (a folder or a glob).
pub fn is_multi(path: &Path) -> bool {
    path.is_dir() || (!path.exists() && has_glob(path))
}

/// The format of one file: `forced`, else by extension, else by its first bytes.
fn format_of(path: &Path, forced: FileFormat) -> FileFormat {
    if forced != FileFormat::Auto {
        return forced;
    }
    match path.extension().and_then(|e| e.to_str()) {
        Some("parquet" | "pq") => return FileFormat::Parquet,
        Some("arrow" | "ipc" | "feather") => return FileFormat::Arrow,
        Some("json") => return FileFormat::Json,
        Some("conll" | "txt" | "iob" | "bio") => return FileFormat::Conll,
        Some("jsonl" | "ndjson") => return FileFormat::Jsonl,
        _ => {}
    }
    let mut magic = [0u8; 6];
    // Only a regular file is looked into (a FIFO would block); the reader
    // refuses anything else.
    let n = if path.is_file() {
        crate::confined::open_read(path)
            .and_then(|mut f| f.read(&mut magic))
            .unwrap_or(0)
    } else {
        0
    };
    match &magic[..n] {
        [b'P', b'A', b'R', b'1', ..] => FileFormat::Parquet,
        [b'A', b'R', b'R', b'O', b'W', b'1'] | [0xff, 0xff, 0xff, 0xff, ..] => FileFormat::Arrow,
        _ => FileFormat::Jsonl,
    }
}

/// `train-00000-of-00003.parquet` → `train`.
fn split_of(name: &str) -> Option<&str> {
    let stem = name.split('.').next()?;
    let mut parts = stem.rsplitn(4, '-');
    let (total, of, index, split) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    (of == "of" && digits(total) && digits(index)).then_some(split)
}

/// The files of a dataset, in order, each with its format: the file itself; a
/// glob's matches (sorted); a `datasets.save_to_disk` folder's Arrow files in
/// the order its `state.json` lists them; or a folder's data files (sorted),
/// all of one format and one split.
pub fn files(path: &Path, forced: FileFormat) -> Result<Vec<(PathBuf, FileFormat)>> {
    let mut found: Vec<PathBuf> = Vec::new();
    if path.is_dir() {
        if path.join("dataset_dict.json").is_file() {
            let splits: Vec<String> = std::fs::read_dir(path)
                .map_err(io_err(path))?
                .filter_map(|e| e.ok())
                .filter(|e| e.path().join("state.json").is_file())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect();
            return Err(file_err(
                path,
                format!(
                    "a DatasetDict folder: name one split's folder ({})",
                    splits
                        .iter()
                        .map(|s| path.join(s).display().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ));
        }
        let state = path.join("state.json");
        if state.is_file() {
            let text = crate::confined::read_to_string(&state).map_err(io_err(&state))?;
            let v: Value = serde_json::from_str(&text)
                .map_err(|e| file_err(&state, format!("invalid JSON: {e}")))?;
            let listed = v
                .get("_data_files")
                .and_then(Value::as_array)
                .ok_or_else(|| {
                    file_err(
                        &state,
                        "no \"_data_files\" list (not a datasets.save_to_disk folder?)",
                    )
                })?;
            for f in listed {
                let name = f
                    .get("filename")
                    .and_then(Value::as_str)
                    .filter(|n| !n.contains('/') && !n.contains(".."))
                    .ok_or_else(|| {
                        file_err(
                            &state,
                            format!("a \"_data_files\" entry without a plain \"filename\": {f}"),
                        )
                    })?;
                found.push(path.join(name));
            }
            let format = if forced == FileFormat::Auto {
                FileFormat::Arrow
            } else {
                forced
            };
            return Ok(found.into_iter().map(|p| (p, format)).collect());
        }
        for entry in std::fs::read_dir(path).map_err(io_err(path))? {
            let p = entry.map_err(io_err(path))?.path();
            let name = p
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let data = matches!(
                p.extension().and_then(|e| e.to_str()),
                Some("parquet" | "arrow" | "jsonl" | "json" | "ndjson" | "conll")
            );
            if p.is_file() && data && !name.starts_with('.') && name != "dataset_info.json" {
                found.push(p);
            }
        }
        found.sort();
        let splits: std::collections::BTreeSet<&str> = found
            .iter()
            .filter_map(|p| p.file_name().and_then(|n| n.to_str()))
            .filter_map(split_of)
            .collect();
        if splits.len() > 1 {
            let first = if splits.contains("train") {
                "train"
            } else {
                splits.iter().next().copied().unwrap_or("train")
            };
            return Err(file_err(
                path,
                format!(
                    "holds the shards of several splits ({}); name one with a glob, e.g. {}",
                    splits.iter().copied().collect::<Vec<_>>().join(", "),
                    path.join(format!("{first}-*")).display()
                ),
            ));
        }
    } else if !path.exists() && has_glob(path) {
        let pattern = path.to_string_lossy();
        let matches =
            glob::glob(&pattern).map_err(|e| file_err(path, format!("not a valid glob: {e}")))?;
        for m in matches {
            let p = m.map_err(|e| file_err(path, e.to_string()))?;
            if p.is_file() {
                found.push(p);
            }
        }
        found.sort();
    } else {
        return Ok(vec![(path.to_path_buf(), format_of(path, forced))]);
    }
    if found.is_empty() {
        return Err(file_err(
            path,
            "no data files (.parquet, .arrow, .jsonl, .json)",
        ));
    }
    let with: Vec<(PathBuf, FileFormat)> = found
        .into_iter()
        .map(|p| {
            let f = format_of(&p, forced);
            (p, f)
        })
        .collect();
    if let Some((other, f)) = with.iter().find(|(_, f)| *f != with[0].1) {
        return Err(file_err(
            path,
            format!(
                "mixes file formats: {} is {:?}, {} is {:?}",
                with[0].0.display(),
                with[0].1,
                other.display(),
                f
            ),
        ));
    }
    Ok(with)
}

/// The records of a dataset, file after file. `keys` are the record keys the
/// reader uses: a columnar file decodes only their columns (empty: all).
#[derive(Debug)]
pub struct Rows {
    files: std::vec::IntoIter<(PathBuf, FileFormat)>,
    layout: Layout,
    keys: Vec<String>,
    /// Positions used by the files already read.
    offset: usize,
    current: Option<(PathBuf, Reader)>,
    done: bool,
    /// Records returned, and bytes the files decode to, counted on from what
    /// the run's earlier datasets used: the run's budgets (`data.limits`).
    records: u64,
    decoded: Decoded,
    /// The run's records before this dataset (to say so in a refusal).
    earlier: u64,
}

/// A dataset's decoded bytes: known when a file is opened (Arrow: checked
/// whole), or counted on as its row groups are read (Parquet).
#[derive(Debug, Clone)]
enum Decoded {
    Known(u64),
    Shared(std::sync::Arc<std::sync::atomic::AtomicU64>),
}

impl Decoded {
    fn get(&self) -> u64 {
        match self {
            Decoded::Known(n) => *n,
            Decoded::Shared(n) => n.load(std::sync::atomic::Ordering::SeqCst),
        }
    }
}

/// Opens `path` (a file, glob or folder) for reading records.
pub fn open(path: &Path, layout: &Layout, keys: &[&str]) -> Result<Rows> {
    let files = files(path, layout.format)?;
    if let Some((p, _)) = files.iter().find(|(_, f)| *f == FileFormat::Conll) {
        return Err(file_err(
            p,
            "a CoNLL file holds NER sentences, not records of this kind",
        ));
    }
    let (records, decoded) = layout.spent.get();
    Ok(Rows {
        files: files.into_iter(),
        layout: layout.clone(),
        keys: keys.iter().map(|k| k.to_string()).collect(),
        offset: 0,
        current: None,
        done: false,
        records,
        decoded: Decoded::Known(decoded),
        earlier: records,
    })
}

impl Rows {
    /// The file being read (for messages).
    pub fn file(&self) -> Option<&Path> {
        self.current.as_ref().map(|(p, _)| p.as_path())
    }

    fn next_row(&mut self) -> Option<Result<Row>> {
        loop {
            if self.done {
                return None;
            }
            if cancelled() {
                self.done = true;
                let path = self.file().map(Path::to_path_buf).unwrap_or_default();
                return Some(Err(file_err(
                    &path,
                    "reading stopped: the submission was abandoned (its client went away)",
                )));
            }
            if self.current.is_none() {
                let Some((path, format)) = self.files.next() else {
                    // Read to its end: the run's later datasets count on.
                    self.layout.spent.set(self.records, self.decoded.get());
                    self.done = true;
                    return None;
                };
                let budget = (self.records, self.decoded.get());
                match Reader::open(&path, format, &self.layout, &self.keys, budget) {
                    Ok((r, decoded)) => {
                        self.decoded = decoded;
                        self.current = Some((path, r));
                    }
                    Err(e) => {
                        self.done = true;
                        return Some(Err(e));
                    }
                }
            }
            let (path, reader) = self.current.as_mut()?;
            match reader.next(path, &self.layout) {
                Some(Ok((at, value))) => {
                    self.records += 1;
                    if self.records > self.layout.limits.max_rows {
                        self.done = true;
                        let earlier = match self.earlier {
                            0 => String::new(),
                            n => format!(" (with the {n} of the run's earlier datasets)"),
                        };
                        return Some(Err(relabel(
                            at_err(
                                path,
                                at,
                                format!(
                                    "more than data.limits.max_rows = {} records{earlier}",
                                    self.layout.limits.max_rows
                                ),
                            ),
                            self.offset,
                        )));
                    }
                    return Some(Ok(Row {
                        at: self.offset + at,
                        value,
                    }));
                }
                Some(Err(e)) => {
                    self.done = true;
                    return Some(Err(relabel(e, self.offset)));
                }
                None => {
                    self.offset += reader.positions();
                    self.current = None;
                }
            }
        }
    }
}

/// An error of the file at `offset` numbered as the dataset numbers it.
fn relabel(e: Error, offset: usize) -> Error {
    match e {
        Error::Line { path, line, reason } => Error::Line {
            path,
            line: line + offset,
            reason,
        },
        e => e,
    }
}

impl Iterator for Rows {
    type Item = Result<Row>;
    fn next(&mut self) -> Option<Self::Item> {
        self.next_row()
    }
}

/// The dataset's decoded bytes once a text file of `size` bytes is added to
/// the `before` of its earlier files, or the refusal naming the limit.
pub(crate) fn text_budget(path: &Path, size: u64, before: u64, limits: &DataLimits) -> Result<u64> {
    let after = before.saturating_add(size);
    if after > limits.max_decoded_bytes {
        let earlier = if before > 0 {
            format!(" (after {before} in earlier files of the run)")
        } else {
            String::new()
        };
        return Err(file_err(
            path,
            format!(
                "{size} bytes{earlier} pass data.limits.max_decoded_bytes = {}",
                limits.max_decoded_bytes
            ),
        ));
    }
    Ok(after)
}

/// Reads one file.
enum Reader {
    Lines {
        lines: Lines<BufReader<File>>,
        n: usize,
    },
    Array {
        rx: Receiver<std::result::Result<Value, Refusal>>,
        n: usize,
    },
    Columns {
        batches: Box<dyn Iterator<Item = std::result::Result<RecordBatch, ArrowError>> + Send>,
        batch: Option<RecordBatch>,
        /// Class names of `ClassLabel` columns (by the file's column name).
        classes: HashMap<String, Vec<String>>,
        row: usize,
        n: usize,
    },
}

impl std::fmt::Debug for Reader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Reader::Lines { .. } => "Reader::Lines",
            Reader::Array { .. } => "Reader::Array",
            Reader::Columns { .. } => "Reader::Columns",
        })
    }
}

fn object(v: Value) -> std::result::Result<Map<String, Value>, Refusal> {
    match v {
        Value::Object(o) => Ok(o),
        other => Err(Refusal::from(format!(
            "expected a JSON object, found {}",
            kind(&other)
        ))),
    }
}

pub(crate) fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// Applies `data.columns`: the file's column becomes the record key.
fn rename(mut o: Map<String, Value>, layout: &Layout) -> Map<String, Value> {
    for (to, from) in &layout.columns {
        if to != from
            && let Some(v) = o.remove(from)
        {
            o.insert(to.clone(), v);
        }
    }
    o
}

impl Reader {
    /// Opens one file of a dataset that has read `budget` = (records, decoded
    /// bytes) so far; returns the reader and the dataset's decoded bytes with
    /// this file's.
    fn open(
        path: &Path,
        format: FileFormat,
        layout: &Layout,
        keys: &[String],
        budget: (u64, u64),
    ) -> Result<(Reader, Decoded)> {
        // Not a device, a FIFO or a folder: reading one would block or never end.
        let meta = std::fs::metadata(path).map_err(io_err(path))?;
        if !meta.is_file() {
            return Err(file_err(path, "not a regular file"));
        }
        match format {
            FileFormat::Parquet => return parquet_reader(path, layout, keys, budget),
            FileFormat::Arrow => return arrow_reader(path, layout, keys, budget),
            _ => {}
        }
        // A text file decodes to about its own size: it counts in full.
        let decoded = text_budget(path, meta.len(), budget.1, &layout.limits)?;
        let reader = match format {
            FileFormat::Auto | FileFormat::Jsonl | FileFormat::Conll => Ok(Reader::Lines {
                lines: lines::open(path)?,
                n: 0,
            }),
            FileFormat::Json => {
                // `datasets`' `to_json` writes JSON lines under `.json`: look.
                let mut first = [0u8; 1];
                let mut f = BufReader::new(crate::confined::open_read(path).map_err(io_err(path))?);
                loop {
                    if f.read(&mut first).map_err(io_err(path))? == 0 {
                        return Err(file_err(path, "empty file"));
                    }
                    if !first[0].is_ascii_whitespace() {
                        break;
                    }
                }
                match first[0] {
                    b'{' => Ok(Reader::Lines {
                        lines: lines::open(path)?,
                        n: 0,
                    }),
                    b'[' => Ok(Reader::Array {
                        rx: json_array(path, layout.limits.max_value_bytes)?,
                        n: 0,
                    }),
                    b => Err(file_err(
                        path,
                        format!(
                            "a .json dataset is an array of records or JSON lines; this one starts with {:?}",
                            b as char
                        ),
                    )),
                }
            }
            FileFormat::Parquet | FileFormat::Arrow => unreachable!("opened above"),
        };
        Ok((reader?, Decoded::Known(decoded)))
    }

    /// How many positions the file used (lines or rows), once read through.
    fn positions(&self) -> usize {
        match self {
            Reader::Lines { n, .. } | Reader::Array { n, .. } | Reader::Columns { n, .. } => *n,
        }
    }

    #[allow(clippy::type_complexity)]
    fn next(
        &mut self,
        path: &Path,
        layout: &Layout,
    ) -> Option<Result<(usize, std::result::Result<Map<String, Value>, Refusal>)>> {
        match self {
            Reader::Lines { lines, n } => loop {
                let line = lines.next()?;
                *n += 1;
                let text = match line {
                    Ok(t) => t,
                    Err(LineError::NotUtf8) => {
                        return Some(Ok((*n, Err("not valid UTF-8".into()))));
                    }
                    Err(LineError::TooLong) => {
                        return Some(Err(at_err(path, *n, lines::too_long())));
                    }
                    Err(LineError::Io(e)) => return Some(Err(io_err(path)(e))),
                };
                if text.trim().is_empty() {
                    continue;
                }
                let value = crate::bounded_json::parse(&text, layout.limits.max_value_bytes)
                    .and_then(object)
                    .map(|o| rename(o, layout));
                return Some(Ok((*n, value)));
            },
            Reader::Array { rx, n } => {
                let item = rx.recv().ok()?;
                *n += 1;
                match item {
                    Ok(v) => Some(Ok((*n, object(v).map(|o| rename(o, layout))))),
                    Err(reason) => Some(Err(at_err(path, *n, reason))),
                }
            }
            Reader::Columns {
                batches,
                batch,
                classes,
                row,
                n,
            } => loop {
                if let Some(b) = batch.as_ref()
                    && *row < b.num_rows()
                {
                    let i = *row;
                    *row += 1;
                    *n += 1;
                    return Some(Ok((*n, row_object(b, i, classes, layout))));
                }
                let next = match guarded(|| batches.next()) {
                    Ok(next) => next?,
                    Err(reason) => Err(ArrowError::ExternalError(reason.into())),
                };
                match next {
                    Ok(b) => {
                        *batch = Some(b);
                        *row = 0;
                    }
                    Err(e) => {
                        return Some(Err(at_err(
                            path,
                            *n + 1,
                            format!("cannot decode the rows from here on: {e}"),
                        )));
                    }
                }
            },
        }
    }
}

/// Parses a JSON array element by element on a thread; the channel yields each
/// element, or why the array could not be read on. An element may span and
/// decode to `limit` bytes at most (see [`crate::bounded_json`]).
fn json_array(path: &Path, limit: u64) -> Result<Receiver<std::result::Result<Value, Refusal>>> {
    use crate::bounded_json::{Bounded, Budget, Meter, Metered};
    struct Each {
        tx: SyncSender<std::result::Result<Value, Refusal>>,
        meter: Meter,
        limit: u64,
    }
    impl<'de> serde::de::Visitor<'de> for Each {
        type Value = ();
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a JSON array of records")
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(
            self,
            mut seq: A,
        ) -> std::result::Result<(), A::Error> {
            loop {
                self.meter.reset();
                let Some(v) = seq.next_element_seed(Bounded(Budget::new(self.limit)))? else {
                    break;
                };
                if self.tx.send(Ok(v)).is_err() {
                    break; // nobody reads on
                }
            }
            Ok(())
        }
    }
    let file = crate::confined::open_read(path).map_err(io_err(path))?;
    let (tx, rx) = sync_channel(256);
    std::thread::Builder::new()
        .name("json-array".into())
        .spawn(move || {
            use serde::Deserializer as _;
            let (reader, meter) = Metered::new(BufReader::new(file), limit);
            let mut de = serde_json::Deserializer::from_reader(reader);
            let each = Each {
                tx: tx.clone(),
                meter,
                limit,
            };
            let result = (&mut de).deserialize_seq(each).and_then(|()| de.end());
            if let Err(e) = result {
                let _ = tx.send(Err(Refusal::from(crate::bounded_json::message(&e))));
            }
        })
        .map_err(io_err(path))?;
    Ok(rx)
}

/// `ClassLabel` names per column from a `datasets` features description
/// (`{"col": {"_type": "ClassLabel", "names": [...]}}`, also inside lists).
fn class_names(features: &Value) -> HashMap<String, Vec<String>> {
    fn of(feature: &Value) -> Option<Vec<String>> {
        match feature {
            Value::Array(inner) if inner.len() == 1 => of(&inner[0]),
            Value::Object(o) => {
                if o.get("_type").and_then(Value::as_str) == Some("ClassLabel") {
                    let names = o.get("names")?.as_array()?;
                    names
                        .iter()
                        .map(|n| n.as_str().map(str::to_string))
                        .collect()
                } else {
                    of(o.get("feature")?)
                }
            }
            _ => None,
        }
    }
    let mut out = HashMap::new();
    if let Some(cols) = features.as_object() {
        for (name, f) in cols {
            if let Some(names) = of(f) {
                out.insert(name.clone(), names);
            }
        }
    }
    out
}

/// The features `datasets` stored with a file: the schema's `huggingface`
/// metadata, else a `dataset_info.json` beside it.
fn features_of(schema_meta: &HashMap<String, String>, path: &Path) -> HashMap<String, Vec<String>> {
    let from_meta = schema_meta
        .get("huggingface")
        .and_then(|m| serde_json::from_str::<Value>(m).ok())
        .and_then(|v| v.get("info")?.get("features").cloned());
    let from_info = || {
        let info = path.parent()?.join("dataset_info.json");
        let v: Value = serde_json::from_str(&crate::confined::read_to_string(&info).ok()?).ok()?;
        v.get("features").cloned()
    };
    from_meta
        .or_else(from_info)
        .map(|f| class_names(&f))
        .unwrap_or_default()
}

/// Indices of the top-level columns holding `keys` (renamed); all when `keys`
/// is empty.
fn wanted(names: &[String], layout: &Layout, keys: &[String]) -> Vec<usize> {
    if keys.is_empty() {
        return (0..names.len()).collect();
    }
    let sources: Vec<&str> = keys.iter().map(|k| layout.source(k)).collect();
    (0..names.len())
        .filter(|&i| sources.contains(&names[i].as_str()))
        .collect()
}

fn parquet_reader(
    path: &Path,
    layout: &Layout,
    keys: &[String],
    budget: (u64, u64),
) -> Result<(Reader, Decoded)> {
    use parquet::arrow::ProjectionMask;
    use parquet::arrow::arrow_reader::{ArrowReaderMetadata, ArrowReaderOptions};
    let mut file = crate::confined::open_read(path).map_err(io_err(path))?;
    // The parquet crate trusts the file: its footer is checked here, each row
    // group's pages before the group is decoded (see parquet_check).
    let roots: Vec<String> = keys.iter().map(|k| layout.source(k).to_string()).collect();
    let plan = crate::parquet_check::check(path, &mut file, &layout.limits, budget.0)?;
    let metadata = guarded(|| ArrowReaderMetadata::load(&file, ArrowReaderOptions::default()))
        .map_err(|reason| file_err(path, format!("not a readable Parquet file: {reason}")))?
        .map_err(|e| file_err(path, format!("not a readable Parquet file: {e}")))?;
    let names: Vec<String> = metadata
        .schema()
        .fields()
        .iter()
        .map(|f| f.name().clone())
        .collect();
    let classes = features_of(metadata.schema().metadata(), path);
    let mask = ProjectionMask::roots(metadata.parquet_schema(), wanted(&names, layout, keys));
    let groups = metadata.metadata().num_row_groups();
    let decoded = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(budget.1));
    let reader = Reader::Columns {
        batches: Box::new(RowGroups {
            file,
            metadata,
            mask,
            next: 0,
            groups,
            current: None,
            plan,
            roots,
            decoded: decoded.clone(),
        }),
        batch: None,
        classes,
        row: 0,
        n: 0,
    };
    Ok((reader, Decoded::Shared(decoded)))
}

/// A Parquet file's batches, one row group after another: a row group that
/// cannot be decoded is reported at its first row, after the rows before it.
struct RowGroups {
    file: File,
    metadata: parquet::arrow::arrow_reader::ArrowReaderMetadata,
    mask: parquet::arrow::ProjectionMask,
    next: usize,
    groups: usize,
    current: Option<parquet::arrow::arrow_reader::ParquetRecordBatchReader>,
    /// The footer's check; each group's pages are checked before it is read.
    plan: crate::parquet_check::Plan,
    roots: Vec<String>,
    /// The dataset's decoded bytes so far.
    decoded: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl Iterator for RowGroups {
    type Item = std::result::Result<RecordBatch, ArrowError>;

    fn next(&mut self) -> Option<Self::Item> {
        use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
        loop {
            if let Some(reader) = self.current.as_mut() {
                match reader.next() {
                    Some(item) => return Some(item),
                    None => self.current = None,
                }
            }
            if self.next == self.groups {
                return None;
            }
            let group = self.next;
            self.next += 1;
            let mut file = match self.file.try_clone() {
                Ok(f) => f,
                Err(e) => return Some(Err(ArrowError::ExternalError(Box::new(e)))),
            };
            use std::sync::atomic::Ordering;
            let mut decoded = self.decoded.load(Ordering::SeqCst);
            let checked = self
                .plan
                .check_group(&mut file, group, &self.roots, &mut decoded);
            self.decoded.store(decoded, Ordering::SeqCst);
            if let Err(reason) = checked {
                self.next = self.groups; // nothing after a refused group
                return Some(Err(ArrowError::ParseError(reason.0)));
            }
            let built = guarded(|| {
                ParquetRecordBatchReaderBuilder::new_with_metadata(file, self.metadata.clone())
                    .with_row_groups(vec![group])
                    .with_projection(self.mask.clone())
                    .with_batch_size(BATCH_ROWS)
                    .build()
            });
            match built {
                Ok(Ok(r)) => self.current = Some(r),
                Ok(Err(e)) => {
                    self.next = self.groups; // nothing after a broken group
                    return Some(Err(ArrowError::ExternalError(Box::new(e))));
                }
                Err(reason) => {
                    self.next = self.groups;
                    return Some(Err(ArrowError::ExternalError(reason.into())));
                }
            }
        }
    }
}

fn arrow_reader(
    path: &Path,
    layout: &Layout,
    keys: &[String],
    budget: (u64, u64),
) -> Result<(Reader, Decoded)> {
    use arrow_ipc::reader::{FileReader, StreamReader};
    let mut magic = [0u8; 6];
    let mut f = crate::confined::open_read(path).map_err(io_err(path))?;
    // arrow-ipc trusts the file: check it first (see arrow_check).
    let checked = crate::arrow_check::check(path, &mut f, &layout.limits, budget.0, budget.1)?;
    // The rows are counted as they are read, like every format's.
    f.seek(std::io::SeekFrom::Start(0)).map_err(io_err(path))?;
    let n = f.read(&mut magic).map_err(io_err(path))?;
    let bad = |e: ArrowError| file_err(path, format!("not a readable Arrow file: {e}"));
    let file = crate::confined::open_read(path).map_err(io_err(path))?;
    // Projection needs the schema first: open once to read it.
    let panicked = |reason: Refusal| file_err(path, format!("not a readable Arrow file: {reason}"));
    let (schema, is_file) = if &magic[..n] == b"ARROW1" {
        let f = BufReader::new(crate::confined::open_read(path).map_err(io_err(path))?);
        let r = guarded(|| FileReader::try_new(f, None))
            .map_err(panicked)?
            .map_err(bad)?;
        (r.schema(), true)
    } else {
        let f = BufReader::new(crate::confined::open_read(path).map_err(io_err(path))?);
        let r = guarded(|| StreamReader::try_new(f, None))
            .map_err(panicked)?
            .map_err(bad)?;
        (r.schema(), false)
    };
    let names: Vec<String> = schema.fields().iter().map(|f| f.name().clone()).collect();
    let classes = features_of(schema.metadata(), path);
    let projection = Some(wanted(&names, layout, keys));
    let batches: Box<dyn Iterator<Item = std::result::Result<RecordBatch, ArrowError>> + Send> =
        if is_file {
            let f = BufReader::new(file);
            Box::new(
                guarded(|| FileReader::try_new(f, projection))
                    .map_err(panicked)?
                    .map_err(bad)?,
            )
        } else {
            let f = BufReader::new(file);
            Box::new(
                guarded(|| StreamReader::try_new(f, projection))
                    .map_err(panicked)?
                    .map_err(bad)?,
            )
        };
    let reader = Reader::Columns {
        batches,
        batch: None,
        classes,
        row: 0,
        n: 0,
    };
    Ok((reader, Decoded::Known(checked.decoded)))
}

/// Row `i` of `batch` as a JSON object (renamed).
fn row_object(
    batch: &RecordBatch,
    i: usize,
    classes: &HashMap<String, Vec<String>>,
    layout: &Layout,
) -> std::result::Result<Map<String, Value>, Refusal> {
    let mut o = Map::new();
    for (field, column) in batch.schema().fields().iter().zip(batch.columns()) {
        let names = classes.get(field.name()).map(Vec::as_slice);
        let v = cell(column.as_ref(), i, names)
            .map_err(|reason| format!("column {:?}: {reason}", field.name()))?;
        o.insert(field.name().clone(), v);
    }
    Ok(rename(o, layout))
}

/// One value of an Arrow array as JSON; integers become class names where the
/// column is a `ClassLabel`.
fn cell(
    a: &dyn Array,
    i: usize,
    classes: Option<&[String]>,
) -> std::result::Result<Value, Refusal> {
    if a.is_null(i) {
        return Ok(Value::Null);
    }
    let int = |v: i128| -> std::result::Result<Value, Refusal> {
        match classes {
            Some(names) => usize::try_from(v)
                .ok()
                .and_then(|k| names.get(k))
                .map(|n| Value::String(n.clone()))
                .ok_or_else(|| {
                    Refusal(format!(
                        "{v} is not one of the column's {} class labels",
                        names.len()
                    ))
                }),
            None => Ok(i64::try_from(v)
                .map(Value::from)
                .unwrap_or_else(|_| Value::from(v as u64))),
        }
    };
    let float = |v: f64| {
        serde_json::Number::from_f64(v)
            .map(Value::Number)
            .ok_or_else(|| Refusal::from(format!("{v} is not a finite number")))
    };
    Ok(match a.data_type() {
        DataType::Null => Value::Null,
        DataType::Boolean => Value::Bool(a.as_boolean().value(i)),
        DataType::Int8 => int(a.as_primitive::<Int8Type>().value(i).into())?,
        DataType::Int16 => int(a.as_primitive::<Int16Type>().value(i).into())?,
        DataType::Int32 => int(a.as_primitive::<Int32Type>().value(i).into())?,
        DataType::Int64 => int(a.as_primitive::<Int64Type>().value(i).into())?,
        DataType::UInt8 => int(a.as_primitive::<UInt8Type>().value(i).into())?,
        DataType::UInt16 => int(a.as_primitive::<UInt16Type>().value(i).into())?,
        DataType::UInt32 => int(a.as_primitive::<UInt32Type>().value(i).into())?,
        DataType::UInt64 => int(a.as_primitive::<UInt64Type>().value(i).into())?,
        DataType::Float16 => float(a.as_primitive::<Float16Type>().value(i).to_f64())?,
        DataType::Float32 => float(a.as_primitive::<Float32Type>().value(i).into())?,
        DataType::Float64 => float(a.as_primitive::<Float64Type>().value(i))?,
        DataType::Utf8 => Value::String(a.as_string::<i32>().value(i).to_string()),
        DataType::LargeUtf8 => Value::String(a.as_string::<i64>().value(i).to_string()),
        DataType::Utf8View => Value::String(a.as_string_view().value(i).to_string()),
        DataType::List(_) => list(a.as_list::<i32>().value(i).as_ref(), classes)?,
        DataType::LargeList(_) => list(a.as_list::<i64>().value(i).as_ref(), classes)?,
        DataType::FixedSizeList(..) => list(a.as_fixed_size_list().value(i).as_ref(), classes)?,
        DataType::Struct(fields) => {
            let s = a.as_struct();
            let mut o = Map::new();
            for (f, col) in fields.iter().zip(s.columns()) {
                o.insert(f.name().clone(), cell(col.as_ref(), i, None)?);
            }
            Value::Object(o)
        }
        other => {
            return Err(Refusal::from(format!(
                "values of type {other} cannot be read"
            )));
        }
    })
}

fn list(a: &dyn Array, classes: Option<&[String]>) -> std::result::Result<Value, Refusal> {
    (0..a.len())
        .map(|j| cell(a, j, classes))
        .collect::<std::result::Result<Vec<_>, _>>()
        .map(Value::Array)
}

/// A record's error names the record key; where `data.columns` renamed the
/// file's column to that key, the message says which column it is.
pub fn explain(e: Error, layout: &Layout) -> Error {
    let Error::Line {
        path,
        line,
        mut reason,
    } = e
    else {
        return e;
    };
    if let Some((_, from)) = layout
        .columns
        .iter()
        .find(|(to, from)| to != from && reason.contains(&format!("\"{to}\"")))
    {
        reason.push_str(&format!(
            " (the file's column \"{from}\", renamed by data.columns)"
        ));
    }
    Error::Line { path, line, reason }
}

/// For messages about a dataset of several files: turns a position counted
/// across `dataset`'s files (as [`Rows`] numbers them) into the file holding
/// it and its own line or row. Other errors come back as they are.
pub fn relocate(e: Error, dataset: &Path, layout: &Layout) -> Error {
    let Error::Line { path, line, reason } = e else {
        return e;
    };
    if path != dataset || !is_multi(dataset) {
        return Error::Line { path, line, reason };
    }
    let Ok(files) = files(dataset, layout.format) else {
        return Error::Line { path, line, reason };
    };
    let mut before = 0usize;
    for (file, format) in files {
        let Ok((mut reader, _)) = Reader::open(&file, format, layout, &[], (0, 0)) else {
            break;
        };
        while let Some(Ok(_)) = reader.next(&file, layout) {}
        let n = reader.positions();
        if line <= before + n {
            return Error::Line {
                path: file,
                line: line - before,
                reason,
            };
        }
        before += n;
    }
    Error::Line { path, line, reason }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(path: &Path, layout: &Layout) -> Vec<(usize, String)> {
        open(path, layout, &[])
            .expect("opens")
            .map(|r| {
                let r = r.expect("row");
                (
                    r.at,
                    match r.value {
                        Ok(o) => Value::Object(o).to_string(),
                        Err(e) => format!("error: {e}"),
                    },
                )
            })
            .collect()
    }

    /// `data.limits` bound a run, not each of its datasets: train and eval
    /// that each fit but together pass a limit are refused at the record or
    /// file that passes it, saying the earlier datasets count; a dataset only
    /// peeked at (its first record) counts nothing.
    #[test]
    fn the_limits_hold_for_the_run_s_datasets_together() {
        let dir = tempfile::tempdir().expect("tmp");
        let (train, eval) = (
            dir.path().join("train.jsonl"),
            dir.path().join("eval.jsonl"),
        );
        std::fs::write(&train, "{\"a\": 1}\n".repeat(3)).expect("write");
        std::fs::write(&eval, "{\"a\": 2}\n".repeat(3)).expect("write");
        let mut layout = Layout::default();
        layout.limits.max_rows = 5;
        // A peek (as format detection does) leaves the budget alone.
        assert!(open(&train, &layout, &[]).expect("opens").next().is_some());
        assert_eq!(layout.spent.get(), (0, 0));
        assert_eq!(rows(&train, &layout).len(), 3);
        assert_eq!(layout.spent.get(), (3, 27));
        let read: Vec<Result<Row>> = open(&eval, &layout, &[]).expect("opens").collect();
        assert_eq!(read.len(), 3, "two records, then the refusal");
        let err = read[2]
            .as_ref()
            .expect_err("over the run's rows")
            .to_string();
        assert!(
            err.contains("eval.jsonl:3: more than data.limits.max_rows = 5 records (with the 3 of the run's earlier datasets)"),
            "{err}"
        );
        // Bytes: 27 + 27 pass 40 when the eval file is opened.
        let mut layout = Layout::default();
        layout.limits.max_decoded_bytes = 40;
        assert_eq!(rows(&train, &layout).len(), 3);
        let err = open(&eval, &layout, &[])
            .expect("opens")
            .next()
            .expect("a result")
            .expect_err("over the run's bytes")
            .to_string();
        assert!(
            err.contains("27 bytes (after 27 in earlier files of the run) pass data.limits.max_decoded_bytes = 40"),
            "{err}"
        );
        // Another run's layout starts from nothing.
        let fresh = Layout {
            limits: layout.limits.clone(),
            ..Layout::default()
        };
        assert_eq!(rows(&eval, &fresh).len(), 3);
    }

    #[test]
    fn reading_stops_once_its_requester_is_gone() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("d.jsonl");
        std::fs::write(&path, "{\"a\": 1}\n".repeat(10)).expect("write");
        let flag = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let guard = stop_reading_when(flag.clone());
        let mut rows = open(&path, &Layout::default(), &[]).expect("opens");
        assert!(rows.next().expect("a row").is_ok());
        flag.store(true, std::sync::atomic::Ordering::Relaxed);
        let err = rows
            .next()
            .expect("an error")
            .expect_err("stopped")
            .to_string();
        assert!(err.contains("client went away"), "{err}");
        assert!(rows.next().is_none());
        drop(guard);
        assert_eq!(
            open(&path, &Layout::default(), &[]).expect("opens").count(),
            10
        );
    }

    #[test]
    fn json_arrays_and_lines_give_the_same_records_with_renames() {
        let dir = tempfile::tempdir().expect("tmp");
        let lines = dir.path().join("a.jsonl");
        std::fs::write(
            &lines,
            "{\"q\":\"x\",\"good\":\"y\"}\n\n{\"q\":\"z\",\"good\":\"w\"}\n",
        )
        .expect("write");
        let array = dir.path().join("a.json");
        std::fs::write(
            &array,
            " [{\"q\":\"x\",\"good\":\"y\"},\n {\"q\":\"z\",\"good\":\"w\"}]",
        )
        .expect("write");
        let layout = Layout {
            format: FileFormat::Auto,
            columns: [("prompt", "q"), ("chosen", "good")]
                .into_iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect(),
            ..Layout::default()
        };
        let from_lines = rows(&lines, &layout);
        assert_eq!(from_lines[1].0, 3, "lines are numbered as in the file");
        assert_eq!(from_lines[0].1, r#"{"chosen":"y","prompt":"x"}"#);
        let from_array = rows(&array, &layout);
        assert_eq!(from_array[1], (2, from_lines[1].1.clone()), "rows from 1");
        // JSON lines under `.json`, as `datasets.to_json` writes them.
        std::fs::write(&array, "{\"q\":\"x\",\"good\":\"y\"}\n").expect("write");
        assert_eq!(rows(&array, &layout)[0].1, from_lines[0].1);
    }

    #[test]
    fn a_broken_array_names_the_row_and_a_non_object_is_a_row_error() {
        let dir = tempfile::tempdir().expect("tmp");
        let p = dir.path().join("a.json");
        std::fs::write(&p, "[{\"a\":1}, 7, {\"a\": ]").expect("write");
        let mut r = open(&p, &Layout::default(), &[]).expect("opens");
        assert!(r.next().expect("1").expect("row").value.is_ok());
        let second = r.next().expect("2").expect("row");
        assert_eq!(
            second.value,
            Err("expected a JSON object, found a number".into())
        );
        let e = r.next().expect("3").expect_err("broken").to_string();
        assert!(
            e.starts_with(&format!("{}:3: invalid JSON", p.display())),
            "{e}"
        );
    }

    #[test]
    fn folders_and_globs_list_their_shards_and_refuse_mixed_splits() {
        let dir = tempfile::tempdir().expect("tmp");
        for name in ["train-00001-of-00002.jsonl", "train-00000-of-00002.jsonl"] {
            std::fs::write(dir.path().join(name), "{\"a\":1}\n\n{\"a\":2}\n").expect("write");
        }
        let names = |v: Vec<(PathBuf, FileFormat)>| {
            v.into_iter()
                .map(|(p, _)| p.file_name().expect("name").to_string_lossy().into_owned())
                .collect::<Vec<_>>()
        };
        let listed = names(files(dir.path(), FileFormat::Auto).expect("folder"));
        assert_eq!(
            listed,
            ["train-00000-of-00002.jsonl", "train-00001-of-00002.jsonl"]
        );
        // Positions go on from file to file; relocate finds the file back.
        let got = rows(dir.path(), &Layout::default());
        assert_eq!(got.iter().map(|r| r.0).collect::<Vec<_>>(), [1, 3, 4, 6]);
        let e = relocate(at_err(dir.path(), 6, "bad"), dir.path(), &Layout::default());
        assert_eq!(
            e.to_string(),
            format!(
                "{}:3: bad",
                dir.path().join("train-00001-of-00002.jsonl").display()
            )
        );

        std::fs::write(dir.path().join("test-00000-of-00001.jsonl"), "{}\n").expect("write");
        let e = files(dir.path(), FileFormat::Auto)
            .expect_err("two splits")
            .to_string();
        assert!(e.contains("several splits (test, train)"), "{e}");
        let glob = dir.path().join("train-*.jsonl");
        assert_eq!(
            names(files(&glob, FileFormat::Auto).expect("glob")).len(),
            2
        );
        let none = dir.path().join("dev-*.jsonl");
        let e = files(&none, FileFormat::Auto)
            .expect_err("nothing")
            .to_string();
        assert!(e.contains("no data files"), "{e}");
    }

    #[test]
    fn devices_and_fifos_are_not_read_in_any_format() {
        for format in [
            FileFormat::Parquet,
            FileFormat::Arrow,
            FileFormat::Json,
            FileFormat::Auto,
        ] {
            let layout = Layout {
                format,
                ..Layout::default()
            };
            let e = open(Path::new("/dev/zero"), &layout, &[])
                .expect("opens lazily")
                .next()
                .expect("an item")
                .expect_err("not a regular file")
                .to_string();
            assert!(e.ends_with("not a regular file"), "{format:?}: {e}");
        }
    }

    #[test]
    fn shard_names_give_their_split() {
        assert_eq!(split_of("train-00000-of-00003.parquet"), Some("train"));
        assert_eq!(split_of("my-test-00002-of-00003.arrow"), Some("my-test"));
        assert_eq!(split_of("data-00000-of-00001.arrow"), Some("data"));
        assert_eq!(split_of("train.parquet"), None);
        assert_eq!(split_of("a-1-to-2.parquet"), None);
    }

    #[test]
    fn class_labels_are_found_in_features_also_inside_lists() {
        let f: Value = serde_json::json!({
            "tokens": {"feature": {"dtype": "string", "_type": "Value"}, "_type": "List"},
            "ner_tags": {"feature": {"names": ["O", "B-PER"], "_type": "ClassLabel"}, "_type": "Sequence"},
            "label": {"names": ["neg", "pos"], "_type": "ClassLabel"},
            "old": [{"names": ["a"], "_type": "ClassLabel"}]
        });
        let c = class_names(&f);
        assert_eq!(c.get("ner_tags").map(Vec::len), Some(2));
        assert_eq!(c.get("label").map(|v| v[1].as_str()), Some("pos"));
        assert_eq!(c.get("old").map(|v| v[0].as_str()), Some("a"));
        assert!(!c.contains_key("tokens"));
    }
}
