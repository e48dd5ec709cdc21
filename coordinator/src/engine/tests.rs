//! The engine in-process, with a fake clock: leases, generations, fencing,
//! exactly-once step records — no network, disk or sleeping.

use std::time::Duration;

use dpo_data::Example;
use dpo_proto::{RunSpec, v1};

use super::*;

const TTL: Duration = Duration::from_secs(4);

fn spec(name: &str, min: usize, max: usize, max_steps: u64) -> RunSpec {
    let v = serde_json::json!({
        "name": name,
        "model": {"path": "/models/tiny"},
        "data": {"train": "/data/train.jsonl", "shuffle": false},
        "train": {"global_batch_size": 2, "max_steps": max_steps, "output": format!("/out/{name}")},
        "cluster": {"min_workers": min, "max_workers": max},
    });
    serde_json::from_value(v).expect("a valid test spec")
}

fn pairs(n: usize) -> Vec<Example> {
    (0..n)
        .map(|i| Example {
            line: i + 1,
            prompt: vec![1, 2, i as u32],
            chosen: Some(vec![3, 4]),
            rejected: vec![vec![5]],
        })
        .collect()
}

/// An engine holding one queued run (`id` "run-a"), its effects drained.
fn engine_with_run(min: usize, max: usize, max_steps: u64, now: Now) -> Engine {
    let mut e = Engine::new(TTL, 0);
    let spec = spec("a", min, max, max_steps);
    let data = RunData::new(&spec, pairs(8), Vec::new()).expect("enough examples");
    let record = RunRecord::queued(
        "run-a".into(),
        spec,
        &data,
        "/shards/a".into(),
        "alice".into(),
        now,
    );
    e.add_run(record, data, now).expect("queued");
    e.take_effects();
    e
}

/// Registers `worker` and opens its stream; returns the effects and its session.
fn join_with_session(e: &mut Engine, worker: &str, now: Now) -> (Vec<Effect>, Vec<u8>) {
    let req = v1::RegisterRequest {
        worker_id: worker.into(),
        collective_addr: "127.0.0.1:9000".into(),
        ..Default::default()
    };
    Engine::check_registration(&req).expect("valid registration");
    let session = e.register(req, None, now).expect("registered").session;
    e.open_stream(worker, &session, now).expect("registered");
    (e.take_effects(), session)
}

fn join(e: &mut Engine, worker: &str, now: Now) -> Vec<Effect> {
    join_with_session(e, worker, now).0
}

/// Joins `worker` and lets the settling window pass (the periodic reconcile
/// at `now` + the window): the effects of both.
fn join_settled(e: &mut Engine, worker: &str, now: Now) -> Vec<Effect> {
    let mut fx = join(e, worker, now);
    e.reconcile(now.after(e.join_settle())).expect("reconcile");
    fx.extend(e.take_effects());
    fx
}

/// The Work assignments among `effects`: `(worker, generation, rank, world)`.
fn works(effects: &[Effect]) -> Vec<(String, u64, u32, u32)> {
    effects
        .iter()
        .filter_map(|f| match f {
            Effect::Send {
                worker,
                kind: v1::assignment::Kind::Work(w),
            } => Some((worker.clone(), w.generation, w.rank, w.world_size)),
            _ => None,
        })
        .collect()
}

fn aborts(effects: &[Effect]) -> Vec<(String, u64)> {
    effects
        .iter()
        .filter_map(|f| match f {
            Effect::Send {
                worker,
                kind: v1::assignment::Kind::Abort(a),
            } => Some((worker.clone(), a.generation)),
            _ => None,
        })
        .collect()
}

fn member(worker: &str, generation: u64, rank: u32) -> Member {
    Member {
        worker: worker.into(),
        run: "run-a".into(),
        generation,
        rank,
    }
}

fn step_report(step: u64) -> StepReport {
    StepReport {
        step,
        metrics: vec![("step".into(), step as f64), ("loss".into(), 0.5)],
        eval: false,
        trained_generation: 1,
        trained_world_size: 2,
    }
}

#[test]
fn a_generation_forms_once_enough_workers_are_ready_with_the_fence_first() {
    let t0 = Now::system();
    let mut e = engine_with_run(2, 3, 10, t0);
    let first = join(&mut e, "w1", t0);
    assert!(works(&first).is_empty(), "one worker is below min_workers");
    assert_eq!(
        e.run("run-a").map(|r| r.state).ok(),
        Some(RunState::Waiting)
    );
    // Below max_workers a world forms only once no worker has joined for
    // the settling window (the periodic reconcile forms it).
    let t1 = t0.after(Duration::from_millis(300));
    assert!(works(&join(&mut e, "w2", t1)).is_empty());
    e.reconcile(t1.after(e.join_settle() - Duration::from_millis(1)))
        .expect("reconcile");
    assert!(
        works(&e.take_effects()).is_empty(),
        "w2 joined too recently"
    );
    e.reconcile(t1.after(e.join_settle())).expect("reconcile");
    let second = e.take_effects();
    assert_eq!(
        works(&second),
        vec![("w1".into(), 1, 0, 2), ("w2".into(), 1, 1, 2)],
        "the oldest worker is rank 0"
    );
    // The generation key is written before any member hears of the generation.
    let fence = second.iter().position(|f| {
        matches!(f, Effect::Store { writes, .. } if writes.iter().any(|(k, v)| k == crate::store::GENERATION_KEY && v.as_deref() == Some("1")))
    });
    let first_send = second.iter().position(|f| matches!(f, Effect::Send { .. }));
    assert!(fence.is_some() && fence < first_send, "{second:?}");
    assert_eq!(
        e.run("run-a").map(|r| r.state).ok(),
        Some(RunState::Running)
    );
}

