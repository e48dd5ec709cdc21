//! Peak memory and time of a DPO-shaped training step (score chosen and
//! rejected responses, a loss over the sums, backward including the deferred
//! head and layer work) on one micro-batch of random pairs, with the LM head in
//! chunks or whole and the layers checkpointed or not. Prints one JSON line:
//! the process's resident size after loading, its peak (VmHWM), the gradient
//! bytes, and the median step time. One configuration per process, since the
//! peak is the process's. Driven by `bench/memory.py`.
//!
//!     memory_bench --model DIR --pairs 8 --prompt 64 --response 192 --head-chunk 1024 [--checkpointing]

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use clap::Parser;
use dpo_data::Example;
use dpo_worker::model::checkpoint;
use dpo_worker::model::llama::LayerGrads;
use dpo_worker::objective::{MicroBatch, score};
use tch::{Device, Kind};

#[derive(Parser, Debug)]
struct Args {
    #[arg(long)]
    model: PathBuf,
    #[arg(long, default_value_t = 8)]
    pairs: usize,
    #[arg(long, default_value_t = 64)]
    prompt: usize,
    #[arg(long, default_value_t = 192)]
    response: usize,
    /// LM-head positions at a time (0: all).
    #[arg(long, default_value_t = 1024)]
    head_chunk: usize,
    #[arg(long)]
    checkpointing: bool,
    #[arg(long, default_value_t = 3)]
    steps: usize,
    #[arg(long, default_value_t = 2)]
    threads: i32,
}

fn status_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix(field))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tch::set_num_threads(args.threads);
    let mut model = checkpoint::load(&args.model, Kind::Float, Device::Cpu).context("model")?;
    model.set_head_chunk(args.head_chunk);
    model.set_gradient_checkpointing(args.checkpointing);
    let vocab = model.config().vocab_size as u64;
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut token = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (3 + state % (vocab - 3)) as u32
    };
    let examples: Vec<Example> = (0..args.pairs)
        .map(|i| Example {
            line: i + 1,
            prompt: (0..args.prompt).map(|_| token()).collect(),
            chosen: Some((0..args.response).map(|_| token()).collect()),
            rejected: vec![(0..args.response).map(|_| token()).collect()],
        })
        .collect();
    let refs: Vec<&Example> = examples.iter().collect();
    let mb = MicroBatch::new(&refs, true, false, None, Device::Cpu)?;
    let params = model.var_store().trainable_variables();
    let grad_bytes: u64 = params.iter().map(|p| p.numel() as u64 * 4).sum();
    let loaded_kib = status_kib("VmRSS:");
    let mut times = Vec::new();
    for _ in 0..args.steps {
        let t = Instant::now();
        let mut s = score(&model, &mb)?;
        let loss = s.sums.sum(Kind::Float).neg();
        loss.backward();
        std::mem::take(&mut s.deferred).backward(&model, LayerGrads::Accumulate)?;
        times.push(t.elapsed().as_secs_f64());
        for p in &params {
            let mut g = p.grad();
            if g.defined() {
                let _ = g.zero_();
            }
        }
    }
    times.sort_by(f64::total_cmp);
    println!(
        "{}",
        serde_json::json!({
            "vocab": vocab,
            "layers": model.config().num_hidden_layers,
            "hidden": model.config().hidden_size,
            "head_chunk": args.head_chunk,
            "checkpointing": args.checkpointing,
            "loaded_bytes": loaded_kib * 1024,
            "peak_bytes": status_kib("VmHWM:") * 1024,
            "grad_bytes": grad_bytes,
            "step_seconds": times[times.len() / 2],
        })
    );
    Ok(())
}
