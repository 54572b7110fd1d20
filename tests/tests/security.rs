//! Who may call what: mTLS with the fleet CA only, host certificates on the agent channel only
//! and only under their own name, operator certificates on the operator API with roles; and
//! what a peer with a valid certificate (a compromised host) or without one can and cannot do
//! to the controller.

use std::sync::{Arc, Mutex};

use prost::Message;
use sentinel_e2e::{eventually, Controller, Fleet, Value};
use sentinel_proto::v1::agent_service_client::AgentServiceClient;
use sentinel_proto::v1::{
    agent_message, controller_message, job_event, AgentMessage, ControllerMessage, Hello, HostInfo,
    JobAccepted, JobEvent, JobFinished, JobLog, JobSpec, JobState,
};

#[test]
fn a_client_without_a_certificate_is_refused() {
    let fleet = Fleet::new(&["hub-alfa"]);
    let controller = fleet.start_controller("");
    let out = std::process::Command::new("grpcurl")
        .arg("-cacert")
        .arg(fleet.certs.join("ca.pem"))
        .arg(&controller.addr)
        .arg("list")
        .output()
        .unwrap();
    assert!(!out.status.success());
    // The controller is still serving others.
    assert!(controller.grpcurl(None, "list").ok);
}

#[test]
fn a_certificate_of_another_ca_is_refused() {
    let fleet = Fleet::new(&["hub-alfa"]);
    let other = Fleet::new(&["hub-alfa"]);
    let controller = fleet.start_controller("");
    let out = std::process::Command::new("grpcurl")
        .arg("-cacert")
        .arg(fleet.certs.join("ca.pem"))
        .arg("-cert")
        .arg(other.certs.join("operator-admin.pem"))
        .arg("-key")
        .arg(other.certs.join("operator-admin.key"))
        .arg(&controller.addr)
        .args(["sentinel.v1.FleetService/ListHosts"])
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    // The refusal is logged by the accept loop, which may not have written it yet.
    eventually("the controller to log the refused handshake", || {
        if controller.proc.log_text().contains("TLS handshake refused") {
            Ok(())
        } else {
            Err(controller.proc.log_text())
        }
    });
}

#[test]
fn a_host_certificate_cannot_call_the_operator_api() {
    let fleet = Fleet::new(&["hub-alfa"]);
    let controller = fleet.start_controller("");
    let r = controller.grpcurl_as("host-hub-alfa", &[], "sentinel.v1.FleetService/ListHosts");
    assert!(!r.ok);
    assert!(r.stderr.contains("PermissionDenied"), "{}", r.stderr);
    assert!(
        r.stderr.contains("operator certificates only"),
        "{}",
        r.stderr
    );
}

