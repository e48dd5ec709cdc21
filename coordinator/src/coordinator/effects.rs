//! The effects runner: one task applies, in the order the engine decided
//! them, the store writes, metrics and TensorBoard appends, ledger files and
//! lease revocations the engine's decisions call for.

use std::path::Path;
use std::sync::{Arc, Mutex};

use dpo_proto::v1;
use tokio::sync::{mpsc, oneshot};

use super::{Batch, Outside, lock};
use crate::engine::{self, Effect, Engine, Now, Refusal, Result};
use crate::store::Store;

/// Applies batches of effects in the order they were queued. A write the store
/// did not take for now is tried again before anything after it (the
/// simulator's store-failure seeds found that catching up afterwards lost
/// ledger entries); a write it refuses for good (too large, over quota, not
/// permitted) fails its run with the store's reason instead of being retried
/// forever: the engine decides the failure, and its effects join the queue.
pub(super) async fn apply_effects(
    outside: Arc<Outside>,
    mut rx: mpsc::UnboundedReceiver<Batch>,
    engine: Arc<Mutex<Engine>>,
    queue: mpsc::UnboundedSender<Batch>,
) {
    while let Some((effects, done)) = rx.recv().await {
        let mut committed = true;
        let mut failure: Option<Refusal> = None;
        let mut refused: Vec<(String, String)> = Vec::new();
        let mut unsaved = false;
        for effect in effects {
            let (run, output) = match &effect {
                Effect::Store { run, .. } => (run.clone(), false),
                Effect::RecordEnd { run, .. } => (Some(run.clone()), false),
                Effect::AppendMetrics { run, .. } => (Some(run.clone()), true),
                _ => (None, false),
            };
            let result = if matches!(effect, Effect::Store { .. } | Effect::RecordEnd { .. }) {
                // A write the store did not take (unreachable past its own
                // retries) is tried again, and nothing decided after it is
                // applied first: the store only ever holds a prefix of the
                // engine's decisions (a record never counts a step whose
                // ledger entry a failed write lost; a checkpoint never
                // commits ahead of the record). The coordinator's leader
                // lease bounds how long this can wait.
                let mut wait = std::time::Duration::from_millis(250);
                loop {
                    match apply(&outside, effect.clone()).await {
                        Err(Refusal::Store(se)) if !se.is_permanent() => {
                            tracing::warn!(error = %se, "the state store did not take a write; trying it again before anything decided after it");
                            tokio::time::sleep(wait).await;
                            wait = (wait * 2).min(std::time::Duration::from_secs(5));
                        }
                        other => break other,
                    }
                }
            } else {
                apply(&outside, effect).await
            };
            match result {
                Ok(c) => committed &= c,
                Err(e) => {
                    tracing::error!(error = %e, "applying the coordinator's decision");
                    match (&e, run) {
                        (Refusal::Store(se), Some(run)) if se.is_permanent() => {
                            refused.push((
                                run,
                                format!("the state store refused the run's state: {se}"),
                            ));
                        }
                        (Refusal::Internal(why), Some(run)) if output => {
                            refused.push((run, format!("cannot write the run's output: {why}")));
                        }
                        // Missed for now (etcd unreachable past the retries):
                        // written again below. A permanent refusal without a
                        // run to fail would only be refused again.
                        (Refusal::Store(se), _) if !se.is_permanent() => unsaved = true,
                        _ => {}
                    }
                    failure.get_or_insert(e);
                }
            }
        }
        // What the engine decides about a failure joins the queue; nobody waits.
        let decide = |what: &str, f: &dyn Fn(&mut Engine) -> Result<()>| {
            let mut engine = lock(&engine);
            if let Err(e) = f(&mut engine) {
                tracing::error!(error = %e, "{what}");
            }
            let (tx, _) = oneshot::channel();
            let _ = queue.send((engine.take_effects(), tx));
        };
        if unsaved {
            // The store missed writes (it was unreachable past the retries):
            // write the engine's state again, after whatever is queued.
            decide("planning the store's catch-up", &|e| e.persist_all());
        }
        for (run, reason) in refused {
            decide("failing a run the store refused", &|e| {
                e.fail_run(&run, reason.clone(), Now::system())
            });
        }
        // Answered after the engine knows: whoever waited sees the run failed.
        let _ = done.send(match failure {
            Some(e) => Err(e),
            None => Ok(committed),
        });
    }
}

