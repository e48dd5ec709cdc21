use std::path::PathBuf;

/// Dataset and tokenizer errors. A problem with one line of a file always names
/// `file:line` so the user can open it there.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}:{line}: {reason}")]
    Line {
        path: PathBuf,
        line: usize,
        reason: String,
    },
    #[error("{path}: {reason}")]
    File { path: PathBuf, reason: String },
    /// A setting and a dataset that do not fit together (names the spec key or file).
    #[error("{context}: {reason}")]
    Invalid { context: String, reason: String },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
