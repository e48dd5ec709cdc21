//! `pytorch_model.bin` as `torch.save` writes it since PyTorch 1.6: a zip archive
//! holding `<archive>/data.pkl` (a pickle of the state dict) and one uncompressed
//! entry `<archive>/data/<key>` per storage.
//!
//! The pickle is read by a small machine of our own that knows exactly the
//! operations a state dict needs and the handful of globals that rebuild tensors
//! (`torch._utils._rebuild_tensor_v2`, the storage types, `OrderedDict`); any other
//! global is refused by name, so nothing but tensors is ever unpickled and no code
//! runs. Tensors are not read here: each becomes a byte range of the archive,
//! read later like a safetensors tensor. The pre-1.6 format (a bare pickle stream)
//! is refused with the command that re-saves it.
//!
//! Hostile files are bounded: the pickle's size, its nesting, the values a memo
//! reference may copy, and every storage range is checked against its entry.

use std::collections::HashMap;
use std::io::Read;
use std::path::Path;

use tch::Kind;

use crate::error::{Error, Result, io_err};
use crate::model::checkpoint::UnsupportedDtype;

/// One tensor of the state dict: where its elements lie in the archive.
#[derive(Debug, Clone)]
pub struct PickledTensor {
    pub name: String,
    /// `Err(type)`: a storage type this project cannot hold (refused when read).
    pub kind: std::result::Result<Kind, UnsupportedDtype>,
    pub shape: Vec<i64>,
    /// `None` when the tensor is contiguous.
    pub strides: Option<Vec<i64>>,
    /// Byte offset in the archive file of the tensor's first element.
    pub start: u64,
    /// Elements of the storage from the tensor's first element to its end.
    pub storage_len: i64,
}

const MAX_PICKLE_BYTES: u64 = 256 << 20;
const MAX_DEPTH: u16 = 64;
/// Values copied by memo references, in all (a pickle can reference one value
/// many times; copies are bounded so they cannot grow exponentially).
const MAX_COPIED: u64 = 1 << 24;

/// The zip local-file signature; the legacy format starts with a pickle opcode.
const ZIP_MAGIC: &[u8; 4] = b"PK\x03\x04";

