//! A tiny Compose app for deploy tests, in release bundles as the controller ships them: a
//! gzipped tar of `docker-compose.yml`, `.env` (holding [`SECRET`]) and a build context whose
//! image is `FROM scratch` plus Debian's static busybox (nothing can be pulled), serving
//! `/health` with `busybox httpd` on a host port of its own. Variants build, start and answer
//! in the ways a deploy must handle. [`FixtureApp`] removes its containers, networks and images
//! when dropped.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

use sha2::{Digest, Sha256};

use crate::ports::{self, Port};
use crate::run;

/// The variable in every bundle's `.env`.
pub const SECRET_NAME: &str = "DB_PASSWORD";
/// Its value: must never appear in a job event or the audit log.
pub const SECRET: &str = "s3cr3t-value";

/// How a release of the fixture app behaves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Variant {
    /// Builds, starts, answers `/health` with 200 and "version <v>", and its container
    /// health check passes.
    Healthy,
    /// `compose build` fails (a `RUN` step exits 3 after printing an error).
    BuildFails,
    /// Starts, but `/health` answers 404 and the container health check fails.
    Unhealthy,
    /// Starts and exits with code 1 right away (after printing its config, secret included).
    Exits,
}

/// A built bundle.
#[derive(Clone, Debug)]
pub struct Bundle {
    /// The `.tar.gz`.
    pub path: PathBuf,
    /// Its SHA-256, lowercase hex.
    pub sha256: String,
    /// Its size in bytes.
    pub size: u64,
}

/// One fixture app: a Compose project name, a host port, a work dir holding the bundles and
/// the app directory deploys go to. Dropping it removes what Docker made for the project.
pub struct FixtureApp {
    /// The Compose project name (unique per app, `[a-z0-9-]`).
    pub project: String,
    /// The loopback port the app's HTTP server is published on.
    pub port: u16,
    /// Docker binds it only while a release runs: reserved for the app's whole life.
    _port: Port,
    dir: tempfile::TempDir,
}

impl FixtureApp {
    /// A new app; `tag` (lowercase letters, digits, `-`) makes the project name readable.
    pub fn new(tag: &str) -> Self {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let project = format!(
            "st-{tag}-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let dir = tempfile::Builder::new()
            .prefix("sentinel-fixture-")
            .tempdir()
            .expect("creating a temp dir");
        let port = ports::reserve();
        Self {
            project,
            port: port.get(),
            _port: port,
            dir,
        }
    }

    /// Where deploys of this app go (not created).
    pub fn app_dir(&self) -> PathBuf {
        self.dir.path().join("app")
    }

    /// The URL answering "version <v>" when the app is healthy.
    pub fn health_url(&self) -> String {
        format!("http://127.0.0.1:{}/health", self.port)
    }

    /// Writes the bundle of release `version` (`[a-z0-9.-]`) in the given variant.
    pub fn bundle(&self, version: &str, variant: Variant) -> Bundle {
        self.bundle_on(version, variant, &self.port.to_string())
    }

    /// The bundle of a release for a blue/green environment: published on the slot's port,
    /// `${SENTINEL_PORT}`, which the agent sets per slot.
    pub fn slot_bundle(&self, version: &str, variant: Variant) -> Bundle {
        self.bundle_on(version, variant, "${SENTINEL_PORT}")
    }

    /// Ids of the containers of blue/green slot `slot` (`blue`, `green`), running or not.
    pub fn slot_container_ids(&self, slot: &str, all: bool) -> Vec<String> {
        let mut args = vec!["ps", "-q", "--no-trunc"];
        if all {
            args.push("-a");
        }
        let filter = format!("label=com.docker.compose.project={}-{slot}", self.project);
        args.extend(["--filter", &filter]);
        let out = run(Command::new("docker").args(&args));
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_string)
            .collect()
    }

    fn bundle_on(&self, version: &str, variant: Variant, port: &str) -> Bundle {
        let stage = self
            .dir
            .path()
            .join(format!("stage-{version}-{variant:?}").to_lowercase());
        let _ = fs::remove_dir_all(&stage);
        let app = stage.join("app");
        let www = app.join("www");
        fs::create_dir_all(&www).expect("creating the build context");
        fs::copy(busybox(), app.join("busybox")).expect("copying busybox");
        fs::write(www.join("index.html"), format!("fixture {version}\n")).expect("writing www");
        if variant != Variant::Unhealthy {
            fs::write(www.join("health"), format!("ok version {version}\n")).expect("writing www");
        }
        fs::write(
            app.join("Dockerfile"),
            dockerfile(&self.project, version, variant),
        )
        .expect("writing Dockerfile");
        fs::write(
            stage.join("docker-compose.yml"),
            compose_file(version, port),
        )
        .expect("writing docker-compose.yml");
        fs::write(
            stage.join(".env"),
            format!("# the app's secrets\n{SECRET_NAME}={SECRET}\n"),
        )
        .expect("writing .env");

        let path = self
            .dir
            .path()
            .join(format!("{version}-{variant:?}.tar.gz"));
        let out = run(Command::new("tar")
            .args(["--owner=0", "--group=0", "--numeric-owner", "-czf"])
            .arg(&path)
            .arg("-C")
            .arg(&stage)
            .arg("."));
        assert!(
            out.status.success(),
            "tar: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let bytes = fs::read(&path).expect("reading the bundle");
        Bundle {
            sha256: hex::encode(Sha256::digest(&bytes)),
            size: bytes.len() as u64,
            path,
        }
    }

    /// Ids of the project's containers (running or not).
    pub fn container_ids(&self) -> Vec<String> {
        let out = run(Command::new("docker").args([
            "ps",
            "-aq",
            "--no-trunc",
            "--filter",
            &format!("label=com.docker.compose.project={}", self.project),
        ]));
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_string)
            .collect()
    }
}

