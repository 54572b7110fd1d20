//! The deploy pipeline end to end: a git repository of a fixture app, a controller, two agents
//! (staging `hub-alfa`, production `prod-alfa`) with their own certificates and app dirs, real
//! Docker and compose, the operator CLI and grpcurl.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::process::Command;
use std::sync::{Arc, Mutex};

use sentinel_e2e::fixture::{served, FixtureApp, ReleaseRepo as Repo, Variant, SECRET};
use sentinel_e2e::{
    bin, eventually, eventually_within, ports, run, Controller, Fleet, Proc, Value,
};

/// Receives webhook POSTs and keeps their bodies.
fn webhook_receiver() -> (String, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/relay", listener.local_addr().unwrap());
    let bodies = Arc::new(Mutex::new(Vec::new()));
    let keep = bodies.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let mut stream = stream;
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            loop {
                let n = stream.read(&mut chunk).unwrap_or(0);
                if n == 0 {
                    break;
                }
                buf.extend_from_slice(&chunk[..n]);
                let text = String::from_utf8_lossy(&buf).to_string();
                if let Some(split) = text.find("\r\n\r\n") {
                    let len = text[..split]
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase()
                                .strip_prefix("content-length:")
                                .map(|v| v.trim().parse::<usize>().unwrap_or(0))
                        })
                        .unwrap_or(0);
                    if buf.len() >= split + 4 + len {
                        keep.lock().unwrap().push(text[split + 4..].to_string());
                        break;
                    }
                }
            }
            let _ = stream
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok");
        }
    });
    (url, bodies)
}

struct Setup {
    controller: Controller,
    controller_extra: String,
    _agents: Vec<Proc>,
    app: FixtureApp,
    repo: Repo,
    name: String,
    staging_port: u16,
    production_port: u16,
    /// Docker binds them only while a release runs: reserved for the whole test.
    _app_ports: [ports::Port; 2],
    webhook: Arc<Mutex<Vec<String>>>,
    // Last: the processes' logs live in its temp dir and are printed when a test fails.
    fleet: Fleet,
}

