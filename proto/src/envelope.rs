//! The signed-job envelope: how the controller signs a [`JobSpec`] and how an agent checks one.
//! The signature covers a fixed context string followed by the exact encoded bytes carried in
//! [`SignedJob::spec`]; the agent verifies those bytes before decoding them, so there is no
//! canonicalisation step that two sides could disagree on.

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use prost::Message;
use sha2::{Digest, Sha256};

use crate::v1::{JobSpec, RefusalReason, SignedJob, TrustedKeyList, TrustedKeys};

/// Domain separation: a signature over a job can never be replayed as a signature over
/// anything else we might sign later.
pub const SIGNING_CONTEXT: &[u8] = b"sentinel.v1.JobSpec\0";

/// The id of a job-signing key: the first 16 hex digits of the SHA-256 of its raw public key.
pub fn key_id(key: &VerifyingKey) -> String {
    let digest = Sha256::digest(key.as_bytes());
    hex::encode(&digest[..8])
}

/// Domain separation of a signed list of trusted keys (see [`sign_keys`]).
pub const KEYS_CONTEXT: &[u8] = b"sentinel.v1.TrustedKeyList\0";

/// Signs the list of job-signing public keys agents should trust, with `key` (one they trust).
pub fn sign_keys(keys: &[VerifyingKey], key: &SigningKey) -> TrustedKeys {
    let list = TrustedKeyList {
        public_keys: keys.iter().map(|k| k.as_bytes().to_vec()).collect(),
    }
    .encode_to_vec();
    let mut signed = KEYS_CONTEXT.to_vec();
    signed.extend_from_slice(&list);
    TrustedKeys {
        signature: key.sign(&signed).to_bytes().to_vec(),
        key_id: key_id(&key.verifying_key()),
        keys: list,
    }
}

/// Checks a signed key list against the keys already `trusted` and returns its keys. A list
/// signed by a key not in `trusted` is refused, so no key reaches an agent but through one it
/// already trusts.
pub fn verify_keys(
    msg: &TrustedKeys,
    trusted: &HashMap<String, VerifyingKey>,
) -> Result<Vec<VerifyingKey>, VerifyError> {
    let key = trusted
        .get(&msg.key_id)
        .ok_or_else(|| VerifyError::UnknownKey {
            key_id: msg.key_id.clone(),
        })?;
    let bad = || VerifyError::BadSignature {
        key_id: msg.key_id.clone(),
    };
    let signature = Signature::from_slice(&msg.signature).map_err(|_| bad())?;
    let mut signed = KEYS_CONTEXT.to_vec();
    signed.extend_from_slice(&msg.keys);
    key.verify(&signed, &signature).map_err(|_| bad())?;
    let list = TrustedKeyList::decode(msg.keys.as_slice())
        .map_err(|e| VerifyError::Malformed(e.to_string()))?;
    list.public_keys
        .iter()
        .map(|raw| {
            let bytes: [u8; 32] = raw
                .as_slice()
                .try_into()
                .map_err(|_| VerifyError::Malformed(format!("a key of {} bytes", raw.len())))?;
            VerifyingKey::from_bytes(&bytes).map_err(|e| VerifyError::Malformed(e.to_string()))
        })
        .collect()
}

fn signed_bytes(spec: &[u8]) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(SIGNING_CONTEXT.len() + spec.len());
    bytes.extend_from_slice(SIGNING_CONTEXT);
    bytes.extend_from_slice(spec);
    bytes
}

/// Encodes and signs `spec` (whose `key_id` is set to the signing key's id).
pub fn sign(mut spec: JobSpec, key: &SigningKey) -> SignedJob {
    let id = key_id(&key.verifying_key());
    spec.key_id = id.clone();
    let bytes = spec.encode_to_vec();
    let signature = key.sign(&signed_bytes(&bytes));
    SignedJob {
        spec: bytes,
        signature: signature.to_bytes().to_vec(),
        key_id: id,
    }
}

