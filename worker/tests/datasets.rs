//! Datasets as TRL users have them — Parquet from the Hub, `datasets.save_to_disk`
//! folders, JSON arrays, TRL's implicit-prompt records — written by pyarrow and
//! `datasets` themselves (tests/reference/datasets_reference.py), train to the
//! same weights as the same records in JSON lines; TRL's own `extract_prompt`
//! decides the implicit prompts; bad files are named by file and row.

mod common;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use common::{fixture, fixtures, max_weight_diff, read_jsonl, run_python, tempdir};
use dpo_data::records::Layout;
use dpo_data::tagged::{Labels, RawFile, Task};
use dpo_data::{Pair, PairFormat, read_pairs};
use dpo_worker::model::checkpoint::read_tensors;
use serde_json::{Value, json};

/// The converted datasets, written once per test binary.
fn converted() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = fixtures().join("datasets");
        if !dir.join("text.parquet").exists() {
            run_python(
                "tests/reference/datasets_reference.py",
                &[
                    "convert",
                    fixtures().to_str().expect("utf-8"),
                    dir.to_str().expect("utf-8"),
                ],
            );
        }
        dir
    })
}

/// Trains the tiny Qwen2 for two steps on `data` (with `extra` lines in
/// `[data]`); returns the final weights.
fn train(
    dir: &Path,
    name: &str,
    data: &Path,
    extra: &str,
) -> std::collections::BTreeMap<String, tch::Tensor> {
    let out = dir.join(name);
    let spec = format!(
        r#"name = "{name}"
[model]
path = "{model}"
[reference]
path = "same"
[data]
train = "{data}"
shuffle = false
max_length = 512
{extra}
[objective]
loss = "sigmoid"
beta = 0.1
[optim]
name = "sgd"
lr = 2.0
schedule = "constant"
[train]
max_steps = 2
global_batch_size = 4
micro_batch_size = 2
output = "{out}"
"#,
        model = fixture("qwen2").display(),
        data = data.display(),
        out = out.display(),
    );
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, spec).expect("write spec");
    let run = common::train_output(&path, &[]);
    assert!(
        run.status.success(),
        "training on {} failed:\n{}",
        data.display(),
        String::from_utf8_lossy(&run.stderr)
    );
    read_tensors(&out.join("final/model.safetensors")).expect("weights")
}

#[test]
fn parquet_arrow_and_json_datasets_train_to_the_same_weights_as_json_lines() {
    let d = converted();
    let dir = tempdir();
    let initial = read_tensors(&fixture("qwen2").join("model.safetensors")).expect("initial");
    let cases: [(&str, PathBuf, PathBuf, &str); 5] = [
        // Renamed columns, an extra column, several row groups.
        (
            "text-parquet",
            fixtures().join("pairs_text.jsonl"),
            d.join("text.parquet"),
            r#"columns = { prompt = "question", chosen = "good", rejected = "bad" }"#,
        ),
        // UltraFeedback's layout: Hub shards of one split picked by a glob, a
        // text prompt beside whole conversations (the prompt implicit in them).
        (
            "hub-glob",
            fixtures().join("pairs_chat.jsonl"),
            d.join("hub/data/train-*.parquet"),
            "",
        ),
        (
            "save-to-disk",
            fixtures().join("pairs_chat.jsonl"),
            d.join("disk"),
            "",
        ),
        (
            "json-array",
            fixtures().join("pairs_tokens.jsonl"),
            d.join("tokens.json"),
            "",
        ),
        // Implicit text prompts, split as TRL splits them.
        (
            "implicit-text",
            d.join("text_trl.jsonl"),
            d.join("text_implicit.jsonl"),
            "",
        ),
    ];
    for (name, jsonl, other, extra) in cases {
        let base = train(dir.path(), &format!("{name}-jsonl"), &jsonl, "");
        let theirs = train(dir.path(), name, &other, extra);
        let moved = max_weight_diff(&base, &initial);
        let diff = max_weight_diff(&base, &theirs);
        eprintln!("{name:>14}: moved {moved:.2e}, |jsonl - {name}| {diff:.1e}");
        assert!(moved > 1e-3, "{name}: training must move the weights");
        assert_eq!(diff, 0.0, "{name}: same records, same weights");
    }
}

#[test]
fn a_folder_with_several_splits_is_refused_and_a_dataset_dict_names_its_splits() {
    let d = converted();
    let e = read_pairs(&d.join("hub/data"), &Layout::default(), PairFormat::Auto)
        .expect_err("train and test shards together")
        .to_string();
    assert!(e.contains("several splits (test, train)"), "{e}");
    assert!(e.contains("train-*"), "suggests a glob: {e}");
}

