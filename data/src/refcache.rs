//! The reference log-probability cache: Σ log π_ref(response | prompt) per
//! sequence, computed once and reused by later runs, epochs, β or loss sweeps,
//! resumes and world-size changes.
//!
//! A cache lives in a *namespace* named by what the numbers depend on: the
//! reference weights (every `*.safetensors` or `*.bin` file, by content), the
//! tokenizer (every file of any layout: `tokenizer.json`, `tokenizer_config.json`,
//! `vocab.txt`, ...) and the compute dtype. Within a
//! namespace a sequence is keyed by its token ids (prompt and response, each
//! length-prefixed), so a record is valid for any dataset, order or world size that
//! produces the same ids — and never for anything else.
//!
//! On disk: `ROOT/<namespace>/` holds append-only segment files of 20-byte records
//! (16-byte key, f32 little-endian sum). Each writer appends to a segment of its own
//! (named by process and a random suffix) and fsyncs after every batch, so
//! concurrent writers never interleave and a crash loses at most the batch in
//! flight; a torn trailing record is ignored on load.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use dpo_proto::{ReferenceModel, RunSpec};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::examples::Example;

/// Bytes of a sequence key.
pub const KEY_BYTES: usize = 16;
const RECORD: usize = KEY_BYTES + 4;
const VERSION: &str = "dpo-cluster reference log-probs v1";

/// A sequence's key within a namespace.
pub type Key = [u8; KEY_BYTES];

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Content digests of files by (path, length, modification time), so a model's
/// weights are read and hashed once rather than at every run (tens of GB for
/// large models). Kept as `fingerprints.json` in the cache root; a file whose
/// length or mtime changed is hashed again.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
struct Fingerprints {
    files: std::collections::BTreeMap<String, Fingerprint>,
    #[serde(skip)]
    changed: bool,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
struct Fingerprint {
    len: u64,
    mtime_ns: String,
    sha256: String,
}

impl Fingerprints {
    fn path(root: &Path) -> PathBuf {
        root.join("fingerprints.json")
    }

