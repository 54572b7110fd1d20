//! The agent's channel to the controller: dial out over mTLS, say hello, stream state reports
//! and heartbeats, renew the certificate on the open stream, and reconnect with exponential
//! backoff and jitter, forever.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use sentinel_daemon::backoff::Backoff;
use sentinel_proto::v1::agent_service_client::AgentServiceClient;
use sentinel_proto::v1::{
    agent_message, controller_message, AgentMessage, CertificateIssued, ControllerMessage,
    Heartbeat, Hello, HostInfo, RenewCertificate, StateReport,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tracing::{debug, info, warn, Instrument};

use crate::collectors::{Collectors, DeltaTracker};
use crate::config::AgentConfig;
use crate::credentials::Credentials;
use crate::jobs::Jobs;

/// How long to wait for the controller's welcome after the hello.
const WELCOME_TIMEOUT: Duration = Duration::from_secs(10);
/// Used until a welcome says otherwise.
const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(10);
/// Outbound queue depth: a report or heartbeat waits here while the stream is busy.
const OUTBOUND_QUEUE: usize = 32;
/// How long a renewal request may go unanswered before it is sent again.
const RENEWAL_ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a session with the controller ended.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The connection could not be opened (TCP, TLS, HTTP/2).
    #[error("connecting to {addr}: {message}")]
    Connect {
        /// The controller address.
        addr: String,
        /// The cause, including TLS errors.
        message: String,
    },
    /// The controller answered with an error status (e.g. PERMISSION_DENIED).
    #[error("controller refused the channel: {0}")]
    Refused(tonic::Status),
    /// The controller broke the protocol.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The stream ended or failed after it was established.
    #[error("channel lost: {0}")]
    Lost(String),
    /// The host certificate has expired (the message says what to do).
    #[error("{0}")]
    Expired(String),
}

/// Runs sessions until `shutdown` is cancelled. A new value in `settings` (a reload) ends the
/// session in progress and opens the next one with it at once; jobs keep running meanwhile.
pub async fn run(
    mut settings: tokio::sync::watch::Receiver<Arc<AgentConfig>>,
    creds: Arc<Credentials>,
    jobs: Arc<Jobs>,
    shutdown: CancellationToken,
) {
    let mut config = settings.borrow_and_update().clone();
    let host = config.host_name();
    let mut collectors = Collectors::new(&config.collectors);
    let mut backoff = Backoff::new(config.backoff.initial, config.backoff.max);
    let mut attempts: u64 = 0;
    let span = tracing::info_span!("agent", host = %host);
    async {
        loop {
            let new = settings.borrow_and_update().clone();
            if !Arc::ptr_eq(&new, &config) {
                if new.collectors != config.collectors {
                    collectors = Collectors::new(&new.collectors);
                }
                if new.backoff != config.backoff {
                    backoff = Backoff::new(new.backoff.initial, new.backoff.max);
                }
                config = new;
            }
            let config = config.clone();
            attempts += 1;
            let mut welcomed = false;
            let session = async {
                // An expired certificate cannot work, and no retry will change that: say so.
                match creds.expired() {
                    Some(message) => Err(SessionError::Expired(message)),
                    None => {
                        session(
                            &config,
                            &host,
                            &creds,
                            &mut collectors,
                            &jobs,
                            &mut welcomed,
                        )
                        .await
                    }
                }
            };
            let outcome = tokio::select! {
                r = session => r,
                // Err: no reloads any more (the sender is gone); the branch is then off.
                Ok(()) = settings.changed() => {
                    info!(controller = %settings.borrow().controller, "config reloaded: reconnecting with the new settings");
                    crate::metrics::get().set_connected(false);
                    continue;
                }
                _ = shutdown.cancelled() => {
                    info!("agent stopping");
                    return;
                }
            };
            crate::metrics::get().set_connected(false);
            if welcomed {
                backoff.reset();
            }
            match outcome {
                Ok(()) => info!("controller closed the channel"),
                Err(SessionError::Refused(status)) => warn!(
                    code = ?status.code(),
                    message = status.message(),
                    "controller refused this agent; check the host name and certificate"
                ),
                Err(SessionError::Expired(message)) => tracing::error!("{message}"),
                Err(e) => warn!(error = %e, attempts, "no channel to the controller"),
            }
            let delay = backoff.next_delay();
            crate::metrics::get().reconnecting();
            debug!(?delay, "reconnecting after backoff");
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = shutdown.cancelled() => {
                    info!("agent stopping");
                    return;
                }
            }
        }
    }
    .instrument(span)
    .await
}

