//! Datasets as TRL users keep them, submitted with `dpoctl`: Hub-style Parquet
//! shards named by a glob and a `datasets.save_to_disk` folder stream from the
//! client to the coordinator and train to the weights of one process on the
//! same records in JSON lines; a bad row names the user's own shard; a path
//! that exists only on the cluster is named with `--remote-data`.

use std::path::Path;
use std::process::Command;

use dpo_e2e::*;

/// Writes `data/{train,eval}.jsonl` of the case as Parquet shards (two of
/// train, one of test, Hub names) under `hub/` and the eval split as a
/// `save_to_disk` folder under `disk/`, with pyarrow and datasets.
fn convert(case: &Path) {
    let script = r#"
import json, sys, os
import pyarrow as pa, pyarrow.parquet as pq, datasets
datasets.disable_progress_bars()
case = sys.argv[1]
rows = [json.loads(l) for l in open(os.path.join(case, "data/train.jsonl")) if l.strip()]
ev = [json.loads(l) for l in open(os.path.join(case, "data/eval.jsonl")) if l.strip()]
os.makedirs(os.path.join(case, "hub"), exist_ok=True)
half = len(rows) // 2
for i, part in enumerate([rows[:half], rows[half:]]):
    t = pa.Table.from_pylist([dict(r, score=1.0) for r in part])
    pq.write_table(t, os.path.join(case, "hub", f"train-0000{i}-of-00002.parquet"), row_group_size=5)
pq.write_table(pa.Table.from_pylist(ev), os.path.join(case, "hub", "test-00000-of-00001.parquet"))
datasets.Dataset.from_list(ev).save_to_disk(os.path.join(case, "disk"), num_shards=2)
bad = [dict(r) for r in rows[:4]]
del bad[1]["rejected"]
bad[1]["rejected"] = None
os.makedirs(os.path.join(case, "badhub"), exist_ok=True)
pq.write_table(pa.Table.from_pylist(rows[:3]), os.path.join(case, "badhub", "train-00000-of-00002.parquet"))
pq.write_table(pa.Table.from_pylist(bad), os.path.join(case, "badhub", "train-00001-of-00002.parquet"))
"#;
    let out = Command::new(python())
        .args(["-c", script])
        .arg(case)
        .output()
        .expect("python");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn with_data(spec: &Path, case: &Path, train: &str, eval: &str) {
    let text = std::fs::read_to_string(spec).expect("spec").replace(
        &format!("train = \"{}\"", case.join("data/train.jsonl").display()),
        &format!("train = \"{train}\"\neval = \"{eval}\""),
    );
    std::fs::write(spec, text).expect("spec");
}

fn submit(port: u16, args: &[&str]) -> (bool, String) {
    let out = dpoctl(port, args).expect("dpoctl");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn parquet_shards_and_a_saved_dataset_stream_from_the_client_and_train_as_json_lines() {
    let case = Case::new(24);
    convert(case.path());
    let dir = case.path();
    let extra = "max_steps = 4\nmicro_batch_size = 2";
    let solo = case.write_spec("solo", extra);
    with_data(
        &solo,
        dir,
        &dir.join("data/train.jsonl").display().to_string(),
        &dir.join("data/eval.jsonl").display().to_string(),
    );
    train_standalone(&solo, &case.logs).expect("standalone");
    let spec = case.write_spec("fromhub", extra);
    with_data(
        &spec,
        dir,
        &dir.join("hub/train-*.parquet").display().to_string(),
        &dir.join("disk").display().to_string(),
    );

    let port = free_port().expect("port");
    let _c = coordinator(
        port,
        &dir.join("coord"),
        &case.logs,
        "coordinator",
        &[],
        None,
    )
    .expect("coordinator");
    let _w = worker(port, "w0", &case.logs).expect("w0");

    // A bad row in the second shard: the user's own shard and row are named.
    let bad = case.write_spec("bad", extra);
    with_data(
        &bad,
        dir,
        &dir.join("badhub/train-*.parquet").display().to_string(),
        &dir.join("disk").display().to_string(),
    );
    let (ok, err) = submit(port, &["submit", &bad.display().to_string()]);
    assert!(!ok);
    let shard = dir.join("badhub/train-00001-of-00002.parquet");
    assert!(
        err.contains(&format!(
            "{}:2: \"rejected\" must be a string, found null",
            shard.display()
        )),
        "{err}"
    );

    // The same through a glob that matches that shard alone.
    let bad = case.write_spec("bad-one", extra);
    with_data(
        &bad,
        dir,
        &dir.join("badhub/train-00001-*.parquet")
            .display()
            .to_string(),
        &dir.join("disk").display().to_string(),
    );
    let (ok, err) = submit(port, &["submit", &bad.display().to_string()]);
    assert!(!ok);
    assert!(err.contains(&format!("{}:2: ", shard.display())), "{err}");

    // A path that is not here: the client says how to name a cluster path...
    let missing = case.write_spec("missing", extra);
    with_data(
        &missing,
        dir,
        "/cluster/volume/train.parquet",
        &dir.join("disk").display().to_string(),
    );
    let (ok, err) = submit(port, &["submit", &missing.display().to_string()]);
    assert!(!ok && err.contains("pass --remote-data"), "{err}");
    // ...and with --remote-data the coordinator checks it there.
    let (ok, err) = submit(
        port,
        &["submit", "--remote-data", &missing.display().to_string()],
    );
    assert!(!ok, "{err}");
    assert!(
        err.contains("data.train: /cluster/volume/train.parquet"),
        "{err}"
    );

    case.submit_watch_succeeds(port, &spec);
    // The shards arrived under their own names (their format is by extension).
    let log = std::fs::read_to_string(case.logs.join("coordinator.log")).expect("log");
    for name in [
        "train-00000-of-00002.parquet",
        "train-00001-of-00002.parquet",
        "state.json",
        "data-00001-of-00002.arrow",
    ] {
        assert!(
            log.lines()
                .any(|l| l.contains("upload received") && l.contains(name)),
            "{name} was not streamed"
        );
    }
    assert!(
        !log.contains("test-00000-of-00001"),
        "only the glob's split"
    );
    case.assert_same_weights(
        &dir.join("fromhub"),
        "Parquet shards and a saved eval split",
    );
}
