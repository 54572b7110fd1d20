//! The backups world: a PostgreSQL cluster holding `shop_prod` (customers, orders and
//! `billing.invoices` owned by `shop_owner`), a read-only backup role and a restore-test role
//! with their password files, a backup agent "argus" whose `[jobs.backups]` names them, and a
//! controller whose `[backups]` backs `shop_prod` up; optionally the fixture app `shop_prod`
//! belongs to, deployed by "hub-alfa" and "prod-alfa". [`World`] runs jobs through grpcurl and
//! reads what they left on disk (dumps, manifests) and in their reports.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::fixture::{self, FixtureApp, ReleaseRepo, SECRET};
use crate::ports::{self, Port};
use crate::postgres::{self, Postgres};
use crate::{eventually, eventually_within, patience, run, Controller, Fleet, Proc, Value};

/// The `backup_ro` role's password.
pub const BACKUP_PASSWORD: &str = "backup-Ro-Secret-77";
/// The `restore_tester` role's password.
pub const RESTORE_PASSWORD: &str = "restore-Tester-Secret-78";
/// Rows of `public.customers`.
pub const CUSTOMERS: i64 = 1000;
/// Rows of `public.orders`.
pub const ORDERS: i64 = 5000;
/// Rows of `billing.invoices`.
pub const INVOICES: i64 = 200;

/// What a test's world looks like.
pub struct Options {
    /// `[backups.retention]` as TOML lines.
    pub retention: &'static str,
    /// `[backups.schedule]` as TOML lines (default: every schedule off).
    pub schedule: String,
    /// The time zone.
    pub time_zone: String,
    /// The offsite target; None: none.
    pub offsite: Option<String>,
    /// Globals and files too.
    pub everything: bool,
    /// A fixture app `shop_prod` belongs to, deployed by agents hub-alfa (staging) and
    /// prod-alfa (production) with Docker.
    pub with_app: bool,
    /// The agent's `[jobs.backups.encryption]` body (TOML lines); None: no encryption.
    pub encryption: Option<String>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            retention: "daily = 7\nweekly = 4\nminimum = 3\n",
            schedule: "backup = \"\"\nverify = \"\"\nrestore_test = \"\"\n".into(),
            time_zone: "UTC".into(),
            offsite: None,
            everything: false,
            with_app: false,
            encryption: None,
        }
    }
}

/// The fixture app and its repository, when the world deploys.
pub struct App {
    /// The app (its Compose project is the app's name).
    pub app: FixtureApp,
    /// The repository the controller deploys from.
    pub repo: ReleaseRepo,
    /// The loopback port production serves on.
    pub production_port: u16,
    /// Docker binds them only while a release runs: reserved for the whole test.
    _ports: [Port; 2],
    _agents: Vec<Proc>,
}

impl Drop for App {
    fn drop(&mut self) {
        fixture::remove_environment_projects(&self.app.project);
    }
}

/// A running backups world (see the module docs).
pub struct World {
    /// The app and its agents, when [`Options::with_app`].
    pub app: Option<App>,
    /// The controller.
    pub controller: Controller,
    /// What the controller's config holds besides listen, data dir and TLS.
    pub controller_toml: String,
    /// The backup agent "argus".
    pub agent: Proc,
    /// What argus's config holds besides host, controller and TLS; [`World::restart_agent`]
    /// starts it with this.
    pub agent_toml: String,
    /// The agent's backup dir (the controller's `[backups] backup_dir`).
    pub backup_dir: PathBuf,
    /// The `backup_ro` password file the agent reads.
    pub password_file: PathBuf,
    /// The cluster.
    pub pg: Postgres,
    // Last: the processes' logs live in its temp dir and are printed when a test fails.
    /// The test's dir and PKI.
    pub fleet: Fleet,
}

