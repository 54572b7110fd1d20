//! The monthly restore test: the newest good dump of each database is restored into a scratch
//! database on a test cluster (`pg_restore --no-owner --no-acl --exit-on-error`), its tables'
//! row counts are compared with the manifest's, the configured invariants (queries that must
//! return true) are checked, the restore's duration is recorded, and the scratch database is
//! dropped whatever happened. Scratch databases are named `sentinel_restore_*`; any left by a
//! crashed run are dropped first. An encrypted dump is decrypted into pg_restore's standard
//! input: its plaintext never touches the disk.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use jiff::Timestamp;
use sentinel_proto::time::from_jiff;
use sentinel_proto::v1::{
    job_finished, InvariantResult, RestoreReport, RestoreResult, RestoreTestParams,
};

use super::dsn::{self, PassFile, Resolved};
use super::dump::{count_rows, quote_ident, TABLES_SQL};
use super::encryption::{self, Keys};
use super::manifest::{self, Entry, Kind, Series};
use super::{prepare_dir, run_tool, run_tool_io, verify, BackupError, Outcome, Step};
use crate::config::BackupsConfig;
use crate::jobs::{JobError, JobEvents};
use sentinel_postgres as postgres;

/// Prefix of every scratch database.
pub const SCRATCH_PREFIX: &str = "sentinel_restore_";

/// Runs a restore-test job.
pub async fn run_restore_test(
    p: &RestoreTestParams,
    config: &BackupsConfig,
    events: &JobEvents,
) -> Outcome {
    let mut report = RestoreReport::default();
    let result = restore_test(p, config, events, &mut report).await;
    (result, Some(job_finished::Result::RestoreTest(report)))
}

async fn restore_test(
    p: &RestoreTestParams,
    config: &BackupsConfig,
    events: &JobEvents,
    report: &mut RestoreReport,
) -> Result<String, JobError> {
    let failed = JobError::Failed;
    let dir = PathBuf::from(&p.backup_dir);
    let now = Timestamp::now();
    report.tested_at = Some(from_jiff(now));
    let cluster =
        dsn::resolve(config, &p.test_cluster_dsn_ref, events).map_err(|e| failed(e.to_string()))?;
    // Needed only for encrypted dumps; an error is reported by the dumps that need the keys.
    let keys = config.encryption.as_ref().map(Keys::load).transpose();
    let tmp = prepare_dir(&dir).map_err(|e| failed(e.to_string()))?;
    let admin = postgres::connect(&cluster.client, "sentinel-restore-test")
        .await
        .map_err(|e| JobError::Failed(format!("test cluster: {e}")))?;
    drop_leftovers(&admin.client, events).await;

    let (manifests, _) = manifest::load_all(&dir);
    // The newest good dump of each database (damaged ones are what verify is for).
    let mut newest: BTreeMap<Series, Entry> = BTreeMap::new();
    for e in manifests.iter().flat_map(|m| m.entries.iter()) {
        if e.series.kind != Kind::Database || e.pruned_at.is_some() || e.damaged.is_some() {
            continue;
        }
        let wanted = p.databases.is_empty()
            || p.databases
                .iter()
                .any(|d| d.environment == e.series.environment && d.database == e.series.database);
        if !wanted {
            continue;
        }
        match newest.get(&e.series) {
            Some(n) if n.taken_at >= e.taken_at => {}
            _ => {
                newest.insert(e.series.clone(), e.clone());
            }
        }
    }
    let mut missing = Vec::new();
    for d in &p.databases {
        let series = Series {
            kind: Kind::Database,
            environment: d.environment.clone(),
            database: d.database.clone(),
        };
        if !newest.contains_key(&series) {
            missing.push(format!("{series}: no good backup to restore"));
        }
    }
    if newest.is_empty() && missing.is_empty() {
        return Err(failed(format!("no database backup in {}", dir.display())));
    }

    let stamp = now.strftime("%Y%m%d%H%M%S").to_string();
    for (series, entry) in &newest {
        let step = Step::start(events, format!("restore {series}"));
        let result = restore_one(
            config,
            &keys,
            p,
            &cluster,
            &admin.client,
            &dir,
            &tmp,
            entry,
            &stamp,
            events,
        )
        .await;
        step.end(&if result.ok {
            Ok(format!(
                "{} restored in {:.1}s, {} table(s) match, {} invariant(s) hold",
                entry.file,
                result.restore_seconds,
                result.tables,
                result.invariants.len()
            ))
        } else {
            Err(result.error.clone().unwrap_or_default())
        });
        report.results.push(result);
    }
    let _ = std::fs::remove_dir_all(&tmp);
    let bad: Vec<String> = newest
        .keys()
        .zip(&report.results)
        .filter(|(_, r)| !r.ok)
        .map(|(series, r)| format!("{series}: {}", r.error.clone().unwrap_or_default()))
        .chain(missing)
        .collect();
    let summary = format!(
        "restored {} database(s): {} passed",
        report.results.len(),
        report.results.iter().filter(|r| r.ok).count()
    );
    if bad.is_empty() {
        Ok(summary)
    } else {
        Err(failed(format!("{summary}; {}", bad.join("; "))))
    }
}

