//! Keeping the ranks of a world identical: the training state they exchange
//! (`TrainerState`, the same value a checkpoint stores), metric sums added in
//! rank order, parameter hashes compared, and `sync_world` — the furthest-ahead
//! rank's state broadcast to the others when a world (re)forms.

use serde::{Deserialize, Serialize};
use tch::Tensor;

use super::Trainer;
use crate::collective::{CollectiveError, broadcast_tensors};
use crate::error::{Error, Result, TorchContext};
use crate::objective::Stats;

/// How often (in steps) ranks compare parameter hashes.
pub(super) const PARAMETER_CHECK_EVERY: u64 = 25;

/// Where a run stands, besides its tensors: what a checkpoint's
/// `trainer_state.json` holds and what `sync_world` broadcasts. The optimizer's
/// step count always equals `step` (it steps exactly once per step).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimizer steps completed (this fixes the data cursor: the order is a
    /// function of the seed and the epoch).
    pub step: u64,
    /// Early stopping: the best eval loss so far and evaluations since it.
    #[serde(rename = "best_eval_loss")]
    pub best_eval: Option<f64>,
    #[serde(rename = "evals_without_improvement", default)]
    pub bad_evals: u64,
    #[serde(default)]
    pub stopped_early: bool,
}

impl Trainer {
    /// The state to checkpoint or send.
    pub(super) fn state(&self) -> TrainerState {
        self.state.clone()
    }

    /// Takes `state` (the optimizer's step count with it).
    pub(super) fn set_state(&mut self, state: TrainerState) {
        self.optimizer.step = state.step;
        self.state = state;
    }

    /// Adds every rank's metric sums, in rank order (so every rank gets the same bits).
    pub(super) fn sum_across_ranks(&mut self, stats: &Stats) -> Result<Stats> {
        if self.collective.world_size() == 1 {
            return Ok(stats.clone());
        }
        let bytes: Vec<u8> = stats
            .to_vec()
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        let blocks = self.collective.all_gather(&bytes)?;
        let mut total = vec![0.0f64; stats.to_vec().len()];
        for block in blocks {
            for (t, b) in total.iter_mut().zip(block.chunks_exact(8)) {
                let mut a = [0u8; 8];
                a.copy_from_slice(b);
                *t += f64::from_le_bytes(a);
            }
        }
        Ok(Stats::from_slice(&total))
    }

    /// A cheap hash (FNV-1a) of every parameter's bytes.
    fn parameter_hash(&self) -> Result<u64> {
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        for p in self.optimizer.params() {
            let t = p
                .f_detach()
                .and_then(|t| t.f_to_device(tch::Device::Cpu))
                .and_then(|t| t.f_contiguous())
                .op("parameter hash")?;
            let n = t.numel();
            let mut bytes = vec![0u8; n * t.kind().elt_size_in_bytes()];
            t.f_copy_data_u8(&mut bytes, n).op("parameter hash")?;
            for b in bytes {
                hash = (hash ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
            }
        }
        Ok(hash)
    }

    /// Fails loudly if the ranks' parameters are no longer identical (compared by a
    /// hash of their bytes).
    pub(super) fn check_parameters_agree(&mut self, step: u64) -> Result<()> {
        if self.collective.world_size() == 1 {
            return Ok(());
        }
        let hash = self.parameter_hash()?;
        let hashes = self.collective.all_gather(&hash.to_le_bytes())?;
        if hashes.iter().any(|h| h.as_slice() != hash.to_le_bytes()) {
            return Err(Error::Diverged { step, hashes });
        }
        Ok(())
    }

    /// Makes this rank's training state that of rank `root`: parameters, optimizer
    /// moments and step, position in the run and early-stopping state.
    pub fn sync_from(&mut self, root: usize) -> Result<()> {
        if self.collective.world_size() == 1 {
            return Ok(());
        }
        let mine = serde_json::to_vec(&self.state()).map_err(|e| CollectiveError::Protocol {
            rank: self.collective.rank(),
            reason: format!("encoding the training state: {e}"),
        })?;
        let got = self.collective.broadcast(&mine, root)?;
        let state: TrainerState =
            serde_json::from_slice(&got).map_err(|e| CollectiveError::Protocol {
                rank: self.collective.rank(),
                reason: format!("state from rank {root}: {e}"),
            })?;
        self.set_state(state);
        let params: Vec<Tensor> = self
            .optimizer
            .params()
            .iter()
            .map(Tensor::shallow_clone)
            .collect();
        broadcast_tensors(&params, root, self.collective.as_mut())?;
        if self.optimizer.step > 0 {
            let moments = self.optimizer.moments_mut()?;
            broadcast_tensors(&moments, root, self.collective.as_mut())?;
        }
        tracing::info!(
            rank = self.collective.rank(),
            root,
            step = self.state.step,
            "synchronised training state"
        );
        Ok(())
    }

    /// Brings every rank of a (new) world to the same state: the ranks compare
    /// (steps completed, parameter hash); if they differ, the lowest rank among those
    /// furthest ahead sends its state to the others (a joiner, or a survivor that
    /// missed the last step of a broken generation). Returns that root.
    pub fn sync_world(&mut self) -> Result<Option<usize>> {
        if self.collective.world_size() == 1 {
            return Ok(None);
        }
        let mut mine = self.state.step.to_le_bytes().to_vec();
        mine.extend(self.parameter_hash()?.to_le_bytes());
        let all = self.collective.all_gather(&mine)?;
        let step_of = |b: &[u8]| -> u64 {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[..8.min(b.len())]);
            u64::from_le_bytes(a)
        };
        if all.iter().any(|b| b.len() != 16) {
            return Err(CollectiveError::Protocol {
                rank: self.collective.rank(),
                reason: "malformed state summary from a peer".into(),
            }
            .into());
        }
        if all.iter().all(|b| *b == all[0]) {
            return Ok(None);
        }
        let max = all.iter().map(|b| step_of(b)).max().unwrap_or(0);
        let root = all.iter().position(|b| step_of(b) == max).unwrap_or(0);
        self.sync_from(root)?;
        Ok(Some(root))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_state_reads_checkpoints_of_earlier_versions_and_round_trips() {
        // trainer_state.json as earlier versions wrote it (no stopped_early).
        let old = r#"{"step": 12, "data_cursor": {"epoch": 1, "batch_in_epoch": 4, "seed": 3},
                      "best_eval_loss": 0.25, "evals_without_improvement": 2}"#;
        let s: TrainerState = serde_json::from_str(old).expect("an old checkpoint's state");
        assert_eq!(
            s,
            TrainerState {
                step: 12,
                best_eval: Some(0.25),
                bad_evals: 2,
                stopped_early: false
            }
        );
        let back: TrainerState =
            serde_json::from_slice(&serde_json::to_vec(&s).expect("json")).expect("reads back");
        assert_eq!(back, s);
        // The broadcast form is the checkpoint form: the same key names.
        let v = serde_json::to_value(&s).expect("json");
        assert_eq!(v["best_eval_loss"], 0.25);
        assert_eq!(v["evals_without_improvement"], 2);
    }
}
