//! The catalog: roles, memberships and database ACLs read in one read-only snapshot
//! ([`read_catalog`]), and the agent's report of it ([`Catalog::to_state`]).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sentinel_proto::v1::{PgDatabase, PgDatabaseGrant, PgRole, PostgresState};
use tokio_postgres::IsolationLevel;

use crate::{describe, PgConnection, PgError};

/// A cluster's roles, memberships and database ACLs, read in one snapshot.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Catalog {
    /// `server_version`, e.g. "15.8 (Debian 15.8-0+deb12u1)".
    pub server_version: String,
    /// `server_version_num`, e.g. 150008.
    pub server_version_num: i32,
    /// Every role, predefined `pg_*` ones included (they can appear in memberships).
    pub roles: Vec<CatalogRole>,
    /// Every row of `pg_auth_members`.
    pub memberships: Vec<CatalogMembership>,
    /// Every database with its owner and exploded ACL.
    pub databases: Vec<CatalogDatabase>,
}

/// One role's attributes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CatalogRole {
    /// The role's OID.
    pub oid: u32,
    /// Role name.
    pub name: String,
    /// `rolcanlogin`.
    pub login: bool,
    /// `rolsuper`.
    pub superuser: bool,
    /// `rolcreaterole`.
    pub createrole: bool,
    /// `rolcreatedb`.
    pub createdb: bool,
    /// `rolbypassrls`.
    pub bypassrls: bool,
    /// `rolinherit`.
    pub inherit: bool,
    /// `rolconnlimit`; -1 means no limit.
    pub connection_limit: i32,
    /// `rolvaliduntil`; `None` when the password never expires.
    pub password_expires: Option<SystemTime>,
}

/// `member` is a member of `role`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CatalogMembership {
    /// The role granted.
    pub role: String,
    /// The role it is granted to.
    pub member: String,
    /// Who granted it (PostgreSQL 16 keeps one row per grantor).
    pub grantor: String,
    /// Whether `member` holds `role`'s privileges without SET ROLE: the member's `rolinherit`
    /// before PostgreSQL 16, the grant's `inherit_option` from 16 on.
    pub inherit: bool,
    /// Whether `member` may `SET ROLE` to `role` (always before PostgreSQL 16).
    pub set: bool,
    /// Whether `member` may grant `role` to others.
    pub admin: bool,
}

/// Who an ACL entry is for.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Grantee {
    /// The PUBLIC pseudo-role: every role, present and future.
    Public,
    /// A role by name.
    Role(String),
}

impl fmt::Display for Grantee {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Grantee::Public => f.write_str("PUBLIC"),
            Grantee::Role(name) => f.write_str(name),
        }
    }
}

/// One grantee's database privileges, merged over every grantor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatabaseGrant {
    /// PUBLIC or a role.
    pub grantee: Grantee,
    /// CONNECT (`c`).
    pub connect: bool,
    /// CREATE (`C`).
    pub create: bool,
    /// TEMPORARY (`T`).
    pub temporary: bool,
    /// Who granted CONNECT, one entry per grantor, sorted (a REVOKE removes only the grant of
    /// the role that runs it, or of the owner when a superuser runs it).
    pub connect_grantors: Vec<String>,
    /// Whether CONNECT is held WITH GRANT OPTION (from any grantor).
    pub connect_grantable: bool,
}

/// One database.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CatalogDatabase {
    /// The database's OID.
    pub oid: u32,
    /// `datname`.
    pub name: String,
    /// The owner's role name.
    pub owner: String,
    /// `datallowconn`.
    pub allow_connections: bool,
    /// `datistemplate`.
    pub is_template: bool,
    /// `datacl` exploded (its default when NULL), one entry per grantee.
    pub grants: Vec<DatabaseGrant>,
    /// Whether `datacl` was NULL, i.e. the built-in default applies (PUBLIC may CONNECT).
    pub default_acl: bool,
}

