//! Encryption at rest of backup files with [age](https://age-encryption.org) (X25519
//! recipients): the keys of `[jobs.backups.encryption]`, the check that a file really is an
//! age file, and decryption into a tool's standard input (verify's `pg_restore --list`, the
//! restore test's `pg_restore`), so that no plaintext copy of an encrypted backup ever lands
//! on disk. Encrypting is done while a file is written ([`super::sink`]).

use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use age::secrecy::ExposeSecret;
use age::x25519;

use super::BackupError;
use crate::config::EncryptionConfig;

/// How every age file starts (the version line of its header).
pub const AGE_MAGIC: &[u8] = b"age-encryption.org/v1\n";

/// The suffix of an encrypted backup file, after its format's own (`.dump.age`).
pub const SUFFIX: &str = ".age";

/// Identity and recipients files are a few lines; anything bigger is the wrong file.
const KEY_FILE_LIMIT: u64 = 1 << 20;

/// Keys that cannot be used, or a file that is not what it should be.
#[derive(Debug, thiserror::Error)]
pub enum EncryptionError {
    /// A recipient that is not an X25519 age recipient.
    #[error("{at}: {value:?} is not an age X25519 recipient (age1…): {reason}")]
    BadRecipient {
        /// Where it was: the config key and index, or the file and line.
        at: String,
        /// The recipient as written (public, so it may be shown).
        value: String,
        /// What the parser said.
        reason: String,
    },
    /// The recipients file could not be read.
    #[error("recipients_file {path}: {message}")]
    RecipientsFile {
        /// The file.
        path: PathBuf,
        /// Why.
        message: String,
    },
    /// Neither `recipients` nor `recipients_file` names a recipient.
    #[error(
        "no recipients: set `recipients` or `recipients_file` (or remove the section to store \
         backups unencrypted)"
    )]
    NoRecipients,
    /// The identity file could not be read or holds something else than age identities.
    #[error("identity_file {path}: {message}")]
    IdentityFile {
        /// The file.
        path: PathBuf,
        /// Why (never the file's content: it is secret).
        message: String,
    },
    /// The identity file holds no identity of any recipient: nothing written could be read.
    #[error(
        "identity_file {path}: none of its identities belongs to a recipient, so verify and \
         restore tests could not decrypt the backups"
    )]
    IdentityOfNoRecipient {
        /// The file.
        path: PathBuf,
    },
    /// Encrypting could not start (the age library refused the recipients).
    #[error("setting up encryption: {0}")]
    Encryptor(String),
    /// A file that should be encrypted does not start with the age header.
    #[error(
        "{path} should be encrypted but is not: it does not start with the age header \
         ({AGE_MAGIC_TEXT:?})"
    )]
    NotEncrypted {
        /// The file.
        path: PathBuf,
    },
    /// Decryption needs an identity and the agent has none.
    #[error(
        "{path} is encrypted and this agent has no identity to decrypt it \
         ([jobs.backups.encryption] identity_file)"
    )]
    NoIdentity {
        /// The file.
        path: PathBuf,
    },
    /// Decrypting failed (wrong key, damaged file).
    #[error("decrypting {path}: {message}")]
    Decrypt {
        /// The file.
        path: PathBuf,
        /// Why.
        message: String,
    },
}

/// [`AGE_MAGIC`] without its newline, for messages.
const AGE_MAGIC_TEXT: &str = "age-encryption.org/v1";

/// The loaded keys: recipients to encrypt to, and the identities (if any) to decrypt with.
#[derive(Clone)]
pub struct Keys {
    recipients: Vec<x25519::Recipient>,
    identities: Vec<x25519::Identity>,
}

// Identities are secret: never printed, only counted.
impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keys")
            .field("recipients", &self.recipients)
            .field("identities", &self.identities.len())
            .finish()
    }
}

