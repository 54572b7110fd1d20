//! The offsite copy: after each run, rsync the new files (and whatever earlier runs could not
//! copy) to the configured destination and check the copy. A local destination is read back
//! and hashed; a remote one (`user@host:path` over ssh, `rsync://host[:port]/module/path`) is
//! compared with `rsync --checksum --dry-run`, after the local file was checked against its
//! manifest's sha256. Files not copied and checked stay in `offsite-pending.json` in the
//! backup dir and are tried again at the next run; the local backups are never touched.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::dump::sha256_file;
use super::{run_tool, write_atomic};
use crate::config::BackupsConfig;
use crate::jobs::JobEvents;

/// The pending list's file in the backup dir.
pub const PENDING_FILE: &str = "offsite-pending.json";

/// A file to copy, and the sha256 the copy must have (None: hash the local file now, as for
/// manifests, which change when pruning marks them).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pending {
    /// Path relative to the backup dir.
    pub file: String,
    /// The expected sha256.
    #[serde(default)]
    pub sha256: Option<String>,
}

/// What an offsite copy did.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// The destination.
    pub target: String,
    /// Files copied and checked in this run.
    pub copied: Vec<String>,
    /// Files still to copy (retried at the next run).
    pub pending: Vec<String>,
    /// Why the copy (or its check) failed.
    #[serde(default)]
    pub error: Option<String>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct PendingList {
    items: Vec<Pending>,
}

/// Where a destination is.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Destination {
    /// A directory on this host (a mounted disk): it must exist, so an unmounted disk is an
    /// error rather than a copy onto the root file system.
    Local(PathBuf),
    /// rsync daemon (`rsync://` or `host::module`).
    Daemon,
    /// rsync over ssh (`[user@]host:path`).
    Ssh,
}

fn destination(target: &str) -> Destination {
    if target.starts_with('/') {
        Destination::Local(PathBuf::from(target))
    } else if target.starts_with("rsync://") || target.contains("::") {
        Destination::Daemon
    } else {
        Destination::Ssh
    }
}

/// Copies `new` plus the pending list to `target` and checks the copies; updates the pending
/// list. Never fails the run: what went wrong is in the report.
pub async fn sync(
    config: &BackupsConfig,
    dir: &Path,
    target: &str,
    new: Vec<Pending>,
    events: &JobEvents,
) -> Report {
    let pending_path = dir.join(PENDING_FILE);
    let mut items: Vec<Pending> = std::fs::read(&pending_path)
        .ok()
        .and_then(|b| serde_json::from_slice::<PendingList>(&b).ok())
        .map(|l| l.items)
        .unwrap_or_default();
    let carried = items.len();
    for item in new {
        items.retain(|i| i.file != item.file);
        items.push(item);
    }
    // Pruned meanwhile: nothing to copy any more (and never anything outside the dir).
    items.retain(|i| super::manifest::is_relative_inside(&i.file) && dir.join(&i.file).exists());
    if carried > 0 {
        events.log(
            "agent",
            &format!("offsite: retrying {carried} file(s) earlier runs could not copy"),
        );
    }
    let mut report = Report {
        target: target.to_string(),
        ..Default::default()
    };
    let result = copy_and_check(config, dir, target, &mut items, events).await;
    match result {
        Ok(copied) => report.copied = copied,
        Err((copied, e)) => {
            report.copied = copied;
            report.error = Some(e);
        }
    }
    items.retain(|i| !report.copied.contains(&i.file));
    report.pending = items.iter().map(|i| i.file.clone()).collect();
    let list = PendingList { items };
    if let Err(e) = serde_json::to_vec_pretty(&list)
        .map_err(|e| e.to_string())
        .and_then(|b| write_atomic(&pending_path, &b).map_err(|e| e.to_string()))
    {
        let e = format!("saving the offsite pending list: {e}");
        report.error = Some(match report.error.take() {
            Some(prev) => format!("{prev}; {e}"),
            None => e,
        });
    }
    report
}

