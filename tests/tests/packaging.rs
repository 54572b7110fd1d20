//! The `.deb` packages and the systemd integration: `packaging/build-debs.sh` packages the
//! debug binaries the end-to-end tests use (cargo-deb, no rebuild: about 10 s), the packages
//! are unpacked into a throwaway root with `dpkg -x`, and what landed where is checked; the
//! units are verified with `systemd-analyze verify` and scored with `systemd-analyze security`
//! inside that root; and both binaries are shown to send READY=1 to `$NOTIFY_SOCKET`.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use sentinel_e2e::{
    bin, bin_dir, eventually, logged_addr, patience, run, Fleet, CONTROLLER_LISTENING,
};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Runs a command that must succeed; returns its standard output.
fn ok(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn need(tool: &str, package: &str) {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(
        found,
        "{tool} is missing: {package} (tests/run.sh installs it)"
    );
}

/// The .deb of `package` in `dir`.
fn deb(dir: &Path, package: &str) -> PathBuf {
    std::fs::read_dir(dir)
        .expect("reading the package dir")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            let name = p
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .to_string();
            name.starts_with(&format!("{package}_")) && name.ends_with(".deb")
        })
        .unwrap_or_else(|| panic!("no {package}_*.deb in {}", dir.display()))
}

fn gunzip(path: &Path) -> String {
    ok(Command::new("gzip").arg("-dc").arg(path))
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{} is missing: {e}", path.display()))
        .permissions()
        .mode()
        & 0o7777
}

/// What one package must install.
struct Expect {
    package: &'static str,
    config: &'static str,
    unit_lines: &'static [&'static str],
    man_pages: &'static [&'static str],
    /// Words the bash completion must offer (subcommands, flags).
    completes: &'static [&'static str],
    extra_files: &'static [&'static str],
}

const SENTINEL: Expect = Expect {
    package: "sentinel",
    config: "etc/sentinel/sentinel.toml",
    unit_lines: &[
        "ExecStart=/usr/bin/sentinel serve --config /etc/sentinel/sentinel.toml",
        "User=sentinel",
        "StateDirectory=sentinel",
        "ProtectSystem=strict",
        "ProtectHome=yes",
    ],
    man_pages: &[
        "sentinel.1.gz",
        "sentinel-serve.1.gz",
        "sentinel-hosts.1.gz",
        "sentinel-host.1.gz",
        "sentinel-jobs.1.gz",
        "sentinel-deploys.1.gz",
        "sentinel-pki-issue-host.1.gz",
    ],
    completes: &["hosts", "deploys", "--json", "issue-host"],
    extra_files: &[
        "usr/share/sentinel/grafana/sentinel.json",
        "usr/share/sentinel/prometheus/sentinel.rules.yml",
    ],
};

const HOSTAGENT: Expect = Expect {
    package: "hostagent",
    config: "etc/hostagent/agent.toml",
    unit_lines: &[
        "ExecStart=/usr/bin/hostagent --config /etc/hostagent/agent.toml",
        "User=hostagent",
        "StateDirectory=hostagent",
        "ProtectSystem=strict",
        "ReadWritePaths=-/srv/apps -/var/backups/sentinel -/etc/hostagent",
    ],
    man_pages: &["hostagent.1.gz"],
    completes: &["--check-config", "--log-format"],
    extra_files: &[],
};

/// Lines both units carry: readiness, restarts with a limit, the hardening baseline.
const COMMON_UNIT_LINES: &[&str] = &[
    "Type=notify",
    "Restart=on-failure",
    "RestartPreventExitStatus=64",
    "StartLimitBurst=5",
    "NoNewPrivileges=yes",
    "PrivateTmp=yes",
    "CapabilityBoundingSet=",
    "SystemCallFilter=@system-service",
    "WantedBy=multi-user.target",
];

