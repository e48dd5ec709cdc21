//! Runs the coordinator's engine in a simulated cluster (see
//! `dpo_coordinator::sim`): one seed, or many, each checked after every event.
//!
//!     dpo-sim --seeds 1000                 # seeds 0..1000, small worlds with faults
//!     dpo-sim --seed 154 --workers 4 …     # one seed, as a failure's replay line says
//!     dpo-sim --scale 8,64,512,2048         # the scale figures (docs/BENCHMARKS.md)
//!
//! Flags not given take the values `Config::small(seed)` draws for the seed.
//! Exits 1 on the first broken invariant, printing its replay command and the
//! last events.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use dpo_coordinator::sim::{Call, Config, Failure, Outcome, Scripted, ScriptedFault, Sim, shrink};

/// The system allocator, counting the bytes live: what `--scale` measures
/// the coordinator's heap with.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is passed to the system allocator unchanged; only the
// count of live bytes is kept beside it.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract, passed on.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            LIVE.fetch_add(layout.size(), Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller's contract, passed on.
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller's contract, passed on.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
            LIVE.fetch_add(new_size, Ordering::Relaxed);
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn live_bytes() -> usize {
    LIVE.load(Ordering::Relaxed)
}

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
    /// A scripted kill -9: `AFTER_STEP:DELAY_MS:RANK:0` (repeatable).
    #[arg(long)]
    kill: Vec<String>,
    /// A scripted freeze: `AFTER_STEP:DELAY_MS:RANK:FOR_MS` (repeatable).
    #[arg(long)]
    freeze: Vec<String>,
    /// A scripted graceful leave (SIGTERM): `AFTER_STEP:DELAY_MS:RANK:0`
    /// (repeatable).
    #[arg(long)]
    leave: Vec<String>,
    /// The store fills at this virtual time, in ms (0: never).
    #[arg(long)]
    store_full_at_ms: Option<u64>,
    /// How long the store takes to apply a batch, in µs.
    #[arg(long)]
    store_latency_us: Option<u64>,
    /// ZeRO: 0 off, 1 shares of the optimizer state, 2 shares with replicas.
    #[arg(long)]
    zero: Option<u8>,
    /// The client cancels the run at this virtual time, in ms, and submits
    /// it again (0: never).
    #[arg(long)]
    cancel_at_ms: Option<u64>,
    /// The wall clock jumps now and then (1) or never (0).
    #[arg(long)]
    clock_jumps: Option<u8>,
    /// The workers can run NCCL (1) or form TCP rings (0).
    #[arg(long)]
    nccl: Option<u8>,
    /// Drawn faults (1-based, comma-separated) not to apply.
    #[arg(long, value_delimiter = ',')]
    skip_faults: Vec<u64>,
    /// On a failure, drop every drawn fault it does not need and print the
    /// shrunk failure and its replay command.
    #[arg(long)]
    shrink: bool,
    /// Events kept for a failure's trace.
    #[arg(long)]
    trace: Option<usize>,
    /// Measure the coordinator's heap at this recorded step (a restart).
    #[arg(long)]
    heap_at_step: Option<u64>,
    /// Instead of seeds: the scale figures for these world sizes
    /// (comma-separated), printed as Markdown tables.
    #[arg(long, value_delimiter = ',')]
    scale: Vec<usize>,
}

/// Shrinks `failure` and prints what is left of it.
fn shrunk(failure: &Failure) {
    let run = |c: &Config| {
        Sim::new(c.clone())
            .run()
            .map(|_| ())
            .map_err(|f| (f.message.clone(), f.faults))
    };
    let Some(s) = shrink(&failure.config, run) else {
        eprintln!("shrink: the failure did not come back");
        return;
    };
    let kept: Vec<String> = s.kept.iter().map(|n| format!("#{n}")).collect();
    eprintln!(
        "\nshrunk to {} of {} drawn faults ({}) in {} runs:",
        s.kept.len(),
        failure.faults,
        kept.join(", "),
        s.runs
    );
    if let Err(f) = Sim::new(s.config).run() {
        eprintln!("{f}");
    }
}

