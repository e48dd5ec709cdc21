//! The security rules against real servers: TLS (server and client
//! certificates) end to end between coordinator, workers and `dpoctl`; the bearer
//! token on every call; the plain-text health port for probes; a non-loopback
//! listen refused without a token; the etcd store over TLS with a client
//! certificate; no secret in any log.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use dpo_e2e::*;
use dpo_proto::client::{BearerToken, ClientTls, channel};
use dpo_proto::v1::{self, run_service_client::RunServiceClient};

const TOKEN: &str = "e2e-token-5f1c9a";

fn s(p: &Path) -> String {
    p.display().to_string()
}

/// The client-side TLS environment for `dpo-worker` and `dpoctl`.
fn tls_env(cmd: &mut Command, pki: &Pki) {
    cmd.env("DPO_TOKEN", TOKEN)
        .env("DPO_TLS_CA", &pki.ca)
        .env("DPO_TLS_CERT", &pki.client_cert)
        .env("DPO_TLS_KEY", &pki.client_key);
}

fn tls_dpoctl(url: &str, pki: &Pki, args: &[&str]) -> std::process::Output {
    let mut cmd = Command::new(bin("dpoctl"));
    cmd.args(["--coordinator", url, "--output", "json"])
        .args(args);
    tls_env(&mut cmd, pki);
    cmd.output().expect("dpoctl")
}

fn tls_worker(url: &str, pki: &Pki, name: &str, logs: &Path) -> Proc {
    let mut cmd = Command::new(bin("dpo-worker"));
    cmd.args(["--coordinator", url, "--device", "cpu", "--worker-id", name]);
    tls_env(&mut cmd, pki);
    Proc::spawn(name, &mut cmd, logs).expect("worker")
}

/// Submits `spec` and waits for it to succeed, all over TLS.
fn train_over_tls(case: &Case, url: &str, pki: &Pki, spec: &Path, run: &str) {
    let out = tls_dpoctl(url, pki, &["submit", &s(spec)]);
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stderr),
        case.logs()
    );
    let out = tls_dpoctl(url, pki, &["watch", run]);
    assert!(
        out.status.success(),
        "{}{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        case.logs()
    );
}

fn no_secret_in_logs(case: &Case) {
    for e in std::fs::read_dir(&case.logs).expect("logs").flatten() {
        let text = std::fs::read_to_string(e.path()).unwrap_or_default();
        assert!(
            !text.contains(TOKEN),
            "{} prints the token",
            e.path().display()
        );
        assert!(
            !text.contains("PRIVATE KEY"),
            "{} prints a key",
            e.path().display()
        );
    }
}

async fn list_runs(
    url: &str,
    tls: &ClientTls,
    token: Option<&str>,
) -> Result<usize, tonic::Status> {
    let ch = channel(url, tls).map_err(|e| tonic::Status::internal(e.to_string()))?;
    let token = BearerToken::new(token.map(str::to_string)).expect("token");
    let mut c = RunServiceClient::with_interceptor(ch, token);
    Ok(c.list_runs(v1::ListRunsRequest {})
        .await?
        .into_inner()
        .runs
        .len())
}

