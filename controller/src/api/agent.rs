//! `sentinel.v1.AgentService`: one long-lived stream per agent. The first message must be a
//! hello naming the same host as the certificate; then reports, heartbeats and job events flow
//! up while the registry holds the sender for messages down.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use futures::StreamExt;
use sentinel_proto::v1::agent_service_server::AgentService;
use sentinel_proto::v1::{
    agent_message, controller_message, AgentMessage, BundleChunk, CertificateIssued,
    ControllerMessage, Welcome,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, info, warn, Instrument};

use crate::context::Context;
use crate::identity::Identity;
use crate::registry::Registry;

/// How long an agent may take between opening the stream and sending its hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Messages queued towards one agent before senders wait.
const OUTBOUND_QUEUE: usize = 64;
/// How long a superseded stream's queue may still drain (its final abort status) before the
/// stream is cut.
const SUPERSEDED_GRACE: Duration = Duration::from_millis(200);

/// The agent channel service.
pub struct AgentApi {
    ctx: Arc<Context>,
    registry: Arc<Registry>,
    shutdown: CancellationToken,
}

impl AgentApi {
    /// A service over the shared registry. Agent streams end when `shutdown` is cancelled, so
    /// that a graceful shutdown is not held up by streams that never end on their own.
    pub fn new(ctx: Arc<Context>, shutdown: CancellationToken) -> Self {
        Self {
            registry: ctx.registry.clone(),
            ctx,
            shutdown,
        }
    }
}

type OutboundStream = Pin<Box<dyn Stream<Item = Result<ControllerMessage, Status>> + Send>>;

#[tonic::async_trait]
impl AgentService for AgentApi {
    type ConnectStream = OutboundStream;

    async fn connect(
        &self,
        request: Request<Streaming<AgentMessage>>,
    ) -> Result<Response<Self::ConnectStream>, Status> {
        let peer = super::peer(&request)?;
        let Identity::Host(cert_name) = peer.identity else {
            return Err(Status::permission_denied(
                "the agent channel takes host certificates only",
            ));
        };
        let mut inbound = request.into_inner();
        let first = tokio::time::timeout(HELLO_TIMEOUT, inbound.message())
            .await
            .map_err(|_| Status::deadline_exceeded("no hello within 10s"))??;
        let hello = match first.and_then(|m| m.msg) {
            Some(agent_message::Msg::Hello(hello)) => hello,
            Some(_) => {
                return Err(Status::invalid_argument(
                    "the first message must be a hello",
                ))
            }
            None => return Err(Status::invalid_argument("stream ended before the hello")),
        };
        let info = hello
            .host
            .ok_or_else(|| Status::invalid_argument("hello carries no host info"))?;
        if info.name != cert_name {
            warn!(
                certificate = %cert_name,
                claimed = ?info.name,
                peer = ?peer.addr,
                "hello claims another host's name; refused"
            );
            return Err(Status::permission_denied(format!(
                "certificate is for host {cert_name:?}, hello claims {:?}",
                info.name
            )));
        }

        let (tx, rx) = mpsc::channel(OUTBOUND_QUEUE);
        let liveness = self.registry.liveness();
        let welcome = Welcome {
            controller_version: crate::VERSION.to_string(),
            server_time: Some(sentinel_proto::time::now()),
            heartbeat_interval: Some(sentinel_proto::time::duration(liveness.heartbeat_interval)),
            missed_heartbeats_offline: liveness.missed_heartbeats_offline,
        };
        tx.send(Ok(ControllerMessage {
            msg: Some(controller_message::Msg::Welcome(welcome)),
        }))
        .await
        .map_err(|_| Status::unavailable("stream closed"))?;
        // The keys to trust, signed by the current one, before any job of this stream.
        if let Some(keys) = self.ctx.jobs.trusted_keys() {
            tx.send(Ok(ControllerMessage {
                msg: Some(controller_message::Msg::TrustedKeys(keys)),
            }))
            .await
            .map_err(|_| Status::unavailable("stream closed"))?;
        }

        let version = info.agent_version.clone();
        // Cancelled when a newer stream of this host takes over (or at shutdown): this stream
        // then stops reading and ends, so that only the newest stream speaks for the host and
        // jobs always go to it. The agent behind an ended stream reconnects, and its stream
        // becomes the newest in turn.
        let superseded = self.shutdown.child_token();
        let conn_id = self
            .registry
            .connect_stream(info, peer.addr, tx.clone(), superseded.clone());
        if let Some(validity) = peer.validity {
            self.registry.set_certificate(&cert_name, validity);
        }
        // A revocation that landed between the authz check and here must not miss this stream.
        if self.ctx.deny.host(&cert_name).is_some() {
            superseded.cancel();
        }
        // `?` (Debug) on strings the host chose: quotes and escapes them, so a crafted version
        // cannot write a line of its own into the log.
        info!(host = %cert_name, peer = ?peer.addr, agent_version = ?version, "agent connected");
        self.ctx.jobs.dispatch(&cert_name);
        let ctx = self.ctx.clone();
        let registry = self.registry.clone();
        let shutdown = self.shutdown.clone();
        let span = tracing::info_span!("agent_stream", host = %cert_name, conn = conn_id);
        let ended = superseded.clone();
        tokio::spawn(
            async move {
                let reason = tokio::select! {
                    reason = serve_stream(&ctx, &cert_name, inbound, tx.clone()) => reason,
                    _ = ended.cancelled() => if shutdown.is_cancelled() {
                        "controller shutting down".to_string()
                    } else if let Some(entry) = ctx.deny.host(&cert_name) {
                        let message = crate::revocation::refusal_message(&entry);
                        let _ = tx.try_send(Err(Status::permission_denied(message)));
                        format!("revoked: {}", entry.reason)
                    } else {
                        // Tell the peer why (it ends this response stream once the last
                        // sender is gone); the queue may be full, and then the end alone says it.
                        let _ = tx.try_send(Err(Status::aborted(
                            "superseded by a newer connection of the same host",
                        )));
                        "superseded by a newer connection".to_string()
                    },
                };
                drop(tx);
                info!(reason = ?reason, "agent disconnected");
                registry.disconnect(&cert_name, conn_id, &reason);
            }
            .instrument(span),
        );
        // Also ends on `superseded`, a moment after the abort status above had its chance to
        // go out: a sender clone held elsewhere must not keep a replaced stream open.
        let outbound = ReceiverStream::new(rx).take_until(async move {
            superseded.cancelled().await;
            tokio::time::sleep(SUPERSEDED_GRACE).await;
        });
        Ok(Response::new(Box::pin(outbound)))
    }
}

