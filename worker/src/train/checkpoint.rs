//! Checkpoints and the output directory: `checkpoints/step-N/` holds the model,
//! the optimizer state, `trainer_state.json` (a [`TrainerState`] with the data
//! cursor) and a manifest of SHA-256 checksums, written under a temporary name,
//! fsynced and renamed; resume verifies the manifest first. Rank 0 owns the
//! output directory.
//!
//! The optimizer state is `optimizer.safetensors` (whole tensors), or under
//! ZeRO `optimizer/`: each rank writes its own share
//! (`rank-R-of-W.safetensors`, tensors named like the whole ones but holding
//! one piece each) and rank 0 writes `partition.json`, which says which
//! elements of which parameter each file holds. No rank ever holds more than
//! its share to write a checkpoint; a resume reads only the pieces its new
//! partition gives it (any world size), or assembles whole tensors when it
//! will not shard.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use super::Trainer;
use super::rank_state::TrainerState;
use crate::error::{Error, Result, TorchContext, io_err};
use crate::model::checkpoint;

/// Shards above this size are split, as transformers does by default.
const MAX_SHARD_BYTES: u64 = 5 * 1024 * 1024 * 1024;

impl Trainer {
    fn checkpoints_dir(&self) -> PathBuf {
        self.out.checkpoints()
    }

