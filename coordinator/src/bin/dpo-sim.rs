//! Runs the coordinator's engine in a simulated cluster (see
//! `dpo_coordinator::sim`): one seed, or many, each checked after every event.
//!
//!     dpo-sim --seeds 1000                 # seeds 0..1000, small worlds with faults
//!     dpo-sim --seed 154 --workers 4 …     # one seed, as a failure's replay line says
//!
//! Flags not given take the values `Config::small(seed)` draws for the seed.
//! Exits 1 on the first broken invariant, printing its replay command and the
//! last events.

use std::time::{Duration, Instant};

use clap::Parser;
use dpo_coordinator::sim::{Config, Sim};

#[derive(Parser, Debug)]
#[command(
    name = "dpo-sim",
    about = "Deterministic simulation of a dpo-cluster coordinator"
)]
struct Args {
    /// The first (or only) seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// How many seeds, from `--seed` on.
    #[arg(long, default_value_t = 1)]
    seeds: u64,
    #[arg(long)]
    workers: Option<usize>,
    #[arg(long)]
    min_workers: Option<usize>,
    #[arg(long)]
    max_workers: Option<usize>,
    #[arg(long)]
    steps: Option<u64>,
    #[arg(long)]
    batch: Option<usize>,
    #[arg(long)]
    examples: Option<usize>,
    #[arg(long)]
    checkpoint_every: Option<u64>,
    #[arg(long)]
    lease_ms: Option<u64>,
    #[arg(long)]
    step_ms: Option<u64>,
    #[arg(long)]
    collective_timeout_ms: Option<u64>,
    /// Mean time between faults (0: none).
    #[arg(long)]
    fault_every_ms: Option<u64>,
    #[arg(long)]
    faults_until_s: Option<u64>,
    #[arg(long)]
    settle_s: Option<u64>,
    #[arg(long)]
    max_delay_ms: Option<u64>,
    /// One store transaction in N fails (0: never).
    #[arg(long)]
    store_fail_one_in: Option<u64>,
}

impl Args {
    fn config(&self, seed: u64) -> Config {
        let mut c = Config::small(seed);
        let ms = Duration::from_millis;
        let s = Duration::from_secs;
        if let Some(v) = self.workers {
            c.workers = v;
            c.max_workers = c.max_workers.min(v).max(c.min_workers);
        }
        if let Some(v) = self.min_workers {
            c.min_workers = v;
        }
        if let Some(v) = self.max_workers {
            c.max_workers = v;
        }
        c.steps = self.steps.unwrap_or(c.steps);
        c.batch = self.batch.unwrap_or(c.batch);
        c.examples = self.examples.unwrap_or(c.examples);
        c.checkpoint_every = self.checkpoint_every.unwrap_or(c.checkpoint_every).max(1);
        c.lease = self.lease_ms.map_or(c.lease, ms);
        c.step_time = self.step_ms.map_or(c.step_time, ms);
        c.collective_timeout = self.collective_timeout_ms.map_or(c.collective_timeout, ms);
        c.fault_every = self.fault_every_ms.map_or(c.fault_every, ms);
        c.faults_until = self.faults_until_s.map_or(c.faults_until, s);
        c.settle = self.settle_s.map_or(c.settle, s);
        c.max_delay = self.max_delay_ms.map_or(c.max_delay, ms);
        c.store_fail_one_in = self.store_fail_one_in.unwrap_or(c.store_fail_one_in);
        c
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let started = Instant::now();
    let (mut faults, mut restarts, mut steps, mut generations, mut stale) = (0, 0, 0, 0, 0);
    let mut engine_time = Duration::ZERO;
    let mut calls = 0u64;
    for seed in args.seed..args.seed.saturating_add(args.seeds) {
        let config = args.config(seed);
        match Sim::new(config).run() {
            Ok(o) => {
                if args.seeds == 1 {
                    println!(
                        "seed {seed}: {:?} after {} steps in {:.1} s of virtual time; {} generations, {} faults, {} coordinator restarts, {} stale requests refused; {} events, {} engine calls deciding {} effects in {:.1} ms of engine time",
                        o.state,
                        o.steps,
                        o.virtual_time.as_secs_f64(),
                        o.generations,
                        o.faults,
                        o.coordinator_restarts,
                        o.stale_requests,
                        o.events,
                        o.engine_calls,
                        o.effects,
                        o.engine_time.as_secs_f64() * 1e3
                    );
                }
                faults += o.faults;
                restarts += o.coordinator_restarts;
                steps += o.steps;
                generations += o.generations;
                stale += o.stale_requests;
                engine_time += o.engine_time;
                calls += o.engine_calls;
            }
            Err(failure) => {
                eprintln!("{failure}");
                std::process::exit(1);
            }
        }
    }
    if args.seeds > 1 {
        println!(
            "{} seeds passed in {:.1} s: {steps} steps, {generations} generations, {faults} faults, {restarts} coordinator restarts, {stale} stale requests refused; {calls} engine calls in {:.1} ms of engine time",
            args.seeds,
            started.elapsed().as_secs_f64(),
            engine_time.as_secs_f64() * 1e3
        );
    }
    Ok(())
}
