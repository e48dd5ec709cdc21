//! What members report: steps and evaluations (recorded once each, with the
//! step's ledger entry), checkpoints (committed fenced by the generation), the
//! end of the run, and the collective's bootstrap data.

use std::time::Duration;

use dpo_proto::v1;

use super::membership::Member;
use super::runs::{CheckpointRecord, LedgerEntry, RollbackRecord, RunState};
use super::{Effect, Engine, Now, Refusal, Result, checkpoint_key, ledger_key, run_key, to_json};

/// A step's report, as the engine takes it.
#[derive(Debug, Clone)]
pub struct StepReport {
    /// Steps completed, including this one (1-based).
    pub step: u64,
    pub metrics: Vec<(String, f64)>,
    /// Evaluation metrics at `step`.
    pub eval: bool,
    /// The generation and world size that trained the step (its ledger entry).
    pub trained_generation: u64,
    pub trained_world_size: u32,
}

/// Most metrics one report may carry (a step reports about twenty).
const MAX_METRICS: usize = 256;

/// Longest error or fault message kept from a member (the rest is cut).
pub const MAX_MESSAGE_BYTES: usize = 4096;

/// `text` cut to at most `max` bytes at a character boundary, marked when cut.
pub fn truncated(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… [{} bytes cut]", &text[..end], text.len() - end)
}

/// Checks a report's metrics: bounded in number, named, finite.
fn check_metrics(metrics: &[(String, f64)]) -> Result<()> {
    if metrics.len() > MAX_METRICS {
        return Err(Refusal::Invalid(format!(
            "{} metrics in one report; at most {MAX_METRICS}",
            metrics.len()
        )));
    }
    if metrics.iter().any(|(k, _)| k.is_empty() || k.len() > 64) {
        return Err(Refusal::Invalid("metric names: 1 to 64 characters".into()));
    }
    if let Some((k, v)) = metrics.iter().find(|(_, v)| !v.is_finite()) {
        return Err(Refusal::Invalid(format!(
            "metric {k} is {v}: metrics must be finite"
        )));
    }
    if let Some((k, v)) = metrics.iter().find(|(_, v)| v.abs() > MAX_METRIC) {
        return Err(Refusal::Invalid(format!(
            "metric {k} is {v}: metrics lie within ±{MAX_METRIC:e}"
        )));
    }
    Ok(())
}

/// The largest magnitude a metric may have (peak bytes of the largest GPUs are
/// about 1.5e11, token counts of long runs 1e13).
const MAX_METRIC: f64 = 1e15;

/// Most ranks a generation can have.
const MAX_WORLD_SIZE: u32 = 1 << 16;

/// `metrics` with `generation` and `world_size` as the engine checked them,
/// not as the report wrote them.
fn with_checked(
    mut metrics: Vec<(String, f64)>,
    generation: u64,
    world: u32,
) -> Vec<(String, f64)> {
    for (k, v) in metrics.iter_mut() {
        match k.as_str() {
            "generation" => *v = generation as f64,
            "world_size" => *v = f64::from(world),
            _ => {}
        }
    }
    metrics
}

fn metric(m: &[(String, f64)], name: &str) -> Option<f64> {
    m.iter().find(|(k, _)| k == name).map(|(_, v)| *v)
}

fn to_proto_metrics(m: &[(String, f64)]) -> Vec<v1::Metric> {
    m.iter()
        .map(|(name, value)| v1::Metric {
            name: name.clone(),
            value: *value,
        })
        .collect()
}

impl Engine {
    /// Counts a served batch (for `/metrics`).
    pub fn batch_served(&mut self, examples: usize, took: Duration) {
        self.counters.batches_served += 1;
        self.counters.examples_served += examples as u64;
        self.counters.batch_serve_seconds += took.as_secs_f64();
    }

