//! `sentinel hosts`: the fleet at a glance, a table or JSON (`sentinel host NAME` is in
//! [`super::host`]).

use sentinel_proto::v1::{HostStatus, ListHostsRequest};

use super::deploy::status_err;
use super::ClientArgs;

/// Prints every host.
pub async fn hosts(client: &ClientArgs, json: bool) -> anyhow::Result<u8> {
    let mut api = client.connect().await?;
    let list = api
        .list_hosts(ListHostsRequest::default())
        .await
        .map_err(status_err)?
        .into_inner();
    if json {
        // The API's own JSON, as grpcurl prints it (like every other `--json`).
        super::json::print(&list, "sentinel.v1.ListHostsResponse")?;
        return Ok(0);
    }
    let hosts = list.hosts;
    let colour = super::colour();
    let rows: Vec<Vec<String>> = hosts
        .iter()
        .map(|h| {
            vec![
                h.name.clone(),
                super::format::state(&status_word(h.status), colour),
                format!("{}/{}", h.containers_running, h.containers),
                format!("{:.0}s", h.state_age_seconds),
                h.failing_collectors.join(","),
                super::format::one_line(&h.agent_version),
                super::format::expires(h.cert_not_after.as_ref()),
            ]
        })
        .collect();
    super::table(
        &[
            "HOST", "STATUS", "RUNNING", "AGE", "FAILING", "VERSION", "EXPIRES",
        ],
        &rows,
    );
    Ok(0)
}

/// Prints one host (the full view of [`super::host`]).
pub async fn host(client: &ClientArgs, name: String) -> anyhow::Result<u8> {
    super::host::show(client, name, false).await
}

fn status_word(s: i32) -> String {
    sentinel_daemon::metrics::enum_word(
        HostStatus::try_from(s)
            .unwrap_or(HostStatus::Unspecified)
            .as_str_name(),
        "HOST_STATUS_",
    )
}