const ROLES_SQL: &str = "\
SELECT rolname::text, rolcanlogin, rolsuper, rolcreaterole, rolcreatedb, rolbypassrls, \
       rolinherit, rolconnlimit, \
       CASE WHEN rolvaliduntil IS NULL OR rolvaliduntil = 'infinity' THEN NULL \
            WHEN rolvaliduntil = '-infinity' THEN 0::float8 \
            ELSE extract(epoch FROM rolvaliduntil)::float8 END, \
       oid \
FROM pg_catalog.pg_roles ORDER BY 1";

/// Before PostgreSQL 16 inheritance is the member's attribute and SET ROLE always allowed.
const MEMBERSHIPS_SQL_15: &str = "\
SELECT r.rolname::text, m.rolname::text, COALESCE(g.rolname::text, ''), \
       m.rolinherit, true, am.admin_option \
FROM pg_catalog.pg_auth_members am \
JOIN pg_catalog.pg_roles r ON r.oid = am.roleid \
JOIN pg_catalog.pg_roles m ON m.oid = am.member \
LEFT JOIN pg_catalog.pg_roles g ON g.oid = am.grantor \
ORDER BY 2, 1";

/// From PostgreSQL 16 each grant carries its own INHERIT and SET options.
const MEMBERSHIPS_SQL_16: &str = "\
SELECT r.rolname::text, m.rolname::text, COALESCE(g.rolname::text, ''), \
       am.inherit_option, am.set_option, am.admin_option \
FROM pg_catalog.pg_auth_members am \
JOIN pg_catalog.pg_roles r ON r.oid = am.roleid \
JOIN pg_catalog.pg_roles m ON m.oid = am.member \
LEFT JOIN pg_catalog.pg_roles g ON g.oid = am.grantor \
ORDER BY 2, 1";

/// The ACL itself, not `has_database_privilege`: we need to know who holds a privilege, not
/// only whether someone does. A NULL `datacl` means the built-in default, which `acldefault`
/// spells out (owner: everything; PUBLIC: CONNECT and TEMPORARY). An empty ACL gives no rows,
/// hence the LEFT JOIN.
const DATABASES_SQL: &str = "\
SELECT d.datname::text, pg_catalog.pg_get_userbyid(d.datdba)::text, d.datallowconn, \
       d.datistemplate, d.datacl IS NULL, \
       a.grantee::int8, \
       CASE WHEN a.grantee <> 0 THEN pg_catalog.pg_get_userbyid(a.grantee)::text END, \
       a.privilege_type::text, d.oid, \
       pg_catalog.pg_get_userbyid(a.grantor)::text, a.is_grantable \
FROM pg_catalog.pg_database d \
LEFT JOIN LATERAL pg_catalog.aclexplode(\
    COALESCE(d.datacl, pg_catalog.acldefault('d', d.datdba))) a ON true \
ORDER BY 1";

