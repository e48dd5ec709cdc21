//! The cluster end to end: a real coordinator, real worker processes on loopback,
//! `dpoctl` as the client. Each test compares the cluster's final weights with
//! one `dpo-worker train` process on the same spec — the defining property is
//! that world size, and workers coming and going, do not change the result.

use std::path::Path;
use std::time::Duration;

use dpo_e2e::*;

/// Checks that metrics.jsonl has steps 1..=n, each exactly once; returns its lines.
fn every_step_once(out: &Path, n: u64) -> Vec<serde_json::Value> {
    let lines = jsonl(&out.join("metrics.jsonl"));
    let steps: Vec<u64> = lines
        .iter()
        .map(|l| l["step"].as_u64().expect("step"))
        .collect();
    assert_eq!(steps, (1..=n).collect::<Vec<_>>(), "steps in metrics.jsonl");
    for l in &lines {
        assert!(l["generation"].as_u64().is_some() && l["world_size"].as_u64().is_some());
    }
    // The data ledger: every step once, in the world its metrics line names.
    let ledger = jsonl(&out.join("ledger.jsonl"));
    let ledger_steps: Vec<u64> = ledger.iter().filter_map(|l| l["step"].as_u64()).collect();
    assert_eq!(
        ledger_steps,
        (1..=n).collect::<Vec<_>>(),
        "steps in ledger.jsonl"
    );
    for (m, l) in lines.iter().zip(&ledger) {
        assert_eq!(m["generation"], l["generation"], "{l}");
        assert_eq!(m["world_size"], l["world_size"], "{l}");
    }
    lines
}

#[test]
fn two_workers_train_the_weights_of_one_process() {
    let case = Case::new(48);
    let (spec, out_dir) = case.reference_and_spec(
        "pair",
        "max_steps = 8\nmicro_batch_size = 2",
        "min_workers = 2\nmax_workers = 2",
    );
    let port = free_port().expect("port");
    let data = case.path().join("coord");
    let _c = coordinator(port, &data, &case.logs, "coordinator", &[], None).expect("coordinator");
    let _w0 = worker(port, "w0", &case.logs).expect("w0");
    let _w1 = worker(port, "w1", &case.logs).expect("w1");
    case.submit_watch_succeeds(port, &spec);
    let lines = every_step_once(&out_dir, 8);
    assert!(lines.iter().all(|l| l["world_size"] == 2), "{lines:?}");
    let moved = max_diff(&case.path().join("model"), &case.path().join("solo/final")).expect("w");
    assert!(moved > 1e-3, "training moved the weights by {moved}");
    case.assert_same_weights(&out_dir, "2 workers");
    // The simulator's fault-free run of the same shape (2 workers, 8 steps of
    // 12 of the 48 pairs) records the same ledger, step for step: each step's
    // epoch, first example, generation and world.
    let mut config = dpo_coordinator::sim::Config::small(0);
    (config.workers, config.min_workers, config.max_workers) = (2, 2, 2);
    (config.steps, config.batch, config.examples) = (8, 12, 48);
    config.fault_every = Duration::ZERO;
    config.store_fail_one_in = 0;
    config.store_full_at = None;
    let simulated = dpo_coordinator::sim::Sim::new(config)
        .run()
        .unwrap_or_else(|f| panic!("{f}"));
    let simulated: Vec<serde_json::Value> = simulated
        .ledger
        .iter()
        .map(|e| serde_json::to_value(e).expect("an entry"))
        .collect();
    assert_eq!(jsonl(&out_dir.join("ledger.jsonl")), simulated);
}

/// `text` (a spec from [`spec`]) with AdamW instead of SGD, so there are
/// moments to shard; ε = 1e-3 so that steps trained again in another world
/// (another summation order) stay within 1e-5.
fn adamw(text: String) -> String {
    text.replace(
        "name = \"sgd\"\nlr = 0.5",
        "name = \"adamw\"\nlr = 0.01\neps = 1e-3\nmax_grad_norm = 1.0",
    )
}

/// Trains the one-process AdamW reference on `solo_extra` (into `solo/`) and
/// writes the cluster's AdamW spec `name.toml` with `cluster_extra`: the
/// spec's path.
fn adamw_reference_and_spec(
    case: &Case,
    name: &str,
    solo_extra: &str,
    cluster_extra: &str,
) -> std::path::PathBuf {
    let solo = case.path().join("solo.toml");
    std::fs::write(&solo, adamw(spec(case.path(), "solo", solo_extra))).expect("spec");
    train_standalone(&solo, &case.logs).expect("standalone");
    let spec_path = case.path().join(format!("{name}.toml"));
    let text = adamw(spec(case.path(), name, cluster_extra));
    assert!(text.contains("adamw"), "{text}");
    std::fs::write(&spec_path, text).expect("spec");
    spec_path
}

/// Waits (up to 30 s) until `n` workers are registered, as `dpoctl workers` lists them.
fn wait_for_workers(port: u16, n: usize) {
    wait_for(Duration::from_secs(30), || {
        let o = dpoctl(port, &["workers"])?;
        Ok(String::from_utf8_lossy(&o.stdout).lines().count() == n)
    })
    .unwrap_or_else(|e| panic!("{n} workers: {e}"));
}

#[test]
fn a_killed_worker_and_a_late_joiner_lose_nothing() {
    let case = Case::new(96);
    let steps = 60;
    let extra = format!(
        "max_steps = {steps}\nmicro_batch_size = 1\ncheckpoint_every = 20\nreport_to = \"tensorboard\""
    );
    let (spec, out_dir) =
        case.reference_and_spec("elastic", &extra, "min_workers = 2\nmax_workers = 3");
    let port = free_port().expect("port");
    let data = case.path().join("coord");
    let _c = coordinator(port, &data, &case.logs, "coordinator", &[], None).expect("coordinator");
    let mut w0 = worker(port, "w0", &case.logs).expect("w0");
    let _w1 = worker(port, "w1", &case.logs).expect("w1");
    let _w2 = worker(port, "w2", &case.logs).expect("w2");
    // Submit once all three are registered, so the first generation has three.
    wait_for_workers(port, 3);
    case.submit_and_wait(port, &spec, &out_dir, 10);
    w0.kill(); // kill -9 of rank 0, mid-run
    let killed_at = steps_done(&out_dir);
    wait_for(Duration::from_secs(60), || {
        Ok(steps_done(&out_dir) >= killed_at + 8)
    })
    .unwrap_or_else(|e| panic!("no progress after the kill: {e}{}", case.logs()));
    let _w3 = worker(port, "w3", &case.logs).expect("w3");
    case.watch_succeeds(port, "elastic");
    let lines = every_step_once(&out_dir, steps);
    let worlds: Vec<u64> = lines
        .iter()
        .map(|l| l["world_size"].as_u64().unwrap_or(0))
        .collect();
    let gens: Vec<u64> = lines
        .iter()
        .map(|l| l["generation"].as_u64().unwrap_or(0))
        .collect();
    assert_eq!(worlds[0], 3, "{worlds:?}");
    assert!(
        worlds.contains(&2),
        "a world of two after the kill: {worlds:?}"
    );
    assert!(
        worlds
            .iter()
            .skip_while(|&&w| w == 3)
            .skip_while(|&&w| w == 2)
            .any(|&w| w == 3),
        "the late joiner made the world three again: {worlds:?}"
    );
    assert!(gens.windows(2).all(|g| g[0] <= g[1]), "{gens:?}");
    // The coordinator wrote the events: each step once, as metrics.jsonl says,
    // whatever the workers did.
    let tb = tensorboard_scalars(&out_dir.join("runs/elastic")).expect("event files");
    // Event scalars are f32 (compared as such: JSON's last digit aside).
    let loss: Vec<(u64, f32)> = lines
        .iter()
        .map(|l| {
            let step = l["step"].as_u64().unwrap_or(0);
            (step, l["loss"].as_f64().unwrap_or(f64::NAN) as f32)
        })
        .collect();
    let tb_loss: Vec<(u64, f32)> = tb["train/loss"].iter().map(|p| (p.0, p.1 as f32)).collect();
    assert_eq!(tb_loss, loss, "TensorBoard's train/loss");
    let tb_worlds: Vec<u64> = tb["train/world_size"].iter().map(|p| p.1 as u64).collect();
    assert_eq!(tb_worlds, worlds, "world-size history");
    case.assert_same_weights(&out_dir, "kill -9 and a late joiner");
}