fn bad(path: &Path, reason: impl Into<String>) -> Error {
    Error::Weights {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// Whether `path` is a `torch.save` weights file (by name).
pub fn is_torch_file(path: &Path) -> bool {
    path.extension()
        .is_some_and(|e| e == "bin" || e == "pt" || e == "pth")
}

/// The tensors of a `torch.save` state dict at `path`.
pub fn read_index(path: &Path) -> Result<Vec<PickledTensor>> {
    let mut file = dpo_data::confined::open_read(path).map_err(io_err(path))?;
    let mut magic = [0u8; 4];
    let n = file.read(&mut magic).map_err(io_err(path))?;
    if n < 4 || &magic != ZIP_MAGIC {
        return Err(bad(
            path,
            "not a zip archive: this is the legacy (PyTorch < 1.6) torch.save format, which is a \
             pickle stream that cannot be read without running it; re-save it once with \
             `python -c \"import torch; p='FILE'; torch.save(torch.load(p, weights_only=True), p)\"` \
             or convert it to safetensors",
        ));
    }
    let file = dpo_data::confined::open_read(path).map_err(io_err(path))?;
    let mut archive =
        zip::ZipArchive::new(file).map_err(|e| bad(path, format!("bad zip archive: {e}")))?;
    let pickle_name = archive
        .file_names()
        .find(|n| n.ends_with("/data.pkl") && n.matches('/').count() == 1)
        .map(str::to_string)
        .ok_or_else(|| bad(path, "no <archive>/data.pkl: not a torch.save file"))?;
    let prefix = pickle_name.trim_end_matches("data.pkl").to_string();
    if let Ok(mut order) = archive.by_name(&format!("{prefix}byteorder")) {
        let mut text = String::new();
        (&mut order)
            .take(16)
            .read_to_string(&mut text)
            .map_err(io_err(path))?;
        if text.trim() != "little" {
            return Err(bad(
                path,
                format!("byte order {:?} is not supported", text.trim()),
            ));
        }
    }
    let pickle = {
        let entry = archive
            .by_name(&pickle_name)
            .map_err(|e| bad(path, format!("{pickle_name}: {e}")))?;
        if entry.size() > MAX_PICKLE_BYTES {
            return Err(bad(
                path,
                format!("{pickle_name} is {} bytes", entry.size()),
            ));
        }
        let mut bytes = Vec::with_capacity(entry.size() as usize);
        entry
            .take(MAX_PICKLE_BYTES)
            .read_to_end(&mut bytes)
            .map_err(io_err(path))?;
        bytes
    };
    let top = Machine::new(path).run(&pickle)?;
    let V::Dict(items, _) = top else {
        return Err(bad(
            path,
            "the pickle is not a state dict (a dict of name -> tensor); save model.state_dict()",
        ));
    };
    // Each storage's place in the archive, looked up once.
    let mut storages: HashMap<String, (u64, u64)> = HashMap::new();
    let mut out = Vec::with_capacity(items.len());
    for (key, value) in items {
        let V::Str(name) = key else {
            return Err(bad(path, "a state dict key is not a string"));
        };
        let V::Tensor(t) = value else {
            return Err(bad(path, format!("{name}: not a tensor")));
        };
        let (data_start, data_len) = match storages.get(&t.storage.key) {
            Some(&place) => place,
            None => {
                let entry_name = format!("{prefix}data/{}", t.storage.key);
                let entry = archive
                    .by_name(&entry_name)
                    .map_err(|e| bad(path, format!("{name}: storage {entry_name}: {e}")))?;
                if entry.compression() != zip::CompressionMethod::Stored {
                    return Err(bad(path, format!("{entry_name} is compressed")));
                }
                let place = (entry.data_start(), entry.size());
                storages.insert(t.storage.key.clone(), place);
                place
            }
        };
        let elt = t.storage.kind.as_ref().map_or(1, |k| k.elt_size_in_bytes()) as u64;
        let storage_elems = (data_len / elt) as i64;
        let numel: i64 = t.shape.iter().product();
        // The last element's index from the tensor's first (0 for an empty tensor).
        let extent: i64 = if numel == 0 {
            0
        } else {
            t.shape
                .iter()
                .zip(&t.strides)
                .map(|(&d, &s)| (d - 1) * s)
                .sum::<i64>()
                + 1
        };
        if t.offset < 0 || t.offset + extent > storage_elems || t.strides.iter().any(|&s| s < 0) {
            return Err(bad(
                path,
                format!(
                    "{name}: shape {:?} strides {:?} at offset {} do not fit its storage of {storage_elems} elements",
                    t.shape, t.strides, t.offset
                ),
            ));
        }
        let contiguous = contiguous_strides(&t.shape) == t.strides || numel <= 1;
        out.push(PickledTensor {
            name,
            kind: t.storage.kind.clone(),
            strides: (!contiguous).then(|| t.strides.clone()),
            shape: t.shape,
            start: data_start + t.offset as u64 * elt,
            storage_len: extent,
        });
    }
    Ok(out)
}

fn contiguous_strides(shape: &[i64]) -> Vec<i64> {
    let mut strides = vec![0i64; shape.len()];
    let mut acc = 1i64;
    for (s, &d) in strides.iter_mut().zip(shape).rev() {
        *s = acc;
        acc *= d.max(1);
    }
    strides
}

#[derive(Debug, Clone)]
struct StorageRef {
    kind: std::result::Result<Kind, UnsupportedDtype>,
    key: String,
}

#[derive(Debug, Clone)]
struct TensorRef {
    storage: StorageRef,
    offset: i64,
    shape: Vec<i64>,
    strides: Vec<i64>,
}

/// Nesting depth and number of values of a container.
#[derive(Debug, Clone, Copy, Default)]
struct Extent {
    depth: u16,
    size: u64,
}

#[derive(Debug, Clone)]
enum V {
    None,
    /// A boolean or a float: their values are not needed (`requires_grad`).
    Scalar,
    Int(i64),
    Str(String),
    Bytes,
    Global(String, String),
    Mark,
    Tuple(Vec<V>, Extent),
    List(Vec<V>, Extent),
    Dict(Vec<(V, V)>, Extent),
    Storage(StorageRef),
    Tensor(TensorRef),
}

impl V {
    fn extent(&self) -> Extent {
        match self {
            V::Tuple(_, e) | V::List(_, e) | V::Dict(_, e) => *e,
            _ => Extent { depth: 0, size: 1 },
        }
    }
}

fn storage_kind(name: &str) -> std::result::Result<Kind, UnsupportedDtype> {
    Ok(match name {
        "FloatStorage" => Kind::Float,
        "HalfStorage" => Kind::Half,
        "BFloat16Storage" => Kind::BFloat16,
        "DoubleStorage" => Kind::Double,
        "LongStorage" => Kind::Int64,
        "IntStorage" => Kind::Int,
        "BoolStorage" => Kind::Bool,
        "ByteStorage" => Kind::Uint8,
        "CharStorage" => Kind::Int8,
        "ShortStorage" => Kind::Int16,
        other => return Err(UnsupportedDtype(other.to_string())),
    })
}

/// The globals a state dict may name; anything else is refused.
fn allowed(module: &str, name: &str) -> bool {
    matches!(
        (module, name),
        ("collections", "OrderedDict")
            | ("torch._utils", "_rebuild_tensor_v2")
            | ("torch._utils", "_rebuild_parameter")
            | ("torch._utils", "_rebuild_parameter_with_state")
            | ("torch._tensor", "_rebuild_from_type_v2")
            | ("torch", "Tensor")
            | ("torch.nn.parameter", "Parameter")
    ) || (module == "torch" && name.ends_with("Storage"))
}

struct Machine<'a> {
    path: &'a Path,
    stack: Vec<V>,
    memo: HashMap<u32, V>,
    copied: u64,
}

impl<'a> Machine<'a> {
    fn new(path: &'a Path) -> Self {
        Machine {
            path,
            stack: Vec::new(),
            memo: HashMap::new(),
            copied: 0,
        }
    }

    fn err(&self, at: usize, reason: impl std::fmt::Display) -> Error {
        bad(self.path, format!("data.pkl at byte {at}: {reason}"))
    }

    fn pop(&mut self, at: usize) -> Result<V> {
        match self.stack.pop() {
            Some(V::Mark) | None => Err(self.err(at, "stack underflow")),
            Some(v) => Ok(v),
        }
    }

    /// The values above the topmost mark (the mark is removed).
    fn pop_to_mark(&mut self, at: usize) -> Result<Vec<V>> {
        let Some(mark) = self.stack.iter().rposition(|v| matches!(v, V::Mark)) else {
            return Err(self.err(at, "no mark on the stack"));
        };
        let items = self.stack.split_off(mark + 1);
        self.stack.pop();
        Ok(items)
    }

    fn container_extent<'v>(
        &self,
        at: usize,
        items: impl Iterator<Item = &'v V>,
    ) -> Result<Extent> {
        let mut e = Extent { depth: 1, size: 1 };
        for v in items {
            let x = v.extent();
            e.depth = e.depth.max(x.depth + 1);
            e.size += x.size;
        }
        if e.depth > MAX_DEPTH {
            return Err(self.err(at, format!("values nested deeper than {MAX_DEPTH}")));
        }
        Ok(e)
    }

    fn tuple(&self, at: usize, items: Vec<V>) -> Result<V> {
        let e = self.container_extent(at, items.iter())?;
        Ok(V::Tuple(items, e))
    }

    fn memo_get(&mut self, at: usize, key: u32) -> Result<()> {
        let v = self
            .memo
            .get(&key)
            .ok_or_else(|| self.err(at, format!("memo key {key} is not set")))?;
        self.copied += v.extent().size;
        if self.copied > MAX_COPIED {
            return Err(self.err(at, "too many values copied from the memo"));
        }
        let v = v.clone();
        self.stack.push(v);
        Ok(())
    }

    fn memo_put(&mut self, at: usize, key: u32) -> Result<()> {
        let top = self
            .stack
            .last()
            .filter(|v| !matches!(v, V::Mark))
            .ok_or_else(|| self.err(at, "memoizing an empty stack"))?
            .clone();
        self.copied += top.extent().size;
        if self.copied > MAX_COPIED {
            return Err(self.err(at, "too many values copied into the memo"));
        }
        self.memo.insert(key, top);
        Ok(())
    }

    /// Adds `pairs` to the dict on top of the stack.
    fn set_items(&mut self, at: usize, flat: Vec<V>) -> Result<()> {
        if flat.len() % 2 != 0 {
            return Err(self.err(at, "odd number of items for a dict"));
        }
        let Some(V::Dict(items, e)) = self.stack.last_mut() else {
            return Err(self.err(at, "SETITEMS on something that is not a dict"));
        };
        let mut it = flat.into_iter();
        while let (Some(k), Some(v)) = (it.next(), it.next()) {
            let (xk, xv) = (k.extent(), v.extent());
            e.depth = e.depth.max(xk.depth.max(xv.depth) + 1);
            e.size += xk.size + xv.size;
            items.push((k, v));
        }
        if e.depth > MAX_DEPTH {
            return Err(self.err(at, format!("values nested deeper than {MAX_DEPTH}")));
        }
        Ok(())
    }

    fn append(&mut self, at: usize, values: Vec<V>) -> Result<()> {
        let Some(V::List(items, e)) = self.stack.last_mut() else {
            return Err(self.err(at, "APPEND on something that is not a list"));
        };
        for v in values {
            let x = v.extent();
            e.depth = e.depth.max(x.depth + 1);
            e.size += x.size;
            items.push(v);
        }
        if e.depth > MAX_DEPTH {
            return Err(self.err(at, format!("values nested deeper than {MAX_DEPTH}")));
        }
        Ok(())
    }

    /// `('storage', torch.FloatStorage, key, location, numel)`.
    fn persistent(&self, at: usize, pid: V) -> Result<V> {
        let V::Tuple(items, _) = pid else {
            return Err(self.err(at, "a persistent id that is not a tuple"));
        };
        match items.as_slice() {
            [V::Str(tag), V::Global(module, name), V::Str(key), ..] if tag == "storage" => {
                if module != "torch" || !name.ends_with("Storage") {
                    return Err(self.err(at, format!("storage type {module}.{name}")));
                }
                if key.is_empty() || !key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                    return Err(self.err(at, format!("storage key {key:?}")));
                }
                Ok(V::Storage(StorageRef {
                    kind: storage_kind(name),
                    key: key.clone(),
                }))
            }
            _ => Err(self.err(at, "a persistent id that is not a storage")),
        }
    }

    fn ints(&self, at: usize, v: &V, what: &str) -> Result<Vec<i64>> {
        let (V::Tuple(items, _) | V::List(items, _)) = v else {
            return Err(self.err(at, format!("{what} is not a tuple")));
        };
        items
            .iter()
            .map(|x| match x {
                V::Int(i) if *i >= 0 => Ok(*i),
                _ => Err(self.err(at, format!("{what} holds a non-integer or negative value"))),
            })
            .collect()
    }

    fn reduce(&self, at: usize, callable: V, args: V) -> Result<V> {
        let V::Global(module, name) = callable else {
            return Err(self.err(at, "calling something that is not a global"));
        };
        let V::Tuple(args, _) = args else {
            return Err(self.err(at, "call arguments are not a tuple"));
        };
        match (module.as_str(), name.as_str()) {
            ("collections", "OrderedDict") if args.is_empty() => {
                Ok(V::Dict(Vec::new(), Extent { depth: 1, size: 1 }))
            }
            ("torch._utils", "_rebuild_tensor_v2") => {
                let [V::Storage(storage), V::Int(offset), size, stride, ..] = args.as_slice()
                else {
                    return Err(self.err(at, "_rebuild_tensor_v2 with unexpected arguments"));
                };
                let shape = self.ints(at, size, "a tensor's size")?;
                let strides = self.ints(at, stride, "a tensor's stride")?;
                if shape.len() != strides.len() || shape.len() > 16 {
                    return Err(self.err(at, "a tensor's size and stride differ in length"));
                }
                if shape
                    .iter()
                    .try_fold(1i64, |acc, &d| acc.checked_mul(d))
                    .is_none()
                {
                    return Err(self.err(at, "a tensor's size overflows"));
                }
                Ok(V::Tensor(TensorRef {
                    storage: storage.clone(),
                    offset: *offset,
                    shape,
                    strides,
                }))
            }
            ("torch._utils", "_rebuild_parameter" | "_rebuild_parameter_with_state") => {
                match args.into_iter().next() {
                    Some(t @ V::Tensor(_)) => Ok(t),
                    _ => Err(self.err(at, "a parameter that does not hold a tensor")),
                }
            }
            ("torch._tensor", "_rebuild_from_type_v2") => {
                // (func, type, args, state): the plain tensor `func(*args)` builds.
                let mut it = args.into_iter();
                let (Some(func), Some(V::Global(..)), Some(inner)) =
                    (it.next(), it.next(), it.next())
                else {
                    return Err(self.err(at, "_rebuild_from_type_v2 with unexpected arguments"));
                };
                self.reduce(at, func, inner)
            }
            _ => Err(self.err(
                at,
                format!(
                    "{module}.{name} cannot be called here (a weights file holds tensors only)"
                ),
            )),
        }
    }

    fn run(mut self, code: &[u8]) -> Result<V> {
        let mut pos = 0usize;
        macro_rules! take {
            ($n:expr) => {{
                let n = $n;
                if code.len() - pos < n {
                    return Err(self.err(pos, "truncated"));
                }
                let s = &code[pos..pos + n];
                pos += n;
                s
            }};
        }
        let le = |b: &[u8]| -> u64 {
            b.iter()
                .rev()
                .fold(0u64, |acc, &x| (acc << 8) | u64::from(x))
        };
        loop {
            let at = pos;
            let op = take!(1)[0];
            match op {
                0x80 => {
                    take!(1);
                }
                0x95 => {
                    take!(8);
                }
                b'.' => return self.pop(at),
                b'}' => self
                    .stack
                    .push(V::Dict(Vec::new(), Extent { depth: 1, size: 1 })),
                b']' => self
                    .stack
                    .push(V::List(Vec::new(), Extent { depth: 1, size: 1 })),
                b')' => self
                    .stack
                    .push(V::Tuple(Vec::new(), Extent { depth: 1, size: 1 })),
                b'(' => self.stack.push(V::Mark),
                b'N' => self.stack.push(V::None),
                0x88 | 0x89 => self.stack.push(V::Scalar),
                b'K' => {
                    let v = take!(1)[0];
                    self.stack.push(V::Int(i64::from(v)));
                }
                b'M' => {
                    let v = le(take!(2));
                    self.stack.push(V::Int(v as i64));
                }
                b'J' => {
                    let b = take!(4);
                    let v = i32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                    self.stack.push(V::Int(i64::from(v)));
                }
                0x8a => {
                    let n = usize::from(take!(1)[0]);
                    let b = take!(n);
                    if n > 8 {
                        return Err(self.err(at, "an integer wider than 64 bits"));
                    }
                    let mut v = le(b);
                    if n > 0 && n < 8 && b[n - 1] & 0x80 != 0 {
                        v |= u64::MAX << (8 * n);
                    }
                    self.stack.push(V::Int(v as i64));
                }
                b'G' => {
                    take!(8);
                    self.stack.push(V::Scalar);
                }
                b'X' | 0x8c | 0x8d => {
                    let n = match op {
                        b'X' => le(take!(4)),
                        0x8c => u64::from(take!(1)[0]),
                        _ => le(take!(8)),
                    };
                    let n = usize::try_from(n).map_err(|_| self.err(at, "string too long"))?;
                    let s = std::str::from_utf8(take!(n))
                        .map_err(|_| self.err(at, "a string that is not UTF-8"))?;
                    self.stack.push(V::Str(s.to_string()));
                }
                b'C' | b'B' | 0x8e => {
                    let n = match op {
                        b'C' => u64::from(take!(1)[0]),
                        b'B' => le(take!(4)),
                        _ => le(take!(8)),
                    };
                    let n = usize::try_from(n).map_err(|_| self.err(at, "bytes too long"))?;
                    take!(n);
                    self.stack.push(V::Bytes);
                }
                b'c' => {
                    let rest = &code[pos..];
                    let mut lines = rest.splitn(3, |&b| b == b'\n');
                    let (Some(module), Some(name), Some(_)) =
                        (lines.next(), lines.next(), lines.next())
                    else {
                        return Err(self.err(at, "truncated GLOBAL"));
                    };
                    pos += module.len() + name.len() + 2;
                    let module = String::from_utf8_lossy(module).into_owned();
                    let name = String::from_utf8_lossy(name).into_owned();
                    self.global(at, module, name)?;
                }
                0x93 => {
                    let name = self.pop(at)?;
                    let module = self.pop(at)?;
                    let (V::Str(module), V::Str(name)) = (module, name) else {
                        return Err(self.err(at, "STACK_GLOBAL without two strings"));
                    };
                    self.global(at, module, name)?;
                }
                b'q' => {
                    let k = u32::from(take!(1)[0]);
                    self.memo_put(at, k)?;
                }
                b'r' => {
                    let k = le(take!(4)) as u32;
                    self.memo_put(at, k)?;
                }
                0x94 => {
                    let k = self.memo.len() as u32;
                    self.memo_put(at, k)?;
                }
                b'h' => {
                    let k = u32::from(take!(1)[0]);
                    self.memo_get(at, k)?;
                }
                b'j' => {
                    let k = le(take!(4)) as u32;
                    self.memo_get(at, k)?;
                }
                b't' => {
                    let items = self.pop_to_mark(at)?;
                    let t = self.tuple(at, items)?;
                    self.stack.push(t);
                }
                0x85..=0x87 => {
                    let n = usize::from(op - 0x84);
                    let mut items = Vec::with_capacity(n);
                    for _ in 0..n {
                        items.push(self.pop(at)?);
                    }
                    items.reverse();
                    let t = self.tuple(at, items)?;
                    self.stack.push(t);
                }
                b'l' => {
                    let items = self.pop_to_mark(at)?;
                    let e = self.container_extent(at, items.iter())?;
                    self.stack.push(V::List(items, e));
                }
                b'd' => {
                    let items = self.pop_to_mark(at)?;
                    self.stack
                        .push(V::Dict(Vec::new(), Extent { depth: 1, size: 1 }));
                    self.set_items(at, items)?;
                }
                b'a' => {
                    let v = self.pop(at)?;
                    self.append(at, vec![v])?;
                }
                b'e' => {
                    let items = self.pop_to_mark(at)?;
                    self.append(at, items)?;
                }
                b's' => {
                    let v = self.pop(at)?;
                    let k = self.pop(at)?;
                    self.set_items(at, vec![k, v])?;
                }
                b'u' => {
                    let items = self.pop_to_mark(at)?;
                    self.set_items(at, items)?;
                }
                b'Q' => {
                    let pid = self.pop(at)?;
                    let storage = self.persistent(at, pid)?;
                    self.stack.push(storage);
                }
                b'R' | 0x81 => {
                    let args = self.pop(at)?;
                    let callable = self.pop(at)?;
                    let v = self.reduce(at, callable, args)?;
                    self.stack.push(v);
                }
                b'b' => {
                    // An object's state (OrderedDict's `_metadata`): not needed.
                    self.pop(at)?;
                    if self.stack.last().is_none_or(|v| matches!(v, V::Mark)) {
                        return Err(self.err(at, "BUILD without an object"));
                    }
                }
                other => {
                    return Err(self.err(
                        at,
                        format!("pickle opcode 0x{other:02x} is not allowed in a state dict"),
                    ));
                }
            }
        }
    }

    fn global(&mut self, at: usize, module: String, name: String) -> Result<()> {
        if !allowed(&module, &name) {
            return Err(self.err(
                at,
                format!("refusing to unpickle {module}.{name}: a weights file holds tensors only"),
            ));
        }
        self.stack.push(V::Global(module, name));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(code: &[u8]) -> Result<V> {
        Machine::new(Path::new("t.bin")).run(code)
    }

    #[test]
    fn a_global_outside_the_allowed_set_is_refused_by_name() {
        let code = b"\x80\x02cos\nsystem\nq\x00X\x02\x00\x00\x00lsq\x01\x85q\x02Rq\x03.";
        let err = run(code).expect_err("refused").to_string();
        assert!(err.contains("refusing to unpickle os.system"), "{err}");
    }

    #[test]
    fn deep_nesting_is_refused_not_overflowed() {
        let mut code = b"\x80\x02".to_vec();
        code.extend(std::iter::repeat_n(b']', 100_000));
        code.extend(std::iter::repeat_n(b'a', 99_999));
        code.push(b'.');
        let err = run(&code).expect_err("refused").to_string();
        assert!(err.contains("nested deeper"), "{err}");
    }

    #[test]
    fn memo_copies_are_bounded() {
        // A list doubled 40 times through the memo would hold 2^40 values.
        let mut code = b"\x80\x02]K\x01aq\x00".to_vec();
        for i in 0..40u8 {
            code.extend([b'(', b'h', i, b'h', i, b'l', b'q', i + 1]);
        }
        code.push(b'.');
        let err = run(&code).expect_err("refused").to_string();
        assert!(
            err.contains("too many values") || err.contains("nested deeper"),
            "{err}"
        );
    }

    #[test]
    fn a_truncated_stream_is_an_error() {
        let err = run(b"\x80\x02X\x05\x00\x00\x00ab")
            .expect_err("refused")
            .to_string();
        assert!(err.contains("truncated"), "{err}");
    }
}
