//! The operator CLI: `sentinel hosts`, `sentinel deploy … --wait`, `sentinel rollback …`.
//! It speaks the same mTLS operator API as grpcurl, with an operator certificate.

pub mod deploy;
pub mod fleet;

use std::path::PathBuf;

use clap::Args;
use hostagent::tls::TlsFiles;
use sentinel_proto::v1::fleet_service_client::FleetServiceClient;
use tonic::transport::Channel;

/// Exit code when the call worked but the outcome is a failure (deploy failed).
pub const EXIT_FAILED: u8 = 1;
/// Exit code when the controller could not be reached or refused the call.
pub const EXIT_UNAVAILABLE: u8 = 2;

/// How to reach the controller as an operator.
#[derive(Debug, Clone, Args)]
pub struct ClientArgs {
    /// Controller address.
    #[arg(long, env = "SENTINEL_CONTROLLER", default_value = "127.0.0.1:7443", global = true)]
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
            cert: self.cert.clone().unwrap_or_else(|| dev.join("operator-admin.pem")),
            key: self.key.clone().unwrap_or_else(|| dev.join("operator-admin.key")),
        }
    }

    /// Connects to the operator API.
    pub async fn connect(&self) -> anyhow::Result<FleetServiceClient<Channel>> {
        let tls = hostagent::tls::client_config(&self.files())?;
        let channel = hostagent::tls::channel(&self.controller, None, tls)
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
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(cell.chars().count());
            }
        }
    }
    let line = |cells: Vec<String>| {
        cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths.get(i).copied().unwrap_or(0)))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_string()
    };
    println!("{}", line(headers.iter().map(|h| h.to_string()).collect()));
    for row in rows {
        println!("{}", line(row.clone()));
    }
}
