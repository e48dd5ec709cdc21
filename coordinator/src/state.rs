//! The coordinator's state machine: runs (FIFO), registered workers and their
//! leases, the generation training the active run, and the bookkeeping that makes
//! every step count exactly once — metrics lines, the data ledger and checkpoint
//! commits, all fenced by the generation number.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use dpo_data::Example;
use dpo_data::batches::{EpochPlan, rank_share};
use dpo_data::refcache::{self, RefCache};
use dpo_proto::v1::{self, RunState};
use dpo_proto::{Loss, RunSpec};
use serde::{Deserialize, Serialize};
use tokio::sync::{Mutex, broadcast, mpsc};

use crate::store::{GENERATION_KEY, Store, StoreError};

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
            Refusal::Store(e) => tonic::Status::unavailable(e.to_string()),
            Refusal::Internal(m) => tonic::Status::internal(m),
        }
    }
}

pub type Result<T, E = Refusal> = std::result::Result<T, E>;

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// A run as the store keeps it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunRecord {
    pub id: String,
    pub name: String,
    pub spec: RunSpec,
    pub state: i32,
    /// Optimizer steps whose metrics were recorded (each exactly once).
    pub step: u64,
    pub total_steps: u64,
    pub steps_per_epoch: u64,
    pub train_examples: u64,
    pub eval_examples: u64,
    pub generation: u64,
    pub world_size: u32,
    pub error: String,
    pub checkpoint_step: u64,
    pub checkpoint_path: String,
    pub submitted_ms: i64,
    pub finished_ms: i64,
    pub last_metrics: Vec<(String, f64)>,
    pub last_eval: Vec<(String, f64)>,
    pub eval_step: u64,
    /// Where the tokenized shards are.
    pub shard_dir: PathBuf,
    /// Ledger entries recorded since the last committed segment (persisted with the
    /// record, so a restarted coordinator loses none).
    #[serde(default)]
    pub ledger_tail: Vec<LedgerEntry>,
    /// Reference-stage progress (examples needing sums, examples cached).
    #[serde(default)]
    pub reference_total: u64,
    #[serde(default)]
    pub reference_cached: u64,
}

impl RunRecord {
    fn state(&self) -> RunState {
        RunState::try_from(self.state).unwrap_or(RunState::Unspecified)
    }

    fn terminal(&self) -> bool {
        matches!(
            self.state(),
            RunState::Succeeded | RunState::Failed | RunState::Cancelled
        )
    }

    pub fn to_proto(&self) -> v1::Run {
        let metrics = |m: &[(String, f64)]| {
            m.iter()
                .map(|(name, value)| v1::Metric {
                    name: name.clone(),
                    value: *value,
                })
                .collect()
        };
        v1::Run {
            id: self.id.clone(),
            name: self.name.clone(),
            state: self.state,
            step: self.step,
            total_steps: self.total_steps,
            steps_per_epoch: self.steps_per_epoch,
            generation: self.generation,
            world_size: self.world_size,
            error: self.error.clone(),
            output: self.spec.train.output.display().to_string(),
            checkpoint_step: self.checkpoint_step,
            submitted_unix_ms: self.submitted_ms,
            finished_unix_ms: self.finished_ms,
            last_metrics: metrics(&self.last_metrics),
            last_eval: metrics(&self.last_eval),
            train_examples: self.train_examples,
            eval_examples: self.eval_examples,
            reference_total: self.reference_total,
            reference_cached: self.reference_cached,
        }
    }
}

/// One ledger line: which samples a step consumed, and in which world.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LedgerEntry {
    pub step: u64,
    pub epoch: u64,
    /// Positions in the epoch's order: `[start, start + global_batch_size)`.
    pub start: usize,
    pub generation: u64,
    pub world_size: u64,
}

/// A run's tokenized data.
#[derive(Debug)]
pub struct RunData {
    pub train: Vec<Example>,
    pub eval: Vec<Example>,
    pub plan: std::sync::Mutex<EpochPlan>,
    pub count_negatives: bool,
    /// The reference stage's cache (runs with `reference.precompute`).
    pub reference: Option<ReferenceStage>,
}

/// The reference log-prob cache of a run's namespace, and the plan of what the
/// current generation's ranks still score.
#[derive(Debug)]
pub struct ReferenceStage {
    pub cache: std::sync::Mutex<RefCache>,
    /// (generation, the examples — `(is_eval, index)` — the cache lacked when
    /// that generation first asked), made once per generation so every rank
    /// splits the same list.
    plan: std::sync::Mutex<Option<(u64, Vec<StageItem>)>>,
}

/// An example of the reference stage: `(is_eval, index in its split)`.
type StageItem = (bool, usize);

impl ReferenceStage {
    /// Opens the run's namespace under `root` (when the run precomputes).
    fn open(spec: &RunSpec, root: &Path) -> std::result::Result<Option<Self>, dpo_data::Error> {
        if !refcache::precomputes(spec) {
            return Ok(None);
        }
        let ns = refcache::namespace_of(spec, Some(root))?;
        let cache = RefCache::open(root, &ns)?;
        tracing::info!(namespace = %ns, records = cache.len(), "reference cache");
        Ok(Some(ReferenceStage {
            cache: std::sync::Mutex::new(cache),
            plan: std::sync::Mutex::new(None),
        }))
    }
}

impl RunData {
    /// `None` when one global batch needs more examples than `train` has.
    fn new(spec: &RunSpec, train: Vec<Example>, eval: Vec<Example>) -> Option<Self> {
        let plan = EpochPlan::new(
            train.len(),
            spec.train.global_batch_size,
            spec.data.seed,
            spec.data.shuffle,
        )?;
        Some(RunData {
            train,
            eval,
            plan: std::sync::Mutex::new(plan),
            count_negatives: spec.objective.loss == Loss::Combined,
            reference: None,
        })
    }
}

/// A registered worker.
#[derive(Debug)]
struct Worker {
    info: v1::WorkerInfo,
    /// Join order: the oldest workers take the lowest ranks.
    seq: u64,
    last_seen: Instant,
    /// Its assignment stream (`None` until it opens one, or after it closed).
    tx: Option<mpsc::Sender<std::result::Result<v1::Assignment, tonic::Status>>>,
    stream_id: u64,
    /// Its etcd lease (etcd store).
    lease: Option<i64>,
}

