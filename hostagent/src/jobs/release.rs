//! An app's releases on the host: unpacking a bundle, the `current` symlink, the history of
//! switches, pruning and the audit log.
//!
//! ```text
//! APP_DIR/releases/<commit>/     one unpacked bundle per release
//! APP_DIR/current -> releases/<commit>
//! APP_DIR/releases.json          {"history": [...]}: releases in the order they went live
//! APP_DIR/audit.log              one line per deploy step
//! ```
//!
//! The history exists because mtimes lie (a redeploy, a restore, a `touch`): "the previous
//! release" is the one that was live before the current one. A forward switch (a deploy) moves
//! its commit to the end of the history; a switch back (a rollback) drops the releases after
//! its target, so rolling back twice goes two releases back and never "forward" into the
//! release that just failed.

use std::collections::HashSet;
use std::ffi::OsStr;
use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, BufReader, Read, Write};
use std::os::unix::fs::{symlink, DirBuilderExt, OpenOptionsExt};
use std::path::{Component, Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use flate2::read::GzDecoder;

use super::events::{JobError, JobEvents};

/// Folder of the unpacked releases, inside the app directory.
pub const RELEASES_DIR: &str = "releases";
/// The symlink to the live release, inside the app directory.
pub const CURRENT_LINK: &str = "current";
/// The history of switches, inside the app directory.
pub const STATE_FILE: &str = "releases.json";
/// The audit log, inside the app directory.
pub const AUDIT_LOG: &str = "audit.log";

/// Switches remembered; older ones only matter for pruning order, which mtimes approximate.
const HISTORY_LIMIT: usize = 100;
/// The largest env file read into memory to register its values as secrets.
const MAX_ENV_FILE: u64 = 1024 * 1024;
/// The most bytes a bundle may unpack to: a signed bundle is trusted, but a broken build
/// producing a runaway archive should fail the deploy, not fill the disk.
const MAX_UNPACKED: u64 = 4 * 1024 * 1024 * 1024;
/// The longest commit string (a SHA-256 hex digest is 64).
const MAX_COMMIT_LEN: usize = 64;

/// Checks a commit string: 1 to 64 of `[0-9a-zA-Z._-]`, not starting with `.` (that excludes
/// `.`, `..` and the hidden names this module uses for its own temporary directories).
pub fn validate_commit(commit: &str) -> Result<(), JobError> {
    let ok = !commit.is_empty()
        && commit.len() <= MAX_COMMIT_LEN
        && !commit.starts_with('.')
        && commit
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(JobError::Failed(format!(
            "invalid commit {:?}: expected 1 to {MAX_COMMIT_LEN} of [0-9a-zA-Z._-], not starting with '.'",
            commit.chars().take(80).collect::<String>()
        )))
    }
}

/// `APP_DIR/releases/<commit>`.
pub fn release_dir(app_dir: &Path, commit: &str) -> PathBuf {
    app_dir.join(RELEASES_DIR).join(commit)
}

fn fail(message: String) -> JobError {
    JobError::Failed(message)
}

fn io_fail(what: &str, path: &Path, e: io::Error) -> JobError {
    fail(format!("{what} {}: {e}", path.display()))
}

