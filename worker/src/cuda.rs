//! CUDA from the worker, without linking it: libtorch's CUDA half
//! (`libtorch_cuda.so`) is loaded at run time — the linker drops it from our
//! binaries, since no symbol of it is named, and without it libtorch sees no
//! GPU at all — and the few CUDA runtime calls the NCCL collective needs
//! (select a device, poll a stream, read free memory) are resolved from the
//! `libcudart` that libtorch already mapped. Every library is found next to the
//! `libtorch_cpu.so` this process runs with, so a CPU machine with the same
//! PyTorch wheel loads them too and simply sees no device.
#![allow(unsafe_code)]

use std::ffi::{c_char, c_int, c_void};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

/// Why CUDA cannot be used here, or a CUDA call failed. `Clone`: the
/// libraries are resolved once and the outcome is kept for every caller.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CudaError {
    /// A library libtorch should have mapped is not in this process.
    #[error("{library} is not mapped into this process{hint}")]
    NotMapped {
        library: &'static str,
        hint: &'static str,
    },
    #[error("{} does not exist (a CPU-only libtorch)", path.display())]
    Missing { path: PathBuf },
    #[error("loading {}: {reason}", path.display())]
    Load { path: PathBuf, reason: String },
    #[error("{}: {name}: {reason}", path.display())]
    Symbol {
        path: PathBuf,
        name: &'static str,
        reason: String,
    },
    /// A runtime call returned an error code.
    #[error("{call}: CUDA error {code} ({text})")]
    Call {
        call: &'static str,
        code: i32,
        text: String,
    },
    /// The device asked for cannot be used: libtorch's CUDA half is missing.
    #[error("cuda:{device}: libtorch's CUDA library: {source}")]
    Unavailable {
        device: usize,
        #[source]
        source: Box<CudaError>,
    },
    /// The device asked for is not among those libtorch sees.
    #[error(
        "cuda:{device}: libtorch sees {count} CUDA device{} on this machine{}",
        if *count == 1 { "" } else { "s" },
        if *count == 0 { " (no NVIDIA driver or GPU, or CUDA_VISIBLE_DEVICES hides them)" } else { "" }
    )]
    NoSuchDevice { device: usize, count: usize },
    #[error("device {device} out of range")]
    OutOfRange { device: usize },
    #[error("memory sampler thread: {reason}")]
    Thread { reason: String },
}

type CudaResult<T> = Result<T, CudaError>;

/// A CUDA stream handle (`cudaStream_t`), as libtorch hands it out: only
/// [`Runtime::current_stream`] makes one.
#[repr(transparent)]
#[derive(Debug, Clone, Copy)]
pub struct Stream(*mut c_void);

/// `cudaErrorNotReady`: the stream still has work.
const CUDA_NOT_READY: c_int = 600;

/// The path of the first library mapped into this process whose file name
/// starts with `prefix` (from `/proc/self/maps`).
pub fn mapped_library(prefix: &str) -> Option<PathBuf> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    mapped_in(&maps, prefix)
}

fn mapped_in(maps: &str, prefix: &str) -> Option<PathBuf> {
    maps.lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .map(Path::new)
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(prefix))
        })
        .map(Path::to_path_buf)
}

/// The folder of the `libtorch_cpu.so` this process runs with (`torch/lib` of
/// a PyTorch installation).
pub fn torch_lib_dir() -> Option<PathBuf> {
    mapped_library("libtorch_cpu.so").and_then(|p| p.parent().map(Path::to_path_buf))
}

/// Loads `libtorch_cuda.so` from libtorch's folder, once; afterwards
/// `tch::Cuda` sees the machine's GPUs. Returns its path, or why it could not
/// be loaded (a CPU-only libtorch, say).
pub fn load_torch_cuda() -> CudaResult<&'static Path> {
    static LOADED: OnceLock<CudaResult<PathBuf>> = OnceLock::new();
    LOADED
        .get_or_init(|| {
            let dir = torch_lib_dir().ok_or(CudaError::NotMapped {
                library: "libtorch_cpu.so",
                hint: "",
            })?;
            let path = dir.join("libtorch_cuda.so");
            if !path.exists() {
                return Err(CudaError::Missing { path });
            }
            // SAFETY: loading runs libtorch_cuda's static initialisers, which
            // register its CUDA hooks with the libtorch already loaded; the
            // library is never unloaded (it is leaked on purpose).
            let lib = unsafe { libloading::Library::new(&path) }.map_err(|e| CudaError::Load {
                path: path.clone(),
                reason: e.to_string(),
            })?;
            std::mem::forget(lib);
            tracing::debug!(path = %path.display(), "loaded libtorch_cuda");
            Ok(path)
        })
        .as_ref()
        .map(PathBuf::as_path)
        .map_err(Clone::clone)
}