/// 32 random bytes (two v4 UUIDs, 244 random bits) shared by a generation's ranks.
fn ring_key() -> Vec<u8> {
    let mut k = uuid::Uuid::new_v4().as_bytes().to_vec();
    k.extend_from_slice(uuid::Uuid::new_v4().as_bytes());
    k
}

/// The world training the active run.
#[derive(Debug, Clone)]
struct Generation {
    run_id: String,
    number: u64,
    members: Vec<String>,
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

#[derive(Debug)]
struct Inner {
    runs: BTreeMap<String, RunRecord>,
    data: HashMap<String, Arc<RunData>>,
    workers: BTreeMap<String, Worker>,
    next_seq: u64,
    next_stream: u64,
    generation: u64,
    active: Option<Generation>,
    watchers: HashMap<String, broadcast::Sender<v1::RunEvent>>,
    bootstrap: HashMap<(String, u64), Vec<u8>>,
    counters: Counters,
}

/// Coordinator settings.
#[derive(Debug, Clone)]
pub struct Settings {
    pub data_dir: PathBuf,
    /// A worker silent for this long has lost its lease.
    pub lease_ttl: Duration,
}

/// The coordinator.
#[derive(Debug)]
pub struct Coordinator {
    store: Store,
    settings: Settings,
    inner: Mutex<Inner>,
}

const RUN_PREFIX: &str = "dpo/runs/";

/// Where an ended run's record stays (its `dpo/runs/<id>/` prefix is deleted).
const HISTORY_PREFIX: &str = "dpo/history/";

fn run_key(id: &str) -> String {
    format!("{RUN_PREFIX}{id}/record")
}

fn ledger_key(id: &str, step: u64) -> String {
    format!("{RUN_PREFIX}{id}/ledger/{step:020}")
}

fn to_json<T: Serialize>(v: &T) -> Result<String> {
    serde_json::to_string(v).map_err(|e| Refusal::Internal(e.to_string()))
}

/// Appends one line to a metrics file (created when missing).
fn append_metrics(path: &Path, metrics: &[(String, f64)]) -> std::io::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    dpo_data::metrics_log::append(&mut f, metrics)
}

fn metric(m: &[v1::Metric], name: &str) -> Option<f64> {
    m.iter().find(|x| x.name == name).map(|x| x.value)
}

impl Coordinator {
    /// Opens the coordinator on `store`, reloading unfinished runs and their shards.
    pub async fn open(store: Store, settings: Settings) -> anyhow::Result<Arc<Self>> {
        let generation = store
            .get(GENERATION_KEY)
            .await?
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
        let mut runs = BTreeMap::new();
        let mut data = HashMap::new();
        let mut stored = store.list(HISTORY_PREFIX).await?;
        stored.extend(
            store
                .list(RUN_PREFIX)
                .await?
                .into_iter()
                .filter(|(k, _)| k.ends_with("/record")),
        );
        for (key, value) in stored {
            let mut record: RunRecord = match serde_json::from_str(&value) {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!(key, error = %e, "skipping an unreadable run record");
                    continue;
                }
            };
            if !record.terminal() {
                match load_shards(&record, &settings.data_dir.join("reference")) {
                    Ok(d) => {
                        data.insert(record.id.clone(), Arc::new(d));
                        if record.state() == RunState::Running {
                            // Its generation died with the old coordinator.
                            record.state = RunState::Waiting as i32;
                        }
                        let metrics = record.spec.train.output.join("metrics.jsonl");
                        if let Err(e) = dpo_data::metrics_log::keep_through(&metrics, record.step) {
                            tracing::warn!(path = %metrics.display(), error = %e, "could not trim metrics.jsonl");
                        }
                        tracing::info!(run = %record.id, step = record.step, "resuming run from the store");
                    }
                    Err(e) => {
                        record.state = RunState::Failed as i32;
                        record.error = format!("its tokenized data is gone: {e}");
                    }
                }
            }
            runs.insert(record.id.clone(), record);
        }
        Ok(Arc::new(Coordinator {
            store,
            settings,
            inner: Mutex::new(Inner {
                runs,
                data,
                workers: BTreeMap::new(),
                next_seq: 0,
                next_stream: 0,
                generation,
                active: None,
                watchers: HashMap::new(),
                bootstrap: HashMap::new(),
                counters: Counters::default(),
            }),
        }))
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    // ----- runs -----------------------------------------------------------------

    /// Validates, tokenizes and shards a run, then queues it. `spec` paths are as
    /// this coordinator sees them (streamed files already saved under `run_dir`).
    pub async fn submit(&self, id: String, spec: RunSpec) -> Result<v1::Run> {
        if let Err((key, reason)) = spec.validate() {
            return Err(Refusal::Invalid(format!("{key}: {reason}")));
        }
        let out = &spec.train.output;
        if out.join("metrics.jsonl").exists() || out.join("checkpoints").exists() {
            return Err(Refusal::Invalid(format!(
                "train.output: {} already holds a run; choose a new directory",
                out.display()
            )));
        }
        {
            let inner = self.inner.lock().await;
            if let Some(r) = inner
                .runs
                .values()
                .find(|r| !r.terminal() && r.spec.train.output == *out)
            {
                return Err(Refusal::Invalid(format!(
                    "train.output: run {} ({}) already writes to {}",
                    r.id,
                    r.name,
                    out.display()
                )));
            }
        }
        let shard_dir = self.settings.data_dir.join("runs").join(&id);
        let spec2 = spec.clone();
        let dir2 = shard_dir.clone();
        let cache_root = self.settings.data_dir.join("reference");
        let data = tokio::task::spawn_blocking(move || prepare(&spec2, &dir2, &cache_root))
            .await
            .map_err(|e| Refusal::Internal(e.to_string()))??;
        let steps_per_epoch = data
            .plan
            .lock()
            .map_err(|_| Refusal::Internal("poisoned".into()))?
            .steps_per_epoch();
        let record = RunRecord {
            id: id.clone(),
            name: spec.name.clone(),
            total_steps: spec.total_steps(steps_per_epoch),
            steps_per_epoch,
            train_examples: data.train.len() as u64,
            eval_examples: data.eval.len() as u64,
            spec,
            state: RunState::Queued as i32,
            step: 0,
            generation: 0,
            world_size: 0,
            error: String::new(),
            checkpoint_step: 0,
            checkpoint_path: String::new(),
            submitted_ms: now_ms(),
            finished_ms: 0,
            last_metrics: Vec::new(),
            last_eval: Vec::new(),
            eval_step: 0,
            shard_dir,
            ledger_tail: Vec::new(),
            reference_total: 0,
            reference_cached: 0,
        };
        std::fs::create_dir_all(&record.spec.train.output).map_err(|e| {
            Refusal::Invalid(format!(
                "train.output: cannot create {}: {e}",
                record.spec.train.output.display()
            ))
        })?;
        self.store.put(&run_key(&id), to_json(&record)?).await?;
        let run = record.to_proto();
        {
            let mut inner = self.inner.lock().await;
            inner.data.insert(id.clone(), Arc::new(data));
            inner.runs.insert(id.clone(), record);
        }
        tracing::info!(run = %id, name = %run.name, total_steps = run.total_steps, "run queued");
        self.reconcile().await?;
        Ok(run)
    }

