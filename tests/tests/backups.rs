//! Backups end to end: a real PostgreSQL cluster with data, the real pg_dump, pg_dumpall,
//! pg_restore and rsync, a backup agent ("argus") and a controller, driven through grpcurl and
//! the `sentinel backups` CLI. Clocks: retention runs on a simulated clock that the job carries
//! and the agent accepts only because its config allows it; the schedule test uses the real
//! clock and a fixed-offset time zone chosen so that 02:00 falls inside the test.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use sentinel_e2e::fixture::{served, FixtureApp, ReleaseRepo as Repo, Variant, SECRET};
use sentinel_e2e::postgres::{self, Postgres};
use sentinel_e2e::{
    bin, eventually, eventually_within, patience, run, Controller, Fleet, Proc, Value,
};

const BACKUP_PASSWORD: &str = "backup-Ro-Secret-77";
const RESTORE_PASSWORD: &str = "restore-Tester-Secret-78";
const CUSTOMERS: i64 = 1000;
const ORDERS: i64 = 5000;
const INVOICES: i64 = 200;

/// What a test's world looks like.
struct Options {
    /// `[backups.retention]` as TOML lines.
    retention: &'static str,
    /// `[backups.schedule]` as TOML lines (default: every schedule off).
    schedule: String,
    /// The time zone.
    time_zone: String,
    /// The offsite target; None: none.
    offsite: Option<String>,
    /// Globals and files too.
    everything: bool,
    /// A fixture app `shop_prod` belongs to, deployed by agents hub-alfa (staging) and
    /// prod-alfa (production) with Docker.
    with_app: bool,
    /// The agent's `[jobs.backups.encryption]` body (TOML lines); None: no encryption.
    encryption: Option<String>,
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
struct App {
    app: FixtureApp,
    repo: Repo,
    production_port: u16,
    /// Docker binds them only while a release runs: reserved for the whole test.
    _ports: [sentinel_e2e::ports::Port; 2],
    _agents: Vec<Proc>,
}

impl Drop for App {
    fn drop(&mut self) {
        for env in ["staging", "production"] {
            let project = format!("{}-{env}", self.app.project);
            let out = run(Command::new("docker").args([
                "ps",
                "-aq",
                "--filter",
                &format!("label=com.docker.compose.project={project}"),
            ]));
            let ids: Vec<String> = String::from_utf8_lossy(&out.stdout)
                .lines()
                .map(str::to_string)
                .collect();
            if !ids.is_empty() {
                let _ = run(Command::new("docker").args(["rm", "-f"]).args(&ids));
            }
            let _ =
                run(Command::new("docker").args(["network", "rm", &format!("{project}_default")]));
        }
    }
}

struct World {
    app: Option<App>,
    controller: Controller,
    controller_toml: String,
    agent: Proc,
    agent_toml: String,
    backup_dir: PathBuf,
    password_file: PathBuf,
    pg: Postgres,
    // Last: the processes' logs live in its temp dir and are printed when a test fails.
    fleet: Fleet,
}

fn world(options: Options) -> World {
    let fleet = Fleet::new(&["argus", "hub-alfa", "prod-alfa"]);
    let fixture = options.with_app.then(|| {
        let app = FixtureApp::new("backup");
        let repo = Repo::new(fleet.path("repo"));
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
    let reserved = [
        sentinel_e2e::ports::reserve(),
        sentinel_e2e::ports::reserve(),
    ];
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

fn is_final(state: &str) -> bool {
    !matches!(
        state,
        "JOB_STATE_QUEUED" | "JOB_STATE_SENT" | "JOB_STATE_RUNNING" | ""
    )
}

impl World {
    /// Stops the backup agent and starts it again with `extra` appended to its config.
    fn restart_agent(&mut self, extra: &str) {
        self.agent.stop();
        eventually("argus to go offline", || {
            let host = self.controller.get_host("argus")?;
            if host["status"] == "HOST_STATUS_ONLINE" {
                Err(host["status"].to_string())
            } else {
                Ok(())
            }
        });
        self.agent = self.fleet.start_agent(
            "argus",
            "argus",
            &self.controller.addr,
            &format!("{}{extra}", self.agent_toml),
        );
        self.controller.wait_online("argus");
    }

    /// Starts a run with `method` (retrying while the previous run is still being recorded)
    /// and waits for its job to end.
    fn run(&self, method: &str, data: &str) -> Value {
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

    fn wait_job(&self, id: &str) -> Value {
        eventually_within(patience() * 4, &format!("job {id} to end"), || {
            let j = self
                .controller
                .grpcurl(
                    Some(&format!("{{\"job_id\":\"{id}\"}}")),
                    "sentinel.v1.FleetService/GetJob",
                )
                .json()?;
            if is_final(j["state"].as_str().unwrap_or("")) {
                Ok(j)
            } else {
                Err(j["state"].to_string())
            }
        })
    }

    fn backup_at(&self, at: &str) -> Value {
        self.run(
            "RunBackup",
            &format!("{{\"reason\":\"test\",\"simulated_now\":\"{at}\"}}"),
        )
    }

    fn list(&self) -> Value {
        self.controller
            .grpcurl(None, "sentinel.v1.FleetService/ListBackups")
            .json()
            .expect("ListBackups")
    }

    fn shop(&self) -> Value {
        let list = self.list();
        list["databases"]
            .as_array()
            .and_then(|a| a.iter().find(|d| d["database"] == "shop_prod").cloned())
            .unwrap_or_else(|| panic!("shop_prod not in {list}"))
    }

    /// The shop_prod dumps on disk (plain `.dump` or encrypted `.dump.age`), by run stamp.
    fn dumps(&self) -> BTreeSet<String> {
        self.dump_files().into_keys().collect()
    }

    fn dump_files(&self) -> std::collections::BTreeMap<String, PathBuf> {
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

    fn newest_dump(&self) -> PathBuf {
        self.dump_files().into_values().next_back().expect("a dump")
    }

    fn manifests(&self) -> Vec<Value> {
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

    fn entry_for(&self, file: &Path) -> Value {
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
}

fn sha256(path: &Path) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(std::fs::read(path).unwrap()))
}

/// A proto3 bool as grpcurl prints it (false is left out).
fn flag(v: &Value) -> bool {
    v.as_bool().unwrap_or(false)
}

fn assert_state(job: &Value, state: &str) {
    assert_eq!(
        job["state"],
        state,
        "{}",
        serde_json::to_string_pretty(job).unwrap()
    );
}

#[test]
fn a_backup_with_data_is_verified_and_restore_tested_with_equal_row_counts() {
    let offsite = tempfile::tempdir().unwrap();
    let w = world(Options {
        offsite: Some(offsite.path().display().to_string()),
        everything: true,
        ..Default::default()
    });
    let job = w.run("RunBackup", r#"{"reason":"first"}"#);
    assert_state(&job, "JOB_STATE_SUCCEEDED");
    let text = job.to_string();
    assert!(
        !text.contains(BACKUP_PASSWORD),
        "the password leaked into the job: {text}"
    );

    // The dump, the globals, the files tar and the run's manifest are in place.
    let dump = w.newest_dump();
    let entry = w.entry_for(&dump);
    assert_eq!(entry["sha256"], sha256(&dump).as_str());
    assert_eq!(entry["size"], std::fs::metadata(&dump).unwrap().len());
    assert!(
        entry["tool_version"]
            .as_str()
            .unwrap()
            .contains("pg_dump (PostgreSQL)"),
        "{entry}"
    );
    assert_eq!(entry["row_counts"]["public.customers"], CUSTOMERS);
    assert_eq!(entry["row_counts"]["public.orders"], ORDERS);
    assert_eq!(entry["row_counts"]["billing.invoices"], INVOICES);
    let manifests = w.manifests();
    let manifest = &manifests[0];
    let kinds: BTreeSet<&str> = manifest["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds,
        BTreeSet::from(["database", "globals", "files"]),
        "{manifest}"
    );
    let globals = manifest["entries"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["kind"] == "globals")
        .unwrap();
    let globals_sql =
        std::fs::read_to_string(w.backup_dir.join(globals["file"].as_str().unwrap())).unwrap();
    assert!(
        globals_sql.contains("CREATE ROLE backup_ro"),
        "{globals_sql}"
    );
    assert!(
        !globals_sql.contains("SCRAM-SHA-256"),
        "role passwords were dumped"
    );
    let files = manifest["entries"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["kind"] == "files")
        .unwrap();
    let listing = run(Command::new("tar")
        .arg("-tf")
        .arg(w.backup_dir.join(files["file"].as_str().unwrap())));
    let listing = String::from_utf8_lossy(&listing.stdout).to_string();
    assert!(listing.contains("secrets/production.env"), "{listing}");
    // pg_dump's own reader agrees it is a custom-format archive of our tables.
    let toc = run(Command::new(postgres::bin_dir().join("pg_restore"))
        .arg("--list")
        .arg(&dump));
    assert!(String::from_utf8_lossy(&toc.stdout).contains("TABLE DATA billing invoices"));

    // The offsite copy is byte for byte the same.
    let rel = dump.strip_prefix(&w.backup_dir).unwrap();
    assert_eq!(sha256(&offsite.path().join(rel)), sha256(&dump));
    assert!(offsite.path().join("manifests").read_dir().unwrap().count() >= 1);

    let verify = w.run("VerifyBackups", "{}");
    assert_state(&verify, "JOB_STATE_SUCCEEDED");
    assert!(
        verify["detail"]
            .as_str()
            .unwrap()
            .contains("checked 3 file(s)"),
        "{verify}"
    );

    let restore = w.run("RunRestoreTest", "{}");
    assert_state(&restore, "JOB_STATE_SUCCEEDED");
    // The scratch database is gone again.
    let left =
        w.pg.sql("SELECT count(*) FROM pg_database WHERE datname LIKE 'sentinel_restore_%'");
    assert_eq!(left, "0");

    let shop = w.shop();
    assert_eq!(shop["kept"], 1, "{shop}");
    assert_eq!(shop["lastVerifyOk"], true, "{shop}");
    assert_eq!(shop["lastRestoreTestOk"], true, "{shop}");
    let detail = shop["lastRestoreTestDetail"].as_str().unwrap();
    assert!(
        detail.contains("3 table(s) match the manifest") && detail.contains("3 invariant(s) hold"),
        "{detail}"
    );
    assert!(
        shop["newestGoodAgeSeconds"].as_f64().unwrap() < 600.0,
        "{shop}"
    );
    assert_eq!(shop["newestGoodSha256"], sha256(&dump).as_str());

    // The operator CLI shows the same, and follows a run to its end.
    let (ok, text) = cli(&w, &["backups", "list"]);
    assert!(ok, "{text}");
    assert!(
        text.contains("production/shop_prod")
            && text.contains("files")
            && text.contains("globals (backup_ro)"),
        "{text}"
    );
    let (ok, text) = cli(&w, &["backups", "verify", "--wait"]);
    assert!(
        ok && text.contains("verify") && text.contains("succeeded"),
        "{text}"
    );
}

/// How every age file starts.
const AGE_HEADER: &[u8] = b"age-encryption.org/v1\n";

/// A fresh key pair in `dir` and the `[jobs.backups.encryption]` lines naming it: the backup
/// host's recipient inline, a second (offline) recipient in a recipients file, and the
/// identity file when `with_identity`.
fn age_keys(dir: &Path, with_identity: bool) -> String {
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

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn an_encrypted_backup_is_unreadable_as_plaintext_yet_verifies_and_restores_with_equal_row_counts()
{
    let keys = tempfile::tempdir().unwrap();
    let offsite = tempfile::tempdir().unwrap();
    let w = world(Options {
        offsite: Some(offsite.path().display().to_string()),
        everything: true,
        encryption: Some(age_keys(keys.path(), true)),
        ..Default::default()
    });
    let job = w.run("RunBackup", r#"{"reason":"encrypted"}"#);
    assert_state(&job, "JOB_STATE_SUCCEEDED");

    // Every file of the run is an age file, recorded as such, hashed as stored, and copied
    // offsite as the same ciphertext.
    let manifests = w.manifests();
    let entries = manifests[0]["entries"].as_array().unwrap().clone();
    assert_eq!(entries.len(), 3, "{entries:?}");
    for e in &entries {
        let file = e["file"].as_str().unwrap();
        assert!(file.ends_with(".age"), "{e}");
        assert_eq!(e["encrypted"], true, "{e}");
        let path = w.backup_dir.join(file);
        let bytes = std::fs::read(&path).unwrap();
        assert!(bytes.starts_with(AGE_HEADER), "{file} is not an age file");
        assert_eq!(e["sha256"], sha256(&path).as_str(), "{e}");
        assert_eq!(e["size"], bytes.len(), "{e}");
        assert_eq!(sha256(&offsite.path().join(file)), sha256(&path), "{file}");
    }
    // Nothing in them reads as plaintext: not a custom-format archive, no role, no secret.
    let dump = w.newest_dump();
    let bytes = std::fs::read(&dump).unwrap();
    assert!(!contains(&bytes, b"PGDMP"), "the dump is readable");
    let toc = run(Command::new(postgres::bin_dir().join("pg_restore"))
        .arg("--list")
        .arg(&dump));
    assert!(
        !toc.status.success(),
        "pg_restore read the encrypted dump: {}",
        String::from_utf8_lossy(&toc.stdout)
    );
    for e in &entries {
        let bytes = std::fs::read(w.backup_dir.join(e["file"].as_str().unwrap())).unwrap();
        for plain in [
            &b"CREATE ROLE"[..],
            b"backup_ro",
            b"DB_PASSWORD",
            b"customer 1",
        ] {
            assert!(!contains(&bytes, plain), "{} holds {plain:?}", e["file"]);
        }
    }
    // No plaintext left behind in the temp dir either.
    assert!(!w.backup_dir.join(".tmp").exists());
    // The row counts are still recorded (counted in the dump's snapshot).
    let entry = w.entry_for(&dump);
    assert_eq!(entry["row_counts"]["public.customers"], CUSTOMERS);
    assert_eq!(entry["row_counts"]["public.orders"], ORDERS);
    assert_eq!(entry["row_counts"]["billing.invoices"], INVOICES);

    // Verify decrypts the dump into pg_restore --list; nothing is checked by hash alone.
    let verify = w.run("VerifyBackups", "{}");
    assert_state(&verify, "JOB_STATE_SUCCEEDED");
    let detail = verify["detail"].as_str().unwrap();
    assert!(
        detail.contains("checked 3 file(s)") && !detail.contains("only"),
        "{detail}"
    );
    // The restore test decrypts into pg_restore and finds the manifest's row counts.
    let restore = w.run("RunRestoreTest", "{}");
    assert_state(&restore, "JOB_STATE_SUCCEEDED");
    let shop = w.shop();
    assert_eq!(shop["lastVerifyOk"], true, "{shop}");
    assert_eq!(shop["lastRestoreTestOk"], true, "{shop}");
    let detail = shop["lastRestoreTestDetail"].as_str().unwrap();
    assert!(detail.contains("3 table(s) match the manifest"), "{detail}");
    let left =
        w.pg.sql("SELECT count(*) FROM pg_database WHERE datname LIKE 'sentinel_restore_%'");
    assert_eq!(left, "0");
}

#[test]
fn a_plaintext_dump_planted_where_an_encrypted_one_belongs_is_reported_by_verify() {
    let keys = tempfile::tempdir().unwrap();
    let w = world(Options {
        encryption: Some(age_keys(keys.path(), true)),
        ..Default::default()
    });
    assert_state(&w.backup_at("2026-03-01T02:00:00Z"), "JOB_STATE_SUCCEEDED");
    assert_state(&w.backup_at("2026-03-02T02:00:00Z"), "JOB_STATE_SUCCEEDED");
    assert_state(&w.run("VerifyBackups", "{}"), "JOB_STATE_SUCCEEDED");

    // A perfectly good plaintext dump of the same database under the newest encrypted name,
    // with its manifest entry's sha256 and size made to match: only the header gives it away.
    let newest = w.newest_dump();
    let out = run(Command::new(postgres::bin_dir().join("pg_dump"))
        .arg("--format=custom")
        .arg(format!("--file={}", newest.display()))
        .arg(format!(
            "--dbname={}",
            w.pg.dsn_without_password("backup_ro", "shop_prod")
        ))
        .env("PGPASSWORD", BACKUP_PASSWORD));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rel = newest
        .strip_prefix(&w.backup_dir)
        .unwrap()
        .to_string_lossy()
        .into_owned();
    let manifests = w.backup_dir.join("manifests");
    for m in std::fs::read_dir(&manifests).unwrap().flatten() {
        let mut json: Value = serde_json::from_slice(&std::fs::read(m.path()).unwrap()).unwrap();
        let mut changed = false;
        for e in json["entries"].as_array_mut().unwrap() {
            if e["file"] == rel.as_str() {
                e["sha256"] = sha256(&newest).into();
                e["size"] = std::fs::metadata(&newest).unwrap().len().into();
                changed = true;
            }
        }
        if changed {
            std::fs::write(m.path(), serde_json::to_vec_pretty(&json).unwrap()).unwrap();
        }
    }
    let verify = w.run("VerifyBackups", "{}");
    assert_state(&verify, "JOB_STATE_FAILED");
    let detail = verify["detail"].as_str().unwrap();
    assert!(
        detail.contains("shop_prod-20260302T020000Z.dump.age")
            && detail.contains("should be encrypted but is not")
            && !detail.contains("sha256 mismatch"),
        "{detail}"
    );
    let shop = w.shop();
    assert_eq!(shop["damaged"], 1, "{shop}");
    assert!(
        shop["newestGoodFile"]
            .as_str()
            .unwrap()
            .ends_with("shop_prod-20260301T020000Z.dump.age"),
        "{shop}"
    );
}

#[test]
fn without_an_identity_verify_checks_hashes_only_and_says_so_and_the_restore_test_fails() {
    let keys = tempfile::tempdir().unwrap();
    let w = world(Options {
        encryption: Some(age_keys(keys.path(), false)),
        ..Default::default()
    });
    assert_state(&w.run("RunBackup", "{}"), "JOB_STATE_SUCCEEDED");
    assert!(std::fs::read(w.newest_dump())
        .unwrap()
        .starts_with(AGE_HEADER));
    let verify = w.run("VerifyBackups", "{}");
    assert_state(&verify, "JOB_STATE_SUCCEEDED");
    let detail = verify["detail"].as_str().unwrap();
    assert!(
        detail.contains("1 encrypted file(s) checked by sha256 and age header only")
            && detail.contains("identity_file"),
        "{detail}"
    );
    let restore = w.run("RunRestoreTest", "{}");
    assert_state(&restore, "JOB_STATE_FAILED");
    let detail = restore["detail"].as_str().unwrap();
    assert!(
        detail.contains("no identity to decrypt it") && detail.contains("identity_file"),
        "{detail}"
    );
}

#[test]
fn a_bad_recipient_or_identity_in_the_agent_config_stops_the_agent_at_start_naming_the_line() {
    use hostagent::jobs::backup::encryption::generate_key_pair;
    let fleet = Fleet::new(&["argus"]);
    let backups = fleet.path("backups");
    let (_, good) = generate_key_pair();
    let config_with = |encryption: &str| {
        let toml = format!(
            "[jobs]\nallowed_kinds = [\"backup\"]\n[jobs.backups]\nbackup_dirs = [\"{}\"]\n\
             [jobs.backups.encryption]\n{encryption}",
            backups.display()
        );
        fleet.write_agent_config("argus", "argus", "127.0.0.1:9", &toml)
    };
    // Which line of the written config holds `key`.
    let line_of = |config: &Path, key: &str| {
        std::fs::read_to_string(config)
            .unwrap()
            .lines()
            .position(|l| l.starts_with(key))
            .map(|i| i + 1)
            .unwrap()
    };

    let config = config_with(&format!("recipients = [\"{good}\", \"age1notakey\"]\n"));
    let line = line_of(&config, "recipients");
    let out = run(Command::new(bin("hostagent"))
        .arg("--config")
        .arg(&config)
        .arg("--check-config"));
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(64), "{err}");
    assert!(
        err.contains(&format!("{}:{line}:", config.display()))
            && err.contains("jobs.backups.encryption.recipients[1]")
            && err.contains("age1notakey"),
        "{err}"
    );
    // Started for real, the agent stops at once the same way, having written nothing.
    let mut agent = Command::new(bin("hostagent"))
        .arg("--config")
        .arg(&config)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let status = eventually("the agent to refuse its config", || {
        agent
            .try_wait()
            .map_err(|e| e.to_string())?
            .ok_or_else(|| "still running".to_string())
    });
    if status.code().is_none() {
        let _ = agent.kill();
    }
    let mut err = String::new();
    std::io::Read::read_to_string(&mut agent.stderr.take().unwrap(), &mut err).unwrap();
    assert_eq!(status.code(), Some(64), "{err}");
    assert!(
        err.contains("jobs.backups.encryption.recipients[1]"),
        "{err}"
    );
    assert!(!backups.exists());

    let missing = fleet.path("no-such-identity.txt");
    let config = config_with(&format!(
        "recipients = [\"{good}\"]\nidentity_file = \"{}\"\n",
        missing.display()
    ));
    let line = line_of(&config, "identity_file");
    let out = run(Command::new(bin("hostagent"))
        .arg("--config")
        .arg(&config)
        .arg("--check-config"));
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(64), "{err}");
    assert!(
        err.contains(&format!("{}:{line}:", config.display()))
            && err.contains("identity_file")
            && err.contains("no-such-identity.txt"),
        "{err}"
    );

    // An identity that belongs to none of the recipients could never read a backup.
    let (stranger, _) = generate_key_pair();
    let identity = fleet.path("stranger.txt");
    std::fs::write(&identity, format!("{stranger}\n")).unwrap();
    let config = config_with(&format!(
        "recipients = [\"{good}\"]\nidentity_file = \"{}\"\n",
        identity.display()
    ));
    let out = run(Command::new(bin("hostagent"))
        .arg("--config")
        .arg(&config)
        .arg("--check-config"));
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(64), "{err}");
    assert!(
        err.contains("none of its identities belongs to a recipient") && !err.contains(&stranger),
        "{err}"
    );
}

/// `sentinel ARGS` as an admin operator: (exit 0, stdout and stderr).
fn cli(w: &World, args: &[&str]) -> (bool, String) {
    let (code, text) = cli_code(w, args);
    (code == Some(0), text)
}

/// `sentinel ARGS` as an admin operator: (exit code, stdout and stderr).
fn cli_code(w: &World, args: &[&str]) -> (Option<i32>, String) {
    let c = &w.fleet.certs;
    let out = run(Command::new(bin("sentinel"))
        .args(args)
        .args(["--controller", &w.controller.addr])
        .arg("--ca")
        .arg(c.join("ca.pem"))
        .arg("--cert")
        .arg(c.join("operator-admin.pem"))
        .arg("--key")
        .arg(c.join("operator-admin.key")));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code(), text)
}

/// The set of backups (as UTC stamps) the policy 7 daily + 4 weekly, minimum 3, keeps at
/// `now` out of `taken` (unix seconds), worked out with the `time` crate (the agent uses jiff).
fn expected_kept(taken: &[i64], now: i64) -> BTreeSet<String> {
    use std::collections::BTreeMap;
    use time::OffsetDateTime;
    let date = |t: i64| OffsetDateTime::from_unix_timestamp(t).unwrap().date();
    let today = date(now);
    let mut newest_day: BTreeMap<i32, i64> = BTreeMap::new();
    let mut newest_week: BTreeMap<(i32, u8), i64> = BTreeMap::new();
    let weeks: Vec<(i32, u8)> = (0..4)
        .map(|k| {
            let d = today - time::Duration::days(7 * k);
            let (y, w, _) = d.to_iso_week_date();
            (y, w)
        })
        .collect();
    for &t in taken.iter().filter(|&&t| t <= now) {
        let d = date(t);
        let age_days = today.to_julian_day() - d.to_julian_day();
        if age_days < 7 {
            let e = newest_day.entry(d.to_julian_day()).or_insert(t);
            *e = (*e).max(t);
        }
        let (y, w, _) = d.to_iso_week_date();
        if weeks.contains(&(y, w)) {
            let e = newest_week.entry((y, w)).or_insert(t);
            *e = (*e).max(t);
        }
    }
    let mut kept: BTreeSet<i64> = newest_day
        .values()
        .chain(newest_week.values())
        .copied()
        .collect();
    let mut newest_first: Vec<i64> = taken.iter().copied().filter(|&t| t <= now).collect();
    newest_first.sort_unstable_by(|a, b| b.cmp(a));
    for t in newest_first {
        if kept.len() >= 3 {
            break;
        }
        kept.insert(t);
    }
    kept.into_iter().map(stamp).collect()
}

fn stamp(t: i64) -> String {
    let d = time::OffsetDateTime::from_unix_timestamp(t).unwrap();
    format!(
        "{:04}{:02}{:02}T{:02}{:02}{:02}Z",
        d.year(),
        u8::from(d.month()),
        d.day(),
        d.hour(),
        d.minute(),
        d.second()
    )
}

fn rfc3339(t: i64) -> String {
    let s = stamp(t);
    format!(
        "{}-{}-{}T{}:{}:{}Z",
        &s[0..4],
        &s[4..6],
        &s[6..8],
        &s[9..11],
        &s[11..13],
        &s[13..15]
    )
}

#[test]
fn retention_over_sixty_simulated_nights_keeps_exactly_what_the_policy_names() {
    let w = world(Options::default());
    // Nightly at 02:00 UTC from Thursday 2026-01-01, plus an afternoon backup every ninth day
    // (a pre-deploy one, say), which then is that day's newest.
    let start = 1_767_232_800; // 2026-01-01T02:00:00Z
    let mut taken = Vec::new();
    let mut runs = Vec::new();
    for night in 0..60i64 {
        runs.push(start + night * 86_400);
        if night % 9 == 4 {
            runs.push(start + night * 86_400 + 12 * 3600 + 17 * 60);
        }
    }
    for t in runs {
        let job = w.backup_at(&rfc3339(t));
        assert_state(&job, "JOB_STATE_SUCCEEDED");
        taken.push(t);
        assert_eq!(
            w.dumps(),
            expected_kept(&taken, t),
            "after the run at {}",
            rfc3339(t)
        );
    }
    // 7 days + the newest of 3 earlier ISO weeks, and nothing else: no orphaned manifest.
    let kept = w.dumps();
    assert_eq!(kept.len(), 10, "{kept:?}");
    let listed: BTreeSet<String> = w
        .manifests()
        .iter()
        .flat_map(|m| m["entries"].as_array().cloned().unwrap_or_default())
        .filter(|e| e["pruned_at"].is_null())
        .map(|e| e["file"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(listed.len(), kept.len(), "{listed:?}");
    assert_eq!(
        w.manifests().len(),
        kept.len(),
        "manifests whose files all went should go too"
    );
    assert_eq!(w.shop()["kept"], 10);
}

#[test]
fn a_corrupted_byte_is_caught_by_verify_and_a_truncated_dump_fails_the_restore_test() {
    let w = world(Options::default());
    assert_state(&w.backup_at("2026-03-01T02:00:00Z"), "JOB_STATE_SUCCEEDED");
    assert_state(&w.backup_at("2026-03-02T02:00:00Z"), "JOB_STATE_SUCCEEDED");
    assert_state(&w.run("VerifyBackups", "{}"), "JOB_STATE_SUCCEEDED");

    // One flipped byte in the middle of the newest dump.
    let newest = w.newest_dump();
    let mut bytes = std::fs::read(&newest).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x5a;
    std::fs::write(&newest, &bytes).unwrap();
    let verify = w.run("VerifyBackups", "{}");
    assert_state(&verify, "JOB_STATE_FAILED");
    let detail = verify["detail"].as_str().unwrap();
    assert!(
        detail.contains("shop_prod-20260302T020000Z.dump") && detail.contains("sha256 mismatch"),
        "{detail}"
    );
    let shop = w.shop();
    assert!(!flag(&shop["lastVerifyOk"]), "{shop}");
    assert_eq!(shop["damaged"], 1, "{shop}");
    // The newest *good* backup is now the older one.
    assert!(
        shop["newestGoodFile"]
            .as_str()
            .unwrap()
            .ends_with("shop_prod-20260301T020000Z.dump"),
        "{shop}"
    );

    // The restore test takes the newest good dump; cut it in half.
    let older = w
        .backup_dir
        .join("production/shop_prod/shop_prod-20260301T020000Z.dump");
    let len = std::fs::metadata(&older).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&older)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    let restore = w.run("RunRestoreTest", "{}");
    assert_state(&restore, "JOB_STATE_FAILED");
    let detail = restore["detail"].as_str().unwrap();
    assert!(
        detail.contains("pg_restore failed"),
        "the restore itself must fail: {detail}"
    );
    assert!(
        detail.contains("size"),
        "and the file check says why: {detail}"
    );
    let shop = w.shop();
    assert!(!flag(&shop["lastRestoreTestOk"]), "{shop}");
    let left =
        w.pg.sql("SELECT count(*) FROM pg_database WHERE datname LIKE 'sentinel_restore_%'");
    assert_eq!(
        left, "0",
        "the scratch database is dropped after a failed restore too"
    );
}

#[test]
fn a_wrong_password_fails_the_backup_with_a_clear_error_and_prunes_nothing() {
    let w = world(Options {
        retention: "daily = 1\nweekly = 0\nminimum = 1\n",
        ..Default::default()
    });
    assert_state(&w.backup_at("2026-05-01T02:00:00Z"), "JOB_STATE_SUCCEEDED");
    assert_state(&w.backup_at("2026-05-02T02:00:00Z"), "JOB_STATE_SUCCEEDED");
    let before = w.dumps();
    assert_eq!(
        before,
        BTreeSet::from(["20260502T020000Z".to_string()]),
        "daily = 1 keeps one"
    );

    std::fs::write(&w.password_file, "not-the-password\n").unwrap();
    let job = w.backup_at("2026-05-03T02:00:00Z");
    assert_state(&job, "JOB_STATE_FAILED");
    let detail = job["detail"].as_str().unwrap();
    assert!(
        detail.contains("production/shop_prod")
            && detail.contains("password authentication failed for user \"backup_ro\""),
        "{detail}"
    );
    assert!(detail.contains("nothing of it was pruned"), "{detail}");
    assert!(
        !job.to_string().contains("not-the-password"),
        "the (wrong) password leaked: {job}"
    );
    assert_eq!(w.dumps(), before, "a failed backup prunes nothing");
    let shop = w.shop();
    assert!(
        shop["lastError"]
            .as_str()
            .unwrap()
            .contains("password authentication failed"),
        "{shop}"
    );
    assert!(
        shop["newestGoodFile"]
            .as_str()
            .unwrap()
            .contains("20260502T020000Z"),
        "{shop}"
    );

    std::fs::write(&w.password_file, format!("{BACKUP_PASSWORD}\n")).unwrap();
    assert_state(&w.backup_at("2026-05-04T02:00:00Z"), "JOB_STATE_SUCCEEDED");
    assert_eq!(w.dumps(), BTreeSet::from(["20260504T020000Z".to_string()]));
    assert_eq!(w.shop()["lastError"], Value::Null, "{}", w.shop());
}

/// A child process killed when dropped.
struct Daemon(std::process::Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// An rsync daemon on loopback serving module `offsite` from `dir`.
fn rsync_daemon(world: &World, port: u16, dir: &Path) -> Daemon {
    let config = world.fleet.path("rsyncd.conf");
    let uid = String::from_utf8_lossy(&run(Command::new("id").arg("-u")).stdout)
        .trim()
        .to_string();
    let gid = String::from_utf8_lossy(&run(Command::new("id").arg("-g")).stdout)
        .trim()
        .to_string();
    std::fs::write(
        &config,
        format!(
            "use chroot = no\npid file = {}\n[offsite]\npath = {}\nread only = no\nuid = {uid}\ngid = {gid}\n",
            world.fleet.path("rsyncd.pid").display(),
            dir.display()
        ),
    )
    .unwrap();
    let mut cmd = Command::new("rsync");
    cmd.args(["--daemon", "--no-detach", "--address=127.0.0.1"])
        .arg(format!("--port={port}"))
        .arg(format!("--config={}", config.display()));
    let log = std::fs::File::create(world.fleet.path("rsyncd.log")).unwrap();
    let daemon = Daemon(
        cmd.stdin(std::process::Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("starting rsync --daemon"),
    );
    eventually("the rsync daemon to listen", || {
        std::net::TcpStream::connect(("127.0.0.1", port))
            .map(|_| ())
            .map_err(|e| e.to_string())
    });
    daemon
}

#[test]
fn an_offsite_target_that_is_down_leaves_local_backups_intact_and_is_caught_up_next_run() {
    // Reserved, not bound: nothing listens there until the test starts the daemon.
    let reserved = sentinel_e2e::ports::reserve();
    let port = reserved.get();
    let target = format!("rsync://127.0.0.1:{port}/offsite");
    let w = world(Options {
        offsite: Some(target.clone()),
        ..Default::default()
    });
    // Nothing listens yet: the copy fails, the backup does not.
    let first = w.backup_at("2026-06-01T02:00:00Z");
    assert_state(&first, "JOB_STATE_SUCCEEDED");
    let detail = first["detail"].as_str().unwrap();
    assert!(
        detail.contains("offsite copy FAILED") && detail.contains("retried at the next run"),
        "{detail}"
    );
    let dump = w.newest_dump();
    assert_eq!(
        w.entry_for(&dump)["sha256"],
        sha256(&dump).as_str(),
        "the local backup is intact"
    );
    let list = w.list();
    assert!(
        list["offsitePending"].as_u64().unwrap() >= 2,
        "dump and manifest pending: {list}"
    );
    assert!(
        list["offsiteError"].as_str().unwrap().contains("rsync"),
        "{list}"
    );

    // The target comes back; the next run copies both runs' files and checks them.
    let remote = w.fleet.path("offsite");
    std::fs::create_dir_all(&remote).unwrap();
    let _daemon = rsync_daemon(&w, port, &remote);
    let second = w.backup_at("2026-06-02T02:00:00Z");
    assert_state(&second, "JOB_STATE_SUCCEEDED");
    let detail = second["detail"].as_str().unwrap();
    assert!(detail.contains("file(s) copied and checked"), "{detail}");
    for stamp in ["20260601T020000Z", "20260602T020000Z"] {
        let rel = format!("production/shop_prod/shop_prod-{stamp}.dump");
        assert_eq!(
            sha256(&remote.join(&rel)),
            sha256(&w.backup_dir.join(&rel)),
            "{rel}"
        );
        assert!(remote.join(format!("manifests/{stamp}.json")).exists());
    }
    let list = w.list();
    assert_eq!(
        list["offsitePending"],
        Value::Null,
        "nothing pending (0 is omitted): {list}"
    );
    assert_eq!(list["offsiteError"], Value::Null, "{list}");
}

/// A fixed UTC offset ("+HH:MM") in which `t` (unix seconds, on a minute) is 02:00.
fn zone_where_two_oclock_is(t: i64) -> String {
    let minute_of_day = (t.rem_euclid(86_400) / 60) as i32;
    let mut offset = (120 - minute_of_day).rem_euclid(1440);
    if offset > 720 {
        offset -= 1440;
    }
    let sign = if offset < 0 { '-' } else { '+' };
    format!("{sign}{:02}:{:02}", offset.abs() / 60, offset.abs() % 60)
}

fn scheduled_jobs(w: &World, schedule: &str) -> Vec<Value> {
    let jobs = w
        .controller
        .grpcurl(
            Some(r#"{"host":"argus","limit":100}"#),
            "sentinel.v1.FleetService/ListJobs",
        )
        .json()
        .unwrap();
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

#[test]
fn the_controller_down_over_two_oclock_runs_the_missed_backup_once_when_it_returns() {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    // 02:00 in the chosen zone is the next whole minute at least 25 s away; 02:01 (verify)
    // follows a minute later, while the controller is up again.
    let two = (now + 25 + 59) / 60 * 60;
    let zone = zone_where_two_oclock_is(two);
    let mut w = world(Options {
        time_zone: zone,
        schedule: "backup = \"0 2 * * *\"\nverify = \"1 2 * * *\"\nrestore_test = \"\"\n".into(),
        ..Default::default()
    });
    // The first start only starts counting (nothing is owed on a new install), and that is
    // not a run: LAST RUN stays empty.
    eventually("the schedule to start counting", || {
        let list = w.list();
        let s = list["schedules"]
            .as_array()
            .and_then(|a| a.iter().find(|s| s["name"] == "backup").cloned());
        match s {
            Some(s)
                if s["lastOutcome"]
                    .as_str()
                    .is_some_and(|o| o.starts_with("not run yet")) =>
            {
                assert!(s["lastRunAt"].is_null(), "{s}");
                Ok(())
            }
            other => Err(format!("{other:?}")),
        }
    });
    let (ok, text) = cli(&w, &["backups", "list"]);
    let row = text
        .lines()
        .find(|l| l.starts_with("backup "))
        .unwrap_or_else(|| panic!("no backup schedule row in {text}"));
    assert!(
        ok && row.contains("never"),
        "LAST RUN before any run: {text}"
    );
    assert!(scheduled_jobs(&w, "backup").is_empty());
    w.controller.proc.stop();

    // Down over 02:00.
    while (std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64)
        < two + 2
    {
        std::thread::sleep(Duration::from_millis(200));
    }
    // On the address the first run got: the agent knows no other.
    w.controller = w
        .fleet
        .start_controller_on(&w.controller.addr, &w.controller_toml);
    let job = eventually("the missed backup to run", || {
        let jobs = scheduled_jobs(&w, "backup");
        jobs.into_iter()
            .next()
            .ok_or_else(|| "no scheduled backup yet".to_string())
    });
    let by = job["requestedBy"].as_str().unwrap();
    assert!(
        by.contains("02:00:00") && by.contains("missed while the controller was down"),
        "{by}"
    );
    let done = w.wait_job(job["jobId"].as_str().unwrap());
    assert_state(&done, "JOB_STATE_SUCCEEDED");
    assert_eq!(w.dumps().len(), 1);

    // Up at 02:01: the verify fires on time; the backup did not run a second time.
    let verify = eventually_within(Duration::from_secs(120), "the 02:01 verify", || {
        scheduled_jobs(&w, "verify")
            .into_iter()
            .next()
            .ok_or_else(|| "not yet".to_string())
    });
    assert!(
        !verify["requestedBy"].as_str().unwrap().contains("missed"),
        "{verify}"
    );
    assert_state(
        &w.wait_job(verify["jobId"].as_str().unwrap()),
        "JOB_STATE_SUCCEEDED",
    );
    assert_eq!(
        scheduled_jobs(&w, "backup").len(),
        1,
        "the missed backup ran exactly once"
    );
    let list = w.list();
    let backup = list["schedules"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "backup")
        .unwrap()
        .clone();
    assert_eq!(backup["lastRunAt"], rfc3339(two).as_str(), "{backup}");
    assert_eq!(
        backup["nextRunAt"],
        rfc3339(two + 86_400).as_str(),
        "{backup}"
    );
    assert_eq!(backup["lastOutcome"], "succeeded", "{backup}");
}

/// Benchmark, not a test: backup jobs of a database of `SENTINEL_BENCH_BACKUP_MIB` MiB
/// (default 256) against plain `pg_dump --format=custom` to a file (same role, same cluster,
/// pg_dump's own fsync), first as the agent stores them, then encrypted with age; each pair
/// `SENTINEL_BENCH_RUNS` times (default 3), interleaved, medians reported. Run by
/// `tests/bench/6-backup-throughput.sh` (release binaries):
/// `cargo test --release -p sentinel-e2e --test backups -- --ignored --nocapture backup_throughput`
#[test]
#[ignore]
fn backup_throughput_against_plain_pg_dump() {
    let env_num = |name: &str, default: u64| {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(default)
    };
    let mib = env_num("SENTINEL_BENCH_BACKUP_MIB", 256);
    let runs = env_num("SENTINEL_BENCH_RUNS", 3).max(1) as usize;
    let mut w = world(Options::default());
    // ~0.5 KiB rows of random hex text (compresses about 2:1, like real text columns).
    let rows = mib * 2048;
    let filled = std::time::Instant::now();
    w.pg.sql_on(
        "shop_prod",
        &format!(
            "CREATE TABLE bulk (id bigint PRIMARY KEY, body text);
             INSERT INTO bulk SELECT g, md5(random()::text) || md5(random()::text) || md5(random()::text)
               || md5(random()::text) || md5(random()::text) || md5(random()::text) || md5(random()::text)
               || md5(random()::text) || md5(random()::text) || md5(random()::text) || md5(random()::text)
               || md5(random()::text) || md5(random()::text) || md5(random()::text) || md5(random()::text)
               || md5(random()::text) FROM generate_series(1, {rows}) g;
             VACUUM ANALYZE bulk;
             CHECKPOINT;"
        ),
    );
    let size: i64 =
        w.pg.sql("SELECT pg_database_size('shop_prod')")
            .parse()
            .unwrap();
    let db_mib = size as f64 / 1048576.0;
    eprintln!(
        "filled {db_mib:.0} MiB (pg_database_size) in {:.1?}",
        filled.elapsed()
    );

    let plain_file = w.fleet.path("plain.dump");
    let dsn = w.pg.dsn_without_password("backup_ro", "shop_prod");
    let plain_dump = || {
        let _ = std::fs::remove_file(&plain_file);
        let started = std::time::Instant::now();
        let out = run(Command::new(postgres::bin_dir().join("pg_dump"))
            .arg("--format=custom")
            .arg(format!("--file={}", plain_file.display()))
            .arg(format!("--dbname={dsn}"))
            .env("PGPASSWORD", BACKUP_PASSWORD));
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        started.elapsed().as_secs_f64()
    };
    // (dump step, whole job) in seconds, and the dump's size.
    let job = |w: &World| {
        let started = std::time::Instant::now();
        let job = w.run("RunBackup", r#"{"reason":"benchmark"}"#);
        let whole = started.elapsed().as_secs_f64();
        assert_state(&job, "JOB_STATE_SUCCEEDED");
        let step_ms = job["events"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|e| e.get("step"))
            .find(|s| {
                s["name"] == "dump production/shop_prod" && s["status"] == "STEP_STATUS_SUCCEEDED"
            })
            .and_then(|s| s["durationMs"].as_str().and_then(|v| v.parse::<f64>().ok()))
            .expect("the dump step's duration");
        let bytes = std::fs::metadata(w.newest_dump()).unwrap().len();
        (step_ms / 1000.0, whole, bytes)
    };
    let median = |mut v: Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    let mut table = String::new();
    let mut measure = |w: &World, label: &str| {
        let (mut plain, mut step, mut whole, mut bytes) = (Vec::new(), Vec::new(), Vec::new(), 0);
        for i in 0..runs {
            plain.push(plain_dump());
            let (s, j, b) = job(w);
            step.push(s);
            whole.push(j);
            bytes = b;
            eprintln!(
                "{label} run {}: plain pg_dump {:.1} s, dump step {:.1} s, whole job {:.1} s",
                i + 1,
                plain[i],
                s,
                j
            );
        }
        let (p, s, j) = (median(plain), median(step), median(whole));
        table.push_str(&format!(
            "| {label} | {:.0} MiB | {p:.1} s ({:.1} MiB/s) | {s:.1} s ({:.1} MiB/s) | {:+.1} % | {j:.1} s | {:+.1} % |\n",
            bytes as f64 / 1048576.0,
            db_mib / p,
            db_mib / s,
            (s / p - 1.0) * 100.0,
            (j / p - 1.0) * 100.0,
        ));
    };
    measure(&w, "stored as written");
    let keys = tempfile::tempdir().unwrap();
    w.restart_agent(&format!(
        "[jobs.backups.encryption]\n{}",
        age_keys(keys.path(), true)
    ));
    measure(&w, "encrypted (age)");
    println!(
        "\ndatabase {db_mib:.0} MiB, plain pg_dump file {:.0} MiB, medians of {runs} run(s)\n\n\
         | backup | file | plain pg_dump to a file | backup job's dump step (dump, row counts, \
         sha256, fsync) | step vs plain | whole job (API to final state) | job vs plain |\n\
         | --- | --- | --- | --- | --- | --- | --- |\n{table}",
        std::fs::metadata(&plain_file).unwrap().len() as f64 / 1048576.0,
    );
}

impl World {
    /// Submits a db_change deploy with a migration and waits for its end.
    fn deploy_db_change(&self, commit: &str) -> Value {
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
        let id = d["deployId"].as_str().unwrap().to_string();
        eventually_within(Duration::from_secs(300), "the deploy to end", || {
            let d = self
                .controller
                .grpcurl(
                    Some(&format!("{{\"deploy_id\":\"{id}\"}}")),
                    "sentinel.v1.FleetService/GetDeploy",
                )
                .json()?;
            if d["state"] == "DEPLOYMENT_STATE_RUNNING" {
                Err("running".into())
            } else {
                Ok(d)
            }
        })
    }
}

#[test]
fn a_db_change_deploy_backs_up_the_apps_production_database_first_and_does_not_migrate_when_that_fails(
) {
    let w = world(Options {
        with_app: true,
        ..Default::default()
    });
    let app = w.app.as_ref().unwrap();
    let v1 = app.repo.commit(&app.app, "v1", Variant::Healthy, |_| {});
    let v2 = app.repo.commit(&app.app, "v2", Variant::Healthy, |_| {});

    let d = w.deploy_db_change(&v1);
    assert_eq!(d["state"], "DEPLOYMENT_STATE_SUCCEEDED", "{d}");
    let steps = d["steps"].as_array().unwrap();
    let at = |name: &str, env: &str| {
        steps
            .iter()
            .position(|s| s["name"] == name && s["environment"] == env)
    };
    let backup = at("backup", "production").expect("a backup step");
    assert!(
        backup < at("deploy", "production").unwrap(),
        "backed up before production: {d}"
    );
    assert_eq!(steps[backup]["host"], "argus");
    assert!(steps[backup]["jobId"].is_string(), "{d}");
    // The dump is of this app's production database, taken for this deploy.
    let manifests = w.manifests();
    assert_eq!(manifests.len(), 1);
    assert!(
        manifests[0]["reason"]
            .as_str()
            .unwrap()
            .contains(d["deployId"].as_str().unwrap()),
        "{}",
        manifests[0]
    );
    assert_eq!(manifests[0]["entries"][0]["database"], "shop_prod");
    assert!(served(app.production_port).contains("version v1"));
    let job = w.wait_job(
        steps[at("deploy", "production").unwrap()]["jobId"]
            .as_str()
            .unwrap(),
    );
    assert!(
        job.to_string().contains("migrating the schema"),
        "the migration ran after the backup: {job}"
    );

    // The backup cannot be taken: no migration, production untouched.
    std::fs::write(&w.password_file, "wrong\n").unwrap();
    let d = w.deploy_db_change(&v2);
    assert_eq!(d["state"], "DEPLOYMENT_STATE_FAILED", "{d}");
    let detail = d["detail"].as_str().unwrap();
    assert!(
        detail.contains("password authentication failed") && detail.contains("not migrating"),
        "{detail}"
    );
    assert!(
        !d["steps"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["environment"] == "production" && s["name"] == "deploy"),
        "production was touched: {d}"
    );
    assert!(served(app.production_port).contains("version v1"));
    assert_eq!(w.manifests().len(), 1, "no new backup");
}

/// Every file and directory under `root` (not `root` itself), relative, with its mode.
fn modes_under(root: &Path) -> Vec<(String, bool, u32)> {
    use std::os::unix::fs::PermissionsExt;
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let meta = e.metadata().unwrap();
            let rel = e.path().strip_prefix(root).unwrap().display().to_string();
            out.push((rel, meta.is_dir(), meta.permissions().mode() & 0o7777));
            if meta.is_dir() {
                stack.push(e.path());
            }
        }
    }
    out.sort();
    out
}

fn mode_of(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// The backup agent again, started by a shell with `umask` (what a unit's `UMask=` does).
fn restart_agent_with_umask(w: &mut World, umask: &str) -> Daemon {
    w.agent.stop();
    eventually("argus to go offline", || {
        let host = w.controller.get_host("argus")?;
        if host["status"] == "HOST_STATUS_ONLINE" {
            Err(host["status"].to_string())
        } else {
            Ok(())
        }
    });
    let config = w
        .fleet
        .write_agent_config("argus", "argus", &w.controller.addr, &w.agent_toml);
    let log = std::fs::File::create(w.fleet.path("agent-argus-umask.log")).unwrap();
    let child = Command::new("sh")
        .arg("-c")
        .arg(format!("umask {umask} && exec \"$0\" --config \"$1\""))
        .arg(bin("hostagent"))
        .arg(&config)
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("starting the agent under sh");
    let agent = Daemon(child);
    w.controller.wait_online("argus");
    agent
}

/// The backup report a finished backup job carried (`JobFinished.backup`, as grpcurl prints
/// it).
fn backup_report(job: &Value) -> Value {
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

fn strings(v: &Value) -> BTreeSet<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn backup_files_are_private_whatever_the_umask_here_and_offsite() {
    let offsite = tempfile::tempdir().unwrap();
    // A mount point as an operator leaves it: readable by all.
    set_mode(offsite.path(), 0o755);
    let mut w = world(Options {
        offsite: Some(offsite.path().display().to_string()),
        everything: true,
        ..Default::default()
    });
    let _agent = restart_agent_with_umask(&mut w, "022");
    assert_state(&w.backup_at("2026-05-01T02:00:00Z"), "JOB_STATE_SUCCEEDED");
    assert_state(&w.backup_at("2026-05-02T02:00:00Z"), "JOB_STATE_SUCCEEDED");

    assert_eq!(mode_of(&w.backup_dir), 0o700, "the backup dir");
    for (root, name) in [
        (w.backup_dir.as_path(), "here"),
        (offsite.path(), "offsite"),
    ] {
        let all = modes_under(root);
        assert!(
            all.iter().any(|(p, _, _)| p.ends_with(".dump"))
                && all.iter().any(|(p, _, _)| p.starts_with("manifests/"))
                && all.iter().any(|(p, _, _)| p.starts_with("globals/"))
                && all.iter().any(|(p, _, _)| p.starts_with("files/")),
            "{name}: {all:?}"
        );
        let wide: Vec<_> = all
            .iter()
            .filter(|(_, dir, mode)| *mode != if *dir { 0o700 } else { 0o600 })
            .collect();
        assert!(
            wide.is_empty(),
            "{name}: not 0600 files and 0700 directories: {wide:?}"
        );
    }
    let verify = w.run("VerifyBackups", "{}");
    assert_state(&verify, "JOB_STATE_SUCCEEDED");

    // The list names the newest good file.
    let newest = w.newest_dump();
    let rel = newest
        .strip_prefix(&w.backup_dir)
        .unwrap()
        .display()
        .to_string();
    let (ok, text) = cli(&w, &["backups", "list"]);
    let row = text
        .lines()
        .find(|l| l.starts_with("production/shop_prod"))
        .unwrap_or_else(|| panic!("no shop_prod row in {text}"));
    assert!(ok && row.contains(&rel), "{rel} not in {text}");
}

#[test]
fn verify_reports_a_backup_file_whose_mode_is_wider() {
    let w = world(Options::default());
    assert_state(&w.backup_at("2026-05-01T02:00:00Z"), "JOB_STATE_SUCCEEDED");
    assert_state(&w.run("VerifyBackups", "{}"), "JOB_STATE_SUCCEEDED");
    let dump = w.newest_dump();
    let rel = dump
        .strip_prefix(&w.backup_dir)
        .unwrap()
        .display()
        .to_string();
    set_mode(&dump, 0o644);
    let verify = w.run("VerifyBackups", "{}");
    assert_state(&verify, "JOB_STATE_FAILED");
    let detail = verify["detail"].as_str().unwrap();
    assert!(
        detail.contains(&format!("{rel} is mode 0644, wider than 0600")),
        "{detail}"
    );
    let shop = w.shop();
    assert!(!flag(&shop["lastVerifyOk"]), "{shop}");
    assert!(
        shop["lastVerifyDetail"]
            .as_str()
            .unwrap()
            .contains("readable by other users"),
        "{shop}"
    );
    // The content is fine: it is not called damaged, and stays the newest good backup.
    assert_eq!(shop["newestGoodFile"], rel.as_str(), "{shop}");

    // A directory too.
    set_mode(&dump, 0o600);
    set_mode(&w.backup_dir.join("production"), 0o755);
    let verify = w.run("VerifyBackups", "{}");
    assert_state(&verify, "JOB_STATE_FAILED");
    assert!(
        verify["detail"]
            .as_str()
            .unwrap()
            .contains("production is mode 0755, wider than 0700"),
        "{verify}"
    );
}

#[test]
fn offsite_copies_are_pruned_with_the_same_retention_after_a_verified_copy() {
    let parent = tempfile::tempdir().unwrap();
    let offsite = parent.path().join("offsite");
    std::fs::create_dir(&offsite).unwrap();
    let w = world(Options {
        offsite: Some(offsite.display().to_string()),
        // Two days, but never fewer than three.
        retention: "daily = 2\nweekly = 0\nminimum = 3\n",
        ..Default::default()
    });
    let offsite_dumps = |root: &Path| -> BTreeSet<String> {
        std::fs::read_dir(root.join("production/shop_prod"))
            .map(|r| {
                r.flatten()
                    .filter_map(|e| {
                        let n = e.file_name().to_string_lossy().into_owned();
                        n.strip_prefix("shop_prod-")?
                            .strip_suffix(".dump")
                            .map(str::to_string)
                    })
                    .collect()
            })
            .unwrap_or_default()
    };
    let manifests_at = |root: &Path| -> BTreeSet<String> {
        std::fs::read_dir(root.join("manifests"))
            .map(|r| {
                r.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    };
    let day = |d: u32| format!("2026-07-{d:02}T02:00:00Z");

    // What an earlier version left there: a dump whose local manifest is long gone.
    assert_state(&w.backup_at(&day(1)), "JOB_STATE_SUCCEEDED");
    let planted = offsite.join("production/shop_prod/shop_prod-20260601T020000Z.dump");
    std::fs::copy(w.newest_dump(), &planted).unwrap();
    std::fs::write(offsite.join("manifests/20260601T020000Z.json"), "{}").unwrap();

    for d in 2..=4 {
        let job = w.backup_at(&day(d));
        assert_state(&job, "JOB_STATE_SUCCEEDED");
        if d == 2 {
            // Two here; there the minimum keeps the old one as a third.
            let mut expected = w.dumps();
            expected.insert("20260601T020000Z".into());
            assert_eq!(offsite_dumps(&offsite), expected, "day {d}");
            continue;
        }
        assert_eq!(offsite_dumps(&offsite), w.dumps(), "day {d}");
        assert_eq!(
            manifests_at(&offsite),
            manifests_at(&w.backup_dir),
            "day {d}"
        );
        if d == 4 {
            // The report says what went where.
            let report = backup_report(&job);
            assert_eq!(
                strings(&report["pruned"]),
                BTreeSet::from(
                    ["production/shop_prod/shop_prod-20260701T020000Z.dump".to_string()]
                ),
                "{report}"
            );
            assert_eq!(
                report["offsite"]["target"],
                offsite.display().to_string().as_str()
            );
            assert!(
                strings(&report["offsite"]["pruned"])
                    .contains("production/shop_prod/shop_prod-20260701T020000Z.dump"),
                "{report}"
            );
            let detail = job["detail"].as_str().unwrap();
            assert!(
                detail.contains("pruned 1 file(s) here")
                    && detail.contains(&format!("at {}", offsite.display())),
                "{detail}"
            );
        }
    }
    assert!(
        !planted.exists(),
        "the earlier version's extra dump went too"
    );
    assert_eq!(w.dumps().len(), 3);
    // Every file an offsite manifest calls pruned is gone, and every other one is there.
    for name in manifests_at(&offsite) {
        let m: Value =
            serde_json::from_slice(&std::fs::read(offsite.join("manifests").join(&name)).unwrap())
                .unwrap();
        for e in m["entries"].as_array().unwrap() {
            let there = offsite.join(e["file"].as_str().unwrap()).exists();
            assert_eq!(there, e["pruned_at"].is_null(), "{name}: {e}");
        }
    }

    // The target goes away for two nights: nothing is pruned there meanwhile.
    let away = parent.path().join("unmounted");
    std::fs::rename(&offsite, &away).unwrap();
    let held = offsite_dumps(&away);
    for d in 5..=6 {
        let job = w.backup_at(&day(d));
        assert_state(&job, "JOB_STATE_SUCCEEDED");
        assert!(
            job["detail"]
                .as_str()
                .unwrap()
                .contains("nothing pruned there until a complete copy"),
            "{job}"
        );
    }
    assert_eq!(offsite_dumps(&away), held);
    assert!(held.len() >= 3, "never fewer than the minimum: {held:?}");

    // Back: the copy catches up, then the same retention leaves what is here.
    std::fs::rename(&away, &offsite).unwrap();
    let job = w.backup_at(&day(7));
    assert_state(&job, "JOB_STATE_SUCCEEDED");
    assert_eq!(offsite_dumps(&offsite), w.dumps());
    assert_eq!(manifests_at(&offsite), manifests_at(&w.backup_dir));
    assert_eq!(
        w.dumps(),
        BTreeSet::from([
            "20260705T020000Z".to_string(),
            "20260706T020000Z".to_string(),
            "20260707T020000Z".to_string()
        ])
    );
}

#[test]
fn a_failed_offsite_copy_makes_backups_run_wait_exit_with_its_own_code() {
    let parent = tempfile::tempdir().unwrap();
    let offsite = parent.path().join("offsite");
    let w = world(Options {
        offsite: Some(offsite.display().to_string()),
        ..Default::default()
    });
    // Not mounted: the copy fails, the backup here does not.
    let (code, text) = cli_code(&w, &["backups", "run", "--reason", "test", "--wait"]);
    assert_eq!(code, Some(3), "{text}");
    assert!(text.contains("offsite copy FAILED"), "{text}");
    assert_eq!(w.dumps().len(), 1);

    std::fs::create_dir(&offsite).unwrap();
    let (code, text) = cli_code(&w, &["backups", "run", "--reason", "test", "--wait"]);
    assert_eq!(code, Some(0), "{text}");
}

#[test]
fn an_interrupted_backup_ends_interrupted_and_says_so_for_what_it_never_reached() {
    let mut w = world(Options {
        everything: true,
        ..Default::default()
    });
    // A pg_dump slow enough to be interrupted.
    let slow = w.fleet.path("slow_pg_dump");
    std::fs::write(
        &slow,
        format!(
            "#!/bin/sh\nsleep 3\nexec {}/pg_dump \"$@\"\n",
            postgres::bin_dir().display()
        ),
    )
    .unwrap();
    set_mode(&slow, 0o755);
    w.agent_toml = w.agent_toml.replace(
        &format!("pg_dump = \"{}/pg_dump\"", postgres::bin_dir().display()),
        &format!("pg_dump = \"{}\"", slow.display()),
    );
    w.restart_agent("");
    let job = w
        .controller
        .grpcurl(
            Some(r#"{"reason":"test","simulated_now":"2026-08-01T02:00:00Z"}"#),
            "sentinel.v1.FleetService/RunBackup",
        )
        .json()
        .expect("RunBackup");
    let id = job["jobId"].as_str().unwrap().to_string();
    let get = |w: &World, id: &str| {
        w.controller
            .grpcurl(
                Some(&format!("{{\"job_id\":\"{id}\"}}")),
                "sentinel.v1.FleetService/GetJob",
            )
            .json()
    };
    eventually("the dump to start", || {
        let j = get(&w, &id)?;
        if j.to_string().contains("dump production/shop_prod") {
            Ok(())
        } else {
            Err(j["state"].to_string())
        }
    });
    w.agent.signal("KILL");
    w.restart_agent("");
    let done = w.wait_job(&id);
    assert_state(&done, "JOB_STATE_INTERRUPTED");
    // Let a re-sent copy of the job reach the agent and be refused, if it is going to.
    std::thread::sleep(Duration::from_secs(3));
    let done = get(&w, &id).unwrap();
    let last = done["events"].as_array().unwrap().last().cloned().unwrap();
    assert!(last["refused"].is_null(), "a trailing refusal: {last}");
    assert_state(&done, "JOB_STATE_INTERRUPTED");
    let list = w.list();
    for d in list["databases"].as_array().unwrap() {
        let error = d["lastError"].as_str().unwrap_or("");
        assert!(
            !error.contains("REPLAYED")
                && error.contains("the agent stopped while this job was running"),
            "{d}"
        );
    }
}
