//! The gRPC services the controller serves: the agent channel and the operator API.

pub mod agent;
pub mod agent_server;
pub mod fleet;
pub mod revoke;

use tonic::{Request, Status};

use crate::identity::{Identity, PeerInfo};

/// The authenticated peer of a request. The authz layer has already checked it may make this
/// call; handlers use it to know *who* (host name, operator name).
pub fn peer<T>(request: &Request<T>) -> Result<PeerInfo, Status> {
    request
        .extensions()
        .get::<PeerInfo>()
        .cloned()
        .ok_or_else(|| Status::unauthenticated("no authenticated peer on this connection"))
}

/// The operator's name for audit fields, or an error if the peer is not an operator.
pub fn operator_name<T>(request: &Request<T>) -> Result<String, Status> {
    match peer(request)?.identity {
        Identity::Operator { name, .. } => Ok(name),
        other => Err(Status::permission_denied(format!(
            "{other} is not an operator"
        ))),
    }
}
