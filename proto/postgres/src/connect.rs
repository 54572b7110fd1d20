//! TLS and connecting: [`connect`] and [`connect_to`] (with a [`Redirect`]), the connection's
//! notices, the rustls connector, [`PgError`] and [`describe`] for tokio-postgres errors.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio_postgres::config::Host;
use tokio_postgres::{Client, NoTls};

use crate::dsn::{read_secret, DsnTls, PreparedDsn};
use crate::PgClientConfig;

/// The `application_name` the agent's collector connects with (visible in `pg_stat_activity`).
pub const COLLECTOR_APPLICATION_NAME: &str = "sentinel-hostagent";
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
