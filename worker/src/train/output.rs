//! A run's output folder, held open for the whole run: every task writes its
//! checkpoints, `best/`, `final/` and metric files through one handle to it
//! (a [`Dir`] opened without following links), so a folder swapped for a
//! symbolic link after the run began — by anyone who can write where the
//! output lies — does not lead a write elsewhere. Paths that code takes (the
//! model writers) are handed the handle's pinned form (`/proc/self/fd/N/…`);
//! paths that people and the coordinator read are the named ones.

use std::path::{Path, PathBuf};

use dpo_data::confined::Dir;

use crate::error::{Error, Result, io_err};

/// The folder checkpoints live in, below the output.
pub const CHECKPOINTS: &str = "checkpoints";

/// The output folder of a run, and its `checkpoints/` folder, held open.
#[derive(Debug)]
pub struct RunOutput {
    named: PathBuf,
    dir: Dir,
    checkpoints: Dir,
}

/// How the output's path is to be taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputPath {
    /// The person running `dpo-worker train` named it: it may be relative
    /// and may lead through links they made; it is resolved once, here.
    Trusted,
    /// The coordinator resolved and confined it at submit: it is walked as
    /// it is, and a link anywhere on it is refused.
    Confined,
}

impl RunOutput {
    /// Opens (making it when missing) the output folder `path` and its
    /// `checkpoints/`.
    pub fn open(path: &Path, how: OutputPath) -> Result<Self> {
        let walk = match how {
            OutputPath::Trusted => {
                std::fs::create_dir_all(path).map_err(io_err(path))?;
                std::fs::canonicalize(path).map_err(io_err(path))?
            }
            OutputPath::Confined => path.to_path_buf(),
        };
        let refused = |e: std::io::Error| Error::Input {
            context: "train.output".into(),
            reason: e.to_string(),
        };
        let dir = Dir::open(&walk, true).map_err(refused)?;
        let checkpoints = dir.sub(CHECKPOINTS, true).map_err(refused)?;
        Ok(RunOutput {
            named: path.to_path_buf(),
            dir,
            checkpoints,
        })
    }

    /// The path the run names its output by (for people and the coordinator).
    pub fn named(&self) -> &Path {
        &self.named
    }

    /// Where to write: the output folder itself, whatever its path names now.
    pub fn io(&self) -> PathBuf {
        self.dir.pinned()
    }

    /// Where checkpoints are written and listed.
    pub fn checkpoints(&self) -> PathBuf {
        self.checkpoints.pinned()
    }

    /// `path`, found below [`Self::io`] or [`Self::checkpoints`], as named
    /// below [`Self::named`] (unchanged when it is below neither).
    pub fn named_of(&self, path: &Path) -> PathBuf {
        if let Ok(rest) = path.strip_prefix(self.checkpoints()) {
            return self.named.join(CHECKPOINTS).join(rest);
        }
        match path.strip_prefix(self.io()) {
            Ok(rest) => self.named.join(rest),
            Err(_) => path.to_path_buf(),
        }
    }

    /// `path` as named below the output, found through the held folder
    /// instead (unchanged when it is not below the output): a checkpoint the
    /// coordinator names is read from this run's own folder.
    pub fn resolve(&self, path: &Path) -> PathBuf {
        if let Ok(rest) = path.strip_prefix(self.named.join(CHECKPOINTS)) {
            return self.checkpoints().join(rest);
        }
        match path.strip_prefix(&self.named) {
            Ok(rest) => self.io().join(rest),
            Err(_) => path.to_path_buf(),
        }
    }

    /// Writes the folder `name` (e.g. `final`, `best`) whole or not at all:
    /// `fill` writes into a fresh temporary folder beside it (entered by the
    /// handle, never through a link), its files are fsynced, and it takes
    /// `name`'s place — what was there before goes only once the new one is
    /// in. Returns the named path.
    pub fn publish(&self, name: &str, fill: impl FnOnce(&Path) -> Result<()>) -> Result<PathBuf> {
        let pid = std::process::id();
        let tmp = format!(".{name}.tmp-{pid}");
        let old = format!(".{name}.old-{pid}");
        let io = self.io();
        for stale in [&tmp, &old] {
            remove_tree(&io.join(stale))?;
        }
        std::fs::create_dir(io.join(&tmp)).map_err(io_err(io.join(&tmp)))?;
        let written = self
            .dir
            .sub(&tmp, false)
            .map_err(io_err(io.join(&tmp)))
            .and_then(|into| {
                fill(&into.pinned())?;
                sync_tree(&into.pinned())
            });
        if let Err(e) = written {
            // Nothing half-written is left behind; the error is the writer's.
            let _ = remove_tree(&io.join(&tmp));
            return Err(e);
        }
        let named = self.named.join(name);
        let moved_aside = match self.dir.rename(name, &old) {
            Ok(()) => true,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
            Err(e) => return Err(io_err(&named)(e)),
        };
        self.dir.rename(&tmp, name).map_err(io_err(&named))?;
        if moved_aside {
            remove_tree(&io.join(&old))?;
        }
        tracing::info!(dir = %named.display(), "saved");
        Ok(named)
    }

    /// Copies the folder `from` (a published one, e.g. `best`) to `to` the
    /// same way [`Self::publish`] writes.
    pub fn publish_copy(&self, from: &str, to: &str) -> Result<PathBuf> {
        let source = self
            .dir
            .sub(from, false)
            .map_err(io_err(self.named.join(from)))?;
        self.publish(to, |into| copy_files(&source, into))
    }

    /// Whether the output holds `name`.
    pub fn holds(&self, name: &str) -> bool {
        std::fs::symlink_metadata(self.io().join(name)).is_ok()
    }
}

