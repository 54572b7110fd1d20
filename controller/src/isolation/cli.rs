//! `sentinel isolation check` and `sentinel isolation fix`: one check (or fix) from the command
//! line, a table for people or JSON with `--json`, and an exit code scripts can trust.

use std::path::PathBuf;
use std::time::{Duration, UNIX_EPOCH};

use sentinel_proto::v1::IsolationReport;
use serde_json::{json, Value};

use super::fix::{self, FixPlan};
use super::{catalog, check, CheckOutcome, IsolationConfig};

/// Exit code: every environment is isolated (or the fix was printed).
pub const EXIT_CLEAN: u8 = 0;
/// Exit code: violations or policy problems were found (or remain after `--apply`).
pub const EXIT_VIOLATIONS: u8 = 1;
/// Exit code: the check could not run (unreachable cluster, refused password, failed fix...).
pub const EXIT_ERROR: u8 = 2;

/// `sentinel isolation check`: prints the report and returns the exit code.
pub async fn check_command(policy: &IsolationConfig, as_json: bool) -> u8 {
    let outcome = check(policy).await;
    if as_json {
        println!("{:#}", report_json(&outcome.report));
    } else if outcome.report.error.is_empty() {
        print!("{}", report_table(policy, &outcome));
    }
    if !outcome.report.error.is_empty() {
        eprintln!("sentinel isolation check: {}", outcome.report.error);
    }
    exit_code(&outcome.report)
}

/// Where `fix --apply` connects, when not as the auditor (which needs no privilege, while
/// fixing needs an owner or a superuser).
#[derive(Debug, Clone, Default)]
pub struct ApplyAs {
    /// A file holding the DSN to apply the fix with.
    pub dsn_file: Option<PathBuf>,
    /// A file holding its password.
    pub password_file: Option<PathBuf>,
}

/// `sentinel isolation fix`: prints the statements that close every hole; with `apply`, runs
/// them in one transaction, checks again and prints the new report.
pub async fn fix_command(policy: &IsolationConfig, apply: bool, apply_as: &ApplyAs) -> u8 {
    let outcome = check(policy).await;
    let Some(audit) = &outcome.audit else {
        eprintln!("sentinel isolation fix: {}", outcome.report.error);
        return EXIT_ERROR;
    };
    let plan = FixPlan::new(&audit.violations);
    for problem in &audit.problems {
        println!(
            "-- policy problem (no statement can fix it): {}",
            problem.message
        );
    }
    print!("{}", plan.script());
    if !apply {
        return EXIT_CLEAN;
    }
    if plan.is_empty() {
        println!("\n-- nothing applied");
        return exit_code(&outcome.report);
    }
    let mut client_config = policy.auditor.clone();
    if let Some(dsn_file) = &apply_as.dsn_file {
        client_config.dsn = None;
        client_config.dsn_file = Some(dsn_file.clone());
        client_config.password_file = apply_as.password_file.clone();
    }
    let mut connection =
        match sentinel_postgres::connect(&client_config, catalog::AUDITOR_APPLICATION_NAME).await {
            Ok(c) => c,
            Err(e) => {
                eprintln!("sentinel isolation fix: {e}");
                return EXIT_ERROR;
            }
        };
    // Generous: ALTER DATABASE waits for locks other sessions may hold for a moment.
    let timeout = client_config.timeout.max(Duration::from_secs(30));
    if let Err(e) = fix::apply(&mut connection, &plan, timeout).await {
        eprintln!("sentinel isolation fix: {e}");
        return EXIT_ERROR;
    }
    drop(connection);
    println!(
        "\n-- applied {} statements in one transaction; checking again:\n",
        plan.statements().len()
    );
    let after = check(policy).await;
    if after.report.error.is_empty() {
        print!("{}", report_table(policy, &after));
    } else {
        eprintln!(
            "sentinel isolation fix: checking again: {}",
            after.report.error
        );
    }
    exit_code(&after.report)
}

/// 0 isolated, 1 violations or policy problems, 2 the check failed.
pub fn exit_code(report: &IsolationReport) -> u8 {
    if !report.error.is_empty() {
        EXIT_ERROR
    } else if report.isolated {
        EXIT_CLEAN
    } else {
        EXIT_VIOLATIONS
    }
}

fn rfc3339(report: &IsolationReport) -> String {
    report
        .checked_at
        .as_ref()
        .map(|t| {
            humantime::format_rfc3339_seconds(sentinel_proto::time::system_time(t)).to_string()
        })
        .unwrap_or_else(|| humantime::format_rfc3339_seconds(UNIX_EPOCH).to_string())
}

