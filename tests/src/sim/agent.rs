//! One simulated agent. It runs the real agent's session loop (`hostagent::connection`): dial,
//! hello, wait for the welcome, then a state report every interval (the first one full, then a
//! full one every `full_report_every`, deltas from the agent's own
//! [`DeltaTracker`](hostagent::collectors::DeltaTracker) in between) and a heartbeat at the
//! interval the welcome gives; when the stream ends it reconnects after the agent's
//! exponential [`Backoff`] with jitter. A synthetic [`SimHost`] replaces the collectors, and a
//! probe hook lets benchmarks time a round trip on the live stream.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hostagent::collectors::DeltaTracker;
use hostagent::connection::SessionError;
use prost::Message;
use sentinel_daemon::backoff::Backoff;
use sentinel_proto::v1::agent_service_client::AgentServiceClient;
use sentinel_proto::v1::{
    agent_message, controller_message, AgentMessage, BundleRequest, Heartbeat, Hello, JobEvent,
    JobRefused, RefusalReason, StateReport,
};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

use crate::host::SimHost;
use crate::net::Dialer;
use crate::stats::{Counter, Stats};

/// How long to wait for the welcome after the hello (hostagent's `WELCOME_TIMEOUT`).
const WELCOME_TIMEOUT: Duration = Duration::from_secs(10);
/// Used until a welcome says otherwise (hostagent's `DEFAULT_HEARTBEAT`).
const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(10);
/// Outbound queue depth (hostagent's `OUTBOUND_QUEUE`).
const OUTBOUND_QUEUE: usize = 32;
/// The gRPC length-prefixed frame header in front of every message.
const GRPC_FRAME_HEADER: u64 = 5;

/// How every simulated agent behaves; the real agent's defaults unless a benchmark says so.
#[derive(Debug, Clone)]
pub struct AgentSpec {
    /// `report_interval` (agent default 15s).
    pub report_interval: Duration,
    /// `full_report_every` (agent default 20).
    pub full_report_every: u32,
    /// `backoff.initial` (agent default 500ms).
    pub backoff_initial: Duration,
    /// `backoff.max` (agent default 30s).
    pub backoff_max: Duration,
    /// Containers on each simulated host.
    pub containers: usize,
}

impl Default for AgentSpec {
    fn default() -> Self {
        Self {
            report_interval: Duration::from_secs(15),
            full_report_every: 20,
            backoff_initial: Duration::from_millis(500),
            backoff_max: Duration::from_secs(30),
            containers: 30,
        }
    }
}

/// What every agent shares.
pub struct AgentEnv {
    /// How to reach the controller.
    pub dialer: Dialer,
    /// Behaviour.
    pub spec: AgentSpec,
    /// Counters.
    pub stats: Arc<Stats>,
    /// Time zero of the fleet, for [`AgentSlot::welcomed_at`].
    pub epoch: Instant,
}

/// A round trip to time: the agent sends a `BundleRequest` for `id` on its live stream and
/// reports how long the controller's `BundleChunk` answer took.
pub struct Probe {
    /// Unique per probe; travels as the bundle's sha256.
    pub id: String,
    /// Receives the round-trip time.
    pub done: oneshot::Sender<Duration>,
}

/// One agent as the fleet sees it.
pub struct AgentSlot {
    /// Position in the fleet.
    pub index: usize,
    /// Host name (and certificate name).
    pub name: String,
    /// Loopback address it dials from.
    pub source: IpAddr,
    connected: AtomicBool,
    /// Milliseconds since the fleet epoch of the last welcome, plus one (0: never).
    welcomed_at: AtomicU64,
    attempts: AtomicU32,
    probes: mpsc::UnboundedSender<Probe>,
}

impl AgentSlot {
    /// A slot and the receiving end of its probe channel.
    pub fn new(
        index: usize,
        name: String,
        source: IpAddr,
    ) -> (Self, mpsc::UnboundedReceiver<Probe>) {
        let (probes, rx) = mpsc::unbounded_channel();
        let slot = Self {
            index,
            name,
            source,
            connected: AtomicBool::new(false),
            welcomed_at: AtomicU64::new(0),
            attempts: AtomicU32::new(0),
            probes,
        };
        (slot, rx)
    }

    /// Whether it holds a welcomed stream.
    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    /// When it was last welcomed, as an offset from the fleet epoch.
    pub fn welcomed_at(&self) -> Option<Duration> {
        match self.welcomed_at.load(Ordering::Relaxed) {
            0 => None,
            ms => Some(Duration::from_millis(ms - 1)),
        }
    }

    /// Connection attempts so far.
    pub fn attempts(&self) -> u32 {
        self.attempts.load(Ordering::Relaxed)
    }

