//! libnccl, found and loaded at run time (never linked): where it is looked
//! for, the symbols the collective calls, why the backend cannot run here
//! ([`NcclError`]), and the bootstrap id rank 0 publishes through the
//! coordinator.

use super::*;

type GetUniqueId = unsafe extern "C" fn(*mut ncclUniqueId) -> c_int;
type InitRankConfig =
    unsafe extern "C" fn(*mut ncclComm_t, c_int, ncclUniqueId, c_int, *mut ncclConfig_t) -> c_int;
type CommCall = unsafe extern "C" fn(ncclComm_t) -> c_int;
type AsyncError = unsafe extern "C" fn(ncclComm_t, *mut c_int) -> c_int;
type Reduce = unsafe extern "C" fn(
    *const c_void,
    *mut c_void,
    usize,
    ncclDataType_t,
    ncclRedOp_t,
    ncclComm_t,
    Stream,
) -> c_int;
type Gather = unsafe extern "C" fn(
    *const c_void,
    *mut c_void,
    usize,
    ncclDataType_t,
    ncclComm_t,
    Stream,
) -> c_int;
type Bcast = unsafe extern "C" fn(
    *const c_void,
    *mut c_void,
    usize,
    ncclDataType_t,
    c_int,
    ncclComm_t,
    Stream,
) -> c_int;
type ErrorString = unsafe extern "C" fn(c_int) -> *const c_char;
type LastError = unsafe extern "C" fn(ncclComm_t) -> *const c_char;
type GetVersion = unsafe extern "C" fn(*mut c_int) -> c_int;

/// libnccl, loaded from an explicit path.
#[derive(Debug)]
pub struct Library {
    /// Where it was loaded from.
    pub path: PathBuf,
    /// `ncclGetVersion`, e.g. 22809 for 2.28.9.
    pub version: i32,
    pub(super) get_unique_id: GetUniqueId,
    pub(super) init_rank_config: InitRankConfig,
    pub(super) async_error: AsyncError,
    pub(super) abort: CommCall,
    pub(super) finalize: CommCall,
    pub(super) destroy: CommCall,
    pub(super) all_reduce: Reduce,
    pub(super) reduce_scatter: Reduce,
    pub(super) all_gather: Gather,
    pub(super) broadcast: Bcast,
    pub(super) error_string: ErrorString,
    pub(super) last_error: LastError,
}

/// Where libnccl is looked for, in order: `explicit` (`DPO_NCCL_LIBRARY`),
/// the `nvidia-nccl` package beside libtorch (`torch_lib` is `torch/lib`),
/// each folder of `ld_library_path`, and the system's folders.
pub fn candidates(
    explicit: Option<&OsStr>,
    torch_lib: Option<&Path>,
    ld_library_path: Option<&OsStr>,
) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = Vec::new();
    if let Some(p) = explicit.filter(|p| !p.is_empty()) {
        out.push(PathBuf::from(p));
    }
    if let Some(site) = torch_lib.and_then(Path::parent).and_then(Path::parent) {
        out.push(site.join("nvidia/nccl/lib/libnccl.so.2"));
    }
    let mut dirs: Vec<PathBuf> = ld_library_path
        .map(|p| std::env::split_paths(p).collect())
        .unwrap_or_default();
    dirs.extend(
        [
            "/usr/lib/x86_64-linux-gnu",
            "/usr/lib/aarch64-linux-gnu",
            "/usr/local/cuda/lib64",
            "/usr/lib64",
            "/usr/lib",
        ]
        .map(PathBuf::from),
    );
    for d in dirs.iter().filter(|d| !d.as_os_str().is_empty()) {
        out.push(d.join("libnccl.so.2"));
        out.push(d.join("libnccl.so"));
    }
    out
}

