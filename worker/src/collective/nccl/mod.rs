//! The `nccl` collective: NVIDIA's NCCL on the GPU, one rank per device.
//!
//! - **Loading.** `libnccl.so.2` is found explicitly — `DPO_NCCL_LIBRARY`, then
//!   the `nvidia-nccl` package beside the running libtorch
//!   (`site-packages/nvidia/nccl/lib`), then `LD_LIBRARY_PATH`, then the usual
//!   system folders — and its functions are resolved with cudarc's NCCL type
//!   bindings (`ncclUniqueId`, `ncclConfig_t`, the data-type and reduction
//!   enums). cudarc's own loader looks only for `libnccl.so` and panics when
//!   it finds nothing, so none of its functions are called. A machine without
//!   CUDA or NCCL gets [`unavailable`]'s error, which names what is missing.
//! - **Bootstrap.** Rank 0 of a generation creates the unique id and publishes
//!   it through the coordinator ([`encode_bootstrap`]: the generation goes
//!   with it and is checked on the way back, on top of the coordinator's own
//!   fencing), so a rank of an older generation can never join a newer
//!   communicator.
//! - **Never hang.** The communicator is created non-blocking. Every
//!   operation is queued on libtorch's current stream, and the thread then
//!   polls — the stream (`cudaStreamQuery`), `ncclCommGetAsyncError`, the
//!   generation's [`AbortSignal`] and a deadline — instead of blocking in a
//!   synchronize. When the generation is aborted (a peer died, the coordinator
//!   formed a new world) or NCCL reports an error, the communicator is
//!   `ncclCommAbort`ed, which ends the kernels still waiting for the dead
//!   peer, and the operation returns at once.
#![allow(unsafe_code)]

use std::ffi::{OsStr, c_char, c_int, c_void};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use cudarc::nccl::sys::{ncclComm_t, ncclConfig_t, ncclDataType_t, ncclRedOp_t, ncclUniqueId};
use tch::{Device, Kind, Tensor};

use super::{AbortSignal, Collective, CollectiveError, chunk};
use crate::cuda::{self, Stream};

mod library;

pub use library::{
    Library, NcclError, candidates, decode_bootstrap, encode_bootstrap, library, unavailable,
};

const NCCL_SUCCESS: c_int = 0;
const NCCL_IN_PROGRESS: c_int = 7;
/// `NCCL_CONFIG_UNDEF_INT`: "let NCCL choose".
const UNDEF: c_int = c_int::MIN;
/// The `ncclConfig_t` layout cudarc's `nccl-02028` bindings describe: the
/// NCCL 2.28 that PyTorch 2.11's `nvidia-nccl-cu13` ships. Newer libraries
/// read an older config by its version.
const CONFIG_VERSION: u32 = 22800;
/// Bytes of an NCCL unique id.
pub const ID_LEN: usize = 128;
const BOOTSTRAP_MAGIC: &[u8; 8] = b"DPONCCL1";

/// One step of a wait.
#[derive(Debug)]
pub enum Poll {
    Ready,
    Pending,
    Failed(String),
}

/// Polls `poll` until it is ready, giving up when `signal` fires (then
/// `on_give_up` runs: the communicator is aborted) or `deadline` passes. Spins
/// briefly, then sleeps in short naps, so a fast collective returns within
/// microseconds and a long one costs no CPU.
pub fn wait(
    rank: usize,
    what: &'static str,
    signal: &AbortSignal,
    timeout: Duration,
    mut poll: impl FnMut() -> Poll,
    on_give_up: impl FnOnce(),
) -> Result<(), CollectiveError> {
    let start = Instant::now();
    let mut spins = 0u32;
    loop {
        match poll() {
            Poll::Ready => return Ok(()),
            Poll::Failed(reason) => {
                on_give_up();
                return Err(CollectiveError::Protocol {
                    rank,
                    reason: format!("{what}: {reason}"),
                });
            }
            Poll::Pending => {}
        }
        if signal.is_aborted() {
            on_give_up();
            return Err(CollectiveError::Aborted);
        }
        if start.elapsed() > timeout {
            on_give_up();
            return Err(CollectiveError::Timeout {
                rank,
                timeout,
                reason: format!("{what} did not complete"),
            });
        }
        spins += 1;
        if spins < 2000 {
            std::thread::yield_now();
        } else {
            std::thread::sleep(Duration::from_micros(200));
        }
    }
}

