//! The Docker collector: every container of the local Docker Engine (running or not), read
//! through the Engine API on its unix socket with `bollard`.
//!
//! One collection is a `GET /containers/json?all=1` plus an inspect of the containers whose
//! details (restart count, health, start time, exit code, which the list does not give
//! reliably) may have changed, the inspects running concurrently. Those details are kept
//! between runs and read again whenever the list's state or status text of the container
//! changes (a restart resets the uptime in "Up 3 hours", health and exit code appear in it),
//! and at the latest after [`DETAILS_MAX_AGE`], so a steady host costs one list request.
//!
//! The client connects lazily, negotiates the API version with the daemon (older daemons
//! reject bollard's default version), caches the engine version, and is dropped after an
//! error so the next run reconnects.

use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bollard::errors::Error as BollardError;
use bollard::models::{
    ContainerInspectResponse, ContainerSummary, HealthStatusEnum, SystemVersion,
};
use bollard::query_parameters::ListContainersOptions;
use bollard::{ClientVersion, Docker, API_DEFAULT_VERSION};
use futures::stream::{self, StreamExt};
use prost_types::Timestamp;
use sentinel_proto::v1::{Container, DockerState, Port};

use super::CollectorError;

/// How many containers are inspected at the same time.
const INSPECT_CONCURRENCY: usize = 16;
/// Timeout of every Engine API request (bollard counts it in whole seconds).
const REQUEST_TIMEOUT_SECS: u64 = 10;
/// How long a cached engine version is trusted: the daemon may be upgraded and restarted
/// without any request of ours failing.
const VERSION_MAX_AGE: Duration = Duration::from_secs(600);
/// How long a container's inspected details are trusted while its list entry is unchanged.
const DETAILS_MAX_AGE: Duration = Duration::from_secs(300);
/// How many containers with expired (but otherwise unchanged) details are inspected again in
/// one run, oldest first, so expiries never make one run inspect everything.
const EXPIRED_PER_RUN: usize = INSPECT_CONCURRENCY;

const COMPOSE_PROJECT_LABEL: &str = "com.docker.compose.project";
const COMPOSE_SERVICE_LABEL: &str = "com.docker.compose.service";

/// Lists every container (running or not) through the Docker Engine API (bollard), unix
/// socket.
pub struct DockerCollector {
    /// The socket path, without any `unix://` scheme.
    socket: String,
    /// The live client, created on first use and dropped after errors.
    connection: Option<Connection>,
    /// Inspected details by container id, for the containers of the last run.
    details: HashMap<String, CachedDetails>,
}

/// A client speaking an API version the daemon accepts, with the engine version it reported.
struct Connection {
    docker: Docker,
    engine_version: String,
    version_fetched: Instant,
}

/// What an inspect adds to a container's list entry.
#[derive(Clone, Debug, Default)]
struct Details {
    name: String,
    state: String,
    health: &'static str,
    restart_count: u32,
    started_at: Option<Timestamp>,
    exit_code: i64,
    image_id: String,
}

/// A container's details with the list entry they were read for.
struct CachedDetails {
    list_state: String,
    list_status: String,
    details: Details,
    fetched: Instant,
}

/// How one container's inspect ended.
enum Inspected {
    Found(Details),
    /// It was removed between the list and the inspect.
    Gone,
    /// The daemon did not answer for this container.
    Failed(BollardError),
}

impl DockerCollector {
    /// A collector for the daemon at `socket`, a path like `/var/run/docker.sock` (or
    /// `unix:///var/run/docker.sock`). Never fails and does no I/O: a missing socket or a
    /// stopped daemon is reported by [`collect`](Self::collect).
    pub fn new(socket: &str) -> Self {
        let path = socket.strip_prefix("unix://").unwrap_or(socket);
        Self {
            socket: path.to_owned(),
            connection: None,
            details: HashMap::new(),
        }
    }

    /// Lists every container with its state, sorted by name.
    ///
    /// A missing socket, an unreachable daemon or a failed list is a
    /// [`CollectorError::Failed`] naming the socket; the connection is then rebuilt on the
    /// next run. A container removed while it is being inspected is left out.
    pub async fn collect(&mut self) -> Result<DockerState, CollectorError> {
        let connection = self.connection().await?;
        let docker = connection.docker.clone();
        let engine_version = connection.engine_version.clone();
        match collect_containers(&docker, &mut self.details).await {
            Ok(containers) => Ok(DockerState {
                engine_version,
                containers,
            }),
            Err(e) => {
                self.connection = None;
                self.details.clear();
                Err(self.failed(format!(
                    "cannot list containers through {}: {}",
                    self.socket,
                    describe(&e)
                )))
            }
        }
    }

