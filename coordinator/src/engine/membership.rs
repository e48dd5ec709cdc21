//! Membership: registered workers, their leases (a worker silent for the lease
//! time is gone), and the generation — the world of ranks training the active
//! run, re-formed whenever a member is lost or new workers can join.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dpo_proto::v1;

use super::constant_time_eq;
use super::runs::{RunData, RunState};
use super::{Effect, Engine, Now, Refusal, Result, to_json};
use crate::store::GENERATION_KEY;

/// A registered worker.
#[derive(Debug)]
pub(super) struct Worker {
    pub(super) info: v1::WorkerInfo,
    /// Join order: the oldest workers take the lowest ranks.
    seq: u64,
    last_seen: Instant,
    /// Its open assignment stream (`None` until it opens one).
    stream: Option<u64>,
    /// When it opened that stream: from then on it is ready to train.
    ready_since: Instant,
    /// Its etcd lease (etcd store).
    lease: Option<i64>,
    /// The secret it was given at registration: what proves a later request
    /// comes from this worker.
    session: Vec<u8>,
}

/// The world training the active run.
#[derive(Debug, Clone)]
pub(super) struct Generation {
    pub(super) run_id: String,
    pub(super) number: u64,
    /// Worker ids in rank order.
    pub(super) members: Vec<String>,
    /// Each member's rank (every member request is checked against it: a
    /// lookup, not a walk of the world).
    pub(super) rank_of: HashMap<String, u32>,
}

/// What [`Engine::census`] counts.
struct Census {
    ready: usize,
    ready_members: usize,
    settled: bool,
    /// Workers whose lease lapsed, with their join order.
    lapsed: Vec<(u64, String)>,
}

/// Who sends a request about a generation: a worker, as rank `rank` of
/// generation `generation` of run `run`.
#[derive(Debug, Clone)]
pub struct Member {
    pub worker: String,
    pub run: String,
    pub generation: u64,
    pub rank: u32,
}

impl Member {
    /// The wire form, checked for presence (the rest is checked against the
    /// current generation).
    pub fn from_proto(m: Option<&v1::Member>) -> Result<Self> {
        let m = m.ok_or_else(|| Refusal::Invalid("member: missing".into()))?;
        Ok(Member {
            worker: m.worker_id.clone(),
            run: m.run_id.clone(),
            generation: m.generation,
            rank: m.rank,
        })
    }
}

/// 32 random bytes (two v4 UUIDs, 244 random bits): a generation's ring key, a
/// worker's session.
fn secret() -> Vec<u8> {
    let mut k = uuid::Uuid::new_v4().as_bytes().to_vec();
    k.extend_from_slice(uuid::Uuid::new_v4().as_bytes());
    k
}

impl Engine {
    /// Checks a registration before its lease is taken in the store.
    pub fn check_registration(req: &v1::RegisterRequest) -> Result<()> {
        if req.worker_id.is_empty() || req.worker_id.len() > 128 {
            return Err(Refusal::Invalid("worker_id: 1 to 128 characters".into()));
        }
        // What a worker says of itself is shown on pages and kept in records:
        // bounded, like everything else it reports.
        for (field, value, max) in [
            ("hostname", &req.hostname, 255),
            ("device", &req.device, 64),
        ] {
            if value.len() > max {
                return Err(Refusal::Invalid(format!(
                    "{field}: {} bytes; at most {max}",
                    value.len()
                )));
            }
        }
        if req.collective_addr.parse::<std::net::SocketAddr>().is_err() {
            return Err(Refusal::Invalid(format!(
                "collective_addr: {:?} is not host:port (an IP address)",
                req.collective_addr
            )));
        }
        Ok(())
    }

    /// Whether a known worker's lease is live and `session` is not its own:
    /// a request that must be refused (someone else using its id).
    fn impostor(&self, worker: &str, session: &[u8], now: Now) -> bool {
        self.workers.get(worker).is_some_and(|w| {
            now.instant.saturating_duration_since(w.last_seen) <= self.lease_ttl
                && !constant_time_eq(&w.session, session)
        })
    }

    /// Checks that a re-registration of a live worker comes from it (its
    /// session); a lapsed or unknown id may be taken afresh.
    pub fn check_session(&self, req: &v1::RegisterRequest, now: Now) -> Result<()> {
        if self.impostor(&req.worker_id, &req.session, now) {
            return Err(Refusal::Denied(format!(
                "worker {} is registered and alive; re-registering it needs its session",
                req.worker_id
            )));
        }
        Ok(())
    }

