//! A worker in a cluster: registers with the coordinator, holds a lease, and
//! trains its share of every global batch in whatever generation the coordinator
//! puts it. gRPC runs on a small tokio runtime; training runs on this thread (tch
//! tensors are `Send`, not `Sync`), and the two talk through a channel and an
//! abort signal — so a lost peer or a new generation interrupts a blocked
//! collective at once, and the training state (weights, optimizer moments, step)
//! survives from one generation to the next without a restart.

use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use dpo_data::Example;
use dpo_data::examples::Normalizer;
use dpo_proto::RunSpec;
use dpo_proto::client::{BearerToken, ClientTls, channel};
use dpo_proto::v1::{self, worker_service_client::WorkerServiceClient};
use tch::Device;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use crate::collective::tcp::{TcpCollective, TcpOptions};
use crate::collective::{AbortSignal, CollectiveError};
use crate::error::{Disposition, Error, Result};
use crate::train::classify::objective::Norm;
use crate::train::classify::{ClassifierTrainer, ClusterShape, TaggedSource};
use crate::train::{
    Batches, Metrics, RunShape, Slice, TrainOptions, Trainer, TrainingRun, run_loop,
};
use dpo_data::tagged::Encoded;

mod control;
mod remote;

pub use control::{join, new_worker_id};
use remote::{RemoteBatches, from_proto};

type Client = WorkerServiceClient<InterceptedService<Channel, BearerToken>>;

/// How to join.
#[derive(Debug, Clone)]
pub struct JoinOptions {
    /// The coordinator, `http://host:port` or `https://host:port`.
    pub coordinator: String,
    /// Where to accept collective (ring) connections; port 0 picks one.
    pub listen: SocketAddr,
    /// The address peers use to reach `listen` (default: `listen`).
    pub advertise: Option<std::net::IpAddr>,
    pub device: Device,
    /// This process's index among the ranks one `dpo-worker --gpus N` runs
    /// (0 otherwise); the coordinator keeps a host's ranks together in this order.
    pub local_rank: u32,
    /// Stable identity (default: a fresh UUID).
    pub worker_id: String,
    pub token: BearerToken,
    /// TLS towards the coordinator (`https://` addresses).
    pub tls: ClientTls,
    /// Fault injection for tests: exit like a crash once this many reference-stage
    /// chunks are reported.
    pub halt_after_reference_chunks: Option<u64>,
    /// Fault injection for tests: break this step once, as a lost connection
    /// would: under ZeRO between the update and the parameter gather, else
    /// right after the update.
    pub tear_at_step: Option<u64>,
    /// Fault injection for tests: exit like a crash right after this step's
    /// update, before it is reported.
    pub halt_after_step: Option<u64>,
    /// How long a worker asked to stop may take to leave before it stops at
    /// once (the coordinator may be unreachable, so the hand-off never comes).
    pub leave_timeout: std::time::Duration,
    /// Intra-op threads (`--threads`); none: the host's cores shared among
    /// the generation's ranks on it ([`crate::threads`]).
    pub threads: Option<usize>,
}

/// What the gRPC side tells the training thread.
#[derive(Debug)]
enum Command {
    Work(Box<v1::Work>),
    Idle(String),
    /// SIGTERM or SIGINT: leave the cluster.
    Leave,
}

/// The generation this worker is in, shared by both sides.
#[derive(Debug, Default)]
struct Current {
    generation: u64,
    rank: u32,
    signal: AbortSignal,
}

#[derive(Debug, Default)]
struct Shared {
    current: Mutex<Current>,
    /// Every generation up to this one has been aborted.
    aborted_up_to: AtomicU64,
    /// Asked to stop (SIGTERM, SIGINT): finish the step in hand, then leave.
    leaving: std::sync::atomic::AtomicBool,
}

impl Shared {
    fn abort_through(&self, generation: u64) {
        self.aborted_up_to.fetch_max(generation, Ordering::SeqCst);
        if let Ok(c) = self.current.lock()
            && c.generation <= generation
        {
            c.signal.abort();
        }
    }
}

