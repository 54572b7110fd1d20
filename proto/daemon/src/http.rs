//! The HTTP client of both daemons, on hyper (HTTP/1.1) with rustls for `https://`: deploy
//! health probes on the agent, and the controller's end-to-end checks and webhook POSTs. One
//! request per connection (`Connection: close`), so no pool and no keep-alive; a whole
//! exchange (connect, TLS handshake, request, answer) runs under one timeout, and bodies are
//! cut at [`MAX_BODY`].
//!
//! `https://` servers are checked against the system's trusted roots ([`crate::tls::system_roots`],
//! loaded on the first https request) unless the caller passes its own config
//! ([`request_with`], [`https_config`]).

use std::io;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;

use crate::tls::TlsError;

/// The most body bytes kept; the rest is not read (the connection is closed anyway).
pub const MAX_BODY: usize = 1024 * 1024;
/// The most bytes a response head (status line and headers) may take.
const MAX_HEAD: usize = 64 * 1024;

/// What a server answered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpResponse {
    /// The status code (the final one; `100 Continue` and friends are skipped).
    pub status: u16,
    /// The body as text (invalid UTF-8 replaced), at most [`MAX_BODY`] bytes of it.
    pub body: String,
}

/// Why a request got no usable answer; every variant names the URL.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// The URL is not one this client can use.
    #[error("{url}: {reason}")]
    InvalidUrl {
        /// The URL as given.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The TCP connection could not be made.
    #[error("{url}: cannot connect: {source}")]
    Connect {
        /// The URL as given.
        url: String,
        /// The socket error.
        #[source]
        source: io::Error,
    },
    /// No TLS session with an `https://` server: no trusted roots, an untrusted or
    /// mismatched certificate, no common protocol version.
    #[error("{url}: TLS: {reason}")]
    Tls {
        /// The URL as given.
        url: String,
        /// What failed, with its causes.
        reason: String,
    },
    /// Sending the request or reading the answer failed.
    #[error("{url}: {source}")]
    Io {
        /// The URL as given.
        url: String,
        /// The socket error.
        #[source]
        source: io::Error,
    },
    /// The server answered something that is not HTTP/1.x, or broke off its answer.
    #[error("{url}: malformed response: {reason}")]
    Malformed {
        /// The URL as given.
        url: String,
        /// What was wrong.
        reason: String,
    },
    /// No complete answer within the timeout.
    #[error("{url}: no complete answer within {}ms", after.as_millis())]
    Timeout {
        /// The URL as given.
        url: String,
        /// The timeout that ran out.
        after: Duration,
    },
}

/// Sends one request and reads the answer, all within `timeout`. `body` is the content type
/// and the bytes to send. `https://` servers must chain to the system's trusted roots.
pub async fn request(
    method: &str,
    url: &str,
    body: Option<(&str, &[u8])>,
    timeout: Duration,
) -> Result<HttpResponse, HttpError> {
    request_with(method, url, body, timeout, None).await
}

/// [`request`] with the TLS config for `https://` given (for example [`https_config`] with a
/// private CA); None means the system's trusted roots.
pub async fn request_with(
    method: &str,
    url: &str,
    body: Option<(&str, &[u8])>,
    timeout: Duration,
    tls: Option<Arc<rustls::ClientConfig>>,
) -> Result<HttpResponse, HttpError> {
    let target = Target::parse(url)?;
    let invalid = |reason: String| HttpError::InvalidUrl {
        url: url.to_string(),
        reason,
    };
    if method.is_empty() || !method.bytes().all(|b| b.is_ascii_uppercase()) {
        return Err(invalid(format!("unsupported method {method:?}")));
    }
    let request = build_request(method, &target, body).map_err(invalid)?;
    let tls = match (target.https, tls) {
        (false, _) => None,
        (true, Some(config)) => Some(config),
        (true, None) => Some(system_config().map_err(|reason| HttpError::Tls {
            url: url.to_string(),
            reason,
        })?),
    };
    match tokio::time::timeout(timeout, exchange(&target, request, tls)).await {
        Ok(Ok(response)) => Ok(response),
        Ok(Err(failure)) => Err(failure.for_url(url)),
        Err(_) => Err(HttpError::Timeout {
            url: url.to_string(),
            after: timeout,
        }),
    }
}

/// A client config for `https://` requests: the CA certificate(s) in `ca` (PEM) as the only
/// roots, or the system's trusted roots when None; TLS 1.2 or 1.3, ALPN `http/1.1`.
pub fn https_config(ca: Option<&std::path::Path>) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let roots = match ca {
        Some(path) => crate::tls::load_roots(path)?,
        None => crate::tls::system_roots()?,
    };
    let mut config = crate::tls::server_auth_config(roots)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The system-roots config, built once per process on the first `https://` request.
