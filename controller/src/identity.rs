//! Who a peer is, read from its verified client certificate, and what it may call. This is the
//! one place that decides "is this a host or an operator, which one, with which role".

use std::net::SocketAddr;

use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::pki::scheme::{self, Role, HOST_URI_PREFIX, OPERATOR_URI_PREFIX};

/// The identity a client certificate carries.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Identity {
    /// An agent, allowed to speak only as this host.
    Host(String),
    /// A person or script with a role.
    Operator {
        /// The operator's name.
        name: String,
        /// What it may do.
        role: Role,
    },
    /// A client without a certificate: it may only enrol (with a join token).
    Unauthenticated,
}

impl std::fmt::Display for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Identity::Host(name) => write!(f, "host {name}"),
            Identity::Operator { name, role } => write!(f, "operator {name} ({role})"),
            Identity::Unauthenticated => f.write_str("a client without a certificate"),
        }
    }
}

/// The connection facts every request carries in its extensions.
#[derive(Debug, Clone)]
pub struct PeerInfo {
    /// The remote address.
    pub addr: Option<SocketAddr>,
    /// Who the certificate says the peer is.
    pub identity: Identity,
    /// The certificate's validity (not before, not after), for `GetHost` and the metrics.
    pub validity: Option<(std::time::SystemTime, std::time::SystemTime)>,
}

/// A DER certificate's validity period (not before, not after); `None` if it cannot be parsed.
pub fn validity(der: &[u8]) -> Option<(std::time::SystemTime, std::time::SystemTime)> {
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    let at = |t: x509_parser::time::ASN1Time| {
        let secs = u64::try_from(t.timestamp()).unwrap_or(0);
        std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs)
    };
    Some((
        at(cert.validity().not_before),
        at(cert.validity().not_after),
    ))
}

/// Why a certificate (already verified against the fleet CA) carries no usable identity.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdentityError {
    /// The DER could not be parsed.
    #[error("unparsable client certificate: {0}")]
    Parse(String),
    /// No `sentinel://` URI SAN.
    #[error("client certificate {subject:?} has no sentinel:// identity")]
    Missing {
        /// The certificate's subject, for the log.
        subject: String,
    },
    /// More than one identity: ambiguous, so refused.
    #[error("client certificate {subject:?} carries {count} sentinel:// identities")]
    Ambiguous {
        /// The certificate's subject.
        subject: String,
        /// How many.
        count: usize,
    },
    /// A sentinel URI that does not follow the scheme.
    #[error("malformed identity {uri:?}: {reason}")]
    Malformed {
        /// The URI.
        uri: String,
        /// What is wrong.
        reason: String,
    },
}

/// Reads the identity from a DER certificate's `sentinel://` URI SAN.
pub fn from_certificate(der: &[u8]) -> Result<Identity, IdentityError> {
    let (_, cert) =
        X509Certificate::from_der(der).map_err(|e| IdentityError::Parse(e.to_string()))?;
    let subject = cert.subject().to_string();
    let mut uris = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            if let GeneralName::URI(uri) = name {
                if uri.starts_with("sentinel://") {
                    uris.push(uri.to_string());
                }
            }
        }
    }
    match uris.len() {
        0 => Err(IdentityError::Missing { subject }),
        1 => parse_uri(&uris[0]),
        count => Err(IdentityError::Ambiguous { subject, count }),
    }
}

/// Parses `sentinel://host/NAME` or `sentinel://operator/ROLE/NAME`.
pub fn parse_uri(uri: &str) -> Result<Identity, IdentityError> {
    let malformed = |reason: String| IdentityError::Malformed {
        uri: uri.to_string(),
        reason,
    };
    if let Some(name) = uri.strip_prefix(HOST_URI_PREFIX) {
        scheme::validate_name(name).map_err(|e| malformed(e.to_string()))?;
        return Ok(Identity::Host(name.to_string()));
    }
    if let Some(rest) = uri.strip_prefix(OPERATOR_URI_PREFIX) {
        let (role, name) = rest
            .split_once('/')
            .ok_or_else(|| malformed("expected operator/ROLE/NAME".into()))?;
        let role: Role = role.parse().map_err(|e| malformed(format!("{e}")))?;
        scheme::validate_name(name).map_err(|e| malformed(e.to_string()))?;
        return Ok(Identity::Operator {
            name: name.to_string(),
            role,
        });
    }
    Err(malformed("unknown kind (expected host or operator)".into()))
}

/// What a request path needs from the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Requirement {
    /// The agent channel: a host certificate.
    Host,
    /// An operator call needing at least this role.
    Operator(Role),
    /// Health and reflection: any fleet certificate.
    AnyPeer,
    /// Enrolment: anyone, certificate or not (the join token authenticates the call).
    Anyone,
}

/// The requirement of a gRPC path (`/package.Service/Method`). Unknown paths of our services
/// need admin, so a method added later is closed until someone decides otherwise.
pub fn requirement(path: &str) -> Requirement {
    let path = path.trim_start_matches('/');
    let (service, method) = path.split_once('/').unwrap_or((path, ""));
    match service {
        sentinel_proto::services::AGENT => Requirement::Host,
        sentinel_proto::services::FLEET => Requirement::Operator(fleet_method_role(method)),
        sentinel_proto::services::ENROLL if method == "Enroll" => Requirement::Anyone,
        sentinel_proto::services::ENROLL => Requirement::Operator(Role::Admin),
        _ => Requirement::AnyPeer,
    }
}

