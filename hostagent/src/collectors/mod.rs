//! State collectors. Each collector fills its own section of [`HostState`]; a failing collector
//! puts its error in its section and the others carry on.

pub mod docker;
pub mod nginx;
pub mod postgres;
pub mod redis;
pub mod system;

use std::time::{Instant, SystemTime};

use sentinel_proto::v1::{
    docker_section, system_section, Collection, DockerSection, HostState, SystemSection,
};
use sentinel_proto::v1::{nginx_section, redis_section, NginxSection, RedisSection};

use crate::config::CollectorsConfig;

/// A collector run that failed.
#[derive(Debug, thiserror::Error)]
pub enum CollectorError {
    /// `what` could not be collected, and why.
    #[error("{what}: {message}")]
    Failed {
        /// The collector or the resource it needed (e.g. "docker").
        what: String,
        /// What went wrong, naming the resource (socket path, address...).
        message: String,
    },
}

/// The enabled collectors, kept between runs (CPU usage is a delta, the Docker client is reused).
pub struct Collectors {
    system: Option<system::SystemCollector>,
    docker: Option<docker::DockerCollector>,
    nginx: Option<nginx::NginxCollector>,
    redis: Option<redis::RedisCollector>,
    postgres: Option<postgres::PostgresCollector>,
}

impl Collectors {
    /// Builds the collectors the config enables. Never fails: problems show up per run.
    pub fn new(config: &CollectorsConfig) -> Self {
        Self {
            system: config.system.then(system::SystemCollector::new),
            docker: config
                .docker
                .then(|| docker::DockerCollector::new(&config.docker_socket)),
            nginx: config
                .nginx
                .enabled
                .then(|| nginx::NginxCollector::new(&config.nginx)),
            redis: (!config.redis.is_empty()).then(|| redis::RedisCollector::new(&config.redis)),
            postgres: config
                .postgres
                .enabled
                .then(|| postgres::PostgresCollector::new(config.postgres.client())),
        }
    }

    /// Capability strings for the hello.
    pub fn capabilities(&self) -> Vec<String> {
        let mut caps = Vec::new();
        if self.system.is_some() {
            caps.push("collector.system".to_string());
        }
        if self.docker.is_some() {
            caps.push("collector.docker".to_string());
        }
        if self.nginx.is_some() {
            caps.push("collector.nginx".to_string());
        }
        if self.redis.is_some() {
            caps.push("collector.redis".to_string());
        }
        if self.postgres.is_some() {
            caps.push("collector.postgres".to_string());
        }
        caps
    }

    /// Runs every enabled collector once.
    pub async fn collect(&mut self) -> HostState {
        let mut state = HostState::default();
        if let Some(c) = self.system.as_mut() {
            let (collection, result) = timed(|| c.collect());
            state.system = Some(SystemSection {
                collection: Some(collection),
                result: Some(match result {
                    Ok(s) => system_section::Result::State(s),
                    Err(e) => system_section::Result::Error(e.to_string()),
                }),
            });
        }
        if let Some(c) = self.docker.as_mut() {
            let started = Instant::now();
            let at = SystemTime::now();
            let result = c.collect().await;
            state.docker = Some(DockerSection {
                collection: Some(collection(at, started)),
                result: Some(match result {
                    Ok(s) => docker_section::Result::State(s),
                    Err(e) => {
                        tracing::debug!(error = %e, "docker collection failed");
                        docker_section::Result::Error(e.to_string())
                    }
                }),
            });
        }
        if let Some(c) = self.postgres.as_mut() {
            use sentinel_proto::v1::{postgres_section, PostgresSection};
            let started = Instant::now();
            let at = SystemTime::now();
            let result = c.collect().await;
            state.postgres = Some(PostgresSection {
                collection: Some(collection(at, started)),
                result: Some(match result {
                    Ok(s) => postgres_section::Result::State(s),
                    Err(e) => {
                        tracing::debug!(error = %e, "postgres collection failed");
                        postgres_section::Result::Error(e.to_string())
                    }
                }),
            });
        }
        // nginx and Redis mostly wait on other processes: they run side by side, each bounded
        // by its own timeouts.
        let (nginx, redis) = (self.nginx.as_ref(), self.redis.as_ref());
        let (nginx, redis) = tokio::join!(
            async move {
                match nginx {
                    Some(c) => Some(timed_async(c.collect()).await),
                    None => None,
                }
            },
            async move {
                match redis {
                    Some(c) => Some(timed_async(c.collect()).await),
                    None => None,
                }
            },
        );
        state.nginx = nginx.map(|(collection, result)| NginxSection {
            collection: Some(collection),
            result: Some(match result {
                Ok(s) => nginx_section::Result::State(s),
                Err(e) => {
                    tracing::debug!(error = %e, "nginx collection failed");
                    nginx_section::Result::Error(e.to_string())
                }
            }),
        });
        // Redis failures are per instance, inside the state.
        state.redis = redis.map(|(collection, s)| RedisSection {
            collection: Some(collection),
            result: Some(redis_section::Result::State(s)),
        });
        crate::metrics::get().observe_collection(&state);
        state
    }
}

