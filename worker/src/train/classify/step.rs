//! A classification step: this rank's share of the global batch (with
//! adversarial negatives mined with the weights of the epoch's start), its
//! micro-batches' forward and backward (a stacked backward under gradient
//! checkpointing or ZeRO stage 2), and the update through the rank state.

use std::time::Instant;

use dpo_data::batches::rank_range;
use dpo_data::tagged::Encoded;

use super::objective::{Batch, Norm, Sums, micro_batch_loss};
use super::{ClassifierTrainer, Feed, Miner, evaluate};
use crate::error::{Error, Result, TorchContext};
use crate::model::stack::LayerGrads;
use crate::optim::learning_rate;
use crate::train::rank_state::PARAMETER_CHECK_EVERY;
use crate::train::{Metrics, splitmix};

impl ClassifierTrainer {
    /// At the first step of an epoch, keeps the weights the epoch's adversarial
    /// negatives are mined with.
    fn snapshot_miner(&mut self) -> Result<()> {
        let epoch = self.world.state.step / self.steps_per_epoch.max(1);
        if !self.adversarial() || self.miner.as_ref().is_some_and(|m| m.epoch == epoch) {
            return Ok(());
        }
        if self.world.state.step % self.steps_per_epoch.max(1) != 0 {
            return Err(Error::State(
                "the weights of this epoch's adversarial mining are missing (a checkpoint without them?)",
            ));
        }
        let params = self.copy_of_parameters()?;
        self.miner = Some(Miner { epoch, params });
        Ok(())
    }

    /// A copy of the parameters that later steps do not touch.
    fn copy_of_parameters(&self) -> Result<Vec<tch::Tensor>> {
        let _guard = tch::no_grad_guard();
        self.world
            .optimizer
            .params()
            .iter()
            .map(|p| p.f_detach().and_then(|t| t.f_mul_scalar(1.0)))
            .collect::<std::result::Result<Vec<_>, _>>()
            .op("copying the parameters")
    }

    /// Adds to `examples` (this rank's share) the adversarial negatives: at each
    /// labelled position, the `negatives_per_label` wrong labels the weights of
    /// the epoch's start find most likely. Returns how many were added.
    fn mine_share(&mut self, examples: &mut [Encoded]) -> Result<usize> {
        let Some(miner) = &self.miner else {
            return Ok(0);
        };
        let current = self.copy_of_parameters()?;
        let _guard = tch::no_grad_guard();
        let swap = |to: &[tch::Tensor], params: &[tch::Tensor]| -> Result<()> {
            for (p, v) in params.iter().zip(to) {
                p.shallow_clone().f_copy_(v).op("swapping weights")?;
            }
            Ok(())
        };
        swap(&miner.params, self.world.optimizer.params())?;
        let mined = evaluate::mine_adversarial(
            &mut self.model,
            examples,
            self.pad,
            self.spec.micro_batch_size(),
            self.spec.task.negatives_per_label,
        );
        swap(&current, self.world.optimizer.params())?;
        self.model.set_training(true);
        let mut added = 0;
        for (e, extra) in examples.iter_mut().zip(mined?) {
            let before = e.negatives.len();
            e.negatives.extend(extra);
            e.negatives.sort_unstable();
            e.negatives.dedup();
            added += e.negatives.len() - before;
        }
        Ok(added)
    }

    /// This rank's share of the global batch of `self.world.state.step`, and the batch's
    /// totals. With adversarial negatives each rank mines its share and the
    /// ranks add up how many they mined, so the totals are the whole batch's.
    fn share(&mut self, rank: usize, world: usize) -> Result<(Vec<Encoded>, Norm)> {
        let step = self.world.state.step;
        self.snapshot_miner()?;
        let (mut mine, mut norm) = match &mut self.feed {
            Feed::Local { data, plan } => {
                let idx = plan.indices(step);
                let batch: Vec<&Encoded> = idx.iter().map(|&i| &data.train.examples[i]).collect();
                let norm = Norm::of(batch.iter().copied());
                let (start, len) = rank_range(batch.len(), world, rank);
                let mine = batch[start..start + len]
                    .iter()
                    .map(|e| (*e).clone())
                    .collect();
                (mine, norm)
            }
            Feed::Remote(source) => source.train(step, rank, world)?,
        };
        if self.miner.is_some() {
            let added = self.mine_share(&mut mine)? as u64;
            let total: u64 = if world == 1 {
                added
            } else {
                self.world
                    .collective
                    .all_gather(&added.to_le_bytes())?
                    .iter()
                    .map(|b| {
                        b.get(..8)
                            .and_then(|b| b.try_into().ok())
                            .map_or(0, u64::from_le_bytes)
                    })
                    .sum()
            };
            norm.negatives += total as f64;
        }
        Ok((mine, norm))
    }

