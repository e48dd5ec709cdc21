//! The one training loop. Every task — preference objectives on a causal LM,
//! token and sequence classification on an encoder — is a [`TrainingRun`]:
//! what differs between them (how a batch becomes a loss, how an evaluation
//! is scored, what a saved model holds, ZeRO for the causal LMs) lives behind
//! that trait; the order of things — step, metrics, evaluation on its
//! cadence, early stopping on `train.metric_for_best_model`, checkpoints and
//! their retention, fault injection, `final/` — is written once, here for a
//! standalone run and in `cluster` for a rank of a cluster, both driving the
//! same trait.

use std::path::{Path, PathBuf};
use std::time::Instant;

use dpo_data::Example;
use dpo_data::refcache;
use dpo_proto::RunSpec;
use serde::{Deserialize, Serialize};

use super::metrics::Reporter;
use super::output::RunOutput;
use super::{Metrics, RankState, Synced, WorldSync};
use crate::collective::Collective;
use crate::error::{Error, Result};
use crate::train::classify::evaluate::EvalReport;

/// Early stopping on `train.metric_for_best_model`: the best value so far,
/// when it was reached, and how many evaluations since did not beat it.
/// Checkpoints store it in `trainer_state.json` under these names.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct EarlyStopping {
    /// The best value (named `best_eval_loss` in checkpoints, as it always
    /// was, whichever metric it is).
    #[serde(rename = "best_eval_loss", alias = "best_metric", default)]
    pub best: Option<f64>,
    #[serde(default)]
    pub best_step: Option<u64>,
    #[serde(rename = "evals_without_improvement", alias = "bad_evals", default)]
    pub bad_evals: u64,
    #[serde(default)]
    pub stopped_early: bool,
}

