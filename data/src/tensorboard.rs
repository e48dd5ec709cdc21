//! TensorBoard event files (`[train] report_to = ["tensorboard"]`): the scalars of
//! `metrics.jsonl` and `eval.jsonl` under transformers' tag names (`train/loss`,
//! `train/rewards/accuracies`, `eval/loss`, …), one event per step.
//!
//! The format is TensorFlow's record file: each record is its length (u64 LE),
//! the length's masked CRC-32C, the bytes, their masked CRC-32C; each record an
//! `Event` protobuf. A file starts with `file_version = "brain.Event:2"` and a
//! `SessionLog.START` at the first step it may write: TensorBoard then drops,
//! from earlier files of the run, every event at or after that step — what a
//! crashed writer appended past the last recorded step is never shown twice.

use std::fs::{File, OpenOptions};

use crate::confined::{Access, Dir};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use prost::Message;

#[derive(Clone, PartialEq, Message)]
struct Event {
    #[prost(double, tag = "1")]
    wall_time: f64,
    #[prost(int64, tag = "2")]
    step: i64,
    #[prost(string, optional, tag = "3")]
    file_version: Option<String>,
    #[prost(message, optional, tag = "5")]
    summary: Option<Summary>,
    #[prost(message, optional, tag = "7")]
    session_log: Option<SessionLog>,
}

#[derive(Clone, PartialEq, Message)]
struct Summary {
    #[prost(message, repeated, tag = "1")]
    value: Vec<SummaryValue>,
}

#[derive(Clone, PartialEq, Message)]
struct SummaryValue {
    #[prost(string, tag = "1")]
    tag: String,
    #[prost(float, optional, tag = "2")]
    simple_value: Option<f32>,
}

#[derive(Clone, PartialEq, Message)]
struct SessionLog {
    /// `SessionLog.SessionStatus`: 1 is START.
    #[prost(int32, tag = "1")]
    status: i32,
}

/// CRC-32C (Castagnoli), as TFRecord files checksum with.
fn crc32c(bytes: &[u8]) -> u32 {
    static TABLE: OnceLock<[u32; 256]> = OnceLock::new();
    let table = TABLE.get_or_init(|| {
        let mut t = [0u32; 256];
        for (i, slot) in t.iter_mut().enumerate() {
            let mut c = i as u32;
            for _ in 0..8 {
                c = if c & 1 == 1 {
                    0x82F6_3B78 ^ (c >> 1)
                } else {
                    c >> 1
                };
            }
            *slot = c;
        }
        t
    });
    let mut c = !0u32;
    for &b in bytes {
        c = table[((c ^ u32::from(b)) & 0xff) as usize] ^ (c >> 8);
    }
    !c
}

fn masked_crc(bytes: &[u8]) -> u32 {
    let c = crc32c(bytes);
    c.rotate_right(15).wrapping_add(0xA282_EAD8)
}

/// One record of a TFRecord file.
fn record(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut out = Vec::with_capacity(data.len() + 16);
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked_crc(&len).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&masked_crc(data).to_le_bytes());
    out
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// The TensorBoard tag of a metric, as transformers' TensorBoard callback names
/// it: `eval_x` → `eval/x`, `test_x` → `test/x`, anything else → `train/x`.
/// `step` is the event's step, not a scalar.
pub fn tag(key: &str) -> Option<String> {
    if key == "step" {
        return None;
    }
    for split in ["eval", "test"] {
        if let Some(rest) = key.strip_prefix(split).and_then(|r| r.strip_prefix('_')) {
            return Some(format!("{split}/{rest}"));
        }
    }
    Some(format!("train/{key}"))
}

/// The event directory of a run: `<output>/runs/<name>` (transformers keeps its
/// runs under `output_dir/runs/` too: `tensorboard --logdir <output>/runs`).
pub fn run_dir(output: &Path, name: &str) -> PathBuf {
    output.join("runs").join(name)
}

/// An open event file.
#[derive(Debug)]
pub struct EventWriter {
    file: File,
    path: PathBuf,
}

fn host() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| {
            !h.is_empty()
                && h.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
        })
        .unwrap_or_else(|| "localhost".into())
}

/// Now as `<seconds>.<nanoseconds>`, fixed width: TensorBoard reads a run's
/// files in name order, which must be the order they were started in (a
/// resumed run's START then comes after what it supersedes).
fn stamp() -> String {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    format!("{:010}.{:09}", d.as_secs(), d.subsec_nanos())
}

