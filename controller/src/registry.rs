//! The fleet as the controller sees it right now: every host's latest merged state, whether its
//! agent is connected, and the channel to send it messages. Reports land here first; a flusher
//! writes changed hosts to the [`Store`] in batches, so thousands of agents cost one
//! transaction per flush, not one per report.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use prost::Message;
use sentinel_proto::time::{age_seconds, timestamp};
use sentinel_proto::v1::{
    docker_section, ControllerMessage, DockerSection, Host, HostInfo, HostState, HostStatus,
    HostSummary, StateReport,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::Status;

use crate::store::{EncodedHost, Store, StoreError};

/// Where messages for a connected agent go.
pub type AgentSender = mpsc::Sender<Result<ControllerMessage, Status>>;

struct Connection {
    id: u64,
    tx: AgentSender,
    /// Cancelled when a newer connection of the same host takes over, so that the older
    /// stream's task stops reading and ends its stream (dropping our sender is not enough:
    /// the task holds a sender of its own).
    superseded: CancellationToken,
}

struct Entry {
    /// The durable part without its state, as stored and as `GetHost` answers (status fields
    /// filled and the state decoded on read).
    record: Host,
    /// The latest merged state; `None` until the first report.
    state: Option<EncodedState>,
    conn: Option<Connection>,
    last_seen: SystemTime,
}

/// `Host.state`'s field number, for writing an encoded record around the encoded state.
const HOST_STATE_FIELD: u32 = 8;
/// The sections of a `HostState`, in field order: system, docker, nginx, redis, postgres.
const SECTIONS: usize = 5;
const SECTION_NAMES: [&str; SECTIONS] = ["system", "docker", "nginx", "redis", "postgres"];

/// A host's latest state kept encoded. Decoded, 30 containers take about 22 KiB in hundreds of
/// small allocations; encoded, about 9 KB in one allocation per section. At 10,000 hosts that
/// is over 100 MiB of the controller's memory. `GetHost` and the flusher are the only readers of
/// the whole state and decode (or copy) it; `ListHosts` and metrics read the counts kept here.
#[derive(Default)]
struct EncodedState {
    /// Each present section as its own encoded `HostState` field (key, length, message), so
    /// that the concatenation of all of them is the encoded `HostState`.
    sections: [Option<Box<[u8]>>; SECTIONS],
    /// Whether each section carries its collector's error.
    failing: [bool; SECTIONS],
    /// Containers in the Docker section, and how many of them run.
    containers: u32,
    running: u32,
}

impl EncodedState {
    /// Replaces the sections `incoming` carries; with `full`, drops the others too.
    fn apply(&mut self, incoming: HostState, full: bool) {
        // Destructured so that a section added to `HostState` fails to compile here.
        let HostState {
            system,
            docker,
            nginx,
            redis,
            postgres,
        } = incoming;
        if full {
            *self = Self::default();
        }
        if let Some(docker) = &docker {
            (self.containers, self.running) = container_counts(docker);
        }
        use sentinel_proto::v1::{nginx_section, postgres_section, redis_section, system_section};
        // Each section alone in a HostState (so it encodes as that field), with whether its
        // collector failed.
        macro_rules! alone {
            ($section:expr, $field:ident, $error:path) => {
                alone!($section, $field, $error, |_| false)
            };
            ($section:expr, $field:ident, $error:path, $partly_failed:expr) => {
                $section.map(|s| {
                    let failed = matches!(s.result, Some($error(_))) || $partly_failed(&s);
                    let state = HostState {
                        $field: Some(s),
                        ..Default::default()
                    };
                    (failed, state)
                })
            };
        }
        let fresh: [Option<(bool, HostState)>; SECTIONS] = [
            alone!(system, system, system_section::Result::Error),
            alone!(docker, docker, docker_section::Result::Error),
            alone!(nginx, nginx, nginx_section::Result::Error),
            // One unreachable instance of several is a failing collector too: its error is in
            // the instance, not in the section.
            alone!(
                redis,
                redis,
                redis_section::Result::Error,
                |s: &sentinel_proto::v1::RedisSection| matches!(
                    &s.result,
                    Some(redis_section::Result::State(state))
                        if state.instances.iter().any(|i| !i.reachable || !i.error.is_empty())
                )
            ),
            alone!(postgres, postgres, postgres_section::Result::Error),
        ];
        for (i, section) in fresh.into_iter().enumerate() {
            if let Some((failed, one)) = section {
                // encode_to_vec allocates exactly the encoded length: no slack is kept.
                self.sections[i] = Some(one.encode_to_vec().into_boxed_slice());
                self.failing[i] = failed;
            }
        }
    }

    fn encoded_len(&self) -> usize {
        self.sections.iter().flatten().map(|s| s.len()).sum()
    }

    /// Appends the encoded `HostState`.
    fn encode_into(&self, out: &mut Vec<u8>) {
        for section in self.sections.iter().flatten() {
            out.extend_from_slice(section);
        }
    }

    fn decode(&self) -> HostState {
        let mut state = HostState::default();
        for section in self.sections.iter().flatten() {
            // Protobuf merges concatenated messages field by field; each section sets one.
            if let Err(e) = state.merge(&section[..]) {
                // Only bytes we encoded ourselves are here, so this would be a bug.
                tracing::error!(error = %e, "stored host state does not decode");
            }
        }
        state
    }

    fn failing_collectors(&self) -> Vec<String> {
        SECTION_NAMES
            .iter()
            .zip(self.failing)
            .filter(|(_, failed)| *failed)
            .map(|(name, _)| (*name).to_string())
            .collect()
    }
}

impl Entry {
    /// The record with its state, decoded.
    fn host(&self) -> Host {
        let mut host = self.record.clone();
        host.state = self.state.as_ref().map(EncodedState::decode);
        host
    }

    /// The record with its state, encoded as `sentinel.v1.Host` for the store.
    fn encode(&self) -> Vec<u8> {
        use prost::encoding::{encode_key, encode_varint, WireType};
        let state_len = self.state.as_ref().map_or(0, EncodedState::encoded_len);
        let mut out = Vec::with_capacity(self.record.encoded_len() + state_len + 16);
        // `record.state` is always `None`, so the state is written once, here.
        self.record.encode_raw(&mut out);
        if let Some(state) = &self.state {
            encode_key(HOST_STATE_FIELD, WireType::LengthDelimited, &mut out);
            encode_varint(state_len as u64, &mut out);
            state.encode_into(&mut out);
        }
        out
    }
}

/// Liveness settings: how often agents heartbeat and how many misses make a host offline.
#[derive(Debug, Clone, Copy)]
pub struct Liveness {
    /// Expected heartbeat interval.
    pub heartbeat_interval: Duration,
    /// Missed heartbeats before a host counts as offline.
    pub missed_heartbeats_offline: u32,
}

impl Liveness {
    /// How long a connected host may stay silent before it counts as offline.
    pub fn silence_limit(&self) -> Duration {
        self.heartbeat_interval * self.missed_heartbeats_offline.max(1)
    }
}

/// Why a host cannot be forgotten.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ForgetError {
    /// No such host.
    #[error("no host named {name:?}")]
    Unknown {
        /// The name asked for.
        name: String,
    },
    /// Its agent is connected: a host in service is not forgotten by mistake.
    #[error(
        "host {name:?} is online: stop its agent first (or revoke it: `sentinel hosts revoke \
         {name}`), then forget it"
    )]
    Online {
        /// The host.
        name: String,
    },
}

