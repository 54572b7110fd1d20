//! Host enrolment and certificate renewal, with the online issuing CA of `[pki]`:
//!
//! * `CreateJoinToken` (admin) makes a one-time, expiring token for one host name; the store
//!   keeps its hash;
//! * `EnrollService/Enroll`, the one call open to clients without a certificate, takes a
//!   token and a CSR for the token's host and answers with the host's first certificate, the
//!   fleet CA and the job-signing public keys;
//! * renewal on the agent channel signs a new CSR of the stream's own host.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sentinel_daemon::join_token::JoinToken;
use sentinel_proto::v1::enroll_service_server::EnrollService;
use sentinel_proto::v1::{CertificateIssued, EnrollRequest, EnrollResponse};
use tonic::{Request, Response, Status};
use tracing::{info, warn};

use crate::pki::issuer::{CsrError, HostIssuer};
use crate::store::{JoinTokenRecord, Redeemed, Store};

/// A token's lifetime when none is asked for.
pub const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(15 * 60);
/// The longest a token may live: it is a bearer credential for a new host.
pub const MAX_TOKEN_TTL: Duration = Duration::from_secs(7 * 86_400);

/// What enrolment and renewal need: the issuing CA, the store of tokens, and what a new
/// agent is told to trust.
pub struct Enrolment {
    issuer: HostIssuer,
    store: Arc<dyn Store>,
    /// The fleet CA, PEM (the anchor agents trust).
    ca_pem: String,
    /// SHA-256 of the fleet CA's DER, hex: what tokens pin.
    ca_sha256: String,
    /// The job-signing public keys (SPKI PEM) agents should trust.
    signing_keys_pem: Vec<String>,
}

impl std::fmt::Debug for Enrolment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Enrolment")
            .field("issuer", &self.issuer)
            .field("ca_sha256", &self.ca_sha256)
            .finish_non_exhaustive()
    }
}

/// Why a token could not be made.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// The host name is not acceptable.
    #[error(transparent)]
    Name(#[from] crate::pki::PkiError),
    /// The lifetime is out of range.
    #[error("a join token lives at most {}, not {}", humantime::format_duration(MAX_TOKEN_TTL), humantime::format_duration(*.0))]
    Ttl(Duration),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
}

impl Enrolment {
    /// Enrolment over `issuer`, storing tokens in `store`; `ca_pem` is the fleet CA file's
    /// text, `ca_der` its (first) certificate.
    pub fn new(
        issuer: HostIssuer,
        store: Arc<dyn Store>,
        ca_pem: String,
        ca_der: &[u8],
        signing_keys_pem: Vec<String>,
    ) -> Self {
        Self {
            issuer,
            store,
            ca_pem,
            ca_sha256: sentinel_daemon::csr::ca_fingerprint(ca_der),
            signing_keys_pem,
        }
    }

    /// The issuing CA (the TLS verifier trusts what it issued).
    pub fn issuer(&self) -> &HostIssuer {
        &self.issuer
    }