#[test]
fn a_worker_asked_to_stop_leaves_after_its_step_and_the_world_goes_on() {
    let case = Case::new(48);
    let steps = 60;
    let extra = format!("max_steps = {steps}\nmicro_batch_size = 1");
    let (spec, out_dir) =
        case.reference_and_spec("leave", &extra, "min_workers = 1\nmax_workers = 2");
    let port = free_port().expect("port");
    let data = case.path().join("coord");
    let _c = coordinator(port, &data, &case.logs, "coordinator", &[], None).expect("coord");
    let _w0 = worker(port, "w0", &case.logs).expect("w0");
    let mut w1 = worker(port, "w1", &case.logs).expect("w1");
    wait_for_workers(port, 2);
    case.submit_and_wait(port, &spec, &out_dir, 10);
    // What Kubernetes sends a pod it is stopping.
    let term = std::process::Command::new("kill")
        .args(["-TERM", &w1.child.id().to_string()])
        .status()
        .expect("kill");
    assert!(term.success());
    let mut status = None;
    wait_for(Duration::from_secs(20), || {
        status = w1.child.try_wait()?;
        Ok(status.is_some())
    })
    .unwrap_or_else(|e| panic!("the worker did not leave: {e}{}", case.logs()));
    let left = std::time::Instant::now();
    let at_leave = steps_done(&out_dir);
    assert_eq!(status.and_then(|s| s.code()), Some(0), "{}", case.logs());
    wait_for(Duration::from_secs(30), || {
        Ok(steps_done(&out_dir) > at_leave)
    })
    .unwrap_or_else(|e| panic!("no step after the leave: {e}{}", case.logs()));
    let gap = left.elapsed();
    eprintln!("next step {gap:?} after the worker left (at step {at_leave})");
    // Well inside the 4 s lease: the world went on because the worker left,
    // not because a timeout noticed it (41 ms measured on an idle machine; the
    // bound leaves room for the tests running beside this one).
    assert!(
        gap < Duration::from_secs(3),
        "the world took {gap:?} to go on"
    );
    case.watch_succeeds(port, "leave");
    let lines = every_step_once(&out_dir, steps);
    let worlds: Vec<u64> = lines
        .iter()
        .map(|l| l["world_size"].as_u64().unwrap_or(0))
        .collect();
    // Both trained before the leave (the first generation may form before the
    // second worker's stream is open: it then joins a step later); only the
    // survivor after it.
    assert!(
        worlds[..at_leave].contains(&2),
        "two workers before the leave: {worlds:?}"
    );
    assert!(
        worlds[at_leave..].iter().all(|&w| w == 1),
        "one worker after the leave (at step {at_leave}): {worlds:?}"
    );
    let log = std::fs::read_to_string(case.logs.join("w1.log")).unwrap_or_default();
    assert!(log.contains("leaving after step"), "{log}");
    case.assert_same_weights(&out_dir, "a graceful leave");
}

#[test]
fn a_coordinator_stopped_with_sigterm_exits_at_once_and_loses_nothing() {
    let case = Case::new(48);
    let steps = 60;
    let extra = format!("max_steps = {steps}\nmicro_batch_size = 1");
    let (spec, out_dir) =
        case.reference_and_spec("sigterm", &extra, "min_workers = 2\nmax_workers = 2");
    let port = free_port().expect("port");
    let data = case.path().join("coord");
    let mut c = coordinator(port, &data, &case.logs, "coordinator", &[], None).expect("coord");
    let _w0 = worker(port, "w0", &case.logs).expect("w0");
    let _w1 = worker(port, "w1", &case.logs).expect("w1");
    case.submit_and_wait(port, &spec, &out_dir, 10);
    // A client watching the run holds a stream open through the stop.
    let _watch = Proc::spawn(
        "watch",
        std::process::Command::new(bin("dpoctl"))
            .args(["--coordinator", &format!("http://127.0.0.1:{port}")])
            .args(["watch", "sigterm"]),
        &case.logs,
    )
    .expect("dpoctl watch");
    std::thread::sleep(Duration::from_millis(500));
    let took = c
        .terminate(Duration::from_secs(20))
        .expect("the coordinator exits after SIGTERM");
    let at_stop = steps_done(&out_dir);
    eprintln!("SIGTERM to exit: {took:?}, at step {at_stop}");
    assert!(took < Duration::from_secs(5), "{took:?}");
    assert!(
        at_stop < steps as usize,
        "the stop came before the end ({at_stop})"
    );
    let _c2 = coordinator(port, &data, &case.logs, "coordinator-2", &[], None).expect("restart");
    case.watch_succeeds(port, "sigterm");
    every_step_once(&out_dir, steps);
    // The workers kept their state: the weights are those of one process.
    case.assert_same_weights(&out_dir, "a coordinator stopped with SIGTERM");
}

#[test]
fn a_worker_asked_to_stop_while_its_coordinator_is_gone_exits_within_its_bound() {
    let case = Case::new(48);
    let extra = "max_steps = 400\nmicro_batch_size = 1";
    let (spec, out_dir) = case.reference_and_spec("stranded", extra, "min_workers = 1");
    let port = free_port().expect("port");
    let data = case.path().join("coord");
    let mut c = coordinator(port, &data, &case.logs, "coordinator", &[], None).expect("coord");
    let mut w = worker_with(port, "w0", &case.logs, &["--leave-timeout-s", "2"]).expect("w0");
    case.submit_and_wait(port, &spec, &out_dir, 3);
    c.kill(); // the coordinator is gone: no hand-off can come
    let took = w
        .terminate(Duration::from_secs(20))
        .expect("the worker exits after SIGTERM");
    eprintln!("SIGTERM to exit without a coordinator: {took:?}");
    assert!(took < Duration::from_secs(6), "{took:?}");
    // With a long bound, the first signal waits for a hand-off that cannot
    // come; a second one stops it at once.
    let mut c2 = coordinator(port, &data, &case.logs, "coordinator-2", &[], None).expect("again");
    let mut w = worker_with(port, "w1", &case.logs, &["--leave-timeout-s", "600"]).expect("w1");
    wait_for(Duration::from_secs(60), || Ok(steps_done(&out_dir) >= 6)).expect("trains on");
    c2.kill();
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &w.child.id().to_string()])
        .status();
    std::thread::sleep(Duration::from_secs(2));
    assert!(!w.exited(), "the first signal waits for the hand-off");
    let took = w
        .terminate(Duration::from_secs(10))
        .expect("a second SIGTERM stops it");
    assert!(took < Duration::from_secs(3), "{took:?}");
}

#[test]
fn a_restarted_coordinator_carries_on() {
    let case = Case::new(48);
    let steps = 60;
    let extra = format!("max_steps = {steps}\nmicro_batch_size = 1");
    let (spec, out_dir) =
        case.reference_and_spec("restart", &extra, "min_workers = 2\nmax_workers = 2");
    let port = free_port().expect("port");
    let data = case.path().join("coord");
    let mut c = coordinator(port, &data, &case.logs, "coordinator", &[], None).expect("coord");
    let _w0 = worker(port, "w0", &case.logs).expect("w0");
    let _w1 = worker(port, "w1", &case.logs).expect("w1");
    case.submit_and_wait(port, &spec, &out_dir, 10);
    c.kill();
    let at_kill = steps_done(&out_dir);
    std::thread::sleep(Duration::from_millis(500));
    let _c2 = coordinator(port, &data, &case.logs, "coordinator-2", &[], None).expect("restart");
    case.watch_succeeds(port, "restart");
    assert!(
        at_kill < steps as usize,
        "the kill came before the end ({at_kill})"
    );
    let lines = every_step_once(&out_dir, steps);
    let last_gen = lines
        .last()
        .and_then(|l| l["generation"].as_u64())
        .unwrap_or(0);
    assert!(
        last_gen >= 2,
        "a new generation after the restart: {last_gen}"
    );
    case.assert_same_weights(&out_dir, "restarted coordinator");
}

