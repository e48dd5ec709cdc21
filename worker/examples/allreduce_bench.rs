//! All-reduce throughput of the `tcp` collective on loopback against a plain memcpy
//! of the same bytes, in one run.
//!
//!     allreduce_bench [--world 2] [--mib 64] [--iters 5]
//!
//! W ranks run as threads of this process over real TCP sockets on 127.0.0.1. The
//! figure is the algorithm bandwidth (buffer bytes / time per all-reduce) and the
//! ratio against memcpy bandwidth of the same buffer.

use std::net::{SocketAddr, TcpListener};
use std::time::Instant;

use clap::Parser;
use dpo_worker::collective::Collective;
use dpo_worker::collective::tcp::{TcpCollective, TcpOptions};

#[derive(Parser, Debug)]
struct Args {
    #[arg(long, default_value_t = 2)]
    world: usize,
    #[arg(long, default_value_t = 64)]
    mib: usize,
    #[arg(long, default_value_t = 5)]
    iters: usize,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let n = args.mib * (1 << 20) / 4;
    let listeners: Vec<TcpListener> = (0..args.world)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<Result<_, _>>()?;
    let peers: Vec<SocketAddr> = listeners
        .iter()
        .map(|l| l.local_addr())
        .collect::<Result<_, _>>()?;
    let handles: Vec<_> = listeners
        .into_iter()
        .enumerate()
        .map(|(rank, l)| {
            let peers = peers.clone();
            let iters = args.iters;
            std::thread::spawn(move || -> anyhow::Result<f64> {
                let mut ring = TcpCollective::connect(rank, &peers, l, 0, &TcpOptions::default())?;
                let mut data = vec![rank as f32; n];
                ring.all_reduce_sum(&mut data)?; // warm-up
                let t = Instant::now();
                for _ in 0..iters {
                    ring.all_reduce_sum(&mut data)?;
                }
                Ok(t.elapsed().as_secs_f64() / iters as f64)
            })
        })
        .collect();
    let mut secs = 0.0f64;
    for h in handles {
        secs = secs.max(h.join().map_err(|_| anyhow::anyhow!("rank panicked"))??);
    }
    let src = vec![1.0f32; n];
    let mut dst = vec![0.0f32; n];
    dst.copy_from_slice(&src);
    let t = Instant::now();
    for _ in 0..args.iters {
        dst.copy_from_slice(&src);
        std::hint::black_box(&mut dst);
    }
    let copy = t.elapsed().as_secs_f64() / args.iters as f64;
    let bytes = (n * 4) as f64;
    println!(
        "{}",
        serde_json::json!({
            "world": args.world, "mib": args.mib,
            "allreduce_seconds": secs, "allreduce_gib_per_s": bytes / secs / (1u64 << 30) as f64,
            "memcpy_seconds": copy, "memcpy_gib_per_s": bytes / copy / (1u64 << 30) as f64,
            "ratio_allreduce_to_memcpy": copy / secs,
        })
    );
    Ok(())
}
