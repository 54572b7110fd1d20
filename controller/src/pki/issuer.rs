//! The online issuing CA: an intermediate the offline fleet CA (the root) signs once, with
//! `sentinel pki init-issuer`, and whose key the controller holds to issue host certificates
//! from enrolment and renewal CSRs. The root's key can then stay offline: losing the
//! controller's disk costs the issuing CA (replace it, the root and every agent's trust stay),
//! not the fleet's trust anchor.

use std::path::{Path, PathBuf};

use rcgen::CertificateSigningRequestParams;
use rustls::pki_types::CertificateSigningRequestDer;
use time::{Duration, OffsetDateTime};
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

use super::files::{check_targets, write_planned};
use super::issue::{lifetime, Ca, Leaf};
use super::scheme::{validate_name, HOST_URI_PREFIX};
use super::PkiError;

/// File name of the issuing CA's certificate in a PKI directory.
pub const ISSUER_CERT_FILE: &str = "issuer.pem";
/// File name of the issuing CA's private key in a PKI directory.
pub const ISSUER_KEY_FILE: &str = "issuer.key";

/// Default lifetime of an issuing CA: a year (capped at the root's expiry).
const ISSUER_VALIDITY: Duration = Duration::days(365);

/// `sentinel pki init-issuer`: an issuing CA (`issuer.pem` / `issuer.key`) signed by the fleet
/// CA in `dir`. Returns the files written.
pub fn init_issuer(
    dir: &Path,
    ttl: Option<std::time::Duration>,
    force: bool,
) -> Result<Vec<PathBuf>, PkiError> {
    let root = Ca::load(dir)?;
    let lifetime = match ttl {
        Some(_) => lifetime(ttl)?,
        None => ISSUER_VALIDITY,
    };
    let (cert, key) = (dir.join(ISSUER_CERT_FILE), dir.join(ISSUER_KEY_FILE));
    check_targets(&[key.clone(), cert.clone()], force)?;
    let planned = root.issue_issuing_ca(lifetime)?.into_files(cert, key);
    write_planned(dir, &planned, force)
}

/// Why a CSR was not signed. The messages go back to the agent as they are.
#[derive(Debug, thiserror::Error)]
pub enum CsrError {
    /// Not a PKCS#10 request, or its signature does not verify.
    #[error("the certificate signing request is not valid: {0}")]
    Invalid(String),
    /// The request names another host than the one it may be issued for.
    #[error(
        "the certificate signing request is for {asked:?}, but only {allowed:?} may be issued here"
    )]
    WrongName {
        /// The name in the request.
        asked: String,
        /// The name allowed (the token's, or the stream's own).
        allowed: String,
    },
    /// Signing failed.
    #[error(transparent)]
    Pki(#[from] PkiError),
}

/// A host certificate just issued.
#[derive(Debug, Clone)]
pub struct IssuedHost {
    /// The host certificate then the issuing CA, PEM.
    pub chain_pem: String,
    /// The end of its validity.
    pub not_after: OffsetDateTime,
}

/// The controller's issuing CA, loaded from `[pki]`.
pub struct HostIssuer {
    ca: Ca,
    /// The issuing CA is the root itself (no intermediate): its certificate is not repeated
    /// in issued chains.
    is_root: bool,
    ttl: Duration,
}

impl std::fmt::Debug for HostIssuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostIssuer")
            .field("is_root", &self.is_root)
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

impl HostIssuer {
    /// Loads the issuing CA (`cert` / `key`) and checks that it is the fleet CA `root` itself
    /// or a CA certificate the root signed, valid now; `host_cert_ttl` is the lifetime of the
    /// certificates it issues.
    pub fn load(
        cert: &Path,
        key: &Path,
        root: &Path,
        host_cert_ttl: std::time::Duration,
    ) -> Result<Self, PkiError> {
        let ca = Ca::load_files(cert, key, || PkiError::InvalidCa {
            path: cert.to_owned(),
            reason: format!(
                "{} or {} does not exist (make them with `sentinel pki init-issuer`)",
                cert.display(),
                key.display()
            ),
        })?;
        let bad = |reason: String| PkiError::InvalidCa {
            path: cert.to_owned(),
            reason,
        };
        let root_der = sentinel_daemon::tls::load_certs(root, "CA certificate")
            .map_err(|e| bad(format!("cannot read the fleet CA: {e}")))?
            .remove(0);
        let is_root = root_der.as_ref() == ca.cert_der();
        if !is_root {
            let (_, root_x509) = X509Certificate::from_der(root_der.as_ref()).map_err(|e| {
                bad(format!(
                    "the fleet CA {} does not parse: {e}",
                    root.display()
                ))
            })?;
            let (_, x509) = X509Certificate::from_der(ca.cert_der())
                .map_err(|e| bad(format!("does not parse: {e}")))?;
            x509.verify_signature(Some(root_x509.public_key()))
                .map_err(|_| {
                    bad(format!(
                        "is not signed by the fleet CA {} (make it with `sentinel pki init-issuer` \
                         in the directory of that CA)",
                        root.display()
                    ))
                })?;
            if x509.validity().not_before.to_datetime() > OffsetDateTime::now_utc() {
                return Err(bad("is not valid yet".to_owned()));
            }
        }
        let ttl = lifetime(Some(host_cert_ttl))?;
        Ok(Self { ca, is_root, ttl })
    }

    /// The issuing CA's certificate, DER: the controller trusts client certificates it
    /// issued (besides those the root issued directly).
    pub fn cert_der(&self) -> &[u8] {
        self.ca.cert_der()
    }

    /// The lifetime of host certificates.
    pub fn host_cert_ttl(&self) -> std::time::Duration {
        self.ttl.unsigned_abs()
    }

