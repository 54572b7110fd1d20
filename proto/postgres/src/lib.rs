//! PostgreSQL access for both binaries: where a connection's DSN and secrets come from, TLS and
//! connecting, and reading the cluster's roles, memberships and database privileges. The agent's
//! roles collector, its backup and probe jobs, and the controller's isolation audit all go
//! through here, so what an agent reports and what the audit judges come from the same queries:
//!
//! - [`PgClientConfig`] says where the DSN comes from (`dsn`, `dsn_file`, `password_file`) and
//!   the timeouts; its `Debug` never shows a password.
//! - [`connect`] resolves the secret files, turns TLS on when the DSN asks for it
//!   (`sslmode=require|verify-ca|verify-full`, rustls with the ring provider, the certificate
//!   always verified against `sslrootcert` or the system's roots) and bounds the whole
//!   handshake with the connect timeout.
//! - [`read_catalog`] reads roles, memberships and database ACLs in one read-only snapshot. The
//!   ACLs are `aclexplode`d from `pg_database.datacl`, with `acldefault('d', datdba)` when it is
//!   NULL (which is how PostgreSQL grants CONNECT and TEMPORARY to PUBLIC by default).
#![forbid(unsafe_code)]

mod catalog;
mod connect;
mod dsn;

pub use catalog::{
    read_catalog, Catalog, CatalogDatabase, CatalogMembership, CatalogRole, DatabaseGrant, Grantee,
};
pub use connect::{
    connect, connect_to, describe, PgConnection, PgError, Redirect, COLLECTOR_APPLICATION_NAME,
};
pub use dsn::{
    default_connect_timeout, default_query_timeout, percent_decode, percent_encode, redacted_dsn,
    PgClientConfig, DEFAULT_CONNECT_TIMEOUT, DEFAULT_QUERY_TIMEOUT,
};
