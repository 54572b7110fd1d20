//! Counter, gauge and histogram families with labels, and their Prometheus text exposition
//! (format 0.0.4). A few hundred lines instead of a metrics crate: both binaries need only
//! these three types, the agent must stay small, and the output is exactly the classic text
//! format Prometheus scrapes (no OpenMetrics `# EOF`, no `_created` series).
//!
//! Every family prints its `# HELP` and `# TYPE` lines even before it has a series, so that a
//! scrape lists every metric the binary can export (the packaging tests rely on it, and a
//! dashboard can tell "never happened" from "not exported").

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::{Mutex, MutexGuard};

/// Label values of one series, in the order of the family's label names.
type Key = Vec<String>;

/// What every family has: a name, a help text and its label names.
#[derive(Debug)]
struct Desc {
    name: &'static str,
    help: &'static str,
    labels: &'static [&'static str],
}

impl Desc {
    /// The series key for `values`. A wrong number of values is a bug in this program, not
    /// input: debug builds stop on it, release builds pad or cut so the output stays valid.
    fn key(&self, values: &[&str]) -> Key {
        debug_assert_eq!(
            values.len(),
            self.labels.len(),
            "metric {} takes labels {:?}",
            self.name,
            self.labels
        );
        (0..self.labels.len())
            .map(|i| values.get(i).copied().unwrap_or_default().to_string())
            .collect()
    }

    fn header(&self, out: &mut String, kind: &str) {
        header(out, self.name, self.help, kind);
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic elsewhere while counting must not stop the metrics: the numbers stay usable.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A monotonically increasing count per label set (`…_total`).
#[derive(Debug)]
pub struct Counter {
    desc: Desc,
    series: Mutex<BTreeMap<Key, u64>>,
}

impl Counter {
    /// A counter family; `labels` are its label names (empty: a single series).
    pub const fn new(
        name: &'static str,
        help: &'static str,
        labels: &'static [&'static str],
    ) -> Self {
        Self {
            desc: Desc { name, help, labels },
            series: Mutex::new(BTreeMap::new()),
        }
    }

    /// Adds one to the series `values`.
    pub fn inc(&self, values: &[&str]) {
        self.inc_by(values, 1);
    }

    /// Adds `n` to the series `values`.
    pub fn inc_by(&self, values: &[&str], n: u64) {
        let key = self.desc.key(values);
        let mut series = lock(&self.series);
        let v = series.entry(key).or_insert(0);
        *v = v.saturating_add(n);
    }

    /// The current value of the series `values` (0 when it never counted).
    pub fn get(&self, values: &[&str]) -> u64 {
        let key = self.desc.key(values);
        lock(&self.series).get(&key).copied().unwrap_or(0)
    }

    /// Appends the family in text format.
    pub fn encode(&self, out: &mut String) {
        self.desc.header(out, "counter");
        for (key, v) in lock(&self.series).iter() {
            sample(
                out,
                self.desc.name,
                "",
                self.desc.labels,
                key,
                None,
                *v as f64,
            );
        }
    }
}

/// A value that goes up and down, per label set.
#[derive(Debug)]
pub struct Gauge {
    desc: Desc,
    series: Mutex<BTreeMap<Key, f64>>,
}

impl Gauge {
    /// A gauge family.
    pub const fn new(
        name: &'static str,
        help: &'static str,
        labels: &'static [&'static str],
    ) -> Self {
        Self {
            desc: Desc { name, help, labels },
            series: Mutex::new(BTreeMap::new()),
        }
    }

    /// Sets the series `values` to `v`.
    pub fn set(&self, values: &[&str], v: f64) {
        let key = self.desc.key(values);
        lock(&self.series).insert(key, v);
    }

    /// The current value of the series `values`, if it was set.
    pub fn get(&self, values: &[&str]) -> Option<f64> {
        let key = self.desc.key(values);
        lock(&self.series).get(&key).copied()
    }

    /// Every series with its value, for metrics derived at scrape time.
    pub fn snapshot(&self) -> Vec<(Vec<String>, f64)> {
        lock(&self.series)
            .iter()
            .map(|(k, v)| (k.clone(), *v))
            .collect()
    }

    /// Drops the series `values` (the thing it measured is gone).
    pub fn remove(&self, values: &[&str]) {
        let key = self.desc.key(values);
        lock(&self.series).remove(&key);
    }

    /// Appends the family in text format.
    pub fn encode(&self, out: &mut String) {
        self.desc.header(out, "gauge");
        for (key, v) in lock(&self.series).iter() {
            sample(out, self.desc.name, "", self.desc.labels, key, None, *v);
        }
    }
}

