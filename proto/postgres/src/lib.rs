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

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sentinel_proto::v1::{PgDatabase, PgDatabaseGrant, PgRole, PostgresState};
use serde::Deserialize;
use tokio_postgres::config::{Host, SslMode};
use tokio_postgres::{Client, IsolationLevel, NoTls};

/// The `application_name` the agent's collector connects with (visible in `pg_stat_activity`).
pub const COLLECTOR_APPLICATION_NAME: &str = "sentinel-hostagent";

/// How long a connection attempt (TCP, TLS and authentication) may take, by default.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long reading the catalog may take, by default.
pub const DEFAULT_QUERY_TIMEOUT: Duration = Duration::from_secs(10);
/// Below this a timeout is a typo ("5ms" for "5s"), not a choice.
const MIN_TIMEOUT: Duration = Duration::from_millis(100);

/// How to reach a PostgreSQL cluster: a DSN (inline or in a file), an optional password file and
/// timeouts. Used as `[isolation.auditor]` by the controller; the agent's
/// `[collectors.postgres]` has the same keys plus `enabled`.
///
/// The DSN is libpq's: `host=... port=... user=... dbname=... sslmode=...` or
/// `postgresql://user@host:port/dbname?sslmode=...`.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PgClientConfig {
    /// The DSN itself. Prefer `dsn_file` when it carries a password.
    #[serde(default)]
    pub dsn: Option<String>,
    /// A file holding the DSN (the `*_FILE` convention); read at every connection, so a rotated
    /// secret is picked up. Surrounding whitespace is ignored.
    #[serde(default)]
    pub dsn_file: Option<PathBuf>,
    /// A file holding the password, which then must not be in the DSN. Read at every connection.
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// Bound on connecting: TCP, TLS and authentication together.
    #[serde(default = "default_connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Bound on the queries of one run.
    #[serde(default = "default_query_timeout", with = "humantime_serde")]
    pub timeout: Duration,
}

/// [`DEFAULT_CONNECT_TIMEOUT`], for serde.
pub fn default_connect_timeout() -> Duration {
    DEFAULT_CONNECT_TIMEOUT
}

/// [`DEFAULT_QUERY_TIMEOUT`], for serde.
pub fn default_query_timeout() -> Duration {
    DEFAULT_QUERY_TIMEOUT
}

impl Default for PgClientConfig {
    fn default() -> Self {
        Self {
            dsn: None,
            dsn_file: None,
            password_file: None,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            timeout: DEFAULT_QUERY_TIMEOUT,
        }
    }
}

impl fmt::Debug for PgClientConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgClientConfig")
            .field("dsn", &self.dsn.as_deref().map(redacted_dsn))
            .field("dsn_file", &self.dsn_file)
            .field("password_file", &self.password_file)
            .field("connect_timeout", &self.connect_timeout)
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl PgClientConfig {
    /// Why this config cannot work, naming the key (relative to its table), if it cannot. Files
    /// are not read here: they may be provisioned after the config is checked.
    pub fn problem(&self) -> Option<(&'static str, String)> {
        match (&self.dsn, &self.dsn_file) {
            (None, None) => {
                return Some((
                    "dsn",
                    "give the connection string as `dsn` or `dsn_file`".into(),
                ))
            }
            (Some(_), Some(_)) => {
                return Some((
                    "dsn_file",
                    "give the connection string once: `dsn` or `dsn_file`, not both".into(),
                ))
            }
            (Some(dsn), None) => match PreparedDsn::parse(dsn) {
                Err(e) => return Some(("dsn", e)),
                Ok(prepared) => {
                    if self.password_file.is_some() && prepared.config.get_password().is_some() {
                        return Some((
                            "password_file",
                            "give the password once: in the DSN or in `password_file`".into(),
                        ));
                    }
                }
            },
            (None, Some(_)) => {}
        }
        if self.connect_timeout < MIN_TIMEOUT {
            return Some((
                "connect_timeout",
                format!("{:?} is below the minimum of 100ms", self.connect_timeout),
            ));
        }
        if self.timeout < MIN_TIMEOUT {
            return Some((
                "timeout",
                format!("{:?} is below the minimum of 100ms", self.timeout),
            ));
        }
        None
    }
}