#[test]
fn the_world_grows_up_to_max_workers_and_no_further() {
    let t0 = Now::system();
    let mut e = engine_with_run(1, 2, 10, t0);
    assert_eq!(
        works(&join_settled(&mut e, "w1", t0)),
        vec![("w1".into(), 1, 0, 1)]
    );
    // A joiner that fills the world to max_workers does not wait.
    let grow = join(&mut e, "w2", t0);
    assert_eq!(aborts(&grow), vec![("w1".into(), 1)]);
    assert_eq!(
        works(&grow),
        vec![("w1".into(), 2, 0, 2), ("w2".into(), 2, 1, 2)]
    );
    // A third worker cannot join a world already at max_workers.
    let third = join(&mut e, "w3", t0);
    assert!(
        works(&third).is_empty() && aborts(&third).is_empty(),
        "{third:?}"
    );
}

#[test]
fn a_lapsed_lease_shrinks_the_world_and_heartbeats_keep_it() {
    let t0 = Now::system();
    let mut e = engine_with_run(1, 2, 10, t0);
    let (_, s1) = join_with_session(&mut e, "w1", t0);
    let (_, s2) = join_with_session(&mut e, "w2", t0);
    // Both beat within the lease: nothing changes.
    let t1 = t0.after(TTL / 2);
    assert!(e.heartbeat("w1", &s1, t1).is_some());
    assert!(e.heartbeat("w2", &s2, t1).is_some());
    e.reconcile(t0.after(TTL)).expect("reconcile");
    assert!(e.take_effects().is_empty());
    // Only w1 keeps beating; past w2's lease it is dropped and a world of one forms.
    let t2 = t1.after(TTL);
    assert!(e.heartbeat("w1", &s1, t2).is_some());
    e.reconcile(t1.after(TTL + Duration::from_millis(1)))
        .expect("reconcile");
    let fx = e.take_effects();
    assert_eq!(aborts(&fx), vec![("w1".into(), 1), ("w2".into(), 1)]);
    assert_eq!(works(&fx), vec![("w1".into(), 2, 0, 1)]);
    assert!(
        e.heartbeat("w2", &s2, t2).is_none(),
        "a dropped worker must register again"
    );
    assert_eq!(e.counters().0.workers_lost, 1);
}

#[test]
fn requests_of_a_stale_generation_or_a_stranger_are_refused() {
    let t0 = Now::system();
    let mut e = engine_with_run(1, 2, 10, t0);
    join_settled(&mut e, "w1", t0); // generation 1
    join(&mut e, "w2", t0); // generation 2
    let stale = |r: Result<()>| matches!(r, Err(Refusal::Stale(_)));
    assert!(stale(e.report_step(&member("w1", 1, 0), step_report(1))));
    assert!(stale(e.report_step(&member("w9", 2, 0), step_report(1))));
    assert!(
        e.member_view(&member("w2", 2, 0)).is_err(),
        "w2 claims rank 0 but is rank 1"
    );
    assert!(e.member_view(&member("w2", 2, 1)).is_ok());
    assert!(stale(e.commit_checkpoint(
        &member("w2", 2, 1),
        1,
        "/ck",
        true
    )));
    assert!(e.publish_bootstrap("run-a".into(), 1, vec![1]).is_err());
    assert!(e.publish_bootstrap("run-a".into(), 2, vec![1]).is_ok());
    assert_eq!(e.bootstrap("run-a", 2), Some(vec![1]));
    // A fault from a stale generation does not end the current one.
    e.take_effects();
    e.fault(&member("w1", 1, 0), "old ring broke", t0)
        .expect("ignored");
    assert!(aborts(&e.take_effects()).is_empty());
}

