//! The coordinator's state machine, without I/O: runs (FIFO), registered
//! workers and their leases, the generation training the active run, and the
//! bookkeeping that makes every step count exactly once.
//!
//! Every input is a synchronous method that takes the time as an argument
//! ([`Now`]) and, besides its answer, leaves the [`Effect`]s to carry out
//! (persist these keys, append this metrics line, send this assignment, emit
//! this event) in the engine's queue. The runner ([`crate::Coordinator`]) takes
//! them while it still holds the engine's lock, so they are applied in the order
//! the engine decided them, and applies them after releasing it: a slow store
//! never stalls a heartbeat or a batch fetch. The store's fencing (the
//! generation key) keeps a late write safe. Being pure, the engine is tested
//! in-process with a fake clock (`engine/tests.rs`).

mod membership;
pub mod reference;
mod reports;
mod runs;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use dpo_proto::v1;
use serde::Serialize;

pub use membership::Member;
pub use reports::StepReport;
pub use runs::{
    CheckpointRecord, DataGone, LedgerEntry, RunData, RunRecord, RunState, TaggedData,
    read_ledger_value,
};

use crate::store::StoreError;
use membership::{Generation, Worker};

/// What a failed request tells the client.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Invalid(String),
    /// A stale generation, a worker that is not a member, a step out of order.
    #[error("{0}")]
    Stale(String),
    /// Someone else's identity (a live worker's id without its session).
    #[error("{0}")]
    Denied(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0}")]
    Internal(String),
}

impl From<Refusal> for tonic::Status {
    fn from(r: Refusal) -> Self {
        match r {
            Refusal::NotFound(m) => tonic::Status::not_found(m),
            Refusal::Invalid(m) => tonic::Status::invalid_argument(m),
            Refusal::Stale(m) => tonic::Status::failed_precondition(m),
            Refusal::Denied(m) => tonic::Status::permission_denied(m),
            // Refused for good: the run fails; asking again cannot help.
            Refusal::Store(e) if e.is_permanent() => tonic::Status::aborted(e.to_string()),
            Refusal::Store(e) => tonic::Status::unavailable(e.to_string()),
            Refusal::Internal(m) => tonic::Status::internal(m),
        }
    }
}

pub type Result<T, E = Refusal> = std::result::Result<T, E>;

/// The time an input happens at: monotonic for leases, wall-clock for records.
#[derive(Debug, Clone, Copy)]
pub struct Now {
    pub instant: Instant,
    pub unix_ms: i64,
}

impl Now {
    pub fn system() -> Self {
        Now {
            instant: Instant::now(),
            unix_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as i64),
        }
    }

    /// This time moved on by `d` (tests' fake clock).
    pub fn after(self, d: Duration) -> Self {
        Now {
            instant: self.instant + d,
            unix_ms: self.unix_ms + d.as_millis() as i64,
        }
    }
}

/// Something the engine decided that touches the world outside it. The runner
/// applies a call's effects in this order.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    /// Writes these keys in one transaction (`None` deletes); with a fence, only
    /// while the store's generation key still equals it.
    Store {
        /// The run the write belongs to: if the store refuses it for good, the
        /// run fails with the store's reason.
        run: Option<String>,
        fence: Option<u64>,
        writes: Vec<(String, Option<String>)>,
    },
    /// A run's end, in one write: its history record, and its active record
    /// removed (so a restart cannot find it running). On a full disk the
    /// embedded store spends its reserve on this write. Only once it is
    /// written are the run's other keys (`then_delete`, its ledger) deleted.
    RecordEnd {
        run: String,
        writes: Vec<(String, Option<String>)>,
        then_delete: String,
    },
    /// Appends one JSON line of metrics to a file (created when missing); a
    /// file that cannot be written fails the run.
    AppendMetrics {
        run: String,
        path: PathBuf,
        metrics: Vec<(String, f64)>,
        /// With `report_to = ["tensorboard"]`: the run's event directory and
        /// the first step this coordinator may write there (an event file it
        /// starts tells TensorBoard to drop older files' events from there on).
        events: Option<(PathBuf, u64)>,
    },
    /// Writes a run's whole ledger (read from the store under `prefix`) to `path`.
    WriteLedger {
        prefix: String,
        path: PathBuf,
        /// Lines after the steps (the run's rollbacks, one JSON object each).
        trailer: Vec<String>,
    },
    /// Ends a worker's etcd lease.
    RevokeLease(i64),
    /// Sends an assignment on a worker's stream.
    Send {
        worker: String,
        kind: v1::assignment::Kind,
    },
    /// Tells a run's watchers.
    Emit { run: String, event: v1::RunEvent },
    /// A run ended: its watchers' channel closes after the last event.
    EndWatch { run: String },
    /// A run ended: its private files on the coordinator (uploads, shards)
    /// are deleted.
    RemoveRunFiles(PathBuf),
}

