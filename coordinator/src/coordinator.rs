//! The runner around the [`Engine`]: it feeds the engine the requests and the
//! time, and carries out the effects the engine decides. Effects leave the
//! engine's lock in the order they were decided, through one queue, and one
//! task applies them in that order after the lock is released; a request waits
//! for its own effects (so its answer says whether they happened), while
//! heartbeats and batch fetches never wait behind a slow store.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use dpo_proto::{RunSpec, v1};
use tokio::sync::{broadcast, mpsc, oneshot};

use crate::engine::reference::{ReferenceStage, to_proto_example};
use crate::engine::{
    self, CheckpointRecord, Effect, Engine, Member, Now, Refusal, Result, RunData, RunRecord,
    RunState, TaggedData,
};
use crate::paths::Confinement;
use crate::store::{GENERATION_KEY, Store};

pub use crate::engine::Counters;

/// Coordinator settings.
#[derive(Debug, Clone)]
pub struct Settings {
    pub data_dir: PathBuf,
    /// A worker silent for this long has lost its lease.
    pub lease_ttl: std::time::Duration,
    /// The most a client may stream in one submission (all files together).
    pub max_upload_bytes: u64,
    /// The directories a run spec may name (the data dir and `--allow-path`).
    pub confinement: Confinement,
    /// How long an ended run's uploads and shards stay (zero: removed as it ends).
    pub run_files_retention: std::time::Duration,
}

impl Settings {
    /// A run's own directory: its uploads (`files/`) and tokenized shards,
    /// removed when the run ends or its submission is refused.
    pub fn run_dir(&self, id: &str) -> PathBuf {
        self.data_dir.join("runs").join(id)
    }
}

type AssignmentTx = mpsc::Sender<std::result::Result<v1::Assignment, tonic::Status>>;
type AssignmentRx = mpsc::Receiver<std::result::Result<v1::Assignment, tonic::Status>>;

/// What the effect task reaches: the store, the workers' streams, the watchers.
#[derive(Debug)]
struct Outside {
    store: Store,
    /// Each worker's newest assignment stream: `(stream id, sender)`.
    streams: Mutex<HashMap<String, (u64, AssignmentTx)>>,
    watchers: Mutex<HashMap<String, broadcast::Sender<v1::RunEvent>>>,
    /// Ended runs' files stay for a while (`run_files_retention`): the sweep
    /// removes them, not the end of the run.
    keep_run_files: bool,
}

/// A batch of effects and who waits for them: `Ok(committed)` tells whether
/// every fenced write went through.
type Batch = (Vec<Effect>, oneshot::Sender<Result<bool>>);

/// The coordinator: the engine, and the runner of its effects.
#[derive(Debug)]
pub struct Coordinator {
    settings: Settings,
    engine: Arc<Mutex<Engine>>,
    outside: Arc<Outside>,
    queue: mpsc::UnboundedSender<Batch>,
    /// Ended runs whose files are gone (the sweep skips them).
    swept: Mutex<std::collections::HashSet<String>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The engine never panics holding its lock; if it did, its state is still
    // the last consistent one (each input validates before it changes anything).
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn store_read<T>(
    what: &str,
    r: std::result::Result<T, crate::store::StoreError>,
) -> anyhow::Result<T> {
    r.map_err(|e| anyhow::anyhow!("reading {what} from the store: {e}"))
}

impl Coordinator {
    /// Opens the coordinator on `store`, reloading unfinished runs and their shards.
    pub async fn open(store: Store, settings: Settings) -> anyhow::Result<Arc<Self>> {
        let generation = store_read("the generation", store.get(GENERATION_KEY).await)?
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
        let mut engine = Engine::new(settings.lease_ttl, generation);
        let mut stored = store_read("run history", store.list(engine::HISTORY_PREFIX).await)?;
        let ended: std::collections::HashSet<String> = stored
            .iter()
            .filter_map(|(k, _)| k.strip_prefix(engine::HISTORY_PREFIX))
            .map(str::to_string)
            .collect();
        // A run in the history has ended, whatever an older record says (one
        // written before its end was recorded as one write).
        stored.extend(
            store_read("runs", store.list(engine::RUN_PREFIX).await)?
                .into_iter()
                .filter(|(k, _)| {
                    k.strip_prefix(engine::RUN_PREFIX)
                        .and_then(|rest| rest.strip_suffix("/record"))
                        .is_some_and(|id| !ended.contains(id))
                }),
        );
        let cache_root = settings.data_dir.join("reference");
        for (key, value) in stored {
            let record: RunRecord = match serde_json::from_str(&value) {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!(key, error = %e, "skipping an unreadable run record");
                    continue;
                }
            };
            if record.state.terminal() {
                engine.restore(record, None, None)?;
                continue;
            }
            let checkpoint = store_read(
                "a checkpoint",
                store.get(&engine::checkpoint_key(&record.id)).await,
            )?
            .and_then(|v| serde_json::from_str::<CheckpointRecord>(&v).ok());
            let data = load_shards(&record, &cache_root).map_err(|e| e.to_string());
            if data.is_ok() {
                // Everything below the output is reached through a handle of
                // the folder the submit resolved, through no link.
                let output = &record.spec.train.output;
                let events = record
                    .spec
                    .train
                    .tensorboard()
                    .then(|| dpo_data::tensorboard::run_dir(output, &record.spec.name));
                let settled = dpo_data::confined::Dir::open(output, false).and_then(|out| {
                    dpo_data::metrics_log::keep_through_in(&out, "metrics.jsonl", record.step)?;
                    dpo_data::metrics_log::settle_evaluations(
                        &out,
                        record.eval_step,
                        events.as_deref(),
                    )
                });
                match settled {
                    Ok(()) => {}
                    // Never started: nothing to trim.
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => {
                        tracing::warn!(output = %output.display(), error = %e, "could not trim metrics.jsonl and eval.jsonl");
                    }
                }
                tracing::info!(run = %record.id, step = record.step, "resuming run from the store");
            }
            engine.restore(record, checkpoint, Some(data))?;
        }
        let (queue, rx) = mpsc::unbounded_channel();
        let outside = Arc::new(Outside {
            store,
            streams: Mutex::new(HashMap::new()),
            watchers: Mutex::new(HashMap::new()),
            keep_run_files: !settings.run_files_retention.is_zero(),
        });
        let engine = Arc::new(Mutex::new(engine));
        tokio::spawn(apply_effects(
            outside.clone(),
            rx,
            engine.clone(),
            queue.clone(),
        ));
        let coordinator = Arc::new(Coordinator {
            settings,
            engine,
            outside,
            queue,
            swept: Mutex::default(),
        });
        // Records of an earlier version move their ledger out (queued by restore).
        coordinator.run(|_, _| Ok(())).await?;
        coordinator.sweep_run_files(true).await;
        Ok(coordinator)
    }