    /// The live connection, made (or its engine version refreshed) when needed.
    async fn connection(&mut self) -> Result<&Connection, CollectorError> {
        let stale = self
            .connection
            .as_ref()
            .is_none_or(|c| c.version_fetched.elapsed() >= VERSION_MAX_AGE);
        if stale {
            self.connection = None;
            let connection = self.connect().await.map_err(|m| self.failed(m))?;
            return Ok(self.connection.insert(connection));
        }
        match &self.connection {
            Some(connection) => Ok(connection),
            None => Err(self.failed("no connection".to_owned())),
        }
    }

    /// Connects to the socket and negotiates the API version through `GET /version`.
    async fn connect(&self) -> Result<Connection, String> {
        let socket = &self.socket;
        match std::fs::metadata(socket) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(format!(
                    "Docker socket {socket} does not exist (is Docker installed and running?)"
                ));
            }
            Err(e) => return Err(format!("cannot access Docker socket {socket}: {e}")),
        }
        let (docker, version) = connect_negotiated(socket, REQUEST_TIMEOUT_SECS).await?;
        let engine_version = version.version.unwrap_or_default();
        tracing::debug!(
            socket = %socket,
            engine = %engine_version,
            api = %docker.client_version(),
            "connected to Docker"
        );
        Ok(Connection {
            docker,
            engine_version,
            version_fetched: Instant::now(),
        })
    }

    fn failed(&self, message: String) -> CollectorError {
        CollectorError::Failed {
            what: "docker".to_owned(),
            message,
        }
    }
}

/// Lists all containers and inspects those whose `cache`d details are missing, outdated or
/// expired, [`INSPECT_CONCURRENCY`] at a time; `cache` is left holding the details of the
/// listed containers.
async fn collect_containers(
    docker: &Docker,
    cache: &mut HashMap<String, CachedDetails>,
) -> Result<Vec<Container>, BollardError> {
    let options = ListContainersOptions {
        all: true,
        ..Default::default()
    };
    let mut summaries = docker.list_containers(Some(options)).await?;
    summaries.retain(|s| s.id.is_some());

    // Owned ids and a cloned client (one `Arc`) per inspect: futures that borrow make the
    // collection future `Send` only for specific lifetimes, which `tokio::spawn` rejects.
    let mut to_inspect: Vec<String> = Vec::new();
    let mut expired: Vec<(Instant, &str)> = Vec::new();
    for summary in &summaries {
        let id = summary.id.as_deref().unwrap_or_default();
        match cache.get(id) {
            Some(cached) if cached.matches(summary) => {
                if cached.fetched.elapsed() >= DETAILS_MAX_AGE {
                    expired.push((cached.fetched, id));
                }
            }
            _ => to_inspect.push(id.to_owned()),
        }
    }
    expired.sort_unstable();
    to_inspect.extend(
        expired
            .into_iter()
            .take(EXPIRED_PER_RUN)
            .map(|(_, id)| id.to_owned()),
    );

    let mut inspected: HashMap<String, Inspected> = stream::iter(to_inspect)
        .map(|id| {
            let docker = docker.clone();
            async move {
                let inspected = match docker.inspect_container(&id, None).await {
                    Ok(response) => Inspected::Found(Details::from_inspect(&response)),
                    Err(BollardError::DockerResponseServerError {
                        status_code: 404, ..
                    }) => Inspected::Gone,
                    Err(e) => Inspected::Failed(e),
                };
                (id, inspected)
            }
        })
        .buffer_unordered(INSPECT_CONCURRENCY)
        .collect()
        .await;

    let mut kept = HashMap::with_capacity(summaries.len());
    let mut containers = Vec::with_capacity(summaries.len());
    let fetched = Instant::now();
    for summary in summaries {
        let id = summary.id.clone().unwrap_or_default();
        let cached = cache.remove(&id);
        let (details, keep) = match inspected.remove(&id) {
            None => match cached {
                Some(cached) => (cached.details.clone(), Some(cached)),
                None => (Details::from_list(&summary), None),
            },
            Some(Inspected::Found(details)) => {
                let fresh = CachedDetails::new(&summary, details.clone(), fetched);
                (details, Some(fresh))
            }
            Some(Inspected::Gone) => continue,
            // The daemon itself is gone: the whole collection is void.
            Some(Inspected::Failed(e)) if is_transport_error(&e) => return Err(e),
            // One container did not answer (e.g. a timeout while it is stuck): report it
            // with what is known rather than hide it or fail everything.
            Some(Inspected::Failed(e)) => {
                tracing::warn!(
                    container = %id,
                    error = %describe(&e),
                    "cannot inspect container"
                );
                match cached {
                    Some(cached) if cached.matches(&summary) => {
                        (cached.details.clone(), Some(cached))
                    }
                    _ => (Details::from_list(&summary), None),
                }
            }
        };
        if let Some(entry) = keep {
            kept.insert(id, entry);
        }
        containers.push(container(summary, details));
    }
    *cache = kept;
    containers.sort_by(|a, b| a.name.cmp(&b.name).then_with(|| a.id.cmp(&b.id)));
    Ok(containers)
}

