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

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use sentinel_proto::v1::{NginxCertificate, NginxRoute, NginxServer, NginxState};

use super::CollectorError;
use crate::config::NginxCollectorConfig;

/// How long `nginx -V` and `nginx -t` may take. `-t` resolves upstream host names and loads
/// every certificate, so it gets more than a trivial command, but a hung resolver must not
/// stall the report loop.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(10);
/// Includes nested deeper than this are a cycle in all but name.
const MAX_INCLUDE_DEPTH: usize = 32;
/// Blocks nested deeper than this are refused, so that hostile input cannot exhaust the stack
/// of the recursive parser (real configs nest a handful of levels).
const MAX_BLOCK_DEPTH: usize = 64;
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
fn full_name(prefix: &Path, path: &Path) -> PathBuf {
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

fn canonical(path: &Path) -> PathBuf {
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

/// A config nginx's syntax does not allow, or files that could not be read.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum NginxConfigError {
    /// Bad syntax, or an `include` that fails, at a file and line.
    #[error("{}:{line}: {message}", file.display())]
    Syntax {
        /// The file.
        file: PathBuf,
        /// 1-based line.
        line: usize,
        /// What is wrong.
        message: String,
    },
    /// The main config file could not be read.
    #[error("cannot read {}: {message}", file.display())]
    Read {
        /// The file.
        file: PathBuf,
        /// The I/O error.
        message: String,
    },
}

/// One directive, with the block it opens (`server { ... }`) if any.
#[derive(Debug, Clone, PartialEq)]
struct Directive {
    name: String,
    args: Vec<String>,
    block: Option<Vec<Directive>>,
    /// Where it is written, for `NginxServer::source`.
    file: Arc<Path>,
    line: usize,
}

impl Directive {
    fn children(&self) -> &[Directive] {
        self.block.as_deref().unwrap_or_default()
    }

    fn arg(&self, i: usize) -> Option<&str> {
        self.args.get(i).map(String::as_str)
    }
}

/// A tokenized file: each token with its line, and the number of the last line.
struct Lexed {
    tokens: Vec<(Token, usize)>,
    last_line: usize,
}

#[derive(Debug, Clone, PartialEq)]
enum Token {
    Word(String),
    Semicolon,
    Open,
    Close,
}

/// Splits a config file into tokens with their lines, by `ngx_conf_read_token`'s rules:
/// `#` starts a comment only where a token could start; quoted strings take `\"`, `\'`, `\\`,
/// `\t`, `\r` and `\n` escapes and must be followed by a separator; in bare words a backslash
/// protects the next character and `${` does not open a block. Returns the tokens and the
/// number of the last line (for "unexpected end of file"), or the line and reason of a lexical
/// error.
fn tokenize(text: &str) -> Result<Lexed, (usize, String)> {
    let mut tokens = Vec::new();
    let mut chars = text.chars().peekable();
    let mut line = 1;
    while let Some(c) = chars.next() {
        match c {
            '\n' => line += 1,
            ' ' | '\t' | '\r' => {}
            '#' => while chars.next_if(|&c| c != '\n').is_some() {},
            ';' => tokens.push((Token::Semicolon, line)),
            '{' => tokens.push((Token::Open, line)),
            '}' => tokens.push((Token::Close, line)),
            '"' | '\'' => {
                let start = line;
                let mut word = String::new();
                loop {
                    match chars.next() {
                        None => return Err((start, format!("unterminated string (missing {c})"))),
                        Some('\\') => match chars.next() {
                            Some(escaped) => unescape(escaped, &mut word, &mut line),
                            None => {
                                return Err((start, format!("unterminated string (missing {c})")))
                            }
                        },
                        Some(q) if q == c => break,
                        Some(other) => {
                            if other == '\n' {
                                line += 1;
                            }
                            word.push(other);
                        }
                    }
                }
                match chars.peek() {
                    None | Some(' ' | '\t' | '\r' | '\n' | ';' | '{') => {}
                    Some(other) => {
                        return Err((
                            line,
                            format!("unexpected \"{other}\" after a quoted string"),
                        ))
                    }
                }
                tokens.push((Token::Word(word), start));
            }
            first => {
                let start = line;
                let mut word = String::new();
                let mut current = first;
                loop {
                    if current == '\\' {
                        match chars.next() {
                            Some(escaped) => unescape(escaped, &mut word, &mut line),
                            None => word.push('\\'),
                        }
                    } else {
                        word.push(current);
                    }
                    // `${name}` is a variable, not a block.
                    let variable = current == '$';
                    match chars.next_if(|&c| {
                        !matches!(c, ' ' | '\t' | '\r' | '\n' | ';') && (c != '{' || variable)
                    }) {
                        Some(next) => current = next,
                        None => break,
                    }
                }
                tokens.push((Token::Word(word), start));
            }
        }
    }
    Ok(Lexed {
        tokens,
        last_line: line,
    })
}

/// Appends the character a backslash escape stands for, as nginx does.
fn unescape(escaped: char, word: &mut String, line: &mut usize) {
    match escaped {
        '"' | '\'' | '\\' => word.push(escaped),
        't' => word.push('\t'),
        'r' => word.push('\r'),
        'n' => word.push('\n'),
        other => {
            // Anything else keeps its backslash: regexes such as `\.php$` rely on it.
            if other == '\n' {
                *line += 1;
            }
            word.push('\\');
            word.push(other);
        }
    }
}

/// Reads a main config file and everything it includes into one tree.
struct Parser {
    /// Where relative `include` paths start: the main file's directory (nginx's conf prefix).
    conf_dir: PathBuf,
    /// The files being parsed, outermost first, to refuse include cycles.
    stack: Vec<PathBuf>,
}

impl Parser {
    fn parse_main(path: &Path) -> Result<Vec<Directive>, NginxConfigError> {
        let text = std::fs::read(path).map_err(|e| NginxConfigError::Read {
            file: path.to_path_buf(),
            message: e.to_string(),
        })?;
        let mut parser = Parser {
            conf_dir: path.parent().map(Path::to_path_buf).unwrap_or_default(),
            stack: vec![canonical(path)],
        };
        parser.parse_text(path, &String::from_utf8_lossy(&text))
    }

    fn parse_text(&mut self, path: &Path, text: &str) -> Result<Vec<Directive>, NginxConfigError> {
        let file: Arc<Path> = Arc::from(path);
        let Lexed { tokens, last_line } =
            tokenize(text).map_err(|(line, message)| syntax(&file, line, message))?;
        let mut pos = 0;
        self.block(&tokens, &mut pos, &file, last_line, None, 0)
    }

    /// Parses directives up to the `}` that closes the block opened on line `opened` (or to
    /// the end of the file when `opened` is `None`).
    fn block(
        &mut self,
        tokens: &[(Token, usize)],
        pos: &mut usize,
        file: &Arc<Path>,
        last_line: usize,
        opened: Option<usize>,
        depth: usize,
    ) -> Result<Vec<Directive>, NginxConfigError> {
        let mut out = Vec::new();
        let mut words: Vec<String> = Vec::new();
        let mut first_line = 0;
        loop {
            let Some((token, line)) = tokens.get(*pos) else {
                if !words.is_empty() {
                    return Err(syntax(
                        file,
                        last_line,
                        format!(
                            "unexpected end of file, expecting \";\" or \"}}\" after \"{}\"",
                            words[0]
                        ),
                    ));
                }
                if let Some(opened) = opened {
                    return Err(syntax(
                        file,
                        last_line,
                        format!(
                            "unexpected end of file, expecting \"}}\" to close the block opened on line {opened}"
                        ),
                    ));
                }
                return Ok(out);
            };
            let line = *line;
            *pos += 1;
            match token {
                Token::Word(word) => {
                    if words.is_empty() {
                        first_line = line;
                    }
                    words.push(word.clone());
                }
                Token::Semicolon => {
                    let Some((name, args)) = split_first(std::mem::take(&mut words)) else {
                        return Err(syntax(file, line, "unexpected \";\"".into()));
                    };
                    if name == "include" {
                        let included = self.include(&args, file, first_line)?;
                        out.extend(included);
                    } else {
                        out.push(Directive {
                            name,
                            args,
                            block: None,
                            file: file.clone(),
                            line: first_line,
                        });
                    }
                }
                Token::Open => {
                    let Some((name, args)) = split_first(std::mem::take(&mut words)) else {
                        return Err(syntax(file, line, "unexpected \"{\"".into()));
                    };
                    if depth >= MAX_BLOCK_DEPTH {
                        return Err(syntax(
                            file,
                            line,
                            format!("blocks nested deeper than {MAX_BLOCK_DEPTH} levels"),
                        ));
                    }
                    let block = self.block(tokens, pos, file, last_line, Some(line), depth + 1)?;
                    out.push(Directive {
                        name,
                        args,
                        block: Some(block),
                        file: file.clone(),
                        line: first_line,
                    });
                }
                Token::Close => {
                    if let Some(name) = words.first() {
                        return Err(syntax(
                            file,
                            line,
                            format!("unexpected \"}}\": \"{name}\" is missing its \";\""),
                        ));
                    }
                    if opened.is_none() {
                        return Err(syntax(file, line, "unexpected \"}\"".into()));
                    }
                    return Ok(out);
                }
            }
        }
    }

    /// Expands `include PATTERN;` into the directives of the files it names, in the order
    /// nginx reads them (glob matches sorted, no match being no error).
    fn include(
        &mut self,
        args: &[String],
        file: &Arc<Path>,
        line: usize,
    ) -> Result<Vec<Directive>, NginxConfigError> {
        let [pattern] = args else {
            return Err(syntax(
                file,
                line,
                format!("\"include\" takes one argument, not {}", args.len()),
            ));
        };
        let path = self.conf_dir.join(pattern);
        let files = if pattern.contains(['*', '?', '[']) {
            let options = glob::MatchOptions {
                case_sensitive: true,
                require_literal_separator: true,
                // Like glob(3), which nginx uses: `*` does not match dot files.
                require_literal_leading_dot: true,
            };
            let matches = glob::glob_with(&path.to_string_lossy(), options).map_err(|e| {
                syntax(
                    file,
                    line,
                    format!("bad include pattern \"{pattern}\": {e}"),
                )
            })?;
            // Unreadable directories are skipped, as glob(3) without GLOB_ERR does.
            matches.flatten().collect()
        } else {
            vec![path]
        };
        if self.stack.len() > MAX_INCLUDE_DEPTH {
            return Err(syntax(
                file,
                line,
                format!("includes nested deeper than {MAX_INCLUDE_DEPTH} levels"),
            ));
        }
        let mut out = Vec::new();
        for included in files {
            let key = canonical(&included);
            if self.stack.contains(&key) {
                return Err(syntax(
                    file,
                    line,
                    format!("include cycle: {} includes itself", included.display()),
                ));
            }
            let text = std::fs::read(&included).map_err(|e| {
                syntax(
                    file,
                    line,
                    format!(
                        "include \"{pattern}\": cannot read {}: {e}",
                        included.display()
                    ),
                )
            })?;
            self.stack.push(key);
            let parsed = self.parse_text(&included, &String::from_utf8_lossy(&text));
            self.stack.pop();
            out.extend(parsed?);
        }
        Ok(out)
    }
}

fn split_first(mut words: Vec<String>) -> Option<(String, Vec<String>)> {
    if words.is_empty() {
        return None;
    }
    let name = words.remove(0);
    Some((name, words))
}

fn syntax(file: &Arc<Path>, line: usize, message: String) -> NginxConfigError {
    NginxConfigError::Syntax {
        file: file.to_path_buf(),
        line,
        message,
    }
}

// ---------------------------------------------------------------------------------------------
// The config: what it serves.

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

/// The servers of a parsed config and the certificate files they use.
#[derive(Debug, Default)]
struct Served {
    servers: Vec<NginxServer>,
    /// Certificate path (as written, resolved) → the server names that serve it.
    certificates: BTreeMap<String, BTreeSet<String>>,
}

impl Served {
    fn from_tree(tree: &[Directive], conf_dir: &Path) -> Self {
        let mut out = Self::default();
        let http: Vec<&Directive> = tree.iter().filter(|d| d.name == "http").collect();
        // Upstreams may be declared after the servers that use them.
        let upstreams: BTreeMap<&str, Vec<String>> = http
            .iter()
            .flat_map(|h| h.children())
            .filter(|d| d.name == "upstream" && d.block.is_some())
            .filter_map(|u| {
                let servers = u
                    .children()
                    .iter()
                    .filter(|d| d.name == "server")
                    .filter_map(|d| d.arg(0).map(str::to_string))
                    .collect();
                u.arg(0).map(|name| (name, servers))
            })
            .collect();
        for h in http {
            // A server without its own ssl_certificate inherits the http level's.
            let inherited = cert_paths(h.children(), conf_dir);
            for server in h
                .children()
                .iter()
                .filter(|d| d.name == "server" && d.block.is_some())
            {
                out.add_server(server, &inherited, &upstreams, conf_dir);
            }
        }
        out
    }

    fn add_server(
        &mut self,
        server: &Directive,
        inherited: &[String],
        upstreams: &BTreeMap<&str, Vec<String>>,
        conf_dir: &Path,
    ) {
        let directives = server.children();
        let server_names: Vec<String> = directives
            .iter()
            .filter(|d| d.name == "server_name")
            .flat_map(|d| d.args.iter().cloned())
            .collect();
        let listens: Vec<&Directive> = directives.iter().filter(|d| d.name == "listen").collect();
        let ssl = listens.iter().any(|l| l.args.iter().any(|a| a == "ssl"))
            || directives
                .iter()
                .any(|d| d.name == "ssl" && d.arg(0) == Some("on"));
        let own = cert_paths(directives, conf_dir);
        let certs = if own.is_empty() { inherited } else { &own };
        for cert in certs {
            let served_for = self.certificates.entry(cert.clone()).or_default();
            // Without TLS on a listen the certificate is configured but not served.
            if ssl {
                served_for.extend(server_names.iter().cloned());
            }
        }
        let mut routes = Vec::new();
        collect_routes(directives, None, upstreams, &mut routes);
        self.servers.push(NginxServer {
            server_names,
            listen: listens.iter().map(|l| l.args.join(" ")).collect(),
            routes,
            source: format!("{}:{}", server.file.display(), server.line),
        });
    }
}

/// The `ssl_certificate` files among `directives`, resolved against the conf dir. Paths with
/// variables (chosen per request) and inline `data:` certificates are kept as written.
fn cert_paths(directives: &[Directive], conf_dir: &Path) -> Vec<String> {
    directives
        .iter()
        .filter(|d| d.name == "ssl_certificate")
        .filter_map(|d| d.arg(0))
        .map(|p| {
            if p.contains('$') || p.starts_with("data:") {
                p.to_string()
            } else {
                full_name(conf_dir, Path::new(p)).display().to_string()
            }
        })
        .collect()
}

/// The proxy targets under `directives`: every `proxy_pass`/`grpc_pass` in a `location`
/// (nested ones, and those in its `if` and `limit_except` blocks, included).
fn collect_routes(
    directives: &[Directive],
    location: Option<&str>,
    upstreams: &BTreeMap<&str, Vec<String>>,
    routes: &mut Vec<NginxRoute>,
) {
    for d in directives {
        match (d.name.as_str(), location) {
            ("location", _) if d.block.is_some() => {
                let name = d.args.join(" ");
                collect_routes(d.children(), Some(&name), upstreams, routes);
            }
            ("if" | "limit_except", Some(_)) => {
                collect_routes(d.children(), location, upstreams, routes);
            }
            ("proxy_pass" | "grpc_pass", Some(location)) => {
                let Some(target) = d.arg(0) else { continue };
                let target = if d.name == "grpc_pass" && !target.contains("://") {
                    format!("grpc://{target}")
                } else {
                    target.to_string()
                };
                routes.push(NginxRoute {
                    location: location.to_string(),
                    upstream_servers: upstream_servers(&target, upstreams),
                    proxy_pass: target,
                });
            }
            _ => {}
        }
    }
}

/// The servers of the upstream block a target names (`http://backend/path` → `backend`'s),
/// or nothing when it names a host, a unix socket or a variable.
fn upstream_servers(target: &str, upstreams: &BTreeMap<&str, Vec<String>>) -> Vec<String> {
    let rest = target.split_once("://").map_or(target, |(_, rest)| rest);
    let authority = rest.split('/').next().unwrap_or_default();
    if authority.contains('$') || authority.starts_with("unix:") {
        return Vec::new();
    }
    let host = authority
        .rsplit_once(':')
        .filter(|(_, port)| port.bytes().all(|b| b.is_ascii_digit()))
        .map_or(authority, |(host, _)| host);
    upstreams
        .get(authority)
        .or_else(|| upstreams.get(host))
        .cloned()
        .unwrap_or_default()
}

/// Reads a certificate file's first certificate (the leaf; the chain follows it).
fn read_certificate(path: &str, served_for: BTreeSet<String>) -> NginxCertificate {
    let mut cert = NginxCertificate {
        path: path.to_string(),
        served_for: served_for.into_iter().collect(),
        ..NginxCertificate::default()
    };
    if path.contains('$') {
        cert.error = "the path has variables: nginx picks the file per request".into();
        return cert;
    }
    if path.starts_with("data:") {
        cert.error = "the certificate is given inline (data:), not as a file".into();
        return cert;
    }
    let pem = match std::fs::read(path) {
        Ok(pem) => pem,
        Err(e) => {
            cert.error = format!("cannot read {path}: {e}");
            return cert;
        }
    };
    match describe_certificate(&pem) {
        Ok((subject, dns_names, not_after)) => {
            cert.subject = subject;
            cert.dns_names = dns_names;
            cert.not_after = Some(prost_types::Timestamp {
                seconds: not_after,
                nanos: 0,
            });
        }
        Err(e) => cert.error = format!("{path}: {e}"),
    }
    cert
}

/// Subject, DNS names and expiry (Unix seconds) of the first certificate in a PEM file.
fn describe_certificate(pem: &[u8]) -> Result<(String, Vec<String>, i64), String> {
    use x509_parser::extensions::GeneralName;
    use x509_parser::pem::Pem;

    let mut found = None;
    for block in Pem::iter_from_buffer(pem) {
        let block = block.map_err(|e| format!("not a PEM file: {e}"))?;
        if block.label == "CERTIFICATE" {
            found = Some(block);
            break;
        }
    }
    let block = found.ok_or("no CERTIFICATE in the file")?;
    let x509 = block
        .parse_x509()
        .map_err(|e| format!("not an X.509 certificate: {e}"))?;
    let dns_names = match x509.subject_alternative_name() {
        Ok(Some(san)) => san
            .value
            .general_names
            .iter()
            .filter_map(|name| match name {
                GeneralName::DNSName(dns) => Some(dns.to_string()),
                _ => None,
            })
            .collect(),
        Ok(None) => Vec::new(),
        Err(e) => return Err(format!("bad subjectAltName: {e}")),
    };
    Ok((
        x509.subject().to_string(),
        dns_names,
        x509.validity().not_after.timestamp(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Vec<Directive>, NginxConfigError> {
        let mut parser = Parser {
            conf_dir: PathBuf::from("/nonexistent"),
            stack: Vec::new(),
        };
        parser.parse_text(Path::new("test.conf"), text)
    }

    fn names(ds: &[Directive]) -> Vec<&str> {
        ds.iter().map(|d| d.name.as_str()).collect()
    }

    fn error_at(text: &str) -> (usize, String) {
        match parse(text) {
            Err(NginxConfigError::Syntax { line, message, .. }) => (line, message),
            other => panic!("expected a syntax error for {text:?}, got {other:?}"),
        }
    }

    #[test]
    fn tokens_quotes_comments_and_escapes_follow_nginx() {
        let tree = parse(
            "# leading comment\n\
             user nobody; # trailing\n\
             log_format main '$remote_addr \"$request\"' \"a\\tb\";\n\
             location ~ \\.php$ { return 200 \"${host}x\"; }\n\
             set $a ${b}c;\n\
             add_header X-Hash a#b;\n",
        )
        .unwrap();
        assert_eq!(
            names(&tree),
            ["user", "log_format", "location", "set", "add_header"]
        );
        assert_eq!(tree[1].args, ["main", "$remote_addr \"$request\"", "a\tb"]);
        assert_eq!(tree[2].args, ["~", "\\.php$"]);
        assert_eq!(tree[2].children()[0].args, ["200", "${host}x"]);
        assert_eq!(tree[3].args, ["$a", "${b}c"]);
        assert_eq!(tree[4].args, ["X-Hash", "a#b"]);
        assert_eq!(tree[2].line, 4);
    }

    #[test]
    fn blocks_nest_and_lines_count_across_multiline_strings() {
        let tree = parse("http {\n  server {\n    listen 80;\n  }\n}\nx 'a\nb';\ny;").unwrap();
        let server = &tree[0].children()[0];
        assert_eq!(server.line, 2);
        assert_eq!(server.children()[0].line, 3);
        assert_eq!(tree[1].args, ["a\nb"]);
        assert_eq!(tree[2].line, 8);
    }

    #[test]
    fn bad_syntax_names_the_line() {
        assert_eq!(error_at("a;\nb {\n c;\n").0, 4);
        assert!(error_at("a;\nb {\n c;\n").1.contains("opened on line 2"));
        assert_eq!(error_at("a;\n}\n"), (2, "unexpected \"}\"".into()));
        assert_eq!(error_at("a;\n;\n").0, 2);
        assert_eq!(error_at("a;\n{ b; }").0, 2);
        assert!(error_at("server {\n listen 80\n}")
            .1
            .contains("\"listen\" is missing"));
        assert!(error_at("a b").1.contains("unexpected end of file"));
        assert_eq!(error_at("a;\nb \"open;\n\n").0, 2);
        assert!(error_at("a \"x\"y;").1.contains("after a quoted string"));
        assert_eq!(error_at("a \\").0, 1);
        let deep = "a {".repeat(MAX_BLOCK_DEPTH + 1) + &"}".repeat(MAX_BLOCK_DEPTH + 1);
        assert!(error_at(&deep).1.contains("nested deeper"));
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let alphabet = b"ab{};#'\"\\$ \n\t\r\xff";
        for _ in 0..5000 {
            let len = rng.gen_range(0..40);
            let bytes: Vec<u8> = (0..len)
                .map(|_| alphabet[rng.gen_range(0..alphabet.len())])
                .collect();
            let _ = parse(&String::from_utf8_lossy(&bytes));
        }
    }

    #[test]
    fn includes_follow_globs_relative_to_the_main_file_and_refuse_cycles() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::create_dir_all(d.join("sites")).unwrap();
        std::fs::write(
            d.join("nginx.conf"),
            "http {\n include sites/*.conf;\n include none/*.conf;\n}\n",
        )
        .unwrap();
        std::fs::write(d.join("sites/b.conf"), "server { listen 2; }\n").unwrap();
        std::fs::write(d.join("sites/a.conf"), "server { listen 1; }\n").unwrap();
        std::fs::write(d.join("sites/.hidden.conf"), "server { listen 3; }\n").unwrap();
        let tree = Parser::parse_main(&d.join("nginx.conf")).unwrap();
        let servers = tree[0].children();
        assert_eq!(servers.len(), 2);
        assert_eq!(servers[0].children()[0].args, ["1"]);
        assert_eq!(&*servers[1].file, d.join("sites/b.conf"));

        std::fs::write(d.join("sites/a.conf"), "include sites/a.conf;\n").unwrap();
        let err = Parser::parse_main(&d.join("nginx.conf")).unwrap_err();
        assert!(err.to_string().contains("include cycle"), "{err}");

        std::fs::write(d.join("nginx.conf"), "events {}\ninclude missing.conf;\n").unwrap();
        let err = Parser::parse_main(&d.join("nginx.conf"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("nginx.conf:2: include \"missing.conf\""),
            "{err}"
        );

        std::fs::write(d.join("sites/a.conf"), "server {\n listen 1;\n").unwrap();
        std::fs::write(d.join("nginx.conf"), "http { include sites/a.conf; }").unwrap();
        let err = Parser::parse_main(&d.join("nginx.conf"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("sites/a.conf:3: unexpected end of file"),
            "{err}"
        );
    }

    #[test]
    fn servers_routes_upstreams_and_certificates_are_resolved() {
        let tree = parse(
            "pid run/nginx.pid;\n\
             http {\n\
               ssl_certificate /certs/default.pem;\n\
               server {\n\
                 listen 443 ssl; server_name a.test b.test;\n\
                 location / { proxy_pass http://app/; }\n\
                 location /api/ {\n\
                   location /api/v2/ { if ($x) { proxy_pass http://app:8080; } }\n\
                   grpc_pass 127.0.0.1:9000;\n\
                 }\n\
                 location /direct { proxy_pass https://10.0.0.1:8443/x; }\n\
                 location /var { proxy_pass http://$backend; }\n\
               }\n\
               server { listen 80; server_name plain.test; }\n\
               server { listen 8443 ssl; server_name own.test; ssl_certificate own.pem; }\n\
               upstream app { server 10.0.0.2:8080 weight=2; server 10.0.0.3:8080 backup; }\n\
             }\n",
        )
        .unwrap();
        let served = Served::from_tree(&tree, Path::new("/etc/nginx"));
        let s = &served.servers;
        assert_eq!(s.len(), 3);
        assert_eq!(s[0].server_names, ["a.test", "b.test"]);
        assert_eq!(s[0].listen, ["443 ssl"]);
        assert_eq!(s[0].source, "test.conf:4");
        let app = vec!["10.0.0.2:8080".to_string(), "10.0.0.3:8080".into()];
        let routes: Vec<_> = s[0]
            .routes
            .iter()
            .map(|r| {
                (
                    r.location.as_str(),
                    r.proxy_pass.as_str(),
                    &r.upstream_servers,
                )
            })
            .collect();
        assert_eq!(
            routes,
            [
                ("/", "http://app/", &app),
                ("/api/v2/", "http://app:8080", &app),
                ("/api/", "grpc://127.0.0.1:9000", &vec![]),
                ("/direct", "https://10.0.0.1:8443/x", &vec![]),
                ("/var", "http://$backend", &vec![]),
            ]
        );
        assert!(s[1].routes.is_empty());
        let certs: Vec<_> = served
            .certificates
            .iter()
            .map(|(p, names)| (p.as_str(), names.iter().map(String::as_str).collect()))
            .collect::<Vec<(&str, Vec<&str>)>>();
        // plain.test inherits the http-level certificate but has no TLS listen.
        assert_eq!(
            certs,
            [
                ("/certs/default.pem", vec!["a.test", "b.test"]),
                ("/etc/nginx/own.pem", vec!["own.test"]),
            ]
        );
    }

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
