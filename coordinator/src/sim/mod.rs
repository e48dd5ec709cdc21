//! Deterministic simulation of a cluster around the real engine.
//!
//! One seed decides everything: the simulated workers (registering, beating,
//! training in lock-step rings, fetching their share of every batch through
//! the real data plane, reporting every step from every rank, committing
//! checkpoints, finishing), their step times and stragglers, the network's
//! delays and duplicated reports, and the faults — a worker killed
//! (`kill -9`: its stream closes, it comes back as a new process), paused
//! (`SIGSTOP`) or cut off from the coordinator for shorter or longer than its
//! lease, leaving, a coordinator killed with effects it decided but had not
//! applied, then started again from what the store holds
//! ([`Engine::recover`], the code a real coordinator starts with), a client
//! cancelling the run and submitting it again, the wall clock jumping. Each
//! process carries its parameters (a fingerprint of the steps applied) and,
//! under ZeRO, its share of the optimizer state; a forming world carries out
//! [`dpo_proto::zero::plan`], the code `dpo-worker` runs. A request is
//! answered once what it decided is applied, and a worker trains no further
//! step before its report is answered, as `dpo-worker` does. Time is
//! virtual: the engine gets [`Now`] values the simulator chooses, so hours of
//! a cluster run in milliseconds.
//!
//! After every event the invariants are checked ([`Sim::check`]), each with
//! its own message: every step recorded once in the ledger and never
//! rewritten, the ledger contiguous and walking the epoch's examples batch by
//! batch, the ranks' shares covering each step's batch once, the record's
//! step and the generation never going back, the checkpoint never ahead of
//! the record, a fenced (stale) member's report never changing anything,
//! every rank training from the weights of one uninterrupted run, every ZeRO
//! share a plan takes held where it takes it from, rollbacks only to
//! committed checkpoints and only when a share is gone, the run record
//! bounded, and — once faults stop — the run ending within a bound. A
//! failure names the seed, the one command that replays it, and the last
//! events.
//!
//! What is modelled of the store: keys and values, transactions, the
//! generation fence of checkpoint commits, transactions that fail for a
//! while (tried again in order, as the real runner does), a store that
//! fills up for good. Not etcd's leases, revisions or compaction: the engine
//! reads none of them.
//!
//! [`Config::scale`] with scripted faults and a heap probe gives the scale
//! figures (`dpo-sim --scale`).

#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use dpo_data::Example;
use dpo_proto::zero::{self, Plan, Summary};
use dpo_proto::{RunSpec, v1};

use crate::coordinator::data::batch_of;
use crate::engine::{self, Effect, Engine, LedgerEntry, Member, Now, RunData, RunRecord, RunState};
use crate::store::GENERATION_KEY;
use dpo_data::rng::SplitMix64;

/// The id of the simulated run (a resubmission after a cancel is
/// `run-sim-2`).
const RUN: &str = "run-sim";

/// What one simulation does.
#[derive(Debug, Clone)]
pub struct Config {
    pub seed: u64,
    /// Worker slots (each a process that may die and come back).
    pub workers: usize,
    pub min_workers: usize,
    pub max_workers: usize,
    /// Optimizer steps of the run.
    pub steps: u64,
    /// Examples a step takes (the global batch).
    pub batch: usize,
    /// Training examples (an epoch is `examples / batch` steps).
    pub examples: usize,
    /// Rank 0 commits a checkpoint every this many steps (not at the last:
    /// the final weights are written instead, as `dpo-worker` does).
    pub checkpoint_every: u64,
    pub lease: Duration,
    /// A step's time on a worker: uniform in `[step_time / 2, 3 · step_time / 2]`,
    /// and one draw in 20 a straggler at 4×; the ring waits for its slowest.
    pub step_time: Duration,
    /// A collective that waits this long for a dead or paused member breaks,
    /// and its live members report the fault.
    pub collective_timeout: Duration,
    /// One fault, on average, this often (none: `Duration::ZERO`).
    pub fault_every: Duration,
    /// Faults happen only before this virtual time; after it the run must
    /// end within `settle`.
    pub faults_until: Duration,
    pub settle: Duration,
    /// Network delay of a message: uniform in `[0, max_delay]`.
    pub max_delay: Duration,
    /// One store transaction in this many fails for a while (etcd
    /// unreachable); the runner tries it again, and applies nothing decided
    /// after it first, as the real one does (0: never).
    pub store_fail_one_in: u64,
    /// The store fills at this virtual time: from then it refuses every
    /// transaction for good (a quota), except the record of a run's end (the
    /// embedded store's reserve). The run must then end failed, naming the
    /// store.
    pub store_full_at: Option<Duration>,
    /// How long the store takes to apply a batch of decisions.
    pub store_latency: Duration,
    /// Events kept for a failure's trace.
    pub trace: usize,
    /// Faults at set points besides the drawn ones (the scale figures'
    /// crash-to-next-step times).
    pub script: Vec<Scripted>,
    /// Drawn faults (1-based, in the order drawn) that are drawn but not
    /// applied: what the shrinker drops.
    pub skip_faults: Vec<u64>,
    /// The workers can run NCCL (a GPU cluster: `cluster.backend = "auto"`
    /// picks it, and assignments carry no peer addresses); else a TCP ring.
    pub nccl: bool,
    /// The client cancels the run at this virtual time and, once it has
    /// ended cancelled, submits the same spec again as a new run, which must
    /// succeed (its own draw: the other draws of the seed are the same
    /// without it).
    pub cancel_at: Option<Duration>,
    /// The wall clock jumps (forwards and back, up to an hour) every few
    /// seconds: leases are timed on the monotonic clock, so no decision may
    /// change (its own draws too).
    pub clock_jumps: bool,
    /// ZeRO (`train.zero_stage` ≥ 1): 0 off; 1 each rank holds one share of
    /// the optimizer state; 2 also a replica of its predecessor's
    /// (`train.zero_replicas = 2`). A forming world carries out
    /// [`dpo_proto::zero::plan`] as `dpo-worker` does, and the simulator
    /// checks each plan against its own record of which share each process
    /// holds, at which step.
    pub zero: u8,
    /// At this recorded step the coordinator's heap is measured (with the
    /// probe given to [`Sim::with_heap_probe`]): the engine is dropped, which
    /// is a coordinator crash, and started again from the store at once.
    pub heap_at_step: Option<u64>,
}

/// A fault at a set point: `delay` after step `after_step` is recorded.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Scripted {
    pub after_step: u64,
    pub delay: Duration,
    pub fault: ScriptedFault,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ScriptedFault {
    /// `kill -9` of the worker at this rank: its stream closes at once.
    Kill { rank: u32 },
    /// The worker at this rank is asked to leave (SIGTERM): under ZeRO its
    /// share is handed over first.
    Leave { rank: u32 },
    /// The worker at this rank stops answering (a frozen process, a cut
    /// network) for `for_`, longer than the lease: only the lease tells.
    Freeze { rank: u32, for_: Duration },
}

impl Config {
    /// A small world with faults: what `make test` runs many seeds of.
    pub fn small(seed: u64) -> Self {
        let mut r = SplitMix64::new(seed ^ 0x5eed);
        let workers = 2 + r.below(5);
        let min_workers = 1 + r.below(2);
        Config {
            seed,
            workers,
            min_workers,
            max_workers: (workers - r.below(2)).max(min_workers),
            steps: 40 + r.below(40) as u64,
            batch: 4,
            examples: 48,
            checkpoint_every: 1 + r.below(8) as u64,
            lease: Duration::from_secs(4),
            step_time: Duration::from_millis(500),
            collective_timeout: Duration::from_secs(6),
            fault_every: Duration::from_secs(3 + r.below(12) as u64),
            faults_until: Duration::from_secs(60),
            settle: Duration::from_secs(600),
            max_delay: Duration::from_millis(200),
            store_fail_one_in: 100,
            trace: 40,
            script: Vec::new(),
            heap_at_step: None,
            // One seed in ten fills its store, some time in the first minute.
            store_full_at: (r.below(10) == 0).then(|| Duration::from_secs(5 + r.below(55) as u64)),
            store_latency: Duration::from_micros(50),
            // A third of the seeds without ZeRO, a third with shares, a
            // third with shares and replicas.
            zero: r.below(3) as u8,
            // One seed in eight is cancelled in its first minute and
            // submitted again (drawn apart, so that the seed's other draws
            // stay what they were).
            cancel_at: {
                let mut c = SplitMix64::new(seed ^ 0xca9ce1);
                (c.below(8) == 0).then(|| Duration::from_millis(3000 + c.below(50_000) as u64))
            },
            clock_jumps: true,
            nccl: false,
            skip_faults: Vec::new(),
        }
    }

    /// A fault-free world of `workers` GPU workers (NCCL) training `steps`
    /// steps of a fixed global batch of 4,096 examples (8 steps an epoch),
    /// every worker a member: what the scale figures measure.
    pub fn scale(workers: usize, lease: Duration, steps: u64) -> Self {
        Config {
            seed: 1,
            workers,
            min_workers: workers,
            max_workers: workers,
            steps,
            batch: 4096,
            examples: 4096 * 8,
            checkpoint_every: 50,
            lease,
            step_time: Duration::from_millis(1000),
            collective_timeout: Duration::from_secs(30),
            fault_every: Duration::ZERO,
            faults_until: Duration::ZERO,
            settle: Duration::from_secs(3600),
            max_delay: Duration::from_millis(20),
            store_fail_one_in: 0,
            trace: 40,
            script: Vec::new(),
            heap_at_step: None,
            store_full_at: None,
            store_latency: Duration::from_micros(50),
            zero: 0,
            cancel_at: None,
            clock_jumps: false,
            // What a cluster of 2,048 is: GPUs.
            nccl: true,
            skip_faults: Vec::new(),
        }
    }

    /// The command that runs this configuration again.
    pub fn replay_command(&self) -> String {
        let mut extra = String::new();
        for s in &self.script {
            let (flag, rank, ms) = match s.fault {
                ScriptedFault::Kill { rank } => ("kill", rank, 0),
                ScriptedFault::Leave { rank } => ("leave", rank, 0),
                ScriptedFault::Freeze { rank, for_ } => ("freeze", rank, for_.as_millis()),
            };
            extra += &format!(
                " --{flag} {}:{}:{rank}:{ms}",
                s.after_step,
                s.delay.as_millis()
            );
        }
        if let Some(step) = self.heap_at_step {
            extra += &format!(" --heap-at-step {step}");
        }
        if !self.skip_faults.is_empty() {
            let list: Vec<String> = self.skip_faults.iter().map(u64::to_string).collect();
            extra += &format!(" --skip-faults {}", list.join(","));
        }
        extra += &format!(
            " --store-full-at-ms {} --store-latency-us {} --zero {} --cancel-at-ms {} --clock-jumps {} --nccl {}",
            self.store_full_at.map_or(0, |t| t.as_millis()),
            self.store_latency.as_micros(),
            self.zero,
            self.cancel_at.map_or(0, |t| t.as_millis()),
            u8::from(self.clock_jumps),
            u8::from(self.nccl)
        );
        format!(
            "cargo run --release -p dpo-coordinator --bin dpo-sim -- --seed {} --workers {} --min-workers {} --max-workers {} --steps {} --batch {} --examples {} --checkpoint-every {} --lease-ms {} --step-ms {} --collective-timeout-ms {} --fault-every-ms {} --faults-until-s {} --settle-s {} --max-delay-ms {} --store-fail-one-in {}{extra}",
            self.seed,
            self.workers,
            self.min_workers,
            self.max_workers,
            self.steps,
            self.batch,
            self.examples,
            self.checkpoint_every,
            self.lease.as_millis(),
            self.step_time.as_millis(),
            self.collective_timeout.as_millis(),
            self.fault_every.as_millis(),
            self.faults_until.as_secs(),
            self.settle.as_secs(),
            self.max_delay.as_millis(),
            self.store_fail_one_in,
        )
    }
}

