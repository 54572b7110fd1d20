//! The deploy executor against real Docker and real Compose: `deploy()` and `rollback()`
//! called directly, their events drained from an outbox and checked, the fixture app's HTTP
//! answers and the on-host layout inspected after every step.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use hostagent::jobs::events::{JobError, JobEvents, Outbox};
use hostagent::jobs::{deploy, release};
use sentinel_daemon::http;
use sentinel_e2e::fixture::{Bundle, FixtureApp, Variant, SECRET};
use sentinel_e2e::job_events::Sent;
use sentinel_proto::v1::{DeployParams, HealthCheck, RollbackParams, StepStatus};

/// A test's app and the events of its jobs.
struct World {
    app: FixtureApp,
    outbox: Outbox,
    keep_releases: u32,
}

impl World {
    fn new(tag: &str) -> Self {
        assert!(
            sentinel_e2e::docker::available(),
            "these tests need a Docker daemon"
        );
        Self {
            app: FixtureApp::new(tag),
            outbox: Outbox::default(),
            keep_releases: 5,
        }
    }

    fn app_dir(&self) -> std::path::PathBuf {
        self.app.app_dir()
    }

    fn health(&self, deadline_ms: u32) -> HealthCheck {
        HealthCheck {
            http_url: self.app.health_url(),
            expect_status: 200,
            interval_ms: 200,
            timeout_ms: 2000,
            deadline_ms,
            container_health: true,
        }
    }

    fn events(&self) -> JobEvents {
        JobEvents::new("job", self.outbox.clone(), 0)
    }

    fn params(&self, version: &str, bundle: &Bundle, health: HealthCheck) -> DeployParams {
        DeployParams {
            app: "shop".into(),
            environment: "staging".into(),
            commit: version.into(),
            bundle_sha256: bundle.sha256.clone(),
            bundle_size: bundle.size,
            app_dir: self.app_dir().display().to_string(),
            compose_file: "docker-compose.yml".into(),
            health: Some(health),
            keep_releases: self.keep_releases,
            deploy_id: format!("deploy-{version}"),
            compose_project: self.app.project.clone(),
            migration: String::new(),
            migration_service: String::new(),
            build: true,
            not_secret: Vec::new(),
            blue_green: None,
        }
    }

    async fn deploy_with(
        &self,
        params: DeployParams,
        bundle: &Bundle,
    ) -> (Result<String, JobError>, Sent) {
        let result = deploy::deploy(&params, &bundle.path, &self.events()).await;
        let sent = Sent::new(self.outbox.drain());
        sent.assert_no_secret();
        (result, sent)
    }

    async fn deploy(&self, version: &str, variant: Variant) -> (Result<String, JobError>, Sent) {
        let bundle = self.app.bundle(version, variant);
        let deadline = if variant == Variant::Healthy {
            patience_ms()
        } else {
            // Failing releases only need to fail; keep the wait short.
            4000
        };
        let params = self.params(version, &bundle, self.health(deadline));
        self.deploy_with(params, &bundle).await
    }

    async fn rollback(&self, to: &str) -> (Result<String, JobError>, Sent) {
        let params = RollbackParams {
            app: "shop".into(),
            environment: "staging".into(),
            app_dir: self.app_dir().display().to_string(),
            to_commit: to.into(),
            compose_file: "docker-compose.yml".into(),
            health: Some(self.health(patience_ms())),
            deploy_id: format!("rollback-to-{to}"),
            compose_project: self.app.project.clone(),
            not_secret: Vec::new(),
            blue_green: None,
        };
        let result = deploy::rollback(&params, &self.events()).await;
        let sent = Sent::new(self.outbox.drain());
        sent.assert_no_secret();
        (result, sent)
    }

    /// The body the app serves at /health now.
    async fn serving(&self) -> String {
        match http::request("GET", &self.app.health_url(), None, Duration::from_secs(5)).await {
            Ok(r) if r.status == 200 => r.body.trim().to_string(),
            Ok(r) => format!("status {}", r.status),
            Err(e) => e.to_string(),
        }
    }

    fn current(&self) -> Option<String> {
        release::current_release(&self.app_dir())
    }

    fn releases(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(self.app_dir().join("releases"))
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
    }

    fn audit_log(&self) -> String {
        std::fs::read_to_string(self.app_dir().join(release::AUDIT_LOG)).unwrap_or_default()
    }
}

fn patience_ms() -> u32 {
    u32::try_from(sentinel_e2e::patience().as_millis()).unwrap_or(30_000)
}