impl CachedDetails {
    fn new(summary: &ContainerSummary, details: Details, fetched: Instant) -> Self {
        Self {
            list_state: list_state(summary),
            list_status: summary.status.clone().unwrap_or_default(),
            details,
            fetched,
        }
    }

    /// Whether the container's list entry is still the one the details were read for.
    fn matches(&self, summary: &ContainerSummary) -> bool {
        self.list_state == list_state(summary)
            && Some(self.list_status.as_str()) == summary.status.as_deref()
    }
}

impl Details {
    fn from_inspect(inspect: &ContainerInspectResponse) -> Self {
        let state = inspect.state.as_ref();
        Self {
            name: inspect.name.clone().unwrap_or_default(),
            state: state
                .and_then(|s| s.status)
                .map(|s| s.to_string())
                .unwrap_or_default(),
            health: match state.and_then(|s| s.health.as_ref()).and_then(|h| h.status) {
                Some(HealthStatusEnum::HEALTHY) => "healthy",
                Some(HealthStatusEnum::UNHEALTHY) => "unhealthy",
                Some(HealthStatusEnum::STARTING) => "starting",
                Some(HealthStatusEnum::NONE | HealthStatusEnum::EMPTY) | None => "none",
            },
            restart_count: inspect
                .restart_count
                .map_or(0, |n| u32::try_from(n.max(0)).unwrap_or(u32::MAX)),
            started_at: state
                .and_then(|s| s.started_at.as_deref())
                .and_then(parse_rfc3339)
                .map(sentinel_proto::time::timestamp),
            exit_code: state.and_then(|s| s.exit_code).unwrap_or_default(),
            image_id: inspect.image.clone().unwrap_or_default(),
        }
    }

    /// The little the list tells, for a container that could not be inspected.
    fn from_list(summary: &ContainerSummary) -> Self {
        Self {
            state: list_state(summary),
            health: health_from_status(summary.status.as_deref().unwrap_or_default()),
            ..Self::default()
        }
    }
}

/// The list's state word ("running", "exited", ...).
fn list_state(summary: &ContainerSummary) -> String {
    summary.state.map(|s| s.to_string()).unwrap_or_default()
}

/// Builds the container from its list entry and its (inspected or cached) details.
fn container(summary: ContainerSummary, details: Details) -> Container {
    let state = match list_state(&summary) {
        state if state.is_empty() => details.state,
        state => state,
    };
    // The list knows about renames even when the details are cached.
    let name = primary_name(summary.names.as_deref().unwrap_or_default())
        .unwrap_or(&details.name)
        .trim_start_matches('/')
        .to_owned();
    let labels = summary.labels.unwrap_or_default();

    let mut ports: Vec<Port> = summary
        .ports
        .unwrap_or_default()
        .into_iter()
        .map(|p| Port {
            private_port: u32::from(p.private_port),
            public_port: p.public_port.map_or(0, u32::from),
            ip: p.ip.unwrap_or_default(),
            protocol: p.typ.map(|t| t.to_string()).unwrap_or_default(),
        })
        .collect();
    // Stable order, so an unchanged container compares equal between runs.
    ports.sort_by(|a, b| {
        (a.private_port, &a.protocol, &a.ip, a.public_port).cmp(&(
            b.private_port,
            &b.protocol,
            &b.ip,
            b.public_port,
        ))
    });
    ports.dedup();

    Container {
        id: summary.id.unwrap_or_default(),
        name,
        image: summary.image.unwrap_or_default(),
        image_id: summary
            .image_id
            .filter(|id| !id.is_empty())
            .unwrap_or(details.image_id),
        compose_project: labels
            .get(COMPOSE_PROJECT_LABEL)
            .cloned()
            .unwrap_or_default(),
        compose_service: labels
            .get(COMPOSE_SERVICE_LABEL)
            .cloned()
            .unwrap_or_default(),
        state,
        status: summary.status.unwrap_or_default(),
        health: details.health.to_owned(),
        restart_count: details.restart_count,
        ports,
        created: summary
            .created
            .and_then(|secs| u64::try_from(secs).ok())
            .filter(|&secs| secs > 0)
            .map(|secs| sentinel_proto::time::timestamp(UNIX_EPOCH + Duration::from_secs(secs))),
        started_at: details.started_at,
        exit_code: details.exit_code,
    }
}