    /// Creates the output directory, refusing to mix two runs in one directory.
    pub(super) fn prepare_output(&mut self, resume: bool) -> Result<()> {
        let out = self.out.io();
        if self.world.collective.rank() != 0 {
            // Rank 0 owns the output directory; the others only read checkpoints.
            if resume && let Some((_, dir)) = latest_checkpoint(&self.checkpoints_dir())? {
                self.restore_checkpoint(&dir)?;
            }
            return Ok(());
        }
        let latest = latest_checkpoint(&self.checkpoints_dir())?;
        let metrics = out.join("metrics.jsonl");
        if resume {
            if let Some((_, dir)) = latest {
                self.restore_checkpoint(&dir)?;
                let step = self.world.state.step;
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
                context: self.out.named().display().to_string(),
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
        if self.policy.adapters().is_some() {
            // A LoRA run's checkpoint holds the adapters; the base is the model's.
            crate::model::peft::load_adapter(
                &self.policy,
                &dir.join("adapter"),
                &dir.display().to_string(),
            )?;
        } else {
            checkpoint::load_weights(&self.policy, &dir.join("model"))?;
        }
        // Whatever share this rank held is replaced by the checkpoint's.
        let device = self.policy.device();
        self.world.restore_optimizer(dir, state.step, device)?;
        self.world.restore_state(state);
        Ok(())
    }

    /// Rank 0 writes a checkpoint when `checkpoint_every` calls for one (every
    /// rank calls this: under ZeRO they all contribute their optimizer state).
    pub fn maybe_checkpoint(&mut self) -> Result<Option<PathBuf>> {
        let step = self.world.state.step;
        let ck = self.spec.train.checkpoint_every;
        if !(ck > 0
            && step % ck == 0
            && step < self.shape.total_steps
            && !self.world.state.stopping.stopped_early)
        {
            return Ok(None);
        }
        // Under ZeRO every rank writes its share into rank 0's directory.
        let tag = if self.world.zero.is_some() {
            format!("zero-{}", self.generation)
        } else {
            std::process::id().to_string()
        };
        let tmp = if self.world.rank() == 0 {
            self.checkpoint_tmp(step, &tag)?
        } else {
            self.checkpoints_dir()
                .join(format!(".step-{step}.tmp-{tag}"))
        };
        if !self.world.write_optimizer(&tmp)? {
            return Ok(None);
        }
        self.commit_checkpoint(step, &tmp).map(Some)
    }

    /// A fresh temporary directory for the checkpoint of `step`.
    fn checkpoint_tmp(&self, step: u64, tag: &str) -> Result<PathBuf> {
        let root = self.checkpoints_dir();
        std::fs::create_dir_all(&root).map_err(io_err(&root))?;
        let tmp = root.join(format!(".step-{step}.tmp-{tag}"));
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(io_err(&tmp))?;
        }
        std::fs::create_dir_all(&tmp).map_err(io_err(&tmp))?;
        Ok(tmp)
    }

    /// Removes all but the newest `train.save_total_limit` checkpoints (none
    /// when it is 0). Call it once the newest is committed (standalone: once
    /// it is written; in a cluster: once the coordinator committed it), so
    /// the checkpoint a restart resumes from is never among those removed.
    /// Returns what was removed.
    pub fn prune_checkpoints(&self) -> Result<Vec<PathBuf>> {
        let keep = self.spec.train.save_total_limit;
        if keep == 0 || self.world.collective.rank() != 0 {
            return Ok(Vec::new());
        }
        let root = self.checkpoints_dir();
        let mut all = step_dirs(&root)?;
        all.sort_by_key(|(step, _)| std::cmp::Reverse(*step));
        let mut removed = Vec::new();
        for (_, dir) in all.into_iter().skip(keep as usize) {
            std::fs::remove_dir_all(&dir).map_err(io_err(&dir))?;
            tracing::info!(dir = %self.out.named_of(&dir).display(), keep, "removed an old checkpoint (train.save_total_limit)");
            removed.push(dir);
        }
        Ok(removed)
    }

    /// Rank 0 writes the final model under `train.output/final` (whole or
    /// not at all).
    pub fn save_final(&self) -> Result<Option<PathBuf>> {
        if self.world.collective.rank() != 0 {
            return Ok(None);
        }
        let base = &self.spec.model.path;
        let dir = self.out.publish("final", |dir| match &self.spec.lora {
            Some(lora) if self.policy.adapters().is_some() => {
                // PEFT's format; with `merge`, also the base with the adapters in.
                crate::model::peft::save_adapter(&self.policy, dir, base)?;
                if lora.merge {
                    let merged = self.policy.merged_parameters()?;
                    checkpoint::save_tensors(
                        &self.policy,
                        &merged,
                        &dir.join("merged"),
                        Some(base),
                        MAX_SHARD_BYTES,
                    )?;
                }
                Ok(())
            }
            _ => checkpoint::save(&self.policy, dir, Some(base), MAX_SHARD_BYTES),
        })?;
        Ok(Some(dir))
    }

    /// Completes `checkpoints/step-N` from `tmp` (which holds the optimizer
    /// state): the model, the trainer state and a manifest of SHA-256
    /// checksums, fsynced, then renamed into place.
    fn commit_checkpoint(&self, step: u64, tmp: &Path) -> Result<PathBuf> {
        let root = self.checkpoints_dir();
        if self.policy.adapters().is_some() {
            crate::model::peft::save_adapter(
                &self.policy,
                &tmp.join("adapter"),
                &self.spec.model.path,
            )?;
        } else {
            checkpoint::save(
                &self.policy,
                &tmp.join("model"),
                Some(&self.spec.model.path),
                MAX_SHARD_BYTES,
            )?;
        }
        let spe = self.shape.steps_per_epoch.max(1);
        let mut state = serde_json::to_value(self.world.state()).map_err(|e| Error::Input {
            context: "trainer state".into(),
            reason: e.to_string(),
        })?;
        // The data cursor, for people: the step alone fixes it.
        state["data_cursor"] =
            json!({"epoch": step / spe, "batch_in_epoch": step % spe, "seed": self.spec.data.seed});
        checkpoint::write_json(&tmp.join("trainer_state.json"), &state)?;
        seal_checkpoint(tmp, &root, step)
    }
}

/// Seals a checkpoint written into `tmp`: a manifest of SHA-256 checksums of
/// every file, everything fsynced, then renamed to `root/step-N`.
pub(crate) fn seal_checkpoint(tmp: &Path, root: &Path, step: u64) -> Result<PathBuf> {
    let mut files = serde_json::Map::new();
    for rel in list_files(tmp)? {
        files.insert(rel.clone(), Value::String(sha256_file(&tmp.join(&rel))?));
    }
    checkpoint::write_json(
        &tmp.join("manifest.json"),
        &json!({"step": step, "files": files}),
    )?;
    for sub in ["model", "adapter"] {
        if tmp.join(sub).is_dir() {
            sync_dir(&tmp.join(sub))?;
        }
    }
    sync_dir(tmp)?;
    let dir = root.join(format!("step-{step}"));
    if dir.exists() {
        std::fs::remove_dir_all(&dir).map_err(io_err(&dir))?;
    }
    dpo_data::atomic::rename(tmp, &dir).map_err(io_err(&dir))?;
    tracing::debug!(step, dir = %dir.display(), "checkpoint sealed");
    Ok(dir)
}

pub(crate) fn remove_if_exists(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io_err(path)(e)),
        _ => Ok(()),
    }
}

