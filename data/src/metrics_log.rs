//! `metrics.jsonl` and `eval.jsonl`: one JSON object per step, metric names in the
//! order they are reported, `step`, `generation` and `world_size` as integers.
//! Written by the standalone trainer and by the coordinator alike.

use std::io::Write;
use std::path::Path;

use crate::confined::Dir;

/// One line (with its newline) for `metrics`.
pub fn line(metrics: &[(String, f64)]) -> String {
    let mut obj = serde_json::Map::new();
    for (k, v) in metrics {
        let value = if matches!(k.as_str(), "step" | "generation" | "world_size") {
            serde_json::json!(*v as u64)
        } else {
            serde_json::json!(v)
        };
        obj.insert(k.clone(), value);
    }
    let mut line = serde_json::Value::Object(obj).to_string();
    line.push('\n');
    line
}

/// Appends one line to an open file and flushes it.
pub fn append(file: &mut impl Write, metrics: &[(String, f64)]) -> std::io::Result<()> {
    file.write_all(line(metrics).as_bytes())?;
    file.flush()
}

/// The `step` of a metrics line (`None`: not a line with a step).
pub fn step_of(line: &[u8]) -> Option<u64> {
    serde_json::from_slice::<serde_json::Value>(line)
        .ok()
        .and_then(|v| v.get("step").and_then(serde_json::Value::as_u64))
}

/// The lines of `text` whose `step` is at most `step` (`None`: all of them).
fn kept_through(text: &str, step: u64) -> Option<String> {
    let mut kept = String::new();
    for line in text.lines() {
        if step_of(line.as_bytes()).is_some_and(|s| s <= step) {
            kept.push_str(line);
            kept.push('\n');
        }
    }
    (kept.len() != text.len()).then_some(kept)
}

/// Keeps only the lines whose `step` is at most `step` (a missing file is fine):
/// what a resumed run, or a restarted coordinator, has not recorded goes. The file
/// is replaced atomically (written beside it, fsynced, renamed).
pub fn keep_through(path: &Path, step: u64) -> std::io::Result<()> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    match kept_through(&text, step) {
        Some(kept) => crate::atomic::write(path, kept.as_bytes()),
        None => Ok(()),
    }
}

/// The largest metrics file the coordinator reads back (a run's output is the
/// client's folder: what lies there is not trusted to be small).
pub const MAX_READ_BACK: u64 = 1 << 30;

/// [`keep_through`] for the file `name` in a confined folder.
pub fn keep_through_in(dir: &Dir, name: &str, step: u64) -> std::io::Result<()> {
    let Some(text) = dir.read_text(name, MAX_READ_BACK)? else {
        return Ok(());
    };
    match kept_through(&text, step) {
        Some(kept) => dir.replace(name, |f| f.write_all(kept.as_bytes())),
        None => Ok(()),
    }
}

/// The lines of a metrics text whose `step` is at least `from`, as metrics
/// (numbers only).
fn lines_from(text: &str, from: u64) -> Vec<Vec<(String, f64)>> {
    text.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v.get("step").and_then(serde_json::Value::as_u64) >= Some(from))
        .filter_map(|v| {
            v.as_object().map(|o| {
                o.iter()
                    .filter_map(|(k, v)| v.as_f64().map(|x| (k.clone(), x)))
                    .collect()
            })
        })
        .collect()
}

/// The lines of a metrics file whose `step` is at least `from`, as metrics
/// (numbers only); a missing file has none.
pub fn read_from(path: &Path, from: u64) -> std::io::Result<Vec<Vec<(String, f64)>>> {
    match std::fs::read_to_string(path) {
        Ok(t) => Ok(lines_from(&t, from)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e),
    }
}

/// For the writer that records a run's steps (the coordinator), once more
/// after a restart, with the run's recorded evaluation `eval_step`: an
/// evaluation appended to `eval.jsonl` but never recorded (the writer died in
/// between) will be reported again, so it goes from the file; with TensorBoard
/// events in `events`, this process's event file starts at that evaluation's
/// step (TensorBoard drops the orphan) and first rewrites the recorded train
/// steps from there, read back from `metrics.jsonl`, which it would drop too.
/// Everything is opened through `output`'s handle and `events` is walked to
/// through no link.
pub fn settle_evaluations(
    output: &Dir,
    eval_step: u64,
    events: Option<&Path>,
) -> std::io::Result<()> {
    let eval = output
        .read_text("eval.jsonl", MAX_READ_BACK)?
        .unwrap_or_default();
    let orphan = lines_from(&eval, eval_step + 1)
        .iter()
        .filter_map(|m| m.iter().find(|(k, _)| k == "step").map(|(_, v)| *v as u64))
        .min();
    let Some(orphan) = orphan else {
        return Ok(());
    };
    tracing::info!(path = %output.path().join("eval.jsonl").display(), step = orphan, "dropping an evaluation that was never recorded");
    keep_through_in(output, "eval.jsonl", eval_step)?;
    if let Some(dir) = events {
        let metrics = output
            .read_text("metrics.jsonl", MAX_READ_BACK)?
            .unwrap_or_default();
        let train = lines_from(&metrics, orphan);
        crate::tensorboard::restart(&Dir::open(dir, true)?, orphan, &train)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integers_stay_integers_and_truncation_keeps_earlier_steps() -> std::io::Result<()> {
        let m = |s: f64| vec![("step".to_string(), s), ("loss".to_string(), 0.5)];
        assert_eq!(line(&m(3.0)), "{\"step\":3,\"loss\":0.5}\n");
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("metrics.jsonl");
        let mut f = std::fs::File::create(&path)?;
        for s in 1..=5 {
            append(&mut f, &m(s as f64))?;
        }
        keep_through(&path, 3)?;
        let text = std::fs::read_to_string(&path)?;
        assert_eq!(text.lines().count(), 3);
        assert!(text.ends_with("{\"step\":3,\"loss\":0.5}\n"));
        keep_through(&dir.path().join("missing.jsonl"), 1)?;
        Ok(())
    }
}