/// Settings of a communicator.
#[derive(Debug, Clone)]
pub struct NcclOptions {
    /// How long forming the communicator may take.
    pub connect_timeout: Duration,
    /// How long one operation may take before the rank gives up.
    pub io_timeout: Duration,
    /// The generation's abort.
    pub abort: AbortSignal,
}

impl Default for NcclOptions {
    fn default() -> Self {
        NcclOptions {
            connect_timeout: Duration::from_secs(120),
            io_timeout: Duration::from_secs(300),
            abort: AbortSignal::default(),
        }
    }
}

/// One rank's NCCL communicator.
#[derive(Debug)]
pub struct NcclCollective {
    rank: usize,
    world: usize,
    device: usize,
    comm: ncclComm_t,
    lib: &'static Library,
    rt: &'static cuda::Runtime,
    signal: AbortSignal,
    io_timeout: Duration,
    /// Aborted (or broken): every later operation fails at once.
    dead: bool,
}

// SAFETY: the communicator is used by one thread at a time (the trait takes
// `&mut self`); NCCL communicators may move between threads.
unsafe impl Send for NcclCollective {}

fn kind_of(kind: Kind) -> Option<ncclDataType_t> {
    Some(match kind {
        Kind::Float => ncclDataType_t::ncclFloat32,
        Kind::BFloat16 => ncclDataType_t::ncclBfloat16,
        Kind::Half => ncclDataType_t::ncclFloat16,
        Kind::Double => ncclDataType_t::ncclFloat64,
        Kind::Uint8 => ncclDataType_t::ncclUint8,
        Kind::Int64 => ncclDataType_t::ncclInt64,
        Kind::Int => ncclDataType_t::ncclInt32,
        _ => return None,
    })
}

impl NcclCollective {
    /// Joins the communicator of unique id `id` as `rank` of `world`, on CUDA
    /// device `device`.
    pub fn connect(
        rank: usize,
        world: usize,
        device: usize,
        id: &[u8; ID_LEN],
        opts: &NcclOptions,
    ) -> Result<Self, CollectiveError> {
        let fail = |reason: String| CollectiveError::Protocol { rank, reason };
        if let Some(e) = unavailable(Device::Cuda(device)) {
            return Err(fail(e.to_string()));
        }
        let lib = library().map_err(|e| fail(e.to_string()))?;
        let rt = cuda::runtime().map_err(|e| fail(e.to_string()))?;
        if rank >= world {
            return Err(fail(format!("rank {rank} outside a world of {world}")));
        }
        rt.set_device(device).map_err(|e| fail(e.to_string()))?;
        let mut config = ncclConfig_t {
            size: std::mem::size_of::<ncclConfig_t>(),
            magic: 0xcafe_beef,
            version: CONFIG_VERSION,
            blocking: 0,
            cgaClusterSize: UNDEF,
            minCTAs: UNDEF,
            maxCTAs: UNDEF,
            netName: std::ptr::null(),
            splitShare: UNDEF,
            trafficClass: UNDEF,
            commName: std::ptr::null(),
            collnetEnable: UNDEF,
            CTAPolicy: UNDEF,
            shrinkShare: UNDEF,
            nvlsCTAs: UNDEF,
            nChannelsPerNetPeer: UNDEF,
            nvlinkCentricSched: UNDEF,
        };
        let unique = ncclUniqueId {
            internal: id.map(|b| b as c_char),
        };
        let mut comm: ncclComm_t = std::ptr::null_mut();
        let (n, r) = (
            c_int::try_from(world).map_err(|e| fail(e.to_string()))?,
            c_int::try_from(rank).map_err(|e| fail(e.to_string()))?,
        );
        // SAFETY: `comm` and `config` outlive the call; the id is by value.
        let rc = unsafe { (lib.init_rank_config)(&mut comm, n, unique, r, &mut config) };
        if rc != NCCL_SUCCESS && rc != NCCL_IN_PROGRESS {
            return Err(fail(format!(
                "ncclCommInitRankConfig: {}",
                lib.describe(rc, comm)
            )));
        }
        let mut me = NcclCollective {
            rank,
            world,
            device,
            comm,
            lib,
            rt,
            signal: opts.abort.clone(),
            io_timeout: opts.io_timeout,
            dead: false,
        };
        // Non-blocking init: the communicator is ready when its async error
        // leaves "in progress". A peer that never comes leaves it there.
        let (lib, comm, signal) = (me.lib, me.comm, me.signal.clone());
        let result = wait(
            rank,
            "forming the NCCL communicator",
            &signal,
            opts.connect_timeout,
            || async_state(lib, comm),
            || abort_comm(lib, comm),
        );
        if let Err(e) = result {
            me.dead = true;
            return Err(e);
        }
        tracing::info!(
            rank,
            world,
            device,
            nccl = lib.version,
            "NCCL communicator ready"
        );
        Ok(me)
    }