    /// Records a step's (or an evaluation's) metrics the first time any rank
    /// reports them; later reports of the same step are acknowledged and ignored.
    /// A train step's metrics line, record and ledger entry are written in that
    /// order: a restart trims metrics past the recorded step.
    pub fn report_step(&mut self, member: &Member, report: StepReport) -> Result<()> {
        self.check_member(member, false)?;
        let id = member.run.as_str();
        check_metrics(&report.metrics)?;
        let Some(r) = self.runs.get_mut(id) else {
            return Err(Refusal::NotFound(format!("no run {id}")));
        };
        let step = report.step;
        if step == 0 || step > r.total_steps {
            return Err(Refusal::Invalid(format!(
                "step {step} is outside the run's steps 1..={}",
                r.total_steps
            )));
        }
        // Every rank reports every step; all but the first report of it are
        // acknowledged and ignored, before anything is copied.
        let seen = if report.eval {
            step <= r.eval_step || step > r.step
        } else {
            step <= r.step
        };
        if seen {
            return Ok(());
        }
        let output = r.spec.train.output.clone();
        let events = r
            .spec
            .train
            .tensorboard()
            .then(|| dpo_data::tensorboard::run_dir(&output, &r.spec.name));
        if report.eval {
            self.effects.push(Effect::AppendMetrics {
                run: id.to_string(),
                path: output.join("eval.jsonl"),
                metrics: report.metrics.clone(),
                // Steps after the recorded one were never shown.
                events: events.map(|d| (d, r.step + 1)),
            });
            let event = v1::run_event::Event::Eval(v1::StepMetrics {
                step,
                metrics: to_proto_metrics(&report.metrics),
            });
            r.eval_step = step;
            r.last_eval = report.metrics;
            self.persist_run(id)?;
            self.emit(id, Some(event));
            return Ok(());
        }
        if step != r.step + 1 {
            return Err(Refusal::Stale(format!(
                "step {step} reported, but step {} is the next one",
                r.step + 1
            )));
        }
        if metric(&report.metrics, "step") != Some(step as f64) {
            return Err(Refusal::Invalid(format!(
                "the metrics of step {step} do not say step {step}"
            )));
        }
        if report.trained_generation == 0
            || report.trained_generation > member.generation
            || report.trained_world_size == 0
            || report.trained_world_size > MAX_WORLD_SIZE
        {
            return Err(Refusal::Invalid(format!(
                "step {step}: trained in generation {} by {} ranks, reported in generation {}",
                report.trained_generation, report.trained_world_size, member.generation
            )));
        }
        let metrics = with_checked(
            report.metrics,
            report.trained_generation,
            report.trained_world_size,
        );
        let (epoch, start) = self.data.get(id).map_or((0, 0), |d| d.position(step - 1));
        let entry = LedgerEntry {
            step,
            epoch,
            start,
            generation: report.trained_generation,
            world_size: u64::from(report.trained_world_size),
        };
        self.effects.push(Effect::AppendMetrics {
            run: id.to_string(),
            path: output.join("metrics.jsonl"),
            metrics: metrics.clone(),
            // This step and any after it in older files are orphans.
            events: events.map(|d| (d, step)),
        });
        let event = v1::run_event::Event::Step(v1::StepMetrics {
            step,
            metrics: to_proto_metrics(&metrics),
        });
        r.step = step;
        r.last_metrics = metrics;
        // One transaction: the record (fixed size) and this step's ledger entry.
        self.effects.push(Effect::Store {
            run: Some(id.to_string()),
            fence: None,
            writes: vec![
                (run_key(id), Some(to_json(&*r)?)),
                (ledger_key(id, step), Some(to_json(&entry)?)),
            ],
        });
        self.counters.steps_recorded += 1;
        self.emit(id, Some(event));
        Ok(())
    }

    /// Checks a checkpoint written by rank 0 and decides its commit: the
    /// checkpoint key, written only while this generation is current. `path_ok`
    /// says whether the directory holds a manifest (checked by the caller).
    /// The record changes once the commit is done ([`Engine::checkpoint_committed`]).
    pub fn commit_checkpoint(
        &mut self,
        member: &Member,
        step: u64,
        path: &str,
        path_ok: bool,
    ) -> Result<()> {
        self.check_member(member, true)?;
        let Some(r) = self.runs.get(&member.run) else {
            return Err(Refusal::NotFound(format!("no run {}", member.run)));
        };
        if step <= r.checkpoint_step && step <= r.step {
            // A newer checkpoint stands (a world that stood behind it, from a
            // survivor's older state, trains these steps again): nothing to
            // commit. Refusing it as stale would send the world to the next
            // generation for nothing (the simulator found a world of one
            // doing so for good).
            return Ok(());
        }
        if step > r.step {
            return Err(Refusal::Stale(format!(
                "checkpoint at step {step} (recorded steps {}, last checkpoint {})",
                r.step, r.checkpoint_step
            )));
        }
        if !path_ok {
            return Err(Refusal::Invalid(format!(
                "{}: not a complete checkpoint (a directory with a manifest.json) under the run's checkpoints directory",
                truncated(path, 512)
            )));
        }
        let value = to_json(&CheckpointRecord {
            step,
            path: path.to_string(),
        })?;
        self.effects.push(Effect::Store {
            run: Some(member.run.clone()),
            fence: Some(member.generation),
            writes: vec![(checkpoint_key(&member.run), Some(value))],
        });
        Ok(())
    }

