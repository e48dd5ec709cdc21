//! Where a process writes into a folder that was checked once (a run's output,
//! resolved and confined by the coordinator at submit), it checks again before
//! writing that no part of the path has since been replaced by a symbolic link
//! that would lead the write elsewhere (another owner's files, outside the
//! allowed directories): [`open_beneath`] opens a file that way with nothing to
//! swap in between; [`unmoved`] checks a folder before writes that go through a
//! path (a temporary file renamed into place).

use std::path::Path;

/// Checks that `dir` (or, while it does not exist yet, its nearest existing
/// folder) is still its own canonical path: no component is a symbolic link.
pub fn unmoved(dir: &Path) -> std::io::Result<()> {
    let mut at = dir;
    loop {
        match std::fs::canonicalize(at) {
            Ok(real) if real == at => return Ok(()),
            Ok(real) => {
                return Err(std::io::Error::other(format!(
                    "{} now leads to {}: a part of the run's output was replaced by a symbolic link after it was submitted",
                    at.display(),
                    real.display()
                )));
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => match at.parent() {
                Some(up) => at = up,
                None => return Err(e),
            },
            Err(e) => return Err(e),
        }
    }
}

/// How [`open_beneath`] opens the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Read,
    /// Append, creating the file when missing.
    Append,
}

/// Opens the file at `path` (absolute) walking its folder one component at a
/// time from `/`, each relative to the folder before it and none through a
/// symbolic link, then the file itself without following a link; it must be a
/// regular file. Unlike a check before an open, nothing can be swapped in
/// between.
pub fn open_beneath(path: &Path, access: Access) -> std::io::Result<std::fs::File> {
    use rustix::fs::{CWD, Mode, OFlags, openat};
    use std::path::Component;
    let refused = |why: String| std::io::Error::other(format!("{}: {why}", path.display()));
    let (Some(dir), Some(Component::Normal(name))) = (path.parent(), path.components().next_back())
    else {
        return Err(refused(
            "not an absolute folder and a plain file name".into(),
        ));
    };
    if !dir.is_absolute() {
        return Err(refused(
            "not an absolute folder and a plain file name".into(),
        ));
    }
    let walk = OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let mut at = openat(CWD, "/", walk, Mode::empty())?;
    for part in dir.components() {
        match part {
            Component::RootDir => {}
            Component::Normal(p) => {
                at = openat(&at, p, walk, Mode::empty()).map_err(|e| {
                    refused(format!(
                        "{} cannot be entered without following a link ({e})",
                        p.to_string_lossy()
                    ))
                })?;
            }
            _ => return Err(refused("the folder is not in its resolved form".into())),
        }
    }
    let flags = match access {
        Access::Read => OFlags::RDONLY,
        Access::Append => OFlags::WRONLY | OFlags::APPEND | OFlags::CREATE,
    } | OFlags::NOFOLLOW
        | OFlags::NONBLOCK
        | OFlags::CLOEXEC;
    let fd = openat(&at, name, flags, Mode::from_raw_mode(0o644))?;
    let file = std::fs::File::from(fd);
    if !file.metadata()?.is_file() {
        return Err(refused("not a regular file".into()));
    }
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_folder_swapped_for_a_link_is_found_also_below_it() -> std::io::Result<()> {
        let dir = tempfile::tempdir()?;
        let root = dir.path().canonicalize()?;
        std::fs::create_dir(root.join("real"))?;
        unmoved(&root.join("real"))?;
        unmoved(&root.join("real/not/yet"))?;
        std::os::unix::fs::symlink(root.join("real"), root.join("link"))?;
        assert!(unmoved(&root.join("link")).is_err());
        assert!(unmoved(&root.join("link/not/yet")).is_err());
        Ok(())
    }

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
            err.to_string().contains("without following a link"),
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
}
