//! Prometheus metrics of the controller, served on `[metrics] listen` (loopback by default):
//! the fleet (hosts online/offline, state report age per host), jobs by kind and outcome,
//! deploys and their duration per app and environment, gRPC requests and latency, and the
//! gauges that the isolation checker and the backup scheduler set through this module's small
//! API ([`ControllerMetrics::set_isolation_violations`],
//! [`ControllerMetrics::set_newest_good_backup`], [`ControllerMetrics::set_restore_test`]...).
//!
//! Counting happens where things happen, through the process-wide [`get`]; what can be read
//! off live state (the fleet) is computed at scrape time instead, so it is never stale.

mod grpc;

use std::sync::{Arc, OnceLock};
use std::time::{Instant, SystemTime};

use sentinel_daemon::metrics::enum_word;
use sentinel_daemon::metrics::family::{self, gauge_family, Counter, Gauge, Histogram};
use sentinel_proto::v1::{DeploymentState, HostStatus, JobKind, JobState};
use tokio_util::sync::CancellationToken;

use crate::config::MetricsConfig;
use crate::registry::Registry;
pub use grpc::{GrpcMetrics, GrpcMetricsLayer};

/// gRPC handler latency: most calls answer from memory in well under a millisecond; a deploy
/// submission resolves a commit with git.
const GRPC_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
/// One environment of a deploy: bundle, transfer, compose build/down/up, health, E2E.
const DEPLOY_BUCKETS: &[f64] = &[
    5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 180.0, 300.0, 600.0, 900.0, 1800.0, 3600.0,
];

/// Everything the controller counts.
#[derive(Debug)]
pub struct ControllerMetrics {
    started: SystemTime,
    agent_connects: Counter,
    state_reports: Counter,
    jobs: Counter,
    deploys: Counter,
    deploy_duration: Histogram,
    grpc_requests: Counter,
    grpc_duration: Histogram,
    isolation_violations: Gauge,
    isolation_check_ok: Gauge,
    isolation_check_time: Gauge,
    backup_newest_good: Gauge,
    backup_verify_ok: Gauge,
    restore_test_ok: Gauge,
    restore_test_time: Gauge,
    controller_cert: Gauge,
}

static METRICS: OnceLock<ControllerMetrics> = OnceLock::new();

/// The controller's metrics.
pub fn get() -> &'static ControllerMetrics {
    METRICS.get_or_init(ControllerMetrics::new)
}

fn unix_seconds(t: SystemTime) -> f64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

/// Observes how long one environment of a deploy took when dropped, whatever the outcome.
#[derive(Debug)]
#[must_use = "the duration is recorded when the timer is dropped"]
pub struct DeployTimer {
    app: String,
    environment: String,
    started: Instant,
}

impl Drop for DeployTimer {
    fn drop(&mut self) {
        get().deploy_duration.observe(
            &[&self.app, &self.environment],
            self.started.elapsed().as_secs_f64(),
        );
    }
}

