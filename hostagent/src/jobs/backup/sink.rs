//! Writing a backup file in one pass: what a tool prints (or the tar being built) is encrypted
//! when the agent is configured to, hashed (sha256 of the bytes stored, so of the ciphertext
//! when encrypted) and written to the run's temp file as it arrives. The file is never read
//! back to hash it, and an encrypted backup never has a plaintext copy on disk. [`Sink::finish`]
//! fsyncs it and checks that a file that should be encrypted starts with the age header;
//! [`super::place`] then renames it into place.

use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::encryption::{self, Keys};
use super::BackupError;

/// A finished temp file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Written {
    /// Bytes stored.
    pub size: u64,
    /// SHA-256 of the bytes stored, lowercase hex.
    pub sha256: String,
    /// Whether they are an age file.
    pub encrypted: bool,
}

/// Hashes and counts what goes through it to `inner`.
struct Hashing<W> {
    inner: W,
    hasher: Sha256,
    size: u64,
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.size += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

enum Out {
    Plain(Hashing<std::fs::File>),
    Age(age::stream::StreamWriter<Hashing<std::fs::File>>),
}

/// A temp file being written (see the module docs).
pub struct Sink {
    out: Out,
    path: PathBuf,
}

impl Sink {
    /// Creates the temp file `path` (private: it becomes the backup file), encrypting to `keys` when given (the age header is
    /// written now).
    pub fn create(path: &Path, keys: Option<&Keys>) -> Result<Self, BackupError> {
        let file = super::create_private_file(path).map_err(|source| BackupError::File {
            doing: "creating",
            path: path.to_path_buf(),
            source,
        })?;
        let hashing = Hashing {
            inner: file,
            hasher: Sha256::new(),
            size: 0,
        };
        let out = match keys {
            None => Out::Plain(hashing),
            Some(keys) => Out::Age(keys.encrypt(hashing)?),
        };
        Ok(Self {
            out,
            path: path.to_path_buf(),
        })
    }

    /// Copies everything `input` yields into the file (a tool's standard output, to its end).
    pub fn copy_from(&mut self, mut input: impl Read) -> Result<(), BackupError> {
        // Pipes hand over at most 64 KiB per read; a bigger buffer still saves calls when the
        // writer is ahead.
        let mut buf = vec![0u8; 256 << 10];
        loop {
            let n = match input.read(&mut buf) {
                Ok(0) => return Ok(()),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(source) => {
                    return Err(BackupError::Read {
                        what: "the tool's output",
                        source,
                    })
                }
            };
            self.write_all(&buf[..n])
                .map_err(|source| BackupError::File {
                    doing: "writing",
                    path: self.path.clone(),
                    source,
                })?;
        }
    }

    /// Ends the file: the last age chunk, fsync, and the check that an encrypted file starts
    /// with the age header.
    pub fn finish(self) -> Result<Written, BackupError> {
        let path = self.path;
        let fail = |doing: &'static str, source: io::Error| BackupError::File {
            doing,
            path: path.clone(),
            source,
        };
        let (hashing, encrypted) = match self.out {
            Out::Plain(h) => (h, false),
            Out::Age(w) => (w.finish().map_err(|e| fail("finishing", e))?, true),
        };
        let Hashing {
            mut inner,
            hasher,
            size,
        } = hashing;
        inner
            .flush()
            .and_then(|()| inner.sync_all())
            .map_err(|e| fail("syncing", e))?;
        drop(inner);
        if encrypted {
            encryption::ensure_encrypted(&path)?;
        }
        Ok(Written {
            size,
            sha256: hex::encode(hasher.finalize()),
            encrypted,
        })
    }
}

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match &mut self.out {
            Out::Plain(w) => w.write(buf),
            Out::Age(w) => w.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match &mut self.out {
            Out::Plain(w) => w.flush(),
            Out::Age(w) => w.flush(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::EncryptionConfig;

    #[test]
    fn the_hash_is_of_the_bytes_stored_plain_or_encrypted() {
        let dir = tempfile::tempdir().unwrap();
        let body = vec![7u8; 300_000];

        let plain = dir.path().join("plain");
        let mut sink = Sink::create(&plain, None).unwrap();
        sink.copy_from(&body[..]).unwrap();
        let w = sink.finish().unwrap();
        assert!(!w.encrypted);
        assert_eq!(w.size, body.len() as u64);
        assert_eq!(w.sha256, hex::encode(Sha256::digest(&body)));

        let (identity, recipient) = encryption::generate_key_pair();
        let id_path = dir.path().join("identity");
        std::fs::write(&id_path, identity).unwrap();
        let keys = Keys::load(&EncryptionConfig {
            recipients: vec![recipient],
            identity_file: Some(id_path),
            ..Default::default()
        })
        .unwrap();
        let sealed = dir.path().join("sealed.age");
        let mut sink = Sink::create(&sealed, Some(&keys)).unwrap();
        sink.copy_from(&body[..]).unwrap();
        let w = sink.finish().unwrap();
        let stored = std::fs::read(&sealed).unwrap();
        assert!(w.encrypted);
        assert!(stored.starts_with(encryption::AGE_MAGIC));
        assert_eq!(w.size, stored.len() as u64);
        assert_eq!(w.sha256, hex::encode(Sha256::digest(&stored)));
        let mut back = Vec::new();
        keys.decrypt(&sealed)
            .unwrap()
            .read_to_end(&mut back)
            .unwrap();
        assert_eq!(back, body);
    }
}
