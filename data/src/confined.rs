//! Where a process writes into a folder that was checked once (a run's output,
//! resolved and confined by the coordinator at submit), nothing may lead the
//! write elsewhere later — a part of the path replaced by a symbolic link to
//! another owner's files or outside the allowed directories: a [`Dir`] is a
//! folder opened by walking its path without following links and held, so
//! everything done through it happens in that folder; [`open_beneath`] opens
//! one file that way.
//!
//! Files a run reads (its model, tokenizer and datasets) are opened by
//! [`open_read`]: their folders walked the same way, and the file's own name
//! followed through links only while they stay inside its folder — or inside
//! the Hugging Face cache repository holding it, whose `snapshots/<rev>/`
//! files are links to `../../blobs/<sha>`. A link swapped in after submit, an
//! absolute link, or one that climbs out is refused by name.

use std::path::Path;

/// How a file beneath a [`Dir`] is opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Read,
    /// Append, creating the file when missing.
    Append,
    /// Write from the start, creating the file or emptying it.
    Create,
    /// Write a new file; one already there is an error.
    CreateNew,
}

/// A folder opened by walking its absolute, resolved path one component at a
/// time from `/`, each relative to the folder before it and none through a
/// symbolic link. Everything done through it (opening, creating, replacing,
/// renaming files and folders within it) happens in that folder, whatever the
/// path names later: nothing can be swapped in between.
#[derive(Debug)]
pub struct Dir {
    fd: rustix::fd::OwnedFd,
    path: std::path::PathBuf,
}

fn refused(path: &Path, why: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::other(format!("{}: {why}", path.display()))
}

/// `e` with `path` in its message and its kind kept (a missing file stays
/// `NotFound`).
fn failed(path: &Path, e: rustix::io::Errno) -> std::io::Error {
    let e = std::io::Error::from(e);
    std::io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}

/// `name` as one plain component (no `/`, `.` or `..`).
fn plain(dir: &Path, name: &str) -> std::io::Result<()> {
    if name.is_empty() || name == "." || name == ".." || name.contains('/') {
        return Err(refused(
            &dir.join(name),
            "not a plain name within its folder",
        ));
    }
    Ok(())
}

