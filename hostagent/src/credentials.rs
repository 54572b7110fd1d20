//! The agent's TLS identity while it runs: the current client config, published through a
//! `watch` channel so that a renewed certificate is used by the next dial while the open
//! stream carries on; when to renew (two thirds of the certificate's life, with jitter); and
//! the checks a new certificate passes before it is written and used.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rand::Rng;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, UnixTime};
use sentinel_daemon::tls::{TlsError, TlsFiles};
use tokio::sync::watch;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

/// Shortest wait before a failed renewal is tried again.
const MIN_RETRY: Duration = Duration::from_secs(1);
/// Longest wait before a failed renewal is tried again.
const MAX_RETRY: Duration = Duration::from_secs(600);

/// Why a certificate cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    /// The TLS files could not be loaded.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// A certificate does not parse or does not fit.
    #[error("{0}")]
    Invalid(String),
    /// The private key cannot sign a renewal request.
    #[error("the key {path} cannot make a renewal request (PKCS#8 ECDSA P-256 or Ed25519 is needed): {message}")]
    Key {
        /// The key file.
        path: String,
        /// Why.
        message: String,
    },
    /// Writing the certificate failed.
    #[error("writing {path}: {source}")]
    Write {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
}

/// When a certificate is valid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Validity {
    /// Its `notBefore`.
    pub not_before: SystemTime,
    /// Its `notAfter`.
    pub not_after: SystemTime,
}

/// The agent's certificate, key and CA, and the client config made of them.
pub struct Credentials {
    files: TlsFiles,
    host: String,
    tx: watch::Sender<Arc<rustls::ClientConfig>>,
    validity: Mutex<Validity>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("cert", &self.files.cert)
            .field("host", &self.host)
            .finish_non_exhaustive()
    }
}

impl Credentials {
    /// Loads the files of `[tls]` for host `host`.
    pub fn load(files: &TlsFiles, host: &str) -> Result<Self, CredentialError> {
        let config = sentinel_daemon::tls::client_config(files)?;
        let certs = sentinel_daemon::tls::load_certs(&files.cert, "certificate")?;
        let validity = validity(&certs[0], &files.cert.display().to_string())?;
        crate::metrics::get().set_cert_not_after(unix(validity.not_after));
        let (tx, _) = watch::channel(config);
        Ok(Self {
            files: files.clone(),
            host: host.to_owned(),
            tx,
            validity: Mutex::new(validity),
        })
    }

    /// The client config to dial with: the newest certificate.
    pub fn current(&self) -> Arc<rustls::ClientConfig> {
        self.tx.borrow().clone()
    }

    fn validity(&self) -> Validity {
        *self.validity.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Set when the certificate in use has expired: what to tell the operator.
    pub fn expired(&self) -> Option<String> {
        let v = self.validity();
        (SystemTime::now() >= v.not_after).then(|| {
            format!(
                "certificate {} expired at {}; enrol again with a new token: run `sentinel token \
                 create --host {}` where the fleet is administered, then `hostagent enroll \
                 --controller ADDR --token TOKEN` here",
                self.files.cert.display(),
                rfc3339(v.not_after),
                self.host
            )
        })
    }

    /// When to ask for a new certificate: two thirds into the current one's life, give or
    /// take a twentieth of it, so that hosts enrolled together do not renew together.
    pub fn renew_at(&self) -> SystemTime {
        let v = self.validity();
        let life = v
            .not_after
            .duration_since(v.not_before)
            .unwrap_or(Duration::ZERO);
        let share = 2.0 / 3.0 + rand::thread_rng().gen_range(-0.05..0.05);
        v.not_before + life.mul_f64(share)
    }

    /// When to try again after a failed renewal: a tenth of the time left, within bounds.
    pub fn retry_at(&self) -> SystemTime {
        let left = self
            .validity()
            .not_after
            .duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO);
        SystemTime::now() + (left / 10).clamp(MIN_RETRY, MAX_RETRY)
    }

