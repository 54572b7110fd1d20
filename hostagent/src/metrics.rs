//! Prometheus metrics: what the agent counts (collector durations and errors, job outcomes,
//! reconnects), served on `[metrics] listen` (loopback by default) with the families and the
//! endpoint of `sentinel_daemon::metrics`.
//!
//! The agent's metrics live in one process-wide value ([`get`]) so that the places that count
//! need one line and no plumbing.

use std::sync::{Arc, OnceLock};
use std::time::SystemTime;

use sentinel_proto::v1::{
    docker_section, nginx_section, postgres_section, redis_section, system_section, Collection,
    HostState, JobKind, JobState, RefusalReason,
};
use tokio_util::sync::CancellationToken;

use crate::config::MetricsConfig;
use sentinel_daemon::metrics::family::{self, Counter, Gauge, Histogram};
use sentinel_daemon::metrics::{enum_word, serve};

/// Collector durations: from sub-millisecond (/proc reads) to the 10 s timeouts of the
/// PostgreSQL and Redis collectors.
const COLLECTOR_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Everything the agent measures.
#[derive(Debug)]
pub struct AgentMetrics {
    started: SystemTime,
    collector_duration: Histogram,
    collector_errors: Counter,
    jobs: Counter,
    job_refusals: Counter,
    reconnects: Counter,
    connected: Gauge,
    renewals: Counter,
    cert_not_after: Gauge,
}

static METRICS: OnceLock<AgentMetrics> = OnceLock::new();

/// The agent's metrics.
pub fn get() -> &'static AgentMetrics {
    METRICS.get_or_init(AgentMetrics::new)
}

impl AgentMetrics {
    fn new() -> Self {
        let metrics = Self {
            started: SystemTime::now(),
            collector_duration: Histogram::new(
                "hostagent_collector_duration_seconds",
                "How long one run of a collector took.",
                &["collector"],
                COLLECTOR_BUCKETS,
            ),
            collector_errors: Counter::new(
                "hostagent_collector_errors_total",
                "Collector runs that reported an error (for redis: per failing instance).",
                &["collector"],
            ),
            jobs: Counter::new(
                "hostagent_jobs_total",
                "Signed jobs this agent ran, by kind and outcome (succeeded, failed, cancelled).",
                &["kind", "outcome"],
            ),
            job_refusals: Counter::new(
                "hostagent_job_refusals_total",
                "Jobs this agent refused to run, by reason (bad_signature, replayed, policy...).",
                &["reason"],
            ),
            reconnects: Counter::new(
                "hostagent_reconnects_total",
                "Times the agent lost or could not open its channel to the controller and went into backoff.",
                &[],
            ),
            connected: Gauge::new(
                "hostagent_connected",
                "1 while the agent holds a welcomed channel to the controller.",
                &[],
            ),
            renewals: Counter::new(
                "hostagent_certificate_renewals_total",
                "Certificate renewals over the channel, by outcome (renewed, refused, invalid).",
                &["outcome"],
            ),
            cert_not_after: Gauge::new(
                "hostagent_certificate_not_after_seconds",
                "When the host certificate in use expires (Unix time).",
                &[],
            ),
        };
        // Label-less series exist from the start, so `rate()` and alerts see a 0 before the
        // first reconnect rather than no series at all.
        metrics.reconnects.inc_by(&[], 0);
        metrics.connected.set(&[], 0.0);
        metrics
    }

    /// Records one collection: each section's duration, and its error if it has one.
    pub fn observe_collection(&self, state: &HostState) {
        let record = |name: &str, collection: Option<&Collection>, errors: u64| {
            if let Some(c) = collection {
                self.collector_duration
                    .observe(&[name], c.duration_micros as f64 / 1e6);
            }
            if errors > 0 {
                self.collector_errors.inc_by(&[name], errors);
            }
        };
        if let Some(s) = &state.system {
            let err = matches!(s.result, Some(system_section::Result::Error(_)));
            record("system", s.collection.as_ref(), u64::from(err));
        }
        if let Some(s) = &state.docker {
            let err = matches!(s.result, Some(docker_section::Result::Error(_)));
            record("docker", s.collection.as_ref(), u64::from(err));
        }
        if let Some(s) = &state.nginx {
            let err = matches!(s.result, Some(nginx_section::Result::Error(_)));
            record("nginx", s.collection.as_ref(), u64::from(err));
        }
        if let Some(s) = &state.redis {
            // Redis reports per instance, inside its state: one unreachable instance is one
            // error, and the others still count as collected.
            let errors = match &s.result {
                Some(redis_section::Result::Error(_)) => 1,
                Some(redis_section::Result::State(r)) => r
                    .instances
                    .iter()
                    .filter(|i| !i.reachable || !i.error.is_empty())
                    .count() as u64,
                None => 0,
            };
            record("redis", s.collection.as_ref(), errors);
        }
        if let Some(s) = &state.postgres {
            let err = matches!(s.result, Some(postgres_section::Result::Error(_)));
            record("postgres", s.collection.as_ref(), u64::from(err));
        }
    }