/// Whether two collections differ in more than the durations inside Docker's status texts.
///
/// "Up 3 hours" becomes "Up 4 hours" and "Exited (0) 5 minutes ago" becomes "... 6 minutes ago"
/// while nothing happens; resending the whole section for that was two thirds of an idle
/// agent's traffic. What a status text can say besides the duration (health, exit code,
/// "Paused", a restart, which resets the duration) still counts, and so do all other fields:
/// a restart also changes `started_at` and `restart_count`. The texts sent are refreshed with
/// every report that carries the section anyway, and with every periodic full report.
pub fn changed_apart_from_durations(old: &DockerState, new: &DockerState) -> bool {
    old.engine_version != new.engine_version
        || old.containers.len() != new.containers.len()
        || old
            .containers
            .iter()
            .zip(&new.containers)
            .any(|(a, b)| container_changed(a, b))
}

fn container_changed(a: &Container, b: &Container) -> bool {
    // Destructured so that a field added to `Container` fails to compile here until it is
    // compared.
    let Container {
        id,
        name,
        image,
        image_id,
        compose_project,
        compose_service,
        state,
        status,
        health,
        restart_count,
        ports,
        created,
        started_at,
        exit_code,
    } = a;
    *id != b.id
        || *name != b.name
        || *image != b.image
        || *image_id != b.image_id
        || *compose_project != b.compose_project
        || *compose_service != b.compose_service
        || *state != b.state
        || !status_words(status).eq(status_words(&b.status))
        || *health != b.health
        || *restart_count != b.restart_count
        || *ports != b.ports
        || *created != b.created
        || *started_at != b.started_at
        || *exit_code != b.exit_code
}

/// A status text's words without the durations of Docker's `units.HumanDuration` ("Less than a
/// second", "About a minute", "3 hours", "2 weeks"...): "Up 3 hours (healthy)" gives "Up",
/// "(healthy)"; "Exited (137) 2 days ago" gives "Exited", "(137)", "ago".
fn status_words(status: &str) -> impl Iterator<Item = &str> {
    status.split_whitespace().filter(|word| {
        let duration = word.bytes().all(|b| b.is_ascii_digit())
            || matches!(
                *word,
                "Less"
                    | "than"
                    | "a"
                    | "an"
                    | "About"
                    | "second"
                    | "seconds"
                    | "minute"
                    | "minutes"
                    | "hour"
                    | "hours"
                    | "day"
                    | "days"
                    | "week"
                    | "weeks"
                    | "month"
                    | "months"
                    | "year"
                    | "years"
            );
        !duration
    })
}

/// The container's own name among the list's names (legacy links add `/other/alias` names).
fn primary_name(names: &[String]) -> Option<&str> {
    names
        .iter()
        .find(|n| !n.trim_start_matches('/').contains('/'))
        .or_else(|| names.first())
        .map(String::as_str)
}

/// The health as the list's status text shows it: "Up 2 hours (healthy)".
fn health_from_status(status: &str) -> &'static str {
    if status.contains("(unhealthy)") {
        "unhealthy"
    } else if status.contains("(healthy)") {
        "healthy"
    } else if status.contains("(health: starting)") {
        "starting"
    } else {
        "none"
    }
}

/// Whether the request never got a usable answer from the daemon (as opposed to an answer
/// about one container).
fn is_transport_error(error: &BollardError) -> bool {
    matches!(
        error,
        BollardError::HyperLegacyError { .. }
            | BollardError::HyperResponseError { .. }
            | BollardError::IOError { .. }
            | BollardError::SocketNotFoundError(_)
    )
}

/// An error with its causes, e.g. "Error in the hyper legacy client: client error (Connect):
/// Permission denied (os error 13)".
fn describe(error: &BollardError) -> String {
    sentinel_daemon::error_chain(error)
}

/// Connects to the Docker daemon at unix `socket` (`unix:///var/run/docker.sock`) at an API
/// version it accepts, and returns the client with the daemon's `GET /version`: bollard's
/// default version is newer than older daemons serve, and a daemon's refusal says which it
/// does. The one negotiation of the agent (collector and deploy health checks).
pub async fn connect_negotiated(
    socket: &str,
    timeout_secs: u64,
) -> Result<(Docker, SystemVersion), String> {
    let unreachable = |e: &BollardError| {
        format!(
            "cannot reach the Docker daemon at {socket}: {}",
            describe(e)
        )
    };
    let docker = Docker::connect_with_unix(socket, timeout_secs, API_DEFAULT_VERSION)
        .map_err(|e| unreachable(&e))?;
    match docker.version().await {
        Ok(version) => Ok((docker, version)),
        Err(BollardError::DockerResponseServerError {
            status_code: 400,
            message,
        }) => {
            // "client version 1.53 is too new. Maximum supported API version is 1.41":
            // speak the daemon's version instead.
            let Some(supported) = supported_api_version(&message) else {
                return Err(format!(
                    "the Docker daemon at {socket} refused the API version: {message}"
                ));
            };
            let docker = Docker::connect_with_unix(socket, timeout_secs, &supported)
                .map_err(|e| unreachable(&e))?;
            let version = docker.version().await.map_err(|e| unreachable(&e))?;
            Ok((docker, version))
        }
        Err(e) => Err(unreachable(&e)),
    }
}