fn fleet_method_role(method: &str) -> Role {
    match method {
        "ListHosts" | "GetHost" | "ListJobs" | "GetJob" | "GetDeploy" | "ListDeploys"
        | "WatchDeploy" | "GetIsolationReport" | "ListBackups" | "ListAudit" | "ListLocks" => {
            Role::Viewer
        }
        "SubmitDeploy" | "CancelDeploy" | "Rollback" | "RunIsolationCheck" | "RunBackup"
        | "VerifyBackups" | "RunRestoreTest" | "LockApp" | "UnlockApp" => Role::Deployer,
        _ => Role::Admin,
    }
}

/// Decides whether `identity` may call `path`; the error is the reason, for the caller and
/// the log.
pub fn authorize(identity: &Identity, path: &str) -> Result<(), String> {
    match (requirement(path), identity) {
        (Requirement::Anyone, _) => Ok(()),
        // Without a certificate only enrolment is open: every other call, health and
        // reflection included, needs a fleet certificate.
        (_, Identity::Unauthenticated) => Err(format!(
            "{path} needs a fleet client certificate (without one, only              sentinel.v1.EnrollService/Enroll may be called)"
        )),
        (Requirement::AnyPeer, _) => Ok(()),
        (Requirement::Host, Identity::Host(_)) => Ok(()),
        (Requirement::Host, Identity::Operator { .. }) => Err(format!(
            "{identity} may not call {path}: the agent channel takes host certificates only"
        )),
        (Requirement::Operator(_), Identity::Host(_)) => Err(format!(
            "{identity} may not call {path}: the operator API takes operator certificates only"
        )),
        (Requirement::Operator(needed), Identity::Operator { role, .. }) => {
            if *role >= needed {
                Ok(())
            } else {
                Err(format!(
                    "{identity} may not call {path}: it needs role {needed}"
                ))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(role: Role) -> Identity {
        Identity::Operator {
            name: "alice".into(),
            role,
        }
    }

    #[test]
    fn uris_parse_into_identities() {
        assert_eq!(
            parse_uri("sentinel://host/hub-alfa").unwrap(),
            Identity::Host("hub-alfa".into())
        );
        assert_eq!(
            parse_uri("sentinel://operator/deployer/alice").unwrap(),
            op(Role::Deployer)
        );
        assert!(parse_uri("sentinel://host/../etc").is_err());
        assert!(parse_uri("sentinel://operator/root/alice").is_err());
        assert!(parse_uri("sentinel://operator/alice").is_err());
        assert!(parse_uri("sentinel://router/x").is_err());
    }

    #[test]
    fn hosts_only_reach_the_agent_channel() {
        let host = Identity::Host("argus".into());
        assert!(authorize(&host, "/sentinel.v1.AgentService/Connect").is_ok());
        assert!(authorize(&host, "/sentinel.v1.FleetService/ListHosts").is_err());
        assert!(authorize(&host, "/grpc.health.v1.Health/Check").is_ok());
    }

    #[test]
    fn a_client_without_a_certificate_may_only_enrol() {
        let anon = Identity::Unauthenticated;
        assert!(authorize(&anon, "/sentinel.v1.EnrollService/Enroll").is_ok());
        for path in [
            "/sentinel.v1.EnrollService/Other",
            "/sentinel.v1.AgentService/Connect",
            "/sentinel.v1.FleetService/ListHosts",
            "/sentinel.v1.FleetService/CreateJoinToken",
            "/grpc.health.v1.Health/Check",
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
            "/something.Else/Call",
        ] {
            assert!(
                authorize(&anon, path).is_err(),
                "{path} open without a certificate"
            );
        }
        assert!(authorize(&op(Role::Viewer), "/sentinel.v1.EnrollService/Enroll").is_ok());
        assert!(authorize(
            &op(Role::Deployer),
            "/sentinel.v1.FleetService/CreateJoinToken"
        )
        .is_err());
        assert!(authorize(
            &op(Role::Admin),
            "/sentinel.v1.FleetService/CreateJoinToken"
        )
        .is_ok());
    }

    #[test]
    fn operator_roles_are_enforced_per_method() {
        let path = "/sentinel.v1.FleetService/";
        assert!(authorize(&op(Role::Viewer), "/sentinel.v1.AgentService/Connect").is_err());
        assert!(authorize(&op(Role::Viewer), &format!("{path}GetHost")).is_ok());
        assert!(authorize(&op(Role::Viewer), &format!("{path}SubmitDeploy")).is_err());
        assert!(authorize(&op(Role::Deployer), &format!("{path}SubmitDeploy")).is_ok());
        assert!(authorize(&op(Role::Deployer), &format!("{path}CancelJob")).is_err());
        assert!(authorize(&op(Role::Admin), &format!("{path}CancelJob")).is_ok());
        assert!(authorize(&op(Role::Deployer), &format!("{path}SomethingNew")).is_err());
    }
}
