//! What the controller knows about backups, kept in its store: per series (database, globals,
//! files) the retained backups as the backup host last reported them, the last attempt and its
//! error, the last verify and restore test; per schedule the last occurrence run; and the
//! offsite backlog. Job results update it; `ListBackups` and the metrics read it.

use std::collections::BTreeMap;

use jiff::Timestamp;
use sentinel_proto::time::{from_jiff, to_jiff};
use sentinel_proto::v1::{BackupReport, DatabaseBackups, RestoreReport, VerifyReport};
use serde::{Deserialize, Serialize};

use super::series::{self, Item, Series};

/// One series.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SeriesState {
    /// Which.
    pub series: Series,
    /// Its retained backups, oldest first.
    #[serde(default)]
    pub kept: Vec<Item>,
    /// The last backup attempt (the run's clock).
    #[serde(default)]
    pub last_attempt_at: Option<Timestamp>,
    /// Its error, when it failed.
    #[serde(default)]
    pub last_error: Option<String>,
    /// The last verify.
    #[serde(default)]
    pub last_verify_at: Option<Timestamp>,
    /// Whether it found all of this series' backups good.
    #[serde(default)]
    pub last_verify_ok: bool,
    /// What it said.
    #[serde(default)]
    pub last_verify_detail: String,
    /// The last restore test.
    #[serde(default)]
    pub last_restore_at: Option<Timestamp>,
    /// Whether it passed.
    #[serde(default)]
    pub last_restore_ok: bool,
    /// What it said.
    #[serde(default)]
    pub last_restore_detail: String,
    /// How long the restore took.
    #[serde(default)]
    pub last_restore_seconds: f64,
}

impl SeriesState {
    fn new(series: Series) -> Self {
        Self {
            series,
            kept: Vec::new(),
            last_attempt_at: None,
            last_error: None,
            last_verify_at: None,
            last_verify_ok: false,
            last_verify_detail: String::new(),
            last_restore_at: None,
            last_restore_ok: false,
            last_restore_detail: String::new(),
            last_restore_seconds: 0.0,
        }
    }

    /// The newest retained backup no verify found damaged.
    pub fn newest_good(&self) -> Option<&Item> {
        self.kept
            .iter()
            .filter(|i| i.damaged.is_none())
            .max_by_key(|i| i.taken_at)
    }
}

/// One schedule.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ScheduleState {
    /// The occurrence last run (None: never ran).
    pub last_run_at: Option<Timestamp>,
    /// When counting started on a new install (nothing is owed for the time before).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub counting_since: Option<Timestamp>,
    /// The job of the last run.
    #[serde(default)]
    pub last_job_id: String,
    /// How it went.
    #[serde(default)]
    pub last_outcome: String,
}

/// What a schedule's first start used to record as its last run.
const OLD_BASELINE: &str = "counting from this controller's first start";
/// The outcome of a schedule that has not run yet.
pub const NOT_RUN_YET: &str =
    "not run yet: counting from this controller's first start (nothing owed before it)";

impl ScheduleState {
    /// Where the schedule counts its next occurrence from: the last run, else the start.
    pub fn since(&self) -> Option<Timestamp> {
        self.last_run_at.or(self.counting_since)
    }

    /// A state stored by an earlier version, whose first start looked like a run.
    fn upgraded(mut self) -> Self {
        if self.last_job_id.is_empty() && self.last_outcome == OLD_BASELINE {
            self.counting_since = self.last_run_at.take();
            self.last_outcome = NOT_RUN_YET.into();
        }
        self
    }
}

/// The offsite backlog as the last backup run reported it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct OffsiteState {
    /// Files not copied yet.
    #[serde(default)]
    pub pending: Vec<String>,
    /// Why the last copy failed.
    #[serde(default)]
    pub error: Option<String>,
}

/// Everything, with the keys it is stored under.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct State {
    /// Per series.
    pub series: BTreeMap<Series, SeriesState>,
    /// Per schedule name.
    pub schedules: BTreeMap<String, ScheduleState>,
    /// The offsite backlog.
    pub offsite: OffsiteState,
}

/// A store key.
fn series_key(s: &Series) -> String {
    format!(
        "series/{}/{}/{}",
        s.kind.as_str(),
        s.environment,
        s.database
    )
}

