//! The causal-LM task as the one loop drives it: [`TrainingRun`] for
//! [`Trainer`], mostly the trainer's own methods, with paths the coordinator
//! names read through the held output folder.

use std::path::{Path, PathBuf};

use dpo_data::Example;
use dpo_data::refcache;
use dpo_proto::RunSpec;

use super::{Evaluation, Metrics, RunOutput, Started, Synced, Trainer, TrainingRun};
use crate::collective::Collective;
use crate::error::Result;

fn numel(params: &[(String, tch::Tensor)]) -> u64 {
    params.iter().map(|(_, t)| t.numel() as u64).sum()
}

impl TrainingRun for Trainer {
    fn spec(&self) -> &RunSpec {
        &self.spec
    }

    fn step(&self) -> u64 {
        self.state.step
    }

    fn total_steps(&self) -> u64 {
        self.shape.total_steps
    }

    fn stopped_early(&self) -> bool {
        self.state.stopping.stopped_early
    }

    fn output(&self) -> &RunOutput {
        &self.out
    }

    fn has_eval(&self) -> bool {
        self.shape.has_eval
    }

    fn writes_metrics(&self) -> bool {
        self.writes_metrics && self.collective.rank() == 0
    }

    fn begin(&mut self) -> Result<()> {
        self.sync_from(0)?;
        self.enter_zero()
    }

    fn started(&self) -> Started {
        Started {
            start_step: self.state.step,
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
        self.collective = collective;
        self.generation = generation;
    }

    fn restore_checkpoint(&mut self, dir: &Path) -> Result<()> {
        // Read through the held output folder, not by the name.
        let dir = self.out.resolve(dir);
        Trainer::restore_checkpoint(self, &dir)
    }

    fn sync_world(&mut self, checkpoint: Option<(&Path, u64)>) -> Result<Synced> {
        let held = checkpoint.map(|(dir, step)| (self.out.resolve(dir), step));
        Trainer::sync_world(self, held.as_ref().map(|(d, s)| (d.as_path(), *s)))
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

    fn set_leaving(&mut self, leaving: bool) {
        Trainer::set_leaving(self, leaving);
    }

    fn leavers(&self) -> &[usize] {
        Trainer::leavers(self)
    }

    fn hand_off(&mut self) -> Result<bool> {
        Trainer::hand_off(self)
    }

    fn sharded(&self) -> bool {
        Trainer::sharded(self)
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
        Ok(self.collective.barrier()?)
    }
}