/// Unpacks the gzipped tar `bundle` into `APP_DIR/releases/<commit>` and returns that path.
///
/// The bundle is extracted into a hidden temporary directory and renamed into place, so a
/// release directory is always complete. Entries with absolute paths or `..`, symlinks whose
/// target leaves the release, entries under a symlink, hard links and device files are
/// refused. Env files (`.env`, `.env.*`, `*.env`) are created with mode 0600 from the start and
/// every value in them is registered with `events` as a secret before anything runs. An
/// existing release of the same commit is replaced (the bundle is authoritative, e.g. for a
/// changed `.env`); the old directory is moved aside and removed by the next [`prune`], since
/// running containers may still bind-mount it.
pub fn unpack_bundle(
    bundle: &Path,
    app_dir: &Path,
    commit: &str,
    events: &JobEvents,
) -> Result<PathBuf, JobError> {
    validate_commit(commit)?;
    let releases = app_dir.join(RELEASES_DIR);
    DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(&releases)
        .map_err(|e| io_fail("creating", &releases, e))?;
    let tmp = releases.join(format!(".{commit}.tmp"));
    remove_path(&tmp)?;
    DirBuilder::new()
        .mode(0o755)
        .create(&tmp)
        .map_err(|e| io_fail("creating", &tmp, e))?;
    let stats = match extract(bundle, &tmp, events) {
        Ok(stats) => stats,
        Err(e) => {
            // Best effort: a leftover is also removed by the next unpack or prune.
            let _ = fs::remove_dir_all(&tmp);
            return Err(e);
        }
    };
    let dest = releases.join(commit);
    if fs::symlink_metadata(&dest).is_ok() {
        let aside = releases.join(format!(".{commit}.replaced-{}", unique_suffix()));
        fs::rename(&dest, &aside).map_err(|e| io_fail("moving aside", &dest, e))?;
    }
    fs::rename(&tmp, &dest).map_err(|e| io_fail("renaming into place", &dest, e))?;
    sync_dir(&releases);
    events.log(
        "agent",
        &format!(
            "unpacked {} files ({} bytes, {} env files) into {}",
            stats.files,
            stats.bytes,
            stats.env_files,
            dest.display()
        ),
    );
    Ok(dest)
}

#[derive(Default)]
struct ExtractStats {
    files: u64,
    bytes: u64,
    env_files: u64,
}

fn extract(bundle: &Path, root: &Path, events: &JobEvents) -> Result<ExtractStats, JobError> {
    let file = File::open(bundle).map_err(|e| io_fail("opening bundle", bundle, e))?;
    let mut archive = tar::Archive::new(GzDecoder::new(BufReader::new(file)));
    let unreadable = |e: io::Error| {
        fail(format!(
            "bundle {} is not a readable gzipped tar: {e}",
            bundle.display()
        ))
    };
    let mut stats = ExtractStats::default();
    // Symlinks created so far: nothing is ever written through one, so a bundle cannot
    // plant `x -> /etc` and then write `x/passwd`.
    let mut symlinks: HashSet<PathBuf> = HashSet::new();
    for entry in archive.entries().map_err(unreadable)? {
        let mut entry = entry.map_err(unreadable)?;
        let raw = entry.path().map_err(unreadable)?.into_owned();
        let refuse = |reason: &str| {
            fail(format!(
                "bundle {}: refusing entry {:?}: {reason}",
                bundle.display(),
                raw.display().to_string()
            ))
        };
        let rel = match relative_path(&raw) {
            Ok(Some(rel)) => rel,
            Ok(None) => continue,
            Err(reason) => return Err(refuse(reason)),
        };
        if rel.ancestors().any(|a| symlinks.contains(a)) {
            return Err(refuse("it lies under a symlink of the bundle"));
        }
        let dest = root.join(&rel);
        let kind = entry.header().entry_type();
        if kind.is_dir() {
            DirBuilder::new()
                .recursive(true)
                .mode(0o755)
                .create(&dest)
                .map_err(|e| io_fail("creating", &dest, e))?;
        } else if kind.is_file() || kind.is_contiguous() {
            stats.bytes = stats.bytes.saturating_add(entry.size());
            if stats.bytes > MAX_UNPACKED {
                return Err(refuse(&format!(
                    "the bundle unpacks to more than {MAX_UNPACKED} bytes"
                )));
            }
            create_parent(&dest)?;
            let env_file = rel.file_name().is_some_and(is_env_file_name);
            if env_file {
                write_env_file(&mut entry, &dest, events)?;
                stats.env_files += 1;
            } else {
                let executable = entry.header().mode().unwrap_or(0o644) & 0o111 != 0;
                let mode = if executable { 0o755 } else { 0o644 };
                let mut out = create_file(&dest, mode)?;
                io::copy(&mut entry, &mut out).map_err(|e| {
                    fail(format!(
                        "bundle {}: extracting {}: {e}",
                        bundle.display(),
                        rel.display()
                    ))
                })?;
            }
            stats.files += 1;
        } else if kind.is_symlink() {
            let target = entry
                .link_name()
                .map_err(unreadable)?
                .map(|t| t.into_owned())
                .unwrap_or_default();
            if !symlink_stays_inside(&rel, &target) {
                return Err(refuse(&format!(
                    "its symlink target {:?} leaves the release",
                    target.display().to_string()
                )));
            }
            create_parent(&dest)?;
            symlink(&target, &dest).map_err(|e| io_fail("creating symlink", &dest, e))?;
            symlinks.insert(rel);
        } else if kind.is_hard_link() {
            return Err(refuse("hard links are not supported in bundles"));
        } else if kind.is_pax_global_extensions() || kind.is_pax_local_extensions() {
            // Metadata records (tar applies the local ones to the next entry itself).
            continue;
        } else {
            return Err(refuse(&format!(
                "unsupported entry type {:?} (only files, directories and symlinks)",
                kind
            )));
        }
    }
    Ok(stats)
}