/// Calls `f` until it succeeds, retrying while the coordinator is unreachable
/// (it may be restarting) — unless the generation is aborted meanwhile.
fn call<T, F, Fut>(
    rt: &tokio::runtime::Handle,
    signal: &AbortSignal,
    what: &'static str,
    mut f: F,
) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = std::result::Result<tonic::Response<T>, tonic::Status>>,
{
    let mut warned = false;
    loop {
        if signal.is_aborted() {
            return Err(Error::Superseded {
                what,
                reason: "generation aborted".into(),
            });
        }
        let status = match rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(30), f())
                .await
                .unwrap_or_else(|_| Err(tonic::Status::deadline_exceeded("no answer in 30 s")))
        }) {
            Ok(r) => return Ok(r.into_inner()),
            Err(status) => status,
        };
        let e = Error::from_status(what, &status);
        if e.disposition() != Disposition::Retry {
            return Err(e);
        }
        if !warned {
            tracing::warn!(what, error = %status.message(), "coordinator unreachable; retrying");
            warned = true;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn metrics_proto(m: &Metrics) -> Vec<v1::Metric> {
    m.iter()
        .map(|(name, value)| v1::Metric {
            name: name.clone(),
            value: *value,
        })
        .collect()
}

struct Worker {
    rt: tokio::runtime::Handle,
    client: Client,
    worker_id: String,
    device: Device,
    listener: TcpListener,
    shared: Arc<Shared>,
    /// The run this worker holds and its training (any task, one loop).
    trainer: Option<(String, Box<dyn TrainingRun>)>,
    /// The trainer was made for its run but has not restored the run's
    /// committed checkpoint yet (that happens once it is in a world).
    restore_pending: bool,
    /// The newest step this worker completed (re-reported in a new generation,
    /// in case the old one broke before anyone reported it).
    last: Option<StepRecord>,
    halt_after_reference_chunks: Option<u64>,
    reference_chunks_reported: u64,
    tear_at_step: Option<u64>,
    halt_after_step: Option<u64>,
    /// `--threads` (none: shared among the ranks on this host).
    threads: Option<usize>,
}

/// A completed step (or an evaluation at a step) as it is reported: its
/// number, the world that trained it, its metrics.
#[derive(Debug, Clone)]
struct StepRecord {
    step: u64,
    generation: u64,
    world_size: u32,
    metrics: Metrics,
}

impl StepRecord {
    /// Step `step`'s record from its metrics, which name the world that
    /// trained it.
    fn of(step: u64, metrics: Metrics) -> StepRecord {
        let value = |name: &str| {
            metrics
                .iter()
                .find(|(k, _)| k == name)
                .map_or(0.0, |(_, v)| *v)
        };
        StepRecord {
            step,
            generation: value("generation") as u64,
            world_size: value("world_size") as u32,
            metrics,
        }
    }
}

impl Worker {
    /// This worker as a member of `work`'s generation.
    /// This rank's collective in generation `work`: the tcp ring, or NCCL
    /// (rank 0 makes the generation's unique id and publishes it through the
    /// coordinator; the others read it, fenced by the generation).
    fn connect(
        &mut self,
        work: &v1::Work,
        signal: &AbortSignal,
    ) -> Result<Box<dyn crate::collective::Collective>> {
        use crate::collective::nccl;
        let rank = work.rank as usize;
        if work.backend == "nccl" {
            if let Some(e) = nccl::unavailable(self.device) {
                return Err(Error::Nccl(e));
            }
            let Device::Cuda(device) = self.device else {
                return Err(Error::State("nccl on a CPU device"));
            };
            let fence =
                |reason: String| Error::Collective(CollectiveError::Protocol { rank, reason });
            let id = if rank == 0 {
                let id = nccl::library().and_then(|lib| lib.unique_id())?;
                let req = v1::Bootstrap {
                    run_id: work.run_id.clone(),
                    generation: work.generation,
                    data: nccl::encode_bootstrap(work.generation, &id),
                };
                let client = self.client.clone();
                call(&self.rt, signal, "publish the NCCL id", || {
                    let mut c = client.clone();
                    let r = req.clone();
                    async move { c.publish_bootstrap(r).await }
                })?;
                id
            } else {
                let req = v1::GetBootstrapRequest {
                    run_id: work.run_id.clone(),
                    generation: work.generation,
                };
                let client = self.client.clone();
                let got = call(&self.rt, signal, "read the NCCL id", || {
                    let mut c = client.clone();
                    let r = req.clone();
                    async move { c.get_bootstrap(r).await }
                })?;
                nccl::decode_bootstrap(&got.data, work.generation)
                    .map_err(|e| fence(e.to_string()))?
            };
            let opts = nccl::NcclOptions {
                connect_timeout: Duration::from_secs(120),
                io_timeout: Duration::from_secs(300),
                abort: signal.clone(),
            };
            let comm =
                nccl::NcclCollective::connect(rank, work.world_size as usize, device, &id, &opts)?;
            return Ok(Box::new(comm));
        }
        let peers = work
            .peers
            .iter()
            .map(|p| {
                p.parse::<SocketAddr>().map_err(|e| Error::Input {
                    context: "peers".into(),
                    reason: format!("{p}: {e}"),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let listener = self
            .listener
            .try_clone()
            .map_err(|source| CollectiveError::Io {
                rank,
                op: "listener",
                source,
            })?;
        let opts = TcpOptions {
            connect_timeout: Duration::from_secs(120),
            io_timeout: Duration::from_secs(300),
            abort: signal.clone(),
            key: work.ring_key.clone(),
        };
        let ring = TcpCollective::connect(rank, &peers, listener, work.generation, &opts)?;
        Ok(Box::new(ring))
    }

    fn member(&self, work: &v1::Work) -> v1::Member {
        v1::Member {
            worker_id: self.worker_id.clone(),
            run_id: work.run_id.clone(),
            generation: work.generation,
            rank: work.rank,
        }
    }

    fn report(
        &self,
        signal: &AbortSignal,
        work: &v1::Work,
        record: &StepRecord,
        eval: bool,
    ) -> Result<()> {
        let req = v1::ReportStepRequest {
            member: Some(self.member(work)),
            step: record.step,
            metrics: metrics_proto(&record.metrics),
            eval,
            trained_generation: record.generation,
            trained_world_size: record.world_size,
        };
        call(&self.rt, signal, "report step", || {
            let mut c = self.client.clone();
            let r = req.clone();
            async move { c.report_step(r).await }
        })
        .map(|_| ())
    }

    fn report_done(&self, work: &v1::Work, step: u64, error: String, stopped_early: bool) {
        let req = v1::ReportDoneRequest {
            member: Some(self.member(work)),
            step,
            error,
            stopped_early,
        };
        let r = call(&self.rt, &AbortSignal::default(), "report done", || {
            let mut c = self.client.clone();
            let r = req.clone();
            async move { c.report_done(r).await }
        });
        if let Err(e) = r {
            tracing::warn!(error = %e, "could not report the end of the run");
        }
    }

    fn report_fault(&self, work: &v1::Work, reason: String) {
        let req = v1::ReportFaultRequest {
            member: Some(self.member(work)),
            reason,
        };
        let mut c = self.client.clone();
        let _ = self.rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(10), c.report_fault(req)).await
        });
    }

    /// Trains in generation `work` until the run is complete (an error: the
    /// generation ended, broke, or the run cannot go on).
    fn run_generation(&mut self, work: &v1::Work, signal: &AbortSignal) -> Result<()> {
        let spec: RunSpec = serde_json::from_str(&work.spec_json).map_err(|e| Error::Input {
            context: "run spec from the coordinator".into(),
            reason: e.to_string(),
        })?;
        if self
            .trainer
            .as_ref()
            .is_none_or(|(id, _)| *id != work.run_id)
        {
            self.trainer = None;
            self.last = None;
            let batches = RemoteBatches {
                rt: self.rt.clone(),
                client: self.client.clone(),
                worker_id: self.worker_id.clone(),
                run_id: work.run_id.clone(),
                shared: self.shared.clone(),
                eval_cache: None,
                tagged_eval_cache: None,
            };
            let shape = RunShape {
                steps_per_epoch: work.steps_per_epoch,
                total_steps: work.total_steps,
                has_eval: work.has_eval,
                train_report: None,
                eval_report: None,
            };
            let opts = TrainOptions {
                resume: false,
                device: self.device,
            };
            tracing::info!(run = %work.run_id, name = %spec.name, "loading the run's model");
            let mut trainer = if spec.task.kind.is_classification() {
                let shape = ClusterShape {
                    steps_per_epoch: shape.steps_per_epoch,
                    total_steps: shape.total_steps,
                    has_eval: shape.has_eval,
                };
                Box::new(ClassifierTrainer::for_cluster(
                    spec,
                    self.device,
                    Box::new(batches),
                    shape,
                )?) as Box<dyn TrainingRun>
            } else {
                Box::new(Trainer::for_cluster(spec, &opts, Box::new(batches), shape)?)
                    as Box<dyn TrainingRun>
            };
            trainer.set_tear_at_step(self.tear_at_step.take());
            self.trainer = Some((work.run_id.clone(), trainer));
            self.restore_pending = true;
        }
        let collective = self.connect(work, signal)?;
        let Some((_, trainer)) = self.trainer.as_mut() else {
            return Err(Error::State("no trainer for the run"));
        };
        trainer.set_collective(collective, work.generation);
        if std::mem::take(&mut self.restore_pending) && !work.resume_checkpoint.is_empty() {
            // A new trainer restores the committed checkpoint in this world, so
            // that a sharded checkpoint gives each rank only its share under
            // this world's partition. One that could not restore is not kept
            // (the next generation makes it again).
            if let Err(e) =
                trainer.restore_checkpoint(std::path::Path::new(&work.resume_checkpoint))
            {
                self.trainer = None;
                return Err(e);
            }
            tracing::info!(step = trainer.step(), path = %work.resume_checkpoint, "restored the committed checkpoint");
        }
        let checkpoint = (!work.resume_checkpoint.is_empty()).then(|| {
            (
                std::path::Path::new(&work.resume_checkpoint),
                work.resume_step,
            )
        });
        let synced = trainer.sync_world(checkpoint)?;
        if let Some(root) = synced.root {
            tracing::info!(
                root,
                step = trainer.step(),
                "took the training state of rank {root}"
            );
        }
        let staged = trainer.reference_staged();
        // A step every rank tore in, completed from the shares: reported below
        // as if it had just been trained.
        // It is recorded in this generation (the coordinator fences reports
        // by generation), so its metrics name this world.
        let mut completed = synced.completed.map(|mut m| {
            for (k, v) in m.iter_mut() {
                match k.as_str() {
                    "generation" => *v = work.generation as f64,
                    "world_size" => *v = f64::from(work.world_size),
                    _ => {}
                }
            }
            m
        });
        if let Some(back) = synced.rollback {
            // The steps after the checkpoint are trained again; the coordinator
            // keeps their first reports, and records the rollback.
            self.last = None;
            let req = v1::ReportRollbackRequest {
                member: Some(self.member(work)),
                from_step: back.from_step,
                to_step: back.to_step,
                reason: back.reason,
            };
            let reported = call(&self.rt, signal, "report rollback", || {
                let mut c = self.client.clone();
                let r = req.clone();
                async move { c.report_rollback(r).await }
            });
            match reported {
                Ok(_) => {}
                Err(e) if e.disposition() == Disposition::NextGeneration => return Err(e),
                // Only the record of it was refused: training goes on.
                Err(e) => tracing::warn!(error = %e, "the coordinator did not record the rollback"),
            }
        }
        if staged {
            self.reference_stage(work, signal)?;
        }
        let Some((_, trainer)) = self.trainer.as_mut() else {
            return Err(Error::State("no trainer for the run"));
        };
        tracing::info!(
            generation = work.generation,
            rank = work.rank,
            world_size = work.world_size,
            step = trainer.step(),
            "training"
        );
        // The step the world stands at may be unfinished: the old world broke
        // before any rank's report of it arrived (it is re-reported, from the
        // metrics of a rank that trained it; the coordinator keeps the first
        // report), or before its evaluation or checkpoint: those are done now.
        let step = trainer.step();
        if completed.is_none() && step > 0 {
            if self.last.as_ref().is_none_or(|l| l.step != step)
                && let Some(m) = trainer.world().applied()
            {
                self.last = Some(StepRecord::of(step, run_loop::with_threads(m.clone())));
            }
            if let Some(last) = self.last.clone()
                && last.step == step
            {
                self.report(signal, work, &last, false)?;
            }
            // A checkpoint of this step committed in an earlier world stays.
            self.finish_step(work, signal, work.resume_step < step)?;
        }
        loop {
            let Some((_, trainer)) = self.trainer.as_mut() else {
                return Err(Error::State("no trainer for the run"));
            };
            if completed.is_none() && trainer.finished() {
                break;
            }
            let started = Instant::now();
            trainer.set_leaving(self.shared.leaving.load(Ordering::SeqCst));
            let m = match completed.take() {
                Some(m) => m,
                None => trainer.train_step()?,
            };
            let m = run_loop::with_threads(m);
            let trained = started.elapsed();
            let step = trainer.step();
            if self.halt_after_step == Some(step) {
                eprintln!("halted after step {step} (fault injection)");
                std::process::exit(86);
            }
            if step % 10 == 0 || step == 1 {
                let loss = m
                    .iter()
                    .find(|(k, _)| k == "loss")
                    .map_or(f64::NAN, |(_, v)| *v);
                tracing::info!(step, loss, "step");
            }
            let record = StepRecord {
                step,
                generation: work.generation,
                world_size: work.world_size,
                metrics: m,
            };
            // Reported before the step's evaluation and checkpoint, which
            // talk to the other ranks: a world that breaks in them has the
            // step on record, and the next one finishes it. Kept, so that
            // a report lost with the generation is made again.
            self.last = Some(record.clone());
            self.report(signal, work, &record, false)?;
            let reported = started.elapsed();
            self.finish_step(work, signal, true)?;
            // Where each step's wall time goes (RUST_LOG=dpo_worker=debug): the
            // step itself, the coordinator's answer, eval + checkpoint.
            tracing::debug!(
                step,
                train_ms = trained.as_secs_f64() * 1e3,
                report_ms = (reported - trained).as_secs_f64() * 1e3,
                eval_checkpoint_ms = (started.elapsed() - reported).as_secs_f64() * 1e3,
                "step timings"
            );
            // Asked to stop: this step is done and reported; leave before the
            // next one (unless this was the last: then finish the run). Under
            // ZeRO the world first takes this rank's share of the optimizer
            // state: the step after the signal told every rank, and they all
            // hand the shares over here, then wait for the world without it.
            let leaving = self.shared.leaving.load(Ordering::SeqCst);
            let Some((_, trainer)) = self.trainer.as_mut() else {
                return Err(Error::State("no trainer for the run"));
            };
            let more = !trainer.finished();
            if more && !trainer.leavers().is_empty() {
                let leavers = trainer.leavers().to_vec();
                let stays = trainer.hand_off()?;
                tracing::info!(step, ?leavers, "handed the leaving ranks' shares over");
                return Err(if stays {
                    Error::HandedOff { step }
                } else {
                    Error::Leaving { step }
                });
            }
            if more && leaving && !trainer.sharded() {
                return Err(Error::Leaving { step });
            }
        }
        let Some((_, trainer)) = self.trainer.as_ref() else {
            return Err(Error::State("no trainer for the run"));
        };
        if work.rank == 0 {
            let step = trainer.step();
            let stopped = trainer.stopped_early();
            trainer.save_final()?;
            self.report_done(work, step, String::new(), stopped);
        }
        Ok(())
    }

    /// What follows a reported step: its evaluation when due (reported to
    /// the coordinator) and, when `checkpoint` allows, its checkpoint
    /// (committed through the coordinator, then older ones pruned).
    fn finish_step(
        &mut self,
        work: &v1::Work,
        signal: &AbortSignal,
        checkpoint: bool,
    ) -> Result<()> {
        let Some((_, trainer)) = self.trainer.as_mut() else {
            return Err(Error::State("no trainer for the run"));
        };
        let step = trainer.step();
        if let Some(e) = trainer.maybe_evaluate()? {
            let record = StepRecord {
                step,
                generation: work.generation,
                world_size: work.world_size,
                metrics: e.metrics,
            };
            self.report(signal, work, &record, true)?;
        }
        if !checkpoint {
            return Ok(());
        }
        let Some((_, trainer)) = self.trainer.as_mut() else {
            return Err(Error::State("no trainer for the run"));
        };
        let Some(dir) = trainer.maybe_checkpoint()? else {
            return Ok(());
        };
        tracing::info!(step, dir = %dir.display(), "checkpoint written");
        let req = v1::ReportCheckpointRequest {
            member: Some(self.member(work)),
            step,
            path: dir.display().to_string(),
        };
        call(&self.rt, signal, "report checkpoint", || {
            let mut c = self.client.clone();
            let r = req.clone();
            async move { c.report_checkpoint(r).await }
        })?;
        // Committed: older checkpoints beyond the limit can go.
        if let Some((_, trainer)) = self.trainer.as_ref() {
            trainer.prune_checkpoints()?;
        }
        Ok(())
    }

    /// The reference stage of a generation: scores this rank's chunks of what the
    /// coordinator's cache lacks, reports each as it is done (so a broken
    /// generation loses at most one chunk per rank), then waits for every rank.
    /// With a warm cache there is nothing to score and no model is loaded.
    fn reference_stage(&mut self, work: &v1::Work, signal: &AbortSignal) -> Result<()> {
        let t = Instant::now();
        let mut scored = 0usize;
        let mut planned = 0u64;
        for chunk in 0u64.. {
            let req = v1::ReferenceWorkRequest {
                member: Some(self.member(work)),
                chunk,
            };
            let resp = call(&self.rt, signal, "reference work", || {
                let mut c = self.client.clone();
                let r = req.clone();
                async move { c.reference_work(r).await }
            })?;
            planned = resp.planned;
            if resp.done {
                break;
            }
            let examples: Vec<Example> = resp.examples.into_iter().map(from_proto).collect();
            let Some((_, trainer)) = self.trainer.as_mut() else {
                return Err(Error::State("no trainer for the run"));
            };
            let records = trainer.score_reference(&examples)?;
            scored += examples.len();
            let (keys, sums): (Vec<Vec<u8>>, Vec<f32>) =
                records.into_iter().map(|(k, v)| (k.to_vec(), v)).unzip();
            let report = v1::ReportReferenceRequest {
                member: Some(self.member(work)),
                keys,
                sums,
            };
            call(&self.rt, signal, "report reference", || {
                let mut c = self.client.clone();
                let r = report.clone();
                async move { c.report_reference(r).await }
            })?;
            self.reference_chunks_reported += 1;
            if self.halt_after_reference_chunks == Some(self.reference_chunks_reported) {
                eprintln!(
                    "halted after {} reference chunks (fault injection)",
                    self.reference_chunks_reported
                );
                std::process::exit(86);
            }
        }
        let Some((_, trainer)) = self.trainer.as_mut() else {
            return Err(Error::State("no trainer for the run"));
        };
        trainer.finish_reference_stage()?;
        tracing::info!(
            generation = work.generation,
            scored,
            stage_total = planned,
            seconds = t.elapsed().as_secs_f64(),
            "reference stage complete"
        );
        Ok(())
    }

    fn handle(&mut self, work: &v1::Work) {
        if self.shared.aborted_up_to.load(Ordering::SeqCst) >= work.generation {
            return; // superseded before it started
        }
        let signal = AbortSignal::default();
        if let Ok(mut c) = self.shared.current.lock() {
            *c = Current {
                generation: work.generation,
                rank: work.rank,
                signal: signal.clone(),
            };
        }
        if self.shared.aborted_up_to.load(Ordering::SeqCst) >= work.generation {
            return;
        }
        // This host's cores, shared among the generation's ranks on it.
        crate::threads::apply(self.threads, work.host_ranks.max(1) as usize);
        match self.run_generation(work, &signal) {
            Ok(()) => tracing::info!(run = %work.run_id, "run complete on this worker"),
            Err(Error::HandedOff { step }) => {
                tracing::info!(
                    generation = work.generation,
                    step,
                    "a leaving rank's share was handed over after step {step}; waiting for the next world"
                );
            }
            Err(Error::Leaving { step }) => {
                tracing::info!(
                    generation = work.generation,
                    step,
                    "leaving after step {step}"
                );
            }
            Err(e) if signal.is_aborted() => {
                tracing::info!(generation = work.generation, reason = %e, "generation ended");
            }
            Err(e) if e.disposition() != Disposition::FailRun => {
                tracing::warn!(generation = work.generation, reason = %e, "generation broke");
                self.report_fault(work, e.to_string());
            }
            Err(e) => {
                let step = self.trainer.as_ref().map_or(0, |(_, t)| t.step());
                tracing::error!(run = %work.run_id, error = %e, "the run cannot go on");
                self.report_done(work, step, e.to_string(), false);
                self.trainer = None;
            }
        }
    }
}
