//! The nginx collector: whether nginx runs, its version, the `nginx -t` verdict, and what its
//! config serves: every `server` block's names, listens and proxy targets (upstream blocks
//! resolved to their servers), and the TLS certificates with subject, DNS names and expiry.
//!
//! nginx has no structured dump of its config (`nginx -T` only concatenates the files), so the
//! files are read by the small parser below: tokens, quoted strings, comments, blocks and
//! `include` (globs too), following nginx's own rules (`ngx_conf_file.c`). Relative paths
//! resolve as nginx resolves them: the main file, `pid` against the prefix; `include` and
//! `ssl_certificate` against the main file's directory. A file nginx would refuse to parse is
//! reported as `config_parse_error` naming the file and line; nothing in it can panic.
//!
//! `nginx -t` runs with `-c` (and `-p` when a prefix is configured) so that it checks the
//! configured files, with `-e /dev/null` so its messages come on stderr without timestamps (a
//! verdict that changes at every run would defeat the delta reports), and, when the agent is
//! not root and the config sets no `pid`, with a `pid` in the temp dir: `nginx -t` opens the
//! pid file, and the built-in one (`/run/nginx.pid`) is root's.

mod config;
mod served;

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use sentinel_proto::v1::{NginxCertificate, NginxServer, NginxState};

use super::CollectorError;
use crate::config::NginxCollectorConfig;
use config::{NginxConfigError, Parser};
use served::read_certificate;
use served::Served;
/// How long `nginx -V` and `nginx -t` may take. `-t` resolves upstream host names and loads
/// every certificate, so it gets more than a trivial command, but a hung resolver must not
/// stall the report loop.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(10);
/// nginx's built-in prefix, used when `nginx -V` does not name one.
const BUILTIN_PREFIX: &str = "/usr/local/nginx";

/// Reads nginx's state through its binary, its config files, its pid file and `/proc`.
pub struct NginxCollector {
    binary: String,
    config: PathBuf,
    prefix: Option<PathBuf>,
}

impl NginxCollector {
    /// A collector for the configured binary and config. Does no I/O: problems show up in
    /// [`collect`](Self::collect).
    pub fn new(config: &NginxCollectorConfig) -> Self {
        Self {
            binary: config.binary.clone(),
            config: config.config.clone(),
            prefix: config.prefix.clone(),
        }
    }

    /// One collection.
    ///
    /// Fails only when the binary cannot be run (`nginx -V`); a broken config is state, not a
    /// failure: `config_ok = false` with nginx's message, and `config_parse_error` when the
    /// agent could not read it either.
    pub async fn collect(&self) -> Result<NginxState, CollectorError> {
        let build = self.build_info().await?;
        let prefix = self
            .prefix
            .clone()
            .or_else(|| build.prefix.clone())
            .unwrap_or_else(|| PathBuf::from(BUILTIN_PREFIX));
        let config = full_name(&prefix, &self.config);
        let default_pid = build
            .pid_path
            .as_deref()
            .map(|p| full_name(&prefix, Path::new(p)))
            .unwrap_or_else(|| prefix.join("logs/nginx.pid"));
        let default_config = build
            .conf_path
            .as_deref()
            .map(|p| full_name(&prefix, Path::new(p)));

        let read = {
            let (config, prefix) = (config.clone(), prefix.clone());
            tokio::task::spawn_blocking(move || read_config(&config, &prefix))
                .await
                .map_err(|e| failed(format!("reading the config panicked: {e}")))?
        };
        let running = {
            let probe = RunningProbe {
                pid_file: read.pid_file.clone().unwrap_or(default_pid),
                config: config.clone(),
                default_config,
            };
            tokio::task::spawn_blocking(move || probe.running())
                .await
                .unwrap_or(false)
        };
        // Only when the config parsed do we know it sets no `pid`; adding one to a config that
        // has its own would make nginx refuse it as a duplicate.
        let temp_pid = read.error.is_none() && read.pid_file.is_none() && !is_root();
        let (config_ok, config_test_output) = self.test(&config, temp_pid).await;

        Ok(NginxState {
            running,
            version: build.version,
            config_ok,
            config_test_output,
            servers: read.servers,
            certificates: read.certificates,
            config_parse_error: read.error.map(|e| e.to_string()).unwrap_or_default(),
        })
    }