    /// Makes a join token for `host`, valid for `ttl` (default 15 minutes), stored (hashed)
    /// before it is returned. Blocking: call from `spawn_blocking`.
    pub fn create_token(
        &self,
        host: &str,
        ttl: Option<Duration>,
        created_by: &str,
    ) -> Result<(JoinToken, SystemTime), TokenError> {
        crate::pki::validate_name(host)?;
        let ttl = ttl.filter(|t| !t.is_zero()).unwrap_or(DEFAULT_TOKEN_TTL);
        if ttl > MAX_TOKEN_TTL {
            return Err(TokenError::Ttl(ttl));
        }
        let token = JoinToken::generate(host, &self.ca_sha256);
        let now = unix_now();
        let expires_at = now + i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX / 2);
        self.store.save_join_token(&JoinTokenRecord {
            id: token.id.clone(),
            secret_sha256: hex::encode(token.secret_sha256()),
            host: host.to_owned(),
            created_by: created_by.to_owned(),
            created_at: now,
            expires_at,
            used_at: None,
        })?;
        info!(host, operator = created_by, expires_in = ?ttl, token_id = %token.id, "join token created");
        Ok((
            token,
            UNIX_EPOCH + Duration::from_secs(expires_at.unsigned_abs()),
        ))
    }

    /// The SHA-256 fingerprint of the fleet CA, hex.
    pub fn ca_sha256(&self) -> &str {
        &self.ca_sha256
    }

    /// Enrols: checks the CSR names the token's host, uses the token up (one transaction in
    /// the store), signs the CSR. Blocking: call from `spawn_blocking`.
    pub fn enroll(&self, request: &EnrollRequest) -> Result<EnrollResponse, Status> {
        let token =
            JoinToken::parse(&request.token).map_err(|e| Status::unauthenticated(e.to_string()))?;
        if token.ca_sha256 != self.ca_sha256 {
            return Err(Status::unauthenticated(format!(
                "the token pins CA {} but this controller's fleet CA is {}: the token is for \
                 another fleet",
                token.ca_sha256, self.ca_sha256
            )));
        }
        // The CSR is checked before the token is used, so a bad request does not burn it.
        let issued = self
            .issuer
            .issue_host(&request.csr_der, &token.host)
            .map_err(|e| match e {
                CsrError::Pki(e) => Status::internal(format!("issuing the certificate: {e}")),
                other => Status::invalid_argument(other.to_string()),
            })?;
        let redeemed = self
            .store
            .redeem_join_token(&token.id, &token.secret_sha256(), &token.host, unix_now())
            .map_err(|e| Status::unavailable(e.to_string()))?;
        match redeemed {
            Redeemed::Ok(record) => {
                info!(host = %record.host, token_id = %record.id, created_by = %record.created_by, "host enrolled");
            }
            Redeemed::Unknown => {
                return Err(Status::unauthenticated(
                    "unknown join token (never issued by this fleet, or mistyped)",
                ))
            }
            Redeemed::Used(at) => {
                return Err(Status::permission_denied(format!(
                    "this join token was already used at {}; make a new one with `sentinel \
                     token create --host {}`",
                    format_unix(at),
                    token.host
                )))
            }
            Redeemed::Expired(at) => {
                return Err(Status::permission_denied(format!(
                    "this join token expired at {}; make a new one with `sentinel token create \
                     --host {}`",
                    format_unix(at),
                    token.host
                )))
            }
            Redeemed::OtherHost(host) => {
                return Err(Status::permission_denied(format!(
                    "this join token is for host {host:?}, not {:?}",
                    token.host
                )))
            }
        }
        Ok(EnrollResponse {
            host_name: token.host,
            certificate_chain_pem: issued.chain_pem,
            ca_pem: self.ca_pem.clone(),
            signing_public_keys_pem: self.signing_keys_pem.clone(),
            not_after: Some(sentinel_proto::time::timestamp(issued.not_after.into())),
        })
    }

    /// Renews the certificate of `host` (the stream's own) from its CSR; refusals travel in
    /// the answer's `error`.
    pub fn renew(&self, host: &str, csr_der: &[u8]) -> CertificateIssued {
        match self.issuer.issue_host(csr_der, host) {
            Ok(issued) => {
                info!(host, not_after = %issued.not_after, "host certificate renewed");
                CertificateIssued {
                    certificate_chain_pem: issued.chain_pem,
                    not_after: Some(sentinel_proto::time::timestamp(issued.not_after.into())),
                    error: String::new(),
                }
            }
            Err(e) => {
                warn!(host, error = %e, "certificate renewal refused");
                CertificateIssued {
                    error: e.to_string(),
                    ..Default::default()
                }
            }
        }
    }
}

/// The enrolment service (no client certificate needed: the authz layer lets only this path
/// through for such clients).
pub struct EnrollApi {
    enrolment: Option<Arc<Enrolment>>,
}

impl EnrollApi {
    /// The service; without `[pki]` every call fails with FAILED_PRECONDITION.
    pub fn new(enrolment: Option<Arc<Enrolment>>) -> Self {
        Self { enrolment }
    }
}

