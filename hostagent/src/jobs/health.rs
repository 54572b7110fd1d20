//! Whether a deployed release is healthy: its HTTP endpoint answers the expected status and,
//! when asked, every container of its Compose project is running and passes its own health
//! check. When it never gets there, the failing containers' last log lines go into the job's
//! events, so the operator sees why without logging into the host.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bollard::errors::Error as BollardError;
use bollard::models::{
    ContainerInspectResponse, ContainerStateStatusEnum, HealthStatusEnum, RestartPolicyNameEnum,
};
use bollard::query_parameters::{ListContainersOptions, LogsOptions};
use bollard::Docker;
use futures::StreamExt;
use sentinel_proto::v1::HealthCheck;

use super::events::{JobError, JobEvents};
use sentinel_daemon::http;

/// Between probes when the check does not say.
pub const DEFAULT_INTERVAL_MS: u32 = 1000;
/// Per probe when the check does not say.
pub const DEFAULT_TIMEOUT_MS: u32 = 5000;
/// Overall when the check does not say.
pub const DEFAULT_DEADLINE_MS: u32 = 60_000;

/// Log lines shown per failing container: enough for a stack trace, not a flood.
const LOG_TAIL_LINES: usize = 50;
/// Containers whose logs are shown at most (a broken project of 40 replicas says it all in 5).
const MAX_LOGGED_CONTAINERS: usize = 5;
/// Timeout of every Engine API request (bollard counts whole seconds).
const DOCKER_TIMEOUT_SECS: u64 = 10;
/// A line of container output beyond this is cut.
const MAX_LOG_LINE: usize = 4096;

const PROJECT_LABEL: &str = "com.docker.compose.project";
/// `compose run` containers (a migration) are not part of the running release.
const ONEOFF_LABEL: &str = "com.docker.compose.oneoff";

/// Waits until `check` passes for Compose project `project`, probing every `interval_ms`
/// until `deadline_ms` (0 means the default). Fails early when a container exited and its
/// restart policy will not bring it back. On failure the failing containers' (or, when the
/// containers look fine, all of the project's) last log lines are sent as events on stream
/// `container:<name>`, and the error names the URL, the last answer or error, and the
/// containers.
pub async fn wait_healthy(
    check: &HealthCheck,
    project: &str,
    events: &JobEvents,
) -> Result<(), JobError> {
    let or_default = |v: u32, d: u32| u64::from(if v == 0 { d } else { v });
    let interval = Duration::from_millis(or_default(check.interval_ms, DEFAULT_INTERVAL_MS));
    let probe_timeout = Duration::from_millis(or_default(check.timeout_ms, DEFAULT_TIMEOUT_MS));
    let deadline_after = Duration::from_millis(or_default(check.deadline_ms, DEFAULT_DEADLINE_MS));
    let expect = if check.expect_status == 0 {
        200
    } else {
        u16::try_from(check.expect_status).unwrap_or(u16::MAX)
    };
    let url = check.http_url.trim();
    if url.is_empty() && !check.container_health {
        events.log(
            "agent",
            "health: no URL and no container health requested; nothing to wait for",
        );
        return Ok(());
    }

    let started = Instant::now();
    let deadline = started + deadline_after;
    let mut docker: Option<Docker> = None;
    let mut http_state = String::new();
    let mut containers = ContainersView::default();
    let mut announced = String::new();
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        let http_ok = if url.is_empty() {
            true
        } else {
            let timeout = probe_timeout.min(remaining.max(Duration::from_millis(100)));
            let (ok, state) = probe(url, expect, timeout).await;
            http_state = state;
            ok
        };
        if check.container_health {
            containers = inspect_project(&mut docker, project).await;
        }
        let containers_ok = !check.container_health || containers.all_healthy();
        // One event per change of state, not per probe.
        let summary = status_text(url, &http_state, check.container_health, &containers);
        if summary != announced {
            events.log("agent", &format!("health: {summary}"));
            announced = summary;
        }
        if http_ok && containers_ok {
            events.log(
                "agent",
                &format!("healthy after {:.1}s", started.elapsed().as_secs_f64()),
            );
            return Ok(());
        }
        if check.container_health && containers.hopeless() {
            break;
        }
        if Instant::now() + interval >= deadline {
            break;
        }
        tokio::time::sleep(interval).await;
    }

    // Not healthy: show the containers' own words, then say what was seen last.
    if !check.container_health {
        containers = inspect_project(&mut docker, project).await;
    }
    send_container_logs(&mut docker, &containers, events).await;
    let mut reasons = Vec::new();
    if !url.is_empty() {
        reasons.push(format!("GET {url}: {http_state}"));
    }
    if check.container_health || !containers.failing().is_empty() {
        reasons.push(containers.describe(project));
    }
    let why = if check.container_health && containers.hopeless() {
        "a container exited and will not be restarted".to_string()
    } else {
        format!("not healthy within {:.1}s", deadline_after.as_secs_f64())
    };
    Err(JobError::Failed(
        events.redact(&format!("{why}: {}", reasons.join("; "))),
    ))
}