/// How many CUDA devices libtorch sees (0 when its CUDA half cannot load).
pub fn device_count() -> usize {
    if load_torch_cuda().is_err() {
        return 0;
    }
    usize::try_from(tch::Cuda::device_count()).unwrap_or(0)
}

/// Checks that `device` exists: `Ok` for the CPU, an error naming the cause
/// for a CUDA device this process cannot use.
pub fn check_device(device: tch::Device) -> CudaResult<()> {
    let tch::Device::Cuda(i) = device else {
        return Ok(());
    };
    if let Err(e) = load_torch_cuda() {
        return Err(CudaError::Unavailable {
            device: i,
            source: Box::new(e),
        });
    }
    let count = device_count();
    if i >= count {
        return Err(CudaError::NoSuchDevice { device: i, count });
    }
    Ok(())
}

type SetDevice = unsafe extern "C" fn(c_int) -> c_int;
type StreamQuery = unsafe extern "C" fn(Stream) -> c_int;
type ErrorString = unsafe extern "C" fn(c_int) -> *const c_char;
type MemGetInfo = unsafe extern "C" fn(*mut usize, *mut usize) -> c_int;
type CurrentStream = unsafe extern "C" fn(i32, *mut *mut c_void) -> i32;

/// The CUDA runtime calls the collective and the memory sampler make.
#[derive(Debug)]
pub struct Runtime {
    set_device: SetDevice,
    stream_query: StreamQuery,
    error_string: ErrorString,
    mem_get_info: MemGetInfo,
    current_stream: CurrentStream,
    /// Where `libcudart` was found.
    pub cudart: PathBuf,
}

fn symbol<T: Copy>(lib: &libloading::Library, path: &Path, name: &'static str) -> CudaResult<T> {
    // SAFETY: the caller names the symbol's C signature as `T`, as the CUDA
    // runtime's and libtorch's headers declare it; the library stays loaded
    // for the life of the process (it is leaked).
    unsafe { lib.get::<T>(name.as_bytes()) }
        .map(|s| *s)
        .map_err(|e| CudaError::Symbol {
            path: path.to_path_buf(),
            name,
            reason: e.to_string(),
        })
}

/// Resolves the CUDA runtime, once.
pub fn runtime() -> CudaResult<&'static Runtime> {
    static RUNTIME: OnceLock<CudaResult<Runtime>> = OnceLock::new();
    RUNTIME
        .get_or_init(|| {
            let torch_cuda = load_torch_cuda()?.to_path_buf();
            let cudart = mapped_library("libcudart.so").ok_or(CudaError::NotMapped {
                library: "libcudart",
                hint: " (libtorch without CUDA?)",
            })?;
            // SAFETY: both libraries are already mapped (libtorch needs
            // them); this takes another reference, which is leaked.
            let load = |path: &PathBuf| {
                // SAFETY: as above.
                unsafe { libloading::Library::new(path) }.map_err(|e| CudaError::Load {
                    path: path.clone(),
                    reason: e.to_string(),
                })
            };
            let rt = load(&cudart)?;
            let tc = load(&torch_cuda)?;
            let runtime = Runtime {
                set_device: symbol(&rt, &cudart, "cudaSetDevice")?,
                stream_query: symbol(&rt, &cudart, "cudaStreamQuery")?,
                error_string: symbol(&rt, &cudart, "cudaGetErrorString")?,
                mem_get_info: symbol(&rt, &cudart, "cudaMemGetInfo")?,
                current_stream: symbol(&tc, &torch_cuda, "aoti_torch_get_current_cuda_stream")?,
                cudart: cudart.clone(),
            };
            std::mem::forget(rt);
            std::mem::forget(tc);
            Ok(runtime)
        })
        .as_ref()
        .map_err(Clone::clone)
}

impl Runtime {
    fn check(&self, code: c_int, call: &'static str) -> CudaResult<()> {
        if code == 0 {
            return Ok(());
        }
        // SAFETY: cudaGetErrorString returns a static string for any code.
        let text = unsafe { (self.error_string)(code) };
        let text = if text.is_null() {
            String::new()
        } else {
            // SAFETY: non-null, NUL-terminated, static.
            unsafe { std::ffi::CStr::from_ptr(text) }
                .to_string_lossy()
                .into_owned()
        };
        Err(CudaError::Call { call, code, text })
    }

    /// Makes `device` this thread's current CUDA device.
    pub fn set_device(&self, device: usize) -> CudaResult<()> {
        let d = c_int::try_from(device).map_err(|_| CudaError::OutOfRange { device })?;
        // SAFETY: plain runtime call with a device ordinal.
        self.check(unsafe { (self.set_device)(d) }, "cudaSetDevice")
    }