/// Counters for `/metrics`.
#[derive(Debug, Default, Clone)]
pub struct Counters {
    pub batches_served: u64,
    pub examples_served: u64,
    pub batch_serve_seconds: f64,
    pub steps_recorded: u64,
    pub generations_formed: u64,
    pub workers_lost: u64,
}

/// Where the active runs' keys live.
pub const RUN_PREFIX: &str = "dpo/runs/";

/// Where an ended run's record stays (its `dpo/runs/<id>/` prefix is deleted).
pub const HISTORY_PREFIX: &str = "dpo/history/";

/// A run's record: fixed size whatever the run's length (the ledger has keys
/// of its own).
pub fn run_key(id: &str) -> String {
    format!("{RUN_PREFIX}{id}/record")
}

/// A run's newest committed checkpoint (written only in fenced commits).
pub fn checkpoint_key(id: &str) -> String {
    format!("{RUN_PREFIX}{id}/checkpoint")
}

/// Where a run's ledger entries are, one key per step.
pub fn ledger_prefix(id: &str) -> String {
    format!("{RUN_PREFIX}{id}/ledger/")
}

fn ledger_key(id: &str, step: u64) -> String {
    format!("{}{step:020}", ledger_prefix(id))
}

/// Equal lengths and bytes, in time that depends on the length only.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn to_json<T: Serialize>(v: &T) -> Result<String> {
    serde_json::to_string(v).map_err(|e| Refusal::Internal(e.to_string()))
}

/// The engine's state.
#[derive(Debug)]
pub struct Engine {
    /// A worker silent for this long has lost its lease.
    lease_ttl: Duration,
    runs: BTreeMap<String, RunRecord>,
    data: HashMap<String, Arc<RunData>>,
    /// By id (a hash map: every heartbeat, report and fetch looks one up).
    workers: HashMap<String, Worker>,
    /// How many of them have an open assignment stream (kept as streams
    /// open and workers go, so a new stream need not count them).
    streams: usize,
    next_seq: u64,
    next_stream: u64,
    /// The last generation number handed out (persisted under the generation key).
    generation: u64,
    active: Option<Generation>,
    bootstrap: HashMap<(String, u64), Vec<u8>>,
    counters: Counters,
    effects: Vec<Effect>,
}

impl Engine {
    /// An engine whose last generation was `generation` (from the store).
    pub fn new(lease_ttl: Duration, generation: u64) -> Self {
        Engine {
            lease_ttl,
            runs: BTreeMap::new(),
            data: HashMap::new(),
            workers: HashMap::new(),
            streams: 0,
            next_seq: 0,
            next_stream: 0,
            generation,
            active: None,
            bootstrap: HashMap::new(),
            counters: Counters::default(),
            effects: Vec::new(),
        }
    }

    pub fn lease_ttl(&self) -> Duration {
        self.lease_ttl
    }

    /// The effects decided since the last call, in order.
    pub fn take_effects(&mut self) -> Vec<Effect> {
        std::mem::take(&mut self.effects)
    }

    /// Tells the run's watchers, with the run as it is now.
    fn emit(&mut self, id: &str, event: Option<v1::run_event::Event>) {
        if let Some(r) = self.runs.get(id) {
            self.effects.push(Effect::Emit {
                run: id.to_string(),
                event: v1::RunEvent {
                    run: Some(r.to_proto()),
                    event,
                },
            });
        }
    }

    /// Persists a run's record; an ended run moves to the history and its working
    /// prefix (record, checkpoint, ledger) is deleted.
    fn persist_run(&mut self, id: &str) -> Result<()> {
        let Some(r) = self.runs.get(id) else {
            return Ok(());
        };
        let json = to_json(r)?;
        if r.state.terminal() {
            self.effects.push(Effect::RecordEnd {
                run: id.to_string(),
                writes: vec![
                    (format!("{HISTORY_PREFIX}{id}"), Some(json)),
                    (run_key(id), None),
                ],
                then_delete: format!("{RUN_PREFIX}{id}/"),
            });
        } else {
            self.effects.push(Effect::Store {
                run: Some(id.to_string()),
                fence: None,
                writes: vec![(run_key(id), Some(json))],
            });
        }
        Ok(())
    }

    fn send(&mut self, worker: &str, kind: v1::assignment::Kind) {
        self.effects.push(Effect::Send {
            worker: worker.to_string(),
            kind,
        });
    }

    /// Counters, runs `(name, state, step)`, registered workers, last generation.
    pub fn counters(&self) -> (Counters, Vec<(String, RunState, u64)>, usize, u64) {
        let runs = self
            .runs
            .values()
            .map(|r| (r.name.clone(), r.state, r.step))
            .collect();
        (
            self.counters.clone(),
            runs,
            self.workers.len(),
            self.generation,
        )
    }
}