/// The entry path as a relative path of normal components (`./` prefixes dropped); `None`
/// for the archive root itself.
fn relative_path(raw: &Path) -> Result<Option<PathBuf>, &'static str> {
    let mut out = PathBuf::new();
    for c in raw.components() {
        match c {
            Component::Normal(part) => out.push(part),
            Component::CurDir => {}
            Component::ParentDir => return Err("its path contains `..`"),
            Component::RootDir | Component::Prefix(_) => return Err("its path is absolute"),
        }
    }
    Ok((!out.as_os_str().is_empty()).then_some(out))
}

/// Whether a symlink at `rel` pointing to `target` resolves inside the release. Only leading
/// `..` components are accepted (at most as many as `rel` has parent directories): a `..`
/// after a normal component could climb out of whatever that component links to.
fn symlink_stays_inside(rel: &Path, target: &Path) -> bool {
    if target.as_os_str().is_empty() {
        return false;
    }
    let mut depth = rel.parent().map_or(0, |p| p.components().count());
    let mut seen_normal = false;
    for c in target.components() {
        match c {
            Component::Normal(_) => seen_normal = true,
            Component::CurDir => {}
            Component::ParentDir => {
                if seen_normal || depth == 0 {
                    return false;
                }
                depth -= 1;
            }
            Component::RootDir | Component::Prefix(_) => return false,
        }
    }
    true
}

fn is_env_file_name(name: &OsStr) -> bool {
    let Some(name) = name.to_str() else {
        return false;
    };
    name == ".env" || name.starts_with(".env.") || name.ends_with(".env")
}

fn create_parent(dest: &Path) -> Result<(), JobError> {
    if let Some(parent) = dest.parent() {
        DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(parent)
            .map_err(|e| io_fail("creating", parent, e))?;
    }
    Ok(())
}

/// Creates a new file with `mode` from the start (no window with a wider mode); refuses to
/// overwrite anything, which also means never following a symlink planted at `dest`.
fn create_file(dest: &Path, mode: u32) -> Result<File, JobError> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(dest)
        .map_err(|e| {
            if e.kind() == io::ErrorKind::AlreadyExists {
                fail(format!(
                    "bundle has two entries for {} (refusing to overwrite)",
                    dest.display()
                ))
            } else {
                io_fail("creating", dest, e)
            }
        })
}

/// Reads an env file entry, registers its values as secrets, then writes it with mode 0600.
fn write_env_file(entry: &mut impl Read, dest: &Path, events: &JobEvents) -> Result<(), JobError> {
    let mut content = Vec::new();
    entry
        .take(MAX_ENV_FILE + 1)
        .read_to_end(&mut content)
        .map_err(|e| io_fail("reading bundle entry", dest, e))?;
    if content.len() as u64 > MAX_ENV_FILE {
        return Err(fail(format!(
            "env file {} is larger than {MAX_ENV_FILE} bytes",
            dest.display()
        )));
    }
    for value in env_values(&String::from_utf8_lossy(&content)) {
        events.add_secret(&value);
    }
    let mut out = create_file(dest, 0o600)?;
    out.write_all(&content)
        .map_err(|e| io_fail("writing", dest, e))?;
    Ok(())
}