#[test]
fn garbage_stale_generations_and_missing_tokens_are_refused() {
    use dpo_proto::client::{BearerToken, channel};
    use dpo_proto::v1::{self, worker_service_client::WorkerServiceClient};

    let case = Case::new(24);
    let port = free_port().expect("port");
    let data = case.path().join("coord");
    let _c = coordinator(port, &data, &case.logs, "coordinator", &[], Some("s3cret"))
        .expect("coordinator");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let url = format!("http://127.0.0.1:{port}");
        let reg = |id: &str, addr: &str| v1::RegisterRequest {
            worker_id: id.into(),
            collective_addr: addr.into(),
            ..Default::default()
        };
        // No token, and a wrong one.
        for token in [None, Some("wrong".to_string())] {
            let ch = channel(&url, &Default::default()).expect("channel");
            let mut c =
                WorkerServiceClient::with_interceptor(ch, BearerToken::new(token).expect("t"));
            let e = c
                .register(reg("x", "127.0.0.1:9"))
                .await
                .expect_err("refused");
            assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e}");
        }
        let ch = channel(&url, &Default::default()).expect("channel");
        let mut c = WorkerServiceClient::with_interceptor(
            ch,
            BearerToken::new(Some("s3cret".into())).expect("token"),
        );
        // Garbage registration.
        let e = c
            .register(reg("x", "not an address"))
            .await
            .expect_err("garbage");
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
        let e = c
            .register(reg("", "127.0.0.1:9"))
            .await
            .expect_err("empty id");
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
        // A registered worker with a generation that does not exist (stale or forged).
        let session = c
            .register(reg("w", "127.0.0.1:9"))
            .await
            .expect("register")
            .into_inner()
            .session;
        // Its id cannot be taken while its lease is live: not by registering,
        // not by opening its assignment stream; with its session it can.
        let e = c
            .register(reg("w", "127.0.0.1:666"))
            .await
            .expect_err("hijack");
        assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e}");
        let e = c
            .assignments(v1::AssignmentsRequest {
                worker_id: "w".into(),
                session: b"guess".to_vec(),
            })
            .await
            .expect_err("hijack the stream");
        assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e}");
        let mut again = reg("w", "127.0.0.1:9");
        again.session = session;
        c.register(again).await.expect("the worker itself");
        let member = v1::Member {
            worker_id: "w".into(),
            run_id: "r".into(),
            generation: 7,
            rank: 0,
        };
        let fetch = v1::FetchBatchRequest {
            member: Some(member.clone()),
            step: 0,
            split: 0,
        };
        let e = c.fetch_batch(fetch).await.expect_err("stale");
        assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e}");
        // A request that does not say who sends it is malformed.
        let e = c
            .fetch_batch(v1::FetchBatchRequest::default())
            .await
            .expect_err("no member");
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
        let report = v1::ReportStepRequest {
            member: Some(member),
            step: 1,
            ..Default::default()
        };
        let e = c.report_step(report).await.expect_err("stale");
        assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e}");
        // Collective bootstrap data (the NCCL unique id) for a generation that is
        // not current is refused too.
        let boot = v1::Bootstrap {
            run_id: "r".into(),
            generation: 7,
            data: vec![1, 2, 3],
        };
        let e = c.publish_bootstrap(boot).await.expect_err("stale");
        assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e}");
        // A heartbeat of an unknown worker tells it to register again.
        let hb = c
            .heartbeat(v1::HeartbeatRequest {
                worker_id: "nobody".into(),
                ..Default::default()
            })
            .await
            .expect("heartbeat");
        assert!(!hb.get_ref().known);
    });
    // A dataset with a bad line is refused at submit time, naming the user's file
    // and line (not the coordinator's copy of the streamed file).
    let bad = case.path().join("bad.jsonl");
    let good = std::fs::read_to_string(case.path().join("data/train.jsonl")).expect("train");
    let mut text: Vec<&str> = good.lines().take(4).collect();
    text.insert(2, "{\"prompt\": \"x\", \"chosen\": 3}");
    std::fs::write(&bad, text.join("\n")).expect("bad file");
    let spec = case.write_spec("bad-data", "max_steps = 1");
    let spec_text = std::fs::read_to_string(&spec).expect("spec").replace(
        &case.path().join("data/train.jsonl").display().to_string(),
        &bad.display().to_string(),
    );
    std::fs::write(&spec, spec_text).expect("spec");
    let out = std::process::Command::new(bin("dpoctl"))
        .args([
            "--coordinator",
            &format!("http://127.0.0.1:{port}"),
            "submit",
        ])
        .arg(&spec)
        .env("DPO_TOKEN", "s3cret")
        .output()
        .expect("dpoctl");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains(&format!("{}:3", bad.display())), "{err}");
    // Raw garbage on the gRPC port does not take the coordinator down.
    {
        use std::io::Write;
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
        let _ = s.write_all(b"\x00\xffGET / HTTP/1.1\r\n\r\nnot http2 at all");
    }
    std::thread::sleep(Duration::from_millis(200));
    let spec = case.write_spec("after-garbage", "max_steps = 1");
    let out = std::process::Command::new(bin("dpoctl"))
        .args([
            "--coordinator",
            &format!("http://127.0.0.1:{port}"),
            "submit",
        ])
        .arg(&spec)
        .env("DPO_TOKEN", "s3cret")
        .output()
        .expect("dpoctl");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stderr),
        case.logs()
    );
}

#[test]
fn on_etcd_a_run_survives_an_etcd_restart_and_a_standby_takes_over() {
    let case = Case::new(48);
    let steps = 60;
    let extra = format!("max_steps = {steps}\nmicro_batch_size = 1\ncheckpoint_every = 10");
    let (spec, out_dir) =
        case.reference_and_spec("etcd", &extra, "min_workers = 2\nmax_workers = 2");
    let etcd_dir = case.path().join("etcd-data");
    let (mut e, etcd_port) =
        etcd_on_a_free_port(&etcd_dir, &case.logs, "etcd", None, &[]).expect("etcd");
    let endpoint = format!("http://127.0.0.1:{etcd_port}");
    let store = ["--store", "etcd", "--etcd", endpoint.as_str()];
    let port = free_port().expect("port");
    let data = case.path().join("coord");
    let _c = coordinator(port, &data, &case.logs, "coordinator", &store, None)
        .unwrap_or_else(|e| panic!("{e}{}", case.logs()));
    // A second coordinator on the same etcd stands by: it does not serve.
    let standby_port = free_port().expect("port");
    let standby_args: Vec<&str> = store.iter().copied().chain(["--standby"]).collect();
    let mut standby = coordinator(
        standby_port,
        &data,
        &case.logs,
        "standby",
        &standby_args,
        None,
    )
    .expect("standby");
    let _w0 = worker(port, "w0", &case.logs).expect("w0");
    let _w1 = worker(port, "w1", &case.logs).expect("w1");
    case.submit_and_wait(port, &spec, &out_dir, 10);
    assert!(
        !listening(&data, "standby"),
        "the standby serves while the leader lives"
    );
    // etcd killed and restarted on the same data: the run goes on.
    e.kill();
    std::thread::sleep(Duration::from_millis(1500));
    let _e2 = etcd(etcd_port, &etcd_dir, &case.logs, "etcd-2", None).expect("etcd restart");
    case.watch_succeeds(port, "etcd");
    every_step_once(&out_dir, steps);
    case.assert_same_weights(&out_dir, "etcd restart");
    // The leader goes away: the standby is elected and serves the runs from etcd.
    drop(_c);
    wait_for(Duration::from_secs(30), || {
        if standby.exited() {
            bail_standby(&case);
        }
        Ok(listening(&data, "standby"))
    })
    .unwrap_or_else(|e| panic!("standby never took over: {e}{}", case.logs()));
    let listed = dpoctl(standby_port, &["list"]).expect("list");
    let text = String::from_utf8_lossy(&listed.stdout);
    assert!(
        text.contains("\"succeeded\"") && text.contains("\"etcd\""),
        "{text}"
    );
}

