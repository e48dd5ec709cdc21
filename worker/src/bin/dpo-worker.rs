//! `dpo-worker`: the worker binary — `train` (standalone training from a run
//! spec) and `score` (offline log-probabilities).

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use tch::{Device, Kind};

use dpo_data::PairFormat;
use dpo_worker::score::{self, ScoreRequest};

#[derive(Parser, Debug)]
#[command(name = "dpo-worker", version, about = "dpo-cluster worker")]
struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Join the coordinator at this URL (http://host:port) and train whatever it
    /// assigns (the default when no subcommand is given).
    #[arg(long, env = "DPO_COORDINATOR")]
    coordinator: Option<String>,
    /// Where to accept collective (ring) connections from peers; port 0 picks one.
    #[arg(long, default_value = "127.0.0.1:0", env = "DPO_COLLECTIVE_LISTEN")]
    listen: std::net::SocketAddr,
    /// The IP peers reach this worker at, when --listen is 0.0.0.0 (e.g. the pod IP).
    #[arg(long, env = "DPO_ADVERTISE")]
    advertise: Option<std::net::IpAddr>,
    /// Device for cluster work: auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto", value_parser = dpo_worker::parse_device)]
    device: Device,
    /// This worker's identity (default: a fresh UUID per process).
    #[arg(long, env = "DPO_WORKER_ID")]
    worker_id: Option<String>,
    /// Run one rank per GPU, cuda:0 … cuda:N-1, each in a process of its own
    /// (like torchrun's --nproc-per-node), registered as N members.
    #[arg(long, env = "DPO_GPUS", conflicts_with = "devices")]
    gpus: Option<usize>,
    /// Run one rank per listed device (cuda:0,cuda:1,… ; cpu for tests), as --gpus does.
    #[arg(long, value_delimiter = ',')]
    devices: Vec<String>,
    /// Set by --gpus/--devices for each rank it starts.
    #[arg(long, hide = true, default_value_t = 0)]
    local_rank: u32,
    /// Intra-op (OpenMP) threads for libtorch. Default: the cores this process
    /// may use (its CPU set and container quota) divided by the ranks on this
    /// host — the coordinator says how many share it; `train --peers` counts
    /// its local peers — unless OMP_NUM_THREADS or MKL_NUM_THREADS is set.
    #[arg(long, global = true, env = "DPO_THREADS", value_parser = clap::value_parser!(u16).range(1..))]
    threads: Option<u16>,
    /// Seconds a worker asked to stop (SIGTERM, SIGINT) may take to finish its
    /// step and leave; then, or at a second signal, it stops at once (exit 143).
    #[arg(long, default_value_t = 60)]
    leave_timeout_s: u64,
    /// Fault injection for tests: exit (86) after reporting this many chunks of
    /// a reference stage.
    #[arg(long, hide = true)]
    halt_after_reference_chunks: Option<u64>,
    /// Fault injection for tests: break this step once, as a lost connection
    /// would: under ZeRO between the update and the parameter gather, else
    /// right after the update.
    #[arg(long, hide = true)]
    tear_at_step: Option<u64>,
    /// Fault injection for tests: exit like a crash right after this step's
    /// update, before it is reported.
    #[arg(long, hide = true)]
    halt_after_step: Option<u64>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Train on one machine from a run spec (TOML; DPO__SECTION__KEY variables
    /// override its keys). Writes metrics.jsonl, eval.jsonl, checkpoints/ and final/
    /// under train.output.
    Train {
        /// The run spec.
        #[arg(long)]
        config: PathBuf,
        /// Continue from the newest checkpoint under train.output.
        #[arg(long)]
        resume: bool,
        /// auto, cpu, cuda or cuda:N.
        #[arg(long, default_value = "auto", value_parser = dpo_worker::parse_device)]
        device: Device,
        /// Print one JSON summary line at the end instead of text.
        #[arg(long)]
        json: bool,
        /// Fault injection for tests: exit with status 86, as if killed, right after
        /// this step (and its checkpoint) is written.
        #[arg(long, hide = true)]
        halt_after_step: Option<u64>,
        /// Data-parallel training over a static world: every rank's address
        /// (host:port, comma-separated, rank order). Each rank runs this command
        /// with its own --rank; rank 0 writes the outputs. (The coordinator hands
        /// out ranks and addresses itself in cluster mode.)
        #[arg(long, value_delimiter = ',', requires = "rank")]
        peers: Vec<String>,
        /// This process's rank in --peers.
        #[arg(long, requires = "peers")]
        rank: Option<usize>,
    },
    /// Evaluate a token- or sequence-classification model (an HF directory with
    /// its labels in config.json, e.g. a run's final/) on a labelled file: the
    /// entity-level report (NER, seqeval's strict IOB2 rules) or the
    /// classification report.
    Evaluate {
        /// The model directory (config.json with id2label, weights, tokenizer.json).
        #[arg(long)]
        model: PathBuf,
        /// NER: JSONL {"tokens","tags"} or CoNLL (.conll/.txt/.iob/.bio);
        /// classification: JSONL {"text","label"}.
        #[arg(long)]
        data: PathBuf,
        /// Print the report as one JSON object instead of a table.
        #[arg(long, value_enum, default_value_t = Output::Text)]
        output: Output,
        /// Longest sequence in tokens (at most the model's positions).
        #[arg(long, default_value_t = 512)]
        max_length: usize,
        /// Examples per forward pass.
        #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..))]
        batch_size: u32,
        /// auto, cpu, cuda or cuda:N.
        #[arg(long, default_value = "auto", value_parser = dpo_worker::parse_device)]
        device: Device,
    },
    /// Compute log-probabilities of preference pairs: one JSON line per input pair
    /// with chosen_logps, rejected_logps (sums over response tokens), chosen_tokens,
    /// rejected_tokens; with --reference also ref_*_logps and implicit rewards.
    Score {
        /// Hugging Face model directory (config.json, *.safetensors, tokenizer.json).
        #[arg(long)]
        model: PathBuf,
        /// JSON-lines pairs: {"prompt","chosen","rejected"} as text or as message
        /// lists (rendered with the model's chat template), or
        /// {"prompt_ids","chosen_ids","rejected_ids"}.
        #[arg(long)]
        data: PathBuf,
        /// Reference model directory, for implicit rewards.
        #[arg(long)]
        reference: Option<PathBuf>,
        /// Output JSON-lines file (written atomically).
        #[arg(long)]
        out: PathBuf,
        /// Pair format: auto (detected from the first line), text, conversational, tokens.
        #[arg(long, default_value = "auto", value_parser = |s: &str| s.parse::<PairFormat>())]
        format: PairFormat,
        /// Pairs per forward pass.
        #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..))]
        batch_size: u32,
        /// β of the implicit reward β·(log π − log π_ref).
        #[arg(long, default_value_t = 0.1)]
        beta: f64,
        /// Compute dtype: f32, bf16 or f16.
        #[arg(long, default_value = "f32", value_parser = dpo_worker::parse_kind)]
        dtype: Kind,
        /// auto, cpu, cuda or cuda:N.
        #[arg(long, default_value = "auto", value_parser = dpo_worker::parse_device)]
        device: Device,
    },
}

/// How a report is printed.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Output {
    Text,
    Json,
}

