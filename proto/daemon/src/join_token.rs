//! The join token's text form, which `sentinel token create` prints and `hostagent enroll`
//! reads: `sjt1_HOST_ID_SECRET_CASHA256`. The host name tells the agent what to ask for, the
//! id finds the stored record, the secret (of which the controller keeps only a hash) proves
//! possession, and the CA fingerprint lets the agent check the controller before it sends
//! anything.

use std::fmt;

/// The prefix (and version) of every join token.
const PREFIX: &str = "sjt1";
/// Length of the id, hex characters.
const ID_LEN: usize = 16;
/// Length of the secret, hex characters (32 random bytes).
const SECRET_LEN: usize = 64;
/// Length of the CA fingerprint, hex characters (SHA-256).
const FINGERPRINT_LEN: usize = 64;

/// A parsed join token.
#[derive(Clone, PartialEq, Eq)]
pub struct JoinToken {
    /// The host it enrols.
    pub host: String,
    /// The stored record's id.
    pub id: String,
    /// The secret, hex.
    pub secret: String,
    /// SHA-256 of the fleet CA certificate (DER), lowercase hex.
    pub ca_sha256: String,
}

// The secret stays out of logs and panics.
impl fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JoinToken")
            .field("host", &self.host)
            .field("id", &self.id)
            .field("ca_sha256", &self.ca_sha256)
            .finish_non_exhaustive()
    }
}

/// Why a string is not a join token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "not a join token ({reason}); expected sjt1_HOST_ID_SECRET_CASHA256 as printed by \
     `sentinel token create`"
)]
pub struct TokenFormatError {
    /// What is wrong.
    pub reason: String,
}

impl JoinToken {
    /// A new token for `host` with a random id and secret, pinning `ca_sha256`.
    pub fn generate(host: &str, ca_sha256: &str) -> Self {
        use rand::RngCore;
        let mut id = [0u8; ID_LEN / 2];
        let mut secret = [0u8; SECRET_LEN / 2];
        rand::rngs::OsRng.fill_bytes(&mut id);
        rand::rngs::OsRng.fill_bytes(&mut secret);
        Self {
            host: host.to_owned(),
            id: hex::encode(id),
            secret: hex::encode(secret),
            ca_sha256: ca_sha256.to_owned(),
        }
    }

    /// Parses the text form (surrounding whitespace ignored).
    pub fn parse(text: &str) -> Result<Self, TokenFormatError> {
        let bad = |reason: &str| TokenFormatError {
            reason: reason.to_owned(),
        };
        let parts: Vec<&str> = text.trim().split('_').collect();
        let [prefix, host, id, secret, ca_sha256] = parts.as_slice() else {
            return Err(bad("it does not have five parts separated by '_'"));
        };
        if *prefix != PREFIX {
            return Err(bad("it does not start with sjt1_"));
        }
        if host.is_empty()
            || !host
                .chars()
                .all(|c| matches!(c, 'a'..='z' | '0'..='9' | '-' | '.'))
        {
            return Err(bad("its host name is not a valid host name"));
        }
        let hex_of = |s: &str, len: usize| {
            s.len() == len && s.chars().all(|c| matches!(c, '0'..='9' | 'a'..='f'))
        };
        if !hex_of(id, ID_LEN) {
            return Err(bad("its id is not 16 hex digits"));
        }
        if !hex_of(secret, SECRET_LEN) {
            return Err(bad("its secret is not 64 hex digits"));
        }
        if !hex_of(ca_sha256, FINGERPRINT_LEN) {
            return Err(bad("its CA fingerprint is not 64 hex digits"));
        }
        Ok(Self {
            host: (*host).to_owned(),
            id: (*id).to_owned(),
            secret: (*secret).to_owned(),
            ca_sha256: (*ca_sha256).to_owned(),
        })
    }

    /// SHA-256 of the secret: what the controller stores and compares.
    pub fn secret_sha256(&self) -> [u8; 32] {
        use sha2::{Digest, Sha256};
        Sha256::digest(self.secret.as_bytes()).into()
    }
}

impl fmt::Display for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{PREFIX}_{}_{}_{}_{}",
            self.host, self.id, self.secret, self.ca_sha256
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_round_trips_and_garbage_is_refused_with_the_reason() {
        let token = JoinToken::generate("web1.example", &"ab".repeat(32));
        let parsed = JoinToken::parse(&format!(" {token}\n")).expect("parse");
        assert_eq!(parsed, token);
        assert!(!format!("{token:?}").contains(&token.secret));
        let text = token.to_string();
        for (bad, reason) in [
            ("garbage", "five parts"),
            (&text.replacen("sjt1", "sjt2", 1), "sjt1_"),
            (&text.replacen("web1.example", "Web1", 1), "host name"),
            (&text[..text.len() - 1], "CA fingerprint"),
            (&text.replacen(&token.secret, "zz", 1), "secret"),
        ] {
            let err = JoinToken::parse(bad).expect_err(bad).to_string();
            assert!(err.contains(reason), "{bad}: {err}");
        }
    }
}