    /// Removes the uploads and shards of runs that ended longer ago than the
    /// retention; with `orphans` (at start, when no submission is in flight),
    /// also every directory under `data-dir/runs` that belongs to no known run
    /// (a submission the process died in).
    pub async fn sweep_run_files(&self, orphans: bool) {
        let now = Now::system().unix_ms;
        let keep = i64::try_from(self.settings.run_files_retention.as_millis()).unwrap_or(i64::MAX);
        let swept = lock(&self.swept).clone();
        let (mut dirs, known) = self.read(|e| {
            let expired: Vec<(String, PathBuf)> = e
                .records()
                .filter(|r| r.state.terminal() && r.finished_ms.saturating_add(keep) <= now)
                .filter(|r| !swept.contains(&r.id))
                .map(|r| (r.id.clone(), r.shard_dir.clone()))
                .collect();
            let known: std::collections::HashSet<String> =
                e.records().map(|r| r.id.clone()).collect();
            (expired, known)
        });
        if orphans && let Ok(entries) = std::fs::read_dir(self.settings.data_dir.join("runs")) {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if !known.contains(&name) {
                    dirs.push((name, entry.path()));
                }
            }
        }
        for (id, dir) in dirs {
            match tokio::fs::remove_dir_all(&dir).await {
                Ok(()) => {
                    tracing::info!(dir = %dir.display(), "removed a run's uploads and shards")
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!(dir = %dir.display(), error = %e, "could not remove a run's files");
                    continue;
                }
            }
            lock(&self.swept).insert(id);
        }
    }

    /// Waits until every effect decided so far has been applied (shutdown).
    pub async fn flush(&self) {
        let (tx, rx) = oneshot::channel();
        if self.queue.send((Vec::new(), tx)).is_ok() {
            let _ = rx.await;
        }
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    pub fn store(&self) -> &Store {
        &self.outside.store
    }

    /// Runs `f` on the engine at the current time and queues the effects it
    /// decided, under the lock; then waits for them to be applied. Returns `f`'s
    /// answer and whether every fenced write of the batch committed.
    async fn run_fenced<T>(
        &self,
        f: impl FnOnce(&mut Engine, Now) -> Result<T>,
    ) -> Result<(T, bool)> {
        let (answer, done) = {
            let mut engine = lock(&self.engine);
            let answer = f(&mut engine, Now::system());
            let effects = engine.take_effects();
            let done = if effects.is_empty() {
                None
            } else {
                let (tx, rx) = oneshot::channel();
                self.queue
                    .send((effects, tx))
                    .map_err(|_| Refusal::Internal("the effect runner stopped".into()))?;
                Some(rx)
            };
            (answer, done)
        };
        let committed = match done {
            Some(rx) => rx
                .await
                .map_err(|_| Refusal::Internal("the effect runner stopped".into()))??,
            None => true,
        };
        Ok((answer?, committed))
    }

    /// [`Self::run_fenced`] for inputs without fenced writes.
    async fn run<T>(&self, f: impl FnOnce(&mut Engine, Now) -> Result<T>) -> Result<T> {
        self.run_fenced(f).await.map(|(t, _)| t)
    }

    /// Reads the engine (no effects).
    fn read<T>(&self, f: impl FnOnce(&Engine) -> T) -> T {
        f(&lock(&self.engine))
    }

    // ----- runs -----------------------------------------------------------------

    /// Validates, tokenizes and shards a run, then queues it. `spec` paths are as
    /// this coordinator sees them; the `streamed` keys name its own copies of
    /// uploaded files (under `run_dir`), every other path must be allowed.
    pub async fn submit(
        &self,
        id: String,
        mut spec: RunSpec,
        streamed: &[String],
        owner: &str,
    ) -> Result<v1::Run> {
        if let Err((key, reason)) = spec.validate() {
            return Err(Refusal::Invalid(format!("{key}: {reason}")));
        }
        self.settings
            .confinement
            .confine(&mut spec, streamed)
            .map_err(Refusal::Invalid)?;
        let out = spec.train.output.clone();
        if out.join("metrics.jsonl").exists() || out.join("checkpoints").exists() {
            return Err(Refusal::Invalid(format!(
                "train.output: {} already holds a run; choose a new directory",
                out.display()
            )));
        }
        self.read(|e| e.check_output_free(&spec, owner))?;
        let shard_dir = self.settings.run_dir(&id);
        let spec2 = spec.clone();
        let dir2 = shard_dir.clone();
        let cache_root = self.settings.data_dir.join("reference");
        // A client that goes away mid-submission (its request dropped) stops the
        // reading of its datasets at the next record.
        let abandoned = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let _on_drop = SetOnDrop(abandoned.clone());
        let name = spec.name.clone();
        let data = tokio::task::spawn_blocking(move || {
            let _reading = dpo_data::records::stop_reading_when(abandoned.clone());
            let prepared = prepare(&spec2, &dir2, &cache_root);
            if prepared.is_err() && abandoned.load(std::sync::atomic::Ordering::Relaxed) {
                tracing::info!(run = %name, "a submission's client went away: stopped preparing it");
            }
            prepared
        })
        .await
        .map_err(|e| Refusal::Internal(e.to_string()))??;
        std::fs::create_dir_all(&out).map_err(|e| {
            Refusal::Invalid(format!(
                "train.output: cannot create {}: {e}",
                out.display()
            ))
        })?;
        // The labels a classification run settled on travel in its spec: the
        // workers build their heads from them.
        let mut spec = spec;
        if let Some(t) = &data.tagged {
            spec.task.labels = t.labels.clone();
        }
        let record = RunRecord::queued(
            id.clone(),
            spec,
            &data,
            shard_dir,
            owner.to_string(),
            Now::system(),
        );
        // The record is durable before the run exists anywhere else: a store
        // that cannot take it refuses the submission as if it never happened.
        let key = engine::run_key(&id);
        let json = serde_json::to_string(&record).map_err(|e| Refusal::Internal(e.to_string()))?;
        self.outside.store.put(&key, json).await?;
        match self.run(move |e, now| e.add_run(record, data, now)).await {
            Ok(run) => Ok(run),
            // Queued; only a later effect of queuing (forming a generation) failed.
            Err(Refusal::Store(e)) if !e.is_permanent() => match self.get(&id, None).await {
                Ok(run) => Ok(run),
                Err(_) => Err(Refusal::Store(e)),
            },
            Err(e) => {
                if self.get(&id, None).await.is_err() {
                    // Refused by the engine (another run took the output meanwhile).
                    let _ = self.outside.store.apply(None, vec![(key, None)]).await;
                }
                Err(e)
            }
        }
    }

    /// A run of `owner` (`None`: anyone's) by id, id prefix or name.
    pub async fn get(&self, what: &str, owner: Option<&str>) -> Result<v1::Run> {
        self.read(|e| e.run_of(what, owner).map(RunRecord::to_proto))
    }

    /// The runs of `owner` (`None`: everyone's), oldest first.
    pub async fn list(&self, owner: Option<&str>) -> Vec<v1::Run> {
        self.read(|e| e.list(owner))
    }

    pub async fn cancel(&self, what: &str, owner: Option<&str>) -> Result<v1::Run> {
        self.run(|e, now| e.cancel(what, owner, now)).await
    }

    /// Ends every watch stream (the coordinator is stopping): each watcher's
    /// stream closes cleanly instead of holding the shutdown open.
    pub fn end_watches(&self) {
        lock(&self.outside.watchers).clear();
    }

    /// The run's current state, then its events.
    pub async fn watch(
        &self,
        what: &str,
        owner: Option<&str>,
    ) -> Result<(v1::Run, broadcast::Receiver<v1::RunEvent>)> {
        let engine = lock(&self.engine);
        let run = engine.run_of(what, owner)?.to_proto();
        let rx = lock(&self.outside.watchers)
            .entry(run.id.clone())
            .or_insert_with(|| broadcast::channel(1024).0)
            .subscribe();
        Ok((run, rx))
    }

    // ----- workers ----------------------------------------------------------------

    pub async fn register(&self, req: v1::RegisterRequest) -> Result<v1::RegisterResponse> {
        Engine::check_registration(&req)?;
        // Before the store hears of it: an impostor must not touch the live
        // worker's key or lease.
        self.read(|e| e.check_session(&req, Now::system()))?;
        let info = serde_json::json!({
            "collective_addr": req.collective_addr,
            "device": req.device,
            "hostname": req.hostname,
        })
        .to_string();
        let lease = self
            .outside
            .store
            .register_worker(&req.worker_id, info, self.settings.lease_ttl)
            .await?;
        self.run(move |e, now| e.register(req, lease, now)).await
    }

    /// Renews a worker's lease; false when the worker is unknown. The lease
    /// that counts is the engine's, renewed at once; the etcd lease (which only
    /// shows live workers to operators and standbys) is renewed in the
    /// background, so a stalled etcd never delays a heartbeat's answer.
    pub async fn heartbeat(&self, req: &v1::HeartbeatRequest) -> bool {
        let lease = lock(&self.engine).heartbeat(&req.worker_id, &req.session, Now::system());
        match lease {
            None => false,
            Some(lease) => {
                if let Some(lease) = lease {
                    let outside = self.outside.clone();
                    let worker = req.worker_id.clone();
                    tokio::spawn(async move {
                        if let Err(e) = outside.store.renew(lease).await {
                            tracing::warn!(worker, error = %e, "could not renew the worker's etcd lease");
                        }
                    });
                }
                true
            }
        }
    }

    /// Opens a worker's assignment stream; returns its receiver, a sender that
    /// tells when the worker goes away, and the stream's id.
    pub async fn open_stream(
        &self,
        worker_id: &str,
        session: &[u8],
    ) -> Result<(AssignmentRx, AssignmentTx, u64)> {
        let (tx, rx) = mpsc::channel(64);
        let tx2 = tx.clone();
        let outside = self.outside.clone();
        let id = self
            .run(move |e, now| {
                let id = e.open_stream(worker_id, session, now)?;
                // Under the lock, before the engine's effects (the generation this
                // may form) are queued: the stream exists when they are applied.
                lock(&outside.streams).insert(worker_id.to_string(), (id, tx2));
                Ok(id)
            })
            .await?;
        Ok((rx, tx, id))
    }

    /// The worker's stream closed (its process died or it disconnected).
    pub async fn stream_closed(&self, worker_id: &str, stream_id: u64) {
        {
            let mut streams = lock(&self.outside.streams);
            if streams
                .get(worker_id)
                .is_some_and(|(id, _)| *id == stream_id)
            {
                streams.remove(worker_id);
            }
        }
        if let Err(e) = self
            .run(|e, now| e.stream_closed(worker_id, stream_id, now))
            .await
        {
            tracing::error!(error = %e, "reconcile");
        }
    }

    pub async fn workers(&self) -> Vec<v1::WorkerInfo> {
        self.read(|e| e.workers(Now::system()))
    }

    /// Expires lapsed leases and forms, repairs or grows the generation.
    pub async fn reconcile(&self) -> Result<()> {
        self.run(|e, now| e.reconcile(now)).await
    }

    // ----- members ----------------------------------------------------------------

    pub async fn fetch_batch(&self, req: &v1::FetchBatchRequest) -> Result<v1::Batch> {
        let started = Instant::now();
        let member = Member::from_proto(req.member.as_ref())?;
        let (data, world, total, _) = self.read(|e| e.member_view(&member))?;
        let batch = batch_of(&data, req, member.rank as usize, world, total)?;
        lock(&self.engine).batch_served(batch.examples.len(), started.elapsed());
        Ok(batch)
    }

    /// This rank's chunk of the reference stage.
    pub async fn reference_work(
        &self,
        req: &v1::ReferenceWorkRequest,
    ) -> Result<v1::ReferenceWorkResponse> {
        let member = Member::from_proto(req.member.as_ref())?;
        let (data, world, _, micro) = self.read(|e| e.member_view(&member))?;
        let stage = stage_of(&data, &member.run)?;
        let (response, progress) = stage.work(
            &data,
            member.generation,
            member.rank as usize,
            req.chunk,
            world,
            micro,
        )?;
        if let Some((total, cached)) = progress {
            self.run(|e, _| {
                e.reference_planned(&member.run, total, cached);
                Ok(())
            })
            .await?;
        }
        Ok(response)
    }

    /// Stores reference sums reported by a member of the current generation.
    pub async fn report_reference(&self, req: &v1::ReportReferenceRequest) -> Result<()> {
        let member = Member::from_proto(req.member.as_ref())?;
        let (data, ..) = self.read(|e| e.member_view(&member))?;
        stage_of(&data, &member.run)?;
        let (keys, sums) = (req.keys.clone(), req.sums.clone());
        let added = tokio::task::spawn_blocking(move || match &data.reference {
            Some(stage) => stage.store(&keys, &sums),
            None => Ok(0),
        })
        .await
        .map_err(|e| Refusal::Internal(e.to_string()))??;
        tracing::debug!(run = %member.run, added, "reference sums stored");
        self.run(|e, _| {
            e.reference_stored(&member.run, req.keys.len() as u64);
            Ok(())
        })
        .await
    }

    pub async fn report_step(&self, req: &v1::ReportStepRequest) -> Result<()> {
        let member = Member::from_proto(req.member.as_ref())?;
        let report = engine::StepReport {
            step: req.step,
            metrics: req
                .metrics
                .iter()
                .map(|m| (m.name.clone(), m.value))
                .collect(),
            eval: req.eval,
            trained_generation: req.trained_generation,
            trained_world_size: req.trained_world_size,
        };
        self.run(|e, _| e.report_step(&member, report)).await
    }

    /// Commits a checkpoint written by rank 0, fenced by the generation.
    pub async fn report_checkpoint(&self, req: &v1::ReportCheckpointRequest) -> Result<()> {
        let member = Member::from_proto(req.member.as_ref())?;
        let output = self.read(|e| e.run(&member.run).map(|r| r.spec.train.output.clone()))?;
        let path_ok = checkpoint_in(&output.join("checkpoints"), Path::new(&req.path));
        let ((), committed) = self
            .run_fenced(|e, _| e.commit_checkpoint(&member, req.step, &req.path, path_ok))
            .await?;
        if !committed {
            return Err(Refusal::Stale(format!(
                "generation {} was superseded before the checkpoint committed",
                member.generation
            )));
        }
        self.run(|e, _| e.checkpoint_committed(&member.run, req.step, &req.path))
            .await
    }

    pub async fn report_done(&self, req: &v1::ReportDoneRequest) -> Result<()> {
        let member = Member::from_proto(req.member.as_ref())?;
        self.run(|e, now| e.report_done(&member, req.step, &req.error, req.stopped_early, now))
            .await
    }

    /// A member's generation went back to the last committed checkpoint.
    pub async fn report_rollback(&self, req: &v1::ReportRollbackRequest) -> Result<()> {
        let member = Member::from_proto(req.member.as_ref())?;
        self.run(|e, _| e.report_rollback(&member, req.from_step, req.to_step, &req.reason))
            .await
    }

    /// A member's collective broke: end the generation so a new one forms.
    pub async fn report_fault(&self, req: &v1::ReportFaultRequest) -> Result<()> {
        let member = Member::from_proto(req.member.as_ref())?;
        self.run(|e, now| e.fault(&member, &req.reason, now)).await
    }

    pub async fn publish_bootstrap(&self, b: v1::Bootstrap) -> Result<()> {
        lock(&self.engine).publish_bootstrap(b.run_id, b.generation, b.data)
    }

    pub async fn get_bootstrap(&self, run_id: &str, generation: u64) -> Option<Vec<u8>> {
        self.read(|e| e.bootstrap(run_id, generation))
    }

    pub async fn counters(&self) -> (Counters, Vec<(String, RunState, u64)>, usize, u64) {
        self.read(Engine::counters)
    }
}