    /// Registers a worker (or refreshes a known one) holding `lease`. A live
    /// worker's id is taken only with its session.
    pub fn register(
        &mut self,
        req: v1::RegisterRequest,
        lease: Option<i64>,
        now: Now,
    ) -> Result<v1::RegisterResponse> {
        if let Err(e) = self.check_session(&req, now) {
            if let Some(lease) = lease {
                self.effects.push(Effect::RevokeLease(lease));
            }
            return Err(e);
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        let live = self
            .workers
            .get(&req.worker_id)
            .is_some_and(|w| now.instant.saturating_duration_since(w.last_seen) <= self.lease_ttl);
        let session = match self.workers.get_mut(&req.worker_id) {
            Some(w) if live => {
                w.info.collective_addr = req.collective_addr;
                w.last_seen = now.instant;
                if let Some(old) = std::mem::replace(&mut w.lease, lease) {
                    self.effects.push(Effect::RevokeLease(old));
                }
                w.session.clone()
            }
            _ => {
                // New, or its lease lapsed before the coordinator noticed: a
                // fresh registration (the old one's lease and stream go).
                if let Some(old) = self.workers.remove(&req.worker_id) {
                    self.streams -= usize::from(old.stream.is_some());
                    if let Some(l) = old.lease {
                        self.effects.push(Effect::RevokeLease(l));
                    }
                }
                tracing::info!(worker = %req.worker_id, addr = %req.collective_addr, "worker registered");
                let info = v1::WorkerInfo {
                    id: req.worker_id.clone(),
                    collective_addr: req.collective_addr,
                    device: req.device,
                    hostname: req.hostname,
                    run_id: String::new(),
                    generation: 0,
                    rank: -1,
                    last_seen_ms: 0,
                    nccl: req.nccl,
                    local_rank: req.local_rank,
                };
                let session = secret();
                self.workers.insert(
                    req.worker_id,
                    Worker {
                        info,
                        seq,
                        last_seen: now.instant,
                        stream: None,
                        ready_since: now.instant,
                        lease,
                        session: session.clone(),
                    },
                );
                session
            }
        };
        let ttl = self.lease_ttl.as_millis() as u64;
        Ok(v1::RegisterResponse {
            lease_ttl_ms: ttl,
            heartbeat_ms: (ttl / 4).max(100),
            session,
        })
    }

    /// A worker's heartbeat: `None` when it is unknown or the session is not
    /// its own (it must register again), else its etcd lease to renew.
    pub fn heartbeat(&mut self, worker: &str, session: &[u8], now: Now) -> Option<Option<i64>> {
        let w = self.workers.get_mut(worker)?;
        if !constant_time_eq(&w.session, session) {
            return None;
        }
        w.last_seen = now.instant;
        Some(w.lease)
    }

    /// A worker opened its assignment stream (with its session): returns the
    /// stream's id.
    pub fn open_stream(&mut self, worker: &str, session: &[u8], now: Now) -> Result<u64> {
        self.next_stream += 1;
        let id = self.next_stream;
        let Some(w) = self.workers.get_mut(worker) else {
            return Err(Refusal::NotFound(format!(
                "worker {worker} is not registered"
            )));
        };
        if !constant_time_eq(&w.session, session) {
            return Err(Refusal::Denied(format!(
                "worker {worker}: the assignment stream needs the worker's session"
            )));
        }
        let replaced = w.stream.replace(id).is_some();
        w.last_seen = now.instant;
        w.ready_since = now.instant;
        if !replaced {
            self.streams += 1;
        }
        // A member on a new stream may have lost what was sent on the old one
        // (its assignment, an abort): the coordinator cannot know what it
        // holds, so its world forms again, with it.
        let member = self
            .active
            .as_ref()
            .is_some_and(|g| g.rank_of.contains_key(worker));
        if replaced
            && member
            && let Some(g) = self.active.take()
        {
            tracing::warn!(worker = %worker, generation = g.number, "a member opened a new assignment stream; forming its world again");
            self.abort_generation(&g, "a member reconnected");
        }
        // A new ready worker changes the world at once only when the ready
        // ones fill it to max_workers (below that, the periodic reconcile
        // forms or grows it once joiners settle), or when the run to train
        // has not been told it waits yet: a cold start of W workers costs W
        // lookups, not W passes over W workers.
        let now_matters = self.next_run().is_some_and(|(id, _, max)| {
            self.streams >= max
                || !matches!(
                    self.runs.get(&id).map(|r| r.state),
                    Some(RunState::Waiting | RunState::Running)
                )
        });
        if (replaced && member) || now_matters {
            self.reconcile(now)?;
        }
        Ok(id)
    }

    /// A worker's stream `stream` closed (its process died or it disconnected):
    /// it is gone at once, without waiting for its lease to lapse. A stream it
    /// already replaced changes nothing.
    pub fn stream_closed(&mut self, worker: &str, stream: u64, now: Now) -> Result<()> {
        let current = self
            .workers
            .get(worker)
            .is_some_and(|w| w.stream == Some(stream));
        if !current {
            return Ok(());
        }
        self.drop_worker(worker);
        tracing::warn!(worker = %worker, "worker disconnected");
        self.reconcile(now)
    }

    /// Drops a worker (and its etcd lease).
    fn drop_worker(&mut self, id: &str) {
        if let Some(w) = self.workers.remove(id) {
            self.streams -= usize::from(w.stream.is_some());
            self.counters.workers_lost += 1;
            if let Some(lease) = w.lease {
                self.effects.push(Effect::RevokeLease(lease));
            }
        }
    }

    /// Registered workers in join order.
    pub fn workers(&self, now: Now) -> Vec<v1::WorkerInfo> {
        let mut out: Vec<(u64, v1::WorkerInfo)> = self
            .workers
            .values()
            .map(|w| {
                let mut info = w.info.clone();
                info.last_seen_ms = now
                    .instant
                    .saturating_duration_since(w.last_seen)
                    .as_millis() as u64;
                (w.seq, info)
            })
            .collect();
        out.sort_by_key(|(s, _)| *s);
        out.into_iter().map(|(_, i)| i).collect()
    }

    /// Tells a generation's members to stop it.
    fn abort_generation(&mut self, g: &Generation, reason: &str) {
        for m in &g.members {
            self.send(
                m,
                v1::assignment::Kind::Abort(v1::Abort {
                    generation: g.number,
                    reason: reason.into(),
                }),
            );
        }
    }

    /// A member's collective broke: end the generation so a new one forms.
    pub fn fault(&mut self, member: &Member, reason: &str, now: Now) -> Result<()> {
        if self.check_member(member, false).is_err() {
            return Ok(()); // already superseded
        }
        let reason = super::reports::truncated(reason, super::reports::MAX_MESSAGE_BYTES);
        tracing::warn!(worker = %member.worker, generation = member.generation, %reason, "generation fault reported");
        if let Some(g) = self.active.take() {
            self.abort_generation(&g, &reason);
        }
        self.reconcile(now)
    }

    /// The host a worker runs on: its hostname (its id when it gave none, so
    /// workers that did not say are never taken for neighbours).
    fn host_of(&self, id: &str) -> String {
        match self.workers.get(id) {
            Some(w) if !w.info.hostname.is_empty() => w.info.hostname.clone(),
            _ => id.to_string(),
        }
    }

    /// The members in rank order: the ranks of one host next to each other
    /// (in local-rank order, so `dpo-worker --gpus N`'s GPUs are consecutive
    /// ranks, and a ring or NCCL's topology crosses hosts as rarely as it
    /// can), hosts in the order their first member joined.
    fn placed(&self, mut members: Vec<String>) -> Vec<String> {
        let host = |id: &String| self.host_of(id);
        let mut first: HashMap<String, u64> = HashMap::new();
        for id in &members {
            let seq = self.workers[id].seq;
            first
                .entry(host(id))
                .and_modify(|s| *s = (*s).min(seq))
                .or_insert(seq);
        }
        members.sort_by_key(|id| {
            let w = &self.workers[id];
            (first[&host(id)], w.info.local_rank, w.seq)
        });
        members
    }

    /// The run to train — the oldest that has not ended — with its least and
    /// most workers.
    fn next_run(&self) -> Option<(String, usize, usize)> {
        let r = self
            .runs
            .values()
            .filter(|r| !r.state.terminal())
            .min_by_key(|r| r.submitted_ms)?;
        let c = &r.spec.cluster;
        Some((
            r.id.clone(),
            c.min_workers.max(1),
            c.max_workers.max(c.min_workers).max(1),
        ))
    }

    /// How long no worker may have become ready before a world forms or grows
    /// with those that did: a cold start of hundreds of workers forms one
    /// world, not one per joiner.
    pub fn join_settle(&self) -> Duration {
        self.lease_ttl / 5
    }

    /// One pass over the workers, copying only the ids of lapsed ones (in
    /// `lapsed`, counted as gone): how many are ready,
    /// how many of them are members of `world` (a member's info names its
    /// generation), and whether the others — the joiners — have settled:
    /// none became ready within the settling window, or one of them has
    /// already waited a whole lease (a worker restarting in a loop cannot
    /// hold the others back for ever).
    fn census(&self, world: Option<&Generation>, now: Now) -> Census {
        let mut c = Census {
            ready: 0,
            ready_members: 0,
            settled: true,
            lapsed: Vec::new(),
        };
        let (mut newest, mut oldest): (Option<Duration>, Option<Duration>) = (None, None);
        debug_assert_eq!(
            self.workers.values().filter(|w| w.stream.is_some()).count(),
            self.streams,
            "the count of open streams drifted"
        );
        for (id, w) in &self.workers {
            if now.instant.saturating_duration_since(w.last_seen) > self.lease_ttl {
                // Counted as gone (the caller drops it).
                c.lapsed.push((w.seq, id.clone()));
                continue;
            }
            if w.stream.is_none() {
                continue;
            }
            c.ready += 1;
            let member = world.is_some_and(|g| {
                w.info.generation == g.number && w.info.run_id == g.run_id && w.info.rank >= 0
            });
            if member {
                c.ready_members += 1;
            } else {
                let waited = now.instant.saturating_duration_since(w.ready_since);
                newest = Some(newest.map_or(waited, |n| n.min(waited)));
                oldest = Some(oldest.map_or(waited, |o| o.max(waited)));
            }
        }
        if let (Some(newest), Some(oldest)) = (newest, oldest) {
            c.settled = newest >= self.join_settle() || oldest >= self.lease_ttl;
        }
        c
    }

    /// Expires lapsed leases, picks the run to train (FIFO), and forms, repairs or
    /// grows its generation. A world grows, or forms below `max_workers`, only
    /// once its joiners have settled ([`Engine::join_settle`]); the periodic
    /// call does it then. A whole world that need not change costs one pass
    /// over the workers, copying nothing.
    pub fn reconcile(&mut self, now: Now) -> Result<()> {
        let ttl = self.lease_ttl;
        // One pass: the lapsed, and how the current world stands without them.
        let mut census = self.census(self.active.as_ref(), now);
        // In join order, whatever the map's: the same inputs decide the same effects.
        census.lapsed.sort_unstable();
        for (_, id) in std::mem::take(&mut census.lapsed) {
            tracing::warn!(worker = %id, ttl_ms = ttl.as_millis() as u64, "worker lease lapsed");
            self.drop_worker(&id);
        }
        let Some((run_id, min, max)) = self.next_run() else {
            return Ok(());
        };
        // Is the current generation still whole, and is it as big as it may be?
        if let Some(g) = self.active.take() {
            let c = census;
            let whole = g.run_id == run_id && c.ready_members == g.members.len();
            let can_grow = g.members.len() < max && c.ready > g.members.len();
            // Joiners enough to fill the world need not wait for more.
            let grow_now = c.ready >= max || c.settled;
            if whole && !(can_grow && grow_now) {
                self.active = Some(g);
                return Ok(());
            }
            let reason = if whole {
                "new workers joined"
            } else {
                "a member was lost"
            };
            tracing::info!(run = %run_id, generation = g.number, reason, "ending generation");
            self.abort_generation(&g, reason);
        }
        let ready: Vec<String> = {
            let mut v: Vec<(&String, &Worker)> = self
                .workers
                .iter()
                .filter(|(_, w)| w.stream.is_some())
                .collect();
            v.sort_by_key(|(_, w)| w.seq);
            v.into_iter().map(|(id, _)| id.clone()).collect()
        };
        if ready.len() < min {
            if self.runs[&run_id].state != RunState::Waiting {
                tracing::info!(run = %run_id, ready = ready.len(), min, "waiting for workers");
            }
            return self.set_state(&run_id, RunState::Waiting);
        }
        if ready.len() < max && !self.census(None, now).settled {
            tracing::debug!(run = %run_id, ready = ready.len(), "waiting for joiners to settle");
            return self.set_state(&run_id, RunState::Waiting);
        }
        let members = self.placed(ready.into_iter().take(max).collect());
        let number = self.generation + 1;
        // The fencing token first: every later commit of this generation compares it.
        self.effects.push(Effect::Store {
            run: Some(run_id.clone()),
            fence: None,
            writes: vec![(GENERATION_KEY.to_string(), Some(number.to_string()))],
        });
        self.generation = number;
        self.counters.generations_formed += 1;
        let all_nccl = members.iter().all(|m| self.workers[m].info.nccl);
        let backend = match self.runs[&run_id].spec.cluster.backend {
            dpo_proto::spec::Backend::Nccl => "nccl",
            dpo_proto::spec::Backend::Auto if all_nccl => "nccl",
            _ => "tcp",
        };
        // Every rank's collective address, in rank order: what a TCP ring
        // connects to. NCCL finds its peers through rank 0's bootstrap id and
        // reads none, so its assignments carry none — W addresses in each of
        // W assignments would make forming a world quadratic (~64 MB on the
        // wire for 2,048 ranks).
        let peers: Vec<String> = if backend == "tcp" {
            members
                .iter()
                .map(|m| self.workers[m].info.collective_addr.clone())
                .collect()
        } else {
            Vec::new()
        };
        let record = self
            .runs
            .get_mut(&run_id)
            .ok_or_else(|| Refusal::Internal("run vanished".into()))?;
        record.generation = number;
        record.world_size = members.len() as u32;
        let work = v1::Work {
            run_id: run_id.clone(),
            spec_json: to_json(&record.spec)?,
            generation: number,
            rank: 0,
            world_size: members.len() as u32,
            peers,
            backend: backend.into(),
            steps_per_epoch: record.steps_per_epoch,
            total_steps: record.total_steps,
            resume_checkpoint: record.checkpoint_path.clone(),
            resume_step: record.checkpoint_step,
            has_eval: record.eval_examples > 0,
            ring_key: secret(),
            host_ranks: 0,
        };
        // How many ranks share each host: each divides its cores among them.
        let mut per_host: HashMap<String, u32> = HashMap::new();
        for m in &members {
            *per_host.entry(self.host_of(m)).or_default() += 1;
        }
        tracing::info!(run = %run_id, generation = number, world_size = members.len(), "generation formed");
        for (rank, m) in members.iter().enumerate() {
            if let Some(w) = self.workers.get_mut(m) {
                w.info.run_id = run_id.clone();
                w.info.generation = number;
                w.info.rank = rank as i32;
            }
            let mut w = work.clone();
            w.rank = rank as u32;
            w.host_ranks = per_host.get(&self.host_of(m)).copied().unwrap_or(1);
            self.send(m, v1::assignment::Kind::Work(w));
        }
        let rank_of = members
            .iter()
            .enumerate()
            .map(|(r, m)| (m.clone(), r as u32))
            .collect();
        self.active = Some(Generation {
            run_id: run_id.clone(),
            number,
            members,
            rank_of,
        });
        let was_running = self.runs[&run_id].state == RunState::Running;
        self.set_state(&run_id, RunState::Running)?;
        if was_running {
            // set_state persisted nothing: the new generation and world size.
            self.persist_run(&run_id)?;
        }
        self.emit(&run_id, None);
        Ok(())
    }

    /// Checks that `member` is what it claims: a member of the current
    /// generation of its run, at its rank (and rank 0 when `rank0`).
    pub(super) fn check_member(&self, member: &Member, rank0: bool) -> Result<()> {
        let (worker, run, generation) = (&member.worker, &member.run, member.generation);
        let Some(g) = &self.active else {
            return Err(Refusal::Stale(format!(
                "generation {generation} is not current (no generation is running)"
            )));
        };
        if g.run_id != *run || g.number != generation {
            return Err(Refusal::Stale(format!(
                "generation {generation} of run {run} is not current (current: {} of run {})",
                g.number, g.run_id
            )));
        }
        let Some(&p) = g.rank_of.get(worker) else {
            return Err(Refusal::Stale(format!(
                "worker {worker} is not a member of generation {generation}"
            )));
        };
        let want = if rank0 { 0 } else { member.rank };
        if p != member.rank || p != want {
            return Err(Refusal::Stale(format!(
                "worker {worker} is rank {p} of generation {generation}, not {want}"
            )));
        }
        Ok(())
    }

    /// For a member's request: the run's data, the world size, and its
    /// record's total steps and micro-batch size. The data is shared: what is
    /// cut from it is cut outside the lock.
    pub fn member_view(&self, member: &Member) -> Result<(Arc<RunData>, usize, u64, usize)> {
        self.check_member(member, false)?;
        let world = self.active.as_ref().map_or(1, |g| g.members.len());
        let data = self
            .data
            .get(&member.run)
            .cloned()
            .ok_or_else(|| Refusal::NotFound(format!("run {} has no data", member.run)))?;
        let r = self
            .runs
            .get(&member.run)
            .ok_or_else(|| Refusal::NotFound(format!("no run {}", member.run)))?;
        Ok((data, world, r.total_steps, r.spec.micro_batch_size().max(1)))
    }

    /// Whether `worker` is rank 0 of the active generation.
    pub(super) fn is_rank0(&self, worker: &str) -> bool {
        self.active
            .as_ref()
            .is_some_and(|g| g.members.first().is_some_and(|m| m == worker))
    }
}