    /// A job ran to an end.
    pub fn job_finished(&self, kind: JobKind, state: JobState) {
        let kind = sentinel_proto::kinds::kind_name(kind);
        let outcome = enum_word(state.as_str_name(), "JOB_STATE_");
        self.jobs.inc(&[kind, &outcome]);
    }

    /// A job was refused before it ran.
    pub fn job_refused(&self, reason: RefusalReason) {
        self.job_refusals
            .inc(&[&enum_word(reason.as_str_name(), "REFUSAL_REASON_")]);
    }

    /// The channel is up (welcomed) or down.
    pub fn set_connected(&self, up: bool) {
        self.connected.set(&[], if up { 1.0 } else { 0.0 });
    }

    /// The channel ended or could not be opened; the agent backs off and dials again.
    pub fn reconnecting(&self) {
        self.reconnects.inc(&[]);
    }

    /// A renewal ended with `outcome` (renewed, refused, invalid).
    pub fn renewal(&self, outcome: &str) {
        self.renewals.inc(&[outcome]);
    }

    /// The certificate in use expires at `unix` seconds.
    pub fn set_cert_not_after(&self, unix: i64) {
        self.cert_not_after.set(&[], unix as f64);
    }

    /// How many times a collector failed, for tests.
    pub fn collector_errors(&self, collector: &str) -> u64 {
        self.collector_errors.get(&[collector])
    }

    /// Appends every agent metric in text format.
    pub fn encode(&self, out: &mut String) {
        family::gauge_family(
            out,
            "hostagent_build_info",
            "The agent's version; always 1.",
            &["version"],
            [([crate::VERSION], 1.0)],
        );
        self.connected.encode(out);
        self.reconnects.encode(out);
        self.renewals.encode(out);
        self.cert_not_after.encode(out);
        self.collector_duration.encode(out);
        self.collector_errors.encode(out);
        self.jobs.encode(out);
        self.job_refusals.encode(out);
    }

    /// The whole exposition of an agent process.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(4096);
        self.encode(&mut out);
        family::encode_process(&mut out, self.started);
        out
    }
}

/// Starts the agent's `/metrics` listener when the config enables it. A listener that cannot
/// bind is logged and skipped (see [`serve::start`]).
pub async fn start(
    config: &MetricsConfig,
    shutdown: CancellationToken,
) -> Option<std::net::SocketAddr> {
    let metrics = get();
    metrics.set_connected(false);
    if !config.enabled {
        return None;
    }
    serve::start(
        "agent",
        config.listen,
        Arc::new(|| get().render()),
        shutdown,
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use sentinel_proto::v1::{DockerSection, RedisInstance, RedisSection, RedisState};

    #[test]
    fn a_collection_records_durations_and_each_failing_section() {
        let m = AgentMetrics::new();
        let state = HostState {
            docker: Some(DockerSection {
                collection: Some(Collection {
                    collected_at: None,
                    duration_micros: 1500,
                }),
                result: Some(docker_section::Result::Error("no socket".into())),
            }),
            redis: Some(RedisSection {
                collection: Some(Collection::default()),
                result: Some(redis_section::Result::State(RedisState {
                    instances: vec![
                        RedisInstance {
                            name: "cache".into(),
                            reachable: true,
                            ..Default::default()
                        },
                        RedisInstance {
                            name: "queue".into(),
                            reachable: false,
                            error: "refused".into(),
                            ..Default::default()
                        },
                    ],
                })),
            }),
            ..Default::default()
        };
        m.observe_collection(&state);
        assert_eq!(m.collector_errors("docker"), 1);
        assert_eq!(m.collector_errors("redis"), 1);
        assert_eq!(m.collector_errors("system"), 0);
        assert_eq!(m.collector_duration.count(&["docker"]), 1);
        let text = m.render();
        assert!(text.contains("hostagent_collector_duration_seconds_bucket{collector=\"docker\",le=\"0.0025\"} 1\n"), "{text}");
    }

    #[test]
    fn the_reconnect_counter_and_connected_gauge_have_a_sample_from_the_start() {
        let text = AgentMetrics::new().render();
        assert!(text.contains("hostagent_reconnects_total 0\n"), "{text}");
        assert!(text.contains("hostagent_connected 0\n"), "{text}");
    }

    #[test]
    fn jobs_are_counted_by_kind_and_outcome() {
        let m = AgentMetrics::new();
        m.job_finished(JobKind::Deploy, JobState::Succeeded);
        m.job_refused(RefusalReason::BadSignature);
        m.reconnecting();
        m.set_connected(true);
        let text = m.render();
        assert!(
            text.contains("hostagent_jobs_total{kind=\"deploy\",outcome=\"succeeded\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("hostagent_job_refusals_total{reason=\"bad_signature\"} 1\n"),
            "{text}"
        );
        assert!(text.contains("hostagent_reconnects_total 1\n"), "{text}");
        assert!(text.contains("hostagent_connected 1\n"), "{text}");
        assert!(
            text.contains("# TYPE process_start_time_seconds gauge\n"),
            "{text}"
        );
    }
}
