//! Reading what the audit judges: the cluster's catalog through the auditor's connection (the
//! agent's own catalog reader, so both see the same thing), plus the server's own CONNECT
//! verdict for every audited pair, which the audit uses only as a cross-check.

use std::time::Duration;

use hostagent::collectors::postgres::{
    connect, describe, read_catalog, Catalog, PgConnection, PgError,
};

use super::audit::EffectiveConnect;
use super::policy::IsolationConfig;

/// The `application_name` of the auditor's sessions.
pub const AUDITOR_APPLICATION_NAME: &str = "sentinel-isolation-audit";

/// A catalog and the server's CONNECT verdicts, read through one connection.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Roles, memberships, databases and their ACLs.
    pub catalog: Catalog,
    /// `(user, database)` pairs across environments for which `has_database_privilege` says
    /// CONNECT.
    pub effective_connect: EffectiveConnect,
}

/// Connects as the auditor.
pub async fn connect_auditor(policy: &IsolationConfig) -> Result<PgConnection, PgError> {
    connect(&policy.auditor, AUDITOR_APPLICATION_NAME).await
}

/// Reads a snapshot through `connection`.
pub async fn read(
    connection: &mut PgConnection,
    policy: &IsolationConfig,
) -> Result<Snapshot, PgError> {
    let timeout = policy.auditor.timeout;
    let catalog = read_catalog(connection, timeout).await?;
    let effective_connect = effective_connect(connection, policy, &catalog, timeout).await?;
    Ok(Snapshot {
        catalog,
        effective_connect,
    })
}

/// `has_database_privilege(user, db, 'CONNECT')` for every user × database of another
/// environment that both exist (the function fails on names that do not).
async fn effective_connect(
    connection: &mut PgConnection,
    policy: &IsolationConfig,
    catalog: &Catalog,
    timeout: Duration,
) -> Result<EffectiveConnect, PgError> {
    let role_exists = |r: &str| catalog.roles.iter().any(|x| x.name == r);
    let db_exists = |d: &str| catalog.databases.iter().any(|x| x.name == d);
    let mut users = Vec::new();
    let mut databases = Vec::new();
    for (user_env, user_policy) in &policy.environments {
        for (db_env, db_policy) in &policy.environments {
            if user_env == db_env {
                continue;
            }
            for user in user_policy.users.iter().filter(|u| role_exists(u)) {
                for db in db_policy.databases.iter().filter(|d| db_exists(d)) {
                    users.push(user.clone());
                    databases.push(db.clone());
                }
            }
        }
    }
    if users.is_empty() {
        return Ok(EffectiveConnect::new());
    }
    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 2] = [&users, &databases];
    // By OID: the name variants look every database up through an index scan, which for
    // tens of thousands of pairs costs more than the rest of the audit; the joins also drop a
    // role or database removed since the catalog was read instead of failing.
    let query = connection.client.query(
        "SELECT r.rolname::text, d.datname::text \
         FROM unnest($1::text[], $2::text[]) AS p(u, d) \
         JOIN pg_catalog.pg_roles r ON r.rolname = p.u \
         JOIN pg_catalog.pg_database d ON d.datname = p.d \
         WHERE pg_catalog.has_database_privilege(r.oid, d.oid, 'CONNECT')",
        &params,
    );
    let rows = match tokio::time::timeout(timeout, query).await {
        Err(_) => {
            return Err(PgError::Timeout {
                what: "checking CONNECT privileges on",
                target: connection.target.clone(),
                after: timeout,
            })
        }
        Ok(Err(e)) => {
            return Err(PgError::Query {
                what: "checking CONNECT privileges".into(),
                target: connection.target.clone(),
                message: describe(&e),
            })
        }
        Ok(Ok(rows)) => rows,
    };
    let mut out = EffectiveConnect::new();
    for row in rows {
        let pair: Result<(String, String), _> =
            row.try_get(0).and_then(|u| Ok((u, row.try_get(1)?)));
        match pair {
            Ok(pair) => {
                out.insert(pair);
            }
            Err(e) => {
                return Err(PgError::Query {
                    what: "reading CONNECT privileges".into(),
                    target: connection.target.clone(),
                    message: describe(&e),
                })
            }
        }
    }
    Ok(out)
}