    /// A renewal request for this host, signed with the current key (the key stays; only
    /// the certificate file changes, in one atomic rename).
    pub fn csr(&self) -> Result<Vec<u8>, CredentialError> {
        let key_err = |message: String| CredentialError::Key {
            path: self.files.key.display().to_string(),
            message,
        };
        let pem = std::fs::read_to_string(&self.files.key).map_err(|e| key_err(e.to_string()))?;
        let key = rcgen::KeyPair::from_pem(&pem).map_err(|e| key_err(e.to_string()))?;
        sentinel_daemon::csr::host_csr(&self.host, &key).map_err(|e| key_err(e.to_string()))
    }

    /// Checks a renewed chain (it chains to the CA, names this host, holds our key, is valid
    /// now), writes it over the certificate file atomically and publishes the new config.
    pub fn install(&self, chain_pem: &str) -> Result<Validity, CredentialError> {
        let key_pem = std::fs::read_to_string(&self.files.key).map_err(|e| {
            CredentialError::Invalid(format!("reading {}: {e}", self.files.key.display()))
        })?;
        let roots = sentinel_daemon::tls::load_roots(&self.files.ca)?;
        let validity = check_host_chain(chain_pem, roots, &self.host, &key_pem)?;
        sentinel_daemon::fs::write_atomic(&self.files.cert, chain_pem.as_bytes(), 0o644).map_err(
            |e| CredentialError::Write {
                path: e.path.display().to_string(),
                source: e.source,
            },
        )?;
        let config = sentinel_daemon::tls::client_config(&self.files)?;
        *self.validity.lock().unwrap_or_else(|p| p.into_inner()) = validity;
        crate::metrics::get().set_cert_not_after(unix(validity.not_after));
        self.tx.send_replace(config);
        Ok(validity)
    }
}

/// Checks a host certificate chain (PEM, leaf first) before it is used: it chains to the fleet
/// CA in `roots` as a client certificate, is valid now, carries `sentinel://host/HOST` and
/// the public key of `key_pem`. Returns its validity.
pub fn check_host_chain(
    chain_pem: &str,
    roots: rustls::RootCertStore,
    host: &str,
    key_pem: &str,
) -> Result<Validity, CredentialError> {
    let invalid = CredentialError::Invalid;
    let chain = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(format!("the new certificate is not PEM: {e}")))?;
    let Some((leaf, intermediates)) = chain.split_first() else {
        return Err(invalid("the new certificate chain is empty".to_owned()));
    };
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        sentinel_daemon::tls::provider(),
    )
    .build()
    .map_err(|e| invalid(format!("verifier for the fleet CA: {e}")))?;
    verifier
        .verify_client_cert(leaf, intermediates, UnixTime::now())
        .map_err(|e| {
            invalid(format!(
                "the new certificate does not chain to the fleet CA: {e}"
            ))
        })?;
    let (_, x509) = X509Certificate::from_der(leaf.as_ref())
        .map_err(|e| invalid(format!("the new certificate does not parse: {e}")))?;
    let want = format!("{}{host}", sentinel_daemon::csr::HOST_URI_PREFIX);
    let names_host = x509
        .subject_alternative_name()
        .ok()
        .flatten()
        .is_some_and(|san| {
            san.value
                .general_names
                .iter()
                .any(|n| matches!(n, GeneralName::URI(uri) if *uri == want))
        });
    if !names_host {
        return Err(invalid(format!(
            "the new certificate does not name this host ({want})"
        )));
    }
    let key = rcgen::KeyPair::from_pem(key_pem)
        .map_err(|e| invalid(format!("the host key does not load: {e}")))?;
    if key.public_key_raw() != x509.public_key().subject_public_key.data.as_ref() {
        return Err(invalid(
            "the new certificate is for another key than this host's".to_owned(),
        ));
    }
    validity(leaf, "the new certificate")
}

/// The validity of a DER certificate; `what` names it in errors.
pub fn validity(der: &CertificateDer<'_>, what: &str) -> Result<Validity, CredentialError> {
    let (_, x509) = X509Certificate::from_der(der.as_ref())
        .map_err(|e| CredentialError::Invalid(format!("{what} does not parse: {e}")))?;
    let at = |t: i64| UNIX_EPOCH + Duration::from_secs(t.max(0).unsigned_abs());
    Ok(Validity {
        not_before: at(x509.validity().not_before.timestamp()),
        not_after: at(x509.validity().not_after.timestamp()),
    })
}

fn unix(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

pub use sentinel_daemon::certcheck::rfc3339;
