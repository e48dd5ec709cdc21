//! Which paths a client may name in a run spec. The coordinator (and the
//! workers after it) open the model, the reference, the datasets, the output
//! and the cache with their own permissions, so a path from a client is only
//! used once it is known to lie under a directory the operator allowed
//! (`--allow-path`, and the data dir), outside the coordinator's own files.
//!
//! A path is first checked as written (absolute, `.` and `..` removed): one
//! outside every allowed directory is refused without touching the file
//! system, so the answer says nothing about whether it exists. Inside, symlinks
//! are resolved and the result checked again; the spec then carries the
//! resolved path, so a link swapped later does not move the run elsewhere.

use std::path::{Path, PathBuf};

use dpo_proto::RunSpec;
use dpo_proto::spec::{Negatives, ReferenceCache, ReferenceModel, normalize};

/// What the run does with a path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Use {
    /// A dataset: a regular file, read.
    ReadFile,
    /// A dataset: a regular file, a folder of files, or a glob in its last
    /// component (`…/data/train-*.parquet`), read.
    ReadData,
    /// A model directory, read.
    ReadDir,
    /// A directory written (created when missing).
    WriteDir,
}

/// The directories clients may name, and the coordinator's own entries within
/// them that they may not.
#[derive(Debug, Clone, Default)]
pub struct Confinement {
    /// Each allowed directory as given (normalised) and as resolved.
    roots: Vec<(PathBuf, PathBuf)>,
    /// Resolved paths no client may name (the coordinator's state, other
    /// runs' uploads and shards, its reference cache).
    reserved: Vec<PathBuf>,
}

/// The entries of the data dir that are the coordinator's own.
pub const RESERVED: &[&str] = &[
    "runs",
    "reference",
    "store.json",
    "store.log",
    "store.reserve",
];

