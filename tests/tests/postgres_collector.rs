//! The PostgreSQL collector against a real throwaway cluster: role attributes, direct and
//! transitive memberships, per-database owner and CONNECT/CREATE/TEMPORARY grants (PUBLIC
//! included), and errors that name the target without the password.

use std::time::{Duration, UNIX_EPOCH};

use hostagent::collectors::postgres::PostgresCollector;
use hostagent::collectors::Collectors;
use hostagent::config::{CollectorsConfig, PostgresCollectorConfig};
use sentinel_e2e::postgres::Postgres;
use sentinel_postgres::PgClientConfig;
use sentinel_proto::v1::{postgres_section, PgDatabase, PgDatabaseGrant, PgRole, PostgresState};

const SETUP: &str = "
CREATE ROLE watcher LOGIN PASSWORD 'watcher-Pw-1';
CREATE ROLE app_user LOGIN CONNECTION LIMIT 5 VALID UNTIL '2030-01-01 00:00:00+00' PASSWORD 'x';
CREATE ROLE grp_a NOLOGIN;
CREATE ROLE grp_b NOLOGIN;
CREATE ROLE loose NOINHERIT LOGIN;
CREATE ROLE mighty SUPERUSER CREATEROLE CREATEDB BYPASSRLS NOLOGIN;
GRANT grp_b TO grp_a;
GRANT grp_a TO app_user;
GRANT grp_b TO loose;
CREATE DATABASE shop OWNER app_user;
REVOKE CONNECT ON DATABASE shop FROM PUBLIC;
GRANT CONNECT, CREATE ON DATABASE shop TO grp_b;
CREATE DATABASE open_house OWNER app_user;
";

fn role<'a>(state: &'a PostgresState, name: &str) -> &'a PgRole {
    state
        .roles
        .iter()
        .find(|r| r.name == name)
        .unwrap_or_else(|| panic!("no role {name} in {:?}", state.roles))
}

fn database<'a>(state: &'a PostgresState, name: &str) -> &'a PgDatabase {
    state
        .databases
        .iter()
        .find(|d| d.name == name)
        .unwrap_or_else(|| panic!("no database {name}"))
}

fn grant<'a>(db: &'a PgDatabase, grantee: &str) -> Option<&'a PgDatabaseGrant> {
    db.grants.iter().find(|g| g.grantee == grantee)
}

fn watcher_config(pg: &Postgres, password: &str) -> PgClientConfig {
    let dsn_file = pg.dir().join("watcher.dsn");
    let password_file = pg.dir().join(format!("watcher-{password}.password"));
    std::fs::write(&dsn_file, pg.dsn_without_password("watcher", "postgres")).unwrap();
    std::fs::write(&password_file, format!("{password}\n")).unwrap();
    PgClientConfig {
        dsn_file: Some(dsn_file),
        password_file: Some(password_file),
        connect_timeout: Duration::from_secs(5),
        timeout: Duration::from_secs(10),
        ..Default::default()
    }
}

#[tokio::test]
async fn the_collector_reports_roles_memberships_and_database_grants() {
    let pg = Postgres::start();
    pg.sql(SETUP);
    let mut collector = PostgresCollector::new(watcher_config(&pg, "watcher-Pw-1"));
    let state = collector.collect().await.expect("collecting");

    assert!(
        state.server_version.starts_with(char::is_numeric),
        "{}",
        state.server_version
    );
    assert!(
        state.roles.iter().all(|r| !r.name.starts_with("pg_")),
        "predefined roles are left out"
    );

    let app = role(&state, "app_user");
    assert!(app.login && app.inherit && !app.superuser);
    assert_eq!(app.connection_limit, 5);
    let expires = app.password_expires.as_ref().expect("a password expiry");
    assert_eq!(
        sentinel_proto::time::system_time(expires),
        UNIX_EPOCH + Duration::from_secs(1_893_456_000)
    );
    assert_eq!(app.member_of, ["grp_a"]);
    assert_eq!(app.member_of_transitive, ["grp_a", "grp_b"]);

    let loose = role(&state, "loose");
    assert!(!loose.inherit);
    assert_eq!(loose.member_of, ["grp_b"]);

    let mighty = role(&state, "mighty");
    assert!(mighty.superuser && mighty.createrole && mighty.createdb && mighty.bypassrls);
    assert!(!mighty.login);
    assert_eq!(mighty.connection_limit, -1);
    assert!(mighty.password_expires.is_none());

    let shop = database(&state, "shop");
    assert_eq!(shop.owner, "app_user");
    let public = grant(shop, "PUBLIC").expect("PUBLIC keeps TEMPORARY");
    assert!(!public.connect && public.temporary && !public.create);
    let grp_b = grant(shop, "grp_b").expect("grp_b's grant");
    assert!(grp_b.connect && grp_b.create && !grp_b.temporary);
    let owner = grant(shop, "app_user").expect("the owner's grant");
    assert!(owner.connect && owner.create && owner.temporary);

    // A database nobody touched has the built-in default ACL: PUBLIC may connect.
    let open = database(&state, "open_house");
    let public = grant(open, "PUBLIC").expect("the default PUBLIC grant");
    assert!(public.connect && public.temporary && !public.create);
}

#[tokio::test]
async fn a_wrong_password_is_an_error_in_the_postgres_section_only() {
    let pg = Postgres::start();
    pg.sql(SETUP);
    let client = watcher_config(&pg, "not-the-Password");
    let config = CollectorsConfig {
        system: true,
        docker: false,
        postgres: PostgresCollectorConfig {
            enabled: true,
            dsn: None,
            dsn_file: client.dsn_file.clone(),
            password_file: client.password_file.clone(),
            connect_timeout: client.connect_timeout,
            timeout: client.timeout,
        },
        ..CollectorsConfig::default()
    };
    let mut collectors = Collectors::new(&config);
    assert!(collectors
        .capabilities()
        .contains(&"collector.postgres".to_string()));
    let state = collectors.collect().await;
    let section = state.postgres.expect("a postgres section");
    let Some(postgres_section::Result::Error(error)) = section.result else {
        panic!("expected an error, got {:?}", section.result);
    };
    assert!(
        error.contains("password authentication failed for user \"watcher\""),
        "{error}"
    );
    assert!(
        error.contains(&format!("watcher@127.0.0.1:{}/postgres", pg.port)),
        "{error}"
    );
    assert!(!error.contains("not-the-Password"), "{error}");
    // The other collectors keep flowing.
    assert!(matches!(
        state.system.and_then(|s| s.result),
        Some(sentinel_proto::v1::system_section::Result::State(_))
    ));

    // Fixing the secret file is picked up by the next run, no restart needed.
    std::fs::write(client.password_file.as_ref().unwrap(), "watcher-Pw-1\n").unwrap();
    let state = collectors.collect().await;
    assert!(matches!(
        state.postgres.and_then(|s| s.result),
        Some(postgres_section::Result::State(_))
    ));
}
