//! A steady request loop for zero-downtime tests and benchmarks: `GET path` on a loopback
//! port at a fixed rate, each request on a fresh connection (as a browser behind a proxy
//! would open them), every answer recorded with its time.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long one request may take before it counts as failed.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);

/// One request's outcome.
#[derive(Clone, Debug)]
pub struct Answer {
    /// When it was sent, from the loop's start.
    pub at: Duration,
    /// The status line and body when the status was 200; the error or other answer otherwise.
    pub result: Result<String, String>,
}

/// A running request loop; [`stop`](Self::stop) ends it and returns what it saw.
pub struct Load {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Vec<Answer>>>,
}

/// What a request loop saw.
#[derive(Clone, Debug)]
pub struct LoadReport {
    /// Every request, in order.
    pub answers: Vec<Answer>,
}

impl Load {
    /// Starts `GET path` on `127.0.0.1:port`, `per_second` times a second.
    pub fn start(port: u16, path: &str, per_second: u32) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let path = path.to_string();
        let interval = Duration::from_secs(1) / per_second.max(1);
        let thread = std::thread::spawn(move || {
            let started = Instant::now();
            let mut answers = Vec::new();
            let mut next = started;
            while !flag.load(Ordering::Relaxed) {
                let at = started.elapsed();
                answers.push(Answer {
                    at,
                    result: get(port, &path),
                });
                next += interval;
                if let Some(wait) = next.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
            }
            answers
        });
        Self {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops the loop and returns its answers.
    pub fn stop(mut self) -> LoadReport {
        self.stop.store(true, Ordering::Relaxed);
        let answers = self
            .thread
            .take()
            .map(|t| t.join().unwrap_or_default())
            .unwrap_or_default();
        LoadReport { answers }
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

impl LoadReport {
    /// The requests that did not get a 200.
    pub fn failures(&self) -> Vec<&Answer> {
        self.answers.iter().filter(|a| a.result.is_err()).collect()
    }

    /// The longest time the public got no 200: from the first failed request of a run of
    /// failures to the next answered one (or the loop's end). Zero when none failed.
    pub fn longest_gap(&self) -> Duration {
        let mut longest = Duration::ZERO;
        let mut first_failure: Option<Duration> = None;
        for a in &self.answers {
            match (&a.result, first_failure) {
                (Err(_), None) => first_failure = Some(a.at),
                (Ok(_), Some(from)) => {
                    longest = longest.max(a.at.saturating_sub(from));
                    first_failure = None;
                }
                _ => {}
            }
        }
        if let (Some(from), Some(last)) = (first_failure, self.answers.last()) {
            longest = longest.max(last.at.saturating_sub(from));
        }
        longest
    }

    /// The distinct bodies answered, in the order they first appeared (e.g. the versions a
    /// deploy switched between).
    pub fn bodies(&self) -> Vec<String> {
        let mut seen: Vec<String> = Vec::new();
        for a in &self.answers {
            if let Ok(body) = &a.result {
                if seen.last() != Some(body) {
                    seen.push(body.clone());
                }
            }
        }
        seen
    }

    /// One line for a test's failure message or a benchmark: counts, gap and failures.
    pub fn summary(&self) -> String {
        let failures = self.failures();
        let shown: Vec<String> = failures
            .iter()
            .take(5)
            .map(|a| format!("{:?}: {}", a.at, a.result.as_ref().err().map_or("", |e| e)))
            .collect();
        format!(
            "{} requests, {} failed, longest gap {} ms, bodies {:?}{}",
            self.answers.len(),
            failures.len(),
            self.longest_gap().as_millis(),
            self.bodies(),
            if shown.is_empty() {
                String::new()
            } else {
                format!("; first failures: {}", shown.join(" | "))
            }
        )
    }
}

/// `GET path` over HTTP/1.0: the body when the answer is 200, else what went wrong.
fn get(port: u16, path: &str) -> Result<String, String> {
    let attempt = || -> std::io::Result<String> {
        let mut stream =
            TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), REQUEST_TIMEOUT)?;
        stream.set_read_timeout(Some(REQUEST_TIMEOUT))?;
        stream.set_write_timeout(Some(REQUEST_TIMEOUT))?;
        stream.write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes())?;
        let mut out = String::new();
        stream.read_to_string(&mut out)?;
        Ok(out)
    };
    let text = attempt().map_err(|e| format!("error: {e}"))?;
    let status = text.lines().next().unwrap_or("").to_string();
    if status.split_whitespace().nth(1) != Some("200") {
        return Err(format!("answered {status:?}"));
    }
    let body = text
        .split("\r\n\r\n")
        .nth(1)
        .unwrap_or("")
        .trim()
        .to_string();
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(results: &[(u64, bool)]) -> LoadReport {
        LoadReport {
            answers: results
                .iter()
                .map(|(ms, ok)| Answer {
                    at: Duration::from_millis(*ms),
                    result: if *ok {
                        Ok("v".into())
                    } else {
                        Err("refused".into())
                    },
                })
                .collect(),
        }
    }

    #[test]
    fn the_longest_gap_runs_from_the_first_failure_to_the_next_answer() {
        assert_eq!(
            report(&[(0, true), (50, true)]).longest_gap(),
            Duration::ZERO
        );
        let r = report(&[
            (0, true),
            (50, false),
            (100, false),
            (150, true),
            (200, false),
        ]);
        assert_eq!(r.longest_gap(), Duration::from_millis(100));
        assert_eq!(r.failures().len(), 3);
        let r = report(&[(0, true), (50, false), (400, false)]);
        assert_eq!(r.longest_gap(), Duration::from_millis(350));
    }
}