    /// Queues one NCCL call on libtorch's current stream of this device, then
    /// waits for it as the module documentation says.
    fn run(
        &mut self,
        what: &'static str,
        launch: impl FnOnce(ncclComm_t, Stream) -> c_int,
    ) -> Result<(), CollectiveError> {
        let rank = self.rank;
        if self.dead || self.signal.is_aborted() {
            self.give_up();
            return Err(CollectiveError::Aborted);
        }
        let fail = |reason: String| CollectiveError::Protocol { rank, reason };
        self.rt
            .set_device(self.device)
            .map_err(|e| fail(e.to_string()))?;
        let stream = self
            .rt
            .current_stream(self.device)
            .map_err(|e| fail(e.to_string()))?;
        let rc = launch(self.comm, stream);
        if rc != NCCL_SUCCESS && rc != NCCL_IN_PROGRESS {
            let reason = format!("{what}: {}", self.lib.describe(rc, self.comm));
            self.give_up();
            return Err(fail(reason));
        }
        let (lib, comm, rt, signal) = (self.lib, self.comm, self.rt, self.signal.clone());
        let result = wait(
            rank,
            what,
            &signal,
            self.io_timeout,
            || match async_state(lib, comm) {
                Poll::Ready => match rt.stream_done(stream) {
                    Ok(true) => Poll::Ready,
                    Ok(false) => Poll::Pending,
                    Err(e) => Poll::Failed(e.to_string()),
                },
                other => other,
            },
            || abort_comm(lib, comm),
        );
        if result.is_err() {
            self.dead = true;
        }
        result
    }

    fn give_up(&mut self) {
        if !self.dead {
            abort_comm(self.lib, self.comm);
            self.dead = true;
        }
    }

    fn check(&self, t: &Tensor, what: &'static str) -> Result<ncclDataType_t, CollectiveError> {
        let fail = |reason: String| CollectiveError::Protocol {
            rank: self.rank,
            reason: format!("{what}: {reason}"),
        };
        if t.device() != Device::Cuda(self.device) {
            return Err(fail(format!(
                "tensor on {:?}, communicator on cuda:{}",
                t.device(),
                self.device
            )));
        }
        if !t.is_contiguous() {
            return Err(fail("tensor is not contiguous".into()));
        }
        kind_of(t.kind()).ok_or_else(|| fail(format!("no NCCL type for {:?}", t.kind())))
    }

    fn on_device(&self, t: Tensor) -> Result<Tensor, CollectiveError> {
        t.f_to_device(Device::Cuda(self.device))
            .and_then(|t| t.f_contiguous())
            .map_err(|e| CollectiveError::Protocol {
                rank: self.rank,
                reason: format!("staging on cuda:{}: {e}", self.device),
            })
    }

    fn to_host(&self, t: &Tensor, out: &mut [u8]) -> Result<(), CollectiveError> {
        t.f_to_device(Device::Cpu)
            .and_then(|h| h.f_contiguous())
            .and_then(|h| h.f_copy_data_u8(out, h.numel()))
            .map_err(|e| CollectiveError::Protocol {
                rank: self.rank,
                reason: format!("reading back from cuda:{}: {e}", self.device),
            })
    }

    /// A padded staging buffer for uneven chunks: rank r's chunk of `n`
    /// elements sits at `r * c`, where `c` is the largest chunk.
    fn chunk_stride(&self, n: usize) -> usize {
        chunk(n, self.world, 0).1
    }

    fn bytes_tensor(&self, data: &[u8]) -> Result<Tensor, CollectiveError> {
        self.on_device(Tensor::from_slice(data))
    }
}