fn ok(result: Result<String, JobError>, sent: &Sent) -> String {
    match result {
        Ok(summary) => summary,
        Err(e) => panic!("job failed: {e}\nevents: {:#?}", sent.logs()),
    }
}

#[tokio::test]
async fn releases_roll_forward_roll_back_on_failed_health_and_roll_back_by_hand() {
    let w = World::new("chain");

    // First release: healthy, and it is the current one.
    let started = Instant::now();
    let (result, sent) = w.deploy("v1", Variant::Healthy).await;
    let summary = ok(result, &sent);
    eprintln!(
        "first deploy (cold build) took {:?}: {summary}",
        started.elapsed()
    );
    eprintln!("  steps: {}", sent.durations());
    assert_eq!(w.serving().await, "ok version v1");
    assert_eq!(w.current().as_deref(), Some("v1"));
    for step in ["unpack", "switch", "build", "down", "up", "health", "prune"] {
        assert_eq!(sent.step(step), Some(StepStatus::Succeeded), "{step}");
    }
    assert_eq!(sent.step("migrate"), Some(StepStatus::Skipped));
    let env = w.app_dir().join("releases/v1/.env");
    let mode = std::fs::metadata(&env).map(|m| m.permissions().mode() & 0o777);
    assert_eq!(mode.ok(), Some(0o600), "{}", env.display());

    // Second release with a migration that prints the secret: still masked everywhere.
    let bundle = w.app.bundle("v2", Variant::Healthy);
    let mut params = w.params("v2", &bundle, w.health(patience_ms()));
    params.migration = "echo migrating with password $DB_PASSWORD".into();
    params.migration_service = "web".into();
    let started = Instant::now();
    let (result, sent) = w.deploy_with(params, &bundle).await;
    let summary = ok(result, &sent);
    eprintln!(
        "second deploy (warm build) took {:?}: {summary}",
        started.elapsed()
    );
    eprintln!("  steps: {}", sent.durations());
    assert_eq!(sent.step("migrate"), Some(StepStatus::Succeeded));
    assert!(
        sent.logs()
            .iter()
            .any(|(_, l)| l == "migrating with password ***"),
        "{:#?}",
        sent.logs()
    );
    assert_eq!(w.serving().await, "ok version v2");
    assert_eq!(w.current().as_deref(), Some("v2"));
    assert_eq!(
        release::previous_release(&w.app_dir()).as_deref(),
        Some("v1")
    );
    assert_eq!(w.releases(), ["v1", "v2"]);

    // Third release never gets healthy: back to v2 on its own.
    let (result, sent) = w.deploy("v3", Variant::Unhealthy).await;
    let error = result.expect_err("an unhealthy release fails").to_string();
    eprintln!("unhealthy release: {error}\n{}", sent.transcript());
    assert!(error.starts_with("health check failed: "), "{error}");
    assert!(error.contains(&w.app.health_url()), "{error}");
    assert!(error.contains("answered 404"), "{error}");
    assert!(
        error.contains("rolled back to v2, healthy again"),
        "{error}"
    );
    assert_eq!(sent.step("health"), Some(StepStatus::Failed));
    assert_eq!(sent.step("rollback"), Some(StepStatus::Succeeded));
    assert_eq!(sent.step("rollback-health"), Some(StepStatus::Succeeded));
    // The failing container's own log lines reach the operator, secret masked.
    let container_lines: Vec<String> = sent
        .logs()
        .into_iter()
        .filter(|(s, _)| s.starts_with("container:"))
        .map(|(_, l)| l)
        .collect();
    assert!(
        container_lines
            .iter()
            .any(|l| l.contains("app v3 starting with DB_PASSWORD=***")),
        "{container_lines:#?}"
    );
    assert_eq!(w.serving().await, "ok version v2");
    assert_eq!(w.current().as_deref(), Some("v2"));

    // By hand: back to the release before v2, then forward to v2 by name.
    let (result, sent) = w.rollback("").await;
    ok(result, &sent);
    assert_eq!(w.serving().await, "ok version v1");
    assert_eq!(w.current().as_deref(), Some("v1"));
    let (result, sent) = w.rollback("v2").await;
    ok(result, &sent);
    assert_eq!(w.serving().await, "ok version v2");
    assert_eq!(w.current().as_deref(), Some("v2"));
    let (result, _) = w.rollback("v9").await;
    let error = result.expect_err("unknown release").to_string();
    assert!(
        error.contains("release v9 is not on this host (have: v1, v2, v3)"),
        "{error}"
    );

    let audit = w.audit_log();
    assert!(!audit.contains(SECRET), "{audit}");
    assert!(
        audit.contains(
            "deploy_id=deploy-v3 app=shop env=staging commit=v3 step=health outcome=failed"
        ),
        "{audit}"
    );
    assert!(
        audit.contains(
            "deploy_id=deploy-v3 app=shop env=staging commit=v2 step=rollback outcome=succeeded"
        ),
        "{audit}"
    );
}

