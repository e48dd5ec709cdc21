//! The simulator's seeds in `make test`: every invariant after every event,
//! over a few hundred small worlds with faults; a fault-free world that trains
//! every step once in one generation; the same seed replaying the same run.

use std::time::Duration;

use super::*;

/// Seeds `make test` runs (a few seconds in a debug build).
const SEEDS: u64 = 200;

/// Seed `seed`'s configuration without a client cancel: a regression seed
/// replays the run that found its bug (cancels came later, drawn apart).
fn uncancelled(seed: u64) -> Config {
    let mut c = Config::small(seed);
    c.cancel_at = None;
    c
}

#[test]
fn a_fault_free_run_trains_every_step_once_in_its_one_generation() {
    let mut c = uncancelled(1);
    c.fault_every = Duration::ZERO;
    c.store_full_at = None;
    c.workers = 2;
    c.min_workers = 2;
    c.max_workers = 2;
    let steps = c.steps;
    let o = Sim::new(c).run().unwrap_or_else(|f| panic!("{f}"));
    assert_eq!(o.state, Some(RunState::Succeeded));
    assert_eq!(o.steps, steps);
    assert_eq!(o.faults, 0);
    assert_eq!(o.ledger.len() as u64, steps);
    for (i, e) in o.ledger.iter().enumerate() {
        assert_eq!(
            (e.step, e.generation, e.world_size),
            (i as u64 + 1, 1, 2),
            "step {}",
            e.step
        );
    }
}

#[test]
fn seeds_with_faults_keep_every_invariant() {
    let mut total = Outcome::default();
    let mut full_store_failures = 0;
    for seed in 0..SEEDS {
        let o = Sim::new(Config::small(seed))
            .run()
            .unwrap_or_else(|f| panic!("{f}"));
        // The only way a seed may end failed (checked by the simulator: with
        // its store full, and saying so).
        full_store_failures += u64::from(o.state == Some(RunState::Failed));
        total.add(&o);
    }
    eprintln!(
        "{SEEDS} seeds: {} faults, {} coordinator restarts, {} stale requests refused, {} generations, {} steps, {full_store_failures} runs failed by a full store",
        total.faults,
        total.coordinator_restarts,
        total.stale_requests,
        total.generations,
        total.steps
    );
    assert!(full_store_failures > 0, "no seed filled its store mid-run");
    // The seeds exercise what they claim to.
    assert!(total.faults > 5 * SEEDS, "{} faults", total.faults);
    assert!(
        total.coordinator_restarts > SEEDS / 4,
        "{}",
        total.coordinator_restarts
    );
    assert!(total.stale_requests > SEEDS, "{}", total.stale_requests);
    assert!(total.generations > 3 * SEEDS, "{}", total.generations);
    // ZeRO (two seeds in three): every way a forming world goes on.
    eprintln!(
        "ZeRO: {} ranks torn by a broken step, {} torn steps completed from the shares, {} shares rebuilt from replicas, {} rollbacks, {} hand-offs of leaving ranks' shares",
        total.torn_ranks,
        total.torn_completed,
        total.recovered_shares,
        total.rollbacks,
        total.hand_offs
    );
    assert!(total.hand_offs > SEEDS / 10, "{}", total.hand_offs);
    assert!(total.torn_ranks > SEEDS, "{}", total.torn_ranks);
    assert!(total.torn_completed > SEEDS / 4, "{}", total.torn_completed);
    assert!(
        total.recovered_shares > SEEDS / 4,
        "{}",
        total.recovered_shares
    );
    assert!(total.rollbacks > SEEDS / 4, "{}", total.rollbacks);
    // Runs cancelled by their client and submitted again (one seed in
    // eight draws it; a run may end before its cancel), the wall clock
    // jumping in every seed.
    eprintln!(
        "{} runs cancelled and submitted again, {} wall-clock jumps",
        total.cancels, total.clock_jumps
    );
    assert!(total.cancels > SEEDS / 20, "{}", total.cancels);
    assert!(total.clock_jumps > 10 * SEEDS, "{}", total.clock_jumps);
}

