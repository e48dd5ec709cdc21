//! What a classification world adds to the shared rank state
//! ([`crate::train::RankState`]): metric sums added in rank order, the
//! epoch's mining weights taken from the root when a world (re)forms, and
//! the way back to the initial weights.

use super::objective::Sums;
use super::{ClassifierTrainer, Miner};
use crate::error::{Error, Result, TorchContext};

impl ClassifierTrainer {
    /// Adds every rank's sums, in rank order (exactly: the f64 values
    /// travel as bytes).
    pub(super) fn sum_across_ranks(&mut self, mine: Sums) -> Result<Sums> {
        let v = self.world.sum_across(&[
            mine.ce,
            mine.negative,
            mine.p_gold,
            mine.p_negative,
            mine.targets,
            mine.negatives,
            mine.correct,
        ])?;
        Ok(Sums {
            ce: v[0],
            negative: v[1],
            p_gold: v[2],
            p_negative: v[3],
            targets: v[4],
            negatives: v[5],
            correct: v[6],
        })
    }

    /// After [`crate::train::run_loop::sync_world`] made `root`'s state
    /// every rank's: adversarial negatives also take the epoch's mining
    /// weights from it, so a rank that joins mid-epoch mines with the same
    /// ones. At an epoch's boundary no rank holds them yet: the epoch's first
    /// step takes them from the weights every rank now shares.
    pub(super) fn sync_miner(&mut self, root: Option<usize>) -> Result<()> {
        let Some(root) = root else {
            return Ok(());
        };
        if !self.adversarial() {
            return Ok(());
        }
        let per_epoch = self.steps_per_epoch.max(1);
        let (step, epoch) = (self.world.state.step, self.world.state.step / per_epoch);
        if step % per_epoch == 0 {
            self.miner = None;
            return Ok(());
        }
        // Mid-epoch the root mined this epoch's earlier steps, so it holds
        // their weights; every rank learns whether it does before any
        // tensor moves, and a world without them stops by name.
        let held = self.miner.as_ref().is_some_and(|m| m.epoch == epoch);
        let said = self.world.collective.broadcast(&[u8::from(held)], root)?;
        if said.first() != Some(&1) {
            return Err(Error::State(
                "the weights of this epoch's adversarial mining are missing on the rank the world takes its state from",
            ));
        }
        let params = match self.miner.take() {
            Some(m) if m.epoch == epoch => m.params,
            _ => self
                .world
                .optimizer
                .params()
                .iter()
                .map(|p| p.f_zeros_like())
                .collect::<std::result::Result<Vec<_>, _>>()
                .op("room for the mining weights")?,
        };
        crate::collective::broadcast_tensors(&params, root, self.world.collective.as_mut())?;
        self.miner = Some(Miner { epoch, params });
        Ok(())
    }

    /// Back to the run's start (a ZeRO share lost before any checkpoint):
    /// the head and adapters drawn again from the seed, the encoder's own
    /// weights read again, step 0.
    pub(super) fn restore_initial(&mut self) -> Result<()> {
        let fresh = super::initial_model(&self.spec, &self.labels, tch::Device::Cpu)?;
        let initial: std::collections::BTreeMap<String, tch::Tensor> =
            fresh.trainable_parameters().into_iter().collect();
        let _guard = tch::no_grad_guard();
        for (name, t) in self.model.trainable_parameters() {
            let from = initial.get(&name).ok_or_else(|| Error::MissingTensor {
                dir: self.spec.model.path.clone(),
                name: name.clone(),
            })?;
            t.shallow_clone()
                .f_copy_(from)
                .op("restoring an initial weight")?;
        }
        self.miner = None;
        self.world.set_state(crate::train::TrainerState::default());
        Ok(())
    }
}