/// Copies and checks; returns the files whose copy is verified, or those and the error.
async fn copy_and_check(
    config: &BackupsConfig,
    dir: &Path,
    target: &str,
    items: &mut [Pending],
    events: &JobEvents,
) -> Result<Vec<String>, (Vec<String>, String)> {
    if items.is_empty() {
        return Ok(Vec::new());
    }
    // Every file's expected hash; a local file that no longer matches its manifest is not
    // copied (it would spread the damage) and stays pending.
    let mut bad = Vec::new();
    for item in items.iter_mut() {
        let path = dir.join(&item.file);
        let expected = item.sha256.clone();
        let actual = tokio::task::spawn_blocking(move || sha256_file(&path))
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r.map_err(|e| e.to_string()));
        match (actual, expected) {
            (Err(e), _) => bad.push(format!("{}: {e}", item.file)),
            (Ok((_, sha)), None) => item.sha256 = Some(sha),
            (Ok((_, sha)), Some(want)) if sha != want => bad.push(format!(
                "{}: local file no longer matches its manifest",
                item.file
            )),
            (Ok(_), Some(_)) => {}
        }
    }
    let dest = destination(target);
    if let Destination::Local(path) = &dest {
        if !path.is_dir() {
            return Err((
                Vec::new(),
                format!(
                    "offsite target {} is not a directory (not mounted?)",
                    path.display()
                ),
            ));
        }
    }
    let sendable: Vec<&Pending> = items
        .iter()
        .filter(|i| !bad.iter().any(|b| b.starts_with(&format!("{}:", i.file))))
        .collect();
    let list = dir.join(".offsite-files");
    let names: String = sendable.iter().map(|i| format!("{}\n", i.file)).collect();
    std::fs::write(&list, names)
        .map_err(|e| (Vec::new(), format!("writing {}: {e}", list.display())))?;
    let source = format!("{}/", dir.display());
    let target_dir = format!("{}/", target.trim_end_matches('/'));
    let rsync = |extra: &[&str]| {
        let mut cmd = tokio::process::Command::new(&config.rsync);
        cmd.arg("--archive")
            .arg(format!("--files-from={}", list.display()))
            .arg("--timeout=120");
        match dest {
            Destination::Daemon => {
                cmd.arg("--contimeout=20");
            }
            Destination::Ssh => {
                cmd.arg("--rsh=ssh -o BatchMode=yes -o ConnectTimeout=20");
            }
            Destination::Local(_) => {}
        }
        cmd.args(extra).arg(&source).arg(&target_dir);
        cmd
    };
    let timeout = config.command_timeout;
    let copied = run_tool(rsync(&[]), "rsync", timeout, events).await;
    if let Err(e) = copied {
        let _ = std::fs::remove_file(&list);
        return Err((Vec::new(), format!("copying to {target}: {e}")));
    }
    let mut ok = Vec::new();
    let mut mismatched = Vec::new();
    match &dest {
        Destination::Local(root) => {
            for item in &sendable {
                let path = root.join(&item.file);
                let got = tokio::task::spawn_blocking(move || sha256_file(&path))
                    .await
                    .map_err(|e| e.to_string())
                    .and_then(|r| r.map_err(|e| e.to_string()));
                match got {
                    Ok((_, sha)) if Some(&sha) == item.sha256.as_ref() => {
                        ok.push(item.file.clone())
                    }
                    Ok(_) => mismatched.push(format!("{}: the copy's sha256 differs", item.file)),
                    Err(e) => mismatched.push(format!("{}: reading the copy: {e}", item.file)),
                }
            }
        }
        Destination::Daemon | Destination::Ssh => {
            // Lists every file whose remote copy differs by content from the local one.
            let check = run_tool(
                rsync(&["--checksum", "--dry-run", "--itemize-changes"]),
                "rsync --checksum --dry-run",
                timeout,
                events,
            )
            .await;
            match check {
                Err(e) => {
                    let _ = std::fs::remove_file(&list);
                    return Err((Vec::new(), format!("checking the copy at {target}: {e}")));
                }
                Ok(out) => {
                    let differing: Vec<&str> = out
                        .lines()
                        .filter_map(|l| l.split_once(' '))
                        // `<f` / `>f`: a file rsync would transfer; attribute-only
                        // differences (`.f...og...`) do not count.
                        .filter(|(flags, _)| flags.starts_with("<f") || flags.starts_with(">f"))
                        .map(|(_, name)| name.trim())
                        .collect();
                    for item in &sendable {
                        if differing.contains(&item.file.as_str()) {
                            mismatched.push(format!("{}: the remote copy differs", item.file));
                        } else {
                            ok.push(item.file.clone());
                        }
                    }
                }
            }
        }
    }
    let _ = std::fs::remove_file(&list);
    let problems: Vec<String> = bad.into_iter().chain(mismatched).collect();
    if problems.is_empty() {
        Ok(ok)
    } else {
        Err((ok, problems.join("; ")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn destinations_are_told_apart() {
        assert_eq!(
            destination("/mnt/offsite"),
            Destination::Local("/mnt/offsite".into())
        );
        assert_eq!(
            destination("rsync://127.0.0.1:8873/offsite/"),
            Destination::Daemon
        );
        assert_eq!(destination("backup.example::offsite"), Destination::Daemon);
        assert_eq!(
            destination("backup@offsite.example:/srv/sentinel"),
            Destination::Ssh
        );
    }
}