fn bail_standby(case: &Case) -> ! {
    panic!("the standby exited{}", case.logs())
}

/// The values of `key=N` on every line of `log` that contains `marker`, in order
/// (ANSI colour codes stripped).
fn log_values(log: &Path, marker: &str, key: &str) -> Vec<u64> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let mut plain = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            plain.push(c);
        }
    }
    let pat = format!("{key}=");
    plain
        .lines()
        .filter(|l| l.contains(marker))
        .filter_map(|l| {
            let rest = &l[l.find(&pat)? + pat.len()..];
            rest.split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse()
                .ok()
        })
        .collect()
}

/// `scored=N` of every "reference stage complete" line of a worker's log.
fn stage_scores(log: &Path) -> Vec<u64> {
    log_values(log, "reference stage complete", "scored")
}

/// Bytes in the coordinator's reference cache (20 per sequence).
fn cache_bytes(data_dir: &Path) -> u64 {
    let mut total = 0;
    for ns in std::fs::read_dir(data_dir.join("reference"))
        .into_iter()
        .flatten()
        .flatten()
    {
        for seg in std::fs::read_dir(ns.path()).into_iter().flatten().flatten() {
            total += seg.metadata().map_or(0, |m| m.len());
        }
    }
    total
}

#[test]
fn the_reference_stage_is_shared_by_the_workers_and_reused_by_later_runs() {
    let rows = 48;
    let case = Case::new(rows);
    // Standalone recomputes its reference (cache "none"); the cluster scores it
    // once, as a stage split over both workers, into the coordinator's cache.
    let (spec, out_dir) = case.reference_and_spec(
        "staged",
        "max_steps = 6\nmicro_batch_size = 2\n[reference]\nprecompute = true\ncache = \"none\"",
        "min_workers = 2\nmax_workers = 2",
    );
    let port = free_port().expect("port");
    let data = case.path().join("coord");
    let _c = coordinator(port, &data, &case.logs, "coordinator", &[], None).expect("coordinator");
    let _w0 = worker(port, "w0", &case.logs).expect("w0");
    let _w1 = worker(port, "w1", &case.logs).expect("w1");
    case.submit_watch_succeeds(port, &spec);
    every_step_once(&out_dir, 6);
    case.assert_same_weights(&out_dir, "reference stage, 2 workers");
    // Every pair scored exactly once, chosen and rejected, shared by the ranks.
    assert_eq!(cache_bytes(&data), rows as u64 * 2 * 20, "{}", case.logs());
    let (s0, s1) = (
        stage_scores(&case.logs.join("w0.log")),
        stage_scores(&case.logs.join("w1.log")),
    );
    assert_eq!(s0.len(), 1, "{}", case.logs());
    assert_eq!(s1.len(), 1, "{}", case.logs());
    assert_eq!(s0[0] + s1[0], rows as u64);
    assert!(
        s0[0] > 0 && s1[0] > 0,
        "both ranks take part: {s0:?} {s1:?}"
    );
    // The run reports the stage's progress (what `dpoctl watch` draws).
    let status = dpoctl(port, &["status", "staged"]).expect("status");
    let run: serde_json::Value = serde_json::from_slice(&status.stdout).expect("json");
    assert_eq!(
        (
            run["reference_total"].as_u64(),
            run["reference_cached"].as_u64()
        ),
        (Some(rows as u64), Some(rows as u64)),
        "{run}"
    );

    // A β sweep on the same data reuses every sum: nothing scored, nothing added.
    let sweep = std::fs::read_to_string(&spec)
        .expect("spec")
        .replace("beta = 0.5", "beta = 0.2")
        .replace("name = \"staged\"", "name = \"sweep\"")
        .replace(
            &format!("\"{}\"", out_dir.display()),
            &format!("\"{}\"", case.path().join("sweep").display()),
        );
    let sweep_spec = case.path().join("sweep.toml");
    std::fs::write(&sweep_spec, sweep).expect("sweep spec");
    case.submit_watch_succeeds(port, &sweep_spec);
    every_step_once(&case.path().join("sweep"), 6);
    assert_eq!(cache_bytes(&data), rows as u64 * 2 * 20);
    let (s0, s1) = (
        stage_scores(&case.logs.join("w0.log")),
        stage_scores(&case.logs.join("w1.log")),
    );
    assert_eq!(
        (s0.last(), s1.last()),
        (Some(&0), Some(&0)),
        "{}",
        case.logs()
    );
    let moved = max_diff(&out_dir.join("final"), &case.path().join("sweep/final")).expect("w");
    assert!(moved > 1e-4, "β changed the training: {moved}");
}

#[test]
fn a_worker_lost_mid_stage_costs_only_its_chunk_in_flight() {
    let rows = 48;
    let case = Case::new(rows);
    let (spec, out_dir) = case.reference_and_spec(
        "staged",
        "max_steps = 4\nmicro_batch_size = 2\n[reference]\nprecompute = true\ncache = \"none\"",
        "min_workers = 2\nmax_workers = 2",
    );
    let port = free_port().expect("port");
    let data = case.path().join("coord");
    let _c = coordinator(port, &data, &case.logs, "coordinator", &[], None).expect("coordinator");
    let _w0 = worker(port, "w0", &case.logs).expect("w0");
    // w1 dies (like a crash) right after reporting its first chunk of the stage.
    let mut w1 = Proc::spawn(
        "w1",
        std::process::Command::new(bin("dpo-worker"))
            .args(["--coordinator", &format!("http://127.0.0.1:{port}")])
            .args(["--device", "cpu", "--worker-id", "w1"])
            .args(["--halt-after-reference-chunks", "1"])
            .env_remove("DPO_TOKEN"),
        &case.logs,
    )
    .expect("w1");
    let submitted = dpoctl(port, &["submit", &spec.display().to_string()]).expect("submit");
    assert!(
        submitted.status.success(),
        "{}",
        String::from_utf8_lossy(&submitted.stderr)
    );
    wait_for(Duration::from_secs(120), || Ok(w1.exited()))
        .unwrap_or_else(|e| panic!("{e}{}", case.logs()));
    // A replacement joins; the new generation re-plans only what is still missing.
    let _w2 = worker(port, "w2", &case.logs).expect("w2");
    case.watch_succeeds(port, "staged");
    every_step_once(&out_dir, 4);
    case.assert_same_weights(&out_dir, "reference stage with a lost worker");
    assert_eq!(cache_bytes(&data), rows as u64 * 2 * 20, "{}", case.logs());
    let plans = log_values(
        &case.logs.join("coordinator.log"),
        "reference stage",
        "to_score",
    );
    assert_eq!(
        plans.first(),
        Some(&(rows as u64)),
        "{plans:?}{}",
        case.logs()
    );
    eprintln!("reference stage plans (examples to score per generation): {plans:?}");
    let last = *plans.last().expect("a plan");
    assert!(
        plans.len() >= 2 && last <= rows as u64 - 2,
        "the replanned stage kept the sums reported before the loss: {plans:?}{}",
        case.logs()
    );
    assert!(
        stage_scores(&case.logs.join("w1.log")).is_empty(),
        "w1 never finished its share"
    );
}

/// The worlds of a run's steps went 3, then 2 (after a kill), then 3 again
/// (a late joiner).
fn three_two_three(lines: &[serde_json::Value]) {
    let worlds: Vec<u64> = lines
        .iter()
        .map(|l| l["world_size"].as_u64().unwrap_or(0))
        .collect();
    assert_eq!(worlds[0], 3, "{worlds:?}");
    assert!(
        worlds
            .iter()
            .skip_while(|&&w| w == 3)
            .skip_while(|&&w| w == 2)
            .any(|&w| w == 3),
        "three, two after the kill, three again with the joiner: {worlds:?}"
    );
}

