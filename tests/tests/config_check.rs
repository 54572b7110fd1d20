//! Config checks that check the files: `hostagent --check-config` and `sentinel config check`
//! refuse a missing or unreadable file, a key that is not the certificate's, an expired
//! certificate, one from another CA, a `host_name` the certificate is not for and a controller
//! address without a port, naming the key and the file, with exit 64; the daemons refuse to
//! start the same way. Certificate failures at run time read as sentences.

use std::path::Path;
use std::process::Command;

use sentinel_e2e::{bin, check_agent_config, eventually, run, Fleet};

/// Writes `certs/STEM.pem` and `STEM.key`: a client certificate for `uri` signed by the fleet
/// CA, valid from `from_days` to `to_days` days from now.
fn issue(fleet: &Fleet, stem: &str, uri: &str, from_days: i64, to_days: i64) {
    use rcgen::{
        CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose, SanType,
    };
    let ca_key =
        KeyPair::from_pem(&std::fs::read_to_string(fleet.certs.join("ca.key")).unwrap()).unwrap();
    let mut ca_dn = DistinguishedName::new();
    ca_dn.push(DnType::OrganizationName, sentinel::pki::FLEET_ORGANIZATION);
    ca_dn.push(DnType::CommonName, sentinel::pki::CA_COMMON_NAME);
    let mut ca_params = CertificateParams::default();
    ca_params.distinguished_name = ca_dn;
    let ca = Issuer::new(ca_params, ca_key);
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::default();
    params.subject_alt_names = vec![SanType::URI(uri.try_into().unwrap())];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now + time::Duration::days(from_days);
    params.not_after = now + time::Duration::days(to_days);
    let cert = params.signed_by(&key, &ca).unwrap();
    std::fs::write(fleet.certs.join(format!("{stem}.pem")), cert.pem()).unwrap();
    std::fs::write(fleet.certs.join(format!("{stem}.key")), key.serialize_pem()).unwrap();
}

/// Replaces `from` by `to` in the config file.
fn edit(config: &Path, from: &str, to: &str) {
    let text = std::fs::read_to_string(config).unwrap();
    assert!(text.contains(from), "{from:?} not in {text}");
    std::fs::write(config, text.replace(from, to)).unwrap();
}

/// `hostagent --check-config` refuses, and so does starting it: exit 64 both, stderr naming
/// every one of `words`.
fn agent_refuses(config: &Path, words: &[&str]) {
    let (code, err) = check_agent_config(config);
    assert_eq!(code, Some(64), "{err}");
    for w in words {
        assert!(err.contains(w), "{w:?} missing from: {err}");
    }
    let out = run(Command::new(bin("hostagent")).arg("--config").arg(config));
    let started = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{started}");
    assert_eq!(started.trim(), err.trim());
}

#[test]
fn the_agent_check_refuses_each_broken_file_and_name_naming_the_key() {
    let fleet = Fleet::new(&["argus", "cerebro"]);
    let c = fleet.certs.display().to_string();
    let good = || fleet.write_agent_config("argus", "argus", "127.0.0.1:7443", "");
    let (code, err) = check_agent_config(&good());
    assert_eq!(code, Some(0), "{err}");

    // A missing key file.
    let config = good();
    edit(&config, "host-argus.key", "no-such.key");
    agent_refuses(&config, &["key `tls.key`", "no-such.key"]);

    // An unreadable certificate (a directory).
    let config = good();
    edit(&config, &format!("{c}/host-argus.pem"), &c);
    agent_refuses(&config, &["key `tls.cert`", &c]);

    // The key of another host.
    let config = good();
    edit(&config, "host-argus.key", "host-cerebro.key");
    agent_refuses(
        &config,
        &[
            "key `tls.key`",
            "host-cerebro.key",
            "is not the private key",
        ],
    );

    // host_name that the certificate is not for (the agent used to retry PERMISSION_DENIED
    // for ever).
    let config = fleet.write_agent_config("argus", "cerebro", "127.0.0.1:7443", "");
    agent_refuses(
        &config,
        &["key `host_name`", "\"argus\"", "sentinel://host/cerebro"],
    );

    // No port, with and without a server_name override.
    for extra in ["", "server_name = \"localhost\""] {
        let config = fleet.write_agent_config("argus", "argus", "localhost", extra);
        agent_refuses(&config, &["key `controller`", "\"localhost\" has no port"]);
    }

    // Expired, and not valid yet.
    issue(&fleet, "host-old", "sentinel://host/argus", -30, -1);
    let config = good();
    edit(&config, "host-argus.", "host-old.");
    agent_refuses(
        &config,
        &["key `tls.cert`", "host-old.pem", "expired at 20"],
    );
    issue(&fleet, "host-future", "sentinel://host/argus", 2, 30);
    let config = good();
    edit(&config, "host-argus.", "host-future.");
    agent_refuses(&config, &["key `tls.cert`", "not valid before", "clock"]);

    // A certificate of another fleet's CA.
    let other = Fleet::new(&["argus"]);
    let config = good();
    edit(
        &config,
        &format!("{c}/host-argus."),
        &format!("{}/host-argus.", other.certs.display()),
    );
    agent_refuses(&config, &["key `tls.cert`", "does not chain to the CA"]);

    // A trusted signing key that is not there.
    let config = fleet.write_agent_config(
        "argus",
        "argus",
        "127.0.0.1:7443",
        &format!(
            "[jobs]\nstate_dir = \"{}\"\ntrusted_keys = [\"{c}/signing.pub\", \"{c}/gone.pub\"]\n",
            fleet.path("jobs").display()
        ),
    );
    agent_refuses(&config, &["key `jobs.trusted_keys[1]`", "gone.pub"]);
}

