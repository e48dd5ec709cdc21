//! `[train] report_to = ["tensorboard"]`: the event files hold the scalars of
//! `metrics.jsonl` and `eval.jsonl` under transformers' tags, read back with
//! TensorBoard's own EventAccumulator — also across a crash and `--resume`,
//! where every step shows once.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use common::{fixture, fixtures, read_jsonl, run_python, tempdir, train_output as train};

/// Every scalar of the run as TensorBoard reads it: tag → [(step, value)].
pub fn scalars(run_dir: &Path, out: &Path) -> BTreeMap<String, Vec<(u64, f32)>> {
    run_python(
        "tests/reference/tensorboard_reference.py",
        &[run_dir.as_os_str(), out.as_os_str()],
    );
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out).expect("scalars")).expect("json");
    v.as_object()
        .expect("object")
        .iter()
        .map(|(tag, points)| {
            let points = points
                .as_array()
                .expect("list")
                .iter()
                .map(|p| {
                    (
                        p[0].as_u64().expect("step"),
                        p[1].as_f64().expect("value") as f32,
                    )
                })
                .collect();
            (tag.clone(), points)
        })
        .collect()
}

/// The scalars `metrics.jsonl` and `eval.jsonl` say TensorBoard must show.
fn expected(out: &Path) -> BTreeMap<String, Vec<(u64, f32)>> {
    let mut want: BTreeMap<String, Vec<(u64, f32)>> = BTreeMap::new();
    for file in ["metrics.jsonl", "eval.jsonl"] {
        for line in read_jsonl(&out.join(file)) {
            let step = line["step"].as_u64().expect("step");
            for (k, v) in line.as_object().expect("object") {
                let tag = dpo_data::tensorboard::tag(k);
                if let (Some(tag), Some(v)) = (tag, v.as_f64()) {
                    want.entry(tag).or_default().push((step, v as f32));
                }
            }
        }
    }
    want
}

#[test]
fn event_files_hold_every_step_once_across_a_crash_and_resume() {
    let dir = tempdir();
    let data = fixtures().join("pairs_tokens.jsonl");
    let out = dir.path().join("out");
    let spec = dir.path().join("tb.toml");
    std::fs::write(
        &spec,
        format!(
            r#"name = "tb"
[model]
path = "{model}"
[data]
train = "{data}"
eval = "{data}"
shuffle = false
[objective]
loss = "sigmoid"
[optim]
name = "adamw"
lr = 1e-3
[train]
max_steps = 5
global_batch_size = 4
micro_batch_size = 2
eval_every = 1
checkpoint_every = 2
report_to = ["tensorboard"]
output = "{out}"
"#,
            model = fixture("llama").display(),
            data = data.display(),
            out = out.display(),
        ),
    )
    .expect("spec");
    // Killed after step 3 (checkpoint at 2): step 3 is in the first event file
    // and is trained again after the resume.
    let crashed = train(&spec, &["--halt-after-step", "3"]);
    assert_eq!(
        crashed.status.code(),
        Some(86),
        "{}",
        String::from_utf8_lossy(&crashed.stderr)
    );
    let resumed = train(&spec, &["--resume"]);
    assert!(
        resumed.status.success(),
        "{}",
        String::from_utf8_lossy(&resumed.stderr)
    );
    let run_dir = out.join("runs/tb");
    let files = std::fs::read_dir(&run_dir).expect("runs/tb").count();
    assert_eq!(files, 2, "one event file per process");

    let got = scalars(&run_dir, &dir.path().join("scalars.json"));
    let want = expected(&out);
    for tag in [
        "train/loss",
        "train/rewards/accuracies",
        "train/rewards/margins",
        "train/learning_rate",
        "train/world_size",
        "eval/loss",
        "eval/rewards/accuracies",
    ] {
        assert!(got.contains_key(tag), "{tag} missing: {:?}", got.keys());
    }
    assert_eq!(
        got["train/loss"].iter().map(|p| p.0).collect::<Vec<_>>(),
        [1, 2, 3, 4, 5],
        "each step once"
    );
    assert_eq!(got, want, "the event files say what the JSON lines say");
}

/// The coordinator's restart after it appended an evaluation it never recorded:
/// the evaluation leaves `eval.jsonl`, and TensorBoard shows it once it is
/// reported again — every train step still once.
#[test]
fn an_evaluation_never_recorded_is_dropped_when_the_writer_restarts() {
    let dir = tempdir();
    let out = dir.path();
    let events = out.join("runs/x");
    let line = |step: u64, key: &str, v: f64| {
        vec![("step".to_string(), step as f64), (key.to_string(), v)]
    };
    let mut old = dpo_data::tensorboard::EventWriter::create(&events, 0).expect("events");
    let mut metrics = String::new();
    let mut evals = String::new();
    for step in 1..=5u64 {
        let m = line(step, "loss", 1.0 / step as f64);
        metrics += &dpo_data::metrics_log::line(&m);
        old.scalars(&m).expect("write");
        if step % 2 == 0 || step == 5 {
            // Step 5's evaluation is the one the crash left unrecorded.
            let e = line(step, "eval_loss", 2.0 / step as f64);
            evals += &dpo_data::metrics_log::line(&e);
            old.scalars(&e).expect("write");
        }
    }
    drop(old);
    std::fs::write(out.join("metrics.jsonl"), metrics).expect("write");
    std::fs::write(out.join("eval.jsonl"), evals).expect("write");
    std::thread::sleep(std::time::Duration::from_millis(5));

    // The run's record says evaluations through step 4.
    let out_dir = dpo_data::confined::Dir::open(out, false).expect("output");
    dpo_data::metrics_log::settle_evaluations(&out_dir, 4, Some(&events)).expect("settle");
    let kept: Vec<u64> = read_jsonl(&out.join("eval.jsonl"))
        .iter()
        .filter_map(|l| l["step"].as_u64())
        .collect();
    assert_eq!(kept, [2, 4]);
    // The evaluation of step 5 is reported again, once.
    let events_dir = dpo_data::confined::Dir::open(&events, false).expect("events");
    dpo_data::tensorboard::append(&events_dir, 6, &line(5, "eval_loss", 0.4)).expect("append");
    let got = scalars(&events, &out.join("scalars.json"));
    let steps = |tag: &str| got[tag].iter().map(|p| p.0).collect::<Vec<_>>();
    assert_eq!(steps("train/loss"), [1, 2, 3, 4, 5]);
    assert_eq!(steps("eval/loss"), [2, 4, 5]);
    assert_eq!(got["eval/loss"][2].1, 0.4);
    // Nothing to settle: no new file.
    let files = std::fs::read_dir(&events).expect("dir").count();
    dpo_data::metrics_log::settle_evaluations(&out_dir, 5, Some(&events)).expect("settle");
    assert_eq!(std::fs::read_dir(&events).expect("dir").count(), files);
}
