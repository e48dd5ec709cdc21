//! `dpoctl`: run dpo-cluster on this machine (`local`), or drive a coordinator
//! (`submit`, `status`, `watch`, `list`, `cancel`, `workers`).

use std::path::{Path, PathBuf};
use std::process::{Child, Command as Process, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use dpo_proto::RunSpec;
use dpo_proto::client::{BearerToken, ClientTls, channel};
use dpo_proto::v1::{self, RunState, run_service_client::RunServiceClient};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{Value, json};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

/// `println!` that ends the process quietly when stdout is closed (`dpoctl list |
/// head`), where `println!` would panic on the broken pipe.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        if let Err(e) = writeln!(std::io::stdout().lock(), $($arg)*) {
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                std::process::exit(0);
            }
            eprintln!("dpoctl: writing to stdout: {e}");
            std::process::exit(1);
        }
    }};
}

type Client = RunServiceClient<InterceptedService<Channel, BearerToken>>;

#[derive(Parser, Debug)]
#[command(name = "dpoctl", version, about = "dpo-cluster command line")]
struct Cli {
    /// The coordinator (http://host:port).
    #[arg(
        long,
        global = true,
        env = "DPO_COORDINATOR",
        default_value = "http://127.0.0.1:7733"
    )]
    coordinator: String,
    /// text (progress bars, tables) or json (one object per line, for scripts).
    #[arg(long, global = true, value_enum, default_value_t = OutputFormat::Text)]
    output: OutputFormat,
    #[command(subcommand)]
    command: Command,
}

