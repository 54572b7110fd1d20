//! Dev CA and certificate issuance, behind `sentinel pki` and `sentinel dev`:
//!
//! * a fleet CA (`ca.pem` / `ca.key`, ECDSA P-256, ten years),
//! * the controller's TLS server certificate (`controller.pem` / `controller.key`),
//! * one mTLS client certificate per host (`host-NAME.pem` / `host-NAME.key`),
//! * operator client certificates (`operator-NAME.pem` / `operator-NAME.key`),
//! * the Ed25519 job-signing key pair (`signing.key` PKCS#8 PEM, `signing.pub` SPKI PEM).
//!
//! Certificates carry the names of [`super::scheme`]; everything is generated in memory and
//! then written by [`super::files`].

use std::fs;
use std::io;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use rand::rngs::OsRng;
use rand::RngCore;
use rcgen::string::{Ia5String, PrintableString};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, DnValue,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose, SanType,
    SerialNumber,
};

use time::{Duration, OffsetDateTime};
use x509_parser::asn1_rs::Tag;
use x509_parser::extensions::ParsedExtension;
use x509_parser::x509::X509Name;

use super::files::{
    check_targets, ensure_dir, host_files, operator_files, write_planned, PlannedFile,
    CA_CERT_FILE, CA_KEY_FILE, CONTROLLER_CERT_FILE, CONTROLLER_KEY_FILE, SIGNING_KEY_FILE,
    SIGNING_PUB_FILE,
};
use super::keys::signing_key_files;
use super::scheme::{
    validate_name, Role, CA_COMMON_NAME, CONTROLLER_COMMON_NAME, CONTROLLER_OU, FLEET_ORGANIZATION,
    HOST_OU, HOST_URI_PREFIX, ISSUER_COMMON_NAME, OPERATOR_OU, OPERATOR_URI_PREFIX,
};
use super::PkiError;

/// Name of the operator whose certificate `init` issues (with role admin).
pub const INIT_OPERATOR: &str = "admin";

/// Host names seeded by [`default_hosts`] for a development fleet.
const SEED_HOSTS: [&str; 4] = ["hub-alfa", "prod-alfa", "argus", "cerebro"];
/// Validity of the fleet CA.
const CA_VALIDITY: Duration = Duration::days(3650);
/// Validity of leaf certificates (capped at the CA's expiry).
const LEAF_VALIDITY: Duration = Duration::days(365);
/// How far in the past `not_before` is set, to tolerate clock skew.
const CLOCK_SKEW: Duration = Duration::hours(1);

/// Options for [`init`].
#[derive(Debug, Clone, Default)]
pub struct InitOptions {
    /// Directory to write into; created with mode 0700 if missing.
    pub dir: PathBuf,
    /// Extra SANs for the controller certificate (IP if it parses as one, else DNS).
    pub extra_sans: Vec<String>,
    /// Hosts to issue certificates for (see [`default_hosts`]).
    pub hosts: Vec<String>,
    /// Replace existing files instead of refusing.
    pub force: bool,
}

/// Creates a fresh development PKI in `opts.dir`: fleet CA, controller server
/// certificate, one certificate per host, the `admin` operator certificate
/// and the job-signing key pair. Returns the files written, in write order.
///
/// Refuses (writing nothing) if any target exists and `opts.force` is unset.
pub fn init(opts: &InitOptions) -> Result<Vec<PathBuf>, PkiError> {
    let dir = opts.dir.as_path();
    let hosts = dedup(&opts.hosts);
    for host in &hosts {
        validate_name(host)?;
    }
    let controller_sans = controller_sans(&opts.extra_sans)?;

    let mut targets = vec![
        dir.join(CA_KEY_FILE),
        dir.join(CA_CERT_FILE),
        dir.join(CONTROLLER_KEY_FILE),
        dir.join(CONTROLLER_CERT_FILE),
    ];
    for host in &hosts {
        let (cert, key) = host_files(dir, host);
        targets.extend([key, cert]);
    }
    let (op_cert, op_key) = operator_files(dir, INIT_OPERATOR);
    targets.extend([op_key.clone(), op_cert.clone()]);
    targets.extend([dir.join(SIGNING_KEY_FILE), dir.join(SIGNING_PUB_FILE)]);
    check_targets(&targets, opts.force)?;

    // Generate everything in memory before touching the disk.
    let ca = Ca::generate()?;
    let mut planned = vec![
        PlannedFile::secret(dir.join(CA_KEY_FILE), ca.issuer.key().serialize_pem()),
        PlannedFile::public(dir.join(CA_CERT_FILE), ca.cert_pem.clone()),
    ];
    let controller = ca.issue(&Leaf::Controller {
        sans: &controller_sans,
    })?;
    planned.extend(controller.into_files(
        dir.join(CONTROLLER_CERT_FILE),
        dir.join(CONTROLLER_KEY_FILE),
    ));
    for host in &hosts {
        let (cert, key) = host_files(dir, host);
        planned.extend(ca.issue(&Leaf::Host(host))?.into_files(cert, key));
    }
    planned.extend(
        ca.issue(&Leaf::Operator(INIT_OPERATOR, Role::Admin))?
            .into_files(op_cert, op_key),
    );
    planned.extend(signing_key_files(dir)?);
    debug_assert_eq!(
        planned.iter().map(|f| &f.path).collect::<Vec<_>>(),
        targets.iter().collect::<Vec<_>>()
    );

    ensure_dir(dir)?;
    write_planned(dir, &planned, opts.force)
}

