//! The gRPC face of the coordinator: the run service (clients), the worker
//! service (workers), health and reflection, and a bearer-token check on every
//! call. The plain-HTTP port (`/metrics`, the run page) is [`crate::web`].

use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use dpo_proto::RunSpec;
use dpo_proto::v1::{
    self, run_service_server::RunService, run_service_server::RunServiceServer,
    worker_service_server::WorkerService, worker_service_server::WorkerServiceServer,
};
use tokio::io::AsyncWriteExt;
use tokio_stream::Stream;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Request, Response, Status, Streaming};
use tonic_health::server::HealthReporter;

use crate::Coordinator;
use crate::auth::{Gate, Role, Tokens, caller};
use tonic::service::interceptor::InterceptedService;

/// How often ended runs' files are checked against the retention.
const SWEEP_EVERY: Duration = Duration::from_secs(10);

/// Reflection answers any identity; health on this port stays open (probes).
const ANY_ROLE: &[Role] = &[Role::Client, Role::Worker, Role::Admin];

type EventStream = Pin<Box<dyn Stream<Item = Result<v1::RunEvent, Status>> + Send>>;
type AssignmentStream = Pin<Box<dyn Stream<Item = Result<v1::Assignment, Status>> + Send>>;

#[derive(Debug, Clone)]
pub struct Api {
    pub coordinator: Arc<Coordinator>,
}