impl Dir {
    /// Opens the folder at `path` (absolute and resolved); with `create`,
    /// missing folders on the way are made (mode 0755).
    pub fn open(path: &Path, create: bool) -> std::io::Result<Dir> {
        use rustix::fs::{CWD, Mode, OFlags, openat};
        use std::path::Component;
        if !path.is_absolute() {
            return Err(refused(path, "not an absolute folder"));
        }
        let walk = OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let mut at = openat(CWD, "/", walk, Mode::empty())?;
        for part in path.components() {
            match part {
                Component::RootDir => {}
                Component::Normal(p) => {
                    if create {
                        match rustix::fs::mkdirat(&at, p, Mode::from_raw_mode(0o755)) {
                            Ok(()) => {}
                            Err(rustix::io::Errno::EXIST) => {}
                            Err(e) => return Err(refused(path, format!("cannot be made ({e})"))),
                        }
                    }
                    at = openat(&at, p, walk, Mode::empty()).map_err(|e| match e {
                        rustix::io::Errno::NOENT => failed(path, e),
                        e => refused(
                            path,
                            format!(
                                "{} cannot be entered without following a symbolic link ({e})",
                                p.to_string_lossy()
                            ),
                        ),
                    })?;
                }
                _ => return Err(refused(path, "the folder is not in its resolved form")),
            }
        }
        // The folder itself, readable, so it can be listed and fsynced.
        let fd = openat(
            &at,
            ".",
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        Ok(Dir {
            fd,
            path: path.to_path_buf(),
        })
    }

    /// The path it was opened by (for messages).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The folder `name` within this one, made first with `create`.
    pub fn sub(&self, name: &str, create: bool) -> std::io::Result<Dir> {
        use rustix::fs::{Mode, OFlags, openat};
        plain(&self.path, name)?;
        let path = self.path.join(name);
        if create {
            match rustix::fs::mkdirat(&self.fd, name, Mode::from_raw_mode(0o755)) {
                Ok(()) | Err(rustix::io::Errno::EXIST) => {}
                Err(e) => return Err(refused(&path, format!("cannot be made ({e})"))),
            }
        }
        let fd = openat(
            &self.fd,
            name,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| match e {
            rustix::io::Errno::NOENT => failed(&path, e),
            e => refused(
                &path,
                format!("cannot be entered without following a symbolic link ({e})"),
            ),
        })?;
        Ok(Dir { fd, path })
    }

    /// Opens the regular file `name` in this folder, never through a link.
    pub fn file(&self, name: &str, access: Access) -> std::io::Result<std::fs::File> {
        use rustix::fs::{Mode, OFlags, openat};
        plain(&self.path, name)?;
        let flags = match access {
            Access::Read => OFlags::RDONLY,
            Access::Append => OFlags::WRONLY | OFlags::APPEND | OFlags::CREATE,
            Access::Create => OFlags::WRONLY | OFlags::TRUNC | OFlags::CREATE,
            Access::CreateNew => OFlags::WRONLY | OFlags::APPEND | OFlags::CREATE | OFlags::EXCL,
        } | OFlags::NOFOLLOW
            | OFlags::NONBLOCK
            | OFlags::CLOEXEC;
        let fd = openat(&self.fd, name, flags, Mode::from_raw_mode(0o644))
            .map_err(|e| failed(&self.path.join(name), e))?;
        let file = std::fs::File::from(fd);
        if !file.metadata()?.is_file() {
            return Err(refused(&self.path.join(name), "not a regular file"));
        }
        Ok(file)
    }

    /// Replaces the file `name` in this folder with what `fill` writes: a new
    /// temporary file beside it (created exclusively, so nothing planted under
    /// its name is written through), fsynced, renamed over `name`, the folder
    /// fsynced. A link at `name` is replaced, not followed.
    pub fn replace(
        &self,
        name: &str,
        fill: impl FnOnce(&mut std::fs::File) -> std::io::Result<()>,
    ) -> std::io::Result<()> {
        use rustix::fs::{Mode, OFlags, openat};
        plain(&self.path, name)?;
        let tmp = crate::atomic::temp_file_name(name);
        let fd = openat(
            &self.fd,
            tmp.as_str(),
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o644),
        )?;
        let mut file = std::fs::File::from(fd);
        let written = fill(&mut file).and_then(|()| file.sync_all());
        drop(file);
        let renamed = written.and_then(|()| {
            rustix::fs::renameat(&self.fd, tmp.as_str(), &self.fd, name)?;
            self.sync()
        });
        if renamed.is_err() {
            let _ = rustix::fs::unlinkat(&self.fd, tmp.as_str(), rustix::fs::AtFlags::empty());
        }
        renamed
    }

    /// Renames `from` to `to`, both in this folder, and fsyncs the folder.
    pub fn rename(&self, from: &str, to: &str) -> std::io::Result<()> {
        plain(&self.path, from)?;
        plain(&self.path, to)?;
        rustix::fs::renameat(&self.fd, from, &self.fd, to)?;
        self.sync()
    }

    /// The text of the regular file `name` in this folder (`None`: there is
    /// none), refused past `max` bytes.
    pub fn read_text(&self, name: &str, max: u64) -> std::io::Result<Option<String>> {
        use std::io::Read;
        let file = match self.file(name, Access::Read) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let mut text = String::new();
        file.take(max + 1).read_to_string(&mut text)?;
        if text.len() as u64 > max {
            return Err(refused(
                &self.path.join(name),
                format!("longer than {max} bytes"),
            ));
        }
        Ok(Some(text))
    }

    /// Flushes the folder's entries to disk.
    pub fn sync(&self) -> std::io::Result<()> {
        rustix::fs::fsync(&self.fd)?;
        Ok(())
    }

    /// A path that names this very folder for as long as the handle lives
    /// (`/proc/self/fd/N`), for code that takes paths: what it opens below it
    /// is found from this folder, not by its name.
    pub fn pinned(&self) -> std::path::PathBuf {
        use rustix::fd::AsRawFd;
        std::path::PathBuf::from(format!("/proc/self/fd/{}", self.fd.as_raw_fd()))
    }
}

