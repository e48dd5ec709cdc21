//! What the ranks of a ZeRO world exchange when it forms, and the plan every
//! rank derives from it: keep the partition, take the whole state furthest
//! ahead, complete a step torn on every rank from the updated shares,
//! re-partition the furthest shares (a lost one rebuilt from its replica),
//! or — a share gone — go back to the last committed checkpoint.
//!
//! Pure: `dpo-worker` executes the plan on its tensors and collectives; the
//! coordinator's simulator (`dpo-sim`) drives the same plan over thousands of
//! simulated worlds and checks, against its own record of which share each
//! process holds, that no plan ever trains on from a share that is missing
//! or a step off.

/// One rank's summary when a sharded world forms: step, parameter hash, and
/// the partition of the optimizer state it holds (world 0: it holds it
/// whole). 48 bytes on the wire (six little-endian u64s).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Summary {
    pub step: u64,
    pub hash: u64,
    /// The world size of the partition it holds (0: whole).
    pub world: u64,
    /// Its rank in that partition (the share it owns).
    pub rank: u64,
    /// 1: a step broke between the share's update and the parameters' gather.
    pub torn: u64,
    /// 1: it also holds a replica of its predecessor's share (rank − 1).
    pub replica: u64,
}

impl Summary {
    pub const BYTES: usize = 48;