/// Keeps only the lines of a metrics file whose `step` is at most `step`.
pub(crate) fn truncate_jsonl(path: &Path, step: u64) -> Result<()> {
    dpo_data::metrics_log::keep_through(path, step).map_err(io_err(path))
}

/// Every `checkpoints/step-N` directory under `root`, with its step.
pub(crate) fn step_dirs(root: &Path) -> Result<Vec<(u64, PathBuf)>> {
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

pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    dpo_data::atomic::sync_dir(dir).map_err(io_err(dir))
}

/// The file in a sharded checkpoint's `optimizer/` that says which pieces
/// each rank's file holds.
pub(crate) const PARTITION_FILE: &str = "partition.json";

/// The optimizer state of checkpoint `dir` by name (`exp_avg.NAME`,
/// `exp_avg_sq.NAME`, `master.NAME`): `optimizer.safetensors`, or a sharded
/// checkpoint's pieces assembled (flattened tensors). For tools and tests.
pub fn read_optimizer_state(dir: &Path) -> Result<BTreeMap<String, tch::Tensor>> {
    let shards = dir.join("optimizer");
    if !shards.join(PARTITION_FILE).exists() {
        return checkpoint::read_tensors(&dir.join("optimizer.safetensors"));
    }
    let sharded = ShardedState::open(&shards)?;
    let names: Vec<String> = sharded.elements.keys().cloned().collect();
    let all: Vec<(usize, i64, i64)> = names
        .iter()
        .enumerate()
        .map(|(i, n)| (i, 0, sharded.elements[n] as i64))
        .collect();
    Ok(sharded
        .read_pieces(&names, &all)?
        .into_iter()
        .map(|(kind, i, t)| (format!("{kind}.{}", names[i]), t))
        .collect())
}

/// The name of rank `rank`'s share in a sharded checkpoint.
pub(crate) fn shard_file(rank: usize, world: usize) -> String {
    format!("rank-{rank:05}-of-{world:05}.safetensors")
}

pub(crate) fn to_device(
    tensors: BTreeMap<String, tch::Tensor>,
    device: tch::Device,
) -> Result<BTreeMap<String, tch::Tensor>> {
    tensors
        .into_iter()
        .map(|(k, t)| t.f_to_device(device).map(|t| (k, t)))
        .collect::<std::result::Result<BTreeMap<_, _>, _>>()
        .op("optimizer state to device")
}

/// A sharded checkpoint's optimizer state: which pieces each rank's file holds.
#[derive(Debug)]
pub(crate) struct ShardedState {
    pub(crate) dir: PathBuf,
    /// The world that wrote it.
    pub(crate) world: usize,
    /// Elements of each parameter, by name (to refuse another model's state).
    elements: BTreeMap<String, u64>,
    /// Per rank: its file and its pieces `(parameter name, offset, len)`.
    ranks: Vec<(PathBuf, Vec<NamedPiece>)>,
}

/// `(parameter name, offset, len)`: elements of a flattened parameter.
type NamedPiece = (String, i64, i64);

/// A piece's values being assembled, and how many of them were filled.
type Filling = Option<(Vec<f32>, i64)>;

/// The optimizer state kinds a checkpoint may hold for a piece.
const KINDS: [&str; 3] = ["exp_avg", "exp_avg_sq", "master"];

