//! Where a process writes into a folder that was checked once (a run's output,
//! resolved and confined by the coordinator at submit), nothing may lead the
//! write elsewhere later — a part of the path replaced by a symbolic link to
//! another owner's files or outside the allowed directories: a [`Dir`] is a
//! folder opened by walking its path without following links and held, so
//! everything done through it happens in that folder; [`open_beneath`] opens
//! one file that way.

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
