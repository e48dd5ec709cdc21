//! `dpo-coordinator`: the cluster's coordinator process.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Parser;

use dpo_coordinator::auth::{Role, Tokens};
use dpo_coordinator::{Confinement, Coordinator, Embedded, Etcd, EtcdSecurity, Settings, Store};

#[derive(Parser, Debug)]
#[command(name = "dpo-coordinator", version, about = "dpo-cluster coordinator")]
struct Cli {
    /// gRPC listen address. Loopback by default; any other address needs tokens
    /// (--tokens, DPO_TOKEN or --token-file) unless --insecure.
    #[arg(long, default_value = "127.0.0.1:7733")]
    listen: SocketAddr,
    /// Where the state store keeps its state: embedded (a file in --data-dir) or etcd.
    #[arg(long, value_enum, default_value_t = StoreKind::Embedded)]
    store: StoreKind,
    /// etcd endpoints (with --store etcd): http://, https:// or host:port (TLS
    /// when --etcd-ca is given).
    #[arg(long, value_delimiter = ',', env = "DPO_ETCD_ENDPOINTS")]
    etcd: Vec<String>,
    /// PEM bundle of the authority that signed etcd's server certificate.
    #[arg(long, env = "DPO_ETCD_CA")]
    etcd_ca: Option<PathBuf>,
    /// Client certificate for etcd (with --etcd-key), for `--client-cert-auth` etcd.
    #[arg(long, env = "DPO_ETCD_CERT", requires = "etcd_key")]
    etcd_cert: Option<PathBuf>,
    /// Private key of --etcd-cert.
    #[arg(long, env = "DPO_ETCD_KEY", requires = "etcd_cert")]
    etcd_key: Option<PathBuf>,
    /// etcd user (its password from DPO_ETCD_PASSWORD).
    #[arg(long, env = "DPO_ETCD_USER")]
    etcd_user: Option<String>,
    /// Runs' tokenized shards, streamed files and the embedded store.
    #[arg(long, default_value = "dpo-data")]
    data_dir: PathBuf,
    /// A worker silent for this long loses its place.
    #[arg(long, default_value_t = 5000)]
    lease_ttl_ms: u64,
    /// The most a client may stream in one submission (all its files), in bytes.
    /// Uploads go to disk as they arrive; memory does not grow with them.
    #[arg(long, default_value_t = 16 << 30, env = "DPO_MAX_UPLOAD_BYTES")]
    max_upload_bytes: u64,
    /// A directory whose files and subdirectories run specs may name (models,
    /// datasets, outputs, caches); repeat for several. The data dir is always
    /// allowed, except the coordinator's own entries in it (runs/, reference/,
    /// store.*). Any other path is refused at submit, without being opened.
    #[arg(
        long = "allow-path",
        value_name = "DIR",
        env = "DPO_ALLOW_PATH",
        value_delimiter = ','
    )]
    allow_path: Vec<PathBuf>,
    /// Seconds an ended run's uploads and tokenized shards are kept on the
    /// coordinator (0: removed as the run ends).
    #[arg(long, default_value_t = 0)]
    run_files_retention_s: u64,
    /// Serve the live run page at http://ADDR/ (token-protected like the API)
    /// and Prometheus metrics at http://ADDR/metrics.
    #[arg(long)]
    metrics_listen: Option<SocketAddr>,
    /// Label /metrics' per-run step gauge with each run's name and state.
    /// /metrics needs no token, so by default it only counts runs by state.
    #[arg(long)]
    metrics_run_labels: bool,
    /// File holding the bearer token (instead of DPO_TOKEN): one admin identity.
    #[arg(long, conflicts_with = "tokens")]
    token_file: Option<PathBuf>,
    /// Named identities, one `name token role` line each (roles: client,
    /// worker, admin; `#` comments). A client sees and cancels only its own
    /// runs; workers call only the worker service. DPO_TOKEN is then ignored.
    #[arg(long, env = "DPO_TOKENS_FILE")]
    tokens: Option<PathBuf>,
    /// Allow a non-loopback listen address without a token.
    #[arg(long)]
    insecure: bool,
    /// Serve gRPC over TLS with this certificate chain (PEM; with --tls-key).
    #[arg(long, env = "DPO_SERVER_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// Private key of --tls-cert (PEM).
    #[arg(long, env = "DPO_SERVER_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Require client certificates signed by this authority (PEM; mutual TLS).
    #[arg(long, env = "DPO_SERVER_TLS_CLIENT_CA", requires = "tls_cert")]
    tls_client_ca: Option<PathBuf>,
    /// Also serve grpc.health.v1 alone here, in plain text and without a token
    /// (for probes that cannot present either, such as the kubelet's).
    #[arg(long)]
    health_listen: Option<SocketAddr>,
    /// Write the bound address here once listening (for scripts; with port 0).
    #[arg(long)]
    addr_file: Option<PathBuf>,
    /// Log format on stderr.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

