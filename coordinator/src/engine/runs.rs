//! Runs: their records, their tokenized data, their life from queued to ended.

use std::path::PathBuf;
use std::sync::Arc;

use dpo_data::Example;
use dpo_data::batches::EpochPlan;
use dpo_proto::{Loss, RunSpec, v1};
use serde::{Deserialize, Serialize};

use super::reference::ReferenceStage;
use super::{Effect, Engine, Now, Refusal, Result, ledger_key, ledger_prefix};

/// Where a run is in its life. Stored as the wire enum's number, so records
/// written by earlier versions read back unchanged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "i32", from = "i32")]
pub enum RunState {
    Queued,
    Waiting,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl RunState {
    /// Ended: it will not train again.
    pub fn terminal(self) -> bool {
        self.to_proto().is_terminal()
    }

    pub fn to_proto(self) -> v1::RunState {
        match self {
            RunState::Queued => v1::RunState::Queued,
            RunState::Waiting => v1::RunState::Waiting,
            RunState::Running => v1::RunState::Running,
            RunState::Succeeded => v1::RunState::Succeeded,
            RunState::Failed => v1::RunState::Failed,
            RunState::Cancelled => v1::RunState::Cancelled,
        }
    }
}

impl From<RunState> for i32 {
    fn from(s: RunState) -> i32 {
        s.to_proto() as i32
    }
}

impl From<i32> for RunState {
    /// Unknown numbers (none are written) read as queued, which re-validates.
    fn from(n: i32) -> Self {
        match v1::RunState::try_from(n) {
            Ok(v1::RunState::Waiting) => RunState::Waiting,
            Ok(v1::RunState::Running) => RunState::Running,
            Ok(v1::RunState::Succeeded) => RunState::Succeeded,
            Ok(v1::RunState::Failed) => RunState::Failed,
            Ok(v1::RunState::Cancelled) => RunState::Cancelled,
            _ => RunState::Queued,
        }
    }
}

/// A run as the store keeps it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunRecord {
    pub id: String,
    pub name: String,
    pub spec: RunSpec,
    pub state: RunState,
    /// Optimizer steps whose metrics were recorded (each exactly once).
    pub step: u64,
    pub total_steps: u64,
    pub steps_per_epoch: u64,
    pub train_examples: u64,
    pub eval_examples: u64,
    pub generation: u64,
    pub world_size: u32,
    pub error: String,
    /// The newest committed checkpoint (its own key is the authority while the
    /// run is active; the record carries it into the history).
    pub checkpoint_step: u64,
    pub checkpoint_path: String,
    pub submitted_ms: i64,
    pub finished_ms: i64,
    pub last_metrics: Vec<(String, f64)>,
    pub last_eval: Vec<(String, f64)>,
    pub eval_step: u64,
    /// The identity that submitted it (its token's name; "admin" without
    /// named tokens): only it and admins see it.
    #[serde(default)]
    pub owner: String,
    /// Returns to a checkpoint, in order (a generation counts once).
    #[serde(default)]
    pub rollbacks: Vec<RollbackRecord>,
    /// Where the tokenized shards are.
    pub shard_dir: PathBuf,
    /// Ledger entries that an earlier version kept inside the record; moved to
    /// their own keys when such a record is restored, never written.
    #[serde(default, skip_serializing)]
    pub ledger_tail: Vec<LedgerEntry>,
    /// Reference-stage progress (examples needing sums, examples cached).
    #[serde(default)]
    pub reference_total: u64,
    #[serde(default)]
    pub reference_cached: u64,
}

/// A generation's return to the last committed checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RollbackRecord {
    pub generation: u64,
    pub from_step: u64,
    pub to_step: u64,
    pub reason: String,
}

impl RollbackRecord {
    pub fn to_proto(&self) -> v1::Rollback {
        v1::Rollback {
            generation: self.generation,
            from_step: self.from_step,
            to_step: self.to_step,
            reason: self.reason.clone(),
        }
    }
}

