//! Checkpoints and the output directory: `checkpoints/step-N/` holds the model,
//! the optimizer state, `trainer_state.json` (a [`TrainerState`] with the data
//! cursor) and a manifest of SHA-256 checksums, written under a temporary name,
//! fsynced and renamed; resume verifies the manifest first. Rank 0 owns the
//! output directory.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use super::Trainer;
use super::sync::TrainerState;
use crate::error::{Error, Result, TorchContext, io_err};
use crate::model::checkpoint;

/// Shards above this size are split, as transformers does by default.
const MAX_SHARD_BYTES: u64 = 5 * 1024 * 1024 * 1024;

impl Trainer {
    fn checkpoints_dir(&self) -> PathBuf {
        self.output().join("checkpoints")
    }

    /// Creates the output directory, refusing to mix two runs in one directory.
    pub(super) fn prepare_output(&mut self, resume: bool) -> Result<()> {
        let out = self.output().to_path_buf();
        if self.collective.rank() != 0 {
            // Rank 0 owns the output directory; the others only read checkpoints.
            if resume && let Some((_, dir)) = latest_checkpoint(&self.checkpoints_dir())? {
                self.restore_checkpoint(&dir)?;
            }
            return Ok(());
        }
        std::fs::create_dir_all(&out).map_err(io_err(&out))?;
        let latest = latest_checkpoint(&self.checkpoints_dir())?;
        let metrics = out.join("metrics.jsonl");
        if resume {
            if let Some((_, dir)) = latest {
                self.restore_checkpoint(&dir)?;
                let step = self.state.step;
                truncate_jsonl(&metrics, step)?;
                truncate_jsonl(&out.join("eval.jsonl"), step)?;
                tracing::info!(step, dir = %dir.display(), "resumed from checkpoint");
            } else {
                tracing::info!("no checkpoint to resume from; starting at step 0");
                remove_if_exists(&metrics)?;
                remove_if_exists(&out.join("eval.jsonl"))?;
            }
        } else if latest.is_some() || metrics.exists() {
            return Err(Error::Input {
                context: out.display().to_string(),
                reason: "this output directory already holds a run: pass --resume to continue it, or set train.output to a new directory".into(),
            });
        }
        let run = json!({
            "spec": serde_json::to_value(&self.spec).unwrap_or(Value::Null),
            "data": {"train": &self.shape.train_report, "eval": &self.shape.eval_report},
            "steps_per_epoch": self.shape.steps_per_epoch,
            "total_steps": self.shape.total_steps,
        });
        checkpoint::write_json(&out.join("run.json"), &run)
    }

    /// Loads the checkpoint `dir` (weights, optimizer state, step, early-stopping
    /// state) after verifying its manifest.
    pub fn restore_checkpoint(&mut self, dir: &Path) -> Result<()> {
        verify_manifest(dir)?;
        let path = dir.join("trainer_state.json");
        let state: TrainerState =
            serde_json::from_value(checkpoint::read_json(&path)?).map_err(|e| Error::Config {
                path: path.clone(),
                reason: e.to_string(),
            })?;
        checkpoint::load_weights(&self.policy, &dir.join("model"))?;
        let optim_path = dir.join("optimizer.safetensors");
        let tensors = checkpoint::read_tensors(&optim_path)?;
        let device = self.policy.device();
        let tensors = tensors
            .into_iter()
            .map(|(k, t)| t.f_to_device(device).map(|t| (k, t)))
            .collect::<std::result::Result<BTreeMap<_, _>, _>>()
            .op("optimizer state to device")?;
        self.optimizer.load_state(state.step, tensors)?;
        self.set_state(state);
        Ok(())
    }

    /// Rank 0 writes a checkpoint when `checkpoint_every` calls for one (every
    /// rank calls this: under ZeRO they all contribute their optimizer state).
    pub fn maybe_checkpoint(&mut self) -> Result<Option<PathBuf>> {
        let step = self.state.step;
        let ck = self.spec.train.checkpoint_every;
        if !(ck > 0 && step % ck == 0 && step < self.shape.total_steps && !self.state.stopped_early)
        {
            return Ok(None);
        }
        let optimizer_state = self.optimizer_state()?;
        if self.collective.rank() != 0 {
            return Ok(None);
        }
        self.write_checkpoint(step, &optimizer_state).map(Some)
    }

    /// The whole optimizer state, by checkpoint name (`exp_avg.NAME`,
    /// `exp_avg_sq.NAME`, `master.NAME`). Under ZeRO every rank takes part and
    /// the state is assembled bucket by bucket from the ranks' shares, so a
    /// checkpoint is the same file whatever the partition, and resumes at any
    /// world size.
    fn optimizer_state(&mut self) -> Result<Vec<(String, tch::Tensor)>> {
        let Some(z) = &self.zero else {
            return Ok(self.optimizer.state());
        };
        let pieces = self.optimizer.piece_states(false);
        let mut out = Vec::new();
        for kind in ["exp_avg", "exp_avg_sq", "master"] {
            let whole = z.gather_state(
                self.optimizer.params(),
                &pieces,
                kind,
                self.collective.as_mut(),
            )?;
            let names = self.optimizer.names();
            out.extend(
                whole
                    .into_iter()
                    .map(|(i, t)| (format!("{kind}.{}", names[i]), t)),
            );
        }
        Ok(out)
    }