/// A DSN with every `password` replaced by `<redacted>`, for logs and `Debug`.
pub fn redacted_dsn(dsn: &str) -> String {
    if let Some((scheme, rest)) = url_parts(dsn) {
        let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
        let (authority, tail) = rest.split_at(authority_end);
        let authority = match authority.rsplit_once('@') {
            Some((user_info, hosts)) => match user_info.split_once(':') {
                Some((user, _)) => format!("{user}:<redacted>@{hosts}"),
                None => authority.to_string(),
            },
            None => authority.to_string(),
        };
        let tail = match tail.split_once('?') {
            Some((path, query)) => {
                let params: Vec<String> = query
                    .split('&')
                    .map(|p| match p.split_once('=') {
                        Some((k, _)) if percent_decode(k) == "password" => {
                            format!("{k}=<redacted>")
                        }
                        _ => p.to_string(),
                    })
                    .collect();
                format!("{path}?{}", params.join("&"))
            }
            None => tail.to_string(),
        };
        return format!("{scheme}{authority}{tail}");
    }
    match key_values(dsn) {
        Ok(pairs) => pairs
            .iter()
            .map(|p| {
                if p.key == "password" {
                    "password=<redacted>".to_string()
                } else {
                    dsn[p.start..p.end].to_string()
                }
            })
            .collect::<Vec<_>>()
            .join(" "),
        Err(_) => "<unparsable DSN>".into(),
    }
}

/// What went wrong talking to PostgreSQL. Messages name the target (`user@host:port/dbname`)
/// and never a password.
#[derive(Debug, thiserror::Error)]
pub enum PgError {
    /// A secret file could not be read.
    #[error("reading {what} {path}: {source}")]
    Secret {
        /// `dsn_file` or `password_file`.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The DSN is not usable.
    #[error("invalid DSN: {0}")]
    Dsn(String),
    /// The TLS the DSN asks for could not be set up (e.g. `sslrootcert` unreadable).
    #[error("TLS for {target}: {message}")]
    Tls {
        /// `user@host:port/dbname`.
        target: String,
        /// What is wrong.
        message: String,
    },
    /// Connecting or authenticating failed.
    #[error("connecting to {target}: {message}")]
    Connect {
        /// `user@host:port/dbname`.
        target: String,
        /// The server's or the network's reason.
        message: String,
    },
    /// A step did not finish in time.
    #[error("{what} {target} took longer than {after:?}")]
    Timeout {
        /// "connecting to" or "reading the catalog of".
        what: &'static str,
        /// `user@host:port/dbname`.
        target: String,
        /// The configured bound.
        after: Duration,
    },
    /// A query failed.
    #[error("{what} on {target}: {message}")]
    Query {
        /// What was being done.
        what: String,
        /// `user@host:port/dbname`.
        target: String,
        /// The server's reason.
        message: String,
    },
}

/// A connected client and the target it talks to (for messages).
pub struct PgConnection {
    /// The client; the connection task ends when it is dropped.
    pub client: Client,
    /// `user@host:port/dbname`, for messages.
    pub target: String,
    /// The server's notices (WARNING, NOTICE...), in order. A GRANT or REVOKE the role may not
    /// make only *warns* ("no privileges could be revoked"), so whoever changes privileges
    /// must read these.
    pub notices: tokio::sync::mpsc::UnboundedReceiver<tokio_postgres::error::DbError>,
}

impl PgConnection {
    /// The notices received so far.
    pub fn take_notices(&mut self) -> Vec<tokio_postgres::error::DbError> {
        let mut out = Vec::new();
        while let Ok(notice) = self.notices.try_recv() {
            out.push(notice);
        }
        out
    }
}

impl fmt::Debug for PgConnection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgConnection")
            .field("target", &self.target)
            .finish_non_exhaustive()
    }
}

/// Connects as `config` says, within its connect timeout.
pub async fn connect(
    config: &PgClientConfig,
    application_name: &str,
) -> Result<PgConnection, PgError> {
    connect_to(config, application_name, None).await
}

/// Another place for a connection than its DSN names: the same user, password and TLS
/// settings against another server and database (an isolation probe tries one environment's
/// credentials on another environment's database).
#[derive(Debug, Clone, Copy)]
pub struct Redirect<'a> {
    /// Host name or address.
    pub host: &'a str,
    /// TCP port.
    pub port: u16,
    /// Database name.
    pub dbname: &'a str,
}

