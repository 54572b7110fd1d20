//! Database isolation against a real throwaway PostgreSQL with the seed's layout: the default
//! setup leaks through PUBLIC and `sentinel isolation fix --apply` closes it; each classic
//! mistake, seeded alone, is found with its path and fixed; bad credentials and a policy that
//! names what the cluster lacks are never a clean report; the controller serves the report to
//! grpcurl, and an agent reports the cluster's roles; agents probe with their own environments'
//! credentials, getting into a leaking database and refused by an isolated one.
//!
//! Every verdict is also checked with real logins (psql as the app users), so the tests do not
//! merely agree with the audit's own reading of the catalog.
//!
//! The benchmark (ignored by default) times a full audit of the seed's layout and of a cluster
//! with 200 databases and 400 roles:
//!
//! ```sh
//! cargo build --release --bins && SENTINEL_BIN_DIR=$PWD/target/release cargo test --release -p sentinel-e2e --test isolation isolation_audit_benchmark -- --ignored --nocapture
//! ```

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use sentinel_e2e::postgres::{seed, Postgres, SUPERUSER, SUPERUSER_PASSWORD};
use sentinel_e2e::{bin, eventually, metric_sample, run, scrape_metrics, Fleet, Value};

/// What a `sentinel isolation ...` run gave.
struct CliRun {
    code: i32,
    stdout: String,
    stderr: String,
}

impl CliRun {
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}\n{}", self.stdout, self.stderr))
    }
}

