//! What benchmarks read from `/proc`: a process's resident memory (`VmRSS` in
//! `/proc/PID/status`) and CPU time (utime + stime in `/proc/PID/stat`), the whole machine's
//! busy time (`/proc/stat`), the open-files limit, and the machine description for the notes.

use std::fs;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};

/// One reading of a process.
#[derive(Debug, Clone, Copy)]
pub struct ProcSample {
    /// Resident set size, KiB.
    pub rss_kib: u64,
    /// utime + stime, clock ticks.
    pub cpu_ticks: u64,
    /// When it was read.
    pub at: Instant,
}

/// Reads `/proc/PID/status` and `/proc/PID/stat`.
pub fn sample(pid: u32) -> Result<ProcSample> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status (is the process gone?)"))?;
    let rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| anyhow!("no VmRSS in /proc/{pid}/status"))?;
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    Ok(ProcSample {
        rss_kib,
        cpu_ticks: cpu_ticks(&stat).ok_or_else(|| anyhow!("malformed /proc/{pid}/stat"))?,
        at: Instant::now(),
    })
}

/// utime + stime from a `/proc/PID/stat` line (fields 14 and 15; the command name in
/// parentheses may contain spaces, so fields are counted after the last ')').
fn cpu_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state): utime is field 14, stime field 15.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// Resident memory split into anonymous (heap, stacks: what the process allocated) and
/// file-backed (mapped pages of the binary and libraries, clean and droppable), KiB.
pub fn rss_split(pid: u32) -> Result<(u64, u64)> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
            .ok_or_else(|| anyhow!("no {name} in /proc/{pid}/status"))
    };
    Ok((field("RssAnon:")?, field("RssFile:")?))
}

/// Clock ticks per second (`getconf CLK_TCK`, 100 on Linux in practice).
pub fn clock_ticks() -> u64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .filter(|t| *t > 0)
        .unwrap_or(100)
}

/// The whole machine's CPU time: (busy, total) in ticks, from the first line of `/proc/stat`.
pub fn machine_cpu() -> Result<(u64, u64)> {
    let stat = fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    let line = stat
        .lines()
        .next()
        .ok_or_else(|| anyhow!("empty /proc/stat"))?;
    let values: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    let total: u64 = values.iter().sum();
    // idle and iowait.
    let idle = values.get(3).copied().unwrap_or(0) + values.get(4).copied().unwrap_or(0);
    Ok((total - idle, total))
}

/// CPU and memory of one process over a window, sampled every second.
#[derive(Debug, Clone, Copy, Default)]
pub struct Usage {
    /// Mean resident memory, MiB.
    pub rss_avg_mib: f64,
    /// Largest resident memory seen, MiB.
    pub rss_max_mib: f64,
    /// CPU used, percent of one core.
    pub cpu_percent: f64,
    /// The whole machine's busy share of all cores, percent, over the same window.
    pub machine_busy_percent: f64,
    /// Length of the window.
    pub window: Duration,
}

/// Samples every process in `pids` once a second for `window`: one [`Usage`] per pid.
pub async fn measure(pids: &[u32], window: Duration) -> Result<Vec<Usage>> {
    let ticks = clock_ticks() as f64;
    let first: Vec<ProcSample> = pids.iter().map(|p| sample(*p)).collect::<Result<_>>()?;
    let machine_first = machine_cpu()?;
    let mut rss: Vec<Vec<u64>> = first.iter().map(|s| vec![s.rss_kib]).collect();
    let started = Instant::now();
    let mut last = first.clone();
    while started.elapsed() < window {
        let step = Duration::from_secs(1).min(window.saturating_sub(started.elapsed()));
        tokio::time::sleep(step).await;
        for (i, pid) in pids.iter().enumerate() {
            let s = sample(*pid)?;
            rss[i].push(s.rss_kib);
            last[i] = s;
        }
    }
    let machine_last = machine_cpu()?;
    let machine_busy = machine_last.0.saturating_sub(machine_first.0) as f64;
    let machine_total = machine_last.1.saturating_sub(machine_first.1).max(1) as f64;
    Ok(first
        .iter()
        .zip(&last)
        .zip(&rss)
        .map(|((a, b), rss)| {
            let secs = b.at.duration_since(a.at).as_secs_f64().max(1e-3);
            let cpu = b.cpu_ticks.saturating_sub(a.cpu_ticks) as f64 / ticks;
            Usage {
                rss_avg_mib: rss.iter().sum::<u64>() as f64 / rss.len().max(1) as f64 / 1024.0,
                rss_max_mib: rss.iter().copied().max().unwrap_or(0) as f64 / 1024.0,
                cpu_percent: cpu / secs * 100.0,
                machine_busy_percent: machine_busy / machine_total * 100.0,
                window: b.at.duration_since(a.at),
            }
        })
        .collect())
}

/// The soft limit on open files of this process (`/proc/self/limits`).
pub fn open_files_limit() -> Option<u64> {
    fs::read_to_string("/proc/self/limits")
        .ok()?
        .lines()
        .find(|l| l.starts_with("Max open files"))?
        .split_whitespace()
        .nth(3)?
        .parse()
        .ok()
}

/// "2 cores, 23.4 GiB, Intel(R) Xeon(R) Processor": the machine, for the notes.
pub fn machine_description() -> String {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem_gib = fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse::<f64>().ok())
        })
        .map_or(0.0, |kib| kib / 1024.0 / 1024.0);
    let model = fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, m)| m.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    format!("{cores} cores (nproc), {mem_gib:.1} GiB, {model}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_ticks_skip_a_command_name_with_spaces() {
        let stat = "1234 (a b) S 1 2 3 4 5 6 7 8 9 10 250 50 0 0 20 0";
        assert_eq!(cpu_ticks(stat), Some(300));
    }

    #[test]
    fn this_process_can_be_sampled() {
        let s = sample(std::process::id()).unwrap();
        assert!(s.rss_kib > 0);
        assert!(open_files_limit().is_some());
    }
}