/// One probe: whether it passed and what it saw ("answered 503 (expected 200)").
async fn probe(url: &str, expect: u16, timeout: Duration) -> (bool, String) {
    match http::request("GET", url, None, timeout).await {
        Ok(r) if r.status == expect => (true, format!("answered {}", r.status)),
        Ok(r) => {
            let first_line: String = r
                .body
                .lines()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("")
                .chars()
                .take(120)
                .collect();
            let body = if first_line.is_empty() {
                String::new()
            } else {
                format!(": {}", first_line.trim())
            };
            (
                false,
                format!("answered {} (expected {expect}){body}", r.status),
            )
        }
        // The error repeats the URL; the caller already names it.
        Err(e) => (false, e.to_string().replacen(&format!("{url}: "), "", 1)),
    }
}

fn status_text(url: &str, http_state: &str, container_health: bool, c: &ContainersView) -> String {
    let mut parts = Vec::new();
    if !url.is_empty() {
        parts.push(format!("GET {url} {http_state}"));
    }
    if container_health {
        parts.push(c.short());
    }
    parts.join("; ")
}

/// A project's containers as last inspected, or why they could not be.
#[derive(Default)]
struct ContainersView {
    containers: Vec<ContainerStatus>,
    error: Option<String>,
}

struct ContainerStatus {
    id: String,
    name: String,
    state: String,
    /// "healthy", "unhealthy" or "starting"; `None` without a health check.
    health: Option<String>,
    exit_code: i64,
    /// Whether Docker will restart it after it exits.
    restarts: bool,
}

impl ContainerStatus {
    fn healthy(&self) -> bool {
        self.state == "running" && matches!(self.health.as_deref(), None | Some("healthy"))
    }

    fn describe(&self) -> String {
        match (self.state.as_str(), &self.health) {
            ("exited" | "dead", _) => {
                format!(
                    "{} ({} with code {})",
                    self.name, self.state, self.exit_code
                )
            }
            (state, Some(h)) => format!("{} ({state}, {h})", self.name),
            (state, None) => format!("{} ({state})", self.name),
        }
    }
}

impl ContainersView {
    fn all_healthy(&self) -> bool {
        self.error.is_none()
            && !self.containers.is_empty()
            && self.containers.iter().all(ContainerStatus::healthy)
    }

    fn failing(&self) -> Vec<&ContainerStatus> {
        self.containers.iter().filter(|c| !c.healthy()).collect()
    }

    /// A container exited for good: waiting longer cannot help.
    fn hopeless(&self) -> bool {
        self.containers
            .iter()
            .any(|c| matches!(c.state.as_str(), "exited" | "dead") && !c.restarts)
    }

    fn short(&self) -> String {
        if let Some(e) = &self.error {
            return format!("containers unknown ({e})");
        }
        if self.containers.is_empty() {
            return "no containers".to_string();
        }
        let list: Vec<String> = self
            .containers
            .iter()
            .map(ContainerStatus::describe)
            .collect();
        format!("containers {}", list.join(", "))
    }

    fn describe(&self, project: &str) -> String {
        if let Some(e) = &self.error {
            return format!("containers of project {project} unknown: {e}");
        }
        if self.containers.is_empty() {
            return format!("project {project} has no containers");
        }
        let failing = self.failing();
        if failing.is_empty() {
            let all: Vec<String> = self
                .containers
                .iter()
                .map(ContainerStatus::describe)
                .collect();
            return format!("containers look fine: {}", all.join(", "));
        }
        let list: Vec<String> = failing.iter().map(|c| c.describe()).collect();
        format!(
            "containers not healthy: {} (their last log lines are in the job log)",
            list.join(", ")
        )
    }
}