    /// Asks the agent to time a round trip; `None` if the agent task is gone.
    pub fn probe(&self, id: String) -> Option<oneshot::Receiver<Duration>> {
        let (done, rx) = oneshot::channel();
        self.probes.send(Probe { id, done }).ok()?;
        Some(rx)
    }
}

/// Runs one agent until `shutdown`: waits `start_delay`, then sessions and backoff forever.
pub async fn run(
    slot: Arc<AgentSlot>,
    env: Arc<AgentEnv>,
    tls: Arc<rustls::ClientConfig>,
    mut probes: mpsc::UnboundedReceiver<Probe>,
    start_delay: Duration,
    shutdown: CancellationToken,
) {
    tokio::select! {
        _ = tokio::time::sleep(start_delay) => {}
        _ = shutdown.cancelled() => return,
    }
    let mut host = SimHost::new(slot.index, &slot.name, env.spec.containers);
    let mut backoff = Backoff::new(env.spec.backoff_initial, env.spec.backoff_max);
    loop {
        slot.attempts.fetch_add(1, Ordering::Relaxed);
        env.stats.add(Counter::Attempts, 1);
        let mut welcomed = false;
        let outcome = tokio::select! {
            r = session(&slot, &env, tls.clone(), &mut host, &mut probes, &mut welcomed) => r,
            _ = shutdown.cancelled() => return,
        };
        slot.connected.store(false, Ordering::Relaxed);
        if welcomed {
            backoff.reset();
            env.stats.add(Counter::Lost, 1);
        } else {
            match outcome {
                Err(SessionError::Refused(_)) => env.stats.add(Counter::Refused, 1),
                _ => env.stats.add(Counter::ConnectFailed, 1),
            }
        }
        if let Err(e) = outcome {
            tracing::debug!(host = %slot.name, error = %e, "session ended");
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff.next_delay()) => {}
            _ = shutdown.cancelled() => return,
        }
    }
}