impl Drop for FixtureApp {
    fn drop(&mut self) {
        // `down --rmi local -v` with whichever release's compose file is still there.
        let releases = self.app_dir().join("releases");
        let file = fs::read_dir(&releases).ok().and_then(|entries| {
            entries
                .flatten()
                .map(|e| e.path().join("docker-compose.yml"))
                .find(|f| f.is_file())
        });
        if let Some(file) = file {
            let (program, prefix) = compose_program();
            let _ = Command::new(program)
                .args(prefix)
                .args(["-p", &self.project, "-f"])
                .arg(&file)
                .args(["down", "--rmi", "local", "-v", "--remove-orphans"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        // Whatever `down` could not reach: containers, then every image this app built
        // (rebuilds leave untagged ones behind), then the default network.
        let mut ids = self.container_ids();
        for slot in ["blue", "green"] {
            ids.extend(self.slot_container_ids(slot, true));
        }
        // A failed legacy build leaves its intermediate container; it inherits the label.
        let out = run(Command::new("docker").args([
            "ps",
            "-aq",
            "--no-trunc",
            "--filter",
            &format!("label=sentinel.fixture={}", self.project),
        ]));
        ids.extend(
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .map(str::to_string),
        );
        if !ids.is_empty() {
            quiet(Command::new("docker").args(["rm", "-f"]).args(&ids));
        }
        // With -a: intermediate images of the build cache carry the label too, and a parent
        // can only go once its children are gone, hence a few rounds.
        for _ in 0..3 {
            let out = run(Command::new("docker").args([
                "images",
                "-aq",
                "--filter",
                &format!("label=sentinel.fixture={}", self.project),
            ]));
            let mut images: Vec<String> = String::from_utf8_lossy(&out.stdout)
                .lines()
                .map(str::to_string)
                .collect();
            images.dedup();
            if images.is_empty() {
                break;
            }
            quiet(Command::new("docker").args(["rmi", "-f"]).args(&images));
        }
        quiet(Command::new("docker").args(["network", "rm", &format!("{}_default", self.project)]));
        for slot in ["blue", "green"] {
            quiet(Command::new("docker").args([
                "network",
                "rm",
                &format!("{}-{slot}_default", self.project),
            ]));
        }
    }
}

/// Removes the containers and default networks of the Compose projects `NAME-staging` and
/// `NAME-production` (and their blue/green slots, `NAME-ENV-blue`, `NAME-ENV-green`) that
/// deploys of app `name` made (the agents name a project after app and environment, which
/// [`FixtureApp`]'s own clean-up does not reach).
pub fn remove_environment_projects(name: &str) {
    for env in [
        "staging",
        "production",
        "staging-blue",
        "staging-green",
        "production-blue",
        "production-green",
    ] {
        let project = format!("{name}-{env}");
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
            quiet(Command::new("docker").args(["rm", "-f"]).args(&ids));
        }
        quiet(Command::new("docker").args(["network", "rm", &format!("{project}_default")]));
    }
}

fn quiet(cmd: &mut Command) {
    let _ = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// `docker compose` where the v2 plugin works, else `docker-compose`.
pub fn compose_program() -> (&'static str, &'static [&'static str]) {
    let v2 = Command::new("docker")
        .args(["compose", "version"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if v2 {
        ("docker", &["compose"])
    } else {
        ("docker-compose", &[])
    }
}

fn busybox() -> &'static Path {
    ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .map(Path::new)
        .find(|p| p.exists())
        .expect("busybox-static is not installed (apt-get install busybox-static)")
}

fn dockerfile(project: &str, version: &str, variant: Variant) -> String {
    let mut d = format!(
        "FROM scratch\nLABEL sentinel.fixture={project}\nCOPY busybox /bin/busybox\n\
         RUN [\"/bin/busybox\", \"--install\", \"-s\", \"/bin\"]\n"
    );
    if variant == Variant::BuildFails {
        d.push_str(&format!(
            "RUN [\"/bin/busybox\", \"sh\", \"-c\", \"echo compiling assets for {version}; echo 'error: assets failed to compile' >&2; exit 3\"]\n"
        ));
    }
    d.push_str("COPY www /www\n");
    // The app prints its config at start, secret included, as real apps sadly do.
    let start = "echo \\\"app $APP_VERSION starting with DB_PASSWORD=$DB_PASSWORD\\\"";
    let cmd = match variant {
        Variant::Exits => format!("{start}; echo 'fatal: cannot reach the database' >&2; exit 1"),
        // PID 1 ignores SIGTERM unless it handles it: without the trap every `down` would
        // wait out Docker's 10 s stop timeout.
        _ => {
            format!("{start}; trap 'exit 0' TERM; /bin/busybox httpd -f -v -p 8080 -h /www & wait")
        }
    };
    d.push_str(&format!(
        "CMD [\"/bin/busybox\", \"sh\", \"-c\", \"{cmd}\"]\n"
    ));
    d
}

fn compose_file(version: &str, port: &str) -> String {
    format!(
        r#"# Fixture app, release {version}.
version: "2.4"
services:
  web:
    build: ./app
    ports:
      - "127.0.0.1:{port}:8080"
    environment:
      APP_VERSION: "{version}"
      DB_PASSWORD: "${{DB_PASSWORD}}"
    healthcheck:
      test: ["CMD", "/bin/busybox", "wget", "-q", "-O", "/dev/null", "http://127.0.0.1:8080/health"]
      interval: 1s
      timeout: 2s
      retries: 2
"#
    )
}

/// A git repository whose commits are releases of the fixture app, as the deploy pipeline
/// reads them: no `.env` (secrets come from the controller) and the port as `${PORT}`.
pub struct ReleaseRepo {
    /// The working tree (the repository the controller clones).
    pub dir: PathBuf,
}

impl ReleaseRepo {
    /// A fresh repository at `path`, on branch `main`.
    pub fn new(path: PathBuf) -> Self {
        std::fs::create_dir_all(&path).unwrap();
        git(&path, &["init", "-q", "-b", "main"]);
        git(&path, &["config", "user.email", "ci@example.invalid"]);
        git(&path, &["config", "user.name", "ci"]);
        Self { dir: path }
    }

    /// Commits release `version` of `variant`; `tweak` may edit the tree first. Returns the sha.
    pub fn commit(
        &self,
        app: &FixtureApp,
        version: &str,
        variant: Variant,
        tweak: impl Fn(&Path),
    ) -> String {
        for entry in std::fs::read_dir(&self.dir).unwrap().flatten() {
            if entry.file_name() != ".git" {
                let p = entry.path();
                if p.is_dir() {
                    std::fs::remove_dir_all(&p).unwrap();
                } else {
                    std::fs::remove_file(&p).unwrap();
                }
            }
        }
        let bundle = app.bundle(version, variant);
        let out = run(Command::new("tar")
            .arg("-xzf")
            .arg(&bundle.path)
            .arg("-C")
            .arg(&self.dir));
        assert!(out.status.success());
        // Secrets come from the controller, per environment; so does the port.
        std::fs::remove_file(self.dir.join(".env")).unwrap();
        let compose = self.dir.join("docker-compose.yml");
        let text = std::fs::read_to_string(&compose).unwrap();
        let text = text.replace(
            &format!("127.0.0.1:{}:8080", app.port),
            "127.0.0.1:${PORT}:8080",
        );
        std::fs::write(&compose, text).unwrap();
        tweak(&self.dir);
        git(&self.dir, &["add", "-A"]);
        git(&self.dir, &["commit", "-q", "-m", version]);
        String::from_utf8(
            run(Command::new("git")
                .arg("-C")
                .arg(&self.dir)
                .args(["rev-parse", "HEAD"]))
            .stdout,
        )
        .unwrap()
        .trim()
        .to_string()
    }
}

/// A git repository at `path` (made once) with one commit of a compose file that starts
/// nothing: enough for the controller to build a bundle, for tests whose hosts never run it.
pub fn one_commit_repo(path: &Path) {
    if path.join(".git").exists() {
        return;
    }
    std::fs::create_dir_all(path).unwrap();
    git(path, &["init", "-q", "-b", "main"]);
    git(path, &["config", "user.email", "ci@example.invalid"]);
    git(path, &["config", "user.name", "ci"]);
    std::fs::write(path.join("docker-compose.yml"), "services: {}\n").unwrap();
    git(path, &["add", "-A"]);
    git(path, &["commit", "-q", "-m", "v1"]);
}

/// Runs `git -C dir args`, failing the test when it fails.
pub fn git(dir: &Path, args: &[&str]) {
    let out = run(Command::new("git").arg("-C").arg(dir).args(args));
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// What the app on `port` answers at /health (or the error), over plain HTTP/1.0.
pub fn served(port: u16) -> String {
    let attempt = || -> std::io::Result<String> {
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect(("127.0.0.1", port))?;
        stream.set_read_timeout(Some(std::time::Duration::from_secs(3)))?;
        stream.write_all(b"GET /health HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
        let mut out = String::new();
        stream.read_to_string(&mut out)?;
        Ok(out)
    };
    attempt().unwrap_or_else(|e| format!("error: {e}"))
}