/// Why the NCCL backend cannot run here, or an NCCL call failed. `Clone`:
/// the library is resolved once and the outcome kept for every caller.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NcclError {
    #[error(
        "libnccl.so.2 not found (looked for {}); install nvidia-nccl-cu13 beside torch or set DPO_NCCL_LIBRARY",
        tried.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
    )]
    NotFound { tried: Vec<PathBuf> },
    #[error("loading {}: {reason}", path.display())]
    Load { path: PathBuf, reason: String },
    #[error("{}: {name}: {reason}", path.display())]
    Symbol {
        path: PathBuf,
        name: &'static str,
        reason: String,
    },
    /// A call returned an error code; `text` is NCCL's description of it.
    #[error("{call}: {text}")]
    Call {
        call: &'static str,
        code: i32,
        text: String,
    },
    #[error("bootstrap data of {len} bytes is not an NCCL id of this version")]
    BadBootstrap { len: usize },
    #[error("bootstrap data of generation {published}, expected {expected}")]
    StaleBootstrap { published: u64, expected: u64 },
    #[error(
        "the nccl backend needs a CUDA device, and this worker runs on {device} (start it with --device cuda or --gpus N, or set cluster.backend = \"tcp\")"
    )]
    NotCuda { device: String },
    #[error("the nccl backend needs a CUDA device: {0}")]
    NoDevice(#[source] cuda::CudaError),
    #[error("the nccl backend needs the CUDA runtime: {0}")]
    NoRuntime(#[source] cuda::CudaError),
    #[error("the nccl backend needs NCCL: {0}")]
    NoLibrary(#[source] Box<NcclError>),
}

/// Loads libnccl (once per process): the first of [`candidates`] that exists.
pub fn library() -> Result<&'static Library, NcclError> {
    static LIB: OnceLock<Result<Library, NcclError>> = OnceLock::new();
    LIB.get_or_init(|| {
        let tried = candidates(
            std::env::var_os("DPO_NCCL_LIBRARY").as_deref(),
            cuda::torch_lib_dir().as_deref(),
            std::env::var_os("LD_LIBRARY_PATH").as_deref(),
        );
        let Some(path) = tried.iter().find(|p| p.is_file()) else {
            return Err(NcclError::NotFound { tried });
        };
        load(path)
    })
    .as_ref()
    .map_err(Clone::clone)
}

fn load(path: &Path) -> Result<Library, NcclError> {
    // SAFETY: loading NCCL runs no code of ours; it is leaked (never unloaded)
    // so the function pointers below stay valid for the life of the process.
    let lib = unsafe { libloading::Library::new(path) }.map_err(|e| NcclError::Load {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    fn get<T: Copy>(
        lib: &libloading::Library,
        path: &Path,
        name: &'static str,
    ) -> Result<T, NcclError> {
        // SAFETY: `T` is the C signature nccl.h declares for `name`, in
        // cudarc's types.
        unsafe { lib.get::<T>(name.as_bytes()) }
            .map(|s| *s)
            .map_err(|e| NcclError::Symbol {
                path: path.to_path_buf(),
                name,
                reason: e.to_string(),
            })
    }
    let get_version: GetVersion = get(&lib, path, "ncclGetVersion")?;
    let mut version: c_int = 0;
    // SAFETY: one out-parameter.
    let rc = unsafe { get_version(&mut version) };
    if rc != NCCL_SUCCESS {
        return Err(NcclError::Call {
            call: "ncclGetVersion",
            code: rc,
            text: format!("{} failed ({rc})", path.display()),
        });
    }
    let out = Library {
        path: path.to_path_buf(),
        version,
        get_unique_id: get(&lib, path, "ncclGetUniqueId")?,
        init_rank_config: get(&lib, path, "ncclCommInitRankConfig")?,
        async_error: get(&lib, path, "ncclCommGetAsyncError")?,
        abort: get(&lib, path, "ncclCommAbort")?,
        finalize: get(&lib, path, "ncclCommFinalize")?,
        destroy: get(&lib, path, "ncclCommDestroy")?,
        all_reduce: get(&lib, path, "ncclAllReduce")?,
        reduce_scatter: get(&lib, path, "ncclReduceScatter")?,
        all_gather: get(&lib, path, "ncclAllGather")?,
        broadcast: get(&lib, path, "ncclBroadcast")?,
        error_string: get(&lib, path, "ncclGetErrorString")?,
        last_error: get(&lib, path, "ncclGetLastError")?,
    };
    std::mem::forget(lib);
    tracing::debug!(path = %path.display(), version, "loaded NCCL");
    Ok(out)
}

impl Library {
    pub(super) fn describe(&self, code: c_int, comm: ncclComm_t) -> String {
        let text = |p: *const c_char| {
            if p.is_null() {
                String::new()
            } else {
                // SAFETY: NCCL returns NUL-terminated strings it owns.
                unsafe { std::ffi::CStr::from_ptr(p) }
                    .to_string_lossy()
                    .into_owned()
            }
        };
        // SAFETY: plain queries; `comm` may be null (then the last error of
        // the thread is returned).
        let (what, last) = unsafe {
            (
                text((self.error_string)(code)),
                text((self.last_error)(comm)),
            )
        };
        if last.is_empty() {
            format!("NCCL error {code}: {what}")
        } else {
            format!("NCCL error {code}: {what} ({last})")
        }
    }

    /// A fresh unique id (rank 0 of a generation makes one).
    pub fn unique_id(&self) -> Result<[u8; ID_LEN], NcclError> {
        let mut id = ncclUniqueId {
            internal: [0; ID_LEN],
        };
        // SAFETY: writes the id through the out-parameter.
        let rc = unsafe { (self.get_unique_id)(&mut id) };
        if rc != NCCL_SUCCESS {
            return Err(NcclError::Call {
                call: "ncclGetUniqueId",
                code: rc,
                text: self.describe(rc, std::ptr::null_mut()),
            });
        }
        Ok(id.internal.map(|c| c as u8))
    }
}

/// Why `backend = "nccl"` cannot run on `device` here, or `None` when it can.
pub fn unavailable(device: Device) -> Option<NcclError> {
    let Device::Cuda(_) = device else {
        return Some(NcclError::NotCuda {
            device: format!("{device:?}"),
        });
    };
    if let Err(e) = cuda::check_device(device) {
        return Some(NcclError::NoDevice(e));
    }
    if let Err(e) = cuda::runtime() {
        return Some(NcclError::NoRuntime(e));
    }
    library().err().map(|e| NcclError::NoLibrary(Box::new(e)))
}

/// What rank 0 publishes through the coordinator for `generation`.
pub fn encode_bootstrap(generation: u64, id: &[u8; ID_LEN]) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + ID_LEN);
    out.extend_from_slice(BOOTSTRAP_MAGIC);
    out.extend_from_slice(&generation.to_le_bytes());
    out.extend_from_slice(id);
    out
}

/// The unique id in `data`, if it was published for `generation`.
pub fn decode_bootstrap(data: &[u8], generation: u64) -> Result<[u8; ID_LEN], NcclError> {
    if data.len() != 16 + ID_LEN || &data[..8] != BOOTSTRAP_MAGIC {
        return Err(NcclError::BadBootstrap { len: data.len() });
    }
    let mut g = [0u8; 8];
    g.copy_from_slice(&data[8..16]);
    let published = u64::from_le_bytes(g);
    if published != generation {
        return Err(NcclError::StaleBootstrap {
            published,
            expected: generation,
        });
    }
    let mut id = [0u8; ID_LEN];
    id.copy_from_slice(&data[16..]);
    Ok(id)
}
