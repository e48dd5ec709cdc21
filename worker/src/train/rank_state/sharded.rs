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
        // The completed step's metrics are this rank's last applied ones: if
        // this world breaks before they are reported, the next one reports
        // them (the chaos soak saw the step before's metrics re-reported as
        // this step's, which the coordinator refused, failing the run).
        let metrics = self.torn_metrics.take();
        self.applied = metrics.clone();
        Ok(Some(metrics))
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