#[tokio::test]
async fn failed_build_leaves_the_previous_release_serving_and_old_releases_are_pruned() {
    let mut w = World::new("build");
    w.keep_releases = 2;
    let (result, sent) = w.deploy("v1", Variant::Healthy).await;
    ok(result, &sent);
    let (result, sent) = w.deploy("v2", Variant::Healthy).await;
    ok(result, &sent);
    let containers = w.app.container_ids();
    assert_eq!(containers.len(), 1, "{containers:?}");

    let (result, sent) = w.deploy("v3", Variant::BuildFails).await;
    let error = result.expect_err("a failed build fails").to_string();
    assert!(error.starts_with("build failed: "), "{error}");
    assert!(error.contains("exited with code"), "{error}");
    assert!(error.contains("error: assets failed to compile"), "{error}");
    assert!(
        error.contains("rolled back to v2 (its containers were never stopped)"),
        "{error}"
    );
    assert_eq!(sent.step("build"), Some(StepStatus::Failed));
    assert_eq!(sent.step("down"), None, "nothing was stopped");
    // The very same container still serves; current points back to it.
    assert_eq!(w.app.container_ids(), containers);
    assert_eq!(w.serving().await, "ok version v2");
    assert_eq!(w.current().as_deref(), Some("v2"));
    assert_eq!(
        release::previous_release(&w.app_dir()).as_deref(),
        Some("v1")
    );

    // keep_releases = 2: v4 and v2 stay; v1 and the failed v3 go.
    let (result, sent) = w.deploy("v4", Variant::Healthy).await;
    let summary = ok(result, &sent);
    assert_eq!(w.serving().await, "ok version v4");
    assert_eq!(w.releases(), ["v2", "v4"], "{summary}");
    assert!(summary.contains("pruned"), "{summary}");
}

#[tokio::test]
async fn first_deploy_that_exits_says_there_is_nothing_to_roll_back_to() {
    let w = World::new("exits");
    let started = Instant::now();
    let (result, sent) = w.deploy("v1", Variant::Exits).await;
    let error = result.expect_err("a crashing release fails").to_string();
    assert!(
        error.contains("a container exited and will not be restarted"),
        "{error}"
    );
    assert!(error.contains("exited with code 1"), "{error}");
    assert!(
        error.contains("no previous release to roll back to"),
        "{error}"
    );
    // The exit is noticed at once, not at the end of the deadline.
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(
        w.current(),
        None,
        "nothing is current after a failed first deploy"
    );
    assert!(
        sent.logs()
            .iter()
            .any(|(s, l)| s.starts_with("container:") && l == "fatal: cannot reach the database"),
        "{:#?}",
        sent.logs()
    );
    assert!(
        sent.logs()
            .iter()
            .any(|(_, l)| l.contains("starting with DB_PASSWORD=***")),
        "{:#?}",
        sent.logs()
    );
    assert!(!w.audit_log().contains(SECRET));
}

/// Writes a gzipped tar with one raw entry whose name is taken as is (the tar crate's
/// builder refuses `..` and absolute names, which is the point of this test).
fn raw_bundle(dir: &Path, name: &str, entry: &str, kind: tar::EntryType, link: &str) -> Bundle {
    use sha2::Digest;
    let path = dir.join(name);
    let file = std::fs::File::create(&path).expect("create");
    let mut builder = tar::Builder::new(flate2::write::GzEncoder::new(
        file,
        flate2::Compression::fast(),
    ));
    let data = b"pwned\n";
    let mut header = tar::Header::new_old();
    {
        let old = header.as_old_mut();
        old.name[..entry.len()].copy_from_slice(entry.as_bytes());
        old.linkname[..link.len()].copy_from_slice(link.as_bytes());
    }
    header.set_entry_type(kind);
    header.set_mode(0o644);
    header.set_size(if kind == tar::EntryType::Regular {
        data.len() as u64
    } else {
        0
    });
    header.set_cksum();
    if kind == tar::EntryType::Regular {
        builder.append(&header, &data[..]).expect("append");
    } else {
        builder.append(&header, std::io::empty()).expect("append");
    }
    builder
        .into_inner()
        .and_then(|gz| gz.finish())
        .expect("finish");
    let bytes = std::fs::read(&path).expect("read");
    Bundle {
        path,
        sha256: hex::encode(sha2::Sha256::digest(&bytes)),
        size: bytes.len() as u64,
    }
}