/// How logs are written on stderr.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum LogFormat {
    /// Readable lines, for a terminal.
    Text,
    /// One JSON object per line, for a cluster's log collector.
    Json,
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours for a person at a terminal only: a log file or collector gets
    // plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    if format == LogFormat::Json {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_tracing(cli.log_format);
    let Some(command) = cli.command else {
        let Some(coordinator) = cli.coordinator.clone() else {
            anyhow::bail!(
                "give --coordinator URL to join a cluster, or a subcommand (train, score); see --help"
            );
        };
        let devices = match cli.gpus {
            Some(n) => dpo_worker::ranks::gpus(n)?,
            None => cli.devices.clone(),
        };
        if !devices.is_empty() {
            return run_ranks(&cli, coordinator, devices);
        }
        let token = dpo_proto::client::BearerToken::from_env()?;
        return dpo_worker::cluster::join(dpo_worker::cluster::JoinOptions {
            coordinator,
            listen: cli.listen,
            advertise: cli.advertise,
            device: cli.device,
            local_rank: cli.local_rank,
            worker_id: cli
                .worker_id
                .unwrap_or_else(dpo_worker::cluster::new_worker_id),
            token,
            tls: dpo_proto::client::ClientTls::from_env()?,
            halt_after_reference_chunks: cli.halt_after_reference_chunks,
            tear_at_step: cli.tear_at_step,
            halt_after_step: cli.halt_after_step,
            leave_timeout: std::time::Duration::from_secs(cli.leave_timeout_s),
            threads: cli.threads.map(usize::from),
        })
        .map_err(anyhow::Error::from);
    };
    let explicit_threads = cli.threads.map(usize::from);
    if !matches!(command, Command::Train { .. }) {
        // One process on this host (evaluate, score, …).
        dpo_worker::threads::apply(explicit_threads, 1);
    }
    match command {
        Command::Train {
            config,
            resume,
            device,
            json,
            halt_after_step,
            peers,
            rank,
        } => {
            // The ranks of a --peers world on this host share its cores.
            let on_host = match rank {
                Some(_) => dpo_worker::threads::local_peers(&peers),
                None => 1,
            };
            dpo_worker::threads::apply(explicit_threads, on_host);
            let collective = static_world(&peers, rank)?;
            train(
                &config,
                resume,
                device,
                json,
                cli.log_format,
                halt_after_step,
                collective,
            )?
        }
        Command::Evaluate {
            model,
            data,
            output,
            max_length,
            batch_size,
            device,
        } => evaluate(
            &dpo_data::confined::resolved(&model),
            &dpo_data::confined::resolved(&data),
            output,
            max_length,
            batch_size as usize,
            device,
        )?,
        Command::Score {
            model,
            data,
            reference,
            out,
            format,
            batch_size,
            beta,
            dtype,
            device,
        } => {
            // This process's own command line: links resolved once.
            let resolved = |p: PathBuf| dpo_data::confined::resolved(&p);
            let req = ScoreRequest {
                model: resolved(model),
                reference: reference.map(resolved),
                data: resolved(data),
                out,
                format,
                batch_size: batch_size as usize,
                beta,
                kind: dtype,
                device,
            };
            // Hidden automatically when stderr is not a terminal.
            let bar = ProgressBar::new(0);
            bar.set_style(
                ProgressStyle::with_template(
                    "{spinner} scoring [{bar:30}] {pos}/{len} pairs {per_sec} eta {eta}",
                )
                .context("progress bar template")?
                .progress_chars("=> "),
            );
            let summary = score::run(&req, &mut |done, total| {
                bar.set_length(total as u64);
                bar.set_position(done as u64);
            })
            .with_context(|| format!("scoring {}", req.data.display()))?;
            bar.finish_and_clear();
            let mut line = format!(
                "scored {} pairs -> {}: mean chosen_logps {:.4}, mean rejected_logps {:.4}",
                summary.pairs,
                req.out.display(),
                summary.mean_chosen_logps,
                summary.mean_rejected_logps
            );
            if let (Some(acc), Some(margin)) = (summary.reward_accuracy, summary.mean_reward_margin)
            {
                line.push_str(&format!(
                    ", reward accuracy {acc:.3}, mean margin {margin:.4}"
                ));
            }
            eprintln!("{line}");
        }
    }
    Ok(())
}