/// Counts of observations in cumulative buckets, with their sum, per label set.
#[derive(Debug)]
pub struct Histogram {
    desc: Desc,
    /// Upper bounds, ascending; `+Inf` is implied.
    buckets: &'static [f64],
    series: Mutex<BTreeMap<Key, HistogramSeries>>,
}

#[derive(Debug, Clone, Default)]
struct HistogramSeries {
    /// Per bucket (not cumulative), plus one for `+Inf`.
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    /// A histogram family with these bucket upper bounds (ascending).
    pub const fn new(
        name: &'static str,
        help: &'static str,
        labels: &'static [&'static str],
        buckets: &'static [f64],
    ) -> Self {
        Self {
            desc: Desc { name, help, labels },
            buckets,
            series: Mutex::new(BTreeMap::new()),
        }
    }

    /// Records one observation of `v` in the series `values`.
    pub fn observe(&self, values: &[&str], v: f64) {
        let key = self.desc.key(values);
        let slot = self
            .buckets
            .iter()
            .position(|b| v <= *b)
            .unwrap_or(self.buckets.len());
        let mut series = lock(&self.series);
        let s = series.entry(key).or_insert_with(|| HistogramSeries {
            counts: vec![0; self.buckets.len() + 1],
            ..Default::default()
        });
        if let Some(c) = s.counts.get_mut(slot) {
            *c += 1;
        }
        s.sum += v;
        s.count += 1;
    }

    /// How many observations the series `values` has.
    pub fn count(&self, values: &[&str]) -> u64 {
        let key = self.desc.key(values);
        lock(&self.series).get(&key).map_or(0, |s| s.count)
    }

    /// Appends the family in text format.
    pub fn encode(&self, out: &mut String) {
        let d = &self.desc;
        d.header(out, "histogram");
        for (key, s) in lock(&self.series).iter() {
            let mut cumulative = 0;
            for (i, bound) in self.buckets.iter().enumerate() {
                cumulative += s.counts.get(i).copied().unwrap_or(0);
                let le = format_value(*bound);
                sample(
                    out,
                    d.name,
                    "_bucket",
                    d.labels,
                    key,
                    Some(("le", &le)),
                    cumulative as f64,
                );
            }
            sample(
                out,
                d.name,
                "_bucket",
                d.labels,
                key,
                Some(("le", "+Inf")),
                s.count as f64,
            );
            sample(out, d.name, "_sum", d.labels, key, None, s.sum);
            sample(out, d.name, "_count", d.labels, key, None, s.count as f64);
        }
    }
}