/// Whether `path` is a complete checkpoint directly under `root` (symlinks
/// and `..` resolved first): a directory holding a `manifest.json`.
fn checkpoint_in(root: &Path, path: &Path) -> bool {
    let (Ok(root), Ok(path)) = (root.canonicalize(), path.canonicalize()) else {
        return false;
    };
    path.parent() == Some(root.as_path()) && path.join("manifest.json").is_file()
}

/// The run's reference stage, or why it has none.
fn stage_of<'a>(data: &'a RunData, run: &str) -> Result<&'a ReferenceStage> {
    data.reference.as_ref().ok_or_else(|| {
        Refusal::Invalid(format!(
            "run {run} has no reference stage (reference.precompute is off)"
        ))
    })
}

/// The rank's share of a global batch (train) or of the eval set, with the
/// reference sums when the stage has them all.
fn batch_of(
    data: &RunData,
    req: &v1::FetchBatchRequest,
    rank: usize,
    world: usize,
    total: u64,
) -> Result<v1::Batch> {
    use dpo_data::batches::rank_share;
    if let Some(tagged) = &data.tagged {
        return tagged_batch_of(data, tagged, req, rank, world, total);
    }
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
    let (mut reference_chosen, mut reference_rejected) = (Vec::new(), Vec::new());
    if let Some(stage) = &data.reference
        && let Some(sums) = stage.sums_of(&examples)?
    {
        reference_chosen = sums.iter().map(|s| s[0]).collect();
        reference_rejected = sums.iter().map(|s| s[1]).collect();
    }
    Ok(v1::Batch {
        examples: examples.iter().map(to_proto_example).collect(),
        reference_chosen,
        reference_rejected,
        indices: indices.iter().map(|&i| i as u64).collect(),
        total_examples: norm.examples,
        total_chosen_tokens: norm.chosen_tokens,
        total_negative_tokens: norm.negative_tokens,
        epoch,
        ..Default::default()
    })
}

