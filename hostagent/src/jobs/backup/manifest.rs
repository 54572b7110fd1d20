//! The manifest of a backup run (`BACKUP_DIR/manifests/RUN.json`): what each file of the run
//! holds, its size and sha256, whether it is encrypted, the tool and server versions, when it
//! was taken, and for database dumps the row count of every table. Verify checks files against
//! it, restore tests compare row counts with it, and retention marks what it pruned in it; it
//! is the backup directory's inventory. It is a file format, not the wire: job results carry
//! the contract's messages, converted from these types where a report is built.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use jiff::Timestamp;
use sentinel_proto::time::from_jiff;
use sentinel_proto::v1;
use serde::{Deserialize, Serialize};

use super::{write_atomic, BackupError};

/// The manifests' directory under a backup dir.
pub const MANIFESTS: &str = "manifests";

/// What a backup file holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// `pg_dump --format=custom` of one database.
    Database,
    /// `pg_dumpall --globals-only --no-role-passwords` of a cluster.
    Globals,
    /// A tar of configured paths.
    Files,
}

impl Kind {
    /// Its name in results and messages.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Database => "database",
            Kind::Globals => "globals",
            Kind::Files => "files",
        }
    }

    /// The contract's name for it.
    pub fn to_proto(self) -> v1::SeriesKind {
        match self {
            Kind::Database => v1::SeriesKind::Database,
            Kind::Globals => v1::SeriesKind::Globals,
            Kind::Files => v1::SeriesKind::Files,
        }
    }
}

/// Which series of backups a file belongs to: retention works per series.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Series {
    /// What it holds.
    pub kind: Kind,
    /// The environment (databases), else empty.
    pub environment: String,
    /// The database; for globals the DSN ref; for files "files".
    pub database: String,
}

impl Series {
    /// As job results carry it.
    pub fn to_proto(&self) -> v1::BackupSeries {
        v1::BackupSeries {
            kind: self.kind.to_proto() as i32,
            environment: self.environment.clone(),
            database: self.database.clone(),
        }
    }
}

impl std::fmt::Display for Series {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.kind {
            Kind::Database => write!(f, "{}/{}", self.environment, self.database),
            Kind::Globals => write!(f, "globals of {}", self.database),
            Kind::Files => write!(f, "files"),
        }
    }
}

/// One file of a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    /// Its series.
    #[serde(flatten)]
    pub series: Series,
    /// Path relative to the backup dir.
    pub file: String,
    /// Bytes.
    pub size: u64,
    /// SHA-256 of the file as stored (of the ciphertext when encrypted), lowercase hex.
    pub sha256: String,
    /// Whether the file is an age file (`[jobs.backups.encryption]` was set when it was
    /// written): verify reports one that does not start with the age header as damaged.
    #[serde(default)]
    pub encrypted: bool,
    /// The run's clock when it was taken (what retention and ages count from).
    pub taken_at: Timestamp,
    /// Wall-clock start and end of writing it.
    pub started_at: Timestamp,
    /// Wall-clock end.
    pub finished_at: Timestamp,
    /// `pg_dump --version` (or pg_dumpall's; empty for files).
    #[serde(default)]
    pub tool_version: String,
    /// The server's `server_version` (databases).
    #[serde(default)]
    pub server_version: String,
    /// Rows per table (`schema.table`), counted in the snapshot the dump was taken from.
    #[serde(default)]
    pub row_counts: BTreeMap<String, i64>,
    /// The paths a files backup holds.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<String>,
    /// Set when retention deleted the file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pruned_at: Option<Timestamp>,
    /// When verify last checked it, and what it found wrong (None: good).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verified_at: Option<Timestamp>,
    /// What verify found wrong with it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub damaged: Option<String>,
}

impl Entry {
    /// As job results carry it.
    pub fn to_proto(&self) -> v1::BackupEntry {
        v1::BackupEntry {
            series: Some(self.series.to_proto()),
            file: self.file.clone(),
            size: self.size,
            sha256: self.sha256.clone(),
            encrypted: self.encrypted,
            taken_at: Some(from_jiff(self.taken_at)),
            started_at: Some(from_jiff(self.started_at)),
            finished_at: Some(from_jiff(self.finished_at)),
            tool_version: self.tool_version.clone(),
            server_version: self.server_version.clone(),
            row_counts: self.row_counts.clone(),
            paths: self.paths.clone(),
            pruned_at: self.pruned_at.map(from_jiff),
            verified_at: self.verified_at.map(from_jiff),
            damaged: self.damaged.clone(),
        }
    }
}

/// A series whose backup failed in a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Failure {
    /// The series.
    #[serde(flatten)]
    pub series: Series,
    /// Why.
    pub error: String,
}

impl Failure {
    /// As job results carry it.
    pub fn to_proto(&self) -> v1::BackupFailure {
        v1::BackupFailure {
            series: Some(self.series.to_proto()),
            error: self.error.clone(),
        }
    }
}

/// One backup run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Format version.
    pub version: u32,
    /// The run's id (its UTC stamp), also the manifest's file name.
    pub run_id: String,
    /// Why it ran (schedule, operator, pre-deploy).
    #[serde(default)]
    pub reason: String,
    /// The run's clock.
    pub taken_at: Timestamp,
    /// True when the clock was simulated (test fleets).
    #[serde(default)]
    pub simulated_clock: bool,
    /// Wall-clock start and end.
    pub started_at: Timestamp,
    /// Wall-clock end.
    pub finished_at: Timestamp,
    /// The files written.
    pub entries: Vec<Entry>,
    /// What failed.
    #[serde(default)]
    pub failures: Vec<Failure>,
}

