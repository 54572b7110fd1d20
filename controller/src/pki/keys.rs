//! The job-signing keys at runtime: the controller's signer loads `signing.key`, and
//! `signing.pub` is what agents trust. [`super::init`] writes the pair (see
//! [`signing_key_files`] for the encoding).

use std::fs;
use std::path::{Path, PathBuf};

use ed25519_dalek::pkcs8::spki::der::pem::LineEnding;
use ed25519_dalek::pkcs8::{DecodePrivateKey, DecodePublicKey, EncodePrivateKey, EncodePublicKey};
use rand::rngs::OsRng;

use super::files::{io_err, PlannedFile, SIGNING_KEY_FILE, SIGNING_PUB_FILE};
use super::PkiError;

/// Short identifier of a job-signing public key: the first 16 hex characters
/// of SHA-256 over the raw 32-byte Ed25519 public key.
pub fn signing_key_id(public_key: &ed25519_dalek::VerifyingKey) -> String {
    sentinel_proto::envelope::key_id(public_key)
}

/// Loads an Ed25519 job-signing private key from a PKCS#8 PEM file
/// (as written to `signing.key`).
pub fn load_signing_key(path: &Path) -> Result<ed25519_dalek::SigningKey, PkiError> {
    let pem = read_string(path)?;
    ed25519_dalek::SigningKey::from_pkcs8_pem(&pem).map_err(|e| PkiError::InvalidKey {
        path: path.to_owned(),
        reason: format!("not an Ed25519 PKCS#8 PEM private key: {e}"),
    })
}

/// Loads an Ed25519 job-signing public key from an SPKI PEM file
/// (as written to `signing.pub`).
pub fn load_verifying_key(path: &Path) -> Result<ed25519_dalek::VerifyingKey, PkiError> {
    let pem = read_string(path)?;
    ed25519_dalek::VerifyingKey::from_public_key_pem(&pem).map_err(|e| PkiError::InvalidKey {
        path: path.to_owned(),
        reason: format!("not an Ed25519 SPKI PEM public key: {e}"),
    })
}

/// The SPKI PEM public key of a job-signing key, as `signing.pub` holds it (what enrolment
/// hands a new agent to trust).
pub fn public_key_pem(key: &ed25519_dalek::SigningKey) -> Result<String, PkiError> {
    key.verifying_key()
        .to_public_key_pem(LineEnding::LF)
        .map_err(|e| PkiError::InvalidKey {
            path: SIGNING_PUB_FILE.into(),
            reason: format!("cannot encode the signing public key: {e}"),
        })
}

/// File names of the next job-signing key pair during a rotation.
pub const SIGNING_NEXT_KEY_FILE: &str = "signing-next.key";
/// See [`SIGNING_NEXT_KEY_FILE`].
pub const SIGNING_NEXT_PUB_FILE: &str = "signing-next.pub";
/// Where a promotion keeps the retired pair.
pub const SIGNING_OLD_KEY_FILE: &str = "signing-old.key";
/// See [`SIGNING_OLD_KEY_FILE`].
pub const SIGNING_OLD_PUB_FILE: &str = "signing-old.pub";

/// Signing-key rotation. Step 1 (`promote` false): makes `signing-next.key`/`.pub` in `dir`;
/// with `[signing] next_key` pointing at `signing-next.pub` the controller announces it to
/// every agent, signed by the current key, and agents persist it. Step 2 (`promote` true):
/// the next pair becomes `signing.key`/`.pub` (the old one is kept as `signing-old.*`); the
/// controller, restarted without `next_key`, then signs with it. Returns the files written.
pub fn rotate_signing_key(
    dir: &Path,
    promote: bool,
    force: bool,
) -> Result<Vec<PathBuf>, PkiError> {
    let (next_key, next_pub) = (
        dir.join(SIGNING_NEXT_KEY_FILE),
        dir.join(SIGNING_NEXT_PUB_FILE),
    );
    if !promote {
        super::files::ensure_dir(dir)?;
        super::files::check_targets(&[next_key.clone(), next_pub.clone()], force)?;
        let planned = key_pair_files(next_key, next_pub)?;
        return super::files::write_planned(dir, &planned, force);
    }
    // Both halves of the next pair must be there and belong together.
    let key = load_signing_key(&next_key)?;
    if load_verifying_key(&next_pub)? != key.verifying_key() {
        return Err(PkiError::InvalidKey {
            path: next_pub,
            reason: format!("is not the public half of {}", next_key.display()),
        });
    }
    let moves = [
        (dir.join(SIGNING_KEY_FILE), dir.join(SIGNING_OLD_KEY_FILE)),
        (dir.join(SIGNING_PUB_FILE), dir.join(SIGNING_OLD_PUB_FILE)),
        (next_key, dir.join(SIGNING_KEY_FILE)),
        (next_pub, dir.join(SIGNING_PUB_FILE)),
    ];
    super::files::check_targets(&[moves[0].1.clone(), moves[1].1.clone()], force)?;
    let mut written = Vec::new();
    for (from, to) in moves {
        fs::rename(&from, &to).map_err(io_err(&from))?;
        written.push(to);
    }
    Ok(written)
}

