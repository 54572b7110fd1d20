//! The offsite copy: after each run, rsync the new files (and whatever earlier runs could not
//! copy) to the configured destination and check the copy. A local destination is read back
//! and hashed; a remote one (`user@host:path` over ssh, `rsync://host[:port]/module/path`) is
//! compared with `rsync --checksum --dry-run`, after the local file was checked against its
//! manifest's sha256. Files not copied and checked stay in `offsite-pending.json` in the
//! backup dir and are tried again at the next run; the local backups are never touched.
//!
//! Copies are private whatever the source's modes (`--chmod`: files 0600, directories 0700).
//! After a complete, checked copy (nothing pending), [`prune`] applies the local retention to
//! what the target holds: the same policy over the same backups keeps the same ones, so the
//! target ends up holding what the backup dir holds, and never fewer than `minimum` of a
//! series (when copies lagged, it keeps older ones instead). Manifests the backup dir no
//! longer has go too once no file of their run is left there.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use jiff::Timestamp;
use sentinel_proto::v1::OffsiteReport;
use serde::{Deserialize, Serialize};

use super::dump::sha256_file;
use super::manifest::{self, Kind, Series, MANIFESTS};
use super::{encryption, retention, run_tool, safe_name, write_atomic, BackupError};
use crate::config::BackupsConfig;
use crate::jobs::JobEvents;

/// Why listing or pruning the offsite target failed.
#[derive(Debug, thiserror::Error)]
pub enum OffsiteError {
    /// `rsync --list-only` of the target failed.
    #[error("listing {target}: {source}")]
    List {
        /// The target.
        target: String,
        /// Why.
        source: BackupError,
    },
    /// `rsync --delete` at the target failed.
    #[error("pruning at {target}: {source}")]
    Prune {
        /// The target.
        target: String,
        /// Why.
        source: BackupError,
    },
    /// Files rsync was to remove are still listed at the target.
    #[error(
        "pruning at {target}: {} file(s) still there after rsync removed them: {}",
        .files.len(),
        .files.join(", ")
    )]
    StillThere {
        /// The target.
        target: String,
        /// The files still there.
        files: Vec<String>,
    },
    /// Preparing the prune in the backup dir failed.
    #[error(transparent)]
    Local(#[from] BackupError),
}

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

/// rsync with the transport options `dest` needs.
fn rsync_for(config: &BackupsConfig, dest: &Destination) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(&config.rsync);
    cmd.arg("--timeout=120");
    match dest {
        Destination::Daemon => {
            cmd.arg("--contimeout=20");
        }
        Destination::Ssh => {
            cmd.arg("--rsh=ssh -o BatchMode=yes -o ConnectTimeout=20");
        }
        Destination::Local(_) => {}
    }
    cmd
}

/// `target` as a directory argument for rsync (trailing slash: its contents).
fn target_dir(target: &str) -> String {
    format!("{}/", target.trim_end_matches('/'))
}

