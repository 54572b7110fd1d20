//! The agent channel's gRPC server: the generated `AgentServiceServer` with one difference, the
//! codec's buffer sizes.
//!
//! tonic allocates an 8 KiB decode buffer and an 8 KiB encode buffer for every call and keeps
//! them for the call's life. An agent's `Connect` call lives as long as its connection, so at
//! 10,000 agents these buffers are a large part of the controller's memory. Worse, the decode
//! buffer grows to 32 KiB on the first full report of 8 to 16 KiB (tonic reserves room for a
//! message that is already buffered). Starting both at 1 KiB keeps heartbeats and deltas in
//! place, and the decode buffer ends near twice the largest report instead of 32 KiB.
//! The generated server offers no way to choose the codec, so this is that server with
//! [`AgentCodec`]; the operator API keeps the generated one.

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::future::BoxFuture;
use http::{Request, Response};
use sentinel_proto::v1::agent_service_server::AgentService;
use sentinel_proto::v1::{AgentMessage, ControllerMessage};
use tonic::body::Body;
use tonic::codec::{BufferSettings, Codec};
use tonic::server::{Grpc, NamedService, StreamingService};
use tonic::Status;
use tonic_prost::{ProstDecoder, ProstEncoder};

/// Initial size of the per-call encode and decode buffers: a heartbeat or a system-only delta
/// (about 250 bytes) fits; larger messages grow the buffer as needed.
const CALL_BUFFER: usize = 1024;
/// tonic's default: how much an encoder buffers before it yields to the runtime.
const YIELD_THRESHOLD: usize = 32 * 1024;

/// The protobuf codec of the agent channel, with small starting buffers.
#[derive(Debug, Clone, Copy, Default)]
pub struct AgentCodec;

impl Codec for AgentCodec {
    type Encode = ControllerMessage;
    type Decode = AgentMessage;
    type Encoder = ProstEncoder<ControllerMessage>;
    type Decoder = ProstDecoder<AgentMessage>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::new(BufferSettings::new(CALL_BUFFER, YIELD_THRESHOLD))
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstDecoder::new(BufferSettings::new(CALL_BUFFER, YIELD_THRESHOLD))
    }
}

/// `sentinel.v1.AgentService` served with [`AgentCodec`].
pub struct AgentServer<T> {
    inner: Arc<T>,
}

impl<T> AgentServer<T> {
    /// Serves `inner`.
    pub fn new(inner: T) -> Self {
        Self {
            inner: Arc::new(inner),
        }
    }
}

impl<T> Clone for AgentServer<T> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }
}

impl<T> NamedService for AgentServer<T> {
    const NAME: &'static str = sentinel_proto::v1::agent_service_server::SERVICE_NAME;
}

/// The `Connect` method as tonic's streaming handler.
struct ConnectSvc<T>(Arc<T>);

impl<T: AgentService> StreamingService<AgentMessage> for ConnectSvc<T> {
    type Response = ControllerMessage;
    type ResponseStream = T::ConnectStream;
    type Future = BoxFuture<'static, Result<tonic::Response<Self::ResponseStream>, Status>>;

    fn call(&mut self, request: tonic::Request<tonic::Streaming<AgentMessage>>) -> Self::Future {
        let inner = self.0.clone();
        Box::pin(async move { inner.connect(request).await })
    }
}

impl<T, B> tower::Service<Request<B>> for AgentServer<T>
where
    T: AgentService,
    B: http_body::Body + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>> + Send + 'static,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let inner = self.inner.clone();
        if req.uri().path() == "/sentinel.v1.AgentService/Connect" {
            Box::pin(async move {
                let mut grpc = Grpc::new(AgentCodec);
                Ok(grpc.streaming(ConnectSvc(inner), req).await)
            })
        } else {
            Box::pin(async move { Ok(Status::unimplemented("no such method").into_http()) })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::codec::{Decoder, Encoder};

    #[test]
    fn the_codec_starts_with_small_buffers_and_keeps_the_service_name() {
        let mut codec = AgentCodec;
        // BufferSettings' fields are private; its Debug shows them.
        let small = format!("buffer_size: {CALL_BUFFER},");
        let encoder = format!("{:?}", codec.encoder().buffer_settings());
        let decoder = format!("{:?}", codec.decoder().buffer_settings());
        assert!(encoder.contains(&small), "{encoder}");
        assert!(decoder.contains(&small), "{decoder}");
        assert_eq!(
            <AgentServer<()> as NamedService>::NAME,
            "sentinel.v1.AgentService"
        );
    }
}