#[tonic::async_trait]
impl RunService for Api {
    async fn submit(
        &self,
        request: Request<Streaming<v1::SubmitChunk>>,
    ) -> Result<Response<v1::Run>, Status> {
        let owner = caller(&request)?.name;
        let mut stream = request.into_inner();
        let first = stream
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("empty submission"))?;
        let Some(v1::submit_chunk::Part::Header(header)) = first.part else {
            return Err(Status::invalid_argument(
                "a submission starts with its header",
            ));
        };
        let mut spec: RunSpec = serde_json::from_str(&header.spec_json)
            .map_err(|e| Status::invalid_argument(format!("run spec: {e}")))?;
        let id = uuid::Uuid::new_v4().to_string();
        // The run's own directory (uploads under files/, later its shards):
        // removed whole when the submission is refused.
        let run_root = self.coordinator.settings().run_dir(&id);
        let run_dir = run_root.join("files");
        let allowed = ["data.train", "data.eval", "data.negatives"];
        for key in &header.streamed_files {
            if !allowed.contains(&key.as_str()) {
                return Err(Status::invalid_argument(format!(
                    "streamed file for {key:?}: only {allowed:?} can be streamed"
                )));
            }
        }
        // Each file goes to disk as its chunks arrive: memory stays flat
        // whatever the upload's size; the whole submission is bounded.
        let limit = self.coordinator.settings().max_upload_bytes;
        let received = match receive_files(
            &mut stream,
            &header.streamed_files,
            &header.files,
            &run_dir,
            limit,
        )
        .await
        {
            Ok(r) => r,
            Err(status) => {
                let _ = tokio::fs::remove_dir_all(&run_root).await;
                return Err(status);
            }
        };
        // Errors about a streamed file name the client's own path, not our copy.
        let mut renames: Vec<(String, String)> = Vec::new();
        for (key, path) in received {
            let original = match key.as_str() {
                "data.train" => spec.data.train.display().to_string(),
                "data.eval" => spec
                    .data
                    .eval
                    .as_ref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default(),
                _ => spec
                    .data
                    .negatives
                    .as_ref()
                    .and_then(|n| n.file())
                    .map(|p| p.display().to_string())
                    .unwrap_or_default(),
            };
            // A glob's files arrive under their own names (several: in a
            // folder): they are the client's files in the glob's folder.
            let original = match std::path::Path::new(&original).parent() {
                Some(base) if original.contains(['*', '?', '[']) => match path.file_name() {
                    Some(name) if !path.is_dir() => base.join(name).display().to_string(),
                    _ => base.display().to_string(),
                },
                _ => original,
            };
            renames.push((path.display().to_string(), original));
            match key.as_str() {
                "data.train" => spec.data.train = path,
                "data.eval" => spec.data.eval = Some(path),
                _ => spec.data.negatives = Some(dpo_proto::Negatives::File(path)),
            }
        }
        match self
            .coordinator
            .submit(id.clone(), spec, &header.streamed_files, &owner)
            .await
        {
            Ok(run) => Ok(Response::new(run)),
            Err(e) => {
                // Nothing of a refused submission is kept (its uploads, shards),
                // unless it became a run (one the store then refused is failed).
                if self.coordinator.get(&id, None).await.is_err() {
                    let _ = tokio::fs::remove_dir_all(&run_root).await;
                }
                let status = Status::from(e);
                let mut message = status.message().to_string();
                for (ours, theirs) in &renames {
                    message = message.replace(ours.as_str(), theirs);
                }
                Err(Status::new(status.code(), message))
            }
        }
    }

    async fn get_run(
        &self,
        request: Request<v1::GetRunRequest>,
    ) -> Result<Response<v1::Run>, Status> {
        let who = caller(&request)?;
        let run = &request.get_ref().run;
        Ok(Response::new(
            self.coordinator.get(run, who.owner_filter()).await?,
        ))
    }

    async fn list_runs(
        &self,
        request: Request<v1::ListRunsRequest>,
    ) -> Result<Response<v1::ListRunsResponse>, Status> {
        let who = caller(&request)?;
        Ok(Response::new(v1::ListRunsResponse {
            runs: self.coordinator.list(who.owner_filter()).await,
        }))
    }

    async fn cancel_run(
        &self,
        request: Request<v1::CancelRunRequest>,
    ) -> Result<Response<v1::Run>, Status> {
        let who = caller(&request)?;
        let run = &request.get_ref().run;
        Ok(Response::new(
            self.coordinator.cancel(run, who.owner_filter()).await?,
        ))
    }

    type WatchRunStream = EventStream;

    async fn watch_run(
        &self,
        request: Request<v1::WatchRunRequest>,
    ) -> Result<Response<Self::WatchRunStream>, Status> {
        let who = caller(&request)?;
        let (run, mut rx) = self
            .coordinator
            .watch(&request.get_ref().run, who.owner_filter())
            .await?;
        let (tx, out) = tokio::sync::mpsc::channel(256);
        tokio::spawn(async move {
            let state = run.state;
            let done = run.ended();
            let first = v1::RunEvent {
                run: Some(run),
                event: Some(v1::run_event::Event::State(state)),
            };
            if tx.send(Ok(first)).await.is_err() || done {
                return;
            }
            loop {
                match rx.recv().await {
                    Ok(ev) => {
                        let end = ev.run.as_ref().is_some_and(v1::Run::ended);
                        if tx.send(Ok(ev)).await.is_err() || end {
                            return;
                        }
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        tracing::warn!(skipped = n, "a watcher fell behind");
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(out))))
    }

    async fn list_workers(
        &self,
        request: Request<v1::ListWorkersRequest>,
    ) -> Result<Response<v1::ListWorkersResponse>, Status> {
        let who = caller(&request)?;
        let mut workers = self.coordinator.workers().await;
        // A client sees the cluster's workers, but which run each trains only
        // when the run is its own.
        if let Some(owner) = who.owner_filter() {
            let mine: std::collections::HashSet<String> = self
                .coordinator
                .list(Some(owner))
                .await
                .into_iter()
                .map(|r| r.id)
                .collect();
            for w in workers.iter_mut().filter(|w| !mine.contains(&w.run_id)) {
                w.run_id.clear();
                w.generation = 0;
                w.rank = -1;
            }
        }
        Ok(Response::new(v1::ListWorkersResponse { workers }))
    }
}

#[tonic::async_trait]
impl WorkerService for Api {
    async fn register(
        &self,
        request: Request<v1::RegisterRequest>,
    ) -> Result<Response<v1::RegisterResponse>, Status> {
        Ok(Response::new(
            self.coordinator.register(request.into_inner()).await?,
        ))
    }

    async fn heartbeat(
        &self,
        request: Request<v1::HeartbeatRequest>,
    ) -> Result<Response<v1::HeartbeatResponse>, Status> {
        let known = self.coordinator.heartbeat(request.get_ref()).await;
        Ok(Response::new(v1::HeartbeatResponse { known }))
    }

    type AssignmentsStream = AssignmentStream;

    async fn assignments(
        &self,
        request: Request<v1::AssignmentsRequest>,
    ) -> Result<Response<Self::AssignmentsStream>, Status> {
        let req = request.into_inner();
        let worker = req.worker_id;
        let (rx, tx, stream_id) = self.coordinator.open_stream(&worker, &req.session).await?;
        let coordinator = self.coordinator.clone();
        // The stream's receiver is dropped when the worker goes away (its process
        // died, its connection broke): the worker is lost at that moment.
        tokio::spawn(async move {
            tx.closed().await;
            coordinator.stream_closed(&worker, stream_id).await;
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn publish_bootstrap(
        &self,
        request: Request<v1::Bootstrap>,
    ) -> Result<Response<v1::Ack>, Status> {
        self.coordinator
            .publish_bootstrap(request.into_inner())
            .await?;
        Ok(Response::new(v1::Ack {}))
    }

    async fn get_bootstrap(
        &self,
        request: Request<v1::GetBootstrapRequest>,
    ) -> Result<Response<v1::Bootstrap>, Status> {
        let req = request.into_inner();
        // Long-poll for up to 30 s: rank 0 publishes soon after the generation forms.
        for _ in 0..300 {
            if let Some(data) = self
                .coordinator
                .get_bootstrap(&req.run_id, req.generation)
                .await
            {
                return Ok(Response::new(v1::Bootstrap {
                    run_id: req.run_id,
                    generation: req.generation,
                    data,
                }));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Err(Status::deadline_exceeded(
            "rank 0 has not published the bootstrap data",
        ))
    }

    async fn fetch_batch(
        &self,
        request: Request<v1::FetchBatchRequest>,
    ) -> Result<Response<v1::Batch>, Status> {
        Ok(Response::new(
            self.coordinator.fetch_batch(request.get_ref()).await?,
        ))
    }

    async fn reference_work(
        &self,
        request: Request<v1::ReferenceWorkRequest>,
    ) -> Result<Response<v1::ReferenceWorkResponse>, Status> {
        Ok(Response::new(
            self.coordinator.reference_work(request.get_ref()).await?,
        ))
    }

    async fn report_reference(
        &self,
        request: Request<v1::ReportReferenceRequest>,
    ) -> Result<Response<v1::Ack>, Status> {
        self.coordinator.report_reference(request.get_ref()).await?;
        Ok(Response::new(v1::Ack {}))
    }

    async fn report_step(
        &self,
        request: Request<v1::ReportStepRequest>,
    ) -> Result<Response<v1::Ack>, Status> {
        self.coordinator.report_step(request.get_ref()).await?;
        Ok(Response::new(v1::Ack {}))
    }

    async fn report_fault(
        &self,
        request: Request<v1::ReportFaultRequest>,
    ) -> Result<Response<v1::Ack>, Status> {
        self.coordinator.report_fault(request.get_ref()).await?;
        Ok(Response::new(v1::Ack {}))
    }

    async fn report_checkpoint(
        &self,
        request: Request<v1::ReportCheckpointRequest>,
    ) -> Result<Response<v1::Ack>, Status> {
        self.coordinator
            .report_checkpoint(request.get_ref())
            .await?;
        Ok(Response::new(v1::Ack {}))
    }

    async fn report_rollback(
        &self,
        request: Request<v1::ReportRollbackRequest>,
    ) -> Result<Response<v1::Ack>, Status> {
        self.coordinator.report_rollback(request.get_ref()).await?;
        Ok(Response::new(v1::Ack {}))
    }

    async fn report_done(
        &self,
        request: Request<v1::ReportDoneRequest>,
    ) -> Result<Response<v1::Ack>, Status> {
        self.coordinator.report_done(request.get_ref()).await?;
        Ok(Response::new(v1::Ack {}))
    }
}

/// Writes each announced key's files under `dir` as their chunks arrive and
/// returns, per key, what its spec path becomes: the one file, or the folder of
/// its files. Names are plain file names; a key sent without names is one file,
/// `<key>.jsonl`.
async fn receive_files(
    stream: &mut Streaming<v1::SubmitChunk>,
    announced: &[String],
    named: &[v1::StreamedFile],
    dir: &std::path::Path,
    limit: u64,
) -> Result<Vec<(String, PathBuf)>, Status> {
    use sha2::Digest;
    let internal = |path: &std::path::Path, e: std::io::Error| {
        Status::internal(format!("{}: {e}", path.display()))
    };
    type Open = (PathBuf, tokio::fs::File, sha2::Sha256, u64);
    let mut files: std::collections::BTreeMap<(String, String), Open> = Default::default();
    let mut targets: Vec<(String, PathBuf)> = Vec::new();
    if !announced.is_empty() {
        tokio::fs::create_dir_all(dir)
            .await
            .map_err(|e| internal(dir, e))?;
    }
    for f in named {
        if !announced.contains(&f.key) {
            return Err(Status::invalid_argument(format!(
                "file {:?} for {:?}, which the header does not stream",
                f.name, f.key
            )));
        }
        let plain =
            std::path::Path::new(&f.name).file_name() == Some(std::ffi::OsStr::new(&f.name));
        if !plain || f.name.starts_with('.') || f.name.contains('\\') {
            return Err(Status::invalid_argument(format!(
                "streamed file name {:?}: a plain file name is needed",
                f.name
            )));
        }
    }
    for key in announced {
        let key_dir = dir.join(key.replace('.', "_"));
        let names: Vec<&str> = named
            .iter()
            .filter(|f| &f.key == key)
            .map(|f| f.name.as_str())
            .collect();
        let (paths, target): (Vec<(String, PathBuf)>, PathBuf) = match names.as_slice() {
            [] => {
                let p = dir.join(format!("{}.jsonl", key.replace('.', "_")));
                (vec![(String::new(), p.clone())], p)
            }
            [one] => {
                let p = key_dir.join(one);
                (vec![(one.to_string(), p.clone())], p)
            }
            many => (
                many.iter()
                    .map(|n| (n.to_string(), key_dir.join(n)))
                    .collect(),
                key_dir.clone(),
            ),
        };
        if !names.is_empty() {
            tokio::fs::create_dir_all(&key_dir)
                .await
                .map_err(|e| internal(&key_dir, e))?;
        }
        for (name, path) in paths {
            if files.contains_key(&(key.clone(), name.clone())) {
                return Err(Status::invalid_argument(format!(
                    "{key}: file {name:?} named twice"
                )));
            }
            let f = tokio::fs::File::create(&path)
                .await
                .map_err(|e| internal(&path, e))?;
            files.insert((key.clone(), name), (path, f, sha2::Sha256::new(), 0));
        }
        targets.push((key.clone(), target));
    }
    let mut total = 0u64;
    while let Some(chunk) = stream.message().await? {
        let Some(v1::submit_chunk::Part::File(f)) = chunk.part else {
            return Err(Status::invalid_argument("a second header"));
        };
        let Some((path, file, hash, size)) = files.get_mut(&(f.key.clone(), f.name.clone())) else {
            return Err(Status::invalid_argument(format!(
                "file chunk for {:?} {:?}, which the header did not announce",
                f.key, f.name
            )));
        };
        total += f.data.len() as u64;
        if total > limit {
            return Err(Status::resource_exhausted(format!(
                "the streamed files exceed the coordinator's limit of {limit} bytes \
                 (--max-upload-bytes); put them where the coordinator can read them"
            )));
        }
        hash.update(&f.data);
        *size += f.data.len() as u64;
        file.write_all(&f.data)
            .await
            .map_err(|e| internal(path, e))?;
    }
    for ((key, name), (path, file, hash, size)) in files {
        file.sync_all().await.map_err(|e| internal(&path, e))?;
        let digest: String = hash.finalize().iter().map(|b| format!("{b:02x}")).collect();
        tracing::info!(key, file = name, bytes = size, sha256 = %digest, "upload received");
    }
    Ok(targets)
}

/// Serves the coordinator's gRPC services on `listener` until `shutdown` resolves;
/// a background task expires leases every `lease_ttl / 4`.
pub async fn serve(
    coordinator: Arc<Coordinator>,
    listener: tokio::net::TcpListener,
    tokens: Arc<Tokens>,
    tls: Option<tonic::transport::ServerTlsConfig>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let api = Api {
        coordinator: coordinator.clone(),
    };
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter.set_serving::<RunServiceServer<Api>>().await;
    reporter.set_serving::<WorkerServiceServer<Api>>().await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(v1::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let ticker = {
        let c = coordinator.clone();
        let period = (c.settings().lease_ttl / 4).max(Duration::from_millis(50));
        tokio::spawn(async move {
            let mut swept = std::time::Instant::now();
            loop {
                tokio::time::sleep(period).await;
                if let Err(e) = c.reconcile().await {
                    tracing::error!(error = %e, "reconcile");
                }
                if swept.elapsed() >= SWEEP_EVERY {
                    c.sweep_run_files(false).await;
                    swept = std::time::Instant::now();
                }
            }
        })
    };
    let mut server = tonic::transport::Server::builder();
    if let Some(tls) = tls {
        server = server.tls_config(tls)?;
    }
    let result = server
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        .add_service(health)
        .add_service(InterceptedService::new(
            reflection,
            Gate::new(tokens.clone(), ANY_ROLE, "reflection service"),
        ))
        .add_service(InterceptedService::new(
            RunServiceServer::new(api.clone()).max_decoding_message_size(64 << 20),
            Gate::new(tokens.clone(), &[Role::Client, Role::Admin], "run service"),
        ))
        .add_service(InterceptedService::new(
            WorkerServiceServer::new(api)
                .max_decoding_message_size(64 << 20)
                .max_encoding_message_size(256 << 20),
            Gate::new(tokens, &[Role::Worker, Role::Admin], "worker service"),
        ))
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
        .await;
    ticker.abort();
    Ok(result?)
}

/// Serves only `grpc.health.v1` on `listener`, in plain text and without a
/// token, for probes that speak neither TLS nor bearer tokens (the kubelet's
/// gRPC probe). The server as a whole (service "") answers SERVING from the
/// start (liveness: the process is up, perhaps waiting as a standby); the
/// coordinator's services answer NOT_SERVING until [`set_ready`] (readiness: the
/// store is open and, with etcd, this coordinator is the leader).
pub async fn spawn_health(listener: tokio::net::TcpListener) -> HealthReporter {
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter.set_not_serving::<RunServiceServer<Api>>().await;
    reporter.set_not_serving::<WorkerServiceServer<Api>>().await;
    tokio::spawn(async move {
        if let Err(e) = tonic::transport::Server::builder()
            .add_service(health)
            .serve_with_incoming(TcpListenerStream::new(listener))
            .await
        {
            tracing::error!(error = %e, "health endpoint");
        }
    });
    reporter
}

/// Marks the coordinator's services SERVING on a [`spawn_health`] endpoint.
pub async fn set_ready(reporter: &HealthReporter) {
    reporter.set_serving::<RunServiceServer<Api>>().await;
    reporter.set_serving::<WorkerServiceServer<Api>>().await;
}

/// The Prometheus text of `/metrics` (served by [`crate::web`]): run names
/// only with `run_labels` (the endpoint needs no token).
pub(crate) async fn prometheus_text(c: &Coordinator, run_labels: bool) -> String {
    let (counters, runs, workers, generation) = c.counters().await;
    let mut s = String::new();
    let mut metric = |name: &str, help: &str, kind: &str, lines: Vec<(String, f64)>| {
        s.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n"));
        for (labels, v) in lines {
            s.push_str(&format!("{name}{labels} {v}\n"));
        }
    };
    metric(
        "dpo_workers",
        "Registered workers.",
        "gauge",
        vec![(String::new(), workers as f64)],
    );
    metric(
        "dpo_generation",
        "The current generation number.",
        "gauge",
        vec![(String::new(), generation as f64)],
    );
    metric(
        "dpo_batches_served_total",
        "Batches served to workers.",
        "counter",
        vec![(String::new(), counters.batches_served as f64)],
    );
    metric(
        "dpo_examples_served_total",
        "Examples served to workers.",
        "counter",
        vec![(String::new(), counters.examples_served as f64)],
    );
    metric(
        "dpo_batch_serve_seconds_total",
        "Time spent serving batches.",
        "counter",
        vec![(String::new(), counters.batch_serve_seconds)],
    );
    metric(
        "dpo_steps_recorded_total",
        "Optimizer steps recorded.",
        "counter",
        vec![(String::new(), counters.steps_recorded as f64)],
    );
    metric(
        "dpo_generations_formed_total",
        "Generations formed.",
        "counter",
        vec![(String::new(), counters.generations_formed as f64)],
    );
    metric(
        "dpo_workers_lost_total",
        "Workers lost (disconnected or lease lapsed).",
        "counter",
        vec![(String::new(), counters.workers_lost as f64)],
    );
    if run_labels {
        metric(
            "dpo_run_step",
            "Steps completed by each run.",
            "gauge",
            runs.iter()
                .map(|(name, state, step)| {
                    let state = state.to_proto().as_str_name();
                    (
                        format!("{{run=\"{name}\",state=\"{state}\"}}"),
                        *step as f64,
                    )
                })
                .collect(),
        );
    } else {
        let mut by_state: std::collections::BTreeMap<&str, u64> = Default::default();
        for (_, state, _) in &runs {
            *by_state.entry(state.to_proto().as_str_name()).or_default() += 1;
        }
        metric(
            "dpo_runs",
            "Runs by state (names with --metrics-run-labels).",
            "gauge",
            by_state
                .into_iter()
                .map(|(state, n)| (format!("{{state=\"{state}\"}}"), n as f64))
                .collect(),
        );
    }
    s
}
