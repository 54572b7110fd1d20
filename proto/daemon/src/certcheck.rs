//! Checking a daemon's TLS files before it starts (and for `--check-config` / `sentinel config
//! check`): the files exist and parse, the key belongs to the certificate, the certificate is
//! valid now and chains to the fleet CA. Each failure is a [`ConfigError::Invalid`] naming the
//! config key (`tls.cert`, `tls.key`, `tls.ca`), the file and what to do, so that a daemon with
//! a bad certificate exits 64 with one clear line instead of retrying a handshake for ever.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::client::danger::ServerCertVerifier;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, Error as TlsErr};
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::config::ConfigError;
use crate::tls::{load_certs, load_key, load_roots, provider, TlsFiles};

/// What the certificate is for: the agent's and operators' client certificates, or the
/// controller's server certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Usage {
    /// A client certificate (TLS client authentication).
    Client,
    /// A server certificate.
    Server,
}

/// What a checked certificate says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checked {
    /// Its `sentinel://` URI SANs (`sentinel://host/NAME`, `sentinel://operator/ROLE/NAME`).
    pub identities: Vec<String>,
    /// Valid from.
    pub not_before: SystemTime,
    /// Valid until.
    pub not_after: SystemTime,
}

/// A time as RFC 3339 to the second.
pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

/// Checks `files` (the `[tls]` section of the config at `config`) at time `now`.
pub fn check_files(
    config: &Path,
    files: &TlsFiles,
    usage: Usage,
    now: SystemTime,
) -> Result<Checked, ConfigError> {
    let invalid = |key: &str, message: String| ConfigError::Invalid {
        path: config.to_path_buf(),
        key: key.into(),
        message,
    };
    let roots = load_roots(&files.ca).map_err(|e| invalid("tls.ca", e.to_string()))?;
    let certs =
        load_certs(&files.cert, "certificate").map_err(|e| invalid("tls.cert", e.to_string()))?;
    let key = load_key(&files.key).map_err(|e| invalid("tls.key", e.to_string()))?;
    let cert_file = files.cert.display();
    let (_, parsed) = X509Certificate::from_der(certs[0].as_ref()).map_err(|e| {
        invalid(
            "tls.cert",
            format!("{cert_file}: not an X.509 certificate: {e}"),
        )
    })?;
    let at = |t: x509_parser::time::ASN1Time| {
        UNIX_EPOCH + Duration::from_secs(u64::try_from(t.timestamp()).unwrap_or(0))
    };
    let (not_before, not_after) = (
        at(parsed.validity().not_before),
        at(parsed.validity().not_after),
    );
    // The key: rustls compares the key's public half with the certificate's.
    let signing = provider()
        .key_provider
        .load_private_key(key)
        .map_err(|e| invalid("tls.key", format!("{}: {e}", files.key.display())))?;
    let certified = rustls::sign::CertifiedKey::new(certs.clone(), signing);
    if let Err(TlsErr::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) =
        certified.keys_match()
    {
        return Err(invalid(
            "tls.key",
            format!(
                "{} is not the private key of the certificate {cert_file} (tls.cert): give the \
                 key that was made with this certificate, or issue a new certificate for it",
                files.key.display()
            ),
        ));
    }
    if let Err(problem) = validity_at(&files.cert, not_before, not_after, now) {
        return Err(invalid("tls.cert", problem));
    }
    let unix = UnixTime::since_unix_epoch(now.duration_since(UNIX_EPOCH).unwrap_or_default());
    chain(&roots, &certs, usage, unix).map_err(|e| {
        invalid(
            "tls.cert",
            format!(
                "{cert_file} does not chain to the CA {} (tls.ca): {e}; use the certificate \
                 issued by this fleet's CA, or the CA that issued it",
                files.ca.display()
            ),
        )
    })?;
    let mut identities = Vec::new();
    if let Ok(Some(san)) = parsed.subject_alternative_name() {
        for name in &san.value.general_names {
            if let GeneralName::URI(uri) = name {
                if uri.starts_with("sentinel://") {
                    identities.push(uri.to_string());
                }
            }
        }
    }
    Ok(Checked {
        identities,
        not_before,
        not_after,
    })
}

/// Why a certificate valid from `not_before` to `not_after` cannot be used at `now`.
fn validity_at(
    cert: &Path,
    not_before: SystemTime,
    not_after: SystemTime,
    now: SystemTime,
) -> Result<(), String> {
    let cert = cert.display();
    if now > not_after {
        return Err(format!(
            "{cert} expired at {} ({} ago): issue a new certificate",
            rfc3339(not_after),
            short(now.duration_since(not_after).unwrap_or_default())
        ));
    }
    if now < not_before {
        return Err(format!(
            "{cert} is not valid before {} (in {}): check this machine's clock",
            rfc3339(not_before),
            short(not_before.duration_since(now).unwrap_or_default())
        ));
    }
    Ok(())
}

/// Why the certificate in `cert` cannot be used now (expired, not valid yet), if it cannot:
/// checked before dialling, so that the answer does not depend on how the controller's refusal
/// arrives. A file that cannot be read is left to the TLS setup, which names it.
pub fn validity_problem(cert: &Path) -> Option<String> {
    let (not_before, not_after) = validity(cert)?;
    validity_at(cert, not_before, not_after, SystemTime::now()).err()
}