#[test]
fn tls_with_client_certificates_and_tokens_end_to_end() {
    let case = Case::new(24);
    let pki = pki(&case.path().join("pki")).expect("pki");
    let port = free_port().expect("port");
    let health_port = free_port().expect("port");
    let data = case.path().join("coord");
    let health = format!("127.0.0.1:{health_port}");
    let args = [
        "--tls-cert".to_string(),
        s(&pki.server_cert),
        "--tls-key".into(),
        s(&pki.server_key),
        "--tls-client-ca".into(),
        s(&pki.ca),
        "--health-listen".into(),
        health.clone(),
    ];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let _c = coordinator(port, &data, &case.logs, "coordinator", &args, Some(TOKEN))
        .unwrap_or_else(|e| panic!("{e}{}", case.logs()));
    let url = format!("https://localhost:{port}");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let full = ClientTls::from_files(
            Some(&s(&pki.ca)),
            Some(&s(&pki.client_cert)),
            Some(&s(&pki.client_key)),
            None,
        )
        .expect("tls");
        // Everything right: served.
        assert_eq!(
            list_runs(&url, &full, Some(TOKEN)).await.expect("listed"),
            0
        );
        // The IP address is in the certificate too.
        let by_ip = format!("https://127.0.0.1:{port}");
        list_runs(&by_ip, &full, Some(TOKEN)).await.expect("by IP");
        // Right certificates, missing or wrong token.
        for token in [None, Some("wrong")] {
            let e = list_runs(&url, &full, token).await.expect_err("no token");
            assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e}");
        }
        // Plain text to the TLS port.
        let plain = format!("http://127.0.0.1:{port}");
        let e = list_runs(&plain, &ClientTls::default(), Some(TOKEN))
            .await
            .expect_err("plain text");
        assert_ne!(e.code(), tonic::Code::Ok);
        // A client that trusts another authority refuses the server.
        let other = ClientTls::from_files(
            Some(&s(&pki.other_ca)),
            Some(&s(&pki.client_cert)),
            Some(&s(&pki.client_key)),
            None,
        )
        .expect("tls");
        let e = list_runs(&url, &other, Some(TOKEN))
            .await
            .expect_err("untrusted server");
        assert_eq!(e.code(), tonic::Code::Unavailable, "{e}");
        // Mutual TLS: the server refuses a client without a certificate.
        let anonymous = ClientTls::from_files(Some(&s(&pki.ca)), None, None, None).expect("tls");
        let e = list_runs(&url, &anonymous, Some(TOKEN))
            .await
            .expect_err("no client certificate");
        assert_ne!(e.code(), tonic::Code::Ok);
        // A name the certificate does not carry is refused; naming it fixes that.
        let renamed = ClientTls::from_files(
            Some(&s(&pki.ca)),
            Some(&s(&pki.client_cert)),
            Some(&s(&pki.client_key)),
            Some("coordinator.example".into()),
        )
        .expect("tls");
        let e = list_runs(&url, &renamed, Some(TOKEN))
            .await
            .expect_err("wrong name");
        assert_eq!(e.code(), tonic::Code::Unavailable, "{e}");
        // The probe port: plain text, no token, health only.
        let ch = channel(&format!("http://{health}"), &ClientTls::default()).expect("channel");
        let mut h = tonic_health::pb::health_client::HealthClient::new(ch.clone());
        for service in ["", "dpo.v1.RunService", "dpo.v1.WorkerService"] {
            let r = h
                .check(tonic_health::pb::HealthCheckRequest {
                    service: service.into(),
                })
                .await
                .expect("health");
            assert_eq!(
                r.into_inner().status,
                tonic_health::pb::health_check_response::ServingStatus::Serving as i32,
                "{service:?}"
            );
        }
        let mut runs = RunServiceClient::new(ch);
        let e = runs
            .list_runs(v1::ListRunsRequest {})
            .await
            .expect_err("the probe port serves health only");
        assert_eq!(e.code(), tonic::Code::Unimplemented, "{e}");
    });
    // A run trained end to end over TLS: a worker and dpoctl with certificates.
    let _w = tls_worker(&url, &pki, "w0", &case.logs);
    let spec = case.write_spec("tls-run", "max_steps = 6\n[cluster]\nmin_workers = 1");
    train_over_tls(&case, &url, &pki, &spec, "tls-run");
    assert_eq!(steps_done(&case.path().join("tls-run")), 6);
    // dpoctl without the authority's certificate fails, naming the problem.
    let out = Command::new(bin("dpoctl"))
        .args(["--coordinator", &url, "list"])
        .env("DPO_TOKEN", TOKEN)
        .env_remove("DPO_TLS_CA")
        .output()
        .expect("dpoctl");
    assert!(!out.status.success());
    no_secret_in_logs(&case);
}

#[test]
fn a_non_loopback_listen_needs_a_token_unless_insecure() {
    let dir = tempfile::tempdir().expect("tmp");
    let port = free_port().expect("port");
    let out = Command::new(bin("dpo-coordinator"))
        .args(["--listen", &format!("0.0.0.0:{port}")])
        .arg("--data-dir")
        .arg(dir.path())
        .env_remove("DPO_TOKEN")
        .output()
        .expect("coordinator");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("needs tokens"), "{err}");
    // With a token it serves; and with --insecure and no token.
    for (token, extra) in [(Some(TOKEN), None), (None, Some("--insecure"))] {
        let logs = dir.path().join("logs");
        let args: Vec<&str> = extra.into_iter().collect();
        let mut cmd = Command::new(bin("dpo-coordinator"));
        cmd.args(["--listen", &format!("0.0.0.0:{port}")])
            .arg("--data-dir")
            .arg(dir.path())
            .arg("--addr-file")
            .arg(dir.path().join("any.addr"))
            .args(&args)
            .env_remove("DPO_TOKEN");
        if let Some(t) = token {
            cmd.env("DPO_TOKEN", t);
        }
        let _ = std::fs::remove_file(dir.path().join("any.addr"));
        let mut p = Proc::spawn("any", &mut cmd, &logs).expect("spawn");
        wait_for(Duration::from_secs(20), || {
            assert!(!p.exited(), "{token:?} {extra:?}: exited");
            Ok(dir.path().join("any.addr").exists())
        })
        .expect("listening");
        p.kill();
        let log = std::fs::read_to_string(logs.join("any.log")).unwrap_or_default();
        assert!(log.contains("without TLS"), "the clear-text warning: {log}");
    }
}

