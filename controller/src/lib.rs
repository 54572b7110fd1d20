//! The Sentinel controller as a library: the `sentinel` binary's subcommands call into it, and
//! the end-to-end tests run it as a process.
#![forbid(unsafe_code)]

pub mod api;
pub mod audit;
pub mod authz;
pub mod backups;
pub mod cli;
pub mod config;
pub mod context;
pub mod dev;
pub mod enroll;
pub mod identity;
pub mod isolation;
pub mod jobs;
pub mod metrics;
pub mod pipeline;
pub mod pki;
pub mod registry;
pub mod reload;
pub mod revocation;
pub mod server;
pub mod store;
pub mod tls;
pub mod warn_limit;

/// The controller's version, sent in welcomes.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
