//! The daily verify: every retained file against its manifest (present, size, sha256; an
//! encrypted one must start with the age header) and, for database dumps, `pg_restore --list`
//! able to read its table of contents: an encrypted dump is decrypted into pg_restore's
//! standard input (no plaintext on disk) and on to its end, so every chunk's authentication is
//! checked. Without an identity to decrypt with, encrypted files are checked by sha256 and
//! header only, and the result says so. What it finds is written back into the manifests
//! (`verified_at`, `damaged`), so retention stops counting a damaged dump as its day's backup
//! and `ListBackups` shows the newest *good* one. Files and directories that other local
//! users could read or enter (wider than 0600 and 0700) are reported, and fail the verify.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use jiff::Timestamp;
use sentinel_proto::time::from_jiff;
use sentinel_proto::v1::{
    job_finished, BackupDamage, ExposedPath, VerifyBackupsParams, VerifyReport,
};

use super::dump::sha256_file;
use super::encryption::{self, Keys};
use super::manifest::{self, Entry, Kind};
use super::{human_bytes, run_tool, run_tool_io, BackupError, Outcome, Step};
use crate::config::BackupsConfig;
use crate::jobs::{JobError, JobEvents};

/// Runs a verify job.
pub async fn run_verify(
    p: &VerifyBackupsParams,
    config: &BackupsConfig,
    events: &JobEvents,
) -> Outcome {
    let mut report = VerifyReport::default();
    let result = verify(p, config, events, &mut report).await;
    (result, Some(job_finished::Result::Verify(report)))
}

async fn verify(
    p: &VerifyBackupsParams,
    config: &BackupsConfig,
    events: &JobEvents,
    report: &mut VerifyReport,
) -> Result<String, JobError> {
    let dir = PathBuf::from(&p.backup_dir);
    if !dir.is_dir() {
        return Err(JobError::Failed(format!(
            "backup dir {} does not exist: nothing was ever backed up there",
            dir.display()
        )));
    }
    let now = Timestamp::now();
    report.verified_at = Some(from_jiff(now));
    let (mut manifests, problems) = manifest::load_all(&dir);
    report.problems = problems
        .iter()
        .map(|(path, e)| format!("manifest {} unreadable: {e}", path.display()))
        .collect();
    // Keys that stopped loading since start-up: still check what needs no key, and say so.
    let keys = match config.encryption.as_ref().map(Keys::load).transpose() {
        Ok(keys) => keys,
        Err(e) => {
            report
                .problems
                .push(format!("[jobs.backups.encryption]: {e}"));
            None
        }
    };
    let step = Step::start(events, "verify");
    let mut listed = BTreeSet::new();
    for m in manifests.iter_mut() {
        let mut changed = false;
        for entry in m.entries.iter_mut().filter(|e| e.pruned_at.is_none()) {
            listed.insert(entry.file.clone());
            let path = dir.join(&entry.file);
            let list_toc = entry.series.kind == Kind::Database;
            let found = check_file(config, keys.as_ref(), &path, entry, list_toc, events)
                .await
                .map_err(|e| e.to_string());
            report.checked += 1;
            report.bytes += entry.size;
            match &found {
                Ok(Checked::Read) => events.log("agent", &format!("ok: {}", entry.file)),
                Ok(Checked::HashOnly) => {
                    events.log(
                        "agent",
                        &format!(
                            "ok by sha256 and age header: {} (no identity to decrypt it)",
                            entry.file
                        ),
                    );
                    report.unread.push(entry.file.clone());
                }
                Err(e) => {
                    events.log("agent", &format!("DAMAGED: {}: {e}", entry.file));
                    report.damaged.push(BackupDamage {
                        series: Some(entry.series.to_proto()),
                        file: entry.file.clone(),
                        error: e.clone(),
                    });
                }
            }
            entry.verified_at = Some(now);
            entry.damaged = found.err();
            changed = true;
        }
        if changed {
            if let Err(e) = m.save(&dir) {
                report
                    .problems
                    .push(format!("recording the verify in run {}: {e}", m.run_id));
            }
        }
    }
    report.unlisted = unlisted(&dir, &listed);
    report.exposed = exposed(&dir);
    for e in &report.exposed {
        events.log("agent", &format!("READABLE BY OTHERS: {e}"));
    }
    report.inventory = manifest::inventory(&manifests);
    let summary = format!(
        "checked {} file(s), {}: {} damaged{}{}{}{}",
        report.checked,
        human_bytes(report.bytes),
        report.damaged.len(),
        if report.unread.is_empty() {
            String::new()
        } else {
            format!(
                ", {} encrypted file(s) checked by sha256 and age header only: no \
                 identity_file in [jobs.backups.encryption] to read them with",
                report.unread.len()
            )
        },
        if report.problems.is_empty() {
            String::new()
        } else {
            format!(", {} problem(s)", report.problems.len())
        },
        if report.unlisted.is_empty() {
            String::new()
        } else {
            format!(", {} file(s) in no manifest", report.unlisted.len())
        },
        if report.exposed.is_empty() {
            String::new()
        } else {
            format!(
                ", {} file(s) or directories readable by other users",
                report.exposed.len()
            )
        }
    );
    let result =
        if report.damaged.is_empty() && report.problems.is_empty() && report.exposed.is_empty() {
            Ok(summary)
        } else {
            let what: Vec<String> = report
                .damaged
                .iter()
                .map(|d| format!("{}: {}", d.file, d.error))
                .chain(report.problems.iter().cloned())
                .chain(report.exposed.iter().map(|e| e.to_string()))
                .collect();
            Err(format!("{summary}: {}", what.join("; ")))
        };
    step.end(&result);
    result.map_err(JobError::Failed)
}

