//! The release history on the host: which release is live (the `current` link), which was
//! live before it (`releases.json`), switching forward and back, and `keep_releases` pruning.

use std::ffi::OsStr;
use std::fs;
use std::io;
use std::os::unix::fs::symlink;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use super::{
    fail, io_fail, release_dir, sync_dir, unique_suffix, validate_commit, CURRENT_LINK,
    RELEASES_DIR, STATE_FILE,
};
use crate::jobs::events::JobError;

/// Switches remembered; older ones only matter for pruning order, which mtimes approximate.
const HISTORY_LIMIT: usize = 100;

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

#[cfg(test)]
mod tests {
    use super::*;

    fn make_release(app: &Path, commit: &str) {
        fs::create_dir_all(release_dir(app, commit)).expect("mkdir");
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
    fn history_parser_accepts_its_own_output_and_skips_junk() {
        let h = vec!["a".to_string(), "b.c".to_string()];
        assert_eq!(parse_history(&render_history(&h)), h);
        assert_eq!(parse_history(&render_history(&[])), Vec::<String>::new());
        assert_eq!(parse_history("{\"history\":[\"ok\",\"../x\"]}"), ["ok"]);
        assert_eq!(parse_history("garbage"), Vec::<String>::new());
    }
}
