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

use crate::engine::{self, Effect, Engine, Member, Now, Refusal, Result, RunRecord, RunState};
use crate::paths::Confinement;
use crate::store::Store;

pub use crate::engine::Counters;

pub(crate) mod data;
mod effects;
mod recovery;

use data::{batch_of, load_shards, prepare, stage_of};
use effects::apply_effects;

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
        self.decide(f, false).await
    }

    /// [`Self::run_fenced`] for a member's report: its answer also waits for
    /// every decision queued before it, even when it decided nothing itself.
    /// A rank whose report of a step was a duplicate is thus answered only
    /// once the first report's write is applied — or refused for good, which
    /// fails the run first — so it cannot go on to finish a run whose last
    /// step the store never took (the simulator's full-store seeds found it).
    async fn run_reported<T>(
        &self,
        f: impl FnOnce(&mut Engine, Now) -> Result<T>,
    ) -> Result<(T, bool)> {
        self.decide(f, true).await
    }

    async fn decide<T>(
        &self,
        f: impl FnOnce(&mut Engine, Now) -> Result<T>,
        after_queued: bool,
    ) -> Result<(T, bool)> {
        let (answer, done) = {
            let mut engine = lock(&self.engine);
            let answer = f(&mut engine, Now::system());
            let effects = engine.take_effects();
            let done = if effects.is_empty() && !after_queued {
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
        if let Err(invalid) = spec.validate() {
            return Err(Refusal::Invalid(invalid.to_string()));
        }
        self.settings
            .confinement
            .confine(&mut spec, streamed)
            .map_err(|e| Refusal::Invalid(e.to_string()))?;
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
        self.run_reported(|e, _| e.report_step(&member, report))
            .await
            .map(|(t, _)| t)
    }

    /// Commits a checkpoint written by rank 0, fenced by the generation.
    pub async fn report_checkpoint(&self, req: &v1::ReportCheckpointRequest) -> Result<()> {
        let member = Member::from_proto(req.member.as_ref())?;
        let output = self.read(|e| e.run(&member.run).map(|r| r.spec.train.output.clone()))?;
        let path_ok = checkpoint_in(&output.join("checkpoints"), Path::new(&req.path));
        let ((), committed) = self
            .run_reported(|e, _| e.commit_checkpoint(&member, req.step, &req.path, path_ok))
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
        self.run_reported(|e, now| {
            e.report_done(&member, req.step, &req.error, req.stopped_early, now)
        })
        .await
        .map(|(t, _)| t)
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

/// Sets its flag when dropped: a request's future dropped (its client gone)
/// tells the blocking work it started.
struct SetOnDrop(Arc<std::sync::atomic::AtomicBool>);

impl Drop for SetOnDrop {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::Relaxed);
    }
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
}