fn system_config() -> Result<Arc<rustls::ClientConfig>, String> {
    static CONFIG: OnceLock<Result<Arc<rustls::ClientConfig>, String>> = OnceLock::new();
    CONFIG
        .get_or_init(|| https_config(None).map_err(|e| e.to_string()))
        .clone()
}

fn build_request(
    method: &str,
    target: &Target,
    body: Option<(&str, &[u8])>,
) -> Result<http::Request<Full<Bytes>>, String> {
    let mut builder = http::Request::builder()
        .method(method)
        .uri(target.path.as_str())
        .header(http::header::HOST, target.host_header.as_str())
        .header(http::header::CONNECTION, "close")
        .header(
            http::header::USER_AGENT,
            concat!("sentinel/", env!("CARGO_PKG_VERSION")),
        )
        .header(http::header::ACCEPT, "*/*");
    let bytes = match body {
        Some((content_type, bytes)) => {
            if content_type.bytes().any(|b| b.is_ascii_control()) {
                return Err("content type contains control characters".to_string());
            }
            builder = builder
                .header(http::header::CONTENT_TYPE, content_type)
                .header(http::header::CONTENT_LENGTH, bytes.len());
            Bytes::copy_from_slice(bytes)
        }
        None => {
            if matches!(method, "POST" | "PUT" | "PATCH") {
                builder = builder.header(http::header::CONTENT_LENGTH, 0);
            }
            Bytes::new()
        }
    };
    builder.body(Full::new(bytes)).map_err(|e| e.to_string())
}

/// A parsed `http://` or `https://` URL.
#[derive(Debug, PartialEq, Eq)]
struct Target {
    /// `https://`: TLS on the connection.
    https: bool,
    /// Host as written, without brackets for IPv6 literals.
    host: String,
    port: u16,
    /// The `Host` header value (port only when not the scheme's default).
    host_header: String,
    /// Path and query, at least `/`.
    path: String,
}

impl Target {
    fn parse(url: &str) -> Result<Self, HttpError> {
        let invalid = |reason: &str| HttpError::InvalidUrl {
            url: url.to_string(),
            reason: reason.to_string(),
        };
        // Whitespace or control bytes would let a URL smuggle extra header lines.
        if url
            .bytes()
            .any(|b| b.is_ascii_control() || b == b' ' || !b.is_ascii())
        {
            return Err(invalid(
                "URL contains spaces, control or non-ASCII characters",
            ));
        }
        let scheme_end = url.find("://").unwrap_or(0);
        let (https, default_port) = match &url[..scheme_end] {
            s if s.eq_ignore_ascii_case("http") => (false, 80),
            s if s.eq_ignore_ascii_case("https") => (true, 443),
            _ => return Err(invalid("only http:// and https:// URLs are supported")),
        };
        let rest = &url[scheme_end + 3..];
        let rest = rest.split('#').next().unwrap_or_default();
        let (authority, path) = match rest.find(['/', '?']) {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        let path = if path.starts_with('?') {
            format!("/{path}")
        } else {
            path.to_string()
        };
        if authority.contains('@') {
            return Err(invalid("credentials in URLs are not supported"));
        }
        let (host, port_text) = if let Some(v6) = authority.strip_prefix('[') {
            let (host, after) = v6
                .split_once(']')
                .ok_or_else(|| invalid("unclosed [ in host"))?;
            let port = match after {
                "" => None,
                p => Some(
                    p.strip_prefix(':')
                        .ok_or_else(|| invalid("junk after ] in host"))?,
                ),
            };
            (host, port)
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (authority, None),
            }
        };
        if host.is_empty() {
            return Err(invalid("no host"));
        }
        let port = match port_text {
            None => default_port,
            Some(p) => p
                .parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| invalid("bad port"))?,
        };
        let host_part = if host.contains(':') {
            format!("[{host}]")
        } else {
            host.to_string()
        };
        let host_header = if port == default_port {
            host_part
        } else {
            format!("{host_part}:{port}")
        };
        Ok(Self {
            https,
            host: host.to_string(),
            port,
            host_header,
            path,
        })
    }
}

/// What went wrong inside the timeout, before the URL is attached.
enum Failure {
    Connect(io::Error),
    Tls(String),
    Io(io::Error),
    Malformed(String),
}