/// Reads the catalog in one read-only, repeatable-read transaction, bounded by `timeout` (on
/// the server too, through `statement_timeout`).
pub async fn read_catalog(
    connection: &mut PgConnection,
    timeout: Duration,
) -> Result<Catalog, PgError> {
    let target = connection.target.clone();
    let query_error = |what: &str, e: tokio_postgres::Error| PgError::Query {
        what: what.to_string(),
        target: target.clone(),
        message: describe(&e),
    };
    let read = async {
        let tx = connection
            .client
            .build_transaction()
            .isolation_level(IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await
            .map_err(|e| query_error("starting a read-only transaction", e))?;
        tx.batch_execute(&format!(
            "SET LOCAL statement_timeout = {}",
            timeout.as_millis().max(1)
        ))
        .await
        .map_err(|e| query_error("setting statement_timeout", e))?;
        let version = tx
            .query_one(
                "SELECT current_setting('server_version'), \
                 current_setting('server_version_num')::int4",
                &[],
            )
            .await
            .map_err(|e| query_error("reading the server version", e))?;
        let server_version: String = version
            .try_get(0)
            .map_err(|e| query_error("reading the server version", e))?;
        let server_version_num: i32 = version
            .try_get(1)
            .map_err(|e| query_error("reading the server version", e))?;

        let mut roles = Vec::new();
        for row in tx
            .query(ROLES_SQL, &[])
            .await
            .map_err(|e| query_error("reading pg_roles", e))?
        {
            let expires: Option<f64> = row.try_get(8).map_err(|e| query_error("pg_roles", e))?;
            roles.push(CatalogRole {
                oid: row.try_get(9).map_err(|e| query_error("pg_roles", e))?,
                name: row.try_get(0).map_err(|e| query_error("pg_roles", e))?,
                login: row.try_get(1).map_err(|e| query_error("pg_roles", e))?,
                superuser: row.try_get(2).map_err(|e| query_error("pg_roles", e))?,
                createrole: row.try_get(3).map_err(|e| query_error("pg_roles", e))?,
                createdb: row.try_get(4).map_err(|e| query_error("pg_roles", e))?,
                bypassrls: row.try_get(5).map_err(|e| query_error("pg_roles", e))?,
                inherit: row.try_get(6).map_err(|e| query_error("pg_roles", e))?,
                connection_limit: row.try_get(7).map_err(|e| query_error("pg_roles", e))?,
                password_expires: expires.map(epoch_seconds),
            });
        }

        let memberships_sql = if server_version_num >= 160_000 {
            MEMBERSHIPS_SQL_16
        } else {
            MEMBERSHIPS_SQL_15
        };
        let mut memberships = Vec::new();
        for row in tx
            .query(memberships_sql, &[])
            .await
            .map_err(|e| query_error("reading pg_auth_members", e))?
        {
            let get = |e| query_error("pg_auth_members", e);
            memberships.push(CatalogMembership {
                role: row.try_get(0).map_err(get)?,
                member: row.try_get(1).map_err(get)?,
                grantor: row.try_get(2).map_err(get)?,
                inherit: row.try_get(3).map_err(get)?,
                set: row.try_get(4).map_err(get)?,
                admin: row.try_get(5).map_err(get)?,
            });
        }

        let mut databases: Vec<CatalogDatabase> = Vec::new();
        let mut grants: BTreeMap<Grantee, DatabaseGrant> = BTreeMap::new();
        for row in tx
            .query(DATABASES_SQL, &[])
            .await
            .map_err(|e| query_error("reading pg_database", e))?
        {
            let get = |e| query_error("pg_database", e);
            let name: String = row.try_get(0).map_err(get)?;
            if databases.last().is_none_or(|d| d.name != name) {
                if let Some(last) = databases.last_mut() {
                    last.grants = std::mem::take(&mut grants).into_values().collect();
                }
                databases.push(CatalogDatabase {
                    oid: row.try_get(8).map_err(get)?,
                    name,
                    owner: row.try_get(1).map_err(get)?,
                    allow_connections: row.try_get(2).map_err(get)?,
                    is_template: row.try_get(3).map_err(get)?,
                    default_acl: row.try_get(4).map_err(get)?,
                    grants: Vec::new(),
                });
            }
            let grantee_oid: Option<i64> = row.try_get(5).map_err(get)?;
            let grantee_name: Option<String> = row.try_get(6).map_err(get)?;
            let privilege: Option<String> = row.try_get(7).map_err(get)?;
            let (Some(oid), Some(privilege)) = (grantee_oid, privilege) else {
                continue; // an empty ACL: nobody but superusers may do anything
            };
            let grantee = if oid == 0 {
                Grantee::Public
            } else {
                Grantee::Role(grantee_name.unwrap_or_else(|| format!("unknown (OID={oid})")))
            };
            let grant = grants
                .entry(grantee.clone())
                .or_insert_with(|| DatabaseGrant {
                    grantee,
                    connect: false,
                    create: false,
                    temporary: false,
                    connect_grantors: Vec::new(),
                    connect_grantable: false,
                });
            match privilege.as_str() {
                "CONNECT" => {
                    grant.connect = true;
                    let grantor: Option<String> = row.try_get(9).map_err(get)?;
                    let grantable: Option<bool> = row.try_get(10).map_err(get)?;
                    grant.connect_grantable |= grantable.unwrap_or(false);
                    if let Some(grantor) = grantor {
                        if let Err(at) = grant.connect_grantors.binary_search(&grantor) {
                            grant.connect_grantors.insert(at, grantor);
                        }
                    }
                }
                "CREATE" => grant.create = true,
                "TEMPORARY" | "TEMP" => grant.temporary = true,
                _ => {}
            }
        }
        if let Some(last) = databases.last_mut() {
            last.grants = grants.into_values().collect();
        }
        tx.commit()
            .await
            .map_err(|e| query_error("ending the read-only transaction", e))?;
        Ok(Catalog {
            server_version,
            server_version_num,
            roles,
            memberships,
            databases,
        })
    };
    match tokio::time::timeout(timeout, read).await {
        Ok(result) => result,
        Err(_) => Err(PgError::Timeout {
            what: "reading the catalog of",
            target: connection.target.clone(),
            after: timeout,
        }),
    }
}

fn epoch_seconds(secs: f64) -> SystemTime {
    if secs <= 0.0 || !secs.is_finite() {
        return UNIX_EPOCH;
    }
    UNIX_EPOCH + Duration::from_secs_f64(secs.min(1e12))
}

impl Catalog {
    /// Every role `role` is a member of, directly or through other roles (whatever the
    /// INHERIT/SET options), sorted.
    pub fn transitive_memberships(&self, role: &str) -> Vec<String> {
        let mut edges: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for m in &self.memberships {
            edges.entry(&m.member).or_default().push(&m.role);
        }
        let mut seen: BTreeSet<&str> = BTreeSet::new();
        let mut stack = vec![role];
        while let Some(r) = stack.pop() {
            for next in edges.get(r).into_iter().flatten() {
                if *next != role && seen.insert(next) {
                    stack.push(next);
                }
            }
        }
        seen.into_iter().map(str::to_string).collect()
    }

    /// The agent's report of this catalog: roles without the predefined `pg_*` ones (which
    /// every cluster has and nobody logs in as), their memberships, and per database the owner
    /// and the grants, PUBLIC named "PUBLIC".
    pub fn to_state(&self) -> PostgresState {
        let mut direct: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
        for m in &self.memberships {
            direct.entry(&m.member).or_default().insert(&m.role);
        }
        let roles = self
            .roles
            .iter()
            .filter(|r| !r.name.starts_with("pg_"))
            .map(|r| PgRole {
                name: r.name.clone(),
                login: r.login,
                superuser: r.superuser,
                createrole: r.createrole,
                createdb: r.createdb,
                bypassrls: r.bypassrls,
                inherit: r.inherit,
                connection_limit: r.connection_limit,
                password_expires: r.password_expires.map(sentinel_proto::time::timestamp),
                member_of: direct
                    .get(r.name.as_str())
                    .into_iter()
                    .flatten()
                    .map(|s| s.to_string())
                    .collect(),
                member_of_transitive: self.transitive_memberships(&r.name),
            })
            .collect();
        let databases = self
            .databases
            .iter()
            .map(|d| PgDatabase {
                name: d.name.clone(),
                owner: d.owner.clone(),
                grants: d
                    .grants
                    .iter()
                    .map(|g| PgDatabaseGrant {
                        grantee: g.grantee.to_string(),
                        connect: g.connect,
                        create: g.create,
                        temporary: g.temporary,
                    })
                    .collect(),
            })
            .collect();
        PostgresState {
            server_version: self.server_version.clone(),
            roles,
            databases,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transitive_memberships_follow_every_chain_once() {
        let edge = |role: &str, member: &str| CatalogMembership {
            role: role.into(),
            member: member.into(),
            inherit: true,
            set: true,
            ..Default::default()
        };
        let catalog = Catalog {
            memberships: vec![
                edge("b", "a"),
                edge("c", "b"),
                edge("a", "c"),
                edge("d", "a"),
            ],
            ..Default::default()
        };
        assert_eq!(catalog.transitive_memberships("a"), ["b", "c", "d"]);
        assert_eq!(catalog.transitive_memberships("d"), Vec::<String>::new());
    }
}
