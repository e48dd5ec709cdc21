//! The worker library's error type: every failure names the file, tensor or
//! operation it came from, so a user can act on it without a backtrace.

use std::path::PathBuf;

/// Errors from loading, running and saving models.
#[derive(Debug, thiserror::Error)]
pub enum Error {
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
    #[error("{path}: unsupported model_type {model_type:?} (supported: llama, mistral, qwen2)")]
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
    #[error("collective: {0}")]
    Collective(String),
    #[error("halted after step {step} (fault injection)")]
    Halted { step: u64 },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

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