/// The validity window (not before, not after) of the first certificate in `cert`, if it
/// can be read.
pub fn validity(cert: &Path) -> Option<(SystemTime, SystemTime)> {
    let certs = load_certs(cert, "certificate").ok()?;
    let (_, parsed) = X509Certificate::from_der(certs.first()?.as_ref()).ok()?;
    let at = |t: x509_parser::time::ASN1Time| {
        UNIX_EPOCH + Duration::from_secs(u64::try_from(t.timestamp()).unwrap_or(0))
    };
    Some((
        at(parsed.validity().not_before),
        at(parsed.validity().not_after),
    ))
}

/// Verifies the chain as the peer will: against the CA only, for the certificate's usage.
fn chain(
    roots: &rustls::RootCertStore,
    certs: &[CertificateDer<'static>],
    usage: Usage,
    now: UnixTime,
) -> Result<(), TlsErr> {
    let roots = Arc::new(roots.clone());
    let (end_entity, intermediates) = (&certs[0], &certs[1..]);
    match usage {
        Usage::Client => {
            rustls::server::WebPkiClientVerifier::builder_with_provider(roots, provider())
                .build()
                .map_err(|e| TlsErr::General(e.to_string()))?
                .verify_client_cert(end_entity, intermediates, now)
                .map(|_| ())
        }
        Usage::Server => {
            let verifier =
                rustls::client::WebPkiServerVerifier::builder_with_provider(roots, provider())
                    .build()
                    .map_err(|e| TlsErr::General(e.to_string()))?;
            // The names the certificate serves are the clients' business (each checks the
            // address it dials); a name mismatch means the chain itself was fine.
            let name = ServerName::try_from("sentinel.invalid")
                .map_err(|e| TlsErr::General(e.to_string()))?;
            match verifier.verify_server_cert(end_entity, intermediates, &name, &[], now) {
                Ok(_)
                | Err(TlsErr::InvalidCertificate(
                    CertificateError::NotValidForName
                    | CertificateError::NotValidForNameContext { .. },
                )) => Ok(()),
                Err(e) => Err(e),
            }
        }
    }
}

/// A duration in its two largest units: `45s`, `3m12s`, `5h4m`, `2d3h`.
pub fn short(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{}s", s / 60, s % 60),
        3600..=86_399 => format!("{}h{}m", s / 3600, (s % 3600) / 60),
        _ => format!("{}d{}h", s / 86_400, (s % 86_400) / 3600),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{
        BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
        SanType,
    };

    struct Pki {
        dir: tempfile::TempDir,
        ca: rcgen::Certificate,
        issuer: Issuer<'static, KeyPair>,
    }

    fn new_pki() -> Pki {
        let ca_key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        let ca = params.self_signed(&ca_key).unwrap();
        Pki {
            dir: tempfile::tempdir().unwrap(),
            ca,
            issuer: Issuer::new(params, ca_key),
        }
    }

    impl Pki {
        fn files(&self, name: &str, not_after_days: i64, key_of: Option<&str>) -> TlsFiles {
            let key = KeyPair::generate().unwrap();
            let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
            params.subject_alt_names = vec![SanType::URI(
                format!("sentinel://host/{name}").try_into().unwrap(),
            )];
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
            let now = time::OffsetDateTime::now_utc();
            params.not_before = now - time::Duration::days(2);
            params.not_after = now + time::Duration::days(not_after_days);
            let cert = params.signed_by(&key, &self.issuer).unwrap();
            let path = |f: &str| self.dir.path().join(f);
            std::fs::write(path("ca.pem"), self.ca.pem()).unwrap();
            std::fs::write(path(&format!("{name}.pem")), cert.pem()).unwrap();
            if key_of.is_none() {
                std::fs::write(path(&format!("{name}.key")), key.serialize_pem()).unwrap();
            }
            TlsFiles {
                ca: path("ca.pem"),
                cert: path(&format!("{name}.pem")),
                key: path(&format!("{}.key", key_of.unwrap_or(name))),
            }
        }
    }

    fn check(files: &TlsFiles) -> Result<Checked, String> {
        check_files(
            Path::new("agent.toml"),
            files,
            Usage::Client,
            SystemTime::now(),
        )
        .map_err(|e| e.to_string())
    }

    #[test]
    fn a_good_certificate_passes_with_its_identity() {
        let pki = new_pki();
        let checked = check(&pki.files("argus", 30, None)).unwrap();
        assert_eq!(checked.identities, ["sentinel://host/argus"]);
    }

    #[test]
    fn each_problem_names_its_key_and_file() {
        let pki = new_pki();
        let good = pki.files("argus", 30, None);
        let other = pki.files("cerebro", 30, None);

        let mut missing = good.clone();
        missing.key = pki.dir.path().join("nope.key");
        let e = check(&missing).unwrap_err();
        assert!(e.contains("key `tls.key`") && e.contains("nope.key"), "{e}");

        let mut missing = good.clone();
        missing.cert = pki.dir.path().join("nope.pem");
        let e = check(&missing).unwrap_err();
        assert!(
            e.contains("key `tls.cert`") && e.contains("nope.pem"),
            "{e}"
        );

        let mismatched = TlsFiles {
            key: other.key.clone(),
            ..good.clone()
        };
        let e = check(&mismatched).unwrap_err();
        assert!(
            e.contains("key `tls.key`") && e.contains("is not the private key of"),
            "{e}"
        );

        let expired = pki.files("old", -1, None);
        let e = check(&expired).unwrap_err();
        assert!(
            e.contains("key `tls.cert`") && e.contains("expired at"),
            "{e}"
        );

        let foreign = new_pki();
        let stranger = foreign.files("stranger", 30, None);
        let e = check(&TlsFiles {
            ca: good.ca.clone(),
            ..stranger
        })
        .unwrap_err();
        assert!(e.contains("does not chain to the CA"), "{e}");
    }
}