impl Failure {
    fn for_url(self, url: &str) -> HttpError {
        let url = url.to_string();
        match self {
            Failure::Connect(source) => HttpError::Connect { url, source },
            Failure::Tls(reason) => HttpError::Tls { url, reason },
            Failure::Io(source) => HttpError::Io { url, source },
            Failure::Malformed(reason) => HttpError::Malformed { url, reason },
        }
    }
}

impl From<hyper::Error> for Failure {
    fn from(e: hyper::Error) -> Self {
        let text = crate::error_chain(&e);
        if e.is_parse() || e.is_parse_status() || e.is_incomplete_message() {
            return Failure::Malformed(text);
        }
        // The socket error under hyper's, if there is one.
        let mut source = std::error::Error::source(&e);
        while let Some(s) = source {
            if let Some(io) = s.downcast_ref::<io::Error>() {
                // The server hung up before the length it announced: a broken answer.
                if io.kind() == io::ErrorKind::UnexpectedEof {
                    return Failure::Malformed(text);
                }
                return Failure::Io(io::Error::new(io.kind(), text));
            }
            source = s.source();
        }
        Failure::Io(io::Error::other(text))
    }
}

async fn exchange(
    target: &Target,
    request: http::Request<Full<Bytes>>,
    tls: Option<Arc<rustls::ClientConfig>>,
) -> Result<HttpResponse, Failure> {
    let tcp = TcpStream::connect((target.host.as_str(), target.port))
        .await
        .map_err(Failure::Connect)?;
    // Small requests: one write without Nagle delays.
    let _ = tcp.set_nodelay(true);
    let Some(config) = tls else {
        return send(TokioIo::new(tcp), request).await;
    };
    let name = ServerName::try_from(target.host.clone())
        .map_err(|e| Failure::Tls(format!("invalid server name {:?}: {e}", target.host)))?;
    let stream = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .map_err(|e| Failure::Tls(crate::error_chain(&e)))?;
    send(TokioIo::new(stream), request).await
}

