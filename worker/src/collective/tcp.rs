//! The `tcp` collective: a ring over TCP. All-reduce is reduce-scatter then
//! all-gather (each rank sends and receives `2 (W − 1) / W` of the data, the
//! bandwidth-optimal schedule); every step sends to the next rank while receiving
//! from the previous one, on two threads, so the ring never deadlocks on full
//! socket buffers. Connections open with a handshake carrying a magic, the
//! generation, the rank and the generation's ring key (random, handed out by the
//! coordinator over its authenticated channel): a peer of another generation, or
//! a stranger without the key, is refused. A connection that does not say hello
//! within [`HANDSHAKE_TIMEOUT`] is dropped, so a silent stranger cannot stall
//! the ring's formation. (The ring's data is not encrypted: keep its port on a
//! private network — the Helm chart's NetworkPolicy admits only workers.)

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use super::{AbortSignal, Collective, CollectiveError, chunk};

const MAGIC: &[u8; 8] = b"DPOCOLL2";
/// Bytes of the ring key that enter the handshake.
pub const KEY_LEN: usize = 32;
const HELLO_LEN: usize = 24 + KEY_LEN;
/// How long an accepted connection may take to say hello.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// The byte a rank answers a valid handshake with.
const ACK: u8 = 0xA5;

/// One rank's view of a ring.
#[derive(Debug)]
pub struct TcpCollective {
    rank: usize,
    world: usize,
    /// To rank + 1.
    next: Option<TcpStream>,
    /// From rank − 1.
    prev: Option<TcpStream>,
    /// Holds clones of both sockets, for `abort` from another thread.
    signal: AbortSignal,
}

/// Connection settings.
#[derive(Debug, Clone)]
pub struct TcpOptions {
    /// How long forming the ring may take.
    pub connect_timeout: Duration,
    /// How long one receive may wait for a peer before the operation fails.
    pub io_timeout: Duration,
    /// Fires to give up forming the ring or any later operation.
    pub abort: AbortSignal,
    /// The generation's shared secret (up to [`KEY_LEN`] bytes; empty: none).
    pub key: Vec<u8>,
}

impl Default for TcpOptions {
    fn default() -> Self {
        TcpOptions {
            connect_timeout: Duration::from_secs(60),
            io_timeout: Duration::from_secs(300),
            abort: AbortSignal::default(),
            key: Vec::new(),
        }
    }
}

fn io(rank: usize, op: &'static str) -> impl Fn(std::io::Error) -> CollectiveError {
    move |source| CollectiveError::Io { rank, op, source }
}

fn handshake_bytes(generation: u64, rank: usize, key: &[u8]) -> [u8; HELLO_LEN] {
    let mut b = [0u8; HELLO_LEN];
    b[..8].copy_from_slice(MAGIC);
    b[8..16].copy_from_slice(&generation.to_le_bytes());
    b[16..24].copy_from_slice(&(rank as u64).to_le_bytes());
    let n = key.len().min(KEY_LEN);
    b[24..24 + n].copy_from_slice(&key[..n]);
    b
}

