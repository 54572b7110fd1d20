//! The `/metrics` endpoint: a minimal HTTP/1.1 responder on a tokio listener. Prometheus sends
//! one `GET /metrics` per scrape and needs nothing else, so this reads one request head,
//! answers it with `Connection: close` and hangs up: no keep-alive, no chunking, no TLS (the
//! listener is on loopback by default; put a proxy in front to expose it).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn, Instrument};

/// Renders the whole exposition on each scrape.
pub type Render = Arc<dyn Fn() -> String + Send + Sync>;

/// The content type of the classic text exposition format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";
/// A request head larger than this is refused: a scrape's is a few hundred bytes.
const MAX_HEAD: usize = 8 * 1024;
/// How long a client may take to send its request and read the answer; a stuck client must
/// not hold a connection slot.
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections served at once; more wait in the kernel's accept queue.
const MAX_CONNECTIONS: usize = 8;

/// Binds `addr` and serves `render` on it until `shutdown`. Returns the bound address, or
/// None when the address cannot be bound: metrics are a side channel, so a port clash is
/// logged as an error and the process keeps doing its real work.
pub async fn start(
    what: &'static str,
    addr: SocketAddr,
    render: Render,
    shutdown: CancellationToken,
) -> Option<SocketAddr> {
    let listener = match TcpListener::bind(addr).await {
        Ok(l) => l,
        Err(e) => {
            error!(listen = %addr, error = %e, "{what} metrics listener could not bind; running without metrics");
            return None;
        }
    };
    let local = listener.local_addr().unwrap_or(addr);
    if !local.ip().is_loopback() {
        warn!(listen = %local, "metrics are served without authentication on a non-loopback address");
    }
    info!(listen = %local, "{what} metrics listening (GET /metrics, Prometheus text format)");
    tokio::spawn(serve(listener, render, shutdown).instrument(tracing::info_span!("metrics")));
    Some(local)
}

/// Accepts connections until `shutdown`, each answered on its own task.
pub async fn serve(listener: TcpListener, render: Render, shutdown: CancellationToken) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return,
            },
            _ = shutdown.cancelled() => return,
        };
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // Out of descriptors and the like: back off a little instead of spinning.
                    debug!(error = %e, "metrics accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = shutdown.cancelled() => return,
        };
        let render = render.clone();
        tokio::spawn(async move {
            if let Err(e) = tokio::time::timeout(IO_TIMEOUT, answer(stream, &render)).await {
                debug!(%peer, error = %e, "metrics client too slow");
            }
            drop(permit);
        });
    }
}

/// Reads one request head and writes one response.
async fn answer(mut stream: TcpStream, render: &Render) {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    let complete = loop {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => break false,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
        if head.windows(4).any(|w| w == b"\r\n\r\n") || head.windows(2).any(|w| w == b"\n\n") {
            break true;
        }
        if head.len() > MAX_HEAD {
            break false;
        }
    };
    let response = if complete {
        route(&head, render)
    } else if head.len() > MAX_HEAD {
        Response::text(
            431,
            "Request Header Fields Too Large",
            "request head too large\n",
        )
    } else {
        return;
    };
    let _ = stream.write_all(&response.bytes()).await;
    let _ = stream.shutdown().await;
}

/// An HTTP response, ready to write.
#[derive(Debug, PartialEq)]
pub struct Response {
    status: u16,
    reason: &'static str,
    content_type: &'static str,
    extra_header: Option<&'static str>,
    body: String,
    /// HEAD: the headers describe the body, which is not sent.
    head_only: bool,
}

impl Response {
    fn text(status: u16, reason: &'static str, body: &str) -> Self {
        Self {
            status,
            reason,
            content_type: "text/plain; charset=utf-8",
            extra_header: None,
            body: body.to_string(),
            head_only: false,
        }
    }

    /// The status code.
    pub fn status(&self) -> u16 {
        self.status
    }