fn async_state(lib: &Library, comm: ncclComm_t) -> Poll {
    let mut state: c_int = NCCL_SUCCESS;
    // SAFETY: `comm` is a live communicator; one out-parameter.
    let rc = unsafe { (lib.async_error)(comm, &mut state) };
    if rc != NCCL_SUCCESS {
        return Poll::Failed(format!("ncclCommGetAsyncError: {}", lib.describe(rc, comm)));
    }
    match state {
        NCCL_SUCCESS => Poll::Ready,
        NCCL_IN_PROGRESS => Poll::Pending,
        code => Poll::Failed(lib.describe(code, comm)),
    }
}

fn abort_comm(lib: &Library, comm: ncclComm_t) {
    if comm.is_null() {
        return;
    }
    // SAFETY: `comm` is live and aborted once (callers mark it dead).
    let rc = unsafe { (lib.abort)(comm) };
    tracing::warn!(rc, "NCCL communicator aborted");
}

impl Drop for NcclCollective {
    fn drop(&mut self) {
        if self.dead || self.comm.is_null() {
            return;
        }
        // A clean end: finalize (flushes outstanding work, non-blocking: wait
        // a bounded time), then destroy; abort if that does not complete.
        let (lib, comm) = (self.lib, self.comm);
        // SAFETY: `comm` is live; it is finalized and destroyed once.
        let rc = unsafe { (lib.finalize)(comm) };
        let done = (rc == NCCL_SUCCESS || rc == NCCL_IN_PROGRESS)
            && wait(
                self.rank,
                "finalizing the NCCL communicator",
                &self.signal,
                Duration::from_secs(10),
                || async_state(lib, comm),
                || {},
            )
            .is_ok();
        if done {
            // SAFETY: finalized above.
            unsafe { (lib.destroy)(comm) };
        } else {
            abort_comm(lib, comm);
        }
    }
}

