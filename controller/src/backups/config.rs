//! `[backups]` of the controller config: which host backs up what, where, how long backups are
//! kept, the offsite target, the schedules (cron expressions in a time zone) and the restore
//! test's cluster and invariants. Credentials are not here: `dsn_ref`s name DSNs in the backup
//! host agent's `[jobs.backups.dsns]`.

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::schedule::Schedule;

/// `[backups]`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BackupsConfig {
    /// The agent that runs backups, verifies and restore tests (the backup host, e.g. "argus").
    pub host: String,
    /// Where that host keeps backups (under its agent's `jobs.backups.backup_dirs`).
    pub backup_dir: PathBuf,
    /// The time zone of the schedules and of retention's days and weeks: an IANA name
    /// ("Europe/Prague"), "UTC" or a fixed offset ("+01:00").
    #[serde(default = "defaults::time_zone")]
    pub time_zone: String,
    /// How many backups are kept.
    #[serde(default)]
    pub retention: RetentionConfig,
    /// When backups, verifies and restore tests run.
    #[serde(default)]
    pub schedule: ScheduleConfig,
    /// Where new backup files are copied with rsync after each run: a directory on the backup
    /// host, `user@host:path` or `rsync://host[:port]/module/path`; empty: no offsite copy.
    #[serde(default)]
    pub offsite_target: String,
    /// DSN ref (on the backup host) for the cluster's globals: roles without passwords,
    /// memberships, tablespaces; empty: none.
    #[serde(default)]
    pub globals_dsn_ref: String,
    /// Paths tarred at every backup run (the controller's secrets and state), on `files_host`.
    #[serde(default)]
    pub file_paths: Vec<PathBuf>,
    /// The agent that tars `file_paths` (the controller's own host, when it runs an agent);
    /// default: `host`. It writes to the same `backup_dir` and offsite target.
    #[serde(default)]
    pub files_host: Option<String>,
    /// The restore test.
    #[serde(default)]
    pub restore_test: RestoreTestConfig,
    /// How long a backup job may wait for its host (and so how long it may run before the
    /// controller counts it as timed out, plus `jobs.run_timeout`).
    #[serde(default = "defaults::job_ttl", with = "humantime_serde")]
    pub job_ttl: Duration,
    /// The databases, each with the DSN ref its dump connects with (the database name itself
    /// replaces the DSN's `dbname`, so one read-only DSN can serve a whole cluster).
    #[serde(default)]
    pub databases: Vec<DatabaseConfig>,
}

/// `[backups.retention]`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RetentionConfig {
    /// The newest backup of each of this many days.
    #[serde(default = "defaults::daily")]
    pub daily: u32,
    /// The newest backup of each of this many ISO weeks.
    #[serde(default = "defaults::weekly")]
    pub weekly: u32,
    /// Never fewer than this many backups of a database.
    #[serde(default = "defaults::minimum")]
    pub minimum: u32,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        Self {
            daily: defaults::daily(),
            weekly: defaults::weekly(),
            minimum: defaults::minimum(),
        }
    }
}

/// `[backups.schedule]`: cron expressions (5 fields, or 6 with seconds first) in `time_zone`;
/// an empty string turns that schedule off.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ScheduleConfig {
    /// Backups.
    #[serde(default = "defaults::backup_cron")]
    pub backup: String,
    /// Verifies.
    #[serde(default = "defaults::verify_cron")]
    pub verify: String,
    /// Restore tests.
    #[serde(default = "defaults::restore_test_cron")]
    pub restore_test: String,
}

impl Default for ScheduleConfig {
    fn default() -> Self {
        Self {
            backup: defaults::backup_cron(),
            verify: defaults::verify_cron(),
            restore_test: defaults::restore_test_cron(),
        }
    }
}

/// `[backups.restore_test]`.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RestoreTestConfig {
    /// DSN ref (on the backup host) of a test cluster where a role with CREATEDB restores
    /// into scratch databases; empty: no restore tests.
    #[serde(default)]
    pub cluster_dsn_ref: String,
    /// Queries that must return true on every restored database.
    #[serde(default)]
    pub invariants: Vec<String>,
}

/// `[[backups.databases]]`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct DatabaseConfig {
    /// Its environment ("production", "staging", ...).
    pub environment: String,
    /// The database name.
    pub database: String,
    /// The DSN the backup host connects with (a read-only role).
    pub dsn_ref: String,
    /// The app it belongs to: a production deploy of that app with `db_change` backs it up
    /// first.
    #[serde(default)]
    pub app: Option<String>,
    /// Queries that must return true on its restore.
    #[serde(default)]
    pub invariants: Vec<String>,
}

mod defaults {
    use std::time::Duration;

    pub fn time_zone() -> String {
        "UTC".into()
    }
    pub fn daily() -> u32 {
        7
    }
    pub fn weekly() -> u32 {
        4
    }
    pub fn minimum() -> u32 {
        3
    }
    pub fn backup_cron() -> String {
        "0 2 * * *".into()
    }
    pub fn verify_cron() -> String {
        "0 6 * * *".into()
    }
    pub fn restore_test_cron() -> String {
        "0 4 1 * *".into()
    }
    pub fn job_ttl() -> Duration {
        Duration::from_secs(6 * 3600)
    }
}

