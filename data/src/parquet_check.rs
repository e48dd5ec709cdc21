//! A Parquet file is checked against the run's [`DataLimits`] before the
//! `parquet` crate decodes anything of it, because that crate trusts the file:
//! it builds the schema tree by recursion (a deeply nested schema overflows the
//! thread's stack), allocates what a page header declares, and inflates zstd and
//! gzip pages without a bound (a 33 KB file can hold a 1 GiB string).
//!
//! So the footer and the header of every page of the columns to be read are
//! decoded here first, by a small Thrift compact-protocol reader of our own that
//! is iterative where the data nests and bounded everywhere: the schema's depth
//! and width, the file's rows, each page's decoded size, the file's decoded total,
//! and, for the codecs the crate inflates without a bound, that the page really
//! inflates to no more than its header declares (checked by inflating it into a
//! counter, never into memory).

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use dpo_proto::DataLimits;

use crate::error::{Error, Refusal, Result};

/// The footer (file metadata) may not be larger than this.
const MAX_FOOTER_BYTES: u64 = 64 << 20;
/// Nor may the schema have more elements (columns and groups).
const MAX_SCHEMA_ELEMENTS: usize = 100_000;
/// Thrift structures nest this deep at most in valid metadata (far less, in fact).
const MAX_THRIFT_DEPTH: u32 = 32;
/// A page header (with its statistics) is read in growing windows up to this.
const MAX_PAGE_HEADER_BYTES: usize = 16 << 20;