/// A ZeRO run (`train` keys `zero`) of 150 steps on three workers, one killed
/// (kill -9) after the step-25, a fourth joining later; checks the
/// worlds went 3, 2, 3, every step is recorded once and the weights are one
/// process's. Returns the run as `dpoctl status` shows it, its ledger, and the logs.
fn zero_kill_and_join(
    case: &Case,
    name: &str,
    zero: &str,
) -> (serde_json::Value, Vec<serde_json::Value>, String) {
    zero_stop_and_join(case, name, zero, "KILL")
}

/// [`zero_kill_and_join`], stopping the worker with `signal` (`KILL`, or
/// `TERM`: a graceful leave).
fn zero_stop_and_join(
    case: &Case,
    name: &str,
    zero: &str,
    signal: &str,
) -> (serde_json::Value, Vec<serde_json::Value>, String) {
    zero_stop_and_join_with(case, name, zero, signal, "")
}

/// [`zero_stop_and_join`] with `sections` (e.g. `[lora]`) added to both the
/// one-process run and the cluster's.
fn zero_stop_and_join_with(
    case: &Case,
    name: &str,
    zero: &str,
    signal: &str,
    sections: &str,
) -> (serde_json::Value, Vec<serde_json::Value>, String) {
    zero_stop_and_join_every(case, name, zero, signal, sections, 20)
}

/// [`zero_stop_and_join_with`] with a checkpoint every `checkpoint_every`
/// steps (0: none, so a lost share goes back to the initial weights).
fn zero_stop_and_join_every(
    case: &Case,
    name: &str,
    zero: &str,
    signal: &str,
    sections: &str,
    checkpoint_every: u64,
) -> (serde_json::Value, Vec<serde_json::Value>, String) {
    let steps = 150;
    let extra =
        format!("max_steps = {steps}\nmicro_batch_size = 1\ncheckpoint_every = {checkpoint_every}");
    let spec_path = adamw_reference_and_spec(
        case,
        name,
        &format!("{extra}\n{sections}"),
        &format!("{extra}\n{zero}\n[cluster]\nmin_workers = 2\nmax_workers = 3\n{sections}"),
    );
    let out_dir = case.path().join(name);
    let port = free_port().expect("port");
    let data = case.path().join("coord");
    let _c = coordinator(port, &data, &case.logs, "coordinator", &[], None).expect("coordinator");
    let _w0 = worker(port, "w0", &case.logs).expect("w0");
    let mut w1 = worker(port, "w1", &case.logs).expect("w1");
    let _w2 = worker(port, "w2", &case.logs).expect("w2");
    wait_for_workers(port, 3);
    case.submit_and_wait(port, &spec_path, &out_dir, 25);
    let sent = std::process::Command::new("kill")
        .args([format!("-{signal}"), w1.child.id().to_string()])
        .status()
        .expect("kill");
    assert!(sent.success());
    wait_for(Duration::from_secs(60), || {
        Ok(w1.child.try_wait()?.is_some())
    })
    .unwrap_or_else(|e| panic!("the worker did not stop: {e}{}", case.logs()));
    let killed_at = steps_done(&out_dir);
    wait_for(Duration::from_secs(90), || {
        Ok(steps_done(&out_dir) >= killed_at + 5)
    })
    .unwrap_or_else(|e| panic!("no progress after the kill: {e}{}", case.logs()));
    let _w3 = worker(port, "w3", &case.logs).expect("w3");
    case.watch_succeeds(port, name);
    three_two_three(&every_step_once(&out_dir, steps));
    case.assert_same_weights(&out_dir, &format!("{zero}: kill -{signal}, a late joiner"));
    let status = dpoctl(port, &["status", name]).expect("status");
    let run: serde_json::Value =
        serde_json::from_slice(&status.stdout).unwrap_or_else(|e| panic!("{e}: {status:?}"));
    (run, jsonl(&out_dir.join("ledger.jsonl")), case.logs())
}

#[test]
fn zero_shards_follow_the_world_and_a_lost_share_rolls_back_to_the_checkpoint() {
    let case = Case::new(96);
    // Past the checkpoint of step 20, a worker dies: its share of the moments
    // is gone, so the world of two goes back to step 20; the late joiner's
    // world of three re-partitions the shares of two.
    let (run, ledger, logs) = zero_kill_and_join(&case, "zero", "zero_stage = 2");
    let rollbacks = run["rollbacks"].as_array().cloned().unwrap_or_default();
    assert!(!rollbacks.is_empty(), "the rollback is recorded: {run}");
    let first = &rollbacks[0];
    assert_eq!(first["to_step"], 20, "{first}");
    assert!(first["from_step"].as_u64().unwrap_or(0) >= 25, "{first}");
    let reason = first["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("lost with its worker") && reason.contains("checkpoint of step 20"),
        "{reason}"
    );
    // The ledger ends with the rollbacks.
    let noted = ledger
        .iter()
        .filter(|l| l.get("rollback").is_some())
        .count();
    assert_eq!(noted, rollbacks.len(), "{ledger:?}");
    // The joiner's world re-partitioned the state (unless the join's abort
    // tore every rank's step, which rolls back instead — also recorded).
    assert!(
        logs.contains("re-partitioned the optimizer state") || rollbacks.len() > 1,
        "{logs}"
    );
}

#[test]
fn zero_a_graceful_leave_hands_its_share_over_without_going_back() {
    let case = Case::new(96);
    // SIGTERM, as Kubernetes stops a pod: the leaving worker says so in its
    // next step, the world re-partitions the state among the two that stay,
    // and only then does it go — no replicas, and still no rollback.
    let (run, _, logs) = zero_stop_and_join(&case, "leave", "zero_stage = 1", "TERM");
    let rollbacks = run["rollbacks"].as_array().cloned().unwrap_or_default();
    eprintln!("graceful leave under ZeRO: {} rollback(s)", rollbacks.len());
    assert!(
        logs.contains("handed the leaving ranks' shares of the optimizer state over"),
        "{logs}"
    );
    // No share is lost to the leave. (The joiner's abort may still break a
    // step on one rank only, leaving its share a step past the others': that
    // goes back, and says why.)
    assert!(
        rollbacks.iter().all(|b| {
            let reason = b["reason"].as_str().unwrap_or_default();
            !reason.contains("lost with its worker") && reason.contains("step")
        }),
        "{run}"
    );
}

#[test]
fn zero_a_step_torn_on_every_rank_is_completed_from_the_shares() {
    let case = Case::new(96);
    let steps = 40;
    let extra = format!("max_steps = {steps}\nmicro_batch_size = 1\ncheckpoint_every = 10");
    let spec_path = adamw_reference_and_spec(
        &case,
        "torn",
        &extra,
        &format!("{extra}\nzero_stage = 1\n[cluster]\nmin_workers = 2\nmax_workers = 2"),
    );
    let out_dir = case.path().join("torn");
    let port = free_port().expect("port");
    let data = case.path().join("coord");
    let _c = coordinator(port, &data, &case.logs, "coordinator", &[], None).expect("coordinator");
    // Both ranks break step 15 after updating their shares, before gathering
    // the parameters: no rank has the step whole, every share has it.
    let tear = ["--tear-at-step", "15"];
    let _w0 = worker_with(port, "w0", &case.logs, &tear).expect("w0");
    let _w1 = worker_with(port, "w1", &case.logs, &tear).expect("w1");
    wait_for_workers(port, 2);
    case.submit_and_wait(port, &spec_path, &out_dir, 1);
    case.watch_succeeds(port, "torn");
    let logs = case.logs();
    assert!(logs.contains("injected fault: step 15 torn"), "{logs}");
    assert!(
        logs.contains("completed it from the updated shares"),
        "{logs}"
    );
    let status = dpoctl(port, &["status", "torn"]).expect("status");
    let run: serde_json::Value =
        serde_json::from_slice(&status.stdout).unwrap_or_else(|e| panic!("{e}: {status:?}"));
    let rollbacks = run["rollbacks"].as_array().cloned().unwrap_or_default();
    assert!(rollbacks.is_empty(), "no rollback: {run}");
    every_step_once(&out_dir, steps);
    case.assert_same_weights(&out_dir, "a step torn on every rank, completed");
}

