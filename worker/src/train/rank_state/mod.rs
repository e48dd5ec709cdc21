//! One rank's share of a run, whatever the task: its world (the collective),
//! what trains (the optimizer, with its moments), where the run stands
//! (`TrainerState`, the same value a checkpoint stores) and ZeRO's share of
//! the optimizer state — and keeping the ranks of a world identical:
//! parameter hashes compared, `sync_world` (the furthest-ahead rank's state
//! broadcast to the others when a world (re)forms, ZeRO's shares
//! re-partitioned, torn steps completed, lost shares rolled back), the
//! hand-off of leaving ranks' shares, and a ZeRO step's gradient reduction,
//! clipping, update and parameter gather. The causal-LM trainer and the
//! classifier both hold one; what differs between them (models, batches,
//! what a checkpoint holds besides the optimizer state) stays with them.
//!
//! In parts: `sharded` (a ZeRO world forming: shares re-partitioned, torn
//! steps completed, lost shares rolled back; the leavers' hand-off) and
//! `files` (the optimizer state in checkpoints, whole or sharded).

mod files;
mod sharded;

pub use sharded::LostShares;

use dpo_proto::RunSpec;
use serde::{Deserialize, Serialize};
use tch::Tensor;

use super::Metrics;
use crate::collective::{Collective, all_reduce_gradients};
use crate::collective::{CollectiveError, broadcast_tensors};
use crate::error::{Error, Result, TorchContext};
use crate::optim::Optimizer;
use crate::zero::Partition;

/// How often (in steps) ranks compare parameter hashes.
pub(crate) const PARAMETER_CHECK_EVERY: u64 = 25;

/// Where a run stands, besides its tensors: what a checkpoint's
/// `trainer_state.json` holds and what `sync_world` broadcasts. The optimizer's
/// step count always equals `step` (it steps exactly once per step).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimizer steps completed (this fixes the data cursor: the order is a
    /// function of the seed and the epoch).
    pub step: u64,
    /// Early stopping on `train.metric_for_best_model`.
    #[serde(flatten)]
    pub stopping: super::EarlyStopping,
    /// The last step whose evaluation is done (and in `stopping`): a world
    /// that broke in the evaluation of step `step` runs it again, once. A
    /// checkpoint is written after its step's evaluation, so one restored
    /// counts as evaluated at its step.
    #[serde(default)]
    pub evaluated_step: u64,
}

/// One rank's share of a run (see the module's documentation).
pub struct RankState {
    /// The ranks training this run together (a world of one standalone).
    pub(crate) collective: Box<dyn Collective>,
    /// What trains, with its moments (under ZeRO: this rank's share of them).
    pub(crate) optimizer: Optimizer,
    /// Step and early-stopping state (what checkpoints and `sync_world` carry).
    pub(crate) state: TrainerState,
    /// `train.zero_stage` (0: every rank holds the whole optimizer state).
    stage: u8,
    /// `train.zero_replicas > 1`: each rank also keeps its predecessor's share.
    replicas: bool,
    /// AdamW (it has moments to move; SGD has none).
    adamw: bool,
    /// ZeRO's partition of the optimizer state (and, stage 2, of the
    /// gradients), once entered.
    pub(crate) zero: Option<Partition>,
    /// A ZeRO step failed between updating this rank's share and gathering
    /// the parameters: its state is neither the old step's nor the new one's.
    torn: bool,
    /// This rank is asked to leave (a worker's SIGTERM): under ZeRO it says
    /// so in its next step, and the world hands its share over first.
    leaving: bool,
    /// The ranks that said, in the last step, that they are leaving.
    leavers: Vec<usize>,
    /// The metrics of the step this rank is torn in (see `torn`).
    torn_metrics: Option<Metrics>,
    /// The metrics of step `state.step` as this rank trained it (until its
    /// state comes from elsewhere): a world that broke before any rank
    /// reported that step reports it from these.
    applied: Option<Metrics>,
    /// Fault injection for tests: fail like a broken connection in this
    /// step, once: under ZeRO between the update and the parameter gather,
    /// else right after the update.
    tear_at_step: Option<u64>,
}

impl std::fmt::Debug for RankState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RankState")
            .field("rank", &self.collective.rank())
            .field("world", &self.collective.world_size())
            .field("step", &self.state.step)
            .field("zero_stage", &self.stage)
            .field("sharded", &self.zero.is_some())
            .finish_non_exhaustive()
    }
}