/// Runs one HTTP/1.1 exchange on an open connection; the connection is driven in this task
/// (no spawn), so dropping the future at the timeout closes it.
async fn send<T>(io: T, request: http::Request<Full<Bytes>>) -> Result<HttpResponse, Failure>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::Builder::new()
        // `Host:` rather than `host:`, as every HTTP/1.1 client sends; some servers care.
        .title_case_headers(true)
        .max_buf_size(MAX_HEAD)
        .handshake(io)
        .await?;
    let head_only = request.method() == http::Method::HEAD;
    let answer = async move {
        let response = sender.send_request(request).await?;
        let status = response.status().as_u16();
        let mut body = response.into_body();
        let mut bytes = Vec::new();
        if !head_only {
            while bytes.len() < MAX_BODY {
                let Some(frame) = body.frame().await else {
                    break;
                };
                if let Ok(data) = frame?.into_data() {
                    let room = MAX_BODY - bytes.len();
                    bytes.extend_from_slice(&data[..data.len().min(room)]);
                }
            }
        }
        Ok::<_, Failure>(HttpResponse {
            status,
            body: String::from_utf8_lossy(&bytes).into_owned(),
        })
    };
    let mut answer = std::pin::pin!(answer);
    tokio::select! {
        r = &mut answer => r,
        // The connection ended (the server closed it, or an error): the answer is complete
        // or says what went wrong.
        _ = conn => answer.await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
    use tokio::net::TcpListener;

    /// Serves one connection: reads the request head, answers `response` raw, closes.
    async fn serve_once(response: Vec<u8>) -> (String, tokio::task::JoinHandle<String>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let task = tokio::spawn(async move {
            let (stream, _) = listener.accept().await.expect("accept");
            let mut reader = BufReader::new(stream);
            let mut request = String::new();
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).await.unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                request.push_str(&line);
            }
            if let Some(len) = request
                .lines()
                .find_map(|l| l.strip_prefix("Content-Length: "))
                .and_then(|v| v.trim().parse::<usize>().ok())
            {
                let mut body = vec![0; len];
                let _ = reader.read_exact(&mut body).await;
                request.push_str(&String::from_utf8_lossy(&body));
            }
            let _ = reader.get_mut().write_all(&response).await;
            let _ = reader.get_mut().shutdown().await;
            request
        });
        (format!("http://{addr}"), task)
    }

    const T: Duration = Duration::from_secs(5);

    #[tokio::test]
    async fn content_length_body_is_read_and_request_is_well_formed() {
        let (base, server) =
            serve_once(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello trailing".to_vec())
                .await;
        let r = request("GET", &format!("{base}/health?x=1"), None, T)
            .await
            .expect("request");
        assert_eq!(
            r,
            HttpResponse {
                status: 200,
                body: "hello".into()
            }
        );
        let req = server.await.expect("server");
        assert!(req.starts_with("GET /health?x=1 HTTP/1.1\r\n"), "{req}");
        assert!(req.contains(&format!("Host: {}\r\n", &base[7..])), "{req}");
        assert!(req.contains("Connection: close\r\n"), "{req}");
    }

    #[tokio::test]
    async fn chunked_body_is_decoded() {
        let (base, _server) = serve_once(
            b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n4;ext=1\r\nWiki\r\n6\r\npedia \r\n0\r\nX-Trailer: 1\r\n\r\n"
                .to_vec(),
        )
        .await;
        let r = request("GET", &base, None, T).await.expect("request");
        assert_eq!(r.status, 201);
        assert_eq!(r.body, "Wikipedia ");
    }

    #[tokio::test]
    async fn body_without_length_is_read_to_eof_and_interim_answers_skipped() {
        let (base, _server) = serve_once(
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.0 503 Service Unavailable\r\nX: y\r\n\r\nbusy"
                .to_vec(),
        )
        .await;
        let r = request("GET", &base, None, T).await.expect("request");
        assert_eq!(r.status, 503);
        assert_eq!(r.body, "busy");
    }

    #[tokio::test]
    async fn body_is_capped() {
        let mut response = b"HTTP/1.1 200 OK\r\n\r\n".to_vec();
        response.extend(std::iter::repeat_n(b'a', MAX_BODY + 10));
        let (base, _server) = serve_once(response).await;
        let r = request("GET", &base, None, T).await.expect("request");
        assert_eq!(r.body.len(), MAX_BODY);
    }

    #[tokio::test]
    async fn post_sends_body_with_type_and_length() {
        let (base, server) =
            serve_once(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n".to_vec()).await;
        let r = request(
            "POST",
            &format!("{base}/hook"),
            Some(("application/json", b"{\"a\":1}")),
            T,
        )
        .await
        .expect("request");
        assert_eq!(r.status, 204);
        let req = server.await.expect("server");
        assert!(req.starts_with("POST /hook HTTP/1.1\r\n"), "{req}");
        assert!(req.contains("Content-Type: application/json\r\n"), "{req}");
        assert!(req.contains("Content-Length: 7\r\n"), "{req}");
        assert!(req.ends_with("{\"a\":1}"), "{req}");
    }

    #[tokio::test]
    async fn errors_name_the_url() {
        // A listener that never answers: the timeout fires.
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}/slow", listener.local_addr().expect("addr"));
        let e = request("GET", &url, None, Duration::from_millis(200))
            .await
            .expect_err("timeout");
        assert!(matches!(e, HttpError::Timeout { .. }), "{e}");
        assert!(e.to_string().contains(&url), "{e}");
        drop(listener);

        let e = request("GET", &url, None, T).await.expect_err("refused");
        assert!(matches!(e, HttpError::Connect { .. }), "{e}");
        assert!(e.to_string().contains(&url), "{e}");

        let (base, _server) = serve_once(b"SSH-2.0-OpenSSH\r\n\r\n".to_vec()).await;
        let e = request("GET", &base, None, T).await.expect_err("malformed");
        assert!(matches!(e, HttpError::Malformed { .. }), "{e}");
        assert!(e.to_string().contains(&base), "{e}");
    }

    #[test]
    fn urls_are_parsed_strictly() {
        let t = Target::parse("http://Example.com").expect("plain");
        assert_eq!(
            t,
            Target {
                https: false,
                host: "Example.com".into(),
                port: 80,
                host_header: "Example.com".into(),
                path: "/".into()
            }
        );
        let t = Target::parse("http://[::1]:8080?q#frag").expect("v6");
        assert_eq!((t.host.as_str(), t.port), ("::1", 8080));
        assert_eq!(t.host_header, "[::1]:8080");
        assert_eq!(t.path, "/?q");
        let t = Target::parse("HTTPS://sentinel.example/hook").expect("https");
        assert!(t.https);
        assert_eq!((t.port, t.host_header.as_str()), (443, "sentinel.example"));
        let t = Target::parse("https://sentinel.example:8443").expect("https port");
        assert_eq!(t.host_header, "sentinel.example:8443");
        for bad in [
            "sentinel.example/hook",
            "https//x/",
            "http://",
            "http://x:0/",
            "http://x:99999/",
            "http://u:p@x/",
            "http://x/a b",
            "http://x/\r\nEvil: 1",
            "ftp://x",
        ] {
            let e = Target::parse(bad).expect_err(bad);
            assert!(
                e.to_string()
                    .starts_with(bad.split('\r').next().unwrap_or(bad)),
                "{e}"
            );
        }
    }

    /// A CA and a server certificate for `localhost` and 127.0.0.1 signed by it.
    fn test_ca() -> (String, rustls::ServerConfig) {
        let ca_key = rcgen::KeyPair::generate().expect("CA key");
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA");
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca_cert = ca_params.self_signed(&ca_key).expect("CA cert");
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let key = rcgen::KeyPair::generate().expect("key");
        let params = rcgen::CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()])
            .expect("params");
        let cert = params.signed_by(&key, &issuer).expect("cert");
        let config = rustls::ServerConfig::builder_with_provider(crate::tls::provider())
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_no_client_auth()
            .with_single_cert(
                vec![cert.der().clone()],
                rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).expect("key der"),
            )
            .expect("server config");
        (ca_cert.pem(), config)
    }

    /// Serves one TLS connection: reads the request head, answers `response`, closes.
    async fn serve_tls_once(config: rustls::ServerConfig, response: &'static [u8]) -> u16 {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.expect("accept");
            let Ok(tls) = acceptor.accept(tcp).await else {
                return;
            };
            let mut reader = BufReader::new(tls);
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).await.unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
            }
            let _ = reader.get_mut().write_all(response).await;
            let _ = reader.get_mut().shutdown().await;
        });
        port
    }

    #[tokio::test]
    async fn https_is_verified_against_the_configured_ca() {
        let (ca_pem, server) = test_ca();
        let dir = tempfile::tempdir().expect("dir");
        let ca_path = dir.path().join("ca.pem");
        std::fs::write(&ca_path, ca_pem).expect("write CA");
        let tls = https_config(Some(&ca_path)).expect("client config");
        let port = serve_tls_once(
            server,
            b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nsecure",
        )
        .await;
        let url = format!("https://localhost:{port}/health");
        let r = request_with("GET", &url, None, T, Some(tls))
            .await
            .expect("https request");
        assert_eq!(
            r,
            HttpResponse {
                status: 200,
                body: "secure".into()
            }
        );
    }

    #[tokio::test]
    async fn https_to_a_server_outside_the_trusted_roots_fails_naming_the_url() {
        let (_ca_pem, server) = test_ca();
        let (other_ca, _) = test_ca();
        let dir = tempfile::tempdir().expect("dir");
        let ca_path = dir.path().join("other.pem");
        std::fs::write(&ca_path, other_ca).expect("write CA");
        let tls = https_config(Some(&ca_path)).expect("client config");
        let port = serve_tls_once(server, b"HTTP/1.1 200 OK\r\n\r\n").await;
        let url = format!("https://127.0.0.1:{port}/");
        let e = request_with("GET", &url, None, T, Some(tls))
            .await
            .expect_err("untrusted");
        assert!(matches!(e, HttpError::Tls { .. }), "{e}");
        assert!(e.to_string().contains(&url), "{e}");
        assert!(e.to_string().contains("certificate"), "{e}");
    }

    #[tokio::test]
    async fn a_body_shorter_than_its_content_length_is_malformed() {
        let (base, _server) =
            serve_once(b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\nshort".to_vec()).await;
        let e = request("GET", &base, None, T)
            .await
            .expect_err("short body");
        assert!(matches!(e, HttpError::Malformed { .. }), "{e}");
    }

    #[tokio::test]
    async fn a_server_that_stalls_mid_body_hits_the_timeout() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}/", listener.local_addr().expect("addr"));
        let _server = tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.expect("accept");
            let mut buf = [0u8; 1024];
            let _ = stream.read(&mut buf).await;
            let _ = stream
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
                .await;
            tokio::time::sleep(Duration::from_secs(30)).await;
        });
        let e = request("GET", &url, None, Duration::from_millis(300))
            .await
            .expect_err("timeout");
        assert!(matches!(e, HttpError::Timeout { .. }), "{e}");
    }

    #[test]
    fn bad_methods_and_content_types_are_refused_before_connecting() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let e = rt
            .block_on(request("get", "http://127.0.0.1:9/", None, T))
            .expect_err("method");
        assert!(matches!(e, HttpError::InvalidUrl { .. }), "{e}");
        let e = rt
            .block_on(request(
                "POST",
                "http://127.0.0.1:9/",
                Some(("text/plain\r\nX: 1", b"")),
                T,
            ))
            .expect_err("content type");
        assert!(e.to_string().contains("control characters"), "{e}");
    }
}
