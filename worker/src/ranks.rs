//! One worker, several devices: `dpo-worker --gpus N` (or `--devices
//! cuda:0,cuda:1,…`) runs one rank per device, each in a process of its own
//! (as torchrun's `--nproc-per-node` does), each registered with the
//! coordinator as a member with its local rank, so the coordinator places a
//! host's ranks next to each other. This process supervises them: it forwards
//! SIGTERM/SIGINT (each rank then leaves gracefully, handing its share over),
//! restarts a rank that crashed (it rejoins as a new member; the run repairs
//! its world meanwhile), and gives up when a rank keeps crashing.
#![allow(unsafe_code)]

use std::process::{Child, Command, ExitStatus};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// How one rank is started: the binary, and its arguments without the
/// per-rank ones, which [`Supervisor`] adds.
#[derive(Debug, Clone)]
pub struct RankCommand {
    pub program: std::path::PathBuf,
    /// Arguments every rank shares (coordinator, log format, …).
    pub common: Vec<String>,
    /// The devices, one rank each (`cuda:0`, …).
    pub devices: Vec<String>,
    /// The worker id the ranks' ids derive from (`ID-rank0`, …).
    pub worker_id: String,
    /// The collective address; a port other than 0 becomes port + local rank.
    pub listen: std::net::SocketAddr,
}

impl RankCommand {
    /// The arguments of local rank `i`.
    pub fn args(&self, i: usize) -> Vec<String> {
        let mut listen = self.listen;
        if listen.port() != 0 {
            listen.set_port(listen.port().saturating_add(i as u16));
        }
        let mut a = self.common.clone();
        a.extend([
            "--device".into(),
            self.devices[i].clone(),
            "--worker-id".into(),
            format!("{}-rank{i}", self.worker_id),
            "--local-rank".into(),
            i.to_string(),
            "--listen".into(),
            listen.to_string(),
        ]);
        a
    }
}

/// Crashes of one rank within [`CRASH_WINDOW`] after which the supervisor gives up.
pub const MAX_CRASHES: usize = 5;
pub const CRASH_WINDOW: Duration = Duration::from_secs(120);
const RESTART_DELAY: Duration = Duration::from_secs(2);

#[derive(Debug)]
struct Rank {
    child: Option<Child>,
    crashes: Vec<Instant>,
    restart_at: Option<Instant>,
}