/// How a simulation ended.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    pub state: Option<RunState>,
    pub steps: u64,
    pub generations: u64,
    pub faults: u64,
    pub coordinator_restarts: u64,
    /// Requests of members whose generation had been superseded (each one
    /// checked to change nothing).
    pub stale_requests: u64,
    /// Store transactions that failed (and were caught up).
    pub store_failures: u64,
    pub events: u64,
    /// Engine calls and the effects they decided (the messages of the run).
    pub engine_calls: u64,
    pub effects: u64,
    /// Real time spent inside the engine (its own cost, measured while
    /// simulating).
    pub engine_time: Duration,
    /// Real time spent cutting the ranks' shares of batches (the data
    /// plane, outside the engine's lock in the real coordinator).
    pub data_time: Duration,
    /// Batches served.
    pub fetches: u64,
    /// The moment each step was first recorded, with the costs so far.
    pub marks: Vec<StepMark>,
    /// When each scripted fault fired (virtual time).
    pub scripted_at: Vec<Duration>,
    /// When each generation's world formed (its last member's assignment
    /// arrived).
    pub formed: Vec<(u64, Duration)>,
    /// The coordinator's heap at `heap_at_step`, without the run's dataset.
    pub heap_bytes: Option<u64>,
    /// ZeRO worlds that handed leaving ranks' shares over.
    pub hand_offs: u64,
    /// Runs cancelled by the client (and submitted again), and wall-clock
    /// jumps.
    pub cancels: u64,
    pub clock_jumps: u64,
    /// ZeRO: worlds that went back to a checkpoint, steps torn on every
    /// rank and completed from the shares, shares rebuilt from replicas,
    /// and ranks left torn by a broken step.
    pub rollbacks: u64,
    pub torn_completed: u64,
    pub recovered_shares: u64,
    pub torn_ranks: u64,
    /// Engine calls and their time by kind ([`Call`] as the index).
    pub by_call: [(u64, Duration); 5],
    pub virtual_time: Duration,
    /// The ledger: per step, its examples and the world that trained it.
    pub ledger: Vec<LedgerEntry>,
}

impl Outcome {
    /// Adds `o`'s counts to these (the totals over many seeds).
    pub fn add(&mut self, o: &Outcome) {
        self.steps += o.steps;
        self.generations += o.generations;
        self.faults += o.faults;
        self.coordinator_restarts += o.coordinator_restarts;
        self.stale_requests += o.stale_requests;
        self.store_failures += o.store_failures;
        self.events += o.events;
        self.engine_calls += o.engine_calls;
        self.effects += o.effects;
        self.engine_time += o.engine_time;
        self.data_time += o.data_time;
        self.fetches += o.fetches;
        self.hand_offs += o.hand_offs;
        self.cancels += o.cancels;
        self.clock_jumps += o.clock_jumps;
        self.rollbacks += o.rollbacks;
        self.torn_completed += o.torn_completed;
        self.recovered_shares += o.recovered_shares;
        self.torn_ranks += o.torn_ranks;
    }
}

/// What an engine call was, for the cost by kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Call {
    Heartbeat,
    /// A rank's step report.
    Report,
    /// A rank's batch fetch (the member check, and the count of it served).
    Fetch,
    /// The periodic reconcile.
    Reconcile,
    /// Registrations, streams, checkpoints, faults, the end.
    Other,
}

impl Call {
    pub const ALL: [Call; 5] = [
        Call::Heartbeat,
        Call::Report,
        Call::Fetch,
        Call::Reconcile,
        Call::Other,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Call::Heartbeat => "heartbeat",
            Call::Report => "step report",
            Call::Fetch => "batch fetch",
            Call::Reconcile => "reconcile",
            Call::Other => "other",
        }
    }
}

/// When a step was first recorded and what the coordinator had spent by then.
#[derive(Debug, Clone, Copy, Default)]
pub struct StepMark {
    pub step: u64,
    pub at: Duration,
    pub engine_time: Duration,
    pub data_time: Duration,
    pub engine_calls: u64,
    pub effects: u64,
}

/// A broken invariant: its message, the configuration that replays it, and
/// the last events.
#[derive(Debug, Clone)]
pub struct Failure {
    pub message: String,
    pub config: Config,
    pub at: Duration,
    pub trace: Vec<String>,
    /// Faults drawn before it failed (see [`Config::skip_faults`]).
    pub faults: u64,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "seed {}: {} (at {:.3} s of virtual time)",
            self.config.seed,
            self.message,
            self.at.as_secs_f64()
        )?;
        writeln!(f, "replay: {}", self.config.replay_command())?;
        writeln!(f, "last events:")?;
        for line in &self.trace {
            writeln!(f, "  {line}")?;
        }
        Ok(())
    }
}

/// A failing configuration with as few of its drawn faults as still fail it
/// the same way ([`shrink`]).
#[derive(Debug, Clone)]
pub struct Shrunk {
    pub config: Config,
    /// The drawn faults kept (1-based, in the order drawn).
    pub kept: Vec<u64>,
    /// Simulations run to find it.
    pub runs: u32,
}

/// What a failure says, without its numbers: failures with the same
/// signature are taken for the same bug.
pub fn signature(message: &str) -> String {
    message.chars().filter(|c| !c.is_ascii_digit()).collect()
}

/// Drops drawn faults from `config` — one at a time, until none can go —
/// while `run` still fails it with the same [`signature`]. `run`
/// gives a failure's message and how many faults were drawn before it;
/// `None` when `config` does not fail. A dropped fault is still drawn
/// ([`Config::skip_faults`]), so the faults before it stay the same; what
/// follows it may change, as it would.
pub fn shrink(
    config: &Config,
    mut run: impl FnMut(&Config) -> Result<(), (String, u64)>,
) -> Option<Shrunk> {
    let (message, mut drawn) = run(config).err()?;
    let want = signature(&message);
    let mut best = config.clone();
    let mut runs = 1;
    // After each fault dropped, from the first again (the run after it has
    // changed, and with it how many faults are drawn).
    loop {
        let dropped = (1..=drawn)
            .filter(|n| !best.skip_faults.contains(n))
            .find_map(|n| {
                let mut c = best.clone();
                c.skip_faults.push(n);
                c.skip_faults.sort_unstable();
                runs += 1;
                match run(&c) {
                    Err((m, d)) if signature(&m) == want => Some((c, d)),
                    _ => None,
                }
            });
        match dropped {
            Some((c, d)) => (best, drawn) = (c, d),
            None => break,
        }
    }
    let kept = (1..=drawn)
        .filter(|n| !best.skip_faults.contains(n))
        .collect();
    Some(Shrunk {
        config: best,
        kept,
        runs,
    })
}

/// What happens next.
#[derive(Debug, Clone)]
enum Event {
    /// A worker process starts (first, or after a crash) or registers
    /// again; the number is its loop's (a stale loop's event is dropped).
    Start(usize, u64),
    Heartbeat(usize, u64),
    /// The coordinator's periodic reconcile (leases).
    Reconcile,
    /// The coordinator applies the effects its calls decided.
    Apply,
    /// An assignment reaches a worker on stream `stream`.
    Deliver {
        worker: usize,
        stream: u64,
        kind: v1::assignment::Kind,
    },
    /// A ring of generation `generation` finishes its next step (or checks
    /// on a missing member); `tick` is the ring's, an older one is dropped.
    RingStep {
        generation: u64,
        tick: u64,
    },
    /// A member's request reaches the coordinator (`process`: the
    /// incarnation of the worker that sent it).
    Request {
        worker: usize,
        process: u64,
        request: Request,
    },
    /// A fault fires.
    Fault,
    /// A paused worker continues.
    Resume(usize),
    /// A worker's network to the coordinator heals.
    Heal(usize),
    /// A scripted fault fires (its index in the script).
    Scripted(usize),
    /// The coordinator's heap is measured (`Config::heap_at_step`).
    HeapProbe,
    /// The coordinator comes back after a crash.
    CoordinatorUp,
    /// The client cancels the run (again, if the coordinator died before
    /// the cancel was recorded).
    Cancel,
    /// The client submits the cancelled run's spec again.
    Resubmit,
    /// The wall clock jumps.
    ClockJump,
}

#[derive(Debug, Clone)]
enum Request {
    Step {
        member: Member,
        step: u64,
        trained: (u64, u32),
    },
    Checkpoint {
        member: Member,
        step: u64,
    },
    Done {
        member: Member,
        step: u64,
    },
    Fault {
        member: Member,
    },
    /// The world went back to the checkpoint of `to_step` (a ZeRO share
    /// was lost).
    Rollback {
        member: Member,
        from_step: u64,
        to_step: u64,
    },
}

#[derive(Debug, Clone, Default)]
struct Worker {
    up: bool,
    /// Its registration loop and heartbeat loop: an event of an older one is
    /// dropped, so that one process has one of each.
    loop_id: u64,
    session: Vec<u8>,
    stream: Option<u64>,
    paused: bool,
    /// The generation it trains in: (member, world size).
    work: Option<(Member, u32)>,
    /// A report in flight arrives no earlier than this (per-worker order).
    outbox_at: Duration,
    /// An assignment in flight arrives no earlier than this (its stream's
    /// order).
    inbox_at: Duration,
    /// The metrics it holds of the step its state stands at: that step and
    /// the generation and world that trained it (its own, or handed over
    /// with the state it took), to report that step again if need be. A new
    /// process, or one that went back to a checkpoint, has none.
    done: Option<(u64, (u64, u32))>,
    /// Its requests not answered yet: the coordinator answers once what the
    /// request decided is applied, and a worker trains no further step
    /// before its reports are answered (so the world is at most one step
    /// ahead of the stored record).
    unanswered: u32,
    /// Its incarnation: a new process after each crash or leave.
    process: u64,
    /// Cut off from the coordinator (not from its peers) until this virtual
    /// time: its heartbeats and requests are lost (it tries again), and an
    /// assignment sent meanwhile breaks its stream.
    cut_until: Duration,
    /// Its stream broke while it was cut off: it registers again when the
    /// network heals.
    stream_broken: bool,
    /// Its training state (none: a new process, which restores the
    /// checkpoint its first assignment names), and the run it belongs to.
    held: Option<Held>,
    trainer_run: String,
    /// Asked to leave (SIGTERM) under ZeRO: it says so in its world's next
    /// step, after which the world hands its share over and it goes (its
    /// next process starting `back_after` later).
    leaving: bool,
    back_after: Duration,
}

/// A process's training state as the simulator records it: its parameters
/// (a fingerprint of the steps applied to them, in order) and, under ZeRO,
/// the share of the optimizer state it holds and the step that share's
/// update reflects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Held {
    /// The step its parameters stand at.
    step: u64,
    /// [`weights_after`] of the steps applied since the initial weights.
    weights: u64,
    /// The partition it holds a share of (0: whole, or no ZeRO) and its
    /// rank in it.
    world: u64,
    rank: u64,
    /// The step its share (and replica) reflects: `step`, or `step + 1`
    /// when a step broke after updating the share and before gathering the
    /// parameters (torn).
    share: u64,
    /// It keeps a replica of its predecessor's share (rank − 1).
    replica: bool,
}