/// The engine times leases on the monotonic clock only: the same seed with
/// the wall clock jumping (forwards and back by up to an hour, every few
/// seconds) and without decides exactly the same.
#[test]
fn wall_clock_jumps_change_no_decision() {
    for seed in [2, 5, 11] {
        let mut c = Config::small(seed);
        c.clock_jumps = false;
        let still = Sim::new(c.clone()).run().unwrap_or_else(|f| panic!("{f}"));
        c.clock_jumps = true;
        let jumping = Sim::new(c).run().unwrap_or_else(|f| panic!("{f}"));
        assert!(jumping.clock_jumps > 5, "seed {seed}");
        assert_eq!(still.ledger, jumping.ledger, "seed {seed}");
        assert_eq!(
            (
                still.engine_calls,
                still.effects,
                still.generations,
                still.virtual_time
            ),
            (
                jumping.engine_calls,
                jumping.effects,
                jumping.generations,
                jumping.virtual_time
            ),
            "seed {seed}"
        );
    }
}

/// A run cancelled by its client ends cancelled with nothing of it written
/// after (checked on every write), and the same spec submitted again trains
/// every step — the workers of the cancelled run's generation, their
/// reports in flight and state of the old run, included.
#[test]
fn a_cancelled_run_ends_cancelled_and_its_resubmission_trains_every_step() {
    let mut cancelled = 0;
    for seed in 0..30 {
        let mut c = Config::small(seed);
        c.store_full_at = None;
        c.cancel_at = Some(Duration::from_millis(2500 + 1000 * seed));
        let steps = c.steps;
        let o = Sim::new(c).run().unwrap_or_else(|f| panic!("{f}"));
        assert_eq!(o.state, Some(RunState::Succeeded), "seed {seed}");
        cancelled += o.cancels;
        if o.cancels > 0 {
            // The resubmitted run's own ledger, from its first step.
            assert_eq!(o.ledger.len() as u64, steps, "seed {seed}");
            assert_eq!(o.ledger.first().map(|e| e.step), Some(1), "seed {seed}");
        }
    }
    assert!(
        cancelled > 20,
        "{cancelled} of 30 runs cancelled before they ended"
    );
}

/// Seeds that found bugs once ZeRO was modelled, each kept: the run must
/// end with every invariant kept (succeeded, or — seed 59 fills its store —
/// failed naming the store, which the simulator checks).
///
/// - 59: the same ranks at the same step formed "the same world" though one
///   had torn (its share a step ahead of its parameters), and trained that
///   step again on it — its update applied twice (`zero::plan` now wants
///   every rank sound for `Same`).
/// - 8: a whole state first in rank order beside a rank that held a share of
///   the same step: no broadcast, so that rank dropped its share and entered
///   the new partition with no optimizer state (`Whole` now broadcasts
///   unless every rank is whole).
/// - 24: the first rank furthest ahead could not rebuild its partition and
///   the world rolled back, though another rank held that very step whole
///   (the plan now goes on from it).
/// - 716: a rollback forward to the committed checkpoint (the ranks that
///   reached it gone) was refused by the coordinator (it now records it).
/// - 3210: a rank that took another's state could not report that step when
///   the rank that trained it died first; the world ran ahead of the record
///   (dpo-worker now hands the step's metrics over with the state).
#[test]
fn zero_seeds_that_found_bugs_succeed() {
    for seed in [59, 8, 24, 716, 3210] {
        let c = uncancelled(seed);
        assert!(c.zero > 0, "seed {seed} runs ZeRO");
        let full = c.store_full_at.is_some();
        let o = Sim::new(c).run().unwrap_or_else(|f| panic!("{f}"));
        let want = if full {
            RunState::Failed
        } else {
            RunState::Succeeded
        };
        assert_eq!(o.state, Some(want), "seed {seed}");
    }
}

#[test]
fn the_same_seed_replays_the_same_run() {
    let a = Sim::new(Config::small(18))
        .run()
        .unwrap_or_else(|f| panic!("{f}"));
    let b = Sim::new(Config::small(18))
        .run()
        .unwrap_or_else(|f| panic!("{f}"));
    assert_eq!(a.ledger, b.ledger);
    assert_eq!(
        (
            a.events,
            a.engine_calls,
            a.effects,
            a.faults,
            a.virtual_time
        ),
        (
            b.events,
            b.engine_calls,
            b.effects,
            b.faults,
            b.virtual_time
        )
    );
    assert!(a.faults > 0);
}