impl EarlyStopping {
    /// Takes the evaluation `metrics` of step `step` (of `total_steps`):
    /// returns whether it is the best so far, and stops the run once
    /// `train.early_stopping_patience` evaluations in a row were not.
    pub fn observe(
        &mut self,
        spec: &RunSpec,
        step: u64,
        total_steps: u64,
        metrics: &Metrics,
    ) -> Result<bool> {
        let name = &spec.train.metric_for_best_model;
        let found = metrics.iter().find(|(k, _)| k == name && k != "step");
        let Some(value) = found.map(|(_, v)| *v) else {
            return Err(Error::Input {
                context: "train.metric_for_best_model".into(),
                reason: format!(
                    "{name:?} is not among this run's eval metrics: {}",
                    metrics
                        .iter()
                        .filter(|(k, _)| k != "step")
                        .map(|(k, _)| k.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            });
        };
        let greater = spec.greater_is_better();
        let better = self
            .best
            .is_none_or(|b| if greater { value > b } else { value < b });
        if better {
            self.best = Some(value);
            self.best_step = Some(step);
            self.bad_evals = 0;
        } else {
            self.bad_evals += 1;
        }
        let patience = spec.train.early_stopping_patience;
        if patience > 0 && self.bad_evals >= patience && step < total_steps {
            tracing::info!(step, patience, best = ?self.best, metric = %name, "early stopping: the metric stopped improving");
            self.stopped_early = true;
        }
        Ok(better)
    }
}

/// Whether an evaluation is due after step `step`: every `train.eval_every`
/// steps when set, else at the end of each epoch when `each_epoch` (the
/// classification tasks, as the founding document evaluates), and always
/// after the last step.
pub fn eval_due(spec: &RunSpec, step: u64, steps_per_epoch: u64, total_steps: u64) -> bool {
    let every = spec.train.eval_every;
    let on_cadence = if every > 0 {
        step % every == 0
    } else {
        spec.task.kind.is_classification() && step % steps_per_epoch.max(1) == 0
    };
    on_cadence || step == total_steps
}

/// Whether a checkpoint is due after step `step` (none at the last step,
/// which writes `final/`, nor after an early stop).
pub fn checkpoint_due(spec: &RunSpec, step: u64, total_steps: u64, stopped: bool) -> bool {
    let every = spec.train.checkpoint_every;
    every > 0 && step % every == 0 && step < total_steps && !stopped
}

/// An evaluation of the model at a step.
#[derive(Debug, Clone)]
pub struct Evaluation {
    pub step: u64,
    /// `eval_*` values with `step`, as metrics files and reports carry them.
    pub metrics: Metrics,
    /// The classification tasks' full report (per-label figures, confusion).
    pub report: Option<EvalReport>,
    /// Whether it is the best so far on `train.metric_for_best_model`.
    pub best: bool,
}

/// What a run says about itself as it starts.
#[derive(Debug, Clone, Default)]
pub struct Started {
    pub start_step: u64,
    pub total_steps: u64,
    pub train_examples: Option<usize>,
    pub eval_examples: Option<usize>,
    /// Classification: the labels, and labelled positions and negatives.
    pub labels: Vec<String>,
    pub labelled: Option<usize>,
    pub negatives: Option<usize>,
    /// Parameters the optimizer trains, of all the model's (adapters
    /// included): with LoRA or `train.freeze`, a small fraction.
    pub trained_parameters: u64,
    pub total_parameters: u64,
}

impl Started {
    /// "trains 12,345 of 1,234,567 parameters (1.00%)".
    pub fn parameters_line(&self) -> String {
        let pct = 100.0 * self.trained_parameters as f64 / self.total_parameters.max(1) as f64;
        format!(
            "trains {} of {} parameters ({pct:.2}%)",
            grouped(self.trained_parameters),
            grouped(self.total_parameters)
        )
    }
}

/// `1234567` as `1,234,567`.
fn grouped(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Progress reported to the caller (progress bar, logs).
#[derive(Debug)]
pub enum Event<'a> {
    Started(&'a Started),
    Step {
        step: u64,
        total_steps: u64,
        metrics: &'a Metrics,
    },
    Eval(&'a Evaluation),
    Checkpoint {
        step: u64,
        path: &'a Path,
    },
}

/// The end of a run.
#[derive(Debug, Clone)]
pub struct Summary {
    pub steps: u64,
    pub last: Metrics,
    /// The evaluation before any step (classification), the last one and
    /// the best one.
    pub initial_eval: Option<Evaluation>,
    pub eval: Option<Evaluation>,
    pub best_eval: Option<Evaluation>,
    pub stopped_early: bool,
    pub output: PathBuf,
    pub seconds: f64,
}

/// A run of any task, as the loop drives it. What every task shares — its
/// world, optimizer, step and ZeRO share — is its [`RankState`], which the
/// defaults below drive; methods a task has no use for (the reference stage)
/// keep their defaults.
pub trait TrainingRun {
    fn spec(&self) -> &RunSpec;
    /// This rank's share of the run.
    fn world(&self) -> &RankState;
    fn world_mut(&mut self) -> &mut RankState;
    /// Optimizer steps completed.
    fn step(&self) -> u64 {
        self.world().step()
    }
    fn total_steps(&self) -> u64;
    fn stopped_early(&self) -> bool {
        self.world().state.stopping.stopped_early
    }
    /// Whether the run has nothing left to train.
    fn finished(&self) -> bool {
        self.step() >= self.total_steps() || self.stopped_early()
    }
    fn output(&self) -> &RunOutput;
    /// Whether the run has an eval split.
    fn has_eval(&self) -> bool;
    /// Whether this process writes `metrics.jsonl` and `eval.jsonl` (rank 0
    /// of a standalone run; in a cluster the coordinator writes them).
    fn writes_metrics(&self) -> bool;

    /// Standalone: brings the ranks of the world to one state and into
    /// their ZeRO partition before the first step.
    fn begin(&mut self) -> Result<()> {
        self.world_mut().sync_from(0)?;
        self.world_mut().enter_zero()
    }
    fn started(&self) -> Started;
    /// The model before any step, for a before/after report (when the task
    /// makes one).
    fn initial_evaluation(&mut self) -> Result<Option<Evaluation>> {
        Ok(None)
    }

    /// Joins a new world (generation): later collectives go to `collective`.
    fn set_collective(&mut self, collective: Box<dyn Collective>, generation: u64);
    /// Loads the committed checkpoint `dir` (a cluster's resume point).
    fn restore_checkpoint(&mut self, dir: &Path) -> Result<()>;
    /// Back to the run's start: the initial weights (or adapters), fresh
    /// optimizer state, step 0.
    fn restore_initial(&mut self) -> Result<()>;
    /// What a world's forming needs besides the shared state (ZeRO stage 3:
    /// this rank's share of the frozen base).
    fn prepare_world(&mut self) -> Result<()> {
        Ok(())
    }
    /// Brings every rank of a (new) world to the same state (see
    /// [`sync_world`]).
    fn sync_world(&mut self, checkpoint: Option<(&Path, u64)>) -> Result<Synced> {
        sync_world(self, checkpoint)
    }

    /// One optimizer step over the global batch of `step()`.
    fn train_step(&mut self) -> Result<Metrics>;
    /// Evaluates when the cadence calls for it and updates early stopping.
    fn maybe_evaluate(&mut self) -> Result<Option<Evaluation>>;
    /// Writes this step's checkpoint when `train.checkpoint_every` calls for
    /// it; returns its path as named below the output (rank 0).
    fn maybe_checkpoint(&mut self) -> Result<Option<PathBuf>>;
    /// Keeps the newest `train.save_total_limit` checkpoints (rank 0), once
    /// the newest is committed.
    fn prune_checkpoints(&self) -> Result<()>;
    /// `final/` (rank 0).
    fn save_final(&self) -> Result<()>;

    /// ZeRO: this rank is asked to leave after the next step.
    fn set_leaving(&mut self, leaving: bool) {
        self.world_mut().set_leaving(leaving);
    }
    /// ZeRO: the ranks that said in the last step that they are leaving.
    fn leavers(&self) -> &[usize] {
        self.world().leavers()
    }
    /// ZeRO: hands the leavers' shares over; whether this rank stays.
    fn hand_off(&mut self) -> Result<bool> {
        self.world_mut().hand_off()
    }
    /// ZeRO: whether this rank holds a share of the state only.
    fn sharded(&self) -> bool {
        self.world().sharded()
    }
    /// Fault injection for tests: break step `step` once, as a lost
    /// connection would (see [`RankState::set_tear_at_step`]).
    fn set_tear_at_step(&mut self, step: Option<u64>) {
        self.world_mut().set_tear_at_step(step);
    }

    /// Whether the reference log-probs come from the coordinator's reference stage.
    fn reference_staged(&self) -> bool {
        false
    }
    /// The reference stage: scores `examples` with the reference model.
    fn score_reference(&mut self, _examples: &[Example]) -> Result<Vec<(refcache::Key, f32)>> {
        Err(Error::State("this run has no reference stage"))
    }
    /// Ends this rank's part of the reference stage.
    fn finish_reference_stage(&mut self) -> Result<()> {
        Err(Error::State("this run has no reference stage"))
    }
}

/// A step's metrics with the intra-op thread count it ran with (`threads`):
/// ranks sharing a host should show their share of its cores, not all.
pub fn with_threads(mut m: Metrics) -> Metrics {
    if !m.iter().any(|(k, _)| k == "threads") {
        m.push(("threads".into(), crate::threads::current() as f64));
    }
    m
}

/// [`TrainingRun::sync_world`]'s shared part, for a task that adds its own:
/// the shared state through [`RankState::sync_world`]; when a ZeRO share was
/// lost, every rank back to `checkpoint` (the last committed one: directory
/// and step; none: the initial weights) and the outcome says so.
pub fn sync_world<R: TrainingRun + ?Sized>(
    run: &mut R,
    checkpoint: Option<(&Path, u64)>,
) -> Result<Synced> {
    run.prepare_world()?;
    match run.world_mut().sync_world()? {
        WorldSync::Synced(synced) => Ok(synced),
        WorldSync::MustRollBack(lost) => {
            let to_step = match checkpoint {
                Some((dir, step)) => {
                    run.restore_checkpoint(dir)?;
                    step
                }
                None => {
                    run.restore_initial()?;
                    0
                }
            };
            run.world_mut().rolled_back(lost, to_step)
        }
    }
}

/// Trains a standalone run to its end (or early stop), reporting through
/// `on_event`. `halt_after_step` is fault injection for tests: stop like a
/// crash (no `final/`) once that step and its checkpoint are written.
pub fn run(
    run: &mut dyn TrainingRun,
    halt_after_step: Option<u64>,
    on_event: &mut dyn FnMut(Event<'_>),
) -> Result<Summary> {
    let started = Instant::now();
    run.begin()?;
    on_event(Event::Started(&run.started()));
    let mut reporter = if run.writes_metrics() {
        Some(Reporter::open(
            &run.output().io(),
            run.spec(),
            run.has_eval(),
            run.step(),
        )?)
    } else {
        None
    };
    let initial_eval = run.initial_evaluation()?;
    let mut best_eval = None;
    if let Some(e) = &initial_eval {
        if let Some(r) = reporter.as_mut() {
            r.eval(&e.metrics)?;
        }
        on_event(Event::Eval(e));
        if e.best {
            best_eval = Some(e.clone());
        }
    }
    let mut last = Metrics::new();
    let mut last_eval = None;
    let total_steps = run.total_steps();
    while !run.finished() {
        last = with_threads(run.train_step()?);
        let step = run.step();
        if let Some(r) = reporter.as_mut() {
            r.step(&last)?;
        }
        on_event(Event::Step {
            step,
            total_steps,
            metrics: &last,
        });
        if let Some(e) = run.maybe_evaluate()? {
            if let Some(r) = reporter.as_mut() {
                r.eval(&e.metrics)?;
            }
            on_event(Event::Eval(&e));
            if e.best {
                best_eval = Some(e.clone());
            }
            last_eval = Some(e);
        }
        if let Some(dir) = run.maybe_checkpoint()? {
            on_event(Event::Checkpoint { step, path: &dir });
            run.prune_checkpoints()?;
        }
        if halt_after_step == Some(step) && !run.finished() {
            return Err(Error::Halted { step });
        }
    }
    run.save_final()?;
    Ok(Summary {
        steps: run.step(),
        last,
        initial_eval,
        eval: last_eval,
        best_eval,
        stopped_early: run.stopped_early(),
        output: run.output().named().to_path_buf(),
        seconds: started.elapsed().as_secs_f64(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(metric: &str, greater: Option<bool>, patience: u64) -> RunSpec {
        let mut text = format!(
            "name = \"t\"\n[model]\npath = \"m\"\n[data]\ntrain = \"d.jsonl\"\n[train]\nmetric_for_best_model = \"{metric}\"\nearly_stopping_patience = {patience}\n"
        );
        if let Some(g) = greater {
            text.push_str(&format!("greater_is_better = {g}\n"));
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("run.toml");
        std::fs::write(&path, text).expect("write");
        RunSpec::from_file(&path).expect("spec")
    }

    fn m(name: &str, v: f64) -> Metrics {
        vec![("step".into(), 0.0), (name.into(), v)]
    }

    #[test]
    fn early_stopping_keeps_the_best_and_stops_after_patience_evaluations_without_one() {
        let s = spec("eval_loss", None, 2);
        let mut e = EarlyStopping::default();
        assert!(e.observe(&s, 1, 10, &m("eval_loss", 0.5)).expect("1"));
        assert!(e.observe(&s, 2, 10, &m("eval_loss", 0.4)).expect("2"));
        assert!(!e.observe(&s, 3, 10, &m("eval_loss", 0.4)).expect("3"));
        assert!(!e.stopped_early);
        assert!(!e.observe(&s, 4, 10, &m("eval_loss", 0.45)).expect("4"));
        assert!(e.stopped_early);
        assert_eq!((e.best, e.best_step, e.bad_evals), (Some(0.4), Some(2), 2));
        // Higher is better for an accuracy.
        let s = spec("eval_accuracy", Some(true), 0);
        let mut e = EarlyStopping::default();
        e.observe(&s, 1, 10, &m("eval_accuracy", 0.5)).expect("1");
        assert!(e.observe(&s, 2, 10, &m("eval_accuracy", 0.6)).expect("2"));
        assert!(!e.observe(&s, 3, 10, &m("eval_accuracy", 0.55)).expect("3"));
        assert!(!e.stopped_early, "patience 0 never stops");
        // A metric the evaluation does not report names the key.
        let err = e
            .observe(&s, 4, 10, &m("eval_loss", 0.1))
            .expect_err("unknown");
        assert!(
            err.to_string().contains("train.metric_for_best_model"),
            "{err}"
        );
        assert!(err.to_string().contains("eval_loss"), "{err}");
    }

    #[test]
    fn early_stopping_reads_the_checkpoints_of_both_earlier_trainers() {
        let lm: EarlyStopping =
            serde_json::from_str(r#"{"best_eval_loss": 0.25, "evals_without_improvement": 2}"#)
                .expect("causal");
        assert_eq!((lm.best, lm.best_step, lm.bad_evals), (Some(0.25), None, 2));
        let classify: EarlyStopping = serde_json::from_str(
            r#"{"best_step": 4, "best_metric": 0.8, "bad_evals": 1, "stopped_early": true}"#,
        )
        .expect("classify");
        assert_eq!(
            classify,
            EarlyStopping {
                best: Some(0.8),
                best_step: Some(4),
                bad_evals: 1,
                stopped_early: true
            }
        );
    }

    #[test]
    fn the_parameter_line_says_what_fraction_trains() {
        let s = Started {
            trained_parameters: 12_345,
            total_parameters: 1_234_567,
            ..Started::default()
        };
        assert_eq!(
            s.parameters_line(),
            "trains 12,345 of 1,234,567 parameters (1.00%)"
        );
        assert_eq!(grouped(0), "0");
        assert_eq!(grouped(999), "999");
        assert_eq!(grouped(1000), "1,000");
    }

    #[test]
    fn evaluations_fall_on_the_cadence_and_the_last_step() {
        let mut s = spec("eval_loss", None, 0);
        // Causal LMs without eval_every: the last step only.
        assert!(!eval_due(&s, 4, 4, 12));
        assert!(eval_due(&s, 12, 4, 12));
        s.train.eval_every = 5;
        assert!(eval_due(&s, 5, 4, 12) && !eval_due(&s, 4, 4, 12));
        s.train.eval_every = 0;
        s.task.kind = dpo_proto::TaskType::TokenClassification;
        assert!(eval_due(&s, 4, 4, 12) && eval_due(&s, 8, 4, 12) && !eval_due(&s, 5, 4, 12));
        s.train.checkpoint_every = 4;
        assert!(checkpoint_due(&s, 8, 12, false));
        assert!(
            !checkpoint_due(&s, 12, 12, false),
            "the last step writes final/"
        );
        assert!(!checkpoint_due(&s, 8, 12, true));
    }
}