    /// Finds a run by id, unique id prefix, or name (the newest run of that name).
    fn resolve(inner: &Inner, what: &str) -> Result<String> {
        if inner.runs.contains_key(what) {
            return Ok(what.to_string());
        }
        let by_prefix: Vec<&String> = inner
            .runs
            .keys()
            .filter(|id| id.starts_with(what))
            .collect();
        if by_prefix.len() == 1 && !what.is_empty() {
            return Ok(by_prefix[0].clone());
        }
        inner
            .runs
            .values()
            .filter(|r| r.name == what)
            .max_by_key(|r| r.submitted_ms)
            .map(|r| r.id.clone())
            .ok_or_else(|| Refusal::NotFound(format!("no run {what:?}")))
    }

    pub async fn get(&self, what: &str) -> Result<v1::Run> {
        let inner = self.inner.lock().await;
        let id = Self::resolve(&inner, what)?;
        Ok(inner.runs[&id].to_proto())
    }

    pub async fn list(&self) -> Vec<v1::Run> {
        let inner = self.inner.lock().await;
        let mut runs: Vec<&RunRecord> = inner.runs.values().collect();
        runs.sort_by_key(|r| r.submitted_ms);
        runs.into_iter().map(RunRecord::to_proto).collect()
    }

    pub async fn cancel(&self, what: &str) -> Result<v1::Run> {
        let id = {
            let inner = self.inner.lock().await;
            Self::resolve(&inner, what)?
        };
        self.finish(&id, RunState::Cancelled, "cancelled by the user".into())
            .await?;
        self.reconcile().await?;
        self.get(&id).await
    }

    /// The run's current state, then its events (`None`: no such run).
    pub async fn watch(&self, what: &str) -> Result<(v1::Run, broadcast::Receiver<v1::RunEvent>)> {
        let mut inner = self.inner.lock().await;
        let id = Self::resolve(&inner, what)?;
        let run = inner.runs[&id].to_proto();
        let rx = inner
            .watchers
            .entry(id)
            .or_insert_with(|| broadcast::channel(1024).0)
            .subscribe();
        Ok((run, rx))
    }

    fn emit(inner: &mut Inner, id: &str, event: Option<v1::run_event::Event>) {
        if let (Some(tx), Some(r)) = (inner.watchers.get(id), inner.runs.get(id)) {
            let _ = tx.send(v1::RunEvent {
                run: Some(r.to_proto()),
                event,
            });
        }
    }

    /// Persists a run's record; an ended run moves to the history and its working
    /// prefix (record, ledger segments) is deleted.
    async fn save(&self, inner: &Inner, id: &str) -> Result<()> {
        let Some(r) = inner.runs.get(id) else {
            return Ok(());
        };
        if r.terminal() {
            self.store
                .put(&format!("{HISTORY_PREFIX}{id}"), to_json(r)?)
                .await?;
            self.store
                .delete_prefix(&format!("{RUN_PREFIX}{id}/"))
                .await?;
        } else {
            self.store.put(&run_key(id), to_json(r)?).await?;
        }
        Ok(())
    }

    async fn set_state(&self, inner: &mut Inner, id: &str, state: RunState) -> Result<()> {
        let Some(r) = inner.runs.get_mut(id) else {
            return Ok(());
        };
        if r.state == state as i32 {
            return Ok(());
        }
        r.state = state as i32;
        tracing::info!(run = %id, state = ?state, "run state");
        self.save(inner, id).await?;
        Self::emit(inner, id, Some(v1::run_event::Event::State(state as i32)));
        Ok(())
    }

    /// Ends a run: records the outcome, writes its ledger next to its metrics,
    /// drops its working keys, and releases its workers.
    async fn finish(&self, id: &str, state: RunState, error: String) -> Result<()> {
        let mut inner = self.inner.lock().await;
        let Some(r) = inner.runs.get_mut(id) else {
            return Err(Refusal::NotFound(format!("no run {id:?}")));
        };
        if r.terminal() {
            return Ok(());
        }
        r.error = error;
        r.finished_ms = now_ms();
        if state == RunState::Failed {
            tracing::error!(run = %id, error = %r.error, "run failed");
        }
        let output = r.spec.train.output.clone();
        // The whole ledger (committed segments and the tail) goes to the output dir.
        let mut ledger: Vec<LedgerEntry> = Vec::new();
        for (_, v) in self
            .store
            .list(&format!("{RUN_PREFIX}{id}/ledger/"))
            .await?
        {
            if let Ok(seg) = serde_json::from_str::<Vec<LedgerEntry>>(&v) {
                ledger.extend(seg);
            }
        }
        ledger.append(&mut r.ledger_tail);
        ledger.sort_by_key(|e| e.step);
        ledger.dedup_by_key(|e| e.step);
        let mut text = String::new();
        for e in &ledger {
            text.push_str(&serde_json::to_string(e).unwrap_or_default());
            text.push('\n');
        }
        if let Err(e) = std::fs::write(output.join("ledger.jsonl"), text) {
            tracing::warn!(run = %id, error = %e, "could not write ledger.jsonl");
        }
        self.set_state(&mut inner, id, state).await?;
        inner.data.remove(id);
        if inner.active.as_ref().is_some_and(|g| g.run_id == id) {
            let members = inner.active.take().map(|g| g.members).unwrap_or_default();
            for m in members {
                Self::send(
                    &mut inner,
                    &m,
                    v1::assignment::Kind::Idle(v1::Idle {
                        run_id: id.to_string(),
                        reason: format!("run {state:?}"),
                    }),
                );
            }
        }
        inner.watchers.remove(id);
        Ok(())
    }

