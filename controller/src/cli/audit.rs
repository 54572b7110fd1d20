//! `sentinel audit`, `sentinel lock`, `sentinel unlock`, `sentinel locks`: the audit trail of
//! every write, and the app locks that hold deploys while someone works on an app.

use std::time::SystemTime;

use sentinel_proto::v1::{ListAuditRequest, ListLocksRequest, LockAppRequest, UnlockAppRequest};

use super::deploy::status_err;
use super::format::{ago, one_line, state, truncate, when};
use super::ClientArgs;

/// What `sentinel audit` shows.
#[derive(Debug, Clone, clap::Args)]
pub struct AuditArgs {
    /// Only records since this long ago (`30m`, `2d`) or since this time (RFC 3339).
    #[arg(long, value_parser = parse_since)]
    pub since: Option<SystemTime>,
    /// Only this caller's records (operator or host name).
    #[arg(long)]
    pub who: Option<String>,
    /// At most this many, newest first.
    #[arg(long, default_value_t = 100)]
    pub limit: u32,
    /// JSON for scripts (the API's ListAuditResponse, as grpcurl prints it).
    #[arg(long)]
    pub json: bool,
}

/// `--since`: a duration back from now, or an RFC 3339 time.
pub fn parse_since(text: &str) -> Result<SystemTime, String> {
    if let Ok(ago) = humantime::parse_duration(text) {
        return SystemTime::now()
            .checked_sub(ago)
            .ok_or_else(|| format!("{text:?} reaches back before 1970"));
    }
    humantime::parse_rfc3339_weak(text).map_err(|_| {
        format!("{text:?} is neither a duration (30m, 2d) nor a time (2026-12-01T09:00:00Z)")
    })
}

/// Prints the audit trail, newest first.
pub async fn audit(client: &ClientArgs, args: AuditArgs) -> anyhow::Result<u8> {
    let mut api = client.connect().await?;
    let list = api
        .list_audit(ListAuditRequest {
            since: args.since.map(sentinel_proto::time::timestamp),
            who: args.who.unwrap_or_default(),
            limit: args.limit,
        })
        .await
        .map_err(status_err)?
        .into_inner();
    if args.json {
        super::json::print(&list, "sentinel.v1.ListAuditResponse")?;
        return Ok(0);
    }
    let colour = super::colour();
    let rows: Vec<Vec<String>> = list
        .records
        .iter()
        .map(|r| {
            vec![
                when(r.at.as_ref()),
                one_line(&r.who),
                one_line(&r.method),
                truncate(&one_line(&r.what), 60),
                state(if r.ok { "ok" } else { "failed" }, colour),
                truncate(&one_line(&r.outcome), 60),
                one_line(&r.credential),
            ]
        })
        .collect();
    super::table(
        &[
            "AT",
            "WHO",
            "CALL",
            "WHAT",
            "RESULT",
            "OUTCOME",
            "CREDENTIAL",
        ],
        &rows,
    );
    Ok(0)
}

/// Locks `app` for `reason`.
pub async fn lock(client: &ClientArgs, app: String, reason: String) -> anyhow::Result<u8> {
    let mut api = client.connect().await?;
    let lock = api
        .lock_app(LockAppRequest { app, reason })
        .await
        .map_err(status_err)?
        .into_inner();
    println!(
        "{} locked: deploys and rollbacks are refused until `sentinel unlock {}`",
        one_line(&lock.app),
        one_line(&lock.app)
    );
    Ok(0)
}

/// Removes the lock of `app`.
pub async fn unlock(client: &ClientArgs, app: String) -> anyhow::Result<u8> {
    let mut api = client.connect().await?;
    let lock = api
        .unlock_app(UnlockAppRequest { app })
        .await
        .map_err(status_err)?
        .into_inner();
    println!(
        "{} unlocked (it was locked by {} {}: {})",
        one_line(&lock.app),
        one_line(&lock.locked_by),
        ago(lock.locked_at.as_ref()),
        one_line(&lock.reason)
    );
    Ok(0)
}

/// Prints the held locks.
pub async fn locks(client: &ClientArgs, json: bool) -> anyhow::Result<u8> {
    let mut api = client.connect().await?;
    let list = api
        .list_locks(ListLocksRequest {})
        .await
        .map_err(status_err)?
        .into_inner();
    if json {
        super::json::print(&list, "sentinel.v1.ListLocksResponse")?;
        return Ok(0);
    }
    let rows: Vec<Vec<String>> = list
        .locks
        .iter()
        .map(|l| {
            vec![
                one_line(&l.app),
                one_line(&l.locked_by),
                ago(l.locked_at.as_ref()),
                truncate(&one_line(&l.reason), 80),
            ]
        })
        .collect();
    super::table(&["APP", "LOCKED BY", "SINCE", "REASON"], &rows);
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn since_takes_a_duration_or_a_time_and_names_what_it_cannot_read() {
        let an_hour_ago = parse_since("1h").unwrap();
        let age = SystemTime::now().duration_since(an_hour_ago).unwrap();
        assert!(age >= Duration::from_secs(3600) && age < Duration::from_secs(3700));
        assert!(parse_since("2026-12-01T09:00:00Z").is_ok());
        let err = parse_since("yesterday").unwrap_err();
        assert!(err.contains("yesterday"), "{err}");
    }
}