    /// The stream libtorch's kernels on `device` are issued to (this thread's
    /// current stream: the default stream unless a guard changed it).
    pub fn current_stream(&self, device: usize) -> CudaResult<Stream> {
        let d = i32::try_from(device).map_err(|_| CudaError::OutOfRange { device })?;
        let mut stream: *mut c_void = std::ptr::null_mut();
        // SAFETY: writes one pointer through the out-parameter.
        let rc = unsafe { (self.current_stream)(d, &mut stream) };
        if rc != 0 {
            return Err(CudaError::Call {
                call: "aoti_torch_get_current_cuda_stream",
                code: rc,
                text: String::new(),
            });
        }
        Ok(Stream(stream))
    }

    /// Whether every operation queued on `stream` has finished.
    pub fn stream_done(&self, stream: Stream) -> CudaResult<bool> {
        // SAFETY: `stream` came from `current_stream` and lives as long as
        // libtorch's stream pool (the process).
        let rc = unsafe { (self.stream_query)(stream) };
        if rc == CUDA_NOT_READY {
            return Ok(false);
        }
        self.check(rc, "cudaStreamQuery").map(|()| true)
    }

    /// `(free, total)` bytes of the current device.
    pub fn mem_info(&self) -> CudaResult<(u64, u64)> {
        let (mut free, mut total) = (0usize, 0usize);
        // SAFETY: two out-parameters.
        self.check(
            unsafe { (self.mem_get_info)(&mut free, &mut total) },
            "cudaMemGetInfo",
        )?;
        Ok((free as u64, total as u64))
    }
}

/// Samples a device's memory in use (`total − free`, as `nvidia-smi` shows
/// it: every process's allocations, libtorch's cached blocks and the CUDA
/// context) every few milliseconds on its own thread and keeps the peak:
/// libtorch's own allocator statistics are not reachable from Rust.
#[derive(Debug)]
pub struct PeakSampler {
    peak: std::sync::Arc<AtomicU64>,
    stop: std::sync::Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl PeakSampler {
    pub fn start(device: usize) -> CudaResult<Self> {
        let rt = runtime()?;
        rt.set_device(device)?;
        let (free, total) = rt.mem_info()?;
        let peak = std::sync::Arc::new(AtomicU64::new(total - free));
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let (p, s) = (peak.clone(), stop.clone());
        let thread = std::thread::Builder::new()
            .name(format!("cuda-{device}-memory"))
            .spawn(move || {
                if rt.set_device(device).is_err() {
                    return;
                }
                while !s.load(Ordering::Relaxed) {
                    if let Ok((free, total)) = rt.mem_info() {
                        p.fetch_max(total - free, Ordering::Relaxed);
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
            })
            .map_err(|e| CudaError::Thread {
                reason: e.to_string(),
            })?;
        Ok(PeakSampler {
            peak,
            stop,
            thread: Some(thread),
        })
    }

    /// The largest use seen so far, in bytes.
    pub fn peak(&self) -> u64 {
        self.peak.load(Ordering::Relaxed)
    }
}

impl Drop for PeakSampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_a_mapped_library_by_file_name() {
        let maps = "\
7f00-7f01 r--p 00000000 08:01 1 /venv/torch/lib/libtorch_cpu.so
7f01-7f02 r-xp 00000000 08:01 2 /venv/nvidia/cu13/lib/libcudart.so.13
7f02-7f03 rw-p 00000000 00:00 0
7f03-7f04 r--p 00000000 00:00 0 [heap]
";
        assert_eq!(
            mapped_in(maps, "libcudart.so"),
            Some(PathBuf::from("/venv/nvidia/cu13/lib/libcudart.so.13"))
        );
        assert_eq!(
            mapped_in(maps, "libtorch_cpu.so"),
            Some(PathBuf::from("/venv/torch/lib/libtorch_cpu.so"))
        );
        assert_eq!(mapped_in(maps, "libtorch_cuda.so"), None);
    }

    /// This process runs with the PyPI wheel (CUDA built in): its CUDA half
    /// loads even on a machine without a GPU, and the device check then names
    /// the cause instead of failing at the first tensor.
    #[test]
    fn libtorch_cuda_loads_and_a_missing_gpu_is_named() {
        let path = load_torch_cuda().expect("libtorch_cuda.so beside libtorch_cpu.so");
        assert!(mapped_library("libtorch_cuda.so").is_some(), "{path:?}");
        assert!(check_device(tch::Device::Cpu).is_ok());
        let n = device_count();
        let err = check_device(tch::Device::Cuda(n)).expect_err("one past the last device");
        assert_eq!(
            err,
            CudaError::NoSuchDevice {
                device: n,
                count: n
            }
        );
        assert!(
            err.to_string().contains(&format!("sees {n} CUDA device")),
            "{err}"
        );
        // The runtime's symbols resolve here too (the calls then fail cleanly).
        let rt = runtime().expect("cudart symbols");
        if n == 0 {
            assert!(rt.set_device(0).is_err());
        }
    }
}