/// Why a job envelope was refused. Each maps to a [`RefusalReason`] on the wire.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum VerifyError {
    /// Signed by a key this agent does not trust.
    #[error("signed with unknown key {key_id:?}")]
    UnknownKey {
        /// The key id the envelope names.
        key_id: String,
    },
    /// The signature does not match the bytes.
    #[error("signature does not verify with key {key_id}")]
    BadSignature {
        /// The key tried.
        key_id: String,
    },
    /// The bytes are not a job, or the inner and outer key ids differ.
    #[error("malformed job: {0}")]
    Malformed(String),
    /// Meant for another host.
    #[error("job is for host {target:?}, this is {me:?}")]
    WrongTarget {
        /// The job's target.
        target: String,
        /// This host.
        me: String,
    },
    /// Its window has not opened yet.
    #[error("job is not valid before {not_before:?} (now {now:?})")]
    NotYetValid {
        /// Start of the window.
        not_before: SystemTime,
        /// The agent's clock.
        now: SystemTime,
    },
    /// Its window has closed.
    #[error("job expired at {expires_at:?} (now {now:?})")]
    Expired {
        /// End of the window.
        expires_at: SystemTime,
        /// The agent's clock.
        now: SystemTime,
    },
}

impl VerifyError {
    /// The reason sent back to the controller.
    pub fn reason(&self) -> RefusalReason {
        match self {
            VerifyError::UnknownKey { .. } => RefusalReason::UnknownKey,
            VerifyError::BadSignature { .. } => RefusalReason::BadSignature,
            VerifyError::Malformed(_) => RefusalReason::Malformed,
            VerifyError::WrongTarget { .. } => RefusalReason::WrongTarget,
            VerifyError::NotYetValid { .. } => RefusalReason::NotYetValid,
            VerifyError::Expired { .. } => RefusalReason::Expired,
        }
    }
}

