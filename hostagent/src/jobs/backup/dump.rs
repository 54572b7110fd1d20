//! Writing backup files: `pg_dump --format=custom` of a database, `pg_dumpall --globals-only
//! --no-role-passwords` of a cluster, and a tar of configured paths. Each streams into a temp
//! file through a [`Sink`] (hashed, and encrypted when configured, on the way), is fsynced and
//! only then renamed into place, so a file under its final name is always complete.
//!
//! A database dump runs in a snapshot the agent exports from its own read-only transaction
//! (`pg_export_snapshot`, `pg_dump --snapshot`), and while pg_dump reads, the agent counts
//! every table's rows in that same transaction: the manifest's row counts describe exactly
//! what the dump holds, however busy the database is, and cost no wall time of their own
//! beyond the dump's.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use jiff::Timestamp;
use sentinel_proto::v1::BackupDatabase;
use sha2::{Digest, Sha256};

use super::dsn::{self, PassFile};
use super::encryption::{self, Keys};
use super::manifest::{Entry, Kind, Series};
use super::sink::{Sink, Written};
use super::{place, run_tool_io, BackupError};
use crate::config::BackupsConfig;
use crate::jobs::JobEvents;
use sentinel_postgres as postgres;

/// What every file of one run shares.
pub struct RunCtx<'a> {
    /// The backup dir.
    pub dir: &'a Path,
    /// Its private temp dir (`.tmp`, mode 0700).
    pub tmp: &'a Path,
    /// The run's id (UTC stamp), part of every file name.
    pub run_id: &'a str,
    /// The run's clock.
    pub taken_at: Timestamp,
    /// The agent's backup config.
    pub config: &'a BackupsConfig,
    /// The keys every file is encrypted to; None: stored as written.
    pub keys: Option<&'a Keys>,
    /// The job's events.
    pub events: &'a JobEvents,
}

impl RunCtx<'_> {
    /// The suffix of a file name after its format's own: `.age` when encrypted.
    fn suffix(&self) -> &'static str {
        if self.keys.is_some() {
            encryption::SUFFIX
        } else {
            ""
        }
    }

    /// Streams a tool's standard output into the temp file `tmp` and puts it at `file`
    /// (relative to the backup dir). Nothing is left under either name when it fails.
    async fn write_from_tool(
        &self,
        cmd: tokio::process::Command,
        what: &str,
        tmp: &Path,
        file: &str,
    ) -> Result<Written, BackupError> {
        let sink = Sink::create(tmp, self.keys)?;
        let written = run_tool_io(
            cmd,
            what,
            self.config.command_timeout,
            self.events,
            None,
            move |out| {
                let mut sink = sink;
                sink.copy_from(out)?;
                sink.finish()
            },
        )
        .await;
        self.put(written, tmp, file).await
    }

    /// Renames a finished temp file into place, or removes it when writing failed.
    async fn put(
        &self,
        written: Result<Written, BackupError>,
        tmp: &Path,
        file: &str,
    ) -> Result<Written, BackupError> {
        let placed = match written {
            Ok(w) => place(tmp, &self.dir.join(file)).await.map(|()| w),
            Err(e) => Err(e),
        };
        if placed.is_err() {
            let _ = std::fs::remove_file(tmp);
        }
        placed
    }

    /// The manifest entry of a file now in place.
    fn entry(
        &self,
        series: Series,
        file: String,
        written: Written,
        started_at: Timestamp,
    ) -> Entry {
        Entry {
            series,
            file,
            size: written.size,
            sha256: written.sha256,
            encrypted: written.encrypted,
            taken_at: self.taken_at,
            started_at,
            finished_at: Timestamp::now(),
            tool_version: String::new(),
            server_version: String::new(),
            row_counts: BTreeMap::new(),
            paths: Vec::new(),
            pruned_at: None,
            verified_at: None,
            damaged: None,
        }
    }
}

