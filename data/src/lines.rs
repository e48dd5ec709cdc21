//! Reading a dataset file line by line, safely: only regular files (not a
//! device such as `/dev/zero`, a FIFO or a directory), and no line longer than
//! a bound, so a file without newlines cannot make a reader hold it whole.

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;

use crate::error::{Error, Result};

/// The longest line a dataset file may have.
pub const MAX_LINE_BYTES: usize = 64 << 20;

/// The reason given for a line over [`MAX_LINE_BYTES`].
pub fn too_long() -> String {
    format!(
        "longer than {} MiB (is this a JSON-lines file?); nothing after it was read",
        MAX_LINE_BYTES >> 20
    )
}

/// Why a line could not be read.
#[derive(Debug)]
pub enum LineError {
    Io(std::io::Error),
    NotUtf8,
    /// Longer than the bound: reading stops here.
    TooLong,
}

/// The lines of a file (without their `\n` or `\r\n`), each at most `max`
/// bytes. After an I/O error or a line that is too long the iterator ends.
#[derive(Debug)]
pub struct Lines<R> {
    reader: R,
    max: usize,
    done: bool,
}

/// Opens `path` for line reading: a regular file, lines of at most
/// [`MAX_LINE_BYTES`].
pub fn open(path: &Path) -> Result<Lines<BufReader<File>>> {
    let io = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = File::open(path).map_err(io)?;
    if !file.metadata().map_err(io)?.is_file() {
        return Err(Error::File {
            path: path.to_path_buf(),
            reason: "not a regular file".into(),
        });
    }
    Ok(Lines::new(BufReader::new(file), MAX_LINE_BYTES))
}

impl<R: BufRead> Lines<R> {
    pub fn new(reader: R, max: usize) -> Self {
        Lines {
            reader,
            max,
            done: false,
        }
    }
}

impl<R: BufRead> Iterator for Lines<R> {
    type Item = std::result::Result<String, LineError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        let mut buf = Vec::new();
        let limit = self.max as u64 + 1;
        match (&mut self.reader).take(limit).read_until(b'\n', &mut buf) {
            Ok(0) => {
                self.done = true;
                None
            }
            Ok(_) => {
                if buf.last() == Some(&b'\n') {
                    buf.pop();
                    if buf.last() == Some(&b'\r') {
                        buf.pop();
                    }
                } else if buf.len() > self.max {
                    self.done = true;
                    return Some(Err(LineError::TooLong));
                }
                Some(String::from_utf8(buf).map_err(|_| LineError::NotUtf8))
            }
            Err(e) => {
                self.done = true;
                Some(Err(LineError::Io(e)))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(text: &[u8], max: usize) -> Vec<std::result::Result<String, String>> {
        Lines::new(text, max)
            .map(|l| l.map_err(|e| format!("{e:?}")))
            .collect()
    }

    #[test]
    fn lines_end_at_newlines_and_a_long_one_stops_reading() {
        assert_eq!(
            lines(b"ab\r\ncd\n\nef", 8),
            vec![
                Ok("ab".into()),
                Ok("cd".into()),
                Ok(String::new()),
                Ok("ef".into())
            ]
        );
        // Exactly at the bound is fine; one byte more is not, and nothing follows.
        assert_eq!(lines(b"12345678\nx", 8)[0], Ok("12345678".into()));
        let got = lines(b"123456789\nx\n", 8);
        assert_eq!(got, vec![Err("TooLong".into())]);
        assert_eq!(lines(&[0xff, b'\n', b'a'], 8)[0], Err("NotUtf8".into()));
    }

    #[test]
    fn devices_and_directories_are_not_read() {
        for p in ["/dev/zero", "/"] {
            let e = open(Path::new(p)).expect_err("not a regular file");
            assert!(e.to_string().contains("not a regular file"), "{e}");
        }
    }
}
