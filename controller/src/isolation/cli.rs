//! `sentinel isolation check` and `sentinel isolation fix`: one check (or fix) from the command
//! line, a table for people or JSON with `--json` (the API's proto3 JSON, as grpcurl prints
//! the same report), and an exit code scripts can trust. Names come from the cluster: every
//! one printed goes through [`one_line`], so none can forge a row or drive the terminal.

use std::path::PathBuf;
use std::time::{Duration, UNIX_EPOCH};

use sentinel_proto::v1::IsolationReport;

use super::fix::{self, FixPlan};
use super::{catalog, check, CheckOutcome, IsolationConfig};
use crate::cli::format::one_line;

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
        match report_json(&outcome.report) {
            Ok(json) => println!("{json}"),
            Err(e) => {
                eprintln!("sentinel isolation check: {e:#}");
                return EXIT_ERROR;
            }
        }
    } else if outcome.report.error.is_empty() {
        print!("{}", report_table(policy, &outcome));
    }
    if !outcome.report.error.is_empty() {
        eprintln!(
            "sentinel isolation check: {}",
            one_line(&outcome.report.error)
        );
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
        eprintln!(
            "sentinel isolation fix: {}",
            one_line(&outcome.report.error)
        );
        return EXIT_ERROR;
    };
    let plan = FixPlan::new(&audit.violations);
    for problem in &audit.problems {
        println!(
            "-- policy problem (no statement can fix it): {}",
            one_line(&problem.message)
        );
    }
    print!("{}", plan.script());
    if !apply {
        return EXIT_CLEAN;
    }
    if plan.is_empty() {
        println!("\n-- nothing applied");
        print!("{}", still_open(&outcome.report));
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
    let applied = match fix::apply(&mut connection, &plan, timeout).await {
        Ok(applied) => applied,
        Err(e) => {
            eprintln!("sentinel isolation fix: {}", one_line(&e.to_string()));
            return EXIT_ERROR;
        }
    };
    drop(connection);
    print!("{}", applied_summary(&applied));
    let after = check(policy).await;
    if !after.report.error.is_empty() {
        eprintln!(
            "sentinel isolation fix: checking again: {}",
            one_line(&after.report.error)
        );
        return exit_code(&after.report);
    }
    print!("{}", report_table(policy, &after));
    print!("{}", still_open(&after.report));
    exit_code(&after.report)
}

/// What `--apply` did, counting only statements that changed the catalog.
fn applied_summary(applied: &fix::Applied) -> String {
    let mut out = format!(
        "\n-- applied {} of {} statements in one transaction",
        applied.changed.len(),
        applied.changed.len() + applied.unchanged.len()
    );
    if applied.unchanged.is_empty() {
        out.push_str("; checking again:\n\n");
        return out;
    }
    out.push_str(
        "; these changed nothing (already so, or a grant the running role cannot revoke):\n",
    );
    for statement in &applied.unchanged {
        out.push_str(&format!("--   {}\n", one_line(statement)));
    }
    out.push_str("-- checking again:\n\n");
    out
}

/// After `--apply`, what the fix could not close (empty when the re-check is clean).
fn still_open(report: &IsolationReport) -> String {
    if report.isolated {
        return String::new();
    }
    let mut out = String::from("\nThe fix could not close:\n");
    for v in &report.violations {
        out.push_str(&format!("  - {}\n", one_line(&v.path)));
    }
    for p in &report.policy_problems {
        out.push_str(&format!("  - policy problem: {}\n", one_line(p)));
    }
    out
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

/// The report in the API's proto3 JSON, exactly as grpcurl prints an `IsolationReport`
/// (fields at their default omitted, `durationMicros` a string, `checkedAt` RFC 3339).
pub fn report_json(report: &IsolationReport) -> anyhow::Result<String> {
    crate::cli::json::to_string(report, "sentinel.v1.IsolationReport")
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
            .map_or("PostgreSQL".to_string(), |v| format!(
                "PostgreSQL {}",
                one_line(v)
            )),
        policy.environments.len(),
        report.duration_micros / 1000,
    );
    if report.isolated {
        out.push_str("ISOLATED: no user of one environment can reach a database of another.\n");
        return out;
    }
    let risks = report.violations.iter().filter(|v| v.risk).count();
    out.push_str(&format!(
        "NOT ISOLATED: {} violations{}, {} policy problems.\n",
        report.violations.len(),
        if risks > 0 {
            format!(" ({risks} of them risks, not ways in)")
        } else {
            String::new()
        },
        report.policy_problems.len()
    ));
    if !report.violations.is_empty() {
        let header = ["USER", "ENV", "DATABASE", "ENV", "PATH"].map(String::from);
        let rows: Vec<[String; 5]> = report
            .violations
            .iter()
            .map(|v| {
                let environment = |e: &str| {
                    if e.is_empty() {
                        "-".to_string()
                    } else {
                        one_line(e)
                    }
                };
                let risk = if v.risk { "risk, not a way in: " } else { "" };
                [
                    one_line(&v.user),
                    environment(&v.user_environment),
                    one_line(&v.database),
                    environment(&v.database_environment),
                    format!("{risk}{}", one_line(&v.path)),
                ]
            })
            .collect();
        let mut widths = header.clone().map(|h| h.len());
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
        out.push_str("\nPolicy problems (the policy and the cluster disagree):\n");
        for p in &report.policy_problems {
            out.push_str(&format!("  - {}\n", one_line(p)));
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
                ..Default::default()
            }],
            duration_micros: 1234,
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
        let json: serde_json::Value = serde_json::from_str(&report_json(&report).unwrap()).unwrap();
        // proto3 JSON, as grpcurl -emit-defaults prints it: defaults printed.
        assert_eq!(json["isolated"], false);
        assert_eq!(json["violations"][0]["databaseEnvironment"], "production");
        assert_eq!(json["error"], "");
        assert_eq!(json["durationMicros"], "1234");
    }
}