/// Runs the ranks until they have all exited after a stop signal, or one
/// keeps crashing (an error naming it and its last exit status).
pub fn supervise(cmd: &RankCommand, stop: Arc<AtomicBool>) -> crate::Result<()> {
    let spawn = |i: usize| -> crate::Result<Child> {
        use std::os::unix::process::CommandExt;
        let supervisor = std::process::id() as libc::pid_t;
        let mut command = Command::new(&cmd.program);
        command.args(cmd.args(i));
        // A rank outlives no supervisor: when this process dies, even by
        // SIGKILL, the kernel sends each rank SIGTERM (it leaves gracefully).
        // SAFETY: between fork and exec only async-signal-safe calls are made
        // (prctl, getppid, _exit), touching no memory of the parent.
        unsafe {
            command.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // The supervisor died before the line above took effect.
                if libc::getppid() != supervisor {
                    libc::_exit(1);
                }
                Ok(())
            });
        }
        let child = command.spawn().map_err(|source| crate::Error::Os {
            what: format!("starting rank {i} ({})", cmd.program.display()),
            source,
        })?;
        tracing::info!(local_rank = i, device = %cmd.devices[i], pid = child.id(), "rank started");
        Ok(child)
    };
    let mut ranks = Vec::new();
    for i in 0..cmd.devices.len() {
        ranks.push(Rank {
            child: Some(spawn(i)?),
            crashes: Vec::new(),
            restart_at: None,
        });
    }
    let mut stopping = false;
    let mut failure: Option<String> = None;
    loop {
        if stop.load(Ordering::SeqCst) && !stopping {
            stopping = true;
            tracing::info!("stopping: asking every rank to leave");
            for r in &ranks {
                if let Some(c) = &r.child {
                    terminate(c);
                }
            }
        }
        for (i, r) in ranks.iter_mut().enumerate() {
            let exited: Option<ExitStatus> = match r.child.as_mut() {
                Some(c) => c.try_wait().map_err(|source| crate::Error::Os {
                    what: format!("waiting for rank {i}"),
                    source,
                })?,
                None => None,
            };
            if let Some(status) = exited {
                r.child = None;
                if stopping || status.success() {
                    tracing::info!(local_rank = i, %status, "rank exited");
                    continue;
                }
                let now = Instant::now();
                r.crashes.retain(|t| now.duration_since(*t) < CRASH_WINDOW);
                r.crashes.push(now);
                if r.crashes.len() >= MAX_CRASHES {
                    failure = Some(format!(
                        "rank {i} ({}) exited {} times within {}s, last with {status}",
                        cmd.devices[i],
                        r.crashes.len(),
                        CRASH_WINDOW.as_secs()
                    ));
                } else {
                    tracing::warn!(local_rank = i, %status, "rank crashed; restarting it");
                    r.restart_at = Some(now + RESTART_DELAY);
                }
            }
            if !stopping
                && failure.is_none()
                && r.child.is_none()
                && r.restart_at.is_some_and(|t| Instant::now() >= t)
            {
                r.restart_at = None;
                r.child = Some(spawn(i)?);
            }
        }
        if let Some(f) = &failure {
            if !stopping {
                stopping = true;
                for r in &ranks {
                    if let Some(c) = &r.child {
                        terminate(c);
                    }
                }
            }
            if ranks.iter().all(|r| r.child.is_none()) {
                return Err(crate::Error::RankFailed { reason: f.clone() });
            }
        }
        let pending_restart = ranks.iter().any(|r| r.restart_at.is_some());
        if ranks.iter().all(|r| r.child.is_none()) && (stopping || !pending_restart) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Asks a rank to leave (SIGTERM: it finishes its step and hands its share over).
fn terminate(child: &Child) {
    if let Ok(pid) = libc::pid_t::try_from(child.id()) {
        // SAFETY: signals a child process this supervisor started and has not
        // reaped yet (so the pid cannot have been reused).
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
    }
}

/// The devices of `--gpus N`: `cuda:0` … `cuda:N-1`, refused with the cause
/// when this machine has fewer.
pub fn gpus(n: usize) -> crate::Result<Vec<String>> {
    let refuse = |reason: String| crate::Error::Input {
        context: format!("--gpus {n}"),
        reason,
    };
    if n == 0 {
        return Err(refuse("give at least one".into()));
    }
    let have = crate::cuda::device_count();
    if have < n {
        return Err(refuse(format!(
            "libtorch sees {have} CUDA device{} on this machine",
            if have == 1 { "" } else { "s" }
        )));
    }
    Ok((0..n).map(|i| format!("cuda:{i}")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_rank_gets_its_device_id_and_port() {
        let cmd = RankCommand {
            program: "dpo-worker".into(),
            common: vec!["--coordinator".into(), "http://c:50051".into()],
            devices: vec!["cuda:0".into(), "cuda:1".into()],
            worker_id: "pod-a".into(),
            listen: "0.0.0.0:29500".parse().expect("addr"),
        };
        let a = cmd.args(1);
        let s = a.join(" ");
        assert!(s.starts_with("--coordinator http://c:50051"), "{s}");
        assert!(s.contains("--device cuda:1"), "{s}");
        assert!(s.contains("--worker-id pod-a-rank1"), "{s}");
        assert!(s.contains("--local-rank 1"), "{s}");
        assert!(s.contains("--listen 0.0.0.0:29501"), "{s}");
        let any = RankCommand {
            listen: "127.0.0.1:0".parse().expect("addr"),
            ..cmd
        };
        assert!(any.args(1).join(" ").contains("--listen 127.0.0.1:0"));
    }

    #[test]
    fn more_gpus_than_the_machine_has_are_refused() {
        let have = crate::cuda::device_count();
        let e = gpus(have + 1).expect_err("too many").to_string();
        assert!(e.contains(&format!("sees {have} CUDA device")), "{e}");
        assert!(gpus(0).is_err());
    }

    #[test]
    fn a_crashing_rank_is_restarted_then_given_up_on() {
        // `false` stands in for a rank that dies at once.
        let cmd = RankCommand {
            program: "false".into(),
            common: Vec::new(),
            devices: vec!["cpu".into()],
            worker_id: "w".into(),
            listen: "127.0.0.1:0".parse().expect("addr"),
        };
        let start = Instant::now();
        let e = supervise(&cmd, Arc::new(AtomicBool::new(false))).expect_err("gives up");
        let msg = e.to_string();
        assert!(
            msg.contains(&format!("exited {MAX_CRASHES} times")),
            "{msg}"
        );
        // Restarted after a delay each time, not in a tight loop.
        assert!(
            start.elapsed() >= RESTART_DELAY * (MAX_CRASHES as u32 - 1),
            "{:?}",
            start.elapsed()
        );
    }

    #[test]
    fn a_stop_reaches_every_rank() {
        let cmd = RankCommand {
            program: "sleep".into(),
            common: vec!["30".into()],
            devices: vec!["a".into(), "b".into()],
            worker_id: "w".into(),
            listen: "127.0.0.1:0".parse().expect("addr"),
        };
        // `sleep 30 --device a …` is not valid for sleep: use a shell instead.
        let cmd = RankCommand {
            program: "sh".into(),
            common: vec!["-c".into(), "exec sleep 30".into()],
            ..cmd
        };
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            s.store(true, Ordering::SeqCst);
        });
        let start = Instant::now();
        supervise(&cmd, stop).expect("stopped cleanly");
        t.join().expect("thread");
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{:?}",
            start.elapsed()
        );
    }
}
