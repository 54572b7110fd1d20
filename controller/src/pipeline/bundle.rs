//! Release bundles: the app's git tree at a commit plus the environment's secrets as `.env`,
//! as a gzipped tar, content-addressed by its sha256.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Stdio;

use sha2::{Digest, Sha256};
use tokio::process::Command;

/// A bundle that could not be made; the message names the repository, commit or file.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    /// git failed (unknown commit, unreadable repository).
    #[error("git in {repo}: {message}")]
    Git {
        /// The repository.
        repo: PathBuf,
        /// git's error output.
        message: String,
    },
    /// The secrets file could not be read.
    #[error("reading secrets {path}: {source}")]
    Secrets {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Packing or writing failed.
    #[error("packing the bundle: {0}")]
    Pack(String),
}

/// A built bundle.
#[derive(Debug, Clone)]
pub struct Bundle {
    /// Its digest (also its file name).
    pub sha256: String,
    /// Its size in bytes.
    pub size: u64,
    /// Where it is.
    pub path: PathBuf,
}

/// Resolves `commit` (a sha or ref) in `repo` to a full commit id.
pub async fn resolve_commit(repo: &Path, commit: &str) -> Result<String, BundleError> {
    if commit.is_empty() || commit.starts_with('-') || commit.len() > 200 {
        return Err(BundleError::Git {
            repo: repo.to_path_buf(),
            message: format!("{commit:?} is not a commit"),
        });
    }
    let not_found = || BundleError::Git {
        repo: repo.to_path_buf(),
        message: format!("commit {commit:?} not found"),
    };
    let out = git(
        repo,
        &[
            "rev-parse",
            "--verify",
            "--quiet",
            &format!("{commit}^{{commit}}"),
        ],
    )
    .await
    .map_err(|e| match e {
        // --quiet: an unknown commit fails without a word; say which.
        BundleError::Git { ref message, .. } if message.contains("rev-parse") => not_found(),
        other => other,
    })?;
    let sha = String::from_utf8_lossy(&out).trim().to_string();
    if sha.is_empty() {
        return Err(not_found());
    }
    Ok(sha)
}

async fn git(repo: &Path, args: &[&str]) -> Result<Vec<u8>, BundleError> {
    let out = Command::new("git")
        .arg("-C")
        .arg(repo)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|e| BundleError::Git {
            repo: repo.to_path_buf(),
            message: format!("running git: {e}"),
        })?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
        return Err(BundleError::Git {
            repo: repo.to_path_buf(),
            message: if stderr.is_empty() {
                format!("git {} failed ({})", args.join(" "), out.status)
            } else {
                stderr
            },
        });
    }
    Ok(out.stdout)
}

/// Builds the bundle of `commit` with `secrets` as `.env` into `dir`.
pub async fn build(
    repo: &Path,
    commit: &str,
    secrets: Option<&Path>,
    dir: &Path,
) -> Result<Bundle, BundleError> {
    let tree = git(repo, &["archive", "--format=tar", commit]).await?;
    let env = match secrets {
        Some(path) => Some(
            tokio::fs::read(path)
                .await
                .map_err(|source| BundleError::Secrets {
                    path: path.to_path_buf(),
                    source,
                })?,
        ),
        None => None,
    };
    let dir = dir.to_path_buf();
    tokio::task::spawn_blocking(move || pack(&tree, env.as_deref(), &dir))
        .await
        .map_err(|e| BundleError::Pack(e.to_string()))?
}