impl RunRecord {
    /// A new run's record, queued at `now`.
    pub fn queued(
        id: String,
        spec: RunSpec,
        data: &RunData,
        shard_dir: PathBuf,
        owner: String,
        now: Now,
    ) -> Self {
        let steps_per_epoch = data.steps_per_epoch;
        RunRecord {
            id,
            name: spec.name.clone(),
            total_steps: spec.total_steps(steps_per_epoch),
            steps_per_epoch,
            train_examples: data.train_len() as u64,
            eval_examples: data.eval_len() as u64,
            spec,
            state: RunState::Queued,
            step: 0,
            generation: 0,
            world_size: 0,
            error: String::new(),
            checkpoint_step: 0,
            checkpoint_path: String::new(),
            submitted_ms: now.unix_ms,
            finished_ms: 0,
            last_metrics: Vec::new(),
            last_eval: Vec::new(),
            eval_step: 0,
            owner,
            rollbacks: Vec::new(),
            shard_dir,
            ledger_tail: Vec::new(),
            reference_total: 0,
            reference_cached: 0,
        }
    }

    pub fn to_proto(&self) -> v1::Run {
        let metrics = |m: &[(String, f64)]| {
            m.iter()
                .map(|(name, value)| v1::Metric {
                    name: name.clone(),
                    value: *value,
                })
                .collect()
        };
        v1::Run {
            id: self.id.clone(),
            name: self.name.clone(),
            state: self.state.to_proto() as i32,
            step: self.step,
            total_steps: self.total_steps,
            steps_per_epoch: self.steps_per_epoch,
            generation: self.generation,
            world_size: self.world_size,
            error: self.error.clone(),
            output: self.spec.train.output.display().to_string(),
            checkpoint_step: self.checkpoint_step,
            submitted_unix_ms: self.submitted_ms,
            finished_unix_ms: self.finished_ms,
            last_metrics: metrics(&self.last_metrics),
            last_eval: metrics(&self.last_eval),
            train_examples: self.train_examples,
            eval_examples: self.eval_examples,
            reference_total: self.reference_total,
            reference_cached: self.reference_cached,
            owner: self.owner.clone(),
            rollbacks: self
                .rollbacks
                .iter()
                .map(RollbackRecord::to_proto)
                .collect(),
        }
    }
}

/// One ledger entry: which samples a step consumed, and in which world.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LedgerEntry {
    pub step: u64,
    pub epoch: u64,
    /// Positions in the epoch's order: `[start, start + global_batch_size)`.
    pub start: usize,
    pub generation: u64,
    pub world_size: u64,
}

/// The value of a ledger key: one entry, or (written by earlier versions at
/// checkpoints) a list of them.
pub fn read_ledger_value(value: &str) -> Vec<LedgerEntry> {
    serde_json::from_str::<LedgerEntry>(value)
        .map(|e| vec![e])
        .or_else(|_| serde_json::from_str::<Vec<LedgerEntry>>(value))
        .unwrap_or_default()
}

/// A committed checkpoint, as its key holds it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CheckpointRecord {
    pub step: u64,
    pub path: String,
}

/// A run's tokenized data.
#[derive(Debug)]
pub struct RunData {
    pub train: Vec<Example>,
    pub eval: Vec<Example>,
    /// A classification run's examples and labels (`train`/`eval` are empty).
    pub tagged: Option<TaggedData>,
    pub plan: std::sync::Mutex<EpochPlan>,
    pub steps_per_epoch: u64,
    pub count_negatives: bool,
    /// The reference stage's cache (runs with `reference.precompute`).
    pub reference: Option<ReferenceStage>,
    /// The last split of a batch among ranks, by (split, step, world): each
    /// of a step's ranks takes its share of the one split instead of
    /// splitting the batch again.
    pub shares: std::sync::Mutex<Option<KeptSplit>>,
}

/// A split kept by (split, step, world) (see [`RunData::shares`]).
pub type KeptSplit = ((i32, u64, usize), Arc<dpo_data::batches::Shares>);

/// A classification run's encoded data.
#[derive(Debug)]
pub struct TaggedData {
    pub labels: Vec<String>,
    pub train: Vec<dpo_data::tagged::Encoded>,
    pub eval: Vec<dpo_data::tagged::Encoded>,
}

impl RunData {
    /// A classification run's data; `None` when one global batch needs more
    /// examples than its train split has.
    pub fn new_tagged(spec: &RunSpec, tagged: TaggedData) -> Option<Self> {
        let plan = EpochPlan::new(
            tagged.train.len(),
            spec.train.global_batch_size,
            spec.data.seed,
            spec.data.shuffle,
        )?;
        Some(RunData {
            train: Vec::new(),
            eval: Vec::new(),
            tagged: Some(tagged),
            steps_per_epoch: plan.steps_per_epoch(),
            plan: std::sync::Mutex::new(plan),
            count_negatives: true,
            reference: None,
            shares: std::sync::Mutex::new(None),
        })
    }

