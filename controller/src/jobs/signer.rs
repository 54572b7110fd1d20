//! The controller's job-signing key.

use std::path::Path;

use ed25519_dalek::SigningKey;
use sentinel_proto::v1::{JobSpec, SignedJob};

/// Signs job specs with the fleet's Ed25519 key.
#[derive(Clone)]
pub struct Signer {
    key: SigningKey,
    key_id: String,
    /// Keys announced to agents besides this one: the next signing key during a rotation.
    next: Vec<ed25519_dalek::VerifyingKey>,
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
        Self {
            key,
            key_id,
            next: Vec::new(),
        }
    }

    /// The same signer, also announcing `next` to agents (signing-key rotation, step 1).
    pub fn with_next(mut self, next: ed25519_dalek::VerifyingKey) -> Self {
        self.next.push(next);
        self
    }

    /// The keys agents should trust (this one and the next), signed by this one.
    pub fn trusted_keys(&self) -> sentinel_proto::v1::TrustedKeys {
        let mut keys = vec![self.key.verifying_key()];
        keys.extend(self.next.iter().copied());
        sentinel_proto::envelope::sign_keys(&keys, &self.key)
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
