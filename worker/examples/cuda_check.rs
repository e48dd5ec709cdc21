//! The Rust half of `scripts/gpu-check.sh` (driven by `scripts/gpu_check.py`):
//!
//!     cuda_check logits --model DIR --inputs FILE --out FILE [--device cuda] [--dtype f32]
//!         logits of each sequence of FILE (safetensors, `input_ids.N`), run one
//!         at a time (`logits.N`) and all together as one right-padded batch
//!         (`padded.N`, the real positions only), as f32.
//!     cuda_check nccl [--device cuda:0] [--elements N]
//!         a world of one through NCCL: every operation's result, and how long
//!         a generation abort takes to free a rank stuck forming a world of two
//!         whose second rank never comes (and a deadline, without the abort).
//!         One JSON object on stdout.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Parser, Subcommand};
use dpo_worker::collective::nccl::{self, NcclCollective, NcclOptions};
use dpo_worker::collective::{AbortSignal, Collective, CollectiveError};
use dpo_worker::model::checkpoint;
use tch::{Device, Kind, Tensor};

#[derive(Parser, Debug)]
struct Args {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    Logits {
        #[arg(long)]
        model: PathBuf,
        #[arg(long)]
        inputs: PathBuf,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value = "cuda", value_parser = dpo_worker::parse_device)]
        device: Device,
        #[arg(long, default_value = "f32", value_parser = dpo_worker::parse_kind)]
        dtype: Kind,
    },
    Nccl {
        #[arg(long, default_value = "cuda:0", value_parser = dpo_worker::parse_device)]
        device: Device,
        #[arg(long, default_value_t = 10_000_003)]
        elements: i64,
    },
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    match Args::parse().command {
        Cmd::Logits {
            model,
            inputs,
            out,
            device,
            dtype,
        } => logits(&model, &inputs, &out, device, dtype),
        Cmd::Nccl { device, elements } => nccl_check(device, elements),
    }
}

