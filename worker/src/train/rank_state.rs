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

use std::path::Path;

use dpo_proto::RunSpec;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tch::Tensor;

use super::Metrics;
use crate::collective::{Collective, all_reduce_gradients};
use crate::collective::{CollectiveError, broadcast_tensors};
use crate::error::{Error, Result, TorchContext, io_err};
use crate::model::checkpoint as model_io;
use crate::optim::Optimizer;
use crate::train::checkpoint::{PARTITION_FILE, ShardedState, shard_file, sync_dir, to_device};
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
    /// Fault injection for tests: fail like a broken connection between the
    /// update and the parameter gather of this step (ZeRO), once.
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

/// What a sharded world found when it formed: a share of the optimizer state
/// is gone, so every rank must go back to the last committed checkpoint (or
/// the initial weights). The caller restores those
/// ([`RankState::sync_world`]'s `MustRollBack`), then calls
/// [`RankState::rolled_back`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LostShares {
    from_step: u64,
    missing: Vec<u64>,
    ahead: Vec<u64>,
    old_world: u64,
    torn: bool,
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
        self.optimizer.step = state.step;
        self.state = state;
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
    pub fn apply(&mut self, lr: f64, metrics: impl FnOnce() -> Metrics) -> Result<()> {
        let step = self.state.step;
        if self.zero.is_some() {
            // From here until the parameters are whole again, this rank's
            // share has moved on and the rest has not: a failure leaves it
            // torn. The step's metrics are kept, for a world that completes
            // the step from the shares (`sync_world`).
            self.torn = true;
            self.torn_metrics = Some(metrics());
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
        Ok(())
    }

    /// Fault injection for tests: under ZeRO, break step `step` between the
    /// update and the parameter gather (once), as a lost connection would.
    pub fn set_tear_at_step(&mut self, step: Option<u64>) {
        self.tear_at_step = step;
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
        if self.stage > 0 {
            return self.sync_world_sharded();
        }
        Ok(WorldSync::Synced(Synced {
            root: self.sync_world_whole()?,
            rollback: None,
            ..Default::default()
        }))
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

/// One rank's summary when a sharded world forms: step, parameter hash, and the
/// partition of the optimizer state it holds (world 0: it holds it whole).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Summary {
    step: u64,
    hash: u64,
    world: u64,
    rank: u64,
    /// 1: a step broke between the share's update and the parameters' gather.
    torn: u64,
    /// 1: it also holds a replica of its predecessor's share (rank − 1).
    replica: u64,
}

impl Summary {
    fn to_bytes(self) -> Vec<u8> {
        [
            self.step,
            self.hash,
            self.world,
            self.rank,
            self.torn,
            self.replica,
        ]
        .iter()
        .flat_map(|x| x.to_le_bytes())
        .collect()
    }

    fn from_bytes(b: &[u8]) -> Option<Summary> {
        if b.len() != 48 {
            return None;
        }
        let at = |i: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[i * 8..i * 8 + 8]);
            u64::from_le_bytes(a)
        };
        Some(Summary {
            step: at(0),
            hash: at(1),
            world: at(2),
            rank: at(3),
            torn: at(4),
            replica: at(5),
        })
    }
}