/// The report as JSON, with the field names grpcurl shows (proto3 JSON), every field present.
pub fn report_json(report: &IsolationReport) -> Value {
    json!({
        "checkedAt": rfc3339(report),
        "isolated": report.isolated,
        "violations": report.violations.iter().map(|v| json!({
            "user": v.user,
            "userEnvironment": v.user_environment,
            "database": v.database,
            "databaseEnvironment": v.database_environment,
            "path": v.path,
            "fix": v.fix,
        })).collect::<Vec<_>>(),
        "probes": [],
        "error": report.error,
        "policyProblems": report.policy_problems,
        "durationMicros": report.duration_micros,
    })
}

/// The report as a table for people.
pub fn report_table(policy: &IsolationConfig, outcome: &CheckOutcome) -> String {
    let report = &outcome.report;
    let databases: usize = policy
        .environments
        .values()
        .map(|e| e.databases.len())
        .sum();
    let users: usize = policy.environments.values().map(|e| e.users.len()).sum();
    let mut out = format!(
        "Isolation check at {} of {} ({} environments, {databases} databases, {users} users) \
         in {} ms: ",
        rfc3339(report),
        outcome
            .server_version
            .as_deref()
            .map_or("PostgreSQL".to_string(), |v| format!("PostgreSQL {v}")),
        policy.environments.len(),
        report.duration_micros / 1000,
    );
    if report.isolated {
        out.push_str("ISOLATED: no user of one environment can reach a database of another.\n");
        return out;
    }
    out.push_str(&format!(
        "NOT ISOLATED: {} violations, {} policy problems.\n",
        report.violations.len(),
        report.policy_problems.len()
    ));
    if !report.violations.is_empty() {
        let header = ["USER", "ENV", "DATABASE", "ENV", "PATH"];
        let rows: Vec<[&str; 5]> = report
            .violations
            .iter()
            .map(|v| {
                [
                    v.user.as_str(),
                    v.user_environment.as_str(),
                    v.database.as_str(),
                    v.database_environment.as_str(),
                    v.path.as_str(),
                ]
            })
            .collect();
        let mut widths = header.map(str::len);
        for row in &rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.chars().count());
            }
        }
        out.push('\n');
        for row in std::iter::once(&header).chain(rows.iter()) {
            let mut line = String::new();
            for (i, cell) in row.iter().enumerate() {
                if i + 1 == row.len() {
                    line.push_str(cell);
                } else {
                    line.push_str(&format!("{cell:<width$}  ", width = widths[i]));
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
    }
    if !report.policy_problems.is_empty() {
        out.push_str("\nPolicy problems (the policy names what the cluster does not have):\n");
        for p in &report.policy_problems {
            out.push_str(&format!("  - {p}\n"));
        }
    }
    if !report.violations.is_empty() {
        out.push_str(
            "\n`sentinel isolation fix --config FILE` prints the statements that close these \
             holes; `--apply` runs them in one transaction.\n",
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::isolation::policy::tests::policy;
    use sentinel_proto::v1::IsolationViolation;

    #[test]
    fn exit_codes_tell_clean_violations_and_errors_apart() {
        let clean = IsolationReport {
            isolated: true,
            ..Default::default()
        };
        assert_eq!(exit_code(&clean), EXIT_CLEAN);
        assert_eq!(exit_code(&IsolationReport::default()), EXIT_VIOLATIONS);
        let failed = IsolationReport {
            isolated: true,
            error: "refused".into(),
            ..Default::default()
        };
        assert_eq!(exit_code(&failed), EXIT_ERROR);
    }

    #[test]
    fn the_table_lines_up_and_the_json_has_every_field() {
        let report = IsolationReport {
            violations: vec![IsolationViolation {
                user: "stg_user".into(),
                user_environment: "staging".into(),
                database: "auth_prod".into(),
                database_environment: "production".into(),
                path: "stg_user → PUBLIC has CONNECT on auth_prod".into(),
                fix: "REVOKE CONNECT ON DATABASE auth_prod FROM PUBLIC".into(),
            }],
            ..Default::default()
        };
        let outcome = CheckOutcome {
            report: report.clone(),
            audit: None,
            server_version: Some("15.8".into()),
        };
        let table = report_table(&policy(), &outcome);
        assert!(table.contains("NOT ISOLATED: 1 violations"), "{table}");
        assert!(
            table.contains("stg_user  staging  auth_prod  production  stg_user → PUBLIC"),
            "{table}"
        );
        let json = report_json(&report);
        assert_eq!(json["isolated"], false);
        assert_eq!(json["violations"][0]["databaseEnvironment"], "production");
        assert_eq!(json["error"], "");
    }
}
