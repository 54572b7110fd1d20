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
            "[apps.{env}]\nhost = \"{host}\"\napp_dir = \"{dir}\"\nsecrets_file = \"{secrets}\"\nnot_secret = [\"PORT\"]\nbase_url = \"http://127.0.0.1:{port}\"\n[apps.{env}.health]\nurl = \"http://127.0.0.1:{port}/health\"\ndeadline = \"20s\"\ncontainer_health = true\n",
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
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{said}");
    assert!(served(s.production_port).contains("version v1"));
    // Its record says what it was and what happened.
    let d = latest_deploy(&s);
    assert_eq!(d["kind"], "DEPLOYMENT_KIND_ROLLBACK", "{d}");
    assert_eq!(d["environment"], "production", "{d}");
    assert_eq!(d["commit"], v1.as_str(), "{d}");
    let detail = d["detail"].as_str().unwrap_or_default();
    assert!(
        detail.starts_with("production on prod-alfa: rolled back")
            && detail.contains(&format!("to {v1}")),
        "{detail}"
    );
    assert!(
        said.contains(&format!(
            "rollback {} succeeded: {detail}",
            d["deployId"].as_str().unwrap()
        )),
        "{said}"
    );
    let (code, listed) = s
        .controller
        .cli(&["deploys", "--app", &s.name, "--limit", "1"]);
    assert_eq!(code, Some(0), "{listed}");
    assert!(listed.contains("rollback production"), "{listed}");

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
    // A cancel needs a reason; the CLI's is kept with who gave it.
    let no_reason = s.controller.grpcurl(
        Some(&format!("{{\"deploy_id\":\"{id}\",\"reason\":\"  \"}}")),
        "sentinel.v1.FleetService/CancelDeploy",
    );
    assert!(
        no_reason.stderr.contains("InvalidArgument") && no_reason.stderr.contains("reason"),
        "{}",
        no_reason.stderr
    );
    let (code, out) = s
        .controller
        .cli(&["deploy", "cancel", &id, "--reason", "wrong commit"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains(&format!(
            "deploy {id} of {} is being cancelled by admin: wrong commit",
            s.name
        )),
        "{out}"
    );
    let (code, again) = s
        .controller
        .cli(&["deploy", "cancel", &id, "--reason", "twice"]);
    assert_eq!(code, Some(2), "{again}");
    assert!(again.contains("FailedPrecondition"), "{again}");

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
    assert!(
        detail.contains(&format!("deploy {id} cancelled by admin: wrong commit")),
        "{detail}"
    );
    assert!(served(s.staging_port).contains("version v1"));
    assert!(served(s.production_port).contains("version v1"));

    // The history keeps who cancelled and why; watching it says so and exits 1.
    let d = s
        .controller
        .wait_deploy_end(&id, std::time::Duration::from_secs(120));
    assert_eq!(d["state"], "DEPLOYMENT_STATE_CANCELLED", "{d}");
    assert_eq!(d["cancelledBy"], "admin", "{d}");
    assert_eq!(d["cancelReason"], "wrong commit", "{d}");
    assert!(
        d["detail"]
            .as_str()
            .unwrap_or_default()
            .starts_with("cancelled by admin: wrong commit"),
        "{d}"
    );
    let (code, watched) = s.controller.cli(&["deploy", "watch", &id]);
    assert_eq!(code, Some(1), "{watched}");
    assert!(
        watched.contains(&format!(
            "deploy {id} cancelled: cancelled by admin: wrong commit"
        )),
        "{watched}"
    );
    let (code, listed) = s.controller.cli(&["deploys", "--app", &s.name]);
    assert_eq!(code, Some(0), "{listed}");
    assert!(
        listed.lines().any(|l| l.starts_with(&id)
            && l.contains("cancelled")
            && l.contains("cancelled by admin: wrong commit")),
        "{listed}"
    );
    let (code, ended) = s
        .controller
        .cli(&["deploy", "cancel", &id, "--reason", "again"]);
    assert_eq!(code, Some(2), "{ended}");
    assert!(ended.contains("already ended (cancelled)"), "{ended}");
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

/// A line as the CLI prints untrusted text on one line (control characters escaped).
fn as_printed(line: &str) -> String {
    line.chars()
        .flat_map(|c| {
            if c.is_control() {
                c.escape_default().collect::<Vec<_>>()
            } else {
                vec![c]
            }
        })
        .collect()
}

/// A protobuf enum word as the API's JSON gives it, as the CLI prints it:
/// `STEP_STATUS_SUCCEEDED` -> `succeeded`.
fn word(json_enum: &Value, prefix: &str) -> String {
    json_enum
        .as_str()
        .unwrap_or_default()
        .trim_start_matches(prefix)
        .to_ascii_lowercase()
        .replace('_', " ")
}

/// What a watcher of deploy `d` must have printed, in order: for each step with a host job,
/// every event GetJob holds for that job (as the pipeline relays them), then the step's end.
fn expected_story(s: &Setup, d: &Value) -> Vec<(String, bool)> {
    let mut story = Vec::new();
    for step in d["steps"].as_array().cloned().unwrap_or_default() {
        let Some(job_id) = step["jobId"].as_str() else {
            continue;
        };
        let host = step["host"].as_str().unwrap_or_default();
        let job = s.controller.get_job(job_id).unwrap();
        let mut relayed = 0;
        for ev in job["events"].as_array().cloned().unwrap_or_default() {
            let line = if ev["log"].is_object() {
                format!(
                    "[{host} {}] {}",
                    ev["log"]["stream"].as_str().unwrap_or_default(),
                    ev["log"]["line"].as_str().unwrap_or_default()
                )
            } else if ev["step"].is_object() {
                let detail = ev["step"]["detail"].as_str().unwrap_or_default();
                format!(
                    "[{host}] step {} {}{}",
                    ev["step"]["name"].as_str().unwrap_or_default(),
                    word(&ev["step"]["status"], "STEP_STATUS_").replace(' ', "_"),
                    if detail.is_empty() {
                        String::new()
                    } else {
                        format!(": {detail}")
                    }
                )
            } else {
                continue;
            };
            relayed += 1;
            story.push((format!("    {}", as_printed(&line)), true));
        }
        assert!(relayed > 5, "job {job_id} has hardly any events: {job}");
        // The step's end comes after all of them: `NAME  WORD [ENV on HOST]`.
        story.push((
            format!(
                "{:<16} {} [{} on {host}]",
                step["name"].as_str().unwrap_or_default(),
                word(&step["status"], "STEP_STATUS_"),
                step["environment"].as_str().unwrap_or_default()
            ),
            false,
        ));
    }
    story
}

/// Asserts `output` holds `story` in order: exact lines, and step ends as line prefixes.
fn assert_story_told(output: &str, story: &[(String, bool)]) {
    let mut next = 0;
    for line in output.lines() {
        let Some((want, exact)) = story.get(next) else {
            break;
        };
        if (*exact && line == want) || (!*exact && line.starts_with(want.as_str())) {
            next += 1;
        }
    }
    assert!(
        next == story.len(),
        "the watcher missed {:?} (and {} more after it)\n--- output ---\n{output}",
        story.get(next),
        story.len().saturating_sub(next + 1)
    );
}

#[test]
fn the_deploy_stream_tells_the_whole_story_and_masks_secrets_not_settings() {
    let s = setup("story");
    let v1 = s.repo.commit(&s.app, "v1", Variant::Healthy, |_| {});
    let v2 = s.repo.commit(&s.app, "v2", Variant::Healthy, |_| {});
    let unhealthy = s.repo.commit(&s.app, "v3", Variant::Unhealthy, |_| {});

    // 1. A deploy through both environments: every host event reached `--wait`, in order,
    //    each job's before its step's end; the report is a step of the stream, and the
    //    webhook had the report when `--wait` returned.
    let (code, out) = cli_deploy(&s, &v1);
    assert_eq!(code, 0, "{out}");
    let d = latest_deploy(&s);
    assert_eq!(d["state"], "DEPLOYMENT_STATE_SUCCEEDED", "{d}");
    assert_eq!(d["kind"], "DEPLOYMENT_KIND_DEPLOY", "{d}");
    let id = d["deployId"].as_str().unwrap().to_string();
    let mut story = expected_story(&s, &d);
    story.push(("report           started".into(), true));
    story.push(("    [report] relay: delivered (200)".into(), true));
    story.push((
        "report           succeeded: relay: delivered (200)".into(),
        true,
    ));
    story.push((
        format!(
            "deploy {id} succeeded: deployed {} to staging on hub-alfa and production on prod-alfa",
            &v1[..12]
        ),
        true,
    ));
    assert_story_told(&out, &story);
    for step in ["health succeeded", "prune succeeded", "timing:"] {
        assert!(
            out.contains(&format!("[prod-alfa] step {step}"))
                || out.contains(&format!("[prod-alfa agent] {step}")),
            "the end of the production job is missing ({step}):\n{out}"
        );
    }
    assert!(!out.contains("STEP_STATUS_"), "enum names printed:\n{out}");
    {
        let bodies = s.webhook.lock().unwrap();
        let report = bodies
            .iter()
            .find(|b| b.contains(&id))
            .unwrap_or_else(|| panic!("no report of {id} when --wait returned: {bodies:?}"));
        assert!(report.contains("\"kind\":\"deploy\""), "{report}");
        assert!(!report.contains(SECRET), "secret in the report: {report}");
    }
    let report = d["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|st| st["name"] == "report")
        .cloned()
        .unwrap_or_default();
    assert_eq!(report["status"], "STEP_STATUS_SUCCEEDED", "{d}");

    // Settings are readable where secrets are masked: the health URL's port (PORT is
    // `not_secret`) in the job's events, the CLI's output and the host's audit log.
    let staging_url = format!("http://127.0.0.1:{}/health", s.staging_port);
    let production_url = format!("http://127.0.0.1:{}/health", s.production_port);
    assert!(
        out.contains(&staging_url) && out.contains(&production_url),
        "{out}"
    );
    let audit = std::fs::read_to_string(
        s.fleet
            .path(&format!("apps-prod-alfa/{}/audit.log", s.name)),
    )
    .unwrap();
    assert!(audit.contains(&production_url), "{audit}");
    assert!(!out.contains(":***/health"), "a port masked:\n{out}");

    // 2. A release whose staging health fails prints the secret at start: masked in the
    //    stream, and the rolled-back deploy's story is whole too.
    let (code, out) = cli_deploy(&s, &unhealthy);
    assert_eq!(code, 1, "{out}");
    let d = latest_deploy(&s);
    assert_eq!(d["state"], "DEPLOYMENT_STATE_ROLLED_BACK", "{d}");
    assert_story_told(&out, &expected_story(&s, &d));
    assert!(
        out.contains("starting with DB_PASSWORD=***"),
        "the app's own output with its secret masked:\n{out}"
    );
    assert!(!out.contains(SECRET), "secret in the CLI output:\n{out}");
    assert!(out.contains(&staging_url), "{out}");
    let details = d.to_string();
    assert!(!details.contains(SECRET), "secret in the deploy: {details}");
    let rolled_back_id = d["deployId"].as_str().unwrap().to_string();
    {
        let bodies = s.webhook.lock().unwrap();
        let report = bodies
            .iter()
            .find(|b| b.contains(&rolled_back_id))
            .unwrap_or_else(|| panic!("no report of {rolled_back_id}: {bodies:?}"));
        assert!(report.contains("\"rolled_back\""), "{report}");
        assert!(!report.contains(SECRET), "secret in the report: {report}");
    }

    // 3. Ctrl-C on `--wait`: the CLI says the deploy goes on and how to watch or cancel it,
    //    exits 130, and `deploy watch` follows it to its end, report included.
    let c = &s.fleet.certs;
    let out_path = s.fleet.path("ctrl-c.out");
    let err_path = s.fleet.path("ctrl-c.err");
    let mut child = Command::new(bin("sentinel"))
        .args([
            "deploy",
            &s.name,
            "--commit",
            &v2,
            "--wait",
            "--controller",
            &s.controller.addr,
        ])
        .arg("--ca")
        .arg(c.join("ca.pem"))
        .arg("--cert")
        .arg(c.join("operator-admin.pem"))
        .arg("--key")
        .arg(c.join("operator-admin.key"))
        .stdin(std::process::Stdio::null())
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(std::fs::File::create(&err_path).unwrap())
        .spawn()
        .unwrap();
    let id = eventually("the CLI to follow the deploy", || {
        let text = std::fs::read_to_string(&out_path).unwrap_or_default();
        // Following once the first step shows.
        if !text.contains("bundle ") {
            return Err(text);
        }
        text.split_whitespace()
            .nth(1)
            .map(str::to_string)
            .ok_or(text.clone())
    });
    run(Command::new("kill").arg("-INT").arg(child.id().to_string()));
    let status = child.wait().unwrap();
    let said = std::fs::read_to_string(&err_path).unwrap();
    assert_eq!(status.code(), Some(130), "{said}");
    assert!(said.contains(&format!("deploy {id} goes on")), "{said}");
    assert!(
        said.contains(&format!("sentinel deploy watch {id}")),
        "{said}"
    );
    assert!(
        said.contains(&format!("sentinel deploy cancel {id} --reason")),
        "{said}"
    );
    let (code, watched) = s.controller.cli(&["deploy", "watch", &id]);
    assert_eq!(code, Some(0), "{watched}");
    assert!(watched.contains("report           succeeded"), "{watched}");
    assert!(
        watched.trim_end().ends_with(&format!(
            "deploy {id} succeeded: deployed {} to staging on hub-alfa and production on prod-alfa",
            &v2[..12]
        )),
        "{watched}"
    );
    assert!(served(s.production_port).contains("version v2"));
    // 4. A rollback to "the previous release": its record names the commit the host went
    //    back to, once the host said.
    let (code, out) = s
        .controller
        .cli(&["rollback", &s.name, "--env", "production", "--wait"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(served(s.production_port).contains("version v1"));
    let d = latest_deploy(&s);
    assert_eq!(d["kind"], "DEPLOYMENT_KIND_ROLLBACK", "{d}");
    assert_eq!(d["environment"], "production", "{d}");
    assert_eq!(d["commit"], v1.as_str(), "{d}");
    let detail = d["detail"].as_str().unwrap_or_default();
    assert!(
        detail.starts_with(&format!(
            "production on prod-alfa: rolled back {}/production from {v2} to {v1}",
            s.name
        )),
        "{detail}"
    );
    assert!(out.contains("report           succeeded"), "{out}");
    let (code, listed) = s
        .controller
        .cli(&["deploys", "--app", &s.name, "--limit", "1"]);
    assert_eq!(code, Some(0), "{listed}");
    assert!(
        listed.contains("rollback production") && listed.contains(&v1[..12]),
        "{listed}"
    );

    let (code, unknown) = s.controller.cli(&["deploy", "watch", "d-nope"]);
    assert_eq!(code, Some(2), "{unknown}");
    assert!(
        unknown.contains("NotFound") && unknown.contains("d-nope"),
        "{unknown}"
    );

    assert_no_secret_anywhere(&s);
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
