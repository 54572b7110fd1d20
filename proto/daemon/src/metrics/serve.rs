//! The `/metrics` endpoint: hyper's HTTP/1.1 server on a tokio listener. Prometheus sends one
//! `GET /metrics` per scrape and needs nothing else, so every connection answers one request
//! and closes (no keep-alive), at most [`MAX_CONNECTIONS`] at a time, each within
//! [`IO_TIMEOUT`]; no TLS (the listener is on loopback by default; put a proxy in front to
//! expose it).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, Method, Response, StatusCode};
use http_body_util::Full;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn, Instrument};

/// Renders the whole exposition on each scrape.
pub type Render = Arc<dyn Fn() -> String + Send + Sync>;

/// The content type of the classic text exposition format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";
/// A request head larger than this is refused (431): a scrape's is a few hundred bytes.
/// hyper's smallest read buffer.
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
            let service = hyper::service::service_fn(move |request: http::Request<_>| {
                let response = route(request.method(), request.uri().path(), &render);
                async move { Ok::<_, Infallible>(response) }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .keep_alive(false)
                // `Content-Type:` as scrapers and the tests read it.
                .title_case_headers(true)
                .max_buf_size(MAX_HEAD)
                .timer(TokioTimer::new())
                .header_read_timeout(IO_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service);
            match tokio::time::timeout(IO_TIMEOUT, connection).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => debug!(%peer, error = %e, "metrics connection failed"),
                Err(_) => debug!(%peer, "metrics client too slow"),
            }
            drop(permit);
        });
    }
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// Answers a request: `GET /metrics` (or HEAD, whose body hyper leaves out) renders; anything
/// else says what is here.
pub fn route(method: &Method, path: &str, render: &Render) -> Response<Full<Bytes>> {
    if path != "/metrics" {
        return text(
            StatusCode::NOT_FOUND,
            "not found: metrics are at /metrics\n",
        );
    }
    if method != Method::GET && method != Method::HEAD {
        let mut response = text(StatusCode::METHOD_NOT_ALLOWED, "GET or HEAD only\n");
        response
            .headers_mut()
            .insert(header::ALLOW, header::HeaderValue::from_static("GET, HEAD"));
        return response;
    }
    let mut response = Response::new(Full::new(Bytes::from(render())));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(CONTENT_TYPE),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    fn render() -> Render {
        Arc::new(|| "# HELP x X.\n# TYPE x gauge\nx 1\n".to_string())
    }

    /// Sends `request` raw to a running endpoint and reads the answer to the end.
    async fn raw(addr: SocketAddr, request: &[u8]) -> String {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(request).await.unwrap();
        let mut text = String::new();
        tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut text))
            .await
            .expect("the server closes after one answer")
            .unwrap();
        text
    }

    #[tokio::test]
    async fn get_metrics_answers_the_exposition_and_others_say_where_it_is() {
        let shutdown = CancellationToken::new();
        let addr = start(
            "test",
            "127.0.0.1:0".parse().unwrap(),
            render(),
            shutdown.clone(),
        )
        .await
        .unwrap();
        // HTTP/1.1 without `Connection: close`: still one answer, then the server hangs up.
        let text = raw(addr, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
        assert!(text.contains("Content-Type: text/plain; version=0.0.4; charset=utf-8\r\n"));
        assert!(text.contains("Content-Length: 31\r\n"), "{text}");
        assert!(
            text.ends_with("\r\n\r\n# HELP x X.\n# TYPE x gauge\nx 1\n"),
            "{text}"
        );

        let text = raw(addr, b"GET /metrics?x=1 HTTP/1.0\r\n\r\n").await;
        assert!(text.starts_with("HTTP/1.0 200"), "{text}");
        let text = raw(addr, b"HEAD /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
        assert!(text.ends_with("\r\n\r\n"), "{text}");
        let text = raw(addr, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(text.starts_with("HTTP/1.1 404"), "{text}");
        assert!(text.contains("/metrics"), "{text}");
        let text = raw(addr, b"POST /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(text.starts_with("HTTP/1.1 405"), "{text}");
        assert!(text.contains("Allow: GET, HEAD\r\n"), "{text}");
        let text = raw(addr, b"garbage\r\n\r\n").await;
        assert!(text.starts_with("HTTP/1.1 400"), "{text}");
        let mut huge = b"GET /metrics HTTP/1.1\r\nX: ".to_vec();
        huge.extend(std::iter::repeat_n(b'a', MAX_HEAD * 2));
        huge.extend_from_slice(b"\r\n\r\n");
        let text = raw(addr, &huge).await;
        assert!(text.starts_with("HTTP/1.1 431"), "{text}");
        shutdown.cancel();
    }

    #[tokio::test]
    async fn connections_beyond_the_limit_wait_for_a_slot_and_shutdown_stops_the_server() {
        let shutdown = CancellationToken::new();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(serve(listener, render(), shutdown.clone()));
        let mut silent = Vec::new();
        for _ in 0..MAX_CONNECTIONS {
            silent.push(TcpStream::connect(addr).await.unwrap());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        let scrape = tokio::spawn(raw(addr, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"));
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            !scrape.is_finished(),
            "answered beyond the connection limit"
        );
        // One silent client leaves: its slot goes to the waiting scrape.
        drop(silent.pop());
        let text = tokio::time::timeout(Duration::from_secs(5), scrape)
            .await
            .expect("answered once a slot is free")
            .unwrap();
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .expect("serve returns on shutdown")
            .unwrap();
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
        let url = format!("http://{addr}/metrics");
        let r = crate::http::request("GET", &url, None, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(r.status, 200);
        assert!(r.body.ends_with("x 1\n"), "{}", r.body);

        // The same port again: logged, not fatal.
        assert!(start("test", addr, render(), shutdown.clone())
            .await
            .is_none());
        shutdown.cancel();
    }
}