impl Held {
    fn whole(step: u64, weights: u64) -> Self {
        Held {
            step,
            weights,
            world: 0,
            rank: 0,
            share: step,
            replica: false,
        }
    }

    fn torn(&self) -> bool {
        self.share != self.step
    }

    /// What `dpo-worker` tells its world of itself.
    fn summary(&self) -> Summary {
        Summary {
            step: self.step,
            hash: self.weights,
            world: self.world,
            rank: self.rank,
            torn: u64::from(self.torn()),
            replica: u64::from(self.replica),
        }
    }

    /// Whether it holds share `k` of a partition over `world` ranks as it
    /// stood after step `step` (its own, or the replica of its
    /// predecessor's).
    fn holds(&self, world: u64, k: u64, step: u64) -> bool {
        self.world == world
            && world > 0
            && self.share == step
            && (self.rank == k || (self.replica && world > 1 && self.rank == (k + 1) % world))
    }
}

/// The parameters' fingerprint after step `step` is applied to `weights`.
fn weights_after(weights: u64, step: u64) -> u64 {
    SplitMix64::new(weights ^ step.wrapping_mul(0x9e37_79b9_7f4a_7c15)).next_u64()
}

/// The initial weights' fingerprint.
const INITIAL_WEIGHTS: u64 = 0x1d1e;

#[derive(Debug, Clone)]
struct Ring {
    members: Vec<usize>,
    /// The incarnation of each member's process (a member killed and
    /// started again is not this ring's any more).
    processes: Vec<u64>,
    /// Members it needs (until all have their assignment, it waits).
    world: usize,
    /// The last step its members finished.
    step: u64,
    total: u64,
    /// Waiting for a member since (to break after the collective timeout).
    stalled_since: Option<Duration>,
    /// The ring's pending RingStep event.
    tick: u64,
    /// Formed, but its members have not yet synchronised (re-reported the
    /// step the world stands at).
    fresh: bool,
    /// The committed checkpoint's step its assignment named.
    checkpoint: u64,
    /// Its members wait for answers before the next step: it has not begun
    /// (a collective step needs every rank, so none can have torn in it).
    waiting: bool,
}

/// The store as the simulator keeps it.
#[derive(Debug, Default)]
struct Store {
    kv: BTreeMap<String, String>,
}

/// The simulation.
#[derive(Debug)]
pub struct Sim {
    config: Config,
    rng: SplitMix64,
    base: Now,
    t: Duration,
    seq: u64,
    /// What happens next, by time and then by the order it was decided.
    queue: BTreeMap<(Duration, u64), Event>,
    engine: Option<Engine>,
    pending: Vec<Effect>,
    store: Store,
    workers: Vec<Worker>,
    rings: BTreeMap<u64, Ring>,
    /// The newest generation any Work assignment named.
    newest_generation: u64,
    /// Every ledger write seen, by step (kept after the run's keys go).
    ledger: BTreeMap<u64, String>,
    record_step: u64,
    checkpoint_step: u64,
    trace: VecDeque<String>,
    outcome: Outcome,
    ended: Option<RunState>,
    failure: Option<String>,
    /// Why the run ended (its record's error).
    end_reason: String,
    heap_probe: Option<fn() -> usize>,
    /// Requests whose decisions wait in `pending`: answered once applied,
    /// sent again (the worker's retry) if the coordinator dies first.
    awaiting: Vec<(usize, u64, Request)>,
    /// The weights rank 0 wrote as each step's checkpoint (before asking
    /// for its commit), and the steps whose commit the store took.
    checkpoint_weights: BTreeMap<u64, u64>,
    committed: std::collections::BTreeSet<u64>,
    /// The weights of one uninterrupted run after each step (index 0: the
    /// initial ones), which every rank must hold when it stands at a step.
    canonical: Vec<u64>,
    /// The run the simulator follows (its ledger, record, checkpoints).
    run: String,
    /// The run the client cancelled, once it did, and whether its end is
    /// recorded (after which nothing of it may be written).
    cancelled: Option<String>,
    cancelled_ended: bool,
    /// The client's and the wall clock's own draws.
    client_rng: SplitMix64,
    clock_rng: SplitMix64,
    wall_offset_ms: i64,
}

fn spec(config: &Config) -> Result<RunSpec, String> {
    let v = serde_json::json!({
        "name": "sim",
        "model": {"path": "/models/sim"},
        "data": {"train": "/data/sim.jsonl", "shuffle": false},
        "train": {"global_batch_size": config.batch, "max_steps": config.steps, "output": "/out/sim"},
        "cluster": {"min_workers": config.min_workers, "max_workers": config.max_workers},
    });
    serde_json::from_value(v).map_err(|e| format!("the simulated run's spec: {e}"))
}

fn examples(n: usize) -> Vec<Example> {
    (0..n)
        .map(|i| Example {
            line: i + 1,
            prompt: vec![1, 2, i as u32],
            chosen: Some(vec![3, 4]),
            rejected: vec![vec![5]],
        })
        .collect()
}

impl Sim {
    pub fn new(config: Config) -> Self {
        let rng = SplitMix64::new(config.seed);
        let workers = vec![Worker::default(); config.workers];
        Sim {
            rng,
            base: Now {
                instant: Instant::now(),
                unix_ms: 1_800_000_000_000,
            },
            t: Duration::ZERO,
            seq: 0,
            queue: BTreeMap::new(),
            engine: None,
            pending: Vec::new(),
            store: Store::default(),
            workers,
            rings: BTreeMap::new(),
            newest_generation: 0,
            ledger: BTreeMap::new(),
            record_step: 0,
            checkpoint_step: 0,
            trace: VecDeque::new(),
            outcome: Outcome::default(),
            ended: None,
            failure: None,
            end_reason: String::new(),
            heap_probe: None,
            awaiting: Vec::new(),
            checkpoint_weights: BTreeMap::new(),
            committed: std::collections::BTreeSet::new(),
            canonical: (1..=config.steps).fold(vec![INITIAL_WEIGHTS], |mut c, step| {
                c.push(weights_after(c[c.len() - 1], step));
                c
            }),
            run: RUN.to_string(),
            cancelled: None,
            cancelled_ended: false,
            client_rng: SplitMix64::new(config.seed ^ 0xc11e),
            clock_rng: SplitMix64::new(config.seed ^ 0xc10c),
            wall_offset_ms: 0,
            config,
        }
    }

    /// Measures the coordinator's heap at `Config::heap_at_step` with `probe`
    /// (live heap bytes of the process: a counting allocator's).
    pub fn with_heap_probe(mut self, probe: fn() -> usize) -> Self {
        self.heap_probe = Some(probe);
        self
    }

    fn now(&self) -> Now {
        let mut now = self.base.after(self.t);
        now.unix_ms += self.wall_offset_ms;
        now
    }

    /// Whether the store has filled (`Config::store_full_at`).
    fn store_is_full(&self) -> bool {
        self.config.store_full_at.is_some_and(|at| self.t >= at)
    }

    fn at(&mut self, after: Duration, event: Event) {
        self.seq += 1;
        self.queue.insert((self.t + after, self.seq), event);
    }

    fn delay(&mut self) -> Duration {
        let max = self.config.max_delay.as_micros() as u64;
        Duration::from_micros(self.rng.below(max as usize + 1) as u64)
    }

    fn log(&mut self, line: String) {
        if self.trace.len() == self.config.trace {
            self.trace.pop_front();
        }
        self.trace
            .push_back(format!("{:>10.3} s  {line}", self.t.as_secs_f64()));
    }

    fn fail(&mut self, message: String) {
        if self.failure.is_none() {
            self.failure = Some(message);
        }
    }

    /// Calls the engine (when the coordinator is up), timing it, and queues
    /// what it decided for the effects runner.
    fn call<T>(&mut self, kind: Call, f: impl FnOnce(&mut Engine, Now) -> T) -> Option<T> {
        let now = self.now();
        let engine = self.engine.as_mut()?;
        let started = Instant::now();
        let out = f(engine, now);
        let effects = engine.take_effects();
        let took = started.elapsed();
        self.outcome.engine_time += took;
        self.outcome.engine_calls += 1;
        let k = &mut self.outcome.by_call[kind as usize];
        k.0 += 1;
        k.1 += took;
        self.outcome.effects += effects.len() as u64;
        if !effects.is_empty() {
            let first = self.pending.is_empty();
            self.pending.extend(effects);
            if first {
                self.at(self.config.store_latency, Event::Apply);
            }
        }
        Some(out)
    }

    /// Runs the simulation to its end: `Ok` with what happened, or the first
    /// broken invariant.
    pub fn run(mut self) -> Result<Outcome, Box<Failure>> {
        self.boot_coordinator();
        for w in 0..self.config.workers {
            let after = Duration::from_millis(self.rng.below(2000) as u64);
            self.at(after, Event::Start(w, 0));
        }
        self.at(self.config.lease / 4, Event::Reconcile);
        if !self.config.fault_every.is_zero() {
            let first = self.exp(self.config.fault_every);
            self.at(first, Event::Fault);
        }
        if let Some(at) = self.config.cancel_at {
            self.at(at, Event::Cancel);
        }
        if self.config.clock_jumps {
            let first = Duration::from_millis(self.clock_rng.below(5000) as u64);
            self.at(first, Event::ClockJump);
        }
        let limit = self.config.faults_until + self.config.settle;
        while let Some(((t, _), event)) = self.queue.pop_first() {
            if self.ended.is_some() || t > limit {
                break;
            }
            self.t = t;
            self.outcome.events += 1;
            self.handle(event);
            self.check();
            if let Some(message) = self.failure.take() {
                return Err(self.failure_of(message));
            }
        }
        // What ends committed holds every step, each once.
        if self.ended == Some(RunState::Succeeded) && self.ledger.len() as u64 != self.config.steps
        {
            let message = format!(
                "the run succeeded with {} of its {} steps in the ledger",
                self.ledger.len(),
                self.config.steps
            );
            return Err(self.failure_of(message));
        }
        if self.ended != Some(RunState::Succeeded) {
            let message = match self.ended {
                // A full store must fail the run, naming the store.
                Some(RunState::Failed)
                    if self.store_is_full() && self.end_reason.contains("state store") =>
                {
                    String::new()
                }
                Some(state) => format!(
                    "the run ended {state:?} ({:?}), not succeeded, though every fault is one it must survive",
                    self.end_reason
                ),
                None => format!(
                    "liveness: the run did not end within {:.0} s of the last fault (recorded step {} of {})",
                    self.config.settle.as_secs_f64(),
                    self.record_step,
                    self.config.steps
                ),
            };
            if !message.is_empty() {
                if self.ended.is_none() {
                    self.dump_state();
                }
                return Err(self.failure_of(message));
            }
        }
        self.outcome.state = self.ended;
        self.outcome.steps = self.record_step;
        self.outcome.virtual_time = self.t;
        self.outcome.generations = self.newest_generation;
        self.outcome.ledger = self
            .ledger
            .values()
            .filter_map(|v| serde_json::from_str::<LedgerEntry>(v).ok())
            .collect();
        Ok(self.outcome)
    }

