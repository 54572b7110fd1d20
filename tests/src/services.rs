//! Throwaway nginx and Redis instances for tests: Debian's `nginx` and `redis-server` run on
//! loopback ports reserved by [`crate::ports`] (a start that finds one taken is retried) with everything (config, pid file, logs, data) in a temp dir, and are
//! killed when dropped. The system services are never touched.
//!
//! Binaries: `SENTINEL_NGINX` / `SENTINEL_REDIS_SERVER` / `SENTINEL_REDIS_CLI` when set, else
//! Debian's paths, else `PATH`.

use std::fs;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::ports::{self, Port};
use crate::{patience, run, Proc};

fn binary(env: &str, debian: &str, name: &str) -> PathBuf {
    if let Ok(path) = std::env::var(env) {
        return PathBuf::from(path);
    }
    if Path::new(debian).exists() {
        return PathBuf::from(debian);
    }
    PathBuf::from(name)
}

/// The nginx binary the tests run.
pub fn nginx_binary() -> PathBuf {
    binary("SENTINEL_NGINX", "/usr/sbin/nginx", "nginx")
}

fn redis_server_binary() -> PathBuf {
    binary(
        "SENTINEL_REDIS_SERVER",
        "/usr/bin/redis-server",
        "redis-server",
    )
}

fn redis_cli_binary() -> PathBuf {
    binary("SENTINEL_REDIS_CLI", "/usr/bin/redis-cli", "redis-cli")
}

fn temp_dir(prefix: &str) -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .expect("creating a temp dir");
    // Services may drop privileges (nginx's workers run as `nobody` under root): let them in.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755))
            .expect("opening the temp dir's permissions");
    }
    dir
}

fn accepts(port: u16) -> bool {
    TcpStream::connect_timeout(
        &format!("127.0.0.1:{port}")
            .parse()
            .expect("a socket address"),
        Duration::from_millis(200),
    )
    .is_ok()
}

// ---------------------------------------------------------------------------------------------

/// TLS files for [`RedisServer::start_tls`].
pub struct RedisTls {
    /// The server certificate (PEM).
    pub cert: PathBuf,
    /// Its key (PEM).
    pub key: PathBuf,
    /// The CA that signed it (PEM).
    pub ca: PathBuf,
}

/// A throwaway `redis-server` on 127.0.0.1, no persistence to speak of, killed on drop.
pub struct RedisServer {
    proc: Option<Proc>,
    /// Kept after [`stop`](Self::stop): the URL of a stopped server must find nothing.
    _port: Option<Port>,
    dir: tempfile::TempDir,
    /// The (TLS, for [`start_tls`](Self::start_tls)) port.
    pub port: u16,
    /// `redis://127.0.0.1:PORT/0` (`rediss://` with TLS), without credentials.
    pub url: String,
    password: Option<String>,
    tls: Option<RedisTls>,
}

impl RedisServer {
    /// Starts a server, with `requirepass` when `password` is given, and waits until it
    /// answers `PING`.
    pub fn start(password: Option<&str>) -> Self {
        Self::launch(password, None)
    }

    /// Starts a TLS-only server (`rediss://`) with these files; clients need not present a
    /// certificate.
    pub fn start_tls(password: Option<&str>, tls: RedisTls) -> Self {
        Self::launch(password, Some(tls))
    }

    fn launch(password: Option<&str>, tls: Option<RedisTls>) -> Self {
        let dir = temp_dir("sentinel-redis-");
        let mut server = Self {
            proc: None,
            _port: None,
            dir,
            port: 0,
            url: String::new(),
            password: password.map(str::to_string),
            tls,
        };
        let ((), [port]) = ports::start_on_ports("redis-server", |[port]| {
            server.port = port;
            let scheme = if server.tls.is_some() {
                "rediss"
            } else {
                "redis"
            };
            server.url = format!("{scheme}://127.0.0.1:{port}/0");
            let config = server.dir.path().join("redis.conf");
            fs::write(&config, server.config_text()).expect("writing redis.conf");
            let mut cmd = Command::new(redis_server_binary());
            cmd.arg(&config);
            let log = server.dir.path().join(format!("redis-{port}.log"));
            server.proc = Some(Proc::spawn(cmd, log, "redis-server"));
            if server.wait_ready() {
                return Ok(());
            }
            let mut proc = server.proc.take().expect("the redis-server process");
            proc.stop();
            Err(proc.log_text())
        });
        server._port = Some(port);
        server
    }