impl Collective for NcclCollective {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.world
    }

    fn all_reduce_sum(&mut self, data: &mut [f32]) -> Result<(), CollectiveError> {
        let mut t = self.on_device(Tensor::from_slice(data))?;
        self.all_reduce_tensor(&mut t)?;
        self.to_host(&t, bytemuck::cast_slice_mut(data))
    }

    fn reduce_scatter_sum(&mut self, data: &mut [f32]) -> Result<(), CollectiveError> {
        let mut t = self.on_device(Tensor::from_slice(data))?;
        self.reduce_scatter_tensor(&mut t)?;
        self.to_host(&t, bytemuck::cast_slice_mut(data))
    }

    fn all_gather_chunks(&mut self, data: &mut [f32]) -> Result<(), CollectiveError> {
        let mut t = self.on_device(Tensor::from_slice(data))?;
        self.all_gather_tensor_chunks(&mut t)?;
        self.to_host(&t, bytemuck::cast_slice_mut(data))
    }

    fn all_gather(&mut self, data: &[u8]) -> Result<Vec<Vec<u8>>, CollectiveError> {
        // Lengths first (they may differ), then the blocks padded to the longest.
        let len = self.bytes_tensor(&(data.len() as u64).to_le_bytes())?;
        let lens_t = self.on_device(Tensor::zeros(
            [(8 * self.world) as i64],
            (Kind::Uint8, Device::Cpu),
        ))?;
        self.gather_raw(&len, &lens_t, 8, "all-gather (lengths)")?;
        let mut lens_b = vec![0u8; 8 * self.world];
        self.to_host(&lens_t, &mut lens_b)?;
        let lens: Vec<usize> = lens_b
            .chunks_exact(8)
            .map(|b| u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]) as usize)
            .collect();
        let width = lens.iter().copied().max().unwrap_or(0);
        if width == 0 {
            return Ok(vec![Vec::new(); self.world]);
        }
        let mut mine = data.to_vec();
        mine.resize(width, 0);
        let send = self.bytes_tensor(&mine)?;
        let recv = self.on_device(Tensor::zeros(
            [(width * self.world) as i64],
            (Kind::Uint8, Device::Cpu),
        ))?;
        self.gather_raw(&send, &recv, width, "all-gather")?;
        let mut all = vec![0u8; width * self.world];
        self.to_host(&recv, &mut all)?;
        Ok(all
            .chunks_exact(width)
            .zip(&lens)
            .map(|(b, &l)| b[..l].to_vec())
            .collect())
    }

    fn broadcast(&mut self, data: &[u8], root: usize) -> Result<Vec<u8>, CollectiveError> {
        let len = self.bytes_tensor(&(data.len() as u64).to_le_bytes())?;
        self.broadcast_raw(&len, 8, root, "broadcast (length)")?;
        let mut b = [0u8; 8];
        self.to_host(&len, &mut b)?;
        let n = u64::from_le_bytes(b) as usize;
        if n == 0 {
            return Ok(Vec::new());
        }
        let mut mine = if self.rank == root {
            data.to_vec()
        } else {
            vec![0u8; n]
        };
        let t = self.bytes_tensor(&mine)?;
        self.broadcast_raw(&t, n, root, "broadcast")?;
        self.to_host(&t, &mut mine)?;
        Ok(mine)
    }

    fn abort(&self) {
        // The thread that owns the communicator aborts it when it next polls
        // (within a fraction of a millisecond while an operation waits).
        self.signal.abort();
    }

    fn all_reduce_tensor(&mut self, t: &mut Tensor) -> Result<(), CollectiveError> {
        let dtype = self.check(t, "all-reduce")?;
        let (ptr, n) = (t.data_ptr(), t.numel());
        let lib = self.lib;
        self.run("all-reduce", |comm, stream| {
            // SAFETY: `ptr` is `n` contiguous elements of `dtype` on this
            // communicator's device, alive until the wait returns.
            unsafe { (lib.all_reduce)(ptr, ptr, n, dtype, ncclRedOp_t::ncclSum, comm, stream) }
        })
    }

    fn reduce_scatter_tensor(&mut self, t: &mut Tensor) -> Result<(), CollectiveError> {
        let dtype = self.check(t, "reduce-scatter")?;
        let n = t.numel();
        let c = self.chunk_stride(n);
        let (w, r) = (self.world, self.rank);
        let fail = |e: tch::TchError| CollectiveError::Protocol {
            rank: r,
            reason: format!("reduce-scatter staging: {e}"),
        };
        // Stage the uneven chunks at an even stride, reduce-scatter, and put
        // this rank's sum back where `chunk` says it lives.
        let staged = Tensor::f_zeros([(c * w) as i64], (t.kind(), t.device())).map_err(fail)?;
        for rank in 0..w {
            let (s, l) = chunk(n, w, rank);
            if l > 0 {
                staged
                    .f_narrow(0, (rank * c) as i64, l as i64)
                    .and_then(|mut d| d.f_copy_(&t.f_narrow(0, s as i64, l as i64)?))
                    .map_err(fail)?;
            }
        }
        let recv = Tensor::f_zeros([c as i64], (t.kind(), t.device())).map_err(fail)?;
        let (send_ptr, recv_ptr) = (staged.data_ptr(), recv.data_ptr());
        let lib = self.lib;
        self.run("reduce-scatter", |comm, stream| {
            // SAFETY: `staged` holds `c * w` and `recv` `c` elements of
            // `dtype` on this device, alive until the wait returns.
            unsafe {
                (lib.reduce_scatter)(
                    send_ptr,
                    recv_ptr,
                    c,
                    dtype,
                    ncclRedOp_t::ncclSum,
                    comm,
                    stream,
                )
            }
        })?;
        let (s, l) = chunk(n, w, r);
        if l > 0 {
            t.f_narrow(0, s as i64, l as i64)
                .and_then(|mut d| d.f_copy_(&recv.f_narrow(0, 0, l as i64)?))
                .map_err(fail)?;
        }
        Ok(())
    }

    fn all_gather_tensor_chunks(&mut self, t: &mut Tensor) -> Result<(), CollectiveError> {
        let dtype = self.check(t, "all-gather")?;
        let n = t.numel();
        let c = self.chunk_stride(n);
        let (w, r) = (self.world, self.rank);
        let fail = |e: tch::TchError| CollectiveError::Protocol {
            rank: r,
            reason: format!("all-gather staging: {e}"),
        };
        let send = Tensor::f_zeros([c as i64], (t.kind(), t.device())).map_err(fail)?;
        let (s, l) = chunk(n, w, r);
        if l > 0 {
            send.f_narrow(0, 0, l as i64)
                .and_then(|mut d| d.f_copy_(&t.f_narrow(0, s as i64, l as i64)?))
                .map_err(fail)?;
        }
        let recv = Tensor::f_zeros([(c * w) as i64], (t.kind(), t.device())).map_err(fail)?;
        let (send_ptr, recv_ptr) = (send.data_ptr(), recv.data_ptr());
        let lib = self.lib;
        self.run("all-gather", |comm, stream| {
            // SAFETY: `send` holds `c` and `recv` `c * w` elements of `dtype`
            // on this device, alive until the wait returns.
            unsafe { (lib.all_gather)(send_ptr, recv_ptr, c, dtype, comm, stream) }
        })?;
        for rank in 0..w {
            let (s, l) = chunk(n, w, rank);
            if l > 0 {
                t.f_narrow(0, s as i64, l as i64)
                    .and_then(|mut d| d.f_copy_(&recv.f_narrow(0, (rank * c) as i64, l as i64)?))
                    .map_err(fail)?;
            }
        }
        Ok(())
    }
}

