//! Docker Compose as the deploy executor runs it: the v2 plugin (`docker compose`) where it
//! works, else the v1 standalone `docker-compose`. Every command streams its output into the
//! job's events line by line (ANSI colours and progress redraws removed) and fails with the
//! command, its exit code and its last lines.

use std::collections::VecDeque;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::Command;

use super::events::{JobError, JobEvents};

/// How many of a failed command's last output lines go into its error.
const TAIL_LINES: usize = 20;
/// Longer output lines are cut (a progress bar without newlines must not grow without end).
const MAX_LINE: usize = 4096;
/// `compose version` answers in well under a second; a hung Docker CLI must not hang a deploy.
const DETECT_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a found Compose is trusted. Finding it costs up to a second per deploy (v1 is a
/// Python program), yet installing the v2 plugin should take effect without an agent restart.
const DETECT_CACHE: Duration = Duration::from_secs(600);

/// The last successful detection.
static DETECTED: Mutex<Option<(ComposeFlavor, Instant)>> = Mutex::new(None);

/// Which Compose the host has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ComposeFlavor {
    /// The Docker CLI plugin: `docker compose`.
    V2,
    /// The standalone Python tool: `docker-compose`.
    V1,
}

impl ComposeFlavor {
    /// The program and the arguments that precede Compose's own.
    pub fn program(self) -> (&'static str, &'static [&'static str]) {
        match self {
            ComposeFlavor::V2 => ("docker", &["compose"]),
            ComposeFlavor::V1 => ("docker-compose", &[]),
        }
    }

    /// The command as an operator types it.
    pub fn name(self) -> &'static str {
        match self {
            ComposeFlavor::V2 => "docker compose",
            ComposeFlavor::V1 => "docker-compose",
        }
    }
}

/// Finds a working Compose: the v2 plugin where `docker compose version` works, else
/// `docker-compose`; an error saying why neither works otherwise. A result is reused for
/// [`DETECT_CACHE`].
pub async fn detect() -> Result<ComposeFlavor, JobError> {
    let cached = *DETECTED.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((flavor, at)) = cached {
        if at.elapsed() < DETECT_CACHE {
            return Ok(flavor);
        }
    }
    let flavor = detect_now().await?;
    *DETECTED.lock().unwrap_or_else(|p| p.into_inner()) = Some((flavor, Instant::now()));
    Ok(flavor)
}

async fn detect_now() -> Result<ComposeFlavor, JobError> {
    let v2 = match probe("docker", &["compose", "version"]).await {
        Ok(()) => return Ok(ComposeFlavor::V2),
        Err(why) => why,
    };
    match probe("docker-compose", &["version"]).await {
        Ok(()) => Ok(ComposeFlavor::V1),
        Err(v1) => Err(JobError::Failed(format!(
            "no Docker Compose on this host: `docker compose version`: {v2}; \
             `docker-compose version`: {v1} (install the Compose plugin or docker-compose)"
        ))),
    }
}

/// Runs `program args` and reports why it did not succeed.
async fn probe(program: &str, args: &[&str]) -> Result<(), String> {
    let output = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    match tokio::time::timeout(DETECT_TIMEOUT, output).await {
        Err(_) => Err(format!("no answer within {}s", DETECT_TIMEOUT.as_secs())),
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::NotFound => {
            Err(format!("{program} is not installed"))
        }
        Ok(Err(e)) => Err(format!("cannot run {program}: {e}")),
        Ok(Ok(out)) if out.status.success() => Ok(()),
        Ok(Ok(out)) => {
            let stderr = String::from_utf8_lossy(&out.stderr);
            let first = stderr.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
            Err(format!("{}: {}", describe_status(out.status), first.trim()))
        }
    }
}

/// One Compose project as the deploy executor drives it.
#[derive(Clone, Debug)]
pub struct Compose {
    /// Which Compose runs it.
    pub flavor: ComposeFlavor,
    /// The project name (`-p`): stable across releases, so `down` finds the previous
    /// release's containers.
    pub project: String,
    /// The compose file (`-f`).
    pub file: PathBuf,
    /// Where the commands run: the compose file's directory, so relative paths and `.env`
    /// resolve as they would for an operator running Compose there.
    pub workdir: PathBuf,
    /// Variables set for Compose (they win over `.env` in its `${VAR}` substitution), e.g. a
    /// blue/green slot's `SENTINEL_PORT`.
    pub env: Vec<(String, String)>,
}

