//! Keeping the ranks of a classification world identical: metric sums
//! added in rank order, and `sync_world` — the furthest-ahead rank's
//! parameters, AdamW moments, early-stopping state and mining weights
//! broadcast to the others when a world (re)forms.

use serde_json::json;

use super::objective::Sums;
use super::{ClassifierTrainer, Miner};
use crate::error::{Error, Result, TorchContext};

impl ClassifierTrainer {
    /// Adds every rank's sums (exactly: the f64 values travel as bytes).
    pub(super) fn sum_across_ranks(&mut self, mine: Sums) -> Result<Sums> {
        if self.collective.world_size() == 1 {
            return Ok(mine);
        }
        let fields = |s: &Sums| {
            [
                s.ce,
                s.negative,
                s.p_gold,
                s.p_negative,
                s.targets,
                s.negatives,
                s.correct,
            ]
        };
        let bytes: Vec<u8> = fields(&mine).iter().flat_map(|v| v.to_le_bytes()).collect();
        let all = self.collective.all_gather(&bytes)?;
        let mut total = Sums::default();
        for b in all {
            let v: Vec<f64> = b
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
                .collect();
            if v.len() != 7 {
                return Err(Error::Input {
                    context: "collective".into(),
                    reason: format!("a rank sent {} metric values, expected 7", v.len()),
                });
            }
            total.add(&Sums {
                ce: v[0],
                negative: v[1],
                p_gold: v[2],
                p_negative: v[3],
                targets: v[4],
                negatives: v[5],
                correct: v[6],
            });
        }
        Ok(total)
    }

    /// Brings every rank of a (new) world to the same state: the ranks compare
    /// (step, parameter hash); if they differ, the lowest rank among those
    /// furthest ahead sends its parameters, AdamW moments and trainer state.
    /// Returns that root.
    pub fn sync_world(&mut self) -> Result<Option<usize>> {
        if self.collective.world_size() == 1 {
            return Ok(None);
        }
        let mut mine = self.step.to_le_bytes().to_vec();
        mine.extend(crate::train::sync::parameter_hash(self.optimizer.params())?.to_le_bytes());
        let all = self.collective.all_gather(&mine)?;
        if all.iter().any(|b| b.len() != 16) {
            return Err(Error::Input {
                context: "collective".into(),
                reason: "malformed state summary from a peer".into(),
            });
        }
        if all.iter().all(|b| *b == all[0]) {
            return Ok(None);
        }
        let step_of = |b: &[u8]| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[..8]);
            u64::from_le_bytes(a)
        };
        let max = all.iter().map(|b| step_of(b)).max().unwrap_or(0);
        let root = all.iter().position(|b| step_of(b) == max).unwrap_or(0);
        let mut state = serde_json::to_value(self.stopping).map_err(|e| Error::Input {
            context: "training state".into(),
            reason: e.to_string(),
        })?;
        state["step"] = json!(self.step);
        let got = self
            .collective
            .broadcast(state.to_string().as_bytes(), root)?;
        let state: serde_json::Value = serde_json::from_slice(&got).map_err(|e| Error::Input {
            context: format!("training state from rank {root}"),
            reason: e.to_string(),
        })?;
        self.step = state
            .get("step")
            .and_then(serde_json::Value::as_u64)
            .unwrap_or(0);
        self.stopping = serde_json::from_value(state).map_err(|e| Error::Input {
            context: format!("training state from rank {root}"),
            reason: e.to_string(),
        })?;
        let params: Vec<tch::Tensor> = self
            .optimizer
            .params()
            .iter()
            .map(tch::Tensor::shallow_clone)
            .collect();
        crate::collective::broadcast_tensors(&params, root, self.collective.as_mut())?;
        self.optimizer.step = self.step;
        if self.step > 0 {
            let moments = self.optimizer.moments_mut()?;
            crate::collective::broadcast_tensors(&moments, root, self.collective.as_mut())?;
        }
        if self.adversarial() {
            // The epoch's mining weights: a rank that joins mid-epoch mines
            // with the same ones.
            let epoch = self.step / self.steps_per_epoch.max(1);
            let params = match self.miner.take() {
                Some(m) if m.epoch == epoch => m.params,
                _ => self
                    .optimizer
                    .params()
                    .iter()
                    .map(|p| p.f_zeros_like())
                    .collect::<std::result::Result<Vec<_>, _>>()
                    .op("room for the mining weights")?,
            };
            crate::collective::broadcast_tensors(&params, root, self.collective.as_mut())?;
            self.miner = Some(Miner { epoch, params });
        }
        tracing::info!(
            rank = self.collective.rank(),
            root,
            step = self.step,
            "synchronised training state"
        );
        Ok(Some(root))
    }
}
