//! The shared end-to-end harness: real `sentinel` and `hostagent` processes, a dev PKI made by
//! the real CLI, grpcurl as the operator client, and Docker for containers. Every test gets its
//! own temp dir, and our processes bind port 0 and log the port they got (other programs get
//! theirs from [`ports`]), so tests run in parallel; waits are conditions with a deadline
//! (`SENTINEL_TEST_PATIENCE` seconds, default 30), never fixed sleeps.

use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub mod fake_controller;

pub use serde_json::Value;

pub mod backups;
pub mod fixture;
pub mod job_events;
pub mod load;
pub mod ports;
pub mod postgres;
pub mod services;

/// How long [`eventually`] waits before failing.
pub fn patience() -> Duration {
    let secs = std::env::var("SENTINEL_TEST_PATIENCE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30);
    Duration::from_secs(secs)
}

/// Polls `check` until it returns `Some`, or panics after [`patience`] with `what` and the
/// last failure reason.
pub fn eventually<T>(what: &str, check: impl FnMut() -> Result<T, String>) -> T {
    eventually_within(patience(), what, check)
}

/// [`eventually`] with a patience of its own, for slow things (a deploy that builds images).
pub fn eventually_within<T>(
    patience: Duration,
    what: &str,
    mut check: impl FnMut() -> Result<T, String>,
) -> T {
    let deadline = Instant::now() + patience;
    let mut last = String::new();
    while Instant::now() < deadline {
        match check() {
            Ok(v) => return v,
            Err(e) => last = e,
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("timed out after {patience:?} waiting for {what}; last: {last}");
}

/// The directory holding the built binaries (`SENTINEL_BIN_DIR`, else the workspace's
/// `target/debug`).
pub fn bin_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("SENTINEL_BIN_DIR") {
        return PathBuf::from(dir);
    }
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    target.join("debug")
}

/// Path of a workspace binary; panics with the fix when it was not built.
pub fn bin(name: &str) -> PathBuf {
    let path = bin_dir().join(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --workspace --bins` before the end-to-end tests",
        path.display()
    );
    path
}

/// The message of the controller's line saying where its gRPC listener is bound.
pub const CONTROLLER_LISTENING: &str = "controller listening (mTLS, gRPC)";
/// The message of the controller's line saying where its `/metrics` listener is bound.
pub const CONTROLLER_METRICS_LISTENING: &str = "controller metrics listening";
/// The message of the agent's line saying where its `/metrics` listener is bound.
pub const AGENT_METRICS_LISTENING: &str = "agent metrics listening";

/// The `listen` field of the first line of `log` whose message starts with `message`, in the
/// text (`... MESSAGE ... listen=ADDR`) or JSON (`"message":…,"listen":"ADDR"`) log format.
/// Our processes bind port 0 and say here which port they got.
pub fn logged_addr(log: &str, message: &str) -> Option<SocketAddr> {
    for line in log.lines() {
        if line.starts_with('{') {
            let Ok(event) = serde_json::from_str::<Value>(line) else {
                continue;
            };
            if event["message"]
                .as_str()
                .is_some_and(|m| m.starts_with(message))
            {
                return event["listen"].as_str()?.parse().ok();
            }
        } else if let Some((_, fields)) = line.split_once(message) {
            let value = fields
                .split_whitespace()
                .find_map(|f| f.strip_prefix("listen="))?;
            return value.parse().ok();
        }
    }
    None
}

/// Runs a command to completion and returns its output.
pub fn run(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"))
}

/// `hostagent --check-config --config CONFIG`: (exit code, stderr).
pub fn check_agent_config(config: &Path) -> (Option<i32>, String) {
    let out = run(Command::new(bin("hostagent"))
        .arg("--check-config")
        .arg("--config")
        .arg(config));
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A child process killed when dropped; its output goes to files in the test's dir.
pub struct Proc {
    child: Option<Child>,
    /// Where its stderr goes.
    pub log: PathBuf,
    name: String,
}

impl Proc {
    /// Starts `cmd` (stdin closed, stdout and stderr to `log`, our crates logging at debug);
    /// `name` names it in waits and in the log printed when a test fails.
    pub fn spawn(mut cmd: Command, log: PathBuf, name: &str) -> Self {
        let out = fs::File::create(&log).expect("creating a log file");
        let err = out.try_clone().expect("cloning a log file handle");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .env("RUST_LOG", "info,sentinel=debug,hostagent=debug")
            .spawn()
            .unwrap_or_else(|e| panic!("starting {cmd:?}: {e}"));
        Self {
            child: Some(child),
            log,
            name: name.into(),
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// Sends a signal (by name, e.g. "TERM", "STOP", "CONT").
    pub fn signal(&self, sig: &str) {
        run(Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid().to_string()));
    }

    /// SIGTERM, then waits for exit (killing after the patience runs out); returns the status.
    pub fn stop(&mut self) -> Option<std::process::ExitStatus> {
        let mut child = self.child.take()?;
        self.signal_child(&child, "TERM");
        let deadline = Instant::now() + patience();
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        child.wait().ok()
    }

    fn signal_child(&self, child: &Child, sig: &str) {
        run(Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(child.id().to_string()));
    }

    /// The process's log so far.
    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The address the process logged as bound on its line `message` (one of the
    /// `*_LISTENING` constants); waits for the line.
    pub fn logged_addr(&self, message: &str) -> SocketAddr {
        eventually(
            &format!("{} to log \"{message} … listen=ADDR\"", self.name),
            || logged_addr(&self.log_text(), message).ok_or_else(|| "not logged yet".to_string()),
        )
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!(
                "---- log of {} ({}) ----\n{}",
                self.name,
                self.log.display(),
                self.log_text()
            );
        }
    }
}

/// A test's world: a temp dir with a dev PKI made by `sentinel pki init`.
pub struct Fleet {
    /// The temp dir (removed on drop).
    pub dir: tempfile::TempDir,
    /// The PKI directory.
    pub certs: PathBuf,
}

impl Fleet {
    /// A new temp dir with a dev PKI for the given hosts.
    pub fn new(hosts: &[&str]) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("sentinel-e2e-")
            .tempdir()
            .expect("creating a temp dir");
        let certs = dir.path().join("certs");
        let mut cmd = Command::new(bin("sentinel"));
        cmd.args(["pki", "init", "--dir"]).arg(&certs);
        for h in hosts {
            cmd.args(["--host", h]);
        }
        let out = run(&mut cmd);
        assert!(
            out.status.success(),
            "pki init failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Self { dir, certs }
    }

    /// A path inside the test's dir.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Issues another operator certificate.
    pub fn issue_operator(&self, name: &str, role: &str) {
        let out = run(Command::new(bin("sentinel"))
            .args(["pki", "issue-operator", name, "--role", role, "--dir"])
            .arg(&self.certs));
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Writes a controller config and starts `sentinel serve` on a port of its choosing
    /// (`127.0.0.1:0`; the harness reads the bound address from its log). Its metrics listen
    /// on a port of their own too unless `extra_toml` has a `[metrics]` section.
    pub fn start_controller(&self, extra_toml: &str) -> Controller {
        self.start_controller_on("127.0.0.1:0", extra_toml)
    }

    /// [`start_controller`](Self::start_controller) on `listen`: the address an earlier
    /// controller of this test got, when agents must find the restarted one where they left it.
    pub fn start_controller_on(&self, listen: &str, extra_toml: &str) -> Controller {
        let config = self.path("sentinel.toml");
        let c = self.certs.display();
        fs::write(
            &config,
            format!(
                "listen = \"{listen}\"\ndata_dir = \"{data}\"\n\n[tls]\nca = \"{c}/ca.pem\"\ncert = \"{c}/controller.pem\"\nkey = \"{c}/controller.key\"\n\n{extra_toml}\n{metrics}",
                data = self.path("data").display(),
                metrics = metrics_on_port_zero(extra_toml),
            ),
        )
        .expect("writing controller config");
        let mut cmd = Command::new(bin("sentinel"));
        cmd.arg("serve").arg("--config").arg(&config);
        let log = self.path(&format!("controller-{}.log", unique()));
        let proc = Proc::spawn(cmd, log, "controller");
        let addr = proc.logged_addr(CONTROLLER_LISTENING).to_string();
        let controller = Controller {
            proc,
            addr,
            certs: self.certs.clone(),
        };
        controller.wait_ready();
        controller
    }

    /// A controller signing jobs, with app `shop` on hub-alfa (staging) and prod-alfa
    /// (production) and jobs that wait `ttl` for their host: the world of the job-queue and
    /// revocation tests, whose jobs are rollbacks that need no release.
    pub fn start_shop_controller(&self, ttl: &str) -> Controller {
        let c = self.certs.display();
        let app = |env: &str, host: &str| {
            format!(
                "[apps.{env}]\nhost = \"{host}\"\napp_dir = \"{}\"\n",
                self.path(&format!("apps-{host}/shop")).display()
            )
        };
        let extra = format!(
            "[signing]\nkey = \"{c}/signing.key\"\n[jobs]\nttl = \"{ttl}\"\n\n[[apps]]\nname = \"shop\"\nrepo = \"{}\"\n{}{}",
            self.path("repo").display(),
            app("staging", "hub-alfa"),
            app("production", "prod-alfa"),
        );
        self.start_controller(&extra)
    }

    /// An agent for `host` that runs signed rollbacks under `apps-HOST/` (no Docker collector).
    pub fn start_rollback_agent(&self, controller: &Controller, host: &str) -> Proc {
        let c = self.certs.display();
        let jobs = format!(
            "[collectors]\ndocker = false\n[jobs]\nstate_dir = \"{}\"\ntrusted_keys = [\"{c}/signing.pub\"]\nallowed_kinds = [\"rollback\"]\napp_dirs = [\"{}\"]\n",
            self.path(&format!("state-{host}")).display(),
            self.path(&format!("apps-{host}")).display(),
        );
        self.start_agent(host, host, &controller.addr, &jobs)
    }

    /// Writes an agent config for `host` (using `cert_host`'s certificate) and starts it.
    pub fn start_agent(
        &self,
        host: &str,
        cert_host: &str,
        controller: &str,
        extra_toml: &str,
    ) -> Proc {
        let config = self.write_agent_config(host, cert_host, controller, extra_toml);
        let mut cmd = Command::new(bin("hostagent"));
        cmd.arg("--config").arg(&config);
        Proc::spawn(
            cmd,
            self.path(&format!("agent-{host}-{}.log", unique())),
            &format!("agent {host}"),
        )
    }

    /// The agent config file for `host`, written into the test's dir.
    pub fn write_agent_config(
        &self,
        host: &str,
        cert_host: &str,
        controller: &str,
        extra_toml: &str,
    ) -> PathBuf {
        let config = self.path(&format!("agent-{host}.toml"));
        let c = self.certs.display();
        // Agents of parallel tests must not share the default /var/lib/hostagent (the second
        // would be refused: one journal per agent).
        let jobs = if extra_toml.contains("[jobs") {
            String::new()
        } else {
            format!(
                "\n[jobs]\nstate_dir = \"{}\"\n",
                self.path(&format!("jobs-{host}")).display()
            )
        };
        let metrics = metrics_on_port_zero(extra_toml);
        fs::write(
            &config,
            format!(
                "host_name = \"{host}\"\ncontroller = \"{controller}\"\nreport_interval = \"1s\"\n{extra_toml}\n{jobs}\n{metrics}\n[backoff]\ninitial = \"200ms\"\nmax = \"2s\"\n\n[tls]\nca = \"{c}/ca.pem\"\ncert = \"{c}/host-{cert_host}.pem\"\nkey = \"{c}/host-{cert_host}.key\"\n"
            ),
        )
        .expect("writing agent config");
        config
    }
}

/// A `[metrics]` section on port 0 unless `extra_toml` has its own: the defaults (9464,
/// 9465) would be shared by every test, and a scrape could reach another test's process.
fn metrics_on_port_zero(extra_toml: &str) -> &'static str {
    if extra_toml.contains("[metrics]") {
        ""
    } else {
        "[metrics]\nlisten = \"127.0.0.1:0\"\n"
    }
}

fn unique() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

/// A running controller process.
pub struct Controller {
    /// The process.
    pub proc: Proc,
    /// `127.0.0.1:PORT`.
    pub addr: String,
    certs: PathBuf,
}

impl Controller {
    /// The port its `/metrics` listener got (logged at start).
    pub fn metrics_port(&self) -> u16 {
        self.proc.logged_addr(CONTROLLER_METRICS_LISTENING).port()
    }

    fn wait_ready(&self) {
        eventually("the controller to serve health checks", || {
            let r = self.grpcurl_as("operator-admin", &[], "grpc.health.v1.Health/Check");
            if r.ok {
                Ok(())
            } else {
                Err(r.stderr)
            }
        });
    }

    /// Calls `method` as operator `admin`.
    pub fn grpcurl(&self, data: Option<&str>, method: &str) -> GrpcResult {
        let mut args = Vec::new();
        if let Some(d) = data {
            args.extend(["-d", d]);
        }
        self.grpcurl_as("operator-admin", &args, method)
    }

    /// Calls `method` with the certificate `certs/NAME.pem`, extra grpcurl flags first.
    pub fn grpcurl_as(&self, cert: &str, flags: &[&str], method: &str) -> GrpcResult {
        let c = &self.certs;
        let mut cmd = Command::new("grpcurl");
        cmd.arg("-cacert")
            .arg(c.join("ca.pem"))
            .arg("-cert")
            .arg(c.join(format!("{cert}.pem")))
            .arg("-key")
            .arg(c.join(format!("{cert}.key")))
            .args(flags)
            .arg(&self.addr);
        if !method.is_empty() {
            cmd.args(method.split(' '));
        }
        GrpcResult::from(run(&mut cmd))
    }

    /// `sentinel ARGS --controller ADDR` as operator `admin`: (exit code, stdout then
    /// stderr).
    pub fn cli(&self, args: &[&str]) -> (Option<i32>, String) {
        self.cli_as("operator-admin", args)
    }

    /// [`cli`](Self::cli) with the certificate `certs/CERT.pem` (e.g. `operator-ana`).
    pub fn cli_as(&self, cert: &str, args: &[&str]) -> (Option<i32>, String) {
        let c = &self.certs;
        let out = run(Command::new(bin("sentinel"))
            .args(args)
            .args(["--controller", &self.addr])
            .arg("--ca")
            .arg(c.join("ca.pem"))
            .arg("--cert")
            .arg(c.join(format!("{cert}.pem")))
            .arg("--key")
            .arg(c.join(format!("{cert}.key"))));
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.code(), text)
    }

    /// `GetJob` for `id`, parsed.
    pub fn get_job(&self, id: &str) -> Result<Value, String> {
        self.grpcurl(
            Some(&format!("{{\"job_id\":\"{id}\"}}")),
            "sentinel.v1.FleetService/GetJob",
        )
        .json()
    }

    /// Waits (at most `patience`) until deploy `id` is no longer running; returns it, parsed.
    pub fn wait_deploy_end(&self, id: &str, patience: Duration) -> Value {
        eventually_within(patience, &format!("deploy {id} to end"), || {
            let d = self
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

    /// `GetHost` for `name`, parsed.
    pub fn get_host(&self, name: &str) -> Result<Value, String> {
        let r = self.grpcurl(
            Some(&format!("{{\"name\":\"{name}\"}}")),
            "sentinel.v1.FleetService/GetHost",
        );
        r.json()
    }

    /// Waits until `name` is online and has a state report; returns its `GetHost` answer.
    pub fn wait_online(&self, name: &str) -> Value {
        eventually(&format!("host {name} online with state"), || {
            let host = self.get_host(name)?;
            if host["status"] == "HOST_STATUS_ONLINE" && host["state"].is_object() {
                Ok(host)
            } else {
                Err(host.to_string())
            }
        })
    }
}

/// What a grpcurl call gave.
#[derive(Debug)]
pub struct GrpcResult {
    /// Exit status 0.
    pub ok: bool,
    /// Standard output (JSON for calls).
    pub stdout: String,
    /// Standard error (the status for failed calls).
    pub stderr: String,
}

impl From<Output> for GrpcResult {
    fn from(o: Output) -> Self {
        Self {
            ok: o.status.success(),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }
}

impl GrpcResult {
    /// The answer as JSON, or the failure text.
    pub fn json(&self) -> Result<Value, String> {
        if !self.ok {
            return Err(self.stderr.clone());
        }
        serde_json::from_str(&self.stdout).map_err(|e| format!("{e}: {}", self.stdout))
    }
}

/// Docker helpers: images are built `FROM scratch` with busybox, since nothing can be pulled.
pub mod docker {
    use super::*;

    /// The test image's tag.
    pub const IMAGE: &str = "sentinel-e2e-busybox:latest";

    /// Whether a Docker daemon answers.
    pub fn available() -> bool {
        Command::new("docker")
            .args(["info", "--format", "{{.ServerVersion}}"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    }

    /// Builds the busybox image (idempotent).
    pub fn build_busybox_image() {
        let busybox = ["/bin/busybox", "/usr/bin/busybox"]
            .into_iter()
            .map(Path::new)
            .find(|p| p.exists())
            .expect("busybox-static is not installed (apt-get install busybox-static)");
        let ctx = tempfile::tempdir().expect("temp dir");
        fs::copy(busybox, ctx.path().join("busybox")).expect("copying busybox");
        fs::write(
            ctx.path().join("Dockerfile"),
            "FROM scratch\nCOPY busybox /bin/busybox\nRUN [\"/bin/busybox\", \"--install\", \"-s\", \"/bin\"]\nENTRYPOINT []\n",
        )
        .expect("writing Dockerfile");
        let out = run(Command::new("docker")
            .args(["build", "-q", "-t", IMAGE])
            .arg(ctx.path()));
        assert!(
            out.status.success(),
            "docker build: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// A container removed on drop.
    pub struct Container {
        /// Its name.
        pub name: String,
    }

    impl Container {
        /// Runs `sleep` in a new container with compose labels.
        pub fn run(name: &str, project: &str, service: &str) -> Self {
            let out = run(Command::new("docker").args([
                "run",
                "-d",
                "--name",
                name,
                "--label",
                &format!("com.docker.compose.project={project}"),
                "--label",
                &format!("com.docker.compose.service={service}"),
                IMAGE,
                "/bin/sleep",
                "600",
            ]));
            assert!(
                out.status.success(),
                "docker run: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            Self { name: name.into() }
        }
    }

    impl Drop for Container {
        fn drop(&mut self) {
            let _ = Command::new("docker")
                .args(["rm", "-f", &self.name])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// One HTTP/1.1 GET; returns the status line, the headers and the body.
pub fn http_get(port: u16, path: &str) -> Result<(String, String, String), String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/plain\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    let mut text = String::new();
    s.read_to_string(&mut text).map_err(|e| e.to_string())?;
    let (head, body) = text.split_once("\r\n\r\n").ok_or("no end of headers")?;
    let (status, headers) = head.split_once("\r\n").unwrap_or((head, ""));
    Ok((status.to_string(), headers.to_string(), body.to_string()))
}

/// The exposition of `/metrics` on `port` (a 200 in the Prometheus text format, or why not).
pub fn scrape_metrics(port: u16) -> Result<String, String> {
    let (status, headers, body) = http_get(port, "/metrics")?;
    if !status.starts_with("HTTP/1.1 200") {
        return Err(status);
    }
    if !headers.contains("Content-Type: text/plain; version=0.0.4") {
        return Err(format!("not the text format: {headers}"));
    }
    Ok(body)
}

/// The value of the sample `series` (name with labels, exactly as exported).
pub fn metric_sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

/// Writes `operator-NAME.pem` (leaf, then a CA:TRUE intermediate signed by the fleet CA) and
/// `operator-NAME.key`: the chain a rogue sub-CA would make.
pub fn forge_operator_through_intermediate(fleet: &Fleet, name: &str, role: &str) {
    use rcgen::{
        BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose,
        IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
    };
    let ca_key =
        KeyPair::from_pem(&std::fs::read_to_string(fleet.certs.join("ca.key")).unwrap()).unwrap();
    let dn = |cn: &str| {
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, sentinel::pki::FLEET_ORGANIZATION);
        dn.push(DnType::CommonName, cn);
        dn
    };
    let mut ca_params = CertificateParams::default();
    ca_params.distinguished_name = dn(sentinel::pki::CA_COMMON_NAME);
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca = Issuer::new(ca_params, ca_key);

    let int_key = KeyPair::generate().unwrap();
    let mut int_params = CertificateParams::default();
    int_params.distinguished_name = dn("rogue intermediate");
    int_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    int_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let intermediate = int_params.signed_by(&int_key, &ca).unwrap();
    let int_issuer = Issuer::new(int_params, int_key);

    let leaf_key = KeyPair::generate().unwrap();
    let mut leaf = CertificateParams::default();
    leaf.distinguished_name = dn(name);
    leaf.subject_alt_names = vec![SanType::URI(
        format!("sentinel://operator/{role}/{name}")
            .try_into()
            .unwrap(),
    )];
    leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    leaf.is_ca = IsCa::ExplicitNoCa;
    leaf.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    let leaf_cert = leaf.signed_by(&leaf_key, &int_issuer).unwrap();
    std::fs::write(
        fleet.certs.join(format!("operator-{name}.pem")),
        format!("{}{}", leaf_cert.pem(), intermediate.pem()),
    )
    .unwrap();
    std::fs::write(
        fleet.certs.join(format!("operator-{name}.key")),
        leaf_key.serialize_pem(),
    )
    .unwrap();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bound_address_is_read_from_text_and_json_log_lines() {
        let text = "2026-01-01T00:00:00Z  INFO sentinel: sentinel starting config=Config { listen: 127.0.0.1:0 }\n\
                    2026-01-01T00:00:00Z  INFO sentinel::server: controller listening (mTLS, gRPC) listen=127.0.0.1:37091 store=/x\n\
                    2026-01-01T00:00:00Z  INFO sentinel_daemon::metrics::serve: controller metrics listening (GET /metrics, Prometheus text format) listen=127.0.0.1:36115\n";
        assert_eq!(
            logged_addr(text, CONTROLLER_LISTENING),
            Some("127.0.0.1:37091".parse().unwrap())
        );
        assert_eq!(
            logged_addr(text, CONTROLLER_METRICS_LISTENING),
            Some("127.0.0.1:36115".parse().unwrap())
        );
        let json = "{\"level\":\"INFO\",\"message\":\"sentinel starting\",\"listen\":\"127.0.0.1:0\"}\n\
                    {\"level\":\"INFO\",\"message\":\"agent metrics listening (GET /metrics, Prometheus text format)\",\"listen\":\"127.0.0.1:40001\"}\n";
        assert_eq!(
            logged_addr(json, AGENT_METRICS_LISTENING),
            Some("127.0.0.1:40001".parse().unwrap())
        );
    }

    #[test]
    fn a_log_without_the_line_or_its_address_gives_none() {
        assert_eq!(logged_addr("", CONTROLLER_LISTENING), None);
        // The error line of a listener that could not bind is not the listening line.
        let refused = "ERROR x: agent metrics listener could not bind; running without metrics listen=127.0.0.1:9465";
        assert_eq!(logged_addr(refused, AGENT_METRICS_LISTENING), None);
        let garbled = "INFO x: controller listening (mTLS, gRPC) listen=nonsense";
        assert_eq!(logged_addr(garbled, CONTROLLER_LISTENING), None);
        let json = "{\"message\":\"controller listening (mTLS, gRPC)\"}";
        assert_eq!(logged_addr(json, CONTROLLER_LISTENING), None);
    }
}