impl Keys {
    /// Reads and checks the keys `config` names: every recipient parses, there is at least one,
    /// and an identity file (when set) is readable, holds only age identities and at least one
    /// of them belongs to a recipient.
    pub fn load(config: &EncryptionConfig) -> Result<Self, EncryptionError> {
        let mut recipients = parse_recipients(&config.recipients)?;
        if let Some(path) = &config.recipients_file {
            recipients.extend(read_recipients_file(path)?);
        }
        if recipients.is_empty() {
            return Err(EncryptionError::NoRecipients);
        }
        let mut identities = Vec::new();
        if let Some(path) = &config.identity_file {
            identities = read_identity_file(path)?;
            if !identities
                .iter()
                .any(|id| recipients.contains(&id.to_public()))
            {
                return Err(EncryptionError::IdentityOfNoRecipient { path: path.clone() });
            }
        }
        Ok(Self {
            recipients,
            identities,
        })
    }

    /// Whether these keys can decrypt (an identity file was configured).
    pub fn can_decrypt(&self) -> bool {
        !self.identities.is_empty()
    }

    /// Wraps `output` so that what is written to it is encrypted to every recipient; the
    /// header goes out now. [`age::stream::StreamWriter::finish`] must be called at the end.
    pub fn encrypt<W: Write>(
        &self,
        output: W,
    ) -> Result<age::stream::StreamWriter<W>, EncryptionError> {
        let encryptor = age::Encryptor::with_recipients(
            self.recipients.iter().map(|r| r as &dyn age::Recipient),
        )
        .map_err(|e| EncryptionError::Encryptor(e.to_string()))?;
        encryptor
            .wrap_output(output)
            .map_err(|e| EncryptionError::Encryptor(format!("writing the age header: {e}")))
    }

    /// A reader of the plaintext of the age file `path` (opened here); `path` only names it in
    /// errors beyond that.
    pub fn decrypt(
        &self,
        path: &Path,
    ) -> Result<age::stream::StreamReader<io::BufReader<std::fs::File>>, EncryptionError> {
        if self.identities.is_empty() {
            return Err(EncryptionError::NoIdentity {
                path: path.to_path_buf(),
            });
        }
        let fail = |message: String| EncryptionError::Decrypt {
            path: path.to_path_buf(),
            message,
        };
        let file = std::fs::File::open(path).map_err(|e| fail(e.to_string()))?;
        let decryptor = age::Decryptor::new_buffered(io::BufReader::with_capacity(1 << 20, file))
            .map_err(|e| fail(e.to_string()))?;
        decryptor
            .decrypt(self.identities.iter().map(|i| i as &dyn age::Identity))
            .map_err(|e| fail(e.to_string()))
    }
}

/// Parses inline recipients (`recipients = [...]`); errors name the index.
pub fn parse_recipients(values: &[String]) -> Result<Vec<x25519::Recipient>, EncryptionError> {
    values
        .iter()
        .enumerate()
        .map(|(i, value)| parse_recipient(value, || format!("recipients[{i}]")))
        .collect()
}

/// Reads a recipients file: one recipient a line, `#` comments and blank lines ignored.
pub fn read_recipients_file(path: &Path) -> Result<Vec<x25519::Recipient>, EncryptionError> {
    let text = read_small(path).map_err(|e| EncryptionError::RecipientsFile {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    let mut recipients = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        recipients.push(parse_recipient(line, || {
            format!("recipients_file {} line {}", path.display(), n + 1)
        })?);
    }
    if recipients.is_empty() {
        return Err(EncryptionError::RecipientsFile {
            path: path.to_path_buf(),
            message: "holds no recipient".into(),
        });
    }
    Ok(recipients)
}

/// Reads an identity file as `age-keygen` writes it; errors name the line, never its content.
pub fn read_identity_file(path: &Path) -> Result<Vec<x25519::Identity>, EncryptionError> {
    let fail = |message: String| EncryptionError::IdentityFile {
        path: path.to_path_buf(),
        message,
    };
    let text = read_small(path).map_err(|e| fail(e.to_string()))?;
    let mut identities = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let identity = line.parse::<x25519::Identity>().map_err(|reason| {
            fail(format!(
                "line {} is not an age X25519 identity (AGE-SECRET-KEY-1…): {reason}",
                n + 1
            ))
        })?;
        identities.push(identity);
    }
    if identities.is_empty() {
        return Err(fail("holds no identity".into()));
    }
    Ok(identities)
}