/// Writes a family computed at scrape time (from live state rather than counted as it
/// happens): its header, then one sample per `(label values, value)`.
pub fn gauge_family<'a, K>(
    out: &mut String,
    name: &str,
    help: &str,
    labels: &[&str],
    samples: impl IntoIterator<Item = (K, f64)>,
) where
    K: AsRef<[&'a str]>,
{
    header(out, name, help, "gauge");
    for (values, v) in samples {
        let values: Vec<String> = values.as_ref().iter().map(|s| s.to_string()).collect();
        sample(out, name, "", labels, &values, None, v);
    }
}

/// `# HELP` and `# TYPE` lines.
pub fn header(out: &mut String, name: &str, help: &str, kind: &str) {
    let help = help.replace('\\', "\\\\").replace('\n', "\\n");
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// One sample line: `name_suffix{l1="v1",…,extra="x"} value`.
fn sample(
    out: &mut String,
    name: &str,
    suffix: &str,
    labels: &[&str],
    values: &[String],
    extra: Option<(&str, &str)>,
    v: f64,
) {
    out.push_str(name);
    out.push_str(suffix);
    let pairs = labels
        .iter()
        .zip(values.iter().map(String::as_str))
        .map(|(l, v)| (*l, v))
        .chain(extra);
    let mut first = true;
    for (label, value) in pairs {
        out.push(if first { '{' } else { ',' });
        first = false;
        out.push_str(label);
        out.push_str("=\"");
        escape_label_value(out, value);
        out.push('"');
    }
    if !first {
        out.push('}');
    }
    out.push(' ');
    out.push_str(&format_value(v));
    out.push('\n');
}

/// Label values may hold anything (host names come from certificates, app names from config):
/// backslash, double quote and newline are escaped as the format requires.
fn escape_label_value(out: &mut String, value: &str) {
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

/// A sample value as the text format spells it (`+Inf`, `-Inf`, `NaN`, else plain decimal).
pub fn format_value(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v == f64::INFINITY {
        "+Inf".into()
    } else if v == f64::NEG_INFINITY {
        "-Inf".into()
    } else {
        format!("{v}")
    }
}

/// The standard `process_*` metrics that matter for a long-running daemon: resident memory
/// (the agent's budget is 10 MiB), open file descriptors (the controller holds one per agent)
/// and start time. Read from `/proc/self`; absent where there is no procfs.
pub fn encode_process(out: &mut String, started: std::time::SystemTime) {
    let rss = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        });
    if let Some(kib) = rss {
        gauge_family(
            out,
            "process_resident_memory_bytes",
            "Resident memory size in bytes.",
            &[],
            [([], (kib * 1024) as f64)],
        );
    }
    if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
        gauge_family(
            out,
            "process_open_fds",
            "Number of open file descriptors.",
            &[],
            [([], fds.count() as f64)],
        );
    }
    let start = started
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64();
    gauge_family(
        out,
        "process_start_time_seconds",
        "Start time of the process since unix epoch in seconds.",
        &[],
        [([], start.floor())],
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_and_gauges_print_in_the_text_format() {
        let c = Counter::new("jobs_total", "Jobs that ended.", &["kind", "outcome"]);
        let mut out = String::new();
        c.encode(&mut out);
        assert_eq!(
            out,
            "# HELP jobs_total Jobs that ended.\n# TYPE jobs_total counter\n"
        );
        c.inc(&["deploy", "failed"]);
        c.inc_by(&["deploy", "failed"], 2);
        c.inc(&["backup", "succeeded"]);
        assert_eq!(c.get(&["deploy", "failed"]), 3);
        let mut out = String::new();
        c.encode(&mut out);
        assert!(out.ends_with(
            "jobs_total{kind=\"backup\",outcome=\"succeeded\"} 1\njobs_total{kind=\"deploy\",outcome=\"failed\"} 3\n"
        ), "{out}");

        let g = Gauge::new("up", "Whether it is up.", &[]);
        g.set(&[], 1.0);
        let mut out = String::new();
        g.encode(&mut out);
        assert!(out.ends_with("\nup 1\n"), "{out}");
        g.set(&[], 0.25);
        assert_eq!(g.get(&[]), Some(0.25));
    }

    #[test]
    fn label_values_are_escaped() {
        let g = Gauge::new("g", "Help with \\ and\nnewline.", &["host"]);
        g.set(&["a\"b\\c\nd"], 2.0);
        let mut out = String::new();
        g.encode(&mut out);
        assert!(
            out.contains("# HELP g Help with \\\\ and\\nnewline.\n"),
            "{out}"
        );
        assert!(out.contains("g{host=\"a\\\"b\\\\c\\nd\"} 2\n"), "{out}");
    }

    #[test]
    fn histograms_are_cumulative_with_sum_and_count() {
        let h = Histogram::new("d_seconds", "Durations.", &["app"], &[0.1, 1.0]);
        for v in [0.0625, 0.09375, 0.5, 3.0] {
            h.observe(&["auth"], v);
        }
        let mut out = String::new();
        h.encode(&mut out);
        let expected = "d_seconds_bucket{app=\"auth\",le=\"0.1\"} 2\n\
                        d_seconds_bucket{app=\"auth\",le=\"1\"} 3\n\
                        d_seconds_bucket{app=\"auth\",le=\"+Inf\"} 4\n\
                        d_seconds_sum{app=\"auth\"} 3.65625\n\
                        d_seconds_count{app=\"auth\"} 4\n";
        assert!(out.ends_with(expected), "{out}");
        assert_eq!(h.count(&["auth"]), 4);
    }

    #[test]
    fn special_values_use_the_formats_spelling() {
        assert_eq!(format_value(f64::INFINITY), "+Inf");
        assert_eq!(format_value(f64::NEG_INFINITY), "-Inf");
        assert_eq!(format_value(f64::NAN), "NaN");
        assert_eq!(format_value(1e-7), "0.0000001");
        assert_eq!(format_value(93600.0), "93600");
    }

    #[test]
    fn scrape_time_families_print_header_and_samples() {
        let mut out = String::new();
        gauge_family(
            &mut out,
            "host_up",
            "Whether the host is online.",
            &["host"],
            [(["argus"], 1.0), (["cerebro"], 0.0)],
        );
        assert_eq!(
            out,
            "# HELP host_up Whether the host is online.\n# TYPE host_up gauge\nhost_up{host=\"argus\"} 1\nhost_up{host=\"cerebro\"} 0\n"
        );
    }
}