impl State {
    /// Rebuilds the state from stored records; unreadable records are skipped and named.
    pub fn from_records(records: Vec<(String, Vec<u8>)>) -> (Self, Vec<String>) {
        let mut state = State::default();
        let mut bad = Vec::new();
        for (key, value) in records {
            let ok = if let Some(name) = key.strip_prefix("schedule/") {
                serde_json::from_slice::<ScheduleState>(&value)
                    .map(|s| {
                        state.schedules.insert(name.to_string(), s.upgraded());
                    })
                    .is_ok()
            } else if key.starts_with("series/") {
                serde_json::from_slice::<SeriesState>(&value)
                    .map(|s| {
                        state.series.insert(s.series.clone(), s);
                    })
                    .is_ok()
            } else if key == "offsite" {
                serde_json::from_slice(&value)
                    .map(|o| state.offsite = o)
                    .is_ok()
            } else {
                true
            };
            if !ok {
                bad.push(key);
            }
        }
        (state, bad)
    }

    /// Every record, for the store (small: one per series and schedule).
    pub fn records(&self) -> Vec<(String, Vec<u8>)> {
        let mut out = Vec::new();
        for s in self.series.values() {
            out.push((
                series_key(&s.series),
                serde_json::to_vec(s).unwrap_or_default(),
            ));
        }
        for (name, s) in &self.schedules {
            out.push((
                format!("schedule/{name}"),
                serde_json::to_vec(s).unwrap_or_default(),
            ));
        }
        out.push((
            "offsite".into(),
            serde_json::to_vec(&self.offsite).unwrap_or_default(),
        ));
        out
    }

    fn entry(&mut self, series: &Series) -> &mut SeriesState {
        self.series
            .entry(series.clone())
            .or_insert_with(|| SeriesState::new(series.clone()))
    }

    fn take_inventory(&mut self, inventory: BTreeMap<Series, Vec<Item>>) {
        // The report lists every series with backups; a known one it omits has none left.
        for s in self.series.values_mut() {
            s.kept.clear();
        }
        for (series, items) in inventory {
            self.entry(&series).kept = items;
        }
    }

    /// A finished backup job: its report (None when it ended without one), whether it
    /// succeeded and its detail, and the series it was meant to cover. A report that does not
    /// convert changes nothing and is the error (what in it is wrong).
    pub fn apply_backup(
        &mut self,
        report: Option<&BackupReport>,
        ok: bool,
        detail: &str,
        covered: &[Series],
        now: Timestamp,
    ) -> Result<(), String> {
        let at = report
            .and_then(|r| r.taken_at.as_ref())
            .and_then(to_jiff)
            .unwrap_or(now);
        let mut seen = Vec::new();
        if let Some(r) = report {
            // Everything converted first: a bad report must not be half applied.
            let written = r
                .written
                .iter()
                .map(|e| Series::from_proto(e.series.as_ref()))
                .collect::<Result<Vec<_>, _>>()?;
            let failures = r
                .failures
                .iter()
                .map(|f| Series::from_proto(f.series.as_ref()).map(|s| (s, f.error.clone())))
                .collect::<Result<Vec<_>, _>>()?;
            let inventory = series::inventory(&r.inventory)?;
            for series in written {
                let s = self.entry(&series);
                s.last_attempt_at = Some(at);
                s.last_error = None;
                seen.push(series);
            }
            for (series, error) in failures {
                let s = self.entry(&series);
                s.last_attempt_at = Some(at);
                s.last_error = Some(error);
                seen.push(series);
            }
            if !r.inventory.is_empty() || !r.written.is_empty() {
                self.take_inventory(inventory);
            }
            if let Some(o) = &r.offsite {
                self.offsite = OffsiteState {
                    pending: o.pending.clone(),
                    error: o.error.clone(),
                };
            }
        }
        if !ok {
            // Covered but not in the report: the job failed before reaching them (refused,
            // timed out, a bad backup dir...).
            for series in covered.iter().filter(|s| !seen.contains(s)) {
                let s = self.entry(series);
                s.last_attempt_at = Some(at);
                s.last_error = Some(detail.to_string());
            }
        }
        Ok(())
    }