    /// Every worker's and ring's state, into the trace (a run that did not
    /// end: where it stands).
    fn dump_state(&mut self) {
        let record = self
            .engine
            .as_ref()
            .and_then(|e| e.run(&self.run).ok())
            .map(|r| (r.state, r.step, r.generation, r.checkpoint_step));
        self.log(format!("state: record {record:?}"));
        for w in 0..self.workers.len() {
            let x = &self.workers[w];
            let line = format!(
                "state: worker {w} up {} paused {} stream {:?} work {:?} unanswered {} done {:?} held {:?}",
                x.up,
                x.paused,
                x.stream,
                x.work.as_ref().map(|(m, n)| (m.generation, m.rank, *n)),
                x.unanswered,
                x.done,
                x.held
            );
            self.log(line);
        }
        let rings: Vec<String> = self
            .rings
            .iter()
            .map(|(g, r)| {
                format!(
                    "state: ring {g} members {:?} of {} step {} fresh {} waiting {} stalled {:?}",
                    r.members, r.world, r.step, r.fresh, r.waiting, r.stalled_since
                )
            })
            .collect();
        for line in rings {
            self.log(line);
        }
    }

    fn failure_of(&self, message: String) -> Box<Failure> {
        Box::new(Failure {
            message,
            config: self.config.clone(),
            at: self.t,
            trace: self.trace.iter().cloned().collect(),
            faults: self.outcome.faults,
        })
    }

    /// An exponential draw of mean `mean`.
    fn exp(&mut self, mean: Duration) -> Duration {
        let u = self.rng.unit().max(1e-12);
        mean.mul_f64(-u.ln())
    }

    fn boot_coordinator(&mut self) {
        let config = self.config.clone();
        let engine = Engine::recover(config.lease, &self.store.kv, |record| {
            RunData::new(&record.spec, examples(config.examples), Vec::new())
                .ok_or_else(|| engine::DataGone("too few examples".into()))
        });
        let engine = match engine {
            Ok(e) => e,
            Err(e) => {
                self.fail(format!("the coordinator cannot start from the store: {e}"));
                return;
            }
        };
        self.engine = Some(engine);
        // Effects of the recovery itself go out as usual.
        let _ = self.call(Call::Other, |_, _| ());
        if self.cancelled.is_some() && !self.cancelled_ended {
            // The cancel was lost with the old coordinator: the client,
            // not answered, asks again.
            self.at(Duration::from_millis(300), Event::Cancel);
        }
        self.add_run();
    }

    /// Submits the run the simulator follows, unless the coordinator has it
    /// (the client's submission, again after a crash lost it; not once the
    /// run was cancelled).
    fn add_run(&mut self) {
        if self.cancelled.as_deref() == Some(self.run.as_str()) {
            return;
        }
        let config = self.config.clone();
        let spec = match spec(&config) {
            Ok(s) => s,
            Err(e) => {
                self.fail(e);
                return;
            }
        };
        let now = self.now();
        let run = self.run.clone();
        let added = self.call(Call::Other, |engine, _| {
            if engine.run(&run).is_ok() {
                return Ok(());
            }
            let Some(d) = RunData::new(&spec, examples(config.examples), Vec::new()) else {
                return Err("the simulated run has too few examples".to_string());
            };
            let record = RunRecord::queued(run, spec, &d, "/shards/sim".into(), "sim".into(), now);
            engine
                .add_run(record, d, now)
                .map(|_| ())
                .map_err(|e| format!("the run is refused: {e}"))
        });
        if let Some(Err(e)) = added {
            self.fail(e);
        }
    }

    fn handle(&mut self, event: Event) {
        match event {
            Event::Start(w, id) if self.workers[w].loop_id == id => self.start(w),
            Event::Heartbeat(w, id) if self.workers[w].loop_id == id => self.heartbeat(w),
            Event::Start(..) | Event::Heartbeat(..) => {}
            Event::Reconcile => {
                let _ = self.call(Call::Reconcile, |e, now| e.reconcile(now));
                self.at(self.config.lease / 4, Event::Reconcile);
            }
            Event::Apply => self.apply(),
            Event::Deliver {
                worker,
                stream,
                kind,
            } => self.deliver(worker, stream, kind),
            Event::RingStep { generation, tick } => {
                if self.rings.get(&generation).is_some_and(|r| r.tick == tick) {
                    self.ring_step(generation);
                }
            }
            Event::Request {
                worker,
                process,
                request,
            } => self.request(worker, process, request),
            Event::Fault => self.fault(),
            Event::Heal(w) => {
                self.log(format!("worker {w} reaches the coordinator again"));
                if std::mem::take(&mut self.workers[w].stream_broken) && self.workers[w].up {
                    // Its stream ended with an error: it registers again
                    // with its session, as dpo-worker's control loop does.
                    self.workers[w].stream = None;
                    self.workers[w].work = None;
                    self.restart_loop(w, Duration::ZERO);
                }
            }
            Event::Resume(w) => {
                self.log(format!("worker {w} continues"));
                self.workers[w].paused = false;
                let id = self.workers[w].loop_id;
                self.at(Duration::ZERO, Event::Heartbeat(w, id));
            }
            Event::CoordinatorUp => {
                self.log("coordinator starts from the store".into());
                self.boot_coordinator();
            }
            Event::Scripted(i) => self.scripted(i),
            Event::HeapProbe => self.heap_probe(),
            Event::Cancel => self.cancel(),
            Event::Resubmit => self.resubmit(),
            Event::ClockJump => {
                let jump = self.clock_rng.below(7_200_001) as i64 - 3_600_000;
                self.wall_offset_ms += jump;
                self.outcome.clock_jumps += 1;
                self.log(format!("the wall clock jumps {:+.1} s", jump as f64 / 1e3));
                let next = Duration::from_millis(1000 + self.clock_rng.below(9000) as u64);
                self.at(next, Event::ClockJump);
            }
        }
    }

    /// The client cancels the run (while the coordinator is down, or again
    /// after it lost the cancel with its unapplied effects: its retries).
    fn cancel(&mut self) {
        if self.cancelled_ended || self.ended.is_some() {
            return;
        }
        let run = self.run.clone();
        match self.call(Call::Other, |e, now| e.cancel(&run, None, now)) {
            Some(Ok(_)) => {
                if self.cancelled.is_none() {
                    self.log(format!("the client cancels {run}"));
                    self.outcome.cancels += 1;
                }
                self.cancelled = Some(run);
            }
            // Ended already (it finished first): nothing to cancel.
            Some(Err(e)) => self.log(format!("the client's cancel refused: {e}")),
            None => self.at(Duration::from_millis(500), Event::Cancel),
        }
    }

    /// The client submits the cancelled run's spec again: a new run, which
    /// the simulator follows from now on (its ledger, record and
    /// checkpoints start afresh).
    fn resubmit(&mut self) {
        if self.engine.is_none() {
            self.at(Duration::from_millis(500), Event::Resubmit);
            return;
        }
        self.run = format!("{RUN}-2");
        self.log(format!("the client submits the run again as {}", self.run));
        self.ledger.clear();
        self.record_step = 0;
        self.checkpoint_step = 0;
        self.checkpoint_weights.clear();
        self.committed.clear();
        self.add_run();
    }

    /// A scripted fault: to the worker holding its rank in the current
    /// generation (none holding it: nothing happens).
    fn scripted(&mut self, i: usize) {
        let Some(s) = self.config.script.get(i).copied() else {
            return;
        };
        let rank = match s.fault {
            ScriptedFault::Kill { rank }
            | ScriptedFault::Leave { rank }
            | ScriptedFault::Freeze { rank, .. } => rank,
        };
        let Some(w) = (0..self.workers.len()).find(|&w| {
            self.workers[w]
                .work
                .as_ref()
                .is_some_and(|(m, _)| m.rank == rank && m.generation == self.newest_generation)
        }) else {
            self.log(format!("scripted fault {i}: no worker holds rank {rank}"));
            return;
        };
        self.outcome.scripted_at.push(self.t);
        self.outcome.faults += 1;
        match s.fault {
            ScriptedFault::Kill { .. } => {
                self.stop_worker(w, "killed (scripted)", Duration::from_secs(3600))
            }
            ScriptedFault::Freeze { for_, .. } => self.pause(w, for_),
            ScriptedFault::Leave { .. } => self.leave(w, Duration::from_secs(3600)),
        }
    }

    /// Drops the engine, measuring the heap it held (without the run's
    /// dataset, which the simulator keeps), then starts the coordinator
    /// again from the store at once: a coordinator crash.
    fn heap_probe(&mut self) {
        let Some(probe) = self.heap_probe else {
            return;
        };
        let Some(engine) = self.engine.take() else {
            return;
        };
        let data = engine.run_data(&self.run);
        let before = probe();
        drop(engine);
        let after = probe();
        drop(data);
        self.outcome.heap_bytes = Some(before.saturating_sub(after) as u64);
        self.log(format!(
            "coordinator heap measured: {} bytes; it starts again",
            before.saturating_sub(after)
        ));
        self.kill_coordinator(Duration::ZERO);
    }

    fn worker_id(w: usize) -> String {
        format!("w{w:04}")
    }

    /// Schedules worker `w`'s next registration attempt in a new loop
    /// (ending its heartbeats).
    fn restart_loop(&mut self, w: usize, after: Duration) {
        self.workers[w].loop_id += 1;
        let id = self.workers[w].loop_id;
        self.at(after, Event::Start(w, id));
    }

    /// A worker process registers and opens its stream.
    fn start(&mut self, w: usize) {
        let loop_id = self.workers[w].loop_id;
        if self.engine.is_none() || self.t < self.workers[w].cut_until {
            // The coordinator is down or out of reach: try again later.
            self.at(Duration::from_millis(500), Event::Start(w, loop_id));
            return;
        }
        let id = Self::worker_id(w);
        let req = v1::RegisterRequest {
            worker_id: id.clone(),
            collective_addr: format!("10.0.{}.{}:9000", w / 250, w % 250),
            nccl: self.config.nccl,
            session: self.workers[w].session.clone(),
            ..Default::default()
        };
        let registered = self.call(Call::Other, |e, now| {
            let resp = e.register(req, None, now)?;
            let stream = e.open_stream(&id, &resp.session, now)?;
            Ok::<_, engine::Refusal>((resp.session, stream))
        });
        match registered {
            Some(Ok((session, stream))) => {
                self.log(format!("worker {w} registered (stream {stream})"));
                let worker = &mut self.workers[w];
                worker.up = true;
                worker.session = session;
                worker.stream = Some(stream);
                worker.work = None;
                let beat = self.config.lease / 4;
                self.at(beat, Event::Heartbeat(w, loop_id));
            }
            // Its old lease is live (a restarted process without the old
            // session): wait for the lease to lapse, as a real worker's
            // retries do.
            Some(Err(_)) | None => self.at(Duration::from_millis(500), Event::Start(w, loop_id)),
        }
    }

    fn heartbeat(&mut self, w: usize) {
        let worker = &self.workers[w];
        if !worker.up || worker.paused {
            return;
        }
        let loop_id = worker.loop_id;
        if self.t < worker.cut_until {
            // Lost on the way: the next beat tries again.
            let beat = self.config.lease / 4;
            self.at(beat, Event::Heartbeat(w, loop_id));
            return;
        }
        let id = Self::worker_id(w);
        let session = worker.session.clone();
        match self.call(Call::Heartbeat, |e, now| e.heartbeat(&id, &session, now)) {
            Some(Some(_)) => {
                let beat = self.config.lease / 4;
                self.at(beat, Event::Heartbeat(w, loop_id));
            }
            // Unknown to the coordinator (dropped, or a new coordinator):
            // register again, keeping nothing of the old generation.
            Some(None) | None => {
                self.log(format!("worker {w} must register again"));
                let worker = &mut self.workers[w];
                worker.stream = None;
                worker.work = None;
                if self.engine.is_none() {
                    worker.session.clear();
                }
                self.restart_loop(w, Duration::from_millis(100));
            }
        }
    }