/// [`connect`], optionally redirected to another host, port and database.
pub async fn connect_to(
    config: &PgClientConfig,
    application_name: &str,
    redirect: Option<Redirect<'_>>,
) -> Result<PgConnection, PgError> {
    let dsn = match (&config.dsn, &config.dsn_file) {
        (Some(dsn), _) => dsn.clone(),
        (None, Some(path)) => read_secret(path, "dsn_file")?,
        (None, None) => {
            return Err(PgError::Dsn(
                "no connection string (`dsn` or `dsn_file`)".into(),
            ))
        }
    };
    let mut prepared = PreparedDsn::parse(&dsn).map_err(PgError::Dsn)?;
    if let Some(path) = &config.password_file {
        let password = read_secret(path, "password_file")?;
        prepared.config.password(password);
    }
    if let Some(to) = redirect {
        // tokio-postgres can add hosts but not remove them: start afresh with the credentials.
        let mut fresh = tokio_postgres::Config::new();
        if let Some(user) = prepared.config.get_user() {
            fresh.user(user);
        }
        if let Some(password) = prepared.config.get_password() {
            fresh.password(password);
        }
        fresh.ssl_mode(prepared.config.get_ssl_mode());
        fresh.host(to.host).port(to.port).dbname(to.dbname);
        prepared.config = fresh;
    }
    prepared.config.application_name(application_name);
    prepared.config.connect_timeout(config.connect_timeout);
    let target = target_of(&prepared.config);
    let tls = match &prepared.tls {
        DsnTls::Off => None,
        DsnTls::Verified { root_cert } => Some(tls_connector(root_cert.as_deref()).map_err(
            |message| PgError::Tls {
                target: target.clone(),
                message,
            },
        )?),
    };
    let (notices_tx, notices) = tokio::sync::mpsc::unbounded_channel();
    let attempt = async {
        match tls {
            None => {
                let (client, connection) = prepared.config.connect(NoTls).await?;
                tokio::spawn(drive(connection, notices_tx));
                Ok(client)
            }
            Some(tls) => {
                let (client, connection) = prepared.config.connect(tls).await?;
                tokio::spawn(drive(connection, notices_tx));
                Ok(client)
            }
        }
    };
    match tokio::time::timeout(config.connect_timeout, attempt).await {
        Err(_) => Err(PgError::Timeout {
            what: "connecting to",
            target,
            after: config.connect_timeout,
        }),
        Ok(Err(e)) => Err(PgError::Connect {
            message: connect_hint(&e, &prepared.tls, describe(&e)),
            target,
        }),
        Ok(Ok(client)) => Ok(PgConnection {
            client,
            target,
            notices,
        }),
    }
}

/// Runs a connection until its client is dropped or the server goes away, passing the
/// server's notices on. A notice reaches `notices` before the reply of the statement that
/// caused it reaches the client: both come from this one task, in the server's order.
async fn drive<S, T>(
    mut connection: tokio_postgres::Connection<S, T>,
    notices: tokio::sync::mpsc::UnboundedSender<tokio_postgres::error::DbError>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use futures::StreamExt;
    let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
    while let Some(message) = messages.next().await {
        match message {
            Ok(tokio_postgres::AsyncMessage::Notice(notice)) => {
                let _ = notices.send(notice);
            }
            Ok(_) => {}
            Err(e) => {
                tracing::debug!(error = %describe(&e), "postgres connection ended");
                return;
            }
        }
    }
}

/// A tokio-postgres error with its causes: the server's own message (severity, text, hint) for
/// database errors, the I/O or TLS reason for the others.
pub fn describe(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        let mut out = format!("{}: {}", db.severity(), db.message());
        if let Some(hint) = db.hint() {
            out.push_str(&format!(" (hint: {hint})"));
        }
        return out;
    }
    let mut out = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        let text = cause.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = cause.source();
    }
    out
}

/// Adds what to do about a TLS verification failure to its message.
fn connect_hint(e: &tokio_postgres::Error, tls: &DsnTls, message: String) -> String {
    let unverified = message.contains("invalid peer certificate");
    match tls {
        DsnTls::Verified { root_cert: None } if unverified => format!(
            "{message} (the server's certificate does not chain to the system's trusted roots: \
             give its CA with sslrootcert=FILE in the DSN)"
        ),
        DsnTls::Verified {
            root_cert: Some(path),
        } if unverified => format!(
            "{message} (the server's certificate does not chain to sslrootcert {} or does not \
             name the host)",
            path.display()
        ),
        _ if e.as_db_error().is_none() && message.contains("server does not support TLS") => {
            format!("{message} (the DSN asks for TLS with its sslmode)")
        }
        _ => message,
    }
}

