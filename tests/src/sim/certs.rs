//! Host certificates for simulated agents, issued in bulk. `sentinel pki issue-host` loads the
//! CA and fsyncs three times per host, which is minutes for 10,000 hosts; here the fleet CA is
//! loaded once, certificates are made on every core, and written (atomically, no fsync: this is
//! a cache) in the layout and encoding `sentinel::pki` uses, so the controller cannot tell them
//! from real ones. A marker file remembers which CA the cached files chain to, so a re-run
//! reuses them and a new CA reissues them.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use rand::RngCore;
use rcgen::string::{Ia5String, PrintableString};
use rcgen::{
    CertificateParams, DistinguishedName, DnType, DnValue, ExtendedKeyUsagePurpose, IsCa, Issuer,
    KeyIdMethod, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use sentinel::pki;
use sha2::{Digest, Sha256};
use time::OffsetDateTime;
use x509_parser::asn1_rs::Tag;
use x509_parser::extensions::ParsedExtension;

/// Records the SHA-256 of the `ca.pem` the cached host certificates chain to.
const MARKER_FILE: &str = "fleet-sim.ca-sha256";
/// Validity of simulated host certificates (capped at the CA's expiry).
const LEAF_DAYS: i64 = 365;

/// What [`ensure_hosts`] did.
#[derive(Debug, Clone, Copy)]
pub struct Issued {
    /// Certificates made now.
    pub issued: usize,
    /// Certificates found in the cache.
    pub reused: usize,
    /// Wall time.
    pub took: Duration,
}

/// Makes a dev PKI (fleet CA, controller and `admin` operator certificates, signing keys) in
/// `dir` with `sentinel::pki::init`, unless `dir` already holds a CA.
pub fn ensure_pki(dir: &Path) -> Result<()> {
    if dir.join(pki::CA_CERT_FILE).exists() {
        return Ok(());
    }
    pki::init(&pki::InitOptions {
        dir: dir.to_path_buf(),
        extra_sans: Vec::new(),
        hosts: Vec::new(),
        force: false,
    })
    .with_context(|| format!("creating a dev PKI in {}", dir.display()))?;
    Ok(())
}

/// Makes sure `host-NAME.pem`/`.key` exist in `dir` for every name, signed by the CA in
/// `dir`: cached ones are kept if they were issued by this very CA, the others are issued now.
pub fn ensure_hosts(dir: &Path, names: &[String]) -> Result<Issued> {
    let started = Instant::now();
    let ca_pem = fs::read(dir.join(pki::CA_CERT_FILE))
        .with_context(|| format!("reading the fleet CA in {}", dir.display()))?;
    let fingerprint = hex::encode(Sha256::digest(&ca_pem));
    let marker = dir.join(MARKER_FILE);
    let cache_valid = fs::read_to_string(&marker).is_ok_and(|m| m.trim() == fingerprint);
    let missing: Vec<&String> = names
        .iter()
        .filter(|name| {
            let (cert, key) = pki::host_files(dir, name);
            !(cache_valid && cert.exists() && key.exists())
        })
        .collect();
    if missing.is_empty() {
        return Ok(Issued {
            issued: 0,
            reused: names.len(),
            took: started.elapsed(),
        });
    }
    let ca = BulkCa::load(dir)?;
    check_first(&ca, dir, missing[0])?;
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let chunk = missing.len().div_ceil(threads).max(1);
    std::thread::scope(|scope| {
        let workers: Vec<_> = missing
            .chunks(chunk)
            .map(|names| {
                let ca = &ca;
                scope.spawn(move || -> Result<()> {
                    for name in names {
                        ca.issue_to_files(dir, name)?;
                    }
                    Ok(())
                })
            })
            .collect();
        workers.into_iter().try_for_each(|w| {
            w.join()
                .map_err(|_| anyhow!("a certificate worker panicked"))?
        })
    })?;
    write_atomic(&marker, format!("{fingerprint}\n").as_bytes(), 0o644)?;
    Ok(Issued {
        issued: missing.len(),
        reused: names.len() - missing.len(),
        took: started.elapsed(),
    })
}

/// Issues the first certificate and checks it the way the controller will: the issuer name
/// must be byte-identical to the CA's subject, and the controller's own identity parser must
/// read the host name back.
fn check_first(ca: &BulkCa, dir: &Path, name: &str) -> Result<()> {
    let (cert_path, _) = ca.issue_to_files(dir, name)?;
    let pem = fs::read(&cert_path).with_context(|| format!("reading {}", cert_path.display()))?;
    let (_, pem) = x509_parser::pem::parse_x509_pem(&pem)
        .map_err(|e| anyhow!("{} is not PEM: {e}", cert_path.display()))?;
    let x509 = pem
        .parse_x509()
        .map_err(|e| anyhow!("{} does not parse: {e}", cert_path.display()))?;
    if x509.issuer().as_raw() != ca.subject_der.as_slice() {
        bail!(
            "{}: issuer name differs from the CA subject",
            cert_path.display()
        );
    }
    match sentinel::identity::from_certificate(&pem.contents) {
        Ok(sentinel::identity::Identity::Host(got)) if got == name => Ok(()),
        other => bail!(
            "{}: the controller would read {other:?}, not host {name:?}",
            cert_path.display()
        ),
    }
}

/// The fleet CA, loaded once.
struct BulkCa {
    issuer: Issuer<'static, KeyPair>,
    subject_der: Vec<u8>,
    not_after: OffsetDateTime,
}

impl BulkCa {
    fn load(dir: &Path) -> Result<Self> {
        let cert_path = dir.join(pki::CA_CERT_FILE);
        let key_path = dir.join(pki::CA_KEY_FILE);
        let cert_pem =
            fs::read(&cert_path).with_context(|| format!("reading {}", cert_path.display()))?;
        let key_pem = fs::read_to_string(&key_path)
            .with_context(|| format!("reading {}", key_path.display()))?;
        let (_, pem) = x509_parser::pem::parse_x509_pem(&cert_pem)
            .map_err(|e| anyhow!("{} is not PEM: {e}", cert_path.display()))?;
        let x509 = pem
            .parse_x509()
            .map_err(|e| anyhow!("{} does not parse: {e}", cert_path.display()))?;
        let key = KeyPair::from_pem(&key_pem)
            .with_context(|| format!("loading the CA key {}", key_path.display()))?;
        if key.public_key_raw() != x509.public_key().subject_public_key.data.as_ref() {
            bail!(
                "{} does not belong to {}",
                key_path.display(),
                cert_path.display()
            );
        }
        let mut params = CertificateParams::default();
        params.distinguished_name = dn_from_x509(x509.subject())
            .with_context(|| format!("reading the subject of {}", cert_path.display()))?;
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        // The authority key identifier of issued certificates must be the CA's own subject
        // key identifier, however it was computed.
        params.key_identifier_method = x509
            .iter_extensions()
            .find_map(|ext| match ext.parsed_extension() {
                ParsedExtension::SubjectKeyIdentifier(kid) => {
                    Some(KeyIdMethod::PreSpecified(kid.0.to_vec()))
                }
                _ => None,
            })
            .unwrap_or(KeyIdMethod::Sha256);
        Ok(Self {
            subject_der: x509.subject().as_raw().to_vec(),
            not_after: x509.validity().not_after.to_datetime(),
            issuer: Issuer::new(params, key),
        })
    }

    /// Issues a host certificate for `name` and writes it with its key into `dir`.
    fn issue_to_files(&self, dir: &Path, name: &str) -> Result<(PathBuf, PathBuf)> {
        pki::validate_name(name)?;
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .with_context(|| format!("generating a key for host {name}"))?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, pki::FLEET_ORGANIZATION);
        dn.push(DnType::OrganizationalUnitName, pki::HOST_OU);
        dn.push(DnType::CommonName, name);
        params.distinguished_name = dn;
        let uri = Ia5String::try_from(format!("{}{name}", pki::HOST_URI_PREFIX))
            .with_context(|| format!("encoding the SAN URI of host {name}"))?;
        params.subject_alt_names = vec![SanType::URI(uri)];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(random_serial());
        let now = OffsetDateTime::now_utc();
        let now = now.replace_nanosecond(0).unwrap_or(now);
        params.not_before = now - time::Duration::hours(1);
        params.not_after = (now + time::Duration::days(LEAF_DAYS)).min(self.not_after);
        let cert = params
            .signed_by(&key, &self.issuer)
            .with_context(|| format!("signing the certificate of host {name}"))?;
        let (cert_path, key_path) = pki::host_files(dir, name);
        write_atomic(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
        write_atomic(&cert_path, cert.pem().as_bytes(), 0o644)?;
        Ok((cert_path, key_path))
    }
}

/// Rebuilds an rcgen name from a parsed one, keeping order and string types, so the issuer
/// field of issued certificates is byte-identical to the CA's subject.
fn dn_from_x509(name: &x509_parser::x509::X509Name<'_>) -> Result<DistinguishedName> {
    let mut dn = DistinguishedName::new();
    for rdn in name.iter() {
        for attr in rdn.iter() {
            let oid: Vec<u64> = attr
                .attr_type()
                .iter()
                .ok_or_else(|| anyhow!("OID {} too large", attr.attr_type()))?
                .collect();
            let value = attr.attr_value();
            let text = std::str::from_utf8(value.data)
                .with_context(|| format!("attribute {} is not text", attr.attr_type()))?;
            let value = match value.tag() {
                Tag::Utf8String => DnValue::Utf8String(text.to_owned()),
                Tag::PrintableString => DnValue::PrintableString(PrintableString::try_from(text)?),
                Tag::Ia5String => DnValue::Ia5String(Ia5String::try_from(text)?),
                other => bail!("attribute {} has string type {other}", attr.attr_type()),
            };
            dn.push(DnType::from_oid(&oid), value);
        }
    }
    Ok(dn)
}

/// A random positive 128-bit serial number.
fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    rand::thread_rng().fill_bytes(&mut bytes);
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    SerialNumber::from_slice(&bytes)
}