/// Starts the world `options` describe and waits for its agents to be online.
pub fn world(options: Options) -> World {
    let fleet = Fleet::new(&["argus", "hub-alfa", "prod-alfa"]);
    let fixture = options.with_app.then(|| {
        let app = FixtureApp::new("backup");
        let repo = ReleaseRepo::new(fleet.path("repo"));
        (app, repo)
    });
    let app_name = fixture
        .as_ref()
        .map_or("shop".to_string(), |(a, _)| a.project.clone());
    let pg = Postgres::start();
    pg.sql(&format!(
        "CREATE ROLE shop_owner LOGIN PASSWORD 'owner-Pw-1';
         CREATE ROLE backup_ro LOGIN PASSWORD '{BACKUP_PASSWORD}';
         GRANT pg_read_all_data TO backup_ro;
         CREATE ROLE restore_tester LOGIN CREATEDB PASSWORD '{RESTORE_PASSWORD}';
         CREATE DATABASE shop_prod OWNER shop_owner STRATEGY FILE_COPY;"
    ));
    pg.sql_on(
        "shop_prod",
        &format!(
            "SET ROLE shop_owner;
             CREATE TABLE customers (id int PRIMARY KEY, name text NOT NULL);
             INSERT INTO customers SELECT g, 'customer ' || g FROM generate_series(1, {CUSTOMERS}) g;
             CREATE TABLE orders (id int PRIMARY KEY, customer int REFERENCES customers, total numeric);
             INSERT INTO orders SELECT g, 1 + g % {CUSTOMERS}, g * 1.5 FROM generate_series(1, {ORDERS}) g;
             CREATE SCHEMA billing;
             CREATE TABLE billing.invoices (id int PRIMARY KEY, body jsonb);
             INSERT INTO billing.invoices SELECT g, jsonb_build_object('n', g) FROM generate_series(1, {INVOICES}) g;"
        ),
    );
    let backup_dir = fleet.path("backups");
    let files_dir = fleet.path("controller-files");
    std::fs::create_dir_all(files_dir.join("secrets")).unwrap();
    std::fs::write(
        files_dir.join("secrets/production.env"),
        "DB_PASSWORD=not-really\n",
    )
    .unwrap();
    std::fs::write(files_dir.join("state.txt"), "controller state\n").unwrap();
    let password_file = fleet.path("backup_ro.password");
    std::fs::write(&password_file, format!("{BACKUP_PASSWORD}\n")).unwrap();
    let restore_password = fleet.path("restore.password");
    std::fs::write(&restore_password, format!("{RESTORE_PASSWORD}\n")).unwrap();

    let c = fleet.certs.display();
    let pg_bin = postgres::bin_dir();
    let mut offsite_targets = Vec::new();
    if let Some(t) = &options.offsite {
        offsite_targets.push(format!("\"{t}\""));
    }
    let mut agent_toml = format!(
        "[collectors]\ndocker = false\nsystem = false\n\
         [jobs]\nstate_dir = \"{state}\"\ntrusted_keys = [\"{c}/signing.pub\"]\n\
         allowed_kinds = [\"backup\", \"verify_backups\", \"restore_test\"]\n\
         [jobs.backups]\nbackup_dirs = [\"{backups}\"]\nfile_roots = [\"{files}\"]\n\
         offsite_targets = [{offsite}]\npg_dump = \"{b}/pg_dump\"\npg_dumpall = \"{b}/pg_dumpall\"\n\
         pg_restore = \"{b}/pg_restore\"\nallow_simulated_clock = true\ncommand_timeout = \"5m\"\n\
         [jobs.backups.dsns.backup_ro]\ndsn = \"{ro}\"\npassword_file = \"{pw}\"\n\
         [jobs.backups.dsns.restore]\ndsn = \"{rt}\"\npassword_file = \"{rpw}\"\n",
        state = fleet.path("agent-state").display(),
        backups = backup_dir.display(),
        files = files_dir.display(),
        offsite = offsite_targets.join(", "),
        b = pg_bin.display(),
        ro = pg.dsn_without_password("backup_ro", "postgres"),
        pw = password_file.display(),
        rt = pg.dsn_without_password("restore_tester", "postgres"),
        rpw = restore_password.display(),
    );
    if let Some(encryption) = &options.encryption {
        agent_toml.push_str(&format!("[jobs.backups.encryption]\n{encryption}\n"));
    }
    let mut backups = format!(
        "[signing]\nkey = \"{c}/signing.key\"\n\n[backups]\nhost = \"argus\"\nbackup_dir = \"{}\"\ntime_zone = \"{}\"\n",
        backup_dir.display(),
        options.time_zone
    );
    if let Some(t) = &options.offsite {
        backups.push_str(&format!("offsite_target = \"{t}\"\n"));
    }
    if options.everything {
        backups.push_str(&format!(
            "globals_dsn_ref = \"backup_ro\"\nfile_paths = [\"{}\"]\n",
            files_dir.display()
        ));
    }
    backups.push_str(&format!(
        "\n[backups.retention]\n{}\n[backups.schedule]\n{}\n\
         [backups.restore_test]\ncluster_dsn_ref = \"restore\"\ninvariants = [\"SELECT true\"]\n\n\
         [[backups.databases]]\nenvironment = \"production\"\ndatabase = \"shop_prod\"\ndsn_ref = \"backup_ro\"\napp = \"{app_name}\"\n\
         invariants = [\"SELECT count(*) = {CUSTOMERS} FROM customers\", \"SELECT sum(total) > 0 FROM orders\"]\n",
        options.retention, options.schedule
    ));
    let reserved = [ports::reserve(), ports::reserve()];
    let ports = (reserved[0].get(), reserved[1].get());
    if let Some((_, repo)) = &fixture {
        let env_block = |env: &str, host: &str, port: u16| {
            std::fs::write(
                fleet.path(&format!("{env}.env")),
                format!("DB_PASSWORD={SECRET}\nPORT={port}\n"),
            )
            .unwrap();
            format!(
                "[apps.{env}]\nhost = \"{host}\"\napp_dir = \"{dir}\"\nsecrets_file = \"{secrets}\"\n[apps.{env}.health]\nurl = \"http://127.0.0.1:{port}/health\"\ndeadline = \"30s\"\n",
                dir = fleet.path(&format!("apps-{host}/{app_name}")).display(),
                secrets = fleet.path(&format!("{env}.env")).display(),
            )
        };
        backups.push_str(&format!(
            "\n[[apps]]\nname = \"{app_name}\"\nrepo = \"{}\"\nmigration_service = \"web\"\n{}{}",
            repo.dir.display(),
            env_block("staging", "hub-alfa", ports.0),
            env_block("production", "prod-alfa", ports.1),
        ));
    }
    let controller = fleet.start_controller(&backups);
    let agent = fleet.start_agent("argus", "argus", &controller.addr, &agent_toml);
    controller.wait_online("argus");
    let app = fixture.map(|(app, repo)| {
        let agents = ["hub-alfa", "prod-alfa"]
            .iter()
            .map(|host| {
                let jobs = format!(
                    "[collectors]\ndocker = false\n[jobs]\nstate_dir = \"{state}\"\ntrusted_keys = [\"{c}/signing.pub\"]\nallowed_kinds = [\"deploy\", \"rollback\"]\napp_dirs = [\"{apps}\"]\n",
                    state = fleet.path(&format!("state-{host}")).display(),
                    apps = fleet.path(&format!("apps-{host}")).display(),
                );
                let agent = fleet.start_agent(host, host, &controller.addr, &jobs);
                controller.wait_online(host);
                agent
            })
            .collect();
        App {
            app,
            repo,
            production_port: ports.1,
            _ports: reserved,
            _agents: agents,
        }
    });
    World {
        app,
        controller,
        controller_toml: backups,
        agent,
        agent_toml,
        backup_dir,
        password_file,
        pg,
        fleet,
    }
}