impl ShardedState {
    /// Reads `dir/partition.json`; errors name the file and what is wrong.
    pub(crate) fn open(dir: &Path) -> Result<Self> {
        let path = dir.join(PARTITION_FILE);
        let bad = |reason: String| Error::Config {
            path: path.clone(),
            reason,
        };
        let v = checkpoint::read_json(&path)?;
        let world = v
            .get("world")
            .and_then(Value::as_u64)
            .filter(|&w| w > 0)
            .ok_or_else(|| bad("missing or zero world".into()))? as usize;
        let elements: BTreeMap<String, u64> = v
            .get("elements")
            .and_then(Value::as_object)
            .ok_or_else(|| bad("missing object elements".into()))?
            .iter()
            .map(|(k, n)| {
                n.as_u64()
                    .map(|n| (k.clone(), n))
                    .ok_or_else(|| bad(format!("elements.{k} is not a count")))
            })
            .collect::<Result<_>>()?;
        let ranks = v
            .get("ranks")
            .and_then(Value::as_array)
            .filter(|r| r.len() == world)
            .ok_or_else(|| bad(format!("ranks must list the {world} ranks")))?;
        let mut out = Vec::with_capacity(world);
        for (r, entry) in ranks.iter().enumerate() {
            let file = entry
                .get("file")
                .and_then(Value::as_str)
                .filter(|f| *f == shard_file(r, world))
                .ok_or_else(|| bad(format!("ranks[{r}].file must be {}", shard_file(r, world))))?;
            let pieces = entry
                .get("pieces")
                .and_then(Value::as_array)
                .ok_or_else(|| bad(format!("ranks[{r}].pieces missing")))?;
            let mut list = Vec::with_capacity(pieces.len());
            for (k, p) in pieces.iter().enumerate() {
                let name = p.get("name").and_then(Value::as_str);
                let offset = p.get("offset").and_then(Value::as_i64);
                let len = p.get("len").and_then(Value::as_i64);
                let (Some(name), Some(offset), Some(len)) = (name, offset, len) else {
                    return Err(bad(format!(
                        "ranks[{r}].pieces[{k}] needs name, offset and len"
                    )));
                };
                let size = elements.get(name).copied().unwrap_or(0) as i64;
                if offset < 0 || len <= 0 || offset + len > size {
                    return Err(bad(format!(
                        "ranks[{r}].pieces[{k}]: elements {offset}..{} of {name} ({size} elements)",
                        offset + len
                    )));
                }
                list.push((name.to_string(), offset, len));
            }
            out.push((dir.join(file), list));
        }
        Ok(ShardedState {
            dir: dir.to_path_buf(),
            world,
            elements,
            ranks: out,
        })
    }

    /// The state of `wanted` (`(parameter index, offset, len)` of `params`,
    /// named `names`), by kind: `(kind, parameter index, f32 values)` for
    /// every kind the checkpoint holds for the piece. Reads only the files
    /// whose pieces overlap `wanted`; every element of a kind it holds must
    /// be there.
    pub(crate) fn pieces(
        &self,
        names: &[String],
        params: &[tch::Tensor],
        wanted: &[(usize, i64, i64)],
    ) -> Result<Vec<(&'static str, usize, tch::Tensor)>> {
        let partition = self.dir.join(PARTITION_FILE);
        for (name, p) in names.iter().zip(params) {
            if self.elements.get(name) != Some(&(p.numel() as u64)) {
                return Err(Error::Config {
                    path: partition.clone(),
                    reason: format!(
                        "parameter {name} has {} elements in this model, {:?} in the checkpoint",
                        p.numel(),
                        self.elements.get(name)
                    ),
                });
            }
        }
        self.read_pieces(names, wanted)
    }

    /// [`ShardedState::pieces`] without checking the names against a model.
    fn read_pieces(
        &self,
        names: &[String],
        wanted: &[(usize, i64, i64)],
    ) -> Result<Vec<(&'static str, usize, tch::Tensor)>> {
        let partition = self.dir.join(PARTITION_FILE);
        // Per wanted piece and kind: the values and how many were filled.
        let mut buffers: Vec<[Filling; 3]> = wanted.iter().map(|_| [None, None, None]).collect();
        for (file, pieces) in &self.ranks {
            let overlaps = |(w, &(i, off, len)): (usize, &(usize, i64, i64))| {
                pieces.iter().filter_map(move |(name, o, l)| {
                    let (from, to) = ((*o).max(off), (o + l).min(off + len));
                    (*name == names[i] && from < to).then_some((w, *o, from, to))
                })
            };
            let hits: Vec<(usize, i64, i64, i64)> =
                wanted.iter().enumerate().flat_map(overlaps).collect();
            if hits.is_empty() {
                continue;
            }
            let tensors = checkpoint::read_tensors(file)?;
            for (w, source_offset, from, to) in hits {
                let (i, off, len) = wanted[w];
                for (k, kind) in KINDS.iter().enumerate() {
                    let Some(t) = tensors.get(&format!("{kind}.{}", names[i])) else {
                        continue;
                    };
                    let values = t
                        .f_reshape([-1])
                        .and_then(|t| t.f_narrow(0, from - source_offset, to - from))
                        .and_then(|t| t.f_to_kind(tch::Kind::Float))
                        .op("sharded optimizer state")
                        .and_then(|t| Vec::<f32>::try_from(&t).op("sharded optimizer state"))
                        .map_err(|_| Error::Config {
                            path: file.clone(),
                            reason: format!(
                                "{kind}.{} does not hold elements {from}..{to}",
                                names[i]
                            ),
                        })?;
                    let (buf, filled) =
                        buffers[w][k].get_or_insert_with(|| (vec![0.0; len as usize], 0));
                    let at = (from - off) as usize;
                    buf[at..at + values.len()].copy_from_slice(&values);
                    *filled += to - from;
                }
            }
        }
        let mut out = Vec::new();
        for (w, kinds) in buffers.into_iter().enumerate() {
            let (i, off, len) = wanted[w];
            for (k, slot) in kinds.into_iter().enumerate() {
                let Some((values, filled)) = slot else {
                    continue;
                };
                if filled != len {
                    return Err(Error::Config {
                        path: partition.clone(),
                        reason: format!(
                            "the files hold {filled} of elements {off}..{} of {}.{}",
                            off + len,
                            KINDS[k],
                            names[i]
                        ),
                    });
                }
                let t = tch::Tensor::f_from_slice(&values).op("sharded optimizer state")?;
                out.push((KINDS[k], i, t));
            }
        }
        Ok(out)
    }