/// `AFTER_STEP:DELAY_MS:RANK:MS` of `--kill`/`--freeze`/`--leave`.
fn scripted(text: &str, kind: &str) -> anyhow::Result<Scripted> {
    let parts: Vec<u64> = text
        .split(':')
        .map(str::parse)
        .collect::<Result<_, _>>()
        .with_context(|| format!("{text:?}: AFTER_STEP:DELAY_MS:RANK:MS, all numbers"))?;
    let [after_step, delay, rank, ms] = parts[..] else {
        anyhow::bail!("{text:?}: AFTER_STEP:DELAY_MS:RANK:MS");
    };
    let rank = u32::try_from(rank).context("rank")?;
    Ok(Scripted {
        after_step,
        delay: Duration::from_millis(delay),
        fault: match kind {
            "freeze" => ScriptedFault::Freeze {
                rank,
                for_: Duration::from_millis(ms),
            },
            "leave" => ScriptedFault::Leave { rank },
            _ => ScriptedFault::Kill { rank },
        },
    })
}

impl Args {
    fn config(&self, seed: u64) -> anyhow::Result<Config> {
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
        for k in &self.kill {
            c.script.push(scripted(k, "kill")?);
        }
        for f in &self.freeze {
            c.script.push(scripted(f, "freeze")?);
        }
        for l in &self.leave {
            c.script.push(scripted(l, "leave")?);
        }
        c.heap_at_step = self.heap_at_step;
        c.trace = self.trace.unwrap_or(c.trace);
        if let Some(ms) = self.cancel_at_ms {
            c.cancel_at = (ms > 0).then(|| Duration::from_millis(ms));
        }
        if let Some(j) = self.clock_jumps {
            c.clock_jumps = j > 0;
        }
        if let Some(n) = self.nccl {
            c.nccl = n > 0;
        }
        c.skip_faults = self.skip_faults.clone();
        if let Some(z) = self.zero {
            anyhow::ensure!(
                z <= 2,
                "--zero {z}: 0 (off), 1 (shares) or 2 (shares with replicas)"
            );
            c.zero = z;
        }
        if let Some(us) = self.store_latency_us {
            c.store_latency = Duration::from_micros(us);
        }
        if let Some(ms) = self.store_full_at_ms {
            c.store_full_at = (ms > 0).then(|| Duration::from_millis(ms));
        }
        Ok(c)
    }
}

/// Runs one scale configuration, exiting on a broken invariant.
fn run_scale(config: Config) -> Outcome {
    match Sim::new(config).with_heap_probe(live_bytes).run() {
        Ok(o) => o,
        Err(failure) => {
            eprintln!("{failure}");
            std::process::exit(1);
        }
    }
}

/// The costs between the marks of steps `from` and `to`, per step:
/// (engine µs, data plane µs, engine calls, effects).
fn per_step(o: &Outcome, from: u64, to: u64) -> Option<(f64, f64, f64, f64)> {
    let a = o.marks.iter().find(|m| m.step == from)?;
    let b = o.marks.iter().find(|m| m.step == to)?;
    let n = (to - from) as f64;
    Some((
        (b.engine_time - a.engine_time).as_secs_f64() * 1e6 / n,
        (b.data_time - a.data_time).as_secs_f64() * 1e6 / n,
        (b.engine_calls - a.engine_calls) as f64 / n,
        (b.effects - a.effects) as f64 / n,
    ))
}

/// The median time between consecutive steps up to step `upto`, in
/// virtual seconds.
fn median_step(o: &Outcome, upto: u64) -> f64 {
    let mut gaps: Vec<f64> = o
        .marks
        .windows(2)
        .filter(|p| p[1].step <= upto && p[1].step == p[0].step + 1)
        .map(|p| (p[1].at - p[0].at).as_secs_f64())
        .collect();
    gaps.sort_by(f64::total_cmp);
    gaps.get(gaps.len() / 2).copied().unwrap_or(f64::NAN)
}

/// From the scripted fault to the next generation's first assignment and
/// to the next recorded step, in virtual seconds.
fn recovery(o: &Outcome) -> Option<(f64, f64)> {
    let at = *o.scripted_at.first()?;
    let formed = o.formed.iter().find(|(_, t)| *t > at)?.1;
    let step = o.marks.iter().find(|m| m.at > at)?.at;
    Some(((formed - at).as_secs_f64(), (step - at).as_secs_f64()))
}

