//! Where a process writes into a folder that was checked once (a run's output,
//! resolved and confined by the coordinator at submit), it checks again before
//! writing that no part of the path has since been replaced by a symbolic link
//! that would lead the write elsewhere (another owner's files, outside the
//! allowed directories).

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
}