fn logits(
    model: &std::path::Path,
    inputs: &std::path::Path,
    out: &std::path::Path,
    device: Device,
    dtype: Kind,
) -> anyhow::Result<()> {
    let m = checkpoint::load(model, dtype, device).context("loading the model")?;
    let named = Tensor::read_safetensors(inputs).context("reading the inputs")?;
    let mut seqs: Vec<(usize, Tensor)> = named
        .into_iter()
        .filter_map(|(k, t)| {
            k.strip_prefix("input_ids.")
                .and_then(|n| n.parse::<usize>().ok())
                .map(|n| (n, t))
        })
        .collect();
    seqs.sort_by_key(|(n, _)| *n);
    anyhow::ensure!(!seqs.is_empty(), "{}: no input_ids.N", inputs.display());
    let _guard = tch::no_grad_guard();
    let mut outputs: Vec<(String, Tensor)> = Vec::new();
    for (n, ids) in &seqs {
        let ids = ids.to_kind(Kind::Int64).to_device(device).reshape([1, -1]);
        let l = m.forward(&ids, None)?;
        outputs.push((
            format!("logits.{n}"),
            l.squeeze_dim(0).to_kind(Kind::Float).to_device(Device::Cpu),
        ));
    }
    // One right-padded batch.
    let longest = seqs.iter().map(|(_, t)| t.numel()).max().unwrap_or(0) as i64;
    let b = seqs.len() as i64;
    let ids = Tensor::zeros([b, longest], (Kind::Int64, Device::Cpu));
    let mask = Tensor::zeros([b, longest], (Kind::Int64, Device::Cpu));
    for (row, (_, t)) in seqs.iter().enumerate() {
        let len = t.numel() as i64;
        ids.get(row as i64)
            .narrow(0, 0, len)
            .copy_(&t.to_kind(Kind::Int64).reshape([-1]));

        let _ = mask.get(row as i64).narrow(0, 0, len).fill_(1);
    }
    let l = m.forward(&ids.to_device(device), Some(&mask.to_device(device)))?;
    for (row, (n, t)) in seqs.iter().enumerate() {
        outputs.push((
            format!("padded.{n}"),
            l.get(row as i64)
                .narrow(0, 0, t.numel() as i64)
                .to_kind(Kind::Float)
                .to_device(Device::Cpu),
        ));
    }
    Tensor::write_safetensors(&outputs, out).context("writing the logits")?;
    Ok(())
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

fn nccl_check(device: Device, elements: i64) -> anyhow::Result<()> {
    let Device::Cuda(index) = device else {
        anyhow::bail!("nccl needs a CUDA device");
    };
    if let Some(why) = nccl::unavailable(device) {
        anyhow::bail!("{why}");
    }
    let lib = nccl::library().map_err(anyhow::Error::msg)?;
    let id = lib.unique_id().map_err(anyhow::Error::msg)?;
    let start = Instant::now();
    let mut c = NcclCollective::connect(0, 1, index, &id, &NcclOptions::default())?;
    let init_s = start.elapsed().as_secs_f64();
    tch::manual_seed(0);
    let x = Tensor::randn([elements], (Kind::Float, device));
    let mut ops = serde_json::Map::new();
    let mut t = x.copy();
    c.all_reduce_tensor(&mut t)?;
    ops.insert("all_reduce_tensor".into(), max_diff(&t, &x).into());
    let mut t = x.copy();
    c.reduce_scatter_tensor(&mut t)?;
    ops.insert("reduce_scatter_tensor".into(), max_diff(&t, &x).into());
    let mut t = x.copy();
    c.all_gather_tensor_chunks(&mut t)?;
    ops.insert("all_gather_tensor_chunks".into(), max_diff(&t, &x).into());
    let mut host: Vec<f32> = (0..1000).map(|i| i as f32 * 0.5).collect();
    let before = host.clone();
    c.all_reduce_sum(&mut host)?;
    let host_diff = host
        .iter()
        .zip(&before)
        .map(|(a, b)| (a - b).abs() as f64)
        .fold(0.0, f64::max);
    ops.insert("all_reduce_sum_host".into(), host_diff.into());
    let got = c.all_gather(b"seven b")?;
    ops.insert(
        "all_gather_bytes_ok".into(),
        (got == vec![b"seven b".to_vec()]).into(),
    );
    let got = c.broadcast(b"root's bytes", 0)?;
    ops.insert("broadcast_ok".into(), (got == b"root's bytes").into());
    // Timing of a large in-place all-reduce (a world of one: the call's cost).
    let mut big = Tensor::ones([64 << 20], (Kind::Float, device));
    c.all_reduce_tensor(&mut big)?;
    let t0 = Instant::now();
    for _ in 0..10 {
        c.all_reduce_tensor(&mut big)?;
    }
    let per_call_ms = t0.elapsed().as_secs_f64() * 100.0;
    drop(c);

    // A world of two whose rank 1 never comes: the abort frees rank 0 at once.
    let signal = AbortSignal::default();
    let id2 = lib.unique_id().map_err(anyhow::Error::msg)?;
    let opts = NcclOptions {
        abort: signal.clone(),
        connect_timeout: Duration::from_secs(120),
        ..NcclOptions::default()
    };
    let waiter = std::thread::spawn(move || {
        let r = NcclCollective::connect(0, 2, index, &id2, &opts);
        (r.map(|_| ()), Instant::now())
    });
    std::thread::sleep(Duration::from_secs(2));
    let fired = Instant::now();
    signal.abort();
    let (r, returned) = waiter
        .join()
        .map_err(|_| anyhow::anyhow!("abort thread panicked"))?;
    let abort_s = returned.saturating_duration_since(fired).as_secs_f64();
    let aborted = matches!(r, Err(CollectiveError::Aborted));

    // The same without an abort: the deadline frees it.
    let id3 = lib.unique_id().map_err(anyhow::Error::msg)?;
    let opts = NcclOptions {
        connect_timeout: Duration::from_secs(3),
        ..NcclOptions::default()
    };
    let t0 = Instant::now();
    let r = NcclCollective::connect(0, 2, index, &id3, &opts);
    let timeout_s = t0.elapsed().as_secs_f64();
    let timed_out = matches!(r, Err(CollectiveError::Timeout { .. }));

    println!(
        "{}",
        serde_json::json!({
            "nccl_version": lib.version,
            "nccl_path": lib.path,
            "init_seconds": init_s,
            "max_abs_diff": ops,
            "all_reduce_256MiB_ms": per_call_ms,
            "abort_returned": aborted,
            "abort_seconds": abort_s,
            "deadline_returned": timed_out,
            "deadline_seconds": timeout_s,
        })
    );
    Ok(())
}