impl Confinement {
    /// `allow` (each must be an existing directory) plus `data_dir`, with the
    /// data dir's [`RESERVED`] entries kept out.
    pub fn new(allow: &[PathBuf], data_dir: &Path) -> std::io::Result<Self> {
        let mut roots = Vec::new();
        for dir in allow.iter().map(PathBuf::as_path).chain([data_dir]) {
            let given = normalize(&std::path::absolute(dir)?);
            let resolved = dir
                .canonicalize()
                .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", dir.display())))?;
            if !resolved.is_dir() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!("{}: not a directory", dir.display()),
                ));
            }
            roots.push((given, resolved));
        }
        let data = data_dir.canonicalize()?;
        let reserved = RESERVED.iter().map(|r| data.join(r)).collect();
        Ok(Confinement { roots, reserved })
    }

    /// The resolved allowed directories (for the log).
    pub fn roots(&self) -> impl Iterator<Item = &Path> {
        self.roots.iter().map(|(_, r)| r.as_path())
    }

    /// `path` resolved, if a client may use it for `what`; else why not.
    pub fn resolve(&self, path: &Path, what: Use) -> Result<PathBuf, PathRefused> {
        if what == Use::ReadData
            && !path.exists()
            && path.to_string_lossy().contains(['*', '?', '['])
        {
            let parent = path.parent().unwrap_or(Path::new("/"));
            let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
            return match name {
                Some(name) if !parent.to_string_lossy().contains(['*', '?', '[']) => {
                    Ok(self.resolve(parent, Use::ReadDir)?.join(name))
                }
                _ => Err(PathRefused::GlobInFolder(path.to_path_buf())),
            };
        }
        let denied = || PathRefused::NotAllowed(path.to_path_buf());
        if !path.is_absolute() {
            return Err(PathRefused::Relative(path.to_path_buf()));
        }
        let written = normalize(path);
        if !self
            .roots
            .iter()
            .any(|(given, resolved)| written.starts_with(given) || written.starts_with(resolved))
        {
            return Err(denied());
        }
        let resolved = resolve_existing(&written).ok_or_else(denied)?;
        let inside = self.roots.iter().any(|(_, r)| resolved.starts_with(r));
        if !inside || self.reserved.iter().any(|r| resolved.starts_with(r)) {
            return Err(denied());
        }
        let meta = std::fs::metadata(&resolved);
        let not = |expected: &'static str| PathRefused::NotA {
            path: path.to_path_buf(),
            expected,
        };
        match (what, meta) {
            (Use::ReadFile, Ok(m)) if m.is_file() => Ok(resolved),
            (Use::ReadFile, Ok(_)) => Err(not("regular file")),
            (Use::ReadData, Ok(m)) if m.is_file() || m.is_dir() => Ok(resolved),
            (Use::ReadData, Ok(_)) => Err(not("regular file or a folder")),
            (Use::ReadDir, Ok(m)) if m.is_dir() => Ok(resolved),
            (Use::ReadDir, Ok(_)) => Err(not("directory")),
            (Use::WriteDir, Ok(m)) if m.is_dir() => Ok(resolved),
            (Use::WriteDir, Ok(_)) => Err(not("directory")),
            (Use::WriteDir, Err(e)) if e.kind() == std::io::ErrorKind::NotFound => Ok(resolved),
            (_, Err(e)) if e.kind() == std::io::ErrorKind::NotFound => {
                Err(PathRefused::Missing(path.to_path_buf()))
            }
            (_, Err(e)) => Err(PathRefused::Unreadable {
                path: path.to_path_buf(),
                reason: e.to_string(),
            }),
        }
    }

    /// Checks every path of `spec` a client named and replaces each by its
    /// resolved form; `streamed` keys hold the coordinator's own copies of
    /// uploaded files and are left alone. The error names the key.
    pub fn confine(&self, spec: &mut RunSpec, streamed: &[String]) -> Result<(), KeyRefused> {
        let named = |key: &str| !streamed.iter().any(|s| s == key);
        let spec_format = spec.data.file_format;
        let check = |key: &'static str, p: &mut PathBuf, what: Use| -> Result<(), KeyRefused> {
            let refused = |refused: PathRefused| KeyRefused { key, refused };
            *p = self.resolve(p, what).map_err(refused)?;
            if what == Use::ReadData {
                // Each file of a folder or glob: a link inside must not lead out.
                let files = dpo_data::records::files(p, spec_format).map_err(|e| {
                    refused(PathRefused::Unreadable {
                        path: p.clone(),
                        reason: e.to_string(),
                    })
                })?;
                for (file, _) in files {
                    self.resolve(&file, Use::ReadFile).map_err(refused)?;
                }
            }
            Ok(())
        };
        // A model folder's files may be links within its Hugging Face cache
        // repository (the readers follow them no further): that is read too.
        let model = |key: &'static str, p: &mut PathBuf| -> Result<(), KeyRefused> {
            check(key, p, Use::ReadDir)?;
            let root = dpo_data::confined::link_root(p).to_path_buf();
            if root != *p {
                self.resolve(&root, Use::ReadDir)
                    .map_err(|refused| KeyRefused { key, refused })?;
            }
            Ok(())
        };
        model("model.path", &mut spec.model.path)?;
        if let ReferenceModel::Dir(d) = &mut spec.reference.path {
            model("reference.path", d)?;
        }
        if let ReferenceCache::Dir(d) = &mut spec.reference.cache {
            check("reference.cache", d, Use::WriteDir)?;
        }
        if named("data.train") {
            check("data.train", &mut spec.data.train, Use::ReadData)?;
        }
        if named("data.eval")
            && let Some(p) = spec.data.eval.as_mut()
        {
            check("data.eval", p, Use::ReadData)?;
        }
        if named("data.negatives")
            && let Some(Negatives::File(p)) = spec.data.negatives.as_mut()
        {
            check("data.negatives", p, Use::ReadData)?;
        }
        check("train.output", &mut spec.train.output, Use::WriteDir)?;
        Ok(())
    }
}

/// Why a client may not use a path (each message starts with the path).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathRefused {
    #[error("{}: a glob may only be in the file name, not in its folders", .0.display())]
    GlobInFolder(PathBuf),
    /// Outside every allowed root, a reserved folder, or a link that leads
    /// there; the same answer whether or not it exists.
    #[error("{}: not under a directory this coordinator allows (see its --allow-path)", .0.display())]
    NotAllowed(PathBuf),
    #[error(
        "{}: must be an absolute path as the coordinator sees it \
         (dpoctl resolves relative paths against the spec file's directory)",
        .0.display()
    )]
    Relative(PathBuf),
    #[error("{}: not a {expected}", path.display())]
    NotA {
        path: PathBuf,
        expected: &'static str,
    },
    #[error("{}: no such file or directory", .0.display())]
    Missing(PathBuf),
    #[error("{}: {reason}", path.display())]
    Unreadable { path: PathBuf, reason: String },
}

/// A path of a run spec refused, with the spec key that named it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {refused}")]
pub struct KeyRefused {
    pub key: &'static str,
    pub refused: PathRefused,
}