#[test]
fn the_debs_install_binaries_hardened_units_configs_completions_and_man_pages() {
    need("cargo-deb", "cargo install --locked cargo-deb");
    need("dpkg-deb", "apt-get install dpkg");
    need("systemd-analyze", "apt-get install systemd");
    // The binaries the harness runs must exist (and are what gets packaged).
    bin("sentinel");
    bin("hostagent");
    let tmp = tempfile::tempdir().expect("temp dir");
    let debs = tmp.path().join("debs");
    ok(Command::new("bash")
        .arg(workspace().join("packaging/build-debs.sh"))
        .arg("--binaries")
        .arg(bin_dir())
        .arg("--fast")
        .arg("--out")
        .arg(&debs));

    let root = tmp.path().join("root");
    for expect in [&SENTINEL, &HOSTAGENT] {
        let name = expect.package;
        let deb = deb(&debs, name);

        // Control data: the service user comes from adduser in postinst; the config is a
        // conffile; every maintainer script is valid sh.
        let depends = ok(Command::new("dpkg-deb")
            .args(["-f"])
            .arg(&deb)
            .arg("Depends"));
        assert!(depends.contains("adduser"), "{name} Depends: {depends}");
        let control = tmp.path().join(format!("control-{name}"));
        ok(Command::new("dpkg-deb").arg("-e").arg(&deb).arg(&control));
        let postinst = std::fs::read_to_string(control.join("postinst")).expect("postinst");
        assert!(
            postinst.contains("adduser --system --group") && postinst.contains(name),
            "{postinst}"
        );
        assert!(postinst.contains("deb-systemd-helper"), "{postinst}");
        assert!(!postinst.contains("#DEBHELPER#"), "{postinst}");
        for script in ["postinst", "postrm", "prerm"] {
            let path = control.join(script);
            if path.exists() {
                ok(Command::new("sh").arg("-n").arg(&path));
                assert_eq!(mode(&path) & 0o111, 0o111, "{script} is executable");
            }
        }
        let conffiles = std::fs::read_to_string(control.join("conffiles")).unwrap_or_default();
        assert!(
            conffiles
                .lines()
                .any(|l| l == format!("/{}", expect.config)),
            "{name} conffiles: {conffiles}"
        );

        ok(Command::new("dpkg").arg("-x").arg(&deb).arg(&root));

        // The binary runs from where it landed.
        let binary = root.join("usr/bin").join(name);
        assert_eq!(mode(&binary), 0o755);
        let version = ok(Command::new(&binary).arg("--version"));
        assert!(version.starts_with(&format!("{name} 0.")), "{version}");

        // The shipped config, readable by root and the service group only, and valid.
        let config = root.join(expect.config);
        assert_eq!(mode(&config), 0o640, "{}", config.display());
        let shipped = workspace()
            .join("packaging/config")
            .join(config.file_name().unwrap());
        assert_eq!(
            std::fs::read_to_string(&config).unwrap(),
            std::fs::read_to_string(&shipped).unwrap()
        );
        // The shipped config parses and validates; what the check then misses are the TLS
        // files the operator installs (enrolment writes them), and it says which.
        let check = if name == "sentinel" {
            run(Command::new(&binary)
                .arg("config")
                .arg("check")
                .arg(&config))
        } else {
            run(Command::new(&binary)
                .arg("--check-config")
                .arg("--config")
                .arg(&config))
        };
        let err = String::from_utf8_lossy(&check.stderr);
        assert_eq!(check.status.code(), Some(64), "{err}");
        assert!(
            err.contains("key `tls.ca`") && err.contains(&format!("/etc/{name}/ca.pem")),
            "{err}"
        );

        // The unit, with the hardening an operator expects.
        let unit = root.join(format!("usr/lib/systemd/system/{name}.service"));
        let text = std::fs::read_to_string(&unit).expect("the unit");
        for line in COMMON_UNIT_LINES.iter().chain(expect.unit_lines) {
            assert!(
                text.lines().any(|l| l == *line),
                "{name}.service lacks `{line}`"
            );
        }

        // Completions for three shells, generated from the clap definitions.
        let bash = std::fs::read_to_string(
            root.join(format!("usr/share/bash-completion/completions/{name}")),
        )
        .expect("bash completion");
        for word in expect.completes {
            assert!(
                bash.contains(word),
                "bash completion of {name} lacks {word}"
            );
        }
        assert!(bash.contains(&format!("complete -F _{name}")), "{bash}");
        for path in [
            format!("usr/share/zsh/vendor-completions/_{name}"),
            format!("usr/share/fish/vendor_completions.d/{name}.fish"),
        ] {
            let text = std::fs::read_to_string(root.join(&path)).unwrap_or_default();
            assert!(text.contains(name), "{path} is empty or missing");
        }

        // Man pages, one per visible subcommand, gzipped.
        for page in expect.man_pages {
            let path = root.join("usr/share/man/man1").join(page);
            let roff = gunzip(&path);
            let title = page.trim_end_matches(".1.gz");
            assert!(roff.contains(&format!(".TH {title} 1")), "{page}: {roff}");
        }
        for file in expect.extra_files {
            assert!(
                root.join(file).is_file(),
                "{file} missing from the {name} package"
            );
        }
    }
    // The internal entry point packaging uses shows nowhere.
    for file in [
        "usr/share/bash-completion/completions/sentinel",
        "usr/share/bash-completion/completions/hostagent",
        "usr/share/zsh/vendor-completions/_sentinel",
        "usr/share/fish/vendor_completions.d/hostagent.fish",
    ] {
        let text = std::fs::read_to_string(root.join(file)).unwrap_or_default();
        assert!(
            !text.contains("generate-assets"),
            "{file} offers the internal argument"
        );
    }

    // systemd's own checks, inside the throwaway root: its stock units are copied in (the
    // units name targets such as multi-user.target), and `man` looks for the pages the units'
    // Documentation= names in the root too.
    let units = root.join("usr/lib/systemd/system");
    let host_units = ["/usr/lib/systemd/system", "/lib/systemd/system"]
        .into_iter()
        .map(Path::new)
        .find(|p| p.join("multi-user.target").exists())
        .expect("systemd's units (apt-get install systemd)");
    ok(Command::new("cp")
        .arg("-rn")
        .arg(format!("{}/.", host_units.display()))
        .arg(&units));
    // ExecReload runs kill(1), which every Debian system has (procps) but the root does not.
    std::fs::create_dir_all(root.join("bin")).expect("creating bin/ in the root");
    ok(Command::new("cp")
        .arg("/bin/kill")
        .arg(root.join("bin/kill")));
    let verify = run(Command::new("systemd-analyze")
        .arg("verify")
        .arg(format!("--root={}", root.display()))
        .args(["sentinel.service", "hostagent.service"])
        .env("MANPATH", root.join("usr/share/man")));
    let stderr = String::from_utf8_lossy(&verify.stderr);
    assert!(
        verify.status.success() && stderr.trim().is_empty(),
        "systemd-analyze verify:\n{stderr}"
    );
    for name in ["sentinel", "hostagent"] {
        // Exposure 0 (locked down) .. 10 (unprotected): both stay "OK", at most 2.0
        // (--threshold counts tenths).
        let security = run(Command::new("systemd-analyze")
            .args(["security", "--offline=yes", "--threshold=20"])
            .arg(format!("--root={}", root.display()))
            .arg(format!("{name}.service")));
        let text = String::from_utf8_lossy(&security.stdout);
        let overall = text
            .lines()
            .find(|l| l.contains("Overall exposure level"))
            .unwrap_or_default();
        assert!(
            security.status.success(),
            "{name}.service is exposed above 2.0: {overall}\n{text}{}",
            String::from_utf8_lossy(&security.stderr)
        );
        eprintln!("{overall}");
    }
}

