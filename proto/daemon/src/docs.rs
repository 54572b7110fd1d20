//! Shell completions (bash, zsh, fish) and man pages generated from a binary's clap
//! definitions, so the ones the .deb packages install can never drift from the real flags.
//! `packaging/build-debs.sh` calls `NAME __generate-assets DIR`: an internal argument each
//! binary checks before clap parses, so that it shows in no help, completion or man page
//! (clap's completion generators list even hidden options).

use std::ffi::OsString;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap_complete::Shell;

/// The internal first argument that asks a binary for its completions and man pages.
pub const GENERATE_ARG: &str = "__generate-assets";

/// The directory asked for when the command line is `NAME __generate-assets DIR`.
pub fn requested(args: impl IntoIterator<Item = OsString>) -> Option<PathBuf> {
    let mut args = args.into_iter().skip(1);
    if args.next()? != GENERATE_ARG {
        return None;
    }
    args.next().map(PathBuf::from)
}

/// Runs [`generate`] for a binary's `main`: exit 0, or 1 with the reason.
pub fn generate_main(cmd: clap::Command, dir: &Path) -> ExitCode {
    let name = cmd.get_name().to_string();
    match generate(cmd, dir) {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{name}: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Writes `DIR/completions/{NAME.bash,_NAME,NAME.fish}` and `DIR/man/NAME[-SUB…].1.gz` (one
/// page per visible subcommand) for `cmd`; returns the files written.
pub fn generate(cmd: clap::Command, dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut cmd = cmd.disable_help_subcommand(true);
    cmd.build();
    let name = cmd.get_name().to_string();
    let mut written = Vec::new();

    let completions = dir.join("completions");
    fs::create_dir_all(&completions)
        .with_context(|| format!("creating {}", completions.display()))?;
    for (shell, file) in [
        (Shell::Bash, format!("{name}.bash")),
        (Shell::Zsh, format!("_{name}")),
        (Shell::Fish, format!("{name}.fish")),
    ] {
        let mut text = Vec::new();
        clap_complete::generate(shell, &mut cmd.clone(), name.clone(), &mut text);
        let path = completions.join(file);
        fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        written.push(path);
    }

    let man = dir.join("man");
    fs::create_dir_all(&man).with_context(|| format!("creating {}", man.display()))?;
    man_pages(&cmd, &man, &mut written)?;
    Ok(written)
}

/// One gzipped page for `cmd` and each of its visible subcommands, recursively.
fn man_pages(cmd: &clap::Command, dir: &Path, written: &mut Vec<PathBuf>) -> anyhow::Result<()> {
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        man_pages(sub, dir, written)?;
    }
    let page = clap_mangen::Man::new(cmd.clone())
        .manual("Sentinel")
        .source(format!("Sentinel {}", crate::VERSION));
    let mut roff = Vec::new();
    page.render(&mut roff).context("rendering a man page")?;
    let path = dir.join(format!("{}.gz", page.get_filename()));
    // No file name and mtime 0 in the gzip header: the same sources give the same package.
    let mut gz = flate2::GzBuilder::new()
        .mtime(0)
        .write(Vec::new(), flate2::Compression::best());
    gz.write_all(&roff)?;
    let bytes = gz.finish()?;
    fs::write(&path, bytes).with_context(|| format!("writing {}", path.display()))?;
    written.push(path);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_exact_internal_argument_asks_for_assets() {
        let args = |a: &[&str]| a.iter().map(OsString::from).collect::<Vec<_>>();
        assert_eq!(
            requested(args(&["sentinel", "__generate-assets", "out"])),
            Some(PathBuf::from("out"))
        );
        assert_eq!(requested(args(&["sentinel", "__generate-assets"])), None);
        assert_eq!(
            requested(args(&["sentinel", "hosts", "__generate-assets", "x"])),
            None
        );
        assert_eq!(requested(args(&["sentinel"])), None);
    }

    #[test]
    fn completions_and_pages_cover_every_visible_subcommand() {
        let cmd = clap::Command::new("demo")
            .about("A demo.")
            .subcommand(clap::Command::new("serve").about("Serve."))
            .subcommand(clap::Command::new("secret").hide(true));
        let dir = tempfile::tempdir().unwrap();
        let files = generate(cmd, dir.path()).unwrap();
        let names: Vec<String> = files
            .iter()
            .map(|f| f.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        for expected in [
            "demo.bash",
            "_demo",
            "demo.fish",
            "demo.1.gz",
            "demo-serve.1.gz",
        ] {
            assert!(
                names.iter().any(|n| n == expected),
                "{expected} missing: {names:?}"
            );
        }
        assert!(!names.iter().any(|n| n.contains("secret")), "{names:?}");
        let mut page = String::new();
        std::io::Read::read_to_string(
            &mut flate2::read::GzDecoder::new(
                fs::File::open(dir.path().join("man/demo-serve.1.gz")).unwrap(),
            ),
            &mut page,
        )
        .unwrap();
        assert!(page.contains(".TH demo-serve 1"), "{page}");
    }
}
