//! A tower layer around the gRPC server that counts every call by method and status code and
//! times it to its response headers. It sits outside the authz layer, so refused calls count
//! too. The status code comes from the response headers (a trailers-only answer, how tonic
//! sends an error) or else from the trailers at the end of the body, so a stream that fails
//! after it opened is counted with its real code; a body dropped before its end (the client
//! went away) counts as CANCELLED.

use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::OnceLock;
use std::task::{Context, Poll};
use std::time::Instant;

use http_body::{Body, Frame, SizeHint};
use tower::{Layer, Service};

/// Adds [`GrpcMetrics`] around a service.
#[derive(Debug, Clone, Copy, Default)]
pub struct GrpcMetricsLayer;

impl<S> Layer<S> for GrpcMetricsLayer {
    type Service = GrpcMetrics<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GrpcMetrics { inner }
    }
}

/// The counting service.
#[derive(Debug, Clone)]
pub struct GrpcMetrics<S> {
    inner: S,
}

type BoxFuture<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send>>;

impl<S, B, R> Service<http::Request<B>> for GrpcMetrics<S>
where
    S: Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    R: Body + Unpin + Send + 'static,
{
    type Response = http::Response<CountedBody<R>>;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let method = method_label(req.uri().path());
        let started = Instant::now();
        let response = self.inner.call(req);
        Box::pin(async move {
            let response = match response.await {
                Ok(r) => r,
                Err(e) => {
                    record(&method, "UNKNOWN");
                    return Err(e);
                }
            };
            super::get()
                .grpc_duration
                .observe(&[&method], started.elapsed().as_secs_f64());
            let header_code = response.headers().get("grpc-status").map(code_name);
            let (parts, body) = response.into_parts();
            let mut body = CountedBody {
                inner: body,
                method,
                recorded: false,
            };
            if let Some(code) = header_code {
                body.record(code);
            }
            Ok(http::Response::from_parts(parts, body))
        })
    }
}

/// A response body that records its call's status code when the trailers pass by.
#[derive(Debug)]
pub struct CountedBody<B> {
    inner: B,
    method: String,
    recorded: bool,
}

impl<B> CountedBody<B> {
    fn record(&mut self, code: &str) {
        if !self.recorded {
            self.recorded = true;
            record(&self.method, code);
        }
    }
}

impl<B: Body + Unpin> Body for CountedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(trailers) = frame.trailers_ref() {
                    let code = trailers.get("grpc-status").map_or("UNKNOWN", code_name);
                    this.record(code);
                }
            }
            Poll::Ready(Some(Err(_))) => this.record("UNKNOWN"),
            // Ended without trailers: not a well-formed gRPC answer.
            Poll::Ready(None) => this.record("UNKNOWN"),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl<B> Drop for CountedBody<B> {
    fn drop(&mut self) {
        self.record("CANCELLED");
    }
}

fn record(method: &str, code: &str) {
    super::get().grpc_requests.inc(&[method, code]);
}

/// The method label: the request path without its leading slash
/// (`sentinel.v1.FleetService/ListHosts`) for the methods the controller serves, `other` for
/// any other path. A peer can send any path: junk must neither grow the metrics nor crowd
/// the real methods out of their labels.
fn method_label(path: &str) -> String {
    let name = path.strip_prefix('/').unwrap_or(path);
    if served_methods().contains(name) {
        name.to_string()
    } else {
        "other".into()
    }
}

/// Every method the controller serves (`package.Service/Method`), read from the descriptor
/// sets of the services it serves and reflects.
fn served_methods() -> &'static HashSet<String> {
    static METHODS: OnceLock<HashSet<String>> = OnceLock::new();
    METHODS.get_or_init(|| {
        use prost::Message;
        let sets = [
            sentinel_proto::FILE_DESCRIPTOR_SET,
            tonic_health::pb::FILE_DESCRIPTOR_SET,
            tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
            tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
        ];
        let mut methods = HashSet::new();
        for set in sets {
            // Built into the binary: a set that does not decode is a build error, and then
            // its methods count as `other` rather than stopping the controller.
            let Ok(set) = prost_types::FileDescriptorSet::decode(set) else {
                continue;
            };
            for file in &set.file {
                for service in &file.service {
                    for method in &service.method {
                        methods.insert(format!(
                            "{}.{}/{}",
                            file.package(),
                            service.name(),
                            method.name()
                        ));
                    }
                }
            }
        }
        methods
    })
}

/// The canonical name of a `grpc-status` value, as grpcurl prints it (`NOT_FOUND`).
fn code_name(value: &http::HeaderValue) -> &'static str {
    const NAMES: [&str; 17] = [
        "OK",
        "CANCELLED",
        "UNKNOWN",
        "INVALID_ARGUMENT",
        "DEADLINE_EXCEEDED",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "PERMISSION_DENIED",
        "RESOURCE_EXHAUSTED",
        "FAILED_PRECONDITION",
        "ABORTED",
        "OUT_OF_RANGE",
        "UNIMPLEMENTED",
        "INTERNAL",
        "UNAVAILABLE",
        "DATA_LOSS",
        "UNAUTHENTICATED",
    ];
    value
        .to_str()
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .and_then(|n| NAMES.get(n).copied())
        .unwrap_or("UNKNOWN")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_codes_get_their_canonical_names() {
        assert_eq!(code_name(&http::HeaderValue::from_static("0")), "OK");
        assert_eq!(
            code_name(&http::HeaderValue::from_static("7")),
            "PERMISSION_DENIED"
        );
        assert_eq!(code_name(&http::HeaderValue::from_static("99")), "UNKNOWN");
        assert_eq!(code_name(&http::HeaderValue::from_static("x")), "UNKNOWN");
    }

    #[test]
    fn method_labels_are_bounded() {
        assert_eq!(
            method_label("/sentinel.v1.FleetService/ListHosts"),
            "sentinel.v1.FleetService/ListHosts"
        );
        assert_eq!(method_label("/a/b/c"), "other");
        assert_eq!(method_label("/weird path/x"), "other");
        for i in 0..69 {
            let _ = method_label(&format!("/test.Flood/M{i}"));
        }
        assert_eq!(method_label("/test.Flood/Another"), "other");
        // Known ones keep their name.
        assert_eq!(
            method_label("/sentinel.v1.FleetService/ListHosts"),
            "sentinel.v1.FleetService/ListHosts"
        );
    }

    #[test]
    fn only_the_methods_the_services_define_get_a_label() {
        for path in [
            "/sentinel.v1.AgentService/Connect",
            "/sentinel.v1.FleetService/CancelJob",
            "/grpc.health.v1.Health/Check",
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
            "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        ] {
            assert_eq!(method_label(path), &path[1..]);
        }
        for junk in [
            "/sentinel.v1.FleetService/NoSuchMethod",
            "/sentinel.v1.FleetService/ListHosts/x",
            "/test.Flood/M1",
            "",
        ] {
            assert_eq!(method_label(junk), "other", "{junk}");
        }
    }
}
