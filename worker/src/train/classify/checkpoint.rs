//! Checkpoints of a classification run: `checkpoints/step-N/` with the model
//! (an HF directory), the AdamW state, the trainer state (step, early stopping,
//! the best evaluation) and, for adversarial negatives, the weights of the
//! epoch's start they are mined with — sealed by a manifest of checksums like the
//! causal LMs' — and the
//! resume that continues from one exactly: the data order is a function of the
//! seed and epoch, dropout masks of the seed, step and micro-batch.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tch::Tensor;

use super::ClassifierTrainer;
use crate::error::{Error, Result, TorchContext, io_err};
use crate::model::checkpoint as model_io;
use crate::train::checkpoint::{seal_checkpoint, step_dirs};
use crate::train::verify_manifest;

/// `trainer_state.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct State {
    step: u64,
    /// Early stopping (checkpoints written before the one loop name its
    /// fields `best_metric` and `bad_evals`; both are read).
    #[serde(flatten)]
    stopping: crate::train::EarlyStopping,
    /// The epoch whose mining weights `miner.safetensors` holds (adversarial).
    #[serde(default)]
    miner_epoch: Option<u64>,
}

const MINER: &str = "miner.safetensors";

impl ClassifierTrainer {
    pub(super) fn checkpoints_dir(&self) -> PathBuf {
        self.out.checkpoints()
    }

    /// Writes `checkpoints/step-N` for the current step (every rank calls
    /// it: under ZeRO each writes its share of the optimizer state; rank 0
    /// writes the rest and returns the directory).
    pub(super) fn write_checkpoint(&mut self) -> Result<Option<PathBuf>> {
        let root = self.checkpoints_dir();
        let tmp = root.join(format!(".step-{}.tmp", self.world.state.step));
        if self.world.rank() == 0 {
            if tmp.exists() {
                std::fs::remove_dir_all(&tmp).map_err(io_err(&tmp))?;
            }
            std::fs::create_dir_all(&tmp).map_err(io_err(&tmp))?;
        }
        if !self.world.write_optimizer(&tmp)? {
            return Ok(None);
        }
        if self.model.adapters().is_some() {
            // A LoRA run's checkpoint holds the adapters and the head; the
            // frozen base is the model's.
            self.model
                .save_adapter(&tmp.join("adapter"), &self.spec.model.path)?;
        } else {
            self.model
                .save(&tmp.join("model"), Some(&self.tokenizer_dir), 5 << 30)?;
        }
        if let Some(miner) = &self.miner {
            let named: Vec<(String, Tensor)> = self
                .world
                .optimizer
                .names()
                .iter()
                .cloned()
                .zip(miner.params.iter().map(Tensor::shallow_clone))
                .collect();
            model_io::write_tensors(&tmp.join(MINER), &named)?;
        }
        let state = State {
            step: self.world.state.step,
            stopping: self.world.state.stopping,
            miner_epoch: self.miner.as_ref().map(|m| m.epoch),
        };
        let value = serde_json::to_value(&state).map_err(|e| Error::Input {
            context: "trainer state".into(),
            reason: e.to_string(),
        })?;
        model_io::write_json(&tmp.join("trainer_state.json"), &value)?;
        seal_checkpoint(&tmp, &root, self.world.state.step).map(Some)
    }

    /// Keeps the newest `train.save_total_limit` checkpoints (rank 0); called
    /// once the newest is committed, so the one a restart resumes from stays.
    pub fn prune_checkpoints(&self) -> Result<()> {
        let keep = self.spec.train.save_total_limit;
        if keep == 0 || self.world.collective.rank() != 0 {
            return Ok(());
        }
        let mut all = step_dirs(&self.checkpoints_dir())?;
        all.sort_by_key(|(s, _)| std::cmp::Reverse(*s));
        for (_, old) in all.into_iter().skip(keep as usize) {
            std::fs::remove_dir_all(&old).map_err(io_err(&old))?;
            tracing::info!(dir = %self.out.named_of(&old).display(), keep, "removed an old checkpoint (train.save_total_limit)");
        }
        Ok(())
    }

    /// Continues from checkpoint `dir`: weights, AdamW state, trainer state and
    /// mined negatives, after checking every file against the manifest.
    pub(super) fn restore(&mut self, dir: &Path) -> Result<()> {
        verify_manifest(dir)?;
        let state: State = serde_json::from_value(model_io::read_json(
            &dir.join("trainer_state.json"),
        )?)
        .map_err(|e| Error::Config {
            path: dir.join("trainer_state.json"),
            reason: e.to_string(),
        })?;
        let device = self.model.device();
        if self.model.adapters().is_some() {
            self.model.load_adapter(&dir.join("adapter"))?;
        } else {
            let weights = model_io::read_tensors(&dir.join("model").join("model.safetensors"))?;
            {
                let _guard = tch::no_grad_guard();
                for (name, var) in self.model.var_store().variables() {
                    let saved = weights.get(&name).ok_or_else(|| Error::MissingTensor {
                        dir: dir.join("model"),
                        name: name.clone(),
                    })?;
                    if saved.size() != var.size() {
                        return Err(Error::TensorShape {
                            path: dir.join("model/model.safetensors"),
                            name,
                            expected: var.size(),
                            found: saved.size(),
                        });
                    }
                    var.shallow_clone()
                        .f_copy_(saved)
                        .op("restoring a parameter")?;
                }
            }
        }
        // Whatever share this rank held is replaced by the checkpoint's.
        self.world.restore_optimizer(dir, state.step, device)?;
        self.miner = match state.miner_epoch {
            Some(epoch) => {
                let path = dir.join(MINER);
                let saved = model_io::read_tensors(&path)?;
                let mut params = Vec::with_capacity(saved.len());
                for name in self.world.optimizer.names() {
                    let t = saved.get(name).ok_or_else(|| Error::MissingTensor {
                        dir: path.clone(),
                        name: name.clone(),
                    })?;
                    params.push(t.f_to_device(device).op("mining weights to the device")?);
                }
                Some(super::Miner { epoch, params })
            }
            None => None,
        };
        self.world.restore_state(crate::train::TrainerState {
            step: state.step,
            stopping: state.stopping,
            evaluated_step: state.step,
        });
        tracing::info!(step = self.world.state.step, dir = %dir.display(), "resumed from checkpoint");
        Ok(())
    }
}