    /// An unreadable or corrupt memo is ignored (everything is hashed again).
    fn load(root: &Path) -> Self {
        std::fs::read(Self::path(root))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    fn save(&self, root: &Path) -> Result<()> {
        if !self.changed {
            return Ok(());
        }
        std::fs::create_dir_all(root).map_err(io(root))?;
        let path = Self::path(root);
        let bytes = serde_json::to_vec_pretty(self).map_err(|e| Error::File {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        crate::atomic::write(&path, &bytes).map_err(io(&path))
    }
}

/// `(length, SHA-256)` of a file's content, from `memo` when its length and
/// mtime are unchanged.
fn digest_file(path: &Path, memo: Option<&mut Fingerprints>) -> Result<(u64, String)> {
    let meta = std::fs::metadata(path).map_err(io(path))?;
    let mtime_ns = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or_else(String::new, |d| d.as_nanos().to_string());
    let key = std::fs::canonicalize(path)
        .unwrap_or_else(|_| path.to_path_buf())
        .to_string_lossy()
        .into_owned();
    if let Some(m) = &memo
        && let Some(f) = m.files.get(&key)
        && f.len == meta.len()
        && f.mtime_ns == mtime_ns
        && !mtime_ns.is_empty()
    {
        return Ok((f.len, f.sha256.clone()));
    }
    let mut f = crate::confined::open_read(path).map_err(io(path))?;
    let mut buf = vec![0u8; 1 << 20];
    let mut len = 0u64;
    let mut content = Sha256::new();
    loop {
        let n = f.read(&mut buf).map_err(io(path))?;
        if n == 0 {
            break;
        }
        content.update(&buf[..n]);
        len += n as u64;
    }
    let sha256 = hex(&content.finalize());
    if let Some(m) = memo {
        m.files.insert(
            key,
            Fingerprint {
                len,
                mtime_ns,
                sha256: sha256.clone(),
            },
        );
        m.changed = true;
    }
    Ok((len, sha256))
}

fn hash_file(h: &mut Sha256, path: &Path, memo: &mut Option<Fingerprints>) -> Result<()> {
    let (len, sha256) = digest_file(path, memo.as_mut())?;
    h.update(len.to_le_bytes());
    h.update(sha256.as_bytes());
    Ok(())
}

/// The namespace of a reference model: SHA-256 (hex) over the format version,
/// `dtype`, every `*.safetensors` file of `reference_dir` (sorted by name; name,
/// length and content digest), and the tokenizer files of `tokenizer_dir` that
/// exist. With `memo_root`, file digests are remembered there by (path, length,
/// mtime) so unchanged weights are not read again.
pub fn namespace(
    reference_dir: &Path,
    tokenizer_dir: &Path,
    dtype: &str,
    memo_root: Option<&Path>,
) -> Result<String> {
    let mut memo = memo_root.map(Fingerprints::load);
    let mut h = Sha256::new();
    h.update(VERSION.as_bytes());
    h.update([0]);
    h.update(dtype.as_bytes());
    h.update([0]);
    let mut weights: Vec<PathBuf> = std::fs::read_dir(reference_dir)
        .map_err(io(reference_dir))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.extension()
                .is_some_and(|e| e == "safetensors" || e == "bin")
        })
        .collect();
    weights.sort();
    if weights.is_empty() {
        return Err(Error::File {
            path: reference_dir.to_path_buf(),
            reason: "no *.safetensors or *.bin weights to key the reference cache by".into(),
        });
    }
    for w in &weights {
        h.update(w.file_name().map(|n| n.as_encoded_bytes()).unwrap_or(&[]));
        h.update([0]);
        hash_file(&mut h, w, &mut memo)?;
    }
    for name in crate::tokenizer::layout::FILES {
        let p = tokenizer_dir.join(name);
        h.update(name.as_bytes());
        if p.exists() {
            hash_file(&mut h, &p, &mut memo)?;
        } else {
            h.update(b"absent");
        }
    }
    if let (Some(m), Some(root)) = (&memo, memo_root) {
        m.save(root)?;
    }
    Ok(hex(&h.finalize()))
}

/// The namespace of a run: its reference weights (the initial policy's for
/// `"same"`), the model's tokenizer, and the compute dtype.
/// `memo_root`: where file digests are remembered (see [`namespace`]).
pub fn namespace_of(spec: &RunSpec, memo_root: Option<&Path>) -> Result<String> {
    let reference_dir = spec.reference.path.weights(&spec.model.path);
    namespace(
        reference_dir,
        &spec.model.path,
        spec.model.dtype.as_str(),
        memo_root,
    )
}

/// Whether a run scores a reference model once before training (and so uses the
/// cache): `reference.precompute`, a pairwise loss, and a reference at all.
pub fn precomputes(spec: &RunSpec) -> bool {
    spec.reference.precompute
        && spec.objective.loss.is_pairwise()
        && spec.reference.path != ReferenceModel::None
}

/// The key of a (prompt, response) sequence.
pub fn key(prompt: &[u32], response: &[u32]) -> Key {
    let mut h = Sha256::new();
    for part in [prompt, response] {
        h.update((part.len() as u64).to_le_bytes());
        for t in part {
            h.update(t.to_le_bytes());
        }
    }
    let digest = h.finalize();
    let mut k = [0u8; KEY_BYTES];
    k.copy_from_slice(&digest[..KEY_BYTES]);
    k
}

/// The keys of an example's chosen and first rejected response (`None` when it
/// is not a pair).
pub fn pair_keys(e: &Example) -> Option<[Key; 2]> {
    Some([
        key(&e.prompt, e.chosen.as_deref()?),
        key(&e.prompt, e.rejected.first()?),
    ])
}

/// One namespace of the cache, loaded in memory, with a segment to append to.
#[derive(Debug)]
pub struct RefCache {
    dir: PathBuf,
    sums: HashMap<Key, f32>,
    segment: Option<(PathBuf, File)>,
}

impl RefCache {
    /// Opens (creating) `root/namespace` and loads every record in it.
    pub fn open(root: &Path, namespace: &str) -> Result<Self> {
        if namespace.is_empty() || !namespace.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(Error::Invalid {
                context: "reference cache".into(),
                reason: format!("namespace {namespace:?} is not a hex digest"),
            });
        }
        let dir = root.join(namespace);
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        let mut sums = HashMap::new();
        let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
            .map_err(io(&dir))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "seg"))
            .collect();
        files.sort();
        for path in files {
            let bytes = std::fs::read(&path).map_err(io(&path))?;
            let whole = bytes.len() / RECORD * RECORD;
            if whole != bytes.len() {
                tracing::warn!(
                    path = %path.display(),
                    torn_bytes = bytes.len() - whole,
                    "reference cache: ignoring a torn trailing record"
                );
            }
            for rec in bytes[..whole].chunks_exact(RECORD) {
                let mut k = [0u8; KEY_BYTES];
                k.copy_from_slice(&rec[..KEY_BYTES]);
                let mut v = [0u8; 4];
                v.copy_from_slice(&rec[KEY_BYTES..]);
                let v = f32::from_le_bytes(v);
                if v.is_finite() {
                    sums.insert(k, v);
                }
            }
        }
        Ok(RefCache {
            dir,
            sums,
            segment: None,
        })
    }

    /// The directory of this namespace.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn len(&self) -> usize {
        self.sums.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sums.is_empty()
    }

    pub fn get(&self, key: &Key) -> Option<f32> {
        self.sums.get(key).copied()
    }

    pub fn contains(&self, key: &Key) -> bool {
        self.sums.contains_key(key)
    }

    /// Adds records (new keys only; a non-finite sum is refused) and makes them
    /// durable before returning.
    pub fn insert(&mut self, records: &[(Key, f32)]) -> Result<usize> {
        let mut buf = Vec::with_capacity(records.len() * RECORD);
        let mut added = 0;
        for (k, v) in records {
            if !v.is_finite() {
                return Err(Error::Invalid {
                    context: "reference cache".into(),
                    reason: format!("refusing a non-finite reference log-prob sum {v}"),
                });
            }
            if self.sums.insert(*k, *v).is_none() {
                buf.extend_from_slice(k);
                buf.extend_from_slice(&v.to_le_bytes());
                added += 1;
            }
        }
        if buf.is_empty() {
            return Ok(0);
        }
        if self.segment.is_none() {
            let name = format!(
                "{}-{}.seg",
                std::process::id(),
                uuid::Uuid::new_v4().simple()
            );
            let path = self.dir.join(name);
            let file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .map_err(io(&path))?;
            self.segment = Some((path, file));
        }
        if let Some((path, file)) = &mut self.segment {
            file.write_all(&buf).map_err(io(path))?;
            file.sync_data().map_err(io(path))?;
        }
        Ok(added)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_separate_prompt_from_response() {
        assert_ne!(key(&[1, 2], &[3]), key(&[1], &[2, 3]));
        assert_eq!(key(&[1, 2], &[3]), key(&[1, 2], &[3]));
        assert_ne!(key(&[], &[1]), key(&[1], &[]));
    }

    #[test]
    fn records_survive_reopening_and_a_torn_tail_is_ignored() {
        let root = tempfile::tempdir().expect("tmp");
        let ns = "ab".repeat(32);
        let mut c = RefCache::open(root.path(), &ns).expect("open");
        assert!(c.is_empty());
        let (a, b) = (key(&[1], &[2]), key(&[1], &[3]));
        assert_eq!(c.insert(&[(a, -1.5), (b, -2.25)]).expect("insert"), 2);
        assert_eq!(
            c.insert(&[(a, -9.0)]).expect("again"),
            0,
            "first value wins"
        );
        assert!(c.insert(&[(key(&[4], &[4]), f32::NAN)]).is_err());
        let seg = c.segment.as_ref().map(|(p, _)| p.clone()).expect("segment");
        drop(c);
        // A crash mid-append leaves a partial record.
        let mut f = OpenOptions::new().append(true).open(&seg).expect("seg");
        f.write_all(&[7u8; 9]).expect("torn");
        drop(f);
        let c = RefCache::open(root.path(), &ns).expect("reopen");
        assert_eq!(
            (c.len(), c.get(&a), c.get(&b)),
            (2, Some(-1.5), Some(-2.25))
        );
        // Another namespace sees nothing.
        let other = RefCache::open(root.path(), &"cd".repeat(32)).expect("other");
        assert!(other.is_empty());
        assert!(RefCache::open(root.path(), "../x").is_err());
    }

    #[test]
    fn the_namespace_follows_weights_tokenizer_and_dtype() {
        let d = tempfile::tempdir().expect("tmp");
        let p = d.path();
        std::fs::write(p.join("model.safetensors"), b"weights").expect("w");
        std::fs::write(p.join("tokenizer.json"), b"{}").expect("t");
        let base = namespace(p, p, "f32", None).expect("ns");
        assert_eq!(base, namespace(p, p, "f32", None).expect("ns"));
        assert_ne!(base, namespace(p, p, "bf16", None).expect("ns"));
        std::fs::write(p.join("tokenizer.json"), b"{ }").expect("t");
        let tok = namespace(p, p, "f32", None).expect("ns");
        assert_ne!(base, tok);
        std::fs::write(p.join("model.safetensors"), b"weightz").expect("w");
        assert_ne!(tok, namespace(p, p, "f32", None).expect("ns"));
        let empty = tempfile::tempdir().expect("tmp");
        assert!(namespace(empty.path(), p, "f32", None).is_err());
    }

    #[test]
    fn unchanged_weights_are_not_hashed_again() {
        let d = tempfile::tempdir().expect("tmp");
        let root = tempfile::tempdir().expect("root");
        let p = d.path();
        let w = p.join("model.safetensors");
        std::fs::write(&w, b"weights-1").expect("w");
        let first = namespace(p, p, "f32", Some(root.path())).expect("ns");
        assert_eq!(
            first,
            namespace(p, p, "f32", None).expect("ns"),
            "the memo changes no name"
        );
        assert!(root.path().join("fingerprints.json").exists());
        // Same length, same mtime: the remembered digest is used (the content is
        // not read — shown by changing it behind the memo's back).
        let mtime = std::fs::metadata(&w)
            .and_then(|m| m.modified())
            .expect("mtime");
        std::fs::write(&w, b"weights-2").expect("w");
        let f = OpenOptions::new().write(true).open(&w).expect("open");
        f.set_modified(mtime).expect("set mtime");
        drop(f);
        assert_eq!(
            namespace(p, p, "f32", Some(root.path())).expect("ns"),
            first
        );
        // A new mtime: hashed again.
        let f = OpenOptions::new().write(true).open(&w).expect("open");
        f.set_modified(mtime + std::time::Duration::from_secs(5))
            .expect("set mtime");
        drop(f);
        let second = namespace(p, p, "f32", Some(root.path())).expect("ns");
        assert_ne!(second, first);
        assert_eq!(second, namespace(p, p, "f32", None).expect("ns"));
        // A corrupt memo is ignored.
        std::fs::write(root.path().join("fingerprints.json"), b"{not json").expect("w");
        assert_eq!(
            namespace(p, p, "f32", Some(root.path())).expect("ns"),
            second
        );
    }
}
