//! A minimal HTTP/1.1 client for `http://` URLs: deploy health probes on the agent, and the
//! controller's end-to-end checks and webhook POSTs. One request per connection
//! (`Connection: close`), so no pooling, no keep-alive and no TLS; a whole exchange runs under
//! one timeout.

use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// The most body bytes kept; the rest is not read (the connection is closed anyway).
pub const MAX_BODY: usize = 1024 * 1024;
/// The most bytes a response head (status line and headers) may take.
const MAX_HEAD: usize = 64 * 1024;
/// The longest chunk-size line of a chunked body we accept (hex digits plus extensions).
const MAX_CHUNK_LINE: usize = 1024;

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
        source: std::io::Error,
    },
    /// Sending the request or reading the answer failed.
    #[error("{url}: {source}")]
    Io {
        /// The URL as given.
        url: String,
        /// The socket error.
        #[source]
        source: std::io::Error,
    },
    /// The server answered something that is not HTTP/1.x.
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
/// and the bytes to send. Handles `Content-Length`, chunked and read-to-EOF bodies; bodies
/// beyond [`MAX_BODY`] are cut there.
pub async fn request(
    method: &str,
    url: &str,
    body: Option<(&str, &[u8])>,
    timeout: Duration,
) -> Result<HttpResponse, HttpError> {
    let target = Target::parse(url)?;
    if method.is_empty() || !method.bytes().all(|b| b.is_ascii_uppercase()) {
        return Err(HttpError::InvalidUrl {
            url: url.to_string(),
            reason: format!("unsupported method {method:?}"),
        });
    }
    if let Some((content_type, _)) = body {
        if content_type.bytes().any(|b| b.is_ascii_control()) {
            return Err(HttpError::InvalidUrl {
                url: url.to_string(),
                reason: "content type contains control characters".to_string(),
            });
        }
    }
    match tokio::time::timeout(timeout, exchange(method, &target, body)).await {
        Ok(Ok(response)) => Ok(response),
        Ok(Err(Failure::Connect(source))) => Err(HttpError::Connect {
            url: url.to_string(),
            source,
        }),
        Ok(Err(Failure::Io(source))) => Err(HttpError::Io {
            url: url.to_string(),
            source,
        }),
        Ok(Err(Failure::Malformed(reason))) => Err(HttpError::Malformed {
            url: url.to_string(),
            reason,
        }),
        Err(_) => Err(HttpError::Timeout {
            url: url.to_string(),
            after: timeout,
        }),
    }
}

/// A parsed `http://` URL.
#[derive(Debug, PartialEq, Eq)]
struct Target {
    /// Host as written, without brackets for IPv6 literals.
    host: String,
    port: u16,
    /// The `Host` header value (port only when not 80).
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
        let rest = match url.get(..7) {
            Some(scheme) if scheme.eq_ignore_ascii_case("http://") => &url[7..],
            _ => return Err(invalid("only http:// URLs are supported")),
        };
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
            None => 80,
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
        let host_header = if port == 80 {
            host_part
        } else {
            format!("{host_part}:{port}")
        };
        Ok(Self {
            host: host.to_string(),
            port,
            host_header,
            path,
        })
    }
}

/// What went wrong inside the timeout, before the URL is attached.
enum Failure {
    Connect(std::io::Error),
    Io(std::io::Error),
    Malformed(String),
}

impl From<std::io::Error> for Failure {
    fn from(e: std::io::Error) -> Self {
        Failure::Io(e)
    }
}

async fn exchange(
    method: &str,
    target: &Target,
    body: Option<(&str, &[u8])>,
) -> Result<HttpResponse, Failure> {
    let stream = TcpStream::connect((target.host.as_str(), target.port))
        .await
        .map_err(Failure::Connect)?;
    // Small requests: one write without Nagle delays.
    let _ = stream.set_nodelay(true);
    let mut head = format!(
        "{method} {} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nUser-Agent: sentinel/{}\r\nAccept: */*\r\n",
        target.path,
        target.host_header,
        env!("CARGO_PKG_VERSION"),
    );
    match body {
        Some((content_type, bytes)) => {
            head.push_str(&format!(
                "Content-Type: {content_type}\r\nContent-Length: {}\r\n",
                bytes.len()
            ));
        }
        None if matches!(method, "POST" | "PUT" | "PATCH") => {
            head.push_str("Content-Length: 0\r\n");
        }
        None => {}
    }
    head.push_str("\r\n");
    let mut request = head.into_bytes();
    if let Some((_, bytes)) = body {
        request.extend_from_slice(bytes);
    }
    let mut reader = BufReader::new(stream);
    reader.get_mut().write_all(&request).await?;
    reader.get_mut().flush().await?;

    let head = loop {
        let head = read_head(&mut reader).await?;
        // Interim answers (100 Continue, 103 Early Hints) precede the real one.
        if !(100..200).contains(&head.status) || head.status == 101 {
            break head;
        }
    };
    let no_body = method == "HEAD" || matches!(head.status, 100..=199 | 204 | 304);
    let bytes = if no_body {
        Vec::new()
    } else if head.chunked {
        read_chunked(&mut reader).await?
    } else if let Some(length) = head.content_length {
        let wanted = length.min(MAX_BODY as u64);
        let mut buf = Vec::new();
        (&mut reader).take(wanted).read_to_end(&mut buf).await?;
        if (buf.len() as u64) < wanted {
            return Err(Failure::Malformed(format!(
                "body ended after {} of {length} bytes",
                buf.len()
            )));
        }
        buf
    } else {
        let mut buf = Vec::new();
        (&mut reader)
            .take(MAX_BODY as u64)
            .read_to_end(&mut buf)
            .await?;
        buf
    };
    Ok(HttpResponse {
        status: head.status,
        body: String::from_utf8_lossy(&bytes).into_owned(),
    })
}