/// What [`RankState::sync_world`] did, or needs done.
#[derive(Debug)]
pub enum WorldSync {
    /// Every rank holds the same state now.
    Synced(Synced),
    /// Restore the last committed checkpoint (or the initial weights) on
    /// every rank, then call [`RankState::rolled_back`]. The optimizer is
    /// already reset and unsharded.
    MustRollBack(LostShares),
}

impl RankState {
    /// A world of one at step 0, training `optimizer`'s parameters under
    /// `spec`'s ZeRO settings (entered once a world of more forms).
    pub fn new(spec: &RunSpec, optimizer: Optimizer) -> Self {
        RankState {
            collective: Box::new(crate::collective::Solo),
            optimizer,
            state: TrainerState::default(),
            stage: spec.train.zero_stage,
            replicas: spec.train.zero_replicas > 1,
            adamw: spec.optim.name == dpo_proto::OptimizerName::Adamw,
            zero: None,
            torn: false,
            leaving: false,
            leavers: Vec::new(),
            torn_metrics: None,
            applied: None,
            tear_at_step: None,
        }
    }

    pub fn rank(&self) -> usize {
        self.collective.rank()
    }

    pub fn world_size(&self) -> usize {
        self.collective.world_size()
    }

    pub fn step(&self) -> u64 {
        self.state.step
    }

    /// The state to checkpoint or send.
    pub fn state(&self) -> TrainerState {
        self.state.clone()
    }

    /// Takes `state` (the optimizer's step count with it).
    pub fn set_state(&mut self, state: TrainerState) {
        if state.step != self.state.step {
            self.applied = None;
        }
        self.optimizer.step = state.step;
        self.state = state;
    }

    /// Takes the state a checkpoint of its step stored: that step's
    /// evaluation, if one was due, came before the checkpoint.
    pub fn restore_state(&mut self, mut state: TrainerState) {
        state.evaluated_step = state.evaluated_step.max(state.step);
        self.set_state(state);
    }

    /// The metrics of the last step, as this rank trained it (see `applied`).
    pub fn applied(&self) -> Option<&Metrics> {
        self.applied.as_ref()
    }

    /// Whether the evaluation of the current step is still to do.
    pub fn evaluation_pending(&self) -> bool {
        self.state.evaluated_step < self.state.step
    }

    /// The current step's evaluation is done (and in `state.stopping`).
    pub fn evaluated(&mut self) {
        self.state.evaluated_step = self.state.step;
    }

    /// ZeRO (`train.zero_stage` ≥ 1) over this world: partitions the
    /// optimizer state, each rank keeping its share only. Called once the
    /// ranks agree on their state; a world of one keeps everything.
    pub fn enter_zero(&mut self) -> Result<()> {
        let world = self.collective.world_size();
        if self.stage == 0 || world == 1 || self.zero.is_some() {
            return Ok(());
        }
        let partition = Partition::new(
            self.optimizer.params(),
            self.optimizer.names(),
            world,
            self.collective.rank(),
            self.replicas,
        );
        let pieces = partition.pieces(self.optimizer.params());
        let copies = partition.replica_pieces(self.optimizer.params());
        self.optimizer.shard(&pieces, &copies)?;
        let (parameters, bytes) = self.optimizer.state_bytes();
        tracing::info!(
            world,
            rank = self.collective.rank(),
            pieces = pieces.len(),
            replica_pieces = copies.len(),
            state_bytes = bytes,
            parameters,
            stage = self.stage,
            "ZeRO: this rank holds its share of the optimizer state"
        );
        self.zero = Some(partition);
        Ok(())
    }

    /// After the micro-batches' backward: the gradients summed over the
    /// world (under ZeRO each rank keeps the sum of its share only).
    pub fn reduce_gradients(&mut self) -> Result<()> {
        match &self.zero {
            Some(z) => {
                z.reduce_scatter_gradients(self.optimizer.params(), self.collective.as_mut())
            }
            None => all_reduce_gradients(self.optimizer.params(), self.collective.as_mut()),
        }
    }

    /// Under ZeRO, every step: who is leaving after it (the world hands their
    /// shares of the optimizer state over before they go, `hand_off`).
    pub fn exchange_leavers(&mut self) -> Result<()> {
        if self.zero.is_some() {
            let world = self.collective.world_size();
            let flags = self.collective.all_gather(&[u8::from(self.leaving)])?;
            self.leavers = (0..world).filter(|&r| flags[r] == [1]).collect();
        }
        Ok(())
    }

