//! The PKI directory: its file names, and writing it.
//!
//! Files are written atomically (temporary file in the same directory, then
//! rename or hard link), private keys are created with mode 0600 and
//! certificates get mode 0644. No existing file is replaced unless `force` is
//! set, and every target is checked before anything is written, so a refused
//! run leaves the directory untouched.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use super::PkiError;

/// File name of the fleet CA certificate.
pub const CA_CERT_FILE: &str = "ca.pem";
/// File name of the fleet CA private key.
pub const CA_KEY_FILE: &str = "ca.key";
/// File name of the controller's server certificate.
pub const CONTROLLER_CERT_FILE: &str = "controller.pem";
/// File name of the controller's server private key.
pub const CONTROLLER_KEY_FILE: &str = "controller.key";
/// File name of the Ed25519 job-signing private key (PKCS#8 PEM).
pub const SIGNING_KEY_FILE: &str = "signing.key";
/// File name of the Ed25519 job-signing public key (SPKI PEM).
pub const SIGNING_PUB_FILE: &str = "signing.pub";

/// Mode of private key files.
const KEY_MODE: u32 = 0o600;
/// Mode of certificate and public key files.
const PUBLIC_MODE: u32 = 0o644;
/// Mode of a PKI directory created by [`super::init`].
const DIR_MODE: u32 = 0o700;

/// Paths of a host's certificate and key in `dir`: `(host-NAME.pem, host-NAME.key)`.
pub fn host_files(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    (
        dir.join(format!("host-{name}.pem")),
        dir.join(format!("host-{name}.key")),
    )
}

/// Paths of an operator's certificate and key in `dir`:
/// `(operator-NAME.pem, operator-NAME.key)`.
pub fn operator_files(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    (
        dir.join(format!("operator-{name}.pem")),
        dir.join(format!("operator-{name}.key")),
    )
}

/// A file to write: contents and whether it is a private key.
pub(super) struct PlannedFile {
    pub(super) path: PathBuf,
    contents: String,
    secret: bool,
}

impl PlannedFile {
    pub(super) fn secret(path: PathBuf, contents: String) -> Self {
        PlannedFile {
            path,
            contents,
            secret: true,
        }
    }

    pub(super) fn public(path: PathBuf, contents: String) -> Self {
        PlannedFile {
            path,
            contents,
            secret: false,
        }
    }

    fn mode(&self) -> u32 {
        if self.secret {
            KEY_MODE
        } else {
            PUBLIC_MODE
        }
    }
}

pub(super) fn io_err(path: &Path) -> impl FnOnce(io::Error) -> PkiError + '_ {
    move |source| PkiError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Without `force`, fails with [`PkiError::Exists`] on the first target that
/// exists (including dangling symlinks).
pub(super) fn check_targets(targets: &[PathBuf], force: bool) -> Result<(), PkiError> {
    if force {
        return Ok(());
    }
    for path in targets {
        match fs::symlink_metadata(path) {
            Ok(_) => return Err(PkiError::Exists { path: path.clone() }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(path)(e)),
        }
    }
    Ok(())
}

/// Creates `dir` (and parents) with mode 0700 if missing; warns if an
/// existing directory is accessible to group or others.
pub(super) fn ensure_dir(dir: &Path) -> Result<(), PkiError> {
    match fs::metadata(dir) {
        Ok(meta) if meta.is_dir() => {
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                let mode = meta.permissions().mode() & 0o777;
                if mode & 0o077 != 0 {
                    tracing::warn!(
                        dir = %dir.display(),
                        "PKI directory has mode {mode:o}; 0700 is recommended"
                    );
                }
            }
            Ok(())
        }
        Ok(_) => Err(PkiError::Io {
            path: dir.to_owned(),
            source: io::Error::new(io::ErrorKind::NotADirectory, "not a directory"),
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let mut builder = fs::DirBuilder::new();
            builder.recursive(true);
            #[cfg(unix)]
            {
                use std::os::unix::fs::DirBuilderExt;
                builder.mode(DIR_MODE);
            }
            builder.create(dir).map_err(io_err(dir))
        }
        Err(e) => Err(io_err(dir)(e)),
    }
}

/// Writes every planned file atomically. On failure, files this call created
/// are removed again (files replaced under `force` cannot be restored).
pub(super) fn write_planned(
    dir: &Path,
    planned: &[PlannedFile],
    force: bool,
) -> Result<Vec<PathBuf>, PkiError> {
    let mut written = Vec::with_capacity(planned.len());
    let mut created: Vec<PathBuf> = Vec::new();
    for file in planned {
        let existed = fs::symlink_metadata(&file.path).is_ok();
        if let Err(err) = write_atomic(&file.path, file.contents.as_bytes(), file.mode(), force) {
            for path in &created {
                if let Err(e) = fs::remove_file(path) {
                    tracing::warn!(path = %path.display(), "cannot roll back: {e}");
                }
            }
            return Err(err);
        }
        tracing::debug!(path = %file.path.display(), "wrote");
        if !existed {
            created.push(file.path.clone());
        }
        written.push(file.path.clone());
    }
    sync_dir(dir)?;
    Ok(written)
}