/// Names that become directory names on the backup host.
fn plain(name: &str) -> bool {
    sentinel_proto::backup::safe_name(name)
}

impl BackupsConfig {
    /// Why this section cannot work, naming the key (relative to `[backups]`), if it cannot.
    pub fn problem(&self) -> Option<(String, String)> {
        let p = |k: &str, m: String| Some((k.to_string(), m));
        if self.host.trim().is_empty() {
            return p("host", "must name the backup host's agent".into());
        }
        if !self.backup_dir.is_absolute() {
            return p(
                "backup_dir",
                format!("{} must be absolute", self.backup_dir.display()),
            );
        }
        if let Err(e) = sentinel_proto::backup::parse_time_zone(&self.time_zone) {
            return p("time_zone", e);
        }
        if self.retention.daily == 0 && self.retention.weekly == 0 {
            return p(
                "retention",
                "daily and weekly are both 0: nothing would be kept".into(),
            );
        }
        if self.retention.minimum == 0 {
            return p("retention.minimum", "must be at least 1".into());
        }
        for (key, expr) in self.schedule.entries() {
            if let Err(e) = Schedule::parse(key, expr, &self.time_zone) {
                return p(&format!("schedule.{key}"), e);
            }
        }
        if !self.globals_dsn_ref.is_empty() && !plain(&self.globals_dsn_ref) {
            return p(
                "globals_dsn_ref",
                format!("{:?} must be [A-Za-z0-9_.-]+", self.globals_dsn_ref),
            );
        }
        if let Some(path) = self.file_paths.iter().find(|f| !f.is_absolute()) {
            return p("file_paths", format!("{} must be absolute", path.display()));
        }
        if self
            .files_host
            .as_deref()
            .is_some_and(|h| h.trim().is_empty())
        {
            return p("files_host", "must name an agent (or be left out)".into());
        }
        let mut seen = HashSet::new();
        for (i, db) in self.databases.iter().enumerate() {
            let key = |f: &str| format!("databases[{i}].{f}");
            for (field, value) in [
                ("environment", &db.environment),
                ("database", &db.database),
                ("dsn_ref", &db.dsn_ref),
            ] {
                if !plain(value) {
                    return p(&key(field), format!("{value:?} must be [A-Za-z0-9_.-]+"));
                }
            }
            if !seen.insert((db.environment.clone(), db.database.clone())) {
                return p(
                    &key("database"),
                    format!("{}/{} is listed twice", db.environment, db.database),
                );
            }
        }
        if self.databases.is_empty()
            && self.file_paths.is_empty()
            && self.globals_dsn_ref.is_empty()
        {
            return p(
                "databases",
                "nothing to back up: list databases, file_paths or globals_dsn_ref".into(),
            );
        }
        None
    }
}

impl ScheduleConfig {
    /// (name, cron) of each schedule that is on.
    pub fn entries(&self) -> Vec<(&'static str, &str)> {
        [
            ("backup", self.backup.as_str()),
            ("verify", self.verify.as_str()),
            ("restore_test", self.restore_test.as_str()),
        ]
        .into_iter()
        .filter(|(_, e)| !e.trim().is_empty())
        .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sentinel_daemon::config::parse_toml;
    use std::path::Path;

    const GOOD: &str = r#"
host = "argus"
backup_dir = "/var/backups/sentinel"
time_zone = "Europe/Prague"
offsite_target = "backup@offsite.example:/srv/sentinel"

[[databases]]
environment = "production"
database = "s60_auth_prod"
dsn_ref = "backup_ro"
app = "auth"
"#;

    #[test]
    fn defaults_are_nightly_seven_days_four_weeks() {
        let c: BackupsConfig = parse_toml(Path::new("s.toml"), GOOD).unwrap();
        assert_eq!(c.problem(), None);
        assert_eq!(
            c.retention,
            RetentionConfig {
                daily: 7,
                weekly: 4,
                minimum: 3
            }
        );
        assert_eq!(c.schedule.backup, "0 2 * * *");
        assert_eq!(c.schedule.entries().len(), 3);
    }

    #[test]
    fn problems_name_the_key() {
        let mut c: BackupsConfig = parse_toml(Path::new("s.toml"), GOOD).unwrap();
        c.schedule.verify = "61 * * * *".into();
        assert_eq!(c.problem().unwrap().0, "schedule.verify");
        let mut c: BackupsConfig = parse_toml(Path::new("s.toml"), GOOD).unwrap();
        c.time_zone = "Mars/Olympus".into();
        assert_eq!(c.problem().unwrap().0, "time_zone");
        let mut c: BackupsConfig = parse_toml(Path::new("s.toml"), GOOD).unwrap();
        c.databases[0].database = "../etc".into();
        assert_eq!(c.problem().unwrap().0, "databases[0].database");
        let mut c: BackupsConfig = parse_toml(Path::new("s.toml"), GOOD).unwrap();
        c.databases.push(c.databases[0].clone());
        assert_eq!(c.problem().unwrap().0, "databases[1].database");
    }
}
