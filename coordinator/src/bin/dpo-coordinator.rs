//! `dpo-coordinator`: the cluster's coordinator process.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Parser;

use dpo_coordinator::{Coordinator, Embedded, Settings, Store};

#[derive(Parser, Debug)]
#[command(name = "dpo-coordinator", version, about = "dpo-cluster coordinator")]
struct Cli {
    /// gRPC listen address. Loopback by default; any other address needs a token
    /// (DPO_TOKEN or --token-file) unless --insecure.
    #[arg(long, default_value = "127.0.0.1:7733")]
    listen: SocketAddr,
    /// Where the state store keeps its state: embedded (a file in --data-dir) or etcd.
    #[arg(long, default_value = "embedded", value_parser = ["embedded", "etcd"])]
    store: String,
    /// etcd endpoints (with --store etcd).
    #[arg(long, value_delimiter = ',')]
    etcd: Vec<String>,
    /// Runs' tokenized shards, streamed files and the embedded store.
    #[arg(long, default_value = "dpo-data")]
    data_dir: PathBuf,
    /// A worker silent for this long loses its place.
    #[arg(long, default_value_t = 5000)]
    lease_ttl_ms: u64,
    /// Serve Prometheus metrics at http://ADDR/metrics.
    #[arg(long)]
    metrics_listen: Option<SocketAddr>,
    /// File holding the bearer token (instead of DPO_TOKEN).
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// Allow a non-loopback listen address without a token.
    #[arg(long)]
    insecure: bool,
    /// Write the bound address here once listening (for scripts; with port 0).
    #[arg(long)]
    addr_file: Option<PathBuf>,
    /// Log format on stderr.
    #[arg(long, default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
}

fn read_token(cli: &Cli) -> anyhow::Result<Option<String>> {
    if let Some(path) = &cli.token_file {
        let t =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let t = t.trim().to_string();
        if t.is_empty() {
            bail!("{}: empty token", path.display());
        }
        return Ok(Some(t));
    }
    Ok(std::env::var("DPO_TOKEN").ok().filter(|t| !t.is_empty()))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if cli.log_format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
    let token = read_token(&cli)?;
    if !cli.listen.ip().is_loopback() && token.is_none() && !cli.insecure {
        bail!(
            "--listen {}: a non-loopback address needs a token (DPO_TOKEN or --token-file), or --insecure",
            cli.listen
        );
    }
    let store = match cli.store.as_str() {
        "embedded" => Store::Embedded(Embedded::open(&cli.data_dir)?),
        other => bail!("--store {other}: not available in this build"),
    };
    let settings = Settings {
        data_dir: std::path::absolute(&cli.data_dir)?,
        lease_ttl: Duration::from_millis(cli.lease_ttl_ms.max(200)),
    };
    let coordinator = Coordinator::open(store, settings).await?;
    let listener = tokio::net::TcpListener::bind(cli.listen)
        .await
        .with_context(|| format!("binding {}", cli.listen))?;
    let addr = listener.local_addr()?;
    tracing::info!(%addr, auth = token.is_some(), "coordinator listening");
    if let Some(path) = &cli.addr_file {
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, addr.to_string())?;
        std::fs::rename(&tmp, path)?;
    }
    if let Some(m) = cli.metrics_listen {
        let c = coordinator.clone();
        tokio::spawn(async move {
            if let Err(e) = dpo_coordinator::service::serve_metrics(c, m).await {
                tracing::error!(error = %e, "metrics endpoint");
            }
        });
    }
    let shutdown = async {
        let _ = tokio::signal::ctrl_c().await;
        tracing::info!("shutting down");
    };
    dpo_coordinator::service::serve(coordinator, listener, token, shutdown).await
}
