//! Database isolation: the controller audits the shared PostgreSQL cluster's catalog against the
//! policy (`[isolation]`: each environment's databases and users), on a schedule and on demand,
//! keeps the latest report, and tells the deploy pipeline which violations block an
//! environment.
//!
//! - [`policy`]: the config section and what each role is in it;
//! - [`catalog`]: reading the cluster as the auditor;
//! - [`audit`]: the rules, pure (catalog in, violations out);
//! - [`fix`]: the REVOKE/ALTER statements that close the holes, applied in one transaction;
//! - [`probe`]: probing from the hosts (signed `IsolationProbe` jobs), merged into the report;
//! - [`cli`]: `sentinel isolation check|fix`.

pub mod audit;
pub mod catalog;
pub mod cli;
pub mod fix;
pub mod policy;
pub mod probe;

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime};

use sentinel_postgres::PgError;
use sentinel_proto::v1::{IsolationReport, IsolationViolation, ProbeResult};
use tokio_util::sync::CancellationToken;

pub use audit::{Audit, Violation, ViolationKind};
pub use policy::IsolationConfig;
pub use probe::Prober;

/// The result of one check, with what the report alone does not carry.
#[derive(Debug, Clone)]
pub struct CheckOutcome {
    /// What operators and the deploy pipeline see.
    pub report: IsolationReport,
    /// The audit behind it; `None` when the check failed.
    pub audit: Option<Audit>,
    /// The server's version, when it was reached.
    pub server_version: Option<String>,
}

/// Runs one check: connect as the auditor, read the catalog, audit. Never fails: a failure is
/// a report with `error` set and `isolated` false, never a clean report.
pub async fn check(policy: &IsolationConfig) -> CheckOutcome {
    let started = Instant::now();
    let checked_at = SystemTime::now();
    let result: Result<(Audit, String), PgError> = async {
        let mut connection = catalog::connect_auditor(policy).await?;
        let connected = started.elapsed();
        let snapshot = catalog::read(&mut connection, policy).await?;
        let read = started.elapsed();
        let audit = audit::audit_owned(
            policy,
            &snapshot.catalog,
            Some(&snapshot.effective_connect),
            &snapshot.object_owners,
        );
        tracing::debug!(
            connect = ?connected,
            read = ?(read - connected),
            audit = ?(started.elapsed() - read),
            roles = snapshot.catalog.roles.len(),
            databases = snapshot.catalog.databases.len(),
            "isolation check phases"
        );
        Ok((audit, snapshot.catalog.server_version))
    }
    .await;
    let duration_micros = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
    let mut report = IsolationReport {
        checked_at: Some(sentinel_proto::time::timestamp(checked_at)),
        duration_micros,
        ..Default::default()
    };
    match result {
        Ok((audit, server_version)) => {
            report.isolated = audit.is_clean();
            report.violations = audit.violations.iter().map(to_proto).collect();
            report.policy_problems = audit.problems.iter().map(|p| p.message.clone()).collect();
            CheckOutcome {
                report,
                audit: Some(audit),
                server_version: Some(server_version),
            }
        }
        Err(e) => {
            report.error = e.to_string();
            CheckOutcome {
                report,
                audit: None,
                server_version: None,
            }
        }
    }
}

/// A violation as the API reports it.
pub fn to_proto(v: &Violation) -> IsolationViolation {
    IsolationViolation {
        user: v.user.clone(),
        user_environment: v.user_environment.clone(),
        database: v.database.clone(),
        database_environment: v.database_environment.clone(),
        path: v.path.clone(),
        fix: v.fix.join("; "),
        kind: v.kind.to_string(),
        risk: v.kind.is_risk(),
    }
}

/// The controller's isolation state: the policy and the latest check, shared (in an `Arc`) by
/// the schedule, the operator API and the deploy pipeline.
#[derive(Debug)]
pub struct IsolationState {
    /// Replaced whole by [`IsolationState::reload`]; a check in progress keeps its copy.
    policy: RwLock<Arc<IsolationConfig>>,
    latest: RwLock<Option<CheckOutcome>>,
    /// Sends probe jobs; None where there is no job queue (or no `[isolation.probe]`).
    prober: Option<Prober>,
    /// The latest probe run: when, and every attempt.
    probes: RwLock<Option<(SystemTime, Vec<ProbeResult>)>>,
    /// One check at a time: a deploy's check waits for a scheduled one to finish, then runs
    /// its own, so it always judges the cluster as it is now.
    running: tokio::sync::Mutex<()>,
    /// Wakes the schedule after a reload.
    reloaded: tokio::sync::Notify,
}

