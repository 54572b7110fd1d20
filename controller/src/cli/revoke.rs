//! `sentinel hosts revoke|forget` and `sentinel operators revoke|unrevoke|revoked`: the deny
//! list from the command line (admin).

use sentinel_proto::v1::{
    ForgetHostRequest, ListRevocationsRequest, Revocation, RevokeRequest, UnrevokeOperatorRequest,
};

use super::deploy::status_err;
use super::format::{enum_word, one_line, when};
use super::ClientArgs;

/// `sentinel hosts …` (without one: the fleet table).
#[derive(Debug, Clone, clap::Subcommand)]
pub enum HostsCommand {
    /// Refuse every certificate of host NAME from now on: its stream is closed, its queued
    /// and running jobs are cancelled. Undone only by `forget` (then enrol the host again).
    Revoke {
        /// The host's name.
        name: String,
        /// Why (shown to the refused agent, in `sentinel hosts` and in the log).
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Remove a retired host that is offline (or revoked), with its revocation.
    Forget {
        /// The host's name.
        name: String,
    },
}

/// `sentinel operators …`.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum OperatorsCommand {
    /// Refuse every certificate of operator NAME, whatever its role.
    Revoke {
        /// The operator's name (the NAME of `sentinel://operator/ROLE/NAME`).
        name: String,
        /// Why.
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Accept operator NAME's certificates again.
    Unrevoke {
        /// The operator's name.
        name: String,
    },
    /// List the deny list: revoked hosts and operators.
    Revoked,
}

fn print_entry(verb: &str, r: &Revocation) {
    let kind = enum_word(r.kind().as_str_name(), "REVOCATION_KIND_");
    println!(
        "{kind} {} {verb} at {} by {}{}",
        r.name,
        when(r.revoked_at.as_ref()),
        one_line(&r.revoked_by),
        if r.reason.is_empty() {
            String::new()
        } else {
            format!(": {}", one_line(&r.reason))
        }
    );
    if !r.cancelled_jobs.is_empty() {
        println!("cancelled jobs: {}", r.cancelled_jobs.join(", "));
    }
}

/// Runs a `sentinel hosts revoke|forget`; returns the exit code.
pub async fn hosts(client: &ClientArgs, command: HostsCommand) -> anyhow::Result<u8> {
    let mut api = client.connect().await?;
    match command {
        HostsCommand::Revoke { name, reason } => {
            let entry = api
                .revoke_host(RevokeRequest { name, reason })
                .await
                .map_err(status_err)?
                .into_inner();
            print_entry("revoked", &entry);
        }
        HostsCommand::Forget { name } => {
            let done = api
                .forget_host(ForgetHostRequest { name })
                .await
                .map_err(status_err)?
                .into_inner();
            println!(
                "host {} forgotten{}",
                done.name,
                if done.was_revoked {
                    " (its revocation is lifted: enrol it again to bring it back)"
                } else {
                    ""
                }
            );
        }
    }
    Ok(0)
}

/// Runs a `sentinel operators …`; returns the exit code.
pub async fn operators(client: &ClientArgs, command: OperatorsCommand) -> anyhow::Result<u8> {
    let mut api = client.connect().await?;
    match command {
        OperatorsCommand::Revoke { name, reason } => {
            let entry = api
                .revoke_operator(RevokeRequest { name, reason })
                .await
                .map_err(status_err)?
                .into_inner();
            print_entry("revoked", &entry);
        }
        OperatorsCommand::Unrevoke { name } => {
            let entry = api
                .unrevoke_operator(UnrevokeOperatorRequest { name })
                .await
                .map_err(status_err)?
                .into_inner();
            print_entry("no longer revoked; was revoked", &entry);
        }
        OperatorsCommand::Revoked => {
            let list = api
                .list_revocations(ListRevocationsRequest {})
                .await
                .map_err(status_err)?
                .into_inner();
            let rows: Vec<Vec<String>> = list
                .revocations
                .iter()
                .map(|r| {
                    vec![
                        enum_word(r.kind().as_str_name(), "REVOCATION_KIND_"),
                        r.name.clone(),
                        when(r.revoked_at.as_ref()),
                        one_line(&r.revoked_by),
                        one_line(&r.reason),
                    ]
                })
                .collect();
            super::table(&["KIND", "NAME", "REVOKED", "BY", "REASON"], &rows);
        }
    }
    Ok(0)
}
