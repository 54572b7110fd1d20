//! TLS material: loading PEM certificates and keys, the system's trusted roots, the agent's
//! TLS 1.3-only client config that presents the host certificate and trusts only the fleet
//! CA, and the plain server-authenticating client config (HTTPS, PostgreSQL).

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde::Deserialize;

/// Where a party's TLS files are.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    /// The fleet CA certificate (PEM) that peers must chain to.
    pub ca: PathBuf,
    /// Our own certificate (PEM).
    pub cert: PathBuf,
    /// Our private key (PEM, PKCS#8 or SEC1).
    pub key: PathBuf,
}

/// What went wrong while loading TLS material.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read or parsed as PEM.
    #[error("reading {what} {path}: {message}")]
    Read {
        /// "CA certificate", "certificate" or "private key".
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The reason.
        message: String,
    },
    /// The material was read but rustls refused it.
    #[error("building TLS config: {0}")]
    Config(String),
}

/// Reads every certificate in a PEM file; an empty file is an error.
pub fn load_certs(
    path: &Path,
    what: &'static str,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let read_err = |message: String| TlsError::Read {
        what,
        path: path.to_path_buf(),
        message,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| read_err(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| read_err(e.to_string()))?;
    if certs.is_empty() {
        return Err(read_err("no PEM certificate found".into()));
    }
    Ok(certs)
}

/// Reads the first private key in a PEM file.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| TlsError::Read {
        what: "private key",
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

/// A root store holding only the fleet CA(s) from `path`.
pub fn load_roots(path: &Path) -> Result<rustls::RootCertStore, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in load_certs(path, "CA certificate")? {
        roots.add(cert).map_err(|e| TlsError::Read {
            what: "CA certificate",
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
    }
    Ok(roots)
}

/// The system's trusted roots (rustls-native-certs: `SSL_CERT_FILE` / `SSL_CERT_DIR`, else
/// the distribution's bundle). Certificates that do not parse are skipped; none at all is an
/// error.
pub fn system_roots() -> Result<rustls::RootCertStore, TlsError> {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = rustls::RootCertStore::empty();
    let (added, _ignored) = roots.add_parsable_certificates(found.certs);
    if added == 0 {
        let errors: Vec<String> = found.errors.iter().map(|e| e.to_string()).collect();
        return Err(TlsError::Config(format!(
            "no trusted system CA certificates found{}; install ca-certificates, set \
             SSL_CERT_FILE, or give the server's CA explicitly",
            if errors.is_empty() {
                String::new()
            } else {
                format!(" ({})", errors.join("; "))
            }
        )));
    }
    Ok(roots)
}

/// A client config that checks the server against `roots` and presents no certificate:
/// TLS 1.2 or 1.3 (rustls' safe defaults), ring. What HTTPS requests and PostgreSQL use.
pub fn server_auth_config(roots: rustls::RootCertStore) -> Result<rustls::ClientConfig, TlsError> {
    Ok(rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// The crypto provider both sides use (ring: no C toolchain beyond what rustls needs anyway).
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The agent's client config: TLS 1.3 only, the fleet CA as the only root, our host certificate
/// as client certificate, ALPN h2 for gRPC.
pub fn client_config(files: &TlsFiles) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let roots = load_roots(&files.ca)?;
    let certs = load_certs(&files.cert, "certificate")?;
    let key = load_key(&files.key)?;
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_root_certificates(roots)
        .with_client_auth_cert(certs, key)
        .map_err(|e| {
            TlsError::Config(format!(
                "{} / {}: {e}",
                files.cert.display(),
                files.key.display()
            ))
        })?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// Opens a TCP connection to `addr` and runs the TLS handshake, checking the server
/// certificate against `server_name`.
pub async fn connect(
    addr: &str,
    server_name: ServerName<'static>,
    config: Arc<rustls::ClientConfig>,
) -> io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    tokio_rustls::TlsConnector::from(config)
        .connect(server_name, tcp)
        .await
}

/// How long the TCP connect plus TLS handshake may take.
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// A gRPC channel to `addr` over our own TLS config (TLS 1.3 only, client certificate), which
/// tonic's built-in TLS cannot be told to enforce. Used by the agent and the operator CLI.
pub async fn channel(
    addr: &str,
    server_name: Option<&str>,
    tls: Arc<rustls::ClientConfig>,
) -> Result<tonic::transport::Channel, String> {
    let server_name = server_name_for(addr, server_name)?;
    // The URI only feeds HTTP/2's :authority; the connector does the real dialing.
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| format!("controller address {addr:?}: {e}"))?
        .connect_timeout(CONNECT_TIMEOUT)
        .http2_keep_alive_interval(std::time::Duration::from_secs(30))
        .keep_alive_timeout(std::time::Duration::from_secs(20));
    let addr = addr.to_string();
    let connector = tower::service_fn(move |_uri: http::Uri| {
        let (addr, name, tls) = (addr.clone(), server_name.clone(), tls.clone());
        async move {
            let stream = tokio::time::timeout(CONNECT_TIMEOUT, connect(&addr, name, tls))
                .await
                .map_err(|_| {
                    io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out")
                })??;
            Ok::<_, io::Error>(hyper_util::rt::TokioIo::new(stream))
        }
    });
    endpoint
        .connect_with_connector(connector)
        .await
        .map_err(|e| {
            crate::tls_explain::find(&e)
                .and_then(crate::tls_explain::client)
                .unwrap_or_else(|| crate::error_chain(&e))
        })
}

/// The TLS server name to check for a controller address: its host part (an IP address or a
/// DNS name), unless the config overrides it.
pub fn server_name_for(
    addr: &str,
    overridden: Option<&str>,
) -> Result<ServerName<'static>, String> {
    let host = match overridden {
        Some(name) => name.to_string(),
        None => match addr.parse::<SocketAddr>() {
            Ok(sa) => sa.ip().to_string(),
            Err(_) => addr
                .rsplit_once(':')
                .map(|(h, _)| h.trim_matches(['[', ']']).to_string())
                .ok_or_else(|| format!("controller address {addr:?} has no :port"))?,
        },
    };
    ServerName::try_from(host.clone()).map_err(|e| format!("invalid TLS server name {host:?}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_name_comes_from_the_address_host() {
        assert_eq!(
            server_name_for("127.0.0.1:7443", None).unwrap().to_str(),
            "127.0.0.1"
        );
        assert_eq!(
            server_name_for("sentinel.example:7443", None)
                .unwrap()
                .to_str(),
            "sentinel.example"
        );
        assert_eq!(server_name_for("[::1]:7443", None).unwrap().to_str(), "::1");
        assert_eq!(
            server_name_for("10.0.0.1:7443", Some("localhost"))
                .unwrap()
                .to_str(),
            "localhost"
        );
        assert!(server_name_for("no-port", None).is_err());
    }

    #[test]
    fn missing_files_name_the_path() {
        let err = load_certs(Path::new("/nonexistent/ca.pem"), "CA certificate").unwrap_err();
        assert!(err.to_string().contains("/nonexistent/ca.pem"), "{err}");
    }
}