/// Why a backup file failed its check; recorded as its `damaged` text.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// The file is not there.
    #[error("missing")]
    Missing,
    /// Reading it to hash it failed.
    #[error("{0}")]
    Unreadable(std::io::Error),
    /// The hashing task ended without an answer.
    #[error("{0}")]
    Task(tokio::task::JoinError),
    /// What is wrong with it (size, sha256, header, archive), joined with ", ".
    #[error("{}", .0.join(", "))]
    Damaged(Vec<String>),
}

/// How far a file that passed could be checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Checked {
    /// Everything asked for.
    Read,
    /// Size, sha256 and age header; the archive itself could not be read (no identity).
    HashOnly,
}

/// Checks one file: present, its size and sha256 as recorded, an age file when it should be
/// encrypted, and with `list_toc` (database dumps) readable by `pg_restore --list`.
pub async fn check_file(
    config: &BackupsConfig,
    keys: Option<&Keys>,
    path: &Path,
    entry: &Entry,
    list_toc: bool,
    events: &JobEvents,
) -> Result<Checked, VerifyError> {
    let (size, sha256) = (entry.size, entry.sha256.as_str());
    let p = path.to_path_buf();
    let (actual_size, actual) = tokio::task::spawn_blocking(move || sha256_file(&p))
        .await
        .map_err(VerifyError::Task)?
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                VerifyError::Missing
            } else {
                VerifyError::Unreadable(e)
            }
        })?;
    let mut problems = Vec::new();
    if actual_size != size {
        problems.push(format!("size {actual_size} instead of {size}"));
    }
    if actual != sha256 {
        problems.push(format!(
            "sha256 mismatch (manifest {}…, file {}…)",
            &sha256[..12.min(sha256.len())],
            &actual[..12]
        ));
    }
    let encrypted = should_be_encrypted(entry);
    let mut checked = Checked::Read;
    if encrypted {
        if let Err(e) = encryption::ensure_encrypted(path) {
            // Nothing more to learn from it: it is not what the manifest says it is.
            problems.push(e.to_string());
            return Err(VerifyError::Damaged(problems));
        }
    }
    if list_toc {
        let listed = if !encrypted {
            let mut cmd = tokio::process::Command::new(&config.pg_restore);
            cmd.arg("--list").arg(path);
            Some(run_tool(cmd, "pg_restore --list", config.command_timeout, events).await)
        } else if let Some(keys) = keys.filter(|k| k.can_decrypt()) {
            let mut cmd = tokio::process::Command::new(&config.pg_restore);
            cmd.arg("--list").arg("--format=custom");
            let (keys, file) = (keys.clone(), path.to_path_buf());
            let feed: super::Feed = Box::new(move |stdin| {
                encryption::decrypt_into(&keys, &file, stdin, true).map(drop)
            });
            Some(
                run_tool_io(
                    cmd,
                    "pg_restore --list",
                    config.command_timeout,
                    events,
                    Some(feed),
                    |mut out| {
                        use std::io::Read;
                        let mut toc = String::new();
                        out.read_to_string(&mut toc)
                            .map_err(|source| BackupError::Read {
                                what: "pg_restore's list",
                                source,
                            })?;
                        Ok(toc)
                    },
                )
                .await,
            )
        } else {
            checked = Checked::HashOnly;
            None
        };
        match listed {
            Some(Ok(toc))
                if toc
                    .lines()
                    .any(|l| !l.starts_with(';') && !l.trim().is_empty()) => {}
            Some(Ok(_)) => problems.push("pg_restore --list shows an empty archive".into()),
            Some(Err(e)) => problems.push(e.to_string()),
            None => {}
        }
    }
    if problems.is_empty() {
        Ok(checked)
    } else {
        Err(VerifyError::Damaged(problems))
    }
}

