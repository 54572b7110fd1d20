//! Unpacking a release bundle: the gzipped tar reader and its checks (paths, symlinks, entry
//! types, size), and env files, whose values become secrets before anything runs.

use std::collections::HashSet;
use std::ffi::OsStr;
use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, BufReader, Read, Write};
use std::os::unix::fs::{symlink, DirBuilderExt, OpenOptionsExt};
use std::path::{Component, Path, PathBuf};

use flate2::read::GzDecoder;

use super::{fail, io_fail, sync_dir, unique_suffix, validate_commit, RELEASES_DIR};
use crate::jobs::events::{JobError, JobEvents};

/// The largest env file read into memory to register its values as secrets.
const MAX_ENV_FILE: u64 = 1024 * 1024;
/// The most bytes a bundle may unpack to: a signed bundle is trusted, but a broken build
/// producing a runaway archive should fail the deploy, not fill the disk.
const MAX_UNPACKED: u64 = 4 * 1024 * 1024 * 1024;

/// Unpacks the gzipped tar `bundle` into `APP_DIR/releases/<commit>` and returns that path.
///
/// The bundle is extracted into a hidden temporary directory and renamed into place, so a
/// release directory is always complete. Entries with absolute paths or `..`, symlinks whose
/// target leaves the release, entries under a symlink, hard links and device files are
/// refused. Env files (`.env`, `.env.*`, `*.env`) are created with mode 0600 from the start and
/// every value in them is registered with `events` as a secret before anything runs. An
/// existing release of the same commit is replaced (the bundle is authoritative, e.g. for a
/// changed `.env`); the old directory is moved aside and removed by the next
/// [`prune`](super::prune), since running containers may still bind-mount it.
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
    for (key, value) in env_values(&String::from_utf8_lossy(&content)) {
        events.add_env_value(&key, &value);
    }
    let mut out = create_file(dest, 0o600)?;
    out.write_all(&content)
        .map_err(|e| io_fail("writing", dest, e))?;
    Ok(())
}

/// The values of a dotenv file with their keys, each value in every form it could be printed:
/// as written, unquoted, and without an inline comment.
fn env_values(text: &str) -> Vec<(String, String)> {
    let mut values = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let line = line.strip_prefix("export ").unwrap_or(line);
        let Some((key, raw)) = line.split_once('=') else {
            continue;
        };
        let key = key.trim();
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
            let pair = (key.to_string(), form);
            if !pair.1.is_empty() && !values.contains(&pair) {
                values.push(pair);
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
            for (key, value) in env_values(&String::from_utf8_lossy(&content)) {
                events.add_env_value(&key, &value);
            }
            count += 1;
        }
    }
    count
}

/// Removes a file, symlink or directory tree if it exists.
fn remove_path(path: &Path) -> Result<(), JobError> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(path).map_err(|e| io_fail("removing", path, e)),
        Ok(_) => fs::remove_file(path).map_err(|e| io_fail("removing", path, e)),
        Err(_) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jobs::events::Outbox;
    use crate::jobs::release::{prune, release_dir};

    fn events() -> (Outbox, JobEvents) {
        let outbox = Outbox::default();
        let events = JobEvents::new("job", outbox.clone(), 0);
        (outbox, events)
    }

    #[test]
    fn env_values_cover_quoted_exported_and_commented_forms() {
        let v = env_values(
            "# comment\nDB_PASSWORD=s3cr3t\nexport TOKEN=\"quoted value\"\nK='single'\nC=raw # note\nEMPTY=\nnot a pair\n",
        );
        for (key, expected) in [
            ("DB_PASSWORD", "s3cr3t"),
            ("TOKEN", "\"quoted value\""),
            ("TOKEN", "quoted value"),
            ("K", "single"),
            ("C", "raw"),
        ] {
            assert!(
                v.iter().any(|(k, x)| k == key && x == expected),
                "{key}={expected} missing in {v:?}"
            );
        }
        assert!(!v.iter().any(|(_, x)| x.is_empty()));
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