fn parse_recipient(
    value: &str,
    at: impl FnOnce() -> String,
) -> Result<x25519::Recipient, EncryptionError> {
    value
        .trim()
        .parse::<x25519::Recipient>()
        .map_err(|reason| EncryptionError::BadRecipient {
            at: at(),
            value: shown_recipient(value),
            reason: reason.to_string(),
        })
}

/// A bad recipient as an error may show it: recipients are public, but an operator who pastes
/// the identity file's `AGE-SECRET-KEY-…` line (or anything else) must not find it in the log.
fn shown_recipient(value: &str) -> String {
    let value = value.trim();
    if value.starts_with("age1") {
        value.to_string()
    } else if value.to_ascii_uppercase().starts_with("AGE-SECRET-KEY-") {
        "<an age identity (AGE-SECRET-KEY-…), not a recipient: the public key is the age1… line \
         age-keygen prints>"
            .to_string()
    } else {
        format!("<{} characters, not shown>", value.chars().count())
    }
}

fn read_small(path: &Path) -> io::Result<String> {
    let file = std::fs::File::open(path)?;
    let mut text = String::new();
    file.take(KEY_FILE_LIMIT).read_to_string(&mut text)?;
    Ok(text)
}

/// Whether the file at `path` starts with the age header.
pub fn is_age_file(path: &Path) -> io::Result<bool> {
    let mut head = [0u8; AGE_MAGIC.len()];
    let file = std::fs::File::open(path)?;
    let mut read = 0;
    let mut take = file.take(AGE_MAGIC.len() as u64);
    loop {
        let n = take.read(&mut head[read..])?;
        if n == 0 {
            break;
        }
        read += n;
    }
    Ok(read == AGE_MAGIC.len() && head == AGE_MAGIC)
}