/// Whether a job in `state` has ended.
pub fn is_final(state: &str) -> bool {
    !matches!(
        state,
        "JOB_STATE_QUEUED" | "JOB_STATE_SENT" | "JOB_STATE_RUNNING" | ""
    )
}

impl World {
    /// Stops the backup agent and waits until the controller no longer calls it online.
    pub fn stop_agent(&mut self) {
        self.agent.stop();
        eventually("argus to go offline", || {
            let host = self.controller.get_host("argus")?;
            if host["status"] == "HOST_STATUS_ONLINE" {
                Err(host["status"].to_string())
            } else {
                Ok(())
            }
        });
    }

    /// Stops the backup agent and starts it again with `extra` appended to its config.
    pub fn restart_agent(&mut self, extra: &str) {
        self.stop_agent();
        self.agent = self.fleet.start_agent(
            "argus",
            "argus",
            &self.controller.addr,
            &format!("{}{extra}", self.agent_toml),
        );
        self.controller.wait_online("argus");
    }

    /// Stops the backup agent and starts it again from a shell with `umask` (what a unit's
    /// `UMask=` does); the returned process is the agent (the shell execs it).
    pub fn restart_agent_with_umask(&mut self, umask: &str) -> Proc {
        self.stop_agent();
        let config = self.fleet.write_agent_config(
            "argus",
            "argus",
            &self.controller.addr,
            &self.agent_toml,
        );
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(format!("umask {umask} && exec \"$0\" --config \"$1\""))
            .arg(crate::bin("hostagent"))
            .arg(&config);
        let agent = Proc::spawn(
            cmd,
            self.fleet.path("agent-argus-umask.log"),
            "agent argus (umask)",
        );
        self.controller.wait_online("argus");
        agent
    }

