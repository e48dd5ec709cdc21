//! A ZeRO world forming ([`RankState::sync_world`] under `train.zero_stage`
//! ≥ 1): the ranks' summaries compared, a step torn on every rank completed
//! from the updated shares, the optimizer state re-partitioned for the new
//! world from the shares of the ranks furthest ahead (or their replicas),
//! and, when a share is lost, the way back to the last checkpoint; and the
//! hand-off of leaving ranks' shares.

use super::{Metrics, RankState, Rollback, Synced, WorldSync};
use crate::collective::CollectiveError;
use crate::error::Result;
use crate::zero::Partition;
use dpo_proto::zero::{self, Plan, Summary};

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

impl RankState {
    /// [`RankState::sync_world`] under ZeRO: the ranks' summaries gathered,
    /// the plan they give ([`zero::plan`], the same on every rank) carried
    /// out.
    pub(super) fn sync_world_sharded(&mut self) -> Result<WorldSync> {
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
        let (root, contributors, recovered, lead) = match zero::plan(&all) {
            Plan::CompleteTorn {
                step,
                world: w0,
                replica,
                contributors,
            } => {
                let completed = self.complete_torn_step(&all, step, w0, replica, &contributors)?;
                // Those ranks are whole at the completed step now: the
                // usual path.
                return Ok(match self.sync_world_sharded()? {
                    WorldSync::Synced(mut synced) => {
                        synced.completed = synced.completed.or(completed);
                        WorldSync::Synced(synced)
                    }
                    other => other,
                });
            }
            Plan::Same => return Ok(WorldSync::Synced(Synced::default())),
            Plan::Whole { root } => {
                // The plain broadcast, then the new partition.
                self.unshard()?;
                if let Some(root) = root {
                    self.sync_from(root)?;
                }
                self.enter_zero()?;
                return Ok(WorldSync::Synced(Synced {
                    root,
                    rollback: None,
                    ..Default::default()
                }));
            }
            Plan::RollBack {
                from_step,
                lost,
                ahead,
                old_world,
                torn,
            } => return self.must_roll_back(from_step, lost, ahead, old_world, torn),
            Plan::Repartition {
                root,
                behind,
                contributors,
                recovered,
            } => {
                // Parameters and position from the root where they differ.
                if behind {
                    self.take_state_and_parameters(root)?;
                }
                (behind.then_some(root), contributors, recovered, all[root])
            }
        };
        if !recovered.is_empty() {
            tracing::warn!(
                shares = ?recovered,
                "ZeRO: rebuilt lost shares of the optimizer state from their replicas; no step is lost"
            );
        }
        // The optimizer state: each element from its one contributor, to its
        // new owner (and its new replica).
        let mut contribution = Vec::new();
        for &(r, replica) in &contributors {
            if r == rank {
                contribution.extend(self.optimizer.piece_states(replica));
            }
        }
        let new = Partition::new(
            self.optimizer.params(),
            self.optimizer.names(),
            world,
            rank,
            self.replicas,
        );
        let moments = self.adamw && lead.step > 0;
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
            root,
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

    /// A [`Plan::CompleteTorn`]: the updated pieces of the parameters of
    /// torn step `step` (of a partition over `w0` ranks) gathered from
    /// `contributors` (every rank of this world takes part; the others
    /// contribute nothing); on a torn rank the step counts as done and its
    /// metrics, kept when it tore, are returned to report.
    fn complete_torn_step(
        &mut self,
        all: &[Summary],
        step: u64,
        w0: u64,
        replica: bool,
        contributors: &[usize],
    ) -> Result<Option<Metrics>> {
        let rank = self.collective.rank();
        let old = Partition::new(
            self.optimizer.params(),
            self.optimizer.names(),
            w0 as usize,
            0,
            replica,
        );
        let params = self.optimizer.params();
        let mut mine = Vec::new();
        for (k, c) in contributors.iter().enumerate() {
            if *c == rank {
                mine.extend(old.owners_pieces(params, k));
            }
        }
        old.assemble_parameters(params, &mine, self.collective.as_mut())?;
        if !zero::completes(&all[rank], step, w0) {
            // Not torn in that step: this rank takes the state it lacks next.
            return Ok(None);
        }
        self.state.step += 1;
        self.torn = false;
        tracing::warn!(
            step = self.state.step,
            "ZeRO: a step broke in the parameter gather on every rank that ran it; completed it from the updated shares, no step is lost"
        );
        // The completed step's metrics are this rank's last applied ones: if
        // this world breaks before they are reported, the next one reports
        // them (the chaos soak saw the step before's metrics re-reported as
        // this step's, which the coordinator refused, failing the run).
        let metrics = self.torn_metrics.take();
        self.applied = metrics.clone();
        Ok(metrics)
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
}