#[test]
fn the_etcd_store_over_tls_with_a_client_certificate() {
    let case = Case::new(24);
    let pki = pki(&case.path().join("pki")).expect("pki");
    let (_e, etcd_port) = etcd_on_a_free_port(
        &case.path().join("etcd-data"),
        &case.logs,
        "etcd",
        Some(&pki),
        &[],
    )
    .expect("etcd");
    let endpoint = format!("https://127.0.0.1:{etcd_port}");
    let args = [
        "--store".to_string(),
        "etcd".into(),
        "--etcd".into(),
        endpoint,
        "--etcd-ca".into(),
        s(&pki.ca),
        "--etcd-cert".into(),
        s(&pki.client_cert),
        "--etcd-key".into(),
        s(&pki.client_key),
    ];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let port = free_port().expect("port");
    let _c = coordinator(
        port,
        &case.path().join("coord"),
        &case.logs,
        "coordinator",
        &args,
        None,
    )
    .unwrap_or_else(|e| panic!("{e}{}", case.logs()));
    let _w = worker(port, "w0", &case.logs).expect("worker");
    let spec = case.write_spec("etcd-tls", "max_steps = 4\n[cluster]\nmin_workers = 1");
    case.submit_and_wait(port, &spec, &case.path().join("etcd-tls"), 4);
    case.watch_succeeds(port, "etcd-tls");
    assert_eq!(steps_done(&case.path().join("etcd-tls")), 4);
}

#[test]
fn dpoctl_local_ignores_tls_settings_meant_for_a_remote_cluster() {
    // A shell set up for a remote TLS cluster (wrong for loopback on purpose)
    // still runs `dpoctl local` in plain text.
    let case = Case::new(24);
    let pki = pki(&case.path().join("pki")).expect("pki");
    let spec = case.write_spec("local", "max_steps = 2");
    let out = Command::new(bin("dpoctl"))
        .args(["--output", "json", "local"])
        .arg(&spec)
        .args(["--workers", "1"])
        .env("DPO_TLS_CA", &pki.other_ca)
        .env("DPO_TLS_DOMAIN", "elsewhere.example")
        .env("DPO_SERVER_TLS_CERT", "/nonexistent.pem")
        .env("DPO_SERVER_TLS_KEY", "/nonexistent.key")
        .env("OMP_NUM_THREADS", "1")
        .output()
        .expect("dpoctl local");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(steps_done(&case.path().join("local")), 2);
    // In text mode it says where the run page is.
    let spec = case.write_spec("local-text", "max_steps = 1");
    let out = Command::new(bin("dpoctl"))
        .arg("local")
        .arg(&spec)
        .args(["--workers", "1"])
        .env("OMP_NUM_THREADS", "1")
        .output()
        .expect("dpoctl local");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("run page: http://127.0.0.1:"), "{err}");
}

/// The identities of [`named_identities_own_their_runs_and_roles_gate_the_services`].
const ALICE: &str = "alice-7d0c52e4b9f1a8c3";
const BOB: &str = "bob-3e8f1a6c0d2b9e74";
const GPU: &str = "gpu-b61d09f4e2a7c835";
const OPS: &str = "ops-90a4c7e15f3b6d28";

async fn runs_as(
    port: u16,
    token: Option<&str>,
) -> RunServiceClient<
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, BearerToken>,
> {
    let ch = channel(&format!("http://127.0.0.1:{port}"), &ClientTls::default()).expect("channel");
    RunServiceClient::with_interceptor(
        ch,
        BearerToken::new(token.map(str::to_string)).expect("token"),
    )
}