    /// Starts a run with `method` (retrying while the previous run is still being recorded)
    /// and waits for its job to end.
    pub fn run(&self, method: &str, data: &str) -> Value {
        let job = eventually(&format!("{method} to start"), || {
            let r = self
                .controller
                .grpcurl(Some(data), &format!("sentinel.v1.FleetService/{method}"));
            match r.json() {
                Ok(j) => Ok(j),
                Err(e) if e.contains("already in progress") => Err(e),
                Err(e) => panic!("{method} refused: {e}"),
            }
        });
        let id = job["jobId"].as_str().expect("a job id").to_string();
        self.wait_job(&id)
    }

    /// Waits (four patiences: dumps take a while) for job `id` to end; its `GetJob` answer.
    pub fn wait_job(&self, id: &str) -> Value {
        eventually_within(patience() * 4, &format!("job {id} to end"), || {
            let j = self.controller.get_job(id)?;
            if is_final(j["state"].as_str().unwrap_or("")) {
                Ok(j)
            } else {
                Err(j["state"].to_string())
            }
        })
    }

    /// A backup run at the simulated time `at` (RFC 3339), waited for.
    pub fn backup_at(&self, at: &str) -> Value {
        self.run(
            "RunBackup",
            &format!("{{\"reason\":\"test\",\"simulated_now\":\"{at}\"}}"),
        )
    }

    /// `ListBackups`, parsed.
    pub fn list(&self) -> Value {
        self.controller
            .grpcurl(None, "sentinel.v1.FleetService/ListBackups")
            .json()
            .expect("ListBackups")
    }

    /// The `shop_prod` row of [`list`](Self::list).
    pub fn shop(&self) -> Value {
        let list = self.list();
        list["databases"]
            .as_array()
            .and_then(|a| a.iter().find(|d| d["database"] == "shop_prod").cloned())
            .unwrap_or_else(|| panic!("shop_prod not in {list}"))
    }

    /// The shop_prod dumps on disk (plain `.dump` or encrypted `.dump.age`), by run stamp.
    pub fn dumps(&self) -> BTreeSet<String> {
        self.dump_files().into_keys().collect()
    }