fn bad(path: &Path, reason: impl Into<String>) -> Error {
    Error::File {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// Why Thrift decoding stopped.
#[derive(Debug)]
enum ThriftError {
    /// The buffer ended (a page header may need a larger window).
    Short,
    Invalid(String),
}

type TResult<T> = std::result::Result<T, ThriftError>;

/// Thrift's compact protocol over a byte slice.
struct Thrift<'a> {
    buf: &'a [u8],
    pos: usize,
}

const T_TRUE: u8 = 1;
const T_FALSE: u8 = 2;
const T_BYTE: u8 = 3;
const T_I16: u8 = 4;
const T_I32: u8 = 5;
const T_I64: u8 = 6;
const T_DOUBLE: u8 = 7;
const T_BINARY: u8 = 8;
const T_LIST: u8 = 9;
const T_SET: u8 = 10;
const T_MAP: u8 = 11;
const T_STRUCT: u8 = 12;

impl<'a> Thrift<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Thrift { buf, pos: 0 }
    }

    fn byte(&mut self) -> TResult<u8> {
        let b = *self.buf.get(self.pos).ok_or(ThriftError::Short)?;
        self.pos += 1;
        Ok(b)
    }

    fn take(&mut self, n: usize) -> TResult<&'a [u8]> {
        if self.buf.len() - self.pos < n {
            return Err(ThriftError::Short);
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn varint(&mut self) -> TResult<u64> {
        let mut v = 0u64;
        for shift in (0..70).step_by(7) {
            let b = self.byte()?;
            if shift == 63 && b > 1 {
                return Err(ThriftError::Invalid("varint overflows 64 bits".into()));
            }
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(ThriftError::Invalid("varint longer than 10 bytes".into()))
    }

    fn zigzag(&mut self) -> TResult<i64> {
        let v = self.varint()?;
        Ok((v >> 1) as i64 ^ -((v & 1) as i64))
    }

    fn i32(&mut self) -> TResult<i32> {
        i32::try_from(self.zigzag()?).map_err(|_| ThriftError::Invalid("i32 out of range".into()))
    }

    fn binary(&mut self) -> TResult<&'a [u8]> {
        let n = usize::try_from(self.varint()?)
            .map_err(|_| ThriftError::Invalid("length out of range".into()))?;
        self.take(n)
    }

    /// The next field of a struct: `(id, type)`, or `None` at its end.
    fn field(&mut self, last: &mut i16) -> TResult<Option<(i16, u8)>> {
        let b = self.byte()?;
        if b == 0 {
            return Ok(None);
        }
        let ty = b & 0x0f;
        let delta = b >> 4;
        let id = if delta == 0 {
            i16::try_from(self.zigzag()?)
                .map_err(|_| ThriftError::Invalid("field id out of range".into()))?
        } else {
            last.checked_add(i16::from(delta))
                .ok_or_else(|| ThriftError::Invalid("field id out of range".into()))?
        };
        *last = id;
        Ok(Some((id, ty)))
    }

    /// A list or set header: `(size, element type)`.
    fn list(&mut self) -> TResult<(u64, u8)> {
        let b = self.byte()?;
        let size = if b >> 4 == 15 {
            self.varint()?
        } else {
            u64::from(b >> 4)
        };
        Ok((size, b & 0x0f))
    }

    /// A field's value of type `ty` (booleans are in the field header).
    fn skip(&mut self, ty: u8, depth: u32) -> TResult<()> {
        match ty {
            T_TRUE | T_FALSE => Ok(()),
            _ => self.skip_element(ty, depth),
        }
    }

    /// A value of type `ty` as a list element (a boolean takes a byte there).
    fn skip_element(&mut self, ty: u8, depth: u32) -> TResult<()> {
        if depth > MAX_THRIFT_DEPTH {
            return Err(ThriftError::Invalid(format!(
                "metadata nested deeper than {MAX_THRIFT_DEPTH}"
            )));
        }
        match ty {
            T_TRUE | T_FALSE | T_BYTE => self.byte().map(drop),
            T_I16 | T_I32 | T_I64 => self.varint().map(drop),
            T_DOUBLE => self.take(8).map(drop),
            T_BINARY => self.binary().map(drop),
            T_LIST | T_SET => {
                let (n, elem) = self.list()?;
                for _ in 0..n {
                    self.skip_element(elem, depth + 1)?;
                }
                Ok(())
            }
            T_MAP => {
                let n = self.varint()?;
                if n == 0 {
                    return Ok(());
                }
                let kv = self.byte()?;
                for _ in 0..n {
                    self.skip_element(kv >> 4, depth + 1)?;
                    self.skip_element(kv & 0x0f, depth + 1)?;
                }
                Ok(())
            }
            T_STRUCT => {
                let mut last = 0;
                while let Some((_, t)) = self.field(&mut last)? {
                    self.skip(t, depth + 1)?;
                }
                Ok(())
            }
            other => Err(ThriftError::Invalid(format!("unknown Thrift type {other}"))),
        }
    }

    /// The fields of a struct, each handed to `f` (which reads it or returns
    /// `false` to have it skipped).
    fn each_field(
        &mut self,
        depth: u32,
        mut f: impl FnMut(&mut Self, i16, u8) -> TResult<bool>,
    ) -> TResult<()> {
        let mut last = 0;
        while let Some((id, ty)) = self.field(&mut last)? {
            if !f(self, id, ty)? {
                self.skip(ty, depth + 1)?;
            }
        }
        Ok(())
    }

    /// A list of structs, each read by `f`.
    fn each_struct(
        &mut self,
        depth: u32,
        mut f: impl FnMut(&mut Self) -> TResult<()>,
    ) -> TResult<()> {
        let (n, elem) = self.list()?;
        if elem != T_STRUCT {
            for _ in 0..n {
                self.skip_element(elem, depth + 1)?;
            }
            return Ok(());
        }
        for _ in 0..n {
            f(self)?;
        }
        Ok(())
    }
}

#[derive(Debug, Default)]
struct Chunk {
    codec: i32,
    total_compressed: i64,
    data_page_offset: i64,
    dictionary_page_offset: Option<i64>,
    /// The top-level column it belongs to.
    root: String,
}

#[derive(Debug, Default)]
struct Footer {
    /// `num_children` of each schema element, in order.
    children: Vec<i32>,
    num_rows: i64,
    row_groups: Vec<(i64, Vec<Chunk>)>,
}

