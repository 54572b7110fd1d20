//! An app's releases on the host: unpacking a bundle, the `current` symlink, the history of
//! switches, pruning and the audit log.
//!
//! ```text
//! APP_DIR/releases/<commit>/     one unpacked bundle per release
//! APP_DIR/current -> releases/<commit>
//! APP_DIR/releases.json          {"history": [...]}: releases in the order they went live
//! APP_DIR/audit.log              one line per deploy step
//! ```
//!
//! The history exists because mtimes lie (a redeploy, a restore, a `touch`): "the previous
//! release" is the one that was live before the current one. A forward switch (a deploy) moves
//! its commit to the end of the history; a switch back (a rollback) drops the releases after
//! its target, so rolling back twice goes two releases back and never "forward" into the
//! release that just failed.
//!
//! `unpack` turns a bundle into a release directory, `history` switches `current` and
//! prunes, `audit` writes the audit log; what they share (the layout, commit names, file
//! system helpers) lives here.

mod audit;
mod history;
mod unpack;

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use super::events::JobError;

pub use audit::{audit, AuditLine};
pub use history::{
    clear_current, current_release, previous_release, prune, switch_back, switch_current,
};
pub use unpack::{register_env_secrets, unpack_bundle};

/// Folder of the unpacked releases, inside the app directory.
pub const RELEASES_DIR: &str = "releases";
/// The symlink to the live release, inside the app directory.
pub const CURRENT_LINK: &str = "current";
/// The history of switches, inside the app directory.
pub const STATE_FILE: &str = "releases.json";
/// The audit log, inside the app directory.
pub const AUDIT_LOG: &str = "audit.log";
/// The longest commit string (a SHA-256 hex digest is 64).
const MAX_COMMIT_LEN: usize = 64;

/// Checks a commit string: 1 to 64 of `[0-9a-zA-Z._-]`, not starting with `.` (that excludes
/// `.`, `..` and the hidden names this module uses for its own temporary directories).
pub fn validate_commit(commit: &str) -> Result<(), JobError> {
    let ok = !commit.is_empty()
        && commit.len() <= MAX_COMMIT_LEN
        && !commit.starts_with('.')
        && commit
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(JobError::Failed(format!(
            "invalid commit {:?}: expected 1 to {MAX_COMMIT_LEN} of [0-9a-zA-Z._-], not starting with '.'",
            commit.chars().take(80).collect::<String>()
        )))
    }
}

/// `APP_DIR/releases/<commit>`.
pub fn release_dir(app_dir: &Path, commit: &str) -> PathBuf {
    app_dir.join(RELEASES_DIR).join(commit)
}

fn fail(message: String) -> JobError {
    JobError::Failed(message)
}

fn io_fail(what: &str, path: &Path, e: io::Error) -> JobError {
    fail(format!("{what} {}: {e}", path.display()))
}

/// Makes a rename in `dir` durable; best effort, since a failure here changes nothing we can
/// act on.
fn sync_dir(dir: &Path) {
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

fn unique_suffix() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("{}-{nanos}", std::process::id())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commits_are_validated() {
        for ok in ["abc123", "v1.2.3", "feature_x-1", &"a".repeat(64)] {
            assert!(validate_commit(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            ".",
            "..",
            ".hidden",
            "a/b",
            "a b",
            "ä",
            &"a".repeat(65),
            "x\n",
        ] {
            assert!(validate_commit(bad).is_err(), "{bad:?}");
        }
    }
}