/// Writes `contents` atomically with `mode` (so a key is never readable by others): replacing
/// an existing file under `force`, otherwise failing rather than replace a file that appeared
/// meanwhile. The directory is synced once by [`write_planned`].
fn write_atomic(path: &Path, contents: &[u8], mode: u32, force: bool) -> Result<(), PkiError> {
    let how = sentinel_daemon::fs::AtomicWrite {
        mode,
        replace: force,
        durable: true,
    };
    sentinel_daemon::fs::write_atomic_with(path, contents, how).map_err(|e| {
        if !force && e.kind() == io::ErrorKind::AlreadyExists {
            PkiError::Exists {
                path: path.to_owned(),
            }
        } else {
            PkiError::Io {
                path: e.path,
                source: e.source,
            }
        }
    })
}

/// Makes the renames in `dir` durable.
fn sync_dir(dir: &Path) -> Result<(), PkiError> {
    #[cfg(unix)]
    {
        fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err(dir))?;
    }
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;
    use std::collections::BTreeSet;
    use std::os::unix::fs::PermissionsExt;

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).expect("metadata").permissions().mode() & 0o777
    }

    fn listing(dir: &Path) -> BTreeSet<String> {
        fs::read_dir(dir)
            .expect("read dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect()
    }

    #[test]
    fn host_and_operator_files_name_the_certificate_then_the_key() {
        let dir = Path::new("/pki");
        assert_eq!(
            host_files(dir, "argus"),
            (dir.join("host-argus.pem"), dir.join("host-argus.key"))
        );
        assert_eq!(
            operator_files(dir, "ada"),
            (dir.join("operator-ada.pem"), dir.join("operator-ada.key"))
        );
    }

    #[test]
    fn planned_files_are_written_with_key_and_certificate_modes_and_no_temporary_left() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("certs");
        ensure_dir(&dir).expect("create dir");
        assert_eq!(mode(&dir), 0o700);
        let planned = [
            PlannedFile::secret(dir.join("a.key"), "secret".into()),
            PlannedFile::public(dir.join("a.pem"), "public".into()),
        ];
        let written = write_planned(&dir, &planned, false).expect("write");
        assert_eq!(written, vec![dir.join("a.key"), dir.join("a.pem")]);
        assert_eq!(mode(&dir.join("a.key")), 0o600);
        assert_eq!(mode(&dir.join("a.pem")), 0o644);
        assert_eq!(
            fs::read_to_string(dir.join("a.key")).expect("read"),
            "secret"
        );
        assert_eq!(
            listing(&dir),
            BTreeSet::from(["a.key".to_owned(), "a.pem".to_owned()])
        );
    }

    #[test]
    fn an_existing_target_or_dangling_symlink_is_refused_without_force() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path();
        let file = dir.join("ca.pem");
        let link = dir.join("ca.key");
        fs::write(&file, b"keep me").expect("write");
        std::os::unix::fs::symlink(dir.join("nowhere"), &link).expect("symlink");
        for path in [&file, &link] {
            match check_targets(&[dir.join("free.pem"), path.clone()], false) {
                Err(PkiError::Exists { path: p }) => assert_eq!(&p, path),
                other => panic!("expected Exists for {}, got {other:?}", path.display()),
            }
        }
        check_targets(&[file.clone(), link], true).expect("force skips the check");

        // Without force an existing file is not replaced even when the check was skipped.
        let planned = [PlannedFile::public(file.clone(), "new".into())];
        assert!(matches!(
            write_planned(dir, &planned, false),
            Err(PkiError::Exists { .. })
        ));
        assert_eq!(fs::read(&file).expect("read"), b"keep me");
        write_planned(dir, &planned, true).expect("forced write");
        assert_eq!(fs::read(&file).expect("read"), b"new");
    }

    #[test]
    fn a_failed_write_removes_the_files_this_call_created() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path();
        let planned = [
            PlannedFile::secret(dir.join("first.key"), "k".into()),
            PlannedFile::public(dir.join("missing").join("second.pem"), "c".into()),
        ];
        match write_planned(dir, &planned, false) {
            Err(PkiError::Io { path, .. }) => assert!(path.starts_with(dir.join("missing"))),
            other => panic!("expected an I/O error, got {other:?}"),
        }
        assert!(listing(dir).is_empty(), "left behind: {:?}", listing(dir));
    }

    #[test]
    fn a_file_where_the_directory_should_be_is_an_error() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let not_dir = tmp.path().join("certs");
        fs::write(&not_dir, b"").expect("write");
        match ensure_dir(&not_dir) {
            Err(PkiError::Io { path, source }) => {
                assert_eq!(path, not_dir);
                assert_eq!(source.kind(), io::ErrorKind::NotADirectory);
            }
            other => panic!("expected NotADirectory, got {other:?}"),
        }
    }
}
