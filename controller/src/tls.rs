//! The controller's side of mTLS: a TLS 1.3-only server config that requires a client
//! certificate chaining to the fleet CA, and the accept loop that turns TCP connections into
//! TLS streams tagged with the peer's [`PeerInfo`].

use std::collections::HashMap;
use std::hash::Hash;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, SignatureScheme,
};
use sentinel_daemon::tls::{load_certs, load_key, load_roots, provider, TlsError, TlsFiles};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::Connected;
use tracing::{debug, warn};

use crate::identity::{self, Identity, PeerInfo};
use crate::warn_limit::WarnLimiter;

/// A handshake that takes longer than this is dropped, so a stalled peer cannot hold a slot.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Finished handshakes waiting for the gRPC server to pick them up.
const ACCEPT_QUEUE: usize = 1024;
/// How long an authenticated peer has to send the HTTP/2 connection preface. Every gRPC client
/// sends it at once; a connection that stays silent only holds a file descriptor.
const PREFACE_TIMEOUT: Duration = Duration::from_secs(5);
/// The HTTP/2 client connection preface (RFC 9113, section 3.4).
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Connections one host certificate may hold at once: its agent's stream, the one that
/// replaces it on a reconnect, and slack. No host certificate can use up the descriptors
/// that other hosts and operators need.
const CONNECTIONS_PER_HOST: usize = 4;
/// Connections one operator certificate may hold at once (parallel CLI calls, watchers).
const CONNECTIONS_PER_OPERATOR: usize = 64;
/// Connections without a client certificate, all together (enrolments are short calls):
/// however many an attacker opens, hosts and operators keep their own caps.
const CONNECTIONS_UNAUTHENTICATED: usize = 32;
/// TLS handshakes in progress from one source address: one client that opens connections
/// and never finishes them cannot hold more than this many descriptors.
const HANDSHAKES_PER_ADDRESS: usize = 64;

/// Warnings about connections before authentication, per source address: any client can
/// cause them, as often as it likes.
static HANDSHAKE_WARNINGS: WarnLimiter =
    WarnLimiter::new("refused connections", 3, 20, Duration::from_secs(10));
/// Warnings about authenticated peers' connections (over their cap, silent), per identity.
static PEER_WARNINGS: WarnLimiter = WarnLimiter::new(
    "refused connections of fleet peers",
    3,
    20,
    Duration::from_secs(10),
);

/// The server's TLS settings in force: each new connection takes the current ones, and a
/// reload (SIGHUP) replaces them; connections already open keep theirs.
#[derive(Debug)]
pub struct ServerTls(std::sync::RwLock<Arc<rustls::ServerConfig>>);

impl ServerTls {
    /// Settings starting as `config`.
    pub fn new(config: Arc<rustls::ServerConfig>) -> Arc<Self> {
        Arc::new(Self(std::sync::RwLock::new(config)))
    }

    /// The settings for the next handshake.
    pub fn current(&self) -> Arc<rustls::ServerConfig> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Puts `config` in force for new connections.
    pub fn replace(&self, config: Arc<rustls::ServerConfig>) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = config;
    }
}

/// The server config: TLS 1.3 only, ALPN h2, client certificates verified against the fleet
/// CA (issued by it directly or by the configured `issuer`, nothing else). A client may also
/// come without a certificate: it can then only enrol (the authz layer refuses it everything
/// else). The server's chain ends with the fleet CA, so that an enrolling agent, which has no
/// CA yet, can check it against the fingerprint its join token pins.
pub fn server_config(
    files: &TlsFiles,
    issuer: Option<CertificateDer<'static>>,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let roots = Arc::new(load_roots(&files.ca)?);
    let webpki = rustls::server::WebPkiClientVerifier::builder_with_provider(roots, provider())
        .allow_unauthenticated()
        .build()
        .map_err(|e| {
            TlsError::Config(format!("client verifier for {}: {e}", files.ca.display()))
        })?;
    let verifier = Arc::new(IssuedByFleetCa {
        inner: webpki,
        intermediates: issuer.into_iter().collect(),
    });
    let mut certs = load_certs(&files.cert, "certificate")?;
    for ca in load_certs(&files.ca, "CA certificate")? {
        if !certs.contains(&ca) {
            certs.push(ca);
        }
    }
    let key = load_key(&files.key)?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)
        .map_err(|e| {
            TlsError::Config(format!(
                "{} / {}: {e}",
                files.cert.display(),
                files.key.display()
            ))
        })?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// The client verifier: webpki's, except that the chain is built only from certificates the