/// TRL's `extract_prompt` and ours on records chosen to be awkward.
#[test]
fn implicit_prompts_are_split_exactly_as_trls_extract_prompt() {
    let dir = tempdir();
    let user = |t: &str| json!({"role": "user", "content": t});
    let bot = |t: &str| json!({"role": "assistant", "content": t});
    let records = [
        // The shared start ends mid-word.
        json!({"chosen": "The capital is Paris.", "rejected": "The capital is Parma."}),
        // A space before the first difference belongs to the responses.
        json!({"chosen": "Answer: yes", "rejected": "Answer: no"}),
        // Code points, not bytes.
        json!({"chosen": "Réponse : été chaud", "rejected": "Réponse : étang"}),
        // One response is the other's start: TRL splits one before its end.
        json!({"chosen": "Count: one two", "rejected": "Count: one two three"}),
        // Conversations differing only in the last turn.
        json!({"chosen": [user("Hi"), bot("Hello!"), user("Sky?"), bot("Blue.")],
               "rejected": [user("Hi"), bot("Hello!"), user("Sky?"), bot("Green.")]}),
        // Conversations of different lengths.
        json!({"chosen": [user("Sky?"), bot("Blue.")],
               "rejected": [user("Sky?"), bot("Green."), user("Sure?"), bot("Yes.")]}),
    ];
    let refused = [
        json!({"chosen": "Same answer", "rejected": "Same answer"}),
        json!({"chosen": "Yes, it is", "rejected": "No, it is"}),
        json!({"chosen": [user("a"), bot("b")], "rejected": [user("c"), bot("b")]}),
    ];
    // Text and conversations in two files (one file holds one kind).
    for (kind, records) in [("text", &records[..4]), ("chat", &records[4..])] {
        let src = dir.path().join(format!("implicit-{kind}.jsonl"));
        let lines: Vec<String> = records.iter().map(Value::to_string).collect();
        std::fs::write(&src, lines.join("\n") + "\n").expect("write");
        let trl = dir.path().join(format!("trl-{kind}.jsonl"));
        run_python(
            "tests/reference/datasets_reference.py",
            &[
                "extract",
                src.to_str().expect("utf-8"),
                trl.to_str().expect("utf-8"),
            ],
        );
        let theirs = read_jsonl(&trl);
        let ours = read_pairs(&src, &Layout::default(), PairFormat::Auto).expect("our split");
        assert_eq!(ours.len(), theirs.len());
        for (o, t) in ours.iter().zip(&theirs) {
            let got = match &o.value {
                Pair::Text {
                    prompt,
                    chosen,
                    rejected,
                } => json!({"prompt": prompt, "chosen": chosen, "rejected": rejected}),
                Pair::Chat {
                    prompt,
                    chosen,
                    rejected,
                } => json!({"prompt": prompt, "chosen": chosen, "rejected": rejected}),
                Pair::Tokens { .. } => panic!("not token ids"),
            };
            assert_eq!(&got, t, "{kind} line {}", o.line);
        }
    }
    // Where TRL's prompt would be empty or the responses identical, we refuse.
    for (i, r) in refused.iter().enumerate() {
        let p = dir.path().join(format!("refused{i}.jsonl"));
        std::fs::write(&p, format!("{r}\n")).expect("write");
        let e = read_pairs(&p, &Layout::default(), PairFormat::Auto)
            .expect_err("refused")
            .to_string();
        let reason = if i == 0 {
            "identical"
        } else {
            "must start the same"
        };
        assert!(e.starts_with(&format!("{}:1: ", p.display())), "{e}");
        assert!(e.contains(reason), "{e}");
    }
}