#[test]
fn an_operator_certificate_cannot_open_the_agent_channel() {
    let fleet = Fleet::new(&["hub-alfa"]);
    let controller = fleet.start_controller("");
    let r = controller.grpcurl_as(
        "operator-admin",
        &["-d", r#"{"hello":{"host":{"name":"hub-alfa"}}}"#],
        "sentinel.v1.AgentService/Connect",
    );
    assert!(!r.ok);
    assert!(r.stderr.contains("PermissionDenied"), "{}", r.stderr);
    let hosts = controller
        .grpcurl(None, "sentinel.v1.FleetService/ListHosts")
        .json()
        .unwrap();
    assert!(
        hosts["hosts"].as_array().is_none_or(|h| h.is_empty()),
        "{hosts}"
    );
}

#[test]
fn a_host_speaking_under_another_hosts_name_is_refused_and_logged() {
    let fleet = Fleet::new(&["hub-alfa", "prod-alfa"]);
    let controller = fleet.start_controller("");
    let r = controller.grpcurl_as(
        "host-hub-alfa",
        &["-d", r#"{"hello":{"host":{"name":"prod-alfa"}}}"#],
        "sentinel.v1.AgentService/Connect",
    );
    assert!(!r.ok);
    assert!(r.stderr.contains("PermissionDenied"), "{}", r.stderr);
    assert!(r.stderr.contains("prod-alfa"), "{}", r.stderr);

    // A real agent misconfigured the same way does not even start: its check names the
    // mismatch (it used to retry PERMISSION_DENIED for ever), and never shows up as prod-alfa.
    let config = fleet.write_agent_config("prod-alfa", "hub-alfa", &controller.addr, "");
    let (code, err) = sentinel_e2e::check_agent_config(&config);
    assert_eq!(code, Some(64), "{err}");
    assert!(
        err.contains("host_name") && err.contains("sentinel://host/hub-alfa"),
        "{err}"
    );
    assert!(controller.get_host("prod-alfa").is_err());
    assert!(controller.get_host("hub-alfa").is_err());
    assert!(controller
        .proc
        .log_text()
        .contains("hello claims another host's name"));
}

#[test]
fn a_viewer_reads_but_cannot_start_work() {
    let fleet = Fleet::new(&["hub-alfa"]);
    fleet.issue_operator("vera", "viewer");
    let controller = fleet.start_controller("");
    let read = controller.grpcurl_as("operator-vera", &[], "sentinel.v1.FleetService/ListHosts");
    assert!(read.ok, "{}", read.stderr);
    let write = controller.grpcurl_as(
        "operator-vera",
        &["-d", r#"{"app":"auth","commit":"abc"}"#],
        "sentinel.v1.FleetService/SubmitDeploy",
    );
    assert!(!write.ok);
    assert!(
        write.stderr.contains("PermissionDenied"),
        "{}",
        write.stderr
    );
    assert!(write.stderr.contains("deployer"), "{}", write.stderr);
}

// ---------------------------------------------------------------------------------------------
// A hostile agent: the agent protocol spoken with a real host certificate, sending whatever the
// test says (what a compromised host can do).
// ---------------------------------------------------------------------------------------------

#[derive(Default)]
struct Seen {
    messages: Vec<ControllerMessage>,
    /// How the controller ended the stream, once it did.
    ended: Option<String>,
}

struct HostileAgent {
    runtime: tokio::runtime::Runtime,
    tx: Option<tokio::sync::mpsc::Sender<AgentMessage>>,
    seen: Arc<Mutex<Seen>>,
}

impl HostileAgent {
    /// Opens an agent stream with `host-CERT`'s certificate and sends a hello for `hello_name`.
    fn connect(fleet: &Fleet, cert: &str, addr: &str, hello_name: &str) -> Result<Self, String> {
        let info = HostInfo {
            name: hello_name.into(),
            agent_version: "hostile".into(),
            ..Default::default()
        };
        Self::connect_as(fleet, cert, addr, info)
    }

    /// Opens an agent stream with `host-CERT`'s certificate and sends a hello with `info`.
    fn connect_as(fleet: &Fleet, cert: &str, addr: &str, info: HostInfo) -> Result<Self, String> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        let tls = sentinel_daemon::tls::client_config(&sentinel_daemon::tls::TlsFiles {
            ca: fleet.certs.join("ca.pem"),
            cert: fleet.certs.join(format!("host-{cert}.pem")),
            key: fleet.certs.join(format!("host-{cert}.key")),
        })
        .map_err(|e| e.to_string())?;
        let channel = runtime.block_on(sentinel_daemon::tls::channel(addr, None, tls))?;
        let (tx, rx) = tokio::sync::mpsc::channel(1024);
        tx.try_send(AgentMessage {
            msg: Some(agent_message::Msg::Hello(Hello {
                host: Some(info),
                journal_job_ids: Vec::new(),
            })),
        })
        .map_err(|e| e.to_string())?;
        let mut client = AgentServiceClient::new(channel)
            .max_decoding_message_size(16 << 20)
            .max_encoding_message_size(16 << 20);
        let mut inbound = runtime
            .block_on(client.connect(tokio_stream::wrappers::ReceiverStream::new(rx)))
            .map_err(|s| s.message().to_string())?
            .into_inner();
        let seen = Arc::new(Mutex::new(Seen::default()));
        let record = seen.clone();
        runtime.spawn(async move {
            let ended = loop {
                match inbound.message().await {
                    Ok(Some(m)) => record.lock().unwrap().messages.push(m),
                    Ok(None) => break "the controller ended the stream".to_string(),
                    Err(status) => break status.message().to_string(),
                }
            };
            record.lock().unwrap().ended = Some(ended);
        });
        Ok(Self {
            runtime,
            tx: Some(tx),
            seen,
        })
    }

    fn send(&self, msg: agent_message::Msg) {
        if let Some(tx) = &self.tx {
            let _ = self
                .runtime
                .block_on(tx.send(AgentMessage { msg: Some(msg) }));
        }
    }

    fn send_event(&self, job_id: &str, seq: u64, event: job_event::Event) {
        self.send(agent_message::Msg::JobEvent(JobEvent {
            job_id: job_id.into(),
            seq,
            at: None,
            event: Some(event),
        }));
    }

    /// How the controller ended the stream, if it did.
    fn ended(&self) -> Option<String> {
        self.seen.lock().unwrap().ended.clone()
    }

    /// The ids of the jobs the controller sent.
    fn job_ids(&self) -> Vec<String> {
        self.seen
            .lock()
            .unwrap()
            .messages
            .iter()
            .filter_map(|m| match &m.msg {
                Some(controller_message::Msg::Job(job)) => {
                    JobSpec::decode(job.spec.as_slice()).ok().map(|s| s.job_id)
                }
                _ => None,
            })
            .collect()
    }
}

/// A controller with a signing key and one app whose staging host is `hub-alfa`, so that a
/// Rollback makes a job for hub-alfa.
fn controller_with_jobs(fleet: &Fleet) -> Controller {
    let c = fleet.certs.display();
    let extra = format!(
        "[signing]\nkey = \"{c}/signing.key\"\n\n[[apps]]\nname = \"shop\"\nrepo = \"{}\"\n[apps.staging]\nhost = \"hub-alfa\"\napp_dir = \"{}\"\n[apps.production]\nhost = \"prod-alfa\"\napp_dir = \"{}\"\n",
        fleet.path("repo").display(),
        fleet.path("apps-hub-alfa/shop").display(),
        fleet.path("apps-prod-alfa/shop").display(),
    );
    fleet.start_controller(&extra)
}

/// A real agent for hub-alfa that runs rollbacks.
fn start_job_agent(fleet: &Fleet, controller: &Controller) -> sentinel_e2e::Proc {
    let c = fleet.certs.display();
    let jobs = format!(
        "[collectors]\ndocker = false\n[jobs]\nstate_dir = \"{}\"\ntrusted_keys = [\"{c}/signing.pub\"]\nallowed_kinds = [\"rollback\"]\napp_dirs = [\"{}\"]\n",
        fleet.path("state-hub-alfa").display(),
        fleet.path("apps-hub-alfa").display(),
    );
    fleet.start_agent("hub-alfa", "hub-alfa", &controller.addr, &jobs)
}

/// Asks for a staging rollback of `shop` and returns the id of the job it makes.
fn submit_rollback(controller: &Controller) -> String {
    let d = controller
        .grpcurl(
            Some(r#"{"app":"shop","environment":"staging"}"#),
            "sentinel.v1.FleetService/Rollback",
        )
        .json()
        .unwrap();
    let deploy_id = d["deployId"].as_str().unwrap().to_string();
    eventually("the rollback's job", || {
        let d = controller
            .grpcurl(
                Some(&format!("{{\"deploy_id\":\"{deploy_id}\"}}")),
                "sentinel.v1.FleetService/GetDeploy",
            )
            .json()?;
        d["steps"][0]["jobId"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| d.to_string())
    })
}

fn get_job(controller: &Controller, job_id: &str) -> Result<(Value, usize), String> {
    let r = controller.grpcurl(
        Some(&format!("{{\"job_id\":\"{job_id}\"}}")),
        "sentinel.v1.FleetService/GetJob",
    );
    let size = r.stdout.len();
    r.json().map(|j| (j, size))
}

// ---------------------------------------------------------------------------------------------
// Certificates
// ---------------------------------------------------------------------------------------------

#[test]
fn a_certificate_issued_by_a_ca_certificate_the_fleet_ca_signed_is_refused() {
    let fleet = Fleet::new(&["hub-alfa"]);
    sentinel_e2e::forge_operator_through_intermediate(&fleet, "eve", "admin");
    let controller = fleet.start_controller("");
    let r = controller.grpcurl_as(
        "operator-eve",
        &["-d", r#"{"job_id":"j-1"}"#],
        "sentinel.v1.FleetService/CancelJob",
    );
    assert!(!r.ok, "{}", r.stdout);
    assert!(
        !r.stderr.contains("NotFound"),
        "the call got through: {}",
        r.stderr
    );
    let r = controller.grpcurl_as("operator-eve", &[], "sentinel.v1.FleetService/ListHosts");
    assert!(!r.ok, "{}", r.stdout);
    eventually("the controller to log why", || {
        let log = controller.proc.log_text();
        if log.contains("NotIssuedByFleetCa") {
            Ok(())
        } else {
            Err(log)
        }
    });
    // Certificates straight from the fleet CA still work.
    assert!(
        controller
            .grpcurl(None, "sentinel.v1.FleetService/ListHosts")
            .ok
    );
}

// ---------------------------------------------------------------------------------------------
// A second stream with the same host certificate
// ---------------------------------------------------------------------------------------------

#[test]
fn a_second_stream_with_the_same_host_certificate_does_not_orphan_the_real_agent() {
    let fleet = Fleet::new(&["hub-alfa", "prod-alfa"]);
    let controller = controller_with_jobs(&fleet);
    let _agent = start_job_agent(&fleet, &controller);
    let before = controller.wait_online("hub-alfa");

    // The hostile stream is newer: it takes over, the real agent's stream is ended, the agent
    // reconnects and takes over in turn, and the hostile stream is told why it ended.
    let hostile = HostileAgent::connect(&fleet, "hub-alfa", &controller.addr, "hub-alfa").unwrap();
    let ended = eventually("the hostile stream to be superseded", || {
        hostile.ended().ok_or_else(|| "still open".to_string())
    });
    assert!(ended.contains("superseded"), "{ended}");
    let host = controller.wait_online("hub-alfa");
    assert_ne!(host["connectedSince"], before["connectedSince"], "{host}");
    assert_eq!(host["info"]["agentVersion"], before["info"]["agentVersion"]);

    // Jobs follow the live stream: a rollback reaches the real agent, which settles it.
    let job_id = submit_rollback(&controller);
    let job = eventually("the real agent to settle the rollback", || {
        let (job, _) = get_job(&controller, &job_id)?;
        if job["state"] == "JOB_STATE_FAILED" {
            Ok(job)
        } else {
            Err(job.to_string())
        }
    });
    assert!(!hostile.job_ids().contains(&job_id), "{job}");
    let log = controller.proc.log_text();
    assert!(log.contains("superseded by a newer connection"), "{log}");
}

// ---------------------------------------------------------------------------------------------
// Job events from a hostile host
// ---------------------------------------------------------------------------------------------

#[test]
fn a_host_cannot_grow_a_job_without_bound_through_its_events() {
    let fleet = Fleet::new(&["hub-alfa", "prod-alfa"]);
    let controller = controller_with_jobs(&fleet);
    let hostile = HostileAgent::connect(&fleet, "hub-alfa", &controller.addr, "hub-alfa").unwrap();
    let job_id = submit_rollback(&controller);
    eventually("the job to reach the hostile host", || {
        if hostile.job_ids().contains(&job_id) {
            Ok(())
        } else {
            Err("not yet".into())
        }
    });
    hostile.send_event(&job_id, 1, job_event::Event::Accepted(JobAccepted {}));
    // 700 lines of 64 KiB each: 44 MiB, all below the 4 MiB message limit.
    let line = "A".repeat(64 * 1024);
    for seq in 0..700 {
        hostile.send_event(
            &job_id,
            seq + 2,
            job_event::Event::Log(JobLog {
                stream: "stdout".into(),
                line: line.clone(),
            }),
        );
    }
    eventually("the controller to read the lines", || {
        let (job, _) = get_job(&controller, &job_id)?;
        let events = job["events"].as_array().map_or(0, |e| e.len());
        if events >= 50 {
            Ok(())
        } else {
            Err(format!("{events} events"))
        }
    });
    // The operator cancels; the host keeps re-sending its account of the cancel, then logs.
    let r = controller.grpcurl(
        Some(&format!("{{\"job_id\":\"{job_id}\",\"reason\":\"test\"}}")),
        "sentinel.v1.FleetService/CancelJob",
    );
    assert!(r.ok, "{}", r.stderr);
    let big = "B".repeat(1 << 20);
    for i in 0..50 {
        hostile.send_event(
            &job_id,
            1000 + i,
            job_event::Event::Finished(JobFinished {
                state: JobState::Cancelled as i32,
                detail: format!("{i}: {big}"),
                result: None,
            }),
        );
    }
    for i in 0..50 {
        hostile.send_event(
            &job_id,
            2000 + i,
            job_event::Event::Log(JobLog {
                stream: "stdout".into(),
                line: line.clone(),
            }),
        );
    }
    // A marker the controller must see after all of that: a heartbeat-paced wait is not
    // possible, so wait for the once-per-job notice of ignored late events.
    eventually("the notice of ignored late events", || {
        let log = controller.proc.log_text();
        if log.contains("events for a job that already ended are ignored") {
            Ok(())
        } else {
            Err("not yet".into())
        }
    });
    let (job, size) = get_job(&controller, &job_id).unwrap();
    assert_eq!(job["state"], "JOB_STATE_CANCELLED", "{}", job["detail"]);
    let detail = job["detail"].as_str().unwrap();
    assert!(detail.len() <= 8 * 1024, "detail of {} bytes", detail.len());
    assert_eq!(detail.matches("on the host:").count(), 1, "{detail:.200}");
    let events = job["events"].as_array().unwrap();
    assert!(events.len() <= 500, "{} events", events.len());
    // The JSON answer of GetJob (text base64-free, so close to the stored size) stays small.
    assert!(size < 2 << 20, "GetJob answered {size} bytes");
    let log = controller.proc.log_text();
    assert_eq!(
        log.matches("events for a job that already ended are ignored")
            .count(),
        1,
        "logged once per job"
    );
    // Operators are still served.
    assert!(
        controller
            .grpcurl(None, "sentinel.v1.FleetService/ListJobs")
            .ok
    );
}

// ---------------------------------------------------------------------------------------------
// Connections that are opened and left idle
// ---------------------------------------------------------------------------------------------

/// Opens `count` TCP connections from `source` to `addr`, each finishing the TLS handshake
/// with `tls` when given (and then sending nothing), or sending `garbage` instead of TLS.
/// Returns, per connection, how long the controller took to close it (None: still open after
/// `wait`).
fn idle_connections(
    source: &str,
    addr: &str,
    count: usize,
    tls: Option<Arc<rustls::ClientConfig>>,
    garbage: &[u8],
    wait: std::time::Duration,
) -> Vec<Option<std::time::Duration>> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let addr: std::net::SocketAddr = addr.parse().unwrap();
    let source: std::net::IpAddr = source.parse().unwrap();
    runtime.block_on(async move {
        let mut tasks = Vec::new();
        for _ in 0..count {
            let tls = tls.clone();
            let garbage = garbage.to_vec();
            tasks.push(tokio::spawn(async move {
                let socket = tokio::net::TcpSocket::new_v4().ok()?;
                socket.bind(std::net::SocketAddr::new(source, 0)).ok()?;
                let mut tcp = socket.connect(addr).await.ok()?;
                let opened = std::time::Instant::now();
                let mut buf = [0u8; 256];
                let closed = match tls {
                    Some(tls) => {
                        let name = rustls::pki_types::ServerName::try_from("127.0.0.1").ok()?;
                        // Refused during the handshake (over a cap) counts as closed.
                        let Ok(mut stream) = tokio_rustls::TlsConnector::from(tls)
                            .connect(name, tcp)
                            .await
                        else {
                            return Some(opened.elapsed());
                        };
                        tokio::time::timeout(wait, async {
                            loop {
                                match stream.read(&mut buf).await {
                                    Ok(0) | Err(_) => break,
                                    Ok(_) => {}
                                }
                            }
                        })
                        .await
                    }
                    None => {
                        let _ = tcp.write_all(&garbage).await;
                        tokio::time::timeout(wait, async {
                            loop {
                                match tcp.read(&mut buf).await {
                                    Ok(0) | Err(_) => break,
                                    Ok(_) => {}
                                }
                            }
                        })
                        .await
                    }
                };
                closed.ok().map(|_| opened.elapsed())
            }));
        }
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.ok().flatten());
        }
        out
    })
}

fn host_tls(fleet: &Fleet, host: &str) -> Arc<rustls::ClientConfig> {
    sentinel_daemon::tls::client_config(&sentinel_daemon::tls::TlsFiles {
        ca: fleet.certs.join("ca.pem"),
        cert: fleet.certs.join(format!("host-{host}.pem")),
        key: fleet.certs.join(format!("host-{host}.key")),
    })
    .unwrap()
}

#[test]
fn idle_connections_of_one_host_certificate_are_capped_and_closed_and_operators_are_served() {
    let fleet = Fleet::new(&["hub-alfa"]);
    let controller = fleet.start_controller("");
    let addr = controller.addr.clone();
    let tls = host_tls(&fleet, "hub-alfa");
    let attack = std::thread::spawn(move || {
        idle_connections(
            "127.0.0.2",
            &addr,
            200,
            Some(tls),
            b"",
            std::time::Duration::from_secs(20),
        )
    });
    // While they are open, operators are served.
    std::thread::sleep(std::time::Duration::from_secs(1));
    let r = controller.grpcurl(None, "sentinel.v1.FleetService/ListHosts");
    assert!(r.ok, "{}", r.stderr);
    let closed = attack.join().unwrap();
    let still_open = closed.iter().filter(|c| c.is_none()).count();
    assert_eq!(still_open, 0, "connections still open after 20s");
    // All but the few the cap lets in are closed at once, the rest after the preface timeout.
    let at_once = closed
        .iter()
        .filter(|c| c.is_some_and(|d| d < std::time::Duration::from_secs(3)))
        .count();
    assert!(
        at_once >= 190,
        "{at_once} of 200 closed at once: {closed:?}"
    );
    // The ones let in are closed for sending no HTTP/2 preface within 5s.
    let after_preface_timeout = closed
        .iter()
        .filter(|c| c.is_some_and(|d| d >= std::time::Duration::from_secs(4)))
        .count();
    assert!(
        (1..=4).contains(&after_preface_timeout),
        "{after_preface_timeout} closed by the preface timeout: {closed:?}"
    );
    let log = controller.proc.log_text();
    assert!(log.contains("already holds 4 connections"), "{log}");
    // A real agent with the same certificate still gets in afterwards.
    let _agent = fleet.start_agent("hub-alfa", "hub-alfa", &controller.addr, "");
    controller.wait_online("hub-alfa");
}

#[test]
fn a_flood_of_failed_handshakes_is_summed_up_not_logged_line_by_line() {
    let fleet = Fleet::new(&["hub-alfa"]);
    let controller = fleet.start_controller("");
    let closed = idle_connections(
        "127.0.0.3",
        &controller.addr,
        300,
        None,
        b"GET / HTTP/1.1\r\n\r\n",
        std::time::Duration::from_secs(20),
    );
    assert!(closed.iter().all(|c| c.is_some()), "{closed:?}");
    let summary = eventually("the summary of held-back warnings", || {
        let log = controller.proc.log_text();
        log.lines()
            .find(|l| l.contains("more not logged"))
            .map(str::to_string)
            .ok_or_else(|| "not yet".to_string())
    });
    assert!(summary.contains("refused connections"), "{summary}");
    let log = controller.proc.log_text();
    let lines = log.matches("TLS handshake refused").count();
    assert!(lines <= 5, "{lines} lines for 300 refused handshakes");
    // The controller serves others all the while.
    assert!(
        controller
            .grpcurl(None, "sentinel.v1.FleetService/ListHosts")
            .ok
    );
}

// ---------------------------------------------------------------------------------------------
// Metrics
// ---------------------------------------------------------------------------------------------

#[test]
fn junk_method_paths_from_a_host_do_not_use_up_the_metric_labels_of_real_methods() {
    use tower::ServiceExt;
    let fleet = Fleet::new(&["hub-alfa"]);
    let controller = fleet.start_controller("");
    let metrics = controller.metrics_port();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let channel =
            sentinel_daemon::tls::channel(&controller.addr, None, host_tls(&fleet, "hub-alfa"))
                .await
                .unwrap();
        for i in 0..70 {
            let request = http::Request::builder()
                .method("POST")
                .uri(format!("http://{}/junk.Flood/M{i}", controller.addr))
                .header("content-type", "application/grpc")
                .header("te", "trailers")
                .body(tonic::body::Body::empty())
                .unwrap();
            let response = channel.clone().oneshot(request).await.unwrap();
            assert!(response.status().is_success());
        }
    });
    let r = controller.grpcurl(None, "sentinel.v1.FleetService/ListHosts");
    assert!(r.ok, "{}", r.stderr);
    let text = eventually("the metrics to count the call", || {
        let text = sentinel_e2e::scrape_metrics(metrics)?;
        if text.contains("method=\"sentinel.v1.FleetService/ListHosts\"") {
            Ok(text)
        } else {
            Err(text)
        }
    });
    assert!(!text.contains("junk.Flood"), "{text}");
    assert!(
        text.contains("sentinel_grpc_requests_total{method=\"other\""),
        "{text}"
    );
}