#[test]
fn lora_adapters_train_in_a_changing_world_as_in_one_process() {
    let case = Case::new(96);
    // LoRA on every linear layer (the reference: the base, adapters off), the
    // adapters' optimizer state sharded (stage 2), a kill -9 — the share is
    // lost, so the world goes back to the step-20 checkpoint, which holds the
    // adapters — and a late joiner: every step once, the adapter of one process.
    let lora = "[lora]\nr = 4\nalpha = 8.0\ntarget_modules = \"all-linear\"\ninit = \"gaussian\"";
    let (run, _, _) = zero_stop_and_join_with(&case, "lora", "zero_stage = 2", "KILL", lora);
    let out = case.path().join("lora/final");
    assert!(out.join("adapter_config.json").exists(), "{run}");
    let ck = case
        .path()
        .join("lora/checkpoints/step-20/adapter/adapter_model.safetensors");
    assert!(ck.exists(), "a LoRA checkpoint holds the adapter");
    let rollbacks = run["rollbacks"].as_array().cloned().unwrap_or_default();
    assert!(
        rollbacks.iter().any(|b| b["to_step"] == 20),
        "back to the LoRA checkpoint: {run}"
    );
}

#[test]
fn lora_with_a_sharded_frozen_base_survives_a_kill_and_a_joiner() {
    let case = Case::new(96);
    // ZeRO stage 3: each worker holds a share of the frozen base, gathered
    // layer by layer; a kill -9 and a late joiner re-shard it for each world
    // (read again from the model's files): every step once, one process's
    // adapter.
    let lora = "[lora]\nr = 4\nalpha = 8.0\ntarget_modules = \"all-linear\"\ninit = \"gaussian\"";
    // No checkpoints: the lost share sends the world back to the initial
    // weights, adapters included.
    let (run, _, logs) = zero_stop_and_join_every(
        &case,
        "lora3",
        "zero_stage = 3\ngradient_checkpointing = true",
        "KILL",
        lora,
        0,
    );
    assert!(
        logs.contains("ZeRO stage 3: this rank holds its share of the frozen base"),
        "{run}"
    );
    let rollbacks = run["rollbacks"].as_array().cloned().unwrap_or_default();
    assert!(
        rollbacks.iter().any(|b| b["to_step"] == 0),
        "back to the initial adapters: {run}"
    );
}

#[test]
fn zero_replicas_survive_a_kill_without_going_back() {
    let case = Case::new(96);
    // Stage 2 (gradients reduced layer by layer into the shares) with replicas;
    // stage 1's replicas are checked against one process in worker/tests/zero.rs.
    let (run, _, logs) = zero_kill_and_join(&case, "copies", "zero_stage = 2\nzero_replicas = 2");
    let rollbacks = run["rollbacks"].as_array().cloned().unwrap_or_default();
    eprintln!(
        "replicas: {} rollback(s); shares rebuilt from replicas: {}",
        rollbacks.len(),
        logs.contains("rebuilt lost shares")
    );
    // The killed worker's share came back from its replica. (A failure that
    // tears every rank's step while they gather the parameters leaves no
    // metrics line for it, which no copy can mend: that alone may still go
    // back, and says so.)
    assert!(
        rollbacks.iter().all(|b| b["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("every rank's step")),
        "{run}"
    );
    assert!(
        logs.contains("rebuilt lost shares of the optimizer state from their replicas")
            || !rollbacks.is_empty(),
        "{logs}"
    );
}

/// `dpo-worker --devices cpu,cpu`: one worker process runs two ranks (as
/// `--gpus 2` does on a GPU machine), each a member of the run, and trains the
/// weights of one process. Then a run asking for `backend = "nccl"` on these
/// CPU ranks fails, naming the cause — no silent fallback to the ring.
#[test]
fn a_worker_of_two_ranks_trains_and_nccl_without_a_gpu_fails_by_name() {
    let case = Case::new(48);
    let (spec, out_dir) = case.reference_and_spec(
        "ranks",
        "max_steps = 6\nmicro_batch_size = 2",
        "min_workers = 2\nmax_workers = 2",
    );
    let port = free_port().expect("port");
    let data = case.path().join("coord");
    let _c = coordinator(port, &data, &case.logs, "coordinator", &[], None).expect("coordinator");
    let _w = worker_with(port, "pod", &case.logs, &["--devices", "cpu,cpu"]).expect("worker");
    wait_for_workers(port, 2);
    let listed = dpoctl(port, &["workers"]).expect("workers");
    let listed = String::from_utf8_lossy(&listed.stdout).to_string();
    assert!(
        listed.contains("pod-rank0") && listed.contains("pod-rank1"),
        "{listed}"
    );
    case.submit_watch_succeeds(port, &spec);
    let lines = every_step_once(&out_dir, 6);
    assert!(lines.iter().all(|l| l["world_size"] == 2), "{lines:?}");
    case.assert_same_weights(&out_dir, "one worker of 2 ranks");

    let nccl = case.write_spec(
        "nccl",
        "max_steps = 2\n[cluster]\nmin_workers = 2\nmax_workers = 2\nbackend = \"nccl\"",
    );
    let out = dpoctl(port, &["submit", "--watch", &nccl.display().to_string()]).expect("dpoctl");
    assert!(!out.status.success(), "an nccl run on CPU ranks must fail");
    let status = dpoctl(port, &["status", "nccl"]).expect("status");
    let status = format!(
        "{}{}",
        String::from_utf8_lossy(&status.stdout),
        String::from_utf8_lossy(&status.stderr)
    );
    assert!(status.contains("\"failed\""), "{status}");
    assert!(
        status.contains("the nccl backend needs a CUDA device"),
        "the failure names the cause: {status}{}",
        case.logs()
    );
    assert_eq!(steps_done(&case.path().join("nccl")), 0, "nothing trained");

    // The supervisor killed (SIGKILL, no chance to forward anything): its
    // ranks get SIGTERM from the kernel and leave, none is left behind.
    let mut w = _w;
    let url = format!("http://127.0.0.1:{port}");
    assert_eq!(rank_processes(&url), 2, "both ranks run");
    w.kill();
    wait_for(Duration::from_secs(20), || Ok(rank_processes(&url) == 0))
        .expect("the ranks leave with their supervisor");
}

/// Rank processes (`--local-rank`) of workers joined to coordinator `url`.
fn rank_processes(url: &str) -> usize {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0;
    };
    entries
        .flatten()
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| c.contains("--local-rank") && c.contains(url) && !c.contains("<defunct>"))
        .count()
}