impl Compose {
    /// The command line for messages (arguments with spaces quoted).
    pub fn command_line(&self, args: &[&str]) -> String {
        let (program, prefix) = self.flavor.program();
        let file = self.file.display().to_string();
        let mut words: Vec<&str> = vec![program];
        words.extend_from_slice(prefix);
        words.extend(["-p", &self.project, "-f", &file]);
        words.extend_from_slice(args);
        words
            .iter()
            .map(|w| shell_quote(w))
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// `compose build`. With v1 also `--force-rm`: the legacy builder otherwise leaves the
    /// container of a failed step behind, one per failed deploy. (BuildKit, which v2 uses,
    /// leaves none, and v2 has no such flag.)
    pub async fn build(&self, events: &JobEvents, step: &str) -> Result<(), JobError> {
        let args: &[&str] = match self.flavor {
            ComposeFlavor::V1 => &["build", "--force-rm"],
            ComposeFlavor::V2 => &["build"],
        };
        self.run(args, events, step).await
    }

    /// Runs `compose -p PROJECT -f FILE args...` in the work directory, streaming its output
    /// lines into `events` (stream "stdout"/"stderr"); fails naming the command (as part of
    /// `step`), its exit code and its last output lines. The process is killed if the
    /// returned future is dropped (a cancelled job).
    pub async fn run(&self, args: &[&str], events: &JobEvents, step: &str) -> Result<(), JobError> {
        let (program, prefix) = self.flavor.program();
        self.run_program(program, prefix, args, events, step).await
    }

    async fn run_program(
        &self,
        program: &str,
        prefix: &[&str],
        args: &[&str],
        events: &JobEvents,
        step: &str,
    ) -> Result<(), JobError> {
        let shown = self.command_line(args);
        let mut cmd = Command::new(program);
        cmd.args(prefix)
            .arg("-p")
            .arg(&self.project)
            .arg("-f")
            .arg(&self.file)
            .args(args)
            .current_dir(&self.workdir)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            // Plain build logs instead of a redrawn terminal UI.
            .env("BUILDKIT_PROGRESS", "plain")
            .env("COMPOSE_ANSI", "never");
        stream(cmd, &shown, events, step).await
    }
}

/// Runs `argv` (no shell) the way Compose commands run: output streamed into `events`, an
/// error naming the command, its exit code and last lines. For the other programs a deploy
/// runs, such as the proxy's config test and reload.
pub async fn run_argv(argv: &[String], events: &JobEvents, step: &str) -> Result<(), JobError> {
    let Some((program, args)) = argv.split_first() else {
        return Err(JobError::Failed(format!("[{step}] no command to run")));
    };
    let shown = argv
        .iter()
        .map(|w| shell_quote(w))
        .collect::<Vec<_>>()
        .join(" ");
    let mut cmd = Command::new(program);
    cmd.args(args);
    stream(cmd, &shown, events, step).await
}

/// Spawns `cmd` (shown as `shown`), streams its output lines into `events` and waits for it;
/// the process is killed if the returned future is dropped.
async fn stream(
    mut cmd: Command,
    shown: &str,
    events: &JobEvents,
    step: &str,
) -> Result<(), JobError> {
    events.log("agent", &format!("[{step}] $ {shown}"));
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| JobError::Failed(events.redact(&format!("cannot start `{shown}`: {e}"))))?;
    let tail = Mutex::new(VecDeque::with_capacity(TAIL_LINES));
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    let (_, _, status) = tokio::join!(
        pump(stdout, "stdout", events, &tail),
        pump(stderr, "stderr", events, &tail),
        child.wait(),
    );
    let status = status
        .map_err(|e| JobError::Failed(events.redact(&format!("waiting for `{shown}`: {e}"))))?;
    if status.success() {
        return Ok(());
    }
    let tail = tail.into_inner().unwrap_or_else(|p| p.into_inner());
    let last = if tail.is_empty() {
        " (no output)".to_string()
    } else {
        let lines: Vec<String> = tail.iter().map(|l| format!("  {l}")).collect();
        format!("; last output:\n{}", lines.join("\n"))
    };
    Err(JobError::Failed(events.redact(&format!(
        "`{shown}` {}{last}",
        describe_status(status)
    ))))
}

fn describe_status(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with code {code}"),
        (None, Some(signal)) => format!("was killed by signal {signal}"),
        (None, None) => "failed".to_string(),
    }
}

/// Reads `reader` to its end, sending each line to `events` and keeping the last
/// [`TAIL_LINES`] in `tail`. Lines end at `\n` or `\r` (progress redraws).
async fn pump<R: AsyncRead + Unpin>(
    reader: Option<R>,
    stream: &str,
    events: &JobEvents,
    tail: &Mutex<VecDeque<String>>,
) {
    let Some(mut reader) = reader else { return };
    let mut buf = vec![0u8; 8192];
    let mut line: Vec<u8> = Vec::new();
    let emit = |bytes: &mut Vec<u8>| {
        let text = clean_line(&String::from_utf8_lossy(bytes));
        bytes.clear();
        if text.trim().is_empty() {
            return;
        }
        events.log(stream, &text);
        let mut tail = tail.lock().unwrap_or_else(|p| p.into_inner());
        if tail.len() == TAIL_LINES {
            tail.pop_front();
        }
        tail.push_back(text);
    };
    loop {
        let n = match reader.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        for &b in &buf[..n] {
            if b == b'\n' || b == b'\r' {
                emit(&mut line);
            } else {
                line.push(b);
                if line.len() >= MAX_LINE {
                    emit(&mut line);
                }
            }
        }
    }
    emit(&mut line);
}

