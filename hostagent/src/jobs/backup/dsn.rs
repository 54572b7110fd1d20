//! Turning a job's `dsn_ref` into a connection: the DSN and password this agent holds for that
//! name. The PostgreSQL tools get the DSN on their command line (visible in `ps`), so it never
//! holds the password: that goes into a PGPASSFILE readable only by the agent, removed when the
//! job is done, and is registered with the job's events so that no log line can show it.

use std::path::{Path, PathBuf};

use crate::config::BackupsConfig;
use crate::jobs::JobEvents;
use sentinel_postgres::{redacted_dsn, PgClientConfig};

/// Why a DSN ref could not be used.
#[derive(Debug, thiserror::Error)]
pub enum DsnError {
    /// The agent's config has no DSN of that name.
    #[error("no DSN named {name:?} in this agent's [jobs.backups.dsns] (it has: {known})")]
    Unknown {
        /// The ref.
        name: String,
        /// The names it has, joined with ", ".
        known: String,
    },
    /// The entry gives no DSN.
    #[error("DSN {name:?} has neither `dsn` nor `dsn_file`")]
    Empty {
        /// The ref.
        name: String,
    },
    /// The DSN holds a password (not shown).
    #[error(
        "DSN {name:?} holds a password; pg_dump would show it on its command line, so put the \
         password in `password_file`"
    )]
    InlinePassword {
        /// The ref.
        name: String,
    },
    /// A `dsn_file` or `password_file` could not be read.
    #[error("reading {what} {path} of DSN {name:?}: {source}")]
    Secret {
        /// "dsn_file" or "password_file".
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The ref.
        name: String,
        /// Why.
        source: std::io::Error,
    },
    /// The PGPASSFILE could not be written.
    #[error("writing the password file {path}: {source}")]
    PassFile {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// A DSN ref resolved for one job.
#[derive(Clone)]
pub struct Resolved {
    /// The ref, for messages.
    pub name: String,
    /// The libpq connection string, without a password.
    pub conninfo: String,
    /// The password, when the config has a `password_file`.
    pub password: Option<String>,
    /// The same connection for tokio-postgres (the agent's own queries).
    pub client: PgClientConfig,
}

impl std::fmt::Debug for Resolved {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Resolved")
            .field("name", &self.name)
            .field("conninfo", &self.conninfo)
            .finish_non_exhaustive()
    }
}

/// Whether a DSN carries a password (inline `password=` or in a URL's user info).
pub fn has_password(dsn: &str) -> bool {
    redacted_dsn(dsn).contains("<redacted>") && !dsn.contains("<redacted>")
}

/// Resolves `name` from the agent's `[jobs.backups.dsns]`, reading its files now (so a rotated
/// secret is picked up), and registers the password as a secret of the job.
pub fn resolve(
    config: &BackupsConfig,
    name: &str,
    events: &JobEvents,
) -> Result<Resolved, DsnError> {
    let entry = config.dsns.get(name).ok_or_else(|| DsnError::Unknown {
        name: name.to_string(),
        known: config.dsns.keys().cloned().collect::<Vec<_>>().join(", "),
    })?;
    let conninfo = match (&entry.dsn, &entry.dsn_file) {
        (Some(dsn), _) => dsn.trim().to_string(),
        (None, Some(path)) => read_secret(path, "dsn_file", name)?,
        (None, None) => {
            return Err(DsnError::Empty {
                name: name.to_string(),
            })
        }
    };
    if has_password(&conninfo) {
        // Not echoing the DSN: it holds the password.
        return Err(DsnError::InlinePassword {
            name: name.to_string(),
        });
    }
    let password = match &entry.password_file {
        Some(path) => {
            let password = read_secret(path, "password_file", name)?;
            events.add_secret(&password);
            Some(password)
        }
        None => None,
    };
    let client = PgClientConfig {
        dsn: Some(conninfo.clone()),
        dsn_file: None,
        password_file: entry.password_file.clone(),
        connect_timeout: entry.connect_timeout,
        timeout: entry.timeout,
    };
    Ok(Resolved {
        name: name.to_string(),
        conninfo,
        password,
        client,
    })
}

impl Resolved {
    /// The same connection to another database of the cluster.
    pub fn with_database(&self, database: &str) -> Resolved {
        let conninfo = with_dbname(&self.conninfo, database);
        Resolved {
            name: self.name.clone(),
            client: PgClientConfig {
                dsn: Some(conninfo.clone()),
                ..self.client.clone()
            },
            conninfo,
            password: self.password.clone(),
        }
    }
}