fn read_secret(path: &Path, what: &'static str) -> Result<String, PgError> {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .map_err(|source| PgError::Secret {
            what,
            path: path.to_path_buf(),
            source,
        })
}

/// `user@host:port/dbname` (several hosts joined by commas), never the password.
fn target_of(config: &tokio_postgres::Config) -> String {
    let ports = config.get_ports();
    let hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .enumerate()
        .map(|(i, host)| {
            let port = ports.get(i).or(ports.first()).copied().unwrap_or(5432);
            match host {
                Host::Tcp(name) => format!("{name}:{port}"),
                Host::Unix(dir) => format!("{}/.s.PGSQL.{port}", dir.display()),
            }
        })
        .collect();
    let hosts = if hosts.is_empty() {
        "localhost:5432".to_string()
    } else {
        hosts.join(",")
    };
    let user = config.get_user().unwrap_or("?");
    let db = config.get_dbname().unwrap_or(user);
    format!("{user}@{hosts}/{db}")
}

/// What the DSN says about TLS.
#[derive(Debug, Clone, PartialEq, Eq)]
enum DsnTls {
    /// `sslmode` absent, `disable`, `allow` or `prefer`: plain connection.
    Off,
    /// `require`, `verify-ca` or `verify-full`: TLS, and the certificate is verified (chain and
    /// host name) against `root_cert`, or the system's roots when it is absent or `system`.
    Verified { root_cert: Option<PathBuf> },
}

/// A DSN split into what tokio-postgres understands and the libpq TLS keys it does not
/// (`sslmode=verify-*`, `sslrootcert`), which we apply ourselves.
struct PreparedDsn {
    config: tokio_postgres::Config,
    tls: DsnTls,
}

impl PreparedDsn {
    /// Parses a DSN. Errors never quote it (it may hold a password).
    fn parse(dsn: &str) -> Result<Self, String> {
        let dsn = dsn.trim();
        if dsn.is_empty() {
            return Err("the connection string is empty".into());
        }
        let (rest, sslmode, rootcert) = if let Some((scheme, body)) = url_parts(dsn) {
            split_url_tls(scheme, body)
        } else {
            split_key_value_tls(dsn)?
        };
        let tls = match sslmode.as_deref() {
            None | Some("disable") | Some("allow") | Some("prefer") => DsnTls::Off,
            Some("require") | Some("verify-ca") | Some("verify-full") => DsnTls::Verified {
                root_cert: rootcert
                    .filter(|r| r != "system" && !r.is_empty())
                    .map(PathBuf::from),
            },
            Some(other) => {
                return Err(format!(
                    "sslmode {other:?} is not one of disable, allow, prefer, require, verify-ca, \
                     verify-full"
                ))
            }
        };
        let mut config: tokio_postgres::Config = rest
            .parse()
            .map_err(|e: tokio_postgres::Error| describe(&e))?;
        if config.get_user().is_none() {
            return Err("the connection string names no user".into());
        }
        config.ssl_mode(match tls {
            DsnTls::Off => SslMode::Disable,
            DsnTls::Verified { .. } => SslMode::Require,
        });
        Ok(Self { config, tls })
    }
}

/// `("postgresql://", rest)` for a URL DSN.
fn url_parts(dsn: &str) -> Option<(&str, &str)> {
    ["postgresql://", "postgres://"]
        .into_iter()
        .find_map(|scheme| dsn.strip_prefix(scheme).map(|rest| (scheme, rest)))
}

/// Takes `sslmode` and `sslrootcert` out of a URL's query.
fn split_url_tls(scheme: &str, body: &str) -> (String, Option<String>, Option<String>) {
    // The query starts at the first `?` after the user info (a password may hold a raw `?`).
    let after_user = body.rfind('@').map_or(0, |at| at + 1);
    let Some(q) = body[after_user..].find('?').map(|q| q + after_user) else {
        return (format!("{scheme}{body}"), None, None);
    };
    let (head, query) = (&body[..q], &body[q + 1..]);
    let mut sslmode = None;
    let mut rootcert = None;
    let mut kept = Vec::new();
    for param in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = param.split_once('=').unwrap_or((param, ""));
        match percent_decode(k).as_str() {
            "sslmode" => sslmode = Some(percent_decode(v)),
            "sslrootcert" => rootcert = Some(percent_decode(v)),
            _ => kept.push(param),
        }
    }
    let rest = if kept.is_empty() {
        format!("{scheme}{head}")
    } else {
        format!("{scheme}{head}?{}", kept.join("&"))
    };
    (rest, sslmode, rootcert)
}