/// `--gpus N` / `--devices …`: one rank process per device, supervised here.
fn run_ranks(cli: &Cli, coordinator: String, devices: Vec<String>) -> anyhow::Result<()> {
    for d in &devices {
        dpo_worker::parse_device(d).map_err(|e| anyhow::anyhow!("--devices: {e}"))?;
    }
    let mut common = vec![
        "--coordinator".to_string(),
        coordinator,
        "--log-format".into(),
        match cli.log_format {
            LogFormat::Text => "text".into(),
            LogFormat::Json => "json".into(),
        },
    ];
    if let Some(ip) = cli.advertise {
        common.extend(["--advertise".into(), ip.to_string()]);
    }
    common.extend(["--leave-timeout-s".into(), cli.leave_timeout_s.to_string()]);
    if let Some(n) = cli.threads {
        common.extend(["--threads".into(), n.to_string()]);
    }
    if let Some(n) = cli.halt_after_reference_chunks {
        common.extend(["--halt-after-reference-chunks".into(), n.to_string()]);
    }
    if let Some(n) = cli.tear_at_step {
        common.extend(["--tear-at-step".into(), n.to_string()]);
    }
    if let Some(n) = cli.halt_after_step {
        common.extend(["--halt-after-step".into(), n.to_string()]);
    }
    let cmd = dpo_worker::ranks::RankCommand {
        program: std::env::current_exe().context("locating this binary")?,
        common,
        devices,
        worker_id: cli
            .worker_id
            .clone()
            .unwrap_or_else(dpo_worker::cluster::new_worker_id),
        listen: cli.listen,
    };
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = stop.clone();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async {
                let Ok(mut term) =
                    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                else {
                    return;
                };
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            });
            flag.store(true, std::sync::atomic::Ordering::SeqCst);
        })
        .context("signal thread")?;
    tracing::info!(ranks = cmd.devices.len(), devices = ?cmd.devices, "starting one rank per device");
    Ok(dpo_worker::ranks::supervise(&cmd, stop)?)
}