#[test]
fn the_controller_check_refuses_missing_and_mismatched_files_and_serve_exits_64() {
    let fleet = Fleet::new(&["argus"]);
    let c = fleet.certs.display().to_string();
    let config = fleet.path("sentinel.toml");
    let write = |cert: &str, key: &str| {
        std::fs::write(
            &config,
            format!(
                "listen = \"127.0.0.1:0\"\ndata_dir = \"{}\"\n[tls]\nca = \"{c}/ca.pem\"\ncert = \"{c}/{cert}\"\nkey = \"{c}/{key}\"\n[signing]\nkey = \"{c}/signing.key\"\n",
                fleet.path("data").display()
            ),
        )
        .unwrap();
    };
    let check = || {
        let out = run(Command::new(bin("sentinel"))
            .args(["config", "check"])
            .arg(&config));
        (
            out.status.code(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    };
    let serve = || {
        let out = run(Command::new(bin("sentinel"))
            .args(["serve", "--config"])
            .arg(&config));
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    write("controller.pem", "controller.key");
    let (code, out) = check();
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains(": ok"), "{out}");

    write("missing.pem", "controller.key");
    let (code, out) = check();
    assert_eq!(code, Some(64), "{out}");
    assert!(
        out.contains("key `tls.cert`") && out.contains("missing.pem"),
        "{out}"
    );
    let (code, err) = serve();
    assert_eq!(code, Some(64), "{err}");
    assert!(err.contains("missing.pem"), "{err}");

    write("controller.pem", "host-argus.key");
    let (code, out) = check();
    assert_eq!(code, Some(64), "{out}");
    assert!(
        out.contains("key `tls.key`") && out.contains("is not the private key of"),
        "{out}"
    );
    let (code, err) = serve();
    assert_eq!(code, Some(64), "{err}");
    assert!(err.contains("is not the private key of"), "{err}");

    // The signing key is a file the controller needs too.
    write("controller.pem", "controller.key");
    edit(&config, "signing.key", "no-signing.key");
    let (code, out) = check();
    assert_eq!(code, Some(64), "{out}");
    assert!(
        out.contains("key `signing.key`") && out.contains("no-signing.key"),
        "{out}"
    );
}

#[test]
fn certificate_failures_read_as_what_is_wrong_and_what_to_do() {
    let fleet = Fleet::new(&["argus"]);
    let controller = fleet.start_controller("");
    // An expired operator certificate: the CLI says so, and so does the controller's log.
    issue(
        &fleet,
        "operator-old",
        "sentinel://operator/admin/old",
        -30,
        -1,
    );
    let c = &fleet.certs;
    let out = run(Command::new(bin("sentinel"))
        .args(["hosts", "--controller", &controller.addr])
        .arg("--ca")
        .arg(c.join("ca.pem"))
        .arg("--cert")
        .arg(c.join("operator-old.pem"))
        .arg("--key")
        .arg(c.join("operator-old.key")));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("the controller would refuse this certificate:")
            && err.contains("operator-old.pem expired at 20"),
        "{err}"
    );
    assert!(!err.contains("transport error"), "{err}");
    // grpcurl dials anyway: the controller's log says what it refused, in words.
    let r = controller.grpcurl_as("operator-old", &[], "sentinel.v1.FleetService/ListHosts");
    assert!(!r.ok);
    eventually("the controller to log the expired certificate", || {
        let log = controller.proc.log_text();
        if log.contains("client certificate expired at 20") {
            Ok(())
        } else {
            Err(log)
        }
    });
    assert!(
        !controller.proc.log_text().contains("not valid after"),
        "a Unix time in the log"
    );

    // An agent dialling a controller of another fleet: it says whose certificate is wrong.
    let agent = fleet.start_agent("argus", "argus", &controller.addr, "");
    controller.wait_online("argus");
    drop(agent);
    let other = Fleet::new(&[]);
    let foreign = other.start_controller("");
    let agent = fleet.start_agent("argus", "argus", &foreign.addr, "");
    eventually("the agent to explain the foreign controller", || {
        let log = agent.log_text();
        if log.contains("the controller's certificate is not issued by the fleet CA") {
            Ok(())
        } else {
            Err(log)
        }
    });
}