    /// The commit of a checkpoint went through: the record points at it.
    pub fn checkpoint_committed(&mut self, run: &str, step: u64, path: &str) -> Result<()> {
        let Some(r) = self.runs.get_mut(run) else {
            return Ok(());
        };
        if step <= r.checkpoint_step {
            return Ok(());
        }
        r.checkpoint_step = step;
        r.checkpoint_path = path.to_string();
        tracing::info!(run = %run, step, "checkpoint committed");
        if !r.state.terminal() {
            self.persist_run(run)?;
        }
        self.emit(run, None);
        Ok(())
    }

    /// The run ended on a member: succeeded (only rank 0's word counts, and
    /// only with every step recorded) or failed with `error`.
    /// A member's generation went back to the last committed checkpoint (a
    /// share of the ZeRO optimizer state was lost): recorded once per
    /// generation, told to the run's watchers. The steps after the checkpoint
    /// are trained again; their first reports stand. `to_step` may be past
    /// `from_step`: the ranks that reached the checkpoint's step are gone and
    /// the others' state is older, so the world went forward to it.
    pub fn report_rollback(
        &mut self,
        member: &Member,
        from_step: u64,
        to_step: u64,
        reason: &str,
    ) -> Result<()> {
        self.check_member(member, false)?;
        let r = self
            .runs
            .get_mut(&member.run)
            .ok_or_else(|| Refusal::NotFound(format!("no run {:?}", member.run)))?;
        if from_step > r.step + 1 || to_step != r.checkpoint_step {
            return Err(Refusal::Invalid(format!(
                "rollback from step {from_step} to {to_step}: the last committed checkpoint is step {}",
                r.checkpoint_step
            )));
        }
        if r.rollbacks
            .iter()
            .any(|b| b.generation == member.generation)
        {
            return Ok(());
        }
        let record = RollbackRecord {
            generation: member.generation,
            from_step,
            to_step,
            reason: truncated(reason, MAX_MESSAGE_BYTES),
        };
        tracing::warn!(run = %member.run, generation = member.generation, from_step, to_step, reason = %record.reason, "the world went back to a checkpoint");
        let event = v1::run_event::Event::Rollback(record.to_proto());
        r.rollbacks.push(record);
        self.persist_run(&member.run)?;
        self.emit(&member.run, Some(event));
        Ok(())
    }

    pub fn report_done(
        &mut self,
        member: &Member,
        step: u64,
        error: &str,
        stopped_early: bool,
        now: Now,
    ) -> Result<()> {
        self.check_member(member, false)?;
        if error.is_empty() {
            let r = &self.runs[&member.run];
            if !self.is_rank0(&member.worker) {
                return Ok(());
            }
            if step != r.step || (step < r.total_steps && !stopped_early) {
                return Err(Refusal::Stale(format!(
                    "done at step {step} but {} of {} steps are recorded",
                    r.step, r.total_steps
                )));
            }
            self.finish(&member.run, RunState::Succeeded, String::new(), now)?;
        } else {
            let error = truncated(error, MAX_MESSAGE_BYTES);
            self.finish(&member.run, RunState::Failed, error, now)?;
        }
        self.reconcile(now)
    }

    /// Rank 0 publishes its generation's collective bootstrap data.
    pub fn publish_bootstrap(&mut self, run: String, generation: u64, data: Vec<u8>) -> Result<()> {
        if self
            .active
            .as_ref()
            .is_none_or(|g| g.run_id != run || g.number != generation)
        {
            return Err(Refusal::Stale(format!(
                "generation {generation} is not current"
            )));
        }
        self.bootstrap.retain(|(_, g), _| *g >= generation);
        self.bootstrap.insert((run, generation), data);
        Ok(())
    }

    pub fn bootstrap(&self, run: &str, generation: u64) -> Option<Vec<u8>> {
        self.bootstrap.get(&(run.to_string(), generation)).cloned()
    }
}
