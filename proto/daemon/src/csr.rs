//! A host's own key and its certificate signing requests, and the fleet CA's fingerprint: what
//! `hostagent enroll` and the agent's renewal send, what the controller's join tokens pin.

use sha2::{Digest, Sha256};

/// Prefix of the SAN URI that names a host: `sentinel://host/NAME`.
pub const HOST_URI_PREFIX: &str = "sentinel://host/";

/// The fingerprint join tokens carry: SHA-256 of the CA certificate's DER, lowercase hex.
pub fn ca_fingerprint(der: &[u8]) -> String {
    hex::encode(Sha256::digest(der))
}

/// A fresh ECDSA P-256 key for a host; it never leaves the host.
pub fn new_host_key() -> Result<rcgen::KeyPair, rcgen::Error> {
    rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
}

/// A PKCS#10 request (DER) for host `name` with `key`: subject CN and SAN URI
/// `sentinel://host/NAME`, as the controller expects them.
pub fn host_csr(name: &str, key: &rcgen::KeyPair) -> Result<Vec<u8>, rcgen::Error> {
    let mut params = rcgen::CertificateParams::default();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    let uri = rcgen::string::Ia5String::try_from(format!("{HOST_URI_PREFIX}{name}"))?;
    params.subject_alt_names = vec![rcgen::SanType::URI(uri)];
    Ok(params.serialize_request(key)?.der().to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_csr_names_the_host_and_the_fingerprint_is_sha256_hex() {
        let key = new_host_key().expect("key");
        let csr = host_csr("argus", &key).expect("csr");
        assert!(key.serialize_pem().contains("PRIVATE KEY"));
        assert!(csr.windows(5).any(|w| w == b"argus"));
        assert_eq!(
            ca_fingerprint(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