    /// The effects runner: the store writes (fenced ones only while the
    /// generation key holds their fence), assignments to the workers'
    /// streams; a committed checkpoint is reported back to the engine.
    fn apply(&mut self) {
        // The requests whose decisions these are: answered once all applied.
        let answering = self.awaiting.len();
        let mut refused = false;
        let mut effects = std::mem::take(&mut self.pending).into_iter();
        while let Some(effect) = effects.next() {
            let n = self.config.store_fail_one_in;
            if matches!(effect, Effect::Store { .. } | Effect::RecordEnd { .. })
                && n > 0
                && self.rng.below(n as usize) == 0
            {
                // The store did not take it: it is tried again after a
                // while, and everything decided after it waits.
                self.log("store: a transaction failed; it and what follows wait".into());
                self.outcome.store_failures += 1;
                let mut rest = vec![effect];
                rest.extend(effects);
                rest.append(&mut self.pending);
                self.pending = rest;
                self.at(Duration::from_millis(200), Event::Apply);
                return;
            }
            match effect {
                Effect::Store { .. } if self.store_is_full() => {
                    // Refused for good: the runner fails the run with the
                    // store's reason once this batch is applied.
                    self.log("store: full; a transaction refused for good".into());
                    refused = true;
                }
                Effect::Store { fence, writes, .. } => {
                    if let Some(f) = fence
                        && self.store.kv.get(GENERATION_KEY).map(String::as_str)
                            != Some(&f.to_string())
                    {
                        self.log(format!("store refused a write fenced by generation {f}"));
                        continue;
                    }
                    let key = engine::checkpoint_key(&self.run);
                    let checkpoint = writes
                        .iter()
                        .find_map(|(k, v)| (k == &key).then(|| v.clone()).flatten());
                    for (k, v) in writes {
                        self.write(k, v);
                    }
                    if let Some(v) = checkpoint
                        && let Ok(c) = serde_json::from_str::<engine::CheckpointRecord>(&v)
                    {
                        let run = self.run.clone();
                        let _ = self.call(Call::Other, |e, _| {
                            e.checkpoint_committed(&run, c.step, &c.path)
                        });
                    }
                }
                Effect::RecordEnd {
                    writes,
                    then_delete,
                    ..
                } => {
                    for (k, v) in writes {
                        self.write(k, v);
                    }
                    let doomed: Vec<String> = self
                        .store
                        .kv
                        .range(then_delete.clone()..)
                        .take_while(|(k, _)| k.starts_with(&then_delete))
                        .map(|(k, _)| k.clone())
                        .collect();
                    for k in doomed {
                        self.store.kv.remove(&k);
                    }
                }
                Effect::Send { worker, kind } => {
                    let Some(w) = worker
                        .strip_prefix('w')
                        .and_then(|n| n.parse::<usize>().ok())
                    else {
                        continue;
                    };
                    let Some(stream) = self.workers.get(w).and_then(|x| x.stream) else {
                        continue;
                    };
                    // One stream is one ordered connection: an assignment
                    // arrives after those sent before it.
                    let d = self.delay();
                    let at = (self.t + d).max(self.workers[w].inbox_at);
                    self.workers[w].inbox_at = at;
                    self.at(
                        at - self.t,
                        Event::Deliver {
                            worker: w,
                            stream,
                            kind,
                        },
                    );
                }
                _ => {}
            }
        }
        let answered: Vec<(usize, u64, Request)> = self.awaiting.drain(..answering).collect();
        for (w, process, _) in answered {
            self.answered(w, process);
        }
        if refused {
            // What the real runner does with a write refused for good.
            let run = self.run.clone();
            let _ = self.call(Call::Other, |e, now| {
                e.fail_run(
                    &run,
                    "the state store refused the run's state: quota exceeded".into(),
                    now,
                )
            });
        }
    }

    /// One key written, with the store-side invariants: every value bounded,
    /// generations only grow, a ledger entry is never rewritten, the
    /// record's step never goes back.
    fn write(&mut self, key: String, value: Option<String>) {
        // Every key stays bounded: its size does not grow with the steps.
        if let Some(v) = &value
            && v.len() > 64 * 1024
        {
            self.fail(format!("{key} grew to {} bytes", v.len()));
        }
        if key == GENERATION_KEY {
            let old = self
                .store
                .kv
                .get(GENERATION_KEY)
                .and_then(|v| v.parse::<u64>().ok());
            let new = value.as_deref().and_then(|v| v.parse::<u64>().ok());
            // Equal is a rewrite (the runner's catch-up after a failed write).
            if let (Some(o), Some(n)) = (old, new)
                && n < o
            {
                self.fail(format!(
                    "generation {n} written over {o}: generations must only grow"
                ));
            }
        }
        if let Some(step) = key
            .strip_prefix(&engine::ledger_prefix(&self.run))
            .and_then(|s| s.parse::<u64>().ok())
            && let Some(v) = &value
        {
            match self.ledger.get(&step) {
                Some(old) if old != v => {
                    self.fail(format!("step {step} recorded twice: {old} then {v}"));
                }
                Some(_) => {}
                None => {
                    self.check_entry(step, v);
                    self.ledger.insert(step, v.clone());
                    self.step_recorded(step);
                }
            }
        }
        if key == engine::run_key(&self.run)
            && let Some(v) = &value
        {
            if let Ok(r) = serde_json::from_str::<RunRecord>(v) {
                if r.step < self.record_step {
                    self.fail(format!(
                        "the stored record went back from step {} to {}",
                        self.record_step, r.step
                    ));
                }
                self.record_step = r.step;
            }
        }
        if let Some(old) = self.cancelled.clone()
            && self.cancelled_ended
            && key.starts_with(&engine::ledger_prefix(&old))
            && value.is_some()
        {
            self.fail(format!("{key} written after its run ended cancelled"));
        }
        if key.starts_with(engine::HISTORY_PREFIX)
            && let Some(v) = &value
            && let Ok(r) = serde_json::from_str::<RunRecord>(v)
        {
            if self.cancelled.as_deref() == Some(r.id.as_str()) && !self.cancelled_ended {
                self.cancelled_ended = true;
                if r.state == RunState::Cancelled {
                    // The client submits it again.
                    self.log(format!(
                        "run {} ended {:?} at step {}",
                        r.id, r.state, r.step
                    ));
                    let after = Duration::from_millis(200 + self.client_rng.below(2000) as u64);
                    self.at(after, Event::Resubmit);
                } else {
                    // It ended before the cancel got in: it is the run.
                    self.cancelled = None;
                }
            }
            if r.id == self.run && self.cancelled.as_deref() != Some(r.id.as_str()) {
                self.record_step = self.record_step.max(r.step);
                self.ended = Some(r.state);
                self.end_reason = r.error.clone();
                self.log(format!(
                    "run {} ended {:?} at step {}",
                    r.id, r.state, r.step
                ));
            }
        }
        if key == engine::checkpoint_key(&self.run)
            && let Some(v) = &value
            && let Ok(c) = serde_json::from_str::<engine::CheckpointRecord>(v)
        {
            if c.step < self.checkpoint_step {
                self.fail(format!(
                    "the committed checkpoint went back from step {} to {}",
                    self.checkpoint_step, c.step
                ));
            }
            self.checkpoint_step = c.step;
            self.committed.insert(c.step);
        }
        match value {
            Some(v) => self.store.kv.insert(key, v),
            None => self.store.kv.remove(&key),
        };
    }

    fn deliver(&mut self, w: usize, stream: u64, kind: v1::assignment::Kind) {
        let worker = &self.workers[w];
        if worker.stream != Some(stream) || !worker.up {
            return; // the stream it was sent on is gone
        }
        if self.t < worker.cut_until {
            // Lost with the connection: the stream is broken.
            self.log(format!("worker {w}: an assignment lost on a cut network"));
            self.workers[w].stream_broken = true;
            return;
        }
        if worker.paused {
            // Read once the process continues.
            self.at(
                Duration::from_millis(500),
                Event::Deliver {
                    worker: w,
                    stream,
                    kind,
                },
            );
            return;
        }
        match kind {
            v1::assignment::Kind::Work(_) if self.workers[w].leaving => {
                // Its world ended before the hand-off: it just goes.
                let back = self.workers[w].back_after;
                self.stop_worker(w, "leaves", back);
            }
            v1::assignment::Kind::Work(work) => {
                self.log(format!(
                    "worker {w} joins generation {} as rank {} of {} from step {}",
                    work.generation, work.rank, work.world_size, work.resume_step
                ));
                self.newest_generation = self.newest_generation.max(work.generation);
                if self.workers[w].trainer_run != work.run_id {
                    // Another run: a new trainer, from that run's start.
                    let x = &mut self.workers[w];
                    x.trainer_run = work.run_id.clone();
                    x.held = None;
                    x.done = None;
                }
                let member = Member {
                    worker: Self::worker_id(w),
                    run: work.run_id.clone(),
                    generation: work.generation,
                    rank: work.rank,
                };
                self.workers[w].work = Some((member, work.world_size));
                let now = self.t;
                let ring = self.rings.entry(work.generation).or_insert(Ring {
                    members: Vec::new(),
                    processes: Vec::new(),
                    world: work.world_size as usize,
                    step: work.resume_step,
                    total: work.total_steps,
                    // The ring forms when every member has its assignment;
                    // a member that never gets one times the others out.
                    stalled_since: Some(now),
                    tick: 0,
                    fresh: true,
                    checkpoint: work.resume_step,
                    waiting: false,
                });
                ring.members.push(w);
                ring.processes.push(self.workers[w].process);
                if ring.members.len() == ring.world {
                    ring.stalled_since = None;
                    self.outcome.formed.push((work.generation, now));
                    // The world synchronises (`synchronised`): state sent,
                    // a quarter of a step.
                    let t = self.config.step_time / 4;
                    self.ring_after(work.generation, t);
                } else if ring.members.len() == 1 {
                    let timeout = self.config.collective_timeout;
                    self.ring_after(work.generation, timeout);
                }
            }
            v1::assignment::Kind::Abort(a) => {
                if let Some(ring) = self.rings.remove(&a.generation) {
                    self.broke(a.generation, &ring);
                }
                if self.workers[w]
                    .work
                    .as_ref()
                    .is_some_and(|(m, _)| m.generation == a.generation)
                {
                    self.workers[w].work = None;
                }
            }
            v1::assignment::Kind::Idle(_) => {}
        }
    }

    /// The ring of `generation` acts again after `after` (its earlier
    /// pending event is dropped).
    fn ring_after(&mut self, generation: u64, after: Duration) {
        let Some(ring) = self.rings.get_mut(&generation) else {
            return;
        };
        ring.tick += 1;
        let tick = ring.tick;
        self.at(after, Event::RingStep { generation, tick });
    }

    /// The slowest of `n` members' step times.
    fn step_time(&mut self, n: usize) -> Duration {
        let base = self.config.step_time;
        let mut worst = Duration::ZERO;
        for _ in 0..n.min(64) {
            let mut t = base.mul_f64(0.5 + self.rng.unit());
            if self.rng.below(20) == 0 {
                t *= 4;
            }
            worst = worst.max(t);
        }
        worst
    }