/// Takes `sslmode` and `sslrootcert` out of a `key=value` DSN.
fn split_key_value_tls(dsn: &str) -> Result<(String, Option<String>, Option<String>), String> {
    let pairs = key_values(dsn)?;
    let mut sslmode = None;
    let mut rootcert = None;
    let mut kept = Vec::new();
    for p in pairs {
        match p.key.as_str() {
            "sslmode" => sslmode = Some(p.value),
            "sslrootcert" => rootcert = Some(p.value),
            _ => kept.push(&dsn[p.start..p.end]),
        }
    }
    Ok((kept.join(" "), sslmode, rootcert))
}

/// One `key=value` of a libpq DSN, with its byte span in the DSN.
struct KeyValue {
    key: String,
    value: String,
    start: usize,
    end: usize,
}

/// Splits a libpq `key=value` DSN: values may be single-quoted, with `\'` and `\\` escapes.
fn key_values(dsn: &str) -> Result<Vec<KeyValue>, String> {
    let bytes = dsn.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    let skip_space = |mut i: usize| {
        while i < bytes.len() && bytes[i].is_ascii_whitespace() {
            i += 1;
        }
        i
    };
    loop {
        i = skip_space(i);
        if i >= bytes.len() {
            return Ok(out);
        }
        let start = i;
        while i < bytes.len() && bytes[i] != b'=' && !bytes[i].is_ascii_whitespace() {
            i += 1;
        }
        let key = dsn[start..i].to_string();
        i = skip_space(i);
        if i >= bytes.len() || bytes[i] != b'=' {
            // Not quoting the word: in a malformed DSN it may be a stray password.
            return Err(format!(
                "expected `key=value` at byte {start} (the {}. word)",
                out.len() + 1
            ));
        }
        i = skip_space(i + 1);
        let mut value = Vec::new();
        if i < bytes.len() && bytes[i] == b'\'' {
            i += 1;
            loop {
                match bytes.get(i) {
                    None => return Err(format!("unterminated quoted value of {key:?}")),
                    Some(b'\'') => {
                        i += 1;
                        break;
                    }
                    Some(b'\\') if i + 1 < bytes.len() => {
                        value.push(bytes[i + 1]);
                        i += 2;
                    }
                    Some(&b) => {
                        value.push(b);
                        i += 1;
                    }
                }
            }
        } else {
            while i < bytes.len() && !bytes[i].is_ascii_whitespace() {
                if bytes[i] == b'\\' && i + 1 < bytes.len() {
                    i += 1;
                }
                value.push(bytes[i]);
                i += 1;
            }
        }
        out.push(KeyValue {
            key,
            value: String::from_utf8_lossy(&value).into_owned(),
            start,
            end: i,
        });
    }
}

/// Decodes `%XX` escapes (URL user info, query values); invalid escapes stay as written,
/// invalid UTF-8 is replaced.
pub fn percent_decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s)
        .decode_utf8_lossy()
        .into_owned()
}

/// What [`percent_encode`] leaves as is: RFC 3986's unreserved characters.
const UNRESERVED: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// Escapes everything but unreserved characters as `%XX`, for a URL DSN's path (a database
/// name).
pub fn percent_encode(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, UNRESERVED).to_string()
}

