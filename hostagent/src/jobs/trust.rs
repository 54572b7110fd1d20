//! The job-signing keys this agent trusts: those of `jobs.trusted_keys`, plus those the
//! controller announced over the channel in a key list signed by a key already trusted (a
//! signing-key rotation), kept in `STATE_DIR/trusted-keys` (one hex-encoded raw Ed25519 key a
//! line) so that they survive a restart. Keys are only ever added this way, never removed:
//! retiring a key is an edit of the config.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::RwLock;

use ed25519_dalek::VerifyingKey;
use sentinel_proto::envelope;
use sentinel_proto::v1::TrustedKeys;

use super::SetupError;

/// The file of announced keys, inside the state directory.
pub const FILE: &str = "trusted-keys";

/// The trusted keys, by key id.
pub struct Trust {
    keys: RwLock<HashMap<String, VerifyingKey>>,
    file: PathBuf,
}

fn parse_line(line: &str) -> Option<VerifyingKey> {
    let bytes: [u8; 32] = hex::decode(line.trim()).ok()?.try_into().ok()?;
    VerifyingKey::from_bytes(&bytes).ok()
}

impl Trust {
    /// The configured keys plus those announced before (from `state_dir`).
    pub fn load(
        configured: HashMap<String, VerifyingKey>,
        state_dir: &Path,
    ) -> Result<Self, SetupError> {
        let file = state_dir.join(FILE);
        let mut keys = configured;
        match std::fs::read_to_string(&file) {
            Ok(text) => {
                for (i, line) in text
                    .lines()
                    .enumerate()
                    .filter(|(_, l)| !l.trim().is_empty())
                {
                    let key = parse_line(line).ok_or_else(|| SetupError::Key {
                        path: file.clone(),
                        message: format!("line {}: not a hex Ed25519 public key", i + 1),
                    })?;
                    keys.insert(envelope::key_id(&key), key);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(SetupError::Key {
                    path: file,
                    message: e.to_string(),
                })
            }
        }
        Ok(Self {
            keys: RwLock::new(keys),
            file,
        })
    }

    /// Runs `f` with the keys.
    pub fn with<T>(&self, f: impl FnOnce(&HashMap<String, VerifyingKey>) -> T) -> T {
        // Keys are inserted whole; a poisoned lock still holds a consistent map.
        f(&self.keys.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// Takes the keys of a signed list: refused unless signed by a trusted key; new keys are
    /// written to the state directory before they count. Returns the ids of the new keys.
    pub fn accept(&self, msg: &TrustedKeys) -> Result<Vec<String>, String> {
        let announced = self
            .with(|keys| envelope::verify_keys(msg, keys))
            .map_err(|e| e.to_string())?;
        let mut keys = self.keys.write().unwrap_or_else(|p| p.into_inner());
        let new: Vec<VerifyingKey> = announced
            .into_iter()
            .filter(|k| !keys.contains_key(&envelope::key_id(k)))
            .collect();
        if new.is_empty() {
            return Ok(Vec::new());
        }
        let mut text = std::fs::read_to_string(&self.file).unwrap_or_default();
        for key in &new {
            text.push_str(&hex::encode(key.as_bytes()));
            text.push('\n');
        }
        sentinel_daemon::fs::write_atomic(&self.file, text.as_bytes(), 0o644)
            .map_err(|e| format!("keeping the announced keys in {}: {e}", self.file.display()))?;
        Ok(new
            .into_iter()
            .map(|k| {
                let id = envelope::key_id(&k);
                keys.insert(id.clone(), k);
                id
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::SigningKey;

    #[test]
    fn announced_keys_from_a_trusted_signer_are_kept_and_others_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (current, next, stranger) = (
            SigningKey::from_bytes(&[1; 32]),
            SigningKey::from_bytes(&[2; 32]),
            SigningKey::from_bytes(&[3; 32]),
        );
        let configured: HashMap<String, VerifyingKey> = [(
            envelope::key_id(&current.verifying_key()),
            current.verifying_key(),
        )]
        .into();
        let trust = Trust::load(configured.clone(), dir.path()).unwrap();
        let forged = envelope::sign_keys(&[stranger.verifying_key()], &stranger);
        assert!(trust.accept(&forged).is_err());
        let msg = envelope::sign_keys(&[current.verifying_key(), next.verifying_key()], &current);
        let new = trust.accept(&msg).unwrap();
        assert_eq!(new, [envelope::key_id(&next.verifying_key())]);
        assert!(trust.accept(&msg).unwrap().is_empty());
        // After a restart the announced key is still trusted.
        let again = Trust::load(configured, dir.path()).unwrap();
        assert!(again.with(|k| k.contains_key(&envelope::key_id(&next.verifying_key()))));
        assert!(!again.with(|k| k.contains_key(&envelope::key_id(&stranger.verifying_key()))));
    }
}