/// The API version to retry with, from a daemon's refusal of ours: "client version 1.53 is too
/// new. Maximum supported API version is 1.41" (or "... too old. Minimum supported ...").
fn supported_api_version(message: &str) -> Option<ClientVersion> {
    let (_, rest) = message
        .split_once("Maximum supported API version is ")
        .or_else(|| message.split_once("Minimum supported API version is "))?;
    let version: String = rest
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    let (major, minor) = version.trim_end_matches('.').split_once('.')?;
    Some(ClientVersion {
        major_version: major.parse().ok()?,
        minor_version: minor.parse().ok()?,
    })
}

/// Parses the RFC 3339 times Docker reports ("2024-05-01T12:34:56.123456789Z", or with an
/// offset) with jiff. Docker's zero time ("0001-01-01T00:00:00Z", never started) and anything
/// else before 1970 give `None`.
fn parse_rfc3339(text: &str) -> Option<SystemTime> {
    // jiff reads at most nanoseconds; finer digits (not Go's, but other engines') are cut.
    let timestamp: jiff::Timestamp = match text.split_once('.') {
        Some((head, tail)) if tail.bytes().take_while(u8::is_ascii_digit).count() > 9 => {
            let digits = tail.bytes().take_while(u8::is_ascii_digit).count();
            format!("{head}.{}{}", &tail[..9], &tail[digits..])
                .parse()
                .ok()?
        }
        _ => text.parse().ok()?,
    };
    if timestamp <= jiff::Timestamp::UNIX_EPOCH {
        return None;
    }
    Some(SystemTime::from(timestamp))
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::path::Path;

    use super::*;

    fn unix(seconds: u64, nanos: u32) -> Option<SystemTime> {
        Some(UNIX_EPOCH + Duration::new(seconds, nanos))
    }

    #[tokio::test]
    async fn missing_socket_is_a_failure_naming_the_path() {
        let dir = std::env::temp_dir().join(format!("sentinel-no-docker-{}", std::process::id()));
        let socket = dir.join("docker.sock");
        let socket = socket.to_string_lossy().into_owned();
        for spec in [socket.clone(), format!("unix://{socket}")] {
            let mut collector = DockerCollector::new(&spec);
            for _ in 0..2 {
                match collector.collect().await {
                    Err(CollectorError::Failed { what, message }) => {
                        assert_eq!(what, "docker");
                        assert!(message.contains(&socket), "{message}");
                        assert!(message.contains("does not exist"), "{message}");
                        println!("{message}");
                    }
                    Ok(state) => panic!("collected from a missing socket: {state:?}"),
                }
            }
        }
    }

    #[tokio::test]
    async fn a_socket_nobody_listens_on_is_a_failure_naming_the_path() {
        let dir = match tempfile::tempdir() {
            Ok(dir) => dir,
            Err(e) => panic!("tempdir: {e}"),
        };
        let path = dir.path().join("docker.sock");
        // Bound and dropped: the file stays, nothing accepts.
        drop(std::os::unix::net::UnixListener::bind(&path));
        let socket = path.to_string_lossy().into_owned();
        let mut collector = DockerCollector::new(&socket);
        match collector.collect().await {
            Err(CollectorError::Failed { what, message }) => {
                assert_eq!(what, "docker");
                assert!(message.contains(&socket), "{message}");
                println!("{message}");
            }
            Ok(state) => panic!("collected from a dead socket: {state:?}"),
        }
    }

    #[test]
    fn parses_docker_times() {
        assert_eq!(parse_rfc3339("1970-01-01T00:00:01Z"), unix(1, 0));
        assert_eq!(
            parse_rfc3339("2024-02-29T12:34:56.123456789Z"),
            unix(1_709_210_096, 123_456_789)
        );
        assert_eq!(
            parse_rfc3339("2024-02-29T12:34:56.5Z"),
            unix(1_709_210_096, 500_000_000)
        );
        assert_eq!(
            parse_rfc3339("2024-02-29T14:34:56.5+02:00"),
            unix(1_709_210_096, 500_000_000)
        );
        assert_eq!(
            parse_rfc3339("2024-02-29T12:34:56.1234567891Z"),
            unix(1_709_210_096, 123_456_789)
        );
        assert_eq!(parse_rfc3339("0001-01-01T00:00:00Z"), None);
        assert_eq!(parse_rfc3339(""), None);
        assert_eq!(parse_rfc3339("2024-02-29T12:34:56"), None);
        assert_eq!(parse_rfc3339("2024-13-01T00:00:00Z"), None);
        assert_eq!(parse_rfc3339("2024-02-29T12:34:56.Z"), None);
    }

    #[test]
    fn reads_the_supported_api_version_from_a_refusal() {
        let v = supported_api_version(
            "client version 1.53 is too new. Maximum supported API version is 1.41",
        );
        assert_eq!(v.map(|v| (v.major_version, v.minor_version)), Some((1, 41)));
        let v = supported_api_version(
            "client version 1.24 is too old. Minimum supported API version is 1.44, please upgrade",
        );
        assert_eq!(v.map(|v| (v.major_version, v.minor_version)), Some((1, 44)));
        assert!(supported_api_version("page not found").is_none());
    }

    #[test]
    fn builds_containers_from_the_list_alone() {
        let summary = ContainerSummary {
            id: Some("abc".into()),
            names: Some(vec!["/web/db".into(), "/db".into()]),
            image: Some("postgres:16".into()),
            image_id: Some("sha256:1".into()),
            created: Some(1_700_000_000),
            labels: Some(HashMap::from([
                (COMPOSE_PROJECT_LABEL.to_owned(), "shop".to_owned()),
                (COMPOSE_SERVICE_LABEL.to_owned(), "db".to_owned()),
            ])),
            status: Some("Up 2 hours (unhealthy)".into()),
            ..Default::default()
        };
        let details = Details::from_list(&summary);
        let c = container(summary, details);
        assert_eq!(c.name, "db");
        assert_eq!(
            (c.compose_project.as_str(), c.compose_service.as_str()),
            ("shop", "db")
        );
        assert_eq!(c.health, "unhealthy");
        assert_eq!(c.created.map(|t| t.seconds), Some(1_700_000_000));
        assert_eq!(c.started_at, None);
        assert_eq!(
            health_from_status("Up 1 second (health: starting)"),
            "starting"
        );
        assert_eq!(health_from_status("Exited (0) 2 minutes ago"), "none");
    }

    #[test]
    fn durations_in_status_texts_are_not_changes_but_everything_else_is() {
        let state = |status: &str, restarts: u32| DockerState {
            engine_version: "27.0".into(),
            containers: vec![Container {
                id: "abc".into(),
                name: "auth-api-1".into(),
                state: "running".into(),
                status: status.into(),
                restart_count: restarts,
                ..Default::default()
            }],
        };
        let changed = |a: &DockerState, b: &DockerState| changed_apart_from_durations(a, b);
        let base = state("Up 3 hours (healthy)", 0);
        assert!(!changed(&base, &state("Up 4 hours (healthy)", 0)));
        assert!(!changed(&base, &state("Up About an hour (healthy)", 0)));
        assert!(!changed(
            &state("Exited (0) 5 minutes ago", 0),
            &state("Exited (0) Less than a second ago", 0)
        ));
        assert!(changed(&base, &state("Up 3 hours (unhealthy)", 0)));
        assert!(changed(&base, &state("Up 3 hours (Paused)", 0)));
        assert!(changed(
            &state("Exited (0) 5 minutes ago", 0),
            &state("Exited (137) 5 minutes ago", 0)
        ));
        assert!(changed(&base, &state("Up 3 hours (healthy)", 1)));
        let mut renamed = base.clone();
        renamed.containers[0].name = "auth-api-2".into();
        assert!(changed(&base, &renamed));
        let mut more = base.clone();
        more.containers.push(Container::default());
        assert!(changed(&base, &more));
    }

    #[test]
    fn collections_can_be_spawned() {
        fn spawnable<F: std::future::Future + Send + 'static>(_: F) {}
        spawnable(async {
            let mut collector = DockerCollector::new("/nonexistent/docker.sock");
            let _ = collector.collect().await;
        });
    }

    /// Runs `docker` with `args`; `None` (with the reason printed) when it fails.
    fn docker_cli(args: &[&str]) -> Option<String> {
        match std::process::Command::new("docker").args(args).output() {
            Ok(out) if out.status.success() => {
                Some(String::from_utf8_lossy(&out.stdout).trim().to_owned())
            }
            Ok(out) => {
                println!(
                    "docker {}: {}",
                    args.join(" "),
                    String::from_utf8_lossy(&out.stderr).trim()
                );
                None
            }
            Err(e) => {
                println!("docker {}: {e}", args.join(" "));
                None
            }
        }
    }

    /// Removes the test's containers and image, even when an assertion fails.
    struct Cleanup {
        containers: Vec<String>,
        image: String,
    }

    impl Drop for Cleanup {
        fn drop(&mut self) {
            if !self.containers.is_empty() {
                let mut args = vec!["rm", "-f", "-v"];
                args.extend(self.containers.iter().map(String::as_str));
                let _ = docker_cli(&args);
            }
            let _ = docker_cli(&["rmi", "-f", &self.image]);
        }
    }

    /// Against the real daemon: builds a `FROM scratch` busybox image (no registry needed),
    /// runs a healthy compose-labelled container with a published port, a container that
    /// exited with code 3 after two restarts and one never started, checks what the collector
    /// reports, then restarts, renames and removes containers and checks that it follows.
    #[tokio::test]
    async fn reports_real_containers() {
        const SOCKET: &str = "/var/run/docker.sock";
        if !Path::new(SOCKET).exists() {
            println!("skipped: {SOCKET} does not exist");
            return;
        }
        let busybox = ["/bin/busybox", "/usr/bin/busybox"]
            .into_iter()
            .find(|p| Path::new(p).exists());
        let Some(busybox) = busybox else {
            println!("skipped: no busybox binary (apt-get install busybox-static)");
            return;
        };
        if docker_cli(&["version", "--format", "{{.Server.Version}}"]).is_none() {
            println!("skipped: the docker CLI cannot talk to the daemon");
            return;
        }

        let tag = format!("sentinel-test-{}", std::process::id());
        let image = format!("{tag}:latest");
        let mut cleanup = Cleanup {
            containers: Vec::new(),
            image: image.clone(),
        };
        let context = match tempfile::tempdir() {
            Ok(dir) => dir,
            Err(e) => panic!("tempdir: {e}"),
        };
        if let Err(e) = std::fs::copy(busybox, context.path().join("busybox")) {
            panic!("copy busybox: {e}");
        }
        let dockerfile = "FROM scratch\nCOPY busybox /bin/busybox\n\
                          HEALTHCHECK --interval=1s CMD [\"/bin/busybox\", \"true\"]\n";
        if let Err(e) = std::fs::write(context.path().join("Dockerfile"), dockerfile) {
            panic!("write Dockerfile: {e}");
        }
        let context_path = context.path().to_string_lossy().into_owned();
        if docker_cli(&["build", "-q", "-t", &image, &context_path]).is_none() {
            panic!("docker build failed (see the output above)");
        }

        let running = format!("{tag}-running");
        let exited = format!("{tag}-exited");
        let created = format!("{tag}-created");
        cleanup.containers = vec![running.clone(), exited.clone(), created.clone()];
        let project_label = format!("{COMPOSE_PROJECT_LABEL}=sentinel-test");
        let service_label = format!("{COMPOSE_SERVICE_LABEL}=web");
        let run = [
            "run",
            "-d",
            "--name",
            &running,
            "-l",
            &project_label,
            "-l",
            &service_label,
            "-p",
            "127.0.0.1::8080",
            &image,
            "/bin/busybox",
            "sleep",
            "300",
        ];
        let published = docker_cli(&run).is_some();
        if !published {
            // Port publishing needs the host's network plumbing; retry without it.
            let _ = docker_cli(&["rm", "-f", &running]);
            let run = [
                "run",
                "-d",
                "--name",
                &running,
                "-l",
                &project_label,
                "-l",
                &service_label,
                &image,
                "/bin/busybox",
                "sleep",
                "300",
            ];
            if docker_cli(&run).is_none() {
                panic!("docker run failed (see the output above)");
            }
        }
        // Fails, is restarted twice by its policy, and stays exited.
        let exit_3 = [
            "run",
            "-d",
            "--name",
            &exited,
            "--restart",
            "on-failure:2",
            "--no-healthcheck",
            &image,
            "/bin/busybox",
            "sh",
            "-c",
            "exit 3",
        ];
        if docker_cli(&exit_3).is_none() {
            panic!("docker run failed (see the output above)");
        }
        if docker_cli(&["create", "--name", &created, &image, "/bin/busybox", "true"]).is_none() {
            panic!("docker create failed (see the output above)");
        }

        let mut collector = DockerCollector::new(SOCKET);
        // Wait for the health check's first verdict (it runs every second) and for the
        // restart policy to give up.
        let mut state = DockerState::default();
        for _ in 0..50 {
            state = match collector.collect().await {
                Ok(state) => state,
                Err(e) => panic!("docker collection failed: {e}"),
            };
            let healthy = state
                .containers
                .iter()
                .any(|c| c.name == running && c.health == "healthy");
            let given_up = state
                .containers
                .iter()
                .any(|c| c.name == exited && c.state == "exited" && c.restart_count == 2);
            if healthy && given_up {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert!(!state.engine_version.is_empty());
        let names: Vec<&str> = state.containers.iter().map(|c| c.name.as_str()).collect();
        let mut sorted = names.clone();
        sorted.sort_unstable();
        assert_eq!(names, sorted, "containers are sorted by name");
        let find = |name: &str| match state.containers.iter().find(|c| c.name == name) {
            Some(c) => c.clone(),
            None => panic!("{name} missing from {names:?}"),
        };

        let web = find(&running);
        assert_eq!(web.state, "running");
        assert_eq!(web.health, "healthy");
        assert!(web.status.starts_with("Up"), "{}", web.status);
        assert_eq!(web.image, image);
        assert!(web.image_id.starts_with("sha256:"), "{}", web.image_id);
        assert_eq!(web.id.len(), 64);
        assert_eq!(web.compose_project, "sentinel-test");
        assert_eq!(web.compose_service, "web");
        assert_eq!(web.restart_count, 0);
        assert_eq!(web.exit_code, 0);
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let now = i64::try_from(now).unwrap_or(i64::MAX);
        let created_at = web.created.as_ref().map_or(0, |t| t.seconds);
        let started_at = web.started_at.as_ref().map_or(0, |t| t.seconds);
        assert!(
            (now - 600..=now + 5).contains(&created_at),
            "created {created_at}"
        );
        assert!(
            started_at >= created_at && started_at <= now + 5,
            "started {started_at}"
        );
        assert_eq!(web.ports.is_empty(), !published, "{:?}", web.ports);
        for port in &web.ports {
            assert_eq!(port.private_port, 8080);
            assert_eq!(port.protocol, "tcp");
            assert_eq!(port.ip, "127.0.0.1");
            assert!(port.public_port > 0);
        }

        let done = find(&exited);
        assert_eq!(done.state, "exited");
        assert_eq!(done.exit_code, 3);
        assert_eq!(done.restart_count, 2);
        assert_eq!(done.health, "none");
        assert!(done.started_at.is_some());
        assert!(done.compose_project.is_empty());

        let fresh = find(&created);
        assert_eq!(fresh.state, "created");
        assert_eq!(fresh.started_at, None);
        // Docker keeps no health state before the first start.
        assert_eq!(fresh.health, "none");

        // Details read once are reused while a container's list entry does not change...
        let again = match collector.collect().await {
            Ok(state) => state,
            Err(e) => panic!("docker collection failed: {e}"),
        };
        // (The status text may have aged a second meanwhile: "Exited (3) 2 seconds ago".)
        let without_status = |c: &Container| Container {
            status: String::new(),
            ..c.clone()
        };
        let unchanged = |name: &str| {
            let found = again.containers.iter().find(|c| c.name == name);
            found.map(without_status)
        };
        assert_eq!(unchanged(&exited), Some(without_status(&done)));
        assert_eq!(unchanged(&created), Some(without_status(&fresh)));

        // ...and read again when it does: a restart shows a new start time at once.
        if docker_cli(&["restart", "-t", "0", &running]).is_none() {
            panic!("docker restart failed (see the output above)");
        }
        // A rename shows through cached details; a removed container disappears.
        let renamed = format!("{tag}-renamed");
        cleanup.containers.push(renamed.clone());
        if docker_cli(&["rename", &exited, &renamed]).is_none() {
            panic!("docker rename failed (see the output above)");
        }
        let _ = docker_cli(&["rm", "-f", &created]);
        let after = match collector.collect().await {
            Ok(state) => state,
            Err(e) => panic!("docker collection failed: {e}"),
        };
        let restarted = after.containers.iter().find(|c| c.name == running);
        let started = |c: &Container| c.started_at.as_ref().map(|t| (t.seconds, t.nanos));
        assert!(
            restarted.is_some_and(|c| c.state == "running" && started(c) > started(&web)),
            "{restarted:?} after {web:?}"
        );
        assert!(after.containers.iter().all(|c| c.name != created));
        assert!(after.containers.iter().all(|c| c.name != exited));
        let moved = after.containers.iter().find(|c| c.name == renamed);
        assert_eq!(
            moved.map(|c| (c.id.as_str(), c.exit_code)),
            Some((done.id.as_str(), 3))
        );
        drop(cleanup);
    }

    /// Times collections against the real daemon with whatever containers exist:
    /// `cargo test -p hostagent docker::tests::timing -- --ignored --nocapture`.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "measures the local daemon"]
    async fn timing() {
        let mut collector = DockerCollector::new("/var/run/docker.sock");
        for run in 0..6 {
            let started = Instant::now();
            match collector.collect().await {
                Ok(state) => {
                    let elapsed = started.elapsed();
                    if run == 0 {
                        println!("first container: {:#?}", state.containers.first());
                    }
                    println!(
                        "run {run}: {} containers in {elapsed:?} (engine {})",
                        state.containers.len(),
                        state.engine_version
                    );
                }
                Err(e) => println!("run {run}: {e}"),
            }
        }
        if let Some(connection) = &collector.connection {
            for run in 0..3 {
                let started = Instant::now();
                let options = ListContainersOptions {
                    all: true,
                    ..Default::default()
                };
                let listed = connection.docker.list_containers(Some(options)).await;
                println!(
                    "list alone {run}: {} containers in {:?}",
                    listed.map_or(0, |l| l.len()),
                    started.elapsed()
                );
            }
        }
    }
}