/// A rustls connector that verifies the server against `root_cert` (PEM) or the system roots.
fn tls_connector(
    root_cert: Option<&Path>,
) -> Result<tokio_postgres_rustls::MakeRustlsConnect, String> {
    let roots = match root_cert {
        Some(path) => {
            sentinel_daemon::tls::load_roots(path).map_err(|e| format!("sslrootcert: {e}"))?
        }
        None => sentinel_daemon::tls::system_roots()
            .map_err(|e| format!("{e} (with sslrootcert=FILE)"))?,
    };
    let config = sentinel_daemon::tls::server_auth_config(roots).map_err(|e| e.to_string())?;
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(config))
}

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
    fn percent_escapes_are_decoded_and_broken_ones_kept_as_written() {
        assert_eq!(percent_decode("p%40ss%2Fw%C3%B6rd"), "p@ss/wörd");
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%zz%4"), "%zz%4");
        assert_eq!(percent_decode("%ff"), "\u{fffd}");
        assert_eq!(percent_encode("app db/ö-1.x_~"), "app%20db%2F%C3%B6-1.x_~");
        assert_eq!(percent_decode(&percent_encode("a b%c")), "a b%c");
    }

    #[test]
    fn key_value_dsns_lose_their_tls_keys_and_keep_the_rest() {
        let p = PreparedDsn::parse(
            "host=db.example port=25060 user=auditor password='p w\\'x' dbname=defaultdb \
             sslmode=verify-full sslrootcert=/etc/sentinel/do-ca.pem",
        )
        .unwrap();
        assert_eq!(
            p.tls,
            DsnTls::Verified {
                root_cert: Some(PathBuf::from("/etc/sentinel/do-ca.pem"))
            }
        );
        assert_eq!(p.config.get_user(), Some("auditor"));
        assert_eq!(p.config.get_password(), Some(&b"p w'x"[..]));
        assert_eq!(p.config.get_ports(), &[25060]);
        assert_eq!(p.config.get_ssl_mode(), SslMode::Require);
    }

    #[test]
    fn url_dsns_lose_their_tls_keys_and_keep_the_rest() {
        let p = PreparedDsn::parse(
            "postgresql://doadmin:s3cr%3Ft@db.example:25060/defaultdb?sslmode=require&application_name=x",
        )
        .unwrap();
        assert_eq!(p.tls, DsnTls::Verified { root_cert: None });
        assert_eq!(p.config.get_password(), Some(&b"s3cr?t"[..]));
        assert_eq!(p.config.get_dbname(), Some("defaultdb"));
        let p = PreparedDsn::parse("postgres://u@h/db?sslrootcert=%2Fca.pem&sslmode=verify-ca")
            .unwrap();
        assert_eq!(
            p.tls,
            DsnTls::Verified {
                root_cert: Some(PathBuf::from("/ca.pem"))
            }
        );
    }

    #[test]
    fn tls_is_off_unless_the_dsn_asks_for_it() {
        for dsn in [
            "host=h user=u",
            "host=h user=u sslmode=disable",
            "host=h user=u sslmode=prefer",
            "postgresql://u@h/db",
        ] {
            let p = PreparedDsn::parse(dsn).unwrap();
            assert_eq!(p.tls, DsnTls::Off, "{dsn}");
            assert_eq!(p.config.get_ssl_mode(), SslMode::Disable, "{dsn}");
        }
        let err = PreparedDsn::parse("host=h user=u sslmode=sometimes").err();
        assert!(err.unwrap_or_default().contains("sslmode"));
    }

    #[test]
    fn dsn_errors_and_debug_never_show_the_password() {
        for dsn in [
            "host=h user=u password=hunter2 bogus=1",
            "host=h user=u password='hunter2",
            "host=h user=u hunter2",
            "postgresql://u:hunter2@h:notaport/db",
        ] {
            let err = PreparedDsn::parse(dsn).err().unwrap_or_default();
            assert!(!err.contains("hunter2"), "{err}");
        }
        let config = PgClientConfig {
            dsn: Some("host=h user=u password=hunter2".into()),
            ..Default::default()
        };
        let debug = format!("{config:?}");
        assert!(!debug.contains("hunter2"), "{debug}");
        assert!(debug.contains("password=<redacted>"), "{debug}");
        let url = redacted_dsn("postgresql://u:hunter2@h/db?password=hunter2&sslmode=require");
        assert!(!url.contains("hunter2"), "{url}");
        assert!(url.contains("sslmode=require"), "{url}");
    }

    #[test]
    fn config_problems_name_the_key() {
        let none = PgClientConfig::default();
        assert_eq!(none.problem().unwrap().0, "dsn");
        let both = PgClientConfig {
            dsn: Some("host=h user=u".into()),
            dsn_file: Some("/x".into()),
            ..Default::default()
        };
        assert_eq!(both.problem().unwrap().0, "dsn_file");
        let twice = PgClientConfig {
            dsn: Some("host=h user=u password=p".into()),
            password_file: Some("/p".into()),
            ..Default::default()
        };
        assert_eq!(twice.problem().unwrap().0, "password_file");
        let fast = PgClientConfig {
            dsn: Some("host=h user=u".into()),
            timeout: Duration::from_millis(5),
            ..Default::default()
        };
        assert_eq!(fast.problem().unwrap().0, "timeout");
        let no_user = PgClientConfig {
            dsn: Some("host=h".into()),
            ..Default::default()
        };
        assert_eq!(no_user.problem().unwrap().0, "dsn");
    }

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