#[tokio::test]
async fn bad_bundles_are_refused_and_nothing_is_switched() {
    // No Docker needed: every refusal happens before Compose runs.
    let app = FixtureApp::new("bad");
    let w = World {
        app,
        outbox: Outbox::default(),
        keep_releases: 5,
    };
    let app_dir = w.app_dir();
    // A live release to stay live.
    let good = w.app.bundle("v1", Variant::Healthy);
    release::unpack_bundle(&good.path, &app_dir, "v1", &w.events()).expect("unpack v1");
    release::switch_current(&app_dir, "v1").expect("switch v1");
    let scratch = tempfile::tempdir().expect("tempdir");
    let outside = scratch.path().join("outside");

    let not_gzip = scratch.path().join("not-gzip.tar.gz");
    std::fs::write(&not_gzip, b"this is not a bundle").expect("write");
    let not_gzip = Bundle {
        sha256: hex::encode(<sha2::Sha256 as sha2::Digest>::digest(
            b"this is not a bundle",
        )),
        size: 20,
        path: not_gzip,
    };
    let escape = format!("../../../../../../../..{}", outside.display());
    let cases = [
        (not_gzip, "is not a readable gzipped tar"),
        (
            raw_bundle(
                scratch.path(),
                "dotdot.tar.gz",
                &escape,
                tar::EntryType::Regular,
                "",
            ),
            "its path contains `..`",
        ),
        (
            raw_bundle(
                scratch.path(),
                "abs.tar.gz",
                &outside.display().to_string(),
                tar::EntryType::Regular,
                "",
            ),
            "its path is absolute",
        ),
        (
            raw_bundle(
                scratch.path(),
                "link.tar.gz",
                "evil",
                tar::EntryType::Symlink,
                "/etc",
            ),
            "leaves the release",
        ),
        (
            raw_bundle(
                scratch.path(),
                "hard.tar.gz",
                "hard",
                tar::EntryType::Link,
                "/etc/passwd",
            ),
            "hard links are not supported",
        ),
    ];
    for (i, (bundle, expected)) in cases.iter().enumerate() {
        let commit = format!("bad{i}");
        let params = w.params(&commit, bundle, w.health(1000));
        let (result, sent) = w.deploy_with(params, bundle).await;
        let error = result.expect_err("a bad bundle is refused").to_string();
        assert!(error.contains(expected), "case {i}: {error}");
        assert_eq!(sent.step("unpack"), Some(StepStatus::Failed), "case {i}");
        assert_eq!(sent.step("switch"), None, "case {i}");
        assert_eq!(w.current().as_deref(), Some("v1"), "case {i}");
        assert_eq!(
            w.releases(),
            ["v1"],
            "case {i}: no release dir, no leftovers"
        );
        assert!(!outside.exists(), "case {i}: wrote outside the app dir");
    }
    let audit = w.audit_log();
    assert!(
        audit.contains(
            "deploy_id=deploy-bad1 app=shop env=staging commit=bad1 step=unpack outcome=failed"
        ),
        "{audit}"
    );

    // A bundle that is not the one the job signed.
    let mut params = w.params("v2", &good, w.health(1000));
    params.bundle_sha256 = "0".repeat(64);
    let (result, _) = w.deploy_with(params, &good).await;
    let error = result.expect_err("hash mismatch").to_string();
    assert!(error.contains("but the job says 0000"), "{error}");

    // Parameters a job must never carry.
    for (field, value, expected) in [
        ("app_dir", "relative/app", "must be an absolute path"),
        (
            "compose_file",
            "../docker-compose.yml",
            "must be a relative path inside the release",
        ),
        ("compose_project", "", "compose_project \"\" must be"),
        ("commit", "../v2", "invalid commit"),
    ] {
        let mut params = w.params("v2", &good, w.health(1000));
        match field {
            "app_dir" => params.app_dir = value.into(),
            "compose_file" => params.compose_file = value.into(),
            "compose_project" => params.compose_project = value.into(),
            _ => params.commit = value.into(),
        }
        let (result, _) = w.deploy_with(params, &good).await;
        let error = result.expect_err(field).to_string();
        assert!(error.contains(expected), "{field}: {error}");
    }
    assert_eq!(w.current().as_deref(), Some("v1"));
}