/// A tiny BERT (dropout off: masks drawn per rank would differ between worlds)
/// and the synthetic NER task, under the case's directory.
fn ner_case(case: &Case) {
    let run = |args: &[&str]| {
        let out = std::process::Command::new(python())
            .args(args)
            .current_dir(root())
            .output()
            .expect("python");
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let dir = case.path().display().to_string();
    run(&[
        "examples/make_tasks.py",
        "--out",
        &dir,
        "--train",
        "120",
        "--eval",
        "24",
    ]);
    run(&[
        "examples/tiny_encoder.py",
        "--out",
        &format!("{dir}/bert"),
        "--family",
        "bert",
        "--head",
        "none",
        "--dropout",
        "0",
        "--corpus",
        &format!("{dir}/ner/corpus.txt"),
    ]);
}

fn ner_spec(case: &Case, name: &str, extra: &str) -> std::path::PathBuf {
    let dir = case.path();
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(
        &path,
        format!(
            "name = \"{name}\"\n[model]\npath = \"{model}\"\n[task]\ntype = \"token-classification\"\n\
             negatives_per_label = 2\n[data]\ntrain = \"{train}\"\neval = \"{eval}\"\nnegatives = \"adversarial\"\nmax_length = 48\nseed = 5\n\
             [objective]\nloss = \"combined\"\n[optim]\nlr = 0.003\n\
             [train]\nglobal_batch_size = 6\nmicro_batch_size = 1\noutput = \"{out}\"\n{extra}\n",
            model = dir.join("bert").display(),
            train = dir.join("ner/train.jsonl").display(),
            eval = dir.join("ner/dev.jsonl").display(),
            out = dir.join(name).display(),
        ),
    )
    .expect("spec");
    path
}

/// Largest weight difference between two models, attention key biases aside:
/// their gradient is zero in exact arithmetic, so AdamW steps on rounding noise.
fn encoder_diff(a: &Path, b: &Path) -> f32 {
    let (wa, wb) = (weights(a).expect("weights"), weights(b).expect("weights"));
    assert_eq!(wa.keys().collect::<Vec<_>>(), wb.keys().collect::<Vec<_>>());
    let mut d = 0f32;
    for (k, va) in wa
        .iter()
        .filter(|(k, _)| !k.ends_with("attention.self.key.bias"))
    {
        for (x, y) in va.iter().zip(&wb[k]) {
            d = d.max((x - y).abs());
        }
    }
    d
}

/// NER with adversarial negatives through the coordinator (each rank mines its
/// share with the weights of the epoch's start), through two faults at fixed
/// points: right after step 20 — the end of the first epoch — one worker
/// exits like a crash and the other's connection breaks, both before any
/// report of the step, its evaluation or the next epoch's mining; a joiner
/// takes the crashed one's place; later one is killed with kill -9 mid-epoch
/// and another joins. Every step is trained exactly once, the evaluations are
/// one process's, and the weights those of one `dpo-worker train` process; the
/// coordinator writes the entity scores of each evaluation to eval.jsonl, and
/// final/ is the HF model of the best one.
#[test]
fn ner_through_the_coordinator_survives_a_killed_worker_and_equals_one_process() {
    ner_through_the_coordinator("", &["--tear-at-step", "20"]);
}

/// The same under ZeRO stage 2 with replicas: a lost worker's share of the
/// optimizer state is rebuilt from the copy its successor kept, so no step is
/// lost or trained twice, and the weights are one process's.
#[test]
fn ner_under_zero_2_with_replicas_survives_a_killed_worker_and_equals_one_process() {
    ner_through_the_coordinator("zero_stage = 2\nzero_replicas = 2", &[]);
}

/// `w1_faults`: the second worker's fault-injection arguments.
fn ner_through_the_coordinator(zero: &str, w1_faults: &[&str]) {
    let case = Case::empty();
    ner_case(&case);
    let steps = 60;
    let extra =
        format!("max_steps = {steps}\ncheckpoint_every = 15\nmetric_for_best_model = \"eval_f1\"");
    let solo = ner_spec(&case, "solo", &extra);
    train_standalone(&solo, &case.logs).expect("standalone");
    let spec = ner_spec(
        &case,
        "ner",
        &format!("{extra}\n{zero}\n[cluster]\nmin_workers = 2\nmax_workers = 2"),
    );
    let out_dir = case.path().join("ner");
    let port = free_port().expect("port");
    let data = case.path().join("coord");
    let _c = coordinator(port, &data, &case.logs, "coordinator", &[], None).expect("coordinator");
    // 120 examples, 6 a step: an epoch is 20 steps.
    let _w0 = worker_with(port, "w0", &case.logs, &["--halt-after-step", "20"]).expect("w0");
    let mut w1 = worker_with(port, "w1", &case.logs, w1_faults).expect("w1");
    wait_for_workers(port, 2);
    case.submit_and_wait(port, &spec, &out_dir, 19);
    let _w2 = worker(port, "w2", &case.logs).expect("w2");
    wait_for(Duration::from_secs(120), || Ok(steps_done(&out_dir) >= 30))
        .unwrap_or_else(|e| panic!("{e}{}", case.logs()));
    w1.kill(); // kill -9, mid-epoch
    let _w3 = worker(port, "w3", &case.logs).expect("w3");
    case.watch_succeeds(port, "ner");
    let logs = case.logs();
    assert!(logs.contains("halted after step 20"), "{logs}");
    assert!(
        w1_faults.is_empty() || logs.contains("injected fault"),
        "{logs}"
    );
    let lines = every_step_once(&out_dir, steps);
    assert!(lines.iter().all(|l| l["world_size"] == 2), "{lines:?}");
    let gens: Vec<u64> = lines
        .iter()
        .map(|l| l["generation"].as_u64().unwrap_or(0))
        .collect();
    assert!(
        gens.first() < gens.last(),
        "a new generation after the kill: {gens:?}"
    );
    let evals = jsonl(&out_dir.join("eval.jsonl"));
    assert!(
        !evals.is_empty() && evals.iter().all(|e| e["eval_f1"].is_number()),
        "{evals:?}"
    );
    // The evaluation the broken world owed (step 20) was made by the next.
    let eval_steps = |evals: &[serde_json::Value]| -> Vec<u64> {
        evals.iter().filter_map(|e| e["step"].as_u64()).collect()
    };
    // (One process also scores the model before training, at step 0.)
    let solo_evals: Vec<serde_json::Value> = jsonl(&case.path().join("solo/eval.jsonl"))
        .into_iter()
        .filter(|e| e["step"].as_u64() != Some(0))
        .collect();
    assert_eq!(eval_steps(&evals), eval_steps(&solo_evals), "{evals:?}");
    for (a, b) in evals.iter().zip(&solo_evals) {
        let (a, b) = (a["eval_f1"].as_f64(), b["eval_f1"].as_f64());
        assert!(
            matches!((a, b), (Some(a), Some(b)) if (a - b).abs() < 1e-9),
            "{a:?} vs {b:?}"
        );
    }
    let d = encoder_diff(&case.path().join("solo/final"), &out_dir.join("final"));
    eprintln!("NER in a cluster with a kill -9 ({zero:?}): max |Δw| vs one process: {d:e}");
    assert!(d <= 1e-5, "{d}{}", case.logs());
    if !zero.is_empty() {
        let logs = case.logs();
        assert!(
            logs.contains("ZeRO: this rank holds its share of the optimizer state"),
            "the ranks partitioned the optimizer state: {logs}"
        );
    }
    let loss = |l: &serde_json::Value| l["loss"].as_f64().expect("loss");
    assert!(
        loss(&lines[steps as usize - 1]) < loss(&lines[0]) * 0.7,
        "training moved the model"
    );
    let config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out_dir.join("final/config.json")).expect("config"),
    )
    .expect("json");
    assert_eq!(config["architectures"][0], "BertForTokenClassification");
    assert_eq!(config["id2label"]["0"], "O");
}

/// The largest `memory/peak_bytes` a run's metrics report.
fn peak_bytes(out: &Path) -> f64 {
    jsonl(&out.join("metrics.jsonl"))
        .iter()
        .filter_map(|m| m["memory/peak_bytes"].as_f64())
        .fold(0.0, f64::max)
}