    /// A finished verify job (see [`State::apply_backup`]).
    pub fn apply_verify(
        &mut self,
        report: Option<&VerifyReport>,
        ok: bool,
        detail: &str,
        covered: &[Series],
        now: Timestamp,
    ) -> Result<(), String> {
        let Some((r, at)) =
            report.and_then(|r| Some((r, r.verified_at.as_ref().and_then(to_jiff)?)))
        else {
            for series in covered {
                let s = self.entry(series);
                s.last_verify_at = Some(now);
                s.last_verify_ok = false;
                s.last_verify_detail = detail.to_string();
            }
            return Ok(());
        };
        let inventory = series::inventory(&r.inventory)?;
        let damage = r
            .damaged
            .iter()
            .map(|d| {
                Series::from_proto(d.series.as_ref())
                    .map(|s| (s, format!("{}: {}", d.file, d.error)))
            })
            .collect::<Result<Vec<_>, _>>()?;
        self.take_inventory(inventory);
        let keys: Vec<Series> = self.series.keys().cloned().collect();
        for series in keys {
            let damaged: Vec<String> = damage
                .iter()
                .filter(|(s, _)| *s == series)
                .map(|(_, d)| d.clone())
                .collect();
            let s = self.entry(&series);
            if s.kept.is_empty() && damaged.is_empty() {
                continue;
            }
            // A backup other users can read is not a good state for it to be in.
            let exposed: Vec<String> = r
                .exposed
                .iter()
                .filter(|e| s.kept.iter().any(|i| i.file == e.path))
                .map(|e| e.to_string())
                .collect();
            s.last_verify_at = Some(at);
            s.last_verify_ok =
                damaged.is_empty() && exposed.is_empty() && (ok || r.problems.is_empty());
            let mut detail = if damaged.is_empty() {
                format!("{} backup(s) good", s.kept.len())
            } else {
                format!("{} damaged: {}", damaged.len(), damaged.join("; "))
            };
            if !exposed.is_empty() {
                detail.push_str(&format!(
                    "; {} readable by other users: {}",
                    exposed.len(),
                    exposed.join("; ")
                ));
            }
            s.last_verify_detail = detail;
        }
        Ok(())
    }

    /// A finished restore-test job (see [`State::apply_backup`]).
    pub fn apply_restore(
        &mut self,
        report: Option<&RestoreReport>,
        ok: bool,
        detail: &str,
        covered: &[Series],
        now: Timestamp,
    ) -> Result<(), String> {
        let at = report
            .and_then(|r| r.tested_at.as_ref())
            .and_then(to_jiff)
            .unwrap_or(now);
        let mut seen = Vec::new();
        let results = report.map(|r| r.results.as_slice()).unwrap_or_default();
        let tested = results
            .iter()
            .map(|r| Series::from_proto(r.series.as_ref()))
            .collect::<Result<Vec<_>, _>>()?;
        for (series, r) in tested.into_iter().zip(results) {
            let s = self.entry(&series);
            s.last_restore_at = Some(at);
            s.last_restore_ok = r.ok;
            s.last_restore_seconds = r.restore_seconds;
            s.last_restore_detail = match &r.error {
                Some(e) => e.clone(),
                None => format!(
                    "{} restored in {:.1}s; {} table(s) match the manifest; {} invariant(s) hold",
                    r.file,
                    r.restore_seconds,
                    r.tables,
                    r.invariants.len()
                ),
            };
            seen.push(series);
        }
        if !ok {
            for series in covered.iter().filter(|s| !seen.contains(s)) {
                let s = self.entry(series);
                s.last_restore_at = Some(at);
                s.last_restore_ok = false;
                s.last_restore_detail = detail.to_string();
            }
        }
        Ok(())
    }