    /// A ring's step: every member alive and in the generation finishes it
    /// and reports it; a missing member stalls the ring, which breaks after
    /// the collective timeout and its live members report the fault.
    fn ring_step(&mut self, generation: u64) {
        let Some(ring) = self.rings.get(&generation).cloned() else {
            return;
        };
        let in_it = |s: &Self, w: usize| {
            let x = &s.workers[w];
            x.up && !x.paused
                && x.work
                    .as_ref()
                    .is_some_and(|(m, _)| m.generation == generation)
        };
        let formed = ring.members.len() == ring.world;
        if !formed || !ring.members.iter().all(|&w| in_it(self, w)) {
            let since = ring.stalled_since.unwrap_or(self.t);
            if self.t.saturating_sub(since) >= self.config.collective_timeout {
                self.broke(generation, &ring);
                self.rings.remove(&generation);
                for &w in &ring.members {
                    if self.workers[w].leaving {
                        let back = self.workers[w].back_after;
                        self.stop_worker(w, "leaves", back);
                    }
                }
                let live: Vec<usize> = ring
                    .members
                    .iter()
                    .copied()
                    .filter(|&w| in_it(self, w))
                    .collect();
                for w in live {
                    if let Some((member, _)) = self.workers[w].work.clone() {
                        self.send_request(w, Request::Fault { member });
                    }
                }
                return;
            }
            if let Some(r) = self.rings.get_mut(&generation) {
                r.stalled_since = Some(since);
            }
            self.ring_after(generation, Duration::from_millis(500));
            return;
        }
        // After the last step there is no collective: rank 0 says done as
        // soon as its own requests are answered, whatever the others'.
        if !ring.fresh && ring.step >= ring.total {
            if self.say_done(&ring) {
                return;
            }
            self.ring_after(generation, Duration::from_millis(20));
            return;
        }
        // A member whose earlier requests are unanswered is still waiting
        // for the coordinator (retrying), not in the next collective.
        if ring.members.iter().any(|&w| self.workers[w].unanswered > 0) {
            if let Some(r) = self.rings.get_mut(&generation) {
                r.waiting = true;
            }
            self.ring_after(generation, Duration::from_millis(20));
            return;
        }
        if let Some(r) = self.rings.get_mut(&generation) {
            r.waiting = false;
        }
        if ring.fresh {
            self.synchronised(generation, &ring);
            return;
        }
        let step = ring.step + 1;
        let world = ring.members.len() as u32;
        self.check_before_step(&ring);
        self.fetch_batches(&ring.members, step);
        for &w in &ring.members {
            if let Some(h) = self.workers[w].held.as_mut() {
                h.step = step;
                h.weights = weights_after(h.weights, step);
                h.share = step;
            }
        }
        for &w in &ring.members {
            let Some((member, _)) = self.workers[w].work.clone() else {
                continue;
            };
            self.send_request(
                w,
                Request::Step {
                    member: member.clone(),
                    step,
                    trained: (generation, world),
                },
            );
            // A duplicated report, now and then.
            if self.rng.below(50) == 0 {
                self.send_request(
                    w,
                    Request::Step {
                        member: member.clone(),
                        step,
                        trained: (generation, world),
                    },
                );
            }
            if member.rank == 0 && self.checkpoint_due(step, ring.total) {
                self.send_request(
                    w,
                    Request::Checkpoint {
                        member: member.clone(),
                        step,
                    },
                );
            }
        }
        for &w in &ring.members {
            self.workers[w].done = Some((step, (generation, world)));
        }
        if step < ring.total && ring.members.iter().any(|&w| self.workers[w].leaving) {
            self.hand_off(generation, &ring, step);
            return;
        }
        if let Some(r) = self.rings.get_mut(&generation) {
            r.step = step;
            r.stalled_since = None;
            // After the last step, rank 0 says done once its report and
            // checkpoint are answered (the next tick).
            let t = if step < r.total {
                self.step_time(ring.members.len())
            } else {
                Duration::from_millis(20)
            };
            self.ring_after(generation, t);
        }
    }

    /// Before a ring trains its next step, every member stands at the
    /// ring's step with the weights of one uninterrupted run, its state
    /// whole (not torn) and, under ZeRO, its own share of the ring's
    /// partition: every share has an owner.
    fn check_before_step(&mut self, ring: &Ring) {
        let n = ring.members.len() as u64;
        for &w in &ring.members {
            let h = self.held(w);
            let rank = self.workers[w]
                .work
                .as_ref()
                .map_or(0, |(m, _)| u64::from(m.rank));
            if !self.uninterrupted(&h, ring.step) || h.torn() {
                self.fail(format!(
                    "worker {w} trains step {} from {h:?}, not the weights of step {} whole",
                    ring.step + 1,
                    ring.step
                ));
            }
            if self.config.zero > 0 && (h.world != n || h.rank != rank) {
                self.fail(format!(
                    "ZeRO: rank {rank} of {n} trains step {} holding share {} of a world of {}",
                    ring.step + 1,
                    h.rank,
                    h.world
                ));
            }
        }
    }

    /// Worker `w` is asked to leave (SIGTERM); its next process starts
    /// `back` later. Under ZeRO, in a world that is training, it first tells
    /// the world in its next step and hands its share over (`hand_off`).
    fn leave(&mut self, w: usize, back: Duration) {
        if self.config.zero > 0 && self.in_training_ring(w) && !self.workers[w].leaving {
            self.log(format!("fault: worker {w} asked to leave"));
            self.workers[w].leaving = true;
            self.workers[w].back_after = back;
        } else {
            self.stop_worker(w, "leaves", back);
        }
    }

    /// Whether worker `w` is a member of a formed world that trains.
    fn in_training_ring(&self, w: usize) -> bool {
        let Some((m, _)) = &self.workers[w].work else {
            return false;
        };
        self.rings.get(&m.generation).is_some_and(|r| {
            !r.fresh && r.members.len() == r.world && r.members.contains(&w) && r.step < r.total
        })
    }

    /// Under ZeRO, after step `step` in which ranks said they are leaving:
    /// the optimizer state is re-partitioned among the ranks that stay, in
    /// rank order (the leavers contribute their shares and take none), the
    /// leavers go, and the world trains no further — the staying ranks wait
    /// for the next generation, whose plan must find every share (as
    /// `dpo-worker`'s `hand_off`).
    fn hand_off(&mut self, generation: u64, ring: &Ring, step: u64) {
        let (leavers, staying): (Vec<usize>, Vec<usize>) = self
            .in_rank_order(&ring.members)
            .into_iter()
            .partition(|&w| self.workers[w].leaving);
        self.rings.remove(&generation);
        if !staying.is_empty() {
            let n = staying.len() as u64;
            for (rank, &w) in staying.iter().enumerate() {
                if let Some(h) = self.workers[w].held {
                    self.workers[w].held = Some(self.partitioned(h.step, h.weights, n, rank));
                }
            }
            self.outcome.hand_offs += 1;
            self.log(format!(
                "ZeRO: workers {leavers:?} hand their shares over to {staying:?} after step {step}"
            ));
        }
        for w in leavers {
            let back = self.workers[w].back_after;
            self.stop_worker(w, "leaves", back);
        }
    }

    /// The world has trained every step: rank 0 says done once its own
    /// requests are answered. Whether it did (or has no rank 0 left).
    fn say_done(&mut self, ring: &Ring) -> bool {
        for &w in &ring.members {
            if let Some((member, _)) = self.workers[w].work.clone()
                && member.rank == 0
            {
                if self.workers[w].unanswered > 0 {
                    return false;
                }
                let step = ring.step;
                let h = self.held(w);
                if !self.uninterrupted(&h, step) {
                    self.fail(format!(
                        "rank 0 ends at step {step} with weights {:x} (at step {}), not those of steps 1 to {step} applied once each in order",
                        h.weights, h.step
                    ));
                }
                self.send_request(w, Request::Done { member, step });
            }
        }
        true
    }

    /// A new world synchronises (without ZeRO every rank takes the furthest
    /// rank's state; with it, the plan every rank derives) and stands at a
    /// step that may be unfinished (the old world broke before its report,
    /// checkpoint or end was answered), so the ranks holding its metrics
    /// report it again (the coordinator keeps the first report), rank 0
    /// commits its checkpoint if one is due after the committed one, and
    /// says done at the last step — as `dpo-worker` does after
    /// `sync_world`.
    fn synchronised(&mut self, generation: u64, ring: &Ring) {
        let resumed = ring.checkpoint;
        let members = self.in_rank_order(&ring.members);
        // A new process restores the checkpoint its assignment names.
        for &w in &members {
            if self.workers[w].held.is_none() {
                self.workers[w].held = self.restored(resumed);
            }
        }
        let step = if self.config.zero > 0 {
            self.sync_sharded(generation, &members, resumed)
        } else {
            self.sync_whole(&members)
        };
        if let Some(r) = self.rings.get_mut(&generation) {
            r.fresh = false;
            r.step = step;
        }
        for &w in &ring.members {
            let Some((member, _)) = self.workers[w].work.clone() else {
                continue;
            };
            if step > 0
                && let Some((done, trained)) = self.workers[w].done
                && done == step
            {
                self.send_request(
                    w,
                    Request::Step {
                        member: member.clone(),
                        step,
                        trained,
                    },
                );
            }
            if member.rank == 0 && step > resumed && self.checkpoint_due(step, ring.total) {
                self.send_request(
                    w,
                    Request::Checkpoint {
                        member: member.clone(),
                        step,
                    },
                );
            }
        }
        // The next step, or (at the end) done once these are answered.
        let t = if step < ring.total {
            self.step_time(ring.members.len())
        } else {
            Duration::from_millis(20)
        };
        self.ring_after(generation, t);
    }

    /// The state a process restores from the checkpoint of `step` (0: the
    /// initial weights), which rank 0 must have written.
    fn restored(&mut self, step: u64) -> Option<Held> {
        if step == 0 {
            return Some(Held::whole(0, INITIAL_WEIGHTS));
        }
        match self.checkpoint_weights.get(&step) {
            Some(&w) => Some(Held::whole(step, w)),
            None => {
                self.fail(format!(
                    "a process restores the checkpoint of step {step}, which rank 0 never wrote"
                ));
                None
            }
        }
    }

    /// Without ZeRO: every rank takes the state of the furthest (the plain
    /// broadcast). Returns the step the world stands at.
    fn sync_whole(&mut self, members: &[usize]) -> u64 {
        let Some(max) = members
            .iter()
            .filter_map(|&w| self.workers[w].held)
            .map(|h| h.step)
            .max()
        else {
            return 0;
        };
        let Some(root) = members
            .iter()
            .copied()
            .find(|&w| self.workers[w].held.is_some_and(|h| h.step == max))
        else {
            return 0;
        };
        let lead = self.held(root);
        self.take_state(members, lead.step, lead.weights, Some(root));
        lead.step
    }

    /// Every member takes parameters `weights` at `step` and, under ZeRO,
    /// its share of a new partition over the members in rank order. With a
    /// `root` (a broadcast from it), a member that did not train that step
    /// takes the root's metrics of it, to report it if need be (as
    /// `dpo-worker`'s `take_state`).
    fn take_state(&mut self, members: &[usize], step: u64, weights: u64, root: Option<usize>) {
        let n = members.len() as u64;
        let handed = root
            .and_then(|r| self.workers[r].done)
            .filter(|d| d.0 == step);
        for (rank, &w) in members.iter().enumerate() {
            if self.workers[w].done.is_none_or(|d| d.0 != step) {
                self.workers[w].done = handed;
            }
            self.workers[w].held = Some(if self.config.zero > 0 {
                self.partitioned(step, weights, n, rank)
            } else {
                Held::whole(step, weights)
            });
        }
    }