    // ----- workers ----------------------------------------------------------------

    pub async fn register(&self, req: v1::RegisterRequest) -> Result<v1::RegisterResponse> {
        if req.worker_id.is_empty() || req.worker_id.len() > 128 {
            return Err(Refusal::Invalid("worker_id: 1 to 128 characters".into()));
        }
        if req.collective_addr.parse::<std::net::SocketAddr>().is_err() {
            return Err(Refusal::Invalid(format!(
                "collective_addr: {:?} is not host:port (an IP address)",
                req.collective_addr
            )));
        }
        let ttl = self.settings.lease_ttl;
        let lease = self
            .store
            .register_worker(
                &req.worker_id,
                serde_json::json!({"collective_addr": req.collective_addr, "device": req.device, "hostname": req.hostname}).to_string(),
                ttl,
            )
            .await?;
        let mut inner = self.inner.lock().await;
        let seq = inner.next_seq;
        inner.next_seq += 1;
        let info = v1::WorkerInfo {
            id: req.worker_id.clone(),
            collective_addr: req.collective_addr,
            device: req.device,
            hostname: req.hostname,
            run_id: String::new(),
            generation: 0,
            rank: -1,
            last_seen_ms: 0,
        };
        match inner.workers.get_mut(&req.worker_id) {
            Some(w) => {
                w.info.collective_addr = info.collective_addr;
                w.last_seen = Instant::now();
                if let Some(old) = std::mem::replace(&mut w.lease, lease) {
                    self.store.revoke(old).await;
                }
            }
            None => {
                tracing::info!(worker = %req.worker_id, addr = %info.collective_addr, "worker registered");
                inner.workers.insert(
                    req.worker_id.clone(),
                    Worker {
                        info,
                        seq,
                        last_seen: Instant::now(),
                        tx: None,
                        stream_id: 0,
                        lease,
                    },
                );
            }
        }
        Ok(v1::RegisterResponse {
            lease_ttl_ms: ttl.as_millis() as u64,
            heartbeat_ms: (ttl.as_millis() as u64 / 4).max(100),
        })
    }

    pub async fn heartbeat(&self, req: &v1::HeartbeatRequest) -> bool {
        let lease = {
            let mut inner = self.inner.lock().await;
            match inner.workers.get_mut(&req.worker_id) {
                Some(w) => {
                    w.last_seen = Instant::now();
                    w.lease
                }
                None => return false,
            }
        };
        if let Some(lease) = lease
            && let Err(e) = self.store.renew(lease).await
        {
            tracing::warn!(worker = %req.worker_id, error = %e, "could not renew the worker's etcd lease");
        }
        true
    }

    /// Drops a worker (and its etcd lease).
    async fn drop_worker(&self, inner: &mut Inner, id: &str) {
        if let Some(w) = inner.workers.remove(id) {
            inner.counters.workers_lost += 1;
            if let Some(lease) = w.lease {
                self.store.revoke(lease).await;
            }
        }
    }

    /// Opens a worker's assignment stream; returns its receiver and stream id.
    pub async fn open_stream(
        &self,
        worker_id: &str,
    ) -> Result<(
        mpsc::Receiver<std::result::Result<v1::Assignment, tonic::Status>>,
        mpsc::Sender<std::result::Result<v1::Assignment, tonic::Status>>,
        u64,
    )> {
        let (tx, rx) = mpsc::channel(64);
        let mut inner = self.inner.lock().await;
        inner.next_stream += 1;
        let id = inner.next_stream;
        let Some(w) = inner.workers.get_mut(worker_id) else {
            return Err(Refusal::NotFound(format!(
                "worker {worker_id} is not registered"
            )));
        };
        w.tx = Some(tx.clone());
        w.stream_id = id;
        w.last_seen = Instant::now();
        drop(inner);
        self.reconcile().await?;
        Ok((rx, tx, id))
    }

    /// The worker's stream closed (its process died or it disconnected): it is
    /// gone at once, without waiting for its lease to lapse.
    pub async fn stream_closed(&self, worker_id: &str, stream_id: u64) {
        {
            let mut inner = self.inner.lock().await;
            let current = inner
                .workers
                .get(worker_id)
                .is_some_and(|w| w.stream_id == stream_id);
            if !current {
                return;
            }
            self.drop_worker(&mut inner, worker_id).await;
            tracing::warn!(worker = %worker_id, "worker disconnected");
        }
        if let Err(e) = self.reconcile().await {
            tracing::error!(error = %e, "reconcile");
        }
    }

    pub async fn workers(&self) -> Vec<v1::WorkerInfo> {
        let inner = self.inner.lock().await;
        let mut out: Vec<(u64, v1::WorkerInfo)> = inner
            .workers
            .values()
            .map(|w| {
                let mut info = w.info.clone();
                info.last_seen_ms = w.last_seen.elapsed().as_millis() as u64;
                (w.seq, info)
            })
            .collect();
        out.sort_by_key(|(s, _)| *s);
        out.into_iter().map(|(_, i)| i).collect()
    }

