//! The causal-LM task as the one loop drives it: [`TrainingRun`] for
//! [`Trainer`], mostly the trainer's own methods, with paths the coordinator
//! names read through the held output folder.

use std::path::{Path, PathBuf};

use dpo_data::Example;
use dpo_data::refcache;
use dpo_proto::RunSpec;

use super::{Evaluation, Metrics, RankState, RunOutput, Started, Trainer, TrainingRun};
use crate::collective::Collective;
use crate::error::Result;

fn numel(params: &[(String, tch::Tensor)]) -> u64 {
    params.iter().map(|(_, t)| t.numel() as u64).sum()
}

impl TrainingRun for Trainer {
    fn spec(&self) -> &RunSpec {
        &self.spec
    }

    fn world(&self) -> &RankState {
        &self.world
    }

    fn world_mut(&mut self) -> &mut RankState {
        &mut self.world
    }

    fn total_steps(&self) -> u64 {
        self.shape.total_steps
    }

    fn output(&self) -> &RunOutput {
        &self.out
    }

    fn has_eval(&self) -> bool {
        self.shape.has_eval
    }

    fn writes_metrics(&self) -> bool {
        self.writes_metrics && self.world.collective.rank() == 0
    }

    fn started(&self) -> Started {
        Started {
            start_step: self.world.state.step,
            total_steps: self.shape.total_steps,
            train_examples: self.shape.train_report.as_ref().map(|r| r.examples),
            eval_examples: self.shape.eval_report.as_ref().map(|r| r.examples),
            trained_parameters: numel(&self.policy.trainable_parameters()),
            // The base from its config (a sharded base holds a share only).
            total_parameters: self.policy.config().num_parameters().max(0) as u64
                + self.policy.adapters().map_or(0, |(store, _)| {
                    numel(&store.variables().into_iter().collect::<Vec<_>>())
                }),
            ..Started::default()
        }
    }

    fn set_collective(&mut self, collective: Box<dyn Collective>, generation: u64) {
        self.world.collective = collective;
        self.generation = generation;
    }

    fn restore_checkpoint(&mut self, dir: &Path) -> Result<()> {
        // Read through the held output folder, not by the name.
        let dir = self.out.resolve(dir);
        Trainer::restore_checkpoint(self, &dir)
    }

    fn restore_initial(&mut self) -> Result<()> {
        crate::model::checkpoint::load_weights(&self.policy, &self.spec.model.path)?;
        self.reset_adapters()?;
        self.world.set_state(super::TrainerState::default());
        Ok(())
    }

    fn prepare_world(&mut self) -> Result<()> {
        // ZeRO stage 3: this rank's share of the frozen base for this world.
        self.shard_base_for_world()
    }

    fn train_step(&mut self) -> Result<Metrics> {
        Trainer::train_step(self)
    }

    fn maybe_evaluate(&mut self) -> Result<Option<Evaluation>> {
        self.evaluate_if_due()
    }

    fn maybe_checkpoint(&mut self) -> Result<Option<PathBuf>> {
        Ok(Trainer::maybe_checkpoint(self)?.map(|dir| self.out.named_of(&dir)))
    }

    fn prune_checkpoints(&self) -> Result<()> {
        Trainer::prune_checkpoints(self).map(|_| ())
    }

    fn save_final(&self) -> Result<()> {
        Trainer::save_final(self).map(|_| ())
    }

    fn reference_staged(&self) -> bool {
        self.reference.staged()
    }

    fn score_reference(&mut self, examples: &[Example]) -> Result<Vec<(refcache::Key, f32)>> {
        let packing = self.packing();
        self.reference.score_stage(examples, packing)
    }

    fn finish_reference_stage(&mut self) -> Result<()> {
        self.reference.end_stage();
        Ok(self.world.collective.barrier()?)
    }
}