impl IsolationState {
    /// A state with no check run yet. `prober` sends the probe jobs of `[isolation.probe]`.
    pub fn new(policy: IsolationConfig, prober: Option<Prober>) -> Arc<Self> {
        Arc::new(Self {
            policy: RwLock::new(Arc::new(policy)),
            latest: RwLock::new(None),
            prober,
            probes: RwLock::new(None),
            running: tokio::sync::Mutex::new(()),
            reloaded: tokio::sync::Notify::new(),
        })
    }

    /// The policy in force now.
    pub fn policy(&self) -> Arc<IsolationConfig> {
        self.policy
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Puts a new policy in force (SIGHUP): the next check, scheduled or asked for, uses it;
    /// the schedule checks at once and then keeps the new interval.
    pub fn reload(&self, policy: IsolationConfig) {
        *self.policy.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(policy);
        self.reloaded.notify_one();
    }

    /// The hosts a probe asked for, checked against `[isolation.probe] hosts`: all of them
    /// when `asked` is empty. The error names the host that is not a probe host.
    pub fn probe_hosts(&self, asked: &[String]) -> Result<Vec<String>, String> {
        let policy = self.policy();
        let Some(settings) = policy.probe.as_ref().filter(|_| self.prober.is_some()) else {
            return Err(
                "probing from the hosts is not configured: add an [isolation.probe] \
                        section (hosts, host, port) to the controller config"
                    .into(),
            );
        };
        if asked.is_empty() {
            return Ok(settings.hosts.clone());
        }
        match asked.iter().find(|h| !settings.hosts.contains(h)) {
            Some(h) => Err(format!(
                "{h:?} is not one of the probe hosts ([isolation.probe] hosts = {:?})",
                settings.hosts
            )),
            None => Ok(asked.to_vec()),
        }
    }

    /// Checks now (e.g. before every production deploy), stores and returns the report. With
    /// `probe_from` (hosts from [`Self::probe_hosts`]) those hosts probe at the same time as
    /// the audit runs; without, the latest probe results are carried forward.
    pub async fn check_now(
        &self,
        probe_from: Option<&[String]>,
        requested_by: &str,
    ) -> IsolationReport {
        let _one_at_a_time = self.running.lock().await;
        let started = Instant::now();
        let policy = self.policy();
        let probing = async {
            match (&self.prober, &policy.probe, probe_from) {
                (Some(prober), Some(settings), Some(hosts)) => {
                    let at = SystemTime::now();
                    let results = prober.run(&policy, settings, hosts, requested_by).await;
                    Some((at, results))
                }
                _ => None,
            }
        };
        let (mut outcome, probed) = tokio::join!(check(&policy), probing);
        if let Some((at, run)) = probed {
            if let Ok(mut probes) = self.probes.write() {
                let previous = probes.take().map(|(_, p)| p).unwrap_or_default();
                *probes = Some((at, probe::merge_run(previous, run)));
            }
        }
        self.merge_probes(&mut outcome.report);
        outcome.report.duration_micros =
            u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
        self.log_change(&outcome.report);
        self.export_metrics(&outcome.report);
        let report = outcome.report.clone();
        if let Ok(mut latest) = self.latest.write() {
            *latest = Some(outcome);
        }
        report
    }

    /// Sets the isolation gauges: whether the check ran, and per environment of the policy the
    /// violations touching it (audit and probes).
    fn export_metrics(&self, report: &IsolationReport) {
        let metrics = crate::metrics::get();
        metrics.set_isolation_check(report.error.is_empty(), SystemTime::now());
        for environment in self.policy().environments.keys() {
            let touching = report
                .violations
                .iter()
                .filter(|v| {
                    &v.user_environment == environment || &v.database_environment == environment
                })
                .count();
            metrics.set_isolation_violations(environment, touching as u64);
        }
    }

    /// Adds the latest probe results, and the violations they prove, to `report`.
    fn merge_probes(&self, report: &mut IsolationReport) {
        let Ok(probes) = self.probes.read() else {
            return;
        };
        let Some((at, results)) = probes.as_ref() else {
            return;
        };
        let proven = probe::violations(results);
        report.isolated &= proven.is_empty();
        report.violations.extend(proven);
        report.probes = results.clone();
        report.probed_at = Some(sentinel_proto::time::timestamp(*at));
    }

    /// The latest report, if a check has completed.
    pub fn latest(&self) -> Option<IsolationReport> {
        self.latest
            .read()
            .ok()
            .and_then(|l| l.as_ref().map(|o| o.report.clone()))
    }

    /// What blocks a deploy to `environment`: every violation whose user or database belongs
    /// to it, every policy problem of it, and, when the isolation of the cluster is unknown
    /// (no check completed yet, or the last one failed), one entry saying so: unknown is not
    /// clean. Empty for an environment the policy does not name.
    pub fn blocking_violations(&self, environment: &str) -> Vec<IsolationViolation> {
        if !self.policy().environments.contains_key(environment) {
            return Vec::new();
        }
        let unknown = |path: String| {
            vec![IsolationViolation {
                user_environment: environment.to_string(),
                database_environment: environment.to_string(),
                path,
                ..Default::default()
            }]
        };
        let Ok(latest) = self.latest.read() else {
            return unknown("the isolation state is unreadable".into());
        };
        let Some(outcome) = latest.as_ref() else {
            return unknown("no isolation check has completed yet".into());
        };
        let Some(audit) = &outcome.audit else {
            return unknown(format!(
                "the last isolation check failed: {}",
                outcome.report.error
            ));
        };
        let mut out: Vec<IsolationViolation> = audit
            .violations
            .iter()
            .filter(|v| v.user_environment == environment || v.database_environment == environment)
            .map(to_proto)
            .collect();
        if let Ok(probes) = self.probes.read() {
            if let Some((_, results)) = probes.as_ref() {
                out.extend(probe::violations(results).into_iter().filter(|v| {
                    v.user_environment == environment || v.database_environment == environment
                }));
            }
        }
        out.extend(
            audit
                .problems
                .iter()
                .filter(|p| p.environment.as_deref().is_none_or(|e| e == environment))
                .map(|p| IsolationViolation {
                    user_environment: environment.to_string(),
                    database_environment: environment.to_string(),
                    path: format!("policy problem: {}", p.message),
                    ..Default::default()
                }),
        );
        out
    }

    /// Checks at once, then every `interval`, until `shutdown`; probes too when
    /// `[isolation.probe] on_schedule` says so, at most every `probe.interval`.
    pub async fn run_schedule(self: Arc<Self>, shutdown: CancellationToken) {
        let mut last_probe: Option<Instant> = None;
        loop {
            // Read each round: a reload changes the interval and the probe settings.
            let policy = self.policy();
            let probe = policy
                .probe
                .as_ref()
                .filter(|p| p.on_schedule && self.prober.is_some());
            let probe_from = probe
                .filter(|p| last_probe.is_none_or(|at| at.elapsed() >= p.interval))
                .map(|p| p.hosts.as_slice());
            if probe_from.is_some() {
                last_probe = Some(Instant::now());
            }
            tokio::select! {
                _ = self.check_now(probe_from, "schedule") => {}
                _ = shutdown.cancelled() => return,
            }
            tokio::select! {
                _ = tokio::time::sleep(policy.interval) => {}
                // A new policy is checked at once rather than after the old interval.
                _ = self.reloaded.notified() => {}
                _ = shutdown.cancelled() => return,
            }
        }
    }

    /// One log event when the verdict changes, not one per check.
    fn log_change(&self, report: &IsolationReport) {
        let verdict =
            |r: &IsolationReport| (r.error.clone(), r.violations.len(), r.policy_problems.len());
        let previous = self
            .latest
            .read()
            .ok()
            .and_then(|l| l.as_ref().map(|o| verdict(&o.report)));
        let now = verdict(report);
        tracing::debug!(
            violations = now.1,
            policy_problems = now.2,
            took = ?Duration::from_micros(report.duration_micros),
            "isolation check done"
        );
        if previous.as_ref() == Some(&now) {
            return;
        }
        if !report.error.is_empty() {
            tracing::error!(error = %report.error, "isolation check failed");
        } else if report.isolated {
            tracing::info!("isolation check: every environment is isolated");
        } else {
            for v in &report.violations {
                tracing::warn!(
                    user = %v.user,
                    database = %v.database,
                    path = %v.path,
                    "isolation violation"
                );
            }
            for p in &report.policy_problems {
                tracing::warn!(problem = %p, "isolation policy problem");
            }
            tracing::warn!(
                violations = now.1,
                policy_problems = now.2,
                "isolation check: NOT isolated"
            );
        }
    }
}

/// The deploy pipeline's gate: deploys are refused (FAILED_PRECONDITION, naming the violation)
/// while a violation touches the environment, and production is checked afresh before it is
/// touched.
#[tonic::async_trait]
impl crate::pipeline::DeployGate for IsolationState {
    fn blocking(&self, environment: &str) -> Vec<String> {
        self.blocking_violations(environment)
            .into_iter()
            .map(|v| v.path)
            .collect()
    }