/// A classification run's batch: this rank's contiguous share of the global
/// batch of `req.step` (or of the eval split), with the global batch's totals.
fn tagged_batch_of(
    data: &RunData,
    tagged: &TaggedData,
    req: &v1::FetchBatchRequest,
    rank: usize,
    world: usize,
    total: u64,
) -> Result<v1::Batch> {
    use dpo_data::batches::rank_range;
    let (pool, idx, epoch) = if req.split == v1::Split::Eval as i32 {
        (&tagged.eval, (0..tagged.eval.len()).collect::<Vec<_>>(), 0)
    } else {
        if req.step >= total {
            return Err(Refusal::Invalid(format!(
                "step {} is past the run's {total} steps",
                req.step
            )));
        }
        let mut plan = data
            .plan
            .lock()
            .map_err(|_| Refusal::Internal("poisoned plan".into()))?;
        (
            &tagged.train,
            plan.indices(req.step),
            plan.position(req.step).0,
        )
    };
    let (start, len) = rank_range(idx.len(), world, rank);
    let mine = &idx[start..start + len];
    let count = |f: fn(&dpo_data::tagged::Encoded) -> usize| -> f64 {
        idx.iter().map(|&i| f(&pool[i])).sum::<usize>() as f64
    };
    Ok(v1::Batch {
        tagged: mine.iter().map(|&i| to_tagged_proto(&pool[i])).collect(),
        indices: mine.iter().map(|&i| i as u64).collect(),
        total_targets: count(|e| e.targets.len()),
        total_negatives: count(|e| e.negatives.len()),
        total_examples: idx.len() as f64,
        epoch,
        ..Default::default()
    })
}