/// A process killed when dropped.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(cmd: &mut Command, notify: &Path, log: &Path) -> Running {
    let out = std::fs::File::create(log).expect("log file");
    let err = out.try_clone().expect("log file");
    Running(
        cmd.env("NOTIFY_SOCKET", notify)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {cmd:?}: {e}")),
    )
}

fn receive(socket: &UnixDatagram, what: &str, log: &Path) -> String {
    let mut buf = [0u8; 512];
    match socket.recv(&mut buf) {
        Ok(n) => String::from_utf8_lossy(&buf[..n]).into_owned(),
        Err(e) => panic!(
            "no notification {what} ({e}); log:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        ),
    }
}

#[test]
fn both_binaries_tell_systemd_when_they_are_ready_and_when_they_stop() {
    let fleet = Fleet::new(&["argus"]);
    let socket_path = fleet.path("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).expect("binding the notify socket");
    socket.set_read_timeout(Some(patience())).expect("timeout");

    let config = fleet.path("sentinel.toml");
    let c = fleet.certs.display();
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:0\"\ndata_dir = \"{}\"\n\n[tls]\nca = \"{c}/ca.pem\"\ncert = \"{c}/controller.pem\"\nkey = \"{c}/controller.key\"\n\n[metrics]\nenabled = false\n",
            fleet.path("data").display()
        ),
    )
    .unwrap();
    let controller_log = fleet.path("controller.log");
    let controller = spawn(
        Command::new(bin("sentinel"))
            .arg("serve")
            .arg("--config")
            .arg(&config),
        &socket_path,
        &controller_log,
    );
    let ready = receive(&socket, "from the controller", &controller_log);
    let addr = eventually("the controller to log its bound address", || {
        let text = std::fs::read_to_string(&controller_log).unwrap_or_default();
        logged_addr(&text, CONTROLLER_LISTENING).ok_or(text)
    });
    assert_eq!(ready, format!("READY=1\nSTATUS=serving on {addr}"));

    let agent_config = fleet.write_agent_config(
        "argus",
        "argus",
        &addr.to_string(),
        &format!(
            "[metrics]\nenabled = false\n[jobs]\nstate_dir = \"{}\"\n",
            fleet.path("agent-state").display()
        ),
    );
    let agent_log = fleet.path("agent.log");
    let _agent = spawn(
        Command::new(bin("hostagent"))
            .arg("--config")
            .arg(&agent_config),
        &socket_path,
        &agent_log,
    );
    let ready = receive(&socket, "from the agent", &agent_log);
    assert_eq!(ready, format!("READY=1\nSTATUS=connecting to {addr}"));

    // SIGTERM: systemd hears that the controller is stopping while it drains.
    ok(Command::new("kill")
        .arg("-TERM")
        .arg(controller.0.id().to_string()));
    let stopping = receive(&socket, "of stopping", &controller_log);
    assert_eq!(stopping, "STOPPING=1\nSTATUS=shutting down");
}