async fn open_channel(
    config: &AgentConfig,
    tls: Arc<rustls::ClientConfig>,
) -> Result<Channel, SessionError> {
    sentinel_daemon::tls::channel(&config.controller, config.server_name.as_deref(), tls)
        .await
        .map_err(|message| SessionError::Connect {
            addr: config.controller.clone(),
            message,
        })
}

/// One connected session: hello, welcome, then reports and heartbeats until the stream ends.
async fn session(
    config: &AgentConfig,
    host: &str,
    creds: &Credentials,
    collectors: &mut Collectors,
    jobs: &Jobs,
    welcomed: &mut bool,
) -> Result<(), SessionError> {
    let channel = open_channel(config, creds.current()).await?;
    let mut client = AgentServiceClient::new(channel);
    let (tx, rx) = mpsc::channel::<AgentMessage>(OUTBOUND_QUEUE);
    let hello = Hello {
        host: Some(host_info(config, host, collectors)),
        journal_job_ids: vec![],
    };
    send(&tx, agent_message::Msg::Hello(hello)).await?;
    let mut inbound = client
        .connect(ReceiverStream::new(rx))
        .await
        .map_err(|status| match status.code() {
            tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Internal => {
                SessionError::Lost(sentinel_daemon::tls_explain::status(&status))
            }
            _ => SessionError::Refused(status),
        })?
        .into_inner();

    let welcome = match tokio::time::timeout(WELCOME_TIMEOUT, inbound.message()).await {
        Err(_) => return Err(SessionError::Protocol("no welcome within 10s".into())),
        Ok(Err(status)) => return Err(SessionError::Refused(status)),
        Ok(Ok(None)) => return Err(SessionError::Lost("stream closed before welcome".into())),
        Ok(Ok(Some(ControllerMessage {
            msg: Some(controller_message::Msg::Welcome(w)),
        }))) => w,
        Ok(Ok(Some(other))) => {
            return Err(SessionError::Protocol(format!(
                "expected a welcome, got {other:?}"
            )))
        }
    };
    *welcomed = true;
    crate::metrics::get().set_connected(true);
    let heartbeat = welcome
        .heartbeat_interval
        .as_ref()
        .map(sentinel_proto::time::std_duration)
        .filter(|d| *d >= Duration::from_millis(100))
        .unwrap_or(DEFAULT_HEARTBEAT);
    info!(controller_version = %welcome.controller_version, ?heartbeat, "connected to controller");
    jobs.report_recent();
    let outbox = jobs.outbox().clone();
    flush_outbox(&outbox, &tx).await?;

    let mut delta = DeltaTracker::default();
    let mut report_seq: u64 = 0;
    let mut heartbeat_seq: u64 = 0;
    let mut force_full = true;
    let mut reports = tokio::time::interval(config.report_interval);
    reports.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut heartbeats =
        tokio::time::interval_at(tokio::time::Instant::now() + heartbeat, heartbeat);
    heartbeats.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let renewal = tokio::time::sleep_until(instant(creds.renew_at()));
    tokio::pin!(renewal);

    loop {
        tokio::select! {
            _ = reports.tick() => {
                let started = Instant::now();
                let fresh = collectors.collect().await;
                let full = force_full || report_seq.is_multiple_of(u64::from(config.full_report_every));
                force_full = false;
                report_seq += 1;
                let state = delta.report(fresh, full);
                debug!(seq = report_seq, full, took = ?started.elapsed(), "state report");
                send(&tx, agent_message::Msg::Report(StateReport {
                    seq: report_seq,
                    full,
                    state: Some(state),
                })).await?;
            }
            _ = heartbeats.tick() => {
                heartbeat_seq += 1;
                send(&tx, agent_message::Msg::Heartbeat(Heartbeat {
                    seq: heartbeat_seq,
                    sent_at: Some(sentinel_proto::time::now()),
                })).await?;
            }
            _ = outbox.notified() => flush_outbox(&outbox, &tx).await?,
            _ = &mut renewal => {
                let next = match creds.csr() {
                    Ok(csr_der) => {
                        debug!("asking for a new certificate");
                        send(&tx, agent_message::Msg::RenewCertificate(RenewCertificate { csr_der })).await?;
                        SystemTime::now() + RENEWAL_ANSWER_TIMEOUT
                    }
                    Err(e) => {
                        warn!(error = %e, "cannot renew the certificate");
                        crate::metrics::get().renewal("invalid");
                        creds.retry_at()
                    }
                };
                renewal.as_mut().reset(instant(next));
            }
            msg = inbound.message() => match msg {
                Ok(Some(ControllerMessage { msg: Some(m) })) => match m {
                    controller_message::Msg::RequestFullReport(_) => {
                        force_full = true;
                        reports.reset_immediately();
                    }
                    controller_message::Msg::Job(job) => jobs.receive(job),
                    controller_message::Msg::TrustedKeys(keys) => jobs.receive_keys(&keys),
                    controller_message::Msg::CancelJob(c) => jobs.cancel(&c.job_id, &c.reason),
                    controller_message::Msg::BundleChunk(chunk) => jobs.bundles().deliver(chunk),
                    controller_message::Msg::Welcome(_) => {
                        return Err(SessionError::Protocol("a second welcome".into()))
                    }
                    controller_message::Msg::CertificateIssued(issued) => {
                        renewal.as_mut().reset(instant(renewed(creds, &issued)));
                    }
                },
                Ok(Some(ControllerMessage { msg: None })) => {}
                Ok(None) => return Ok(()),
                Err(status) if status.code() == tonic::Code::PermissionDenied => {
                    return Err(SessionError::Refused(status))
                }
                Err(status) => {
                    return Err(SessionError::Lost(sentinel_daemon::tls_explain::status(&status)))
                }
            },
        }
    }
}