fn to_tagged_proto(e: &dpo_data::tagged::Encoded) -> v1::TaggedExample {
    v1::TaggedExample {
        line: e.line as u64,
        input_ids: e.input_ids.clone(),
        target_positions: e.targets.iter().map(|t| t.0).collect(),
        target_labels: e.targets.iter().map(|t| t.1).collect(),
        negative_positions: e.negatives.iter().map(|t| t.0).collect(),
        negative_labels: e.negatives.iter().map(|t| t.1).collect(),
        word_starts: e.word_starts.clone(),
        gold: e.gold.clone(),
    }
}

/// Applies batches of effects in the order they were queued. A write the store
/// refuses for good (too large, over quota, not permitted) fails its run with
/// the store's reason instead of being retried forever: the engine decides
/// the failure, and its effects join the queue.
async fn apply_effects(
    outside: Arc<Outside>,
    mut rx: mpsc::UnboundedReceiver<Batch>,
    engine: Arc<Mutex<Engine>>,
    queue: mpsc::UnboundedSender<Batch>,
) {
    while let Some((effects, done)) = rx.recv().await {
        let mut committed = true;
        let mut failure: Option<Refusal> = None;
        let mut refused: Vec<(String, String)> = Vec::new();
        let mut unsaved = false;
        for effect in effects {
            let (run, output) = match &effect {
                Effect::Store { run, .. } => (run.clone(), false),
                Effect::RecordEnd { run, .. } => (Some(run.clone()), false),
                Effect::AppendMetrics { run, .. } => (Some(run.clone()), true),
                _ => (None, false),
            };
            match apply(&outside, effect).await {
                Ok(c) => committed &= c,
                Err(e) => {
                    tracing::error!(error = %e, "applying the coordinator's decision");
                    match (&e, run) {
                        (Refusal::Store(se), Some(run)) if se.is_permanent() => {
                            refused.push((
                                run,
                                format!("the state store refused the run's state: {se}"),
                            ));
                        }
                        (Refusal::Internal(why), Some(run)) if output => {
                            refused.push((run, format!("cannot write the run's output: {why}")));
                        }
                        // Missed for now (etcd unreachable past the retries):
                        // written again below. A permanent refusal without a
                        // run to fail would only be refused again.
                        (Refusal::Store(se), _) if !se.is_permanent() => unsaved = true,
                        _ => {}
                    }
                    failure.get_or_insert(e);
                }
            }
        }
        // What the engine decides about a failure joins the queue; nobody waits.
        let decide = |what: &str, f: &dyn Fn(&mut Engine) -> Result<()>| {
            let mut engine = lock(&engine);
            if let Err(e) = f(&mut engine) {
                tracing::error!(error = %e, "{what}");
            }
            let (tx, _) = oneshot::channel();
            let _ = queue.send((engine.take_effects(), tx));
        };
        if unsaved {
            // The store missed writes (it was unreachable past the retries):
            // write the engine's state again, after whatever is queued.
            decide("planning the store's catch-up", &|e| e.persist_all());
        }
        for (run, reason) in refused {
            decide("failing a run the store refused", &|e| {
                e.fail_run(&run, reason.clone(), Now::system())
            });
        }
        // Answered after the engine knows: whoever waited sees the run failed.
        let _ = done.send(match failure {
            Some(e) => Err(e),
            None => Ok(committed),
        });
    }
}