    /// The operator's view of one series at `now`.
    pub fn summary(&self, series: &Series, now: Timestamp) -> DatabaseBackups {
        let ts = |t: Option<Timestamp>| t.map(from_jiff);
        let blank = SeriesState::new(series.clone());
        let s = self.series.get(series).unwrap_or(&blank);
        let newest = s.newest_good();
        DatabaseBackups {
            environment: series.environment.clone(),
            database: series.database.clone(),
            newest_good_at: ts(newest.map(|i| i.taken_at)),
            newest_good_age_seconds: newest
                .map(|i| now.duration_since(i.taken_at).as_secs_f64().max(0.0))
                .unwrap_or(0.0),
            kept: s.kept.len() as u32,
            last_verify_at: ts(s.last_verify_at),
            last_verify_ok: s.last_verify_ok,
            last_restore_test_at: ts(s.last_restore_at),
            last_restore_test_ok: s.last_restore_ok,
            kind: series.kind.as_str().to_string(),
            newest_good_file: newest.map(|i| i.file.clone()).unwrap_or_default(),
            newest_good_size: newest.map(|i| i.size).unwrap_or(0),
            newest_good_sha256: newest.map(|i| i.sha256.clone()).unwrap_or_default(),
            last_attempt_at: ts(s.last_attempt_at),
            last_error: s.last_error.clone().unwrap_or_default(),
            last_verify_detail: s.last_verify_detail.clone(),
            last_restore_test_detail: s.last_restore_detail.clone(),
            last_restore_seconds: s.last_restore_seconds,
            damaged: s.kept.iter().filter(|i| i.damaged.is_some()).count() as u32,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backups::series::Kind;
    use sentinel_proto::v1::{BackupItem, BackupSeries, SeriesInventory, SeriesKind};

    fn db(name: &str) -> Series {
        Series {
            kind: Kind::Database,
            environment: "production".into(),
            database: name.into(),
        }
    }

    fn proto_db(name: &str) -> BackupSeries {
        BackupSeries {
            kind: SeriesKind::Database as i32,
            environment: "production".into(),
            database: name.into(),
        }
    }

    fn ts(at: &str) -> prost_types::Timestamp {
        from_jiff(at.parse().unwrap())
    }

    fn item(file: &str, at: &str, damaged: Option<&str>) -> BackupItem {
        BackupItem {
            file: file.into(),
            taken_at: Some(ts(at)),
            size: 10,
            sha256: "ab".into(),
            damaged: damaged.map(String::from),
        }
    }

    #[test]
    fn the_newest_good_backup_skips_damaged_ones_and_survives_the_store() {
        let mut state = State::default();
        let report = BackupReport {
            taken_at: Some(ts("2026-04-09T02:00:00Z")),
            inventory: vec![SeriesInventory {
                series: Some(proto_db("auth")),
                backups: vec![
                    item("a1", "2026-04-08T02:00:00Z", None),
                    item("a2", "2026-04-09T02:00:00Z", Some("sha256 mismatch")),
                ],
            }],
            ..Default::default()
        };
        let now: Timestamp = "2026-04-09T04:00:00Z".parse().unwrap();
        state
            .apply_backup(Some(&report), true, "ok", &[], now)
            .unwrap();
        let summary = state.summary(&db("auth"), now);
        assert_eq!(summary.newest_good_file, "a1");
        assert_eq!(summary.newest_good_age_seconds, 26.0 * 3600.0);
        assert_eq!(summary.kept, 2);
        assert_eq!(summary.damaged, 1);
        let (back, bad) = State::from_records(state.records());
        assert!(bad.is_empty());
        assert_eq!(back, state);
    }

    #[test]
    fn a_first_start_stored_by_an_earlier_version_is_not_a_run() {
        let at: Timestamp = "2026-04-09T02:00:00Z".parse().unwrap();
        let old = serde_json::to_vec(&ScheduleState {
            last_run_at: Some(at),
            counting_since: None,
            last_job_id: String::new(),
            last_outcome: OLD_BASELINE.into(),
        })
        .unwrap();
        let (state, bad) = State::from_records(vec![("schedule/backup".into(), old)]);
        assert!(bad.is_empty());
        let s = &state.schedules["backup"];
        assert_eq!(s.last_run_at, None);
        assert_eq!(s.since(), Some(at));
        assert_eq!(s.last_outcome, NOT_RUN_YET);
    }

    #[test]
    fn a_job_that_never_reported_marks_what_it_covered() {
        let mut state = State::default();
        let now = Timestamp::now();
        state
            .apply_backup(
                None,
                false,
                "refused by the agent: POLICY",
                &[db("auth")],
                now,
            )
            .unwrap();
        assert_eq!(
            state.summary(&db("auth"), now).last_error,
            "refused by the agent: POLICY"
        );
        state
            .apply_restore(None, false, "no test cluster", &[db("auth")], now)
            .unwrap();
        assert!(!state.summary(&db("auth"), now).last_restore_test_ok);
    }

    #[test]
    fn a_report_naming_an_unknown_series_kind_changes_nothing_and_says_why() {
        let mut state = State::default();
        let now = Timestamp::now();
        let report = BackupReport {
            inventory: vec![SeriesInventory {
                series: Some(BackupSeries {
                    kind: 7,
                    ..proto_db("auth")
                }),
                backups: vec![item("a1", "2026-04-08T02:00:00Z", None)],
            }],
            ..Default::default()
        };
        let e = state
            .apply_backup(Some(&report), true, "ok", &[db("auth")], now)
            .unwrap_err();
        assert!(e.contains("unknown kind (7)"), "{e}");
        assert_eq!(state, State::default());
    }
}