fn collection(at: SystemTime, started: Instant) -> Collection {
    Collection {
        collected_at: Some(sentinel_proto::time::timestamp(at)),
        duration_micros: u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX),
    }
}

async fn timed_async<T>(f: impl std::future::Future<Output = T>) -> (Collection, T) {
    let started = Instant::now();
    let at = SystemTime::now();
    let out = f.await;
    (collection(at, started), out)
}

fn timed<T>(f: impl FnOnce() -> T) -> (Collection, T) {
    let started = Instant::now();
    let at = SystemTime::now();
    let out = f();
    (collection(at, started), out)
}

/// Turns successive full collections into delta reports: a section is sent only when its data
/// (not its collection time) changed since the last report, or when a full report is due.
/// Docker's status texts count as changed only when more than their durations changed
/// ([`docker::changed_apart_from_durations`]), so the texts the controller holds are as of the
/// last report that carried the Docker section: at most one full-report cycle old
/// (`full_report_every` reports), while `started_at` stays exact.
#[derive(Default)]
pub struct DeltaTracker {
    last: HostState,
}

impl DeltaTracker {
    /// Forgets what was sent (after a reconnect the controller needs everything again).
    pub fn reset(&mut self) {
        self.last = HostState::default();
    }

    /// The report to send for `fresh`: everything when `full`, else only changed sections.
    pub fn report(&mut self, fresh: HostState, full: bool) -> HostState {
        let mut out = HostState::default();
        if full || changed(&self.last.system, &fresh.system, |s| &s.result) {
            out.system = fresh.system.clone();
        }
        if full || docker_changed(&self.last.docker, &fresh.docker) {
            out.docker = fresh.docker.clone();
        }
        if full || changed(&self.last.nginx, &fresh.nginx, |s| &s.result) {
            out.nginx = fresh.nginx.clone();
        }
        if full || changed(&self.last.redis, &fresh.redis, |s| &s.result) {
            out.redis = fresh.redis.clone();
        }
        if full || changed(&self.last.postgres, &fresh.postgres, |s| &s.result) {
            out.postgres = fresh.postgres.clone();
        }
        self.last = fresh;
        out
    }
}

fn docker_changed(old: &Option<DockerSection>, new: &Option<DockerSection>) -> bool {
    use docker_section::Result::State;
    match (
        old.as_ref().map(|s| &s.result),
        new.as_ref().map(|s| &s.result),
    ) {
        (Some(Some(State(o))), Some(Some(State(n)))) => docker::changed_apart_from_durations(o, n),
        (o, n) => o != n,
    }
}

fn changed<S, R: PartialEq>(old: &Option<S>, new: &Option<S>, result: impl Fn(&S) -> &R) -> bool {
    match (old, new) {
        (Some(o), Some(n)) => result(o) != result(n),
        (None, None) => false,
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sentinel_proto::v1::DockerState;

    fn docker(version: &str) -> HostState {
        HostState {
            docker: Some(DockerSection {
                collection: Some(Collection::default()),
                result: Some(docker_section::Result::State(DockerState {
                    engine_version: version.into(),
                    containers: vec![],
                })),
            }),
            ..Default::default()
        }
    }

    #[test]
    fn an_older_uptime_alone_is_not_sent_until_the_next_full_report() {
        use sentinel_proto::v1::Container;
        let up = |status: &str, restarts: u32| {
            let mut state = docker("1");
            if let Some(docker_section::Result::State(d)) =
                state.docker.as_mut().and_then(|d| d.result.as_mut())
            {
                d.containers.push(Container {
                    name: "web".into(),
                    state: "running".into(),
                    status: status.into(),
                    restart_count: restarts,
                    ..Default::default()
                });
            }
            state
        };
        let mut t = DeltaTracker::default();
        assert!(t.report(up("Up 3 hours", 0), true).docker.is_some());
        assert!(t.report(up("Up 4 hours", 0), false).docker.is_none());
        assert!(t.report(up("Up 2 seconds", 1), false).docker.is_some());
        assert!(t.report(up("Up 9 seconds", 1), false).docker.is_none());
        let full = t.report(up("Up 11 seconds", 1), true);
        let Some(docker_section::Result::State(d)) = full.docker.and_then(|d| d.result) else {
            panic!("a full report carries the Docker section");
        };
        assert_eq!(d.containers[0].status, "Up 11 seconds");
    }

    #[test]
    fn unchanged_sections_are_left_out_of_deltas() {
        let mut t = DeltaTracker::default();
        assert!(t.report(docker("1"), false).docker.is_some());
        let mut again = docker("1");
        again
            .docker
            .as_mut()
            .unwrap()
            .collection
            .as_mut()
            .unwrap()
            .duration_micros = 7;
        assert!(t.report(again.clone(), false).docker.is_none());
        assert!(t.report(again, true).docker.is_some());
        assert!(t.report(docker("2"), false).docker.is_some());
        t.reset();
        assert!(t.report(docker("2"), false).docker.is_some());
    }
}