/// Lists and inspects the project's containers (one-off `compose run` containers excluded).
async fn inspect_project(docker: &mut Option<Docker>, project: &str) -> ContainersView {
    match list_project(docker, project).await {
        Ok(containers) => ContainersView {
            containers,
            error: None,
        },
        Err(e) => {
            // Reconnect next time: the daemon may have restarted.
            *docker = None;
            ContainersView {
                containers: Vec::new(),
                error: Some(e),
            }
        }
    }
}

async fn list_project(
    docker: &mut Option<Docker>,
    project: &str,
) -> Result<Vec<ContainerStatus>, String> {
    let client = match docker {
        Some(client) => client.clone(),
        None => docker.insert(connect().await?).clone(),
    };
    let filters = HashMap::from([(
        "label".to_string(),
        vec![format!("{PROJECT_LABEL}={project}")],
    )]);
    let list = client
        .list_containers(Some(ListContainersOptions {
            all: true,
            filters: Some(filters),
            ..Default::default()
        }))
        .await
        .map_err(|e| format!("listing containers: {}", describe(&e)))?;
    let mut out = Vec::new();
    for summary in list {
        let oneoff = summary
            .labels
            .as_ref()
            .and_then(|l| l.get(ONEOFF_LABEL))
            .is_some_and(|v| v.eq_ignore_ascii_case("true"));
        let Some(id) = summary.id else { continue };
        if oneoff {
            continue;
        }
        match client.inspect_container(&id, None).await {
            Ok(inspect) => out.push(status_of(id, inspect)),
            // Removed between list and inspect (compose recreating it): not ours any more.
            Err(BollardError::DockerResponseServerError {
                status_code: 404, ..
            }) => {}
            Err(e) => return Err(format!("inspecting {id}: {}", describe(&e))),
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

fn status_of(id: String, inspect: ContainerInspectResponse) -> ContainerStatus {
    let name = inspect
        .name
        .as_deref()
        .map(|n| n.trim_start_matches('/').to_string())
        .unwrap_or_else(|| id.chars().take(12).collect());
    let state = inspect.state.unwrap_or_default();
    let status = state
        .status
        .unwrap_or(ContainerStateStatusEnum::EMPTY)
        .to_string();
    let health = state
        .health
        .and_then(|h| h.status)
        .filter(|s| !matches!(s, HealthStatusEnum::EMPTY | HealthStatusEnum::NONE))
        .map(|s| s.to_string());
    let exit_code = state.exit_code.unwrap_or(0);
    let policy = inspect
        .host_config
        .and_then(|h| h.restart_policy)
        .and_then(|p| p.name)
        .unwrap_or(RestartPolicyNameEnum::EMPTY);
    let restarts = match policy {
        RestartPolicyNameEnum::ALWAYS | RestartPolicyNameEnum::UNLESS_STOPPED => true,
        RestartPolicyNameEnum::ON_FAILURE => exit_code != 0,
        _ => false,
    };
    ContainerStatus {
        id,
        name,
        state: status,
        health,
        exit_code,
        restarts,
    }
}

/// Sends the last [`LOG_TAIL_LINES`] lines of the failing containers (all of them when none
/// looks failing: then the app itself is what does not answer) as events.
async fn send_container_logs(
    docker: &mut Option<Docker>,
    view: &ContainersView,
    events: &JobEvents,
) {
    let failing = view.failing();
    let chosen: Vec<&ContainerStatus> = if failing.is_empty() {
        view.containers.iter().collect()
    } else {
        failing
    };
    if chosen.is_empty() {
        return;
    }
    let client = match docker {
        Some(client) => client.clone(),
        None => match connect().await {
            Ok(client) => docker.insert(client).clone(),
            Err(e) => {
                events.log("agent", &format!("container logs unavailable: {e}"));
                return;
            }
        },
    };
    for c in chosen.iter().take(MAX_LOGGED_CONTAINERS) {
        let stream_name = format!("container:{}", c.name);
        let mut logs = client.logs(
            &c.id,
            Some(LogsOptions {
                stdout: true,
                stderr: true,
                tail: LOG_TAIL_LINES.to_string(),
                ..Default::default()
            }),
        );
        let mut text = Vec::new();
        let mut failed = None;
        while let Some(chunk) = logs.next().await {
            match chunk {
                Ok(output) => text.extend_from_slice(output.as_ref()),
                Err(e) => {
                    failed = Some(describe(&e));
                    break;
                }
            }
        }
        let text = String::from_utf8_lossy(&text);
        let lines: Vec<&str> = text.lines().collect();
        events.log(
            "agent",
            &format!(
                "last {} log lines of {}:",
                lines.len().min(LOG_TAIL_LINES),
                c.describe()
            ),
        );
        let skip = lines.len().saturating_sub(LOG_TAIL_LINES);
        for line in &lines[skip..] {
            let line: String = line.chars().take(MAX_LOG_LINE).collect();
            events.log(&stream_name, &line);
        }
        if let Some(e) = failed {
            events.log("agent", &format!("reading logs of {} failed: {e}", c.name));
        }
    }
    if chosen.len() > MAX_LOGGED_CONTAINERS {
        events.log(
            "agent",
            &format!(
                "logs of {} more containers not shown",
                chosen.len() - MAX_LOGGED_CONTAINERS
            ),
        );
    }
}

/// Connects to the local Docker daemon (`DOCKER_HOST` when it is a unix socket) at an API
/// version it accepts: bollard's default is newer than older daemons serve.
async fn connect() -> Result<Docker, String> {
    let socket = std::env::var("DOCKER_HOST")
        .ok()
        .filter(|h| h.starts_with("unix://"))
        .unwrap_or_else(|| "unix:///var/run/docker.sock".to_string());
    crate::collectors::docker::connect_negotiated(&socket, DOCKER_TIMEOUT_SECS)
        .await
        .map(|(docker, _version)| docker)
}

/// A bollard error with its causes ("error trying to connect: No such file or directory").
fn describe(error: &BollardError) -> String {
    sentinel_daemon::error_chain(error)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jobs::events::Outbox;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    fn container(state: &str, health: Option<&str>, restarts: bool) -> ContainerStatus {
        ContainerStatus {
            id: "id".into(),
            name: "web-1".into(),
            state: state.into(),
            health: health.map(str::to_string),
            exit_code: 1,
            restarts,
        }
    }

    #[test]
    fn container_rules() {
        assert!(container("running", None, false).healthy());
        assert!(container("running", Some("healthy"), false).healthy());
        assert!(!container("running", Some("starting"), false).healthy());
        assert!(!container("restarting", None, true).healthy());
        let view = |c| ContainersView {
            containers: vec![c],
            error: None,
        };
        assert!(view(container("exited", None, false)).hopeless());
        assert!(!view(container("exited", None, true)).hopeless());
        assert!(
            !ContainersView::default().all_healthy(),
            "no containers is not healthy"
        );
        assert_eq!(
            view(container("exited", None, false)).describe("shop"),
            "containers not healthy: web-1 (exited with code 1) (their last log lines are in the job log)"
        );
    }

    /// Answers every connection with `status` until dropped.
    async fn server(status: u16) -> (String, tokio::task::JoinHandle<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}/health", listener.local_addr().expect("addr"));
        let task = tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await;
                let body = "version v7";
                let _ = s
                    .write_all(
                        format!(
                            "HTTP/1.1 {status} X\r\nContent-Length: {}\r\n\r\n{body}",
                            body.len()
                        )
                        .as_bytes(),
                    )
                    .await;
            }
        });
        (url, task)
    }

    #[tokio::test]
    async fn http_check_passes_on_expected_status() {
        let (url, task) = server(204).await;
        let check = HealthCheck {
            http_url: url,
            expect_status: 204,
            interval_ms: 50,
            deadline_ms: 2000,
            ..Default::default()
        };
        let ev = JobEvents::new("j", Outbox::default(), 0);
        wait_healthy(&check, "no-such-project", &ev)
            .await
            .expect("healthy");
        task.abort();
    }

    #[tokio::test]
    async fn http_check_failure_names_url_and_last_answer() {
        let (url, task) = server(503).await;
        let check = HealthCheck {
            http_url: url.clone(),
            interval_ms: 50,
            deadline_ms: 300,
            ..Default::default()
        };
        let outbox = Outbox::default();
        let ev = JobEvents::new("j", outbox.clone(), 0);
        let e = wait_healthy(&check, "sentinel-health-unit-no-such-project", &ev)
            .await
            .expect_err("unhealthy")
            .to_string();
        assert!(
            e.contains(&format!(
                "GET {url}: answered 503 (expected 200): version v7"
            )),
            "{e}"
        );
        assert!(e.starts_with("not healthy within 0.3s"), "{e}");
        // The state is announced once, not once per probe.
        let announced = format!("{:?}", outbox.drain())
            .matches("answered 503")
            .count();
        assert_eq!(announced, 1);
        task.abort();
    }
}
