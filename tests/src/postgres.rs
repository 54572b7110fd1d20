//! A throwaway PostgreSQL cluster for tests: Debian's server binaries (`/usr/lib/postgresql/N/bin`,
//! or `SENTINEL_PG_BIN`), a fresh `initdb` in a temp dir, a server on a loopback port reserved by
//! [`crate::ports`] (tried again on another when taken) with its unix socket in that dir,
//! password (SCRAM) authentication over TCP, stopped and removed when dropped.
//!
//! PostgreSQL refuses to run as root, and the tests run as root in CI: then the cluster runs as
//! the `postgres` system user (Debian's package creates it), else as `nobody`, switched to with
//! `setpriv`, which execs (so the child we hold is the postmaster itself and Drop can stop it).
//!
//! [`seed`] creates the seed's layout (environments, their databases and users, and a backup
//! role allowed to cross) and writes the matching `[isolation]` policy.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::ports::{self, Port};
use crate::{patience, run};

/// The cluster's bootstrap superuser (the tests' administrator).
pub const SUPERUSER: &str = "sentinel_test_admin";
/// Its password.
pub const SUPERUSER_PASSWORD: &str = "admin-Secret-1";

/// A running throwaway cluster.
pub struct Postgres {
    dir: tempfile::TempDir,
    child: Option<Child>,
    /// The TCP port on 127.0.0.1.
    pub port: u16,
    _port: Port,
    /// The directory holding the unix socket.
    pub socket_dir: PathBuf,
    bin: PathBuf,
    log: PathBuf,
}

/// The directory of `initdb`/`postgres`/`psql`: `SENTINEL_PG_BIN`, else the newest
/// `/usr/lib/postgresql/*/bin`. Panics with the fix when there is none.
pub fn bin_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("SENTINEL_PG_BIN") {
        return PathBuf::from(dir);
    }
    let mut versions: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin).unwrap_or_else(|| {
        panic!(
            "no PostgreSQL server found in /usr/lib/postgresql/*/bin: \
             apt-get install -y postgresql (or set SENTINEL_PG_BIN)"
        )
    })
}

/// The account to run the server as when we are root: uid and gid of `postgres`, else `nobody`.
fn unprivileged_account() -> Option<(String, String)> {
    let id = |args: &[&str]| -> Option<String> {
        let out = Command::new("id").args(args).output().ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
    };
    if id(&["-u"])? != "0" {
        return None;
    }
    for user in ["postgres", "nobody"] {
        if let (Some(uid), Some(gid)) = (id(&["-u", user]), id(&["-g", user])) {
            return Some((uid, gid));
        }
    }
    panic!(
        "running as root, but neither a `postgres` nor a `nobody` user exists to run PostgreSQL as"
    )
}