    /// Signs a host certificate for the key in `csr_der` if the request names `host` (subject
    /// CN, and every SAN is `sentinel://host/HOST`). Only the request's key is used: names,
    /// usages and lifetime are the controller's.
    pub fn issue_host(&self, csr_der: &[u8], host: &str) -> Result<IssuedHost, CsrError> {
        validate_name(host)?;
        let asked = requested_host(csr_der)?;
        if asked != host {
            return Err(CsrError::WrongName {
                asked,
                allowed: host.to_owned(),
            });
        }
        let csr =
            CertificateSigningRequestParams::from_der(&CertificateSigningRequestDer::from(csr_der))
                .map_err(|e| CsrError::Invalid(e.to_string()))?;
        let cert = self
            .ca
            .sign_leaf(&Leaf::Host(host), &csr.public_key, self.ttl)?;
        let (_, parsed) = X509Certificate::from_der(cert.der())
            .map_err(|e| CsrError::Invalid(format!("issued certificate does not parse: {e}")))?;
        let not_after = parsed.validity().not_after.to_datetime();
        let mut chain_pem = cert.pem();
        if !self.is_root {
            chain_pem.push_str(self.ca.cert_pem());
        }
        Ok(IssuedHost {
            chain_pem,
            not_after,
        })
    }
}

/// The host name a CSR asks for: its subject CN, which every `sentinel://` SAN must repeat.
fn requested_host(csr_der: &[u8]) -> Result<String, CsrError> {
    use x509_parser::certification_request::X509CertificationRequest;
    let (_, csr) = X509CertificationRequest::from_der(csr_der)
        .map_err(|e| CsrError::Invalid(format!("not a PKCS#10 request: {e}")))?;
    csr.verify_signature()
        .map_err(|_| CsrError::Invalid("its signature does not verify".to_owned()))?;
    let info = &csr.certification_request_info;
    let cn = info
        .subject
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .ok_or_else(|| CsrError::Invalid("its subject has no common name".to_owned()))?
        .to_owned();
    if let Some(extensions) = csr.requested_extensions() {
        for ext in extensions {
            if let x509_parser::extensions::ParsedExtension::SubjectAlternativeName(san) = ext {
                for name in &san.general_names {
                    let asked = match name {
                        GeneralName::URI(uri) => {
                            uri.strip_prefix(HOST_URI_PREFIX).unwrap_or(uri).to_owned()
                        }
                        other => format!("{other}"),
                    };
                    if asked != cn {
                        return Err(CsrError::WrongName { asked, allowed: cn });
                    }
                }
            }
        }
    }
    Ok(cn)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::pki::{init, InitOptions, CA_CERT_FILE};

    /// A dev PKI with an issuing CA in `dir`, loaded for one-hour host certificates.
    pub(crate) fn pki(dir: &Path) -> HostIssuer {
        init(&InitOptions {
            dir: dir.to_owned(),
            hosts: vec!["argus".into()],
            ..InitOptions::default()
        })
        .expect("init");
        init_issuer(dir, None, false).expect("init-issuer");
        HostIssuer::load(
            &dir.join(ISSUER_CERT_FILE),
            &dir.join(ISSUER_KEY_FILE),
            &dir.join(CA_CERT_FILE),
            std::time::Duration::from_secs(3600),
        )
        .expect("load issuer")
    }

    #[test]
    fn a_csr_for_the_allowed_host_is_signed_for_the_ttl_and_others_are_refused() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let issuer = pki(tmp.path());
        let key = sentinel_daemon::csr::new_host_key().expect("key");
        let csr = sentinel_daemon::csr::host_csr("newbie", &key).expect("csr");
        let issued = issuer.issue_host(&csr, "newbie").expect("issued");
        assert_eq!(issued.chain_pem.matches("BEGIN CERTIFICATE").count(), 2);
        let left = issued.not_after - OffsetDateTime::now_utc();
        assert!(
            left <= Duration::hours(1) && left > Duration::minutes(59),
            "{left}"
        );
        match issuer.issue_host(&csr, "argus") {
            Err(CsrError::WrongName { asked, allowed }) => {
                assert_eq!((asked.as_str(), allowed.as_str()), ("newbie", "argus"));
            }
            other => panic!("expected WrongName, got {other:?}"),
        }
        let mut broken = csr.clone();
        let last = broken.len() - 1;
        broken[last] ^= 0xff;
        assert!(matches!(
            issuer.issue_host(&broken, "newbie"),
            Err(CsrError::Invalid(_))
        ));
        assert!(matches!(
            issuer.issue_host(b"garbage", "newbie"),
            Err(CsrError::Invalid(_))
        ));
    }

    #[test]
    fn an_issuer_not_signed_by_the_configured_root_is_refused() {
        let a = tempfile::tempdir().expect("tempdir");
        let b = tempfile::tempdir().expect("tempdir");
        pki(a.path());
        pki(b.path());
        let err = HostIssuer::load(
            &a.path().join(ISSUER_CERT_FILE),
            &a.path().join(ISSUER_KEY_FILE),
            &b.path().join(CA_CERT_FILE),
            std::time::Duration::from_secs(3600),
        )
        .expect_err("foreign issuer accepted");
        assert!(
            err.to_string().contains("is not signed by the fleet CA"),
            "{err}"
        );
        let missing = HostIssuer::load(
            &a.path().join("nope.pem"),
            &a.path().join(ISSUER_KEY_FILE),
            &a.path().join(CA_CERT_FILE),
            std::time::Duration::from_secs(3600),
        )
        .expect_err("missing issuer accepted");
        assert!(missing.to_string().contains("init-issuer"), "{missing}");
    }
}