    /// Removes all but the newest `train.save_total_limit` checkpoints (none
    /// when it is 0). Call it once the newest is committed (standalone: once
    /// it is written; in a cluster: once the coordinator committed it), so
    /// the checkpoint a restart resumes from is never among those removed.
    /// Returns what was removed.
    pub fn prune_checkpoints(&self) -> Result<Vec<PathBuf>> {
        let keep = self.spec.train.save_total_limit;
        if keep == 0 || self.collective.rank() != 0 {
            return Ok(Vec::new());
        }
        let root = self.checkpoints_dir();
        let mut all = step_dirs(&root)?;
        all.sort_by_key(|(step, _)| std::cmp::Reverse(*step));
        let mut removed = Vec::new();
        for (_, dir) in all.into_iter().skip(keep as usize) {
            std::fs::remove_dir_all(&dir).map_err(io_err(&dir))?;
            tracing::info!(dir = %dir.display(), keep, "removed an old checkpoint (train.save_total_limit)");
            removed.push(dir);
        }
        Ok(removed)
    }

    /// Rank 0 writes the final model under `train.output/final`.
    pub fn save_final(&self) -> Result<Option<PathBuf>> {
        if self.collective.rank() != 0 {
            return Ok(None);
        }
        let dir = self.output().join("final");
        checkpoint::save(
            &self.policy,
            &dir,
            Some(&self.spec.model.path),
            MAX_SHARD_BYTES,
        )?;
        Ok(Some(dir))
    }

    /// Writes `checkpoints/step-N`: model, optimizer moments, trainer state and a
    /// manifest of SHA-256 checksums — under a temporary name, fsynced, renamed.
    fn write_checkpoint(
        &self,
        step: u64,
        optimizer_state: &[(String, tch::Tensor)],
    ) -> Result<PathBuf> {
        let root = self.checkpoints_dir();
        std::fs::create_dir_all(&root).map_err(io_err(&root))?;
        let tmp = root.join(format!(".step-{step}.tmp-{}", std::process::id()));
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(io_err(&tmp))?;
        }
        checkpoint::save(
            &self.policy,
            &tmp.join("model"),
            Some(&self.spec.model.path),
            MAX_SHARD_BYTES,
        )?;
        checkpoint::write_tensors(&tmp.join("optimizer.safetensors"), optimizer_state)?;
        let spe = self.shape.steps_per_epoch.max(1);
        let mut state = serde_json::to_value(self.state()).map_err(|e| Error::Input {
            context: "trainer state".into(),
            reason: e.to_string(),
        })?;
        // The data cursor, for people: the step alone fixes it.
        state["data_cursor"] =
            json!({"epoch": step / spe, "batch_in_epoch": step % spe, "seed": self.spec.data.seed});
        checkpoint::write_json(&tmp.join("trainer_state.json"), &state)?;
        let mut files = serde_json::Map::new();
        for rel in list_files(&tmp)? {
            files.insert(rel.clone(), Value::String(sha256_file(&tmp.join(&rel))?));
        }
        checkpoint::write_json(
            &tmp.join("manifest.json"),
            &json!({"step": step, "files": files}),
        )?;
        sync_dir(&tmp.join("model"))?;
        sync_dir(&tmp)?;
        let dir = root.join(format!("step-{step}"));
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(io_err(&dir))?;
        }
        dpo_data::atomic::rename(&tmp, &dir).map_err(io_err(&dir))?;
        tracing::info!(step, dir = %dir.display(), "checkpoint written");
        Ok(dir)
    }
}

fn remove_if_exists(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io_err(path)(e)),
        _ => Ok(()),
    }
}

/// Keeps only the lines of a metrics file whose `step` is at most `step`.
fn truncate_jsonl(path: &Path, step: u64) -> Result<()> {
    dpo_data::metrics_log::keep_through(path, step).map_err(io_err(path))
}

/// Every `checkpoints/step-N` directory under `root`, with its step.
fn step_dirs(root: &Path) -> Result<Vec<(u64, PathBuf)>> {
    if !root.exists() {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    for entry in std::fs::read_dir(root).map_err(io_err(root))? {
        let entry = entry.map_err(io_err(root))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(n) = name
            .strip_prefix("step-")
            .and_then(|n| n.parse::<u64>().ok())
        {
            out.push((n, entry.path()));
        }
    }
    Ok(out)
}

/// The newest `checkpoints/step-N` directory.
pub fn latest_checkpoint(root: &Path) -> Result<Option<(u64, PathBuf)>> {
    Ok(step_dirs(root)?.into_iter().max_by_key(|(n, _)| *n))
}

fn list_files(dir: &Path) -> Result<Vec<String>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).map_err(io_err(&d))? {
            let path = entry.map_err(io_err(&d))?.path();
            if path.is_dir() {
                stack.push(path);
            } else if let Ok(rel) = path.strip_prefix(dir) {
                out.push(rel.to_string_lossy().into_owned());
            }
        }
    }
    out.sort();
    Ok(out)
}

fn sha256_file(path: &Path) -> Result<String> {
    let mut file = File::open(path).map_err(io_err(path))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(io_err(path))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// Checks every file listed in a checkpoint's manifest against its checksum.
pub fn verify_manifest(dir: &Path) -> Result<()> {
    let path = dir.join("manifest.json");
    let manifest = checkpoint::read_json(&path)?;
    let files = manifest
        .get("files")
        .and_then(Value::as_object)
        .ok_or_else(|| Error::Config {
            path: path.clone(),
            reason: "missing object files".into(),
        })?;
    for (rel, want) in files {
        let got = sha256_file(&dir.join(rel))?;
        if Some(got.as_str()) != want.as_str() {
            return Err(Error::Config {
                path: dir.join(rel),
                reason: "checksum does not match the checkpoint manifest (corrupt or partial checkpoint)".into(),
            });
        }
    }
    Ok(())
}

fn sync_dir(dir: &Path) -> Result<()> {
    dpo_data::atomic::sync_dir(dir).map_err(io_err(dir))
}
