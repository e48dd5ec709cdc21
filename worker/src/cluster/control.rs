//! Joining a cluster: the gRPC side of a worker — registration, the lease's
//! heartbeats, the assignment stream and the signals — which hands work to
//! the training thread (`Worker`, in `mod.rs`).

use super::*;

/// Joins the coordinator and works until the process is stopped.
pub fn join(opts: JoinOptions) -> Result<()> {
    let os = |what: String| move |source| Error::Os { what, source };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(os("starting the gRPC runtime".into()))?;
    let listener =
        TcpListener::bind(opts.listen).map_err(os(format!("--listen {}", opts.listen)))?;
    let mut addr = listener
        .local_addr()
        .map_err(os(format!("--listen {}", opts.listen)))?;
    if let Some(ip) = opts.advertise {
        addr.set_ip(ip);
    }
    if addr.ip().is_unspecified() {
        return Err(Error::Input {
            context: format!("--listen {}", opts.listen),
            reason: "give --advertise (the address peers reach this worker at)".into(),
        });
    }
    // The channel spawns its connection task on the runtime.
    let _guard = rt.enter();
    let channel = channel(&opts.coordinator, &opts.tls).map_err(|e| Error::Input {
        context: "--coordinator".into(),
        reason: e.to_string(),
    })?;
    let client: Client = WorkerServiceClient::with_interceptor(channel, opts.token.clone())
        .max_decoding_message_size(256 << 20);
    let shared = Arc::new(Shared::default());
    let (tx, rx) = mpsc::channel::<Command>();
    tracing::info!(worker = %opts.worker_id, collective = %addr, coordinator = %opts.coordinator, "worker starting");
    rt.spawn(leave_on_signal(
        shared.clone(),
        tx.clone(),
        opts.leave_timeout,
    ));
    let nccl = match crate::collective::nccl::unavailable(opts.device) {
        None => true,
        Some(why) => {
            tracing::debug!(%why, "this worker cannot run the nccl backend");
            false
        }
    };
    rt.spawn(control_loop(
        client.clone(),
        Registration {
            worker_id: opts.worker_id.clone(),
            addr,
            device: format!("{:?}", opts.device),
            nccl,
            local_rank: opts.local_rank,
        },
        shared.clone(),
        tx,
    ));
    let mut worker = Worker {
        rt: rt.handle().clone(),
        client,
        worker_id: opts.worker_id,
        device: opts.device,
        listener,
        shared,
        trainer: None,
        restore_pending: false,
        last: None,
        halt_after_reference_chunks: opts.halt_after_reference_chunks,
        tear_at_step: opts.tear_at_step,
        halt_after_step: opts.halt_after_step,
        reference_chunks_reported: 0,
        threads: opts.threads,
    };
    while let Ok(mut cmd) = rx.recv() {
        // Only the newest instruction matters.
        while let Ok(newer) = rx.try_recv() {
            cmd = newer;
        }
        if worker.shared.leaving.load(Ordering::SeqCst) {
            break;
        }
        match cmd {
            Command::Work(work) => worker.handle(&work),
            Command::Idle(run) => {
                if worker.trainer.as_ref().is_some_and(|(id, _)| *id == run) {
                    tracing::info!(run = %run, "released from the run");
                    worker.trainer = None;
                    worker.last = None;
                }
            }
            Command::Leave => break,
        }
        if worker.shared.leaving.load(Ordering::SeqCst) {
            break;
        }
    }
    // Leaving closes the assignment stream with the process: the coordinator
    // drops this worker at once and re-forms the world without it.
    tracing::info!(worker = %worker.worker_id, "left the cluster");
    Ok(())
}

/// Waits for SIGTERM (what Kubernetes sends) or SIGINT, then asks the worker
/// to leave after the step in hand; a second signal, or `timeout` without
/// having left, stops the process at once (exit 143, as a SIGTERM would).
async fn leave_on_signal(
    shared: Arc<Shared>,
    tx: mpsc::Sender<Command>,
    timeout: std::time::Duration,
) {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch SIGTERM; it will stop the worker at once");
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    tracing::info!(
        timeout_s = timeout.as_secs(),
        "asked to stop: leaving after the current step (a second signal stops at once)"
    );
    shared.leaving.store(true, Ordering::SeqCst);
    let _ = tx.send(Command::Leave);
    tokio::select! {
        _ = term.recv() => tracing::warn!("asked to stop again: stopping now"),
        _ = tokio::signal::ctrl_c() => tracing::warn!("asked to stop again: stopping now"),
        _ = tokio::time::sleep(timeout) => tracing::warn!(
            timeout_s = timeout.as_secs(),
            "could not leave in time (is the coordinator unreachable?): stopping now"
        ),
    }
    std::process::exit(143);
}