    /// `nginx -V`: the version and the paths nginx was built with.
    async fn build_info(&self) -> Result<BuildInfo, CollectorError> {
        let out = self.run(&["-V".into()]).await.map_err(failed)?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
        let info = BuildInfo::parse(&text);
        if !out.status.success() || info.version.is_empty() {
            return Err(failed(format!(
                "`{} -V` failed ({}): {}",
                self.binary,
                out.status,
                text.trim()
            )));
        }
        Ok(info)
    }

    /// `nginx -t`: the verdict and nginx's message.
    async fn test(&self, config: &Path, temp_pid: bool) -> (bool, String) {
        let mut args: Vec<OsString> = vec!["-t".into(), "-c".into(), config.into()];
        if let Some(prefix) = &self.prefix {
            args.extend(["-p".into(), prefix_arg(prefix)]);
        }
        if temp_pid {
            let pid = std::env::temp_dir()
                .join(format!("hostagent-nginx-test-{}.pid", std::process::id()));
            args.extend(["-g".into(), format!("pid {};", pid.display()).into()]);
        }
        let mut with_log = args.clone();
        with_log.extend(["-e".into(), "/dev/null".into()]);
        let mut result = self.run(&with_log).await;
        // `-e` exists since nginx 1.19.5; older ones refuse it, and get asked without it.
        if let Ok(out) = &result {
            if !out.status.success()
                && String::from_utf8_lossy(&out.stderr).contains("invalid option: \"e\"")
            {
                result = self.run(&args).await;
            }
        }
        match result {
            Ok(out) => {
                let text = format!(
                    "{}{}",
                    String::from_utf8_lossy(&out.stderr),
                    String::from_utf8_lossy(&out.stdout)
                );
                (out.status.success(), normalize_test_output(&text))
            }
            Err(message) => (false, message),
        }
    }

    /// Runs the binary with `args`, killing it after [`COMMAND_TIMEOUT`].
    async fn run(&self, args: &[OsString]) -> Result<std::process::Output, String> {
        let mut cmd = tokio::process::Command::new(&self.binary);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let shown = || {
            let args: Vec<_> = args.iter().map(|a| a.to_string_lossy()).collect();
            format!("{} {}", self.binary, args.join(" "))
        };
        match tokio::time::timeout(COMMAND_TIMEOUT, cmd.output()).await {
            Err(_) => Err(format!(
                "`{}` did not finish within {COMMAND_TIMEOUT:?}",
                shown()
            )),
            Ok(Err(e)) => Err(format!("cannot run `{}`: {e}", shown())),
            Ok(Ok(out)) => Ok(out),
        }
    }
}

fn failed(message: String) -> CollectorError {
    CollectorError::Failed {
        what: "nginx".into(),
        message,
    }
}

/// nginx wants the prefix with a trailing slash: it glues relative paths straight onto it.
fn prefix_arg(prefix: &Path) -> OsString {
    let mut arg = prefix.as_os_str().to_owned();
    if !prefix.as_os_str().to_string_lossy().ends_with('/') {
        arg.push("/");
    }
    arg
}

/// A path as nginx resolves it against a prefix: absolute paths stay, relative ones join.
pub(super) fn full_name(prefix: &Path, path: &Path) -> PathBuf {
    if path.is_absolute() {
        path.to_path_buf()
    } else {
        prefix.join(path)
    }
}

/// Whether this process runs as root (it then needs no help for `nginx -t`).
fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    // `/proc/self` belongs to the process's effective user; without procfs, assume root and
    // leave nginx's command line as configured.
    std::fs::metadata("/proc/self").map_or(true, |m| m.uid() == 0)
}