/// Applies one effect; `Ok(false)` for a fenced write that did not commit.
async fn apply(outside: &Outside, effect: Effect) -> Result<bool> {
    match effect {
        Effect::Store { fence, writes, .. } => Ok(outside.store.apply(fence, writes).await?),
        Effect::RecordEnd {
            writes,
            then_delete,
            ..
        } => {
            outside.store.record_end(writes).await?;
            if let Err(e) = outside.store.delete_prefix(&then_delete).await {
                // The end is recorded; the leftover keys are read by nobody.
                tracing::warn!(prefix = then_delete, error = %e, "could not delete an ended run's keys");
            }
            Ok(true)
        }
        Effect::AppendMetrics {
            path,
            metrics,
            events,
            ..
        } => {
            let shown = path.display().to_string();
            tokio::task::spawn_blocking(move || {
                append_metrics(&path, &metrics).map_err(|e| format!("{shown}: {e}"))?;
                if let Some((dir, first_step)) = events {
                    dpo_data::confined::Dir::open(&dir, true)
                        .and_then(|d| dpo_data::tensorboard::append(&d, first_step, &metrics))
                        .map_err(|e| format!("{}: {e}", dir.display()))?;
                }
                Ok::<_, String>(())
            })
            .await
            .map_err(|e| Refusal::Internal(e.to_string()))?
            .map_err(Refusal::Internal)?;
            Ok(true)
        }
        Effect::WriteLedger {
            prefix,
            path,
            trailer,
        } => {
            if let Err(e) = write_ledger(&outside.store, &prefix, &path, &trailer).await {
                tracing::warn!(path = %path.display(), error = %e, "could not write ledger.jsonl");
            }
            Ok(true)
        }
        Effect::RevokeLease(lease) => {
            outside.store.revoke(lease).await;
            Ok(true)
        }
        Effect::Send { worker, kind } => {
            let tx = lock(&outside.streams)
                .get(&worker)
                .map(|(_, tx)| tx.clone());
            if let Some(tx) = tx
                && let Err(e) = tx.try_send(Ok(v1::Assignment { kind: Some(kind) }))
            {
                tracing::warn!(worker, error = %e, "could not send an assignment");
            }
            Ok(true)
        }
        Effect::Emit { run, event } => {
            if let Some(tx) = lock(&outside.watchers).get(&run) {
                let _ = tx.send(event);
            }
            Ok(true)
        }
        Effect::EndWatch { run } => {
            lock(&outside.watchers).remove(&run);
            Ok(true)
        }
        Effect::RemoveRunFiles(_) if outside.keep_run_files => Ok(true),
        Effect::RemoveRunFiles(dir) => {
            match tokio::fs::remove_dir_all(&dir).await {
                Ok(()) => {
                    tracing::info!(dir = %dir.display(), "removed an ended run's uploads and shards")
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!(dir = %dir.display(), error = %e, "could not remove an ended run's files")
                }
            }
            Ok(true)
        }
    }
}

/// Appends one line to a metrics file (created when missing): a regular file
/// in the folder the submit resolved, reached through no symbolic link
/// ([`dpo_data::confined::open_beneath`]).
fn append_metrics(path: &Path, metrics: &[(String, f64)]) -> std::io::Result<()> {
    let mut f = dpo_data::confined::open_beneath(path, dpo_data::confined::Access::Append)?;
    dpo_data::metrics_log::append(&mut f, metrics)
}

/// Writes every ledger entry under `prefix` to `path`, one JSON line each in
/// step order, reading the store a page at a time.
async fn write_ledger(
    store: &Store,
    prefix: &str,
    path: &Path,
    trailer: &[String],
) -> anyhow::Result<()> {
    const PAGE: usize = 1000;
    let mut text = String::new();
    let mut after: Option<String> = None;
    let mut last_step = 0u64;
    loop {
        let page = store.list_page(prefix, after.as_deref(), PAGE).await?;
        for (_, v) in &page {
            for e in engine::read_ledger_value(v) {
                // Keys sort by step; an earlier version's segments may overlap.
                if e.step > last_step {
                    last_step = e.step;
                    text.push_str(&serde_json::to_string(&e)?);
                    text.push('\n');
                }
            }
        }
        match page.last() {
            Some((k, _)) if page.len() == PAGE => after = Some(k.clone()),
            _ => break,
        }
    }
    for line in trailer {
        text.push_str(line);
        text.push('\n');
    }
    let (Some(dir), Some(name)) = (path.parent(), path.file_name().and_then(|n| n.to_str())) else {
        anyhow::bail!("{}: not a folder and a file name", path.display());
    };
    use std::io::Write;
    dpo_data::confined::Dir::open(dir, true)?.replace(name, |f| f.write_all(text.as_bytes()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_are_never_written_through_a_link_swapped_in_after_submit() -> std::io::Result<()> {
        use std::os::unix::fs::symlink;
        let dir = tempfile::tempdir()?;
        let root = dir.path().canonicalize()?;
        let m = [("step".to_string(), 1.0)];
        let out = root.join("out");
        std::fs::create_dir(&out)?;
        append_metrics(&out.join("metrics.jsonl"), &m)?;
        assert_eq!(
            std::fs::read_to_string(out.join("metrics.jsonl"))?
                .lines()
                .count(),
            1
        );
        // The output folder replaced by a link to a folder outside.
        let outside = root.join("outside");
        std::fs::create_dir(&outside)?;
        let swapped = root.join("swapped");
        symlink(&outside, &swapped)?;
        let err = append_metrics(&swapped.join("metrics.jsonl"), &m).expect_err("refused");
        assert!(
            err.to_string()
                .contains("without following a symbolic link"),
            "{err}"
        );
        assert!(!outside.join("metrics.jsonl").exists());
        // Also when the output does not exist yet, below a swapped folder.
        assert!(dpo_data::confined::Dir::open(&swapped.join("new/deeper"), true).is_err());
        assert!(!outside.join("new").exists());
        // metrics.jsonl itself a link to another file.
        let victim = root.join("victim.jsonl");
        std::fs::write(&victim, "private\n")?;
        let out2 = root.join("out2");
        std::fs::create_dir(&out2)?;
        symlink(&victim, out2.join("metrics.jsonl"))?;
        assert!(append_metrics(&out2.join("metrics.jsonl"), &m).is_err());
        assert_eq!(std::fs::read_to_string(&victim)?, "private\n");
        Ok(())
    }
}
