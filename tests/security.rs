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
    let ch = channel(url, tls).map_err(tonic::Status::internal)?;
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
    let etcd_port = free_port().expect("port");
    let _e = etcd(
        etcd_port,
        &case.path().join("etcd-data"),
        &case.logs,
        "etcd",
        Some(&pki),
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
}