/// The values of a dotenv file, in every form they could be printed: as written, unquoted,
/// and without an inline comment.
fn env_values(text: &str) -> Vec<String> {
    let mut values = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let line = line.strip_prefix("export ").unwrap_or(line);
        let Some((_, raw)) = line.split_once('=') else {
            continue;
        };
        let raw = raw.trim();
        let mut forms = vec![raw.to_string()];
        for quote in ['"', '\''] {
            if raw.len() >= 2 && raw.starts_with(quote) && raw.ends_with(quote) {
                forms.push(raw[1..raw.len() - 1].to_string());
            }
        }
        if let Some((before, _)) = raw.split_once(" #") {
            forms.push(before.trim().to_string());
        }
        for form in forms {
            if !form.is_empty() && !values.contains(&form) {
                values.push(form);
            }
        }
    }
    values
}

/// Registers the values of the env files directly in `dir` (`.env`, `.env.*`, `*.env`) as
/// secrets; returns how many files were read. For releases unpacked by an earlier job (a
/// rollback target), whose values this job's events do not know yet.
pub fn register_env_secrets(dir: &Path, events: &JobEvents) -> usize {
    let Ok(entries) = fs::read_dir(dir) else {
        return 0;
    };
    let mut count = 0;
    for entry in entries.flatten() {
        if !is_env_file_name(&entry.file_name()) {
            continue;
        }
        let mut content = Vec::new();
        let read =
            File::open(entry.path()).and_then(|f| f.take(MAX_ENV_FILE).read_to_end(&mut content));
        if read.is_ok() {
            for value in env_values(&String::from_utf8_lossy(&content)) {
                events.add_secret(&value);
            }
            count += 1;
        }
    }
    count
}

/// The live release: the commit `APP_DIR/current` points to, if it is a release link.
pub fn current_release(app_dir: &Path) -> Option<String> {
    let target = fs::read_link(app_dir.join(CURRENT_LINK)).ok()?;
    let name = target.file_name()?.to_str()?;
    let in_releases = target.parent().and_then(Path::file_name) == Some(OsStr::new(RELEASES_DIR));
    (in_releases && validate_commit(name).is_ok()).then(|| name.to_string())
}

/// The release that was live before the current one and is still on disk.
pub fn previous_release(app_dir: &Path) -> Option<String> {
    let current = current_release(app_dir);
    read_history(app_dir)
        .into_iter()
        .rev()
        .find(|c| Some(c) != current.as_ref() && release_dir(app_dir, c).is_dir())
}

/// Points `current` at `commit` (a deploy): atomically, by renaming a new symlink over it,
/// then records the switch. The link is relative, so the app directory can move.
pub fn switch_current(app_dir: &Path, commit: &str) -> Result<(), JobError> {
    require_release(app_dir, commit)?;
    // Link first: a crash between the two leaves the history one switch behind, which
    // still names the right previous release.
    replace_link(app_dir, commit)?;
    let mut history = read_history(app_dir);
    history.retain(|c| c != commit);
    history.push(commit.to_string());
    write_history(app_dir, &history)
}

/// Points `current` back at `commit` (a rollback): the releases switched to after `commit`
/// leave the history, so they are never "the previous release" again.
pub fn switch_back(app_dir: &Path, commit: &str) -> Result<(), JobError> {
    require_release(app_dir, commit)?;
    let mut history = read_history(app_dir);
    match history.iter().rposition(|c| c == commit) {
        Some(i) => history.truncate(i + 1),
        None => history.push(commit.to_string()),
    }
    // History first: a crash between the two leaves the failed release current but no
    // longer remembered, so the previous release is still the rollback target.
    write_history(app_dir, &history)?;
    replace_link(app_dir, commit)
}

/// Undoes the first switch to `commit` when there is nothing to go back to: removes
/// `current` (if it points to `commit`) and forgets `commit` in the history.
pub fn clear_current(app_dir: &Path, commit: &str) -> Result<(), JobError> {
    let mut history = read_history(app_dir);
    history.retain(|c| c != commit);
    write_history(app_dir, &history)?;
    if current_release(app_dir).as_deref() == Some(commit) {
        let link = app_dir.join(CURRENT_LINK);
        fs::remove_file(&link).map_err(|e| io_fail("removing", &link, e))?;
        sync_dir(app_dir);
    }
    Ok(())
}