/// Compares without stopping at the first difference (the key is a secret).
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl TcpCollective {
    /// Joins the ring of `generation`: listens on `listener` (this rank's address in
    /// `peers`), connects to the next rank, accepts the previous one.
    pub fn connect(
        rank: usize,
        peers: &[SocketAddr],
        listener: TcpListener,
        generation: u64,
        opts: &TcpOptions,
    ) -> Result<Self, CollectiveError> {
        let world = peers.len();
        if rank >= world {
            return Err(CollectiveError::Protocol {
                rank,
                reason: format!("rank {rank} outside a world of {world}"),
            });
        }
        let signal = opts.abort.clone();
        if world == 1 {
            return Ok(TcpCollective {
                rank,
                world,
                next: None,
                prev: None,
                signal,
            });
        }
        let deadline = Instant::now() + opts.connect_timeout;
        let next_rank = (rank + 1) % world;
        let prev_rank = (rank + world - 1) % world;
        // Connect and accept at once: every rank does both.
        let target = peers[next_rank];
        let hello = handshake_bytes(generation, rank, &opts.key);
        let expected = handshake_bytes(generation, prev_rank, &opts.key);
        let connect_signal = signal.clone();
        let connector = std::thread::spawn(move || -> std::io::Result<TcpStream> {
            loop {
                if connect_signal.is_aborted() {
                    return Err(std::io::Error::other("aborted"));
                }
                match TcpStream::connect_timeout(&target, Duration::from_millis(500)) {
                    Ok(mut s) => {
                        // Introduce ourselves at once; the peer acknowledges a valid
                        // handshake with one byte. A peer still forming an older ring
                        // on the same listener refuses (closes) it: connect again.
                        s.set_nodelay(true)?;
                        s.write_all(&hello)?;
                        s.set_read_timeout(Some(Duration::from_millis(200)))?;
                        let mut ack = [0u8; 1];
                        loop {
                            match (&s).read(&mut ack) {
                                Ok(1) if ack[0] == ACK => {
                                    s.set_read_timeout(None)?;
                                    return Ok(s);
                                }
                                Err(e)
                                    if matches!(
                                        e.kind(),
                                        std::io::ErrorKind::WouldBlock
                                            | std::io::ErrorKind::TimedOut
                                    ) && !connect_signal.is_aborted()
                                        && Instant::now() < deadline => {}
                                // Refused (closed), or out of time.
                                _ => break,
                            }
                        }
                        if Instant::now() >= deadline {
                            return Err(std::io::Error::other("the peer never acknowledged"));
                        }
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    Err(e) if Instant::now() >= deadline => return Err(e),
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        listener.set_nonblocking(true).map_err(io(rank, "listen"))?;
        let prev = loop {
            match listener.accept() {
                Ok((s, _)) => {
                    s.set_nonblocking(false).map_err(io(rank, "accept"))?;
                    s.set_read_timeout(Some(HANDSHAKE_TIMEOUT.min(opts.io_timeout)))
                        .map_err(io(rank, "accept"))?;
                    let mut hello = [0u8; HELLO_LEN];
                    let got = (&s).read_exact(&mut hello);
                    if got.is_ok() && same(&hello, &expected) {
                        s.set_read_timeout(Some(opts.io_timeout))
                            .map_err(io(rank, "accept"))?;
                        (&s).write_all(&[ACK]).map_err(io(rank, "accept"))?;
                        break s;
                    }
                    // A stranger, a stale generation or the wrong rank: refuse it and
                    // keep waiting for the real previous rank.
                    tracing::warn!(
                        rank,
                        generation,
                        "refused a ring connection with a bad handshake"
                    );
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if signal.is_aborted() {
                        return Err(CollectiveError::Aborted);
                    }
                    if Instant::now() >= deadline {
                        return Err(CollectiveError::Timeout {
                            rank,
                            timeout: opts.connect_timeout,
                            reason: format!("rank {prev_rank} did not connect"),
                        });
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => return Err(io(rank, "accept")(e)),
            }
        };
        let next = connector
            .join()
            .map_err(|_| CollectiveError::Protocol {
                rank,
                reason: "connector thread panicked".into(),
            })?
            .map_err(|e| {
                if signal.is_aborted() {
                    return CollectiveError::Aborted;
                }
                CollectiveError::Timeout {
                    rank,
                    timeout: opts.connect_timeout,
                    reason: format!("cannot reach rank {next_rank} at {target}: {e}"),
                }
            })?;
        next.set_read_timeout(Some(opts.io_timeout))
            .map_err(io(rank, "connect"))?;
        signal.register(next.try_clone().map_err(io(rank, "connect"))?);
        signal.register(prev.try_clone().map_err(io(rank, "accept"))?);
        Ok(TcpCollective {
            rank,
            world,
            next: Some(next),
            prev: Some(prev),
            signal,
        })
    }

    fn check(&self) -> Result<(), CollectiveError> {
        if self.signal.is_aborted() {
            Err(CollectiveError::Aborted)
        } else {
            Ok(())
        }
    }

    /// Sends `out` to the next rank while receiving `inp.len()` bytes from the previous.
    fn exchange(&self, out: &[u8], inp: &mut [u8]) -> Result<(), CollectiveError> {
        self.check()?;
        let (Some(next), Some(prev)) = (&self.next, &self.prev) else {
            return Ok(());
        };
        let rank = self.rank;
        let signal = &self.signal;
        let map = |e: std::io::Error, op: &'static str| {
            if signal.is_aborted() {
                CollectiveError::Aborted
            } else {
                io(rank, op)(e)
            }
        };
        std::thread::scope(|scope| {
            let sender = scope.spawn(move || {
                let mut w = next;
                w.write_all(out)
            });
            let mut r = prev;
            let received = r.read_exact(inp).map_err(|e| map(e, "receive"));
            let sent = sender
                .join()
                .unwrap_or_else(|_| Err(std::io::Error::other("sender thread panicked")))
                .map_err(|e| map(e, "send"));
            received.and(sent)
        })
    }
}

impl TcpCollective {
    /// The ring's reduce-scatter over `data` cut into `world` chunks: after it,
    /// this rank's chunk `(rank + shift) % world` holds the sum of every
    /// rank's (the other chunks hold partial sums).
    fn reduce_scatter_phase(&self, data: &mut [f32], shift: usize) -> Result<(), CollectiveError> {
        self.check()?;
        let w = self.world;
        if w == 1 || data.is_empty() {
            return Ok(());
        }
        // Numbered so that the chunk finished here is `r + 1`: `r = rank + shift − 1`.
        let r = (self.rank + shift + w - 1) % w;
        let n = data.len();
        let mut recv = vec![0u8; chunk(n, w, 0).1 * 4];
        // After step s, chunk (r − s − 1) holds s + 2 contributions.
        for s in 0..w - 1 {
            let (ss, sl) = chunk(n, w, (r + w - s) % w);
            let (rs, rl) = chunk(n, w, (r + 2 * w - s - 1) % w);
            let out: Vec<u8> = bytemuck::cast_slice(&data[ss..ss + sl]).to_vec();
            self.exchange(&out, &mut recv[..rl * 4])?;
            let incoming: &[f32] = bytemuck::cast_slice(&recv[..rl * 4]);
            for (d, x) in data[rs..rs + rl].iter_mut().zip(incoming) {
                *d += *x;
            }
        }
        Ok(())
    }

    /// The ring's all-gather: this rank's chunk `(rank + shift) % world` of
    /// `data` is passed around until every rank has every chunk.
    fn all_gather_phase(&self, data: &mut [f32], shift: usize) -> Result<(), CollectiveError> {
        self.check()?;
        let w = self.world;
        if w == 1 || data.is_empty() {
            return Ok(());
        }
        let r = (self.rank + shift + w - 1) % w;
        let n = data.len();
        let mut recv = vec![0u8; chunk(n, w, 0).1 * 4];
        for s in 0..w - 1 {
            let (ss, sl) = chunk(n, w, (r + 1 + w - s) % w);
            let (rs, rl) = chunk(n, w, (r + w - s) % w);
            let out: Vec<u8> = bytemuck::cast_slice(&data[ss..ss + sl]).to_vec();
            self.exchange(&out, &mut recv[..rl * 4])?;
            data[rs..rs + rl].copy_from_slice(bytemuck::cast_slice(&recv[..rl * 4]));
        }
        Ok(())
    }
}

impl Collective for TcpCollective {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn all_reduce_sum(&mut self, data: &mut [f32]) -> Result<(), CollectiveError> {
        // A reduce-scatter leaves rank r with the sum of chunk r + 1; passing
        // the finished chunks on completes every rank.
        self.reduce_scatter_phase(data, 1)?;
        self.all_gather_phase(data, 1)
    }

    fn reduce_scatter_sum(&mut self, data: &mut [f32]) -> Result<(), CollectiveError> {
        self.reduce_scatter_phase(data, 0)
    }

    fn all_gather_chunks(&mut self, data: &mut [f32]) -> Result<(), CollectiveError> {
        self.all_gather_phase(data, 0)
    }

    fn shift(&mut self, data: &[u8]) -> Result<Vec<u8>, CollectiveError> {
        self.check()?;
        if self.world == 1 {
            return Ok(data.to_vec());
        }
        let len = (data.len() as u64).to_le_bytes();
        let mut got = [0u8; 8];
        self.exchange(&len, &mut got)?;
        let mut block = vec![0u8; u64::from_le_bytes(got) as usize];
        self.exchange(data, &mut block)?;
        Ok(block)
    }

    fn all_gather(&mut self, data: &[u8]) -> Result<Vec<Vec<u8>>, CollectiveError> {
        self.check()?;
        let w = self.world;
        let mut out = vec![Vec::new(); w];
        out[self.rank] = data.to_vec();
        // Pass each rank's block around the ring, length-prefixed.
        let mut carry = self.rank;
        for _ in 0..w.saturating_sub(1) {
            let len = (out[carry].len() as u64).to_le_bytes();
            let mut got = [0u8; 8];
            self.exchange(&len, &mut got)?;
            let from = (carry + w - 1) % w;
            let mut block = vec![0u8; u64::from_le_bytes(got) as usize];
            let send = out[carry].clone();
            self.exchange(&send, &mut block)?;
            out[from] = block;
            carry = from;
        }
        Ok(out)
    }

    fn broadcast(&mut self, data: &[u8], root: usize) -> Result<Vec<u8>, CollectiveError> {
        self.check()?;
        let w = self.world;
        if root >= w {
            return Err(CollectiveError::Protocol {
                rank: self.rank,
                reason: format!("broadcast root {root} outside a world of {w}"),
            });
        }
        if w == 1 {
            return Ok(data.to_vec());
        }
        // Down the ring from the root: each rank receives from the previous and
        // forwards to the next, except the last, whose next is the root.
        let r = self.rank;
        let pos = (r + w - root) % w;
        let mut block = if pos == 0 { data.to_vec() } else { Vec::new() };
        let (Some(next), Some(prev)) = (&self.next, &self.prev) else {
            return Ok(block);
        };
        let signal = &self.signal;
        let fail = |e: std::io::Error, op: &'static str| {
            if signal.is_aborted() {
                CollectiveError::Aborted
            } else {
                io(r, op)(e)
            }
        };
        if pos > 0 {
            let mut prev = prev;
            let mut len = [0u8; 8];
            prev.read_exact(&mut len)
                .map_err(|e| fail(e, "broadcast receive"))?;
            block = vec![0u8; u64::from_le_bytes(len) as usize];
            prev.read_exact(&mut block)
                .map_err(|e| fail(e, "broadcast receive"))?;
        }
        if pos < w - 1 {
            let mut next = next;
            next.write_all(&(block.len() as u64).to_le_bytes())
                .and_then(|_| next.write_all(&block))
                .map_err(|e| fail(e, "broadcast send"))?;
        }
        Ok(block)
    }

    fn abort(&self) {
        self.signal.abort();
    }
}

/// Starts a ring of `world` ranks on loopback (for tests), connected by one
/// thread each; rank `r` is element `r`.
#[cfg(test)]
pub(crate) fn test_ring(world: usize, generation: u64) -> Vec<TcpCollective> {
    let listeners: Vec<TcpListener> = (0..world)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind"))
        .collect();
    let peers: Vec<SocketAddr> = listeners
        .iter()
        .map(|l| l.local_addr().expect("addr"))
        .collect();
    let handles: Vec<_> = listeners
        .into_iter()
        .enumerate()
        .map(|(rank, l)| {
            let peers = peers.clone();
            std::thread::spawn(move || {
                TcpCollective::connect(rank, &peers, l, generation, &TcpOptions::default())
            })
        })
        .collect();
    handles
        .into_iter()
        .map(|h| h.join().expect("thread").expect("connects"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn on_all<T: Send + 'static>(
        ranks: Vec<TcpCollective>,
        f: impl Fn(&mut TcpCollective) -> T + Send + Sync + Copy + 'static,
    ) -> Vec<T> {
        let handles: Vec<_> = ranks
            .into_iter()
            .map(|mut c| std::thread::spawn(move || f(&mut c)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("thread"))
            .collect()
    }

    fn data(rank: usize, n: usize) -> Vec<f32> {
        (0..n)
            .map(|i| ((i * 7 + rank * 13) % 101) as f32 * 0.25 - 3.0)
            .collect()
    }

    #[test]
    fn all_reduce_sums_and_leaves_identical_bits() {
        for world in [1, 2, 3, 4] {
            for n in [0, 1, 2, 3, 7, 1000, 100_003] {
                let results = on_all(test_ring(world, 1), move |c| {
                    let mut v = data(c.rank(), n);
                    c.all_reduce_sum(&mut v).expect("all-reduce");
                    v
                });
                let inputs: Vec<Vec<f32>> = (0..world).map(|r| data(r, n)).collect();
                for (i, got) in results[0].iter().enumerate() {
                    let want: f32 = inputs.iter().map(|v| v[i]).sum();
                    assert!(
                        (got - want).abs() <= 1e-4 * want.abs().max(1.0),
                        "world {world} n {n} [{i}]: {got} vs {want}"
                    );
                }
                for r in &results[1..] {
                    assert!(
                        r.iter()
                            .zip(&results[0])
                            .all(|(a, b)| a.to_bits() == b.to_bits()),
                        "identical on every rank"
                    );
                }
            }
        }
    }

    #[test]
    fn reduce_scatter_leaves_each_rank_its_summed_chunk_and_all_gather_spreads_them() {
        for world in [1, 2, 3, 4] {
            for n in [0, 1, 2, 5, 1000, 10_007] {
                let results = on_all(test_ring(world, 2), move |c| {
                    let mut v = data(c.rank(), n);
                    c.reduce_scatter_sum(&mut v).expect("reduce-scatter");
                    let (start, len) = chunk(n, c.world_size(), c.rank());
                    let mine = v[start..start + len].to_vec();
                    // Only the own chunk is defined: spoil the rest, then gather.
                    let mut spread = vec![f32::NAN; n];
                    spread[start..start + len].copy_from_slice(&mine);
                    c.all_gather_chunks(&mut spread).expect("all-gather");
                    let mut reduced = data(c.rank(), n);
                    c.all_reduce_sum(&mut reduced).expect("all-reduce");
                    (mine, spread, reduced)
                });
                let inputs: Vec<Vec<f32>> = (0..world).map(|r| data(r, n)).collect();
                for (rank, (mine, spread, reduced)) in results.iter().enumerate() {
                    let (start, len) = chunk(n, world, rank);
                    assert_eq!(mine.len(), len);
                    for (i, got) in mine.iter().enumerate() {
                        let want: f32 = inputs.iter().map(|v| v[start + i]).sum();
                        assert!(
                            (got - want).abs() <= 1e-4 * want.abs().max(1.0),
                            "world {world} n {n} rank {rank} [{i}]: {got} vs {want}"
                        );
                    }
                    // Every rank ends with every owner's chunk, bit for bit.
                    for (owner, (o_mine, _, _)) in results.iter().enumerate() {
                        let (s, l) = chunk(n, world, owner);
                        assert!(
                            spread[s..s + l]
                                .iter()
                                .zip(o_mine)
                                .all(|(a, b)| a.to_bits() == b.to_bits()),
                            "world {world} n {n}: rank {rank} has owner {owner}'s chunk"
                        );
                    }
                    assert_eq!(reduced.len(), n);
                }
            }
        }
    }

    /// A collective with only the required operations, so the trait's default
    /// reduce-scatter and all-gather (what a backend without its own gets) run.
    struct Defaults(TcpCollective);

    impl Collective for Defaults {
        fn rank(&self) -> usize {
            self.0.rank()
        }
        fn world_size(&self) -> usize {
            self.0.world_size()
        }
        fn all_reduce_sum(&mut self, data: &mut [f32]) -> Result<(), CollectiveError> {
            self.0.all_reduce_sum(data)
        }
        fn all_gather(&mut self, data: &[u8]) -> Result<Vec<Vec<u8>>, CollectiveError> {
            self.0.all_gather(data)
        }
        fn broadcast(&mut self, data: &[u8], root: usize) -> Result<Vec<u8>, CollectiveError> {
            self.0.broadcast(data, root)
        }
        fn abort(&self) {
            self.0.abort()
        }
    }

    #[test]
    fn the_default_reduce_scatter_and_all_gather_agree_with_the_ring() {
        for world in [1, 3] {
            let n = 1001;
            let pairs: Vec<(TcpCollective, TcpCollective)> = test_ring(world, 3)
                .into_iter()
                .zip(test_ring(world, 4))
                .collect();
            let handles: Vec<_> = pairs
                .into_iter()
                .map(|(mut c, other)| {
                    std::thread::spawn(move || {
                        let (start, len) = chunk(n, c.world_size(), c.rank());
                        let mut ring_rs = data(c.rank(), n);
                        c.reduce_scatter_sum(&mut ring_rs).expect("ring");
                        let mut d = Defaults(other);
                        let mut default_rs = data(d.rank(), n);
                        d.reduce_scatter_sum(&mut default_rs).expect("default");
                        let mut spread = vec![0.0f32; n];
                        spread[start..start + len].copy_from_slice(&default_rs[start..start + len]);
                        d.all_gather_chunks(&mut spread).expect("default gather");
                        (
                            ring_rs[start..start + len].to_vec(),
                            default_rs[start..start + len].to_vec(),
                            spread,
                        )
                    })
                })
                .collect();
            let results: Vec<_> = handles
                .into_iter()
                .map(|h| h.join().expect("thread"))
                .collect();
            for (rank, (ring_mine, default_mine, spread)) in results.iter().enumerate() {
                for (a, b) in ring_mine.iter().zip(default_mine) {
                    assert!((a - b).abs() <= 1e-4 * a.abs().max(1.0), "rank {rank}");
                }
                let (s, l) = chunk(n, world, rank);
                assert_eq!(&spread[s..s + l], default_mine.as_slice());
                assert!(spread.iter().all(|x| x.is_finite()));
            }
            // Everyone holds the same whole vector after the gather.
            assert!(results.iter().all(|r| r.2 == results[0].2));
        }
    }

    #[test]
    fn shift_hands_each_rank_its_predecessors_bytes() {
        for world in [1, 2, 3, 4] {
            let results = on_all(test_ring(world, 5), |c| {
                let mine = vec![c.rank() as u8; c.rank() + 2];
                let ring_got = c.shift(&mine).expect("shift");
                (c.rank(), ring_got)
            });
            for (rank, got) in results {
                let prev = (rank + world - 1) % world;
                assert_eq!(got, vec![prev as u8; prev + 2], "world {world} rank {rank}");
            }
        }
    }

    #[test]
    fn all_gather_returns_every_rank_block() {
        let results = on_all(test_ring(3, 7), |c| {
            let mine = vec![c.rank() as u8; c.rank() * 3 + 1];
            c.all_gather(&mine).expect("gather")
        });
        for got in results {
            for (r, block) in got.iter().enumerate() {
                assert_eq!(block, &vec![r as u8; r * 3 + 1]);
            }
        }
    }

    #[test]
    fn broadcast_delivers_the_root_bytes_everywhere() {
        for root in 0..3 {
            let results = on_all(test_ring(3, 11), move |c| {
                let mine = vec![c.rank() as u8 + 1; 100_000 + c.rank()];
                c.broadcast(&mine, root).expect("broadcast")
            });
            for got in results {
                assert_eq!(got, vec![root as u8 + 1; 100_000 + root]);
            }
        }
    }

    #[test]
    fn abort_unblocks_peers_instead_of_hanging() {
        let mut ranks = test_ring(3, 2);
        let victim = ranks.remove(2);
        let t = Instant::now();
        // Rank 2 never joins the all-reduce; it aborts, and ranks 0 and 1 must fail
        // promptly rather than wait for their I/O timeout.
        let handle = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(200));
            victim.abort();
            victim
        });
        let results = on_all(ranks, |c| {
            let mut v = vec![1.0f32; 10_000];
            c.all_reduce_sum(&mut v).is_err()
        });
        let victim = handle.join().expect("victim");
        assert!(results.iter().all(|&failed| failed), "peers fail");
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "promptly: {:?}",
            t.elapsed()
        );
        let mut v = vec![0.0f32; 4];
        let mut victim = victim;
        assert!(matches!(
            victim.all_reduce_sum(&mut v),
            Err(CollectiveError::Aborted)
        ));
    }

    #[test]
    fn a_peer_of_another_generation_is_refused() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let other = TcpListener::bind("127.0.0.1:0").expect("bind");
        let peers = vec![
            listener.local_addr().expect("addr"),
            other.local_addr().expect("addr"),
        ];
        // A stale rank 1 (generation 4) knocks on rank 0 of generation 5.
        let stale = std::thread::spawn({
            let addr = peers[0];
            move || {
                let mut s = TcpStream::connect(addr).expect("connect");
                s.write_all(&handshake_bytes(4, 1, &[])).expect("hello");
                std::thread::sleep(Duration::from_millis(300));
            }
        });
        let opts = TcpOptions {
            connect_timeout: Duration::from_millis(800),
            io_timeout: Duration::from_secs(1),
            abort: AbortSignal::default(),
            key: Vec::new(),
        };
        let err = TcpCollective::connect(0, &peers, listener, 5, &opts).expect_err("no valid peer");
        assert!(matches!(err, CollectiveError::Timeout { .. }), "{err}");
        stale.join().expect("stale");
        drop(other);
    }

    #[test]
    fn strangers_without_the_key_or_silent_ones_do_not_join_or_stall_the_ring() {
        let l0 = TcpListener::bind("127.0.0.1:0").expect("bind");
        let l1 = TcpListener::bind("127.0.0.1:0").expect("bind");
        let peers = vec![
            l0.local_addr().expect("addr"),
            l1.local_addr().expect("addr"),
        ];
        let key = b"0123456789abcdef0123456789abcdef".to_vec();
        let opts = TcpOptions {
            connect_timeout: Duration::from_secs(20),
            io_timeout: Duration::from_secs(60),
            abort: AbortSignal::default(),
            key: key.clone(),
        };
        // Before rank 1 shows up, rank 0's listener gets a silent connection and
        // one with the right generation and rank but the wrong key.
        let silent = TcpStream::connect(peers[0]).expect("silent");
        let mut forged = TcpStream::connect(peers[0]).expect("forged");
        forged
            .write_all(&handshake_bytes(5, 1, b"not the key"))
            .expect("hello");
        let (p0, o0) = (peers.clone(), opts.clone());
        let t = Instant::now();
        let rank0 = std::thread::spawn(move || TcpCollective::connect(0, &p0, l0, 5, &o0));
        std::thread::sleep(Duration::from_millis(100));
        let mut c1 = TcpCollective::connect(1, &peers, l1, 5, &opts).expect("rank 1");
        let mut c0 = rank0.join().expect("rank 0").expect("rank 0");
        // Formed within the handshake timeout of the silent one, not io_timeout.
        assert!(
            t.elapsed() < HANDSHAKE_TIMEOUT + Duration::from_secs(3),
            "{:?}",
            t.elapsed()
        );
        // The forged one got no acknowledgement: its connection was closed.
        forged
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let mut b = [0u8; 1];
        assert!(matches!((&forged).read(&mut b), Ok(0) | Err(_)));
        drop(silent);
        let h = std::thread::spawn(move || {
            let mut v = vec![1.0f32];
            c0.all_reduce_sum(&mut v).map(|()| v)
        });
        let mut v = vec![2.0f32];
        c1.all_reduce_sum(&mut v).expect("all-reduce");
        assert_eq!(v, vec![3.0]);
        assert_eq!(h.join().expect("join").expect("all-reduce"), vec![3.0]);
    }

    #[test]
    fn a_connection_refused_by_a_stale_ring_is_retried() {
        // Rank 1's listener is first drained by a stale formation (an older
        // generation still forming on the same listener), which refuses rank 0's
        // connection; rank 0 must connect again rather than wait forever.
        let l0 = TcpListener::bind("127.0.0.1:0").expect("bind");
        let l1 = TcpListener::bind("127.0.0.1:0").expect("bind");
        let peers = vec![
            l0.local_addr().expect("addr"),
            l1.local_addr().expect("addr"),
        ];
        let opts = TcpOptions {
            connect_timeout: Duration::from_secs(10),
            io_timeout: Duration::from_secs(10),
            abort: AbortSignal::default(),
            key: Vec::new(),
        };
        let (p0, o0) = (peers.clone(), opts.clone());
        let rank0 = std::thread::spawn(move || TcpCollective::connect(0, &p0, l0, 5, &o0));
        let (stale, _) = l1.accept().expect("stale accept");
        let mut hello = [0u8; HELLO_LEN];
        (&stale).read_exact(&mut hello).expect("hello");
        assert_eq!(hello, handshake_bytes(5, 0, &[]));
        drop(stale);
        let t = Instant::now();
        let mut c1 = TcpCollective::connect(1, &peers, l1, 5, &opts).expect("rank 1");
        let mut c0 = rank0.join().expect("rank 0").expect("rank 0 connects");
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
        let h = std::thread::spawn(move || {
            let mut v = vec![1.0f32, 2.0];
            c0.all_reduce_sum(&mut v).map(|()| v)
        });
        let mut v = vec![10.0f32, 20.0];
        c1.all_reduce_sum(&mut v).expect("all-reduce");
        assert_eq!(v, vec![11.0, 22.0]);
        assert_eq!(
            h.join().expect("join").expect("all-reduce"),
            vec![11.0, 22.0]
        );
    }

    #[test]
    fn an_abort_stops_forming_the_ring_at_once() {
        // Rank 1 never shows up; the generation is aborted after 200 ms, long
        // before the 60 s connect timeout.
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let silent = TcpListener::bind("127.0.0.1:0").expect("bind");
        let peers = vec![
            listener.local_addr().expect("addr"),
            silent.local_addr().expect("addr"),
        ];
        let opts = TcpOptions {
            connect_timeout: Duration::from_secs(60),
            io_timeout: Duration::from_secs(60),
            abort: AbortSignal::default(),
            key: Vec::new(),
        };
        let signal = opts.abort.clone();
        let aborter = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(200));
            signal.abort();
        });
        let t = Instant::now();
        let err = TcpCollective::connect(0, &peers, listener, 1, &opts).expect_err("aborted");
        assert!(matches!(err, CollectiveError::Aborted), "{err}");
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
        aborter.join().expect("aborter");
    }
}
