//! `sentinel token create --host NAME [--ttl 15m]`: a one-time join token for
//! `hostagent enroll` (admin). Prints the token on its own line (for scripts), then how to
//! use it and when it expires, on standard error.

use std::time::Duration;

use clap::Subcommand;
use sentinel_proto::v1::CreateJoinTokenRequest;

use super::deploy::status_err;
use super::ClientArgs;

/// `sentinel token …`.
#[derive(Debug, Clone, Subcommand)]
pub enum TokenCommand {
    /// Make a one-time join token that enrols one new host (admin).
    Create {
        /// The host the token enrols; its certificate will carry this name.
        #[arg(long)]
        host: String,
        /// How long the token may be used (at most 7d).
        #[arg(long, default_value = "15m", value_parser = humantime::parse_duration)]
        ttl: Duration,
    },
}

/// Runs a `sentinel token` command.
pub async fn token(client: &ClientArgs, command: TokenCommand) -> anyhow::Result<u8> {
    let TokenCommand::Create { host, ttl } = command;
    let mut api = client.connect().await?;
    let made = api
        .create_join_token(CreateJoinTokenRequest {
            host_name: host.clone(),
            ttl: Some(sentinel_proto::time::duration(ttl)),
        })
        .await
        .map_err(status_err)?
        .into_inner();
    println!("{}", made.token);
    let expires = made
        .expires_at
        .as_ref()
        .and_then(sentinel_proto::time::to_jiff)
        .map(|t| t.to_string())
        .unwrap_or_default();
    eprintln!(
        "join token for host {host:?}, valid once until {expires}; on the new host run:\n  \
         hostagent enroll --controller {} --token TOKEN",
        client.controller
    );
    Ok(0)
}
