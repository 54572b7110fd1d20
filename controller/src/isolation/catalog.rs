//! Reading what the audit judges: the cluster's catalog through the auditor's connection (the
//! agent's own catalog reader, so both see the same thing), plus the server's own CONNECT
//! verdict for every audited pair, which the audit uses only as a cross-check.

use std::collections::BTreeMap;
use std::time::Duration;

use sentinel_postgres::{connect, describe, read_catalog, Catalog, PgConnection, PgError};

use super::audit::{EffectiveConnect, ObjectOwners};
use super::policy::IsolationConfig;

/// The `application_name` of the auditor's sessions.
pub const AUDITOR_APPLICATION_NAME: &str = "sentinel-isolation-audit";

/// A catalog and the server's CONNECT verdicts, read through one connection.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Roles, memberships, databases and their ACLs.
    pub catalog: Catalog,
    /// `(user, database)` pairs across environments (or to a database in none) for which
    /// `has_database_privilege` says CONNECT.
    pub effective_connect: EffectiveConnect,
    /// Who owns the objects inside each database (`pg_shdepend`).
    pub object_owners: ObjectOwners,
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
    let object_owners = object_owners(connection, timeout).await?;
    Ok(Snapshot {
        catalog,
        effective_connect,
        object_owners,
    })
}

/// Per database, the roles owning objects in it and how many: the app that built a database
/// still owns its tables after someone changes the database's owner, so the fix can give the
/// database back to it. `pg_shdepend` is shared and readable by any role, so the auditor
/// needs no CONNECT on the databases.
async fn object_owners(
    connection: &mut PgConnection,
    timeout: Duration,
) -> Result<ObjectOwners, PgError> {
    let query = connection.client.query(
        "SELECT d.datname::text, pg_catalog.pg_get_userbyid(s.refobjid)::text, count(*) \
         FROM pg_catalog.pg_shdepend s JOIN pg_catalog.pg_database d ON d.oid = s.dbid \
         WHERE s.deptype = 'o' AND s.refclassid = 'pg_catalog.pg_authid'::pg_catalog.regclass \
         GROUP BY 1, 2",
        &[],
    );
    let rows = match tokio::time::timeout(timeout, query).await {
        Err(_) => {
            return Err(PgError::Timeout {
                what: "reading object owners (pg_shdepend) of",
                target: connection.target.clone(),
                after: timeout,
            })
        }
        Ok(Err(e)) => {
            return Err(PgError::Query {
                what: "reading object owners (pg_shdepend)".into(),
                target: connection.target.clone(),
                message: describe(&e),
            })
        }
        Ok(Ok(rows)) => rows,
    };
    let mut out = ObjectOwners::new();
    for row in rows {
        let entry: Result<(String, String, i64), _> = row
            .try_get(0)
            .and_then(|d| Ok((d, row.try_get(1)?, row.try_get(2)?)));
        let (database, role, objects) = entry.map_err(|e| PgError::Query {
            what: "reading object owners (pg_shdepend)".into(),
            target: connection.target.clone(),
            message: describe(&e),
        })?;
        out.entry(database).or_default().insert(role, objects);
    }
    Ok(out)
}

/// `has_database_privilege(user, db, 'CONNECT')` for every user × database of another
/// environment, and every user × database no environment lists, as they exist in `catalog`.
async fn effective_connect(
    connection: &mut PgConnection,
    policy: &IsolationConfig,
    catalog: &Catalog,
    timeout: Duration,
) -> Result<EffectiveConnect, PgError> {
    let roles: BTreeMap<&str, u32> = catalog
        .roles
        .iter()
        .map(|r| (r.name.as_str(), r.oid))
        .collect();
    let databases: BTreeMap<&str, u32> = catalog
        .databases
        .iter()
        .map(|d| (d.name.as_str(), d.oid))
        .collect();
    let mut user_oids: Vec<u32> = Vec::new();
    let mut database_oids: Vec<u32> = Vec::new();
    for (user_env, user_policy) in &policy.environments {
        for (db_env, db_policy) in &policy.environments {
            if user_env == db_env {
                continue;
            }
            for user in user_policy
                .users
                .iter()
                .filter_map(|u| roles.get(u.as_str()))
            {
                for db in db_policy
                    .databases
                    .iter()
                    .filter_map(|d| databases.get(d.as_str()))
                {
                    user_oids.push(*user);
                    database_oids.push(*db);
                }
            }
        }
    }
    // Every user against the databases no environment lists.
    for db in super::audit::unlisted_databases(policy, catalog) {
        for user in policy
            .environments
            .values()
            .flat_map(|e| e.users.iter())
            .filter_map(|u| roles.get(u.as_str()))
        {
            user_oids.push(*user);
            database_oids.push(db.oid);
        }
    }
    if user_oids.is_empty() {
        return Ok(EffectiveConnect::new());
    }
    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 2] = [&user_oids, &database_oids];
    // By OID: the name variants look every database up through an index scan, several times
    // slower over tens of thousands of pairs; and an OID dropped since the catalog was read
    // gives NULL (not true) instead of an error.
    let query = connection.client.query(
        "SELECT p.u, p.d FROM unnest($1::oid[], $2::oid[]) AS p(u, d) \
         WHERE pg_catalog.has_database_privilege(p.u, p.d, 'CONNECT')",
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
    let role_names: BTreeMap<u32, &str> = roles.iter().map(|(n, o)| (*o, *n)).collect();
    let database_names: BTreeMap<u32, &str> = databases.iter().map(|(n, o)| (*o, *n)).collect();
    let mut out = EffectiveConnect::new();
    for row in rows {
        let pair: Result<(u32, u32), _> = row.try_get(0).and_then(|u| Ok((u, row.try_get(1)?)));
        let (user, db) = pair.map_err(|e| PgError::Query {
            what: "reading CONNECT privileges".into(),
            target: connection.target.clone(),
            message: describe(&e),
        })?;
        if let (Some(user), Some(db)) = (role_names.get(&user), database_names.get(&db)) {
            out.insert((user.to_string(), db.to_string()));
        }
    }
    Ok(out)
}
