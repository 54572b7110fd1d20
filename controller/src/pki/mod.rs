//! Development PKI for a Sentinel fleet, by concern:
//!
//! * [`scheme`]: how a certificate names a host or an operator, which the issuer writes and
//!   the controller's identity check reads;
//! * [`keys`]: the job-signing keys the controller's signer loads at runtime;
//! * [`issue`]: the dev fleet CA and the certificates `sentinel pki` and `sentinel dev` issue;
//! * [`issuer`]: the online issuing CA (`sentinel pki init-issuer`) the controller signs
//!   enrolled and renewed host certificates with, from their CSRs;
//! * [`files`]: the PKI directory's file names, and writing it atomically with safe modes;
//! * [`cli`]: the `sentinel pki` subcommands.
//!
//! `sentinel pki init` writes the CA key next to the certificates: run it on an admin machine
//! and keep `ca.key` offline; the controller holds only the issuing CA's key. Production
//! fleets may also use their own offline CA with the same subject and SAN scheme.

pub mod cli;
pub mod files;
pub mod issue;
pub mod issuer;
pub mod keys;
pub mod scheme;

use std::io;
use std::path::PathBuf;

pub use files::{
    host_files, operator_files, CA_CERT_FILE, CA_KEY_FILE, CONTROLLER_CERT_FILE,
    CONTROLLER_KEY_FILE, SIGNING_KEY_FILE, SIGNING_PUB_FILE,
};
pub use issue::{default_hosts, init, issue_host, issue_operator, InitOptions, INIT_OPERATOR};
pub use keys::{load_signing_key, load_verifying_key, public_key_pem, signing_key_id};
pub use scheme::{
    validate_name, Role, CA_COMMON_NAME, CONTROLLER_COMMON_NAME, CONTROLLER_OU, FLEET_ORGANIZATION,
    HOST_OU, HOST_URI_PREFIX, OPERATOR_OU, OPERATOR_URI_PREFIX,
};

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// A target file exists and `force` was not given.
    #[error("{} already exists (use --force to replace it)", path.display())]
    Exists {
        /// The existing file.
        path: PathBuf,
    },
    /// Reading, creating or renaming a file or directory failed.
    #[error("I/O error on {}", path.display())]
    Io {
        /// The file or directory involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// A host or operator name is not acceptable.
    #[error("invalid name {name:?}: {reason}")]
    InvalidName {
        /// The rejected name.
        name: String,
        /// Why it was rejected.
        reason: String,
    },
    /// An extra subject alternative name for the controller is not acceptable.
    #[error("invalid subject alternative name {san:?}: {reason}")]
    InvalidSan {
        /// The rejected SAN.
        san: String,
        /// Why it was rejected.
        reason: String,
    },
    /// A role string is not one of `viewer`, `deployer`, `admin`.
    #[error("invalid role {value:?} (expected viewer, deployer or admin)")]
    InvalidRole {
        /// The rejected value.
        value: String,
    },
    /// Certificate or key generation failed.
    #[error("cannot {what}")]
    Rcgen {
        /// What was being done, naming the certificate involved.
        what: String,
        /// The underlying error.
        #[source]
        source: rcgen::Error,
    },
    /// `ca.pem` or `ca.key` is missing from the PKI directory.
    #[error(
        "no fleet CA in {} ({CA_CERT_FILE} and {CA_KEY_FILE} are required); \
         run `sentinel pki init --dir {}` first",
        dir.display(),
        dir.display()
    )]
    MissingCa {
        /// The directory that was searched.
        dir: PathBuf,
    },
    /// The CA certificate or key exists but cannot be used.
    #[error("unusable fleet CA file {}: {reason}", path.display())]
    InvalidCa {
        /// The offending file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A certificate lifetime that cannot be used.
    #[error("invalid certificate lifetime {ttl}: {reason}")]
    InvalidTtl {
        /// The lifetime asked for.
        ttl: String,
        /// Why it was refused.
        reason: String,
    },
    /// A signing key file cannot be parsed or encoded.
    #[error("invalid key {}: {reason}", path.display())]
    InvalidKey {
        /// The key file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
}