/// `path` with every symlink resolved: the path itself when it exists, else
/// its nearest existing ancestor resolved plus the missing rest. `None` when
/// the first missing component is itself an entry (a dangling link, something
/// unreadable): where it leads cannot be checked.
fn resolve_existing(path: &Path) -> Option<PathBuf> {
    if let Ok(p) = path.canonicalize() {
        return Some(p);
    }
    let mut rest = Vec::new();
    let mut at = path;
    loop {
        let name = at.file_name()?;
        rest.push(name.to_os_string());
        at = at.parent()?;
        if let Ok(base) = at.canonicalize() {
            let first = base.join(rest.last()?);
            if std::fs::symlink_metadata(&first).is_ok() {
                return None;
            }
            let mut out = base;
            out.extend(rest.iter().rev());
            return Some(out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixture {
        _tmp: tempfile::TempDir,
        allowed: PathBuf,
        data: PathBuf,
        outside: PathBuf,
        c: Confinement,
    }

    fn fixture() -> std::io::Result<Fixture> {
        let tmp = tempfile::tempdir()?;
        let root = tmp.path().canonicalize()?;
        let (allowed, data, outside) =
            (root.join("shared"), root.join("data"), root.join("secret"));
        for d in [&allowed, &data, &outside, &data.join("runs/other/files")] {
            std::fs::create_dir_all(d)?;
        }
        std::fs::write(allowed.join("train.jsonl"), "{}\n")?;
        std::fs::write(outside.join("shadow"), "root:x\n")?;
        std::fs::write(data.join("runs/other/files/data_train.jsonl"), "{}\n")?;
        std::fs::write(data.join("store.json"), "{}")?;
        let c = Confinement::new(std::slice::from_ref(&allowed), &data)?;
        Ok(Fixture {
            _tmp: tmp,
            allowed,
            data,
            outside,
            c,
        })
    }

    #[test]
    fn allowed_paths_resolve_and_everything_else_is_refused_alike() -> std::io::Result<()> {
        let f = fixture()?;
        let train = f.allowed.join("train.jsonl");
        assert_eq!(f.c.resolve(&train, Use::ReadFile), Ok(train.clone()));
        // `..` out of an allowed directory, a file outside, a missing one
        // outside: one answer, that says nothing of existence.
        let escapes = [
            f.allowed.join("../secret/shadow"),
            f.outside.join("shadow"),
            f.outside.join("no-such-file"),
            PathBuf::from("/etc/shadow"),
            PathBuf::from("/etc/no-such-file"),
        ];
        for p in &escapes {
            let e =
                f.c.resolve(p, Use::ReadFile)
                    .expect_err("refused")
                    .to_string();
            assert_eq!(
                e,
                format!(
                    "{}: not under a directory this coordinator allows (see its --allow-path)",
                    p.display()
                )
            );
        }
        // Relative paths mean nothing to a server.
        let e =
            f.c.resolve(Path::new("../../x"), Use::WriteDir)
                .expect_err("refused")
                .to_string();
        assert!(e.contains("must be an absolute path"), "{e}");
        // The coordinator's own files, another run's upload: refused.
        for p in [
            f.data.join("store.json"),
            f.data.join("runs/other/files/data_train.jsonl"),
            f.data.join("runs/new-output"),
        ] {
            assert!(f.c.resolve(&p, Use::ReadFile).is_err(), "{}", p.display());
            assert!(f.c.resolve(&p, Use::WriteDir).is_err(), "{}", p.display());
        }
        // The rest of the data dir is allowed (the default root).
        assert!(f.c.resolve(&f.data.join("out/a"), Use::WriteDir).is_ok());
        Ok(())
    }

    #[test]
    fn symlinks_are_followed_before_the_check() -> std::io::Result<()> {
        let f = fixture()?;
        let link = f.allowed.join("innocent.jsonl");
        std::os::unix::fs::symlink(f.outside.join("shadow"), &link)?;
        assert!(
            f.c.resolve(&link, Use::ReadFile)
                .expect_err("refused")
                .to_string()
                .contains("allows")
        );
        let dir_link = f.allowed.join("out");
        std::os::unix::fs::symlink(&f.outside, &dir_link)?;
        assert!(
            f.c.resolve(&dir_link.join("new/run"), Use::WriteDir)
                .is_err()
        );
        // A dangling link cannot be checked: refused like an outside path.
        let dangling = f.allowed.join("dangling");
        std::os::unix::fs::symlink(f.outside.join("missing"), &dangling)?;
        assert!(
            f.c.resolve(&dangling, Use::WriteDir)
                .expect_err("refused")
                .to_string()
                .contains("allows")
        );
        // A link that stays inside is fine, and the spec gets its target.
        let inner = f.allowed.join("alias.jsonl");
        std::os::unix::fs::symlink(f.allowed.join("train.jsonl"), &inner)?;
        assert_eq!(
            f.c.resolve(&inner, Use::ReadFile),
            Ok(f.allowed.join("train.jsonl"))
        );
        Ok(())
    }

    #[test]
    fn datasets_may_be_folders_or_globs_whose_files_stay_inside() -> std::io::Result<()> {
        let f = fixture()?;
        let shards = f.allowed.join("hub");
        std::fs::create_dir_all(&shards)?;
        std::fs::write(shards.join("train-00000-of-00001.jsonl"), "{}\n")?;
        assert_eq!(f.c.resolve(&shards, Use::ReadData), Ok(shards.clone()));
        let glob = shards.join("train-*.jsonl");
        assert_eq!(f.c.resolve(&glob, Use::ReadData), Ok(glob.clone()));
        let e =
            f.c.resolve(&f.allowed.join("h*/train.jsonl"), Use::ReadData);
        assert!(
            e.expect_err("glob in a folder")
                .to_string()
                .contains("only be in the file name")
        );
        let e = f.c.resolve(&f.outside.join("*.jsonl"), Use::ReadData);
        assert!(
            e.expect_err("outside")
                .to_string()
                .contains("not under a directory")
        );
        // A shard that is a link to a file outside is refused by confine.
        std::fs::write(f.outside.join("secret.jsonl"), "{}\n")?;
        std::os::unix::fs::symlink(
            f.outside.join("secret.jsonl"),
            shards.join("train-00001-of-00002.jsonl"),
        )?;
        let toml = f.allowed.join("spec.toml");
        std::fs::write(
            &toml,
            format!(
                "name = \"x\"\n[model]\npath = \"{}\"\n[data]\ntrain = \"{}\"\n[train]\noutput = \"{}\"\n",
                f.allowed.display(),
                glob.display(),
                f.allowed.join("out").display()
            ),
        )?;
        let mut spec = RunSpec::from_file(&toml).expect("spec");
        let e =
            f.c.confine(&mut spec, &[])
                .expect_err("link out")
                .to_string();
        assert!(
            e.starts_with("data.train: ") && e.contains("train-00001-of-00002.jsonl: not under"),
            "{e}"
        );
        Ok(())
    }

    #[test]
    fn a_cache_snapshot_is_a_model_only_where_its_repository_is_allowed() -> std::io::Result<()> {
        let f = fixture()?;
        // The operator allowed one snapshot folder; its files link into the
        // repository's blobs/, above it.
        let repo = f.outside.join("hub/models--org--m");
        let snapshot = repo.join("snapshots/abc");
        std::fs::create_dir_all(repo.join("blobs"))?;
        std::fs::create_dir_all(&snapshot)?;
        let toml = f.allowed.join("spec.toml");
        let spec_text = |model: &Path| {
            format!(
                "name = \"x\"\n[model]\npath = \"{}\"\n[data]\ntrain = \"{}\"\n[train]\noutput = \"{}\"\n",
                model.display(),
                f.allowed.join("train.jsonl").display(),
                f.allowed.join("out").display()
            )
        };
        std::fs::write(&toml, spec_text(&snapshot))?;
        let c = Confinement::new(&[f.allowed.clone(), snapshot.clone()], &f.data)?;
        let mut spec = RunSpec::from_file(&toml).expect("spec");
        let e = c
            .confine(&mut spec, &[])
            .expect_err("repository outside")
            .to_string();
        assert!(
            e.starts_with("model.path: ") && e.contains("models--org--m: not under"),
            "{e}"
        );
        // Allowed with its repository: accepted.
        let c = Confinement::new(&[f.allowed.clone(), repo.clone()], &f.data)?;
        let mut spec = RunSpec::from_file(&toml).expect("spec");
        c.confine(&mut spec, &[])
            .expect("the repository is allowed");
        assert_eq!(spec.model.path, snapshot.canonicalize()?);
        Ok(())
    }

    #[test]
    fn only_regular_files_are_read() -> std::io::Result<()> {
        let f = fixture()?;
        let e =
            f.c.resolve(&f.allowed, Use::ReadFile)
                .expect_err("refused")
                .to_string();
        assert!(e.ends_with("not a regular file"), "{e}");
        let c = Confinement::new(&[PathBuf::from("/dev")], &f.data)?;
        let e = c
            .resolve(Path::new("/dev/zero"), Use::ReadFile)
            .expect_err("refused")
            .to_string();
        assert!(e.ends_with("not a regular file"), "{e}");
        let e =
            f.c.resolve(&f.allowed.join("missing.jsonl"), Use::ReadFile)
                .expect_err("refused")
                .to_string();
        assert!(e.ends_with("no such file or directory"), "{e}");
        let e =
            f.c.resolve(&f.allowed.join("train.jsonl"), Use::WriteDir)
                .expect_err("refused")
                .to_string();
        assert!(e.ends_with("not a directory"), "{e}");
        Ok(())
    }
}
