//! What both of Sentinel's daemons (`sentinel` and `hostagent`) run on, below the wire
//! contract: TLS material and the TLS 1.3 client, config files, atomic file writes, logging,
//! systemd readiness, signals, reconnect backoff, the Prometheus exposition and the HTTP
//! client.
//!
//! It links none of the agent's collectors (Docker, Redis) or job tools, so the controller can
//! depend on it without carrying them.
#![forbid(unsafe_code)]

pub mod backoff;
pub mod certcheck;
pub mod config;
pub mod csr;
pub mod docs;
pub mod fs;
pub mod http;
pub mod join_token;
pub mod logging;
pub mod metrics;
pub mod signal;
pub mod systemd;
pub mod tls;
pub mod tls_explain;

/// The version both binaries report (one workspace version).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Formats an error with its sources, so TLS and connect failures say what really happened.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let s_text = s.to_string();
        if !out.contains(&s_text) {
            out.push_str(": ");
            out.push_str(&s_text);
        }
        source = s.source();
    }
    out
}