/// Registers, keeps the lease, and forwards assignments; reconnects whenever the
/// coordinator goes away (a restarted coordinator picks the worker up again).
/// What a worker tells the coordinator about itself.
#[derive(Debug, Clone)]
struct Registration {
    worker_id: String,
    addr: SocketAddr,
    device: String,
    nccl: bool,
    local_rank: u32,
}

async fn control_loop(
    client: Client,
    me: Registration,
    shared: Arc<Shared>,
    tx: mpsc::Sender<Command>,
) {
    let Registration {
        worker_id,
        addr,
        device,
        nccl,
        local_rank,
    } = me;
    // The host this worker shares with others (the coordinator tells each
    // rank how many of its generation run here, to divide the cores).
    let hostname = std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(crate::threads::hostname)
        .unwrap_or_default();
    // The secret the coordinator gave this process: it proves later requests
    // are ours (nobody else can re-register our id while our lease is live).
    let mut session: Vec<u8> = Vec::new();
    loop {
        let mut c = client.clone();
        let reg = c
            .register(v1::RegisterRequest {
                worker_id: worker_id.clone(),
                collective_addr: addr.to_string(),
                device: device.clone(),
                hostname: hostname.clone(),
                run_id: String::new(),
                step: 0,
                session: session.clone(),
                nccl,
                local_rank,
            })
            .await;
        let lease = match reg {
            Ok(r) => r.into_inner(),
            Err(e) => {
                tracing::debug!(error = %e, "register failed; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        session = lease.session.clone();
        let stream = match c
            .assignments(v1::AssignmentsRequest {
                worker_id: worker_id.clone(),
                session: session.clone(),
            })
            .await
        {
            Ok(s) => s.into_inner(),
            Err(e) => {
                tracing::warn!(error = %e, "assignment stream refused; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        tracing::info!(
            lease_ttl_ms = lease.lease_ttl_ms,
            "registered with the coordinator"
        );
        let beat = Duration::from_millis(lease.heartbeat_ms.max(50));
        let hb = {
            let mut c = client.clone();
            let id = worker_id.clone();
            let shared = shared.clone();
            let session = session.clone();
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(beat).await;
                    let generation = shared.current.lock().map_or(0, |c| c.generation);
                    match c
                        .heartbeat(v1::HeartbeatRequest {
                            worker_id: id.clone(),
                            generation,
                            session: session.clone(),
                        })
                        .await
                    {
                        Ok(r) if r.get_ref().known => {}
                        Ok(_) => return, // forgotten: register again
                        Err(_) => return,
                    }
                }
            })
        };
        let mut stream = stream;
        let mut hb = hb;
        loop {
            tokio::select! {
                msg = stream.message() => {
                    match msg {
                        Ok(Some(a)) => {
                            if !forward(a, &shared, &tx) {
                                hb.abort();
                                return;
                            }
                        }
                        Ok(None) | Err(_) => break,
                    }
                }
                _ = &mut hb => break,
            }
        }
        hb.abort();
        tracing::warn!("lost the coordinator; reconnecting");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Acts on one assignment: aborts what it supersedes, hands work to the trainer.
/// Returns false once the training thread is gone.
fn forward(a: v1::Assignment, shared: &Shared, tx: &mpsc::Sender<Command>) -> bool {
    match a.kind {
        Some(v1::assignment::Kind::Work(w)) => {
            tracing::info!(
                generation = w.generation,
                rank = w.rank,
                world_size = w.world_size,
                "assignment"
            );
            shared.abort_through(w.generation.saturating_sub(1));
            tx.send(Command::Work(Box::new(w))).is_ok()
        }
        Some(v1::assignment::Kind::Abort(a)) => {
            tracing::info!(generation = a.generation, reason = %a.reason, "generation aborted by the coordinator");
            shared.abort_through(a.generation);
            true
        }
        Some(v1::assignment::Kind::Idle(i)) => {
            let g = shared.current.lock().map_or(0, |c| c.generation);
            shared.abort_through(g);
            tx.send(Command::Idle(i.run_id)).is_ok()
        }
        None => true,
    }
}

/// A fresh worker id.
pub fn new_worker_id() -> String {
    uuid::Uuid::new_v4().to_string()
}