fn pack(tree: &[u8], env: Option<&[u8]>, dir: &Path) -> Result<Bundle, BundleError> {
    let pack_err = |e: std::io::Error| BundleError::Pack(e.to_string());
    std::fs::create_dir_all(dir).map_err(pack_err)?;
    let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let mut builder = tar::Builder::new(gz);
    let mut archive = tar::Archive::new(tree);
    for entry in archive.entries().map_err(pack_err)? {
        let mut entry = entry.map_err(pack_err)?;
        let path = entry.path().map_err(pack_err)?.into_owned();
        if path.as_os_str() == ".env" {
            // A committed .env never wins over the environment's secrets.
            continue;
        }
        let mut header = entry.header().clone();
        let mut data = Vec::new();
        entry.read_to_end(&mut data).map_err(pack_err)?;
        builder
            .append_data(&mut header, &path, data.as_slice())
            .map_err(pack_err)?;
    }
    if let Some(env) = env {
        let mut header = tar::Header::new_gnu();
        header.set_size(env.len() as u64);
        header.set_mode(0o600);
        header.set_entry_type(tar::EntryType::Regular);
        header.set_mtime(0);
        builder
            .append_data(&mut header, ".env", env)
            .map_err(pack_err)?;
    }
    let bytes = builder
        .into_inner()
        .and_then(|gz| gz.finish())
        .map_err(pack_err)?;
    let sha256 = hex::encode(Sha256::digest(&bytes));
    let path = dir.join(format!("{sha256}.tar.gz"));
    let tmp = dir.join(format!(".{sha256}.tmp"));
    {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .mode_0600()
            .open(&tmp)
            .map_err(pack_err)?;
        f.write_all(&bytes).map_err(pack_err)?;
        f.sync_all().map_err(pack_err)?;
    }
    std::fs::rename(&tmp, &path).map_err(pack_err)?;
    Ok(Bundle {
        sha256,
        size: bytes.len() as u64,
        path,
    })
}

/// Removes the bundles (and leftovers of interrupted builds) in `dir` that no open job needs,
/// `needed` being the digests open jobs name, once their file is older than `grace`: a
/// bundle just built waits that long for its job to be submitted. Bundles hold secrets, so
/// they are not kept past their use. Returns how many files were removed.
pub fn prune(
    dir: &Path,
    needed: &std::collections::HashSet<String>,
    grace: std::time::Duration,
) -> std::io::Result<usize> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    let now = std::time::SystemTime::now();
    let mut removed = 0;
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let digest = name
            .strip_suffix(".tar.gz")
            .or_else(|| name.strip_prefix('.').and_then(|n| n.strip_suffix(".tmp")))
            .unwrap_or(&name);
        if needed.contains(digest) {
            continue;
        }
        let meta = entry.metadata()?;
        let age = meta
            .modified()
            .ok()
            .and_then(|m| now.duration_since(m).ok())
            .unwrap_or_default();
        if meta.is_file() && age >= grace {
            std::fs::remove_file(entry.path())?;
            removed += 1;
        }
    }
    Ok(removed)
}

/// Bundles hold secrets: their files are private to the controller's user.
trait Mode0600 {
    fn mode_0600(&mut self) -> &mut Self;
}

impl Mode0600 for std::fs::OpenOptions {
    fn mode_0600(&mut self) -> &mut Self {
        use std::os::unix::fs::OpenOptionsExt;
        self.mode(0o600)
    }
}

#[cfg(test)]
mod prune_tests {
    use super::*;
    use std::collections::HashSet;
    use std::time::Duration;

    #[test]
    fn bundles_no_open_job_needs_are_removed_once_past_the_grace() {
        let dir = tempfile::tempdir().unwrap();
        let needed = "a".repeat(64);
        let unused = "b".repeat(64);
        for name in [
            format!("{needed}.tar.gz"),
            format!("{unused}.tar.gz"),
            format!(".{unused}.tmp"),
        ] {
            std::fs::write(dir.path().join(name), b"x").unwrap();
        }
        let keep: HashSet<String> = [needed.clone()].into();
        // Within the grace nothing goes (a bundle just built waits for its job).
        assert_eq!(
            prune(dir.path(), &keep, Duration::from_secs(600)).unwrap(),
            0
        );
        assert_eq!(prune(dir.path(), &keep, Duration::ZERO).unwrap(), 2);
        let left: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(left, vec![format!("{needed}.tar.gz")]);
        // A missing directory is nothing to prune.
        assert_eq!(
            prune(&dir.path().join("none"), &keep, Duration::ZERO).unwrap(),
            0
        );
    }
}