struct Head {
    status: u16,
    content_length: Option<u64>,
    chunked: bool,
}

/// Reads one line (without its CRLF), failing when it exceeds `limit` bytes or the stream ends.
async fn read_line<R: AsyncRead + Unpin>(
    reader: &mut BufReader<R>,
    limit: usize,
    what: &str,
) -> Result<String, Failure> {
    let mut line = Vec::new();
    let n = (&mut *reader)
        .take(limit as u64 + 1)
        .read_until(b'\n', &mut line)
        .await?;
    if n == 0 {
        return Err(Failure::Malformed(format!(
            "connection closed before the {what}"
        )));
    }
    if line.last() != Some(&b'\n') {
        return Err(Failure::Malformed(if line.len() > limit {
            format!("{what} longer than {limit} bytes")
        } else {
            format!("connection closed in the middle of the {what}")
        }));
    }
    line.pop();
    if line.last() == Some(&b'\r') {
        line.pop();
    }
    Ok(String::from_utf8_lossy(&line).into_owned())
}

async fn read_head<R: AsyncRead + Unpin>(reader: &mut BufReader<R>) -> Result<Head, Failure> {
    let mut budget = MAX_HEAD;
    let status_line = read_line(reader, budget, "status line").await?;
    budget = budget.saturating_sub(status_line.len() + 2);
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    let code = parts.next().unwrap_or_default();
    if !version.starts_with("HTTP/1.") {
        return Err(Failure::Malformed(format!(
            "not an HTTP/1.x status line: {:?}",
            truncate(&status_line, 80)
        )));
    }
    let status = code
        .parse::<u16>()
        .ok()
        .filter(|s| (100..1000).contains(s))
        .ok_or_else(|| Failure::Malformed(format!("bad status code {code:?}")))?;
    let mut head = Head {
        status,
        content_length: None,
        chunked: false,
    };
    loop {
        if budget == 0 {
            return Err(Failure::Malformed(format!(
                "headers longer than {MAX_HEAD} bytes"
            )));
        }
        let line = read_line(reader, budget, "headers").await?;
        budget = budget.saturating_sub(line.len() + 2);
        if line.is_empty() {
            return Ok(head);
        }
        let Some((name, value)) = line.split_once(':') else {
            return Err(Failure::Malformed(format!(
                "header line without a colon: {:?}",
                truncate(&line, 80)
            )));
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            let length = value
                .parse::<u64>()
                .map_err(|_| Failure::Malformed(format!("bad Content-Length {value:?}")))?;
            head.content_length = Some(length);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            head.chunked = value
                .rsplit(',')
                .next()
                .is_some_and(|last| last.trim().eq_ignore_ascii_case("chunked"));
        }
    }
}

/// Reads a chunked body, keeping at most [`MAX_BODY`] bytes; stops at the last chunk (the
/// trailers are not needed: the connection closes after this answer).
async fn read_chunked<R: AsyncRead + Unpin>(reader: &mut BufReader<R>) -> Result<Vec<u8>, Failure> {
    let mut body = Vec::new();
    loop {
        let line = read_line(reader, MAX_CHUNK_LINE, "chunk size").await?;
        let size_text = line.split(';').next().unwrap_or_default().trim();
        let size = u64::from_str_radix(size_text, 16)
            .map_err(|_| Failure::Malformed(format!("bad chunk size {size_text:?}")))?;
        if size == 0 {
            return Ok(body);
        }
        let room = (MAX_BODY - body.len()) as u64;
        if room == 0 {
            return Ok(body);
        }
        let wanted = size.min(room);
        let before = body.len();
        (&mut *reader).take(wanted).read_to_end(&mut body).await?;
        if ((body.len() - before) as u64) < wanted {
            return Err(Failure::Malformed(
                "connection closed in the middle of a chunk".to_string(),
            ));
        }
        if wanted < size {
            // The cap was reached inside this chunk; the rest is not needed.
            return Ok(body);
        }
        read_line(reader, 2, "chunk end").await?;
    }
}

fn truncate(text: &str, max: usize) -> &str {
    match text.char_indices().nth(max) {
        Some((i, _)) => &text[..i],
        None => text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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
        assert!(e.to_string().contains("not an HTTP/1.x status line"), "{e}");
    }

    #[test]
    fn urls_are_parsed_strictly() {
        let t = Target::parse("http://Example.com").expect("plain");
        assert_eq!(
            t,
            Target {
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
        for bad in [
            "https://x/",
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
}