/// The in-memory fleet.
pub struct Registry {
    hosts: RwLock<HashMap<String, Entry>>,
    dirty: crate::store::DirtyKeys,
    next_conn: std::sync::atomic::AtomicU64,
    liveness: Liveness,
}

impl Registry {
    /// Builds the registry from the store: every known host starts offline until its agent
    /// connects again.
    pub fn load(store: &dyn Store, liveness: Liveness) -> Result<Arc<Self>, StoreError> {
        let mut hosts = HashMap::new();
        for mut record in store.load_hosts()? {
            record.status = HostStatus::Offline as i32;
            record.offline_reason = "controller restarted; agent has not reconnected yet".into();
            record.connected_since = None;
            let state = record.state.take().map(|s| {
                let mut encoded = EncodedState::default();
                encoded.apply(s, true);
                encoded
            });
            let last_seen = record
                .last_seen
                .as_ref()
                .map(sentinel_proto::time::system_time)
                .unwrap_or(SystemTime::UNIX_EPOCH);
            hosts.insert(
                record.name.clone(),
                Entry {
                    record,
                    state,
                    conn: None,
                    last_seen,
                },
            );
        }
        Ok(Arc::new(Self {
            hosts: RwLock::new(hosts),
            dirty: Default::default(),
            next_conn: std::sync::atomic::AtomicU64::new(1),
            liveness,
        }))
    }

