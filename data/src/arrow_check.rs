//! An Arrow IPC file or stream (`datasets.save_to_disk` shards) is checked
//! against the run's [`DataLimits`] before `arrow-ipc` reads it, because that
//! crate trusts the file: it allocates each message's declared body length
//! (a negative one panics it) and each compressed buffer's declared
//! uncompressed length before it reads a byte of them.
//!
//! So every message's frame is walked here (file format: the footer's blocks;
//! stream format: message after message), its metadata parsed with the
//! flatbuffer verifier of `arrow-ipc` itself, and checked: the frame lies inside
//! the file, the buffers inside the body, each buffer decodes to no more than
//! `max_value_bytes`, the file to no more than `max_decoded_bytes` (with what the
//! dataset's earlier files decoded) and the rows stay within `max_rows`.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use dpo_proto::DataLimits;

use crate::error::{Error, Result};

/// A message's metadata (a flatbuffer) may not be larger than this.
const MAX_METADATA_BYTES: u64 = 16 << 20;
/// Nor the footer of the file format.
const MAX_FOOTER_BYTES: u64 = 64 << 20;
const MAGIC: &[u8; 6] = b"ARROW1";
const CONTINUATION: [u8; 4] = [0xff; 4];

fn bad(path: &Path, reason: impl Into<String>) -> Error {
    Error::File {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

struct Walk<'a> {
    path: &'a Path,
    file: &'a mut File,
    len: u64,
    limits: &'a DataLimits,
    rows: u64,
    decoded: u64,
}

impl Walk<'_> {
    fn read_at(&mut self, at: u64, n: u64) -> Result<Vec<u8>> {
        if at.checked_add(n).is_none_or(|end| end > self.len) {
            return Err(bad(
                self.path,
                format!(
                    "bytes {at}..{} lie outside the file of {} bytes",
                    at.saturating_add(n),
                    self.len
                ),
            ));
        }
        let mut buf = vec![0u8; n as usize];
        self.file
            .seek(SeekFrom::Start(at))
            .and_then(|_| self.file.read_exact(&mut buf))
            .map_err(|source| Error::Io {
                path: self.path.to_path_buf(),
                source,
            })?;
        Ok(buf)
    }

    /// The message framed at `at`: `(metadata, its length with the prefix)`,
    /// or `None` at the end-of-stream marker.
    fn frame(&mut self, at: u64) -> Result<Option<(Vec<u8>, u64)>> {
        let head = self.read_at(at, 4)?;
        let (prefix, length) = if head[..] == CONTINUATION {
            let n = self.read_at(at + 4, 4)?;
            (8, i32::from_le_bytes([n[0], n[1], n[2], n[3]]))
        } else {
            (4, i32::from_le_bytes([head[0], head[1], head[2], head[3]]))
        };
        if length == 0 {
            return Ok(None);
        }
        let length = u64::try_from(length)
            .ok()
            .filter(|&n| n <= MAX_METADATA_BYTES)
            .ok_or_else(|| {
                bad(
                    self.path,
                    format!("a message of {length} metadata bytes at byte {at}"),
                )
            })?;
        let meta = self.read_at(at + prefix, length)?;
        Ok(Some((meta, prefix + length)))
    }

    /// Checks one message whose body starts at `body`; returns the body length.
    fn message(&mut self, meta: &[u8], body: u64) -> Result<u64> {
        let m = arrow_ipc::root_as_message(meta)
            .map_err(|e| bad(self.path, format!("an invalid message at byte {body}: {e}")))?;
        let body_len = u64::try_from(m.bodyLength())
            .map_err(|_| bad(self.path, format!("a negative body length at byte {body}")))?;
        if body.checked_add(body_len).is_none_or(|end| end > self.len) {
            return Err(bad(
                self.path,
                format!(
                    "a message body of {body_len} bytes at byte {body} runs past the end of the file"
                ),
            ));
        }
        let (batch, is_rows) = match (m.header_as_record_batch(), m.header_as_dictionary_batch()) {
            (Some(b), _) => (Some(b), true),
            (None, Some(d)) => (d.data(), false),
            _ => (None, false),
        };
        let Some(batch) = batch else {
            return Ok(body_len);
        };
        let row = self.rows + 1;
        if is_rows {
            let n = u64::try_from(batch.length())
                .map_err(|_| bad(self.path, "a batch with a negative row count"))?;
            self.rows += n;
            if self.rows > self.limits.max_rows {
                return Err(Error::Line {
                    path: self.path.to_path_buf(),
                    line: row as usize,
                    reason: format!(
                        "the rows from here on pass data.limits.max_rows = {}",
                        self.limits.max_rows
                    ),
                });
            }
        }
        let compressed = batch.compression().is_some();
        let at = |reason: String| Error::Line {
            path: self.path.to_path_buf(),
            line: row as usize,
            reason: format!("the batch from this row on: {reason}"),
        };
        let mut decoded = 0u64;
        for buffer in batch.buffers().iter().flatten() {
            let (offset, length) = (buffer.offset(), buffer.length());
            let (Ok(offset), Ok(length)) = (u64::try_from(offset), u64::try_from(length)) else {
                return Err(at("a buffer with a negative offset or length".into()));
            };
            if offset.checked_add(length).is_none_or(|end| end > body_len) {
                return Err(at(format!(
                    "a buffer at {offset}+{length} lies outside its body of {body_len} bytes"
                )));
            }
            let size = if compressed && length >= 8 {
                let prefix = self.read_at(body + offset, 8)?;
                let mut n = [0u8; 8];
                n.copy_from_slice(&prefix);
                match i64::from_le_bytes(n) {
                    -1 => length - 8,
                    n => u64::try_from(n)
                        .map_err(|_| at(format!("a buffer declares {n} decoded bytes")))?,
                }
            } else {
                length
            };
            if size > self.limits.max_value_bytes {
                return Err(at(format!(
                    "a buffer decodes to {size} bytes, more than data.limits.max_value_bytes = {}",
                    self.limits.max_value_bytes
                )));
            }
            decoded += size;
        }
        self.decoded += decoded.max(body_len);
        if self.decoded > self.limits.max_decoded_bytes {
            return Err(at(format!(
                "the data decodes to more than data.limits.max_decoded_bytes = {}",
                self.limits.max_decoded_bytes
            )));
        }
        Ok(body_len)
    }
}