fn scale(worlds: &[usize]) {
    println!(
        "| workers | engine per step | data plane per step | engine calls per step | effects per step | coordinator heap | heap per worker | simulated in |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    let mut kinds = Vec::new();
    for &w in worlds {
        let mut c = Config::scale(w, Duration::from_secs(5), 60);
        c.heap_at_step = Some(55);
        let started = Instant::now();
        let o = run_scale(c);
        kinds.push((w, o.by_call, o.steps));
        let wall = started.elapsed().as_secs_f64();
        let (engine, data, calls, effects) = per_step(&o, 10, 50).unwrap_or_default();
        let heap = o.heap_bytes.unwrap_or(0);
        println!(
            "| {w} | {engine:.0} µs | {data:.0} µs | {calls:.0} | {effects:.0} | {:.2} MiB | {:.0} B | {wall:.1} s |",
            heap as f64 / (1 << 20) as f64,
            heap as f64 / w as f64
        );
    }
    println!();
    print!("| workers |");
    for k in Call::ALL {
        print!(" {} |", k.name());
    }
    println!("\n|---|---|---|---|---|---|");
    for (w, by_call, steps) in kinds {
        print!("| {w} |");
        for (calls, time) in by_call {
            let steps = steps.max(1) as f64;
            print!(
                " {:.0} × {:.0} ns = {:.0} µs |",
                calls as f64 / steps,
                time.as_secs_f64() * 1e9 / calls.max(1) as f64,
                time.as_secs_f64() * 1e6 / steps
            );
        }
        println!();
    }
    println!();
    println!(
        "| workers | lease | median step before | kill -9 → new world | kill -9 → next step | freeze → new world | freeze → next step |"
    );
    println!("|---|---|---|---|---|---|---|");
    for &w in worlds {
        for lease_s in [2u64, 5, 10] {
            let lease = Duration::from_secs(lease_s);
            let mut row = Vec::new();
            for freeze in [false, true] {
                let mut c = Config::scale(w, lease, 40);
                c.min_workers = 1;
                let rank = (w / 2) as u32;
                c.script.push(Scripted {
                    after_step: 20,
                    delay: Duration::from_millis(300),
                    fault: if freeze {
                        // A host lost for good (it does not come back
                        // within the measurement): only its lease tells.
                        ScriptedFault::Freeze {
                            rank,
                            for_: Duration::from_secs(3600),
                        }
                    } else {
                        ScriptedFault::Kill { rank }
                    },
                });
                let o = run_scale(c);
                let (formed, step) = recovery(&o).unwrap_or((f64::NAN, f64::NAN));
                row.push(format!("{:.0} ms | {step:.2} s", formed * 1e3));
                if !freeze {
                    row.push(format!("{:.2} s", median_step(&o, 20)));
                }
            }
            println!(
                "| {w} | {lease_s} s | {} | {} | {} |",
                row[1], row[0], row[2]
            );
        }
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if !args.scale.is_empty() {
        scale(&args.scale);
        return Ok(());
    }
    let started = Instant::now();
    let mut t = Outcome::default();
    for seed in args.seed..args.seed.saturating_add(args.seeds) {
        let config = args.config(seed)?;
        match Sim::new(config).run() {
            Ok(o) => {
                if args.seeds == 1 {
                    println!(
                        "seed {seed}: {:?} after {} steps in {:.1} s of virtual time; {} generations, {} faults, {} coordinator restarts, {} stale requests refused, {} cancels, {} wall-clock jumps, {} ZeRO rollbacks; {} events, {} engine calls deciding {} effects in {:.1} ms of engine time",
                        o.state,
                        o.steps,
                        o.virtual_time.as_secs_f64(),
                        o.generations,
                        o.faults,
                        o.coordinator_restarts,
                        o.stale_requests,
                        o.cancels,
                        o.clock_jumps,
                        o.rollbacks,
                        o.events,
                        o.engine_calls,
                        o.effects,
                        o.engine_time.as_secs_f64() * 1e3
                    );
                }
                t.add(&o);
            }
            Err(failure) => {
                eprintln!("{failure}");
                if args.shrink {
                    shrunk(&failure);
                }
                std::process::exit(1);
            }
        }
    }
    if args.seeds > 1 {
        println!(
            "{} seeds passed in {:.1} s: {} steps, {} generations, {} faults, {} coordinator restarts, {} stale requests refused, {} runs cancelled and submitted again, {} wall-clock jumps; ZeRO: {} ranks torn by a broken step, {} torn steps completed from the shares, {} shares rebuilt from replicas, {} rollbacks, {} hand-offs of leaving ranks' shares; {} engine calls in {:.1} ms of engine time",
            args.seeds,
            started.elapsed().as_secs_f64(),
            t.steps,
            t.generations,
            t.faults,
            t.coordinator_restarts,
            t.stale_requests,
            t.cancels,
            t.clock_jumps,
            t.torn_ranks,
            t.torn_completed,
            t.recovered_shares,
            t.rollbacks,
            t.hand_offs,
            t.engine_calls,
            t.engine_time.as_secs_f64() * 1e3
        );
    }
    Ok(())
}