/// Which state store to use.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum StoreKind {
    Embedded,
    Etcd,
}

/// How logs are written on stderr.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum LogFormat {
    /// Readable lines, for a terminal.
    Text,
    /// One JSON object per line, for a cluster's log collector.
    Json,
}

/// The identities callers may present: `--tokens`, else one admin token from
/// `--token-file` or `DPO_TOKEN`, else none (authentication off).
fn read_tokens(cli: &Cli) -> anyhow::Result<Tokens> {
    if let Some(path) = &cli.tokens {
        warn_if_readable_by_others(path);
        if std::env::var_os("DPO_TOKEN").is_some() {
            tracing::warn!("--tokens is given: DPO_TOKEN is ignored");
        }
        return Ok(Tokens::read(path)?);
    }
    if let Some(path) = &cli.token_file {
        warn_if_readable_by_others(path);
        let t =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let t = t.trim().to_string();
        if t.is_empty() {
            bail!("{}: empty token", path.display());
        }
        return Ok(Tokens::single(t));
    }
    Ok(std::env::var("DPO_TOKEN")
        .ok()
        .filter(|t| !t.is_empty())
        .map(Tokens::single)
        .unwrap_or_default())
}

fn warn_if_readable_by_others(path: &std::path::Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(m) = std::fs::metadata(path)
        && m.permissions().mode() & 0o077 != 0
    {
        tracing::warn!(path = %path.display(), mode = format!("{:o}", m.permissions().mode() & 0o777), "a secrets file readable by group or others");
    }
}

fn read_pem(flag: &str, path: &std::path::Path) -> anyhow::Result<Vec<u8>> {
    let bytes = std::fs::read(path).with_context(|| format!("{flag} {}", path.display()))?;
    if !String::from_utf8_lossy(&bytes).contains("-----BEGIN ") {
        bail!("{flag} {}: not a PEM file", path.display());
    }
    Ok(bytes)
}

fn server_tls(cli: &Cli) -> anyhow::Result<Option<tonic::transport::ServerTlsConfig>> {
    let (Some(cert), Some(key)) = (&cli.tls_cert, &cli.tls_key) else {
        return Ok(None);
    };
    let identity = tonic::transport::Identity::from_pem(
        read_pem("--tls-cert", cert)?,
        read_pem("--tls-key", key)?,
    );
    let mut tls = tonic::transport::ServerTlsConfig::new().identity(identity);
    if let Some(ca) = &cli.tls_client_ca {
        tls = tls.client_ca_root(tonic::transport::Certificate::from_pem(read_pem(
            "--tls-client-ca",
            ca,
        )?));
    }
    Ok(Some(tls))
}