/// Reads the agent's messages until the stream ends; returns why it ended.
async fn serve_stream(
    ctx: &Context,
    host: &str,
    mut inbound: Streaming<AgentMessage>,
    tx: mpsc::Sender<Result<ControllerMessage, Status>>,
) -> String {
    let registry = &ctx.registry;
    let liveness = registry.liveness();
    let limit = liveness.silence_limit();
    loop {
        let next = tokio::select! {
            next = tokio::time::timeout(limit, inbound.message()) => next,
            // The response stream is gone (the peer reset it): stop reading this one.
            _ = tx.closed() => return "the response stream closed".into(),
        };
        let msg = match next {
            Err(_) => {
                return format!(
                    "missed {} heartbeats: nothing heard for {}s",
                    liveness.missed_heartbeats_offline,
                    limit.as_secs()
                )
            }
            Ok(Err(status)) => return format!("stream failed: {}", status.message()),
            Ok(Ok(None)) => return "agent closed the stream".into(),
            Ok(Ok(Some(msg))) => msg,
        };
        registry.touch(host);
        match msg.msg {
            Some(agent_message::Msg::Report(report)) => {
                debug!(seq = report.seq, full = report.full, "state report");
                registry.apply_report(host, report);
            }
            Some(agent_message::Msg::Heartbeat(_)) => {}
            Some(agent_message::Msg::JobEvent(event)) => ctx.jobs.on_event(host, event),
            Some(agent_message::Msg::BundleRequest(req)) => {
                let chunk = bundle_chunk(ctx, host, &req).await;
                let _ = tx
                    .send(Ok(ControllerMessage {
                        msg: Some(controller_message::Msg::BundleChunk(chunk)),
                    }))
                    .await;
            }
            Some(agent_message::Msg::RenewCertificate(req)) => {
                // Only the name of this stream's own certificate is ever renewed.
                let issued = match crate::enroll::configured(&ctx.enrolment) {
                    Ok(enrolment) => {
                        let host = host.to_owned();
                        tokio::task::spawn_blocking(move || enrolment.renew(&host, &req.csr_der))
                            .await
                            .unwrap_or_else(|e| CertificateIssued {
                                error: format!("renewal task failed: {e}"),
                                ..Default::default()
                            })
                    }
                    Err(status) => CertificateIssued {
                        error: status.message().to_owned(),
                        ..Default::default()
                    },
                };
                let _ = tx
                    .send(Ok(ControllerMessage {
                        msg: Some(controller_message::Msg::CertificateIssued(issued)),
                    }))
                    .await;
            }
            Some(agent_message::Msg::Hello(_)) => {
                return "protocol error: a second hello on the same stream".into();
            }
            None => {}
        }
    }
}

/// Reads the requested part of a bundle. Only the host whose unfinished deploy job names the
/// bundle may read it: a bundle carries its environment's secrets.
async fn bundle_chunk(
    ctx: &Context,
    host: &str,
    req: &sentinel_proto::v1::BundleRequest,
) -> BundleChunk {
    /// Largest chunk served, whatever the agent asks: far below gRPC's 4 MiB message limit.
    const MAX_CHUNK: u32 = 1024 * 1024;
    let mut chunk = BundleChunk {
        sha256: req.sha256.clone(),
        offset: req.offset,
        ..Default::default()
    };
    let path = match ctx.bundle_path(&req.sha256) {
        Some(p) if ctx.jobs.bundle_allowed(host, &req.sha256) => p,
        _ => {
            warn!(host, sha256 = ?req.sha256, "bundle request refused: no unfinished deploy job of this host names it");
            chunk.error = format!("bundle {} is not available to {host}", req.sha256);
            return chunk;
        }
    };
    let len = req.max_len.clamp(1, MAX_CHUNK) as usize;
    let read = async {
        use tokio::io::{AsyncReadExt, AsyncSeekExt};
        let mut f = tokio::fs::File::open(&path).await?;
        let total = f.metadata().await?.len();
        f.seek(std::io::SeekFrom::Start(req.offset)).await?;
        let mut buf = vec![0u8; len.min(total.saturating_sub(req.offset) as usize)];
        f.read_exact(&mut buf).await?;
        Ok::<_, std::io::Error>((buf, total))
    };
    match read.await {
        Ok((data, total)) => {
            chunk.data = data;
            chunk.total_size = total;
        }
        Err(e) => chunk.error = format!("reading bundle {}: {e}", req.sha256),
    }
    chunk
}