/// The checker itself: each store-side invariant fails on the write that
/// breaks it, with its own message.
#[test]
fn each_broken_invariant_is_caught_by_its_own_message() {
    let ledger = |step: u64| format!("{}{step:020}", engine::ledger_prefix(RUN));
    let entry = |step: u64, generation: u64| {
        serde_json::json!({"step": step, "epoch": 0, "start": (step - 1) * 4, "generation": generation, "world_size": 2})
            .to_string()
    };
    let caught = |writes: Vec<(String, String)>, want: &str| {
        let mut sim = Sim::new(Config::small(0));
        for (k, v) in writes {
            sim.write(k, Some(v));
        }
        sim.check();
        let got = sim.failure.take().unwrap_or_default();
        assert!(got.contains(want), "want {want:?}, got {got:?}");
    };
    caught(
        vec![
            (GENERATION_KEY.into(), "3".into()),
            (GENERATION_KEY.into(), "2".into()),
        ],
        "generations must only grow",
    );
    caught(
        vec![(ledger(1), entry(1, 1)), (ledger(1), entry(1, 2))],
        "step 1 recorded twice",
    );
    // The engine's own record of the queued run, at other steps.
    let mut sim = Sim::new(Config::small(0));
    sim.boot_coordinator();
    let real = sim
        .store
        .kv
        .get(&engine::run_key(RUN))
        .cloned()
        .or_else(|| {
            sim.apply();
            sim.store.kv.get(&engine::run_key(RUN)).cloned()
        })
        .expect("the queued run's record");
    let at = |step: u64| {
        let mut v: serde_json::Value = serde_json::from_str(&real).expect("json");
        v["step"] = step.into();
        v.to_string()
    };
    caught(
        vec![
            (engine::run_key(RUN), at(2)),
            (ledger(1), entry(1, 1)),
            (ledger(2), entry(2, 1)),
            (engine::run_key(RUN), at(1)),
        ],
        "went back from step 2 to 1",
    );
    caught(
        vec![(engine::run_key(RUN), at(2)), (ledger(2), entry(2, 1))],
        "1 ledger entries for 2 recorded steps",
    );
    caught(
        vec![
            (engine::run_key(RUN), at(2)),
            (ledger(1), entry(1, 1)),
            (ledger(2), entry(3, 1)),
        ],
        "each epoch's examples go batch by batch",
    );
    caught(
        vec![(
            "dpo/runs/run-sim/anything".into(),
            "x".repeat(64 * 1024 + 1),
        )],
        "dpo/runs/run-sim/anything grew to 65537 bytes",
    );
    // Nothing of a cancelled run is written after its end.
    let mut sim = Sim::new(Config::small(0));
    sim.cancelled = Some(RUN.into());
    sim.cancelled_ended = true;
    sim.write(ledger(3), Some(entry(3, 1)));
    let got = sim.failure.take().unwrap_or_default();
    assert!(
        got.contains("written after its run ended cancelled"),
        "{got:?}"
    );
}

/// Regression (seeds 0 and 1 with store failures, found by the simulator): a
/// transaction the store did not take was caught up by writing the engine's
/// state again — the record, not the ledger entry the failed write carried —
/// so the store counted a step its ledger lacked, and a checkpoint could
/// commit ahead of the stored record. The runner now tries the write again
/// before anything decided after it.
#[test]
fn a_failed_store_write_never_leaves_a_step_without_its_ledger_entry() {
    for seed in [0, 1] {
        let mut c = uncancelled(seed);
        c.store_fail_one_in = 10;
        c.store_full_at = None;
        let o = Sim::new(c).run().unwrap_or_else(|f| panic!("{f}"));
        assert!(
            o.store_failures > 5,
            "seed {seed}: {} store failures",
            o.store_failures
        );
        assert_eq!(o.ledger.len() as u64, o.steps);
    }
}

