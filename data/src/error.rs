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

/// Why one record (a line, a row, an element) or value is refused, before
/// the caller knows where it is: the caller names it — `file:line`
/// ([`Error::Line`]), the file, or the spec key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Refusal(pub String);

impl From<String> for Refusal {
    fn from(reason: String) -> Self {
        Refusal(reason)
    }
}

impl From<&str> for Refusal {
    fn from(reason: &str) -> Self {
        Refusal(reason.to_string())
    }
}

/// The reason as text (`contains`, `starts_with`, … for callers and tests).
impl std::ops::Deref for Refusal {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl PartialEq<&str> for Refusal {
    fn eq(&self, other: &&str) -> bool {
        self.0 == *other
    }
}

impl From<Refusal> for String {
    fn from(r: Refusal) -> Self {
        r.0
    }
}