impl ControllerMetrics {
    fn new() -> Self {
        Self {
            started: SystemTime::now(),
            agent_connects: Counter::new(
                "sentinel_agent_connections_total",
                "Agent channels opened (a reconnect counts again).",
                &[],
            ),
            state_reports: Counter::new(
                "sentinel_state_reports_total",
                "State reports received from agents.",
                &[],
            ),
            jobs: Counter::new(
                "sentinel_jobs_total",
                "Jobs that reached a final state, by kind and outcome (succeeded, failed, cancelled, timed_out, refused, interrupted).",
                &["kind", "outcome"],
            ),
            deploys: Counter::new(
                "sentinel_deploys_total",
                "Deploys (and manual rollbacks) that ended, by app and outcome (succeeded, failed, rolled_back, cancelled).",
                &["app", "outcome"],
            ),
            deploy_duration: Histogram::new(
                "sentinel_deploy_duration_seconds",
                "How long one environment of a deploy took, from bundle to the end of its E2E checks.",
                &["app", "environment"],
                DEPLOY_BUCKETS,
            ),
            grpc_requests: Counter::new(
                "sentinel_grpc_requests_total",
                "gRPC calls answered, by method and status code (refused calls included).",
                &["method", "code"],
            ),
            grpc_duration: Histogram::new(
                "sentinel_grpc_request_duration_seconds",
                "Time from a gRPC request to its response headers (for streams: until the stream opened).",
                &["method"],
                GRPC_BUCKETS,
            ),
            isolation_violations: Gauge::new(
                "sentinel_isolation_violations",
                "Database isolation violations touching each environment, as of the latest check.",
                &["environment"],
            ),
            isolation_check_ok: Gauge::new(
                "sentinel_isolation_check_ok",
                "1 when the latest isolation check ran, 0 when it could not (the cluster's state is then unknown).",
                &[],
            ),
            isolation_check_time: Gauge::new(
                "sentinel_isolation_check_timestamp_seconds",
                "When the latest isolation check ended (unix time).",
                &[],
            ),
            backup_newest_good: Gauge::new(
                "sentinel_backup_newest_good_timestamp_seconds",
                "When the newest good backup of each database was taken (unix time).",
                &["environment", "database"],
            ),
            backup_verify_ok: Gauge::new(
                "sentinel_backup_verify_ok",
                "1 when the latest integrity check of a database's backups passed, else 0.",
                &["environment", "database"],
            ),
            restore_test_ok: Gauge::new(
                "sentinel_backup_restore_test_ok",
                "1 when the latest restore test of a database passed, else 0.",
                &["environment", "database"],
            ),
            restore_test_time: Gauge::new(
                "sentinel_backup_restore_test_timestamp_seconds",
                "When the latest restore test of a database ended (unix time).",
                &["environment", "database"],
            ),
            controller_cert: Gauge::new(
                "sentinel_controller_cert_seconds",
                "The controller's own TLS certificate: when it expires (bound=\"not_after\", unix time) and its lifetime (bound=\"lifetime\", seconds).",
                &["bound"],
            ),
        }
    }

    /// The validity of the controller's own certificate (set at start).
    pub fn set_controller_cert(&self, not_before: SystemTime, not_after: SystemTime) {
        self.controller_cert
            .set(&["not_after"], unix_seconds(not_after));
        self.controller_cert.set(
            &["lifetime"],
            unix_seconds(not_after) - unix_seconds(not_before),
        );
    }

    /// An agent opened its channel.
    pub fn agent_connected(&self) {
        self.agent_connects.inc(&[]);
    }

    /// A state report arrived.
    pub fn state_report(&self) {
        self.state_reports.inc(&[]);
    }

    /// A job reached its final `state`.
    pub fn job_finished(&self, kind: JobKind, state: JobState) {
        let outcome = enum_word(state.as_str_name(), "JOB_STATE_");
        self.jobs
            .inc(&[sentinel_proto::kinds::kind_name(kind), &outcome]);
    }

    /// How many jobs of `kind` ended in `state`, for tests.
    pub fn jobs_finished(&self, kind: JobKind, state: JobState) -> u64 {
        let outcome = enum_word(state.as_str_name(), "JOB_STATE_");
        self.jobs
            .get(&[sentinel_proto::kinds::kind_name(kind), &outcome])
    }

    /// A deploy of `app` ended in `state`.
    pub fn deploy_finished(&self, app: &str, state: DeploymentState) {
        let outcome = enum_word(state.as_str_name(), "DEPLOYMENT_STATE_");
        self.deploys.inc(&[app, &outcome]);
    }