#[test]
fn each_step_is_recorded_exactly_once_with_its_ledger_entry() {
    let t0 = Now::system();
    let mut e = engine_with_run(2, 2, 10, t0);
    join(&mut e, "w1", t0);
    join(&mut e, "w2", t0);
    // Both ranks report step 1; only the first report writes anything.
    e.report_step(&member("w2", 1, 1), step_report(1))
        .expect("recorded");
    let fx = e.take_effects();
    e.report_step(&member("w1", 1, 0), step_report(1))
        .expect("acknowledged");
    assert!(
        e.take_effects().is_empty(),
        "a second report writes nothing"
    );
    let appends: Vec<_> = fx
        .iter()
        .filter(|f| matches!(f, Effect::AppendMetrics { .. }))
        .collect();
    assert_eq!(appends.len(), 1);
    let Some(Effect::Store {
        fence: None,
        writes,
        ..
    }) = fx.iter().find(|f| matches!(f, Effect::Store { .. }))
    else {
        panic!("no store write in {fx:?}");
    };
    let keys: Vec<&str> = writes.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(
        keys,
        vec![
            "dpo/runs/run-a/record",
            "dpo/runs/run-a/ledger/00000000000000000001"
        ]
    );
    let entry: LedgerEntry =
        serde_json::from_str(writes[1].1.as_deref().unwrap_or("")).expect("an entry");
    assert_eq!(
        (entry.step, entry.epoch, entry.start, entry.world_size),
        (1, 0, 0, 2)
    );
    // The metrics line goes before the record that counts the step.
    let append_at = fx
        .iter()
        .position(|f| matches!(f, Effect::AppendMetrics { .. }));
    let store_at = fx.iter().position(|f| matches!(f, Effect::Store { .. }));
    assert!(append_at < store_at);
    // Out of order is refused; a step whose metrics say another step is invalid.
    assert!(matches!(
        e.report_step(&member("w1", 1, 0), step_report(3)),
        Err(Refusal::Stale(_))
    ));
    let mut wrong = step_report(2);
    wrong.metrics[0].1 = 7.0;
    assert!(matches!(
        e.report_step(&member("w1", 1, 0), wrong),
        Err(Refusal::Invalid(_))
    ));
    // The world that trained a step is typed, and must be a real one.
    let mut future = step_report(2);
    future.trained_generation = 5;
    assert!(matches!(
        e.report_step(&member("w1", 1, 0), future),
        Err(Refusal::Invalid(_))
    ));
    e.report_step(&member("w1", 1, 0), step_report(2))
        .expect("step 2");
    let fx = e.take_effects();
    let Some(Effect::Store { writes, .. }) = fx.iter().find(|f| matches!(f, Effect::Store { .. }))
    else {
        panic!("no store write");
    };
    let entry: LedgerEntry =
        serde_json::from_str(writes[1].1.as_deref().unwrap_or("")).expect("an entry");
    assert_eq!(
        (entry.step, entry.start),
        (2, 2),
        "step 2 starts at position 2"
    );
    assert_eq!(e.run("run-a").map(|r| r.step).ok(), Some(2));
}

#[test]
fn the_record_written_per_step_does_not_grow_with_the_run() {
    let t0 = Now::system();
    let mut e = engine_with_run(1, 1, 5000, t0);
    join(&mut e, "w1", t0);
    let mut sizes = Vec::new();
    for step in 1..=3000 {
        e.report_step(&member("w1", 1, 0), step_report(step))
            .expect("recorded");
        for f in e.take_effects() {
            if let Effect::Store { writes, .. } = f {
                sizes.push(
                    writes
                        .iter()
                        .map(|(k, v)| k.len() + v.as_ref().map_or(0, String::len))
                        .sum::<usize>(),
                );
            }
        }
    }
    assert_eq!(sizes.len(), 3000);
    // Only the step numbers' digits may add bytes.
    assert!(
        sizes[2999] <= sizes[0] + 16,
        "{} then {}",
        sizes[0],
        sizes[2999]
    );
}