fn etcd_security(cli: &Cli) -> anyhow::Result<EtcdSecurity> {
    let mut security = EtcdSecurity::default();
    if cli.etcd_ca.is_some() || cli.etcd_cert.is_some() {
        let mut tls = etcd_client::TlsOptions::new();
        if let Some(ca) = &cli.etcd_ca {
            tls = tls.ca_certificate(etcd_client::Certificate::from_pem(read_pem(
                "--etcd-ca",
                ca,
            )?));
        }
        if let (Some(cert), Some(key)) = (&cli.etcd_cert, &cli.etcd_key) {
            tls = tls.identity(etcd_client::Identity::from_pem(
                read_pem("--etcd-cert", cert)?,
                read_pem("--etcd-key", key)?,
            ));
        }
        security.tls = Some(tls);
    }
    if let Some(user) = &cli.etcd_user {
        let password = std::env::var("DPO_ETCD_PASSWORD")
            .context("--etcd-user needs DPO_ETCD_PASSWORD in the environment")?;
        security.user = Some((user.clone(), password));
    }
    Ok(security)
}

/// Seconds a leader's etcd lease lives without a keep-alive.
const LEADER_TTL: i64 = 10;

/// Campaigns for leadership under `dpo/leader` (a standby coordinator waits here),
/// then keeps the lease alive in the background. Losing it ends the process: a
/// coordinator that may no longer be the leader must not go on (its writes are
/// fenced by the generation anyway).
async fn become_leader(mut client: etcd_client::Client, me: &str) -> anyhow::Result<()> {
    let lease = client.lease_grant(LEADER_TTL, None).await?.id();
    let keeper_client = client.clone();
    tokio::spawn(async move {
        let mut client = keeper_client;
        let ttl = Duration::from_secs(LEADER_TTL as u64);
        let mut last_ok = std::time::Instant::now();
        loop {
            if let Ok((mut keeper, mut stream)) = client.lease_keep_alive(lease).await {
                loop {
                    if keeper.keep_alive().await.is_err() {
                        break;
                    }
                    match stream.message().await {
                        Ok(Some(r)) if r.ttl() > 0 => last_ok = std::time::Instant::now(),
                        Ok(Some(_)) => {
                            tracing::error!("the leadership lease expired; exiting");
                            std::process::exit(3);
                        }
                        _ => break,
                    }
                    tokio::time::sleep(ttl / 4).await;
                }
            }
            if last_ok.elapsed() > ttl {
                tracing::error!("could not renew the leadership lease in time; exiting");
                std::process::exit(3);
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    });
    tracing::info!(lease, "campaigning for leadership (a standby waits here)");
    // An etcd restart breaks a pending campaign: campaign again (same lease).
    loop {
        match client.campaign("dpo/leader", me, lease).await {
            Ok(_) => break,
            Err(e) => {
                tracing::warn!(error = %e, "campaign interrupted; campaigning again");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
    tracing::info!("elected leader");
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    if cli.log_format == LogFormat::Json {
        builder.json().init();
    } else {
        builder.init();
    }
    let tokens = std::sync::Arc::new(read_tokens(&cli)?);
    if !cli.listen.ip().is_loopback() && !tokens.enabled() && !cli.insecure {
        bail!(
            "--listen {}: a non-loopback address needs tokens (--tokens, DPO_TOKEN or --token-file), or --insecure",
            cli.listen
        );
    }
    let tls = server_tls(&cli)?;
    if !cli.listen.ip().is_loopback() && tls.is_none() {
        tracing::warn!(
            listen = %cli.listen,
            "serving without TLS on a non-loopback address: the token crosses the network in clear text (give --tls-cert/--tls-key)"
        );
    }
    let health = match cli.health_listen {
        Some(h) => {
            let listener = tokio::net::TcpListener::bind(h)
                .await
                .with_context(|| format!("--health-listen {h}"))?;
            Some(dpo_coordinator::service::spawn_health(listener).await)
        }
        None => None,
    };
    std::fs::create_dir_all(&cli.data_dir)
        .with_context(|| format!("--data-dir {}", cli.data_dir.display()))?;
    let store = match cli.store {
        StoreKind::Embedded => Store::Embedded(Embedded::open(&cli.data_dir)?),
        StoreKind::Etcd => {
            if cli.etcd.is_empty() {
                bail!("--store etcd needs --etcd URL[,URL...]");
            }
            let etcd = Etcd::connect(&cli.etcd, etcd_security(&cli)?).await?;
            become_leader(etcd.client(), &cli.listen.to_string()).await?;
            Store::Etcd(Box::new(etcd))
        }
    };
    let confinement = Confinement::new(&cli.allow_path, &cli.data_dir).context("--allow-path")?;
    tracing::info!(allowed = ?confinement.roots().collect::<Vec<_>>(), "paths run specs may name");
    let settings = Settings {
        // Resolved once (the operator's own folder): the files the
        // coordinator keeps in it are opened by walking this path through
        // no link.
        data_dir: std::fs::canonicalize(&cli.data_dir)
            .with_context(|| format!("--data-dir {}", cli.data_dir.display()))?,
        lease_ttl: Duration::from_millis(cli.lease_ttl_ms.max(200)),
        max_upload_bytes: cli.max_upload_bytes,
        confinement,
        run_files_retention: Duration::from_secs(cli.run_files_retention_s),
    };
    let coordinator = Coordinator::open(store, settings).await?;
    let listener = tokio::net::TcpListener::bind(cli.listen)
        .await
        .with_context(|| format!("binding {}", cli.listen))?;
    let addr = listener.local_addr()?;
    tracing::info!(%addr, auth = tokens.enabled(), clients = tokens.count(Role::Client), workers = tokens.count(Role::Worker), admins = tokens.count(Role::Admin), tls = tls.is_some(), mutual_tls = cli.tls_client_ca.is_some(), "coordinator listening");
    if let Some(path) = &cli.addr_file {
        dpo_data::atomic::write(path, addr.to_string().as_bytes())
            .with_context(|| format!("--addr-file {}", path.display()))?;
    }
    if let Some(reporter) = &health {
        dpo_coordinator::service::set_ready(reporter).await;
    }
    if let Some(m) = cli.metrics_listen {
        let c = coordinator.clone();
        let t = tokens.clone();
        let options = dpo_coordinator::web::HttpOptions {
            run_labels: cli.metrics_run_labels,
        };
        tokio::spawn(async move {
            if let Err(e) = dpo_coordinator::web::serve_http(c, t, m, options).await {
                tracing::error!(error = %e, "HTTP endpoint (run page, /metrics)");
            }
        });
    }
    // SIGTERM (what Kubernetes sends) or SIGINT: stop taking requests, end the
    // watch streams, give requests in flight SHUTDOWN_GRACE to finish (workers
    // whose requests are cut retry them against the restarted coordinator and
    // keep their state), then make sure every decision taken so far has reached
    // the store, and exit.
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let (stopping_tx, stopping) = tokio::sync::oneshot::channel::<()>();
    let c = coordinator.clone();
    let shutdown = async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        tracing::info!(
            grace_ms = SHUTDOWN_GRACE.as_millis() as u64,
            "shutting down"
        );
        c.end_watches();
        let _ = stopping_tx.send(());
    };
    let serve =
        dpo_coordinator::service::serve(coordinator.clone(), listener, tokens, tls, shutdown);
    tokio::pin!(serve);
    tokio::select! {
        served = &mut serve => served?,
        _ = async {
            if stopping.await.is_ok() {
                tokio::time::sleep(SHUTDOWN_GRACE).await;
            } else {
                std::future::pending::<()>().await;
            }
        } => tracing::warn!("requests still open after the grace period: cutting them"),
    }
    coordinator.flush().await;
    tracing::info!("state persisted; exiting");
    Ok(())
}

/// How long a stopping coordinator waits for requests in flight.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);