/// Applies one effect; `Ok(false)` for a fenced write that did not commit.
async fn apply(outside: &Outside, effect: Effect) -> Result<bool> {
    match effect {
        Effect::Store { fence, writes, .. } => Ok(outside.store.apply(fence, writes).await?),
        Effect::RecordEnd {
            writes,
            then_delete,
            ..
        } => {
            outside.store.record_end(writes).await?;
            if let Err(e) = outside.store.delete_prefix(&then_delete).await {
                // The end is recorded; the leftover keys are read by nobody.
                tracing::warn!(prefix = then_delete, error = %e, "could not delete an ended run's keys");
            }
            Ok(true)
        }
        Effect::AppendMetrics {
            path,
            metrics,
            events,
            ..
        } => {
            let shown = path.display().to_string();
            tokio::task::spawn_blocking(move || {
                append_metrics(&path, &metrics).map_err(|e| format!("{shown}: {e}"))?;
                if let Some((dir, first_step)) = events {
                    dpo_data::confined::Dir::open(&dir, true)
                        .and_then(|d| dpo_data::tensorboard::append(&d, first_step, &metrics))
                        .map_err(|e| format!("{}: {e}", dir.display()))?;
                }
                Ok::<_, String>(())
            })
            .await
            .map_err(|e| Refusal::Internal(e.to_string()))?
            .map_err(Refusal::Internal)?;
            Ok(true)
        }
        Effect::WriteLedger {
            prefix,
            path,
            trailer,
        } => {
            if let Err(e) = write_ledger(&outside.store, &prefix, &path, &trailer).await {
                tracing::warn!(path = %path.display(), error = %e, "could not write ledger.jsonl");
            }
            Ok(true)
        }
        Effect::RevokeLease(lease) => {
            outside.store.revoke(lease).await;
            Ok(true)
        }
        Effect::Send { worker, kind } => {
            let tx = lock(&outside.streams)
                .get(&worker)
                .map(|(_, tx)| tx.clone());
            if let Some(tx) = tx
                && let Err(e) = tx.try_send(Ok(v1::Assignment { kind: Some(kind) }))
            {
                tracing::warn!(worker, error = %e, "could not send an assignment");
            }
            Ok(true)
        }
        Effect::Emit { run, event } => {
            if let Some(tx) = lock(&outside.watchers).get(&run) {
                let _ = tx.send(event);
            }
            Ok(true)
        }
        Effect::EndWatch { run } => {
            lock(&outside.watchers).remove(&run);
            Ok(true)
        }
        Effect::RemoveRunFiles(_) if outside.keep_run_files => Ok(true),
        Effect::RemoveRunFiles(dir) => {
            match tokio::fs::remove_dir_all(&dir).await {
                Ok(()) => {
                    tracing::info!(dir = %dir.display(), "removed an ended run's uploads and shards")
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!(dir = %dir.display(), error = %e, "could not remove an ended run's files")
                }
            }
            Ok(true)
        }
    }
}