#[tonic::async_trait]
impl EnrollService for EnrollApi {
    async fn enroll(
        &self,
        request: Request<EnrollRequest>,
    ) -> Result<Response<EnrollResponse>, Status> {
        let enrolment = configured(&self.enrolment)?;
        let peer = request
            .extensions()
            .get::<crate::identity::PeerInfo>()
            .and_then(|p| p.addr);
        let request = request.into_inner();
        let result = tokio::task::spawn_blocking(move || enrolment.enroll(&request))
            .await
            .map_err(|e| Status::internal(format!("enrolment task failed: {e}")))?;
        if let Err(status) = &result {
            warn!(peer = ?peer, reason = status.message(), "enrolment refused");
        }
        result.map(Response::new)
    }
}

/// The enrolment, or FAILED_PRECONDITION saying how to configure it.
pub fn configured(enrolment: &Option<Arc<Enrolment>>) -> Result<Arc<Enrolment>, Status> {
    enrolment.clone().ok_or_else(|| {
        Status::failed_precondition(
            "this controller has no [pki] issuing CA configured, so it cannot enrol or renew \
             hosts (see `sentinel pki init-issuer`)",
        )
    })
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// A Unix time as RFC 3339 (UTC), for messages.
fn format_unix(at: i64) -> String {
    jiff::Timestamp::from_second(at)
        .map(|t| t.to_string())
        .unwrap_or_else(|_| at.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::CA_CERT_FILE;
    use crate::store::embedded::EmbeddedStore;

    fn enrolment(dir: &std::path::Path) -> Enrolment {
        let issuer = crate::pki::issuer::tests::pki(dir);
        let store: Arc<dyn Store> =
            Arc::new(EmbeddedStore::open(&dir.join("s.redb")).expect("store"));
        let ca = sentinel_daemon::tls::load_certs(&dir.join(CA_CERT_FILE), "CA")
            .expect("ca")
            .remove(0);
        let pem = std::fs::read_to_string(dir.join(CA_CERT_FILE)).expect("ca pem");
        Enrolment::new(issuer, store, pem, ca.as_ref(), vec!["KEY".into()])
    }

    fn request(token: &str, host: &str) -> EnrollRequest {
        let key = sentinel_daemon::csr::new_host_key().expect("key");
        EnrollRequest {
            token: token.to_owned(),
            csr_der: sentinel_daemon::csr::host_csr(host, &key).expect("csr"),
        }
    }

    #[test]
    fn a_token_enrols_its_host_once_and_every_refusal_names_its_reason() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let e = enrolment(tmp.path());
        let (token, _) = e.create_token("newbie", None, "admin").expect("token");
        let text = token.to_string();

        let other_name = e.enroll(&request(&text, "argus")).expect_err("other name");
        assert_eq!(other_name.code(), tonic::Code::InvalidArgument);
        let mut wrong_pin = token.clone();
        wrong_pin.ca_sha256 = "0".repeat(64);
        let pin = e
            .enroll(&request(&wrong_pin.to_string(), "newbie"))
            .expect_err("pin");
        assert!(pin.message().contains("another fleet"), "{pin:?}");
        let mut wrong_secret = token.clone();
        wrong_secret.secret = "0".repeat(64);
        let secret = e
            .enroll(&request(&wrong_secret.to_string(), "newbie"))
            .expect_err("secret");
        assert!(
            secret.message().contains("unknown join token"),
            "{secret:?}"
        );

        let done = e.enroll(&request(&text, "newbie")).expect("enrolled");
        assert_eq!(done.host_name, "newbie");
        assert_eq!(done.signing_public_keys_pem, vec!["KEY".to_owned()]);
        assert!(done.ca_pem.contains("BEGIN CERTIFICATE"));
        let twice = e.enroll(&request(&text, "newbie")).expect_err("twice");
        assert_eq!(twice.code(), tonic::Code::PermissionDenied);
        assert!(twice.message().contains("already used"), "{twice:?}");

        assert!(matches!(
            e.create_token("newbie", Some(Duration::from_secs(8 * 86_400)), "admin"),
            Err(TokenError::Ttl(_))
        ));
        assert!(matches!(
            e.create_token("Bad Name", None, "admin"),
            Err(TokenError::Name(_))
        ));
        // Renewal signs only the stream's own name.
        let renewed = e.renew("argus", &request("", "argus").csr_der);
        assert!(renewed.error.is_empty(), "{}", renewed.error);
        let refused = e.renew("argus", &request("", "newbie").csr_der);
        assert!(refused.error.contains("may be issued"), "{}", refused.error);
    }
}