#[test]
fn named_identities_own_their_runs_and_roles_gate_the_services() {
    use std::os::unix::fs::PermissionsExt;
    let case = Case::new(24);
    let tokens = case.path().join("tokens");
    std::fs::write(
        &tokens,
        format!(
            "# name token role\nalice {ALICE} client\nbob {BOB} client\ngpu-1 {GPU} worker\nops {OPS} admin\n"
        ),
    )
    .expect("tokens");
    std::fs::set_permissions(&tokens, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let port = free_port().expect("port");
    let data = case.path().join("coord");
    let _c = coordinator(
        port,
        &data,
        &case.logs,
        "coordinator",
        &["--tokens", &s(&tokens)],
        None,
    )
    .expect("coordinator");
    // The worker presents the worker identity's token.
    let _w = Proc::spawn(
        "gpu-1",
        Command::new(bin("dpo-worker"))
            .args(["--coordinator", &format!("http://127.0.0.1:{port}")])
            .args(["--device", "cpu", "--worker-id", "gpu-1"])
            .env("DPO_TOKEN", GPU),
        &case.logs,
    )
    .expect("worker");
    let spec =
        dpo_proto::RunSpec::from_file(&case.write_spec("alices", "max_steps = 3")).expect("spec");
    let header = v1::SubmitChunk {
        part: Some(v1::submit_chunk::Part::Header(v1::SubmitHeader {
            spec_json: serde_json::to_string(&spec).expect("json"),
            streamed_files: Vec::new(),
            files: Vec::new(),
        })),
    };
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        // A worker cannot submit; a client can.
        let e = runs_as(port, Some(GPU))
            .await
            .submit(tokio_stream::iter([header.clone()]))
            .await
            .expect_err("a worker submitting");
        assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e}");
        let run = runs_as(port, Some(ALICE))
            .await
            .submit(tokio_stream::iter([header]))
            .await
            .expect("alice submits")
            .into_inner();
        assert_eq!(run.owner, "alice");
        // The worker identity trains it.
        let t = std::time::Instant::now();
        loop {
            let r = runs_as(port, Some(ALICE))
                .await
                .get_run(v1::GetRunRequest {
                    run: run.id.clone(),
                })
                .await
                .expect("alice sees her run")
                .into_inner();
            if r.state == v1::RunState::Succeeded as i32 {
                break;
            }
            assert!(
                t.elapsed() < Duration::from_secs(120) && !r.ended(),
                "{r:?}{}",
                case.logs()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        // Bob sees nothing of it, by id, prefix or name, and cannot cancel it.
        let mut bob = runs_as(port, Some(BOB)).await;
        let listed = bob
            .list_runs(v1::ListRunsRequest {})
            .await
            .expect("bob lists")
            .into_inner()
            .runs;
        assert!(listed.is_empty(), "{listed:?}");
        for what in [
            run.id.clone(),
            run.id[..8].to_string(),
            "alices".to_string(),
        ] {
            let e = bob
                .get_run(v1::GetRunRequest { run: what.clone() })
                .await
                .expect_err("another's run");
            assert_eq!(e.code(), tonic::Code::NotFound, "{what}: {e}");
            let e = bob
                .cancel_run(v1::CancelRunRequest { run: what.clone() })
                .await
                .expect_err("another's run");
            assert_eq!(e.code(), tonic::Code::NotFound, "{what}: {e}");
            let e = bob
                .watch_run(v1::WatchRunRequest { run: what.clone() })
                .await
                .map(|_| ())
                .expect_err("another's run");
            assert_eq!(e.code(), tonic::Code::NotFound, "{what}: {e}");
        }
        // The admin sees every run, with its owner.
        let all = runs_as(port, Some(OPS))
            .await
            .list_runs(v1::ListRunsRequest {})
            .await
            .expect("admin lists")
            .into_inner()
            .runs;
        assert_eq!(
            all.iter().map(|r| r.owner.as_str()).collect::<Vec<_>>(),
            ["alice"]
        );
        // A client cannot act as a worker.
        let ch =
            channel(&format!("http://127.0.0.1:{port}"), &ClientTls::default()).expect("channel");
        let mut fake = dpo_proto::v1::worker_service_client::WorkerServiceClient::with_interceptor(
            ch.clone(),
            BearerToken::new(Some(ALICE.into())).expect("token"),
        );
        let e = fake
            .register(v1::RegisterRequest {
                worker_id: "fake".into(),
                collective_addr: "127.0.0.1:1".into(),
                ..Default::default()
            })
            .await
            .expect_err("a client registering as a worker");
        assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e}");
        // Reflection needs a token (any identity); health stays open for probes.
        use tonic_reflection::pb::v1::{
            ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
            server_reflection_request::MessageRequest,
        };
        let ask = || {
            tokio_stream::iter([ServerReflectionRequest {
                host: String::new(),
                message_request: Some(MessageRequest::ListServices(String::new())),
            }])
        };
        let e = ServerReflectionClient::new(ch.clone())
            .server_reflection_info(ask())
            .await
            .map(|_| ())
            .expect_err("reflection without a token");
        assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e}");
        let mut answers = ServerReflectionClient::with_interceptor(
            ch.clone(),
            BearerToken::new(Some(BOB.into())).expect("token"),
        )
        .server_reflection_info(ask())
        .await
        .expect("reflection with a token")
        .into_inner();
        let answer = answers.message().await.expect("answer").expect("one");
        assert!(
            format!("{answer:?}").contains("dpo.v1.RunService"),
            "{answer:?}"
        );
        let health = tonic_health::pb::health_client::HealthClient::new(ch)
            .check(tonic_health::pb::HealthCheckRequest {
                service: String::new(),
            })
            .await
            .expect("health without a token")
            .into_inner();
        assert_eq!(
            health.status,
            tonic_health::pb::health_check_response::ServingStatus::Serving as i32
        );
    });
}
