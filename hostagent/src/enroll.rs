//! `hostagent enroll --controller ADDR --token TOKEN [--dir DIR]`: a new host gets its
//! identity without any private key being copied to it. The agent makes its own key, checks
//! the controller against the CA fingerprint the token pins (before the token is sent), sends
//! a CSR for the token's host, and writes what comes back: the certificate, the fleet CA, the
//! job-signing public keys, and an agent config ready to start.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, OtherError, SignatureScheme};
use sentinel_daemon::join_token::JoinToken;
use sentinel_proto::v1::enroll_service_client::EnrollServiceClient;
use sentinel_proto::v1::EnrollRequest;

use crate::credentials::{check_host_chain, rfc3339};

/// What `hostagent enroll` needs.
#[derive(Debug, Clone)]
pub struct EnrollOptions {
    /// The controller's address, `host:port`.
    pub controller: String,
    /// The join token (`sentinel token create`).
    pub token: String,
    /// Where the files go.
    pub dir: PathBuf,
    /// TLS server name to expect instead of the address's host.
    pub server_name: Option<String>,
}

/// Why enrolment failed; nothing is written in any case.
#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    /// The token does not parse.
    #[error(transparent)]
    Token(#[from] sentinel_daemon::join_token::TokenFormatError),
    /// The controller could not be reached, or is not the one the token pins.
    #[error("connecting to {addr}: {message}")]
    Connect {
        /// The address.
        addr: String,
        /// The cause (a wrong CA pin says so).
        message: String,
    },
    /// The controller refused.
    #[error("the controller refused to enrol this host: {0}")]
    Refused(String),
    /// The answer cannot be trusted or used.
    #[error("the controller's answer is not usable: {0}")]
    Answer(String),
    /// Making the key or CSR failed.
    #[error("making the host key: {0}")]
    Key(#[from] rcgen::Error),
    /// Writing a file failed.
    #[error("writing {}: {source}", path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
}

/// What enrolment wrote.
#[derive(Debug)]
pub struct Enrolled {
    /// The host's name.
    pub host: String,
    /// Files written, in order.
    pub written: Vec<PathBuf>,
    /// The agent config, and whether this run wrote it (an existing one is left alone).
    pub config: (PathBuf, bool),
    /// When the certificate expires (RFC 3339).
    pub not_after: String,
}

/// File names inside the enrolment directory.
const CA_FILE: &str = "ca.pem";
const CERT_FILE: &str = "host.pem";
const KEY_FILE: &str = "host.key";
const CONFIG_FILE: &str = "agent.toml";

/// Enrols this host (see the module docs).
pub async fn enroll(opts: &EnrollOptions) -> Result<Enrolled, EnrollError> {
    let token = JoinToken::parse(&opts.token)?;
    let key = sentinel_daemon::csr::new_host_key()?;
    let csr_der = sentinel_daemon::csr::host_csr(&token.host, &key)?;
    let connect_err = |message: String| EnrollError::Connect {
        addr: opts.controller.clone(),
        message,
    };
    let wrong_pin = Arc::new(AtomicBool::new(false));
    let tls = pinned_client_config(&token.ca_sha256, wrong_pin.clone())
        .map_err(|e| connect_err(e.to_string()))?;
    let channel = sentinel_daemon::tls::channel(&opts.controller, opts.server_name.as_deref(), tls)
        .await
        .map_err(|message| {
            // rustls shows the verifier's error by its Debug form; say it plainly.
            if wrong_pin.load(Ordering::SeqCst) {
                connect_err(
                    WrongPin {
                        pin: token.ca_sha256.clone(),
                    }
                    .to_string(),
                )
            } else {
                connect_err(message)
            }
        })?;
    let answer = EnrollServiceClient::new(channel)
        .enroll(EnrollRequest {
            token: token.to_string(),
            csr_der,
        })
        .await
        .map_err(|s| EnrollError::Refused(format!("{:?}: {}", s.code(), s.message())))?
        .into_inner();
    if answer.host_name != token.host {
        return Err(EnrollError::Answer(format!(
            "a certificate for {:?}, but the token is for {:?}",
            answer.host_name, token.host
        )));
    }
    let ca_der = CertificateDer::pem_slice_iter(answer.ca_pem.as_bytes())
        .next()
        .and_then(Result::ok)
        .ok_or_else(|| EnrollError::Answer("no CA certificate".to_owned()))?;
    if sentinel_daemon::csr::ca_fingerprint(ca_der.as_ref()) != token.ca_sha256 {
        return Err(EnrollError::Answer(
            "the CA it sent is not the one the token pins".to_owned(),
        ));
    }
    write_files(opts, &token.host, &answer, &key.serialize_pem())
}

/// Checks the certificate against the CA, then writes key, certificate, CA, signing keys and
/// (if there is none yet) the agent config; a failed check writes nothing.
fn write_files(
    opts: &EnrollOptions,
    host: &str,
    answer: &sentinel_proto::v1::EnrollResponse,
    key_pem: &str,
) -> Result<Enrolled, EnrollError> {
    let dir = &opts.dir;
    let ca = dir.join(CA_FILE);
    let cert = dir.join(CERT_FILE);
    let key = dir.join(KEY_FILE);
    let mut roots = rustls::RootCertStore::empty();
    for ca in CertificateDer::pem_slice_iter(answer.ca_pem.as_bytes()) {
        let ca = ca.map_err(|e| EnrollError::Answer(format!("the CA is not PEM: {e}")))?;
        roots
            .add(ca)
            .map_err(|e| EnrollError::Answer(format!("the CA is not usable: {e}")))?;
    }
    let validity = check_host_chain(&answer.certificate_chain_pem, roots, host, key_pem)
        .map_err(|e| EnrollError::Answer(e.to_string()))?;

    let mut files: Vec<(PathBuf, String, u32)> = vec![
        (key.clone(), key_pem.to_owned(), 0o600),
        (cert.clone(), answer.certificate_chain_pem.clone(), 0o644),
        (ca.clone(), answer.ca_pem.clone(), 0o644),
    ];
    let mut trusted = Vec::new();
    for (i, pem) in answer.signing_public_keys_pem.iter().enumerate() {
        let path = dir.join(format!("signing-{}.pub", i + 1));
        trusted.push(path.clone());
        files.push((path, pem.clone(), 0o644));
    }
    let config = dir.join(CONFIG_FILE);
    let write_config = !config.exists();
    if write_config {
        files.push((
            config.clone(),
            agent_config(host, opts, &ca, &cert, &key, &trusted),
            0o644,
        ));
    }
    std::fs::create_dir_all(dir).map_err(|source| EnrollError::Write {
        path: dir.clone(),
        source,
    })?;
    let mut written = Vec::new();
    for (path, contents, mode) in files {
        sentinel_daemon::fs::write_atomic(&path, contents.as_bytes(), mode).map_err(|e| {
            EnrollError::Write {
                path: e.path,
                source: e.source,
            }
        })?;
        written.push(path);
    }
    Ok(Enrolled {
        host: host.to_owned(),
        written,
        config: (config, write_config),
        not_after: rfc3339(validity.not_after),
    })
}

/// The agent config of an enrolled host: what it needs to connect and to trust signed jobs.
/// Jobs stay refused until `allowed_kinds` lists some (a decision for the operator).
fn agent_config(
    host: &str,
    opts: &EnrollOptions,
    ca: &Path,
    cert: &Path,
    key: &Path,
    trusted: &[PathBuf],
) -> String {
    let quote = |s: &str| toml::Value::String(s.to_owned()).to_string();
    let path = |p: &Path| quote(&p.display().to_string());
    let mut out = format!(
        "# Written by `hostagent enroll`.\nhost_name = {}\ncontroller = {}\n",
        quote(host),
        quote(&opts.controller)
    );
    if let Some(name) = &opts.server_name {
        out.push_str(&format!("server_name = {}\n", quote(name)));
    }
    out.push_str(&format!(
        "\n[tls]\nca = {}\ncert = {}\nkey = {}\n\n[jobs]\ntrusted_keys = [{}]\n",
        path(ca),
        path(cert),
        path(key),
        trusted
            .iter()
            .map(|p| path(p))
            .collect::<Vec<_>>()
            .join(", ")
    ));
    out
}

/// A TLS 1.3 client config without a client certificate that accepts only a controller
/// whose chain holds the CA with fingerprint `pin` and verifies against it.
fn pinned_client_config(
    pin: &str,
    wrong_pin: Arc<AtomicBool>,
) -> Result<Arc<rustls::ClientConfig>, rustls::Error> {
    let provider = sentinel_daemon::tls::provider();
    let mut config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PinnedCa {
            pin: pin.to_owned(),
            provider,
            wrong_pin,
        }))
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// Server verification against a CA known only by its fingerprint: the controller sends the
/// CA at the end of its chain; the one whose SHA-256 is the pin becomes the only root, and the
/// chain is verified against it as usual (signatures, validity, server name).
#[derive(Debug)]
struct PinnedCa {
    pin: String,
    provider: Arc<rustls::crypto::CryptoProvider>,
    /// Set when the pin did not match, so the caller can say so in words.
    wrong_pin: Arc<AtomicBool>,
}

/// The controller's chain holds no CA with the pinned fingerprint.
#[derive(Debug, thiserror::Error)]
#[error(
    "the controller's certificate does not chain to the CA the join token pins (SHA-256 {pin}); \
     refusing to send the token (a wrong controller address, a token of another fleet, or \
     someone in between)"
)]
struct WrongPin {
    pin: String,
}

impl ServerCertVerifier for PinnedCa {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let wrong_pin = || {
            self.wrong_pin.store(true, Ordering::SeqCst);
            rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(
                WrongPin {
                    pin: self.pin.clone(),
                },
            ))))
        };
        let ca = intermediates
            .iter()
            .find(|c| sentinel_daemon::csr::ca_fingerprint(c.as_ref()) == self.pin)
            .ok_or_else(wrong_pin)?;
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(ca.clone().into_owned())
            .map_err(|_| wrong_pin())?;
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            self.provider.clone(),
        )
        .build()
        .map_err(|e| rustls::Error::General(e.to_string()))?;
        verifier.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