    /// Parameters `weights` at `step` and share `rank` of a new partition
    /// over `n` ranks (with a replica of its predecessor's under
    /// `zero_replicas = 2`).
    fn partitioned(&self, step: u64, weights: u64, n: u64, rank: usize) -> Held {
        Held {
            step,
            weights,
            world: n,
            rank: rank as u64,
            share: step,
            replica: self.config.zero == 2 && n > 1,
        }
    }

    /// `members` in the order of their ranks in the generation.
    fn in_rank_order(&self, members: &[usize]) -> Vec<usize> {
        let mut v = members.to_vec();
        v.sort_by_key(|&w| self.workers[w].work.as_ref().map(|(m, _)| m.rank));
        v
    }

    /// Whether `h` stands at `step` with the weights one uninterrupted run
    /// has there.
    fn uninterrupted(&self, h: &Held, step: u64) -> bool {
        h.step == step && self.canonical.get(step as usize) == Some(&h.weights)
    }

    fn held(&self, w: usize) -> Held {
        self.workers[w]
            .held
            .unwrap_or_else(|| Held::whole(0, INITIAL_WEIGHTS))
    }

    /// A ZeRO plan takes share `k` of a partition over `world` ranks, as it
    /// stood after step `step`, from worker `w`: it must hold it.
    fn check_share(&mut self, w: usize, world: u64, k: u64, step: u64, plan: &str) {
        let h = self.held(w);
        if !h.holds(world, k, step) {
            self.fail(format!(
                "ZeRO ({plan}): share {k} of the world of {world} after step {step} taken from worker {w}, which holds {h:?}"
            ));
        }
    }

    /// Under ZeRO: the plan every rank derives from the summaries
    /// ([`zero::plan`], the code `dpo-worker` runs), carried out, each of its
    /// decisions checked against what the processes hold. Returns the step
    /// the world stands at.
    fn sync_sharded(&mut self, generation: u64, members: &[usize], checkpoint: u64) -> u64 {
        let world = members.len() as u32;
        loop {
            let all: Vec<Summary> = members.iter().map(|&w| self.held(w).summary()).collect();
            match zero::plan(&all) {
                Plan::CompleteTorn {
                    step,
                    world: w0,
                    contributors,
                    ..
                } => {
                    if contributors.len() as u64 != w0 {
                        self.fail(format!(
                            "ZeRO: {} contributors for the {w0} shares of a torn step",
                            contributors.len()
                        ));
                        return step;
                    }
                    for (k, &r) in contributors.iter().enumerate() {
                        self.check_share(
                            members[r],
                            w0,
                            k as u64,
                            step + 1,
                            "a torn step completed",
                        );
                    }
                    self.log(format!(
                        "ZeRO: step {} torn on every rank, completed from the shares",
                        step + 1
                    ));
                    self.outcome.torn_completed += 1;
                    for (i, &w) in members.iter().enumerate() {
                        if zero::completes(&all[i], step, w0) {
                            if let Some(h) = self.workers[w].held.as_mut() {
                                h.step += 1;
                                h.weights = weights_after(h.weights, h.step);
                            }
                            // Reported from this world, as dpo-worker does.
                            self.workers[w].done = Some((step + 1, (generation, world)));
                        }
                    }
                    if self.failure.is_some() {
                        return step;
                    }
                }
                Plan::Same => return all[0].step,
                Plan::Whole { root } => {
                    // Every rank drops the share it held (`unshard`), then
                    // takes the whole state from `root`, or keeps its own:
                    // which it must then hold whole, at the lead's step.
                    let lead = match root {
                        Some(r) => all[r],
                        None => {
                            for (i, s) in all.iter().enumerate() {
                                if s.world != 0 {
                                    self.fail(format!(
                                        "ZeRO (whole state, no broadcast): rank {i} dropped its share of the world of {} and keeps no optimizer state for the new partition",
                                        s.world
                                    ));
                                }
                            }
                            all[0]
                        }
                    };
                    self.take_state(members, lead.step, lead.hash, root.map(|r| members[r]));
                    return lead.step;
                }
                Plan::Repartition {
                    root,
                    behind,
                    contributors,
                    recovered,
                } => {
                    let lead = all[root];
                    if lead.world == 0 || contributors.len() as u64 != lead.world {
                        self.fail(format!(
                            "ZeRO: a re-partition of step {2} takes {0} contributors for the {1} shares of the lead's partition (none: the lead holds it whole, its moments would be lost)",
                            contributors.len(),
                            lead.world,
                            lead.step
                        ));
                    }
                    for (k, &(r, _)) in contributors.iter().enumerate() {
                        self.check_share(
                            members[r],
                            lead.world,
                            k as u64,
                            lead.step,
                            "re-partition",
                        );
                    }
                    if !recovered.is_empty() {
                        self.log(format!("ZeRO: shares {recovered:?} rebuilt from replicas"));
                    }
                    self.outcome.recovered_shares += recovered.len() as u64;
                    self.take_state(members, lead.step, lead.hash, behind.then(|| members[root]));
                    return lead.step;
                }
                Plan::RollBack { from_step, .. } => {
                    self.needless_rollback(members, &all);
                    if checkpoint > 0 && !self.committed.contains(&checkpoint) {
                        self.fail(format!(
                            "ZeRO: a rollback from step {from_step} to {checkpoint}, which is not a committed checkpoint"
                        ));
                    }
                    self.log(format!("ZeRO: a share lost; back from step {from_step} to the checkpoint of step {checkpoint}"));
                    self.outcome.rollbacks += 1;
                    let Some(h) = self.restored(checkpoint) else {
                        return checkpoint;
                    };
                    self.take_state(members, h.step, h.weights, None);
                    for &w in members {
                        // The steps after the checkpoint are trained again;
                        // the coordinator keeps their first reports.
                        self.workers[w].done = None;
                        if let Some((member, _)) = self.workers[w].work.clone() {
                            self.send_request(
                                w,
                                Request::Rollback {
                                    member,
                                    from_step,
                                    to_step: checkpoint,
                                },
                            );
                        }
                    }
                    return checkpoint;
                }
            }
        }
    }

    /// A ZeRO world went back to a checkpoint: none of the partitions its
    /// sound ranks furthest ahead hold may have had every share among them
    /// (nor may one of them hold the state whole).
    fn needless_rollback(&mut self, members: &[usize], all: &[Summary]) {
        let Some(max) = all.iter().filter(|s| s.torn == 0).map(|s| s.step).max() else {
            return; // every rank torn: nothing whole to go on from
        };
        let mut worlds: Vec<u64> = all
            .iter()
            .filter(|s| s.torn == 0 && s.step == max)
            .map(|s| s.world)
            .collect();
        worlds.dedup();
        for w0 in worlds {
            let whole =
                w0 == 0 || (0..w0).all(|k| members.iter().any(|&w| self.held(w).holds(w0, k, max)));
            if whole {
                self.fail(format!(
                    "ZeRO: the world went back to a checkpoint though every share of the partition over {w0} ranks after step {max} was held"
                ));
                return;
            }
        }
    }

    /// A ring broke in the middle of its next step: under ZeRO, each of its
    /// members may have updated its share (and replica) before the
    /// parameter gather broke — torn: none, all, or some, as drawn.
    fn broke(&mut self, generation: u64, ring: &Ring) {
        let begun = !ring.fresh
            && !ring.waiting
            && ring.members.len() == ring.world
            && ring.step < ring.total;
        // A member still waiting for an answer never began the step.
        let answered = ring
            .members
            .iter()
            .zip(&ring.processes)
            .all(|(&w, &p)| self.workers[w].process != p || self.workers[w].unanswered == 0);
        if self.config.zero == 0 || !begun || !answered {
            return;
        }
        let how = self.rng.below(3);
        for (&w, &process) in ring.members.iter().zip(&ring.processes) {
            let torn = match how {
                0 => false,
                1 => true,
                _ => self.rng.below(2) == 0,
            };
            let worker = &mut self.workers[w];
            // Only a process in this ring's next step: the same process
            // (answered, as checked above), still in this generation.
            let in_step = worker.process == process
                && worker
                    .work
                    .as_ref()
                    .is_some_and(|(m, _)| m.generation == generation);
            if !torn || !in_step {
                continue;
            }
            if let Some(h) = worker.held.as_mut()
                && h.step == ring.step
                && h.world == ring.world as u64
                && !h.torn()
            {
                h.share = h.step + 1;
                self.outcome.torn_ranks += 1;
            }
        }
    }

    /// Each member fetches its share of step `step`'s batch, as `dpo-worker`
    /// does before training it: the engine checks the member, the data plane
    /// cuts the share (timed apart: the real coordinator does it outside the
    /// engine's lock). The shares must cover the step's batch — the next
    /// `batch` examples of its epoch — each example once.
    fn fetch_batches(&mut self, members: &[usize], step: u64) {
        let mut seen: Vec<u64> = Vec::new();
        let mut served = 0;
        for &w in members {
            let Some((member, _)) = self.workers[w].work.clone() else {
                continue;
            };
            let req = v1::FetchBatchRequest {
                member: Some(v1::Member {
                    worker_id: member.worker.clone(),
                    run_id: member.run.clone(),
                    generation: member.generation,
                    rank: member.rank,
                }),
                step: step - 1,
                split: v1::Split::Train as i32,
            };
            let Some(Ok((data, world, total, _))) =
                self.call(Call::Fetch, |e, _| e.member_view(&member))
            else {
                continue;
            };
            let started = Instant::now();
            let batch = batch_of(&data, &req, member.rank as usize, world, total);
            let took = started.elapsed();
            self.outcome.data_time += took;
            self.outcome.fetches += 1;
            match batch {
                Ok(b) => {
                    served += 1;
                    let n = b.examples.len();
                    seen.extend(b.indices);
                    let _ = self.call(Call::Fetch, |e, _| e.batch_served(n, took));
                }
                Err(e) => self.fail(format!("worker {w}: step {step}'s batch refused: {e}")),
            }
        }
        if served < members.len() {
            return; // a member was superseded: this ring will not finish the step
        }
        seen.sort_unstable();
        let (_, start) = self.batch_of_step(step);
        let want = start..start + self.config.batch as u64;
        if seen.len() != self.config.batch || !seen.iter().copied().eq(want.clone()) {
            self.fail(format!(
                "step {step}: the ranks' shares hold {} examples, not each of {want:?} once",
                seen.len()
            ));
        }
    }

    /// A request from worker `w`, in order after its earlier ones.
    fn send_request(&mut self, w: usize, request: Request) {
        if let Request::Checkpoint { step, .. } = &request {
            // Rank 0 writes its checkpoint before asking for its commit.
            let h = self.held(w);
            if !self.uninterrupted(&h, *step) {
                self.fail(format!(
                    "rank 0 writes the checkpoint of step {step} with the weights of {h:?}"
                ));
            }
            self.checkpoint_weights.insert(*step, h.weights);
        }
        let d = self.delay();
        let at = (self.t + d).max(self.workers[w].outbox_at);
        self.workers[w].outbox_at = at;
        let after = at - self.t;
        self.workers[w].unanswered += 1;
        let process = self.workers[w].process;
        self.at(
            after,
            Event::Request {
                worker: w,
                process,
                request,
            },
        );
    }

    /// Worker `w`'s incarnation `process` has the answer to one request.
    fn answered(&mut self, w: usize, process: u64) {
        let worker = &mut self.workers[w];
        if worker.process == process {
            worker.unanswered = worker.unanswered.saturating_sub(1);
        }
    }

    /// Worker `w` (incarnation `process`) sends `request` again half a
    /// second later (its client's retry).
    fn retry(&mut self, w: usize, process: u64, request: Request) {
        self.at(
            Duration::from_millis(500),
            Event::Request {
                worker: w,
                process,
                request,
            },
        );
    }