    /// Training examples (of either kind).
    pub fn train_len(&self) -> usize {
        self.tagged
            .as_ref()
            .map_or(self.train.len(), |t| t.train.len())
    }

    /// Eval examples (of either kind).
    pub fn eval_len(&self) -> usize {
        self.tagged
            .as_ref()
            .map_or(self.eval.len(), |t| t.eval.len())
    }

    /// `None` when one global batch needs more examples than `train` has.
    pub fn new(spec: &RunSpec, train: Vec<Example>, eval: Vec<Example>) -> Option<Self> {
        let plan = EpochPlan::new(
            train.len(),
            spec.train.global_batch_size,
            spec.data.seed,
            spec.data.shuffle,
        )?;
        Some(RunData {
            train,
            eval,
            tagged: None,
            steps_per_epoch: plan.steps_per_epoch(),
            plan: std::sync::Mutex::new(plan),
            count_negatives: spec.objective.loss == Loss::Combined,
            reference: None,
            shares: std::sync::Mutex::new(None),
        })
    }

    /// Where optimizer step `step` (0-based) starts: `(epoch, position)`.
    pub fn position(&self, step: u64) -> (u64, usize) {
        self.plan.lock().map(|p| p.position(step)).unwrap_or((0, 0))
    }
}

/// Why a restored run's tokenized data cannot be read back (its shards
/// missing or damaged): the run fails with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct DataGone(pub String);

impl Engine {
    /// Takes back a run read from the store (with its data, unless it ended or
    /// its data is gone, which fails it).
    pub fn restore(
        &mut self,
        mut record: RunRecord,
        checkpoint: Option<CheckpointRecord>,
        data: Option<std::result::Result<RunData, DataGone>>,
    ) -> Result<()> {
        if let Some(c) = checkpoint
            && c.step > record.checkpoint_step
        {
            record.checkpoint_step = c.step;
            record.checkpoint_path = c.path;
        }
        let id = record.id.clone();
        let legacy = std::mem::take(&mut record.ledger_tail);
        if !legacy.is_empty() {
            let mut writes = Vec::with_capacity(legacy.len() + 1);
            for e in &legacy {
                writes.push((ledger_key(&id, e.step), Some(super::to_json(e)?)));
            }
            writes.push((super::run_key(&id), Some(super::to_json(&record)?)));
            self.effects.push(Effect::Store {
                run: Some(id.clone()),
                fence: None,
                writes,
            });
        }
        match data {
            Some(Ok(d)) => {
                if record.state == RunState::Running {
                    // Its generation died with the old coordinator.
                    record.state = RunState::Waiting;
                }
                self.data.insert(id.clone(), Arc::new(d));
            }
            Some(Err(reason)) => {
                record.state = RunState::Failed;
                record.error = format!("its tokenized data is gone: {reason}");
            }
            None => {}
        }
        self.runs.insert(id, record);
        Ok(())
    }

    /// Refuses an output directory that is, or lies inside or above, the
    /// output of an active run, or of any run of another owner (whose files
    /// the new run could overwrite or, through its run page, read). A refusal
    /// names the other run only to its own owner.
    pub fn check_output_free(&self, spec: &RunSpec, owner: &str) -> Result<()> {
        let out = &spec.train.output;
        let clash = self.runs.values().find(|r| {
            let theirs = &r.spec.train.output;
            let overlaps = out.starts_with(theirs) || theirs.starts_with(out);
            overlaps && (!r.state.terminal() || r.owner != owner)
        });
        match clash {
            Some(r) if r.owner == owner => Err(Refusal::Invalid(format!(
                "train.output: run {} ({}) already writes to {}{}",
                r.id,
                r.name,
                r.spec.train.output.display(),
                if r.spec.train.output == *out {
                    String::new()
                } else {
                    format!(", which {} overlaps", out.display())
                }
            ))),
            Some(_) => Err(Refusal::Invalid(format!(
                "train.output: {} is, or lies inside or above, another run's output; choose \
                 another directory",
                out.display()
            ))),
            None => Ok(()),
        }
    }