/// Fails unless the file at `path` starts with the age header: "a file that should be
/// encrypted and is not is an error".
pub fn ensure_encrypted(path: &Path) -> Result<(), BackupError> {
    match is_age_file(path) {
        Ok(true) => Ok(()),
        Ok(false) => Err(EncryptionError::NotEncrypted {
            path: path.to_path_buf(),
        }
        .into()),
        Err(source) => Err(BackupError::File {
            doing: "reading",
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// A new X25519 key pair as (identity, recipient) strings: what `age-keygen` makes, for
/// operators' tooling and tests. The identity is secret.
pub fn generate_key_pair() -> (String, String) {
    let identity = x25519::Identity::generate();
    let recipient = identity.to_public().to_string();
    (identity.to_string().expose_secret().to_string(), recipient)
}

/// Decrypts the age file `path` into `out` (a tool's standard input), closing it at the end.
/// When the tool stops reading early (`pg_restore --list` reads the table of contents only)
/// and `to_the_end` is set, the rest is still decrypted, into nothing, so that every chunk's
/// authentication is checked. Returns the plaintext bytes decrypted.
pub fn decrypt_into(
    keys: &Keys,
    path: &Path,
    mut out: std::fs::File,
    to_the_end: bool,
) -> Result<u64, BackupError> {
    let mut plain = keys.decrypt(path)?;
    let mut buf = vec![0u8; 256 << 10];
    let mut total = 0u64;
    let mut reading = true;
    loop {
        let n = match plain.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(source) => {
                return Err(BackupError::File {
                    doing: "decrypting",
                    path: path.to_path_buf(),
                    source,
                })
            }
        };
        total += n as u64;
        if reading {
            match out.write_all(&buf[..n]) {
                Ok(()) => {}
                // The tool has stopped reading; whether that was right is its exit status's
                // business, not ours.
                Err(e) if e.kind() == io::ErrorKind::BrokenPipe => {
                    if !to_the_end {
                        return Ok(total);
                    }
                    reading = false;
                }
                Err(source) => {
                    return Err(BackupError::File {
                        doing: "feeding the plaintext of",
                        path: path.to_path_buf(),
                        source,
                    })
                }
            }
        }
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(recipients: &[&str]) -> EncryptionConfig {
        EncryptionConfig {
            recipients: recipients.iter().map(|r| r.to_string()).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn what_is_encrypted_decrypts_with_the_identity_and_starts_with_the_header() {
        let dir = tempfile::tempdir().unwrap();
        let (identity, recipient) = generate_key_pair();
        let id_path = dir.path().join("identity.txt");
        std::fs::write(&id_path, format!("# created: now\n{identity}\n")).unwrap();
        let mut c = config(&[&recipient]);
        c.identity_file = Some(id_path);
        let keys = Keys::load(&c).unwrap();
        assert!(keys.can_decrypt());
        assert!(!format!("{keys:?}").contains("AGE-SECRET-KEY"));

        let path = dir.path().join("x.age");
        let mut w = keys.encrypt(std::fs::File::create(&path).unwrap()).unwrap();
        w.write_all(b"PGDMP and more").unwrap();
        w.finish().unwrap();
        assert!(is_age_file(&path).unwrap());
        ensure_encrypted(&path).unwrap();
        let mut plain = String::new();
        keys.decrypt(&path)
            .unwrap()
            .read_to_string(&mut plain)
            .unwrap();
        assert_eq!(plain, "PGDMP and more");

        std::fs::write(&path, b"PGDMP plaintext").unwrap();
        let err = ensure_encrypted(&path).unwrap_err().to_string();
        assert!(err.contains("should be encrypted but is not"), "{err}");
    }

    #[test]
    fn a_bad_recipient_in_the_agent_config_names_file_line_and_key() {
        let text = "controller = \"127.0.0.1:7443\"\n\
                    [tls]\nca = \"/c\"\ncert = \"/h\"\nkey = \"/k\"\n\
                    [jobs.backups]\nbackup_dirs = [\"/var/backups/sentinel\"]\n\
                    [jobs.backups.encryption]\nrecipients = [\"age1typo\"]\n";
        let path = Path::new("/etc/hostagent/agent.toml");
        let err = sentinel_daemon::config::parse_toml::<crate::config::AgentConfig>(path, text)
            .unwrap_err()
            .to_string();
        // Line 9: the `recipients` line itself.
        assert!(err.starts_with("/etc/hostagent/agent.toml:9:"), "{err}");
        assert!(
            err.contains("jobs.backups.encryption.recipients[0]") && err.contains("age1typo"),
            "{err}"
        );
    }

    #[test]
    fn bad_keys_are_named_and_secrets_are_not_shown() {
        let err = Keys::load(&config(&["age1nope"])).unwrap_err().to_string();
        assert!(
            err.contains("recipients[0]") && err.contains("age1nope"),
            "{err}"
        );
        let err = Keys::load(&config(&[])).unwrap_err().to_string();
        assert!(err.contains("no recipients"), "{err}");

        let dir = tempfile::tempdir().unwrap();
        let (_, recipient) = generate_key_pair();
        let (other_identity, _) = generate_key_pair();
        let file = dir.path().join("recipients.txt");
        std::fs::write(&file, format!("# ops\n{recipient}\nssh-ed25519 AAAA\n")).unwrap();
        let mut c = config(&[]);
        c.recipients_file = Some(file.clone());
        let err = Keys::load(&c).unwrap_err().to_string();
        assert!(err.contains(&format!("{} line 3", file.display())), "{err}");

        let mut c = config(&[&recipient]);
        c.identity_file = Some(dir.path().join("missing"));
        let err = Keys::load(&c).unwrap_err().to_string();
        assert!(
            err.contains("identity_file") && err.contains("missing"),
            "{err}"
        );

        let id_path = dir.path().join("identity.txt");
        let secret_looking = "AGE-SECRET-KEY-1BROKEN";
        std::fs::write(&id_path, format!("{secret_looking}\n")).unwrap();
        c.identity_file = Some(id_path.clone());
        let err = Keys::load(&c).unwrap_err().to_string();
        assert!(
            err.contains("line 1") && !err.contains(secret_looking),
            "{err}"
        );

        std::fs::write(&id_path, format!("{other_identity}\n")).unwrap();
        let err = Keys::load(&c).unwrap_err().to_string();
        assert!(err.contains("none of its identities"), "{err}");
    }

    #[test]
    fn a_secret_key_given_as_a_recipient_is_never_echoed() {
        let secret = "AGE-SECRET-KEY-1QQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQ";
        let shown = shown_recipient(secret);
        assert!(!shown.contains("1QQQ"), "{shown}");
        assert!(shown.contains("not a recipient"), "{shown}");
        assert_eq!(shown_recipient(" age1abc "), "age1abc");
    }
}
