//! A step's metrics under TRL's names (plus `step`, `epoch`, `generation`,
//! `world_size`, `tokens`), and the standalone trainer's `metrics.jsonl` /
//! `eval.jsonl` writers (in a cluster the coordinator writes them).

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};

use crate::error::{Result, io_err};
use crate::objective::{Objective, Stats};

/// Named metric values in the order they are reported.
pub type Metrics = Vec<(String, f64)>;

/// What a training step measured besides its loss statistics.
#[derive(Debug, Clone, Copy)]
pub(super) struct StepFacts {
    pub step: u64,
    pub steps_per_epoch: u64,
    pub generation: u64,
    pub world: usize,
    pub grad_norm: f64,
    pub learning_rate: f64,
    pub seconds: f64,
    /// The rank's peak memory (peak resident size on CPU), when known.
    pub peak_bytes: Option<u64>,
    /// Model-state bytes per trained parameter on this rank.
    pub state_bytes_per_parameter: f64,
}

/// A training step's metrics line.
pub(super) fn step_metrics(stats: &Stats, objective: &Objective, f: StepFacts) -> Metrics {
    let spe = f.steps_per_epoch.max(1);
    let mut m: Metrics = vec![
        ("step".into(), f.step as f64),
        ("epoch".into(), f.step as f64 / spe as f64),
        ("generation".into(), f.generation as f64),
        ("world_size".into(), f.world as f64),
    ];
    m.extend(
        stats
            .metrics(objective)
            .into_iter()
            .map(|(k, v)| (k.to_string(), v)),
    );
    m.extend([
        ("grad_norm".into(), f.grad_norm),
        ("learning_rate".into(), f.learning_rate),
        ("tokens".into(), stats.tokens),
        (
            "tokens_per_second".into(),
            stats.tokens / f.seconds.max(1e-9),
        ),
        (
            "memory/state_bytes_per_parameter".into(),
            f.state_bytes_per_parameter,
        ),
    ]);
    if let Some(peak) = f.peak_bytes {
        m.push(("memory/peak_bytes".into(), peak as f64));
    }
    m
}

/// Starts this process's peak resident size (`VmHWM`) again from its present
/// resident size (Linux ≥ 4.0: `5` into `/proc/self/clear_refs`), so a run's
/// `memory/peak_bytes` is its own and not an earlier run's on the same worker.
/// The heap an earlier run freed is given back to the system first (glibc
/// keeps it otherwise), so it is neither held by this worker nor counted in
/// the new run's peak.
pub(crate) fn reset_peak_resident() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[allow(unsafe_code)]
    // SAFETY: malloc_trim only releases free memory of the allocator's
    // arenas; it touches no live allocation.
    unsafe {
        libc::malloc_trim(0);
    }
    if let Err(e) = std::fs::write("/proc/self/clear_refs", "5") {
        tracing::debug!(error = %e, "could not reset the peak resident size; memory/peak_bytes counts from the process's start");
    }
}

/// This process's peak resident size (`VmHWM`), in bytes: the peak memory of
/// a CPU rank since the run began ([`reset_peak_resident`]). `None` where
/// /proc does not say.
pub(super) fn peak_resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse::<u64>()
        .ok()?;
    Some(kb * 1024)
}

/// An evaluation's metrics line: `step`, then each metric as `eval_<name>`.
pub(super) fn eval_metrics(stats: &Stats, objective: &Objective, step: u64) -> Metrics {
    let mut e: Metrics = vec![("step".into(), step as f64)];
    e.extend(
        stats
            .metrics(objective)
            .into_iter()
            .map(|(k, v)| (format!("eval_{k}"), v)),
    );
    e
}

/// One metrics file, appended a line per step.
#[derive(Debug)]
pub(super) struct MetricsFile {
    path: PathBuf,
    file: File,
}

impl MetricsFile {
    pub fn append_to(path: &Path) -> Result<Self> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(io_err(path))?;
        Ok(MetricsFile {
            path: path.to_path_buf(),
            file,
        })
    }

    pub fn write(&mut self, m: &Metrics) -> Result<()> {
        dpo_data::metrics_log::append(&mut self.file, m).map_err(io_err(&self.path))
    }
}

/// Where a writing rank's metrics go: `metrics.jsonl`, `eval.jsonl` and, with
/// `train.report_to = ["tensorboard"]`, an event file under `output/runs/<name>/`.
#[derive(Debug)]
pub(crate) struct Reporter {
    metrics: MetricsFile,
    eval: Option<MetricsFile>,
    events: Option<dpo_data::tensorboard::EventWriter>,
}

impl Reporter {
    /// Opens the files of a run resumed after step `done` (0: a fresh run,
    /// which may evaluate before its first step; else it writes from `done + 1`).
    pub fn open(out: &Path, spec: &dpo_proto::RunSpec, with_eval: bool, done: u64) -> Result<Self> {
        let first_step = match done {
            0 => 0,
            s => s + 1,
        };
        let events = if spec.train.tensorboard() {
            let dir = dpo_data::tensorboard::run_dir(out, &spec.name);
            let w = dpo_data::tensorboard::EventWriter::create(&dir, first_step)
                .map_err(io_err(&dir))?;
            tracing::info!(file = %w.path().display(), "writing TensorBoard events");
            Some(w)
        } else {
            None
        };
        Ok(Reporter {
            metrics: MetricsFile::append_to(&out.join("metrics.jsonl"))?,
            eval: if with_eval {
                Some(MetricsFile::append_to(&out.join("eval.jsonl"))?)
            } else {
                None
            },
            events,
        })
    }

    fn event(&mut self, m: &Metrics) -> Result<()> {
        match self.events.as_mut() {
            Some(w) => {
                let path = w.path().to_path_buf();
                w.scalars(m).map_err(io_err(path))
            }
            None => Ok(()),
        }
    }

    /// A training step's line.
    pub fn step(&mut self, m: &Metrics) -> Result<()> {
        self.metrics.write(m)?;
        self.event(m)
    }

    /// An evaluation's line.
    pub fn eval(&mut self, m: &Metrics) -> Result<()> {
        if let Some(f) = self.eval.as_mut() {
            f.write(m)?;
        }
        self.event(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A worker's second run, smaller than its first, reports its own peak.
    #[test]
    fn the_peak_resident_size_starts_again_at_each_run() {
        reset_peak_resident();
        let base = peak_resident_bytes().expect("VmHWM");
        // An earlier run's peak: 256 MiB touched, then given back.
        let big = vec![1u8; 256 << 20];
        std::hint::black_box(&big);
        drop(big);
        let after_big = peak_resident_bytes().expect("VmHWM");
        assert!(after_big >= base + (200 << 20), "{base} → {after_big}");
        reset_peak_resident();
        let fresh = peak_resident_bytes().expect("VmHWM");
        assert!(
            fresh < base + (64 << 20),
            "the mark kept the earlier peak: {base} → {after_big} → {fresh}"
        );
    }
}