fn isolation_cli(config: &Path, args: &[&str]) -> CliRun {
    let out = run(Command::new(bin("sentinel"))
        .arg("isolation")
        .args(args)
        .arg("--config")
        .arg(config));
    CliRun {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// A controller config (TLS files are only read by `serve`) with the layout's policy.
fn write_config(pg: &Postgres, isolation_toml: &str) -> PathBuf {
    let path = pg.dir().join("sentinel.toml");
    fs::write(
        &path,
        format!(
            "listen = \"127.0.0.1:0\"\ndata_dir = \"{}\"\n\n[tls]\nca = \"ca.pem\"\ncert = \"c.pem\"\nkey = \"c.key\"\n\n{isolation_toml}",
            pg.dir().join("data-sentinel").display()
        ),
    )
    .expect("writing the controller config");
    path
}

/// The superuser's DSN and password in files, for `fix --apply --dsn-file`.
fn admin_files(pg: &Postgres) -> (PathBuf, PathBuf) {
    let dsn = pg.dir().join("admin.dsn");
    let password = pg.dir().join("admin.password");
    fs::write(&dsn, pg.dsn_without_password(SUPERUSER, "postgres")).unwrap();
    fs::write(&password, SUPERUSER_PASSWORD).unwrap();
    (dsn, password)
}

fn apply_fix(pg: &Postgres, config: &Path) -> CliRun {
    let (dsn, password) = admin_files(pg);
    isolation_cli(
        config,
        &[
            "fix",
            "--apply",
            "--dsn-file",
            dsn.to_str().unwrap(),
            "--password-file",
            password.to_str().unwrap(),
        ],
    )
}

fn paths(report: &Value) -> Vec<String> {
    report["violations"]
        .as_array()
        .map(|v| {
            v.iter()
                .map(|v| v["path"].as_str().unwrap_or_default().to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// Starts a cluster with the seed's layout and a config whose auditor uses `auditor_password`.
fn layout(auditor_password: &str) -> (Postgres, PathBuf) {
    let pg = Postgres::start();
    seed::create(&pg);
    let config = write_config(&pg, &seed::policy_toml(&pg, auditor_password, "1h"));
    (pg, config)
}

fn can(pg: &Postgres, user: &str, db: &str) -> Result<(), String> {
    pg.can_connect(user, &seed::password(user), db)
}

#[test]
fn the_default_layout_leaks_through_public_and_fix_apply_closes_it() {
    let (pg, config) = layout(&seed::password(seed::AUDITOR));

    // The leak is real: a staging user logs into a production database.
    can(&pg, "s60_hub_user", "s60_auth_prod").expect("the default setup lets anyone connect");

    let check = isolation_cli(&config, &["check", "--json"]);
    assert_eq!(check.code, 1, "{}{}", check.stdout, check.stderr);
    let report = check.json();
    // proto3 JSON, as grpcurl prints it: `false` is omitted.
    assert_eq!(report["isolated"], false);
    assert_eq!(report["error"], "");
    let found = paths(&report);
    assert!(
        found.contains(&"s60_hub_user → PUBLIC has CONNECT on s60_auth_prod".to_string()),
        "{found:#?}"
    );
    // 4 users, each reaching the 4 databases of the two other environments.
    assert_eq!(found.len(), 16, "{found:#?}");
    assert!(found.iter().all(|p| p.contains("→ PUBLIC has CONNECT on")));
    let v = report["violations"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["user"] == "s60_hub_user" && v["database"] == "s60_auth_prod")
        .expect("hub user on auth prod");
    assert_eq!(v["userEnvironment"], "staging");
    assert_eq!(v["databaseEnvironment"], "production");

    let table = isolation_cli(&config, &["check"]);
    println!("{}", table.stdout);
    assert_eq!(table.code, 1);
    assert!(
        table.stdout.contains("NOT ISOLATED: 16 violations"),
        "{}",
        table.stdout
    );
    assert!(
        table.stdout.lines().any(|l| l.starts_with("s60_dev_user ")
            && l.ends_with("  s60_dev_user → PUBLIC has CONNECT on s60_auth_hub")),
        "{}",
        table.stdout
    );

    // Printing the fix changes nothing; it revokes PUBLIC and keeps the environment's users in.
    let printed = isolation_cli(&config, &["fix"]);
    println!("{}", printed.stdout);
    assert_eq!(printed.code, 0, "{}", printed.stderr);
    assert!(
        printed
            .stdout
            .contains("REVOKE CONNECT ON DATABASE s60_auth_prod FROM PUBLIC;\n"),
        "{}",
        printed.stdout
    );
    assert!(printed.stdout.contains(
        "GRANT CONNECT ON DATABASE s60_auth_prod TO s60_prod_user, s60_pulse_prod_user, s60_backup_ro;\n"
    ));
    assert!(printed.stdout.starts_with("BEGIN;\n") && printed.stdout.ends_with("COMMIT;\n"));
    can(&pg, "s60_hub_user", "s60_auth_prod").expect("`fix` without --apply changes nothing");

    // The auditor has no privilege to fix anything: the whole transaction is refused, nothing
    // half-applied.
    let refused = isolation_cli(&config, &["fix", "--apply"]);
    assert_eq!(refused.code, 2, "{}{}", refused.stdout, refused.stderr);
    assert!(refused.stderr.contains("rolled back"), "{}", refused.stderr);
    assert_eq!(isolation_cli(&config, &["check"]).code, 1);

    println!("{}", refused.stderr);
    let applied = apply_fix(&pg, &config);
    println!("{}", applied.stdout);
    assert_eq!(applied.code, 0, "{}{}", applied.stdout, applied.stderr);
    assert!(
        applied.stdout.contains("ISOLATED: no user"),
        "{}",
        applied.stdout
    );
    let again = isolation_cli(&config, &["check", "--json"]);
    assert_eq!(again.code, 0, "{}{}", again.stdout, again.stderr);
    assert_eq!(again.json()["isolated"], true);

    // And it holds for real logins: nobody crosses, every app and the backup role still get in.
    let err = can(&pg, "s60_hub_user", "s60_auth_prod").unwrap_err();
    assert!(err.contains("permission denied for database"), "{err}");
    can(&pg, "s60_dev_user", "s60_pulse_hub").unwrap_err();
    for env in seed::ENVIRONMENTS {
        for db in env.databases {
            for user in env.users.iter().chain([&seed::BACKUP_ROLE]) {
                can(&pg, user, db).unwrap_or_else(|e| panic!("{user} locked out of {db}: {e}"));
            }
        }
    }
}

/// A mistake: the SQL that makes it, the user and database that must show up, and the path.
struct Mistake {
    what: &'static str,
    sql: &'static str,
    user: &'static str,
    database: &'static str,
    path: &'static str,
    /// Whether the user can then really log into the database (a CONNECT path), checked with
    /// psql before the fix.
    logs_in: bool,
}

const MISTAKES: &[Mistake] = &[
    Mistake {
        what: "a direct GRANT CONNECT",
        sql: "GRANT CONNECT ON DATABASE s60_pulse_prod TO s60_dev_user;",
        user: "s60_dev_user",
        database: "s60_pulse_prod",
        path: "s60_dev_user has CONNECT on s60_pulse_prod",
        logs_in: true,
    },
    Mistake {
        what: "a membership chain of two roles to a CONNECT grant",
        sql: "CREATE ROLE ops_bridge NOLOGIN; CREATE ROLE prod_readers NOLOGIN;
              GRANT CONNECT ON DATABASE s60_auth_prod TO prod_readers;
              GRANT prod_readers TO ops_bridge; GRANT ops_bridge TO s60_hub_user;",
        user: "s60_hub_user",
        database: "s60_auth_prod",
        path: "s60_hub_user → ops_bridge → prod_readers has CONNECT on s60_auth_prod",
        logs_in: true,
    },
    Mistake {
        what: "membership in another environment's user through a chain of two roles",
        sql: "CREATE ROLE helper_a NOLOGIN; CREATE ROLE helper_b NOLOGIN;
              GRANT s60_prod_user TO helper_b; GRANT helper_b TO helper_a;
              GRANT helper_a TO s60_dev_user;",
        user: "s60_dev_user",
        database: "s60_auth_prod",
        path: "s60_dev_user → helper_a → helper_b → s60_prod_user has CONNECT on s60_auth_prod",
        logs_in: true,
    },
    Mistake {
        what: "a superuser app user",
        sql: "ALTER ROLE s60_pulse_prod_user SUPERUSER;",
        user: "s60_pulse_prod_user",
        database: "s60_auth_hub",
        path: "s60_pulse_prod_user is SUPERUSER, which passes every privilege check \
               (CONNECT on s60_auth_hub too)",
        logs_in: true,
    },
    Mistake {
        what: "a database owned by another environment's user",
        sql: "ALTER DATABASE s60_pulse_hub OWNER TO s60_dev_user;",
        user: "s60_dev_user",
        database: "s60_pulse_hub",
        path: "s60_dev_user owns s60_pulse_hub",
        logs_in: true,
    },
    Mistake {
        what: "BYPASSRLS",
        sql: "ALTER ROLE s60_hub_user BYPASSRLS;",
        user: "s60_hub_user",
        database: "s60_pulse_prod",
        path: "s60_hub_user has BYPASSRLS, so row-level security would not hold it back in \
               s60_pulse_prod",
        logs_in: false,
    },
    Mistake {
        what: "CREATEROLE",
        sql: "ALTER ROLE s60_dev_user CREATEROLE;",
        user: "s60_dev_user",
        database: "s60_auth_hub",
        path: "s60_dev_user has CREATEROLE, so it can grant itself roles that reach s60_auth_hub",
        logs_in: false,
    },
];

#[test]
fn each_mistake_seeded_alone_is_found_with_its_path_and_fixed() {
    let (pg, config) = layout(&seed::password(seed::AUDITOR));
    seed::isolate(&pg);
    let clean = isolation_cli(&config, &["check", "--json"]);
    assert_eq!(clean.code, 0, "{}{}", clean.stdout, clean.stderr);

    for mistake in MISTAKES {
        pg.sql(mistake.sql);
        let check = isolation_cli(&config, &["check", "--json"]);
        assert_eq!(
            check.code, 1,
            "{}: {}{}",
            mistake.what, check.stdout, check.stderr
        );
        let report = check.json();
        let violations = report["violations"].as_array().cloned().unwrap_or_default();
        assert!(
            violations.iter().any(|v| v["user"] == mistake.user
                && v["database"] == mistake.database
                && v["path"] == mistake.path),
            "{}: no violation {:?} among {:#?}",
            mistake.what,
            mistake.path,
            paths(&report)
        );
        assert!(
            violations.iter().all(|v| v["user"] == mistake.user),
            "{}: only {} is at fault, got {:#?}",
            mistake.what,
            mistake.user,
            paths(&report)
        );
        // BYPASSRLS opens no door by itself: reported, as a risk.
        let risk = violations
            .iter()
            .find(|v| v["path"] == mistake.path)
            .map(|v| v["risk"] == true);
        assert_eq!(risk, Some(mistake.what == "BYPASSRLS"), "{}", mistake.what);
        if mistake.logs_in {
            can(&pg, mistake.user, mistake.database)
                .unwrap_or_else(|e| panic!("{}: the hole is real, yet: {e}", mistake.what));
        }

        let fixed = apply_fix(&pg, &config);
        assert_eq!(
            fixed.code, 0,
            "{}: fix --apply: {}{}",
            mistake.what, fixed.stdout, fixed.stderr
        );
        let err = can(&pg, mistake.user, mistake.database).unwrap_err();
        assert!(
            err.contains("permission denied for database"),
            "{}: {err}",
            mistake.what
        );
        for env in seed::ENVIRONMENTS {
            for db in env.databases {
                for user in env.users {
                    can(&pg, user, db).unwrap_or_else(|e| {
                        panic!("{}: the fix locked {user} out of {db}: {e}", mistake.what)
                    });
                }
            }
        }
    }
}

/// The `[isolation]` section of the layout with `shared_databases` set to `shared`.
fn policy_sharing(pg: &Postgres, shared: &[&str]) -> String {
    let list: Vec<String> = shared.iter().map(|d| format!("\"{d}\"")).collect();
    let policy = seed::policy_toml(pg, &seed::password(seed::AUDITOR), "1h");
    let anchor = format!("cross_environment_roles = [\"{}\"]\n", seed::BACKUP_ROLE);
    assert!(policy.contains(&anchor), "{policy}");
    policy.replace(
        &anchor,
        &format!("{anchor}shared_databases = [{}]\n", list.join(", ")),
    )
}

fn is_superuser(pg: &Postgres, role: &str) -> bool {
    pg.sql(&format!(
        "SELECT rolsuper FROM pg_roles WHERE rolname = '{role}'"
    )) == "t"
}

#[test]
fn a_database_nobody_listed_is_reported_with_who_reaches_it_and_the_check_fails() {
    let (pg, config) = layout(&seed::password(seed::AUDITOR));
    seed::isolate(&pg);
    assert_eq!(isolation_cli(&config, &["check"]).code, 0);

    // A production user makes an archive; PUBLIC may CONNECT by default.
    pg.sql("CREATE DATABASE s60_live_archive OWNER s60_prod_user STRATEGY FILE_COPY");
    for user in ["s60_hub_user", "s60_dev_user"] {
        can(&pg, user, "s60_live_archive").expect("the other environments get in for real");
    }
    let check = isolation_cli(&config, &["check", "--json"]);
    assert_eq!(check.code, 1, "{}{}", check.stdout, check.stderr);
    let report = check.json();
    assert_eq!(report["isolated"], false);
    let found = paths(&report);
    for user in ["s60_hub_user", "s60_dev_user"] {
        let path = format!(
            "{user} → PUBLIC has CONNECT on s60_live_archive (a database no environment lists)"
        );
        assert!(found.contains(&path), "{path} not in {found:#?}");
    }
    let archive: Vec<&Value> = report["violations"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|v| v["database"] == "s60_live_archive")
        .collect();
    assert!(archive.iter().all(|v| v["databaseEnvironment"] == ""));
    let problems = report["policyProblems"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(problems.len(), 1, "{problems:#?}");
    let problem = problems[0].as_str().unwrap();
    assert!(
        problem.starts_with(
            "database s60_live_archive is in no environment and not in shared_databases"
        ) && problem.contains("PUBLIC has CONNECT on it; reached by 4 users of the policy")
            && problem.contains("s60_hub_user (staging)")
            && problem.contains("s60_dev_user (dev)"),
        "{problem}"
    );
    let table = isolation_cli(&config, &["check"]);
    assert!(
        table.stdout.lines().any(|l| l.starts_with("s60_hub_user ")
            && l.contains(" s60_live_archive  -  ")
            && l.ends_with(
                "  s60_hub_user → PUBLIC has CONNECT on s60_live_archive (a database no \
                 environment lists)"
            )),
        "{}",
        table.stdout
    );

    // `fix` cannot know where it belongs: it says so, and --apply names what stays open.
    let applied = apply_fix(&pg, &config);
    assert_eq!(applied.code, 1, "{}{}", applied.stdout, applied.stderr);
    assert!(
        applied.stdout.contains(
            "-- no statement derived for: s60_hub_user → PUBLIC has CONNECT on s60_live_archive"
        ),
        "{}",
        applied.stdout
    );
    assert!(
        applied.stdout.contains("The fix could not close:\n")
            && applied
                .stdout
                .contains("  - policy problem: database s60_live_archive"),
        "{}",
        applied.stdout
    );

    // Listed under production, it is audited like the others and the fix closes it.
    let policy = seed::policy_toml(&pg, &seed::password(seed::AUDITOR), "1h").replace(
        "databases = [\"s60_auth_prod\", \"s60_pulse_prod\"]",
        "databases = [\"s60_auth_prod\", \"s60_pulse_prod\", \"s60_live_archive\"]",
    );
    let config = write_config(&pg, &policy);
    let check = isolation_cli(&config, &["check", "--json"]);
    assert_eq!(check.code, 1);
    assert!(paths(&check.json())
        .contains(&"s60_hub_user → PUBLIC has CONNECT on s60_live_archive".to_string()));
    let applied = apply_fix(&pg, &config);
    assert_eq!(applied.code, 0, "{}{}", applied.stdout, applied.stderr);
    let err = can(&pg, "s60_hub_user", "s60_live_archive").unwrap_err();
    assert!(err.contains("permission denied for database"), "{err}");
    can(&pg, "s60_pulse_prod_user", "s60_live_archive").expect("production keeps its archive");
}

#[test]
fn shared_databases_listed_on_purpose_are_accounted_for() {
    let (pg, config) = layout(&seed::password(seed::AUDITOR));
    seed::isolate(&pg);
    // By default postgres and the templates are shared: every role may reach postgres (and
    // really does), and the check is clean.
    can(&pg, "s60_hub_user", "postgres").expect("postgres is open to PUBLIC");
    let check = isolation_cli(&config, &["check", "--json"]);
    assert_eq!(check.code, 0, "{}{}", check.stdout, check.stderr);

    // A database shared on purpose is accounted for too.
    pg.sql("CREATE DATABASE s60_shared_lookup STRATEGY FILE_COPY");
    assert_eq!(isolation_cli(&config, &["check"]).code, 1);
    let config = write_config(
        &pg,
        &policy_sharing(
            &pg,
            &["postgres", "template0", "template1", "s60_shared_lookup"],
        ),
    );
    let check = isolation_cli(&config, &["check", "--json"]);
    assert_eq!(check.code, 0, "{}{}", check.stdout, check.stderr);
    assert_eq!(check.json()["isolated"], true);

    // Setting the list replaces the default: postgres and the templates are then reported.
    let config = write_config(&pg, &policy_sharing(&pg, &["s60_shared_lookup"]));
    let check = isolation_cli(&config, &["check", "--json"]);
    assert_eq!(check.code, 1, "{}{}", check.stdout, check.stderr);
    let report = check.json();
    let problems: Vec<String> = report["policyProblems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(problems.len(), 3, "{problems:#?}");
    for db in ["postgres", "template0", "template1"] {
        assert!(
            problems
                .iter()
                .any(|p| p.starts_with(&format!("database {db} is in no environment"))),
            "{db}: {problems:#?}"
        );
    }
    assert!(
        problems.iter().any(|p| p.starts_with("database template0")
            && p.contains("nobody can connect to it now (datallowconn is off)")),
        "{problems:#?}"
    );

    // A database both shared and in an environment is a config error naming the key.
    let config = write_config(&pg, &policy_sharing(&pg, &["postgres", "s60_auth_prod"]));
    let bad = isolation_cli(&config, &["check"]);
    assert_eq!(bad.code, 64, "{}", bad.stderr);
    assert!(bad.stderr.contains("shared_databases"), "{}", bad.stderr);
}

/// A role name that, printed raw on its own line of a script, makes the app user superuser.
const HOSTILE_ROLE_SQL: &str = r#"U&"ops\000aALTER ROLE s60_hub_user SUPERUSER;\000a-- x""#;

#[test]
fn the_printed_fix_script_is_safe_to_run_whatever_the_role_names_hold() {
    let (pg, config) = layout(&seed::password(seed::AUDITOR));
    seed::isolate(&pg);
    // A group role with the hostile name on a staging → production path.
    pg.sql(&format!(
        "CREATE ROLE {HOSTILE_ROLE_SQL} NOLOGIN;
         GRANT CONNECT ON DATABASE s60_auth_prod TO {HOSTILE_ROLE_SQL};
         GRANT {HOSTILE_ROLE_SQL} TO s60_hub_user;"
    ));
    can(&pg, "s60_hub_user", "s60_auth_prod").expect("the path is real");

    let printed = isolation_cli(&config, &["fix"]);
    assert_eq!(printed.code, 0, "{}{}", printed.stdout, printed.stderr);
    println!("{}", printed.stdout);
    let script = pg.dir().join("f.sql");
    fs::write(&script, &printed.stdout).unwrap();
    // psql -f f.sql as the administrator.
    let out = run(Command::new(sentinel_e2e::postgres::bin_dir().join("psql"))
        .args(["-X", "-h", "127.0.0.1", "-p", &pg.port.to_string()])
        .args(["-U", SUPERUSER, "-d", "postgres", "-f"])
        .arg(&script)
        .env("PGPASSWORD", SUPERUSER_PASSWORD));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && stderr.is_empty(), "psql: {stderr}");

    assert!(
        !is_superuser(&pg, "s60_hub_user"),
        "the script made s60_hub_user SUPERUSER:\n{}",
        printed.stdout
    );
    let err = can(&pg, "s60_hub_user", "s60_auth_prod").unwrap_err();
    assert!(err.contains("permission denied for database"), "{err}");
    let check = isolation_cli(&config, &["check"]);
    assert_eq!(check.code, 0, "{}{}", check.stdout, check.stderr);
}

#[test]
fn a_name_cannot_forge_a_row_or_drive_the_terminal_in_the_check_table() {
    let (pg, config) = layout(&seed::password(seed::AUDITOR));
    seed::isolate(&pg);
    // A newline, then a fake row claiming isolation; an escape that would clear the screen.
    let name = r#"U&"ops\000aISOLATED: no user of one environment can reach\001b[2J""#;
    pg.sql(&format!(
        "CREATE ROLE {name} NOLOGIN;
         GRANT CONNECT ON DATABASE s60_pulse_prod TO {name};
         GRANT {name} TO s60_dev_user;"
    ));
    let table = isolation_cli(&config, &["check"]);
    println!("{}", table.stdout);
    assert_eq!(table.code, 1, "{}{}", table.stdout, table.stderr);
    assert!(!table.stdout.contains('\x1b'), "{:?}", table.stdout);
    assert!(
        !table.stdout.lines().any(|l| l.starts_with("ISOLATED")),
        "{}",
        table.stdout
    );
    assert!(
        table.stdout.lines().any(|l| l.starts_with("s60_dev_user ")
            && l.ends_with(
                "s60_dev_user → ops\\nISOLATED: no user of one environment can reach\\u{1b}[2J \
                 has CONNECT on s60_pulse_prod"
            )),
        "{}",
        table.stdout
    );
    // The JSON keeps the name as it is.
    let report = isolation_cli(&config, &["check", "--json"]).json();
    assert!(paths(&report).iter().any(|p| p.contains("ops\nISOLATED")));
}

#[test]
fn a_regranted_grant_option_is_revoked_and_the_recheck_is_clean() {
    let (pg, config) = layout(&seed::password(seed::AUDITOR));
    seed::isolate(&pg);
    // A dev user holds CONNECT on production WITH GRANT OPTION and passes it on to staging.
    pg.sql("GRANT CONNECT ON DATABASE s60_auth_prod TO s60_dev_user WITH GRANT OPTION");
    pg.psql_as(
        "s60_dev_user",
        &seed::password("s60_dev_user"),
        "s60_auth_dev",
        "GRANT CONNECT ON DATABASE s60_auth_prod TO s60_hub_user",
    )
    .expect("the dev user passes its grant on");
    for user in ["s60_dev_user", "s60_hub_user"] {
        can(&pg, user, "s60_auth_prod").expect("both get in for real");
    }
    let check = isolation_cli(&config, &["check", "--json"]);
    assert_eq!(check.code, 1);
    let found = paths(&check.json());
    assert!(
        found.contains(
            &"s60_dev_user has CONNECT on s60_auth_prod WITH GRANT OPTION, passed on to \
              s60_hub_user (revoked with it: CASCADE)"
                .to_string()
        ),
        "{found:#?}"
    );
    assert!(
        found.contains(
            &"s60_hub_user has CONNECT on s60_auth_prod (granted by s60_dev_user)".to_string()
        ),
        "{found:#?}"
    );

    let applied = apply_fix(&pg, &config);
    println!("{}", applied.stdout);
    assert_eq!(applied.code, 0, "{}{}", applied.stdout, applied.stderr);
    assert!(
        applied
            .stdout
            .contains("REVOKE CONNECT ON DATABASE s60_auth_prod FROM s60_dev_user CASCADE;"),
        "{}",
        applied.stdout
    );
    assert!(
        applied.stdout.contains("ISOLATED: no user"),
        "{}",
        applied.stdout
    );
    for user in ["s60_dev_user", "s60_hub_user"] {
        let err = can(&pg, user, "s60_auth_prod").unwrap_err();
        assert!(
            err.contains("permission denied for database"),
            "{user}: {err}"
        );
    }
    for user in ["s60_prod_user", "s60_pulse_prod_user", seed::BACKUP_ROLE] {
        can(&pg, user, "s60_auth_prod").unwrap_or_else(|e| panic!("{user} locked out: {e}"));
    }
}

#[test]
fn a_grant_made_by_another_grantor_is_revoked_as_that_grantor() {
    let (pg, config) = layout(&seed::password(seed::AUDITOR));
    seed::isolate(&pg);
    // A production user holding the grant option lets a staging user in.
    pg.sql("GRANT CONNECT ON DATABASE s60_pulse_prod TO s60_pulse_prod_user WITH GRANT OPTION");
    pg.psql_as(
        "s60_pulse_prod_user",
        &seed::password("s60_pulse_prod_user"),
        "s60_pulse_prod",
        "GRANT CONNECT ON DATABASE s60_pulse_prod TO s60_hub_user",
    )
    .expect("the production user grants");
    can(&pg, "s60_hub_user", "s60_pulse_prod").expect("the hole is real");

    let printed = isolation_cli(&config, &["fix"]);
    assert!(
        printed.stdout.contains(
            "SET ROLE s60_pulse_prod_user; REVOKE CONNECT ON DATABASE s60_pulse_prod FROM \
             s60_hub_user; RESET ROLE;\n"
        ),
        "{}",
        printed.stdout
    );
    let applied = apply_fix(&pg, &config);
    println!("{}", applied.stdout);
    assert_eq!(applied.code, 0, "{}{}", applied.stdout, applied.stderr);
    assert!(
        applied.stdout.contains("-- applied 1 of 1 statements"),
        "{}",
        applied.stdout
    );
    assert!(
        applied.stdout.contains("ISOLATED: no user"),
        "{}",
        applied.stdout
    );
    let err = can(&pg, "s60_hub_user", "s60_pulse_prod").unwrap_err();
    assert!(err.contains("permission denied for database"), "{err}");
    can(&pg, "s60_pulse_prod_user", "s60_pulse_prod").expect("the grantor keeps its own");
}

#[test]
fn a_database_taken_over_by_a_group_goes_back_to_the_user_that_built_it() {
    let (pg, config) = layout(&seed::password(seed::AUDITOR));
    seed::isolate(&pg);
    // s60_pulse_prod_user (not production's first user) owns s60_pulse_prod and built it.
    // (The ownership change moves the old owner's ACL entries to the new one: grant back.)
    pg.sql(
        "ALTER DATABASE s60_pulse_prod OWNER TO s60_pulse_prod_user;
         GRANT CONNECT ON DATABASE s60_pulse_prod TO s60_prod_user;",
    );
    pg.psql_as(
        "s60_pulse_prod_user",
        &seed::password("s60_pulse_prod_user"),
        "s60_pulse_prod",
        "CREATE TABLE pulses (id int); CREATE TABLE beats (id int);",
    )
    .expect("the app builds its tables");
    // A staging group takes the database over.
    pg.sql(
        "CREATE ROLE staging_ops NOLOGIN; GRANT staging_ops TO s60_hub_user;
         ALTER DATABASE s60_pulse_prod OWNER TO staging_ops;",
    );
    can(&pg, "s60_hub_user", "s60_pulse_prod").expect("the takeover lets staging in");

    let printed = isolation_cli(&config, &["fix"]);
    assert!(
        printed
            .stdout
            .contains("ALTER DATABASE s60_pulse_prod OWNER TO s60_pulse_prod_user;\n"),
        "{}",
        printed.stdout
    );
    let applied = apply_fix(&pg, &config);
    println!("{}", applied.stdout);
    assert_eq!(applied.code, 0, "{}{}", applied.stdout, applied.stderr);
    let owner = pg.sql(
        "SELECT pg_catalog.pg_get_userbyid(datdba) FROM pg_database \
         WHERE datname = 's60_pulse_prod'",
    );
    assert_eq!(owner, "s60_pulse_prod_user");
    let err = can(&pg, "s60_hub_user", "s60_pulse_prod").unwrap_err();
    assert!(err.contains("permission denied for database"), "{err}");
    for user in ["s60_prod_user", "s60_pulse_prod_user"] {
        can(&pg, user, "s60_pulse_prod").unwrap_or_else(|e| panic!("{user} locked out: {e}"));
    }
}

#[test]
fn the_cli_json_is_the_apis_proto3_json_as_grpcurl_emit_defaults_prints_it() {
    let pg = Postgres::start();
    seed::create(&pg);
    pg.sql("ALTER ROLE s60_hub_user BYPASSRLS");
    let fleet = Fleet::new(&["hub-alfa"]);
    let policy = seed::policy_toml(&pg, &seed::password(seed::AUDITOR), "1h");
    let controller = fleet.start_controller(&policy);
    let api = controller
        .grpcurl_as(
            "operator-admin",
            &["-emit-defaults", "-d", "{}"],
            "sentinel.v1.FleetService/RunIsolationCheck",
        )
        .json()
        .expect("RunIsolationCheck");
    let cli = isolation_cli(&fleet.path("sentinel.toml"), &["check", "--json"]);
    assert_eq!(cli.code, 1, "{}", cli.stderr);
    let cli = cli.json();
    // The same encodings: uint64 as a string, Timestamp as RFC 3339 in UTC.
    for report in [&api, &cli] {
        let micros = report["durationMicros"].as_str().unwrap_or_default();
        assert!(micros.parse::<u64>().is_ok(), "durationMicros: {report}");
        let at = report["checkedAt"].as_str().unwrap_or_default();
        assert!(
            at.len() >= 20 && at.ends_with('Z') && at.contains('T'),
            "checkedAt: {at}"
        );
    }
    // And, but for when and how long, the same report. grpcurl -emit-defaults writes an unset
    // message field (a Timestamp never set) as `null`, which proto3 JSON reads as absent.
    let strip = |v: &Value| {
        let mut v = v.clone();
        let o = v.as_object_mut().unwrap();
        o.remove("durationMicros");
        o.remove("checkedAt");
        o.retain(|_, field| !field.is_null());
        v
    };
    assert_eq!(strip(&cli), strip(&api));
    let risky = api["violations"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["kind"] == "bypassrls")
        .expect("the BYPASSRLS violation");
    assert_eq!(risky["risk"], true);
}

#[test]
fn bad_credentials_and_a_policy_the_cluster_lacks_are_never_a_clean_report() {
    let (pg, config) = layout("not-the-Password");
    seed::isolate(&pg);

    let table = isolation_cli(&config, &["check"]);
    assert_eq!(table.code, 2, "{}{}", table.stdout, table.stderr);
    assert!(
        table
            .stderr
            .contains("password authentication failed for user \"sentinel_auditor\""),
        "{}",
        table.stderr
    );
    assert!(!table.stdout.contains("ISOLATED"), "{}", table.stdout);
    assert!(
        !table.stderr.contains("not-the-Password"),
        "{}",
        table.stderr
    );
    let json = isolation_cli(&config, &["check", "--json"]);
    assert_eq!(json.code, 2);
    let report = json.json();
    // proto3 JSON, as grpcurl prints it: `false` is omitted.
    assert_eq!(report["isolated"], false);
    assert!(report["error"]
        .as_str()
        .unwrap_or_default()
        .contains(&format!("sentinel_auditor@127.0.0.1:{}/postgres", pg.port)));
    let fix = isolation_cli(&config, &["fix"]);
    assert_eq!(fix.code, 2, "{}", fix.stdout);

    // A policy naming a database and a user the cluster does not have.
    let policy = seed::policy_toml(&pg, &seed::password(seed::AUDITOR), "1h")
        .replace(
            "databases = [\"s60_auth_prod\", \"s60_pulse_prod\"]",
            "databases = [\"s60_auth_prod\", \"s60_pulse_prod\", \"s60_mail_prod\"]",
        )
        .replace(
            "users = [\"s60_dev_user\"]",
            "users = [\"s60_dev_user\", \"s60_n8n_dev_user\"]",
        );
    let config = write_config(&pg, &policy);
    let check = isolation_cli(&config, &["check", "--json"]);
    assert_eq!(check.code, 1, "{}{}", check.stdout, check.stderr);
    let report = check.json();
    // proto3 JSON, as grpcurl prints it: `false` is omitted.
    assert_eq!(report["isolated"], false);
    assert_eq!(
        report["policyProblems"],
        serde_json::json!([
            "user s60_n8n_dev_user of dev does not exist in the cluster",
            "database s60_mail_prod of production does not exist in the cluster"
        ])
    );
    let table = isolation_cli(&config, &["check"]);
    assert!(
        table.stdout.contains("0 violations, 2 policy problems"),
        "{}",
        table.stdout
    );

    // A policy that cannot work is a config error naming the key (exit 64).
    let config = write_config(
        &pg,
        &policy.replace("users = [\"s60_hub_user\"]", "users = []"),
    );
    let bad = isolation_cli(&config, &["check"]);
    assert_eq!(bad.code, 64, "{}", bad.stderr);
    assert!(
        bad.stderr.contains("isolation.environments.staging.users"),
        "{}",
        bad.stderr
    );
}

#[test]
fn the_controller_serves_isolation_reports_to_grpcurl_and_the_agent_reports_roles() {
    let pg = Postgres::start();
    seed::create(&pg);
    let fleet = Fleet::new(&["hub-alfa"]);
    fleet.issue_operator("vera", "viewer");
    let policy = seed::policy_toml(&pg, &seed::password(seed::AUDITOR), "1h");
    let controller = fleet.start_controller(&policy);

    // The scheduled check runs at start-up.
    let report = eventually("the first scheduled isolation report", || {
        controller
            .grpcurl(None, "sentinel.v1.FleetService/GetIsolationReport")
            .json()
    });
    assert!(report["isolated"].is_null() || report["isolated"] == false);
    assert!(paths(&report).contains(&"s60_dev_user → PUBLIC has CONNECT on s60_auth_prod".into()));
    assert!(report["checkedAt"].is_string());

    // Viewers read the report; running a check takes a deployer.
    let read = controller.grpcurl_as(
        "operator-vera",
        &[],
        "sentinel.v1.FleetService/GetIsolationReport",
    );
    assert!(read.ok, "{}", read.stderr);
    let run_as_viewer = controller.grpcurl_as(
        "operator-vera",
        &["-d", "{}"],
        "sentinel.v1.FleetService/RunIsolationCheck",
    );
    assert!(!run_as_viewer.ok);
    assert!(
        run_as_viewer.stderr.contains("PermissionDenied"),
        "{}",
        run_as_viewer.stderr
    );

    // Fix with the CLI against the controller's own config, then check on demand.
    let applied = apply_fix(&pg, &fleet.path("sentinel.toml"));
    assert_eq!(applied.code, 0, "{}{}", applied.stdout, applied.stderr);
    let report = controller
        .grpcurl(Some("{}"), "sentinel.v1.FleetService/RunIsolationCheck")
        .json()
        .expect("RunIsolationCheck");
    assert_eq!(report["isolated"], true, "{report}");
    assert!(report["violations"].is_null(), "{report}");
    let latest = controller
        .grpcurl(None, "sentinel.v1.FleetService/GetIsolationReport")
        .json()
        .unwrap();
    assert_eq!(latest["checkedAt"], report["checkedAt"]);

    let probe = controller.grpcurl(
        Some("{\"probe\": true}"),
        "sentinel.v1.FleetService/RunIsolationCheck",
    );
    assert!(
        !probe.ok
            && probe.stderr.contains("FailedPrecondition")
            && probe.stderr.contains("[isolation.probe]"),
        "{}",
        probe.stderr
    );

    // The agent's PostgreSQL collector, through the controller.
    let dsn_file = pg.dir().join("agent.dsn");
    fs::write(
        &dsn_file,
        pg.dsn(seed::AUDITOR, &seed::password(seed::AUDITOR), "postgres"),
    )
    .unwrap();
    let _agent = fleet.start_agent(
        "hub-alfa",
        "hub-alfa",
        &controller.addr,
        &format!(
            "[collectors.postgres]\nenabled = true\ndsn_file = \"{}\"",
            dsn_file.display()
        ),
    );
    let host = eventually("the postgres section in GetHost", || {
        let host = controller.wait_online("hub-alfa");
        if host["state"]["postgres"]["state"].is_object() {
            Ok(host)
        } else {
            Err(host["state"]["postgres"].to_string())
        }
    });
    let state = &host["state"]["postgres"]["state"];
    let roles = state["roles"].as_array().unwrap();
    assert!(roles
        .iter()
        .any(|r| r["name"] == "s60_hub_user" && r["login"] == true));
    let auth_prod = state["databases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["name"] == "s60_auth_prod")
        .expect("s60_auth_prod reported");
    assert_eq!(auth_prod["owner"], "s60_prod_user");
    let grantees: Vec<&str> = auth_prod["grants"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|g| g["connect"] == true)
        .filter_map(|g| g["grantee"].as_str())
        .collect();
    assert_eq!(
        grantees,
        ["s60_backup_ro", "s60_prod_user", "s60_pulse_prod_user"],
        "after the fix, PUBLIC no longer connects"
    );
    let log = controller.proc.log_text();
    assert!(
        !log.contains(&seed::password(seed::AUDITOR)),
        "a password reached the log"
    );
}

/// The probe results of a report, as (host, user, database) -> (connected, probed, message).
fn probes(report: &Value) -> Vec<(String, String, String, bool, bool, String)> {
    let text = |v: &Value, k: &str| v[k].as_str().unwrap_or_default().to_string();
    report["probes"]
        .as_array()
        .map(|probes| {
            probes
                .iter()
                .map(|p| {
                    (
                        text(p, "host"),
                        text(p, "user"),
                        text(p, "database"),
                        p["connected"] == true,
                        p["probed"] == true,
                        text(p, "message"),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn agents_probe_with_their_own_credentials_and_get_into_leaking_databases_only() {
    let pg = Postgres::start();
    seed::create(&pg);
    let fleet = Fleet::new(&["hub-alfa", "prod-alfa", "cerebro", "argus"]);
    let c = fleet.certs.display();
    let policy = seed::policy_toml(&pg, &seed::password(seed::AUDITOR), "1h");
    let controller = fleet.start_controller(&format!(
        "[signing]\nkey = \"{c}/signing.key\"\n\n{policy}\n[isolation.probe]\n\
             hosts = [\"hub-alfa\", \"prod-alfa\", \"cerebro\", \"argus\"]\n\
             host = \"127.0.0.1\"\nport = {}\ntimeout = \"20s\"\nconnect_timeout = \"5s\"\n\
             on_schedule = false\n",
        pg.port
    ));
    let metrics_port = controller.metrics_port();
    let violations_of = |environment: &str| {
        let text = scrape_metrics(metrics_port).expect("scraping the controller");
        metric_sample(
            &text,
            &format!("sentinel_isolation_violations{{environment=\"{environment}\"}}"),
        )
    };
    let jobs = |host: &str, kinds: &str, probe: &str| {
        format!(
            "[collectors]\ndocker = false\nsystem = false\n[jobs]\nstate_dir = \"{}\"\n\
             trusted_keys = [\"{c}/signing.pub\"]\nallowed_kinds = [{kinds}]\n{probe}",
            fleet.path(&format!("state-{host}")).display()
        )
    };
    // Staging reads its credentials from the app's .env, production from the agent config.
    let env_file = fleet.path("hub-app.env");
    fs::write(
        &env_file,
        format!(
            "# the app's own settings\nAPP_ENV=staging\nDATABASE_URL=\"postgres://s60_hub_user:{}@db.internal:5432/s60_auth_hub\"\n",
            seed::password("s60_hub_user")
        ),
    )
    .unwrap();
    let prod_password = fleet.path("prod.password");
    fs::write(&prod_password, seed::password("s60_prod_user")).unwrap();
    let _hub = fleet.start_agent(
        "hub-alfa",
        "hub-alfa",
        &controller.addr,
        &jobs(
            "hub-alfa",
            "\"isolation_probe\"",
            &format!(
                "[[jobs.isolation_probe.credentials]]\nenvironment = \"staging\"\nenv_file = \"{}\"\n",
                env_file.display()
            ),
        ),
    );
    let _prod = fleet.start_agent(
        "prod-alfa",
        "prod-alfa",
        &controller.addr,
        &jobs(
            "prod-alfa",
            "\"isolation_probe\"",
            &format!(
                "[[jobs.isolation_probe.credentials]]\nenvironment = \"production\"\n\
                 user = \"s60_prod_user\"\npassword_file = \"{}\"\n",
                prod_password.display()
            ),
        ),
    );
    // cerebro runs but does not allow probes; argus is not running at all.
    let _cerebro = fleet.start_agent(
        "cerebro",
        "cerebro",
        &controller.addr,
        &jobs("cerebro", "\"backup\"", ""),
    );
    for host in ["hub-alfa", "prod-alfa", "cerebro"] {
        controller.wait_online(host);
    }

    let check =
        |body: &str| controller.grpcurl(Some(body), "sentinel.v1.FleetService/RunIsolationCheck");

    // The default layout leaks: every probe gets in.
    let report = check("{\"probe\": true}")
        .json()
        .expect("RunIsolationCheck with probes");
    assert_ne!(report["isolated"], true, "{report}");
    assert!(report["probedAt"].is_string(), "{report}");
    let found = probes(&report);
    // hub: 4 databases of dev and production; prod: 4 of dev and staging.
    let attempts: Vec<_> = found.iter().filter(|p| p.4).collect();
    assert_eq!(attempts.len(), 8, "{found:#?}");
    assert!(attempts.iter().all(|p| p.3), "{found:#?}");
    assert!(paths(&report).contains(
        &"probe from hub-alfa: s60_hub_user (staging) connected to s60_auth_prod (production)"
            .to_string()
    ));
    // The audit's 16 PUBLIC paths plus the 8 probes touch staging: 4 + 4 + 4 probe-proven.
    assert!(violations_of("staging").is_some_and(|v| v >= 8.0));
    let cerebro = found.iter().find(|p| p.0 == "cerebro").expect("cerebro");
    assert!(
        !cerebro.4 && cerebro.5.contains("not allowed"),
        "{cerebro:?}"
    );
    let argus = found.iter().find(|p| p.0 == "argus").expect("argus");
    assert!(!argus.4 && argus.5.contains("not connected"), "{argus:?}");

    // Closed: every probe is refused, with the server's reason.
    let applied = apply_fix(&pg, &fleet.path("sentinel.toml"));
    assert_eq!(applied.code, 0, "{}{}", applied.stdout, applied.stderr);
    // One hole left open on purpose: a direct grant to the staging user.
    pg.sql("GRANT CONNECT ON DATABASE s60_pulse_dev TO s60_hub_user");
    let report = check("{\"probe\": true}").json().unwrap();
    let found = probes(&report);
    let connected: Vec<_> = found.iter().filter(|p| p.3).collect();
    assert_eq!(connected.len(), 1, "{found:#?}");
    assert_eq!(
        (
            connected[0].0.as_str(),
            connected[0].1.as_str(),
            connected[0].2.as_str()
        ),
        ("hub-alfa", "s60_hub_user", "s60_pulse_dev")
    );
    let refused: Vec<_> = found.iter().filter(|p| p.4 && !p.3).collect();
    assert_eq!(refused.len(), 7, "{found:#?}");
    assert!(
        refused
            .iter()
            .all(|p| p.5.contains("permission denied for database")),
        "{refused:#?}"
    );
    assert_ne!(report["isolated"], true, "{report}");

    // After closing it the probes and the audit agree: isolated.
    pg.sql("REVOKE CONNECT ON DATABASE s60_pulse_dev FROM s60_hub_user");
    let report = check("{\"probe\": true}").json().unwrap();
    assert_eq!(report["isolated"], true, "{report}");
    assert!(probes(&report).iter().all(|p| !p.3));
    assert_eq!(violations_of("staging"), Some(0.0));
    assert_eq!(violations_of("production"), Some(0.0));
    // A check without probes carries the latest probe results forward.
    let plain = check("{}").json().unwrap();
    assert_eq!(plain["probedAt"], report["probedAt"]);

    // Probing from one host only: only it gets a job; the others' latest results stay in the
    // report. A host that is not a probe host is refused by name.
    let probe_jobs = |host: &str| {
        controller
            .grpcurl(
                Some(&format!("{{\"host\": \"{host}\"}}")),
                "sentinel.v1.FleetService/ListJobs",
            )
            .stdout
            .matches("JOB_KIND_ISOLATION_PROBE")
            .count()
    };
    let (hub_before, prod_before) = (probe_jobs("hub-alfa"), probe_jobs("prod-alfa"));
    let one = check("{\"probe\": true, \"hosts\": [\"prod-alfa\"]}")
        .json()
        .unwrap();
    assert_eq!(probe_jobs("hub-alfa"), hub_before);
    assert_eq!(probe_jobs("prod-alfa"), prod_before + 1);
    let from: Vec<String> = probes(&one).into_iter().map(|p| p.0).collect();
    assert!(from.iter().any(|h| h == "prod-alfa"), "{from:?}");
    assert!(from.iter().any(|h| h == "hub-alfa"), "{from:?}");
    let wrong = check("{\"probe\": true, \"hosts\": [\"web-9\"]}");
    assert!(
        !wrong.ok && wrong.stderr.contains("InvalidArgument") && wrong.stderr.contains("web-9"),
        "{}",
        wrong.stderr
    );

    // A login the server would take only over TLS is not evidence either way: the app may
    // connect encrypted. The probe (plaintext by default) says so instead of "refused".
    let hba = pg.dir().join("data").join("pg_hba.conf");
    let rules = fs::read_to_string(&hba).unwrap();
    fs::write(
        &hba,
        format!("hostnossl all s60_hub_user 127.0.0.1/32 reject\n{rules}"),
    )
    .unwrap();
    pg.sql("SELECT pg_reload_conf()");
    let tls_only = check("{\"probe\": true, \"hosts\": [\"hub-alfa\"]}")
        .json()
        .unwrap();
    let unprobed: Vec<_> = probes(&tls_only)
        .into_iter()
        .filter(|p| p.0 == "hub-alfa" && !p.4)
        .collect();
    assert_eq!(unprobed.len(), 4, "{unprobed:#?}");
    assert!(
        unprobed
            .iter()
            .all(|p| p.5.contains("accepts this login only encrypted")),
        "{unprobed:#?}"
    );
    fs::write(&hba, rules).unwrap();
    pg.sql("SELECT pg_reload_conf()");

    // The passwords stayed on the hosts.
    let log = controller.proc.log_text();
    for user in ["s60_hub_user", "s60_prod_user"] {
        assert!(
            !log.contains(&seed::password(user)),
            "{user}'s password in the log"
        );
    }
    let jobs = controller
        .grpcurl(
            Some("{\"host\": \"hub-alfa\"}"),
            "sentinel.v1.FleetService/ListJobs",
        )
        .stdout;
    assert!(jobs.contains("JOB_KIND_ISOLATION_PROBE"), "{jobs}");
    assert!(!jobs.contains(&seed::password("s60_hub_user")));
}

#[test]
fn a_probe_credential_that_cannot_work_stops_the_agent_at_start_naming_the_key() {
    let fleet = Fleet::new(&["hub-alfa"]);
    let config = fleet.write_agent_config(
        "hub-alfa",
        "hub-alfa",
        "127.0.0.1:1",
        "[[jobs.isolation_probe.credentials]]\nenvironment = \"staging\"\nuser = \"s60_hub_user\"\n",
    );
    let out = run(Command::new(bin("hostagent"))
        .arg("--check-config")
        .arg("--config")
        .arg(&config));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("jobs.isolation_probe.credentials[0].password_file"),
        "{stderr}"
    );
}

/// Builds `dbs` databases and `roles` roles in four environments, isolated, with every fifth
/// role a group role its environment's users are members of.
fn big_layout(pg: &Postgres, dbs: usize, roles: usize) -> String {
    let envs = 4;
    let mut sql = String::new();
    let mut policy = String::new();
    for e in 0..envs {
        let users: Vec<String> = (0..roles / envs)
            .filter(|j| j % 5 != 0)
            .map(|j| format!("bench_e{e}_u{j}"))
            .collect();
        let groups: Vec<String> = (0..roles / envs)
            .filter(|j| j % 5 == 0)
            .map(|j| format!("bench_e{e}_g{j}"))
            .collect();
        for g in &groups {
            sql.push_str(&format!("CREATE ROLE {g} NOLOGIN;\n"));
        }
        for (i, u) in users.iter().enumerate() {
            sql.push_str(&format!(
                "CREATE ROLE {u} LOGIN;\nGRANT {} TO {u};\n",
                groups[i % groups.len()]
            ));
        }
        let databases: Vec<String> = (0..dbs / envs)
            .map(|i| format!("bench_e{e}_db{i}"))
            .collect();
        for db in &databases {
            sql.push_str(&format!(
                "CREATE DATABASE {db} OWNER {} STRATEGY FILE_COPY;\nREVOKE CONNECT ON DATABASE {db} FROM PUBLIC;\nGRANT CONNECT ON DATABASE {db} TO {};\n",
                users[0],
                groups.join(", ")
            ));
        }
        let quoted = |v: &[String]| {
            v.iter()
                .map(|s| format!("\"{s}\""))
                .collect::<Vec<_>>()
                .join(", ")
        };
        policy.push_str(&format!(
            "\n[isolation.environments.env{e}]\ndatabases = [{}]\nusers = [{}]\n",
            quoted(&databases),
            quoted(
                &users
                    .iter()
                    .chain(groups.iter())
                    .cloned()
                    .collect::<Vec<_>>()
            )
        ));
    }
    pg.sql(&sql);
    policy
}

/// Runs `check --json` a few times; returns the in-process durations (connect, catalog, audit)
/// and the wall-clock times of the whole process, sorted.
fn time_checks(config: &Path, runs: usize) -> (Vec<Duration>, Vec<Duration>, Value) {
    let mut inside = Vec::new();
    let mut wall = Vec::new();
    let mut last = Value::Null;
    for _ in 0..runs {
        let started = Instant::now();
        let check = isolation_cli(config, &["check", "--json"]);
        wall.push(started.elapsed());
        assert!(check.code < 2, "{}{}", check.stdout, check.stderr);
        last = check.json();
        inside.push(Duration::from_micros(
            // uint64 is a string in proto3 JSON.
            last["durationMicros"]
                .as_str()
                .and_then(|d| d.parse().ok())
                .unwrap_or(0),
        ));
    }
    inside.sort();
    wall.sort();
    (inside, wall, last)
}

#[test]
#[ignore = "benchmark: see the module doc for the command"]
fn isolation_audit_benchmark() {
    const RUNS: usize = 7;
    let (pg, config) = layout(&seed::password(seed::AUDITOR));
    let (inside, wall, report) = time_checks(&config, RUNS);
    println!(
        "seed layout ({} violations): audit median {:?} (min {:?}, max {:?}); whole process median {:?}",
        paths(&report).len(),
        inside[RUNS / 2],
        inside[0],
        inside[RUNS - 1],
        wall[RUNS / 2]
    );

    let big = Postgres::start();
    big.sql(&format!(
        "CREATE ROLE {} LOGIN PASSWORD '{}';",
        seed::AUDITOR,
        seed::password(seed::AUDITOR)
    ));
    let built = Instant::now();
    let environments = big_layout(&big, 200, 400);
    println!("built 200 databases and 400 roles in {:?}", built.elapsed());
    let policy = seed::policy_toml(&big, &seed::password(seed::AUDITOR), "1h");
    let policy = policy[..policy
        .find("\n[isolation.environments.")
        .expect("environments in the policy")]
        .to_string()
        + &environments;
    let config = write_config(
        &big,
        &policy.replace(&format!("\"{}\"", seed::BACKUP_ROLE), ""),
    );
    let (inside, wall, report) = time_checks(&config, RUNS);
    assert_eq!(report["isolated"], true, "{}", report);
    println!(
        "200 databases, 400 roles: audit median {:?} (min {:?}, max {:?}); whole process median {:?}",
        inside[RUNS / 2],
        inside[0],
        inside[RUNS - 1],
        wall[RUNS / 2]
    );
    assert!(
        inside[RUNS / 2] < Duration::from_secs(1),
        "the target is under 1 s"
    );
    drop(pg);
}