#[test]
fn bad_columnar_files_name_file_row_and_column() {
    let d = converted();
    let err = |name: &str| {
        let p = d.join(name);
        let e = read_pairs(&p, &Layout::default(), PairFormat::Auto)
            .expect_err("bad file")
            .to_string();
        let prefix = format!("{}:", p.display());
        assert!(e.starts_with(&prefix), "names the file: {e}");
        e[prefix.len()..].to_string()
    };
    assert_eq!(err("bad-missing.parquet"), "1: missing key \"rejected\"");
    assert_eq!(
        err("bad-type.parquet"),
        "1: \"chosen\" must be a string, found a number"
    );
    assert_eq!(
        err("bad-null.parquet"),
        "3: \"chosen\" must be a string, found null"
    );
    // Rows 1-6 are read; the third row group (rows 7-9) cannot be.
    let page = d.join("bad-page.parquet");
    let mut read = 0;
    let mut failed = None;
    for row in dpo_data::records::open(&page, &Layout::default(), &[]).expect("opens") {
        match row {
            Ok(r) => {
                assert!(r.value.is_ok());
                read += 1;
            }
            Err(e) => failed = Some(e.to_string()),
        }
    }
    assert_eq!(read, 6);
    let failed = failed.expect("an error");
    assert!(
        failed.starts_with(&format!(
            "{}:7: cannot decode the rows from here on",
            page.display()
        )),
        "{failed}"
    );
    let corrupt = err("bad-corrupt.parquet");
    assert!(
        corrupt.starts_with(" not a readable Parquet file"),
        "{corrupt}"
    );

    // A renamed column the file does not have.
    let layout = Layout {
        columns: [("chosen".to_string(), "good".to_string())].into(),
        ..Layout::default()
    };
    let p = d.join("bad-type.parquet");
    let e = read_pairs(&p, &layout, PairFormat::Auto)
        .expect_err("no column good")
        .to_string();
    assert_eq!(
        e,
        format!(
            "{}:1: missing key \"chosen\" (the file's column \"good\", renamed by data.columns)",
            p.display()
        )
    );

    // A shard's bad row is named in that shard, not by its place in the glob.
    let shards = tempdir();
    for (i, rows) in [3usize, 2].iter().enumerate() {
        let mut text = String::new();
        for r in 0..*rows {
            let bad = i == 1 && r == 1;
            text += &if bad {
                json!({"prompt": "p", "chosen": "c"}).to_string()
            } else {
                json!({"prompt": "p", "chosen": "c", "rejected": "r"}).to_string()
            };
            text += "\n";
        }
        std::fs::write(
            shards.path().join(format!("train-0000{i}-of-00002.jsonl")),
            text,
        )
        .expect("write");
    }
    let spec_err = dpo_data::records::relocate(
        read_pairs(shards.path(), &Layout::default(), PairFormat::Auto).expect_err("bad shard"),
        shards.path(),
        &Layout::default(),
    );
    assert_eq!(
        spec_err.to_string(),
        format!(
            "{}:2: missing key \"rejected\"",
            shards.path().join("train-00001-of-00002.jsonl").display()
        )
    );
}

#[test]
fn labelled_examples_and_negatives_read_the_same_from_parquet() {
    let d = converted();
    let read = |name: &str| {
        let (records, skipped) =
            dpo_data::examples::read_labelled(&d.join(name), &Layout::default(), false)
                .expect("reads");
        assert!(skipped.is_empty());
        records
    };
    let jsonl = read("labelled.jsonl");
    assert!(jsonl.iter().any(|r| r.label == Some(false)));
    assert_eq!(jsonl.len(), 2 * 11);
    assert_eq!(read("labelled.parquet"), jsonl);
}

/// The run's labels, in this order.
fn labels(names: &[&str]) -> Labels {
    Labels::new(names.iter().map(|s| s.to_string()).collect()).expect("labels")
}

/// The NER records of `p`, resolved against `labels`.
fn ner_records(p: &Path, labels: &Labels) -> Vec<dpo_data::tagged::Record> {
    RawFile::read(p, Task::Token, &Layout::default())
        .expect("reads")
        .resolve(labels)
        .expect("resolves")
}

#[test]
fn ner_from_parquet_and_save_to_disk_with_class_labels_equals_json_lines() {
    let d = converted();
    let ordered = labels(&["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]);
    let read = |p: &Path| {
        ner_records(p, &ordered)
            .into_iter()
            .map(|r| (r.id, r.words, r.gold))
            .collect::<Vec<_>>()
    };
    let jsonl = read(&d.join("ner.jsonl"));
    assert_eq!(jsonl.len(), 3);
    // `ner_tags` are ClassLabel ids in these files: they come out as names.
    assert_eq!(read(&d.join("ner/train.parquet")), jsonl);
    assert_eq!(read(&d.join("ner/disk")), jsonl);
    // Without the features, the ids would index the run's labels in their
    // order: a different order must not change what the tags mean.
    let shuffled = labels(&["I-LOC", "O", "B-LOC", "B-PER", "I-PER"]);
    let names = |p: &Path| {
        ner_records(p, &shuffled)
            .into_iter()
            .map(|r| {
                r.gold
                    .iter()
                    .map(|&g| shuffled.name(g).expect("label").to_string())
                    .collect::<Vec<_>>()
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(
        names(&d.join("ner/train.parquet")),
        names(&d.join("ner.jsonl"))
    );
}