    /// The liveness settings agents are told in their welcome.
    pub fn liveness(&self) -> Liveness {
        self.liveness
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<String, Entry>> {
        // A panic while holding the lock cannot leave an entry half-updated in a way that
        // matters more than losing the whole fleet view, so keep serving.
        self.hosts.write().unwrap_or_else(|p| p.into_inner())
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<String, Entry>> {
        self.hosts.read().unwrap_or_else(|p| p.into_inner())
    }

    fn mark_dirty(&self, name: &str) {
        self.dirty.mark(name);
    }

    /// Registers a freshly authenticated agent connection and returns its id. A previous
    /// connection of the same host is superseded (see [`Registry::connect_stream`]).
    pub fn connect(&self, info: HostInfo, peer: Option<SocketAddr>, tx: AgentSender) -> u64 {
        self.connect_stream(info, peer, tx, CancellationToken::new())
    }

    /// Registers a connection whose stream ends when `superseded` is cancelled, and returns
    /// its id. A previous connection of the same host is superseded: its token is cancelled
    /// and its sender dropped, so the newest stream is the only one that speaks for the host
    /// and the only one jobs are sent to.
    pub fn connect_stream(
        &self,
        info: HostInfo,
        peer: Option<SocketAddr>,
        tx: AgentSender,
        superseded: CancellationToken,
    ) -> u64 {
        let id = self
            .next_conn
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let now = SystemTime::now();
        let name = info.name.clone();
        {
            let mut hosts = self.write();
            let entry = hosts.entry(name.clone()).or_insert_with(|| Entry {
                record: Host {
                    name: name.clone(),
                    ..Default::default()
                },
                state: None,
                conn: None,
                last_seen: now,
            });
            let old = entry.conn.replace(Connection { id, tx, superseded });
            if let Some(old) = old {
                tracing::warn!(host = %name, old_conn = old.id, new_conn = id, "new connection supersedes an existing one");
                old.superseded.cancel();
            }
            entry.last_seen = now;
            entry.record.info = Some(info);
            entry.record.peer_address = peer.map(|p| p.to_string()).unwrap_or_default();
            entry.record.connected_since = Some(timestamp(now));
            entry.record.last_seen = Some(timestamp(now));
            entry.record.offline_reason.clear();
        }
        self.mark_dirty(&name);
        crate::metrics::get().agent_connected();
        id
    }

    /// Records that connection `conn_id` of `name` ended. Ignored if a newer connection of the
    /// same host has taken over.
    pub fn disconnect(&self, name: &str, conn_id: u64, reason: &str) {
        let mut hosts = self.write();
        if let Some(entry) = hosts.get_mut(name) {
            if entry.conn.as_ref().is_some_and(|c| c.id == conn_id) {
                entry.conn = None;
                entry.record.offline_reason = reason.to_string();
                entry.record.connected_since = None;
                drop(hosts);
                self.mark_dirty(name);
            }
        }
    }

    /// Records the validity of the certificate host `name` connected with.
    pub fn set_certificate(&self, name: &str, validity: (SystemTime, SystemTime)) {
        if let Some(entry) = self.write().get_mut(name) {
            entry.record.cert_not_before = Some(timestamp(validity.0));
            entry.record.cert_not_after = Some(timestamp(validity.1));
        } else {
            return;
        }
        self.mark_dirty(name);
    }

    /// Ends the open stream of host `name`, if any, as a newer connection would (revocation).
    /// Returns whether there was one.
    pub fn close(&self, name: &str) -> bool {
        let hosts = self.read();
        match hosts.get(name).and_then(|e| e.conn.as_ref()) {
            Some(conn) if !conn.superseded.is_cancelled() => {
                conn.superseded.cancel();
                true
            }
            _ => false,
        }
    }

    /// Removes host `name` from the fleet (`sentinel hosts forget`). Refused while its agent is
    /// connected; the caller removes the stored record.
    pub fn forget(&self, name: &str) -> Result<(), ForgetError> {
        {
            let mut hosts = self.write();
            let entry = hosts.get(name).ok_or_else(|| ForgetError::Unknown {
                name: name.to_string(),
            })?;
            if entry.conn.is_some() {
                return Err(ForgetError::Online {
                    name: name.to_string(),
                });
            }
            hosts.remove(name);
        }
        self.dirty.forget([&name.to_string()]);
        Ok(())
    }

    /// Notes that the host spoke (any message counts as a heartbeat).
    pub fn touch(&self, name: &str) {
        let now = SystemTime::now();
        if let Some(entry) = self.write().get_mut(name) {
            entry.last_seen = now;
            entry.record.last_seen = Some(timestamp(now));
        }
    }

    /// Merges a state report into the host's state. A full report replaces the state; a delta
    /// replaces only the sections it carries.
    pub fn apply_report(&self, name: &str, report: StateReport) {
        let now = SystemTime::now();
        let incoming = report.state.unwrap_or_default();
        let newest_collection = newest_collection(&incoming);
        {
            let mut hosts = self.write();
            let Some(entry) = hosts.get_mut(name) else {
                return;
            };
            entry
                .state
                .get_or_insert_with(EncodedState::default)
                .apply(incoming, report.full);
            if newest_collection.is_some() {
                entry.record.state_collected_at = newest_collection;
            }
            entry.record.state_received_at = Some(timestamp(now));
            entry.last_seen = now;
            entry.record.last_seen = Some(timestamp(now));
        }
        crate::metrics::get().state_report();
        self.mark_dirty(name);
    }

    /// The sender of a connected host, if any.
    pub fn sender(&self, name: &str) -> Option<AgentSender> {
        self.read()
            .get(name)
            .and_then(|e| e.conn.as_ref().map(|c| c.tx.clone()))
    }

    fn status(&self, entry: &Entry, now: SystemTime) -> (HostStatus, String) {
        match &entry.conn {
            None => (HostStatus::Offline, entry.record.offline_reason.clone()),
            Some(_) => {
                let silent = now.duration_since(entry.last_seen).unwrap_or_default();
                if silent > self.liveness.silence_limit() {
                    (
                        HostStatus::Offline,
                        format!(
                            "missed {} heartbeats: nothing heard for {}s",
                            self.liveness.missed_heartbeats_offline,
                            silent.as_secs()
                        ),
                    )
                } else {
                    (HostStatus::Online, String::new())
                }
            }
        }
    }

    /// One host with its status and state age filled in.
    pub fn host(&self, name: &str) -> Option<Host> {
        let now = SystemTime::now();
        let hosts = self.read();
        let entry = hosts.get(name)?;
        let mut host = entry.host();
        let (status, reason) = self.status(entry, now);
        host.status = status as i32;
        host.offline_reason = reason;
        host.state_age_seconds = host
            .state_collected_at
            .as_ref()
            .map_or(0.0, |t| age_seconds(t, now));
        Some(host)
    }

    /// Every host's name, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.read().keys().cloned().collect();
        names.sort();
        names
    }

    /// A summary line per host, sorted by name.
    pub fn summaries(&self) -> Vec<HostSummary> {
        let now = SystemTime::now();
        let hosts = self.read();
        let mut out: Vec<HostSummary> = hosts
            .values()
            .map(|entry| {
                let r = &entry.record;
                let (status, _) = self.status(entry, now);
                let state = entry.state.as_ref();
                let (containers, running) = state.map_or((0, 0), |s| (s.containers, s.running));
                HostSummary {
                    name: r.name.clone(),
                    status: status as i32,
                    last_seen: r.last_seen,
                    agent_version: r
                        .info
                        .as_ref()
                        .map(|i| i.agent_version.clone())
                        .unwrap_or_default(),
                    containers,
                    containers_running: running,
                    failing_collectors: state
                        .map(EncodedState::failing_collectors)
                        .unwrap_or_default(),
                    state_age_seconds: r
                        .state_collected_at
                        .as_ref()
                        .map_or(0.0, |t| age_seconds(t, now)),
                    cert_not_after: r.cert_not_after,
                    cert_not_before: r.cert_not_before,
                    revocation: None,
                }
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// Takes the records changed since the last call, encoded, for the flusher.
    pub fn take_dirty(&self) -> Vec<EncodedHost> {
        let names = self.dirty.take();
        if names.is_empty() {
            return Vec::new();
        }
        let hosts = self.read();
        names
            .iter()
            .filter_map(|n| {
                hosts.get(n).map(|e| EncodedHost {
                    name: n.clone(),
                    bytes: e.encode(),
                })
            })
            .collect()
    }

    /// Puts records back after a failed flush so the next one retries them.
    pub fn requeue(&self, hosts: &[EncodedHost]) {
        self.dirty.requeue(hosts.iter().map(|h| h.name.as_str()));
    }
}

fn newest_collection(state: &HostState) -> Option<prost_types::Timestamp> {
    [
        state.system.as_ref().and_then(|s| s.collection),
        state.docker.as_ref().and_then(|s| s.collection),
        state.nginx.as_ref().and_then(|s| s.collection),
        state.redis.as_ref().and_then(|s| s.collection),
        state.postgres.as_ref().and_then(|s| s.collection),
    ]
    .into_iter()
    .flatten()
    .filter_map(|c| c.collected_at)
    .max_by_key(|t| (t.seconds, t.nanos))
}

fn container_counts(docker: &DockerSection) -> (u32, u32) {
    let Some(docker_section::Result::State(docker)) = docker.result.as_ref() else {
        return (0, 0);
    };
    let total = u32::try_from(docker.containers.len()).unwrap_or(u32::MAX);
    let running = docker
        .containers
        .iter()
        .filter(|c| c.state == "running")
        .count();
    (total, u32::try_from(running).unwrap_or(u32::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;
    use sentinel_proto::v1::{system_section, Collection, DockerSection, SystemSection};

    fn registry() -> Arc<Registry> {
        // An empty store: the registry reads it once, at load.
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::embedded::EmbeddedStore::open(&dir.path().join("s")).unwrap();
        Registry::load(
            &store,
            Liveness {
                heartbeat_interval: Duration::from_secs(10),
                missed_heartbeats_offline: 3,
            },
        )
        .unwrap()
    }

    fn info(name: &str) -> HostInfo {
        HostInfo {
            name: name.into(),
            ..Default::default()
        }
    }

    fn system_error(msg: &str) -> Option<SystemSection> {
        Some(SystemSection {
            collection: Some(Collection::default()),
            result: Some(system_section::Result::Error(msg.into())),
        })
    }

    #[test]
    fn deltas_merge_and_full_reports_replace() {
        let r = registry();
        let (tx, _rx) = mpsc::channel(1);
        r.connect(info("argus"), None, tx);
        let docker = Some(DockerSection::default());
        r.apply_report(
            "argus",
            StateReport {
                seq: 1,
                full: true,
                state: Some(HostState {
                    system: system_error("a"),
                    docker: docker.clone(),
                    ..Default::default()
                }),
            },
        );
        r.apply_report(
            "argus",
            StateReport {
                seq: 2,
                full: false,
                state: Some(HostState {
                    system: system_error("b"),
                    ..Default::default()
                }),
            },
        );
        let host = r.host("argus").unwrap();
        let state = host.state.unwrap();
        assert_eq!(state.system, system_error("b"));
        assert_eq!(state.docker, docker);
        assert_eq!(
            r.summaries()[0].failing_collectors,
            vec!["system".to_string()]
        );

        r.apply_report(
            "argus",
            StateReport {
                seq: 3,
                full: true,
                state: Some(HostState::default()),
            },
        );
        assert!(r.host("argus").unwrap().state.unwrap().docker.is_none());
    }

    #[test]
    fn one_unreachable_redis_instance_makes_the_redis_collector_failing() {
        use sentinel_proto::v1::{redis_section, RedisInstance, RedisSection, RedisState};
        let r = registry();
        let (tx, _rx) = mpsc::channel(1);
        r.connect(info("argus"), None, tx);
        let redis = |reachable_cache: bool| RedisSection {
            collection: Some(Collection::default()),
            result: Some(redis_section::Result::State(RedisState {
                instances: vec![
                    RedisInstance {
                        name: "queue".into(),
                        reachable: true,
                        ..Default::default()
                    },
                    RedisInstance {
                        name: "cache".into(),
                        reachable: reachable_cache,
                        error: if reachable_cache {
                            String::new()
                        } else {
                            "connecting to 127.0.0.1:1: connection refused".into()
                        },
                        ..Default::default()
                    },
                ],
            })),
        };
        for (seq, up, failing) in [(1, false, vec!["redis".to_string()]), (2, true, vec![])] {
            r.apply_report(
                "argus",
                StateReport {
                    seq,
                    full: true,
                    state: Some(HostState {
                        redis: Some(redis(up)),
                        ..Default::default()
                    }),
                },
            );
            assert_eq!(r.summaries()[0].failing_collectors, failing);
        }
    }

    fn docker_with(containers: &[&str]) -> Option<DockerSection> {
        use sentinel_proto::v1::{Container, DockerState};
        Some(DockerSection {
            collection: Some(Collection::default()),
            result: Some(docker_section::Result::State(DockerState {
                engine_version: "27.0".into(),
                containers: containers
                    .iter()
                    .map(|state| Container {
                        name: format!("c-{state}"),
                        state: (*state).into(),
                        ..Default::default()
                    })
                    .collect(),
            })),
        })
    }

    #[test]
    fn summaries_count_containers_from_the_latest_docker_section() {
        let r = registry();
        let (tx, _rx) = mpsc::channel(1);
        r.connect(info("argus"), None, tx);
        assert!(r.host("argus").unwrap().state.is_none());
        let report = |seq, full, state| StateReport {
            seq,
            full,
            state: Some(state),
        };
        r.apply_report(
            "argus",
            report(
                1,
                true,
                HostState {
                    docker: docker_with(&["running", "running", "exited"]),
                    ..Default::default()
                },
            ),
        );
        let s = &r.summaries()[0];
        assert_eq!((s.containers, s.containers_running), (3, 2));
        // A delta without Docker keeps the counts; one with Docker replaces them.
        r.apply_report(
            "argus",
            report(
                2,
                false,
                HostState {
                    system: system_error("x"),
                    ..Default::default()
                },
            ),
        );
        assert_eq!(r.summaries()[0].containers, 3);
        r.apply_report(
            "argus",
            report(
                3,
                false,
                HostState {
                    docker: docker_with(&["running"]),
                    ..Default::default()
                },
            ),
        );
        let s = &r.summaries()[0];
        assert_eq!((s.containers, s.containers_running), (1, 1));
        assert_eq!(
            r.host("argus").unwrap().state.unwrap().docker,
            docker_with(&["running"])
        );
    }

    #[test]
    fn flushed_records_decode_to_what_get_host_answers() {
        let r = registry();
        let (tx, _rx) = mpsc::channel(1);
        r.connect(info("argus"), None, tx);
        r.apply_report(
            "argus",
            StateReport {
                seq: 1,
                full: true,
                state: Some(HostState {
                    system: system_error("a"),
                    docker: docker_with(&["running"]),
                    ..Default::default()
                }),
            },
        );
        let dirty = r.take_dirty();
        assert_eq!(dirty.len(), 1);
        assert_eq!(dirty[0].name, "argus");
        let stored = Host::decode(dirty[0].bytes.as_slice()).unwrap();
        let live = r.read().get("argus").unwrap().host();
        assert_eq!(stored, live);
        assert!(stored.state.unwrap().docker.is_some());
        assert!(r.take_dirty().is_empty());
    }

    #[test]
    fn a_newer_connection_cancels_the_older_ones_token() {
        let r = registry();
        let (tx1, _rx1) = mpsc::channel(1);
        let (tx2, _rx2) = mpsc::channel(1);
        let old = CancellationToken::new();
        let new = CancellationToken::new();
        r.connect_stream(info("argus"), None, tx1, old.clone());
        assert!(!old.is_cancelled());
        r.connect_stream(info("argus"), None, tx2, new.clone());
        assert!(old.is_cancelled());
        assert!(!new.is_cancelled());
    }

    #[test]
    fn a_superseded_connection_does_not_mark_the_host_offline() {
        let r = registry();
        let (tx1, _rx1) = mpsc::channel(1);
        let (tx2, _rx2) = mpsc::channel(1);
        let first = r.connect(info("argus"), None, tx1);
        let second = r.connect(info("argus"), None, tx2);
        r.disconnect("argus", first, "old stream closed");
        assert_eq!(r.host("argus").unwrap().status, HostStatus::Online as i32);
        r.disconnect("argus", second, "agent closed the stream");
        let host = r.host("argus").unwrap();
        assert_eq!(host.status, HostStatus::Offline as i32);
        assert_eq!(host.offline_reason, "agent closed the stream");
    }
}
