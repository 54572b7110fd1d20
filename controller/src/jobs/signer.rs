//! The controller's job-signing key.

use std::path::Path;

use ed25519_dalek::SigningKey;
use sentinel_proto::v1::{JobSpec, SignedJob};

/// Signs job specs with the fleet's Ed25519 key.
#[derive(Clone)]
pub struct Signer {
    key: SigningKey,
    key_id: String,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer")
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}

impl Signer {
    /// Loads the PKCS#8 PEM private key at `path`.
    pub fn load(path: &Path) -> Result<Self, crate::pki::PkiError> {
        let key = crate::pki::load_signing_key(path)?;
        Ok(Self::new(key))
    }

    /// A signer for `key`.
    pub fn new(key: SigningKey) -> Self {
        let key_id = sentinel_proto::envelope::key_id(&key.verifying_key());
        Self { key, key_id }
    }

    /// The key id agents look the public key up by.
    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    /// Signs a spec.
    pub fn sign(&self, spec: JobSpec) -> SignedJob {
        sentinel_proto::envelope::sign(spec, &self.key)
    }
}