    /// Starts every app's deploy counters at 0, so that `increase()` sees an app's first
    /// failure after a restart (a series that appears at 1 shows no increase).
    pub fn init_deploys<'a>(&self, apps: impl IntoIterator<Item = &'a str>) {
        for app in apps {
            for state in [
                DeploymentState::Succeeded,
                DeploymentState::Failed,
                DeploymentState::RolledBack,
                DeploymentState::Cancelled,
            ] {
                let outcome = enum_word(state.as_str_name(), "DEPLOYMENT_STATE_");
                self.deploys.inc_by(&[app, &outcome], 0);
            }
        }
    }

    /// Starts timing one environment of a deploy; the duration is recorded when the returned
    /// timer is dropped, on every path out of the step.
    pub fn deploy_timer(&self, app: &str, environment: &str) -> DeployTimer {
        DeployTimer {
            app: app.to_string(),
            environment: environment.to_string(),
            started: Instant::now(),
        }
    }

    /// For the isolation checker, after each check: how many violations touch `environment`
    /// (set every configured environment, 0 included, so a fixed hole clears its alert).
    pub fn set_isolation_violations(&self, environment: &str, violations: u64) {
        self.isolation_violations
            .set(&[environment], violations as f64);
    }

    /// For the isolation checker, after each check: whether it could run at all.
    pub fn set_isolation_check(&self, ran: bool, at: SystemTime) {
        self.isolation_check_ok
            .set(&[], if ran { 1.0 } else { 0.0 });
        self.isolation_check_time.set(&[], unix_seconds(at));
    }

    /// For the backup scheduler: the newest backup of `database` that is known good (taken,
    /// checksummed, verified). Its age is computed at every scrape, so it keeps growing when
    /// backups stop.
    pub fn set_newest_good_backup(&self, environment: &str, database: &str, taken_at: SystemTime) {
        self.backup_newest_good
            .set(&[environment, database], unix_seconds(taken_at));
    }

    /// For the backup scheduler: the outcome of the latest integrity check of `database`'s
    /// backups.
    pub fn set_backup_verify(&self, environment: &str, database: &str, ok: bool) {
        self.backup_verify_ok
            .set(&[environment, database], if ok { 1.0 } else { 0.0 });
    }

    /// For the backup scheduler: the outcome of the latest restore test of `database`.
    pub fn set_restore_test(&self, environment: &str, database: &str, ok: bool, at: SystemTime) {
        self.restore_test_ok
            .set(&[environment, database], if ok { 1.0 } else { 0.0 });
        self.restore_test_time
            .set(&[environment, database], unix_seconds(at));
    }

    /// For the backup scheduler: `database` is no longer backed up (its config went away), so
    /// its series go too instead of alerting forever.
    pub fn forget_database(&self, environment: &str, database: &str) {
        for gauge in [
            &self.backup_newest_good,
            &self.backup_verify_ok,
            &self.restore_test_ok,
            &self.restore_test_time,
        ] {
            gauge.remove(&[environment, database]);
        }
    }

    /// Appends every controller metric, the fleet read from `registry` now.
    pub fn encode(&self, out: &mut String, registry: Option<&Registry>) {
        gauge_family(
            out,
            "sentinel_build_info",
            "The controller's version; always 1.",
            &["version"],
            [([crate::VERSION], 1.0)],
        );
        if let Some(registry) = registry {
            encode_fleet(out, registry);
        }
        self.agent_connects.encode(out);
        self.state_reports.encode(out);
        self.jobs.encode(out);
        self.deploys.encode(out);
        self.deploy_duration.encode(out);
        self.grpc_requests.encode(out);
        self.grpc_duration.encode(out);
        self.isolation_violations.encode(out);
        self.isolation_check_ok.encode(out);
        self.isolation_check_time.encode(out);
        self.backup_newest_good.encode(out);
        let now = unix_seconds(SystemTime::now());
        let ages = self.backup_newest_good.snapshot();
        gauge_family(
            out,
            "sentinel_backup_newest_good_age_seconds",
            "Seconds since the newest good backup of each database was taken.",
            &["environment", "database"],
            ages.iter().map(|(k, t)| {
                let labels: Vec<&str> = k.iter().map(String::as_str).collect();
                (labels, (now - t).max(0.0))
            }),
        );
        self.backup_verify_ok.encode(out);
        self.restore_test_ok.encode(out);
        self.restore_test_time.encode(out);
        self.controller_cert.encode(out);
    }

    /// The whole exposition of a controller process (and of its local agent in dev mode).
    pub fn render(&self, registry: Option<&Registry>) -> String {
        let mut out = String::with_capacity(16 * 1024);
        self.encode(&mut out, registry);
        family::encode_process(&mut out, self.started);
        out
    }
}