fn read_footer(buf: &[u8]) -> TResult<Footer> {
    let mut t = Thrift::new(buf);
    let mut footer = Footer::default();
    t.each_field(0, |t, id, ty| match (id, ty) {
        (2, T_LIST) => {
            t.each_struct(1, |t| {
                let mut n = 0;
                t.each_field(2, |t, id, ty| match (id, ty) {
                    (5, T_I32) => {
                        n = t.i32()?;
                        Ok(true)
                    }
                    _ => Ok(false),
                })?;
                footer.children.push(n);
                if footer.children.len() > MAX_SCHEMA_ELEMENTS {
                    return Err(ThriftError::Invalid(format!(
                        "a schema of more than {MAX_SCHEMA_ELEMENTS} elements"
                    )));
                }
                Ok(())
            })?;
            Ok(true)
        }
        (3, T_I64) => {
            footer.num_rows = t.zigzag()?;
            Ok(true)
        }
        (4, T_LIST) => {
            t.each_struct(1, |t| {
                let mut rows = 0;
                let mut chunks = Vec::new();
                t.each_field(2, |t, id, ty| match (id, ty) {
                    (1, T_LIST) => {
                        t.each_struct(3, |t| {
                            let mut chunk = Chunk::default();
                            t.each_field(4, |t, id, ty| match (id, ty) {
                                (3, T_STRUCT) => {
                                    read_column_meta(t, &mut chunk)?;
                                    Ok(true)
                                }
                                _ => Ok(false),
                            })?;
                            chunks.push(chunk);
                            Ok(())
                        })?;
                        Ok(true)
                    }
                    (3, T_I64) => {
                        rows = t.zigzag()?;
                        Ok(true)
                    }
                    _ => Ok(false),
                })?;
                footer.row_groups.push((rows, chunks));
                Ok(())
            })?;
            Ok(true)
        }
        _ => Ok(false),
    })?;
    Ok(footer)
}

fn read_column_meta(t: &mut Thrift, chunk: &mut Chunk) -> TResult<()> {
    t.each_field(5, |t, id, ty| match (id, ty) {
        (3, T_LIST) => {
            let (n, elem) = t.list()?;
            for i in 0..n {
                if elem != T_BINARY {
                    t.skip_element(elem, 7)?;
                    continue;
                }
                let name = t.binary()?;
                if i == 0 {
                    chunk.root = String::from_utf8_lossy(name).into_owned();
                }
            }
            Ok(true)
        }
        (4, T_I32) => {
            chunk.codec = t.i32()?;
            Ok(true)
        }
        (7, T_I64) => {
            chunk.total_compressed = t.zigzag()?;
            Ok(true)
        }
        (9, T_I64) => {
            chunk.data_page_offset = t.zigzag()?;
            Ok(true)
        }
        (11, T_I64) => {
            chunk.dictionary_page_offset = Some(t.zigzag()?);
            Ok(true)
        }
        _ => Ok(false),
    })
}

/// The depth of the schema tree whose elements have `children` children each
/// (a flat, pre-order list, as Parquet stores it), computed without recursion.
fn schema_depth(children: &[i32]) -> std::result::Result<usize, Refusal> {
    let mut open: Vec<i64> = Vec::new();
    let mut depth = 0;
    for (i, &n) in children.iter().enumerate() {
        if i > 0 && open.is_empty() {
            return Err("more than one schema root".into());
        }
        if let Some(left) = open.last_mut() {
            *left -= 1;
        }
        if n > 0 {
            open.push(i64::from(n));
            depth = depth.max(open.len());
        } else if n < 0 {
            return Err(Refusal(format!("schema element {i} has {n} children")));
        }
        while open.last() == Some(&0) {
            open.pop();
        }
    }
    if !open.is_empty() {
        return Err("the schema ends inside a group".into());
    }
    // The root is the message itself, not a level of nesting.
    Ok(depth.saturating_sub(1))
}

#[derive(Debug, Default)]
struct Page {
    kind: i32,
    uncompressed: i32,
    compressed: i32,
    /// Data page v2: bytes of levels before the (maybe compressed) values.
    levels: i64,
    compressed_values: bool,
}

fn read_page_header(buf: &[u8]) -> TResult<(Page, usize)> {
    let mut t = Thrift::new(buf);
    let mut page = Page {
        compressed_values: true,
        ..Page::default()
    };
    t.each_field(0, |t, id, ty| match (id, ty) {
        (1, T_I32) => {
            page.kind = t.i32()?;
            Ok(true)
        }
        (2, T_I32) => {
            page.uncompressed = t.i32()?;
            Ok(true)
        }
        (3, T_I32) => {
            page.compressed = t.i32()?;
            Ok(true)
        }
        (8, T_STRUCT) => {
            t.each_field(1, |t, id, ty| match (id, ty) {
                (5 | 6, T_I32) => {
                    page.levels += i64::from(t.i32()?);
                    Ok(true)
                }
                (7, T_TRUE) => {
                    page.compressed_values = true;
                    Ok(true)
                }
                (7, T_FALSE) => {
                    page.compressed_values = false;
                    Ok(true)
                }
                _ => Ok(false),
            })?;
            Ok(true)
        }
        _ => Ok(false),
    })?;
    Ok((page, t.pos))
}