    fn send(inner: &mut Inner, worker: &str, kind: v1::assignment::Kind) -> bool {
        let Some(w) = inner.workers.get_mut(worker) else {
            return false;
        };
        let Some(tx) = &w.tx else {
            return false;
        };
        match tx.try_send(Ok(v1::Assignment { kind: Some(kind) })) {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(worker, error = %e, "could not send an assignment");
                false
            }
        }
    }

    /// Expires lapsed leases, picks the run to train (FIFO), and forms, repairs or
    /// grows its generation.
    pub async fn reconcile(&self) -> Result<()> {
        let mut inner = self.inner.lock().await;
        let ttl = self.settings.lease_ttl;
        let lapsed: Vec<String> = inner
            .workers
            .iter()
            .filter(|(_, w)| w.last_seen.elapsed() > ttl)
            .map(|(id, _)| id.clone())
            .collect();
        for id in lapsed {
            tracing::warn!(worker = %id, ttl_ms = ttl.as_millis() as u64, "worker lease lapsed");
            self.drop_worker(&mut inner, &id).await;
        }
        let ready: Vec<String> = {
            let mut v: Vec<(&String, &Worker)> = inner
                .workers
                .iter()
                .filter(|(_, w)| w.tx.as_ref().is_some_and(|tx| !tx.is_closed()))
                .collect();
            v.sort_by_key(|(_, w)| w.seq);
            v.into_iter().map(|(id, _)| id.clone()).collect()
        };
        // The run to train: the oldest that has not ended.
        let run_id = inner
            .runs
            .values()
            .filter(|r| !r.terminal())
            .min_by_key(|r| r.submitted_ms)
            .map(|r| r.id.clone());
        let Some(run_id) = run_id else {
            return Ok(());
        };
        let (min, max) = {
            let c = &inner.runs[&run_id].spec.cluster;
            (
                c.min_workers.max(1),
                c.max_workers.max(c.min_workers).max(1),
            )
        };
        // Is the current generation still whole, and is it as big as it may be?
        if let Some(g) = inner.active.clone() {
            let whole = g.run_id == run_id && g.members.iter().all(|m| ready.contains(m));
            let can_grow = g.members.len() < max && ready.len() > g.members.len();
            if whole && !can_grow {
                return Ok(());
            }
            let reason = if whole {
                "new workers joined"
            } else {
                "a member was lost"
            };
            tracing::info!(run = %run_id, generation = g.number, reason, "ending generation");
            for m in &g.members {
                Self::send(
                    &mut inner,
                    m,
                    v1::assignment::Kind::Abort(v1::Abort {
                        generation: g.number,
                        reason: reason.into(),
                    }),
                );
            }
            inner.active = None;
        }
        if ready.len() < min {
            if inner.runs[&run_id].state() != RunState::Waiting {
                tracing::info!(run = %run_id, ready = ready.len(), min, "waiting for workers");
            }
            self.set_state(&mut inner, &run_id, RunState::Waiting)
                .await?;
            return Ok(());
        }
        let members: Vec<String> = ready.into_iter().take(max).collect();
        let number = inner.generation + 1;
        self.store.put(GENERATION_KEY, number.to_string()).await?;
        inner.generation = number;
        inner.counters.generations_formed += 1;
        let peers: Vec<String> = members
            .iter()
            .map(|m| inner.workers[m].info.collective_addr.clone())
            .collect();
        let record = inner
            .runs
            .get_mut(&run_id)
            .ok_or_else(|| Refusal::Internal("run vanished".into()))?;
        record.generation = number;
        record.world_size = members.len() as u32;
        let spec_json = to_json(&record.spec)?;
        let backend = match record.spec.cluster.backend {
            dpo_proto::spec::Backend::Nccl => "nccl",
            _ => "tcp",
        };
        let work = v1::Work {
            run_id: run_id.clone(),
            spec_json,
            generation: number,
            rank: 0,
            world_size: members.len() as u32,
            peers,
            backend: backend.into(),
            steps_per_epoch: record.steps_per_epoch,
            total_steps: record.total_steps,
            resume_checkpoint: record.checkpoint_path.clone(),
            resume_step: record.checkpoint_step,
            has_eval: record.eval_examples > 0,
            ring_key: ring_key(),
        };
        tracing::info!(run = %run_id, generation = number, world_size = members.len(), "generation formed");
        for (rank, m) in members.iter().enumerate() {
            if let Some(w) = inner.workers.get_mut(m) {
                w.info.run_id = run_id.clone();
                w.info.generation = number;
                w.info.rank = rank as i32;
            }
            let mut w = work.clone();
            w.rank = rank as u32;
            Self::send(&mut inner, m, v1::assignment::Kind::Work(w));
        }
        inner.active = Some(Generation {
            run_id: run_id.clone(),
            number,
            members,
        });
        self.set_state(&mut inner, &run_id, RunState::Running)
            .await?;
        self.save(&inner, &run_id).await?;
        Self::emit(&mut inner, &run_id, None);
        Ok(())
    }

    /// Checks that `worker` is rank `rank` (any rank when `None`) of the current
    /// generation `generation` of `run`.
    fn check_member(
        inner: &Inner,
        worker: &str,
        run: &str,
        generation: u64,
        rank: Option<u32>,
    ) -> Result<()> {
        let Some(g) = &inner.active else {
            return Err(Refusal::Stale(format!(
                "generation {generation} is not current (no generation is running)"
            )));
        };
        if g.run_id != run || g.number != generation {
            return Err(Refusal::Stale(format!(
                "generation {generation} of run {run} is not current (current: {} of run {})",
                g.number, g.run_id
            )));
        }
        let pos = g.members.iter().position(|m| m == worker);
        match (pos, rank) {
            (None, _) => Err(Refusal::Stale(format!(
                "worker {worker} is not a member of generation {generation}"
            ))),
            (Some(p), Some(r)) if p as u32 != r => Err(Refusal::Stale(format!(
                "worker {worker} is rank {p} of generation {generation}, not {r}"
            ))),
            _ => Ok(()),
        }
    }

    /// For a request of rank `rank` (any rank when `None`) of generation
    /// `generation` of `run`: the run's data, the world size, and its record's
    /// total steps and micro-batch size.
    async fn member_view(
        &self,
        worker: &str,
        run: &str,
        generation: u64,
        rank: Option<u32>,
    ) -> Result<(Arc<RunData>, usize, u64, usize)> {
        let inner = self.inner.lock().await;
        Self::check_member(&inner, worker, run, generation, rank)?;
        let world = inner.active.as_ref().map_or(1, |g| g.members.len());
        let data = inner
            .data
            .get(run)
            .cloned()
            .ok_or_else(|| Refusal::NotFound(format!("run {run} has no data")))?;
        let r = inner
            .runs
            .get(run)
            .ok_or_else(|| Refusal::NotFound(format!("no run {run}")))?;
        Ok((data, world, r.total_steps, r.spec.micro_batch_size().max(1)))
    }

    pub async fn fetch_batch(&self, req: &v1::FetchBatchRequest) -> Result<v1::Batch> {
        let started = Instant::now();
        let (data, world, total, _) = self
            .member_view(&req.worker_id, &req.run_id, req.generation, Some(req.rank))
            .await?;
        let rank = req.rank as usize;
        let (examples, indices, norm, epoch) = if req.split == v1::Split::Eval as i32 {
            let idx: Vec<usize> = (0..data.eval.len()).collect();
            let (e, i, n) = rank_share(&data.eval, &idx, data.count_negatives, rank, world);
            (e, i, n, 0)
        } else {
            if req.step >= total {
                return Err(Refusal::Invalid(format!(
                    "step {} is past the run's {total} steps",
                    req.step
                )));
            }
            let (idx, epoch) = {
                let mut plan = data
                    .plan
                    .lock()
                    .map_err(|_| Refusal::Internal("poisoned plan".into()))?;
                (plan.indices(req.step), plan.position(req.step).0)
            };
            let (e, i, n) = rank_share(&data.train, &idx, data.count_negatives, rank, world);
            (e, i, n, epoch)
        };
        // The reference sums of the slice, when the stage has them all.
        let (mut reference_chosen, mut reference_rejected) = (Vec::new(), Vec::new());
        if let Some(stage) = &data.reference {
            let cache = stage
                .cache
                .lock()
                .map_err(|_| Refusal::Internal("poisoned reference cache".into()))?;
            let sums: Option<Vec<[f32; 2]>> = examples
                .iter()
                .map(|e| {
                    let [c, r] = refcache::pair_keys(e)?;
                    Some([cache.get(&c)?, cache.get(&r)?])
                })
                .collect();
            if let Some(sums) = sums {
                reference_chosen = sums.iter().map(|s| s[0]).collect();
                reference_rejected = sums.iter().map(|s| s[1]).collect();
            }
        }
        let batch = v1::Batch {
            examples: examples.iter().map(to_proto_example).collect(),
            reference_chosen,
            reference_rejected,
            indices: indices.iter().map(|&i| i as u64).collect(),
            total_examples: norm.examples,
            total_chosen_tokens: norm.chosen_tokens,
            total_negative_tokens: norm.negative_tokens,
            epoch,
        };
        let mut inner = self.inner.lock().await;
        inner.counters.batches_served += 1;
        inner.counters.examples_served += examples.len() as u64;
        inner.counters.batch_serve_seconds += started.elapsed().as_secs_f64();
        Ok(batch)
    }

    /// This rank's chunk of the reference stage: the examples (train, then eval)
    /// whose sums the cache lacked when this generation first asked, dealt
    /// round-robin over the ranks, one micro-batch per chunk.
    pub async fn reference_work(
        &self,
        req: &v1::ReferenceWorkRequest,
    ) -> Result<v1::ReferenceWorkResponse> {
        let (data, world, _, micro) = self
            .member_view(&req.worker_id, &req.run_id, req.generation, Some(req.rank))
            .await?;
        let Some(stage) = &data.reference else {
            return Err(Refusal::Invalid(format!(
                "run {} has no reference stage (reference.precompute is off)",
                req.run_id
            )));
        };
        // Under the plan's lock: make the generation's plan if this request is its
        // first, then cut this request's chunk from it.
        let (progress, response) = {
            let mut plan = stage
                .plan
                .lock()
                .map_err(|_| Refusal::Internal("poisoned reference plan".into()))?;
            let mut progress = None;
            if plan.as_ref().is_none_or(|(g, _)| *g != req.generation) {
                let cache = stage
                    .cache
                    .lock()
                    .map_err(|_| Refusal::Internal("poisoned reference cache".into()))?;
                let (mut total, mut missing) = (0usize, Vec::<StageItem>::new());
                let items = (data.train.iter().enumerate().map(|(i, e)| (false, i, e)))
                    .chain(data.eval.iter().enumerate().map(|(i, e)| (true, i, e)));
                for (eval, i, e) in items {
                    if let Some([c, r]) = refcache::pair_keys(e) {
                        total += 1;
                        if !cache.contains(&c) || !cache.contains(&r) {
                            missing.push((eval, i));
                        }
                    }
                }
                tracing::info!(
                    run = %req.run_id,
                    generation = req.generation,
                    to_score = missing.len(),
                    cached = total - missing.len(),
                    "reference stage"
                );
                progress = Some((total as u64, (total - missing.len()) as u64));
                *plan = Some((req.generation, missing));
            }
            let items = plan.as_ref().map_or(&[][..], |(_, m)| m.as_slice());
            (
                progress,
                Self::reference_chunk(&data, items, req, world, micro),
            )
        };
        if let Some((total, cached)) = progress {
            let mut inner = self.inner.lock().await;
            if let Some(r) = inner.runs.get_mut(&req.run_id) {
                r.reference_total = total;
                r.reference_cached = cached;
            }
            Self::emit(&mut inner, &req.run_id, None);
        }
        Ok(response)
    }

    /// Chunk `req.chunk` of rank `req.rank`'s share of `plan`: the rank takes
    /// every `world`-th item from its rank on, `micro` of them per chunk.
    fn reference_chunk(
        data: &RunData,
        plan: &[StageItem],
        req: &v1::ReferenceWorkRequest,
        world: usize,
        micro: usize,
    ) -> v1::ReferenceWorkResponse {
        let rank = req.rank as usize;
        let share_len = plan.len().saturating_sub(rank).div_ceil(world.max(1));
        let start = (req.chunk as usize).saturating_mul(micro);
        let end = start.saturating_add(micro).min(share_len);
        let examples = (start..end)
            .filter_map(|k| plan.get(rank + k * world))
            .filter_map(|&(eval, i)| {
                if eval {
                    data.eval.get(i)
                } else {
                    data.train.get(i)
                }
            })
            .map(to_proto_example)
            .collect();
        v1::ReferenceWorkResponse {
            examples,
            done: start >= share_len,
            planned: plan.len() as u64,
        }
    }

    /// Stores reference sums reported by a member of the current generation.
    pub async fn report_reference(&self, req: &v1::ReportReferenceRequest) -> Result<()> {
        let (data, ..) = self
            .member_view(&req.worker_id, &req.run_id, req.generation, None)
            .await?;
        if data.reference.is_none() {
            return Err(Refusal::Invalid(format!(
                "run {} has no reference stage",
                req.run_id
            )));
        }
        if req.keys.len() != req.sums.len() {
            return Err(Refusal::Invalid(format!(
                "{} keys but {} sums",
                req.keys.len(),
                req.sums.len()
            )));
        }
        let mut records = Vec::with_capacity(req.keys.len());
        for (k, &v) in req.keys.iter().zip(&req.sums) {
            let key: refcache::Key = k.as_slice().try_into().map_err(|_| {
                Refusal::Invalid(format!(
                    "a reference key has {} bytes, not {}",
                    k.len(),
                    refcache::KEY_BYTES
                ))
            })?;
            if !v.is_finite() || v > 0.0 {
                return Err(Refusal::Invalid(format!(
                    "a reference log-prob sum must be finite and ≤ 0, found {v}"
                )));
            }
            records.push((key, v));
        }
        let data2 = data.clone();
        let added = tokio::task::spawn_blocking(move || -> Result<usize> {
            let Some(stage) = &data2.reference else {
                return Ok(0);
            };
            stage
                .cache
                .lock()
                .map_err(|_| Refusal::Internal("poisoned reference cache".into()))?
                .insert(&records)
                .map_err(|e| Refusal::Internal(e.to_string()))
        })
        .await
        .map_err(|e| Refusal::Internal(e.to_string()))??;
        tracing::debug!(run = %req.run_id, added, "reference sums stored");
        let mut inner = self.inner.lock().await;
        if let Some(r) = inner.runs.get_mut(&req.run_id) {
            r.reference_cached =
                (r.reference_cached + req.keys.len() as u64 / 2).min(r.reference_total);
        }
        Self::emit(&mut inner, &req.run_id, None);
        Ok(())
    }

    /// Records a step's (or an evaluation's) metrics the first time any rank
    /// reports them; later reports of the same step are acknowledged and ignored.
    pub async fn report_step(&self, req: &v1::ReportStepRequest) -> Result<()> {
        let mut inner = self.inner.lock().await;
        Self::check_member(&inner, &req.worker_id, &req.run_id, req.generation, None)?;
        let Some(r) = inner.runs.get_mut(&req.run_id) else {
            return Err(Refusal::NotFound(format!("no run {}", req.run_id)));
        };
        let metrics: Vec<(String, f64)> = req
            .metrics
            .iter()
            .map(|m| (m.name.clone(), m.value))
            .collect();
        if metrics.iter().any(|(k, _)| k.is_empty() || k.len() > 64) {
            return Err(Refusal::Invalid("metric names: 1 to 64 characters".into()));
        }
        let output = r.spec.train.output.clone();
        if req.eval {
            if req.step <= r.eval_step || req.step > r.step {
                return Ok(());
            }
            append_metrics(&output.join("eval.jsonl"), &metrics)
                .map_err(|e| Refusal::Internal(format!("eval.jsonl: {e}")))?;
            r.eval_step = req.step;
            r.last_eval = metrics;
            let step = req.step;
            self.save(&inner, &req.run_id).await?;
            Self::emit(
                &mut inner,
                &req.run_id,
                Some(v1::run_event::Event::Eval(v1::StepMetrics {
                    step,
                    metrics: req.metrics.clone(),
                })),
            );
            return Ok(());
        }
        if req.step <= r.step {
            return Ok(());
        }
        if req.step != r.step + 1 {
            return Err(Refusal::Stale(format!(
                "step {} reported, but step {} is the next one",
                req.step,
                r.step + 1
            )));
        }
        if metric(&req.metrics, "step") != Some(req.step as f64) {
            return Err(Refusal::Invalid(format!(
                "the metrics of step {} do not say step {}",
                req.step, req.step
            )));
        }
        append_metrics(&output.join("metrics.jsonl"), &metrics)
            .map_err(|e| Refusal::Internal(format!("metrics.jsonl: {e}")))?;
        r.step = req.step;
        r.last_metrics = metrics;
        let (epoch, start) = inner
            .data
            .get(&req.run_id)
            .and_then(|d| d.plan.lock().ok().map(|p| p.position(req.step - 1)))
            .unwrap_or((0, 0));
        let entry = LedgerEntry {
            step: req.step,
            epoch,
            start,
            generation: metric(&req.metrics, "generation").map_or(req.generation, |g| g as u64),
            world_size: metric(&req.metrics, "world_size").unwrap_or(0.0) as u64,
        };
        if let Some(r) = inner.runs.get_mut(&req.run_id) {
            r.ledger_tail.push(entry);
        }
        inner.counters.steps_recorded += 1;
        self.save(&inner, &req.run_id).await?;
        Self::emit(
            &mut inner,
            &req.run_id,
            Some(v1::run_event::Event::Step(v1::StepMetrics {
                step: req.step,
                metrics: req.metrics.clone(),
            })),
        );
        Ok(())
    }

    /// Commits a checkpoint written by rank 0 together with the ledger up to its
    /// step, in one transaction fenced by the generation.
    pub async fn report_checkpoint(&self, req: &v1::ReportCheckpointRequest) -> Result<()> {
        let mut inner = self.inner.lock().await;
        Self::check_member(&inner, &req.worker_id, &req.run_id, req.generation, Some(0))?;
        let Some(r) = inner.runs.get(&req.run_id) else {
            return Err(Refusal::NotFound(format!("no run {}", req.run_id)));
        };
        if req.step > r.step || req.step <= r.checkpoint_step {
            return Err(Refusal::Stale(format!(
                "checkpoint at step {} (recorded steps {}, last checkpoint {})",
                req.step, r.step, r.checkpoint_step
            )));
        }
        let path = PathBuf::from(&req.path);
        if !path.join("manifest.json").is_file() {
            return Err(Refusal::Invalid(format!(
                "{}: no manifest.json; not a complete checkpoint",
                req.path
            )));
        }
        let mut record = inner.runs[&req.run_id].clone();
        let (segment, rest): (Vec<LedgerEntry>, Vec<LedgerEntry>) = record
            .ledger_tail
            .drain(..)
            .partition(|e| e.step <= req.step);
        record.ledger_tail = rest;
        record.checkpoint_step = req.step;
        record.checkpoint_path = req.path.clone();
        let writes = vec![
            (run_key(&req.run_id), Some(to_json(&record)?)),
            (ledger_key(&req.run_id, req.step), Some(to_json(&segment)?)),
        ];
        let committed = self.store.apply(Some(req.generation), writes).await?;
        if !committed {
            return Err(Refusal::Stale(format!(
                "generation {} was superseded before the checkpoint committed",
                req.generation
            )));
        }
        inner.runs.insert(req.run_id.clone(), record);
        tracing::info!(run = %req.run_id, step = req.step, "checkpoint committed");
        Self::emit(&mut inner, &req.run_id, None);
        Ok(())
    }

    pub async fn report_done(&self, req: &v1::ReportDoneRequest) -> Result<()> {
        {
            let inner = self.inner.lock().await;
            Self::check_member(&inner, &req.worker_id, &req.run_id, req.generation, None)?;
            let rank0 = inner
                .active
                .as_ref()
                .is_some_and(|g| g.members.first() == Some(&req.worker_id));
            if req.error.is_empty() {
                let r = &inner.runs[&req.run_id];
                if !rank0 {
                    return Ok(());
                }
                if req.step != r.step || (req.step < r.total_steps && !req.stopped_early) {
                    return Err(Refusal::Stale(format!(
                        "done at step {} but {} of {} steps are recorded",
                        req.step, r.step, r.total_steps
                    )));
                }
            }
        }
        if req.error.is_empty() {
            self.finish(&req.run_id, RunState::Succeeded, String::new())
                .await?;
        } else {
            self.finish(&req.run_id, RunState::Failed, req.error.clone())
                .await?;
        }
        self.reconcile().await
    }

    /// A member's collective broke: end the generation so a new one forms.
    pub async fn report_fault(&self, req: &v1::ReportFaultRequest) -> Result<()> {
        {
            let mut inner = self.inner.lock().await;
            if Self::check_member(&inner, &req.worker_id, &req.run_id, req.generation, None)
                .is_err()
            {
                return Ok(()); // already superseded
            }
            tracing::warn!(worker = %req.worker_id, generation = req.generation, reason = %req.reason, "generation fault reported");
            if let Some(g) = inner.active.take() {
                for m in &g.members {
                    Self::send(
                        &mut inner,
                        m,
                        v1::assignment::Kind::Abort(v1::Abort {
                            generation: g.number,
                            reason: req.reason.clone(),
                        }),
                    );
                }
            }
        }
        self.reconcile().await
    }

    pub async fn publish_bootstrap(&self, b: v1::Bootstrap) -> Result<()> {
        let mut inner = self.inner.lock().await;
        if inner
            .active
            .as_ref()
            .is_none_or(|g| g.run_id != b.run_id || g.number != b.generation)
        {
            return Err(Refusal::Stale(format!(
                "generation {} is not current",
                b.generation
            )));
        }
        inner.bootstrap.retain(|(_, g), _| *g >= b.generation);
        inner.bootstrap.insert((b.run_id, b.generation), b.data);
        Ok(())
    }

    pub async fn get_bootstrap(&self, run_id: &str, generation: u64) -> Option<Vec<u8>> {
        let inner = self.inner.lock().await;
        inner
            .bootstrap
            .get(&(run_id.to_string(), generation))
            .cloned()
    }

    pub async fn counters(&self) -> (Counters, Vec<(String, i32, u64)>, usize, u64) {
        let inner = self.inner.lock().await;
        let runs = inner
            .runs
            .values()
            .map(|r| (r.name.clone(), r.state, r.step))
            .collect();
        (
            inner.counters.clone(),
            runs,
            inner.workers.len(),
            inner.generation,
        )
    }
}