// ---------------------------------------------------------------------------------------------
// Log forging
// ---------------------------------------------------------------------------------------------

#[test]
fn strings_a_host_sends_cannot_forge_lines_in_the_controller_log() {
    let fleet = Fleet::new(&["hub-alfa"]);
    let controller = fleet.start_controller("");
    let fake = "2026-01-01T00:00:00.000000Z  WARN sentinel::authz: call refused identity=operator alice (admin)";
    // A hello claiming another name, one with a crafted version, and an event for a job id
    // that does not exist: each carries a line break and a whole fake line.
    let refused = HostileAgent::connect(
        &fleet,
        "hub-alfa",
        &controller.addr,
        &format!("prod-alfa\n{fake}"),
    );
    assert!(refused.is_err());
    let hostile = HostileAgent::connect_as(
        &fleet,
        "hub-alfa",
        &controller.addr,
        HostInfo {
            name: "hub-alfa".into(),
            agent_version: format!("1.0\r\n{fake}\u{1b}[2K"),
            ..Default::default()
        },
    )
    .unwrap();
    hostile.send_event(
        &format!("j-1\n{fake}"),
        1,
        job_event::Event::Accepted(JobAccepted {}),
    );
    eventually("the three to be logged", || {
        let log = controller.proc.log_text();
        let done = log.contains("hello claims another host's name")
            && log.contains("agent connected")
            && log.contains("event for an unknown job");
        if done {
            Ok(())
        } else {
            Err(log)
        }
    });
    let log = controller.proc.log_text();
    assert!(
        !log.lines().any(|l| l.starts_with(fake)),
        "a forged line got into the log:\n{log}"
    );
    assert!(!log.contains('\u{1b}'), "a raw escape got into the log");
    // The strings are there, escaped.
    assert!(log.contains("\\n2026-01-01T00:00:00"), "{log}");
}