/// Generates the Ed25519 job-signing key pair as planned files.
pub(super) fn signing_key_files(dir: &Path) -> Result<[PlannedFile; 2], PkiError> {
    key_pair_files(dir.join(SIGNING_KEY_FILE), dir.join(SIGNING_PUB_FILE))
}

/// A new Ed25519 key pair as planned files at `key_path` (PKCS#8) and `pub_path` (SPKI).
fn key_pair_files(key_path: PathBuf, pub_path: PathBuf) -> Result<[PlannedFile; 2], PkiError> {
    let signing_key = ed25519_dalek::SigningKey::generate(&mut OsRng);
    // PKCS#8 v1 (no embedded public key): OpenSSL 3.0 cannot read the v2
    // form ed25519-dalek writes by default; dalek reads both.
    let key_bytes = ed25519_dalek::pkcs8::KeypairBytes {
        secret_key: signing_key.to_bytes(),
        public_key: None,
    };
    let key_pem = key_bytes
        .to_pkcs8_pem(LineEnding::LF)
        .map_err(|e| PkiError::InvalidKey {
            path: key_path.clone(),
            reason: format!("cannot encode the signing key: {e}"),
        })?;
    let pub_pem = signing_key
        .verifying_key()
        .to_public_key_pem(LineEnding::LF)
        .map_err(|e| PkiError::InvalidKey {
            path: pub_path.clone(),
            reason: format!("cannot encode the signing public key: {e}"),
        })?;
    Ok([
        PlannedFile::secret(key_path, key_pem.as_str().to_owned()),
        PlannedFile::public(pub_path, pub_pem),
    ])
}

fn read_string(path: &Path) -> Result<String, PkiError> {
    fs::read_to_string(path).map_err(io_err(path))
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;
    use crate::pki::files::CA_CERT_FILE;
    use crate::pki::{init, InitOptions};

    use ed25519_dalek::{Signer, Verifier};

    #[test]
    fn signing_key_pair_loads_and_verifies() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().to_owned();
        init(&InitOptions {
            dir: dir.clone(),
            hosts: vec!["hub-alfa".into()],
            ..InitOptions::default()
        })
        .expect("init");

        let signing = load_signing_key(&dir.join(SIGNING_KEY_FILE)).expect("signing.key");
        let public = load_verifying_key(&dir.join(SIGNING_PUB_FILE)).expect("signing.pub");
        assert_eq!(signing.verifying_key(), public);

        let message = b"job: deploy web 1.2.3";
        let signature = signing.sign(message);
        public
            .verify(message, &signature)
            .expect("signature verifies");
        assert!(public.verify(b"job: deploy evil", &signature).is_err());

        let id = signing_key_id(&public);
        assert_eq!(id.len(), 16);
        assert!(id.chars().all(|c| c.is_ascii_hexdigit()));
        use sha2::{Digest, Sha256};
        assert_eq!(id, hex::encode(Sha256::digest(public.to_bytes()))[..16]);

        assert!(matches!(
            load_verifying_key(&dir.join(CA_CERT_FILE)),
            Err(PkiError::InvalidKey { .. })
        ));
    }
}