fn require_release(app_dir: &Path, commit: &str) -> Result<(), JobError> {
    validate_commit(commit)?;
    let dir = release_dir(app_dir, commit);
    match fs::symlink_metadata(&dir) {
        Ok(m) if m.is_dir() => Ok(()),
        _ => Err(fail(format!(
            "release {commit} does not exist ({} is not a directory)",
            dir.display()
        ))),
    }
}

fn replace_link(app_dir: &Path, commit: &str) -> Result<(), JobError> {
    let link = app_dir.join(CURRENT_LINK);
    let tmp = app_dir.join(format!(".{CURRENT_LINK}.tmp-{}", unique_suffix()));
    symlink(Path::new(RELEASES_DIR).join(commit), &tmp)
        .map_err(|e| io_fail("creating symlink", &tmp, e))?;
    if let Err(e) = fs::rename(&tmp, &link) {
        let _ = fs::remove_file(&tmp);
        return Err(io_fail(
            "switching (is it a directory rather than a symlink?)",
            &link,
            e,
        ));
    }
    sync_dir(app_dir);
    Ok(())
}

/// Deletes all but the newest `keep` releases (at least 1), newest by switch order and, for
/// releases never switched to, by mtime. The current release and the one before it are always
/// kept. Also removes leftovers of interrupted unpacks and replaced releases. Returns the
/// deleted commits, newest first.
pub fn prune(app_dir: &Path, keep: usize) -> Result<Vec<String>, JobError> {
    let keep = keep.max(1);
    let releases = app_dir.join(RELEASES_DIR);
    let entries = match fs::read_dir(&releases) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_fail("reading", &releases, e)),
    };
    let mut on_disk: Vec<(String, SystemTime)> = Vec::new();
    let mut leftovers = Vec::new();
    for entry in entries.flatten() {
        let Ok(name) = entry.file_name().into_string() else {
            continue;
        };
        let Ok(meta) = entry.metadata() else { continue };
        if name.starts_with('.') {
            if name.ends_with(".tmp") || name.contains(".replaced-") {
                leftovers.push(entry.path());
            }
        } else if meta.is_dir() && validate_commit(&name).is_ok() {
            on_disk.push((name, meta.modified().unwrap_or(UNIX_EPOCH)));
        }
    }
    let mut history = read_history(app_dir);
    let mut ranked: Vec<String> = history
        .iter()
        .rev()
        .filter(|c| on_disk.iter().any(|(n, _)| n == *c))
        .cloned()
        .collect();
    let mut unswitched: Vec<&(String, SystemTime)> = on_disk
        .iter()
        .filter(|(n, _)| !ranked.contains(n))
        .collect();
    unswitched.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| b.0.cmp(&a.0)));
    ranked.extend(unswitched.into_iter().map(|(n, _)| n.clone()));

    let protected = [current_release(app_dir), previous_release(app_dir)];
    let doomed: Vec<String> = ranked
        .iter()
        .skip(keep)
        .filter(|c| !protected.iter().any(|p| p.as_ref() == Some(*c)))
        .cloned()
        .collect();
    for commit in &doomed {
        let dir = releases.join(commit);
        fs::remove_dir_all(&dir).map_err(|e| io_fail("removing", &dir, e))?;
    }
    for path in leftovers {
        fs::remove_dir_all(&path).map_err(|e| io_fail("removing", &path, e))?;
    }
    if !doomed.is_empty() {
        let before = history.len();
        history.retain(|c| !doomed.contains(c));
        if history.len() != before {
            write_history(app_dir, &history)?;
        }
    }
    Ok(doomed)
}

/// One line of the audit log. Fields are written as given: mask secrets
/// ([`JobEvents::redact`]) before.
#[derive(Clone, Debug, Default)]
pub struct AuditLine {
    /// The deploy (or rollback) this step belongs to.
    pub deploy_id: String,
    /// The app.
    pub app: String,
    /// The environment (production, staging...).
    pub environment: String,
    /// The release the step worked on.
    pub commit: String,
    /// The step ("unpack", "build", "health", "rollback"...).
    pub step: String,
    /// "succeeded", "failed" or "skipped".
    pub outcome: String,
    /// What happened, in a sentence.
    pub detail: String,
}