    /// The bytes on the wire.
    pub fn bytes(&self) -> Vec<u8> {
        let mut out = format!(
            "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n",
            self.status,
            self.reason,
            self.content_type,
            self.body.len()
        );
        if let Some(h) = self.extra_header {
            out.push_str(h);
            out.push_str("\r\n");
        }
        out.push_str("\r\n");
        if !self.head_only {
            out.push_str(&self.body);
        }
        out.into_bytes()
    }
}

/// Answers a request head: `GET /metrics` (or HEAD) renders; anything else says what is here.
pub fn route(head: &[u8], render: &Render) -> Response {
    let head = String::from_utf8_lossy(head);
    let mut parts = head.lines().next().unwrap_or_default().split_whitespace();
    let (Some(method), Some(target), Some(version)) = (parts.next(), parts.next(), parts.next())
    else {
        return Response::text(400, "Bad Request", "malformed request line\n");
    };
    if !version.starts_with("HTTP/1.") {
        return Response::text(505, "HTTP Version Not Supported", "HTTP/1.x only\n");
    }
    let path = target.split(['?', '#']).next().unwrap_or_default();
    if path != "/metrics" {
        return Response::text(404, "Not Found", "not found: metrics are at /metrics\n");
    }
    let head_only = match method {
        "GET" => false,
        "HEAD" => true,
        _ => {
            let mut r = Response::text(405, "Method Not Allowed", "GET or HEAD only\n");
            r.extra_header = Some("Allow: GET, HEAD");
            return r;
        }
    };
    Response {
        status: 200,
        reason: "OK",
        content_type: CONTENT_TYPE,
        extra_header: None,
        body: render(),
        head_only,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render() -> Render {
        Arc::new(|| "# HELP x X.\n# TYPE x gauge\nx 1\n".to_string())
    }

    #[test]
    fn get_metrics_answers_the_exposition_and_others_say_where_it_is() {
        let r = route(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n", &render());
        assert_eq!(r.status(), 200);
        let text = String::from_utf8(r.bytes()).unwrap();
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
        assert!(text.contains("Content-Type: text/plain; version=0.0.4; charset=utf-8\r\n"));
        assert!(text.contains("Content-Length: 31\r\n"), "{text}");
        assert!(
            text.ends_with("\r\n\r\n# HELP x X.\n# TYPE x gauge\nx 1\n"),
            "{text}"
        );

        assert_eq!(
            route(b"GET /metrics?x=1 HTTP/1.0\r\n\r\n", &render()).status(),
            200
        );
        let head = route(b"HEAD /metrics HTTP/1.1\r\n\r\n", &render());
        assert!(String::from_utf8(head.bytes())
            .unwrap()
            .ends_with("\r\n\r\n"));
        assert_eq!(route(b"GET / HTTP/1.1\r\n\r\n", &render()).status(), 404);
        let post = route(b"POST /metrics HTTP/1.1\r\n\r\n", &render());
        assert_eq!(post.status(), 405);
        assert!(String::from_utf8(post.bytes())
            .unwrap()
            .contains("Allow: GET, HEAD\r\n"));
        assert_eq!(route(b"garbage\r\n\r\n", &render()).status(), 400);
        assert_eq!(
            route(b"GET /metrics SPDY/3\r\n\r\n", &render()).status(),
            505
        );
    }

    #[tokio::test]
    async fn a_real_client_gets_the_metrics_and_a_port_clash_is_not_fatal() {
        let shutdown = CancellationToken::new();
        let addr = start(
            "test",
            "127.0.0.1:0".parse().unwrap(),
            render(),
            shutdown.clone(),
        )
        .await
        .unwrap();
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n")
            .await
            .unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).await.unwrap();
        assert!(text.starts_with("HTTP/1.1 200 OK"), "{text}");
        assert!(text.ends_with("x 1\n"), "{text}");

        // The same port again: logged, not fatal.
        assert!(start("test", addr, render(), shutdown.clone())
            .await
            .is_none());
        shutdown.cancel();
    }
}