const CODEC_SNAPPY: i32 = 1;
const CODEC_GZIP: i32 = 2;
const CODEC_ZSTD: i32 = 6;

/// How many bytes `payload` inflates to under `codec`, counting at most
/// `cap + 1` (so a bomb is measured, never held).
fn inflated_size(
    codec: i32,
    payload: &[u8],
    cap: u64,
) -> std::result::Result<Option<u64>, Refusal> {
    let count = |mut r: Box<dyn Read + '_>| -> std::result::Result<u64, Refusal> {
        std::io::copy(&mut (&mut r).take(cap + 1), &mut std::io::sink())
            .map_err(|e| Refusal(format!("cannot inflate: {e}")))
    };
    Ok(match codec {
        CODEC_ZSTD => Some(count(Box::new(
            zstd::stream::read::Decoder::new(payload).map_err(|e| Refusal(format!("zstd: {e}")))?,
        ))?),
        CODEC_GZIP => Some(count(Box::new(flate2::read::MultiGzDecoder::new(payload)))?),
        CODEC_SNAPPY => {
            // Snappy states its decoded length first; the decoder allocates it.
            let mut t = Thrift::new(payload);
            Some(
                t.varint()
                    .map_err(|_| Refusal::from("a snappy page without its length"))?,
            )
        }
        // LZ4 pages are inflated into a buffer of the header's size; an
        // uncompressed page is its size.
        _ => None,
    })
}

/// Checks the footer of the Parquet file at `path` against `limits` (see the
/// module header): its size, its schema, its rows (`rows_before` came from the
/// dataset's earlier files). The pages are checked a row group at a time, just
/// before each is decoded ([`Plan::check_group`]), so the rows before a broken
/// group are still read.
pub fn check(path: &Path, file: &mut File, limits: &DataLimits, rows_before: u64) -> Result<Plan> {
    let len = file
        .metadata()
        .map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?
        .len();
    let io = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    if len < 12 {
        return Err(bad(path, "not a readable Parquet file: too short"));
    }
    let mut tail = [0u8; 8];
    file.seek(SeekFrom::Start(len - 8)).map_err(io)?;
    file.read_exact(&mut tail).map_err(io)?;
    if &tail[4..] != b"PAR1" {
        return Err(bad(path, "not a readable Parquet file: no PAR1 at its end"));
    }
    let footer_len = u64::from(u32::from_le_bytes([tail[0], tail[1], tail[2], tail[3]]));
    if footer_len > MAX_FOOTER_BYTES || footer_len + 8 > len {
        return Err(bad(
            path,
            format!("a Parquet footer of {footer_len} bytes in a file of {len}"),
        ));
    }
    let mut buf = vec![0u8; footer_len as usize];
    file.seek(SeekFrom::Start(len - 8 - footer_len))
        .map_err(io)?;
    file.read_exact(&mut buf).map_err(io)?;
    let footer = read_footer(&buf).map_err(|e| match e {
        ThriftError::Short => bad(path, "the Parquet footer is truncated"),
        ThriftError::Invalid(reason) => {
            bad(path, format!("the Parquet footer is invalid: {reason}"))
        }
    })?;
    let depth = schema_depth(&footer.children)
        .map_err(|r| bad(path, format!("invalid Parquet schema: {r}")))?;
    if depth > limits.max_nesting {
        return Err(bad(
            path,
            format!(
                "the schema nests {depth} levels deep, more than data.limits.max_nesting = {}",
                limits.max_nesting
            ),
        ));
    }
    let rows = u64::try_from(footer.num_rows).map_err(|_| bad(path, "a negative row count"))?;
    if rows_before + rows > limits.max_rows {
        return Err(bad(
            path,
            format!(
                "{rows} rows (after {rows_before} in earlier files) exceed data.limits.max_rows = {}",
                limits.max_rows
            ),
        ));
    }
    Ok(Plan {
        rows,
        len,
        limits: limits.clone(),
        groups: footer
            .row_groups
            .into_iter()
            .map(|(_, chunks)| chunks)
            .collect(),
    })
}