#[test]
fn a_cold_start_of_512_workers_forms_one_world_and_each_step_costs_a_few_calls_per_worker() {
    let workers = 512;
    let mut c = Config::scale(workers, Duration::from_secs(5), 12);
    c.min_workers = 1;
    let o = Sim::new(c).run().unwrap_or_else(|f| panic!("{f}"));
    assert_eq!(o.state, Some(RunState::Succeeded));
    // All 512 start within 2 s: one world, not one per joiner.
    assert_eq!(o.generations, 1, "{:?}", o.formed);
    assert!(
        o.ledger
            .iter()
            .all(|e| (e.generation, e.world_size) == (1, 512))
    );
    // Per step, steady: each rank's report and fetch (member check, count
    // served), and the heartbeats of a step's time — a handful of calls
    // per worker, however large the world (the count is exact: virtual time).
    let (a, b) = (o.marks[2], o.marks[11]);
    let per_worker_step =
        (b.engine_calls - a.engine_calls) as f64 / (b.step - a.step) as f64 / workers as f64;
    let step_s = (b.at - a.at).as_secs_f64() / (b.step - a.step) as f64;
    let heartbeats = step_s / 1.25;
    assert!(
        per_worker_step < 3.0 + heartbeats + 0.1,
        "{per_worker_step:.2} calls per worker per step ({heartbeats:.2} heartbeats)"
    );
}

#[test]
fn a_killed_member_is_replaced_at_once_and_a_frozen_one_after_its_lease() {
    for (lease, freeze) in [(2, false), (2, true), (8, true)] {
        let lease = Duration::from_secs(lease);
        let mut c = Config::scale(16, lease, 30);
        c.min_workers = 1;
        c.script.push(Scripted {
            after_step: 10,
            delay: Duration::from_millis(300),
            fault: if freeze {
                ScriptedFault::Freeze {
                    rank: 5,
                    for_: Duration::from_secs(3600),
                }
            } else {
                ScriptedFault::Kill { rank: 5 }
            },
        });
        let o = Sim::new(c).run().unwrap_or_else(|f| panic!("{f}"));
        let at = o.scripted_at[0];
        let (generation, formed) = *o.formed.iter().find(|(_, t)| *t > at).expect("a new world");
        let took = formed - at;
        // A closed stream is noticed at once (the new world waits only for
        // its assignments, at most one network delay); a silent member
        // when its lease lapses, found by the reconcile every quarter lease.
        let bound = if freeze {
            lease + lease / 4 + Duration::from_millis(50)
        } else {
            Duration::from_millis(50)
        };
        assert!(
            took <= bound && (!freeze || took >= lease - lease / 4),
            "lease {lease:?}, freeze {freeze}: new world after {took:?}"
        );
        // The 15 survivors train every later step, and no step twice.
        assert!(
            o.ledger
                .iter()
                .filter(|e| e.step > 11)
                .all(|e| e.generation >= generation && e.world_size == 15),
            "{:?}",
            o.ledger
        );
        assert_eq!(o.ledger.len(), 30);
    }
}

/// Seed 609 (found when network cuts were added): the only member's stream
/// broke on a cut network with its assignment in it; it registered again
/// with its session and the coordinator, counting it a member still, never
/// told it to train — the run hung. A member on a new stream now has its
/// world formed again.
#[test]
fn a_member_whose_assignment_was_lost_with_its_stream_is_assigned_again() {
    let mut c = uncancelled(609);
    c.store_full_at = None;
    let o = Sim::new(c).run().unwrap_or_else(|f| panic!("{f}"));
    assert_eq!(o.state, Some(RunState::Succeeded));
}

/// A full store must fail the run, never let it succeed without its last
/// steps: with a slow store (300 ms a batch), the first report of the last
/// step may still be in the store when rank 0's duplicate report of it is
/// answered. The coordinator answers a report only after everything queued
/// before it (`run_reported`), so rank 0 says done only once the store has
/// taken that step, or refused it for good and the run has failed.
#[test]
fn a_full_store_fails_the_run_even_when_it_fills_during_the_last_step() {
    let mut failed = 0;
    for seed in 0..40 {
        let mut c = uncancelled(seed);
        c.fault_every = Duration::ZERO;
        c.store_fail_one_in = 0;
        c.store_latency = Duration::from_millis(300);
        // The store fills while the last step is being recorded.
        let last = Sim::new({
            let mut probe = c.clone();
            probe.store_full_at = None;
            probe
        })
        .run()
        .unwrap_or_else(|f| panic!("{f}"))
        .marks
        .last()
        .map_or(Duration::ZERO, |m| m.at);
        c.store_full_at = Some(last - Duration::from_millis(150 + 5 * seed));
        let o = Sim::new(c).run().unwrap_or_else(|f| panic!("{f}"));
        failed += u64::from(o.state == Some(RunState::Failed));
    }
    assert!(
        failed > 20,
        "{failed} of 40 runs failed by their full store"
    );
}