    fn config_text(&self) -> String {
        let dir = self.dir.path().display();
        let mut text = format!(
            "bind 127.0.0.1\nprotected-mode no\ndaemonize no\ndir {dir}\nlogfile \"\"\n\
             save \"\"\nappendonly no\n"
        );
        match &self.tls {
            Some(tls) => text.push_str(&format!(
                "port 0\ntls-port {}\ntls-cert-file {}\ntls-key-file {}\ntls-ca-cert-file {}\n\
                 tls-auth-clients no\n",
                self.port,
                tls.cert.display(),
                tls.key.display(),
                tls.ca.display()
            )),
            None => text.push_str(&format!("port {}\n", self.port)),
        }
        if let Some(password) = &self.password {
            text.push_str(&format!("requirepass \"{password}\"\n"));
        }
        text
    }

    /// Waits until the server answers `PING`; false when it exited (its log says why).
    fn wait_ready(&mut self) -> bool {
        let deadline = Instant::now() + patience();
        while Instant::now() < deadline {
            if !self.proc.as_mut().is_some_and(|proc| proc.is_running()) {
                return false;
            }
            if self.try_cli(&["PING"]).is_ok_and(|out| out == "PONG") {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }

    fn try_cli(&self, args: &[&str]) -> Result<String, String> {
        let mut cmd = Command::new(redis_cli_binary());
        cmd.args(["-h", "127.0.0.1", "-p", &self.port.to_string()]);
        if let Some(password) = &self.password {
            cmd.args(["-a", password, "--no-auth-warning"]);
        }
        if let Some(tls) = &self.tls {
            cmd.arg("--tls").arg("--cacert").arg(&tls.ca);
        }
        let out = run(cmd.args(args));
        let stdout = String::from_utf8_lossy(&out.stdout).trim().to_string();
        // redis-cli exits 0 on server errors, printing them as "ERR ..." / "NOAUTH ...".
        if out.status.success() && !stdout.starts_with("ERR") && !stdout.starts_with("NOAUTH") {
            Ok(stdout)
        } else {
            Err(format!(
                "{stdout}{}",
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    }

    /// Runs one command through `redis-cli` (authenticated) and returns its output; panics
    /// when it fails.
    pub fn cli(&self, args: &[&str]) -> String {
        self.try_cli(args)
            .unwrap_or_else(|e| panic!("redis-cli {args:?} failed: {e}"))
    }

    /// Sends a signal to the server (e.g. "STOP" to make it hang, "CONT" to resume it).
    pub fn signal(&self, sig: &str) {
        if let Some(proc) = &self.proc {
            proc.signal(sig);
        }
    }

    /// Stops the server (SIGTERM, then waits); the port then refuses connections.
    pub fn stop(&mut self) {
        if let Some(mut proc) = self.proc.take() {
            proc.stop();
        }
    }

    /// The temp dir holding its config and data (for password files and the like).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

// ---------------------------------------------------------------------------------------------

/// A throwaway nginx prefix: `conf/`, `logs/` and `temp/` in a temp dir, for configs the
/// test writes, and an nginx it can run on them.
pub struct Nginx {
    dir: tempfile::TempDir,
    proc: Option<Proc>,
    /// The ports of its configs, kept after [`stop`](Self::stop) (the config still names them).
    ports: Vec<Port>,
}

impl Default for Nginx {
    fn default() -> Self {
        Self::new()
    }
}

impl Nginx {
    /// An empty prefix; nothing runs yet.
    pub fn new() -> Self {
        let dir = temp_dir("sentinel-nginx-");
        for sub in ["conf", "logs", "temp"] {
            fs::create_dir_all(dir.path().join(sub)).expect("creating the nginx prefix");
        }
        Self {
            dir,
            proc: None,
            ports: Vec::new(),
        }
    }

    /// The prefix (`nginx -p`), without a trailing slash.
    pub fn prefix(&self) -> &Path {
        self.dir.path()
    }

    /// The pid file [`main_config`](Self::main_config) sets.
    pub fn pid_file(&self) -> PathBuf {
        self.prefix().join("logs/nginx.pid")
    }

    /// Writes `text` to `relative` (e.g. `conf/sites/a.conf`) under the prefix, creating
    /// directories; returns the absolute path.
    pub fn write(&self, relative: &str, text: &str) -> PathBuf {
        let path = self.prefix().join(relative);
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).expect("creating a config dir");
        }
        fs::write(&path, text).expect("writing an nginx file");
        path
    }

    /// A main config that keeps everything in the prefix (pid, logs, temp files: nginx runs,
    /// and `nginx -t` passes, without root), with `http_body` inside `http { }`.
    pub fn main_config(&self, http_body: &str) -> String {
        let p = self.prefix().display();
        format!(
            "pid {p}/logs/nginx.pid;\n\
             error_log {p}/logs/error.log;\n\
             worker_processes 1;\n\
             events {{\n    worker_connections 64;\n}}\n\
             http {{\n\
             \x20   access_log {p}/logs/access.log;\n\
             \x20   client_body_temp_path {p}/temp/body;\n\
             \x20   proxy_temp_path {p}/temp/proxy;\n\
             \x20   fastcgi_temp_path {p}/temp/fastcgi;\n\
             \x20   uwsgi_temp_path {p}/temp/uwsgi;\n\
             \x20   scgi_temp_path {p}/temp/scgi;\n\
             {http_body}\n}}\n"
        )
    }

    /// Starts nginx in the foreground on reserved ports: `write` gets their numbers and
    /// writes the config (returning the main config's path), rewritten on fresh ports should
    /// one be taken. Waits until the first port accepts connections and the pid file is
    /// written; returns the config and the ports.
    pub fn start<const N: usize>(
        &mut self,
        mut write: impl FnMut(&Self, [u16; N]) -> PathBuf,
    ) -> (PathBuf, [u16; N]) {
        let ((config, numbers), held) = ports::start_on_ports("nginx", |numbers| {
            let config = write(self, numbers);
            self.try_start(&config, numbers[0])?;
            Ok((config, numbers))
        });
        self.ports.extend(held);
        (config, numbers)
    }

    fn try_start(&mut self, config: &Path, port: u16) -> Result<(), String> {
        let mut cmd = Command::new(nginx_binary());
        cmd.arg("-p")
            .arg(format!("{}/", self.prefix().display()))
            .arg("-c")
            .arg(config)
            .args(["-g", "daemon off;"]);
        let log = self.prefix().join("logs/stderr.log");
        self.proc = Some(Proc::spawn(cmd, log, "nginx"));
        let deadline = Instant::now() + patience();
        while Instant::now() < deadline {
            let proc = self.proc.as_mut().expect("the nginx process");
            if !proc.is_running() {
                let failure = format!(
                    "nginx exited at start:\n{}\n{}",
                    proc.log_text(),
                    fs::read_to_string(self.prefix().join("logs/error.log")).unwrap_or_default()
                );
                self.proc = None;
                return Err(failure);
            }
            if accepts(port) && self.pid_file().exists() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(format!(
            "nginx did not accept connections on port {port} within {:?}",
            patience()
        ))
    }

    /// Stops nginx (SIGTERM: a fast shutdown that removes the pid file).
    pub fn stop(&mut self) {
        if let Some(mut proc) = self.proc.take() {
            proc.stop();
        }
    }
}