    /// One optimizer step over the global batch of `self.world.state.step`.
    pub fn train_step(&mut self) -> Result<Metrics> {
        let started = Instant::now();
        let (world, rank) = (
            self.world.collective.world_size(),
            self.world.collective.rank(),
        );
        let (mine, norm) = self.share(rank, world)?;
        let mine: Vec<&Encoded> = mine.iter().collect();
        self.world.optimizer.zero_grad()?;
        self.model.set_training(true);
        let mut sums = Sums::default();
        let m = self.spec.micro_batch_size().max(1);
        // ZeRO stage 2 reduces every micro-batch into the shards: as many
        // rounds as the rank with the most micro-batches has.
        let stage2 = self.world.zero.is_some() && self.layer_map.is_some();
        let rounds = if stage2 {
            self.world
                .most_micro_batches(mine.chunks(m).count() as u64)?
        } else {
            0
        };
        let mut done = 0u64;
        for (i, micro) in mine.chunks(m).enumerate() {
            // Dropout masks are a function of the seed, step, rank and
            // micro-batch, so a resumed run draws the same ones.
            let seed = splitmix(
                self.spec.data.seed
                    ^ splitmix(self.world.state.step)
                    ^ splitmix((rank as u64) << 32 | i as u64),
            );
            tch::manual_seed(seed as i64);
            let b = Batch::new(micro, self.pad, self.model.device());
            let (loss, s, deferred) = micro_batch_loss(&self.model, &b, norm, self.weight)?;
            loss.f_backward().op("backward")?;
            drop(loss);
            match (&self.layer_map, &self.world.zero) {
                (Some(map), Some(zero)) if stage2 => map.backward(
                    |grads| match deferred {
                        Some(d) => self.model.backward_deferred(d, grads).map(|()| true),
                        None => Ok(false),
                    },
                    zero,
                    &mut self.world.optimizer,
                    self.world.collective.as_mut(),
                )?,
                _ => {
                    if let Some(d) = deferred {
                        self.model.backward_deferred(d, LayerGrads::Accumulate)?;
                    }
                }
            }
            done += 1;
            sums.add(&s);
        }
        if let Some(map) = &self.layer_map {
            map.reduce_missing(done, rounds, &mut self.world)?;
        }
        if !stage2 {
            crate::collective::ensure_gradients(self.world.optimizer.params())?;
            self.world.reduce_gradients()?;
        }
        let sums = self.sum_across_ranks(sums)?;
        self.world.exchange_leavers()?;
        let grad_norm = self.world.clip_gradient(self.spec.optim.max_grad_norm)?;
        let o = &self.spec.optim;
        let step = self.world.step();
        let lr = learning_rate(o.schedule, o.lr, o.warmup_steps, step, self.total_steps);
        let mut m: Metrics = vec![
            ("step".into(), (step + 1) as f64),
            (
                "epoch".into(),
                (step + 1) as f64 / self.steps_per_epoch.max(1) as f64,
            ),
        ];
        m.extend(sums.metrics(self.weight, ""));
        m.push(("grad_norm".into(), grad_norm));
        m.push(("learning_rate".into(), lr));
        m.push(("generation".into(), self.generation as f64));
        m.push(("world_size".into(), world as f64));
        m.push(("step_seconds".into(), started.elapsed().as_secs_f64()));
        self.world.apply(lr, m.clone())?;
        let step = self.world.step();
        if step % PARAMETER_CHECK_EVERY == 0 || step == self.total_steps {
            self.world.check_parameters_agree(step)?;
        }
        Ok(m)
    }
}
