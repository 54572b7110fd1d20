//! The operator CLI: `sentinel hosts`, `sentinel host NAME`, `sentinel jobs`,
//! `sentinel deploys`, `sentinel deploy … --wait`, `sentinel rollback …`: tables for people,
//! `--json` for scripts, colour only on a terminal. It speaks the same mTLS operator API as
//! grpcurl, with an operator certificate.
//!
//! Exit codes: 0 success; 1 the call worked but its outcome is a failure (a deploy that did not
//! succeed); 2 the controller could not be reached or answered with an error (refused, unknown
//! name); 64 a bad argument.

pub mod audit;
pub mod backups;
pub mod deploy;
pub mod fleet;
pub mod format;
pub mod host;
pub mod jobs;
pub mod json;
pub mod revoke;
pub mod token;

use std::path::PathBuf;

use clap::Args;
use sentinel_daemon::tls::TlsFiles;
use sentinel_proto::v1::fleet_service_client::FleetServiceClient;
use tonic::transport::Channel;

/// Exit code when the call worked but the outcome is a failure (deploy failed).
pub const EXIT_FAILED: u8 = 1;
/// Exit code when the controller could not be reached or refused the call.
pub const EXIT_UNAVAILABLE: u8 = 2;
/// Exit code for a bad argument or config file (sysexits' EX_USAGE): retrying will not help.
pub const EXIT_USAGE: u8 = 64;

/// How to reach the controller as an operator.
#[derive(Debug, Clone, Args)]
pub struct ClientArgs {
    /// Controller address.
    #[arg(
        long,
        env = "SENTINEL_CONTROLLER",
        default_value = "127.0.0.1:7443",
        global = true
    )]
    pub controller: String,
    /// Fleet CA certificate [default: .sentinel-dev/certs/ca.pem].
    #[arg(long, env = "SENTINEL_CA", global = true)]
    pub ca: Option<PathBuf>,
    /// Operator certificate [default: .sentinel-dev/certs/operator-admin.pem].
    #[arg(long, env = "SENTINEL_CERT", global = true)]
    pub cert: Option<PathBuf>,
    /// Operator key [default: .sentinel-dev/certs/operator-admin.key].
    #[arg(long, env = "SENTINEL_KEY", global = true)]
    pub key: Option<PathBuf>,
}

impl ClientArgs {
    fn files(&self) -> TlsFiles {
        let dev = PathBuf::from(".sentinel-dev/certs");
        TlsFiles {
            ca: self.ca.clone().unwrap_or_else(|| dev.join("ca.pem")),
            cert: self
                .cert
                .clone()
                .unwrap_or_else(|| dev.join("operator-admin.pem")),
            key: self
                .key
                .clone()
                .unwrap_or_else(|| dev.join("operator-admin.key")),
        }
    }

    /// Connects to the operator API.
    pub async fn connect(&self) -> anyhow::Result<FleetServiceClient<Channel>> {
        let files = self.files();
        if let Some(problem) = sentinel_daemon::certcheck::validity_problem(&files.cert) {
            anyhow::bail!(
                "the controller would refuse this certificate: {problem} (`sentinel pki \
                 issue-operator`, or ask an admin)"
            );
        }
        let tls = sentinel_daemon::tls::client_config(&files)?;
        let channel = sentinel_daemon::tls::channel(&self.controller, None, tls)
            .await
            .map_err(|e| anyhow::anyhow!("connecting to {}: {e}", self.controller))?;
        Ok(FleetServiceClient::new(channel))
    }
}

/// Whether to colour output: only on a terminal, and never with NO_COLOR set.
pub fn colour() -> bool {
    use std::io::IsTerminal;
    std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none()
}

/// Prints rows as aligned columns.
pub fn table(headers: &[&str], rows: &[Vec<String>]) {
    let mut out = String::new();
    table_into(&mut out, "", headers, rows);
    print!("{out}");
}

/// Appends rows as aligned columns, each line starting with `indent`. Widths count what shows
/// on screen, so coloured cells line up too.
pub fn table_into(out: &mut String, indent: &str, headers: &[&str], rows: &[Vec<String>]) {
    use format::visible_width;
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(visible_width(cell));
            }
        }
    }
    let line = |cells: &[String]| {
        let text = cells
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let pad = widths
                    .get(i)
                    .copied()
                    .unwrap_or(0)
                    .saturating_sub(visible_width(c));
                format!("{c}{}", " ".repeat(pad))
            })
            .collect::<Vec<_>>()
            .join("  ");
        format!("{indent}{}\n", text.trim_end())
    };
    let headers: Vec<String> = headers.iter().map(|h| h.to_string()).collect();
    out.push_str(&line(&headers));
    for row in rows {
        out.push_str(&line(row));
    }
}
