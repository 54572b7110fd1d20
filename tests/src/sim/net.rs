//! How a simulated agent reaches the controller: TCP from one of several loopback source
//! addresses (127.0.0.2, 127.0.0.3, ...; each has its own ~28,000 ephemeral ports, so 10,000
//! agents and their reconnect storms never run out), the agent's own TLS 1.3 client config, a
//! byte counter under TLS, and tonic's HTTP/2 channel on top, as `hostagent::connection` does.

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpSocket, TcpStream};
use tonic::transport::{Channel, Endpoint};

use crate::stats::{Counter, Stats};

/// The agent's TCP + TLS timeout (hostagent's `CONNECT_TIMEOUT`).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// `count` loopback source addresses starting at 127.0.0.2.
pub fn loopback_sources(count: u8) -> Vec<IpAddr> {
    (0..count.max(1))
        .map(|i| IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2 + i.min(250))))
        .collect()
}

/// Where and how agents dial.
#[derive(Clone)]
pub struct Dialer {
    /// The controller.
    pub controller: SocketAddr,
    /// The name its certificate must carry.
    pub server_name: ServerName<'static>,
    /// Counts TCP bytes.
    pub stats: Arc<Stats>,
}

impl Dialer {
    /// TCP from `source`, then the TLS handshake.
    pub async fn dial(
        &self,
        source: IpAddr,
        tls: Arc<rustls::ClientConfig>,
    ) -> io::Result<tokio_rustls::client::TlsStream<Counted>> {
        let socket = match source {
            IpAddr::V4(_) => TcpSocket::new_v4()?,
            IpAddr::V6(_) => TcpSocket::new_v6()?,
        };
        socket.bind(SocketAddr::new(source, 0))?;
        let tcp = socket.connect(self.controller).await?;
        tcp.set_nodelay(true)?;
        let counted = Counted {
            inner: tcp,
            stats: self.stats.clone(),
        };
        tokio_rustls::TlsConnector::from(tls)
            .connect(self.server_name.clone(), counted)
            .await
    }

    /// An HTTP/2 channel over a fresh connection, with the agent's keepalive settings.
    pub async fn channel(
        &self,
        source: IpAddr,
        tls: Arc<rustls::ClientConfig>,
    ) -> Result<Channel, String> {
        let endpoint = Endpoint::from_shared(format!("http://{}", self.controller))
            .map_err(|e| e.to_string())?
            .connect_timeout(CONNECT_TIMEOUT)
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(20));
        let dialer = self.clone();
        let connector = tower::service_fn(move |_uri: http::Uri| {
            let (dialer, tls) = (dialer.clone(), tls.clone());
            async move {
                let stream = tokio::time::timeout(CONNECT_TIMEOUT, dialer.dial(source, tls))
                    .await
                    .map_err(|_| {
                        io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out")
                    })??;
                Ok::<_, io::Error>(TokioIo::new(stream))
            }
        });
        endpoint
            .connect_with_connector(connector)
            .await
            .map_err(|e| sentinel_daemon::error_chain(&e))
    }
}

/// A TCP stream that adds what crosses it to [`Counter::TcpIn`] and [`Counter::TcpOut`].
pub struct Counted {
    inner: TcpStream,
    stats: Arc<Stats>,
}

impl AsyncRead for Counted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let poll = Pin::new(&mut self.inner).poll_read(cx, buf);
        let read = buf.filled().len().saturating_sub(before);
        if read > 0 {
            self.stats.add(Counter::TcpIn, read as u64);
        }
        poll
    }
}

impl AsyncWrite for Counted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &poll {
            self.stats.add(Counter::TcpOut, *n as u64);
        }
        poll
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = &poll {
            self.stats.add(Counter::TcpOut, *n as u64);
        }
        poll
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_start_at_127_0_0_2() {
        let s = loopback_sources(3);
        assert_eq!(s.len(), 3);
        assert_eq!(s[0], IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2)));
        assert_eq!(s[2], IpAddr::V4(Ipv4Addr::new(127, 0, 0, 4)));
    }
}
