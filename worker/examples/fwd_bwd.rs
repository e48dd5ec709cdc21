//! Forward + backward throughput of the model on one batch of random tokens:
//! next-token cross-entropy for a causal LM, token-classification cross-entropy
//! against random labels for an encoder with a token head (NER), backward,
//! gradients cleared — what a training step costs before the optimizer. Driven by
//! `bench/model_throughput.py`, which times PyTorch eager on the same checkpoint,
//! batch and threads and prints the ratio.
//!
//!     fwd_bwd --model DIR --batch 8 --seq 128 --steps 10 --warmup 2 --threads 2

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use clap::Parser;
use dpo_worker::model::checkpoint;
use dpo_worker::model::config::ModelType;
use dpo_worker::model::encoder::{Encoder, Head};
use tch::{Device, Kind, Tensor};

#[derive(Parser, Debug)]
struct Args {
    #[arg(long)]
    model: PathBuf,
    #[arg(long, default_value_t = 8)]
    batch: i64,
    #[arg(long, default_value_t = 128)]
    seq: i64,
    #[arg(long, default_value_t = 10)]
    steps: usize,
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    #[arg(long, default_value_t = 2)]
    threads: i32,
    #[arg(long, default_value = "f32", value_parser = dpo_worker::parse_kind)]
    dtype: Kind,
}

/// Runs `step` `warmup` times, then `steps` times timed, and prints the seconds
/// per step and tokens per second as one JSON line.
fn time_steps(args: &Args, step: impl Fn() -> anyhow::Result<()>) -> anyhow::Result<()> {
    for _ in 0..args.warmup {
        step()?;
    }
    let start = Instant::now();
    for _ in 0..args.steps {
        step()?;
    }
    let secs = start.elapsed().as_secs_f64() / args.steps as f64;
    let tokens = (args.batch * args.seq) as f64;
    println!(
        "{}",
        serde_json::json!({"seconds_per_step": secs, "tokens_per_second": tokens / secs})
    );
    Ok(())
}

fn zero_grads(params: &[Tensor]) {
    for p in params {
        let mut g = p.grad();
        if g.defined() {
            let _ = g.zero_();
        }
    }
}

/// An encoder with its token head (the checkpoint's labels): every position
/// classified, random labels, mean cross-entropy, as transformers'
/// `…ForTokenClassification` computes its loss.
fn encoder(args: &Args) -> anyhow::Result<()> {
    let (mut model, _) = Encoder::load(&args.model, Head::Token, None, args.dtype, Device::Cpu, 0)
        .context("loading encoder")?;
    model.set_training(true);
    let vocab = model.config().vocab_size;
    let classes = model.labels().len() as i64;
    let ids = Tensor::randint(vocab, [args.batch, args.seq], (Kind::Int64, Device::Cpu));
    let labels = Tensor::randint(classes, [args.batch, args.seq], (Kind::Int64, Device::Cpu));
    let mask = Tensor::ones([args.batch, args.seq], (Kind::Int64, Device::Cpu));
    let params = model.var_store().trainable_variables();
    time_steps(args, || {
        let logits = model.forward(&ids, &mask, None)?;
        let loss = logits
            .reshape([-1, classes])
            .to_kind(Kind::Float)
            .cross_entropy_for_logits(&labels.reshape([-1]));
        loss.backward();
        zero_grads(&params);
        Ok(())
    })
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tch::set_num_threads(args.threads);
    tch::manual_seed(0);
    if ModelType::of_dir(&args.model)?.is_encoder() {
        return encoder(&args);
    }
    let model = checkpoint::load(&args.model, args.dtype, Device::Cpu).context("loading model")?;
    let vocab = model.config().vocab_size;
    let ids = Tensor::randint(vocab, [args.batch, args.seq], (Kind::Int64, Device::Cpu));
    let params = model.var_store().trainable_variables();
    time_steps(&args, || {
        let logits = model.forward(&ids, None)?;
        let l = args.seq - 1;
        let loss = logits
            .narrow(1, 0, l)
            .reshape([-1, vocab])
            .to_kind(Kind::Float)
            .cross_entropy_for_logits(&ids.narrow(1, 1, l).reshape([-1]));
        loss.backward();
        zero_grads(&params);
        Ok(())
    })
}
