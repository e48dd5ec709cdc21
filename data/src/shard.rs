//! Packed shard files: a run's tokenized examples as the coordinator stores them,
//! so a dataset is tokenized once and a restarted coordinator reloads it without
//! re-reading the source files. Little-endian, length-prefixed token ids, and a
//! SHA-256 of the content at the end: a truncated or corrupted shard is refused.
//!
//! Layout: `DPOSHRD1`, u64 count, then per example: u64 line, u32 n + n×u32 prompt,
//! u8 has_chosen [+ u32 n + n×u32], u32 k rejected × (u32 n + n×u32); then 32 bytes
//! of SHA-256 over everything before.

use std::path::Path;

use sha2::{Digest, Sha256};

use crate::{Error, Example, Result};

const MAGIC: &[u8; 8] = b"DPOSHRD1";

fn put_ids(out: &mut Vec<u8>, ids: &[u32]) {
    out.extend((ids.len() as u32).to_le_bytes());
    for id in ids {
        out.extend(id.to_le_bytes());
    }
}

/// Serializes examples (see the module layout).
pub fn encode(examples: &[Example]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend(MAGIC);
    out.extend((examples.len() as u64).to_le_bytes());
    for e in examples {
        out.extend((e.line as u64).to_le_bytes());
        put_ids(&mut out, &e.prompt);
        match &e.chosen {
            Some(c) => {
                out.push(1);
                put_ids(&mut out, c);
            }
            None => out.push(0),
        }
        out.extend((e.rejected.len() as u32).to_le_bytes());
        for r in &e.rejected {
            put_ids(&mut out, r);
        }
    }
    let digest = Sha256::digest(&out);
    out.extend(digest);
    out
}

struct Reader<'a> {
    buf: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Option<&[u8]> {
        let end = self.at.checked_add(n)?;
        let s = self.buf.get(self.at..end)?;
        self.at = end;
        Some(s)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u32(&mut self) -> Option<u32> {
        let mut a = [0u8; 4];
        a.copy_from_slice(self.take(4)?);
        Some(u32::from_le_bytes(a))
    }
    fn u64(&mut self) -> Option<u64> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8)?);
        Some(u64::from_le_bytes(a))
    }
    fn ids(&mut self) -> Option<Vec<u32>> {
        let n = self.u32()? as usize;
        let bytes = self.take(n.checked_mul(4)?)?;
        Some(
            bytes
                .chunks_exact(4)
                .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        )
    }
}

/// Parses `encode`'s output; `None` if it is truncated, corrupted or not a shard.
pub fn decode(buf: &[u8]) -> Option<Vec<Example>> {
    if buf.len() < MAGIC.len() + 8 + 32 || &buf[..8] != MAGIC {
        return None;
    }
    let (body, digest) = buf.split_at(buf.len() - 32);
    if Sha256::digest(body).as_slice() != digest {
        return None;
    }
    let mut r = Reader { buf: body, at: 8 };
    let n = r.u64()?;
    let mut out = Vec::with_capacity(n.min(1 << 24) as usize);
    for _ in 0..n {
        let line = r.u64()? as usize;
        let prompt = r.ids()?;
        let chosen = match r.u8()? {
            0 => None,
            1 => Some(r.ids()?),
            _ => return None,
        };
        let k = r.u32()?;
        let rejected = (0..k).map(|_| r.ids()).collect::<Option<Vec<_>>>()?;
        out.push(Example {
            line,
            prompt,
            chosen,
            rejected,
        });
    }
    (r.at == body.len()).then_some(out)
}

/// Writes a shard file crash-safely (fsynced before it replaces `path`: a
/// restarted coordinator fails the run when a shard is missing or torn).
pub fn write(path: &Path, examples: &[Example]) -> Result<()> {
    crate::atomic::write(path, &encode(examples)).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Reads a shard file, refusing one that does not check out.
pub fn read(path: &Path) -> Result<Vec<Example>> {
    let buf = std::fs::read(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    decode(&buf).ok_or_else(|| Error::File {
        path: path.to_path_buf(),
        reason: "not a valid shard file (truncated or corrupted)".into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_corruption_is_refused() {
        let examples = vec![
            Example {
                line: 3,
                prompt: vec![1, 2, 3],
                chosen: Some(vec![4, 5]),
                rejected: vec![vec![6], vec![7, 8, 9]],
            },
            Example {
                line: 9,
                prompt: vec![],
                chosen: None,
                rejected: vec![vec![u32::MAX]],
            },
        ];
        let buf = encode(&examples);
        assert_eq!(decode(&buf), Some(examples));
        for cut in [1, 10, buf.len() - 1] {
            assert_eq!(decode(&buf[..cut]), None, "truncated at {cut}");
        }
        let mut bad = buf.clone();
        bad[20] ^= 1;
        assert_eq!(decode(&bad), None);
    }
}