/// How results are printed.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum OutputFormat {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Train a run on this machine: starts a coordinator (embedded store) and N
    /// worker processes, submits the run, shows progress, prints a summary, stops.
    Local {
        /// The run spec (TOML).
        spec: PathBuf,
        /// Worker processes to start.
        #[arg(long, default_value_t = 2)]
        workers: usize,
        /// The coordinator's data directory (default: a fresh one under train.output).
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
    /// Submit a run spec. Its datasets (files, globs of shards, folders such as
    /// `datasets.save_to_disk` writes) are streamed to the coordinator from
    /// here; the model directory must be readable by it and the workers.
    Submit {
        spec: PathBuf,
        /// Keep watching until the run ends.
        #[arg(long)]
        watch: bool,
        /// The dataset paths are on the cluster's shared volume: send them as
        /// they are, for the coordinator to check and read.
        #[arg(long, alias = "no-upload")]
        remote_data: bool,
    },
    /// One run's state.
    Status { run: String },
    /// Follow a run until it ends.
    Watch { run: String },
    /// Every run the coordinator knows.
    List,
    /// Cancel a run.
    Cancel { run: String },
    /// The registered workers.
    Workers,
    /// Print a shell completion script, e.g. `dpoctl completion bash >
    /// /etc/bash_completion.d/dpoctl`, or `source <(dpoctl completion bash)`.
    Completion {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

fn state_name(s: i32) -> &'static str {
    match RunState::try_from(s) {
        Ok(RunState::Queued) => "queued",
        Ok(RunState::Preparing) => "preparing",
        Ok(RunState::Waiting) => "waiting",
        Ok(RunState::Running) => "running",
        Ok(RunState::Succeeded) => "succeeded",
        Ok(RunState::Failed) => "failed",
        Ok(RunState::Cancelled) => "cancelled",
        _ => "unknown",
    }
}

fn metrics_json(m: &[v1::Metric]) -> Value {
    let mut o = serde_json::Map::new();
    for x in m {
        o.insert(x.name.clone(), json!(x.value));
    }
    Value::Object(o)
}

fn rollback_json(b: &v1::Rollback) -> Value {
    json!({"generation": b.generation, "from_step": b.from_step, "to_step": b.to_step, "reason": b.reason})
}

fn run_json(r: &v1::Run) -> Value {
    json!({
        "id": r.id, "name": r.name, "owner": r.owner, "state": state_name(r.state),
        "step": r.step, "total_steps": r.total_steps, "generation": r.generation,
        "world_size": r.world_size, "checkpoint_step": r.checkpoint_step,
        "output": r.output, "error": r.error,
        "train_examples": r.train_examples, "eval_examples": r.eval_examples,
        "reference_total": r.reference_total, "reference_cached": r.reference_cached,
        "metrics": metrics_json(&r.last_metrics), "eval": metrics_json(&r.last_eval),
        "rollbacks": r.rollbacks.iter().map(rollback_json).collect::<Vec<_>>(),
    })
}

fn metric(m: &[v1::Metric], name: &str) -> Option<f64> {
    m.iter().find(|x| x.name == name).map(|x| x.value)
}

fn client(url: &str) -> anyhow::Result<Client> {
    client_with(url, &ClientTls::from_env()?)
}

fn client_with(url: &str, tls: &ClientTls) -> anyhow::Result<Client> {
    let token = BearerToken::from_env()?;
    let ch = channel(url, tls)?;
    Ok(RunServiceClient::with_interceptor(ch, token).max_decoding_message_size(64 << 20))
}

fn status_err(what: &str, s: tonic::Status) -> anyhow::Error {
    match s.code() {
        tonic::Code::Unavailable => {
            anyhow::anyhow!("{what}: cannot reach the coordinator ({})", s.message())
        }
        tonic::Code::Unauthenticated => {
            anyhow::anyhow!("{what}: {} (check DPO_TOKEN)", s.message())
        }
        _ => anyhow::anyhow!("{what}: {}", s.message()),
    }
}

/// Streams the spec (as JSON) and the dataset files that exist here.
async fn submit(
    c: &mut Client,
    spec_path: &Path,
    upload: bool,
    workers: Option<usize>,
) -> anyhow::Result<v1::Run> {
    let mut spec = RunSpec::from_file(spec_path)?;
    if let Some(n) = workers {
        // `dpoctl local --workers N` starts N workers together: train on all N.
        spec.cluster.max_workers = spec.cluster.max_workers.max(n);
        spec.cluster.min_workers = n.max(1);
    }
    let mut keys: Vec<(&str, PathBuf)> = Vec::new();
    if upload {
        keys.push(("data.train", spec.data.train.clone()));
        if let Some(e) = &spec.data.eval {
            keys.push(("data.eval", e.clone()));
        }
        if let Some(f) = spec.data.negatives.as_ref().and_then(|n| n.file()) {
            keys.push(("data.negatives", f.to_path_buf()));
        }
    }
    let mut files: Vec<Upload> = Vec::new();
    for (key, path) in &keys {
        files.extend(dataset_files(key, path, spec.data.file_format)?);
    }
    let header = v1::SubmitHeader {
        spec_json: serde_json::to_string(&spec)?,
        streamed_files: keys.iter().map(|(k, _)| k.to_string()).collect(),
        files: files
            .iter()
            .map(|u| v1::StreamedFile {
                key: u.key.clone(),
                name: u.name.clone(),
            })
            .collect(),
    };
    // The files are read a chunk at a time as the stream sends them: a
    // multi-GB dataset is never held in memory here either.
    let (tx, rx) = tokio::sync::mpsc::channel::<v1::SubmitChunk>(4);
    let reader = tokio::spawn(async move {
        let header = v1::SubmitChunk {
            part: Some(v1::submit_chunk::Part::Header(header)),
        };
        if tx.send(header).await.is_err() {
            return Ok(());
        }
        let sent = send_files(&tx, files).await;
        if sent.is_err() {
            // The stream must not end as if the files were whole: a chunk for
            // a key nobody announced makes the coordinator refuse the run.
            let poison = v1::SubmitChunk {
                part: Some(v1::submit_chunk::Part::File(v1::FileChunk {
                    key: "(upload failed)".into(),
                    data: Vec::new(),
                    name: String::new(),
                })),
            };
            let _ = tx.send(poison).await;
        }
        sent
    });
    let run = c
        .submit(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .map(|r| r.into_inner())
        .map_err(|s| status_err("submit", s));
    // A file that could not be read is the error to show, not the refusal.
    reader.await??;
    run
}

/// One file of a dataset to stream: its spec key, its name there, its path here.
#[derive(Debug, Clone)]
struct Upload {
    key: String,
    name: String,
    path: PathBuf,
}

/// The files that make up `path` here (a file, a glob's matches, a folder's
/// shards, a `save_to_disk` folder with its `state.json`); a path that does not
/// exist here is an error that points at `--remote-data`.
fn dataset_files(
    key: &str,
    path: &Path,
    format: dpo_proto::FileFormat,
) -> anyhow::Result<Vec<Upload>> {
    if !path.exists() && !dpo_data::records::is_multi(path) {
        bail!(
            "{key}: {} does not exist here; for a dataset on the cluster's shared volume, \
             pass --remote-data",
            path.display()
        );
    }
    let mut paths: Vec<PathBuf> = dpo_data::records::files(path, format)
        .map_err(|e| anyhow::anyhow!("{key}: {e}"))?
        .into_iter()
        .map(|(p, _)| p)
        .collect();
    if path.is_dir() {
        for meta in ["state.json", "dataset_info.json"] {
            if path.join(meta).is_file() {
                paths.push(path.join(meta));
            }
        }
    }
    paths
        .into_iter()
        .map(|p| {
            let name = p
                .file_name()
                .and_then(|n| n.to_str())
                .ok_or_else(|| anyhow::anyhow!("{key}: {}: not a UTF-8 file name", p.display()))?
                .to_string();
            Ok(Upload {
                key: key.to_string(),
                name,
                path: p,
            })
        })
        .collect()
}

/// Sends `files` as 1 MiB chunks, reading each chunk as it goes.
async fn send_files(
    tx: &tokio::sync::mpsc::Sender<v1::SubmitChunk>,
    files: Vec<Upload>,
) -> anyhow::Result<()> {
    use tokio::io::AsyncReadExt;
    for Upload { key, name, path } in files {
        let mut f = tokio::fs::File::open(&path)
            .await
            .with_context(|| format!("reading {}", path.display()))?;
        loop {
            let mut buf = vec![0u8; 1 << 20];
            let n = f
                .read(&mut buf)
                .await
                .with_context(|| format!("reading {}", path.display()))?;
            if n == 0 {
                break;
            }
            buf.truncate(n);
            let chunk = v1::SubmitChunk {
                part: Some(v1::submit_chunk::Part::File(v1::FileChunk {
                    key: key.clone(),
                    data: buf,
                    name: name.clone(),
                })),
            };
            if tx.send(chunk).await.is_err() {
                return Ok(()); // the call ended; its status says why
            }
        }
    }
    Ok(())
}

/// Follows a run to its end with a progress bar (or JSON lines); returns it.
async fn watch(c: &mut Client, run: &str, json_out: bool) -> anyhow::Result<v1::Run> {
    let mut stream = c
        .watch_run(v1::WatchRunRequest { run: run.into() })
        .await
        .map_err(|s| status_err("watch", s))?
        .into_inner();
    let bar = ProgressBar::new(0);
    if json_out {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    bar.set_style(
        ProgressStyle::with_template(
            "{prefix} [{bar:30}] {pos}/{len} steps {elapsed_precise} {msg}",
        )?
        .progress_chars("=> "),
    );
    let mut last: Option<v1::Run> = None;
    let mut last_state = -1;
    while let Some(ev) = stream.message().await.map_err(|s| status_err("watch", s))? {
        let Some(run) = ev.run else { continue };
        let staging = run.step == 0 && run.reference_cached < run.reference_total;
        if staging {
            // The reference stage: examples scored so far, of those the run needs.
            bar.set_length(run.reference_total);
            bar.set_position(run.reference_cached);
            bar.set_prefix(format!("{} reference stage", run.name));
        } else {
            bar.set_length(run.total_steps);
            bar.set_position(run.step);
            bar.set_prefix(format!("{} {}", run.name, state_name(run.state)));
        }
        if json_out {
            let mut o = json!({"run": run.id, "state": state_name(run.state), "step": run.step});
            if run.reference_total > 0 {
                o["reference"] =
                    json!({"cached": run.reference_cached, "total": run.reference_total});
            }
            match &ev.event {
                Some(v1::run_event::Event::Step(s)) => o["metrics"] = metrics_json(&s.metrics),
                Some(v1::run_event::Event::Eval(s)) => o["eval"] = metrics_json(&s.metrics),
                Some(v1::run_event::Event::Rollback(b)) => o["rollback"] = rollback_json(b),
                _ => {}
            }
            out!("{o}");
        } else {
            if run.state != last_state {
                bar.println(format!(
                    "{}: {} (generation {}, {} workers)",
                    run.name,
                    state_name(run.state),
                    run.generation,
                    run.world_size
                ));
                last_state = run.state;
            }
            match &ev.event {
                Some(v1::run_event::Event::Step(s)) => {
                    let loss = metric(&s.metrics, "loss").unwrap_or(f64::NAN);
                    let mut msg = format!("loss {loss:.4}");
                    if let Some(a) = metric(&s.metrics, "rewards/accuracies") {
                        msg.push_str(&format!(" acc {a:.2}"));
                    }
                    if let Some(t) = metric(&s.metrics, "tokens_per_second") {
                        msg.push_str(&format!(" {t:.0} tok/s"));
                    }
                    if let Some(w) = metric(&s.metrics, "world_size") {
                        msg.push_str(&format!(" w{w}"));
                    }
                    bar.set_message(msg);
                }
                Some(v1::run_event::Event::Eval(s)) => {
                    let parts: Vec<String> = s
                        .metrics
                        .iter()
                        .filter(|m| m.name != "step")
                        .map(|m| format!("{} {:.4}", m.name, m.value))
                        .collect();
                    bar.println(format!("eval @ {}: {}", s.step, parts.join(", ")));
                }
                Some(v1::run_event::Event::Rollback(b)) => {
                    bar.println(format!(
                        "rolled back from step {} to step {} (generation {}): {}",
                        b.from_step, b.to_step, b.generation, b.reason
                    ));
                }
                _ => {}
            }
        }
        let end = run.ended();
        last = Some(run);
        if end {
            break;
        }
    }
    bar.finish_and_clear();
    last.context("the watch stream ended before the run did")
}

fn print_summary(run: &v1::Run, seconds: Option<f64>, json_out: bool) {
    if json_out {
        let mut o = run_json(run);
        if let Some(s) = seconds {
            o["seconds"] = json!(s);
        }
        out!("{o}");
        return;
    }
    out!(
        "run {} ({}): {} — {}/{} steps, generation {}, {} workers",
        run.name,
        run.id,
        state_name(run.state),
        run.step,
        run.total_steps,
        run.generation,
        run.world_size
    );
    if run.reference_total > 0 {
        out!(
            "  reference stage: {}/{} examples' reference log-probs cached",
            run.reference_cached,
            run.reference_total
        );
    }
    if !run.error.is_empty() {
        out!("  error: {}", run.error);
    }
    let pick = |m: &[v1::Metric], names: &[&str]| -> String {
        names
            .iter()
            .filter_map(|n| metric(m, n).map(|v| format!("{n} {v:.4}")))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let train = pick(
        &run.last_metrics,
        &[
            "loss",
            "rewards/accuracies",
            "rewards/margins",
            "tokens_per_second",
        ],
    );
    if !train.is_empty() {
        out!("  last step: {train}");
    }
    let eval = pick(
        &run.last_eval,
        &[
            "eval_loss",
            "eval_rewards/accuracies",
            "eval_rewards/margins",
        ],
    );
    if !eval.is_empty() {
        out!("  eval: {eval}");
    }
    if let Some(s) = seconds {
        out!("  time: {s:.1} s");
    }
    if run.state == RunState::Succeeded as i32 {
        out!(
            "  model: {}/final   metrics: {}/metrics.jsonl",
            run.output,
            run.output
        );
    }
}

/// A sibling binary of this executable (the workspace's target dir, an install
/// prefix), else the name for `PATH`.
fn sibling(name: &str) -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join(name)))
        .filter(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from(name))
}

/// Child processes that are killed when this goes out of scope.
struct Children(Vec<(String, Child)>);

impl Drop for Children {
    fn drop(&mut self) {
        for (_, c) in self.0.iter_mut().rev() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The local cluster is plain text on loopback: children must not pick up TLS
/// settings meant for a remote cluster from this shell.
trait ClearTls {
    fn env_clear_tls(&mut self) -> &mut Self;
}

impl ClearTls for Process {
    fn env_clear_tls(&mut self) -> &mut Self {
        for k in [
            "DPO_TLS_CA",
            "DPO_TLS_CERT",
            "DPO_TLS_KEY",
            "DPO_TLS_DOMAIN",
            "DPO_SERVER_TLS_CERT",
            "DPO_SERVER_TLS_KEY",
            "DPO_SERVER_TLS_CLIENT_CA",
        ] {
            self.env_remove(k);
        }
        self
    }
}

/// The directories `dpoctl local`'s coordinator lets this spec name: the
/// model, reference and cache directories and the output (each, or its parent
/// when it does not exist yet, so a missing one is reported as missing), and
/// the directories of the datasets.
fn local_allowed(spec: &RunSpec) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = Vec::new();
    let mut allow = |p: &Path| {
        let dir = if p.is_dir() { Some(p) } else { p.parent() };
        if let Some(d) = dir.filter(|d| d.is_dir())
            && !dirs.iter().any(|x| x == d)
        {
            dirs.push(d.to_path_buf());
        }
    };
    allow(&spec.model.path);
    if let dpo_proto::spec::ReferenceModel::Dir(d) = &spec.reference.path {
        allow(d);
    }
    if let dpo_proto::spec::ReferenceCache::Dir(d) = &spec.reference.cache {
        allow(d);
    }
    allow(&spec.train.output);
    for file in [Some(&spec.data.train), spec.data.eval.as_ref()]
        .into_iter()
        .flatten()
        .map(PathBuf::as_path)
        .chain(spec.data.negatives.as_ref().and_then(|n| n.file()))
    {
        if let Some(d) = file.parent() {
            allow(d);
        }
    }
    dirs
}

async fn local(
    cli: &Cli,
    spec_path: &Path,
    workers: usize,
    data_dir: Option<PathBuf>,
) -> anyhow::Result<bool> {
    if workers == 0 {
        bail!("--workers: at least 1");
    }
    let spec = RunSpec::from_file(spec_path)?;
    let out = spec.train.output.clone();
    if out.join("metrics.jsonl").exists() || out.join("checkpoints").exists() {
        bail!(
            "train.output: {} already holds a run; remove it or choose a new directory",
            out.display()
        );
    }
    let data_dir = data_dir.unwrap_or_else(|| out.join(".dpoctl-local"));
    std::fs::create_dir_all(&data_dir)?;
    let logs = data_dir.join("logs");
    std::fs::create_dir_all(&logs)?;
    let addr_file = data_dir.join("coordinator.addr");
    let _ = std::fs::remove_file(&addr_file);
    let log = |name: &str| -> anyhow::Result<Stdio> {
        Ok(Stdio::from(std::fs::File::create(
            logs.join(format!("{name}.log")),
        )?))
    };
    let mut children = Children(Vec::new());
    // The run page on a free loopback port (taken and let go: another process
    // could take it in between, which only costs the page).
    let page = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .ok();
    let mut coordinator = Process::new(sibling("dpo-coordinator"));
    coordinator
        .args(["--listen", "127.0.0.1:0", "--lease-ttl-ms", "3000"])
        .arg("--data-dir")
        .arg(&data_dir);
    if let Some(page) = page {
        coordinator.arg("--metrics-listen").arg(page.to_string());
    }
    for dir in local_allowed(&spec) {
        coordinator.arg("--allow-path").arg(dir);
    }
    let coordinator = coordinator
        .env_remove("DPO_ALLOW_PATH")
        .env_remove("DPO_TOKENS_FILE")
        .arg("--addr-file")
        .arg(&addr_file)
        .env_clear_tls()
        .stdout(Stdio::null())
        .stderr(log("coordinator")?)
        .spawn()
        .context("starting dpo-coordinator (build it, or put it on PATH)")?;
    children.0.push(("coordinator".into(), coordinator));
    let started = Instant::now();
    let addr = loop {
        if let Ok(a) = std::fs::read_to_string(&addr_file) {
            break a;
        }
        if let Some((_, c)) = children.0.first_mut()
            && let Some(status) = c.try_wait()?
        {
            bail!(
                "dpo-coordinator exited ({status}); see {}",
                logs.join("coordinator.log").display()
            );
        }
        if started.elapsed() > Duration::from_secs(30) {
            bail!("dpo-coordinator did not start within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let url = format!("http://{addr}");
    for i in 0..workers {
        let w = Process::new(sibling("dpo-worker"))
            .args(["--coordinator", &url, "--device", "cpu", "--worker-id"])
            .arg(format!("local-{i}"))
            // Each worker takes its share of this host's cores by itself.
            .env_clear_tls()
            .stdout(Stdio::null())
            .stderr(log(&format!("worker-{i}"))?)
            .spawn()
            .context("starting dpo-worker (build it, or put it on PATH)")?;
        children.0.push((format!("worker-{i}"), w));
    }
    let json_out = cli.output == OutputFormat::Json;
    if !json_out {
        eprintln!(
            "coordinator at {url} with {workers} CPU workers (logs in {})",
            logs.display()
        );
        if let Some(page) = page {
            eprintln!("run page: http://{page}/");
        }
    }
    // Plain text on loopback: TLS settings meant for a remote cluster do not apply.
    let mut c = client_with(&url, &ClientTls::default())?;
    let t = Instant::now();
    let run = submit(&mut c, spec_path, true, Some(workers)).await?;
    // Watch, but stop if every worker process dies (their logs say why).
    let monitor = async {
        loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let mut alive = 0;
            for (name, child) in children.0.iter_mut() {
                let running = matches!(child.try_wait(), Ok(None));
                if name == "coordinator" && !running {
                    return anyhow::anyhow!(
                        "dpo-coordinator exited; see {}",
                        logs.join("coordinator.log").display()
                    );
                }
                alive += usize::from(running && name != "coordinator");
            }
            if alive == 0 {
                return anyhow::anyhow!(
                    "every worker process exited; see {}",
                    logs.join("worker-0.log").display()
                );
            }
        }
    };
    let run = tokio::select! {
        r = watch(&mut c, &run.id, json_out) => r?,
        e = monitor => return Err(e),
    };
    print_summary(&run, Some(t.elapsed().as_secs_f64()), json_out);
    Ok(run.state == RunState::Succeeded as i32)
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
    let json_out = cli.output == OutputFormat::Json;
    let ok = match &cli.command {
        Command::Local {
            spec,
            workers,
            data_dir,
        } => local(&cli, spec, *workers, data_dir.clone()).await?,
        Command::Submit {
            spec,
            watch: follow,
            remote_data,
        } => {
            let mut c = client(&cli.coordinator)?;
            let run = submit(&mut c, spec, !remote_data, None).await?;
            if *follow {
                let t = Instant::now();
                let run = watch(&mut c, &run.id, json_out).await?;
                print_summary(&run, Some(t.elapsed().as_secs_f64()), json_out);
                run.state == RunState::Succeeded as i32
            } else {
                if json_out {
                    out!("{}", run_json(&run));
                } else {
                    out!(
                        "submitted {} ({}): {} steps",
                        run.name,
                        run.id,
                        run.total_steps
                    );
                }
                true
            }
        }
        Command::Status { run } => {
            let mut c = client(&cli.coordinator)?;
            let r = c
                .get_run(v1::GetRunRequest { run: run.clone() })
                .await
                .map_err(|s| status_err("status", s))?
                .into_inner();
            print_summary(&r, None, json_out);
            true
        }
        Command::Watch { run } => {
            let mut c = client(&cli.coordinator)?;
            let r = watch(&mut c, run, json_out).await?;
            print_summary(&r, None, json_out);
            r.state == RunState::Succeeded as i32
        }
        Command::List => {
            let mut c = client(&cli.coordinator)?;
            let runs = c
                .list_runs(v1::ListRunsRequest {})
                .await
                .map_err(|s| status_err("list", s))?
                .into_inner()
                .runs;
            if json_out {
                for r in &runs {
                    out!("{}", run_json(r));
                }
            } else {
                out!(
                    "{:<36}  {:<20}  {:<12}  {:<10}  {:>11}",
                    "ID",
                    "NAME",
                    "OWNER",
                    "STATE",
                    "STEP"
                );
                for r in &runs {
                    out!(
                        "{:<36}  {:<20}  {:<12}  {:<10}  {:>5}/{:<5}",
                        r.id,
                        r.name,
                        r.owner,
                        state_name(r.state),
                        r.step,
                        r.total_steps
                    );
                }
            }
            true
        }
        Command::Cancel { run } => {
            let mut c = client(&cli.coordinator)?;
            let r = c
                .cancel_run(v1::CancelRunRequest { run: run.clone() })
                .await
                .map_err(|s| status_err("cancel", s))?
                .into_inner();
            print_summary(&r, None, json_out);
            true
        }
        Command::Completion { shell } => {
            use clap::CommandFactory;
            let mut cmd = Cli::command();
            clap_complete::generate(*shell, &mut cmd, "dpoctl", &mut std::io::stdout());
            true
        }
        Command::Workers => {
            let mut c = client(&cli.coordinator)?;
            let workers = c
                .list_workers(v1::ListWorkersRequest {})
                .await
                .map_err(|s| status_err("workers", s))?
                .into_inner()
                .workers;
            for w in &workers {
                if json_out {
                    out!(
                        "{}",
                        json!({"id": w.id, "hostname": w.hostname, "collective_addr": w.collective_addr, "device": w.device,
                               "run": w.run_id, "generation": w.generation, "rank": w.rank,
                               "last_seen_ms": w.last_seen_ms})
                    );
                } else {
                    out!(
                        "{:<36}  {:<24}  {:<21}  {:<6}  run {:<8} gen {:<4} rank {:<3} seen {} ms ago",
                        w.id,
                        w.hostname,
                        w.collective_addr,
                        w.device,
                        w.run_id.get(..8).unwrap_or(&w.run_id),
                        w.generation,
                        w.rank,
                        w.last_seen_ms
                    );
                }
            }
            true
        }
    };
    if !ok {
        std::process::exit(1);
    }
    Ok(())
}
