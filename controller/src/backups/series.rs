//! The controller's own keys for backup series and what it keeps of each retained backup.
//! They are stored as JSON (the shape earlier versions stored, so a store survives the
//! upgrade) and built from the job results' proto messages; a message that does not convert
//! (an unknown series kind, a backup without its time) is an error naming what was wrong.

use std::collections::BTreeMap;

use jiff::Timestamp;
use sentinel_proto::time::to_jiff;
use sentinel_proto::v1::{self, SeriesKind};
use serde::{Deserialize, Serialize};

/// What a backup file holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// `pg_dump` of one database.
    Database,
    /// `pg_dumpall --globals-only` of a cluster.
    Globals,
    /// A tar of configured paths.
    Files,
}

impl Kind {
    /// Its name in `DatabaseBackups.kind`, store keys and messages.
    pub fn as_str(self) -> &'static str {
        self.to_proto().name()
    }

    fn to_proto(self) -> SeriesKind {
        match self {
            Kind::Database => SeriesKind::Database,
            Kind::Globals => SeriesKind::Globals,
            Kind::Files => SeriesKind::Files,
        }
    }
}

/// Which series of backups: the key of everything the controller keeps about backups.
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
    /// The series a result names; an error when it names none or a kind this controller does
    /// not know.
    pub fn from_proto(series: Option<&v1::BackupSeries>) -> Result<Self, String> {
        let s = series.ok_or("a series is missing")?;
        let kind = match SeriesKind::try_from(s.kind) {
            Ok(SeriesKind::Database) => Kind::Database,
            Ok(SeriesKind::Globals) => Kind::Globals,
            Ok(SeriesKind::Files) => Kind::Files,
            _ => {
                return Err(format!(
                    "series {}/{} has an unknown kind ({})",
                    s.environment, s.database, s.kind
                ))
            }
        };
        Ok(Self {
            kind,
            environment: s.environment.clone(),
            database: s.database.clone(),
        })
    }
}

/// One retained backup, as the controller keeps it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Item {
    /// Path relative to the backup dir.
    pub file: String,
    /// When it was taken.
    pub taken_at: Timestamp,
    /// Bytes.
    pub size: u64,
    /// SHA-256.
    pub sha256: String,
    /// What verify found wrong with it (None: good, or not verified yet).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub damaged: Option<String>,
}

impl Item {
    /// A retained backup of a result; an error when it has no (or an impossible) time.
    pub fn from_proto(item: &v1::BackupItem) -> Result<Self, String> {
        let taken_at = item
            .taken_at
            .as_ref()
            .and_then(to_jiff)
            .ok_or_else(|| format!("backup {} has no valid taken_at", item.file))?;
        Ok(Self {
            file: item.file.clone(),
            taken_at,
            size: item.size,
            sha256: item.sha256.clone(),
            damaged: item.damaged.clone(),
        })
    }
}

/// The retained backups per series of a result's inventory.
pub fn inventory(inventory: &[v1::SeriesInventory]) -> Result<BTreeMap<Series, Vec<Item>>, String> {
    let mut out = BTreeMap::new();
    for inv in inventory {
        let series = Series::from_proto(inv.series.as_ref())?;
        let items = inv
            .backups
            .iter()
            .map(Item::from_proto)
            .collect::<Result<Vec<_>, _>>()?;
        out.insert(series, items);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_series_of_an_unknown_kind_or_none_at_all_is_an_error() {
        let odd = v1::BackupSeries {
            kind: 9,
            environment: "production".into(),
            database: "auth".into(),
        };
        let e = Series::from_proto(Some(&odd)).unwrap_err();
        assert!(e.contains("production/auth has an unknown kind (9)"), "{e}");
        assert!(Series::from_proto(None).is_err());
        let item = v1::BackupItem {
            file: "a.dump".into(),
            ..Default::default()
        };
        assert!(Item::from_proto(&item).unwrap_err().contains("a.dump"));
    }

    #[test]
    fn series_are_stored_as_earlier_versions_stored_them() {
        let s = Series {
            kind: Kind::Globals,
            environment: String::new(),
            database: "ro".into(),
        };
        assert_eq!(
            serde_json::to_string(&s).unwrap(),
            r#"{"kind":"globals","environment":"","database":"ro"}"#
        );
        assert_eq!(Kind::Files.as_str(), "files");
    }
}
