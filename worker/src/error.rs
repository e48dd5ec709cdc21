//! The worker library's error type: every failure names the file, tensor or
//! operation it came from, so a user can act on it without a backtrace.

use std::path::PathBuf;

/// Errors from loading, running and saving models.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The CUDA device the run asks for cannot be used, or a CUDA call failed.
    #[error(transparent)]
    Cuda(#[from] crate::cuda::CudaError),
    /// The NCCL backend cannot run here, or an NCCL call failed.
    #[error(transparent)]
    Nccl(#[from] crate::collective::nccl::NcclError),
    /// The operating system refused what starting the worker needs (a
    /// runtime, a socket, a rank's process).
    #[error("{what}: {source}")]
    Os {
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// A rank of this worker kept crashing.
    #[error("{reason}")]
    RankFailed { reason: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: invalid JSON: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{path}: {reason}")]
    Config { path: PathBuf, reason: String },
    #[error(
        "{path}: unsupported model_type {model_type:?} (supported: {})",
        crate::model::config::ModelType::supported()
    )]
    UnsupportedModel { path: PathBuf, model_type: String },
    #[error("{path}: tensor {name}: expected shape {expected:?}, found {found:?}")]
    TensorShape {
        path: PathBuf,
        name: String,
        expected: Vec<i64>,
        found: Vec<i64>,
    },
    #[error("{dir}: checkpoint has no tensor {name}")]
    MissingTensor { dir: PathBuf, name: String },
    #[error("{path}: unexpected tensor {name} (not a parameter of a {model_type} model)")]
    UnexpectedTensor {
        path: PathBuf,
        name: String,
        model_type: String,
    },
    #[error("{path}: {reason}")]
    Safetensors { path: PathBuf, reason: String },
    /// A `torch.save` weights file that cannot be read (or must not be).
    #[error("{path}: {reason}")]
    Weights { path: PathBuf, reason: String },
    #[error("{path}: {reason}")]
    Tokenizer { path: PathBuf, reason: String },
    #[error("{context}: {reason}")]
    Input { context: String, reason: String },
    #[error("{op}: {source}")]
    Torch {
        op: &'static str,
        #[source]
        source: tch::TchError,
    },
    #[error(transparent)]
    Data(#[from] dpo_data::Error),
    /// The generation's collective broke (a peer died, the ring was aborted,
    /// a peer sent something malformed).
    #[error("collective: {0}")]
    Collective(#[from] crate::collective::CollectiveError),
    /// The ranks' parameters no longer agree: the replicas diverged.
    #[error(
        "step {step}: parameters differ across ranks (hashes {hashes:?}); stopping rather than training on diverged replicas"
    )]
    Diverged { step: u64, hashes: Vec<Vec<u8>> },
    /// The coordinator moved on from this worker's generation.
    #[error("{what}: generation superseded: {reason}")]
    Superseded { what: &'static str, reason: String },
    /// The coordinator cannot be reached (it may be restarting).
    #[error("{what}: coordinator unreachable: {reason}")]
    Unreachable { what: &'static str, reason: String },
    /// The coordinator refused a request for good.
    #[error("{what}: the coordinator refused: {reason}")]
    Refused { what: &'static str, reason: String },
    /// The worker's own state does not fit the assignment (it holds no trainer
    /// for the run it is told to train).
    #[error("worker state: {0}")]
    State(&'static str),
    #[error("halted after step {step} (fault injection)")]
    Halted { step: u64 },
    /// Asked to stop (SIGTERM): the worker leaves after step `step`.
    #[error("leaving the cluster after step {step}")]
    Leaving { step: u64 },
    /// A rank of the world is leaving and its ZeRO share was handed over
    /// after step `step`: this rank waits for the world without it.
    #[error("a leaving rank's share was handed over after step {step}; waiting for the next world")]
    HandedOff { step: u64 },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What a worker does about an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    /// Ask again shortly (the coordinator is unreachable).
    Retry,
    /// This generation is over: report the fault (if it is still current) and
    /// wait for the next one; the run goes on.
    NextGeneration,
    /// The run cannot go on: report it failed.
    FailRun,
}

impl Error {
    /// The one place that decides between retrying, moving to the next
    /// generation and failing the run.
    pub fn disposition(&self) -> Disposition {
        match self {
            Error::Unreachable { .. } => Disposition::Retry,
            Error::Collective(_)
            | Error::Diverged { .. }
            | Error::Superseded { .. }
            | Error::State(_)
            | Error::Leaving { .. }
            | Error::HandedOff { .. } => Disposition::NextGeneration,
            _ => Disposition::FailRun,
        }
    }

    /// A coordinator's answer to a request, as an error of that request.
    pub fn from_status(what: &'static str, status: &tonic::Status) -> Self {
        let reason = status.message().to_string();
        match status.code() {
            tonic::Code::FailedPrecondition => Error::Superseded { what, reason },
            // Cancelled: the coordinator stopped (SIGTERM) with the request in
            // flight; the restarted one answers it again.
            tonic::Code::Unavailable
            | tonic::Code::Unknown
            | tonic::Code::DeadlineExceeded
            | tonic::Code::Cancelled => Error::Unreachable { what, reason },
            _ => Error::Refused { what, reason },
        }
    }
}

/// Attaches the name of the operation to a libtorch error.
pub(crate) trait TorchContext<T> {
    fn op(self, op: &'static str) -> Result<T>;
}

impl<T> TorchContext<T> for std::result::Result<T, tch::TchError> {
    fn op(self, op: &'static str) -> Result<T> {
        self.map_err(|source| Error::Torch { op, source })
    }
}

pub(crate) fn io_err(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Error {
    let path = path.into();
    move |source| Error::Io { path, source }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::collective::CollectiveError;

    #[test]
    fn each_error_maps_to_one_decision() {
        let status = |code| tonic::Status::new(code, "m");
        let of = |code| Error::from_status("fetch batch", &status(code)).disposition();
        assert_eq!(of(tonic::Code::Unavailable), Disposition::Retry);
        assert_eq!(of(tonic::Code::DeadlineExceeded), Disposition::Retry);
        assert_eq!(of(tonic::Code::Cancelled), Disposition::Retry);
        assert_eq!(
            of(tonic::Code::FailedPrecondition),
            Disposition::NextGeneration
        );
        assert_eq!(of(tonic::Code::InvalidArgument), Disposition::FailRun);
        assert_eq!(of(tonic::Code::NotFound), Disposition::FailRun);
        assert_eq!(
            Error::from(CollectiveError::Aborted).disposition(),
            Disposition::NextGeneration
        );
        let diverged = Error::Diverged {
            step: 25,
            hashes: vec![vec![1], vec![2]],
        };
        assert_eq!(diverged.disposition(), Disposition::NextGeneration);
        let bad_data = Error::Input {
            context: "step 3".into(),
            reason: "the loss is NaN".into(),
        };
        assert_eq!(bad_data.disposition(), Disposition::FailRun);
        assert_eq!(
            Error::Halted { step: 1 }.disposition(),
            Disposition::FailRun
        );
        // The message keeps what the request was and why.
        let e = Error::from_status("report step", &status(tonic::Code::FailedPrecondition));
        assert_eq!(e.to_string(), "report step: generation superseded: m");
    }
}