impl AuditLine {
    /// The line as written: RFC 3339 time, then `key=value` fields (values quoted when they
    /// contain spaces, quotes, `=` or control characters), newline-terminated.
    pub fn render(&self, at: &str) -> String {
        let detail: String = self.detail.chars().take(2000).collect();
        format!(
            "{at} deploy_id={} app={} env={} commit={} step={} outcome={} detail={}\n",
            field(&self.deploy_id),
            field(&self.app),
            field(&self.environment),
            field(&self.commit),
            field(&self.step),
            field(&self.outcome),
            field(&detail),
        )
    }
}

fn field(value: &str) -> String {
    let plain = !value.is_empty()
        && !value
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || matches!(c, '"' | '=' | '\\'));
    if plain {
        return value.to_string();
    }
    let mut out = String::with_capacity(value.len() + 2);
    out.push('"');
    for c in value.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => out.push_str(&format!("\\u{{{:x}}}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Appends `line` to `APP_DIR/audit.log` (created with mode 0640) in one write, so lines of
/// concurrent writers never interleave.
pub fn audit(app_dir: &Path, line: &AuditLine) -> Result<(), JobError> {
    let path = app_dir.join(AUDIT_LOG);
    let text = line.render(&sentinel_proto::time::now().to_string());
    let mut file = OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o640)
        .open(&path)
        .map_err(|e| io_fail("opening", &path, e))?;
    file.write_all(text.as_bytes())
        .map_err(|e| io_fail("appending to", &path, e))
}

/// `releases.json`.
#[derive(Default, serde::Serialize, serde::Deserialize)]
struct State {
    /// Commits in the order they went live, oldest first, each at most once.
    #[serde(default)]
    history: Vec<String>,
}

/// The history of switches, oldest first. A missing or unreadable file is an empty history
/// (pruning then falls back to mtimes); names that are not valid commits are dropped.
fn read_history(app_dir: &Path) -> Vec<String> {
    fs::read_to_string(app_dir.join(STATE_FILE))
        .map(|text| parse_history(&text))
        .unwrap_or_default()
}

fn parse_history(text: &str) -> Vec<String> {
    serde_json::from_str::<State>(text)
        .map(|state| {
            state
                .history
                .into_iter()
                .filter(|c| validate_commit(c).is_ok())
                .collect()
        })
        .unwrap_or_default()
}

fn render_history(history: &[String]) -> String {
    let state = State {
        history: history.to_vec(),
    };
    // Serializing a list of strings cannot fail; an empty history is the safe fallback.
    let mut text =
        serde_json::to_string_pretty(&state).unwrap_or_else(|_| "{\"history\": []}".to_string());
    text.push('\n');
    text
}

/// Writes the history atomically (temp file, fsync, rename, fsync of the directory).
fn write_history(app_dir: &Path, history: &[String]) -> Result<(), JobError> {
    let start = history.len().saturating_sub(HISTORY_LIMIT);
    let text = render_history(&history[start..]);
    let path = app_dir.join(STATE_FILE);
    sentinel_daemon::fs::write_atomic(&path, text.as_bytes(), 0o644)
        .map_err(|e| io_fail("writing", &path, e.source))
}

/// Removes a file, symlink or directory tree if it exists.
fn remove_path(path: &Path) -> Result<(), JobError> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(path).map_err(|e| io_fail("removing", path, e)),
        Ok(_) => fs::remove_file(path).map_err(|e| io_fail("removing", path, e)),
        Err(_) => Ok(()),
    }
}