/// What a checked file adds to its dataset's budgets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Checked {
    pub rows: u64,
    /// Decoded bytes so far, this file's included.
    pub decoded: u64,
}

/// Checks the Arrow IPC file or stream at `path` (see the module header).
/// `rows_before` rows and `decoded_before` bytes came from the dataset's earlier
/// files.
pub fn check(
    path: &Path,
    file: &mut File,
    limits: &DataLimits,
    rows_before: u64,
    decoded_before: u64,
) -> Result<Checked> {
    let len = file
        .metadata()
        .map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?
        .len();
    let mut walk = Walk {
        path,
        file,
        len,
        limits,
        rows: rows_before,
        decoded: decoded_before,
    };
    let is_file = len >= 16 && walk.read_at(0, 6)?[..] == MAGIC[..];
    if is_file {
        let tail = walk.read_at(len - 10, 10)?;
        if tail[4..] != MAGIC[..] {
            return Err(bad(path, "an Arrow file without its closing ARROW1"));
        }
        let footer_len = i32::from_le_bytes([tail[0], tail[1], tail[2], tail[3]]);
        let footer_len = u64::try_from(footer_len)
            .ok()
            .filter(|&n| n <= MAX_FOOTER_BYTES && n + 18 <= len)
            .ok_or_else(|| bad(path, format!("an Arrow footer of {footer_len} bytes")))?;
        let footer_bytes = walk.read_at(len - 10 - footer_len, footer_len)?;
        let footer = arrow_ipc::root_as_footer(&footer_bytes)
            .map_err(|e| bad(path, format!("an invalid Arrow footer: {e}")))?;
        let blocks: Vec<(i64, i32, i64)> = footer
            .dictionaries()
            .iter()
            .flatten()
            .chain(footer.recordBatches().iter().flatten())
            .map(|b| (b.offset(), b.metaDataLength(), b.bodyLength()))
            .collect();
        for (offset, meta_len, body_len) in blocks {
            let (Ok(offset), Ok(meta_len), Ok(block_body)) = (
                u64::try_from(offset),
                u64::try_from(meta_len),
                u64::try_from(body_len),
            ) else {
                return Err(bad(path, "a block with a negative offset or length"));
            };
            // arrow-ipc allocates the block's metadata and body lengths as
            // the footer declares them, before it reads a byte: the block must
            // lie inside the file.
            if offset
                .checked_add(meta_len)
                .and_then(|n| n.checked_add(block_body))
                .is_none_or(|end| end > len)
            {
                return Err(bad(
                    path,
                    format!(
                        "a block at byte {offset} of {meta_len} + {block_body} bytes runs past the end of the file"
                    ),
                ));
            }
            let Some((meta, framed)) = walk.frame(offset)? else {
                return Err(bad(path, format!("an empty block at byte {offset}")));
            };
            if framed > meta_len {
                return Err(bad(
                    path,
                    format!("a block's metadata overruns it at byte {offset}"),
                ));
            }
            let message_body = walk.message(&meta, offset + meta_len)?;
            if message_body != block_body {
                return Err(bad(
                    path,
                    format!(
                        "the block at byte {offset} declares a body of {block_body} bytes, its message {message_body}"
                    ),
                ));
            }
        }
    } else {
        let mut at = 0u64;
        while at < len {
            let Some((meta, framed)) = walk.frame(at)? else {
                break;
            };
            // Metadata is padded to 8 bytes; the body follows.
            let body = at + framed;
            let body_len = walk.message(&meta, body)?;
            at = body + body_len;
        }
    }
    Ok(Checked {
        rows: walk.rows - rows_before,
        decoded: walk.decoded,
    })
}
