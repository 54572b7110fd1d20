//! What backup jobs and their results mean beyond their fields: the names that become
//! directories of a backup dir, the time-zone syntax retention counts days and weeks in, the
//! modes a private backup keeps, and how a series or an exposed path reads.

use jiff::tz::{Offset, TimeZone};

use crate::v1::{BackupSeries, ExposedPath, OffsiteReport, SeriesKind};

/// The mode of every file the agent writes under a backup dir (and offsite): dumps hold
/// production data, manifests name every table. A verify reports wider ones as exposed.
pub const FILE_MODE: u32 = 0o600;
/// The mode of every directory the agent creates under a backup dir (and offsite).
pub const DIR_MODE: u32 = 0o700;

/// Whether `name` can be a path component of the backup dir: environments, databases and DSN
/// refs come from jobs and become directory names.
pub fn safe_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
}

/// A time zone by IANA name ("Europe/Prague"), "UTC", or a fixed offset ("+01:00", "-05:30");
/// empty means UTC. This is the syntax of `RetentionPolicy.time_zone`. The error says what was
/// wrong.
pub fn parse_time_zone(name: &str) -> Result<TimeZone, String> {
    let name = name.trim();
    if name.is_empty() || name.eq_ignore_ascii_case("utc") {
        return Ok(TimeZone::UTC);
    }
    if let Some(rest) = name.strip_prefix(['+', '-']) {
        let sign = if name.starts_with('-') { -1 } else { 1 };
        let bad = || format!("{name:?} is not a UTC offset like +01:00 or -05:30");
        let (h, m) = rest.split_once(':').unwrap_or((rest, "0"));
        let h: i32 = h.parse().map_err(|_| bad())?;
        let m: i32 = m.parse().map_err(|_| bad())?;
        if !(0..=23).contains(&h) || !(0..=59).contains(&m) {
            return Err(bad());
        }
        let offset = Offset::from_seconds(sign * (h * 3600 + m * 60)).map_err(|_| bad())?;
        return Ok(TimeZone::fixed(offset));
    }
    TimeZone::get(name).map_err(|e| format!("unknown time zone {name:?}: {e}"))
}

impl SeriesKind {
    /// Its name in manifests, messages and `DatabaseBackups.kind`.
    pub fn name(self) -> &'static str {
        match self {
            SeriesKind::Unspecified => "unspecified",
            SeriesKind::Database => "database",
            SeriesKind::Globals => "globals",
            SeriesKind::Files => "files",
        }
    }
}

impl std::fmt::Display for BackupSeries {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match SeriesKind::try_from(self.kind) {
            Ok(SeriesKind::Database) => write!(f, "{}/{}", self.environment, self.database),
            Ok(SeriesKind::Globals) => write!(f, "globals of {}", self.database),
            Ok(SeriesKind::Files) => write!(f, "files"),
            _ => write!(
                f,
                "{}/{} (unknown series kind {})",
                self.environment, self.database, self.kind
            ),
        }
    }
}

impl OffsiteReport {
    /// Whether the copy and the pruning both went through.
    pub fn ok(&self) -> bool {
        self.error.is_none() && self.prune_error.is_none()
    }
}

impl std::fmt::Display for ExposedPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (allowed, fix) = if self.dir {
            (DIR_MODE, "chmod 700")
        } else {
            (FILE_MODE, "chmod 600")
        };
        write!(
            f,
            "{} is mode {:04o}, wider than {allowed:04o} ({fix} it)",
            self.path, self.mode
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jiff::Timestamp;

    #[test]
    fn only_plain_names_become_directories() {
        assert!(safe_name("s60_auth_prod"));
        assert!(safe_name("prod-alfa.1"));
        assert!(!safe_name(""));
        assert!(!safe_name(".."));
        assert!(!safe_name("a/b"));
        assert!(!safe_name(".hidden"));
    }

    #[test]
    fn time_zones_parse_by_name_and_offset() {
        assert_eq!(parse_time_zone("").unwrap(), TimeZone::UTC);
        assert!(parse_time_zone("Europe/Prague").is_ok());
        let plus = parse_time_zone("+05:30").unwrap();
        assert_eq!(
            plus.to_offset(Timestamp::UNIX_EPOCH).seconds(),
            5 * 3600 + 1800
        );
        assert_eq!(
            parse_time_zone("-01:00")
                .unwrap()
                .to_offset(Timestamp::UNIX_EPOCH)
                .seconds(),
            -3600
        );
        assert!(parse_time_zone("Mars/Olympus")
            .unwrap_err()
            .contains("Mars/Olympus"));
        assert!(parse_time_zone("+25:00").is_err());
    }

    #[test]
    fn series_and_exposed_paths_read_as_sentences() {
        let db = BackupSeries {
            kind: SeriesKind::Database as i32,
            environment: "production".into(),
            database: "auth".into(),
        };
        assert_eq!(db.to_string(), "production/auth");
        let odd = BackupSeries { kind: 42, ..db };
        assert!(odd.to_string().contains("unknown series kind 42"), "{odd}");
        let dir = ExposedPath {
            path: ".".into(),
            mode: 0o755,
            dir: true,
        };
        assert_eq!(
            dir.to_string(),
            ". is mode 0755, wider than 0700 (chmod 700 it)"
        );
    }
}