/// Copies `new` plus the pending list to `target` and checks the copies; updates the pending
/// list. Never fails the run: what went wrong is in the report.
pub async fn sync(
    config: &BackupsConfig,
    dir: &Path,
    target: &str,
    new: Vec<Pending>,
    events: &JobEvents,
) -> OffsiteReport {
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
    let mut report = OffsiteReport {
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
    write_private(&list, names.as_bytes()).map_err(|e| (Vec::new(), e.to_string()))?;
    let source = format!("{}/", dir.display());
    let target_dir = target_dir(target);
    let rsync = |extra: &[&str]| {
        let mut cmd = rsync_for(config, &dest);
        // Private at the target whatever the modes here (files of older runs may be wider).
        cmd.arg("--archive")
            .arg(format!(
                "--chmod=D{:04o},F{:04o}",
                super::DIR_MODE,
                super::FILE_MODE
            ))
            .arg(format!("--files-from={}", list.display()));
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

/// Writes a small private work file (file lists, filter rules).
fn write_private(path: &Path, bytes: &[u8]) -> Result<(), BackupError> {
    use std::io::Write;
    super::create_private_file(path)
        .and_then(|mut f| f.write_all(bytes))
        .map_err(|source| BackupError::File {
            doing: "writing",
            path: path.to_path_buf(),
            source,
        })
}

/// Whether `file` is a path the agent could have written: plain names only, so it can go
/// into an rsync filter rule as it is (no wildcards) and never leaves the target.
fn plain_path(file: &str) -> bool {
    manifest::is_relative_inside(file) && file.split('/').all(safe_name)
}

/// The regular files under `target`, relative to it (`rsync --list-only --recursive`).
pub async fn list(
    config: &BackupsConfig,
    target: &str,
    events: &JobEvents,
) -> Result<Vec<String>, OffsiteError> {
    let mut cmd = rsync_for(config, &destination(target));
    cmd.arg("--list-only")
        .arg("--recursive")
        .arg(target_dir(target));
    let out = run_tool(cmd, "rsync --list-only", config.command_timeout, events)
        .await
        .map_err(|source| OffsiteError::List {
            target: target.to_string(),
            source,
        })?;
    Ok(parse_listing(&out))
}

/// Regular files of an `rsync --list-only` listing: `-rw------- 1,234 2026/04/09 02:00:00
/// NAME` (names with spaces are none of the agent's and are left out).
fn parse_listing(out: &str) -> Vec<String> {
    out.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            match fields.as_slice() {
                [perms, _, _, _, name] if perms.starts_with('-') => Some(name.to_string()),
                _ => None,
            }
        })
        .collect()
}

/// A backup file's series and run id, from the name the agent gives it
/// (`ENV/DB/DB-RUN.dump`, `globals/REF/REF-RUN.sql`, `files/files-RUN.tar`, each maybe
/// `.age`): for files whose manifest the backup dir no longer has.
pub fn parse_backup_name(file: &str) -> Option<(Series, String)> {
    let parts: Vec<&str> = file.split('/').collect();
    let plain = |name: &str| {
        name.strip_suffix(encryption::SUFFIX)
            .unwrap_or(name)
            .to_string()
    };
    let run_of = |name: &str, prefix: &str, ext: &str| -> Option<String> {
        let run = plain(name)
            .strip_prefix(&format!("{prefix}-"))?
            .strip_suffix(ext)?
            .to_string();
        (!run.is_empty()).then_some(run)
    };
    let series = |kind, environment: &str, database: &str| Series {
        kind,
        environment: environment.to_string(),
        database: database.to_string(),
    };
    match parts.as_slice() {
        ["files", name] => Some((
            series(Kind::Files, "", "files"),
            run_of(name, "files", ".tar")?,
        )),
        ["globals", r, name] if name.ends_with(".sql") || name.ends_with(".sql.age") => {
            Some((series(Kind::Globals, "", r), run_of(name, r, ".sql")?))
        }
        [env, db, name] => Some((series(Kind::Database, env, db), run_of(name, db, ".dump")?)),
        _ => None,
    }
}

/// When run `run_id` (`20260409T020000Z`, maybe `-2`) was taken.
fn run_time(run_id: &str) -> Option<Timestamp> {
    let stamp = run_id.split('-').next()?;
    jiff::civil::DateTime::strptime("%Y%m%dT%H%M%SZ", stamp)
        .ok()?
        .to_zoned(jiff::tz::TimeZone::UTC)
        .ok()
        .map(|z| z.timestamp())
}

/// What the target holds of one series, as retention sees it.
struct Held {
    file: String,
    run_id: String,
    candidate: retention::Candidate,
}

/// Applies retention to what `target` holds of the series in `done` (see the module docs);
/// returns the files removed there. Call it only after a complete, checked copy.
#[allow(clippy::too_many_arguments)]
pub async fn prune(
    config: &BackupsConfig,
    dir: &Path,
    target: &str,
    done: &BTreeSet<Series>,
    policy: retention::Policy,
    now: Timestamp,
    tz: &jiff::tz::TimeZone,
    events: &JobEvents,
) -> Result<Vec<String>, OffsiteError> {
    let (manifests, _) = manifest::load_all(dir);
    // What the backup dir knows of each file, pruned here or not: when it was taken, and
    // whether verify found it damaged.
    let known: BTreeMap<&str, (&str, &manifest::Entry)> = manifests
        .iter()
        .flat_map(|m| {
            m.entries
                .iter()
                .map(|e| (e.file.as_str(), (m.run_id.as_str(), e)))
        })
        .collect();
    let local_runs: BTreeSet<&str> = manifests.iter().map(|m| m.run_id.as_str()).collect();
    let held = list(config, target, events).await?;
    let mut by_series: BTreeMap<Series, Vec<Held>> = BTreeMap::new();
    let mut offsite_manifests = Vec::new();
    let mut runs_left: BTreeSet<String> = BTreeSet::new();
    for file in &held {
        if let Some(run) = file
            .strip_prefix(&format!("{MANIFESTS}/"))
            .and_then(|n| n.strip_suffix(".json"))
        {
            offsite_manifests.push((file.clone(), run.to_string()));
            continue;
        }
        let found = match known.get(file.as_str()) {
            Some((run, e)) => Some((
                e.series.clone(),
                run.to_string(),
                e.taken_at,
                e.damaged.is_none(),
            )),
            None => parse_backup_name(file)
                .and_then(|(series, run)| run_time(&run).map(|at| (series, run, at, true))),
        };
        let Some((series, run_id, taken_at, good)) = found else {
            continue;
        };
        if !done.contains(&series) || !plain_path(file) {
            runs_left.insert(run_id);
            continue;
        }
        by_series.entry(series).or_default().push(Held {
            file: file.clone(),
            run_id,
            candidate: retention::Candidate { taken_at, good },
        });
    }
    let mut remove = Vec::new();
    for held in by_series.values() {
        let candidates: Vec<retention::Candidate> = held.iter().map(|h| h.candidate).collect();
        for (h, kept) in held
            .iter()
            .zip(retention::keep(&candidates, policy, now, tz))
        {
            if kept {
                runs_left.insert(h.run_id.clone());
            } else {
                remove.push(h.file.clone());
            }
        }
    }
    for (file, run) in offsite_manifests {
        if !local_runs.contains(run.as_str()) && !runs_left.contains(&run) && plain_path(&file) {
            remove.push(file);
        }
    }
    if remove.is_empty() {
        return Ok(remove);
    }
    delete(config, dir, target, &remove, events).await?;
    // Checked like the copies: what was meant to go is gone.
    let after: BTreeSet<String> = list(config, target, events).await?.into_iter().collect();
    let stayed: Vec<String> = remove
        .iter()
        .filter(|f| after.contains(*f))
        .cloned()
        .collect();
    if !stayed.is_empty() {
        return Err(OffsiteError::StillThere {
            target: target.to_string(),
            files: stayed,
        });
    }
    remove.sort();
    Ok(remove)
}

/// Removes `files` (plain relative paths) at `target` with rsync: an empty copy of their
/// directories is synced with `--delete`, where filter rules let deletion reach exactly
/// those files (every directory and every other file is protected).
async fn delete(
    config: &BackupsConfig,
    dir: &Path,
    target: &str,
    files: &[String],
    events: &JobEvents,
) -> Result<(), OffsiteError> {
    let work = dir.join(".offsite-prune");
    let skeleton = work.join("dirs");
    let rules = work.join("files");
    let io = |p: &Path, source: std::io::Error| BackupError::File {
        doing: "preparing the prune in",
        path: p.to_path_buf(),
        source,
    };
    if work.exists() {
        std::fs::remove_dir_all(&work).map_err(|e| io(&work, e))?;
    }
    super::create_private_dir_all(&skeleton).map_err(|e| io(&skeleton, e))?;
    for file in files {
        if let Some(parent) = Path::new(file).parent() {
            let d = skeleton.join(parent);
            super::create_private_dir_all(&d).map_err(|e| io(&d, e))?;
        }
    }
    let patterns: String = files.iter().map(|f| format!("/{f}\n")).collect();
    write_private(&rules, patterns.as_bytes())?;
    let mut cmd = rsync_for(config, &destination(target));
    cmd.arg("--recursive")
        .arg("--delete")
        .arg("--filter=P */")
        .arg(format!("--include-from={}", rules.display()))
        .arg("--include=*/")
        .arg("--exclude=*")
        .arg(format!("{}/", skeleton.display()))
        .arg(target_dir(target));
    let result = run_tool(cmd, "rsync --delete", config.command_timeout, events).await;
    let _ = std::fs::remove_dir_all(&work);
    result.map(drop).map_err(|source| OffsiteError::Prune {
        target: target.to_string(),
        source,
    })
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

    #[test]
    fn backup_files_are_known_by_their_names() {
        let (s, run) = parse_backup_name("production/shop/shop-20260409T020000Z.dump").unwrap();
        assert_eq!(
            (s.kind, s.environment.as_str(), s.database.as_str()),
            (Kind::Database, "production", "shop")
        );
        assert_eq!(run, "20260409T020000Z");
        let (s, run) = parse_backup_name("globals/ro/ro-20260409T020000Z-2.sql.age").unwrap();
        assert_eq!(
            (s.kind, s.database.as_str(), run.as_str()),
            (Kind::Globals, "ro", "20260409T020000Z-2")
        );
        let (s, _) = parse_backup_name("files/files-20260409T020000Z.tar").unwrap();
        assert_eq!(s.kind, Kind::Files);
        assert!(parse_backup_name("production/shop/other-20260409T020000Z.dump").is_none());
        assert!(parse_backup_name("notes.txt").is_none());
        assert_eq!(
            run_time("20260409T020000Z-2"),
            Some("2026-04-09T02:00:00Z".parse().unwrap())
        );
        assert!(!plain_path("production/shop/*.dump"));
        assert!(!plain_path("../x"));
    }

    #[test]
    fn listings_name_regular_files_only() {
        let out = "drwx------          4,096 2026/04/09 02:00:00 .\n\
                   drwx------          4,096 2026/04/09 02:00:00 production\n\
                   -rw-------          1,234 2026/04/09 02:00:00 production/a.dump\n\
                   -rw------- 9 2026/04/09 02:00:00 name with spaces\n";
        assert_eq!(parse_listing(out), vec!["production/a.dump".to_string()]);
    }
}