/// One worker serves a large run, then a small one: the small run's
/// `memory/peak_bytes` is its own, not the process's lifetime high-water
/// mark (which the large run set).
#[test]
fn a_worker_reports_each_run_s_own_peak_memory() {
    let case = Case::new(24);
    // A model ~200 MB larger in memory than the fixture's.
    let big = case.path().join("big-model");
    let made = std::process::Command::new(python())
        .current_dir(root())
        .args(["examples/tiny_model.py", "--out"])
        .arg(&big)
        .args(["--hidden", "512", "--intermediate", "2048", "--layers", "4"])
        .output()
        .expect("python");
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    let port = free_port().expect("port");
    let data = case.path().join("coord");
    let _c = coordinator(port, &data, &case.logs, "coordinator", &[], None).expect("coordinator");
    let _w = worker(port, "w0", &case.logs).expect("w0");
    let large = case.write_spec("large", "max_steps = 2\n[cluster]\nmin_workers = 1");
    let text = std::fs::read_to_string(&large).expect("spec").replace(
        &case.path().join("model").display().to_string(),
        &big.display().to_string(),
    );
    std::fs::write(&large, text).expect("spec");
    case.submit_watch_succeeds(port, &large);
    let small = case.write_spec("small", "max_steps = 2\n[cluster]\nmin_workers = 1");
    case.submit_watch_succeeds(port, &small);
    let (l, s) = (
        peak_bytes(&case.path().join("large")),
        peak_bytes(&case.path().join("small")),
    );
    eprintln!("peak resident size: large run {l:.3e} B, small run after it {s:.3e} B");
    assert!(l > 0.0 && s > 0.0, "both runs report a peak");
    assert!(
        s < l - 100e6,
        "the small run's peak ({s:.3e}) is not its own: the large run's was {l:.3e}"
    );
}

/// Ranks on one host share its cores: `dpoctl local --workers 2` with no
/// thread setting in the environment — the coordinator tells each worker
/// that 2 ranks of the generation share its host, and each takes half of the
/// usable cores (at least one) for libtorch's intra-op threads, says so in
/// its log, and every step's metrics line carries the count.
#[test]
fn two_workers_on_one_host_each_take_their_share_of_its_cores() {
    let case = Case::new(24);
    let spec = case.write_spec("shared", "max_steps = 3");
    let data_dir = case.path().join("local");
    let out = std::process::Command::new(bin("dpoctl"))
        .args(["--output", "json", "local"])
        .arg(&spec)
        .args(["--workers", "2", "--data-dir"])
        .arg(&data_dir)
        .env_remove("OMP_NUM_THREADS")
        .env_remove("MKL_NUM_THREADS")
        .env_remove("DPO_THREADS")
        .env_remove("DPO_CPUS")
        .output()
        .expect("dpoctl local");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cores = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
    let share = (cores / 2).max(1);
    for w in 0..2 {
        let log = std::fs::read_to_string(data_dir.join(format!("logs/worker-{w}.log")))
            .expect("a worker log");
        assert!(
            log.contains(&format!(
                "intra_op_threads={share} cores={cores} ranks_on_host=2 source=Shared"
            )),
            "worker {w}:\n{log}"
        );
    }
    let lines = jsonl(&case.path().join("shared/metrics.jsonl"));
    assert_eq!(lines.len(), 3);
    assert!(
        lines.iter().all(|l| l["threads"] == share as f64),
        "{lines:?}"
    );
}

/// The chaos soak: 4 worker slots on etcd training with ZeRO-1 and replicas
/// while, for about a minute, a fault comes every 1–3 s (a seeded schedule):
/// a worker killed (`kill -9`) and started again as a new process, a worker
/// stopped (`SIGSTOP`) for longer than its lease and then continued, and the
/// coordinator killed (`kill -9`) twice and started again on the same etcd.
/// Every step is recorded once, and the weights are one process's.
#[test]
fn chaos_soak_every_step_once_and_the_weights_of_one_process() {
    let case = Case::new(96);
    let steps: u64 = 240;
    let extra = format!("max_steps = {steps}\nmicro_batch_size = 1\ncheckpoint_every = 20");
    let spec_path = adamw_reference_and_spec(
        &case,
        "chaos",
        &extra,
        &format!(
            "{extra}\nzero_stage = 1\nzero_replicas = 2\n[cluster]\nmin_workers = 1\nmax_workers = 4"
        ),
    );
    let out_dir = case.path().join("chaos");
    let etcd_dir = case.path().join("etcd-data");
    let (_etcd, etcd_port) =
        etcd_on_a_free_port(&etcd_dir, &case.logs, "etcd", None, &[]).expect("etcd");
    let endpoint = format!("http://127.0.0.1:{etcd_port}");
    let store = ["--store", "etcd", "--etcd", endpoint.as_str()];
    let port = free_port().expect("port");
    let data = case.path().join("coord");
    let mut c = coordinator(port, &data, &case.logs, "coordinator-0", &store, None)
        .unwrap_or_else(|e| panic!("{e}{}", case.logs()));
    let mut slots: Vec<Proc> = (0..4)
        .map(|s| worker(port, &format!("s{s}-0"), &case.logs).expect("worker"))
        .collect();
    let mut incarnation = [0u32; 4];
    case.submit_and_wait(port, &spec_path, &out_dir, 10);

    // A seeded schedule (xorshift): the same faults in the same order each run.
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut draw = |n: u64| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state % n
    };
    let lease = Duration::from_millis(4000); // the coordinator's --lease-ttl-ms in tests
    let start = std::time::Instant::now();
    let mut stopped: Vec<(usize, std::time::Instant)> = Vec::new();
    let (mut kills, mut stops, mut coordinator_kills) = (0, 0, 0);
    let signal = |p: &Proc, sig: &str| {
        let _ = std::process::Command::new("kill")
            .args([format!("-{sig}"), p.child.id().to_string()])
            .status();
    };
    while start.elapsed() < Duration::from_secs(60) && (steps_done(&out_dir) as u64) < steps - 20 {
        std::thread::sleep(Duration::from_millis(1000 + 500 * draw(5)));
        // Stopped workers continue once stopped past their lease.
        stopped.retain(|&(s, at)| {
            let due = at.elapsed() > lease + Duration::from_secs(1);
            if due {
                signal(&slots[s], "CONT");
            }
            !due
        });
        let elapsed = start.elapsed();
        // The coordinator at 15 s and 35 s, or a third and two thirds into
        // the run if it goes faster.
        let done = steps_done(&out_dir) as u64;
        if (coordinator_kills == 0 && (elapsed > Duration::from_secs(15) || done > steps / 3))
            || (coordinator_kills == 1
                && (elapsed > Duration::from_secs(35) || done > 2 * steps / 3))
        {
            c.kill();
            coordinator_kills += 1;
            eprintln!("chaos {:.1} s: coordinator killed", elapsed.as_secs_f64());
            std::thread::sleep(Duration::from_millis(300));
            c = coordinator(
                port,
                &data,
                &case.logs,
                &format!("coordinator-{coordinator_kills}"),
                &store,
                None,
            )
            .unwrap_or_else(|e| panic!("{e}{}", case.logs()));
            continue;
        }
        let s = draw(4) as usize;
        if stopped.iter().any(|&(x, _)| x == s) {
            continue;
        }
        if draw(2) == 0 {
            slots[s].kill();
            incarnation[s] += 1;
            kills += 1;
            eprintln!("chaos {:.1} s: slot {s} killed", elapsed.as_secs_f64());
            slots[s] =
                worker(port, &format!("s{s}-{}", incarnation[s]), &case.logs).expect("worker");
        } else {
            signal(&slots[s], "STOP");
            stops += 1;
            eprintln!("chaos {:.1} s: slot {s} stopped", elapsed.as_secs_f64());
            stopped.push((s, std::time::Instant::now()));
        }
    }
    for (s, _) in stopped {
        signal(&slots[s], "CONT");
    }
    eprintln!(
        "chaos: {kills} kills, {stops} stops, {coordinator_kills} coordinator kills in {:.0} s, at step {}",
        start.elapsed().as_secs_f64(),
        steps_done(&out_dir)
    );
    assert_eq!(
        coordinator_kills, 2,
        "the run ended before both coordinator kills"
    );
    assert!(kills + stops >= 10, "{kills} kills, {stops} stops");
    case.watch_succeeds(port, "chaos");
    let lines = every_step_once(&out_dir, steps);
    let generations = lines
        .last()
        .and_then(|l| l["generation"].as_u64())
        .unwrap_or(0);
    eprintln!("chaos: {generations} generations");
    case.assert_same_weights(&out_dir, "chaos soak");
}