/// The fleet as it is now: counts by status, and per host whether it is up, how old its state
/// is, its containers and its failing collectors.
fn encode_fleet(out: &mut String, registry: &Registry) {
    let hosts = registry.summaries();
    let online = |h: &sentinel_proto::v1::HostSummary| h.status == HostStatus::Online as i32;
    let up = hosts.iter().filter(|h| online(h)).count();
    gauge_family(
        out,
        "sentinel_hosts",
        "Known hosts by status (online: agent connected and heard from recently).",
        &["status"],
        [
            (["online"], up as f64),
            (["offline"], (hosts.len() - up) as f64),
        ],
    );
    gauge_family(
        out,
        "sentinel_host_up",
        "1 when the host's agent is connected and heard from recently, else 0.",
        &["host"],
        hosts
            .iter()
            .map(|h| ([h.name.as_str()], if online(h) { 1.0 } else { 0.0 })),
    );
    gauge_family(
        out,
        "sentinel_host_state_age_seconds",
        "Seconds since the host's newest state report was collected (0 until its first report).",
        &["host"],
        hosts
            .iter()
            .map(|h| ([h.name.as_str()], h.state_age_seconds)),
    );
    gauge_family(
        out,
        "sentinel_host_containers",
        "Containers on the host by state (running, other), as last reported.",
        &["host", "state"],
        hosts.iter().flat_map(|h| {
            [
                (
                    [h.name.as_str(), "running"],
                    f64::from(h.containers_running),
                ),
                (
                    [h.name.as_str(), "other"],
                    f64::from(h.containers.saturating_sub(h.containers_running)),
                ),
            ]
        }),
    );
    let seconds = |t: &Option<prost_types::Timestamp>| {
        t.as_ref()
            .map(|t| unix_seconds(sentinel_proto::time::system_time(t)))
    };
    gauge_family(
        out,
        "sentinel_host_cert_expiry_timestamp_seconds",
        "When the certificate the host last connected with expires (unix time).",
        &["host"],
        hosts
            .iter()
            .filter_map(|h| seconds(&h.cert_not_after).map(|t| ([h.name.as_str()], t))),
    );
    gauge_family(
        out,
        "sentinel_host_cert_lifetime_seconds",
        "The full lifetime (not_after - not_before) of the certificate the host last connected with.",
        &["host"],
        hosts.iter().filter_map(|h| {
            let (from, to) = (seconds(&h.cert_not_before)?, seconds(&h.cert_not_after)?);
            Some(([h.name.as_str()], to - from))
        }),
    );
    gauge_family(
        out,
        "sentinel_host_collector_failing",
        "1 for each collector whose latest report on the host is an error.",
        &["host", "collector"],
        hosts.iter().flat_map(|h| {
            h.failing_collectors
                .iter()
                .map(move |c| ([h.name.as_str(), c.as_str()], 1.0))
        }),
    );
}

/// Starts the controller's `/metrics` listener when the config enables it; a listener that
/// cannot bind is logged and skipped (see [`sentinel_daemon::metrics::serve::start`]).
pub async fn start(
    config: &MetricsConfig,
    registry: Arc<Registry>,
    shutdown: CancellationToken,
) -> Option<std::net::SocketAddr> {
    get();
    if !config.enabled {
        return None;
    }
    let render = Arc::new(move || get().render(Some(&registry)));
    sentinel_daemon::metrics::serve::start("controller", config.listen, render, shutdown).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_api_for_isolation_and_backups_shows_in_the_exposition() {
        let m = ControllerMetrics::new();
        m.set_isolation_violations("staging", 3);
        m.set_isolation_check(true, SystemTime::now());
        let day_ago = SystemTime::now() - std::time::Duration::from_secs(86_400);
        m.set_newest_good_backup("production", "s60_auth_prod", day_ago);
        m.set_restore_test("production", "s60_auth_prod", false, SystemTime::now());
        m.set_backup_verify("production", "s60_auth_prod", true);
        m.set_newest_good_backup("staging", "gone", day_ago);
        m.forget_database("staging", "gone");
        m.deploy_finished("auth", DeploymentState::RolledBack);
        m.job_finished(JobKind::VerifyBackups, JobState::TimedOut);
        drop(m.deploy_timer("auth", "staging"));
        let text = m.render(None);
        for line in [
            "sentinel_isolation_violations{environment=\"staging\"} 3\n",
            "sentinel_isolation_check_ok 1\n",
            "sentinel_backup_restore_test_ok{environment=\"production\",database=\"s60_auth_prod\"} 0\n",
            "sentinel_backup_verify_ok{environment=\"production\",database=\"s60_auth_prod\"} 1\n",
            "sentinel_deploys_total{app=\"auth\",outcome=\"rolled_back\"} 1\n",
            "sentinel_jobs_total{kind=\"verify_backups\",outcome=\"timed_out\"} 1\n",
        ] {
            assert!(text.contains(line), "{line} missing from:\n{text}");
        }
        let age: f64 = text
            .lines()
            .find_map(|l| l.strip_prefix("sentinel_backup_newest_good_age_seconds{environment=\"production\",database=\"s60_auth_prod\"} "))
            .unwrap()
            .parse()
            .unwrap();
        assert!((86_400.0..86_500.0).contains(&age), "{age}");
        assert!(!text.contains("database=\"gone\""), "{text}");
        // The timer recorded into the process-wide metrics.
        assert!(get().deploy_duration.count(&["auth", "staging"]) >= 1);
    }
}
