//! Start-up recovery: the runs, generations and checkpoints the store holds
//! are loaded back into the engine, each unfinished run's shards reopened and
//! its output trimmed to what was recorded; and the sweep of ended runs' files.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;

use super::{Coordinator, Outside, Settings, apply_effects, load_shards, lock, store_read};
use crate::engine::{self, Engine, Now};
use crate::store::{GENERATION_KEY, Store};

impl Coordinator {
    /// Opens the coordinator on `store`, reloading unfinished runs and their shards.
    pub async fn open(store: Store, settings: Settings) -> anyhow::Result<Arc<Self>> {
        // What the engine is rebuilt from: the generation, the history and
        // every key of the unfinished runs.
        let mut stored = std::collections::BTreeMap::new();
        if let Some(g) = store_read("the generation", store.get(GENERATION_KEY).await)? {
            stored.insert(GENERATION_KEY.to_string(), g);
        }
        stored.extend(store_read(
            "run history",
            store.list(engine::HISTORY_PREFIX).await,
        )?);
        stored.extend(store_read("runs", store.list(engine::RUN_PREFIX).await)?);
        let cache_root = settings.data_dir.join("reference");
        let engine = Engine::recover(settings.lease_ttl, &stored, |record| {
            let data = load_shards(record, &cache_root)
                .map_err(|e| crate::engine::DataGone(e.to_string()))?;
            // Everything below the output is reached through a handle of
            // the folder the submit resolved, through no link.
            let output = &record.spec.train.output;
            let events = record
                .spec
                .train
                .tensorboard()
                .then(|| dpo_data::tensorboard::run_dir(output, &record.spec.name));
            let settled = dpo_data::confined::Dir::open(output, false).and_then(|out| {
                dpo_data::metrics_log::keep_through_in(&out, "metrics.jsonl", record.step)?;
                dpo_data::metrics_log::settle_evaluations(&out, record.eval_step, events.as_deref())
            });
            match settled {
                Ok(()) => {}
                // Never started: nothing to trim.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!(output = %output.display(), error = %e, "could not trim metrics.jsonl and eval.jsonl");
                }
            }
            tracing::info!(run = %record.id, step = record.step, "resuming run from the store");
            Ok(data)
        })?;
        let (queue, rx) = mpsc::unbounded_channel();
        let outside = Arc::new(Outside {
            store,
            streams: Mutex::new(HashMap::new()),
            watchers: Mutex::new(HashMap::new()),
            keep_run_files: !settings.run_files_retention.is_zero(),
        });
        let engine = Arc::new(Mutex::new(engine));
        tokio::spawn(apply_effects(
            outside.clone(),
            rx,
            engine.clone(),
            queue.clone(),
        ));
        let coordinator = Arc::new(Coordinator {
            settings,
            engine,
            outside,
            queue,
            swept: Mutex::default(),
        });
        // Records of an earlier version move their ledger out (queued by restore).
        coordinator.run(|_, _| Ok(())).await?;
        coordinator.sweep_run_files(true).await;
        Ok(coordinator)
    }

    /// Removes the uploads and shards of runs that ended longer ago than the
    /// retention; with `orphans` (at start, when no submission is in flight),
    /// also every directory under `data-dir/runs` that belongs to no known run
    /// (a submission the process died in).
    pub async fn sweep_run_files(&self, orphans: bool) {
        let now = Now::system().unix_ms;
        let keep = i64::try_from(self.settings.run_files_retention.as_millis()).unwrap_or(i64::MAX);
        let swept = lock(&self.swept).clone();
        let (mut dirs, known) = self.read(|e| {
            let expired: Vec<(String, PathBuf)> = e
                .records()
                .filter(|r| r.state.terminal() && r.finished_ms.saturating_add(keep) <= now)
                .filter(|r| !swept.contains(&r.id))
                .map(|r| (r.id.clone(), r.shard_dir.clone()))
                .collect();
            let known: std::collections::HashSet<String> =
                e.records().map(|r| r.id.clone()).collect();
            (expired, known)
        });
        if orphans && let Ok(entries) = std::fs::read_dir(self.settings.data_dir.join("runs")) {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if !known.contains(&name) {
                    dirs.push((name, entry.path()));
                }
            }
        }
        for (id, dir) in dirs {
            match tokio::fs::remove_dir_all(&dir).await {
                Ok(()) => {
                    tracing::info!(dir = %dir.display(), "removed a run's uploads and shards")
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!(dir = %dir.display(), error = %e, "could not remove a run's files");
                    continue;
                }
            }
            lock(&self.swept).insert(id);
        }
    }
}