/// Tokenizes and shards a run's datasets (train and eval) once.
fn prepare(spec: &RunSpec, shard_dir: &Path, cache_root: &Path) -> Result<RunData> {
    if spec.data.negatives.as_deref() == Some("policy") {
        return Err(Refusal::Invalid(
            "data.negatives: \"policy\" negatives need a model to sample from; the cluster does not sample them yet (use `dpo-worker train`)".into(),
        ));
    }
    let tokenizer = if spec.model.path.join("tokenizer.json").exists() {
        Some(
            dpo_data::TextTokenizer::from_dir(&spec.model.path)
                .map_err(|e| Refusal::Invalid(e.to_string()))?,
        )
    } else {
        None
    };
    let vocab = std::fs::read(spec.model.path.join("config.json"))
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .and_then(|v| v.get("vocab_size").and_then(serde_json::Value::as_i64));
    let invalid = |e: dpo_data::Error| Refusal::Invalid(e.to_string());
    let (train, _) = dpo_data::dataset::load(
        spec,
        &spec.data.train,
        tokenizer.as_ref(),
        vocab,
        true,
        None,
    )
    .map_err(invalid)?;
    let eval = match &spec.data.eval {
        Some(path) => {
            dpo_data::dataset::load(spec, path, tokenizer.as_ref(), vocab, false, None)
                .map_err(invalid)?
                .0
        }
        None => Vec::new(),
    };
    std::fs::create_dir_all(shard_dir)
        .map_err(|e| Refusal::Internal(format!("{}: {e}", shard_dir.display())))?;
    dpo_data::shard::write(&shard_dir.join("train.shard"), &train)
        .map_err(|e| Refusal::Internal(e.to_string()))?;
    dpo_data::shard::write(&shard_dir.join("eval.shard"), &eval)
        .map_err(|e| Refusal::Internal(e.to_string()))?;
    let n = train.len();
    let mut data = RunData::new(spec, train, eval).ok_or_else(|| {
        Refusal::Invalid(format!(
            "train.global_batch_size: {} exceeds the {n} usable training examples of {}",
            spec.train.global_batch_size,
            spec.data.train.display()
        ))
    })?;
    data.reference = ReferenceStage::open(spec, cache_root)
        .map_err(|e| Refusal::Invalid(format!("reference.precompute: {e}")))?;
    Ok(data)
}

fn load_shards(
    record: &RunRecord,
    cache_root: &Path,
) -> std::result::Result<RunData, dpo_data::Error> {
    let train = dpo_data::shard::read(&record.shard_dir.join("train.shard"))?;
    let eval = dpo_data::shard::read(&record.shard_dir.join("eval.shard"))?;
    let mut data =
        RunData::new(&record.spec, train, eval).ok_or_else(|| dpo_data::Error::File {
            path: record.shard_dir.join("train.shard"),
            reason: "fewer examples than one global batch".into(),
        })?;
    data.reference = ReferenceStage::open(&record.spec, cache_root)?;
    Ok(data)
}

fn to_proto_example(e: &Example) -> v1::Example {
    v1::Example {
        line: e.line as u64,
        prompt: e.prompt.clone(),
        chosen: e.chosen.clone().map(|ids| v1::Sequence { ids }),
        rejected: e
            .rejected
            .iter()
            .map(|ids| v1::Sequence { ids: ids.clone() })
            .collect(),
    }
}