/// Whether a file must be an age file: its manifest says so, or its name does (a manifest
/// edited to call an `.age` file plaintext does not make it so).
pub fn should_be_encrypted(entry: &Entry) -> bool {
    entry.encrypted || entry.file.ends_with(encryption::SUFFIX)
}

/// The backup dir, and everything in it (dot-files, the agent's work files, aside), whose
/// mode is wider than the agent's own: a dump another user can read leaks production data.
fn exposed(dir: &Path) -> Vec<ExposedPath> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(path) = stack.pop() {
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        let rel = match path.strip_prefix(dir) {
            Ok(r) if r.as_os_str().is_empty() => ".".to_string(),
            Ok(r) => r.to_string_lossy().into_owned(),
            Err(_) => continue,
        };
        let is_dir = meta.is_dir();
        if !is_dir && !meta.is_file() {
            continue;
        }
        let allowed = if is_dir {
            super::DIR_MODE
        } else {
            super::FILE_MODE
        };
        if let Some(mode) = super::wider_mode(&meta, allowed) {
            out.push(ExposedPath {
                path: rel,
                mode,
                dir: is_dir,
            });
        }
        if is_dir {
            if let Ok(read) = std::fs::read_dir(&path) {
                for entry in read.flatten() {
                    if !entry.file_name().to_string_lossy().starts_with('.') {
                        stack.push(entry.path());
                    }
                }
            }
        }
    }
    out.sort_by(|a, b| a.path.cmp(&b.path));
    out
}

/// Backup files that no manifest lists (dot-files, manifests and the pending list aside).
fn unlisted(dir: &Path, listed: &BTreeSet<String>) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(read) = std::fs::read_dir(&d) else {
            continue;
        };
        for entry in read.flatten() {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') {
                continue;
            }
            let Ok(rel) = path.strip_prefix(dir) else {
                continue;
            };
            let rel = rel.to_string_lossy().into_owned();
            if rel == manifest::MANIFESTS || rel == super::offsite::PENDING_FILE {
                continue;
            }
            match entry.file_type() {
                Ok(t) if t.is_dir() => stack.push(path),
                Ok(_) if !listed.contains(&rel) => out.push(rel),
                _ => {}
            }
        }
    }
    out.sort();
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn files_and_directories_wider_than_private_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o700)).unwrap();
        super::super::write_atomic(&root.join("production/db/db-1.dump"), b"x").unwrap();
        assert_eq!(
            exposed(root),
            Vec::new(),
            "what the agent writes is private"
        );
        std::fs::set_permissions(
            root.join("production/db/db-1.dump"),
            std::fs::Permissions::from_mode(0o640),
        )
        .unwrap();
        std::fs::set_permissions(
            root.join("production"),
            std::fs::Permissions::from_mode(0o755),
        )
        .unwrap();
        let found = exposed(root);
        assert_eq!(
            found.iter().map(|e| e.to_string()).collect::<Vec<_>>(),
            vec![
                "production is mode 0755, wider than 0700 (chmod 700 it)",
                "production/db/db-1.dump is mode 0640, wider than 0600 (chmod 600 it)",
            ]
        );
    }
}