    /// Clips the gradient to `max_norm` (0: no clipping) and returns its norm
    /// before clipping — under ZeRO the norm of the whole gradient, every
    /// rank's share of squares added.
    pub fn clip_gradient(&mut self, max_norm: f64) -> Result<f64> {
        match &self.zero {
            Some(z) => {
                let collective = self.collective.as_mut();
                self.optimizer
                    .clip_grad_norm_with(max_norm, &mut |x| z.sum_across(collective, x))
            }
            None => self.optimizer.clip_grad_norm(max_norm),
        }
    }

    /// The update of step `self.step()` at learning rate `lr`, and (ZeRO) the
    /// gather of the updated parameters; then the step counts as done.
    /// `metrics` are the step's, kept while the step is torn (see `torn`) for
    /// a world that completes it from the shares.
    pub fn apply(&mut self, lr: f64, metrics: Metrics) -> Result<()> {
        let step = self.state.step;
        if self.zero.is_some() {
            // From here until the parameters are whole again, this rank's
            // share has moved on and the rest has not: a failure leaves it
            // torn. The step's metrics are kept, for a world that completes
            // the step from the shares (`sync_world`).
            self.torn = true;
            self.torn_metrics = Some(metrics.clone());
        }
        self.optimizer.apply(lr)?;
        if let Some(z) = &self.zero {
            if self.tear_at_step == Some(step + 1) {
                self.tear_at_step = None;
                return Err(CollectiveError::Protocol {
                    rank: self.collective.rank(),
                    reason: format!(
                        "injected fault: step {} torn before the parameter gather",
                        step + 1
                    ),
                }
                .into());
            }
            z.all_gather_parameters(self.optimizer.params(), self.collective.as_mut())?;
            self.torn = false;
            self.torn_metrics = None;
        }
        self.state.step = step + 1;
        self.applied = Some(metrics);
        if self.tear_at_step == Some(step + 1) {
            self.tear_at_step = None;
            return Err(CollectiveError::Protocol {
                rank: self.collective.rank(),
                reason: format!("injected fault: connection lost after step {}", step + 1),
            }
            .into());
        }
        Ok(())
    }

    /// Fault injection for tests: break step `step` (once) as a lost
    /// connection would — under ZeRO between the update and the parameter
    /// gather, else right after the update, before anything is reported.
    pub fn set_tear_at_step(&mut self, step: Option<u64>) {
        self.tear_at_step = step;
    }

    /// ZeRO stage 2 reduces every micro-batch into the shards, so every rank
    /// runs as many rounds as the rank with the most micro-batches this step
    /// (`mine`: this rank's count).
    pub fn most_micro_batches(&mut self, mine: u64) -> Result<u64> {
        let all = self.collective.all_gather(&mine.to_le_bytes())?;
        Ok(all
            .iter()
            .map(|b| u64::from_le_bytes(b.as_slice().try_into().unwrap_or([0; 8])))
            .max()
            .unwrap_or(mine))
    }

    /// Every rank's `values` added, in rank order (so every rank gets the
    /// same bits; the f64 values travel as bytes).
    pub fn sum_across(&mut self, values: &[f64]) -> Result<Vec<f64>> {
        if self.collective.world_size() == 1 {
            return Ok(values.to_vec());
        }
        let bytes: Vec<u8> = values.iter().flat_map(|x| x.to_le_bytes()).collect();
        let blocks = self.collective.all_gather(&bytes)?;
        let mut total = vec![0.0f64; values.len()];
        for (r, block) in blocks.iter().enumerate() {
            if block.len() != bytes.len() {
                return Err(CollectiveError::Protocol {
                    rank: r,
                    reason: format!(
                        "sent {} metric bytes, expected {}",
                        block.len(),
                        bytes.len()
                    ),
                }
                .into());
            }
            for (t, b) in total.iter_mut().zip(block.chunks_exact(8)) {
                let mut a = [0u8; 8];
                a.copy_from_slice(b);
                *t += f64::from_le_bytes(a);
            }
        }
        Ok(total)
    }

    /// A cheap hash (FNV-1a) of every parameter's bytes.
    fn parameter_hash(&self) -> Result<u64> {
        parameter_hash(self.optimizer.params())
    }