/// controller trusts, never from intermediates the client sends. rustls does not enforce a
/// trust anchor's own constraints, so the fleet CA's `pathlen` alone does not stop a CA:TRUE
/// certificate it signed (by mistake or long ago) from issuing `operator/admin/...`; with the
/// client's intermediates ignored, a peer's certificate must be issued by the fleet CA itself
/// or by the issuing CA of `[pki]`, the one intermediate configured here.
#[derive(Debug)]
struct IssuedByFleetCa {
    inner: Arc<dyn ClientCertVerifier>,
    /// The issuing CA the controller itself trusts (`[pki] issuer_cert`), if any.
    intermediates: Vec<CertificateDer<'static>>,
}

/// Why a client certificate that only chains through its own intermediates is refused.
#[derive(Debug, thiserror::Error)]
#[error(
    "client certificate is not issued by the fleet CA itself ({sent} intermediate(s) sent by \
     the client are not trusted: {source})"
)]
struct NotIssuedByFleetCa {
    sent: usize,
    source: rustls::Error,
}

impl ClientCertVerifier for IssuedByFleetCa {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.inner
            .verify_client_cert(end_entity, &self.intermediates, now)
            .map_err(|source| {
                if intermediates.is_empty() {
                    source
                } else {
                    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(
                        Arc::new(NotIssuedByFleetCa {
                            sent: intermediates.len(),
                            source,
                        }),
                    )))
                }
            })
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Counts of open connections (or handshakes) per key, with a cap.
type Counts<K> = Arc<Mutex<HashMap<K, usize>>>;

/// One counted connection; gives its place back when dropped.
struct Slot<K: Eq + Hash> {
    counts: Counts<K>,
    key: Option<K>,
}

impl<K: Eq + Hash + Clone> Slot<K> {
    /// A place under `key`, unless `max` are taken.
    fn acquire(counts: &Counts<K>, key: K, max: usize) -> Option<Self> {
        let mut map = counts.lock().unwrap_or_else(|p| p.into_inner());
        let n = map.entry(key.clone()).or_default();
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(Self {
            counts: counts.clone(),
            key: Some(key),
        })
    }
}

impl<K: Eq + Hash> Drop for Slot<K> {
    fn drop(&mut self) {
        let Some(key) = self.key.take() else {
            return;
        };
        let mut map = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = map.get_mut(&key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                map.remove(&key);
            }
        }
    }
}

/// The caps the accept loop keeps.
#[derive(Default)]
struct Limits {
    handshakes: Counts<IpAddr>,
    identities: Counts<Identity>,
}

/// An accepted, authenticated connection.
pub struct TlsConn {
    inner: TlsStream<TcpStream>,
    peer: PeerInfo,
    /// The HTTP/2 preface, read before the connection was handed on, replayed to the server.
    preface: Vec<u8>,
    /// The peer's place under its identity's cap, held as long as the connection lives.
    _slot: Slot<Identity>,
}