    /// Queues a prepared run, then forms its generation if workers are ready.
    pub fn add_run(&mut self, record: RunRecord, data: RunData, now: Now) -> Result<v1::Run> {
        self.check_output_free(&record.spec, &record.owner)?;
        let id = record.id.clone();
        let run = record.to_proto();
        self.runs.insert(id.clone(), record);
        self.data.insert(id.clone(), Arc::new(data));
        self.persist_run(&id)?;
        tracing::info!(run = %id, name = %run.name, total_steps = run.total_steps, "run queued");
        self.reconcile(now)?;
        Ok(run)
    }

    /// Finds a run by id, unique id prefix, or name (the newest run of that
    /// name), among `owner`'s runs (`None`: everyone's). Another owner's run is
    /// "no run", as if it did not exist.
    pub fn resolve(&self, what: &str, owner: Option<&str>) -> Result<String> {
        let visible = |r: &&RunRecord| owner.is_none_or(|o| r.owner == o);
        if self.runs.get(what).is_some_and(|r| visible(&r)) {
            return Ok(what.to_string());
        }
        let by_prefix: Vec<&String> = self
            .runs
            .values()
            .filter(visible)
            .map(|r| &r.id)
            .filter(|id| id.starts_with(what))
            .collect();
        if by_prefix.len() == 1 && !what.is_empty() {
            return Ok(by_prefix[0].clone());
        }
        self.runs
            .values()
            .filter(visible)
            .filter(|r| r.name == what)
            .max_by_key(|r| r.submitted_ms)
            .map(|r| r.id.clone())
            .ok_or_else(|| Refusal::NotFound(format!("no run {what:?}")))
    }

    /// A run by id, prefix or name, whoever owns it.
    pub fn run(&self, what: &str) -> Result<&RunRecord> {
        self.run_of(what, None)
    }

    /// A run by id, prefix or name, among `owner`'s (`None`: everyone's).
    pub fn run_of(&self, what: &str, owner: Option<&str>) -> Result<&RunRecord> {
        let id = self.resolve(what, owner)?;
        self.runs
            .get(&id)
            .ok_or_else(|| Refusal::NotFound(format!("no run {what:?}")))
    }

    /// Every run of `owner` (`None`: everyone's), oldest first.
    pub fn list(&self, owner: Option<&str>) -> Vec<v1::Run> {
        let mut runs: Vec<&RunRecord> = self
            .runs
            .values()
            .filter(|r| owner.is_none_or(|o| r.owner == o))
            .collect();
        runs.sort_by_key(|r| r.submitted_ms);
        runs.into_iter().map(RunRecord::to_proto).collect()
    }

    /// Every run's record (for the sweep of ended runs' files).
    pub fn records(&self) -> impl Iterator<Item = &RunRecord> {
        self.runs.values()
    }

    /// A run's data (shared), while the run has it.
    pub fn run_data(&self, id: &str) -> Option<Arc<RunData>> {
        self.data.get(id).cloned()
    }

    /// Cancels a run of `owner` (`None`: anyone's).
    pub fn cancel(&mut self, what: &str, owner: Option<&str>, now: Now) -> Result<v1::Run> {
        let id = self.resolve(what, owner)?;
        self.finish(
            &id,
            RunState::Cancelled,
            "cancelled by the user".into(),
            now,
        )?;
        self.reconcile(now)?;
        Ok(self.run(&id)?.to_proto())
    }

    /// Every active run's record and the generation key, written again: after
    /// the store failed to take some writes, this brings it back in line with
    /// the engine (whose state is the authority).
    pub fn persist_all(&mut self) -> Result<()> {
        let ids: Vec<String> = self
            .runs
            .values()
            .filter(|r| !r.state.terminal())
            .map(|r| r.id.clone())
            .collect();
        self.effects.push(Effect::Store {
            run: None,
            fence: None,
            writes: vec![(
                crate::store::GENERATION_KEY.to_string(),
                Some(self.generation.to_string()),
            )],
        });
        for id in ids {
            self.persist_run(&id)?;
        }
        Ok(())
    }

    /// Fails a run from outside its workers (the store refused its writes for
    /// good), then lets the next run have the workers.
    pub fn fail_run(&mut self, id: &str, reason: String, now: Now) -> Result<()> {
        self.finish(id, RunState::Failed, reason, now)?;
        self.reconcile(now)
    }

