//! Ports for the programs we do not write. Our own processes bind `127.0.0.1:0` and log the
//! address they got ([`crate::Proc::logged_addr`]); PostgreSQL, Redis, nginx, Docker's
//! published ports and rsync cannot tell us theirs, so the harness chooses them here, in one
//! place:
//!
//! - A [`Port`] is reserved, not bound-and-released into the open: it comes from below the
//!   kernel's ephemeral range (`/proc/sys/net/ipv4/ip_local_port_range`), where no `bind(0)`
//!   of any process lands, and an exclusive lock on a file named after it in
//!   `$TMPDIR/sentinel-e2e-ports/` keeps every other test harness on the machine (other test
//!   binaries, other checkouts) away from it until the [`Port`] is dropped.
//! - [`start_on_ports`] starts a program on reserved ports and, should something outside the
//!   harness hold one anyway ("address already in use"), tries again on fresh ones, a bounded
//!   number of times: a collision costs a retry, never a failed test.

use std::fs::{self, File};
use std::net::TcpListener;
use std::path::PathBuf;

use rand::Rng;

/// How many sets of ports [`start_on_ports`] tries before giving up.
const START_ATTEMPTS: usize = 5;
/// The lowest port handed out: well above the well-known and registered services tests meet
/// (PostgreSQL's 5432, Redis' 6379, 8080, 9464/9465).
const LOWEST: u16 = 20_000;

/// A loopback port reserved for this test until dropped (see the module docs).
#[derive(Debug)]
pub struct Port {
    number: u16,
    /// Held locked: the reservation other harnesses see.
    _lock: File,
}

impl Port {
    /// The port number.
    pub fn get(&self) -> u16 {
        self.number
    }
}

/// The range ports are reserved from: [`LOWEST`] up to the start of the kernel's ephemeral
/// range, or above its end when it starts too low to leave room.
fn range() -> std::ops::Range<u16> {
    let ephemeral = fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|text| {
            let mut parts = text.split_whitespace().map(|p| p.parse::<u16>().ok());
            Some((parts.next()??, parts.next()??))
        })
        .unwrap_or((32_768, 60_999));
    if ephemeral.0 >= LOWEST + 2_000 {
        LOWEST..ephemeral.0
    } else {
        ephemeral.1.saturating_add(1).max(LOWEST)..u16::MAX
    }
}

fn lock_dir() -> PathBuf {
    let dir = std::env::temp_dir().join("sentinel-e2e-ports");
    fs::create_dir_all(&dir)
        .unwrap_or_else(|e| panic!("creating the port lock dir {}: {e}", dir.display()));
    dir
}

/// Reserves a loopback port nothing listens on (see the module docs).
pub fn reserve() -> Port {
    let range = range();
    let dir = lock_dir();
    let mut rng = rand::thread_rng();
    for _ in 0..1_000 {
        let number = rng.gen_range(range.clone());
        let path = dir.join(format!("{number}.lock"));
        let Ok(file) = File::create(&path) else {
            continue;
        };
        // Locks belong to the open file, so a second reservation in this same process is
        // refused as well as one in another process.
        if file.try_lock().is_err() {
            continue;
        }
        // Something outside the harness may listen there (a service of the machine).
        if TcpListener::bind(("127.0.0.1", number)).is_err() {
            continue;
        }
        return Port {
            number,
            _lock: file,
        };
    }
    panic!(
        "no free loopback port in {range:?} after 1000 tries: is {} full of stale locks?",
        dir.display()
    )
}

/// Whether a program's failure text says one of its ports was taken.
pub fn port_was_taken(failure: &str) -> bool {
    let text = failure.to_ascii_lowercase();
    text.contains("address already in use") || text.contains("port is already allocated")
}

/// Starts a program on `N` reserved ports: `start` gets their numbers and returns the running
/// program, or its failure text (its log). When that text says a port was taken, it is tried
/// again on fresh ports (at most [`START_ATTEMPTS`] times); any other failure panics at once
/// with the text. Returns the program and the reservations, to keep as long as it runs.
pub fn start_on_ports<T, const N: usize>(
    what: &str,
    mut start: impl FnMut([u16; N]) -> Result<T, String>,
) -> (T, [Port; N]) {
    let mut last = String::new();
    for _ in 0..START_ATTEMPTS {
        let ports: [Port; N] = std::array::from_fn(|_| reserve());
        match start(ports.each_ref().map(Port::get)) {
            Ok(started) => return (started, ports),
            Err(failure) if port_was_taken(&failure) => last = failure,
            Err(failure) => panic!("{what} did not start:\n{failure}"),
        }
    }
    panic!("{what} found its ports taken {START_ATTEMPTS} times in a row; last failure:\n{last}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reserved_port_is_never_handed_out_twice_while_held() {
        let held: Vec<Port> = (0..50).map(|_| reserve()).collect();
        let mut numbers: Vec<u16> = held.iter().map(Port::get).collect();
        numbers.sort();
        numbers.dedup();
        assert_eq!(numbers.len(), held.len());
        let range = range();
        assert!(numbers.iter().all(|n| range.contains(n)), "{numbers:?}");
    }

    #[test]
    fn a_start_whose_port_is_taken_is_retried_on_another_port() {
        let mut tried = Vec::new();
        let (port, _held) = start_on_ports("a listener", |[port]| {
            tried.push(port);
            if tried.len() == 1 {
                Err(format!("bind 127.0.0.1:{port}: Address already in use"))
            } else {
                TcpListener::bind(("127.0.0.1", port))
                    .map(|_| port)
                    .map_err(|e| e.to_string())
            }
        });
        assert_eq!(tried.len(), 2);
        assert_eq!(tried[1], port);
        assert_ne!(tried[0], tried[1]);
    }

    #[test]
    #[should_panic(expected = "did not start")]
    fn a_start_failing_for_another_reason_is_not_retried() {
        let mut attempts = 0;
        let _ = start_on_ports("a program", |[_]: [u16; 1]| -> Result<(), String> {
            attempts += 1;
            assert_eq!(attempts, 1, "retried a failure that was not a taken port");
            Err("config file is broken".into())
        });
    }
}