/// Sets its flag when dropped: a request's future dropped (its client gone)
/// tells the blocking work it started.
struct SetOnDrop(Arc<std::sync::atomic::AtomicBool>);

impl Drop for SetOnDrop {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Appends one line to a metrics file (created when missing): a regular file
/// in the folder the submit resolved, reached through no symbolic link
/// ([`dpo_data::confined::open_beneath`]).
fn append_metrics(path: &Path, metrics: &[(String, f64)]) -> std::io::Result<()> {
    let mut f = dpo_data::confined::open_beneath(path, dpo_data::confined::Access::Append)?;
    dpo_data::metrics_log::append(&mut f, metrics)
}

/// Writes every ledger entry under `prefix` to `path`, one JSON line each in
/// step order, reading the store a page at a time.
async fn write_ledger(
    store: &Store,
    prefix: &str,
    path: &Path,
    trailer: &[String],
) -> anyhow::Result<()> {
    const PAGE: usize = 1000;
    let mut text = String::new();
    let mut after: Option<String> = None;
    let mut last_step = 0u64;
    loop {
        let page = store.list_page(prefix, after.as_deref(), PAGE).await?;
        for (_, v) in &page {
            for e in engine::read_ledger_value(v) {
                // Keys sort by step; an earlier version's segments may overlap.
                if e.step > last_step {
                    last_step = e.step;
                    text.push_str(&serde_json::to_string(&e)?);
                    text.push('\n');
                }
            }
        }
        match page.last() {
            Some((k, _)) if page.len() == PAGE => after = Some(k.clone()),
            _ => break,
        }
    }
    for line in trailer {
        text.push_str(line);
        text.push('\n');
    }
    let (Some(dir), Some(name)) = (path.parent(), path.file_name().and_then(|n| n.to_str())) else {
        anyhow::bail!("{}: not a folder and a file name", path.display());
    };
    use std::io::Write;
    dpo_data::confined::Dir::open(dir, true)?.replace(name, |f| f.write_all(text.as_bytes()))?;
    Ok(())
}

/// Tokenizes and shards a run's datasets (train and eval) once.
fn prepare(spec: &RunSpec, shard_dir: &Path, cache_root: &Path) -> Result<RunData> {
    if spec.task.kind.is_classification() {
        return prepare_tagged(spec, shard_dir);
    }
    if spec.data.negatives == Some(dpo_proto::Negatives::Policy) {
        return Err(Refusal::Invalid(
            "data.negatives: \"policy\" negatives need a model to sample from; the cluster does not sample them yet (use `dpo-worker train`)".into(),
        ));
    }
    let tokenizer = if dpo_data::TextTokenizer::present(&spec.model.path) {
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

/// A classification run's data: read, checked, labels fixed, encoded with the
/// model's tokenizer once, and kept in the run's shard directory.
fn prepare_tagged(spec: &RunSpec, shard_dir: &Path) -> Result<RunData> {
    use dpo_data::task_data;
    let invalid = |e: dpo_data::Error| Refusal::Invalid(e.to_string());
    let tokenizer = dpo_data::TextTokenizer::from_dir(&spec.model.path).map_err(invalid)?;
    let max_positions = task_data::max_positions(&spec.model.path).map_err(invalid)?;
    let data = task_data::load(spec, &tokenizer, max_positions).map_err(invalid)?;
    let tagged = TaggedData {
        labels: data.labels.names().to_vec(),
        train: data.train.examples,
        eval: data.eval.map(|e| e.examples).unwrap_or_default(),
    };
    std::fs::create_dir_all(shard_dir)
        .map_err(|e| Refusal::Internal(format!("{}: {e}", shard_dir.display())))?;
    dpo_data::tagged::write_shard(
        &shard_dir.join(TAGGED_SHARD),
        &tagged.labels,
        &tagged.train,
        &tagged.eval,
    )
    .map_err(|e| Refusal::Internal(e.to_string()))?;
    let n = tagged.train.len();
    RunData::new_tagged(spec, tagged).ok_or_else(|| {
        Refusal::Invalid(format!(
            "train.global_batch_size: {} exceeds the {n} training examples of {}",
            spec.train.global_batch_size,
            spec.data.train.display()
        ))
    })
}

/// A classification run's encoded examples and labels in its shard directory.
const TAGGED_SHARD: &str = "tagged.shard";

fn load_shards(
    record: &RunRecord,
    cache_root: &Path,
) -> std::result::Result<RunData, dpo_data::Error> {
    if record.spec.task.kind.is_classification() {
        let path = record.shard_dir.join(TAGGED_SHARD);
        let (labels, train, eval) = dpo_data::tagged::read_shard(&path)?;
        let tagged = TaggedData {
            labels,
            train,
            eval,
        };
        return RunData::new_tagged(&record.spec, tagged).ok_or_else(|| dpo_data::Error::File {
            path,
            reason: "fewer examples than one global batch".into(),
        });
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_checkpoints_inside_the_runs_directory_are_committed() -> std::io::Result<()> {
        let dir = tempfile::tempdir()?;
        let root = dir.path().join("out/checkpoints");
        let good = root.join("step-4");
        std::fs::create_dir_all(&good)?;
        std::fs::write(good.join("manifest.json"), "{}")?;
        assert!(checkpoint_in(&root, &good));
        // Elsewhere, even with a manifest; through `..`; through a symlink.
        let other = dir.path().join("elsewhere/step-4");
        std::fs::create_dir_all(&other)?;
        std::fs::write(other.join("manifest.json"), "{}")?;
        assert!(!checkpoint_in(&root, &other));
        assert!(!checkpoint_in(&root, &root.join("../../elsewhere/step-4")));
        std::os::unix::fs::symlink(&other, root.join("step-8"))?;
        assert!(!checkpoint_in(&root, &root.join("step-8")));
        // Inside, but not a complete checkpoint.
        std::fs::create_dir_all(root.join("step-9"))?;
        assert!(!checkpoint_in(&root, &root.join("step-9")));
        assert!(!checkpoint_in(&root, &root.join("step-404")));
        Ok(())
    }

    #[test]
    fn metrics_are_never_written_through_a_link_swapped_in_after_submit() -> std::io::Result<()> {
        use std::os::unix::fs::symlink;
        let dir = tempfile::tempdir()?;
        let root = dir.path().canonicalize()?;
        let m = [("step".to_string(), 1.0)];
        let out = root.join("out");
        std::fs::create_dir(&out)?;
        append_metrics(&out.join("metrics.jsonl"), &m)?;
        assert_eq!(
            std::fs::read_to_string(out.join("metrics.jsonl"))?
                .lines()
                .count(),
            1
        );
        // The output folder replaced by a link to a folder outside.
        let outside = root.join("outside");
        std::fs::create_dir(&outside)?;
        let swapped = root.join("swapped");
        symlink(&outside, &swapped)?;
        let err = append_metrics(&swapped.join("metrics.jsonl"), &m).expect_err("refused");
        assert!(
            err.to_string().contains("without following a link"),
            "{err}"
        );
        assert!(!outside.join("metrics.jsonl").exists());
        // Also when the output does not exist yet, below a swapped folder.
        assert!(dpo_data::confined::Dir::open(&swapped.join("new/deeper"), true).is_err());
        assert!(!outside.join("new").exists());
        // metrics.jsonl itself a link to another file.
        let victim = root.join("victim.jsonl");
        std::fs::write(&victim, "private\n")?;
        let out2 = root.join("out2");
        std::fs::create_dir(&out2)?;
        symlink(&victim, out2.join("metrics.jsonl"))?;
        assert!(append_metrics(&out2.join("metrics.jsonl"), &m).is_err());
        assert_eq!(std::fs::read_to_string(&victim)?, "private\n");
        Ok(())
    }
}