/// Opens the file at `path` (absolute, in a resolved folder) through a
/// [`Dir`]: its folder walked from `/` through no link, the file itself opened
/// without following one; it must be a regular file.
pub fn open_beneath(path: &Path, access: Access) -> std::io::Result<std::fs::File> {
    use std::path::Component;
    let (Some(dir), Some(Component::Normal(name))) = (path.parent(), path.components().next_back())
    else {
        return Err(refused(
            path,
            "not an absolute folder and a plain file name",
        ));
    };
    if !dir.is_absolute() {
        return Err(refused(
            path,
            "not an absolute folder and a plain file name",
        ));
    }
    let name = name
        .to_str()
        .ok_or_else(|| refused(path, "not a UTF-8 name"))?;
    Dir::open(dir, false)?.file(name, access)
}

/// How many links one [`open_read`] follows at most (as the kernel's
/// `ELOOP` bound).
const MAX_LINKS: usize = 40;

/// The folder links in `folder` may lead within: the Hugging Face cache
/// repository holding it (`…/models--org--name` above `…/snapshots/<rev>/…`,
/// beside its `blobs/`), else `folder` itself.
pub fn link_root(folder: &Path) -> &Path {
    folder
        .ancestors()
        .find(|a| {
            a.file_name().is_some_and(|n| n == "snapshots")
                && a.parent().is_some_and(|repo| repo.join("blobs").is_dir())
        })
        .and_then(Path::parent)
        .unwrap_or(folder)
}

/// Opens the regular file at `path` (absolute, in a resolved folder) for
/// reading: the folders down to its [`link_root`] are entered without
/// following a link; below it, links are followed only while they are
/// relative and stay beneath that root (at most 40 of them). A folder pinned
/// by this process (`/proc/self/fd/N`, see [`Dir::pinned`]) is a start of
/// its own.
pub fn open_read(path: &Path) -> std::io::Result<std::fs::File> {
    use std::path::Component;
    // A relative path (a person's, on a command line: clients' paths are
    // absolute) is taken from the working folder.
    let absolute;
    let path = if path.is_relative() {
        absolute = std::path::absolute(path)?;
        absolute.as_path()
    } else {
        path
    };
    let (Some(folder), Some(Component::Normal(_))) = (path.parent(), path.components().next_back())
    else {
        return Err(refused(path, "not an absolute folder and a file name"));
    };
    let (root, below) = match pinned_start(folder) {
        Some((fd, rest)) => (
            Dir {
                fd,
                path: folder.to_path_buf(),
            },
            rest.join(path.file_name().unwrap_or_default()),
        ),
        None => {
            let root = link_root(folder);
            let below = path
                .strip_prefix(root)
                .map_err(|_| refused(path, "not beneath its folder"))?
                .to_path_buf();
            (Dir::open(root, false)?, below)
        }
    };
    root.open_following(&below, path)
}

/// `path` with its links resolved, for paths a process trusts (its own
/// command line, a standalone run's spec): the path itself, or for one that
/// does not exist (a glob, a file to come) its folder's; as given when
/// neither resolves, for the reader to name.
pub fn resolved(path: &Path) -> std::path::PathBuf {
    if let Ok(p) = std::fs::canonicalize(path) {
        return p;
    }
    match (path.parent(), path.file_name()) {
        (Some(dir), Some(name)) => std::fs::canonicalize(if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        })
        .map(|d| d.join(name))
        .unwrap_or_else(|_| path.to_path_buf()),
        _ => path.to_path_buf(),
    }
}

