//! Atomic file writes: the one way both daemons (and the test harness) put a file in place so
//! that a reader or a crash never sees half of it.

use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// How [`write_atomic_with`] puts a file in place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AtomicWrite {
    /// The file's permission bits, set on the temporary file before it is renamed, so the
    /// file never exists under its name with a wider mode.
    pub mode: u32,
    /// Replace an existing file (rename). When false an existing file is an error of kind
    /// [`io::ErrorKind::AlreadyExists`] and is left alone, even one that appeared meanwhile.
    pub replace: bool,
    /// fsync the file before the rename and its directory after it, so the new content
    /// survives a crash. Off only for caches that a re-run rebuilds.
    pub durable: bool,
}

impl AtomicWrite {
    /// Replace, durably, with `mode`: what [`write_atomic`] does.
    pub fn new(mode: u32) -> Self {
        Self {
            mode,
            replace: true,
            durable: true,
        }
    }
}

/// Why an atomic write failed: the step, the file it was about, and the OS error.
#[derive(Debug, thiserror::Error)]
#[error("{action} {}: {source}", path.display())]
pub struct WriteError {
    /// What was being done: "creating a temporary file in", "writing", "renaming to"...
    pub action: &'static str,
    /// The file or directory involved.
    pub path: PathBuf,
    /// The OS error.
    #[source]
    pub source: io::Error,
}

impl WriteError {
    /// The OS error's kind; [`io::ErrorKind::AlreadyExists`] when `replace` was false and the
    /// target exists.
    pub fn kind(&self) -> io::ErrorKind {
        self.source.kind()
    }
}

/// Writes `bytes` to `path` atomically and durably with permission bits `mode`: a temporary
/// file in the same directory, fsync, rename over `path`, fsync of the directory.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), WriteError> {
    write_atomic_with(path, bytes, AtomicWrite::new(mode))
}

/// [`write_atomic`] with the choices spelled out. The temporary file is removed on every
/// failure (it is a `tempfile::NamedTempFile` until the rename).
pub fn write_atomic_with(path: &Path, bytes: &[u8], how: AtomicWrite) -> Result<(), WriteError> {
    let fail = |action: &'static str, path: &Path| {
        let path = path.to_path_buf();
        move |source: io::Error| WriteError {
            action,
            path,
            source,
        }
    };
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    // A dot name, so directory listings and globs of the real files skip it.
    let mut tmp = tempfile::Builder::new()
        .prefix(&format!(".{file_name}."))
        .suffix(".tmp")
        .tempfile_in(dir)
        .map_err(fail("creating a temporary file in", dir))?;
    // tempfile creates it 0600; set the exact mode whatever the umask.
    set_mode(tmp.as_file(), how.mode).map_err(fail("setting the mode of", tmp.path()))?;
    tmp.write_all(bytes).map_err(fail("writing", tmp.path()))?;
    if how.durable {
        tmp.as_file()
            .sync_all()
            .map_err(fail("syncing", tmp.path()))?;
    }
    let persisted = if how.replace {
        tmp.persist(path)
    } else {
        tmp.persist_noclobber(path)
    };
    // Dropping the error's file removes the temporary file.
    persisted.map_err(|e| fail("renaming to", path)(e.error))?;
    if how.durable {
        sync_dir(dir).map_err(fail("syncing directory", dir))?;
    }
    Ok(())
}

/// Makes the renames in `dir` durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(unix)]
fn set_mode(file: &std::fs::File, mode: u32) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    file.set_permissions(std::fs::Permissions::from_mode(mode))
}

#[cfg(not(unix))]
fn set_mode(_file: &std::fs::File, _mode: u32) -> io::Result<()> {
    Ok(())
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn mode_of(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
    }

    fn leftovers(dir: &Path) -> Vec<String> {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".tmp"))
            .collect()
    }

    #[test]
    fn a_write_replaces_the_file_with_the_given_mode_and_leaves_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key.pem");
        write_atomic(&path, b"old", 0o644).unwrap();
        assert_eq!(mode_of(&path), 0o644);
        write_atomic(&path, b"new", 0o600).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"new");
        assert_eq!(mode_of(&path), 0o600);
        assert!(leftovers(dir.path()).is_empty());
    }

    #[test]
    fn without_replace_an_existing_file_is_an_error_and_stays_as_it_was() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ca.pem");
        std::fs::write(&path, b"mine").unwrap();
        let how = AtomicWrite {
            replace: false,
            ..AtomicWrite::new(0o644)
        };
        let e = write_atomic_with(&path, b"theirs", how).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AlreadyExists, "{e}");
        assert!(e.to_string().contains("ca.pem"), "{e}");
        assert_eq!(std::fs::read(&path).unwrap(), b"mine");
        assert!(leftovers(dir.path()).is_empty());

        let fresh = dir.path().join("new.pem");
        write_atomic_with(&fresh, b"x", how).unwrap();
        assert_eq!(std::fs::read(&fresh).unwrap(), b"x");
    }

    #[test]
    fn a_missing_directory_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("absent/file");
        let e = write_atomic(&path, b"x", 0o600).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
        assert!(e.to_string().contains("absent"), "{e}");
    }
}