/// Issues a host certificate (`host-NAME.pem` / `host-NAME.key`) signed by the
/// fleet CA found in `dir`. Returns the files written.
pub fn issue_host(
    dir: &Path,
    name: &str,
    ttl: Option<std::time::Duration>,
    force: bool,
) -> Result<Vec<PathBuf>, PkiError> {
    validate_name(name)?;
    let (cert, key) = host_files(dir, name);
    issue_one(dir, &Leaf::Host(name), lifetime(ttl)?, cert, key, force)
}

/// Issues an operator certificate (`operator-NAME.pem` / `operator-NAME.key`)
/// carrying `role`, signed by the fleet CA found in `dir`. Returns the files written.
pub fn issue_operator(
    dir: &Path,
    name: &str,
    role: Role,
    ttl: Option<std::time::Duration>,
    force: bool,
) -> Result<Vec<PathBuf>, PkiError> {
    validate_name(name)?;
    let (cert, key) = operator_files(dir, name);
    let leaf = Leaf::Operator(name, role);
    issue_one(dir, &leaf, lifetime(ttl)?, cert, key, force)
}

/// A certificate lifetime from a `--ttl` (default: a year); under a minute is refused.
pub(super) fn lifetime(ttl: Option<std::time::Duration>) -> Result<Duration, PkiError> {
    let Some(ttl) = ttl else {
        return Ok(LEAF_VALIDITY);
    };
    if ttl < std::time::Duration::from_secs(30) {
        return Err(PkiError::InvalidTtl {
            ttl: humantime::format_duration(ttl).to_string(),
            reason: "certificates must live at least 30s".to_owned(),
        });
    }
    Duration::try_from(ttl).map_err(|e| PkiError::InvalidTtl {
        ttl: humantime::format_duration(ttl).to_string(),
        reason: e.to_string(),
    })
}

/// The development fleet's default hosts: the seed names `hub-alfa`,
/// `prod-alfa`, `argus`, `cerebro`, then `local_hostname` (trimmed and
/// lowercased), without duplicates. The local name is skipped, with a
/// warning, if it is not a valid name (see [`validate_name`]).
pub fn default_hosts(local_hostname: &str) -> Vec<String> {
    let mut hosts: Vec<String> = SEED_HOSTS.iter().map(|h| (*h).to_owned()).collect();
    let local = local_hostname.trim().to_ascii_lowercase();
    if local.is_empty() {
        return hosts;
    }
    match validate_name(&local) {
        Ok(()) => {
            if !hosts.contains(&local) {
                hosts.push(local);
            }
        }
        Err(err) => {
            tracing::warn!("not issuing a certificate for the local host: {err}");
        }
    }
    hosts
}

/// A CA able to sign leaf certificates (the fleet CA, or the online issuing CA).
pub(super) struct Ca {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
    /// The CA certificate, DER.
    cert_der: Vec<u8>,
    /// Raw DER of the CA's subject, to check issued certificates against.
    subject_der: Vec<u8>,
    not_after: OffsetDateTime,
}

