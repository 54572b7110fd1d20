//! The PostgreSQL roles collector: every role of a cluster with its attributes and memberships
//! (direct and transitive), and per database its owner and who holds CONNECT, CREATE and
//! TEMPORARY (PUBLIC included), read with `sentinel_postgres`.
//!
//! The collector opens a fresh connection for every run and closes it: a managed cluster has few
//! connection slots, and a report every 15 s does not justify holding one forever (and a rotated
//! `dsn_file` or `password_file` is picked up on the next run).

use sentinel_postgres::{
    connect, read_catalog, PgClientConfig, PgError, COLLECTOR_APPLICATION_NAME,
};
use sentinel_proto::v1::PostgresState;

use super::CollectorError;

/// Reads roles, memberships and database privileges of the cluster its DSN points to.
pub struct PostgresCollector {
    config: PgClientConfig,
}

impl PostgresCollector {
    /// A collector for `config`. Does no I/O: a bad DSN file or an unreachable server shows up
    /// in [`collect`](Self::collect).
    pub fn new(config: PgClientConfig) -> Self {
        Self { config }
    }

    /// Connects, reads the catalog, disconnects.
    pub async fn collect(&mut self) -> Result<PostgresState, CollectorError> {
        let failed = |e: PgError| CollectorError::Failed {
            what: "postgres".into(),
            message: e.to_string(),
        };
        let mut connection = connect(&self.config, COLLECTOR_APPLICATION_NAME)
            .await
            .map_err(failed)?;
        let catalog = read_catalog(&mut connection, self.config.timeout)
            .await
            .map_err(failed)?;
        Ok(catalog.to_state())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_unreachable_server_is_a_prompt_error_naming_the_target() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        drop(listener);
        let mut collector = PostgresCollector::new(PgClientConfig {
            dsn: Some(format!(
                "host=127.0.0.1 port={port} user=watcher password=hunter2 dbname=postgres"
            )),
            ..Default::default()
        });
        let err = collector.collect().await.unwrap_err().to_string();
        assert!(
            err.contains(&format!("watcher@127.0.0.1:{port}/postgres")),
            "{err}"
        );
        assert!(!err.contains("hunter2"), "{err}");
    }

    #[tokio::test]
    async fn a_missing_dsn_file_is_named() {
        let mut collector = PostgresCollector::new(PgClientConfig {
            dsn_file: Some("/nonexistent/sentinel.dsn".into()),
            ..Default::default()
        });
        let err = collector.collect().await.unwrap_err().to_string();
        assert!(err.contains("dsn_file /nonexistent/sentinel.dsn"), "{err}");
    }
}