/// Makes a rename in `dir` durable; best effort, since a failure here changes nothing we can
/// act on.
fn sync_dir(dir: &Path) {
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

fn unique_suffix() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("{}-{nanos}", std::process::id())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jobs::events::Outbox;

    fn events() -> (Outbox, JobEvents) {
        let outbox = Outbox::default();
        let events = JobEvents::new("job", outbox.clone(), 0);
        (outbox, events)
    }

    fn make_release(app: &Path, commit: &str) {
        fs::create_dir_all(release_dir(app, commit)).expect("mkdir");
    }

    #[test]
    fn commits_are_validated() {
        for ok in ["abc123", "v1.2.3", "feature_x-1", &"a".repeat(64)] {
            assert!(validate_commit(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            ".",
            "..",
            ".hidden",
            "a/b",
            "a b",
            "ä",
            &"a".repeat(65),
            "x\n",
        ] {
            assert!(validate_commit(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn env_values_cover_quoted_exported_and_commented_forms() {
        let v = env_values(
            "# comment\nDB_PASSWORD=s3cr3t\nexport TOKEN=\"quoted value\"\nK='single'\nC=raw # note\nEMPTY=\nnot a pair\n",
        );
        for expected in [
            "s3cr3t",
            "\"quoted value\"",
            "quoted value",
            "single",
            "raw",
        ] {
            assert!(
                v.iter().any(|x| x == expected),
                "{expected} missing in {v:?}"
            );
        }
        assert!(!v.iter().any(|x| x.is_empty()));
    }

    #[test]
    fn symlink_targets_must_stay_inside() {
        let p = Path::new;
        assert!(symlink_stays_inside(p("a/link"), p("../b")));
        assert!(symlink_stays_inside(p("link"), p("./b/c")));
        assert!(!symlink_stays_inside(p("link"), p("../b")));
        assert!(!symlink_stays_inside(p("a/link"), p("../../b")));
        assert!(!symlink_stays_inside(p("a/link"), p("b/../..")));
        assert!(!symlink_stays_inside(p("a/link"), p("b/../c")));
        assert!(!symlink_stays_inside(p("link"), p("/etc/passwd")));
        assert!(!symlink_stays_inside(p("link"), p("")));
    }

    #[test]
    fn switches_keep_a_history_and_rollbacks_go_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let app = dir.path();
        for c in ["c1", "c2", "c3"] {
            make_release(app, c);
        }
        assert_eq!(current_release(app), None);
        assert_eq!(previous_release(app), None);
        switch_current(app, "c1").expect("switch");
        switch_current(app, "c2").expect("switch");
        switch_current(app, "c3").expect("switch");
        assert_eq!(current_release(app).as_deref(), Some("c3"));
        assert_eq!(previous_release(app).as_deref(), Some("c2"));
        assert_eq!(
            fs::read_link(app.join(CURRENT_LINK)).expect("link"),
            Path::new("releases/c3")
        );
        // Rolling back twice goes two releases back, never forward into c3.
        switch_back(app, "c2").expect("back");
        assert_eq!(previous_release(app).as_deref(), Some("c1"));
        switch_back(app, "c1").expect("back");
        assert_eq!(previous_release(app), None);
        // Deploying again moves a commit to the end.
        switch_current(app, "c3").expect("switch");
        switch_current(app, "c2").expect("switch");
        assert_eq!(
            parse_history(&fs::read_to_string(app.join(STATE_FILE)).expect("state")),
            ["c1", "c3", "c2"]
        );
        assert!(switch_current(app, "missing").is_err());
        clear_current(app, "c2").expect("clear");
        assert_eq!(current_release(app), None);
    }

    #[test]
    fn history_survives_a_crash_between_link_and_state() {
        let dir = tempfile::tempdir().expect("tempdir");
        let app = dir.path();
        for c in ["c1", "c2"] {
            make_release(app, c);
        }
        switch_current(app, "c1").expect("switch");
        // As if the agent died after renaming the link for c2 but before writing the state.
        replace_link(app, "c2").expect("link");
        assert_eq!(previous_release(app).as_deref(), Some("c1"));
    }

    #[test]
    fn prune_keeps_newest_and_never_current_or_previous() {
        let dir = tempfile::tempdir().expect("tempdir");
        let app = dir.path();
        for c in ["c1", "c2", "c3", "c4", "old"] {
            make_release(app, c);
        }
        fs::create_dir_all(app.join("releases/.c9.tmp")).expect("leftover");
        for c in ["c1", "c2", "c3", "c4"] {
            switch_current(app, c).expect("switch");
        }
        // Roll back to c1 explicitly: c1 current, nothing before it in the history.
        switch_back(app, "c1").expect("back");
        switch_current(app, "c4").expect("switch");
        // History is now [c1, c4]: current c4, previous c1; c2, c3 and "old" were switched
        // away from or never switched to, so they rank after by mtime.
        let removed = prune(app, 1).expect("prune");
        let mut removed_sorted = removed.clone();
        removed_sorted.sort();
        assert_eq!(removed_sorted, ["c2", "c3", "old"]);
        assert!(release_dir(app, "c4").is_dir());
        assert!(
            release_dir(app, "c1").is_dir(),
            "the previous release is never pruned"
        );
        assert!(!app.join("releases/.c9.tmp").exists());
        assert_eq!(prune(app, 5).expect("prune"), Vec::<String>::new());
    }

    #[test]
    fn audit_lines_are_one_line_each_and_quoted() {
        let dir = tempfile::tempdir().expect("tempdir");
        let line = AuditLine {
            deploy_id: "d1".into(),
            app: "web".into(),
            environment: "prod".into(),
            commit: "abc".into(),
            step: "build".into(),
            outcome: "failed".into(),
            detail: "exit code 1\nlast \"line\"".into(),
        };
        audit(dir.path(), &line).expect("audit");
        audit(dir.path(), &line).expect("audit");
        let text = fs::read_to_string(dir.path().join(AUDIT_LOG)).expect("read");
        assert_eq!(text.lines().count(), 2);
        let first = text.lines().next().unwrap_or_default();
        assert!(first.contains(" deploy_id=d1 app=web env=prod commit=abc step=build outcome=failed detail=\"exit code 1\\nlast \\\"line\\\"\""), "{first}");
        assert!(
            first.split(' ').next().unwrap_or_default().ends_with('Z'),
            "{first}"
        );
    }

    #[test]
    fn history_parser_accepts_its_own_output_and_skips_junk() {
        let h = vec!["a".to_string(), "b.c".to_string()];
        assert_eq!(parse_history(&render_history(&h)), h);
        assert_eq!(parse_history(&render_history(&[])), Vec::<String>::new());
        assert_eq!(parse_history("{\"history\":[\"ok\",\"../x\"]}"), ["ok"]);
        assert_eq!(parse_history("garbage"), Vec::<String>::new());
    }

    #[test]
    fn unpacking_writes_env_files_0600_and_registers_their_values() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let bundle = dir.path().join("b.tar.gz");
        let mut builder = tar::Builder::new(flate2::write::GzEncoder::new(
            File::create(&bundle).expect("create"),
            flate2::Compression::fast(),
        ));
        for (path, mode, data) in [
            ("./docker-compose.yml", 0o644, &b"services: {}\n"[..]),
            ("./.env", 0o644, &b"DB_PASSWORD=hunter22\n"[..]),
            ("./bin/run", 0o755, &b"#!/bin/sh\n"[..]),
        ] {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(mode);
            h.set_entry_type(tar::EntryType::Regular);
            builder.append_data(&mut h, path, data).expect("append");
        }
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_size(0);
        builder
            .append_link(&mut h, "bin/compose.yml", "../docker-compose.yml")
            .expect("link");
        builder
            .into_inner()
            .and_then(|gz| gz.finish())
            .expect("finish");

        let (outbox, ev) = events();
        let app = dir.path().join("app");
        let rel = unpack_bundle(&bundle, &app, "c1", &ev).expect("unpack");
        assert_eq!(rel, release_dir(&app, "c1"));
        let mode = |p: &str| {
            fs::metadata(rel.join(p))
                .expect("meta")
                .permissions()
                .mode()
                & 0o777
        };
        assert_eq!(mode(".env"), 0o600);
        assert_eq!(mode("bin/run") & 0o100, 0o100);
        assert_eq!(
            fs::read_to_string(rel.join("bin/compose.yml")).expect("via link"),
            "services: {}\n"
        );
        ev.log("stdout", "password is hunter22");
        assert!(!format!("{:?}", outbox.drain()).contains("hunter22"));
        // Unpacking the same commit again replaces it; the old copy is pruned later.
        unpack_bundle(&bundle, &app, "c1", &ev).expect("again");
        assert!(rel.join(".env").exists());
        prune(&app, 5).expect("prune");
        let names: Vec<String> = fs::read_dir(app.join(RELEASES_DIR))
            .expect("read")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["c1"]);
    }
}