impl NcclCollective {
    fn gather_raw(
        &mut self,
        send: &Tensor,
        recv: &Tensor,
        count: usize,
        what: &'static str,
    ) -> Result<(), CollectiveError> {
        let dtype = self.check(send, what)?;
        let (s, r) = (send.data_ptr(), recv.data_ptr());
        let lib = self.lib;
        self.run(what, |comm, stream| {
            // SAFETY: `send` holds `count` and `recv` `count * world`
            // elements of `dtype` on this device, alive until the wait returns.
            unsafe { (lib.all_gather)(s, r, count, dtype, comm, stream) }
        })
    }

    fn broadcast_raw(
        &mut self,
        t: &Tensor,
        count: usize,
        root: usize,
        what: &'static str,
    ) -> Result<(), CollectiveError> {
        let dtype = self.check(t, what)?;
        let p = t.data_ptr();
        let root = c_int::try_from(root).map_err(|e| CollectiveError::Protocol {
            rank: self.rank,
            reason: e.to_string(),
        })?;
        let lib = self.lib;
        self.run(what, |comm, stream| {
            // SAFETY: `t` holds `count` elements of `dtype` on this device,
            // alive until the wait returns.
            unsafe { (lib.broadcast)(p, p, count, dtype, root, comm, stream) }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn looks_beside_torch_first_after_an_explicit_path() {
        let c = candidates(
            Some(OsStr::new("/opt/nccl/libnccl.so.2")),
            Some(Path::new("/venv/lib/python3.12/site-packages/torch/lib")),
            Some(OsStr::new("/a:/b")),
        );
        assert_eq!(c[0], PathBuf::from("/opt/nccl/libnccl.so.2"));
        assert_eq!(
            c[1],
            PathBuf::from("/venv/lib/python3.12/site-packages/nvidia/nccl/lib/libnccl.so.2")
        );
        assert_eq!(c[2], PathBuf::from("/a/libnccl.so.2"));
        assert_eq!(c[3], PathBuf::from("/a/libnccl.so"));
        assert_eq!(c[4], PathBuf::from("/b/libnccl.so.2"));
        let none = candidates(None, None, None);
        assert!(none.iter().all(|p| p.is_absolute()));
    }

    #[test]
    fn the_bootstrap_is_fenced_by_generation() {
        let id: [u8; ID_LEN] = std::array::from_fn(|i| i as u8);
        let data = encode_bootstrap(7, &id);
        assert_eq!(decode_bootstrap(&data, 7), Ok(id));
        let stale = decode_bootstrap(&data, 8).expect_err("another generation's id");
        assert_eq!(
            stale,
            NcclError::StaleBootstrap {
                published: 7,
                expected: 8
            }
        );
        assert!(
            stale.to_string().contains("generation 7, expected 8"),
            "{stale}"
        );
        assert!(decode_bootstrap(&data[..100], 7).is_err());
        assert!(decode_bootstrap(&[0u8; 16 + ID_LEN], 7).is_err());
    }

    #[test]
    fn a_wait_gives_up_at_once_when_the_generation_is_aborted() {
        let signal = AbortSignal::default();
        let aborted = AtomicUsize::new(0);
        let s = signal.clone();
        let fire = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            s.abort();
        });
        let start = Instant::now();
        let r = wait(
            0,
            "all-reduce",
            &signal,
            Duration::from_secs(60),
            || Poll::Pending,
            || {
                aborted.fetch_add(1, Ordering::SeqCst);
            },
        );
        fire.join().expect("thread");
        assert!(matches!(r, Err(CollectiveError::Aborted)), "{r:?}");
        assert!(
            start.elapsed() < Duration::from_secs(1),
            "{:?}",
            start.elapsed()
        );
        assert_eq!(
            aborted.load(Ordering::SeqCst),
            1,
            "the communicator is aborted once"
        );
    }

    #[test]
    fn a_wait_aborts_on_an_nccl_error_and_on_its_deadline() {
        let signal = AbortSignal::default();
        let aborted = AtomicUsize::new(0);
        let mut polls = 0;
        let r = wait(
            3,
            "all-gather",
            &signal,
            Duration::from_secs(60),
            || {
                polls += 1;
                if polls < 5 {
                    Poll::Pending
                } else {
                    Poll::Failed("NCCL error 6: remote process exited".into())
                }
            },
            || {
                aborted.fetch_add(1, Ordering::SeqCst);
            },
        );
        let Err(CollectiveError::Protocol { rank, reason }) = r else {
            panic!("{r:?}");
        };
        assert_eq!(rank, 3);
        assert!(reason.contains("all-gather: NCCL error 6"), "{reason}");
        let r = wait(
            0,
            "forming",
            &signal,
            Duration::from_millis(30),
            || Poll::Pending,
            || {
                aborted.fetch_add(1, Ordering::SeqCst);
            },
        );
        assert!(matches!(r, Err(CollectiveError::Timeout { .. })), "{r:?}");
        assert_eq!(aborted.load(Ordering::SeqCst), 2);
        let mut n = 0;
        let ok = wait(
            0,
            "x",
            &signal,
            Duration::from_secs(1),
            || {
                n += 1;
                if n > 3 { Poll::Ready } else { Poll::Pending }
            },
            || panic!("not aborted"),
        );
        assert!(ok.is_ok());
    }

    /// The venv's `nvidia-nccl-cu13` loads on a machine without a GPU, through
    /// the same search as on a GPU node; the backend then refuses with the cause.
    #[test]
    fn nccl_loads_beside_torch_and_a_cpu_device_is_refused_with_the_cause() {
        let _ = crate::cuda::load_torch_cuda();
        match library() {
            Ok(lib) => {
                eprintln!("NCCL {} from {}", lib.version, lib.path.display());
                // Making an id needs no GPU (it opens NCCL's bootstrap socket).
                let (a, b) = (lib.unique_id(), lib.unique_id());
                let (a, b) = (a.expect("unique id"), b.expect("unique id"));
                assert_ne!(a, b, "each generation gets a fresh id");
                assert!(a.iter().any(|&x| x != 0));
                assert!(lib.version >= 21800, "NCCL {}", lib.version);
                assert!(lib.path.ends_with("libnccl.so.2") || lib.path.ends_with("libnccl.so"));
            }
            // A libtorch without the NCCL package: the error lists where it looked.
            Err(e) => {
                assert!(matches!(e, NcclError::NotFound { .. }), "{e}");
                assert!(
                    e.to_string().contains("libnccl.so.2 not found (looked for"),
                    "{e}"
                );
            }
        }
        let e = unavailable(Device::Cpu).expect("no NCCL on the CPU");
        assert_eq!(
            e,
            NcclError::NotCuda {
                device: "Cpu".into()
            }
        );
        assert!(e.to_string().contains("needs a CUDA device"), "{e}");
        if crate::cuda::device_count() == 0 {
            let e = unavailable(Device::Cuda(0)).expect("no GPU here");
            assert!(matches!(e, NcclError::NoDevice(_)), "{e}");
            assert!(e.to_string().contains("sees 0 CUDA devices"), "{e}");
            let err = NcclCollective::connect(0, 1, 0, &[0; ID_LEN], &NcclOptions::default())
                .expect_err("no GPU here");
            assert!(err.to_string().contains("sees 0 CUDA devices"), "{err}");
        }
    }
}