    pub fn to_bytes(self) -> Vec<u8> {
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

    /// `None` unless `b` is exactly one summary.
    pub fn from_bytes(b: &[u8]) -> Option<Summary> {
        if b.len() != Self::BYTES {
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

    fn sound(&self) -> bool {
        self.torn == 0
    }
}

/// What a forming ZeRO world does, given every rank's [`Summary`] in rank
/// order (index = rank in the new world).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// Ranks torn in step `step` of a partition over `world` ranks, none
    /// sound past it, and every share of that step among them (its owner, or
    /// the replica its successor keeps): the updated pieces of the parameters
    /// are gathered from them — share `k` from rank `contributors[k]` of the
    /// new world — and the torn ranks count the step done. Then plan again
    /// with the summaries that follow.
    CompleteTorn {
        step: u64,
        world: u64,
        replica: bool,
        contributors: Vec<usize>,
    },
    /// The same partition on the same ranks at the same state: nothing moves.
    Same,
    /// The state furthest ahead is whole (a start, or a checkpoint just
    /// restored): parameters from `root` where they differ, then a new
    /// partition.
    Whole { root: Option<usize> },
    /// The shares of the ranks furthest ahead, re-partitioned for the new
    /// world: share `k` of the old partition from rank `contributors[k].0`
    /// (`.1`: from the replica it keeps of its predecessor). `behind`: some
    /// rank takes state and parameters from `root` first. `recovered`: the
    /// shares rebuilt from replicas.
    Repartition {
        root: usize,
        behind: bool,
        contributors: Vec<(usize, bool)>,
        recovered: Vec<u64>,
    },
    /// A share of the optimizer state is gone: every rank goes back to the
    /// last committed checkpoint. `lost`: shares no rank holds; `ahead`:
    /// shares whose rank updated them a step past the others (torn on some
    /// ranks only); `from_step`: the furthest step a rank stood at (the
    /// checkpoint may be past it: the ranks that reached it are gone).
    RollBack {
        from_step: u64,
        lost: Vec<u64>,
        ahead: Vec<u64>,
        old_world: u64,
        torn: bool,
    },
}

/// The plan for a world whose ranks summarised themselves as `all`.
pub fn plan(all: &[Summary]) -> Plan {
    if let Some(p) = complete_torn(all) {
        return p;
    }
    // The state furthest ahead, among ranks whose state is whole.
    let Some(max) = all.iter().filter(|s| s.sound()).map(|s| s.step).max() else {
        let from_step = all.iter().map(|s| s.step).max().unwrap_or(0);
        return Plan::RollBack {
            from_step,
            lost: Vec::new(),
            ahead: Vec::new(),
            old_world: 0,
            torn: true,
        };
    };
    let leads: Vec<usize> = (0..all.len())
        .filter(|&i| all[i].sound() && all[i].step == max)
        .collect();
    let root = leads[0];
    let lead = all[root];
    let world = all.len() as u64;
    // Every rank whole (not torn: a torn rank's share is a step ahead of its
    // parameters — the simulator found a world that kept such a share and
    // applied its step's update twice).
    let same_world = all.iter().enumerate().all(|(r, s)| {
        s.sound()
            && (s.step, s.hash) == (lead.step, lead.hash)
            && s.world == world
            && s.rank == r as u64
    });
    if same_world {
        return Plan::Same;
    }
    // Every rank drops the share it holds and takes the whole state from
    // `root` — unless each already holds that state whole (a rank that held
    // a share at the same step keeps no optimizer state once it drops it:
    // the simulator found a world taking such a rank's empty moments).
    let whole = |root: usize| {
        let lead = all[root];
        let differ = !all
            .iter()
            .all(|s| (s.step, s.hash) == (lead.step, lead.hash) && s.world == 0);
        Plan::Whole {
            root: (world > 1 && differ).then_some(root),
        }
    };
    if lead.world == 0 {
        return whole(root);
    }
    let first = match shares_of(all, root) {
        Ok(plan) => return plan,
        Err(rollback) => rollback,
    };
    // The first rank furthest ahead cannot rebuild its partition, but
    // another rank at that step may hold the state whole (a process that
    // just restored the checkpoint of that very step) or a partition of
    // another world whose shares are all here: go on from it, losing no
    // step (the simulator found worlds going back to a checkpoint of the
    // step they stood at).
    if let Some(&r) = leads.iter().find(|&&r| all[r].world == 0) {
        return whole(r);
    }
    for &r in &leads[1..] {
        if all[r].world != lead.world
            && all[r].world > 0
            && let Ok(plan) = shares_of(all, r)
        {
            return plan;
        }
    }
    first
}

/// The shares of the partition `all[root]` holds, re-partitioned
/// ([`Plan::Repartition`]), or — one of them missing — the way back
/// ([`Plan::RollBack`]).
fn shares_of(all: &[Summary], root: usize) -> Result<Plan, Plan> {
    let lead = all[root];
    let max = lead.step;
    // Who contributes each of the lead's shares — the lowest rank that owned
    // it, else the one that kept its replica (the owner's successor) — and is
    // any missing? A rank torn in the lead's last step updated its shares for
    // that step before its parameter gather broke: its shares are the lead's
    // step's (its parameters come from the lead like any rank behind).
    let same = |s: &Summary| {
        s.world == lead.world
            && if s.sound() {
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
        let torn = all.iter().any(|s| !s.sound());
        // A missing share may still be here, but a step ahead: its rank
        // updated it and then broke (its peers did not get that far).
        let ahead: Vec<u64> = missing
            .iter()
            .copied()
            .filter(|&k| {
                all.iter()
                    .any(|s| !s.sound() && s.world == w0 && s.rank == k)
            })
            .collect();
        let lost = missing.into_iter().filter(|k| !ahead.contains(k)).collect();
        return Err(Plan::RollBack {
            // The furthest any rank stood (a torn rank's parameters too).
            from_step: all.iter().map(|s| s.step).max().unwrap_or(max),
            lost,
            ahead,
            old_world: w0,
            torn,
        });
    }
    let behind = all
        .iter()
        .any(|s| (s.step, s.hash) != (lead.step, lead.hash));
    Ok(Plan::Repartition {
        root,
        behind,
        contributors: contributors.into_iter().flatten().collect(),
        recovered,
    })
}

/// Ranks torn in the same step (each updated its shares, the parameter
/// gather broke) that no sound rank has gone past — every rank of a broken
/// world, say, with a joiner restored from an older checkpoint beside them —
/// with every share of that step among them: [`Plan::CompleteTorn`].
fn complete_torn(all: &[Summary]) -> Option<Plan> {
    let torn = |s: &&Summary| s.torn == 1 && s.world > 0;
    let kt = all.iter().filter(torn).map(|s| s.step).max()?;
    let sound_max = all.iter().filter(|s| s.sound()).map(|s| s.step).max();
    if sound_max.is_some_and(|m| m > kt) {
        // Sound ranks finished that step: the torn ranks' shares count as
        // theirs in the usual path.
        return None;
    }
    let lead = all.iter().find(|s| torn(s) && s.step == kt).copied()?;
    let w0 = lead.world;
    let member = |s: &Summary| completes(s, kt, w0);
    let holder = |k: u64, replica: bool| {
        all.iter()
            .position(|s| member(s) && s.rank == k && (!replica || (s.replica == 1 && w0 > 1)))
    };
    let contributors = (0..w0)
        .map(|k| holder(k, false).or_else(|| holder((k + 1) % w0, true)))
        .collect::<Option<Vec<usize>>>()?;
    Some(Plan::CompleteTorn {
        step: kt,
        world: w0,
        replica: lead.replica == 1,
        contributors,
    })
}

/// Whether `s` is torn in the step a [`Plan::CompleteTorn`] completes (its
/// step counts as done after the gather).
pub fn completes(s: &Summary, step: u64, world: u64) -> bool {
    s.torn == 1 && s.step == step && s.world == world
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(step: u64, world: u64, rank: u64, torn: u64, replica: u64) -> Summary {
        Summary {
            step,
            hash: step * 7 + 1,
            world,
            rank,
            torn,
            replica,
        }
    }

    #[test]
    fn a_summary_goes_through_its_bytes_and_nothing_else_parses() {
        let a = s(9, 4, 3, 1, 1);
        assert_eq!(Summary::from_bytes(&a.to_bytes()), Some(a));
        assert_eq!(Summary::from_bytes(&a.to_bytes()[..47]), None);
        assert_eq!(Summary::from_bytes(&[0; 49]), None);
    }

    #[test]
    fn the_same_world_moves_nothing_and_a_start_takes_the_whole_state() {
        assert_eq!(plan(&[s(5, 2, 0, 0, 0), s(5, 2, 1, 0, 0)]), Plan::Same);
        // Rank order swapped: the partition moves.
        assert!(matches!(
            plan(&[s(5, 2, 1, 0, 0), s(5, 2, 0, 0, 0)]),
            Plan::Repartition { behind: false, .. }
        ));
        assert_eq!(
            plan(&[s(0, 0, 0, 0, 0), s(0, 0, 0, 0, 0)]),
            Plan::Whole { root: None }
        );
        // A joiner from an older checkpoint beside a restored checkpoint.
        assert_eq!(
            plan(&[s(3, 0, 0, 0, 0), s(6, 0, 0, 0, 0)]),
            Plan::Whole { root: Some(1) }
        );
    }

    #[test]
    fn a_lost_share_comes_from_its_replica_or_the_world_rolls_back() {
        // World of 3 lost rank 1; rank 2 keeps rank 1's replica.
        let with = [s(8, 3, 0, 0, 1), s(8, 3, 2, 0, 1), s(2, 0, 0, 0, 0)];
        assert_eq!(
            plan(&with),
            Plan::Repartition {
                root: 0,
                behind: true,
                contributors: vec![(0, false), (1, true), (1, false)],
                recovered: vec![1],
            }
        );
        let without = [s(8, 3, 0, 0, 0), s(8, 3, 2, 0, 0)];
        assert_eq!(
            plan(&without),
            Plan::RollBack {
                from_step: 8,
                lost: vec![1],
                ahead: vec![],
                old_world: 3,
                torn: false,
            }
        );
    }

    #[test]
    fn a_partition_that_cannot_be_rebuilt_gives_way_to_another_rank_at_that_step() {
        // Rank 0 holds a share of a world of 2 whose other share is gone;
        // rank 1 restored the checkpoint of that very step: go on from it,
        // every rank taking its whole state (rank 0 dropped its share).
        assert_eq!(
            plan(&[s(21, 2, 0, 0, 0), s(21, 0, 0, 0, 0)]),
            Plan::Whole { root: Some(1) }
        );
        // Or another partition at that step, whole among the others.
        assert_eq!(
            plan(&[
                s(8, 2, 0, 0, 0),
                s(8, 3, 0, 0, 0),
                s(8, 3, 1, 0, 0),
                s(8, 3, 2, 0, 0)
            ]),
            Plan::Repartition {
                root: 1,
                behind: false,
                contributors: vec![(1, false), (2, false), (3, false)],
                recovered: vec![],
            }
        );
        // A whole state first in rank order, a share of the same step beside
        // it: the sharded rank drops its share, so the whole state is sent.
        assert_eq!(
            plan(&[s(21, 0, 0, 0, 0), s(21, 2, 1, 0, 0)]),
            Plan::Whole { root: Some(0) }
        );
    }

    #[test]
    fn a_step_torn_everywhere_is_completed_and_torn_on_some_ranks_rolls_back() {
        // Both ranks of a world of 2 tore in step 5 (their step is still 4).
        let both = [s(4, 2, 0, 1, 0), s(4, 2, 1, 1, 0), s(1, 0, 0, 0, 0)];
        assert_eq!(
            plan(&both),
            Plan::CompleteTorn {
                step: 4,
                world: 2,
                replica: false,
                contributors: vec![0, 1],
            }
        );
        assert!(completes(&both[0], 4, 2) && !completes(&both[2], 4, 2));
        // Rank 0 finished step 5, rank 1 tore in it: rank 1's share is the
        // step's, taken from it.
        let one = [s(5, 2, 0, 0, 0), s(4, 2, 1, 1, 0)];
        assert!(matches!(
            plan(&one),
            Plan::Repartition { contributors, .. } if contributors == vec![(0, false), (1, false)]
        ));
        // Rank 0 tore in step 5, rank 1 (paused) did not update its share:
        // the same ranks at the same step, but rank 0's share is a step
        // ahead — not the same world: back to the checkpoint.
        let kept = [s(4, 2, 0, 1, 0), s(4, 2, 1, 0, 0)];
        assert!(matches!(plan(&kept), Plan::RollBack { ref ahead, .. } if ahead == &vec![0]));
        // Rank 1 tore in step 5 while rank 0 (and rank 2) are still at 4
        // and rank 1's partner share is gone: a step ahead, back to the
        // checkpoint.
        let ahead = [s(4, 3, 0, 0, 0), s(4, 3, 1, 1, 0)];
        assert_eq!(
            plan(&ahead),
            Plan::RollBack {
                from_step: 4,
                lost: vec![2],
                ahead: vec![1],
                old_world: 3,
                torn: true,
            }
        );
    }
}