    /// Whole tensors (`KIND.NAME`, shaped like the parameters), for a rank
    /// that will not shard (a world of one, or ZeRO off).
    pub(crate) fn whole(
        &self,
        names: &[String],
        params: &[tch::Tensor],
    ) -> Result<BTreeMap<String, tch::Tensor>> {
        let all: Vec<(usize, i64, i64)> = params
            .iter()
            .enumerate()
            .map(|(i, p)| (i, 0, p.numel() as i64))
            .collect();
        let mut out = BTreeMap::new();
        for (kind, i, t) in self.pieces(names, params, &all)? {
            let t = t
                .f_view(params[i].size().as_slice())
                .op("sharded optimizer state")?;
            out.insert(format!("{kind}.{}", names[i]), t);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sharded(dir: &Path, pieces: Value, values: &[f32]) {
        let shards = dir.join("optimizer");
        std::fs::create_dir_all(&shards).expect("dir");
        let t = tch::Tensor::from_slice(values);
        checkpoint::write_tensors(
            &shards.join(shard_file(0, 1)),
            &[("exp_avg.w".to_string(), t)],
        )
        .expect("write");
        checkpoint::write_json(
            &shards.join(PARTITION_FILE),
            &json!({"world": 1, "elements": {"w": 5},
                    "ranks": [{"file": shard_file(0, 1), "pieces": pieces}]}),
        )
        .expect("write");
    }

    #[test]
    fn a_sharded_state_that_misses_elements_or_points_outside_is_refused() {
        let dir = tempfile::tempdir().expect("dir");
        // The one rank's file holds elements 0..3 of 5: 3..5 are missing.
        sharded(
            dir.path(),
            json!([{"name": "w", "offset": 0, "len": 3}]),
            &[1.0, 2.0, 3.0],
        );
        let e = read_optimizer_state(dir.path()).expect_err("missing elements");
        assert!(
            e.to_string()
                .contains("the files hold 3 of elements 0..5 of exp_avg.w"),
            "{e}"
        );
        // A piece beyond the parameter's elements.
        sharded(
            dir.path(),
            json!([{"name": "w", "offset": 3, "len": 4}]),
            &[1.0, 2.0, 3.0, 4.0],
        );
        let e = read_optimizer_state(dir.path()).expect_err("out of range");
        assert!(
            e.to_string().contains("partition.json")
                && e.to_string().contains("elements 3..7 of w"),
            "{e}"
        );
        // Whole: read back exactly.
        sharded(
            dir.path(),
            json!([{"name": "w", "offset": 0, "len": 5}]),
            &[1.0, 2.0, 3.0, 4.0, 5.0],
        );
        let got = read_optimizer_state(dir.path()).expect("whole");
        assert_eq!(
            Vec::<f32>::try_from(&got["exp_avg.w"]).expect("values"),
            vec![1.0, 2.0, 3.0, 4.0, 5.0]
        );
    }
}
