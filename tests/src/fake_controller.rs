//! A stand-in controller for testing the agent as the security boundary: it speaks the real
//! agent channel (our TLS acceptor and identity code, the generated service) but lets a test
//! send any envelope (forged, expired, replayed) and read every message the agent sends back.

use std::collections::HashMap;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::Stream;
use sentinel_proto::v1::agent_service_server::{AgentService, AgentServiceServer};
use sentinel_proto::v1::{
    agent_message, controller_message, AgentMessage, ControllerMessage, JobEvent, SignedJob,
    Welcome,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

type Outbound = mpsc::Sender<Result<ControllerMessage, Status>>;

#[derive(Default)]
struct Shared {
    senders: HashMap<String, Outbound>,
    events: Vec<(String, JobEvent)>,
    connects: HashMap<String, u32>,
}

struct Service {
    shared: Arc<Mutex<Shared>>,
}

#[tonic::async_trait]
impl AgentService for Service {
    type ConnectStream = Pin<Box<dyn Stream<Item = Result<ControllerMessage, Status>> + Send>>;

    async fn connect(
        &self,
        request: Request<Streaming<AgentMessage>>,
    ) -> Result<Response<Self::ConnectStream>, Status> {
        let mut inbound = request.into_inner();
        let hello = match inbound.message().await?.and_then(|m| m.msg) {
            Some(agent_message::Msg::Hello(h)) => h,
            _ => return Err(Status::invalid_argument("expected hello")),
        };
        let host = hello.host.map(|h| h.name).unwrap_or_default();
        let (tx, rx) = mpsc::channel(64);
        let _ = tx
            .send(Ok(ControllerMessage {
                msg: Some(controller_message::Msg::Welcome(Welcome {
                    controller_version: "fake".into(),
                    heartbeat_interval: Some(prost_types::Duration {
                        seconds: 5,
                        nanos: 0,
                    }),
                    missed_heartbeats_offline: 3,
                    ..Default::default()
                })),
            }))
            .await;
        {
            let mut s = self.shared.lock().unwrap_or_else(|p| p.into_inner());
            s.senders.insert(host.clone(), tx);
            *s.connects.entry(host.clone()).or_default() += 1;
        }
        let shared = self.shared.clone();
        tokio::spawn(async move {
            while let Ok(Some(msg)) = inbound.message().await {
                if let Some(agent_message::Msg::JobEvent(ev)) = msg.msg {
                    shared
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .events
                        .push((host.clone(), ev));
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}

/// A running stand-in controller on a free loopback port.
pub struct FakeController {
    /// `127.0.0.1:PORT`.
    pub addr: String,
    shared: Arc<Mutex<Shared>>,
    runtime: tokio::runtime::Runtime,
    shutdown: CancellationToken,
}

impl FakeController {
    /// Serves with the controller certificate from `certs` (a dev PKI).
    pub fn start(certs: &Path) -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let files = sentinel_daemon::tls::TlsFiles {
            ca: certs.join("ca.pem"),
            cert: certs.join("controller.pem"),
            key: certs.join("controller.key"),
        };
        let tls = sentinel::tls::server_config(&files, None).expect("controller TLS");
        let shared = Arc::new(Mutex::new(Shared::default()));
        let shutdown = CancellationToken::new();
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        let service = Service {
            shared: shared.clone(),
        };
        let stop = shutdown.clone();
        runtime.spawn(async move {
            let incoming =
                sentinel::tls::incoming(listener, sentinel::tls::ServerTls::new(tls), stop.clone());
            let _ = tonic::transport::Server::builder()
                .add_service(AgentServiceServer::new(service))
                .serve_with_incoming_shutdown(incoming, stop.cancelled())
                .await;
        });
        Self {
            addr,
            shared,
            runtime,
            shutdown,
        }
    }

    /// How many times `host` has connected.
    pub fn connects(&self, host: &str) -> u32 {
        self.lock().connects.get(host).copied().unwrap_or(0)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sends an envelope to `host`'s current stream.
    pub fn send_job(&self, host: &str, job: SignedJob) {
        let tx = self
            .lock()
            .senders
            .get(host)
            .cloned()
            .expect("host connected");
        self.runtime
            .block_on(tx.send(Ok(ControllerMessage {
                msg: Some(controller_message::Msg::Job(job)),
            })))
            .expect("sending the job");
    }

    /// Every job event received so far for `job_id`.
    pub fn events(&self, job_id: &str) -> Vec<JobEvent> {
        self.lock()
            .events
            .iter()
            .filter(|(_, e)| e.job_id == job_id)
            .map(|(_, e)| e.clone())
            .collect()
    }

    /// Waits for an event of `job_id` matching `pred`.
    pub fn wait_event(&self, job_id: &str, pred: impl Fn(&JobEvent) -> bool) -> JobEvent {
        crate::eventually(&format!("an event of job {job_id}"), || {
            self.events(job_id)
                .into_iter()
                .find(|e| pred(e))
                .ok_or_else(|| format!("{:?}", self.events(job_id)))
        })
    }
}

impl Drop for FakeController {
    fn drop(&mut self) {
        self.shutdown.cancel();
        std::thread::sleep(Duration::from_millis(50));
    }
}