/// Drops scratch databases a crashed run left behind.
async fn drop_leftovers(client: &tokio_postgres::Client, events: &JobEvents) {
    let Ok(rows) = client
        .query(
            "SELECT datname::text FROM pg_database WHERE starts_with(datname, $1)",
            &[&SCRATCH_PREFIX],
        )
        .await
    else {
        return;
    };
    for row in rows {
        let name: String = row.get(0);
        events.log(
            "agent",
            &format!("dropping {name}, left by an earlier restore test"),
        );
        drop_database(client, &name).await;
    }
}

async fn drop_database(client: &tokio_postgres::Client, name: &str) -> Option<String> {
    let sql = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", quote_ident(name));
    client
        .batch_execute(&sql)
        .await
        .err()
        .map(|e| format!("dropping {name}: {}", postgres::describe(&e)))
}

#[allow(clippy::too_many_arguments)]
async fn restore_one(
    config: &BackupsConfig,
    keys: &Result<Option<Keys>, encryption::EncryptionError>,
    p: &RestoreTestParams,
    cluster: &Resolved,
    admin: &tokio_postgres::Client,
    dir: &std::path::Path,
    tmp: &std::path::Path,
    entry: &Entry,
    stamp: &str,
    events: &JobEvents,
) -> RestoreResult {
    let mut result = RestoreResult {
        series: Some(entry.series.to_proto()),
        file: entry.file.clone(),
        taken_at: Some(from_jiff(entry.taken_at)),
        ok: false,
        restore_seconds: 0.0,
        mismatches: Vec::new(),
        tables: 0,
        invariants: Vec::new(),
        error: None,
    };
    let mut errors = Vec::new();
    // A damaged file is reported as such, and restored anyway: whether it still restores is
    // worth knowing too.
    let path = dir.join(&entry.file);
    let usable = keys.as_ref().ok().and_then(Option::as_ref);
    if let Err(e) = verify::check_file(config, usable, &path, entry, false, events).await {
        errors.push(e.to_string());
    }
    // An encrypted dump needs an identity; without one there is nothing to restore.
    let feed: Option<super::Feed> = if verify::should_be_encrypted(entry) {
        match keys.as_ref().map(Option::as_ref) {
            Err(e) => {
                errors.push(format!("[jobs.backups.encryption]: {e}"));
                result.error = Some(errors.join("; "));
                return result;
            }
            Ok(keys) => match keys.filter(|k| k.can_decrypt()) {
                None => {
                    errors.push(
                        encryption::EncryptionError::NoIdentity { path: path.clone() }.to_string(),
                    );
                    result.error = Some(errors.join("; "));
                    return result;
                }
                Some(keys) => {
                    let (keys, file) = (keys.clone(), path.clone());
                    Some(Box::new(move |stdin| {
                        encryption::decrypt_into(&keys, &file, stdin, false).map(drop)
                    }))
                }
            },
        }
    } else {
        None
    };
    let short: String = entry.series.database.chars().take(30).collect();
    let scratch = format!("{SCRATCH_PREFIX}{short}_{stamp}").to_ascii_lowercase();
    if let Err(e) = admin
        .batch_execute(&format!("CREATE DATABASE {}", quote_ident(&scratch)))
        .await
    {
        errors.push(format!(
            "creating the scratch database {scratch}: {}",
            postgres::describe(&e)
        ));
        result.error = Some(errors.join("; "));
        return result;
    }
    let target = cluster.with_database(&scratch);
    let restored = async {
        let passfile = match &target.password {
            Some(pw) => Some(PassFile::write(tmp, "restore", pw)?),
            None => None,
        };
        let mut cmd = tokio::process::Command::new(&config.pg_restore);
        cmd.arg("--no-owner")
            .arg("--no-acl")
            .arg("--exit-on-error")
            .arg("--no-password")
            .arg(format!("--dbname={}", target.conninfo));
        if feed.is_some() {
            // The plaintext comes through standard input.
            cmd.arg("--format=custom");
        } else {
            cmd.arg(&path);
        }
        dsn::tool_env(&mut cmd, &target, passfile.as_ref());
        let started = Instant::now();
        let r = match feed {
            None => run_tool(cmd, "pg_restore", config.command_timeout, events).await,
            Some(feed) => {
                run_tool_io(
                    cmd,
                    "pg_restore",
                    config.command_timeout,
                    events,
                    Some(feed),
                    |mut out| {
                        std::io::copy(&mut out, &mut std::io::sink())
                            .map(|_| String::new())
                            .map_err(|source| BackupError::Read {
                                what: "pg_restore's output",
                                source,
                            })
                    },
                )
                .await
            }
        };
        result.restore_seconds = started.elapsed().as_secs_f64();
        r?;
        let conn = postgres::connect(&target.client, "sentinel-restore-test").await?;
        let tables: Vec<(String, String)> = conn
            .client
            .query(TABLES_SQL, &[])
            .await
            .map_err(|e| BackupError::Query {
                doing: "listing restored tables".into(),
                message: postgres::describe(&e),
            })?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        let counts = count_rows(&conn.client, &tables).await?;
        result.tables = counts.len() as u32;
        for (table, want) in &entry.row_counts {
            match counts.get(table) {
                None => result
                    .mismatches
                    .push(format!("{table}: missing after the restore")),
                Some(got) if got != want => result.mismatches.push(format!(
                    "{table}: {want} row(s) in the manifest, {got} restored"
                )),
                Some(_) => {}
            }
        }
        for table in counts.keys().filter(|t| !entry.row_counts.contains_key(*t)) {
            result
                .mismatches
                .push(format!("{table}: restored but not in the manifest"));
        }
        let checks = p.invariants.iter().cloned().chain(
            p.checks
                .iter()
                .filter(|c| {
                    c.environment == entry.series.environment && c.database == entry.series.database
                })
                .map(|c| c.sql.clone()),
        );
        for sql in checks {
            let verdict = match conn.client.query_one(sql.as_str(), &[]).await {
                Err(e) => Err(postgres::describe(&e)),
                Ok(row) => match row.try_get::<_, Option<bool>>(0) {
                    Ok(Some(true)) => Ok(()),
                    Ok(Some(false)) => Err("returned false".to_string()),
                    Ok(None) => Err("returned NULL".to_string()),
                    Err(_) => Err("must return one boolean".to_string()),
                },
            };
            result.invariants.push(InvariantResult {
                sql: sql.clone(),
                ok: verdict.is_ok(),
                error: verdict.err(),
            });
        }
        Ok::<(), BackupError>(())
    }
    .await;
    if let Err(e) = restored {
        errors.push(e.to_string());
    }
    if !result.mismatches.is_empty() {
        errors.push(format!(
            "row counts differ: {}",
            result.mismatches.join(", ")
        ));
    }
    for i in result.invariants.iter().filter(|i| !i.ok) {
        errors.push(format!(
            "invariant {:?} {}",
            i.sql,
            i.error.clone().unwrap_or_default()
        ));
    }
    if let Some(e) = drop_database(admin, &scratch).await {
        errors.push(e);
    }
    result.ok = errors.is_empty();
    if !errors.is_empty() {
        result.error = Some(errors.join("; "));
    }
    result
}