impl RankState {
    /// [`RankState::sync_world`] under ZeRO.
    fn sync_world_sharded(&mut self) -> Result<WorldSync> {
        let (world, rank) = (self.collective.world_size(), self.collective.rank());
        let mine = Summary {
            step: self.state.step,
            hash: self.parameter_hash()?,
            world: self.zero.as_ref().map_or(0, |z| z.world() as u64),
            rank: self.zero.as_ref().map_or(0, |z| z.rank() as u64),
            torn: u64::from(self.torn),
            replica: u64::from(self.zero.as_ref().is_some_and(|z| z.replicas())),
        };
        let all: Vec<Summary> = self
            .collective
            .all_gather(&mine.to_bytes())?
            .iter()
            .map(|b| Summary::from_bytes(b))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| CollectiveError::Protocol {
                rank,
                reason: "malformed state summary from a peer".into(),
            })?;
        if let Some(completed) = self.complete_torn_step(&all)? {
            // Those ranks are whole at the completed step now: the usual path.
            return Ok(match self.sync_world_sharded()? {
                WorldSync::Synced(mut synced) => {
                    synced.completed = synced.completed.or(completed);
                    WorldSync::Synced(synced)
                }
                other => other,
            });
        }
        // The state furthest ahead, among ranks whose state is whole.
        let sound = |s: &Summary| s.torn == 0;
        let Some(max) = all.iter().filter(|s| sound(s)).map(|s| s.step).max() else {
            let from = all.iter().map(|s| s.step).max().unwrap_or(0);
            return self.must_roll_back(from, Vec::new(), Vec::new(), 0, true);
        };
        let root = all
            .iter()
            .position(|s| sound(s) && s.step == max)
            .unwrap_or(0);
        let lead = all[root];
        // The same partition on the same ranks as before: nothing moves.
        let same_world = all.iter().enumerate().all(|(r, s)| {
            (s.step, s.hash) == (lead.step, lead.hash)
                && s.world == world as u64
                && s.rank == r as u64
        });
        if same_world {
            return Ok(WorldSync::Synced(Synced::default()));
        }
        if lead.world == 0 {
            // The state furthest ahead is whole (a start, or a checkpoint just
            // restored): the plain broadcast, then the new partition.
            self.unshard()?;
            let synced = if world > 1
                && !all
                    .iter()
                    .all(|s| (s.step, s.hash) == (lead.step, lead.hash))
            {
                self.sync_from(root)?;
                Some(root)
            } else {
                None
            };
            self.enter_zero()?;
            return Ok(WorldSync::Synced(Synced {
                root: synced,
                rollback: None,
                ..Default::default()
            }));
        }
        // The shares of the ranks furthest ahead: who contributes each — the
        // lowest sound rank that owned it, else the one that kept its replica
        // (the owner's successor) — and is any missing?
        // A rank torn in the lead's last step updated its shares for that
        // step before its parameter gather broke: its shares are the lead's
        // step's (its parameters come from the lead like any rank behind).
        let same = |s: &Summary| {
            s.world == lead.world
                && if sound(s) {
                    (s.step, s.hash) == (lead.step, lead.hash)
                } else {
                    s.step + 1 == lead.step
                }
        };
        let w0 = lead.world;
        let mut contributors: Vec<Option<(usize, bool)>> = (0..w0)
            .map(|k| {
                all.iter()
                    .position(|s| same(s) && s.rank == k)
                    .map(|r| (r, false))
            })
            .collect();
        let mut recovered = Vec::new();
        for k in 0..w0 {
            if contributors[k as usize].is_none() {
                let next = (k + 1) % w0;
                let copy = all
                    .iter()
                    .position(|s| same(s) && s.rank == next && s.replica == 1 && w0 > 1);
                if let Some(r) = copy {
                    contributors[k as usize] = Some((r, true));
                    recovered.push(k);
                }
            }
        }
        let missing: Vec<u64> = (0..w0)
            .filter(|k| contributors[*k as usize].is_none())
            .collect();
        if !missing.is_empty() {
            let torn = all.iter().any(|s| !sound(s));
            // A missing share may still be here, but a step ahead: its rank
            // updated it and then broke (its peers did not get that far).
            let ahead: Vec<u64> = missing
                .iter()
                .copied()
                .filter(|&k| {
                    all.iter()
                        .any(|s| !sound(s) && s.world == w0 && s.rank == k)
                })
                .collect();
            let lost: Vec<u64> = missing.into_iter().filter(|k| !ahead.contains(k)).collect();
            return self.must_roll_back(max, lost, ahead, w0, torn);
        }
        if !recovered.is_empty() {
            tracing::warn!(
                shares = ?recovered,
                "ZeRO: rebuilt lost shares of the optimizer state from their replicas; no step is lost"
            );
        }
        // Parameters and position from the root where they differ.
        let behind = all
            .iter()
            .any(|s| (s.step, s.hash) != (lead.step, lead.hash));
        if behind {
            self.take_state_and_parameters(root)?;
        }
        // The optimizer state: each element from its one contributor, to its
        // new owner (and its new replica).
        let mut contribution = Vec::new();
        for c in &contributors {
            match c {
                Some((r, replica)) if *r == rank => {
                    contribution.extend(self.optimizer.piece_states(*replica));
                }
                _ => {}
            }
        }
        let new = Partition::new(
            self.optimizer.params(),
            self.optimizer.names(),
            world,
            rank,
            self.replicas,
        );
        let moments = self.adamw && max > 0;
        let moved = new.repartition(
            self.optimizer.params(),
            &contribution,
            moments,
            self.collective.as_mut(),
        )?;
        drop(contribution);
        self.install_partition(new, moved)?;
        tracing::info!(
            world,
            rank,
            from_world = lead.world,
            step = self.state.step,
            "ZeRO: re-partitioned the optimizer state for the new world"
        );
        Ok(WorldSync::Synced(Synced {
            root: behind.then_some(root),
            rollback: None,
            ..Default::default()
        }))
    }

    /// Makes `new` this rank's partition, its optimizer updating the pieces
    /// `new` gives it with the state `moved` brought them.
    fn install_partition(
        &mut self,
        new: Partition,
        moved: crate::zero::Repartitioned,
    ) -> Result<()> {
        let params = self.optimizer.params();
        let (pieces, copies) = (new.pieces(params), new.replica_pieces(params));
        self.optimizer
            .install_pieces(&pieces, moved.own, &copies, moved.replica)?;
        self.zero = Some(new);
        Ok(())
    }

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

    /// A graceful leave under ZeRO, after a step in which ranks said they are
    /// leaving (every rank of the world calls it at the same step): the
    /// optimizer state is re-partitioned among the ranks that stay, in rank
    /// order — the leavers contribute their shares and take nothing — so the
    /// next world finds every share and nobody rolls back. The world must not
    /// train on afterwards: the staying ranks wait for the next generation.
    /// Returns whether this rank still holds a share.
    pub fn hand_off(&mut self) -> Result<bool> {
        let leavers = std::mem::take(&mut self.leavers);
        let (world, rank) = (self.collective.world_size(), self.collective.rank());
        let staying: Vec<usize> = (0..world).filter(|r| !leavers.contains(r)).collect();
        if self.zero.is_none() {
            return Ok(false);
        }
        if staying.is_empty() || leavers.is_empty() {
            // Nobody to hand to (every rank is going): keep the shares; the
            // next world rolls back to the checkpoint.
            return Ok(!leavers.contains(&rank));
        }
        let new_rank = staying.iter().position(|&r| r == rank);
        let new = Partition::new(
            self.optimizer.params(),
            self.optimizer.names(),
            staying.len(),
            new_rank.unwrap_or(0),
            self.replicas,
        );
        let contribution = self.optimizer.piece_states(false);
        let moments = self.adamw && self.optimizer.step > 0;
        // Until the exchange is complete this rank keeps its old share: a
        // world broken half-way finds the shares as they were.
        let moved = new.repartition(
            self.optimizer.params(),
            &contribution,
            moments,
            self.collective.as_mut(),
        )?;
        drop(contribution);
        if new_rank.is_some() {
            self.install_partition(new, moved)?;
        } else {
            // Leaving: this rank's share now lives on the others.
            self.zero = None;
        }
        // The leavers wait here until every rank has its new share (and only
        // then go, which ends the world): a rank that installed its share
        // and then sees the world end is done all the same.
        if let Err(e) = self.collective.barrier() {
            tracing::warn!(error = %e, "the world ended right after the hand-off");
        }
        tracing::info!(
            world,
            rank,
            leaving = ?leavers,
            staying = staying.len(),
            step = self.state.step,
            "ZeRO: handed the leaving ranks' shares of the optimizer state over to the ranks that stay"
        );
        Ok(new_rank.is_some())
    }

    /// Ranks torn in the same step (each updated its shares, the parameter
    /// gather broke) that no sound rank has gone past — every rank of a broken
    /// world, say, with a joiner restored from an older checkpoint beside
    /// them: when every share of that step survives among them (its owner,
    /// or the replica its successor keeps), the updated pieces of the
    /// parameters are gathered from them (every rank of this world takes
    /// part; the others contribute nothing), the step counts as done on the
    /// torn ranks (its metrics, kept when it tore, are returned to report),
    /// and the usual path goes on from there. `None`: not the case.
    fn complete_torn_step(&mut self, all: &[Summary]) -> Result<Option<Option<Metrics>>> {
        let rank = self.collective.rank();
        let torn = |s: &&Summary| s.torn == 1 && s.world > 0;
        let Some(kt) = all.iter().filter(torn).map(|s| s.step).max() else {
            return Ok(None);
        };
        let sound_max = all.iter().filter(|s| s.torn == 0).map(|s| s.step).max();
        if sound_max.is_some_and(|m| m > kt) {
            // Sound ranks finished that step: the torn ranks' shares count as
            // theirs in the usual path.
            return Ok(None);
        }
        let Some(lead) = all.iter().find(|s| torn(s) && s.step == kt).copied() else {
            return Ok(None);
        };
        let w0 = lead.world;
        let member = |s: &Summary| s.torn == 1 && s.step == kt && s.world == w0;
        let holder = |k: u64, replica: bool| {
            all.iter()
                .position(|s| member(s) && s.rank == k && (!replica || (s.replica == 1 && w0 > 1)))
        };
        let contributors: Vec<Option<usize>> = (0..w0)
            .map(|k| holder(k, false).or_else(|| holder((k + 1) % w0, true)))
            .collect();
        if contributors.iter().any(Option::is_none) {
            return Ok(None);
        }
        let old = Partition::new(
            self.optimizer.params(),
            self.optimizer.names(),
            w0 as usize,
            0,
            lead.replica == 1,
        );
        let params = self.optimizer.params();
        let mut mine = Vec::new();
        for (k, c) in contributors.iter().enumerate() {
            if *c == Some(rank) {
                mine.extend(old.owners_pieces(params, k));
            }
        }
        old.assemble_parameters(params, &mine, self.collective.as_mut())?;
        if !member(&all[rank]) {
            // Not torn in that step: this rank takes the state it lacks next.
            return Ok(Some(None));
        }
        self.state.step += 1;
        self.torn = false;
        tracing::warn!(
            step = self.state.step,
            "ZeRO: a step broke in the parameter gather on every rank that ran it; completed it from the updated shares, no step is lost"
        );
        Ok(Some(self.torn_metrics.take()))
    }

    /// A share of the optimizer state was lost: this rank drops its own
    /// (whole again, nothing in it) so the caller can restore the last
    /// committed checkpoint into it.
    fn must_roll_back(
        &mut self,
        from_step: u64,
        missing: Vec<u64>,
        ahead: Vec<u64>,
        old_world: u64,
        torn: bool,
    ) -> Result<WorldSync> {
        self.zero = None;
        self.torn = false;
        self.optimizer.reset()?;
        Ok(WorldSync::MustRollBack(LostShares {
            from_step,
            missing,
            ahead,
            old_world,
            torn,
        }))
    }

    /// After a `MustRollBack`, once every rank restored the checkpoint of
    /// `to_step` (0: the initial weights): the new partition, and what
    /// happened, for people.
    pub fn rolled_back(&mut self, lost: LostShares, to_step: u64) -> Result<Synced> {
        let LostShares {
            from_step,
            missing,
            ahead,
            old_world,
            torn,
        } = lost;
        let back_to = if to_step > 0 {
            format!("the checkpoint of step {to_step}")
        } else {
            "the initial weights".to_string()
        };
        let broke = "a step broke between updating the shares of the optimizer state and gathering the parameters";
        let ranks = |list: &[u64]| {
            format!(
                "rank{} {}",
                if list.len() > 1 { "s" } else { "" },
                list.iter()
                    .map(u64::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        };
        let mut parts = Vec::new();
        if !missing.is_empty() {
            parts.push(format!(
                "the optimizer state of {} of {old_world} was lost with its worker",
                ranks(&missing)
            ));
        }
        if !ahead.is_empty() {
            parts.push(format!(
                "the optimizer state of {} of {old_world} had moved a step past the others' ({broke} on some ranks only)",
                ranks(&ahead)
            ));
        }
        let why = match (parts.is_empty(), torn) {
            (false, true) if ahead.is_empty() => format!("{}, and {broke}", parts.join("; ")),
            (false, _) => parts.join("; "),
            (true, _) => format!("every rank's step {from_step} broke: {broke}"),
        };
        let reason = format!(
            "{why} (train.zero_stage = {}): back to {back_to}",
            self.stage
        );
        tracing::warn!(from_step, to_step, "{reason}");
        self.enter_zero()?;
        Ok(Synced {
            root: None,
            rollback: Some(Rollback {
                from_step,
                to_step,
                reason,
            }),
            ..Default::default()
        })
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
    fn take_state_and_parameters(&mut self, root: usize) -> Result<()> {
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
        broadcast_tensors(&params, root, self.collective.as_mut())
    }
}

/// A checkpoint's optimizer state: whole (`optimizer.safetensors`) or, under
/// ZeRO, one file per rank's share with a `partition.json`.
impl RankState {
    /// Loads the optimizer state of checkpoint `dir` at `step` (every rank):
    /// under ZeRO in a world of more than one, only this rank's share under
    /// the current world's partition (a sharded checkpoint of any world is
    /// re-cut); otherwise whole. Whatever share this rank held is dropped.
    pub fn restore_optimizer(&mut self, dir: &Path, step: u64, device: tch::Device) -> Result<()> {
        if self.zero.take().is_some() {
            self.optimizer.reset()?;
        }
        if dir.join("optimizer").join(PARTITION_FILE).exists() {
            let sharded = ShardedState::open(&dir.join("optimizer"))?;
            if self.stage > 0 && self.collective.world_size() > 1 {
                return self.restore_shares(&sharded, step);
            }
            let whole = sharded.whole(self.optimizer.names(), self.optimizer.params())?;
            self.optimizer.load_state(step, to_device(whole, device)?)
        } else {
            let path = dir.join("optimizer.safetensors");
            let tensors = to_device(model_io::read_tensors(&path)?, device)?;
            self.optimizer.load_state(step, tensors)
        }
    }

    /// This rank's share (and replica) under the partition of the current
    /// world, read from a sharded checkpoint's files: only the pieces it owns.
    fn restore_shares(&mut self, sharded: &ShardedState, step: u64) -> Result<()> {
        let (world, rank) = (self.collective.world_size(), self.collective.rank());
        let params = self.optimizer.params();
        let names = self.optimizer.names();
        let partition = Partition::new(params, names, world, rank, self.replicas);
        let pieces = partition.pieces(params);
        let copies = partition.replica_pieces(params);
        let own = sharded.pieces(names, params, &pieces)?;
        let replica = sharded.pieces(names, params, &copies)?;
        if self.adamw && step > 0 {
            for &(i, _, _) in pieces.iter().chain(&copies) {
                for kind in ["exp_avg", "exp_avg_sq"] {
                    let has = own
                        .iter()
                        .chain(&replica)
                        .any(|(k, j, _)| *k == kind && *j == i);
                    if !has {
                        return Err(Error::Config {
                            path: sharded.dir.join(PARTITION_FILE),
                            reason: format!("no {kind} for parameter {}", names[i]),
                        });
                    }
                }
            }
        }
        self.optimizer
            .install_pieces(&pieces, own, &copies, replica)?;
        self.optimizer.step = step;
        tracing::info!(
            world,
            rank,
            from_world = sharded.world,
            pieces = pieces.len(),
            "restored this rank's share of a sharded checkpoint"
        );
        self.zero = Some(partition);
        Ok(())
    }

    /// Writes the optimizer state into the checkpoint being assembled in
    /// `tmp` (every rank calls it; rank 0 made `tmp`). Whole: rank 0 writes
    /// `optimizer.safetensors`. Under ZeRO: rank 0 makes `tmp/optimizer/`,
    /// once every rank is past a barrier each writes its own share, and
    /// after a second one rank 0 adds `partition.json`. Returns whether this
    /// rank finishes the checkpoint (rank 0).
    pub fn write_optimizer(&mut self, tmp: &Path) -> Result<bool> {
        let Some(z) = &self.zero else {
            if self.collective.rank() == 0 {
                model_io::write_tensors(
                    &tmp.join("optimizer.safetensors"),
                    &self.optimizer.state(),
                )?;
            }
            return Ok(self.collective.rank() == 0);
        };
        let (world, rank) = (z.world(), z.rank());
        let shards = tmp.join("optimizer");
        if rank == 0 {
            std::fs::create_dir_all(&shards).map_err(io_err(&shards))?;
        }
        self.collective.barrier()?;
        let names = self.optimizer.names();
        let mine: Vec<(String, Tensor)> = self
            .optimizer
            .piece_states(false)
            .into_iter()
            .map(|(kind, i, _, t)| (format!("{kind}.{}", names[i]), t))
            .collect();
        model_io::write_tensors(&shards.join(shard_file(rank, world)), &mine)?;
        drop(mine);
        self.collective.barrier()?;
        if rank != 0 {
            return Ok(false);
        }
        let params = self.optimizer.params();
        let ranks: Vec<Value> = (0..world)
            .map(|r| {
                let pieces: Vec<Value> = z
                    .owners_pieces(params, r)
                    .into_iter()
                    .map(|(i, offset, len)| json!({"name": names[i], "offset": offset, "len": len}))
                    .collect();
                json!({"file": shard_file(r, world), "pieces": pieces})
            })
            .collect();
        let sizes: serde_json::Map<String, Value> = names
            .iter()
            .zip(params)
            .map(|(n, p)| (n.clone(), json!(p.numel())))
            .collect();
        model_io::write_json(
            &shards.join(PARTITION_FILE),
            &json!({"world": world, "stage": self.stage, "elements": sizes, "ranks": ranks}),
        )?;
        sync_dir(&shards)?;
        Ok(true)
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
                stopping: crate::train::EarlyStopping {
                    best: Some(0.25),
                    best_step: None,
                    bad_evals: 2,
                    stopped_early: false
                }
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