/// Installs a renewed certificate (or logs why not); when to renew next.
fn renewed(creds: &Credentials, issued: &CertificateIssued) -> SystemTime {
    if !issued.error.is_empty() {
        warn!(reason = %issued.error, "the controller refused to renew the certificate; keeping the current one");
        crate::metrics::get().renewal("refused");
        return creds.retry_at();
    }
    match creds.install(&issued.certificate_chain_pem) {
        Ok(validity) => {
            info!(
                not_after = %crate::credentials::rfc3339(validity.not_after),
                "certificate renewed; the next connection uses it"
            );
            crate::metrics::get().renewal("renewed");
            creds.renew_at()
        }
        Err(e) => {
            warn!(error = %e, "the renewed certificate was not installed; keeping the current one");
            crate::metrics::get().renewal("invalid");
            creds.retry_at()
        }
    }
}

/// A wall-clock time as a tokio deadline (now, if it has passed).
fn instant(at: SystemTime) -> tokio::time::Instant {
    tokio::time::Instant::now() + at.duration_since(SystemTime::now()).unwrap_or_default()
}

/// Sends everything queued in the outbox (job events, bundle requests); whatever cannot be
/// sent goes back for the next session.
async fn flush_outbox(
    outbox: &crate::jobs::Outbox,
    tx: &mpsc::Sender<AgentMessage>,
) -> Result<(), SessionError> {
    let mut pending = outbox.drain().into_iter();
    while let Some(msg) = pending.next() {
        if let Err(mpsc::error::SendError(msg)) = tx.send(msg).await {
            let mut rest = vec![msg];
            rest.extend(pending);
            outbox.requeue(rest);
            return Err(SessionError::Lost("outbound stream closed".into()));
        }
    }
    Ok(())
}

async fn send(
    tx: &mpsc::Sender<AgentMessage>,
    msg: agent_message::Msg,
) -> Result<(), SessionError> {
    tx.send(AgentMessage { msg: Some(msg) })
        .await
        .map_err(|_| SessionError::Lost("outbound stream closed".into()))
}

fn host_info(config: &AgentConfig, host: &str, collectors: &Collectors) -> HostInfo {
    HostInfo {
        name: host.to_string(),
        agent_version: crate::VERSION.to_string(),
        os: sysinfo::System::long_os_version().unwrap_or_default(),
        kernel: sysinfo::System::kernel_version().unwrap_or_default(),
        arch: std::env::consts::ARCH.to_string(),
        capabilities: collectors.capabilities(),
        labels: config.labels.clone().into_iter().collect(),
    }
}