impl Manifest {
    /// Its path under `dir`.
    pub fn path(dir: &Path, run_id: &str) -> PathBuf {
        dir.join(MANIFESTS).join(format!("{run_id}.json"))
    }

    /// Its path relative to the backup dir.
    pub fn relative(run_id: &str) -> String {
        format!("{MANIFESTS}/{run_id}.json")
    }

    /// Writes it atomically (temp file, fsync, rename, fsync of the directory).
    pub fn save(&self, dir: &Path) -> Result<(), BackupError> {
        let path = Self::path(dir, &self.run_id);
        let json = serde_json::to_vec_pretty(self).map_err(|e| BackupError::Io {
            path: path.clone(),
            message: e.to_string(),
        })?;
        write_atomic(&path, &json)
    }

    /// Whether every entry was pruned (the manifest then goes too).
    pub fn all_pruned(&self) -> bool {
        self.entries.iter().all(|e| e.pruned_at.is_some())
    }
}

/// Every manifest under `dir`, oldest run first, and the ones that could not be read (path,
/// reason): an unreadable manifest is reported, never silently skipped.
pub fn load_all(dir: &Path) -> (Vec<Manifest>, Vec<(PathBuf, String)>) {
    let mut manifests = Vec::new();
    let mut problems = Vec::new();
    let Ok(read) = std::fs::read_dir(dir.join(MANIFESTS)) else {
        return (manifests, problems);
    };
    for entry in read.flatten() {
        let path = entry.path();
        if path.extension().and_then(|e| e.to_str()) != Some("json") {
            continue;
        }
        match std::fs::read(&path)
            .map_err(|e| e.to_string())
            .and_then(|b| serde_json::from_slice::<Manifest>(&b).map_err(|e| e.to_string()))
            .and_then(
                |m| match m.entries.iter().find(|e| !is_relative_inside(&e.file)) {
                    // Retention deletes what manifests name: never outside the backup dir.
                    Some(e) => Err(format!(
                        "entry {:?} is not a path inside the backup dir",
                        e.file
                    )),
                    None => Ok(m),
                },
            ) {
            Ok(m) => manifests.push(m),
            Err(e) => problems.push((path, e)),
        }
    }
    manifests.sort_by(|a, b| (a.taken_at, &a.run_id).cmp(&(b.taken_at, &b.run_id)));
    (manifests, problems)
}

/// Whether `file` is a relative path that stays inside the directory it is joined to.
pub fn is_relative_inside(file: &str) -> bool {
    let path = Path::new(file);
    !file.is_empty()
        && path
            .components()
            .all(|c| matches!(c, std::path::Component::Normal(_)))
}

/// What the backup dir holds now, per series (in series order), each series' retained
/// backups oldest first: as job results report it.
pub fn inventory(manifests: &[Manifest]) -> Vec<v1::SeriesInventory> {
    let mut by_series: BTreeMap<&Series, Vec<&Entry>> = BTreeMap::new();
    for m in manifests {
        for e in m.entries.iter().filter(|e| e.pruned_at.is_none()) {
            by_series.entry(&e.series).or_default().push(e);
        }
    }
    by_series
        .into_iter()
        .map(|(series, mut entries)| {
            entries.sort_by_key(|e| e.taken_at);
            v1::SeriesInventory {
                series: Some(series.to_proto()),
                backups: entries
                    .into_iter()
                    .map(|e| v1::BackupItem {
                        file: e.file.clone(),
                        taken_at: Some(from_jiff(e.taken_at)),
                        size: e.size,
                        sha256: e.sha256.clone(),
                        damaged: e.damaged.clone(),
                    })
                    .collect(),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_manifest_naming_a_file_outside_the_backup_dir_is_refused() {
        assert!(is_relative_inside("production/db/db-1.dump"));
        assert!(!is_relative_inside("../etc/passwd"));
        assert!(!is_relative_inside("/etc/passwd"));
        assert!(!is_relative_inside("a/../../b"));
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join(MANIFESTS)).unwrap();
        let now = Timestamp::now();
        let entry = Entry {
            series: Series {
                kind: Kind::Files,
                environment: String::new(),
                database: "files".into(),
            },
            file: "../../etc/passwd".into(),
            size: 1,
            sha256: String::new(),
            encrypted: false,
            taken_at: now,
            started_at: now,
            finished_at: now,
            tool_version: String::new(),
            server_version: String::new(),
            row_counts: BTreeMap::new(),
            paths: Vec::new(),
            pruned_at: None,
            verified_at: None,
            damaged: None,
        };
        let m = Manifest {
            version: 1,
            run_id: "r1".into(),
            reason: String::new(),
            taken_at: now,
            simulated_clock: false,
            started_at: now,
            finished_at: now,
            entries: vec![entry],
            failures: Vec::new(),
        };
        m.save(dir.path()).unwrap();
        let (ok, problems) = load_all(dir.path());
        assert!(ok.is_empty());
        assert!(problems[0].1.contains("not a path inside"), "{problems:?}");
    }
}