/// Removes ANSI escape sequences (colours, cursor moves) and other control characters.
fn clean_line(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            match chars.next() {
                // CSI: parameters, then one final byte in @..~.
                Some('[') => {
                    for n in chars.by_ref() {
                        if ('@'..='~').contains(&n) {
                            break;
                        }
                    }
                }
                // OSC: until BEL or ESC \.
                Some(']') => {
                    while let Some(n) = chars.next() {
                        if n == '\x07' {
                            break;
                        }
                        if n == '\x1b' {
                            chars.next();
                            break;
                        }
                    }
                }
                _ => {}
            }
        } else if c == '\t' || !c.is_control() {
            out.push(c);
        }
    }
    out.trim_end().to_string()
}

fn shell_quote(word: &str) -> String {
    let plain = !word.is_empty()
        && word
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:@,+%".contains(c));
    if plain {
        word.to_string()
    } else {
        format!("'{}'", word.replace('\'', "'\\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jobs::events::Outbox;
    use sentinel_proto::v1::{agent_message, job_event};

    #[test]
    fn escape_sequences_and_controls_are_removed() {
        assert_eq!(
            clean_line("\x1b[1A\x1b[2K\x1b[32mCreating\x1b[0m web ... \x1b]0;title\x07done\x08"),
            "Creating web ... done"
        );
        assert_eq!(clean_line("plain\ttext  "), "plain\ttext");
    }

    #[test]
    fn command_lines_quote_what_a_shell_would_split() {
        let c = Compose {
            flavor: ComposeFlavor::V1,
            project: "shop".into(),
            file: PathBuf::from("/srv/shop/releases/abc/docker-compose.yml"),
            workdir: PathBuf::from("/srv/shop/releases/abc"),
            env: Vec::new(),
        };
        assert_eq!(
            c.command_line(&["run", "--rm", "web", "sh", "-c", "echo it's done"]),
            "docker-compose -p shop -f /srv/shop/releases/abc/docker-compose.yml run --rm web sh -c 'echo it'\\''s done'"
        );
        let v2 = Compose {
            flavor: ComposeFlavor::V2,
            ..c
        };
        assert!(v2
            .command_line(&["up", "-d"])
            .starts_with("docker compose -p shop"));
    }

    fn logs(outbox: &Outbox) -> Vec<(String, String)> {
        outbox
            .drain()
            .into_iter()
            .filter_map(|m| match m.msg {
                Some(agent_message::Msg::JobEvent(e)) => match e.event {
                    Some(job_event::Event::Log(l)) => Some((l.stream, l.line)),
                    _ => None,
                },
                _ => None,
            })
            .collect()
    }

    #[tokio::test]
    async fn output_is_streamed_by_line_and_secrets_masked() {
        let outbox = Outbox::default();
        let events = JobEvents::new("j", outbox.clone(), 0);
        events.add_secret("hunter22");
        let tail = Mutex::new(VecDeque::new());
        let input: &[u8] = b"one\r\ntwo hunter22\rthree\n\npartial";
        pump(Some(input), "stdout", &events, &tail).await;
        let lines = logs(&outbox);
        assert_eq!(
            lines,
            [
                ("stdout".to_string(), "one".to_string()),
                ("stdout".to_string(), "two ***".to_string()),
                ("stdout".to_string(), "three".to_string()),
                ("stdout".to_string(), "partial".to_string()),
            ]
        );
        assert_eq!(tail.lock().map(|t| t.len()).unwrap_or(0), 4);
    }

    #[tokio::test]
    async fn failing_command_names_itself_its_code_and_last_lines() {
        let outbox = Outbox::default();
        let events = JobEvents::new("j", outbox.clone(), 0);
        events.add_secret("hunter22");
        let c = Compose {
            flavor: ComposeFlavor::V1,
            project: "p".into(),
            file: PathBuf::from("f.yml"),
            workdir: std::env::temp_dir(),
            env: Vec::new(),
        };
        // A stand-in for Compose: `sh -c SCRIPT sh -p p -f f.yml build`.
        let script = "echo building; echo 'boom: token hunter22' >&2; exit 3";
        let err = c
            .run_program("sh", &["-c", script, "sh"], &["build"], &events, "build")
            .await
            .expect_err("fails");
        let text = err.to_string();
        assert!(
            text.contains("`docker-compose -p p -f f.yml build` exited with code 3"),
            "{text}"
        );
        assert!(text.contains("boom: token ***"), "{text}");
        assert!(!text.contains("hunter22"), "{text}");
        let lines = logs(&outbox);
        assert!(
            lines
                .iter()
                .any(|(s, l)| s == "stderr" && l == "boom: token ***"),
            "{lines:?}"
        );
        assert!(
            lines.iter().any(|(s, l)| s == "stdout" && l == "building"),
            "{lines:?}"
        );
    }
}