#[test]
fn a_checkpoint_commit_is_fenced_and_counts_only_once_committed() {
    let t0 = Now::system();
    let mut e = engine_with_run(1, 1, 10, t0);
    join(&mut e, "w1", t0);
    e.report_step(&member("w1", 1, 0), step_report(1))
        .expect("step 1");
    e.report_step(&member("w1", 1, 0), step_report(2))
        .expect("step 2");
    e.take_effects();
    assert!(
        matches!(
            e.commit_checkpoint(&member("w1", 1, 0), 3, "/ck/3", true),
            Err(Refusal::Stale(_))
        ),
        "a checkpoint past the recorded steps"
    );
    assert!(
        matches!(
            e.commit_checkpoint(&member("w1", 1, 0), 2, "/ck/2", false),
            Err(Refusal::Invalid(_))
        ),
        "a directory without a manifest"
    );
    e.commit_checkpoint(&member("w1", 1, 0), 2, "/ck/2", true)
        .expect("decided");
    let fx = e.take_effects();
    assert_eq!(
        fx,
        vec![Effect::Store {
            run: Some("run-a".into()),
            fence: Some(1),
            writes: vec![(
                "dpo/runs/run-a/checkpoint".into(),
                Some(r#"{"step":2,"path":"/ck/2"}"#.into())
            )]
        }]
    );
    assert_eq!(e.run("run-a").map(|r| r.checkpoint_step).ok(), Some(0));
    e.checkpoint_committed("run-a", 2, "/ck/2")
        .expect("committed");
    assert_eq!(e.run("run-a").map(|r| r.checkpoint_step).ok(), Some(2));
    // The same or an older checkpoint again (a world retraining steps from
    // a survivor's older state): acknowledged, nothing decided — not
    // refused as stale, which would end the generation for nothing.
    e.take_effects();
    for step in [1, 2] {
        e.commit_checkpoint(&member("w1", 1, 0), step, "/ck/old", true)
            .expect("acknowledged");
    }
    assert_eq!(e.take_effects(), Vec::new());
    // A new generation resumes from it.
    join(&mut e, "w2", t0);
    e.stream_closed("w1", 1, t0).expect("gone");
    let fx = e.take_effects();
    let resume: Vec<_> = fx
        .iter()
        .filter_map(|f| match f {
            Effect::Send {
                kind: v1::assignment::Kind::Work(w),
                ..
            } => Some((w.resume_step, w.resume_checkpoint.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(resume, vec![(2, "/ck/2".to_string())]);
}

#[test]
fn a_replaced_stream_closing_changes_nothing() {
    let t0 = Now::system();
    let mut e = engine_with_run(1, 1, 10, t0);
    let (_, session) = join_with_session(&mut e, "w1", t0);
    let second = e.open_stream("w1", &session, t0).expect("reopened");
    e.take_effects();
    e.stream_closed("w1", second - 1, t0).expect("old stream");
    assert!(e.take_effects().is_empty());
    assert_eq!(e.workers(t0).len(), 1);
    e.stream_closed("w1", second, t0).expect("current stream");
    assert!(e.workers(t0).is_empty());
}

#[test]
fn a_member_on_a_new_stream_has_its_world_formed_again() {
    let t0 = Now::system();
    let mut e = engine_with_run(1, 1, 10, t0);
    let (fx, session) = join_with_session(&mut e, "w1", t0);
    assert_eq!(works(&fx), vec![("w1".into(), 1, 0, 1)]);
    // Its stream broke (the assignment may have been lost with it); it opens
    // another with its session: the world forms again and it is told.
    e.open_stream("w1", &session, t0.after(Duration::from_secs(1)))
        .expect("reopened");
    let fx = e.take_effects();
    assert_eq!(aborts(&fx), vec![("w1".into(), 1)]);
    assert_eq!(works(&fx), vec![("w1".into(), 2, 0, 1)]);
}

#[test]
fn success_needs_rank_0_and_every_step_then_the_run_ends_cleanly() {
    let t0 = Now::system();
    let mut e = engine_with_run(2, 2, 2, t0);
    join(&mut e, "w1", t0);
    join(&mut e, "w2", t0);
    e.report_step(&member("w1", 1, 0), step_report(1))
        .expect("step 1");
    assert!(
        matches!(
            e.report_done(&member("w1", 1, 0), 1, "", false, t0),
            Err(Refusal::Stale(_))
        ),
        "done before the last step"
    );
    e.report_step(&member("w1", 1, 0), step_report(2))
        .expect("step 2");
    e.take_effects();
    e.report_done(&member("w2", 1, 1), 2, "", false, t0)
        .expect("rank 1's word");
    assert_eq!(
        e.run("run-a").map(|r| r.state).ok(),
        Some(RunState::Running)
    );
    let t1 = t0.after(Duration::from_secs(60));
    e.report_done(&member("w1", 1, 0), 2, "", false, t1)
        .expect("rank 0's word");
    let r = e.run("run-a").expect("kept");
    assert_eq!((r.state, r.finished_ms), (RunState::Succeeded, t1.unix_ms));
    let fx = e.take_effects();
    let ledger = fx
        .iter()
        .position(|f| matches!(f, Effect::WriteLedger { .. }));
    let history = fx.iter().position(
        |f| matches!(f, Effect::RecordEnd { writes, .. } if writes[0].0 == "dpo/history/run-a" && writes[1] == ("dpo/runs/run-a/record".into(), None)),
    );
    assert!(ledger.is_some() && ledger < history, "{fx:?}");
    // The run's other keys go only after its end is recorded.
    assert!(
        fx.iter().any(|f| matches!(f, Effect::RecordEnd { then_delete, .. } if then_delete == "dpo/runs/run-a/")),
        "{fx:?}"
    );
    let idle = fx
        .iter()
        .filter(|f| {
            matches!(
                f,
                Effect::Send {
                    kind: v1::assignment::Kind::Idle(_),
                    ..
                }
            )
        })
        .count();
    assert_eq!(idle, 2);
    // Then the watchers are let go and the run's files (uploads, shards) go.
    let n = fx.len();
    assert_eq!(
        fx[n - 2..],
        [
            Effect::EndWatch {
                run: "run-a".into()
            },
            Effect::RemoveRunFiles("/shards/a".into())
        ]
    );
    // An ended run takes no more reports.
    assert!(e.report_step(&member("w1", 1, 0), step_report(3)).is_err());
}

#[test]
fn a_failure_from_any_member_fails_the_run() {
    let t0 = Now::system();
    let mut e = engine_with_run(2, 2, 10, t0);
    join(&mut e, "w1", t0);
    join(&mut e, "w2", t0);
    e.report_done(&member("w2", 1, 1), 0, "NaN loss at step 1", false, t0)
        .expect("recorded");
    let r = e.run("run-a").expect("kept");
    assert_eq!(
        (r.state, r.error.as_str()),
        (RunState::Failed, "NaN loss at step 1")
    );
}

#[test]
fn a_restored_running_run_waits_for_a_new_generation_and_keeps_its_checkpoint() {
    let t0 = Now::system();
    let spec = spec("a", 1, 1, 10);
    let data = RunData::new(&spec, pairs(8), Vec::new()).expect("data");
    let mut record = RunRecord::queued(
        "run-a".into(),
        spec.clone(),
        &data,
        "/s".into(),
        "alice".into(),
        t0,
    );
    record.state = RunState::Running;
    record.step = 4;
    let json = serde_json::to_string(&record).expect("json");
    assert!(
        json.contains(r#""state":4"#),
        "stored as the wire number: {json}"
    );
    let mut e = Engine::new(TTL, 7);
    let ck = CheckpointRecord {
        step: 3,
        path: "/ck/3".into(),
    };
    e.restore(
        serde_json::from_str(&json).expect("reads back"),
        Some(ck),
        Some(Ok(data)),
    )
    .expect("restored");
    let r = e.run("run-a").expect("restored");
    assert_eq!(
        (r.state, r.step, r.checkpoint_step),
        (RunState::Waiting, 4, 3)
    );
    let fx = join(&mut e, "w1", t0);
    assert_eq!(
        works(&fx),
        vec![("w1".into(), 8, 0, 1)],
        "numbers continue after the stored generation"
    );
    // A run whose shards are gone fails with the reason.
    let mut e = Engine::new(TTL, 0);
    let data = RunData::new(&spec, pairs(8), Vec::new()).expect("data");
    let record = RunRecord::queued("run-b".into(), spec, &data, "/s".into(), "alice".into(), t0);
    e.restore(
        record,
        None,
        Some(Err(DataGone("train.shard: missing".into()))),
    )
    .expect("restored");
    let r = e.run("run-b").expect("kept");
    assert_eq!(r.state, RunState::Failed);
    assert!(r.error.contains("train.shard: missing"), "{}", r.error);
}

#[test]
fn an_earlier_versions_ledger_tail_moves_to_its_own_keys() {
    let t0 = Now::system();
    let spec = spec("a", 1, 1, 10);
    let data = RunData::new(&spec, pairs(8), Vec::new()).expect("data");
    let record = RunRecord::queued("run-a".into(), spec, &data, "/s".into(), "alice".into(), t0);
    let mut v = serde_json::to_value(&record).expect("json");
    v["ledger_tail"] = serde_json::json!([
        {"step": 1, "epoch": 0, "start": 0, "generation": 1, "world_size": 1},
        {"step": 2, "epoch": 0, "start": 2, "generation": 1, "world_size": 1}
    ]);
    let mut e = Engine::new(TTL, 1);
    e.restore(serde_json::from_value(v).expect("old record"), None, None)
        .expect("restored");
    let fx = e.take_effects();
    let [Effect::Store { writes, .. }] = fx.as_slice() else {
        panic!("{fx:?}");
    };
    let keys: Vec<&str> = writes.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(
        keys,
        vec![
            "dpo/runs/run-a/ledger/00000000000000000001",
            "dpo/runs/run-a/ledger/00000000000000000002",
            "dpo/runs/run-a/record"
        ]
    );
    assert!(!writes[2].1.as_deref().unwrap_or("").contains("ledger_tail"));
    // Segments written by that version read back as lists.
    assert_eq!(
        read_ledger_value(r#"[{"step":5,"epoch":0,"start":0,"generation":1,"world_size":1}]"#)
            .len(),
        1
    );
}

#[test]
fn a_registration_with_an_unbounded_hostname_or_device_is_refused() {
    let ok = v1::RegisterRequest {
        worker_id: "w".into(),
        collective_addr: "127.0.0.1:9000".into(),
        hostname: "h".repeat(255),
        device: "cuda:0".into(),
        ..Default::default()
    };
    Engine::check_registration(&ok).expect("within bounds");
    for (host, device) in [
        ("h".repeat(256), "cpu".to_string()),
        ("h".into(), "d".repeat(65)),
    ] {
        let req = v1::RegisterRequest {
            hostname: host,
            device,
            ..ok.clone()
        };
        assert!(matches!(
            Engine::check_registration(&req),
            Err(Refusal::Invalid(_))
        ));
    }
}

#[test]
fn a_step_records_the_generation_and_world_size_the_engine_checked() {
    let t0 = Now::system();
    let mut e = engine_with_run(1, 1, 10, t0);
    join(&mut e, "w1", t0);
    let me = member("w1", 1, 0);
    let mut r = step_report(1);
    r.trained_world_size = 1;
    r.metrics.push(("generation".into(), 1e12));
    r.metrics.push(("world_size".into(), -5.0));
    e.report_step(&me, r).expect("recorded");
    let written = e
        .take_effects()
        .into_iter()
        .find_map(|eff| match eff {
            Effect::AppendMetrics { metrics, .. } => Some(metrics),
            _ => None,
        })
        .expect("a metrics line");
    let get = |k: &str| written.iter().find(|(n, _)| n == k).map(|(_, v)| *v);
    assert_eq!(
        (get("generation"), get("world_size")),
        (Some(1.0), Some(1.0))
    );
}

#[test]
fn bad_reports_are_refused_and_never_recorded() {
    let t0 = Now::system();
    let mut e = engine_with_run(1, 1, 10, t0);
    join(&mut e, "w1", t0);
    let me = member("w1", 1, 0);
    let invalid = |r: Result<()>| matches!(r, Err(Refusal::Invalid(_)));
    let mut nan = step_report(1);
    nan.metrics.push(("loss_nan".into(), f64::NAN));
    assert!(invalid(e.report_step(&me, nan)));
    let mut many = step_report(1);
    many.metrics
        .extend((0..300).map(|i| (format!("m{i}"), 0.0)));
    assert!(invalid(e.report_step(&me, many)));
    let mut long_name = step_report(1);
    long_name.metrics.push(("x".repeat(65), 0.0));
    assert!(invalid(e.report_step(&me, long_name)));
    let mut huge = step_report(1);
    huge.metrics.push(("loss".into(), 1e308));
    assert!(invalid(e.report_step(&me, huge)), "finite but not physical");
    let mut crowd = step_report(1);
    crowd.trained_world_size = u32::MAX;
    assert!(invalid(e.report_step(&me, crowd)));
    let mut past = step_report(11);
    past.metrics[0].1 = 11.0;
    assert!(
        invalid(e.report_step(&me, past)),
        "step 11 of a 10-step run"
    );
    let mut eval = step_report(u64::MAX);
    eval.eval = true;
    assert!(
        invalid(e.report_step(&me, eval)),
        "an eval step past the run"
    );
    assert!(
        e.take_effects().is_empty(),
        "nothing of a refused report is written"
    );
    assert_eq!(e.run("run-a").map(|r| r.step).ok(), Some(0));
    // A failure's message is kept, but not without bound.
    let huge = "é".repeat(1 << 20);
    e.report_done(&me, 0, &huge, false, t0).expect("failed");
    let r = e.run("run-a").expect("kept");
    assert_eq!(r.state, RunState::Failed);
    assert!(
        r.error.len() < 4200 && r.error.ends_with("bytes cut]"),
        "{}",
        r.error.len()
    );
}

#[test]
fn a_second_active_run_cannot_take_the_same_output() {
    let t0 = Now::system();
    let mut e = engine_with_run(1, 1, 10, t0);
    // Submits check before tokenizing, but two can pass that check together:
    // queuing checks again, atomically.
    let spec = spec("a", 1, 1, 10);
    let data = RunData::new(&spec, pairs(8), Vec::new()).expect("data");
    let twin = RunRecord::queued("run-b".into(), spec, &data, "/s".into(), "alice".into(), t0);
    let err = e.add_run(twin, data, t0).expect_err("same output");
    assert!(
        err.to_string().contains("already writes to /out/a"),
        "{err}"
    );
    assert!(e.run("run-b").is_err());
    assert!(e.take_effects().is_empty());
    // Inside or above it is refused too; another owner is not told whose it is.
    let spec_of = |name: &str| self::spec(name, 1, 1, 10);
    for (out, owner) in [
        ("/out/a/inner", "alice"),
        ("/out", "bob"),
        ("/out/a/x", "bob"),
    ] {
        let mut s = spec_of("c");
        s.train.output = out.into();
        let err = e
            .check_output_free(&s, owner)
            .expect_err("overlaps")
            .to_string();
        if owner == "alice" {
            assert!(err.contains("run-a"), "{err}");
        } else {
            assert!(!err.contains("run-a") && !err.contains("(a)"), "{err}");
            assert!(err.contains("another run's output"), "{err}");
        }
    }
    let mut s = spec_of("c");
    s.train.output = "/out/ab".into();
    e.check_output_free(&s, "bob")
        .expect("a sibling with a longer name is free");
}

#[test]
fn a_live_workers_id_cannot_be_taken_without_its_session() {
    let t0 = Now::system();
    let mut e = engine_with_run(1, 1, 10, t0);
    let (_, session) = join_with_session(&mut e, "w1", t0);
    assert_eq!(session.len(), 32);
    let impostor = v1::RegisterRequest {
        worker_id: "w1".into(),
        collective_addr: "10.0.0.66:9000".into(),
        ..Default::default()
    };
    let t1 = t0.after(TTL / 2);
    assert!(matches!(
        e.register(impostor.clone(), Some(99), t1),
        Err(Refusal::Denied(_))
    ));
    // The impostor's etcd lease goes; nothing else changes.
    assert_eq!(e.take_effects(), vec![Effect::RevokeLease(99)]);
    assert!(matches!(
        e.open_stream("w1", b"guess", t1),
        Err(Refusal::Denied(_))
    ));
    assert!(
        e.heartbeat("w1", b"guess", t1).is_none(),
        "a wrong session is not a heartbeat"
    );
    assert_eq!(
        e.workers(t1)[0].collective_addr,
        "127.0.0.1:9000",
        "the impostor's address was not taken"
    );
    // The worker itself re-registers with its session and keeps it.
    let mut again = impostor.clone();
    again.collective_addr = "127.0.0.1:9001".into();
    again.session = session.clone();
    let r = e.register(again, None, t1).expect("its own session");
    assert_eq!(r.session, session);
    // Once its lease lapsed, the id is free to register afresh (a new session).
    let late = t1.after(TTL + Duration::from_millis(1));
    let r = e.register(impostor, None, late).expect("lapsed id");
    assert_ne!(r.session, session);
}

#[test]
fn after_missed_writes_the_engine_writes_its_state_again() {
    let t0 = Now::system();
    let mut e = engine_with_run(1, 1, 10, t0);
    join(&mut e, "w1", t0);
    e.report_step(&member("w1", 1, 0), step_report(1))
        .expect("step 1");
    e.take_effects();
    e.persist_all().expect("planned");
    let fx = e.take_effects();
    let keys: Vec<(String, Option<String>)> = fx
        .iter()
        .flat_map(|f| match f {
            Effect::Store { writes, .. } => writes.clone(),
            _ => Vec::new(),
        })
        .collect();
    assert_eq!(
        keys[0],
        ("dpo/generation".to_string(), Some("1".to_string()))
    );
    assert_eq!(keys[1].0, "dpo/runs/run-a/record");
    let record: RunRecord =
        serde_json::from_str(keys[1].1.as_deref().unwrap_or("")).expect("a record");
    assert_eq!(record.step, 1, "the engine's state, not the store's");
}

#[test]
fn a_rollback_is_checked_recorded_once_per_generation_and_told_to_watchers() {
    let t0 = Now::system();
    let mut e = engine_with_run(2, 2, 10, t0);
    join(&mut e, "w1", t0);
    join(&mut e, "w2", t0);
    for step in 1..=2 {
        e.report_step(&member("w1", 1, 0), step_report(step))
            .expect("step");
    }
    e.take_effects();
    // Not the committed checkpoint (none: step 0), or from beyond the run: refused.
    let refused = e
        .report_rollback(&member("w1", 1, 0), 2, 1, "lost")
        .expect_err("not the checkpoint");
    assert!(matches!(refused, Refusal::Invalid(_)), "{refused:?}");
    assert!(
        e.report_rollback(&member("w1", 1, 0), 9, 0, "lost")
            .is_err(),
        "from a step the run never reached"
    );
    // A stranger's report: refused as stale.
    assert!(matches!(
        e.report_rollback(&member("w9", 1, 0), 2, 0, "lost"),
        Err(Refusal::Stale(_))
    ));
    // Both ranks report it; it counts once.
    for m in [member("w1", 1, 0), member("w2", 1, 1)] {
        e.report_rollback(&m, 2, 0, "rank 2 of 3 lost")
            .expect("rollback");
    }
    let r = e.run("run-a").expect("run");
    assert_eq!(r.rollbacks.len(), 1);
    assert_eq!((r.rollbacks[0].from_step, r.rollbacks[0].to_step), (2, 0));
    assert_eq!(r.step, 2, "the recorded steps stand");
    let fx = e.take_effects();
    let told = fx
        .iter()
        .filter(|f| {
            matches!(
                f,
                Effect::Emit {
                    event: v1::RunEvent {
                        event: Some(v1::run_event::Event::Rollback(_)),
                        ..
                    },
                    ..
                }
            )
        })
        .count();
    assert_eq!(told, 1, "{fx:?}");
    assert!(
        fx.iter().any(|f| matches!(f, Effect::Store { .. })),
        "the record is persisted"
    );
    // A step trained again after it is the first report's: ignored.
    e.report_step(&member("w1", 1, 0), step_report(1))
        .expect("a re-trained step");
    assert_eq!(e.run("run-a").expect("run").step, 2);
}

/// Registers `worker` from `host` as local rank `local` (nccl-capable or not)
/// and opens its stream; returns the effects.
fn join_rank(
    e: &mut Engine,
    worker: &str,
    host: &str,
    local: u32,
    nccl: bool,
    now: Now,
) -> Vec<Effect> {
    let req = v1::RegisterRequest {
        worker_id: worker.into(),
        collective_addr: "127.0.0.1:9000".into(),
        hostname: host.into(),
        local_rank: local,
        nccl,
        ..Default::default()
    };
    let session = e.register(req, None, now).expect("registered").session;
    e.open_stream(worker, &session, now).expect("registered");
    e.take_effects()
}

/// The backend of each Work assignment among `effects`, with the number of
/// peer addresses it carries.
fn backends(effects: &[Effect]) -> Vec<(String, usize)> {
    effects
        .iter()
        .filter_map(|f| match f {
            Effect::Send {
                kind: v1::assignment::Kind::Work(w),
                ..
            } => Some((w.backend.clone(), w.peers.len())),
            _ => None,
        })
        .collect()
}

#[test]
fn the_ranks_of_one_host_are_placed_together_in_local_rank_order() {
    let t0 = Now::system();
    let mut e = engine_with_run(4, 4, 10, t0);
    // Two `--gpus 2` hosts whose processes registered interleaved.
    join_rank(&mut e, "a-1", "host-a", 1, true, t0);
    join_rank(&mut e, "b-0", "host-b", 0, true, t0);
    join_rank(&mut e, "a-0", "host-a", 0, true, t0);
    let formed = join_rank(&mut e, "b-1", "host-b", 1, true, t0);
    assert_eq!(
        works(&formed),
        vec![
            ("a-0".into(), 1, 0, 4),
            ("a-1".into(), 1, 1, 4),
            ("b-0".into(), 1, 2, 4),
            ("b-1".into(), 1, 3, 4),
        ],
        "host-a joined first; within a host, local-rank order"
    );
    assert_eq!(
        backends(&formed),
        vec![("nccl".to_string(), 0); 4],
        "auto: every member can run NCCL; an NCCL world reads no peer addresses"
    );
}

#[test]
fn auto_picks_nccl_only_when_every_member_can_run_it() {
    let t0 = Now::system();
    let mut e = engine_with_run(2, 2, 10, t0);
    join_rank(&mut e, "gpu", "h1", 0, true, t0);
    let formed = join_rank(&mut e, "cpu", "h2", 0, false, t0);
    assert_eq!(
        backends(&formed),
        vec![("tcp".to_string(), 2); 2],
        "a TCP ring: every rank's address"
    );
}

/// Each member learns how many ranks of its generation share its host, so
/// it divides that host's cores among them: three on one host and one alone.
#[test]
fn each_member_is_told_how_many_ranks_share_its_host() {
    let t0 = Now::system();
    let mut e = engine_with_run(4, 4, 10, t0);
    join_rank(&mut e, "a-0", "host-a", 0, false, t0);
    join_rank(&mut e, "a-1", "host-a", 1, false, t0);
    join_rank(&mut e, "b-0", "host-b", 0, false, t0);
    let formed = join_rank(&mut e, "a-2", "host-a", 2, false, t0);
    let shared: Vec<(String, u32)> = formed
        .iter()
        .filter_map(|f| match f {
            Effect::Send {
                worker,
                kind: v1::assignment::Kind::Work(w),
            } => Some((worker.clone(), w.host_ranks)),
            _ => None,
        })
        .collect();
    assert_eq!(
        shared,
        vec![
            ("a-0".into(), 3),
            ("a-1".into(), 3),
            ("a-2".into(), 3),
            ("b-0".into(), 1)
        ]
    );
}

#[test]
fn a_cold_start_forms_one_world_and_a_stream_of_joiners_waits_at_most_a_lease() {
    let t0 = Now::system();
    let mut e = engine_with_run(1, 64, 10, t0);
    let settle = e.join_settle();
    let tick = Duration::from_millis(100);
    let mut sessions: Vec<(String, Vec<u8>)> = Vec::new();
    // The periodic reconcile, every worker having beaten: its effects.
    let beat_and_reconcile = |e: &mut Engine, sessions: &[(String, Vec<u8>)], t: Now| {
        for (w, s) in sessions {
            assert!(e.heartbeat(w, s, t).is_some());
        }
        e.reconcile(t).expect("reconcile");
        e.take_effects()
    };
    // Ten workers join 100 ms apart (closer than the settling window), with
    // the periodic reconcile between them: no world until they settle.
    let mut now = t0;
    for i in 0..10 {
        now = t0.after(tick * i);
        let (fx, session) = join_with_session(&mut e, &format!("w{i:02}"), now);
        sessions.push((format!("w{i:02}"), session));
        assert!(works(&fx).is_empty());
        assert!(works(&beat_and_reconcile(&mut e, &sessions, now)).is_empty());
    }
    let formed = works(&beat_and_reconcile(&mut e, &sessions, now.after(settle)));
    assert_eq!(formed.len(), 10, "{formed:?}");
    assert!(
        formed
            .iter()
            .all(|(_, g, _, world)| *g == 1 && *world == 10)
    );
    // Joiners now arrive every half a settling window for ever: the world
    // keeps training until the first of them has waited a whole lease.
    let start = now.after(settle);
    let mut grown_at = None;
    for k in 1..=((TTL.as_millis() / tick.as_millis()) as u32 + 10) {
        let t = start.after(tick * k);
        let mut fx = Vec::new();
        if k % 4 == 0 {
            let (joined, session) = join_with_session(&mut e, &format!("j{k:03}"), t);
            sessions.push((format!("j{k:03}"), session));
            fx = joined;
        }
        fx.extend(beat_and_reconcile(&mut e, &sessions, t));
        if grown_at.is_none() && !works(&fx).is_empty() {
            grown_at = Some(tick * k);
            assert!(works(&fx).iter().all(|(_, g, _, _)| *g == 2), "{fx:?}");
        }
    }
    // The first joiner came at 4 ticks; it has waited a lease at 4 ticks + TTL.
    assert_eq!(grown_at, Some(tick * 4 + TTL));
}