/// Checks an envelope's key, signature, target and time window (allowing `skew` either way)
/// and returns the decoded spec. Replay and local policy are the agent's own, stateful checks.
pub fn verify(
    job: &SignedJob,
    trusted: &HashMap<String, VerifyingKey>,
    me: &str,
    now: SystemTime,
    skew: Duration,
) -> Result<JobSpec, VerifyError> {
    let key = trusted
        .get(&job.key_id)
        .ok_or_else(|| VerifyError::UnknownKey {
            key_id: job.key_id.clone(),
        })?;
    let signature =
        Signature::from_slice(&job.signature).map_err(|_| VerifyError::BadSignature {
            key_id: job.key_id.clone(),
        })?;
    key.verify(&signed_bytes(&job.spec), &signature)
        .map_err(|_| VerifyError::BadSignature {
            key_id: job.key_id.clone(),
        })?;
    let spec =
        JobSpec::decode(job.spec.as_slice()).map_err(|e| VerifyError::Malformed(e.to_string()))?;
    if spec.key_id != job.key_id {
        return Err(VerifyError::Malformed(format!(
            "inner key id {:?} differs from envelope key id {:?}",
            spec.key_id, job.key_id
        )));
    }
    if spec.job_id.is_empty() || spec.nonce.len() < 16 {
        return Err(VerifyError::Malformed(
            "job id missing or nonce shorter than 16 bytes".into(),
        ));
    }
    if spec.target_host != me {
        return Err(VerifyError::WrongTarget {
            target: spec.target_host.clone(),
            me: me.to_string(),
        });
    }
    let (Some(nb), Some(exp)) = (spec.not_before.as_ref(), spec.expires_at.as_ref()) else {
        return Err(VerifyError::Malformed("job has no validity window".into()));
    };
    let not_before = crate::time::system_time(nb);
    let expires_at = crate::time::system_time(exp);
    if now + skew < not_before {
        return Err(VerifyError::NotYetValid { not_before, now });
    }
    if now > expires_at + skew {
        return Err(VerifyError::Expired { expires_at, now });
    }
    Ok(spec)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::v1::JobKind;

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_bytes(&[seed; 32])
    }

    #[test]
    fn a_key_list_is_taken_only_from_a_trusted_key_and_intact() {
        let (current, next, stranger) = (key(1), key(2), key(3));
        let trusted: HashMap<String, VerifyingKey> =
            [(key_id(&current.verifying_key()), current.verifying_key())].into();
        let keys = [current.verifying_key(), next.verifying_key()];
        let msg = sign_keys(&keys, &current);
        assert_eq!(verify_keys(&msg, &trusted).unwrap(), keys);
        // Signed by a key the agent does not trust: refused, whatever it carries.
        let forged = sign_keys(&[stranger.verifying_key()], &stranger);
        assert!(matches!(
            verify_keys(&forged, &trusted),
            Err(VerifyError::UnknownKey { .. })
        ));
        // A trusted key id over other keys: the signature does not verify.
        let tampered = TrustedKeys {
            key_id: msg.key_id.clone(),
            ..forged
        };
        assert!(matches!(
            verify_keys(&tampered, &trusted),
            Err(VerifyError::BadSignature { .. })
        ));
        // A job signature is no key-list signature (domain separation).
        let job = sign(spec(SystemTime::now()), &current);
        let replayed = TrustedKeys {
            keys: job.spec,
            key_id: job.key_id,
            signature: job.signature,
        };
        assert!(verify_keys(&replayed, &trusted).is_err());
    }

    fn spec(now: SystemTime) -> JobSpec {
        JobSpec {
            job_id: "j1".into(),
            target_host: "hub-alfa".into(),
            kind: JobKind::Deploy as i32,
            not_before: Some(crate::time::timestamp(now - Duration::from_secs(5))),
            expires_at: Some(crate::time::timestamp(now + Duration::from_secs(60))),
            nonce: vec![7; 16],
            ..Default::default()
        }
    }

    fn trusted(k: &SigningKey) -> HashMap<String, VerifyingKey> {
        [(key_id(&k.verifying_key()), k.verifying_key())].into()
    }

    const SKEW: Duration = Duration::from_secs(30);

    #[test]
    fn a_signed_job_verifies() {
        let now = SystemTime::now();
        let job = sign(spec(now), &key(1));
        let got = verify(&job, &trusted(&key(1)), "hub-alfa", now, SKEW).unwrap();
        assert_eq!(got.job_id, "j1");
    }

    #[test]
    fn every_tampering_is_refused_with_its_reason() {
        let now = SystemTime::now();
        let k = key(1);
        let job = sign(spec(now), &k);

        let mut forged = job.clone();
        let last = forged.spec.len() - 1;
        forged.spec[last] ^= 1;
        assert_eq!(
            verify(&forged, &trusted(&k), "hub-alfa", now, SKEW)
                .unwrap_err()
                .reason(),
            RefusalReason::BadSignature
        );

        let other = sign(spec(now), &key(2));
        assert_eq!(
            verify(&other, &trusted(&k), "hub-alfa", now, SKEW)
                .unwrap_err()
                .reason(),
            RefusalReason::UnknownKey
        );

        assert_eq!(
            verify(&job, &trusted(&k), "prod-alfa", now, SKEW)
                .unwrap_err()
                .reason(),
            RefusalReason::WrongTarget
        );

        let late = now + Duration::from_secs(120);
        assert_eq!(
            verify(&job, &trusted(&k), "hub-alfa", late, SKEW)
                .unwrap_err()
                .reason(),
            RefusalReason::Expired
        );
        let early = now - Duration::from_secs(60);
        assert_eq!(
            verify(&job, &trusted(&k), "hub-alfa", early, SKEW)
                .unwrap_err()
                .reason(),
            RefusalReason::NotYetValid
        );
        // Within the allowed skew both ends still pass.
        assert!(verify(
            &job,
            &trusted(&k),
            "hub-alfa",
            now + Duration::from_secs(80),
            SKEW
        )
        .is_ok());

        let mut relabelled = job.clone();
        relabelled.key_id = "0000000000000000".into();
        assert!(verify(&relabelled, &trusted(&k), "hub-alfa", now, SKEW).is_err());
    }
}