fn read_secret(path: &Path, what: &'static str, name: &str) -> Result<String, DsnError> {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .map_err(|source| DsnError::Secret {
            what,
            path: path.to_path_buf(),
            name: name.to_string(),
            source,
        })
}

/// `conninfo` pointing at `database` instead: a later `dbname` overrides an earlier one in a
/// key=value DSN, and a URL's path is replaced.
pub fn with_dbname(conninfo: &str, database: &str) -> String {
    let conninfo = conninfo.trim();
    for scheme in ["postgresql://", "postgres://"] {
        if let Some(rest) = conninfo.strip_prefix(scheme) {
            // The authority ends at the first `/` or `?` after the user info.
            let after_user = rest.rfind('@').map_or(0, |at| at + 1);
            let end = rest[after_user..]
                .find(['/', '?'])
                .map_or(rest.len(), |i| i + after_user);
            let (authority, tail) = rest.split_at(end);
            let query = tail.find('?').map_or("", |q| &tail[q..]);
            return format!(
                "{scheme}{authority}/{}{query}",
                sentinel_postgres::percent_encode(database)
            );
        }
    }
    let quoted = database.replace('\\', "\\\\").replace('\'', "\\'");
    format!("{conninfo} dbname='{quoted}'")
}

/// A PGPASSFILE holding one password for any server, removed when dropped.
pub struct PassFile {
    path: PathBuf,
}

impl PassFile {
    /// Writes `password` to `dir/NAME.pgpass`, mode 0600 from the start.
    pub fn write(dir: &Path, name: &str, password: &str) -> Result<Self, DsnError> {
        use std::io::Write;
        let path = dir.join(format!("{name}.pgpass"));
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create(true).truncate(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o600);
        }
        let escaped = password.replace('\\', "\\\\").replace(':', "\\:");
        options
            .open(&path)
            .and_then(|mut f| f.write_all(format!("*:*:*:*:{escaped}\n").as_bytes()))
            .map_err(|source| DsnError::PassFile {
                path: path.clone(),
                source,
            })?;
        Ok(Self { path })
    }

    /// Its path, for `PGPASSFILE`.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for PassFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The environment every PostgreSQL tool runs with: no inherited password or service, a
/// passfile when there is a password, our application name, and a connect timeout.
pub fn tool_env(
    cmd: &mut tokio::process::Command,
    resolved: &Resolved,
    passfile: Option<&PassFile>,
) {
    for var in [
        "PGPASSWORD",
        "PGSERVICE",
        "PGSERVICEFILE",
        "PGPASSFILE",
        "PGOPTIONS",
    ] {
        cmd.env_remove(var);
    }
    if let Some(file) = passfile {
        cmd.env("PGPASSFILE", file.path());
    }
    cmd.env("PGAPPNAME", "sentinel-backup");
    cmd.env(
        "PGCONNECT_TIMEOUT",
        resolved.client.connect_timeout.as_secs().max(2).to_string(),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn another_database_replaces_the_url_path_or_appends_a_dbname() {
        assert_eq!(
            with_dbname("host=db port=5432 user=backup dbname=app", "scratch_1"),
            "host=db port=5432 user=backup dbname=app dbname='scratch_1'"
        );
        assert_eq!(
            with_dbname(
                "postgresql://backup@db:5432/app?sslmode=verify-full",
                "scratch"
            ),
            "postgresql://backup@db:5432/scratch?sslmode=verify-full"
        );
        assert_eq!(
            with_dbname("postgres://backup@db", "x y"),
            "postgres://backup@db/x%20y"
        );
    }

    #[test]
    fn passwords_in_dsns_are_detected() {
        assert!(has_password("host=db user=u password=hunter22"));
        assert!(has_password("postgresql://u:hunter22@db/app"));
        assert!(!has_password("host=db user=u dbname=app"));
        assert!(!has_password("postgresql://u@db/app"));
    }

    #[test]
    fn a_passfile_escapes_and_goes_away() {
        let dir = tempfile::tempdir().unwrap();
        let path = {
            let file = PassFile::write(dir.path(), "t", "a:b\\c").unwrap();
            let text = std::fs::read_to_string(file.path()).unwrap();
            assert_eq!(text, "*:*:*:*:a\\:b\\\\c\n");
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                let mode = std::fs::metadata(file.path()).unwrap().permissions().mode();
                assert_eq!(mode & 0o777, 0o600);
            }
            file.path().to_path_buf()
        };
        assert!(!path.exists());
    }
}