impl Drop for Setup {
    fn drop(&mut self) {
        for env in ["staging", "production"] {
            let project = format!("{}-{env}", self.name);
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

fn setup(tag: &str) -> Setup {
    let fleet = Fleet::new(&["hub-alfa", "prod-alfa"]);
    let app = FixtureApp::new(tag);
    let name = app.project.clone();
    let repo = Repo::new(fleet.path("repo"));
    let app_ports = [ports::reserve(), ports::reserve()];
    let (staging_port, production_port) = (app_ports[0].get(), app_ports[1].get());
    for (env, port) in [("staging", staging_port), ("production", production_port)] {
        std::fs::write(
            fleet.path(&format!("{env}.env")),
            format!("DB_PASSWORD={SECRET}\nPORT={port}\n"),
        )
        .unwrap();
    }
    let (hook_url, webhook) = webhook_receiver();
    let c = fleet.certs.display();
    let env_block = |env: &str, host: &str, port: u16| {
        format!(
            "[apps.{env}]\nhost = \"{host}\"\napp_dir = \"{dir}\"\nsecrets_file = \"{secrets}\"\nbase_url = \"http://127.0.0.1:{port}\"\n[apps.{env}.health]\nurl = \"http://127.0.0.1:{port}/health\"\ndeadline = \"20s\"\ncontainer_health = true\n",
            dir = fleet.path(&format!("apps-{host}/{name}")).display(),
            secrets = fleet.path(&format!("{env}.env")).display(),
        )
    };
    let extra = format!(
        "[signing]\nkey = \"{c}/signing.key\"\n\n[pipeline]\nwebhook_attempts = 2\n[[pipeline.webhooks]]\nname = \"relay\"\nurl = \"{hook_url}\"\n\n[[apps]]\nname = \"{name}\"\nrepo = \"{repo}\"\n{staging}{production}\n[[apps.e2e]]\nname = \"home page\"\npath = \"/\"\nexpect_body = \"fixture\"\nsmoke = true\n[[apps.e2e]]\nname = \"health\"\npath = \"/health\"\nexpect_body = \"ok version\"\n",
        repo = repo.dir.display(),
        staging = env_block("staging", "hub-alfa", staging_port),
        production = env_block("production", "prod-alfa", production_port),
    );
    let controller = fleet.start_controller(&extra);
    let mut agents = Vec::new();
    for host in ["hub-alfa", "prod-alfa"] {
        let jobs = format!(
            "[jobs]\nstate_dir = \"{state}\"\ntrusted_keys = [\"{c}/signing.pub\"]\nallowed_kinds = [\"deploy\", \"rollback\"]\napp_dirs = [\"{apps}\"]\n",
            state = fleet.path(&format!("state-{host}")).display(),
            apps = fleet.path(&format!("apps-{host}")).display(),
        );
        agents.push(fleet.start_agent(
            host,
            host,
            &controller.addr,
            &format!("[collectors]\ndocker = false\n{jobs}"),
        ));
    }
    controller.wait_online("hub-alfa");
    controller.wait_online("prod-alfa");
    Setup {
        fleet,
        controller,
        controller_extra: extra,
        _agents: agents,
        app,
        repo,
        name,
        staging_port,
        production_port,
        _app_ports: app_ports,
        webhook,
    }
}

/// `sentinel deploy … --wait` as the operator runs it; returns (exit code, output).
fn cli_deploy(s: &Setup, commit: &str) -> (i32, String) {
    let c = &s.fleet.certs;
    let out = run(Command::new(bin("sentinel"))
        .args([
            "deploy",
            &s.name,
            "--commit",
            commit,
            "--e2e",
            "standard",
            "--wait",
            "--controller",
            &s.controller.addr,
        ])
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
    (out.status.code().unwrap_or(-1), text)
}

fn latest_deploy(s: &Setup) -> Value {
    let list = s
        .controller
        .grpcurl(
            Some(&format!("{{\"app\":\"{}\",\"limit\":1}}", s.name)),
            "sentinel.v1.FleetService/ListDeploys",
        )
        .json()
        .unwrap();
    list["deployments"][0].clone()
}

fn assert_no_secret_anywhere(s: &Setup) {
    for entry in std::fs::read_dir(s.fleet.dir.path()).unwrap().flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        if name.ends_with(".log") {
            let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
            assert!(!text.contains(SECRET), "secret found in {name}");
        }
    }
    let jobs = s
        .controller
        .grpcurl(Some("{\"limit\":100}"), "sentinel.v1.FleetService/ListJobs")
        .json()
        .unwrap();
    for job in jobs["jobs"].as_array().cloned().unwrap_or_default() {
        let id = job["jobId"].as_str().unwrap().to_string();
        let full = s.controller.grpcurl(
            Some(&format!("{{\"job_id\":\"{id}\"}}")),
            "sentinel.v1.FleetService/GetJob",
        );
        assert!(full.ok, "{}", full.stderr);
        assert!(
            !full.stdout.contains(SECRET),
            "secret in the events of job {id}"
        );
    }
    for host in ["hub-alfa", "prod-alfa"] {
        let audit = s.fleet.path(&format!("apps-{host}/{}/audit.log", s.name));
        let text = std::fs::read_to_string(&audit).unwrap_or_default();
        assert!(!text.contains(SECRET), "secret in {}", audit.display());
    }
}

#[test]
fn a_release_goes_through_staging_e2e_and_production_and_failures_never_reach_production() {
    let s = setup("pipe");
    let v1 = s.repo.commit(&s.app, "v1", Variant::Healthy, |_| {});
    let v2 = s.repo.commit(&s.app, "v2", Variant::Healthy, |_| {});
    let unhealthy = s.repo.commit(&s.app, "v3", Variant::Unhealthy, |_| {});
    let broken_build = s.repo.commit(&s.app, "v4", Variant::BuildFails, |_| {});
    let e2e_fails = s.repo.commit(&s.app, "v5", Variant::Healthy, |dir| {
        std::fs::write(dir.join("app/www/index.html"), "maintenance\n").unwrap();
    });

    // 1. Success on both, through the CLI.
    let (code, out) = cli_deploy(&s, &v1);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("e2e-standard"), "{out}");
    assert!(
        served(s.staging_port).contains("version v1"),
        "{out}\n{}",
        served(s.staging_port)
    );
    assert!(served(s.production_port).contains("version v1"));
    let d = latest_deploy(&s);
    assert_eq!(d["state"], "DEPLOYMENT_STATE_SUCCEEDED", "{d}");
    eventually("the deploy report at the webhook", || {
        let bodies = s.webhook.lock().unwrap();
        bodies
            .iter()
            .find(|b| b.contains(&v1) && b.contains("\"succeeded\""))
            .map(|_| ())
            .ok_or_else(|| format!("{bodies:?}"))
    });

    // 2. A second deploy while one runs is refused, naming the running one and who started it.
    let first = s
        .controller
        .grpcurl(
            Some(&format!("{{\"app\":\"{}\",\"commit\":\"{v2}\"}}", s.name)),
            "sentinel.v1.FleetService/SubmitDeploy",
        )
        .json()
        .unwrap();
    let second = s.controller.grpcurl(
        Some(&format!("{{\"app\":\"{}\",\"commit\":\"{v2}\"}}", s.name)),
        "sentinel.v1.FleetService/SubmitDeploy",
    );
    assert!(!second.ok);
    assert!(
        second.stderr.contains("FailedPrecondition"),
        "{}",
        second.stderr
    );
    assert!(
        second.stderr.contains(first["deployId"].as_str().unwrap()),
        "{}",
        second.stderr
    );
    assert!(second.stderr.contains("admin"), "{}", second.stderr);
    let id = first["deployId"].as_str().unwrap().to_string();
    let done = s
        .controller
        .wait_deploy_end(&id, std::time::Duration::from_secs(300));
    assert_eq!(done["state"], "DEPLOYMENT_STATE_SUCCEEDED", "{done}");
    assert!(served(s.production_port).contains("version v2"));

    // 3. Health failure on staging: rolled back, previous release serving, production untouched.
    let (code, out) = cli_deploy(&s, &unhealthy);
    assert_eq!(code, 1, "{out}");
    let d = latest_deploy(&s);
    assert_eq!(d["state"], "DEPLOYMENT_STATE_ROLLED_BACK", "{d}");
    assert!(
        !d.to_string().contains("\"production\""),
        "production was touched: {d}"
    );
    assert!(served(s.staging_port).contains("version v2"));
    assert!(served(s.production_port).contains("version v2"));
    // The failing container's log is in the events, its secret is not.
    assert!(
        out.contains("container:") || d.to_string().contains("health"),
        "{out}"
    );

    // 4. Build failure on staging: production untouched, staging still serving v2.
    let (code, out) = cli_deploy(&s, &broken_build);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("assets failed to compile"), "{out}");
    assert!(served(s.staging_port).contains("version v2"));
    assert!(served(s.production_port).contains("version v2"));

    // 5. E2E failure on staging: staging rolled back by a rollback job, production untouched.
    let (code, out) = cli_deploy(&s, &e2e_fails);
    assert_eq!(code, 1, "{out}");
    let d = latest_deploy(&s);
    assert_eq!(d["state"], "DEPLOYMENT_STATE_ROLLED_BACK", "{d}");
    assert!(
        d["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("E2E failed"),
        "{d}"
    );
    assert!(served(s.staging_port).contains("version v2"));
    assert!(served(s.production_port).contains("version v2"));

    // 6. A manual rollback of production to v1.
    let c = &s.fleet.certs;
    let out = run(Command::new(bin("sentinel"))
        .args([
            "rollback",
            &s.name,
            "--env",
            "production",
            "--to",
            &v1,
            "--wait",
            "--controller",
            &s.controller.addr,
        ])
        .arg("--ca")
        .arg(c.join("ca.pem"))
        .arg("--cert")
        .arg(c.join("operator-admin.pem"))
        .arg("--key")
        .arg(c.join("operator-admin.key")));
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(served(s.production_port).contains("version v1"));

    assert_no_secret_anywhere(&s);
}

#[test]
fn a_deploy_of_an_unknown_app_or_commit_is_refused_clearly() {
    let s = setup("refuse");
    s.repo.commit(&s.app, "v1", Variant::Healthy, |_| {});
    let r = s.controller.grpcurl(
        Some("{\"app\":\"nope\",\"commit\":\"abc\"}"),
        "sentinel.v1.FleetService/SubmitDeploy",
    );
    assert!(
        r.stderr.contains("NotFound") && r.stderr.contains(&s.name),
        "{}",
        r.stderr
    );
    let r = s.controller.grpcurl(
        Some(&format!(
            "{{\"app\":\"{}\",\"commit\":\"0123456789abcdef\"}}",
            s.name
        )),
        "sentinel.v1.FleetService/SubmitDeploy",
    );
    assert!(
        r.stderr.contains("InvalidArgument") && r.stderr.contains("not found"),
        "{}",
        r.stderr
    );
}

#[test]
fn cancelling_a_deploy_mid_way_puts_the_live_release_back() {
    let s = setup("cancel");
    let v1 = s.repo.commit(&s.app, "v1", Variant::Healthy, |_| {});
    let unhealthy = s.repo.commit(&s.app, "v3", Variant::Unhealthy, |_| {});
    let (code, out) = cli_deploy(&s, &v1);
    assert_eq!(code, 0, "{out}");
    assert!(served(s.staging_port).contains("version v1"));

    let d = s
        .controller
        .grpcurl(
            Some(&format!(
                "{{\"app\":\"{}\",\"commit\":\"{unhealthy}\"}}",
                s.name
            )),
            "sentinel.v1.FleetService/SubmitDeploy",
        )
        .json()
        .unwrap();
    let id = d["deployId"].as_str().unwrap().to_string();
    // Cancel while staging runs the new release and waits for it to get healthy.
    eventually("the unhealthy release to be up on staging", || {
        let answer = served(s.staging_port);
        if answer.contains(" 404") {
            Ok(())
        } else {
            Err(answer)
        }
    });
    let job_id = latest_deploy(&s)["steps"]
        .as_array()
        .and_then(|steps| steps.iter().find(|st| st["name"] == "deploy"))
        .and_then(|st| st["jobId"].as_str())
        .map(str::to_string)
        .expect("the staging deploy job");
    let cancelled = s.controller.grpcurl(
        Some(&format!(
            "{{\"deploy_id\":\"{id}\",\"reason\":\"wrong commit\"}}"
        )),
        "sentinel.v1.FleetService/CancelDeploy",
    );
    assert!(cancelled.ok, "{}", cancelled.stderr);

    let job = eventually_within(
        std::time::Duration::from_secs(120),
        "the cancelled deploy job to end",
        || {
            let j = s
                .controller
                .grpcurl(
                    Some(&format!("{{\"job_id\":\"{job_id}\"}}")),
                    "sentinel.v1.FleetService/GetJob",
                )
                .json()?;
            // Cancelled at once on the controller; the host then says how it ended.
            if j["detail"]
                .as_str()
                .unwrap_or_default()
                .contains("on the host")
            {
                Ok(j)
            } else {
                Err(j.to_string())
            }
        },
    );
    assert_eq!(job["state"], "JOB_STATE_CANCELLED", "{job}");
    let detail = job["detail"].as_str().unwrap_or_default();
    assert!(detail.contains(&format!("restored {v1}")), "{detail}");
    assert!(served(s.staging_port).contains("version v1"));
    assert!(served(s.production_port).contains("version v1"));
}

#[test]
fn a_controller_restart_mid_pipeline_ends_the_deploy_in_a_definite_state() {
    let mut s = setup("restart");
    let v1 = s.repo.commit(&s.app, "v1", Variant::Healthy, |_| {});
    let d = s
        .controller
        .grpcurl(
            Some(&format!("{{\"app\":\"{}\",\"commit\":\"{v1}\"}}", s.name)),
            "sentinel.v1.FleetService/SubmitDeploy",
        )
        .json()
        .unwrap();
    let id = d["deployId"].as_str().unwrap().to_string();
    let get = |c: &Controller| {
        c.grpcurl(
            Some(&format!("{{\"deploy_id\":\"{id}\"}}")),
            "sentinel.v1.FleetService/GetDeploy",
        )
        .json()
    };
    // Stop the controller while the staging deploy job runs on the agent.
    let job_id = eventually("the staging deploy step to start", || {
        let d = get(&s.controller)?;
        d["steps"]
            .as_array()
            .and_then(|steps| {
                steps.iter().find(|st| {
                    st["name"] == "deploy"
                        && st["status"] == "STEP_STATUS_STARTED"
                        && st["jobId"].is_string()
                })
            })
            .map(|st| st["jobId"].as_str().unwrap_or_default().to_string())
            .ok_or_else(|| d.to_string())
    });
    assert!(s.controller.proc.stop().is_some());
    // On the address the first run got: the agents know no other.
    s.controller = s
        .fleet
        .start_controller_on(&s.controller.addr, &s.controller_extra);

    let after = get(&s.controller).unwrap();
    assert_eq!(after["state"], "DEPLOYMENT_STATE_FAILED", "{after}");
    let detail = after["detail"].as_str().unwrap_or_default();
    assert!(
        detail.contains("interrupted by a controller restart")
            && detail.contains("deploy on hub-alfa"),
        "{detail}"
    );
    assert!(detail.contains("production was not touched"), "{detail}");
    // The job itself still ends in a definite state once the agent reports back.
    let job = eventually_within(
        std::time::Duration::from_secs(180),
        "the interrupted deploy's job to settle",
        || {
            let j = s
                .controller
                .grpcurl(
                    Some(&format!("{{\"job_id\":\"{job_id}\"}}")),
                    "sentinel.v1.FleetService/GetJob",
                )
                .json()?;
            match j["state"].as_str().unwrap_or_default() {
                "JOB_STATE_SUCCEEDED" | "JOB_STATE_FAILED" | "JOB_STATE_INTERRUPTED" => Ok(j),
                other => Err(other.to_string()),
            }
        },
    );
    assert_eq!(job["state"], "JOB_STATE_SUCCEEDED", "{job}");
    // And a new deploy may start: the app's lock did not survive as a stale one.
    let again = s.controller.grpcurl(
        Some(&format!("{{\"app\":\"{}\",\"commit\":\"{v1}\"}}", s.name)),
        "sentinel.v1.FleetService/SubmitDeploy",
    );
    assert!(again.ok, "{}", again.stderr);
}

/// Benchmark, not a test: the pipeline's own overhead per environment (bundle, signing,
/// dispatch, bundle transfer, unpack; not compose, health waits or E2E). Run with
/// `cargo test -p sentinel-e2e --test deploy overhead -- --ignored --nocapture`.
#[test]
#[ignore]
fn overhead_per_environment() {
    let s = setup("bench");
    let v1 = s.repo.commit(&s.app, "v1", Variant::Healthy, |_| {});
    let (code, out) = cli_deploy(&s, &v1);
    assert_eq!(code, 0, "{out}");
    let d = latest_deploy(&s);
    let secs = |t: &Value| -> f64 {
        let text = t.as_str().unwrap_or_default();
        humantime::parse_rfc3339(text)
            .map(|t| {
                t.duration_since(std::time::UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_secs_f64()
            })
            .unwrap_or(0.0)
    };
    for env in ["staging", "production"] {
        let steps: Vec<&Value> = d["steps"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|st| st["environment"] == env)
            .collect();
        let bundle = steps.iter().find(|st| st["name"] == "bundle").unwrap();
        let deploy = steps.iter().find(|st| st["name"] == "deploy").unwrap();
        let bundle_ms = (secs(&bundle["finishedAt"]) - secs(&bundle["startedAt"])) * 1000.0;
        let job_id = deploy["jobId"].as_str().unwrap();
        let job = s
            .controller
            .grpcurl(
                Some(&format!("{{\"job_id\":\"{job_id}\"}}")),
                "sentinel.v1.FleetService/GetJob",
            )
            .json()
            .unwrap();
        let events = job["events"].as_array().unwrap();
        let accepted = events.iter().find(|e| e["accepted"].is_object()).unwrap();
        let dispatch_ms = (secs(&accepted["at"]) - secs(&job["createdAt"])) * 1000.0;
        let finished = events.iter().find(|e| e["finished"].is_object()).unwrap();
        let settle_ms = (secs(&deploy["finishedAt"]) - secs(&finished["at"])) * 1000.0;
        let detail = deploy["detail"].as_str().unwrap_or_default();
        let agent_ms = detail
            .split("(agent ")
            .nth(1)
            .and_then(|r| r.split("ms").next())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(f64::NAN);
        println!(
            "{env}: bundle {bundle_ms:.0} ms, sign+dispatch to accepted {dispatch_ms:.0} ms, agent's own work (fetch, unpack, switch, prune) {agent_ms:.0} ms, settle {settle_ms:.0} ms => controller+agent overhead {:.0} ms",
            bundle_ms + dispatch_ms + agent_ms + settle_ms
        );
    }
}