    fn request(&mut self, w: usize, process: u64, request: Request) {
        let worker = &self.workers[w];
        if !worker.up || worker.paused {
            // A paused process sends nothing; its request goes when it
            // continues (it was already on the wire otherwise).
            if worker.up && worker.paused {
                self.retry(w, process, request);
            }
            return;
        }
        if self.engine.is_none() || self.t < worker.cut_until {
            // The coordinator is down, or the worker's network to it cut:
            // the worker's retries reach it later.
            self.retry(w, process, request);
            return;
        }
        let member = match &request {
            Request::Step { member, .. }
            | Request::Checkpoint { member, .. }
            | Request::Done { member, .. }
            | Request::Fault { member }
            | Request::Rollback { member, .. } => member.clone(),
        };
        let current = self
            .engine
            .as_ref()
            .and_then(|e| e.run(&self.run).ok())
            .map(|r| r.generation);
        // A member of another run (the cancelled one) is stale too.
        let stale = member.run != self.run
            || self.cancelled.as_deref() == Some(member.run.as_str())
            || current.is_some_and(|g| member.generation < g);
        let checkpoint = self
            .engine
            .as_ref()
            .and_then(|e| e.run(&self.run).ok())
            .filter(|_| member.run == self.run)
            .map(|r| r.checkpoint_step);
        if stale {
            self.outcome.stale_requests += 1;
        }
        let before = self.pending.len();
        let kind = if matches!(request, Request::Step { .. }) {
            Call::Report
        } else {
            Call::Other
        };
        let result = self.call(kind, |e, now| match &request {
            Request::Step {
                member,
                step,
                trained,
            } => e.report_step(
                member,
                engine::StepReport {
                    step: *step,
                    metrics: vec![("step".into(), *step as f64), ("loss".into(), 0.5)],
                    eval: false,
                    trained_generation: trained.0,
                    trained_world_size: trained.1,
                },
            ),
            Request::Checkpoint { member, step } => e.commit_checkpoint(
                member,
                *step,
                &format!("/out/sim/checkpoints/step-{step}"),
                true,
            ),
            Request::Done { member, step } => e.report_done(member, *step, "", false, now),
            Request::Fault { member } => e.fault(member, "the collective timed out", now),
            Request::Rollback {
                member,
                from_step,
                to_step,
            } => e.report_rollback(
                member,
                *from_step,
                *to_step,
                "a share of the optimizer state was lost",
            ),
        });
        let changed = self.pending.len() > before;
        // A report's answer waits for every decision queued before it (the
        // coordinator's `run_reported`); other requests only for their own.
        let report = !matches!(request, Request::Fault { .. });
        if changed || (report && !self.pending.is_empty()) {
            self.awaiting.push((w, process, request.clone()));
        } else {
            self.answered(w, process);
        }
        if stale && changed {
            self.fail(format!(
                "a stale member ({} of generation {}, current {:?}) changed the state with {request:?}",
                member.worker, member.generation, current
            ));
        }
        if let Some(Err(e)) = &result
            && let Request::Rollback { to_step, .. } = &request
            && matches!(e, engine::Refusal::Invalid(_))
            && checkpoint == Some(*to_step)
        {
            self.fail(format!(
                "the record of a rollback to the committed checkpoint was refused: {e}"
            ));
        }
        if let Some(Err(e)) = result {
            self.log(format!("worker {w}: {request:?} refused: {e}"));
            // Superseded: dpo-worker leaves that generation, reports the
            // fault and waits for the next.
            let left = matches!(e, engine::Refusal::Stale(_))
                && self.workers[w].process == process
                && self.workers[w]
                    .work
                    .as_ref()
                    .is_some_and(|(m, _)| m.generation == member.generation);
            if left {
                // It reports the fault (dpo-worker's `report_fault`): a
                // stale member's changes nothing, a current one's ends the
                // generation.
                self.workers[w].work = None;
                self.send_request(w, Request::Fault { member });
            }
        }
    }

    fn fault(&mut self) {
        if self.t < self.config.faults_until {
            let next = self.exp(self.config.fault_every);
            self.at(next, Event::Fault);
        } else {
            return;
        }
        self.outcome.faults += 1;
        // Drawn, but not applied (the shrinker's): the draws stay the same.
        let n = self.outcome.faults;
        let skip = self.config.skip_faults.contains(&n);
        let w = self.rng.below(self.config.workers);
        match self.rng.below(10) {
            // kill -9 of a worker: its stream closes, the process comes back.
            0..=3 => {
                let back = Duration::from_millis(500 + self.rng.below(5000) as u64);
                if !self.skipped(n, skip) {
                    self.stop_worker(w, "killed", back);
                }
            }
            // SIGSTOP, shorter or longer than the lease.
            4..=6 => {
                if !self.workers[w].up || self.workers[w].paused {
                    return;
                }
                let pause = self.config.lease.mul_f64(0.25 + 2.0 * self.rng.unit());
                if !self.skipped(n, skip) {
                    self.pause(w, pause);
                }
            }
            // The coordinator killed: effects it had not applied are lost,
            // every stream breaks; it starts again from the store.
            7 => {
                if self.engine.is_none() {
                    return;
                }
                let down = Duration::from_millis(200 + self.rng.below(3000) as u64);
                if !self.skipped(n, skip) {
                    self.kill_coordinator(down);
                }
            }
            // The worker's network to the coordinator cut (its peers still
            // reach it), for shorter or longer than its lease.
            9 => {
                if !self.workers[w].up || self.t < self.workers[w].cut_until {
                    return;
                }
                let cut = self.config.lease.mul_f64(0.25 + 2.0 * self.rng.unit());
                if self.skipped(n, skip) {
                    return;
                }
                self.log(format!(
                    "fault: worker {w} cut off from the coordinator for {:.1} s",
                    cut.as_secs_f64()
                ));
                self.workers[w].cut_until = self.t + cut;
                self.at(cut, Event::Heal(w));
            }
            // A graceful leave: the worker closes its stream and exits; it
            // comes back later as a new process. Under ZeRO, in a world
            // that is training, it first tells the world in its next step
            // and hands its share over (`hand_off`).
            _ => {
                let back = Duration::from_millis(1000 + self.rng.below(10_000) as u64);
                if !self.skipped(n, skip) {
                    self.leave(w, back);
                }
            }
        }
    }

    /// Whether drawn fault `n` is one to skip (logged when it is).
    fn skipped(&mut self, n: u64, skip: bool) -> bool {
        if skip {
            self.log(format!("fault #{n} skipped"));
        }
        skip
    }

    /// Worker `w` stops (`SIGSTOP`, or its network cut) for `pause`.
    fn pause(&mut self, w: usize, pause: Duration) {
        if !self.workers[w].up || self.workers[w].paused {
            return;
        }
        self.log(format!(
            "fault: worker {w} paused for {:.1} s",
            pause.as_secs_f64()
        ));
        self.workers[w].paused = true;
        self.at(pause, Event::Resume(w));
    }

    /// The coordinator (its engine already gone) lost the effects it had not
    /// applied and every stream; it starts again from the store after `down`.
    fn kill_coordinator(&mut self, down: Duration) {
        self.log(format!(
            "fault: coordinator killed ({} effects unapplied)",
            self.pending.len()
        ));
        self.outcome.coordinator_restarts += 1;
        self.engine = None;
        self.pending.clear();
        // Requests it took but never answered: each worker asks again.
        for (w, process, request) in std::mem::take(&mut self.awaiting) {
            self.retry(w, process, request);
        }
        for x in &mut self.workers {
            x.stream = None;
            x.work = None;
        }
        self.rings.clear();
        self.at(down, Event::CoordinatorUp);
    }

    /// Worker `w`'s process ends (`how`: killed, or leaving): its stream
    /// closes, the coordinator hears of it, and a new process starts after
    /// `back`. Nothing happens to a worker that is not up.
    fn stop_worker(&mut self, w: usize, how: &str, back: Duration) {
        if !self.workers[w].up {
            return;
        }
        self.log(format!("fault: worker {w} {how}"));
        let stream = self.workers[w].stream;
        let loop_id = self.workers[w].loop_id;
        let process = self.workers[w].process + 1;
        self.workers[w] = Worker {
            loop_id,
            process,
            ..Worker::default()
        };
        if let Some(s) = stream {
            let id = Self::worker_id(w);
            let _ = self.call(Call::Other, |e, now| e.stream_closed(&id, s, now));
        }
        self.restart_loop(w, back);
    }

    /// The invariants that are not checked as writes happen: the ledger is
    /// contiguous up to the recorded step, and the checkpoint is never ahead
    /// of the record (each O(1): this runs after every event).
    fn check(&mut self) {
        if self.checkpoint_step > self.record_step {
            self.fail(format!(
                "the committed checkpoint (step {}) is ahead of the recorded step {}",
                self.checkpoint_step, self.record_step
            ));
        }
        let n = self.ledger.len() as u64;
        if n != self.record_step && self.ended.is_none() {
            // The record and its step's entry are one transaction.
            self.fail(format!(
                "{} ledger entries for {} recorded steps",
                n, self.record_step
            ));
        }
        if let Some((&last, _)) = self.ledger.iter().next_back()
            && last != n
        {
            self.fail(format!(
                "the ledger has a gap: {n} entries up to step {last}"
            ));
        }
    }

    /// A step was recorded for the first time: its mark, and what is set to
    /// happen after it.
    fn step_recorded(&mut self, step: u64) {
        self.outcome.marks.push(StepMark {
            step,
            at: self.t,
            engine_time: self.outcome.engine_time,
            data_time: self.outcome.data_time,
            engine_calls: self.outcome.engine_calls,
            effects: self.outcome.effects,
        });
        let due: Vec<(usize, Duration)> = self
            .config
            .script
            .iter()
            .enumerate()
            .filter(|(_, s)| s.after_step == step)
            .map(|(i, s)| (i, s.delay))
            .collect();
        for (i, delay) in due {
            self.at(delay, Event::Scripted(i));
        }
        if self.config.heap_at_step == Some(step) {
            self.at(Duration::ZERO, Event::HeapProbe);
        }
    }

    /// Step `step`'s batch (1-based steps): its epoch and its first example
    /// in that epoch's order, the epochs walked batch by batch.
    fn batch_of_step(&self, step: u64) -> (u64, u64) {
        let per_epoch = (self.config.examples / self.config.batch) as u64;
        (
            (step - 1) / per_epoch,
            ((step - 1) % per_epoch) * self.config.batch as u64,
        )
    }

    /// Whether rank 0 commits a checkpoint after `step` of `total` (not
    /// after the last: the final weights are written instead).
    fn checkpoint_due(&self, step: u64, total: u64) -> bool {
        step % self.config.checkpoint_every == 0 && step < total
    }

    /// A new ledger entry takes the next batch of its epoch's examples:
    /// epoch and start walk the epochs batch by batch (checked once, when
    /// the entry is first written, as entries never change).
    fn check_entry(&mut self, step: u64, value: &str) {
        let Ok(e) = serde_json::from_str::<LedgerEntry>(value) else {
            self.fail(format!("ledger entry {step} is unreadable: {value}"));
            return;
        };
        let want = self.batch_of_step(step);
        let got = (e.epoch, e.start as u64);
        if got != want {
            self.fail(format!(
                "step {step} took epoch {} from example {}; each epoch's examples go batch by batch: want epoch {} from {}",
                got.0, got.1, want.0, want.1
            ));
        }
    }
}