/// `/proc/self/fd/N/rest` (a folder this process holds open): that folder
/// and `rest`.
fn pinned_start(folder: &Path) -> Option<(rustix::fd::OwnedFd, std::path::PathBuf)> {
    use rustix::fs::{CWD, Mode, OFlags, openat};
    let rest = folder.strip_prefix("/proc/self/fd").ok()?;
    let mut parts = rest.components();
    let fd = parts.next()?.as_os_str().to_str()?;
    if fd.is_empty() || !fd.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let held = openat(
        CWD,
        Path::new("/proc/self/fd").join(fd),
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .ok()?;
    Some((held, parts.as_path().to_path_buf()))
}

impl Dir {
    /// The regular file at `below` (relative) beneath this folder, read-only,
    /// following links only while they stay beneath it; `whole` names it in
    /// errors.
    fn open_following(&self, below: &Path, whole: &Path) -> std::io::Result<std::fs::File> {
        use rustix::fd::{AsFd, OwnedFd};
        use rustix::fs::{FileType, Mode, OFlags, fstat, openat, readlinkat};
        use std::collections::VecDeque;
        use std::os::unix::ffi::OsStrExt;
        use std::path::Component;
        let escape = |why: &str| {
            refused(
                whole,
                format!(
                    "{why}; a model or dataset may link only within its own folder (or its Hugging Face cache repository)"
                ),
            )
        };
        let mut todo: VecDeque<std::ffi::OsString> = VecDeque::new();
        for c in below.components() {
            match c {
                Component::Normal(n) => todo.push_back(n.to_os_string()),
                _ => return Err(refused(whole, "not a plain path below its folder")),
            }
        }
        // The folders entered below the root, innermost last.
        let mut entered: Vec<OwnedFd> = Vec::new();
        let mut links = 0usize;
        while let Some(name) = todo.pop_front() {
            let name = name.as_os_str();
            if name.is_empty() || name == "." {
                continue;
            }
            if name == ".." {
                if entered.pop().is_none() {
                    return Err(escape("a link leads above its folder"));
                }
                continue;
            }
            let at = entered.last().map_or(self.fd.as_fd(), |f| f.as_fd());
            let found = openat(
                at,
                name,
                OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .map_err(|e| failed(whole, e))?;
            let kind =
                FileType::from_raw_mode(fstat(&found).map_err(|e| failed(whole, e))?.st_mode);
            match kind {
                FileType::Symlink => {
                    links += 1;
                    if links > MAX_LINKS {
                        return Err(refused(whole, "too many levels of symbolic links"));
                    }
                    let target =
                        readlinkat(&found, "", Vec::new()).map_err(|e| failed(whole, e))?;
                    let target = Path::new(std::ffi::OsStr::from_bytes(target.as_bytes()));
                    if target.is_absolute() {
                        return Err(escape(&format!("an absolute link ({})", target.display())));
                    }
                    for c in target.components().rev() {
                        todo.push_front(c.as_os_str().to_os_string());
                    }
                }
                FileType::Directory if !todo.is_empty() => entered.push(found),
                FileType::RegularFile if todo.is_empty() => {
                    // The same entry, now readable; NONBLOCK so that one
                    // swapped for a FIFO meanwhile cannot hang the open.
                    let fd = openat(
                        at,
                        name,
                        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC,
                        Mode::empty(),
                    )
                    .map_err(|e| failed(whole, e))?;
                    let (a, b) = (fstat(&found), fstat(&fd));
                    let same = matches!((a, b), (Ok(a), Ok(b)) if a.st_dev == b.st_dev && a.st_ino == b.st_ino);
                    if !same {
                        return Err(refused(whole, "changed while it was opened"));
                    }
                    return Ok(std::fs::File::from(fd));
                }
                _ => return Err(refused(whole, "not a regular file")),
            }
        }
        Err(refused(whole, "not a regular file"))
    }
}

/// The bytes of the file at `path`, opened by [`open_read`].
pub fn read(path: &Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut bytes = Vec::new();
    open_read(path)?.read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// The text of the file at `path`, opened by [`open_read`].
pub fn read_to_string(path: &Path) -> std::io::Result<String> {
    use std::io::Read;
    let mut text = String::new();
    open_read(path)?.read_to_string(&mut text)?;
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_are_opened_beneath_their_folder_through_no_link() -> std::io::Result<()> {
        use std::io::{Read, Write};
        let dir = tempfile::tempdir()?;
        let root = dir.path().canonicalize()?;
        let out = root.join("out");
        std::fs::create_dir(&out)?;
        open_beneath(&out.join("m.jsonl"), Access::Append)?.write_all(b"a\n")?;
        open_beneath(&out.join("m.jsonl"), Access::Append)?.write_all(b"b\n")?;
        let mut text = String::new();
        open_beneath(&out.join("m.jsonl"), Access::Read)?.read_to_string(&mut text)?;
        assert_eq!(text, "a\nb\n");
        // The folder a link: refused, nothing created where it leads.
        std::fs::create_dir(root.join("elsewhere"))?;
        std::os::unix::fs::symlink(root.join("elsewhere"), root.join("swapped"))?;
        let err = open_beneath(&root.join("swapped/m.jsonl"), Access::Append)
            .expect_err("through a link");
        assert!(
            err.to_string()
                .contains("without following a symbolic link"),
            "{err}"
        );
        assert!(!root.join("elsewhere/m.jsonl").exists());
        // The file a link: refused, its target unchanged.
        std::fs::write(root.join("victim"), "private")?;
        std::os::unix::fs::symlink(root.join("victim"), out.join("linked.jsonl"))?;
        assert!(open_beneath(&out.join("linked.jsonl"), Access::Append).is_err());
        assert!(open_beneath(&out.join("linked.jsonl"), Access::Read).is_err());
        assert_eq!(std::fs::read_to_string(root.join("victim"))?, "private");
        // Not a plain name, not a resolved folder.
        assert!(open_beneath(&out.join("../victim"), Access::Read).is_err());
        assert!(open_beneath(&out.join("../out/m.jsonl"), Access::Read).is_err());
        Ok(())
    }

    #[test]
    fn model_files_follow_links_only_within_their_folder_or_cache_repository() -> std::io::Result<()>
    {
        use std::os::unix::fs::symlink;
        let dir = tempfile::tempdir()?;
        let root = dir.path().canonicalize()?;
        std::fs::write(root.join("secret"), "another tenant's")?;
        // The Hub cache: snapshot files are relative links into blobs/.
        let repo = root.join("hub/models--org--tiny");
        let snap = repo.join("snapshots/abc123");
        std::fs::create_dir_all(repo.join("blobs"))?;
        std::fs::create_dir_all(snap.join("1_Pooling"))?;
        std::fs::write(repo.join("blobs/9f1"), "{\"model_type\": \"bert\"}")?;
        std::fs::write(repo.join("blobs/9f2"), "pooling")?;
        symlink("../../blobs/9f1", snap.join("config.json"))?;
        symlink("../../../blobs/9f2", snap.join("1_Pooling/config.json"))?;
        assert_eq!(link_root(&snap), repo.as_path());
        assert_eq!(
            read_to_string(&snap.join("config.json"))?,
            "{\"model_type\": \"bert\"}"
        );
        assert_eq!(
            read_to_string(&snap.join("1_Pooling/config.json"))?,
            "pooling"
        );
        // Out of the repository: relative or absolute, refused by name.
        symlink("../../../../secret", snap.join("tokenizer.json"))?;
        symlink(root.join("secret"), snap.join("vocab.txt"))?;
        for name in ["tokenizer.json", "vocab.txt"] {
            let err = read(&snap.join(name)).expect_err("leads out");
            assert!(err.to_string().contains(name), "{err}");
            assert!(err.to_string().contains("link"), "{err}");
        }
        // A plain model folder: links within it are followed, out of it not.
        let plain = root.join("models/bert");
        std::fs::create_dir_all(&plain)?;
        std::fs::write(plain.join("real.json"), "real")?;
        symlink("real.json", plain.join("config.json"))?;
        symlink("../../secret", plain.join("vocab.txt"))?;
        assert_eq!(link_root(&plain), plain.as_path());
        assert_eq!(read_to_string(&plain.join("config.json"))?, "real");
        assert!(read(&plain.join("vocab.txt")).is_err());
        // A folder on the way swapped for a link after submit: refused.
        std::fs::create_dir_all(root.join("elsewhere"))?;
        std::fs::write(root.join("elsewhere/config.json"), "elsewhere")?;
        std::fs::rename(&plain, root.join("models/moved"))?;
        symlink(root.join("elsewhere"), &plain)?;
        let err = read(&plain.join("config.json")).expect_err("swapped folder");
        assert!(err.to_string().contains("symbolic link"), "{err}");
        // A missing file stays NotFound (callers look for alternatives).
        let err = read(&snap.join("model.safetensors")).expect_err("missing");
        assert_eq!(err.kind(), std::io::ErrorKind::NotFound);
        // A link loop ends.
        symlink("loop", snap.join("loop"))?;
        assert!(read(&snap.join("loop")).is_err());
        // A trusted path (a command line's) through a link: resolved once,
        // then read; a glob keeps its name under the resolved folder.
        std::os::unix::fs::symlink(root.join("models/moved"), root.join("mine"))?;
        assert!(read(&root.join("mine/config.json")).is_err());
        let r = resolved(&root.join("mine/config.json"));
        assert_eq!(r, root.join("models/moved/real.json"));
        assert_eq!(read_to_string(&r)?, "real");
        assert_eq!(
            resolved(&root.join("mine/*.json")),
            root.join("models/moved/*.json")
        );
        // Through a folder this process pinned.
        let held = Dir::open(&repo, false)?;
        let text = read_to_string(&held.pinned().join("snapshots/abc123/config.json"))?;
        assert_eq!(text, "{\"model_type\": \"bert\"}");
        Ok(())
    }

    #[test]
    fn a_dir_handle_keeps_writing_into_its_folder_after_the_path_is_swapped() -> std::io::Result<()>
    {
        use std::io::{Read, Write};
        let dir = tempfile::tempdir()?;
        let root = dir.path().canonicalize()?;
        let out = root.join("run/out");
        let d = Dir::open(&out, true)?;
        assert!(out.is_dir());
        d.replace("ledger.jsonl", |f| f.write_all(b"one\n"))?;
        // The client swaps the output for a link to someone else's folder.
        std::fs::create_dir(root.join("victim"))?;
        std::fs::write(root.join("victim/ledger.jsonl"), "private\n")?;
        std::fs::rename(&out, root.join("run/moved"))?;
        std::os::unix::fs::symlink(root.join("victim"), &out)?;
        d.replace("ledger.jsonl", |f| f.write_all(b"two\n"))?;
        d.file("metrics.jsonl", Access::Append)?.write_all(b"m\n")?;
        let sub = d.sub("checkpoints", true)?;
        sub.replace("state.json", |f| f.write_all(b"{}"))?;
        assert_eq!(
            std::fs::read_to_string(root.join("victim/ledger.jsonl"))?,
            "private\n"
        );
        assert!(!root.join("victim/metrics.jsonl").exists());
        assert!(!root.join("victim/checkpoints").exists());
        assert_eq!(
            std::fs::read_to_string(root.join("run/moved/ledger.jsonl"))?,
            "two\n"
        );
        assert_eq!(
            std::fs::read_to_string(root.join("run/moved/checkpoints/state.json"))?,
            "{}"
        );
        // A pinned path finds the same folder.
        let mut text = String::new();
        std::fs::File::open(d.pinned().join("metrics.jsonl"))?.read_to_string(&mut text)?;
        assert_eq!(text, "m\n");
        // Opening by the swapped path now refuses, as does a linked sub-folder.
        assert!(Dir::open(&out, false).is_err());
        assert!(Dir::open(&out.join("deeper"), true).is_err());
        assert!(!root.join("victim/deeper").exists());
        let moved = Dir::open(&root.join("run/moved"), false)?;
        std::os::unix::fs::symlink(root.join("victim"), root.join("run/moved/linked"))?;
        assert!(moved.sub("linked", false).is_err());
        assert!(moved.sub("linked", true).is_err());
        // A link where a file is replaced is replaced, not written through.
        std::os::unix::fs::symlink(
            root.join("victim/ledger.jsonl"),
            root.join("run/moved/l.jsonl"),
        )?;
        moved.replace("l.jsonl", |f| f.write_all(b"mine\n"))?;
        assert_eq!(
            std::fs::read_to_string(root.join("victim/ledger.jsonl"))?,
            "private\n"
        );
        assert!(!std::fs::symlink_metadata(root.join("run/moved/l.jsonl"))?.is_symlink());
        // Names are single plain components; no temporary file is left.
        assert!(moved.file("../victim/ledger.jsonl", Access::Read).is_err());
        assert!(moved.sub("..", false).is_err());
        let left: Vec<_> = std::fs::read_dir(root.join("run/moved"))?
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with('.'))
            .collect();
        assert!(left.is_empty(), "{left:?}");
        Ok(())
    }
}