/// The kinds of leaf certificate this module issues.
pub(super) enum Leaf<'a> {
    Controller { sans: &'a [SanType] },
    Host(&'a str),
    Operator(&'a str, Role),
}

impl Leaf<'_> {
    fn describe(&self) -> String {
        match self {
            Leaf::Controller { .. } => "controller certificate".to_owned(),
            Leaf::Host(name) => format!("host certificate for {name:?}"),
            Leaf::Operator(name, role) => format!("{role} operator certificate for {name:?}"),
        }
    }
}

/// A freshly issued certificate and its private key, PEM encoded.
pub(super) struct IssuedPair {
    pub(super) cert_pem: String,
    pub(super) key_pem: String,
}

impl IssuedPair {
    /// The key file first, so a certificate never appears without its key.
    pub(super) fn into_files(self, cert_path: PathBuf, key_path: PathBuf) -> [PlannedFile; 2] {
        [
            PlannedFile::secret(key_path, self.key_pem),
            PlannedFile::public(cert_path, self.cert_pem),
        ]
    }
}

impl Ca {
    /// Creates a new self-signed fleet CA.
    fn generate() -> Result<Ca, PkiError> {
        let key = new_key_pair("the fleet CA")?;
        let mut params = CertificateParams::default();
        params.distinguished_name = fleet_dn(CA_COMMON_NAME, None);
        // pathlen 1: the root may sign one online issuing CA (`sentinel pki init-issuer`),
        // which may sign only leaves.
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(1));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.serial_number = Some(random_serial());
        let (not_before, not_after) = validity(CA_VALIDITY, None);
        params.not_before = not_before;
        params.not_after = not_after;
        let cert = params.self_signed(&key).map_err(|source| PkiError::Rcgen {
            what: "self-sign the fleet CA certificate".to_owned(),
            source,
        })?;
        let subject_der = {
            let (_, parsed) = x509_parser::parse_x509_certificate(cert.der()).map_err(|e| {
                PkiError::InvalidCa {
                    path: PathBuf::from(CA_CERT_FILE),
                    reason: format!("generated CA certificate does not parse: {e}"),
                }
            })?;
            parsed.subject().as_raw().to_vec()
        };
        Ok(Ca {
            cert_pem: cert.pem(),
            cert_der: cert.der().to_vec(),
            issuer: Issuer::new(params, key),
            subject_der,
            not_after,
        })
    }

    /// Loads `ca.pem` and `ca.key` from `dir`, checking that they belong together.
    pub(super) fn load(dir: &Path) -> Result<Ca, PkiError> {
        Self::load_files(&dir.join(CA_CERT_FILE), &dir.join(CA_KEY_FILE), || {
            PkiError::MissingCa {
                dir: dir.to_owned(),
            }
        })
    }

    /// Loads a CA certificate (the first PEM block of `cert_path`) and its key, checking that
    /// they belong together; `missing` is the error for a file that does not exist.
    pub(super) fn load_files(
        cert_path: &Path,
        key_path: &Path,
        missing: impl Fn() -> PkiError,
    ) -> Result<Ca, PkiError> {
        let (cert_path, key_path) = (cert_path.to_owned(), key_path.to_owned());
        let read_ca_file = |path: &Path| match fs::read_to_string(path) {
            Ok(s) => Ok(s),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Err(missing()),
            Err(source) => Err(PkiError::Io {
                path: path.to_owned(),
                source,
            }),
        };
        let cert_pem = read_ca_file(&cert_path)?;
        let key_pem = read_ca_file(&key_path)?;
        let bad_cert = |reason: String| PkiError::InvalidCa {
            path: cert_path.clone(),
            reason,
        };

        let (_, pem) = x509_parser::pem::parse_x509_pem(cert_pem.as_bytes())
            .map_err(|e| bad_cert(format!("not a PEM certificate: {e}")))?;
        if pem.label != "CERTIFICATE" {
            return Err(bad_cert(format!(
                "expected a CERTIFICATE PEM block, found {:?}",
                pem.label
            )));
        }
        let (_, x509) = x509_parser::parse_x509_certificate(&pem.contents)
            .map_err(|e| bad_cert(format!("cannot parse certificate: {e}")))?;
        let is_ca = x509
            .basic_constraints()
            .map_err(|e| bad_cert(format!("bad basic constraints: {e}")))?
            .is_some_and(|bc| bc.value.ca);
        if !is_ca {
            return Err(bad_cert("not a CA certificate".to_owned()));
        }
        let not_after = x509.validity().not_after.to_datetime();
        if not_after <= OffsetDateTime::now_utc() {
            return Err(bad_cert(format!("expired on {not_after}")));
        }

        let key = KeyPair::from_pem(&key_pem).map_err(|e| PkiError::InvalidCa {
            path: key_path.clone(),
            reason: format!("cannot load the private key (PKCS#8 PEM expected): {e}"),
        })?;
        if key.public_key_raw() != x509.public_key().subject_public_key.data.as_ref() {
            return Err(PkiError::InvalidCa {
                path: key_path,
                reason: format!("does not match the public key in {}", cert_path.display()),
            });
        }

        let mut params = CertificateParams::default();
        params.distinguished_name = dn_from_x509(x509.subject()).map_err(bad_cert)?;
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        // Use the CA's own subject key identifier as the authority key
        // identifier of issued certificates, whatever method produced it.
        params.key_identifier_method = x509
            .iter_extensions()
            .find_map(|ext| match ext.parsed_extension() {
                ParsedExtension::SubjectKeyIdentifier(kid) => {
                    Some(KeyIdMethod::PreSpecified(kid.0.to_vec()))
                }
                _ => None,
            })
            .unwrap_or(KeyIdMethod::Sha256);
        let subject_der = x509.subject().as_raw().to_vec();

        Ok(Ca {
            issuer: Issuer::new(params, key),
            cert_der: pem.contents.clone(),
            cert_pem,
            subject_der,
            not_after,
        })
    }

    /// Issues a leaf certificate with a fresh ECDSA P-256 key, valid for a year.
    fn issue(&self, leaf: &Leaf<'_>) -> Result<IssuedPair, PkiError> {
        self.issue_for(leaf, LEAF_VALIDITY)
    }

    /// Issues a leaf certificate with a fresh ECDSA P-256 key, valid for `lifetime`.
    pub(super) fn issue_for(
        &self,
        leaf: &Leaf<'_>,
        lifetime: Duration,
    ) -> Result<IssuedPair, PkiError> {
        let key = new_key_pair(&leaf.describe())?;
        let cert_pem = self.sign_leaf(leaf, &key, lifetime)?.pem();
        Ok(IssuedPair {
            cert_pem,
            key_pem: key.serialize_pem(),
        })
    }

    /// Signs a leaf certificate for `public_key` (a fresh key, or a CSR's): the names of
    /// [`super::scheme`], valid for `lifetime` (capped at the CA's own expiry), back-dated by
    /// a tenth of it, at most an hour, for clock skew.
    pub(super) fn sign_leaf(
        &self,
        leaf: &Leaf<'_>,
        public_key: &impl rcgen::PublicKeyData,
        lifetime: Duration,
    ) -> Result<rcgen::Certificate, PkiError> {
        let what = leaf.describe();
        let rcgen_err = |action: &'static str| {
            let what = &what;
            move |source| PkiError::Rcgen {
                what: format!("{action} {what}"),
                source,
            }
        };
        let mut params = CertificateParams::default();
        match leaf {
            Leaf::Controller { sans } => {
                params.distinguished_name = fleet_dn(CONTROLLER_COMMON_NAME, Some(CONTROLLER_OU));
                params.subject_alt_names = sans.to_vec();
                params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
            }
            Leaf::Host(name) => {
                params.distinguished_name = fleet_dn(name, Some(HOST_OU));
                let uri = Ia5String::try_from(format!("{HOST_URI_PREFIX}{name}"))
                    .map_err(rcgen_err("encode the SAN URI of the"))?;
                params.subject_alt_names = vec![SanType::URI(uri)];
                params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
            }
            Leaf::Operator(name, role) => {
                params.distinguished_name = fleet_dn(name, Some(OPERATOR_OU));
                let uri = Ia5String::try_from(format!("{OPERATOR_URI_PREFIX}{role}/{name}"))
                    .map_err(rcgen_err("encode the SAN URI of the"))?;
                params.subject_alt_names = vec![SanType::URI(uri)];
                params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
            }
        }
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(random_serial());
        let (_, not_after) = validity(lifetime, Some(self.not_after));
        params.not_before = not_after - lifetime - (lifetime / 10_i32).min(CLOCK_SKEW);
        params.not_after = not_after;

        let cert = params
            .signed_by(public_key, &self.issuer)
            .map_err(rcgen_err("sign the"))?;

        // Belt and braces: the issuer name must be byte-identical to the CA's
        // subject, or TLS peers will not build the chain.
        let (_, parsed) =
            x509_parser::parse_x509_certificate(cert.der()).map_err(|e| PkiError::InvalidCa {
                path: PathBuf::from(CA_CERT_FILE),
                reason: format!("issued {what} does not parse: {e}"),
            })?;
        if parsed.issuer().as_raw() != self.subject_der.as_slice() {
            return Err(PkiError::InvalidCa {
                path: PathBuf::from(CA_CERT_FILE),
                reason: format!("issuer name of the {what} does not match the CA subject"),
            });
        }
        Ok(cert)
    }

    /// The CA certificate, PEM.
    pub(super) fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA certificate, DER.
    pub(super) fn cert_der(&self) -> &[u8] {
        &self.cert_der
    }

    /// Issues an online issuing CA (`CA:TRUE, pathlen:0`: it signs leaves only) with a fresh
    /// key, valid for `lifetime` (capped at this CA's expiry).
    pub(super) fn issue_issuing_ca(&self, lifetime: Duration) -> Result<IssuedPair, PkiError> {
        let key = new_key_pair("the issuing CA")?;
        let mut params = CertificateParams::default();
        params.distinguished_name = fleet_dn(ISSUER_COMMON_NAME, None);
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(random_serial());
        let (not_before, not_after) = validity(lifetime, Some(self.not_after));
        params.not_before = not_before;
        params.not_after = not_after;
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(|source| PkiError::Rcgen {
                what: "sign the issuing CA certificate".to_owned(),
                source,
            })?;
        Ok(IssuedPair {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

/// Loads the CA from `dir` and writes one certificate/key pair.
fn issue_one(
    dir: &Path,
    leaf: &Leaf<'_>,
    lifetime: Duration,
    cert_path: PathBuf,
    key_path: PathBuf,
    force: bool,
) -> Result<Vec<PathBuf>, PkiError> {
    let ca = Ca::load(dir)?;
    check_targets(&[key_path.clone(), cert_path.clone()], force)?;
    let planned = ca
        .issue_for(leaf, lifetime)?
        .into_files(cert_path, key_path);
    write_planned(dir, &planned, force)
}

/// The controller's SANs: DNS `localhost`, IP 127.0.0.1, then every extra
/// SAN (IP if it parses as one, else DNS), without duplicates.
fn controller_sans(extra: &[String]) -> Result<Vec<SanType>, PkiError> {
    let mut sans = vec![
        SanType::DnsName(
            Ia5String::try_from("localhost").map_err(|source| PkiError::Rcgen {
                what: "encode the controller SAN \"localhost\"".to_owned(),
                source,
            })?,
        ),
        SanType::IpAddress(IpAddr::from([127, 0, 0, 1])),
    ];
    for raw in extra {
        let san = raw.trim();
        let invalid = |reason: &str| PkiError::InvalidSan {
            san: raw.clone(),
            reason: reason.to_owned(),
        };
        let entry = if let Ok(ip) = san.parse::<IpAddr>() {
            SanType::IpAddress(ip)
        } else {
            if san.is_empty() {
                return Err(invalid("must not be empty"));
            }
            if san.len() > 253 {
                return Err(invalid("DNS names are at most 253 characters"));
            }
            if !san
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_' | '*'))
            {
                return Err(invalid(
                    "not an IP address, and a DNS name may only contain letters, digits, '-', '.', '_' and '*'",
                ));
            }
            SanType::DnsName(
                Ia5String::try_from(san.to_ascii_lowercase())
                    .map_err(|_| invalid("not encodable as IA5String"))?,
            )
        };
        if !sans.contains(&entry) {
            sans.push(entry);
        }
    }
    Ok(sans)
}

/// A subject DN `O=Sentinel fleet[, OU=ou], CN=cn` (UTF8String values).
fn fleet_dn(common_name: &str, unit: Option<&str>) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, FLEET_ORGANIZATION);
    if let Some(unit) = unit {
        dn.push(DnType::OrganizationalUnitName, unit);
    }
    dn.push(DnType::CommonName, common_name);
    dn
}

/// Rebuilds an rcgen distinguished name from a parsed certificate name,
/// preserving attribute order and string types so that issued certificates'
/// issuer field is byte-identical to the CA's subject.
fn dn_from_x509(name: &X509Name<'_>) -> Result<DistinguishedName, String> {
    let mut dn = DistinguishedName::new();
    for rdn in name.iter() {
        let mut attrs = rdn.iter();
        let (Some(attr), None) = (attrs.next(), attrs.next()) else {
            return Err("subject has an empty or multi-valued RDN (unsupported)".to_owned());
        };
        let oid: Vec<u64> = attr
            .attr_type()
            .iter()
            .ok_or_else(|| format!("subject attribute OID {} is too large", attr.attr_type()))?
            .collect();
        let value = attr.attr_value();
        let text = || {
            std::str::from_utf8(value.data)
                .map_err(|_| format!("subject attribute {} is not valid text", attr.attr_type()))
        };
        let dn_value = match value.tag() {
            Tag::Utf8String => DnValue::Utf8String(text()?.to_owned()),
            Tag::PrintableString => DnValue::PrintableString(
                PrintableString::try_from(text()?).map_err(|e| e.to_string())?,
            ),
            Tag::Ia5String => {
                DnValue::Ia5String(Ia5String::try_from(text()?).map_err(|e| e.to_string())?)
            }
            other => {
                return Err(format!(
                    "subject attribute {} uses unsupported string type {other}",
                    attr.attr_type()
                ))
            }
        };
        dn.push(DnType::from_oid(&oid), dn_value);
    }
    Ok(dn)
}

fn new_key_pair(what: &str) -> Result<KeyPair, PkiError> {
    KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(|source| PkiError::Rcgen {
        what: format!("generate a key pair for {what}"),
        source,
    })
}

/// A random positive 128-bit serial number.
fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    OsRng.fill_bytes(&mut bytes);
    // Positive, and exactly 16 bytes in DER (no leading zero octet needed).
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    SerialNumber::from_slice(&bytes)
}