/// Under ZeRO without replicas, a graceful leave (SIGTERM) hands the
/// leaver's share over to the ranks that stay: the next world goes on from
/// them without going back; a kill -9 at the same point loses the share
/// and the world goes back to the checkpoint.
#[test]
fn a_graceful_leave_under_zero_hands_its_share_over_and_a_kill_rolls_back() {
    let run = |fault: ScriptedFault| {
        let mut c = uncancelled(4);
        c.fault_every = Duration::ZERO;
        c.store_full_at = None;
        c.zero = 1;
        (c.workers, c.min_workers, c.max_workers) = (3, 2, 3);
        c.checkpoint_every = 4;
        c.script.push(Scripted {
            after_step: 10,
            delay: Duration::from_millis(100),
            fault,
        });
        Sim::new(c).run().unwrap_or_else(|f| panic!("{f}"))
    };
    let left = run(ScriptedFault::Leave { rank: 1 });
    assert_eq!(left.state, Some(RunState::Succeeded));
    assert_eq!((left.hand_offs, left.rollbacks), (1, 0));
    let killed = run(ScriptedFault::Kill { rank: 1 });
    assert_eq!(killed.state, Some(RunState::Succeeded));
    assert_eq!((killed.hand_offs, killed.rollbacks), (0, 1));
}

/// The shrinker keeps exactly the faults a failure needs: here a planted
/// failure that needs drawn faults 3 and 7 of 10 (and is the same failure,
/// by its signature, whatever the numbers in its message).
#[test]
fn the_shrinker_keeps_only_the_faults_a_failure_needs() {
    let mut tries = 0;
    let planted = |c: &Config| -> Result<(), (String, u64)> {
        let has = |n: u64| !c.skip_faults.contains(&n);
        if has(3) && has(7) {
            Err((format!("step {} recorded twice", c.skip_faults.len()), 10))
        } else if has(3) {
            Err(("another failure".into(), 10))
        } else {
            Ok(())
        }
    };
    let shrunk = shrink(&Config::small(1), |c| {
        tries += 1;
        planted(c)
    })
    .expect("the planted failure fails");
    assert_eq!(shrunk.kept, vec![3, 7]);
    assert_eq!(shrunk.config.skip_faults, vec![1, 2, 4, 5, 6, 8, 9, 10]);
    assert_eq!(shrunk.runs, tries);
    assert!(
        shrunk
            .config
            .replay_command()
            .contains("--skip-faults 1,2,4,5,6,8,9,10"),
        "{}",
        shrunk.config.replay_command()
    );
    // A configuration that does not fail has nothing to shrink.
    assert!(shrink(&Config::small(1), |_| Ok(())).is_none());
}

/// A skipped fault is still drawn: skipping none replays the seed exactly,
/// and skipping one leaves the run the same up to it.
#[test]
fn a_skipped_fault_is_drawn_but_not_applied() {
    let c = uncancelled(18);
    let all = Sim::new(c.clone()).run().unwrap_or_else(|f| panic!("{f}"));
    let mut none = c.clone();
    none.skip_faults = vec![];
    let again = Sim::new(none).run().unwrap_or_else(|f| panic!("{f}"));
    assert_eq!((all.ledger, all.events), (again.ledger, again.events));
    assert!(all.faults > 3);
    let mut skip = c;
    skip.skip_faults = (1..=10_000).collect();
    let quiet = Sim::new(skip).run().unwrap_or_else(|f| panic!("{f}"));
    // Every fault drawn, none applied: one world from start to end.
    assert_eq!(quiet.state, Some(RunState::Succeeded));
    assert!(quiet.faults > 3, "drawn all the same");
    assert!(
        quiet
            .ledger
            .iter()
            .all(|e| e.generation == quiet.ledger[0].generation)
    );
}
