//! Forward + backward throughput of the model on one batch of random tokens:
//! next-token cross-entropy, backward, gradients cleared — what a training step costs
//! before the optimizer. Driven by `bench/model_throughput.py`, which times PyTorch
//! eager on the same checkpoint, batch and threads and prints the ratio.
//!
//!     fwd_bwd --model DIR --batch 8 --seq 128 --steps 10 --warmup 2 --threads 2

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use clap::Parser;
use dpo_worker::model::checkpoint;
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

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tch::set_num_threads(args.threads);
    tch::manual_seed(0);
    let model = checkpoint::load(&args.model, args.dtype, Device::Cpu).context("loading model")?;
    let vocab = model.config().vocab_size;
    let ids = Tensor::randint(vocab, [args.batch, args.seq], (Kind::Int64, Device::Cpu));
    let params = model.var_store().trainable_variables();
    let step = || -> anyhow::Result<()> {
        let logits = model.forward(&ids, None)?;
        let l = args.seq - 1;
        let loss = logits
            .narrow(1, 0, l)
            .reshape([-1, vocab])
            .to_kind(Kind::Float)
            .cross_entropy_for_logits(&ids.narrow(1, 1, l).reshape([-1]));
        loss.backward();
        for p in &params {
            let mut g = p.grad();
            if g.defined() {
                let _ = g.zero_();
            }
        }
        Ok(())
    };
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