    /// The shop_prod dumps on disk, by run stamp, with their paths.
    pub fn dump_files(&self) -> BTreeMap<String, PathBuf> {
        let dir = self.backup_dir.join("production/shop_prod");
        std::fs::read_dir(&dir)
            .map(|r| {
                r.flatten()
                    .filter_map(|e| {
                        let name = e.file_name().to_string_lossy().into_owned();
                        let rest = name.strip_prefix("shop_prod-")?;
                        let stamp = rest
                            .strip_suffix(".dump")
                            .or_else(|| rest.strip_suffix(".dump.age"))?;
                        Some((stamp.to_string(), e.path()))
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The newest shop_prod dump on disk.
    pub fn newest_dump(&self) -> PathBuf {
        self.dump_files().into_values().next_back().expect("a dump")
    }

    /// Every run manifest in the backup dir, parsed, oldest run first.
    pub fn manifests(&self) -> Vec<Value> {
        let mut out: Vec<Value> = std::fs::read_dir(self.backup_dir.join("manifests"))
            .map(|r| {
                r.flatten()
                    .filter(|e| e.file_name().to_string_lossy().ends_with(".json"))
                    .map(|e| serde_json::from_slice(&std::fs::read(e.path()).unwrap()).unwrap())
                    .collect()
            })
            .unwrap_or_default();
        out.sort_by_key(|m: &Value| m["run_id"].as_str().unwrap_or("").to_string());
        out
    }

    /// The manifest entry recording `file` (a path under the backup dir).
    pub fn entry_for(&self, file: &Path) -> Value {
        let rel = file
            .strip_prefix(&self.backup_dir)
            .unwrap()
            .to_string_lossy()
            .into_owned();
        self.manifests()
            .iter()
            .flat_map(|m| m["entries"].as_array().cloned().unwrap_or_default())
            .find(|e| e["file"] == rel.as_str())
            .unwrap_or_else(|| panic!("{rel} in no manifest"))
    }

    /// `sentinel ARGS` against the controller as an admin operator: (exit 0, stdout and
    /// stderr).
    pub fn cli(&self, args: &[&str]) -> (bool, String) {
        let (code, text) = self.controller.cli(args);
        (code == Some(0), text)
    }

    /// The jobs for argus the schedule `schedule` (`backup`, `verify`, `restore_test`) asked
    /// for.
    pub fn scheduled_jobs(&self, schedule: &str) -> Vec<Value> {
        let jobs = self
            .controller
            .grpcurl(
                Some(r#"{"host":"argus","limit":100}"#),
                "sentinel.v1.FleetService/ListJobs",
            )
            .json()
            .unwrap_or_else(|e| panic!("ListJobs for argus: {e}"));
        jobs["jobs"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .filter(|j| {
                j["requestedBy"]
                    .as_str()
                    .unwrap_or("")
                    .starts_with(&format!("schedule:{schedule} "))
            })
            .collect()
    }

    /// An rsync daemon on `127.0.0.1:port` serving module `offsite` from `dir`, once it
    /// listens.
    pub fn rsync_daemon(&self, port: u16, dir: &Path) -> Proc {
        let config = self.fleet.path("rsyncd.conf");
        let id = |flag: &str| {
            String::from_utf8_lossy(&run(Command::new("id").arg(flag)).stdout)
                .trim()
                .to_string()
        };
        std::fs::write(
            &config,
            format!(
                "use chroot = no\npid file = {}\n[offsite]\npath = {}\nread only = no\nuid = {}\ngid = {}\n",
                self.fleet.path("rsyncd.pid").display(),
                dir.display(),
                id("-u"),
                id("-g"),
            ),
        )
        .expect("writing rsyncd.conf");
        let mut cmd = Command::new("rsync");
        cmd.args(["--daemon", "--no-detach", "--address=127.0.0.1"])
            .arg(format!("--port={port}"))
            .arg(format!("--config={}", config.display()));
        let daemon = Proc::spawn(cmd, self.fleet.path("rsyncd.log"), "rsync --daemon");
        eventually("the rsync daemon to listen", || {
            std::net::TcpStream::connect(("127.0.0.1", port))
                .map(|_| ())
                .map_err(|e| e.to_string())
        });
        daemon
    }

    /// Submits a db_change deploy of `commit` with a migration and waits for its end.
    pub fn deploy_db_change(&self, commit: &str) -> Value {
        let app = self.app.as_ref().expect("a world with an app");
        let d = self
            .controller
            .grpcurl(
                Some(&format!(
                    "{{\"app\":\"{}\",\"commit\":\"{commit}\",\"db_change\":true,\"migration\":\"echo migrating the schema\"}}",
                    app.app.project
                )),
                "sentinel.v1.FleetService/SubmitDeploy",
            )
            .json()
            .expect("SubmitDeploy");
        let id = d["deployId"].as_str().expect("a deploy id").to_string();
        self.controller
            .wait_deploy_end(&id, Duration::from_secs(300))
    }
}

/// The backup report a finished backup job carried (`JobFinished.backup`, as grpcurl prints
/// it).
pub fn backup_report(job: &Value) -> Value {
    job["events"]
        .as_array()
        .and_then(|events| {
            events
                .iter()
                .rev()
                .find_map(|e| e["finished"].get("backup").cloned())
        })
        .unwrap_or_else(|| panic!("no backup result in {job}"))
}

/// The strings of a JSON array (none when `v` is not one).
pub fn strings(v: &Value) -> BTreeSet<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// The SHA-256 of the file at `path`, lowercase hex.
pub fn sha256(path: &Path) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(std::fs::read(path).unwrap()))
}

/// A proto3 bool as grpcurl prints it (false is left out).
pub fn flag(v: &Value) -> bool {
    v.as_bool().unwrap_or(false)
}

/// Asserts that `job` ended in `state`, printing the whole job when not.
pub fn assert_state(job: &Value, state: &str) {
    assert_eq!(
        job["state"],
        state,
        "{}",
        serde_json::to_string_pretty(job).unwrap()
    );
}

/// How every age file starts.
pub const AGE_HEADER: &[u8] = b"age-encryption.org/v1\n";

/// A fresh key pair in `dir` and the `[jobs.backups.encryption]` lines naming it: the backup
/// host's recipient inline, a second (offline) recipient in a recipients file, and the
/// identity file when `with_identity`.
pub fn age_keys(dir: &Path, with_identity: bool) -> String {
    use hostagent::jobs::backup::encryption::generate_key_pair;
    let (identity, recipient) = generate_key_pair();
    let (_, offline) = generate_key_pair();
    let recipients_file = dir.join("recipients.txt");
    std::fs::write(&recipients_file, format!("# the offline key\n{offline}\n")).unwrap();
    let identity_file = dir.join("identity.txt");
    std::fs::write(&identity_file, format!("# the backup host\n{identity}\n")).unwrap();
    let mut toml = format!(
        "recipients = [\"{recipient}\"]\nrecipients_file = \"{}\"\n",
        recipients_file.display()
    );
    if with_identity {
        toml.push_str(&format!(
            "identity_file = \"{}\"\n",
            identity_file.display()
        ));
    }
    toml
}