async fn session(
    slot: &AgentSlot,
    env: &AgentEnv,
    tls: Arc<rustls::ClientConfig>,
    host: &mut SimHost,
    probes: &mut mpsc::UnboundedReceiver<Probe>,
    welcomed: &mut bool,
) -> Result<(), SessionError> {
    let stats = env.stats.as_ref();
    let channel = env
        .dialer
        .channel(slot.source, tls)
        .await
        .map_err(|message| SessionError::Connect {
            addr: env.dialer.controller.to_string(),
            message,
        })?;
    let mut client = AgentServiceClient::new(channel);
    let (tx, rx) = mpsc::channel::<AgentMessage>(OUTBOUND_QUEUE);
    let hello = Hello {
        host: Some(host.info()),
        journal_job_ids: vec![],
    };
    send(
        &tx,
        stats,
        agent_message::Msg::Hello(hello),
        Counter::BytesOtherUp,
    )
    .await?;
    let asked = Instant::now();
    let mut inbound = client
        .connect(ReceiverStream::new(rx))
        .await
        .map_err(|status| match status.code() {
            tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Internal => {
                SessionError::Lost(status.to_string())
            }
            _ => SessionError::Refused(status),
        })?
        .into_inner();
    let welcome = match tokio::time::timeout(WELCOME_TIMEOUT, inbound.message()).await {
        Err(_) => return Err(SessionError::Protocol("no welcome within 10s".into())),
        Ok(Err(status)) => return Err(SessionError::Refused(status)),
        Ok(Ok(None)) => return Err(SessionError::Lost("stream closed before welcome".into())),
        Ok(Ok(Some(m))) => {
            stats.add(
                Counter::BytesDown,
                m.encoded_len() as u64 + GRPC_FRAME_HEADER,
            );
            match m.msg {
                Some(controller_message::Msg::Welcome(w)) => w,
                other => {
                    return Err(SessionError::Protocol(format!(
                        "expected a welcome, got {other:?}"
                    )))
                }
            }
        }
    };
    stats.record_welcome(asked.elapsed());
    stats.add(Counter::Welcomes, 1);
    *welcomed = true;
    let _connected = stats.connected_guard();
    let since_epoch = u64::try_from(env.epoch.elapsed().as_millis()).unwrap_or(u64::MAX - 1);
    slot.welcomed_at.store(since_epoch + 1, Ordering::Relaxed);
    slot.connected.store(true, Ordering::Relaxed);
    let heartbeat = welcome
        .heartbeat_interval
        .as_ref()
        .map(sentinel_proto::time::std_duration)
        .filter(|d| *d >= Duration::from_millis(100))
        .unwrap_or(DEFAULT_HEARTBEAT);

    let spec = &env.spec;
    let mut delta = DeltaTracker::default();
    let mut report_seq: u64 = 0;
    let mut heartbeat_seq: u64 = 0;
    let mut force_full = true;
    let mut pending: HashMap<String, (Instant, oneshot::Sender<Duration>)> = HashMap::new();
    let mut reports = tokio::time::interval(spec.report_interval);
    reports.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut heartbeats =
        tokio::time::interval_at(tokio::time::Instant::now() + heartbeat, heartbeat);
    heartbeats.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    loop {
        tokio::select! {
            _ = reports.tick() => {
                let full = force_full
                    || report_seq.is_multiple_of(u64::from(spec.full_report_every.max(1)));
                force_full = false;
                report_seq += 1;
                let state = delta.report(host.collect(), full);
                let (count, bytes) = if full {
                    (Counter::ReportsFull, Counter::BytesFull)
                } else {
                    (Counter::ReportsDelta, Counter::BytesDelta)
                };
                stats.add(count, 1);
                send(&tx, stats, agent_message::Msg::Report(StateReport {
                    seq: report_seq,
                    full,
                    state: Some(state),
                }), bytes).await?;
            }
            _ = heartbeats.tick() => {
                heartbeat_seq += 1;
                stats.add(Counter::Heartbeats, 1);
                send(&tx, stats, agent_message::Msg::Heartbeat(Heartbeat {
                    seq: heartbeat_seq,
                    sent_at: Some(sentinel_proto::time::now()),
                }), Counter::BytesHeartbeat).await?;
            }
            Some(probe) = probes.recv() => {
                pending.insert(probe.id.clone(), (Instant::now(), probe.done));
                send(&tx, stats, agent_message::Msg::BundleRequest(BundleRequest {
                    sha256: probe.id,
                    offset: 0,
                    max_len: 0,
                }), Counter::BytesOtherUp).await?;
            }
            msg = inbound.message() => match msg {
                Ok(Some(m)) => {
                    stats.add(Counter::BytesDown, m.encoded_len() as u64 + GRPC_FRAME_HEADER);
                    match m.msg {
                        Some(controller_message::Msg::BundleChunk(chunk)) => {
                            if let Some((sent, done)) = pending.remove(&chunk.sha256) {
                                stats.add(Counter::ProbeReplies, 1);
                                let _ = done.send(sent.elapsed());
                            }
                        }
                        Some(controller_message::Msg::RequestFullReport(_)) => {
                            force_full = true;
                            reports.reset_immediately();
                        }
                        Some(controller_message::Msg::Job(job)) => {
                            stats.job_arrived(Instant::now());
                            let spec = sentinel_proto::v1::JobSpec::decode(job.spec.as_slice())
                                .unwrap_or_default();
                            for event in job_answer(&spec) {
                                send(&tx, stats, agent_message::Msg::JobEvent(event), Counter::BytesOtherUp).await?;
                            }
                        }
                        _ => {}
                    }
                }
                Ok(None) => return Ok(()),
                Err(status) => return Err(SessionError::Lost(status.to_string())),
            },
        }
    }
}

/// How a simulated agent answers a job. An isolation probe succeeds at once with no attempts
/// (simulated hosts hold no database credentials), so a probe fan-out completes as it would
/// with real agents; every other kind is refused, like an agent whose policy allows none, so
/// nothing waits for a job that never runs.
fn job_answer(spec: &sentinel_proto::v1::JobSpec) -> Vec<JobEvent> {
    use sentinel_proto::v1::{
        job_event::Event, job_finished, JobAccepted, JobFinished, JobKind, JobState, ProbeReport,
    };
    let event = |seq: u64, event: Event| JobEvent {
        job_id: spec.job_id.clone(),
        seq,
        at: Some(sentinel_proto::time::now()),
        event: Some(event),
    };
    if spec.kind() == JobKind::IsolationProbe {
        return vec![
            event(0, Event::Accepted(JobAccepted {})),
            event(
                1,
                Event::Finished(JobFinished {
                    state: JobState::Succeeded as i32,
                    detail: "0 attempts (simulated host)".into(),
                    result: Some(job_finished::Result::IsolationProbe(ProbeReport::default())),
                }),
            ),
        ];
    }
    vec![event(
        1,
        Event::Refused(JobRefused {
            reason: RefusalReason::Policy as i32,
            detail: "simulated agents do not execute jobs".into(),
        }),
    )]
}

async fn send(
    tx: &mpsc::Sender<AgentMessage>,
    stats: &Stats,
    msg: agent_message::Msg,
    counter: Counter,
) -> Result<(), SessionError> {
    let msg = AgentMessage { msg: Some(msg) };
    let bytes = msg.encoded_len() as u64 + GRPC_FRAME_HEADER;
    tx.send(msg)
        .await
        .map_err(|_| SessionError::Lost("outbound stream closed".into()))?;
    stats.add(counter, bytes);
    Ok(())
}