    async fn check_now(&self, environment: &str) -> Result<(), String> {
        // The audit only: probes take up to their timeout, and their latest results still
        // count (merged by `blocking`).
        IsolationState::check_now(self, None, "deploy gate").await;
        let blocking = crate::pipeline::DeployGate::blocking(self, environment);
        if blocking.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "database isolation violations block {environment}: {}",
                blocking.join("; ")
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::isolation::policy::tests::policy;

    fn state_with(outcome: Option<CheckOutcome>) -> Arc<IsolationState> {
        let state = IsolationState::new(policy(), None);
        *state.latest.write().unwrap() = outcome;
        state
    }

    fn violation(user_env: &str, db_env: &str) -> Violation {
        Violation {
            user: format!("{user_env}_user"),
            user_environment: user_env.into(),
            database: format!("{db_env}_db"),
            database_environment: db_env.into(),
            kind: ViolationKind::Connect,
            path: "p".into(),
            fix: vec!["REVOKE x".into()],
        }
    }

    #[test]
    fn unknown_isolation_blocks_and_says_why() {
        let state = state_with(None);
        let blocking = state.blocking_violations("production");
        assert_eq!(blocking.len(), 1);
        assert!(blocking[0].path.contains("no isolation check"));
        let state = state_with(Some(CheckOutcome {
            report: IsolationReport {
                error: "connecting to a@b/c: password authentication failed".into(),
                ..Default::default()
            },
            audit: None,
            server_version: None,
        }));
        let blocking = state.blocking_violations("staging");
        assert!(blocking[0].path.contains("password authentication failed"));
        assert!(state.blocking_violations("nowhere").is_empty());
    }

    #[test]
    fn a_probe_that_got_in_blocks_both_environments_until_a_probe_says_otherwise() {
        let state = state_with(Some(CheckOutcome {
            report: IsolationReport {
                isolated: true,
                ..Default::default()
            },
            audit: Some(Audit::default()),
            server_version: None,
        }));
        let attempt = |connected: bool| ProbeResult {
            host: "web-1".into(),
            user: "stg_user".into(),
            user_environment: "staging".into(),
            database: "auth_prod".into(),
            database_environment: "production".into(),
            connected,
            probed: true,
            message: String::new(),
        };
        *state.probes.write().unwrap() = Some((SystemTime::now(), vec![attempt(true)]));
        for env in ["staging", "production"] {
            let blocking = state.blocking_violations(env);
            assert_eq!(blocking.len(), 1, "{env}");
            assert!(blocking[0].path.starts_with("probe from web-1"));
        }
        assert!(state.blocking_violations("dev").is_empty());
        let mut report = IsolationReport {
            isolated: true,
            ..Default::default()
        };
        state.merge_probes(&mut report);
        assert!(!report.isolated);
        assert_eq!(report.violations.len(), 1);
        assert!(report.probed_at.is_some());

        *state.probes.write().unwrap() = Some((SystemTime::now(), vec![attempt(false)]));
        assert!(state.blocking_violations("production").is_empty());
    }

    #[test]
    fn violations_block_both_environments_they_touch() {
        let audit = Audit {
            violations: vec![violation("staging", "production")],
            problems: vec![audit::PolicyProblem {
                environment: Some("production".into()),
                message: "database pulse_prod of production does not exist in the cluster".into(),
            }],
        };
        let state = state_with(Some(CheckOutcome {
            report: IsolationReport::default(),
            audit: Some(audit),
            server_version: None,
        }));
        assert_eq!(state.blocking_violations("staging").len(), 1);
        let production = state.blocking_violations("production");
        assert_eq!(production.len(), 2);
        assert!(production[1]
            .path
            .starts_with("policy problem: database pulse_prod"));
    }
}