// ---------------------------------------------------------------------------------------------
// Terminal escapes
// ---------------------------------------------------------------------------------------------

fn cli(fleet: &Fleet, controller: &Controller, args: &[&str]) -> String {
    let c = &fleet.certs;
    let out = sentinel_e2e::run(
        std::process::Command::new(sentinel_e2e::bin("sentinel"))
            .args(args)
            .arg("--controller")
            .arg(&controller.addr)
            .arg("--ca")
            .arg(c.join("ca.pem"))
            .arg("--cert")
            .arg(c.join("operator-admin.pem"))
            .arg("--key")
            .arg(c.join("operator-admin.key"))
            .env("NO_COLOR", "1"),
    );
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn the_cli_shows_escape_sequences_a_host_sends_escaped_not_raw() {
    let fleet = Fleet::new(&["hub-alfa", "prod-alfa"]);
    let controller = controller_with_jobs(&fleet);
    // Retitles the terminal, clears the screen and draws a fake green success.
    let evil = "\u{1b}]0;pwned\u{7}\u{1b}[2J\u{1b}[32mdeploy succeeded\u{1b}[0m";
    let hostile = HostileAgent::connect_as(
        &fleet,
        "hub-alfa",
        &controller.addr,
        HostInfo {
            name: "hub-alfa".into(),
            agent_version: evil.into(),
            os: evil.into(),
            ..Default::default()
        },
    )
    .unwrap();
    let job_id = submit_rollback(&controller);
    eventually("the job to reach the hostile host", || {
        if hostile.job_ids().contains(&job_id) {
            Ok(())
        } else {
            Err("not yet".into())
        }
    });
    hostile.send_event(
        &job_id,
        1,
        job_event::Event::Finished(JobFinished {
            state: JobState::Failed as i32,
            detail: evil.into(),
            result: None,
        }),
    );
    eventually("the job to end", || {
        let (job, _) = get_job(&controller, &job_id)?;
        if job["state"] == "JOB_STATE_FAILED" {
            Ok(())
        } else {
            Err(job.to_string())
        }
    });
    for args in [
        &["host", "hub-alfa"][..],
        &["jobs"],
        &["hosts"],
        &["deploys"],
    ] {
        let out = cli(&fleet, &controller, args);
        assert!(
            !out.contains('\u{1b}'),
            "{args:?} printed a raw escape: {out:?}"
        );
        assert!(
            !out.contains('\u{7}'),
            "{args:?} printed a raw BEL: {out:?}"
        );
    }
    let host = cli(&fleet, &controller, &["host", "hub-alfa"]);
    assert!(host.contains("\\u{1b}[2J"), "{host}");
}