impl Postgres {
    /// Initialises and starts a new cluster; panics (with the server log) if it does not come
    /// up within the tests' patience.
    pub fn start() -> Self {
        let bin = bin_dir();
        let dir = tempfile::Builder::new()
            .prefix("sentinel-pg-")
            .tempdir()
            .expect("creating a temp dir for PostgreSQL");
        let root = dir.path().to_path_buf();
        let data = dir.path().join("data");
        let socket_dir = dir.path().join("socket");
        fs::create_dir_all(&socket_dir).expect("creating the socket dir");
        let pwfile = dir.path().join("pwfile");
        fs::write(&pwfile, format!("{SUPERUSER_PASSWORD}\n")).expect("writing the pwfile");
        let account = unprivileged_account();
        if let Some((uid, gid)) = &account {
            let out = run(Command::new("chown")
                .arg("-R")
                .arg(format!("{uid}:{gid}"))
                .arg(dir.path()));
            assert!(
                out.status.success(),
                "chown of {}: {}",
                dir.path().display(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let as_account = |program: &Path| {
            let mut cmd = match &account {
                Some((uid, gid)) => {
                    let mut c = Command::new("setpriv");
                    c.arg(format!("--reuid={uid}"))
                        .arg(format!("--regid={gid}"))
                        .arg("--clear-groups")
                        .arg("--")
                        .arg(program);
                    c
                }
                None => Command::new(program),
            };
            cmd.env("LC_ALL", "C").current_dir(&root);
            cmd
        };
        let out = run(as_account(&bin.join("initdb"))
            .arg("-D")
            .arg(&data)
            .args([
                "-U",
                SUPERUSER,
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
            ])
            .args(["-E", "UTF8", "--no-locale", "--no-sync"])
            .arg(format!("--pwfile={}", pwfile.display())));
        assert!(
            out.status.success(),
            "initdb failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );

        let log = dir.path().join("postgres.log");
        let (child, [port]) = ports::start_on_ports("PostgreSQL", |[port]| {
            let log_file = fs::File::create(&log).expect("creating the server log");
            if let Some((uid, gid)) = &account {
                let _ = run(Command::new("chown").arg(format!("{uid}:{gid}")).arg(&log));
            }
            let err = log_file.try_clone().expect("cloning a log handle");
            let mut child = as_account(&bin.join("postgres"))
                .arg("-D")
                .arg(&data)
                .args(["-p", &port.to_string()])
                .args(["-c", "listen_addresses=127.0.0.1"])
                .arg("-c")
                .arg(format!("unix_socket_directories={}", socket_dir.display()))
                // Durability is pointless for a throwaway cluster; speed is not.
                .args(["-c", "fsync=off", "-c", "synchronous_commit=off"])
                .args(["-c", "full_page_writes=off", "-c", "max_connections=200"])
                .stdin(Stdio::null())
                .stdout(log_file)
                .stderr(err)
                .spawn()
                .unwrap_or_else(|e| panic!("starting postgres: {e}"));
            match wait_ready(&bin, port, &mut child) {
                Ok(()) => Ok(child),
                Err(e) => {
                    stop_child(child);
                    // The data dir stays for the next attempt.
                    Err(format!(
                        "{e}\n{}",
                        fs::read_to_string(&log).unwrap_or_default()
                    ))
                }
            }
        });
        Postgres {
            dir,
            child: Some(child),
            port: port.get(),
            _port: port,
            socket_dir,
            bin,
            log,
        }
    }

    /// The server's log so far.
    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// A libpq key=value DSN for `user` over TCP to `db`.
    pub fn dsn(&self, user: &str, password: &str, db: &str) -> String {
        format!(
            "host=127.0.0.1 port={} user={user} password='{}' dbname={db}",
            self.port,
            password.replace('\\', "\\\\").replace('\'', "\\'")
        )
    }

    /// The same DSN without the password (for configs that use `password_file`).
    pub fn dsn_without_password(&self, user: &str, db: &str) -> String {
        format!("host=127.0.0.1 port={} user={user} dbname={db}", self.port)
    }

    /// The superuser's DSN to `db`.
    pub fn admin_dsn(&self, db: &str) -> String {
        self.dsn(SUPERUSER, SUPERUSER_PASSWORD, db)
    }

    /// Runs a SQL script with psql as `user` on `db` over TCP (statements one by one, so
    /// `CREATE DATABASE` works); stops at the first error. Returns unaligned, tuples-only
    /// output, or psql's error.
    pub fn psql_as(
        &self,
        user: &str,
        password: &str,
        db: &str,
        sql: &str,
    ) -> Result<String, String> {
        let mut child = Command::new(self.bin.join("psql"))
            .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1"])
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(["-U", user, "-d", db, "-f", "-"])
            .env("PGPASSWORD", password)
            .env("PGCONNECT_TIMEOUT", "10")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("starting psql: {e}"))?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin
                .write_all(sql.as_bytes())
                .map_err(|e| format!("writing to psql: {e}"))?;
        }
        let out = child
            .wait_with_output()
            .map_err(|e| format!("waiting for psql: {e}"))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
        }
    }

    /// Runs SQL as the superuser on `db`; panics with psql's error.
    pub fn sql_on(&self, db: &str, sql: &str) -> String {
        self.psql_as(SUPERUSER, SUPERUSER_PASSWORD, db, sql)
            .unwrap_or_else(|e| panic!("SQL failed on {db}: {e}\n{sql}"))
    }

    /// Runs SQL as the superuser on the `postgres` database; panics with psql's error.
    pub fn sql(&self, sql: &str) -> String {
        self.sql_on("postgres", sql)
    }

    /// Whether `user` can open a session on `db` (a real login, not a catalog guess).
    pub fn can_connect(&self, user: &str, password: &str, db: &str) -> Result<(), String> {
        self.psql_as(user, password, db, "SELECT 1").map(|_| ())
    }

    /// Stops the server (fast shutdown, then kill after the patience runs out).
    pub fn stop(&mut self) {
        if let Some(child) = self.child.take() {
            stop_child(child);
        }
    }

    /// The temp dir (for tests that write files beside the cluster).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

/// Waits until the postmaster `child` on `port` accepts connections, or says why not.
fn wait_ready(bin: &Path, port: u16, child: &mut Child) -> Result<(), String> {
    let deadline = Instant::now() + patience();
    while Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("postgres exited with {status}"));
        }
        let ready = Command::new(bin.join("pg_isready"))
            .args(["-q", "-h", "127.0.0.1", "-p", &port.to_string()])
            .args(["-U", SUPERUSER, "-d", "postgres"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if ready {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Err(format!("not ready after {:?}", patience()))
}

/// Stops the postmaster `child`: fast shutdown, then kill after the patience runs out.
fn stop_child(mut child: Child) {
    // SIGINT is PostgreSQL's fast shutdown: roll back sessions, stop cleanly.
    let _ = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status();
    let deadline = Instant::now() + patience();
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "---- PostgreSQL log ({}) ----\n{}",
                self.log.display(),
                self.log_text()
            );
        }
        self.stop();
    }
}

