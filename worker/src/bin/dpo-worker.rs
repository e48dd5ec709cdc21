//! `dpo-worker`: the worker binary. Today: `score` (offline log-probabilities).

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
    #[arg(long, global = true, default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Compute log-probabilities of preference pairs: one JSON line per input pair
    /// with chosen_logps, rejected_logps (sums over response tokens), chosen_tokens,
    /// rejected_tokens; with --reference also ref_*_logps and implicit rewards.
    Score {
        /// Hugging Face model directory (config.json, *.safetensors, tokenizer.json).
        #[arg(long)]
        model: PathBuf,
        /// JSON-lines pairs: {"prompt","chosen","rejected"} or
        /// {"prompt_ids","chosen_ids","rejected_ids"}.
        #[arg(long)]
        data: PathBuf,
        /// Reference model directory, for implicit rewards.
        #[arg(long)]
        reference: Option<PathBuf>,
        /// Output JSON-lines file (written atomically).
        #[arg(long)]
        out: PathBuf,
        /// Pair format; auto detects it from the first line.
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

fn init_tracing(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_tracing(&cli.log_format);
    match cli.command {
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
            let req = ScoreRequest {
                model,
                reference,
                data,
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