/// Writes through a temporary file and a rename, so an interrupted run never leaves half a
/// key behind; keys get mode 0600. No fsync: this is a cache a re-run rebuilds.
fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> Result<()> {
    let how = sentinel_daemon::fs::AtomicWrite {
        durable: false,
        ..sentinel_daemon::fs::AtomicWrite::new(mode)
    };
    Ok(sentinel_daemon::fs::write_atomic_with(path, contents, how)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bulk_certificates_chain_to_the_dev_ca_and_are_cached() {
        let dir = tempfile::tempdir().unwrap();
        ensure_pki(dir.path()).unwrap();
        let names: Vec<String> = (0..3).map(|i| format!("sim-{i:05}")).collect();
        let first = ensure_hosts(dir.path(), &names).unwrap();
        assert_eq!((first.issued, first.reused), (3, 0));
        let again = ensure_hosts(dir.path(), &names).unwrap();
        assert_eq!((again.issued, again.reused), (0, 3));

        // The agent's own TLS loader accepts them.
        let (cert, key) = pki::host_files(dir.path(), "sim-00002");
        sentinel_daemon::tls::client_config(&sentinel_daemon::tls::TlsFiles {
            ca: dir.path().join(pki::CA_CERT_FILE),
            cert,
            key,
        })
        .unwrap();
    }
}