/// Makes `nginx -t` output the same from run to run: error-log lines
/// (`2026/11/26 23:22:40 [emerg] 14107#14107: message`) lose their time and process ids, and
/// read like nginx's stderr lines (`nginx: [emerg] message`).
fn normalize_test_output(text: &str) -> String {
    text.lines()
        .map(|line| match strip_log_prefix(line) {
            Some((level, message)) => format!("nginx: [{level}] {message}"),
            None => line.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n")
        .trim()
        .to_string()
}

/// Splits `YYYY/MM/DD HH:MM:SS [level] PID#TID: message` into level and message.
fn strip_log_prefix(line: &str) -> Option<(&str, &str)> {
    let stamp = line.get(..19)?;
    let shape_ok = stamp.char_indices().all(|(i, c)| match i {
        4 | 7 => c == '/',
        10 => c == ' ',
        13 | 16 => c == ':',
        _ => c.is_ascii_digit(),
    });
    if !shape_ok {
        return None;
    }
    let rest = line.get(19..)?.strip_prefix(" [")?;
    let (level, rest) = rest.split_once("] ")?;
    let (ids, message) = rest.split_once(": ")?;
    let ids_ok = ids
        .split('#')
        .all(|n| n.bytes().all(|b| b.is_ascii_digit()));
    ids_ok.then_some((level, message))
}

/// What `nginx -V` says.
#[derive(Debug, Default, PartialEq)]
struct BuildInfo {
    /// E.g. `nginx/1.22.1` (or `openresty/1.21.4.1`).
    version: String,
    prefix: Option<PathBuf>,
    conf_path: Option<String>,
    pid_path: Option<String>,
}

impl BuildInfo {
    fn parse(text: &str) -> Self {
        let mut info = Self::default();
        for line in text.lines() {
            if let Some(v) = line.strip_prefix("nginx version: ") {
                info.version = v.trim().to_string();
            }
            if let Some(args) = line.strip_prefix("configure arguments:") {
                for arg in args.split_whitespace() {
                    if let Some(v) = arg.strip_prefix("--prefix=") {
                        info.prefix = Some(PathBuf::from(v));
                    } else if let Some(v) = arg.strip_prefix("--conf-path=") {
                        info.conf_path = Some(v.to_string());
                    } else if let Some(v) = arg.strip_prefix("--pid-path=") {
                        info.pid_path = Some(v.to_string());
                    }
                }
            }
        }
        info
    }
}

// ---------------------------------------------------------------------------------------------
// Is it running?

/// Finds out whether the nginx of this config runs: its pid file first, then (pid file gone
/// or stale) a master process in `/proc` started with this config.
struct RunningProbe {
    pid_file: PathBuf,
    config: PathBuf,
    /// The config nginx reads when started without `-c`.
    default_config: Option<PathBuf>,
}

impl RunningProbe {
    fn running(&self) -> bool {
        let from_pid_file = std::fs::read_to_string(&self.pid_file)
            .ok()
            .and_then(|text| text.trim().parse::<u32>().ok())
            .is_some_and(is_nginx_process);
        from_pid_file || self.master_in_proc()
    }

    fn master_in_proc(&self) -> bool {
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return false;
        };
        // Containers' nginx processes show up in the host's /proc too; only those that see
        // our file system count.
        let own_ns = std::fs::read_link("/proc/self/ns/mnt").ok();
        let want = canonical(&self.config);
        entries.flatten().any(|entry| {
            let name = entry.file_name();
            let Some(pid) = name.to_str().and_then(|n| n.parse::<u32>().ok()) else {
                return false;
            };
            let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
                return false;
            };
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            let Some(args) = cmdline.trim().strip_prefix("nginx: master process ") else {
                return false;
            };
            let same_ns = own_ns.is_some()
                && std::fs::read_link(format!("/proc/{pid}/ns/mnt")).ok() == own_ns;
            same_ns && self.started_with_our_config(args, &want)
        })
    }

    /// Whether a master's command line (`/usr/sbin/nginx -c /etc/nginx/nginx.conf -p ...`)
    /// names our config.
    fn started_with_our_config(&self, args: &str, want: &Path) -> bool {
        let mut words = args.split_whitespace().skip(1);
        let mut config = None;
        while let Some(word) = words.next() {
            if word == "-c" {
                config = words.next().map(PathBuf::from);
            } else if let Some(path) = word.strip_prefix("-c") {
                config = Some(PathBuf::from(path));
            }
        }
        let config = match config {
            // A relative -c is relative to the master's prefix, which we cannot see reliably;
            // compare what we can.
            Some(path) if path.is_absolute() => path,
            Some(_) => return false,
            None => match &self.default_config {
                Some(default) => default.clone(),
                None => return false,
            },
        };
        canonical(&config) == want
    }
}