/// A Parquet file whose footer passed [`check`]: its row groups' pages are
/// checked one group at a time.
#[derive(Debug)]
pub struct Plan {
    /// Rows the footer declares.
    pub rows: u64,
    len: u64,
    limits: DataLimits,
    groups: Vec<Vec<Chunk>>,
}

impl Plan {
    /// Checks every page of row group `g` in the top-level columns `roots`
    /// (all when empty), adding what they decode to `decoded` (the dataset's
    /// running total). The reason, without file and row (the reader adds them).
    pub fn check_group(
        &self,
        file: &mut File,
        g: usize,
        roots: &[String],
        decoded: &mut u64,
    ) -> std::result::Result<(), Refusal> {
        let Some(chunks) = self.groups.get(g) else {
            return Ok(());
        };
        for chunk in chunks
            .iter()
            .filter(|c| roots.is_empty() || roots.contains(&c.root))
        {
            check_chunk(file, self.len, &self.limits, chunk, g, decoded)?;
        }
        Ok(())
    }
}

fn check_chunk(
    file: &mut File,
    len: u64,
    limits: &DataLimits,
    chunk: &Chunk,
    group: usize,
    decoded: &mut u64,
) -> std::result::Result<(), Refusal> {
    let at = |reason: String| {
        Refusal(format!(
            "column {:?} of row group {group}: {reason}",
            chunk.root
        ))
    };
    let start = match chunk.dictionary_page_offset {
        Some(d) if d > 0 && d < chunk.data_page_offset => d,
        _ => chunk.data_page_offset,
    };
    let end = start.checked_add(chunk.total_compressed).unwrap_or(-1);
    if start < 4 || chunk.total_compressed < 0 || end < start || end as u64 > len {
        return Err(at(format!(
            "pages at bytes {start}..{end} are outside the file of {len} bytes"
        )));
    }
    let io = |e: std::io::Error| at(format!("reading the file: {e}"));
    let mut pos = start as u64;
    while pos < end as u64 {
        // The header: a small window first, larger ones if its statistics need it.
        let mut window = 4096usize;
        let (page, header_len) = loop {
            let n = window.min((end as u64 - pos) as usize);
            let mut buf = vec![0u8; n];
            file.seek(SeekFrom::Start(pos)).map_err(io)?;
            file.read_exact(&mut buf).map_err(io)?;
            match read_page_header(&buf) {
                Ok(found) => break found,
                Err(ThriftError::Short) if n == window && window < MAX_PAGE_HEADER_BYTES => {
                    window *= 16;
                }
                Err(ThriftError::Short) => return Err(at("a page header is truncated".into())),
                Err(ThriftError::Invalid(r)) => {
                    return Err(at(format!("a page header is invalid: {r}")));
                }
            }
        };
        if page.uncompressed < 0 || page.compressed < 0 {
            return Err(at("a page with a negative size".into()));
        }
        let size = page.uncompressed as u64;
        if size > limits.max_value_bytes {
            return Err(at(format!(
                "a page decodes to {size} bytes, more than data.limits.max_value_bytes = {}",
                limits.max_value_bytes
            )));
        }
        *decoded += size;
        if *decoded > limits.max_decoded_bytes {
            return Err(at(format!(
                "the data decodes to more than data.limits.max_decoded_bytes = {}",
                limits.max_decoded_bytes
            )));
        }
        let body = pos + header_len as u64;
        let next = body + page.compressed as u64;
        if next > end as u64 {
            return Err(at("a page runs past its column chunk".into()));
        }
        // Index pages (type 1) carry no values; data v2 pages may be stored plain.
        let inflates = page.kind != 1 && page.compressed_values;
        if inflates && matches!(chunk.codec, CODEC_ZSTD | CODEC_GZIP | CODEC_SNAPPY) {
            let levels = if page.kind == 3 {
                page.levels.max(0) as u64
            } else {
                0
            };
            let payload_len = (page.compressed as u64).saturating_sub(levels);
            let mut payload = vec![0u8; payload_len as usize];
            file.seek(SeekFrom::Start(body + levels)).map_err(io)?;
            file.read_exact(&mut payload).map_err(io)?;
            let values = size.saturating_sub(levels);
            match inflated_size(chunk.codec, &payload, values) {
                Ok(Some(n)) if n > values => {
                    return Err(at(format!(
                        "a page inflates to more than the {values} bytes its header declares"
                    )));
                }
                Ok(_) => {}
                Err(r) => return Err(at(r.0)),
            }
        }
        pos = next;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_depth_is_computed_without_recursion() {
        // message { a; g { b; h { c } } }
        assert_eq!(schema_depth(&[2, 0, 2, 0, 1, 0]), Ok(2));
        assert_eq!(schema_depth(&[1, 0]), Ok(0));
        // A chain a million deep is measured, not recursed into.
        let mut chain = vec![1i32; 1_000_000];
        chain.push(0);
        assert_eq!(schema_depth(&chain), Ok(999_999));
        assert!(schema_depth(&[2, 0]).is_err(), "ends inside a group");
        assert!(schema_depth(&[1, 0, 0]).is_err(), "two roots");
    }

    /// A Parquet file whose schema is a chain of `depth` groups (the footer
    /// alone: nothing past it is read when it is refused).
    fn chain_file(depth: usize) -> tempfile::NamedTempFile {
        let mut footer = vec![0x15, 0x02, 0x19, 0xfc];
        let mut n = depth as u64 + 1;
        while n >= 0x80 {
            footer.push((n as u8 & 0x7f) | 0x80);
            n >>= 7;
        }
        footer.push(n as u8);
        for i in 0..=depth {
            footer.extend([0x48, 0x01, b'a']); // field 4, name "a"
            if i < depth {
                footer.extend([0x15, 0x02]); // field 5, num_children 1
            }
            footer.push(0);
        }
        footer.extend([0x16, 0x02, 0x00]); // field 3, num_rows 1; end
        let mut bytes = b"PAR1".to_vec();
        bytes.extend(&footer);
        bytes.extend((footer.len() as u32).to_le_bytes());
        bytes.extend(b"PAR1");
        let f = tempfile::NamedTempFile::new().expect("tmp");
        std::fs::write(f.path(), bytes).expect("write");
        f
    }

    #[test]
    fn a_schema_nested_past_any_stack_is_refused_by_its_depth() {
        let f = chain_file(90_000);
        let mut file = File::open(f.path()).expect("open");
        let err = check(f.path(), &mut file, &DataLimits::default(), 0)
            .expect_err("refused")
            .to_string();
        assert!(
            err.contains("nests 89999 levels deep, more than data.limits.max_nesting = 32"),
            "{err}"
        );
        let f = chain_file(3);
        let mut file = File::open(f.path()).expect("open");
        let ok = check(f.path(), &mut file, &DataLimits::default(), 0).expect("shallow");
        assert_eq!(ok.rows, 1);
    }

    #[test]
    fn thrift_nesting_and_lengths_are_bounded() {
        // A struct nested in a struct ... 100 deep.
        let mut buf = vec![0x1c; 100]; // field 1, a struct, in a struct, ...
        buf.extend(std::iter::repeat_n(0u8, 101));
        let err = Thrift::new(&buf)
            .skip_element(T_STRUCT, 0)
            .expect_err("too deep");
        assert!(
            matches!(err, ThriftError::Invalid(ref r) if r.contains("nested")),
            "{err:?}"
        );
        // A binary that claims more bytes than there are.
        let err = Thrift::new(&[0xff, 0xff, 0x03])
            .binary()
            .expect_err("short");
        assert!(matches!(err, ThriftError::Short));
        // A list of a billion booleans in four bytes.
        let err = Thrift::new(&[0xf1, 0x80, 0x94, 0xeb, 0xdc, 0x03])
            .skip_element(T_LIST, 0)
            .expect_err("short");
        assert!(matches!(err, ThriftError::Short));
    }

    #[test]
    fn a_bomb_is_measured_not_held() {
        let big = vec![b'a'; 8 << 20];
        let packed = zstd::bulk::compress(&big, 19).expect("compress");
        assert!(packed.len() < 4096);
        assert_eq!(inflated_size(CODEC_ZSTD, &packed, 1000), Ok(Some(1001)));
        assert_eq!(
            inflated_size(CODEC_ZSTD, &packed, 16 << 20),
            Ok(Some(8 << 20))
        );
    }
}