    /// Fails loudly if the ranks' parameters are no longer identical (compared by a
    /// hash of their bytes).
    pub fn check_parameters_agree(&mut self, step: u64) -> Result<()> {
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
        self.take_state_and_parameters(root)?;
        // Sharded (a sharded checkpoint restored into this world's partition):
        // each rank already holds its own share of the same state.
        if self.optimizer.step > 0 && self.zero.is_none() {
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
    ///
    /// Under ZeRO (`train.zero_stage` ≥ 1) the optimizer state is
    /// re-partitioned for the new world from the shares of the ranks furthest
    /// ahead; when one of those shares is gone with its worker, every rank
    /// must go back to the last committed checkpoint: `MustRollBack`.
    pub fn sync_world(&mut self) -> Result<WorldSync> {
        let outcome = if self.stage > 0 {
            self.sync_world_sharded()?
        } else {
            WorldSync::Synced(Synced {
                root: self.sync_world_whole()?,
                rollback: None,
                ..Default::default()
            })
        };
        if matches!(outcome, WorldSync::Synced(_)) {
            self.agree_on_evaluation()?;
        }
        Ok(outcome)
    }

    /// Ranks at the same step may differ in whether its evaluation is done
    /// (their world broke within it, after some ranks had scored it): the
    /// state of the lowest rank furthest on becomes every rank's, so all run
    /// what is left of the step, or none does.
    fn agree_on_evaluation(&mut self) -> Result<()> {
        if self.collective.world_size() == 1 {
            return Ok(());
        }
        let rank = self.collective.rank();
        let all = self
            .collective
            .all_gather(&self.state.evaluated_step.to_le_bytes())?;
        let evaluated = all
            .iter()
            .map(|b| b.as_slice().try_into().ok().map(u64::from_le_bytes))
            .collect::<Option<Vec<u64>>>()
            .ok_or_else(|| CollectiveError::Protocol {
                rank,
                reason: "malformed evaluation step from a peer".into(),
            })?;
        let furthest = evaluated.iter().copied().max().unwrap_or(0);
        if evaluated.iter().all(|&e| e == furthest) {
            return Ok(());
        }
        let root = evaluated.iter().position(|&e| e == furthest).unwrap_or(0);
        self.take_state(root)?;
        tracing::info!(
            rank,
            root,
            step = self.state.step,
            "took the evaluation of this step from rank {root}"
        );
        Ok(())
    }

    fn sync_world_whole(&mut self) -> Result<Option<usize>> {
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

/// A hash (FNV-1a) of the parameters' bytes, to tell whether ranks agree.
pub(crate) fn parameter_hash(params: &[Tensor]) -> Result<u64> {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for p in params {
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

/// What [`RankState::sync_world`] did.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Synced {
    /// The rank whose state the others took, if they differed.
    pub root: Option<usize>,
    /// The world went back to a checkpoint: a share of the optimizer state was
    /// lost with its worker.
    pub rollback: Option<Rollback>,
    /// Every rank was torn in the same step and the world completed it from
    /// the updated shares: that step's metrics, to report as its own.
    pub completed: Option<super::Metrics>,
}

/// A return to the last committed checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rollback {
    /// The step the furthest-ahead ranks had reached.
    pub from_step: u64,
    /// The step of the checkpoint (0: the initial weights).
    pub to_step: u64,
    /// Why, for people.
    pub reason: String,
}

/// Leaving, and taking another rank's state.
impl RankState {
    /// Marks this rank as leaving (its worker was asked to stop): under
    /// ZeRO its next step tells the world, which then hands its share over.
    pub fn set_leaving(&mut self, leaving: bool) {
        self.leaving = leaving;
    }

    /// Whether this rank holds a ZeRO share of the optimizer state (a leave
    /// must hand it over first).
    pub fn sharded(&self) -> bool {
        self.zero.is_some()
    }

    /// The ranks that said in the last step that they are leaving (under
    /// ZeRO only; every rank of the world sees the same list).
    pub fn leavers(&self) -> &[usize] {
        &self.leavers
    }

    /// Makes the optimizer whole again (its share of the state is dropped; a
    /// broadcast or a checkpoint fills it).
    fn unshard(&mut self) -> Result<()> {
        if self.zero.take().is_some() {
            self.optimizer.reset()?;
        }
        Ok(())
    }

    /// Takes rank `root`'s [`TrainerState`] and parameters (every rank calls it).
    pub(super) fn take_state_and_parameters(&mut self, root: usize) -> Result<()> {
        self.take_state(root)?;
        let params: Vec<Tensor> = self
            .optimizer
            .params()
            .iter()
            .map(Tensor::shallow_clone)
            .collect();
        broadcast_tensors(&params, root, self.collective.as_mut())
    }
}

/// What a rank hands the others with its parameters: its [`TrainerState`]
/// and the metrics of the step it stands at, as it trained it (each value's
/// bits: exact, and NaN survives JSON).
#[derive(Debug, Serialize, Deserialize)]
struct Handed {
    state: TrainerState,
    applied: Option<Vec<(String, u64)>>,
}

impl RankState {
    /// Takes rank `root`'s [`TrainerState`] (every rank calls it), and the
    /// metrics it trained that step with: a rank that takes the state of a
    /// step can report it if the rank that trained it is gone before it was
    /// recorded (the simulator found runs stuck for good: a world standing
    /// at a step nobody in it could report, every later step refused).
    fn take_state(&mut self, root: usize) -> Result<()> {
        let mine = Handed {
            state: self.state(),
            applied: self
                .applied
                .as_ref()
                .map(|m| m.iter().map(|(k, v)| (k.clone(), v.to_bits())).collect()),
        };
        let mine = serde_json::to_vec(&mine).map_err(|e| CollectiveError::Protocol {
            rank: self.collective.rank(),
            reason: format!("encoding the training state: {e}"),
        })?;
        let got = self.collective.broadcast(&mine, root)?;
        let handed: Handed =
            serde_json::from_slice(&got).map_err(|e| CollectiveError::Protocol {
                rank: self.collective.rank(),
                reason: format!("state from rank {root}: {e}"),
            })?;
        self.set_state(handed.state);
        if self.applied.is_none() {
            self.applied = handed
                .applied
                .map(|m| m.into_iter().map(|(k, v)| (k, f64::from_bits(v))).collect());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A rank that takes another's state takes the metrics it trained that
    /// step with (exact, NaN included), so that it can report the step if
    /// the rank that trained it is gone before the coordinator recorded it;
    /// a rank that trained the step itself keeps its own.
    #[test]
    fn a_rank_taking_the_state_of_a_step_takes_its_metrics() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("run.toml");
        std::fs::write(
            &path,
            "name = \"t\"\n[model]\npath = \"m\"\n[data]\ntrain = \"d.jsonl\"\n",
        )
        .expect("write");
        let spec = RunSpec::from_file(&path).expect("spec");
        let trained = |step: u64| -> Metrics {
            vec![
                ("step".into(), step as f64),
                ("loss".into(), f64::NAN),
                ("generation".into(), 3.0),
            ]
        };
        let ranks: Vec<_> = crate::collective::tcp::test_ring(3, 1)
            .into_iter()
            .enumerate()
            .map(|(rank, collective)| {
                let spec = spec.clone();
                std::thread::spawn(move || {
                    let w = Tensor::from_slice(&[1.0f32, 2.0]);
                    let optim = Optimizer::new(&spec.optim, vec![("w.weight".into(), w)])
                        .expect("optimizer");
                    let mut r = RankState::new(&spec, optim);
                    r.collective = Box::new(collective);
                    // Rank 0 trained step 5; rank 1 trained step 3; rank 2
                    // also trained step 5 (with its own metrics).
                    let (step, metrics) = match rank {
                        0 => (5, trained(5)),
                        1 => (3, trained(3)),
                        _ => (5, vec![("step".into(), 5.0), ("loss".into(), 0.25)]),
                    };
                    r.set_state(TrainerState {
                        step,
                        ..TrainerState::default()
                    });
                    r.applied = Some(metrics);
                    r.take_state_and_parameters(0)
                        .expect("takes rank 0's state");
                    (r.step(), r.applied.clone())
                })
            })
            .collect();
        let got: Vec<(u64, Option<Metrics>)> =
            ranks.into_iter().map(|h| h.join().expect("rank")).collect();
        let bits = |m: &Option<Metrics>| {
            m.as_ref().map(|m| {
                m.iter()
                    .map(|(k, v)| (k.clone(), v.to_bits()))
                    .collect::<Vec<_>>()
            })
        };
        assert_eq!(got[1].0, 5);
        assert_eq!(
            bits(&got[1].1),
            bits(&Some(trained(5))),
            "rank 1 took rank 0's metrics"
        );
        assert_eq!(bits(&got[0].1), bits(&Some(trained(5))));
        assert_eq!(
            got[2].1,
            Some(vec![("step".into(), 5.0), ("loss".into(), 0.25)]),
            "rank 2 trained step 5 itself and keeps its own"
        );
    }

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
                stopping: crate::train::EarlyStopping {
                    best: Some(0.25),
                    best_step: None,
                    bad_evals: 2,
                    stopped_early: false
                },
                evaluated_step: 0,
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
