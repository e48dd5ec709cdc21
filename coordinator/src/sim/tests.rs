//! The simulator's seeds in `make test`: every invariant after every event,
//! over a few hundred small worlds with faults; a fault-free world that trains
//! every step once in one generation; the same seed replaying the same run.

use std::time::Duration;

use super::*;

/// Seeds `make test` runs (a few seconds in a debug build).
const SEEDS: u64 = 200;

#[test]
fn a_fault_free_run_trains_every_step_once_in_its_one_generation() {
    let mut c = Config::small(1);
    c.fault_every = Duration::ZERO;
    c.workers = 2;
    c.min_workers = 2;
    c.max_workers = 2;
    let steps = c.steps;
    let o = Sim::new(c).run().unwrap_or_else(|f| panic!("{f}"));
    assert_eq!(o.state, Some(RunState::Succeeded));
    assert_eq!(o.steps, steps);
    assert_eq!(o.faults, 0);
    assert_eq!(o.ledger.len() as u64, steps);
    for (i, (step, generation, world)) in o.ledger.iter().enumerate() {
        assert_eq!(
            (*step, *generation, *world),
            (i as u64 + 1, 1, 2),
            "step {step}"
        );
    }
}

#[test]
fn seeds_with_faults_keep_every_invariant() {
    let mut total = Outcome::default();
    for seed in 0..SEEDS {
        let o = Sim::new(Config::small(seed))
            .run()
            .unwrap_or_else(|f| panic!("{f}"));
        total.faults += o.faults;
        total.coordinator_restarts += o.coordinator_restarts;
        total.stale_requests += o.stale_requests;
        total.generations += o.generations;
        total.steps += o.steps;
    }
    eprintln!(
        "{SEEDS} seeds: {} faults, {} coordinator restarts, {} stale requests refused, {} generations, {} steps",
        total.faults,
        total.coordinator_restarts,
        total.stale_requests,
        total.generations,
        total.steps
    );
    // The seeds exercise what they claim to.
    assert!(total.faults > 5 * SEEDS, "{} faults", total.faults);
    assert!(
        total.coordinator_restarts > SEEDS / 4,
        "{}",
        total.coordinator_restarts
    );
    assert!(total.stale_requests > SEEDS, "{}", total.stale_requests);
    assert!(total.generations > 3 * SEEDS, "{}", total.generations);
}

#[test]
fn the_same_seed_replays_the_same_run() {
    let a = Sim::new(Config::small(17))
        .run()
        .unwrap_or_else(|f| panic!("{f}"));
    let b = Sim::new(Config::small(17))
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