/// `(now - CLOCK_SKEW, now + lifetime)`, the end capped at `cap`, whole seconds.
fn validity(lifetime: Duration, cap: Option<OffsetDateTime>) -> (OffsetDateTime, OffsetDateTime) {
    let now = OffsetDateTime::now_utc();
    let now = now.replace_nanosecond(0).unwrap_or(now);
    let mut not_after = now + lifetime;
    if let Some(cap) = cap {
        not_after = not_after.min(cap);
    }
    (now - CLOCK_SKEW, not_after)
}

fn dedup(names: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(names.len());
    for name in names {
        if !out.contains(name) {
            out.push(name.clone());
        }
    }
    out
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;
    use std::collections::{BTreeMap, BTreeSet};
    use std::os::unix::fs::PermissionsExt;
    use std::sync::Arc;

    use rustls::client::danger::ServerCertVerifier;
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
    use x509_parser::certificate::X509Certificate;
    use x509_parser::extensions::GeneralName;

    fn opts(dir: &Path) -> InitOptions {
        InitOptions {
            dir: dir.to_owned(),
            extra_sans: vec!["sentinel.example".into(), "10.0.0.5".into()],
            hosts: vec!["hub-alfa".into(), "argus".into()],
            force: false,
        }
    }

    fn expected_files() -> BTreeSet<&'static str> {
        [
            "ca.pem",
            "ca.key",
            "controller.pem",
            "controller.key",
            "host-hub-alfa.pem",
            "host-hub-alfa.key",
            "host-argus.pem",
            "host-argus.key",
            "operator-admin.pem",
            "operator-admin.key",
            "signing.key",
            "signing.pub",
        ]
        .into_iter()
        .collect()
    }

    fn listing(dir: &Path) -> BTreeSet<String> {
        fs::read_dir(dir)
            .expect("read dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect()
    }

    fn snapshot(dir: &Path) -> BTreeMap<String, Vec<u8>> {
        listing(dir)
            .into_iter()
            .map(|name| {
                let bytes = fs::read(dir.join(&name)).expect("read file");
                (name, bytes)
            })
            .collect()
    }

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).expect("metadata").permissions().mode() & 0o777
    }

    fn der(path: &Path) -> CertificateDer<'static> {
        CertificateDer::from_pem_file(path).expect("PEM certificate")
    }

    fn parse<'a>(der: &'a [u8]) -> X509Certificate<'a> {
        x509_parser::parse_x509_certificate(der).expect("x509").1
    }

    fn uris<'a>(cert: &'a X509Certificate<'_>) -> Vec<&'a str> {
        cert.subject_alternative_name()
            .expect("san ext")
            .expect("san present")
            .value
            .general_names
            .iter()
            .filter_map(|gn| match gn {
                GeneralName::URI(u) => Some(*u),
                _ => None,
            })
            .collect()
    }

    fn attr(name: &X509Name<'_>, which: &str) -> String {
        let mut values = match which {
            "CN" => name.iter_common_name().collect::<Vec<_>>(),
            "O" => name.iter_organization().collect(),
            "OU" => name.iter_organizational_unit().collect(),
            _ => unreachable!(),
        };
        assert_eq!(values.len(), 1, "{which} must appear once");
        values.remove(0).as_str().expect("string").to_owned()
    }

    fn provider() -> Arc<rustls::crypto::CryptoProvider> {
        Arc::new(rustls::crypto::ring::default_provider())
    }

    fn roots(dir: &Path) -> Arc<rustls::RootCertStore> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(der(&dir.join(CA_CERT_FILE))).expect("add root");
        Arc::new(roots)
    }

    /// Full chain validation as the controller's mTLS server will do it.
    fn assert_client_cert_accepted(dir: &Path, cert: &Path) {
        let verifier =
            rustls::server::WebPkiClientVerifier::builder_with_provider(roots(dir), provider())
                .build()
                .expect("client verifier");
        verifier
            .verify_client_cert(&der(cert), &[], UnixTime::now())
            .expect("client certificate chains to the fleet CA");
    }

    #[test]
    fn init_writes_every_file_with_the_right_modes() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("certs");
        let written = init(&opts(&dir)).expect("init");

        let names: BTreeSet<String> = written
            .iter()
            .map(|p| {
                assert_eq!(p.parent(), Some(dir.as_path()));
                p.file_name().expect("name").to_string_lossy().into_owned()
            })
            .collect();
        let expected: BTreeSet<String> = expected_files().iter().map(|s| s.to_string()).collect();
        assert_eq!(names, expected);
        assert_eq!(written.len(), expected.len());
        // Nothing else (no temporary files) in the directory.
        assert_eq!(listing(&dir), expected);

        assert_eq!(mode(&dir), 0o700);
        for name in &expected {
            let want = if name.ends_with(".key") { 0o600 } else { 0o644 };
            assert_eq!(mode(&dir.join(name)), want, "mode of {name}");
        }

        let ca_der = der(&dir.join(CA_CERT_FILE));
        let ca = parse(&ca_der);
        assert_eq!(attr(ca.subject(), "CN"), CA_COMMON_NAME);
        let bc = ca.basic_constraints().expect("bc").expect("bc present");
        assert!(bc.value.ca);
        let ku = ca.key_usage().expect("ku").expect("ku present").value;
        assert!(ku.key_cert_sign() && ku.crl_sign());
        let lifetime = ca.validity().not_after.timestamp() - ca.validity().not_before.timestamp();
        assert!(lifetime > 3640 * 86400, "CA valid for ~10 years");
        assert!(
            ca.validity().not_before.timestamp()
                < OffsetDateTime::now_utc().unix_timestamp() - 3000
        );
    }

    #[test]
    fn second_init_without_force_fails_and_changes_nothing() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().to_owned();
        init(&opts(&dir)).expect("first init");
        let before = snapshot(&dir);

        match init(&opts(&dir)) {
            Err(PkiError::Exists { path }) => assert_eq!(path.parent(), Some(dir.as_path())),
            other => panic!("expected Exists, got {other:?}"),
        }
        assert_eq!(snapshot(&dir), before);

        let mut forced = opts(&dir);
        forced.force = true;
        let written = init(&forced).expect("forced init");
        assert_eq!(written.len(), expected_files().len());
        let after = snapshot(&dir);
        assert_eq!(
            after.keys().collect::<Vec<_>>(),
            before.keys().collect::<Vec<_>>()
        );
        assert_ne!(after["ca.pem"], before["ca.pem"]);
        assert_eq!(mode(&dir.join(CA_KEY_FILE)), 0o600);
        assert_client_cert_accepted(&dir, &dir.join("host-argus.pem"));
    }

    #[test]
    fn a_single_existing_target_blocks_the_whole_init() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().to_owned();
        fs::write(dir.join("signing.pub"), b"keep me").expect("write");
        match init(&opts(&dir)) {
            Err(PkiError::Exists { path }) => assert_eq!(path, dir.join("signing.pub")),
            other => panic!("expected Exists, got {other:?}"),
        }
        assert_eq!(listing(&dir), BTreeSet::from(["signing.pub".to_owned()]));
        assert_eq!(fs::read(dir.join("signing.pub")).expect("read"), b"keep me");
    }

    #[test]
    fn host_certificate_carries_identity_and_chains_to_the_ca() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().to_owned();
        init(&opts(&dir)).expect("init");

        let ca_der = der(&dir.join(CA_CERT_FILE));
        let ca = parse(&ca_der);
        let host_path = dir.join("host-hub-alfa.pem");
        let host_der = der(&host_path);
        let host = parse(&host_der);

        assert_eq!(attr(host.subject(), "CN"), "hub-alfa");
        assert_eq!(attr(host.subject(), "O"), FLEET_ORGANIZATION);
        assert_eq!(attr(host.subject(), "OU"), HOST_OU);
        assert_eq!(uris(&host), vec!["sentinel://host/hub-alfa"]);
        let eku = host
            .extended_key_usage()
            .expect("eku")
            .expect("eku present")
            .value;
        assert!(eku.client_auth && !eku.server_auth);
        assert_eq!(host.issuer().as_raw(), ca.subject().as_raw());
        let bc = host.basic_constraints().expect("bc").expect("bc present");
        assert!(!bc.value.ca);
        assert!(host.validity().not_after.timestamp() <= ca.validity().not_after.timestamp());

        assert_client_cert_accepted(&dir, &host_path);
        assert_client_cert_accepted(&dir, &dir.join("operator-admin.pem"));

        // A host issued later from the loaded CA chains as well.
        let written = issue_host(&dir, "cerebro", None, false).expect("issue host");
        assert_eq!(
            written,
            vec![dir.join("host-cerebro.key"), dir.join("host-cerebro.pem")]
        );
        assert_eq!(mode(&dir.join("host-cerebro.key")), 0o600);
        assert_eq!(mode(&dir.join("host-cerebro.pem")), 0o644);
        assert_client_cert_accepted(&dir, &dir.join("host-cerebro.pem"));
        let later_der = der(&dir.join("host-cerebro.pem"));
        let later = parse(&later_der);
        assert_eq!(later.issuer().as_raw(), ca.subject().as_raw());
        assert_eq!(uris(&later), vec!["sentinel://host/cerebro"]);
    }

    #[test]
    fn controller_certificate_is_a_server_certificate_for_its_sans() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().to_owned();
        init(&opts(&dir)).expect("init");

        let cert_der = der(&dir.join(CONTROLLER_CERT_FILE));
        let cert = parse(&cert_der);
        let eku = cert
            .extended_key_usage()
            .expect("eku")
            .expect("eku present")
            .value;
        assert!(eku.server_auth && !eku.client_auth);

        let verifier =
            rustls::client::WebPkiServerVerifier::builder_with_provider(roots(&dir), provider())
                .build()
                .expect("server verifier");
        for name in ["localhost", "127.0.0.1", "sentinel.example", "10.0.0.5"] {
            let server_name = ServerName::try_from(name).expect("server name");
            verifier
                .verify_server_cert(&cert_der, &[], &server_name, &[], UnixTime::now())
                .unwrap_or_else(|e| panic!("controller cert not valid for {name}: {e}"));
        }
        let other = ServerName::try_from("evil.example").expect("server name");
        assert!(verifier
            .verify_server_cert(&cert_der, &[], &other, &[], UnixTime::now())
            .is_err());
    }

    #[test]
    fn operator_role_round_trips() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().to_owned();
        init(&opts(&dir)).expect("init");

        for (name, role) in [
            ("vera", Role::Viewer),
            ("dan", Role::Deployer),
            ("ada", Role::Admin),
        ] {
            issue_operator(&dir, name, role, None, false).expect("issue operator");
            let path = dir.join(format!("operator-{name}.pem"));
            assert_client_cert_accepted(&dir, &path);
            let cert_der = der(&path);
            let cert = parse(&cert_der);
            assert_eq!(attr(cert.subject(), "CN"), name);
            assert_eq!(attr(cert.subject(), "O"), FLEET_ORGANIZATION);
            assert_eq!(attr(cert.subject(), "OU"), OPERATOR_OU);
            let uri = uris(&cert);
            assert_eq!(uri.len(), 1);
            let rest = uri[0].strip_prefix(OPERATOR_URI_PREFIX).expect("prefix");
            let (role_str, parsed_name) = rest.split_once('/').expect("ROLE/NAME");
            assert_eq!(role_str.parse::<Role>().expect("role"), role);
            assert_eq!(parsed_name, name);
        }

        let admin_der = der(&dir.join("operator-admin.pem"));
        let admin = parse(&admin_der);
        assert_eq!(uris(&admin), vec!["sentinel://operator/admin/admin"]);

        // Re-issuing needs force.
        assert!(matches!(
            issue_operator(&dir, "dan", Role::Admin, None, false),
            Err(PkiError::Exists { .. })
        ));
        issue_operator(&dir, "dan", Role::Admin, None, true).expect("forced re-issue");
        let dan_der = der(&dir.join("operator-dan.pem"));
        assert_eq!(
            uris(&parse(&dan_der)),
            vec!["sentinel://operator/admin/dan"]
        );
    }

    #[test]
    fn issuing_with_an_invalid_name_or_san_writes_nothing() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().to_owned();
        init(&opts(&dir)).expect("init");
        let before = listing(&dir);
        assert!(matches!(
            issue_host(&dir, "../x", None, false),
            Err(PkiError::InvalidName { .. })
        ));
        assert!(matches!(
            issue_operator(&dir, "Bad_Name", Role::Viewer, None, false),
            Err(PkiError::InvalidName { .. })
        ));
        assert_eq!(listing(&dir), before);

        let mut bad_host = opts(&tmp.path().join("other"));
        bad_host.hosts.push("Bad_Name".into());
        assert!(matches!(init(&bad_host), Err(PkiError::InvalidName { .. })));
        assert!(!tmp.path().join("other").exists());

        let mut bad_san = opts(&tmp.path().join("other"));
        bad_san.extra_sans.push("no spaces".into());
        assert!(matches!(init(&bad_san), Err(PkiError::InvalidSan { .. })));
    }

    #[test]
    fn issuing_without_a_ca_is_a_clear_error() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().to_owned();
        match issue_host(&dir, "argus", None, false) {
            Err(PkiError::MissingCa { dir: d }) => assert_eq!(d, dir),
            other => panic!("expected MissingCa, got {other:?}"),
        }
        assert!(matches!(
            issue_operator(&dir.join("nope"), "ada", Role::Admin, None, false),
            Err(PkiError::MissingCa { .. })
        ));
        assert!(listing(&dir).is_empty());
    }

    #[test]
    fn mismatched_ca_key_is_refused() {
        let a = tempfile::tempdir().expect("tempdir");
        let b = tempfile::tempdir().expect("tempdir");
        init(&opts(a.path())).expect("init a");
        init(&opts(b.path())).expect("init b");
        fs::copy(b.path().join(CA_KEY_FILE), a.path().join(CA_KEY_FILE)).expect("copy");
        match issue_host(a.path(), "newhost", None, false) {
            Err(PkiError::InvalidCa { path, .. }) => {
                assert_eq!(path, a.path().join(CA_KEY_FILE))
            }
            other => panic!("expected InvalidCa, got {other:?}"),
        }
    }

    #[test]
    fn default_hosts_appends_the_local_host_once() {
        let seed = ["hub-alfa", "prod-alfa", "argus", "cerebro"];
        assert_eq!(default_hosts("argus"), seed);
        assert_eq!(
            default_hosts("MyLaptop"),
            ["hub-alfa", "prod-alfa", "argus", "cerebro", "mylaptop"]
        );
        assert_eq!(default_hosts(""), seed);
        assert_eq!(default_hosts("bad_name"), seed);
    }
}