impl Connected for TlsConn {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> PeerInfo {
        self.peer.clone()
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.preface.is_empty() {
            let n = self.preface.len().min(buf.remaining());
            buf.put_slice(&self.preface[..n]);
            self.preface.drain(..n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Accepts connections on `listener` until `shutdown`, running each handshake in its own task
/// so one slow or hostile peer never delays the others. Peers that fail the handshake or carry
/// no fleet identity are logged and dropped; the rest come out of the returned stream.
pub fn incoming(
    listener: TcpListener,
    config: Arc<ServerTls>,
    shutdown: CancellationToken,
) -> ReceiverStream<Result<TlsConn, io::Error>> {
    let (tx, rx) = mpsc::channel(ACCEPT_QUEUE);
    let limits = Arc::new(Limits::default());
    // Sums up held-back warnings of a flood that has stopped.
    let stop = shutdown.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.cancelled() => return,
            }
            HANDSHAKE_WARNINGS.flush();
            PEER_WARNINGS.flush();
        }
    });
    tokio::spawn(async move {
        loop {
            let (tcp, addr) = tokio::select! {
                _ = shutdown.cancelled() => return,
                accepted = listener.accept() => match accepted {
                    Ok(pair) => pair,
                    Err(e) => {
                        // EMFILE and friends: back off briefly instead of spinning.
                        warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            // Taken per connection, so a reloaded certificate serves the next handshake.
            let acceptor = tokio_rustls::TlsAcceptor::from(config.current());
            let (tx, limits) = (tx.clone(), limits.clone());
            tokio::spawn(async move {
                if let Some(conn) = handshake(acceptor, &limits, tcp, addr).await {
                    let _ = tx.send(Ok(conn)).await;
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

async fn handshake(
    acceptor: tokio_rustls::TlsAcceptor,
    limits: &Limits,
    tcp: TcpStream,
    addr: SocketAddr,
) -> Option<TlsConn> {
    let ip = addr.ip().to_string();
    let Some(in_progress) = Slot::acquire(&limits.handshakes, addr.ip(), HANDSHAKES_PER_ADDRESS)
    else {
        HANDSHAKE_WARNINGS.warn(&ip, || {
            format!("connection from {addr} closed: {HANDSHAKES_PER_ADDRESS} TLS handshakes from this address are already in progress")
        });
        return None;
    };
    let _ = tcp.set_nodelay(true);
    let mut stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => {
            let error = sentinel_daemon::tls_explain::find(&e)
                .map(sentinel_daemon::tls_explain::peer_certificate)
                .unwrap_or_else(|| e.to_string());
            HANDSHAKE_WARNINGS.warn(&ip, || {
                format!("TLS handshake refused peer={addr} error={error}")
            });
            return None;
        }
        Err(_) => {
            HANDSHAKE_WARNINGS.warn(&ip, || format!("TLS handshake timed out peer={addr}"));
            return None;
        }
    };
    drop(in_progress);
    let der = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|certs| certs.first())
        .map(|c| c.as_ref().to_vec());
    let identity = match der.as_deref().map(identity::from_certificate) {
        // No certificate: may only enrol (see `identity::authorize`).
        None => Identity::Unauthenticated,
        Some(Ok(identity)) => identity,
        Some(Err(e)) => {
            HANDSHAKE_WARNINGS.warn(&ip, || {
                format!("client certificate refused peer={addr} error={e}")
            });
            return None;
        }
    };
    let who = identity.to_string();
    let cap = match identity {
        Identity::Host(_) => CONNECTIONS_PER_HOST,
        Identity::Operator { .. } => CONNECTIONS_PER_OPERATOR,
        Identity::Unauthenticated => CONNECTIONS_UNAUTHENTICATED,
    };
    let Some(slot) = Slot::acquire(&limits.identities, identity.clone(), cap) else {
        PEER_WARNINGS.warn(&who, || {
            format!("connection from {addr} closed: {who} already holds {cap} connections")
        });
        return None;
    };
    // The preface is read here, not by the HTTP/2 server, so that a peer that never sends it
    // is closed after a few seconds instead of holding its connection for ever.
    let mut preface = vec![0u8; H2_PREFACE.len()];
    match tokio::time::timeout(PREFACE_TIMEOUT, stream.read_exact(&mut preface)).await {
        Ok(Ok(_)) if preface == H2_PREFACE => {}
        Ok(Ok(_)) => {
            PEER_WARNINGS.warn(&who, || {
                format!("connection from {addr} ({who}) closed: not HTTP/2")
            });
            return None;
        }
        Ok(Err(e)) => {
            debug!(peer = %addr, %identity, error = %e, "connection closed before the HTTP/2 preface");
            return None;
        }
        Err(_) => {
            PEER_WARNINGS.warn(&who, || {
                format!(
                    "connection from {addr} ({who}) closed: no HTTP/2 preface within {}s",
                    PREFACE_TIMEOUT.as_secs()
                )
            });
            return None;
        }
    }
    debug!(peer = %addr, %identity, "peer authenticated");
    Some(TlsConn {
        inner: stream,
        peer: PeerInfo {
            addr: Some(addr),
            identity,
            validity: der.as_deref().and_then(identity::validity),
        },
        preface,
        _slot: slot,
    })
}