    pub(super) fn set_state(&mut self, id: &str, state: RunState) -> Result<()> {
        let Some(r) = self.runs.get_mut(id) else {
            return Ok(());
        };
        if r.state == state {
            return Ok(());
        }
        r.state = state;
        tracing::info!(run = %id, state = ?state, "run state");
        self.persist_run(id)?;
        self.emit(
            id,
            Some(v1::run_event::Event::State(state.to_proto() as i32)),
        );
        Ok(())
    }

    /// Ends a run: records the outcome, writes its ledger next to its metrics,
    /// drops its working keys, and releases its workers.
    pub(super) fn finish(
        &mut self,
        id: &str,
        state: RunState,
        error: String,
        now: Now,
    ) -> Result<()> {
        let Some(r) = self.runs.get_mut(id) else {
            return Err(Refusal::NotFound(format!("no run {id:?}")));
        };
        if r.state.terminal() {
            return Ok(());
        }
        r.error = error;
        r.finished_ms = now.unix_ms;
        if state == RunState::Failed {
            tracing::error!(run = %id, error = %r.error, "run failed");
        }
        // The whole ledger goes to the output dir before its keys are deleted.
        let path = r.spec.train.output.join("ledger.jsonl");
        // Rollbacks follow the steps: `{"rollback": {...}}`, one line each.
        let trailer = r
            .rollbacks
            .iter()
            .filter_map(|b| serde_json::to_string(&serde_json::json!({ "rollback": b })).ok())
            .collect();
        self.effects.push(Effect::WriteLedger {
            prefix: ledger_prefix(id),
            path,
            trailer,
        });
        self.set_state(id, state)?;
        self.data.remove(id);
        if self.active.as_ref().is_some_and(|g| g.run_id == id) {
            let members = self.active.take().map(|g| g.members).unwrap_or_default();
            for m in members {
                self.send(
                    &m,
                    v1::assignment::Kind::Idle(v1::Idle {
                        run_id: id.to_string(),
                        reason: format!("run {:?}", state.to_proto()),
                    }),
                );
            }
        }
        self.effects.push(Effect::EndWatch {
            run: id.to_string(),
        });
        if let Some(r) = self.runs.get(id) {
            self.effects
                .push(Effect::RemoveRunFiles(r.shard_dir.clone()));
        }
        Ok(())
    }
}

impl Engine {
    /// The engine a coordinator starts with, from what the store holds
    /// (`stored`: the generation key and every key under the history and
    /// run prefixes). A run in the history has ended, whatever an older
    /// record says (one written before its end was recorded as one write); an
    /// unfinished run takes its newest committed checkpoint and its data from
    /// `data_of` (a run whose data is gone fails). An unreadable record is
    /// skipped and logged. The real coordinator and the simulator both start
    /// here, so what a restart rebuilds is the same code in both.
    pub fn recover(
        lease_ttl: std::time::Duration,
        stored: &std::collections::BTreeMap<String, String>,
        mut data_of: impl FnMut(&RunRecord) -> std::result::Result<RunData, DataGone>,
    ) -> Result<Engine> {
        let generation = stored
            .get(crate::store::GENERATION_KEY)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
        let mut engine = Engine::new(lease_ttl, generation);
        let history = stored
            .range(super::HISTORY_PREFIX.to_string()..)
            .take_while(|(k, _)| k.starts_with(super::HISTORY_PREFIX));
        let ended: std::collections::HashSet<&str> = history
            .clone()
            .filter_map(|(k, _)| k.strip_prefix(super::HISTORY_PREFIX))
            .collect();
        let active = stored
            .range(super::RUN_PREFIX.to_string()..)
            .take_while(|(k, _)| k.starts_with(super::RUN_PREFIX))
            .filter(|(k, _)| {
                k.strip_prefix(super::RUN_PREFIX)
                    .and_then(|rest| rest.strip_suffix("/record"))
                    .is_some_and(|id| !ended.contains(id))
            });
        for (key, value) in history.chain(active) {
            let record: RunRecord = match serde_json::from_str(value) {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!(key, error = %e, "skipping an unreadable run record");
                    continue;
                }
            };
            if record.state.terminal() {
                engine.restore(record, None, None)?;
                continue;
            }
            let checkpoint = stored
                .get(&super::checkpoint_key(&record.id))
                .and_then(|v| serde_json::from_str::<CheckpointRecord>(v).ok());
            let data = data_of(&record);
            engine.restore(record, checkpoint, Some(data))?;
        }
        Ok(engine)
    }
}
