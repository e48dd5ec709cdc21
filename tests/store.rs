//! The coordinator against its stores. A long run costs the store the same at
//! every step, on both stores: the run record keeps its size, each step writes
//! the same bytes (its record and its own ledger entry), and the ledger written
//! when the run ends holds every step exactly once, read back from the store a
//! page at a time. A frozen etcd delays the requests that write, never
//! heartbeats, batches or reads. The coordinator runs in-process (its library),
//! driven as a worker would; etcd is a real process.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use dpo_coordinator::{Confinement, Coordinator, Embedded, Etcd, EtcdSecurity, Settings, Store};
use dpo_e2e::{Case, Proc, etcd_on_a_free_port};
use dpo_proto::v1::{self, assignment::Kind};

const STEPS: u64 = 3000;

/// The soak run's length: long enough that etcd's history, never compacted,
/// would outgrow the quota the soak test gives it.
const SOAK_STEPS: u64 = 20_000;

/// A model directory with only what the coordinator reads (the vocabulary
/// size) and a pre-tokenized dataset: no tokenizer, no Python.
fn long_spec(dir: &Path, steps: u64) -> anyhow::Result<dpo_proto::RunSpec> {
    let model = dir.join("model");
    std::fs::create_dir_all(&model)?;
    std::fs::write(model.join("config.json"), r#"{"vocab_size": 64}"#)?;
    let mut lines = String::new();
    for i in 0..8 {
        lines.push_str(&format!(
            "{{\"prompt_ids\": [1, 2, {}], \"chosen_ids\": [3, 4], \"rejected_ids\": [5]}}\n",
            10 + i
        ));
    }
    std::fs::write(dir.join("train.jsonl"), lines)?;
    let spec = format!(
        r#"name = "long"
[model]
path = "{model}"
[data]
train = "{train}"
[train]
global_batch_size = 2
max_steps = {steps}
output = "{out}"
"#,
        model = model.display(),
        train = dir.join("train.jsonl").display(),
        out = dir.join("out").display(),
    );
    let path = dir.join("run.toml");
    std::fs::write(&path, spec)?;
    Ok(dpo_proto::RunSpec::from_file(&path)?)
}

fn metrics(step: u64, generation: u64) -> Vec<v1::Metric> {
    [
        ("step", step as f64),
        ("loss", std::f64::consts::LN_2 / step as f64),
        ("rewards/accuracies", 0.5),
        ("generation", generation as f64),
        ("world_size", 1.0),
    ]
    .into_iter()
    .map(|(name, value)| v1::Metric {
        name: name.into(),
        value,
    })
    .collect()
}

/// A coordinator on `store` with its data dir under `dir` (60 s leases, 1 MiB uploads).
async fn open(store: Store, dir: &Path) -> anyhow::Result<Arc<Coordinator>> {
    let data_dir = dir.join("coordinator");
    std::fs::create_dir_all(&data_dir)?;
    Coordinator::open(
        store,
        Settings {
            confinement: Confinement::new(&[dir.to_path_buf()], &data_dir)?,
            data_dir,
            lease_ttl: Duration::from_secs(60),
            max_upload_bytes: 1 << 20,
            run_files_retention: Duration::ZERO,
        },
    )
    .await
}

/// A coordinator on `store` with the long run submitted and one worker, `w1`,
/// holding its generation: the run's id, the worker's assignment and session.
async fn started(
    store: Store,
    dir: &Path,
    steps: u64,
) -> anyhow::Result<(Arc<Coordinator>, String, v1::Work, Vec<u8>)> {
    started_on(open(store, dir).await?, dir, steps).await
}

/// [`started`] on an open coordinator.
async fn started_on(
    c: Arc<Coordinator>,
    dir: &Path,
    steps: u64,
) -> anyhow::Result<(Arc<Coordinator>, String, v1::Work, Vec<u8>)> {
    let spec = long_spec(dir, steps)?;
    let run = c.submit("run-long".into(), spec, &[], "alice").await?;
    assert_eq!(run.total_steps, steps);
    let session = c
        .register(v1::RegisterRequest {
            worker_id: "w1".into(),
            collective_addr: "127.0.0.1:1".into(),
            ..Default::default()
        })
        .await?
        .session;
    let (mut rx, _tx, _) = c.open_stream("w1", &session).await?;
    let work = loop {
        match tokio::time::timeout(Duration::from_secs(10), rx.recv()).await? {
            Some(Ok(v1::Assignment {
                kind: Some(Kind::Work(w)),
            })) => break w,
            Some(_) => continue,
            None => bail!("the assignment stream closed"),
        }
    };
    // The stream stays open for the test's length (its receiver is dropped here,
    // which the service would notice; the coordinator alone does not).
    Ok((c, run.id, work, session))
}

/// `w1` as rank 0 of `generation`.
fn member(run: &str, generation: u64) -> Option<v1::Member> {
    Some(v1::Member {
        worker_id: "w1".into(),
        run_id: run.into(),
        generation,
        rank: 0,
    })
}

fn step_request(run: &str, generation: u64, step: u64) -> v1::ReportStepRequest {
    v1::ReportStepRequest {
        member: member(run, generation),
        step,
        metrics: metrics(step, generation),
        eval: false,
        trained_generation: generation,
        trained_world_size: 1,
    }
}

/// Rank 0 reports the run done after `steps`; the run must have succeeded.
async fn finish(c: &Coordinator, run_id: &str, generation: u64, steps: u64) -> anyhow::Result<()> {
    c.report_done(&v1::ReportDoneRequest {
        member: member(run_id, generation),
        step: steps,
        ..Default::default()
    })
    .await?;
    let ended = c.get(run_id, None).await?;
    assert_eq!(
        ended.state,
        v1::RunState::Succeeded as i32,
        "{}",
        ended.error
    );
    Ok(())
}

/// Trains a `STEPS`-step run through the coordinator's API and checks what it
/// cost the store.
async fn long_run(store: Store, dir: &Path) -> anyhow::Result<()> {
    let (c, run_id, work, _) = started(store, dir, STEPS).await?;
    let record_key = format!("dpo/runs/{run_id}/record");
    let mut per_step = Vec::with_capacity(STEPS as usize);
    let mut record_sizes = Vec::new();
    for step in 1..=STEPS {
        let before = c.store().bytes_written();
        c.report_step(&step_request(&run_id, work.generation, step))
            .await?;
        per_step.push(c.store().bytes_written() - before);
        if step == 10 || step == STEPS {
            let record = c
                .store()
                .get(&record_key)
                .await?
                .context("the run record")?;
            record_sizes.push(record.len());
        }
    }
    // Constant: only the step number's digits (in the record, twice in the
    // ledger entry) and the metrics' printed digits may differ.
    let (first, last) = (per_step[9], per_step[STEPS as usize - 1]);
    assert!(
        last <= first + 24 && last > 0,
        "bytes per step: {first} at step 10, {last} at step {STEPS}"
    );
    eprintln!(
        "bytes written per step: {first} at step 10, {last} at step {STEPS}; run record: {} then {} bytes",
        record_sizes[0], record_sizes[1]
    );
    let max = per_step.iter().copied().max().unwrap_or(0);
    assert!(
        max <= first + 32,
        "the largest step wrote {max} bytes, step 10 wrote {first}"
    );
    assert!(
        record_sizes[1] <= record_sizes[0] + 16,
        "run record: {} bytes at step 10, {} at step {STEPS}",
        record_sizes[0],
        record_sizes[1]
    );
    assert!(
        record_sizes[1] < 4096,
        "the record is {} bytes",
        record_sizes[1]
    );
    finish(&c, &run_id, work.generation, STEPS).await?;
    // The ledger: every step once, in order, from the store's pages.
    let ledger = std::fs::read_to_string(dir.join("out/ledger.jsonl"))?;
    let steps: Vec<u64> = ledger
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .and_then(|v| v["step"].as_u64())
                .unwrap_or(0)
        })
        .collect();
    assert_eq!(steps, (1..=STEPS).collect::<Vec<_>>());
    let metrics_lines = std::fs::read_to_string(dir.join("out/metrics.jsonl"))?;
    assert_eq!(metrics_lines.lines().count(), STEPS as usize);
    // The run's files on the coordinator (shards) are gone with it.
    assert!(!dir.join("coordinator/runs/run-long").exists());
    // The working keys are gone, the history record stays.
    assert!(
        c.store()
            .list(&format!("dpo/runs/{run_id}/"))
            .await?
            .is_empty()
    );
    assert!(
        c.store()
            .get(&format!("dpo/history/{run_id}"))
            .await?
            .is_some()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_run_costs_the_embedded_store_the_same_at_every_step() -> anyhow::Result<()> {
    let case = Case::empty();
    let store = Store::Embedded(Embedded::open(&case.path().join("store"))?);
    long_run(store, case.path()).await?;
    // The embedded store's files stay proportional to what is kept (the log
    // folds into the snapshot), not to the square of the step count.
    let files: u64 = ["store.json", "store.log"]
        .iter()
        .filter_map(|f| std::fs::metadata(case.path().join("store").join(f)).ok())
        .map(|m| m.len())
        .sum();
    assert!(files < 8 << 20, "the store's files hold {files} bytes");
    Ok(())
}

/// A fresh etcd process under `case` (with `flags`) and the store on it.
async fn etcd_store(case: &Case, flags: &[&str]) -> anyhow::Result<(Proc, Store)> {
    let (process, port) =
        etcd_on_a_free_port(&case.path().join("etcd"), case.path(), "etcd", None, flags)?;
    let etcd = Etcd::connect(
        &[format!("http://127.0.0.1:{port}")],
        EtcdSecurity::default(),
    )
    .await?;
    Ok((process, Store::Etcd(Box::new(etcd))))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_run_costs_etcd_the_same_at_every_step() -> anyhow::Result<()> {
    let case = Case::empty();
    let (_etcd, store) = etcd_store(&case, &[]).await?;
    long_run(store, case.path()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_etcd_delays_writes_but_not_heartbeats_batches_or_reads() -> anyhow::Result<()> {
    let case = Case::empty();
    let (etcd_proc, store) = etcd_store(&case, &[]).await?;
    let (c, run_id, work, session) = started(store, case.path(), STEPS).await?;
    c.report_step(&step_request(&run_id, work.generation, 1))
        .await?;
    let signal = |sig: &str| {
        std::process::Command::new("kill")
            .args([sig, &etcd_proc.child.id().to_string()])
            .status()
    };
    assert!(signal("-STOP")?.success());
    // Step 2's record waits for etcd...
    let c2 = c.clone();
    let req = step_request(&run_id, work.generation, 2);
    let pending = tokio::spawn(async move { c2.report_step(&req).await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !pending.is_finished(),
        "a write answered while etcd was frozen"
    );
    // ...while the engine keeps answering everything that does not write.
    let t = Instant::now();
    let known = c
        .heartbeat(&v1::HeartbeatRequest {
            worker_id: "w1".into(),
            generation: work.generation,
            session,
        })
        .await;
    let batch = c
        .fetch_batch(&v1::FetchBatchRequest {
            member: member(&run_id, work.generation),
            step: 2,
            split: v1::Split::Train as i32,
        })
        .await?;
    let run = c.get(&run_id, None).await?;
    let workers = c.workers().await;
    let took = t.elapsed();
    assert!(known && batch.examples.len() == 2 && workers.len() == 1);
    assert_eq!(run.step, 2, "the engine counts step 2 before etcd has it");
    assert!(
        took < Duration::from_millis(500),
        "reads took {took:?} behind a frozen etcd"
    );
    assert!(signal("-CONT")?.success());
    tokio::time::timeout(Duration::from_secs(30), pending).await???;
    let stored = c
        .store()
        .get(&format!("dpo/runs/{run_id}/ledger/{:020}", 2))
        .await?;
    assert!(
        stored.is_some(),
        "step 2's ledger entry reached etcd once it thawed"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_soak_run_keeps_etcd_within_a_small_quota() -> anyhow::Result<()> {
    // 20k steps write about 30 MiB of history; etcd is given 24 MiB and small
    // requests. The coordinator compacts its own history as it goes.
    let case = Case::empty();
    let quota = 24u64 << 20;
    let (_etcd, store) = etcd_store(
        &case,
        &[
            "--quota-backend-bytes",
            &quota.to_string(),
            "--max-request-bytes",
            "65536",
        ],
    )
    .await?;
    let (c, run_id, work, _) = started(store, case.path(), SOAK_STEPS).await?;
    for step in 1..=SOAK_STEPS {
        c.report_step(&step_request(&run_id, work.generation, step))
            .await?;
    }
    finish(&c, &run_id, work.generation, SOAK_STEPS).await?;
    let ledger = std::fs::read_to_string(case.path().join("out/ledger.jsonl"))?;
    assert_eq!(ledger.lines().count(), SOAK_STEPS as usize);
    let db = std::fs::metadata(case.path().join("etcd/member/snap/db"))?.len();
    eprintln!("etcd database after {SOAK_STEPS} steps: {db} bytes (quota {quota})");
    assert!(db < quota, "etcd's database is {db} bytes");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_etcd_refuses_for_good_fail_the_submission_or_the_run() -> anyhow::Result<()> {
    // This etcd takes requests of up to 2 KiB: a run record (about 1.4 KiB)
    // fits, a record with a long name or many metrics does not.
    let case = Case::empty();
    let (_etcd, store) = etcd_store(&case, &["--max-request-bytes", "2048"]).await?;
    let c = open(store, case.path()).await?;
    // A submission whose record etcd refuses never becomes a run.
    let mut big = long_spec(case.path(), 10)?;
    big.name = "n".repeat(3000);
    let t = Instant::now();
    let err = c
        .submit("run-big".into(), big, &[], "alice")
        .await
        .expect_err("the store refused the record");
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "refused for good, not retried: {:?}",
        t.elapsed()
    );
    assert!(err.to_string().contains("too large"), "{err}");
    assert_eq!(tonic::Status::from(err).code(), tonic::Code::Aborted);
    assert!(c.get("run-big", None).await.is_err(), "no run was queued");
    // A run whose step record etcd refuses fails with etcd's reason.
    let (c, run_id, work, _) = started_on(c, case.path(), 10).await?;
    let mut report = step_request(&run_id, work.generation, 1);
    report.metrics.extend((0..100).map(|i| v1::Metric {
        name: format!("a_rather_long_metric_name_for_a_custom_callback_{i:03}"),
        value: 0.5,
    }));
    let err = c.report_step(&report).await.expect_err("too large");
    assert_eq!(tonic::Status::from(err).code(), tonic::Code::Aborted);
    let run = c.get(&run_id, None).await?;
    assert_eq!(run.state, v1::RunState::Failed as i32, "{run:?}");
    assert!(run.error.contains("too large"), "{}", run.error);
    Ok(())
}