pub(super) fn canonical(path: &Path) -> PathBuf {
    std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf())
}

/// Whether `pid` is a live nginx process (a stale pid file may name a recycled pid).
fn is_nginx_process(pid: u32) -> bool {
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    if comm.trim() == "nginx" {
        return true;
    }
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| c.starts_with(b"nginx: "))
        .unwrap_or(false)
}

// ---------------------------------------------------------------------------------------------
// The config: parser.

/// What the agent read from the config files.
#[derive(Debug, Default)]
struct ConfigRead {
    servers: Vec<NginxServer>,
    certificates: Vec<NginxCertificate>,
    /// The `pid` directive's file, when the config sets one.
    pid_file: Option<PathBuf>,
    error: Option<NginxConfigError>,
}

/// Parses the main config at `config` (with its includes) and reads the certificates it
/// names. Blocking: runs on a blocking thread.
fn read_config(config: &Path, prefix: &Path) -> ConfigRead {
    let tree = match Parser::parse_main(config) {
        Ok(tree) => tree,
        Err(error) => {
            return ConfigRead {
                error: Some(error),
                ..ConfigRead::default()
            }
        }
    };
    let conf_dir = config.parent().unwrap_or(Path::new("/"));
    let served = Served::from_tree(&tree, conf_dir);
    let certificates = served
        .certificates
        .into_iter()
        .map(|(path, served_for)| read_certificate(&path, served_for))
        .collect();
    let pid_file = tree
        .iter()
        .filter(|d| d.name == "pid")
        .filter_map(|d| d.arg(0))
        .next_back()
        .map(|p| full_name(prefix, Path::new(p)));
    ConfigRead {
        servers: served.servers,
        certificates,
        pid_file,
        error: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_output_loses_timestamps_and_pids() {
        let out = normalize_test_output(
            "2026/11/26 23:22:40 [emerg] 14107#14107: unknown directive \"x\" in /a.conf:3\n\
             nginx: configuration file /a.conf test failed\n",
        );
        assert_eq!(
            out,
            "nginx: [emerg] unknown directive \"x\" in /a.conf:3\n\
             nginx: configuration file /a.conf test failed"
        );
    }

    #[test]
    fn build_info_comes_from_nginx_dash_capital_v() {
        let info = BuildInfo::parse(
            "nginx version: nginx/1.22.1\nbuilt with OpenSSL 3.0\n\
             configure arguments: --with-cc-opt='-g -O2' --prefix=/usr/share/nginx \
             --conf-path=/etc/nginx/nginx.conf --pid-path=/run/nginx.pid --with-debug\n",
        );
        assert_eq!(info.version, "nginx/1.22.1");
        assert_eq!(info.prefix.as_deref(), Some(Path::new("/usr/share/nginx")));
        assert_eq!(info.conf_path.as_deref(), Some("/etc/nginx/nginx.conf"));
        assert_eq!(info.pid_path.as_deref(), Some("/run/nginx.pid"));
    }

    #[test]
    fn a_master_is_matched_by_its_config() {
        let probe = RunningProbe {
            pid_file: PathBuf::from("/nonexistent/nginx.pid"),
            config: PathBuf::from("/nonexistent/a.conf"),
            default_config: Some(PathBuf::from("/nonexistent/default.conf")),
        };
        let want = PathBuf::from("/nonexistent/a.conf");
        assert!(probe.started_with_our_config("/usr/sbin/nginx -c /nonexistent/a.conf", &want));
        assert!(probe.started_with_our_config("/usr/sbin/nginx -c/nonexistent/a.conf", &want));
        assert!(!probe.started_with_our_config("/usr/sbin/nginx -c /other.conf", &want));
        assert!(!probe.started_with_our_config("/usr/sbin/nginx -g daemon off;", &want));
        let default = PathBuf::from("/nonexistent/default.conf");
        assert!(probe.started_with_our_config("/usr/sbin/nginx -g daemon off;", &default));
    }
}