/// The seed's layout: three environments sharing one cluster, one database per app and
/// environment, the environments' users, and the backup host's read-only role that is allowed
/// to reach every environment.
pub mod seed {
    use super::Postgres;

    /// An environment of the layout.
    pub struct Environment {
        /// Its name in the policy.
        pub name: &'static str,
        /// Its databases.
        pub databases: &'static [&'static str],
        /// Its users; the first owns the environment's databases.
        pub users: &'static [&'static str],
    }

    /// dev (Cerebro), staging (Hub-alfa) and production (Prod-alfa).
    pub const ENVIRONMENTS: &[Environment] = &[
        Environment {
            name: "dev",
            databases: &["s60_auth_dev", "s60_pulse_dev"],
            users: &["s60_dev_user"],
        },
        Environment {
            name: "staging",
            databases: &["s60_auth_hub", "s60_pulse_hub"],
            users: &["s60_hub_user"],
        },
        Environment {
            name: "production",
            databases: &["s60_auth_prod", "s60_pulse_prod"],
            users: &["s60_prod_user", "s60_pulse_prod_user"],
        },
    ];

    /// The backup host's read-only role, allowed to cross environments.
    pub const BACKUP_ROLE: &str = "s60_backup_ro";

    /// The isolation auditor: a login role with no privilege but reading the catalog.
    pub const AUDITOR: &str = "sentinel_auditor";

    /// Every user's password in the layout (the test's own throwaway secrets).
    pub fn password(user: &str) -> String {
        format!("{user}-Pw-1")
    }

    /// The environment a database or user belongs to.
    pub fn environment_of(name: &str) -> Option<&'static Environment> {
        ENVIRONMENTS
            .iter()
            .find(|e| e.databases.contains(&name) || e.users.contains(&name))
    }

    /// Creates the layout the way a cluster is usually set up: `CREATE DATABASE ... OWNER`,
    /// nothing revoked, so PUBLIC may CONNECT to every database.
    pub fn create(pg: &Postgres) {
        let mut sql = String::new();
        for user in ENVIRONMENTS.iter().flat_map(|e| e.users.iter()) {
            sql.push_str(&format!(
                "CREATE ROLE {user} LOGIN PASSWORD '{}';\n",
                password(user)
            ));
        }
        sql.push_str(&format!(
            "CREATE ROLE {BACKUP_ROLE} LOGIN PASSWORD '{}';\nGRANT pg_read_all_data TO {BACKUP_ROLE};\n",
            password(BACKUP_ROLE)
        ));
        sql.push_str(&format!(
            "CREATE ROLE {AUDITOR} LOGIN PASSWORD '{}';\n",
            password(AUDITOR)
        ));
        for env in ENVIRONMENTS {
            for db in env.databases {
                // FILE_COPY: a checkpoint instead of WAL-logging the template, much faster here.
                sql.push_str(&format!(
                    "CREATE DATABASE {db} OWNER {} STRATEGY FILE_COPY;\n",
                    env.users[0]
                ));
            }
        }
        pg.sql(&sql);
    }

    /// Isolates the layout the way the fix does: no CONNECT for PUBLIC, each database's
    /// CONNECT granted to its own environment's users and to the backup role.
    pub fn isolate(pg: &Postgres) {
        let mut sql = String::new();
        for env in ENVIRONMENTS {
            for db in env.databases {
                sql.push_str(&format!(
                    "REVOKE CONNECT ON DATABASE {db} FROM PUBLIC;
GRANT CONNECT ON DATABASE {db} TO {}, {BACKUP_ROLE};
",
                    env.users.join(", ")
                ));
            }
        }
        pg.sql(&sql);
    }

    /// The `[isolation]` section for this layout, auditing as [`AUDITOR`] through a DSN file
    /// and a password file written into the cluster's dir. `interval` is the schedule.
    pub fn policy_toml(pg: &Postgres, auditor_password: &str, interval: &str) -> String {
        let dsn_file = pg.dir().join("auditor.dsn");
        let password_file = pg.dir().join("auditor.password");
        std::fs::write(&dsn_file, pg.dsn_without_password(AUDITOR, "postgres"))
            .expect("writing the auditor DSN file");
        std::fs::write(&password_file, format!("{auditor_password}\n"))
            .expect("writing the auditor password file");
        let mut toml = format!(
            "[isolation]\ninterval = \"{interval}\"\ncross_environment_roles = [\"{BACKUP_ROLE}\"]\n\n\
             [isolation.auditor]\ndsn_file = \"{}\"\npassword_file = \"{}\"\nconnect_timeout = \"5s\"\ntimeout = \"20s\"\n",
            dsn_file.display(),
            password_file.display()
        );
        for env in ENVIRONMENTS {
            let list = |items: &[&str]| {
                items
                    .iter()
                    .map(|i| format!("\"{i}\""))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            toml.push_str(&format!(
                "\n[isolation.environments.{}]\ndatabases = [{}]\nusers = [{}]\n",
                env.name,
                list(env.databases),
                list(env.users)
            ));
        }
        toml
    }
}