/// Removes `path` (a folder or file; a link itself, never what it leads to).
fn remove_tree(path: &Path) -> Result<()> {
    let gone = match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => Err(e),
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(path),
        Ok(_) => std::fs::remove_file(path),
    };
    gone.map_err(io_err(path))
}

/// fsyncs every file and folder below `dir` (links are not followed).
fn sync_tree(dir: &Path) -> Result<()> {
    for entry in std::fs::read_dir(dir).map_err(io_err(dir))? {
        let entry = entry.map_err(io_err(dir))?;
        let kind = entry.file_type().map_err(io_err(entry.path()))?;
        if kind.is_dir() {
            sync_tree(&entry.path())?;
        } else if kind.is_file() {
            let path = entry.path();
            std::fs::File::open(&path)
                .and_then(|f| f.sync_all())
                .map_err(io_err(&path))?;
        }
    }
    dpo_data::atomic::sync_dir(dir).map_err(io_err(dir))
}

/// Copies the regular files of `from` into the folder `to` (a model folder
/// is flat apart from `merged/`, which is copied the same way).
fn copy_files(from: &Dir, to: &Path) -> Result<()> {
    let source = from.pinned();
    for entry in std::fs::read_dir(&source).map_err(io_err(from.path()))? {
        let entry = entry.map_err(io_err(from.path()))?;
        let kind = entry.file_type().map_err(io_err(entry.path()))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else {
            continue;
        };
        if kind.is_dir() {
            let sub = from
                .sub(name, false)
                .map_err(io_err(from.path().join(name)))?;
            let dest = to.join(name);
            std::fs::create_dir(&dest).map_err(io_err(&dest))?;
            copy_files(&sub, &dest)?;
        } else if kind.is_file() {
            let mut src = from
                .file(name, dpo_data::confined::Access::Read)
                .map_err(io_err(from.path().join(name)))?;
            let dest = to.join(name);
            let mut out = std::fs::File::create_new(&dest).map_err(io_err(&dest))?;
            std::io::copy(&mut src, &mut out).map_err(io_err(&dest))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> Result<()> {
        std::fs::write(dir.join(name), text).map_err(io_err(dir.join(name)))
    }

    #[test]
    fn a_swapped_output_path_does_not_lead_the_run_s_writes_elsewhere() {
        let root = tempfile::tempdir().expect("tempdir");
        let root = std::fs::canonicalize(root.path()).expect("canonical");
        let out = root.join("run");
        let outside = root.join("elsewhere");
        std::fs::create_dir_all(&outside).expect("outside");
        let run = RunOutput::open(&out, OutputPath::Confined).expect("open");
        // The output is moved away and its path made a link to another folder.
        std::fs::rename(&out, root.join("moved")).expect("move");
        std::os::unix::fs::symlink(&outside, &out).expect("link");
        let named = run
            .publish("final", |dir| write(dir, "model.safetensors", "weights"))
            .expect("publish");
        assert_eq!(named, out.join("final"));
        std::fs::write(run.checkpoints().join("a"), "x").expect("checkpoint file");
        let moved = root.join("moved");
        assert_eq!(
            std::fs::read_to_string(moved.join("final/model.safetensors")).expect("final"),
            "weights"
        );
        assert!(moved.join("checkpoints/a").is_file());
        assert_eq!(std::fs::read_dir(&outside).expect("list").count(), 0);
        // Opened again by its (now linked) path, it is refused.
        let again = RunOutput::open(&out, OutputPath::Confined).expect_err("a link");
        assert!(again.to_string().contains("link"), "{again}");
    }

    #[test]
    fn publishing_replaces_a_folder_whole_and_never_writes_through_a_planted_link() {
        let root = tempfile::tempdir().expect("tempdir");
        let root = std::fs::canonicalize(root.path()).expect("canonical");
        let out = root.join("run");
        let run = RunOutput::open(&out, OutputPath::Trusted).expect("open");
        run.publish("best", |dir| {
            write(dir, "a", "1")?;
            std::fs::create_dir(dir.join("merged")).map_err(io_err(dir))?;
            write(&dir.join("merged"), "b", "2")
        })
        .expect("best");
        // `final` planted as a link to a folder outside: replaced, not followed.
        let outside = root.join("outside");
        std::fs::create_dir_all(&outside).expect("outside");
        std::os::unix::fs::symlink(&outside, out.join("final")).expect("plant");
        run.publish_copy("best", "final").expect("final");
        assert!(!out.join("final").is_symlink());
        assert_eq!(
            std::fs::read_to_string(out.join("final/a")).expect("a"),
            "1"
        );
        assert_eq!(
            std::fs::read_to_string(out.join("final/merged/b")).expect("b"),
            "2"
        );
        assert_eq!(std::fs::read_dir(&outside).expect("list").count(), 0);
        // A second publish replaces the first whole; a failed one leaves it.
        run.publish("final", |dir| write(dir, "c", "3"))
            .expect("again");
        assert!(!out.join("final/a").exists());
        let failed = run.publish("final", |_| Err(Error::State("a failing writer")));
        assert!(failed.is_err());
        assert_eq!(
            std::fs::read_to_string(out.join("final/c")).expect("c"),
            "3"
        );
        let names: Vec<String> = std::fs::read_dir(&out)
            .expect("list")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with('.'))
            .collect();
        assert!(names.is_empty(), "{names:?}");
        // Named and pinned paths map onto each other.
        let ck = run.checkpoints().join("step-3");
        assert_eq!(run.named_of(&ck), out.join("checkpoints/step-3"));
        assert_eq!(run.resolve(&out.join("checkpoints/step-3")), ck);
        assert_eq!(run.resolve(&out.join("final")), run.io().join("final"));
    }
}
