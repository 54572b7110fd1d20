//! A tower layer in front of every gRPC service that checks the caller's certificate identity
//! against the deny list and the path it calls, before any handler runs. Refusals are
//! PERMISSION_DENIED, logged with the peer, and a refused write is appended to the audit trail.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tower::{Layer, Service};
use tracing::warn;

use crate::audit::AuditLog;
use crate::identity::{self, PeerInfo, Requirement};
use crate::pki::scheme::Role;
use crate::revocation::{self, DenyList};

/// Adds [`Authz`] around a service.
#[derive(Clone)]
pub struct AuthzLayer {
    deny: Arc<DenyList>,
    audit: Arc<AuditLog>,
}

impl AuthzLayer {
    /// A layer refusing the identities on `deny` and recording refused writes in `audit`.
    pub fn new(deny: Arc<DenyList>, audit: Arc<AuditLog>) -> Self {
        Self { deny, audit }
    }
}

impl<S> Layer<S> for AuthzLayer {
    type Service = Authz<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Authz {
            inner,
            deny: self.deny.clone(),
            audit: self.audit.clone(),
        }
    }
}

/// The authorising service.
#[derive(Clone)]
pub struct Authz<S> {
    inner: S,
    deny: Arc<DenyList>,
    audit: Arc<AuditLog>,
}

type BoxFuture<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send>>;

impl<S, B, R> Service<http::Request<B>> for Authz<S>
where
    S: Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
    R: Default + Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<R>;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let path = req.uri().path().to_string();
        let verdict = match req.extensions().get::<PeerInfo>() {
            // Every connection passes through our TLS acceptor, which always attaches this;
            // its absence means a misconfigured server, so fail closed.
            None => Err("no authenticated peer on this connection".to_string()),
            // A revoked certificate gets no call at all, health and reflection included.
            Some(peer) => {
                let addr = peer.addr.map(|a| a.to_string()).unwrap_or_default();
                match self.deny.refusal(&peer.identity) {
                    Some(entry) => {
                        warn!(peer = %addr, identity = %peer.identity, path = %path, reason = %entry.reason, "call of a revoked certificate refused");
                        Err(revocation::refusal_message(&entry))
                    }
                    None => identity::authorize(&peer.identity, &path).inspect_err(|_| {
                        warn!(peer = %addr, identity = %peer.identity, path = %path, "call refused");
                    }),
                }
            }
        };
        match verdict {
            Ok(()) => Box::pin(self.inner.call(req)),
            Err(reason) => {
                let status = tonic::Status::permission_denied(reason);
                let audit = match req.extensions().get::<PeerInfo>() {
                    Some(peer) if is_write(&path) => Some((self.audit.clone(), peer.clone())),
                    _ => None,
                };
                Box::pin(async move {
                    if let Some((log, peer)) = audit {
                        let method = path.rsplit('/').next().unwrap_or_default().to_string();
                        let refused: Result<&(), &tonic::Status> = Err(&status);
                        log.record(&peer, &method, format!("call {path}"), refused, |_| {
                            String::new()
                        })
                        .await;
                    }
                    Ok(status.into_http())
                })
            }
        }
    }
}

/// Whether `path` is an operator call that changes something (it needs more than viewer).
fn is_write(path: &str) -> bool {
    matches!(identity::requirement(path), Requirement::Operator(role) if role > Role::Viewer)
}
