//! The fleet simulator against a real controller: simulated agents, each with its own host
//! certificate and mTLS stream from its own loopback source address, show up online for the
//! operator exactly like real agents.

use std::fs;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sentinel_e2e::{bin, eventually, patience, run, Fleet, Value};

const AGENTS: usize = 200;

/// The simulator process, killed on drop; its stderr goes to a file shown when a test fails.
struct Sim {
    child: Option<Child>,
    stdout: PathBuf,
    stderr: PathBuf,
}

impl Sim {
    fn start(fleet: &Fleet, controller: &str, agents: usize) -> Self {
        let stdout = fleet.path("fleet-sim.out");
        let stderr = fleet.path("fleet-sim.log");
        let child = Command::new(bin("fleet-sim"))
            .args(["run", "--controller", controller, "--certs"])
            .arg(&fleet.certs)
            .args(["--agents", &agents.to_string()])
            .args(["--interval", "1s", "--duration", "10m"])
            .stdin(Stdio::null())
            .stdout(fs::File::create(&stdout).expect("creating the simulator's stdout"))
            .stderr(fs::File::create(&stderr).expect("creating the simulator's log"))
            .spawn()
            .expect("starting fleet-sim");
        Self {
            child: Some(child),
            stdout,
            stderr,
        }
    }

    /// SIGTERM, wait, and the JSON summary it prints on the way out.
    fn stop(&mut self) -> Value {
        let mut child = self.child.take().expect("the simulator is running");
        run(Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string()));
        let deadline = Instant::now() + patience();
        let status = loop {
            if let Some(status) = child.try_wait().expect("waiting for fleet-sim") {
                break status;
            }
            assert!(Instant::now() < deadline, "fleet-sim ignored SIGTERM");
            std::thread::sleep(Duration::from_millis(50));
        };
        assert!(status.success(), "fleet-sim failed: {status:?}");
        let out = fs::read_to_string(&self.stdout).unwrap_or_default();
        serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"))
    }
}

impl Drop for Sim {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!(
                "---- fleet-sim log ----\n{}",
                fs::read_to_string(&self.stderr).unwrap_or_default()
            );
        }
    }
}

#[test]
fn two_hundred_simulated_agents_all_show_up_online_through_grpcurl() {
    let fleet = Fleet::new(&["hub-alfa"]);
    let controller = fleet.start_controller("");
    let mut sim = Sim::start(&fleet, &controller.addr, AGENTS);

    let hosts = eventually(
        &format!("{AGENTS} simulated hosts online with state"),
        || {
            let list = controller
                .grpcurl(None, "sentinel.v1.FleetService/ListHosts")
                .json()?;
            let hosts: Vec<Value> = list["hosts"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .filter(|h| h["name"].as_str().is_some_and(|n| n.starts_with("sim-")))
                .collect();
            let ready = hosts
                .iter()
                .filter(|h| {
                    h["status"] == "HOST_STATUS_ONLINE" && h["containers"].as_u64().unwrap_or(0) > 0
                })
                .count();
            if ready == AGENTS {
                Ok(hosts)
            } else {
                Err(format!("{ready} of {AGENTS} online with containers"))
            }
        },
    );
    assert_eq!(hosts.len(), AGENTS);
    assert!(hosts
        .iter()
        .all(|h| h["agentVersion"].as_str().is_some_and(|v| !v.is_empty())));

    // Paging through the fleet 64 hosts at a time sees every host exactly once, in name order.
    let mut paged: Vec<String> = Vec::new();
    let mut token = String::new();
    loop {
        let page = controller
            .grpcurl(
                Some(&format!(
                    "{{\"page_size\": 64, \"page_token\": \"{token}\"}}"
                )),
                "sentinel.v1.FleetService/ListHosts",
            )
            .json()
            .expect("a page of ListHosts");
        let names = page["hosts"].as_array().cloned().unwrap_or_default();
        assert!(names.len() <= 64, "{page}");
        assert_eq!(page["total"].as_u64(), Some(AGENTS as u64), "{page}");
        paged.extend(
            names
                .iter()
                .filter_map(|h| h["name"].as_str().map(str::to_string)),
        );
        match page["nextPageToken"].as_str() {
            Some(next) if !next.is_empty() => token = next.to_string(),
            _ => break,
        }
    }
    let mut sorted = paged.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(paged, sorted);
    assert_eq!(paged.len(), AGENTS);

    // Agent 1 dials from the second source address: connections are spread over loopback.
    let host = controller.get_host("sim-00001").expect("GetHost sim-00001");
    let peer = host["peerAddress"].as_str().unwrap_or_default();
    assert!(peer.starts_with("127.0.0.3:"), "{host}");
    let containers = host["state"]["docker"]["state"]["containers"]
        .as_array()
        .map_or(0, Vec::len);
    assert_eq!(containers, 30, "{host}");

    let summary = sim.stop();
    assert!(
        summary["welcomes"].as_u64() >= Some(AGENTS as u64),
        "{summary}"
    );
    assert!(
        summary["attempts"].as_u64() >= Some(AGENTS as u64),
        "{summary}"
    );
    assert!(
        summary["reports_full"].as_u64() >= Some(AGENTS as u64),
        "{summary}"
    );
    assert!(summary["tcp_out"].as_u64() > Some(0), "{summary}");
}