/// `NAME --version`, e.g. "pg_dump (PostgreSQL) 15.18".
pub async fn tool_version(program: &Path) -> Result<String, BackupError> {
    let out = tokio::process::Command::new(program)
        .arg("--version")
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .map_err(|source| BackupError::VersionRun {
            program: program.to_path_buf(),
            source,
        })?;
    if !out.status.success() {
        return Err(BackupError::VersionFailed {
            program: program.to_path_buf(),
            status: out.status,
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Double-quotes an identifier for SQL.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Tables whose data pg_dump writes (ordinary tables and partitions, not those of extensions).
pub const TABLES_SQL: &str = "SELECT n.nspname::text, c.relname::text \
     FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
     WHERE c.relkind = 'r' AND n.nspname <> 'information_schema' AND n.nspname NOT LIKE 'pg\\_%' \
       AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass \
                       AND d.objid = c.oid AND d.deptype = 'e') \
     ORDER BY 1, 2";

/// Counts the rows of every table in `tables` (schema, name) on `client`.
pub async fn count_rows(
    client: &tokio_postgres::Client,
    tables: &[(String, String)],
) -> Result<BTreeMap<String, i64>, BackupError> {
    let mut counts = BTreeMap::new();
    for (schema, table) in tables {
        let sql = format!(
            "SELECT count(*) FROM {}.{}",
            quote_ident(schema),
            quote_ident(table)
        );
        let row = client
            .query_one(&sql, &[])
            .await
            .map_err(|e| BackupError::Query {
                doing: format!("counting rows of {schema}.{table}"),
                message: postgres::describe(&e),
            })?;
        counts.insert(format!("{schema}.{table}"), row.get::<_, i64>(0));
    }
    Ok(counts)
}

/// Dumps one database; the entry describes the file now in place.
pub async fn database(
    ctx: &RunCtx<'_>,
    db: &BackupDatabase,
    tool: &str,
) -> Result<Entry, BackupError> {
    let started_at = Timestamp::now();
    let resolved = dsn::resolve(ctx.config, &db.dsn_ref, ctx.events)?.with_database(&db.database);
    let conn = postgres::connect(&resolved.client, "sentinel-backup").await?;
    let client = &conn.client;
    let query_err = |what: &str, e: tokio_postgres::Error| BackupError::Query {
        doing: format!("{what} on {}", conn.target),
        message: postgres::describe(&e),
    };
    client
        .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        .await
        .map_err(|e| query_err("starting a read-only transaction", e))?;
    let row = client
        .query_one(
            "SELECT pg_export_snapshot(), current_user::text, current_setting('server_version'), \
             (SELECT rolsuper FROM pg_roles WHERE rolname = current_user)",
            &[],
        )
        .await
        .map_err(|e| query_err("exporting a snapshot", e))?;
    let snapshot: String = row.get(0);
    let role: String = row.get(1);
    let server_version: String = row.get(2);
    let superuser: bool = row.get::<_, Option<bool>>(3).unwrap_or(false);
    if ctx.config.require_read_only {
        check_read_only(client, &role, superuser, &db.database, &conn.target).await?;
    }
    let tables: Vec<(String, String)> = client
        .query(TABLES_SQL, &[])
        .await
        .map_err(|e| query_err("listing tables", e))?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();

    let file = format!(
        "{env}/{db}/{db}-{run}.dump{suffix}",
        env = db.environment,
        db = db.database,
        run = ctx.run_id,
        suffix = ctx.suffix(),
    );
    let tmp = ctx
        .tmp
        .join(format!("{}-{}.dump.partial", db.environment, db.database));
    let passfile = match &resolved.password {
        Some(p) => Some(PassFile::write(
            ctx.tmp,
            &format!("{}-{}", db.environment, db.database),
            p,
        )?),
        None => None,
    };
    // To standard output, not --file: the agent hashes (and encrypts) the stream as it goes
    // into the temp file, instead of reading the whole file back afterwards. pg_dump then
    // cannot seek back to record data offsets in the archive's table of contents; pg_restore
    // (12 and later, also with -j on a plain file) finds the data blocks by reading on.
    let mut cmd = tokio::process::Command::new(&ctx.config.pg_dump);
    cmd.arg("--format=custom")
        .arg(format!("--snapshot={snapshot}"))
        .arg("--no-password")
        .arg(format!("--dbname={}", resolved.conninfo));
    dsn::tool_env(&mut cmd, &resolved, passfile.as_ref());
    let timeout = ctx.config.command_timeout;
    let sink = Sink::create(&tmp, ctx.keys)?;
    let dumped = run_tool_io(cmd, "pg_dump", timeout, ctx.events, None, move |out| {
        let mut sink = sink;
        sink.copy_from(out)?;
        sink.finish()
    });
    // The counts run while pg_dump reads, on our connection, in the snapshot pg_dump imported
    // (our transaction stays open until both are done): exactly what the dump holds, at no
    // extra wall time. A failing count stops pg_dump (the dump future is dropped, which kills
    // it), and a failing pg_dump stops the counts.
    let counted = async {
        tokio::time::timeout(timeout, count_rows(client, &tables))
            .await
            .map_err(|_| BackupError::CountTimeout(timeout))
            .and_then(|r| r)
    };
    let both = tokio::try_join!(dumped, counted);
    drop(passfile);
    // On failure the connection just closes (a count still running would only delay COMMIT).
    if both.is_ok() {
        let _ = client.batch_execute("COMMIT").await;
    }
    drop(conn);
    let (written, row_counts) = match both {
        Ok((w, c)) => (Ok(w), c),
        Err(e) => (Err(e), BTreeMap::new()),
    };
    let written = ctx.put(written, &tmp, &file).await?;
    let series = Series {
        kind: Kind::Database,
        environment: db.environment.clone(),
        database: db.database.clone(),
    };
    Ok(Entry {
        tool_version: tool.to_string(),
        server_version,
        row_counts,
        ..ctx.entry(series, file, written, started_at)
    })
}

/// Refuses a role that can write: a superuser, or one holding INSERT, UPDATE, DELETE or
/// TRUNCATE on any table of the database (owners hold all of them). `target` names the
/// server in messages.
async fn check_read_only(
    client: &tokio_postgres::Client,
    role: &str,
    superuser: bool,
    database: &str,
    target: &str,
) -> Result<(), BackupError> {
    if superuser {
        return Err(BackupError::Superuser {
            role: role.to_string(),
            target: target.to_string(),
        });
    }
    let writable: Vec<String> = client
        .query(
            "SELECT n.nspname || '.' || c.relname FROM pg_class c \
             JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE c.relkind IN ('r', 'p') AND n.nspname <> 'information_schema' \
               AND n.nspname NOT LIKE 'pg\\_%' \
               AND has_table_privilege(c.oid, 'INSERT, UPDATE, DELETE, TRUNCATE') \
             ORDER BY 1 LIMIT 5",
            &[],
        )
        .await
        .map_err(|e| BackupError::Query {
            doing: format!("checking that role {role} is read-only"),
            message: postgres::describe(&e),
        })?
        .iter()
        .map(|r| r.get(0))
        .collect();
    if writable.is_empty() {
        Ok(())
    } else {
        Err(BackupError::Writable {
            role: role.to_string(),
            tables: writable.join(", "),
            database: database.to_string(),
        })
    }
}

/// Dumps a cluster's globals (roles without passwords, memberships, tablespaces).
pub async fn globals(ctx: &RunCtx<'_>, dsn_ref: &str, tool: &str) -> Result<Entry, BackupError> {
    let started_at = Timestamp::now();
    let resolved = dsn::resolve(ctx.config, dsn_ref, ctx.events)?;
    let file = format!(
        "globals/{dsn_ref}/{dsn_ref}-{}.sql{}",
        ctx.run_id,
        ctx.suffix()
    );
    let tmp = ctx.tmp.join(format!("globals-{dsn_ref}.sql.partial"));
    let passfile = match &resolved.password {
        Some(p) => Some(PassFile::write(ctx.tmp, &format!("globals-{dsn_ref}"), p)?),
        None => None,
    };
    let mut cmd = tokio::process::Command::new(&ctx.config.pg_dumpall);
    cmd.arg("--globals-only")
        .arg("--no-role-passwords")
        .arg("--no-password")
        .arg(format!("--dbname={}", resolved.conninfo));
    dsn::tool_env(&mut cmd, &resolved, passfile.as_ref());
    let written = ctx.write_from_tool(cmd, "pg_dumpall", &tmp, &file).await;
    drop(passfile);
    let series = Series {
        kind: Kind::Globals,
        environment: String::new(),
        database: dsn_ref.to_string(),
    };
    Ok(Entry {
        tool_version: tool.to_string(),
        ..ctx.entry(series, file, written?, started_at)
    })
}

/// Tars `paths` (symlinks kept as links, not followed).
pub async fn files(ctx: &RunCtx<'_>, paths: &[String]) -> Result<Entry, BackupError> {
    let started_at = Timestamp::now();
    let file = format!("files/files-{}.tar{}", ctx.run_id, ctx.suffix());
    let tmp = ctx.tmp.join("files.tar.partial");
    let sources: Vec<PathBuf> = paths.iter().map(PathBuf::from).collect();
    let sink = Sink::create(&tmp, ctx.keys)?;
    let written = tokio::task::spawn_blocking(move || write_tar(sink, &sources))
        .await
        .map_err(|source| BackupError::Task {
            what: "tar task".into(),
            source,
        })
        .and_then(|r| r);
    let written = ctx.put(written, &tmp, &file).await?;
    let series = Series {
        kind: Kind::Files,
        environment: String::new(),
        database: "files".into(),
    };
    Ok(Entry {
        paths: paths.to_vec(),
        ..ctx.entry(series, file, written, started_at)
    })
}

fn write_tar(sink: Sink, sources: &[PathBuf]) -> Result<Written, BackupError> {
    // Tar writes 512-byte headers and file contents in small pieces: batch them.
    let mut builder = tar::Builder::new(std::io::BufWriter::with_capacity(1 << 20, sink));
    builder.follow_symlinks(false);
    for source in sources {
        let name = source.strip_prefix("/").unwrap_or(source);
        let meta = std::fs::symlink_metadata(source).map_err(|e| BackupError::File {
            doing: "reading",
            path: source.clone(),
            source: e,
        })?;
        let added = if meta.is_dir() {
            builder.append_dir_all(name, source)
        } else {
            builder.append_path_with_name(source, name)
        };
        added.map_err(|e| BackupError::TarAdd {
            path: source.clone(),
            source: e,
        })?;
    }
    let mut out = builder.into_inner().map_err(|source| BackupError::Tar {
        doing: "finishing",
        source,
    })?;
    out.flush().map_err(|source| BackupError::Tar {
        doing: "writing",
        source,
    })?;
    let sink = out.into_inner().map_err(|e| BackupError::Tar {
        doing: "writing",
        source: e.into_error(),
    })?;
    sink.finish()
}

/// SHA-256 (hex) and size of a file, read in 1 MiB blocks.
pub fn sha256_file(path: &Path) -> std::io::Result<(u64, String)> {
    use std::io::Read;
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        size += n as u64;
        hasher.update(&buf[..n]);
    }
    Ok((size, hex::encode(hasher.finalize())))
}
