//! How many intra-op (OpenMP) threads a rank's libtorch runs. libtorch starts
//! one per core of the host, and its OpenMP threads spin while they wait: N
//! ranks on one host, each with every core, spend their time preempting each
//! other (four workers on two cores ran 35× slower than they should). So each
//! rank takes its share of the cores it may use — the host's, or its
//! container's quota and CPU set (`std::thread::available_parallelism` reads
//! both) — divided by the ranks on its host, as torchrun does when it starts
//! more than one rank per node. An explicit `--threads N` wins, and so do
//! `OMP_NUM_THREADS`/`MKL_NUM_THREADS` when the user set them.

use std::sync::atomic::{AtomicUsize, Ordering};

/// What a choice was made from, for the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// `--threads N` (or `DPO_THREADS`).
    Flag,
    /// `OMP_NUM_THREADS` or `MKL_NUM_THREADS` in the environment: libtorch
    /// reads it itself, left alone.
    Environment,
    /// The usable cores divided by the ranks on this host.
    Shared,
}

/// A rank's thread choice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Choice {
    pub intra_op: usize,
    pub cores: usize,
    pub ranks_on_host: usize,
    pub source: Source,
}

/// The cores this process may use: its CPU set and cgroup quota considered,
/// and no more than `DPO_CPUS` (the Helm chart sets it to the pod's CPU
/// request) when that is set.
pub fn usable_cores() -> usize {
    let seen = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
    let given = std::env::var("DPO_CPUS")
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .filter(|&n| n > 0);
    given.map_or(seen, |n| n.min(seen))
}

/// Whether the user set an OpenMP/MKL thread count in the environment.
fn from_environment() -> bool {
    ["OMP_NUM_THREADS", "MKL_NUM_THREADS"]
        .iter()
        .any(|k| std::env::var(k).is_ok_and(|v| !v.trim().is_empty()))
}

/// The choice for `ranks_on_host` ranks sharing `cores`, unless `explicit`
/// or the environment says otherwise (pure: [`apply`] acts on it).
pub fn choose(
    explicit: Option<usize>,
    env_set: bool,
    cores: usize,
    ranks_on_host: usize,
) -> Choice {
    let ranks_on_host = ranks_on_host.max(1);
    let (intra_op, source) = match explicit {
        Some(n) => (n.max(1), Source::Flag),
        None if env_set => (0, Source::Environment),
        None => ((cores / ranks_on_host).max(1), Source::Shared),
    };
    Choice {
        intra_op,
        cores,
        ranks_on_host,
        source,
    }
}

/// The intra-op thread count last applied (0: none yet).
static APPLIED: AtomicUsize = AtomicUsize::new(0);

/// Sets libtorch's intra-op threads for `ranks_on_host` ranks on this host
/// (or `explicit`), logging the choice when it changes; returns the count in
/// effect.
pub fn apply(explicit: Option<usize>, ranks_on_host: usize) -> usize {
    let mut c = choose(explicit, from_environment(), usable_cores(), ranks_on_host);
    if c.source == Source::Environment {
        c.intra_op = usize::try_from(tch::get_num_threads()).unwrap_or(1).max(1);
    } else {
        tch::set_num_threads(i32::try_from(c.intra_op).unwrap_or(i32::MAX));
    }
    if APPLIED.swap(c.intra_op, Ordering::SeqCst) != c.intra_op {
        tracing::info!(
            intra_op_threads = c.intra_op,
            cores = c.cores,
            ranks_on_host = c.ranks_on_host,
            source = ?c.source,
            "threads"
        );
    }
    c.intra_op
}

/// The intra-op thread count in effect (as last applied; libtorch's own
/// count before any).
pub fn current() -> usize {
    match APPLIED.load(Ordering::SeqCst) {
        0 => usize::try_from(tch::get_num_threads()).unwrap_or(1),
        n => n,
    }
}

/// How many of `peers` (a tcp ring's `host:port` list) are on this host: the
/// loopback addresses and this machine's own name.
pub fn local_peers(peers: &[String]) -> usize {
    let me = hostname();
    peers
        .iter()
        .filter(|p| {
            let host = p.rsplit_once(':').map_or(p.as_str(), |(h, _)| h);
            let host = host.trim_start_matches('[').trim_end_matches(']');
            host == "localhost"
                || host
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback())
                || me.as_deref() == Some(host)
        })
        .count()
        .max(1)
}

/// This machine's name (the kernel's), if it has one.
pub fn hostname() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranks_on_one_host_share_its_cores_and_the_user_s_word_wins() {
        let shared = choose(None, false, 16, 4);
        assert_eq!((shared.intra_op, shared.source), (4, Source::Shared));
        assert_eq!(choose(None, false, 2, 4).intra_op, 1, "never below one");
        assert_eq!(
            choose(None, false, 8, 0).intra_op,
            8,
            "an unknown count is one rank"
        );
        assert_eq!(choose(Some(3), false, 16, 4).intra_op, 3);
        assert_eq!(choose(Some(3), true, 16, 4).source, Source::Flag);
        assert_eq!(choose(None, true, 16, 4).source, Source::Environment);
    }

    #[test]
    fn local_peers_are_loopback_or_this_host() {
        let peers: Vec<String> = ["127.0.0.1:1", "127.0.0.1:2", "10.9.9.9:3", "[::1]:4"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(local_peers(&peers), 3);
        assert_eq!(local_peers(&[]), 1);
    }
}
