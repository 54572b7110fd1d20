//! The controller's side of mTLS: a TLS 1.3-only server config that requires a client
//! certificate chaining to the fleet CA, and the accept loop that turns TCP connections into
//! TLS streams tagged with the peer's [`PeerInfo`].

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hostagent::tls::{load_certs, load_key, load_roots, provider, TlsError, TlsFiles};
use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, SignatureScheme,
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::Connected;
use tracing::{debug, warn};

use crate::identity::{self, PeerInfo};

/// A handshake that takes longer than this is dropped, so a stalled peer cannot hold a slot.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Finished handshakes waiting for the gRPC server to pick them up.
const ACCEPT_QUEUE: usize = 1024;

/// The server config: TLS 1.3 only, client certificates required and verified against the
/// fleet CA, ALPN h2.
pub fn server_config(files: &TlsFiles) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let roots = Arc::new(load_roots(&files.ca)?);
    let webpki = rustls::server::WebPkiClientVerifier::builder_with_provider(roots, provider())
        .build()
        .map_err(|e| {
            TlsError::Config(format!("client verifier for {}: {e}", files.ca.display()))
        })?;
    let verifier = Arc::new(IssuedByFleetCa {
        inner: webpki,
        intermediates: Vec::new(),
    });
    let certs = load_certs(&files.cert, "certificate")?;
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
/// trust anchor's own constraints, so the fleet CA's `pathlen:0` alone does not stop a CA:TRUE
/// certificate it signed (by mistake or long ago) from issuing `operator/admin/...`; with the
/// client's intermediates ignored, a peer's certificate must be issued by the fleet CA itself
/// (or by an issuing intermediate configured here, once enrolment brings one).
#[derive(Debug)]
struct IssuedByFleetCa {
    inner: Arc<dyn ClientCertVerifier>,
    /// Issuing intermediates the controller itself trusts (none yet).
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

/// An accepted, authenticated connection.
pub struct TlsConn {
    inner: TlsStream<TcpStream>,
    peer: PeerInfo,
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
    config: Arc<rustls::ServerConfig>,
    shutdown: CancellationToken,
) -> ReceiverStream<Result<TlsConn, io::Error>> {
    let (tx, rx) = mpsc::channel(ACCEPT_QUEUE);
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
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
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                if let Some(conn) = handshake(acceptor, tcp, addr).await {
                    let _ = tx.send(Ok(conn)).await;
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

async fn handshake(
    acceptor: tokio_rustls::TlsAcceptor,
    tcp: TcpStream,
    addr: SocketAddr,
) -> Option<TlsConn> {
    let _ = tcp.set_nodelay(true);
    let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => {
            warn!(peer = %addr, error = %e, "TLS handshake refused");
            return None;
        }
        Err(_) => {
            warn!(peer = %addr, "TLS handshake timed out");
            return None;
        }
    };
    let der = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|certs| certs.first())
        .map(|c| c.as_ref().to_vec());
    let Some(der) = der else {
        warn!(peer = %addr, "no client certificate");
        return None;
    };
    match identity::from_certificate(&der) {
        Ok(identity) => {
            debug!(peer = %addr, %identity, "peer authenticated");
            Some(TlsConn {
                inner: stream,
                peer: PeerInfo {
                    addr: Some(addr),
                    identity,
                },
            })
        }
        Err(e) => {
            warn!(peer = %addr, error = %e, "client certificate refused");
            None
        }
    }
}