/// A fresh event file name: `events.out.tfevents.<seconds>.<ns>.<host>.<pid>.<n>`.
fn file_name() -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    format!(
        "events.out.tfevents.{}.{}.{}.{}",
        stamp(),
        host(),
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

impl EventWriter {
    /// A new event file in `dir` (created when missing) whose writer will write
    /// steps from `first_step` on: older files' events at or after it are
    /// dropped by TensorBoard.
    pub fn create(dir: &Path, first_step: u64) -> std::io::Result<Self> {
        Self::create_at(dir.join(file_name()), first_step)
    }

    /// A new event file at `path` (its folder created when missing), headed by
    /// the file version and the START at `first_step`.
    fn create_at(path: PathBuf, first_step: u64) -> std::io::Result<Self> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let file = OpenOptions::new()
            .create_new(true)
            .append(true)
            .open(&path)?;
        let mut w = EventWriter { file, path };
        w.header(first_step)?;
        Ok(w)
    }

    fn header(&mut self, first_step: u64) -> std::io::Result<()> {
        let t = now();
        self.write(&Event {
            wall_time: t,
            step: 0,
            file_version: Some("brain.Event:2".into()),
            ..Default::default()
        })?;
        self.write(&Event {
            wall_time: t,
            step: first_step as i64,
            session_log: Some(SessionLog { status: 1 }),
            ..Default::default()
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn write(&mut self, e: &Event) -> std::io::Result<()> {
        self.file.write_all(&record(&e.encode_to_vec()))
    }

    /// Writes one step's metrics (a `metrics.jsonl` or `eval.jsonl` line) as
    /// scalars at their `step`, and flushes. Lines without a step are skipped.
    pub fn scalars(&mut self, metrics: &[(String, f64)]) -> std::io::Result<()> {
        let Some(step) = metrics.iter().find(|(k, _)| k == "step").map(|(_, v)| *v) else {
            return Ok(());
        };
        let value = metrics
            .iter()
            .filter(|(_, v)| v.is_finite())
            .filter_map(|(k, v)| {
                tag(k).map(|tag| SummaryValue {
                    tag,
                    simple_value: Some(*v as f32),
                })
            })
            .collect();
        self.write(&Event {
            wall_time: now(),
            step: step as i64,
            summary: Some(Summary { value }),
            ..Default::default()
        })?;
        self.file.flush()
    }
}

/// The name of this process's event file in a folder, for a writer that
/// opens it per write (the coordinator, for every run it records).
fn process_file() -> String {
    static STARTED: OnceLock<String> = OnceLock::new();
    let started = STARTED.get_or_init(stamp);
    format!(
        "events.out.tfevents.{started}.{}.{}.coordinator",
        host(),
        std::process::id()
    )
}

/// Appends `metrics` to this process's event file in `dir` (a confined
/// folder), creating it first — with a START at `first_step` — when this
/// process has not written there yet.
pub fn append(dir: &Dir, first_step: u64, metrics: &[(String, f64)]) -> std::io::Result<()> {
    let name = process_file();
    let file = dir.file(&name, Access::Append)?;
    let fresh = file.metadata()?.len() == 0;
    let mut w = EventWriter {
        file,
        path: dir.path().join(name),
    };
    if fresh {
        w.header(first_step)?;
    }
    w.scalars(metrics)
}

/// Starts this process's event file in `dir` (a confined folder) at
/// `first_step` (TensorBoard drops older files' events from there on) and
/// writes `lines` into it first: the recorded steps from `first_step` on that
/// the START would drop with them.
pub fn restart(dir: &Dir, first_step: u64, lines: &[Vec<(String, f64)>]) -> std::io::Result<()> {
    let name = process_file();
    let mut w = EventWriter {
        file: dir.file(&name, Access::CreateNew)?,
        path: dir.path().join(name),
    };
    w.header(first_step)?;
    for m in lines {
        w.scalars(m)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_and_its_mask_match_the_known_values() {
        // The CRC-32C check value, and the record header of an empty record as
        // TensorFlow writes it.
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(b""), 0);
        let r = record(b"");
        assert_eq!(&r[..8], &[0u8; 8]);
        assert_eq!(r.len(), 16);
    }

    #[test]
    fn tags_follow_transformers() {
        assert_eq!(tag("loss").as_deref(), Some("train/loss"));
        assert_eq!(
            tag("rewards/accuracies").as_deref(),
            Some("train/rewards/accuracies")
        );
        assert_eq!(tag("eval_loss").as_deref(), Some("eval/loss"));
        assert_eq!(tag("eval_f1").as_deref(), Some("eval/f1"));
        assert_eq!(tag("evaluation").as_deref(), Some("train/evaluation"));
        assert_eq!(tag("step"), None);
    }
}