fn metric(m: &[(String, f64)], key: &str) -> Option<f64> {
    m.iter().find(|(k, _)| k == key).map(|(_, v)| *v)
}

/// The collective of `--peers`/`--rank`, or a world of one.
fn static_world(
    peers: &[String],
    rank: Option<usize>,
) -> anyhow::Result<Box<dyn dpo_worker::collective::Collective>> {
    use dpo_worker::collective::{Solo, tcp};
    use std::net::ToSocketAddrs;
    let Some(rank) = rank else {
        return Ok(Box::new(Solo));
    };
    let addrs = peers
        .iter()
        .map(|p| {
            p.to_socket_addrs()
                .with_context(|| format!("--peers: cannot resolve {p:?}"))?
                .next()
                .with_context(|| format!("--peers: {p:?} has no address"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    anyhow::ensure!(
        rank < addrs.len(),
        "--rank {rank} is not below the {} --peers",
        addrs.len()
    );
    let listener = std::net::TcpListener::bind(addrs[rank])
        .with_context(|| format!("binding this rank's address {}", addrs[rank]))?;
    tracing::info!(rank, world = addrs.len(), "joining the ring");
    let ring = tcp::TcpCollective::connect(rank, &addrs, listener, 0, &tcp::TcpOptions::default())?;
    Ok(Box::new(ring))
}

fn train(
    config: &std::path::Path,
    resume: bool,
    device: Device,
    json: bool,
    log_format: LogFormat,
    halt_after_step: Option<u64>,
    collective: Box<dyn dpo_worker::collective::Collective>,
) -> anyhow::Result<()> {
    use dpo_worker::train::classify::{ClassifierTrainer, ClassifyOptions};
    use dpo_worker::train::{Event, TrainOptions, Trainer, TrainingRun, run_loop};

    let mut spec = dpo_proto::RunSpec::from_file(config)?;
    // This process trusts its spec: links in its paths are resolved once.
    spec.resolve_links(dpo_data::confined::resolved);
    tracing::info!(run = %spec.name, task = ?spec.task.kind, loss = ?spec.objective.loss, output = %spec.train.output.display(), "starting");
    let preparing = || format!("preparing run {}", config.display());
    // Every task trains through the one loop; only what it trains differs.
    let mut run: Box<dyn TrainingRun> = if spec.task.kind.is_classification() {
        let opts = ClassifyOptions { device, resume };
        Box::new(ClassifierTrainer::new(spec, opts, collective).with_context(preparing)?)
    } else {
        let opts = TrainOptions { resume, device };
        Box::new(Trainer::new(spec, &opts, collective).with_context(preparing)?)
    };
    // A terminal gets the progress bar and the reports; JSON logs (a log
    // collector) get every step as a line and no bar.
    let bar = match log_format {
        LogFormat::Json => ProgressBar::hidden(),
        LogFormat::Text => progress_bar(run.total_steps())?,
    };
    let log_every = std::cell::Cell::new(1u64);
    let result = run_loop::run(run.as_mut(), halt_after_step, &mut |event| match event {
        Event::Started(s) => {
            bar.set_length(s.total_steps);
            bar.set_position(s.start_step);
            if log_format == LogFormat::Text {
                // Text on a pipe: a line every twentieth of the run.
                log_every.set(s.total_steps.div_ceil(20).max(1));
            }
            tracing::info!(
                examples = s.train_examples.unwrap_or(0),
                eval_examples = s.eval_examples.unwrap_or(0),
                labelled = ?s.labelled,
                negatives = ?s.negatives,
                labels = ?s.labels,
                start_step = s.start_step,
                total_steps = s.total_steps,
                trained_parameters = s.trained_parameters,
                total_parameters = s.total_parameters,
                "training"
            );
            if !json {
                bar.suspend(|| println!("{}", s.parameters_line()));
            }
        }
        Event::Step { step, metrics, .. } => {
            bar.set_position(step);
            let loss = metric(metrics, "loss").unwrap_or(f64::NAN);
            let msg = match metric(metrics, "rewards/accuracies") {
                Some(acc) => format!("loss {loss:.4} acc {acc:.2}"),
                None => format!("loss {loss:.4}"),
            };
            bar.set_message(msg);
            if bar.is_hidden() && step % log_every.get() == 0 {
                let acc = metric(metrics, "rewards/accuracies");
                tracing::info!(step, loss, accuracy = acc, "step");
            }
        }
        Event::Eval(e) => {
            let loss = metric(&e.metrics, "eval_loss").unwrap_or(f64::NAN);
            match e.report.as_ref() {
                Some(r) => bar.suspend(|| {
                    tracing::info!(step = e.step, eval_loss = loss, eval_f1 = r.f1(), "eval")
                }),
                None => bar.suspend(|| tracing::info!(step = e.step, eval_loss = loss, "eval")),
            }
        }
        Event::Checkpoint { step, path } => {
            bar.suspend(|| tracing::info!(step, path = %path.display(), "checkpoint"));
        }
    });
    bar.finish_and_clear();
    let summary = match result {
        Err(dpo_worker::Error::Halted { step }) => {
            eprintln!("halted after step {step} (fault injection)");
            std::process::exit(86);
        }
        other => other?,
    };
    let metrics_of = |e: &Option<run_loop::Evaluation>| e.as_ref().map(|e| as_obj(&e.metrics));
    if json {
        let line = serde_json::json!({
            "steps": summary.steps,
            "seconds": summary.seconds,
            "stopped_early": summary.stopped_early,
            "output": summary.output,
            "last": as_obj(&summary.last),
            "eval": metrics_of(&summary.eval),
            "initial_eval": metrics_of(&summary.initial_eval),
            "best_eval": metrics_of(&summary.best_eval),
            "best_step": summary.best_eval.as_ref().map(|e| e.step),
        });
        println!("{line}");
        return Ok(());
    }
    println!(
        "trained {} steps in {:.1}s -> {}",
        summary.steps,
        summary.seconds,
        summary.output.join("final").display()
    );
    let show = |m: &[(String, f64)]| {
        m.iter()
            .filter(|(k, _)| !matches!(k.as_str(), "step" | "epoch" | "generation" | "world_size"))
            .map(|(k, v)| format!("  {k:<24} {v:.6}"))
            .collect::<Vec<_>>()
            .join("\n")
    };
    // A classification run's reports (per-label tables) before and at its
    // best; a causal LM's last step and evaluation.
    if let Some(r) = summary
        .initial_eval
        .as_ref()
        .and_then(|e| e.report.as_ref())
    {
        println!("\nbefore training:\n{}", r.render());
    }
    match summary.best_eval.as_ref() {
        Some(e) if e.report.is_some() => {
            if let Some(r) = &e.report {
                println!("best (step {}, kept in final/):\n{}", e.step, r.render());
            }
        }
        _ => {
            println!("last step:\n{}", show(&summary.last));
            if let Some(e) = &summary.eval {
                println!("eval:\n{}", show(&e.metrics));
            }
        }
    }
    if summary.stopped_early {
        println!(
            "stopped early: train.metric_for_best_model did not improve for train.early_stopping_patience evaluations"
        );
    }
    Ok(())
}

/// `dpo-worker evaluate`.
fn evaluate(
    model_dir: &std::path::Path,
    data: &std::path::Path,
    output: Output,
    max_length: usize,
    batch_size: usize,
    device: Device,
) -> anyhow::Result<()> {
    use dpo_worker::model::encoder::{Encoder, EncoderConfig, Head};
    use dpo_worker::train::classify::{data as task_data, evaluate};

    let config = EncoderConfig::from_dir(model_dir)?;
    let architecture = config
        .raw
        .get("architectures")
        .and_then(|a| a.get(0))
        .and_then(serde_json::Value::as_str)
        .unwrap_or_default()
        .to_string();
    let (head, task) = if architecture.ends_with("ForTokenClassification") {
        (Head::Token, dpo_data::tagged::Task::Token)
    } else if architecture.ends_with("ForSequenceClassification") {
        (Head::Sequence, dpo_data::tagged::Task::Sequence)
    } else {
        anyhow::bail!(
            "{}: architectures {architecture:?} is not a token- or sequence-classification model",
            model_dir.join("config.json").display()
        );
    };
    let (mut model, _) = Encoder::load(model_dir, head, None, Kind::Float, device, 0)?;
    let labels = dpo_data::tagged::Labels::new(model.labels().to_vec())
        .map_err(|r| anyhow::anyhow!("{}: id2label: {r}", model_dir.display()))?;
    let tokenizer = dpo_data::TextTokenizer::from_dir(model_dir)?;
    let how = dpo_data::tagged::Encoding {
        max_length: max_length.min(config.max_sequence_length().max(1) as usize),
        label_all_tokens: false,
    };
    let split = task_data::load_eval_file(data, task, &tokenizer, &labels, how)?;
    let pad = tokenizer.pad_id().map_or(config.pad_token_id, i64::from);
    let report = evaluate::evaluate(&mut model, &split.examples, &labels, pad, batch_size, None)?;
    match output {
        Output::Json => {
            let metrics = as_obj(&report.metrics(0)[1..]);
            println!(
                "{}",
                serde_json::json!({
                    "model": model_dir,
                    "data": data,
                    "examples": report.examples,
                    "truncated": split.counts.truncated,
                    "metrics": metrics,
                    "report": report,
                })
            );
        }
        Output::Text => {
            println!("{} examples of {}\n", report.examples, data.display());
            print!("{}", report.render());
        }
    }
    Ok(())
}

/// Named metric values as one JSON object.
fn as_obj(m: &[(String, f64)]) -> serde_json::Value {
    serde_json::Value::Object(
        m.iter()
            .map(|(k, v)| (k.clone(), serde_json::json!(v)))
            .collect(),
    )
}

/// The training progress bar (hidden when stderr is not a terminal).
fn progress_bar(len: u64) -> anyhow::Result<ProgressBar> {
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template("{spinner} step {pos}/{len} [{bar:30}] {msg} eta {eta}")
            .context("progress bar template")?
            .progress_chars("=> "),
    );
    Ok(bar)
}
