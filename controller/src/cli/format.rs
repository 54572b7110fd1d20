//! How the CLI writes values for people: ages, times, sizes, durations, coloured state words
//! (colour only on a terminal, see [`super::colour`]).

use std::time::{Duration, SystemTime};

/// The colour a state word gets on a terminal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tone {
    /// Healthy or succeeded.
    Good,
    /// Failed, offline, refused.
    Bad,
    /// In progress or needs a look.
    Busy,
    /// No colour.
    Plain,
}

/// `word` in its tone's colour when `colour` is on.
pub fn paint(word: &str, tone: Tone, colour: bool) -> String {
    let code = match tone {
        Tone::Good => "32",
        Tone::Bad => "31",
        Tone::Busy => "33",
        Tone::Plain => return word.to_string(),
    };
    if colour {
        format!("\x1b[{code}m{word}\x1b[0m")
    } else {
        word.to_string()
    }
}

/// The width of `s` on screen: characters, not counting ANSI colour sequences.
pub fn visible_width(s: &str) -> usize {
    let mut width = 0;
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            // An SGR sequence: ESC [ ... m
            for c in chars.by_ref() {
                if c == 'm' {
                    break;
                }
            }
        } else {
            width += 1;
        }
    }
    width
}

/// A lower-case word for a protobuf enum name: `JOB_STATE_TIMED_OUT` -> `timed out`.
pub fn enum_word(name: &str, prefix: &str) -> String {
    sentinel_daemon::metrics::enum_word(name, prefix).replace('_', " ")
}

/// The tone of a state word (host, job, deploy and step states share their vocabulary).
pub fn tone_of(word: &str) -> Tone {
    match word {
        "online" | "succeeded" | "running" | "healthy" | "ok" => Tone::Good,
        "offline" | "revoked" | "expired" | "failed" | "refused" | "timed out" | "rolled back"
        | "interrupted" | "unhealthy" | "exited" | "dead" => Tone::Bad,
        "queued" | "sent" | "started" | "cancelled" | "starting" | "restarting" | "paused"
        | "created" => Tone::Busy,
        _ => Tone::Plain,
    }
}

/// A state word, coloured by what it means.
pub fn state(word: &str, colour: bool) -> String {
    paint(word, tone_of(word), colour)
}

/// `ts` as an RFC 3339 time to the second, or `-`.
pub fn when(ts: Option<&prost_types::Timestamp>) -> String {
    match ts {
        Some(t) if t.seconds > 0 => {
            humantime::format_rfc3339_seconds(sentinel_proto::time::system_time(t)).to_string()
        }
        _ => "-".into(),
    }
}

/// How long ago `ts` was (`12s ago`), or `-`.
pub fn ago(ts: Option<&prost_types::Timestamp>) -> String {
    match ts {
        Some(t) if t.seconds > 0 => {
            let age = SystemTime::now()
                .duration_since(sentinel_proto::time::system_time(t))
                .unwrap_or_default();
            format!("{} ago", short_duration(age))
        }
        _ => "-".into(),
    }
}

/// When a certificate expires, relative to now: `in 23h59m`, `expired 2m0s ago`, or `-`.
pub fn expires(ts: Option<&prost_types::Timestamp>) -> String {
    match ts {
        Some(t) if t.seconds > 0 => {
            let at = sentinel_proto::time::system_time(t);
            match at.duration_since(SystemTime::now()) {
                Ok(left) => format!("in {}", short_duration(left)),
                Err(past) => format!("expired {} ago", short_duration(past.duration())),
            }
        }
        _ => "-".into(),
    }
}

/// A duration in its two largest units: `45s`, `3m12s`, `5h4m`, `2d3h`.
pub fn short_duration(d: Duration) -> String {
    sentinel_daemon::certcheck::short(d)
}

/// The time between two timestamps, or `-` when either is missing.
pub fn between(
    from: Option<&prost_types::Timestamp>,
    to: Option<&prost_types::Timestamp>,
) -> String {
    match (from, to) {
        (Some(a), Some(b)) if a.seconds > 0 && b.seconds > 0 => short_duration(
            sentinel_proto::time::system_time(b)
                .duration_since(sentinel_proto::time::system_time(a))
                .unwrap_or_default(),
        ),
        _ => "-".into(),
    }
}

/// A byte count in binary units: `512 B`, `1.5 KiB`, `7.8 GiB`.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = UNITS[0];
    for u in &UNITS[1..] {
        if v < 1024.0 {
            break;
        }
        v /= 1024.0;
        unit = u;
    }
    format!("{v:.1} {unit}")
}

/// Text that came from outside (a host, a container, the database, a name) made safe to
/// print on a terminal: control characters other than a newline and a tab are shown as
/// `\u{1b}`-style escapes, so an escape sequence cannot retitle or clear the terminal or draw
/// fake output. Use [`one_line`] where a value must stay on one table row.
pub fn untrusted(s: &str) -> String {
    escape_controls(s, false)
}

/// [`untrusted`] for a table cell or a single log-like line: newlines and carriage returns are
/// escaped too, so a name cannot start a forged line.
pub fn one_line(s: &str) -> String {
    escape_controls(s, true)
}

fn escape_controls(s: &str, newlines: bool) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        let keep = !c.is_control() || (!newlines && (c == '\n' || c == '\t'));
        if keep {
            out.push(c);
        } else {
            out.extend(c.escape_default());
        }
    }
    out
}

/// `s` cut to `max` characters, with `…` when something was cut; newlines become spaces so a
/// table row stays one line.
pub fn truncate(s: &str, max: usize) -> String {
    let one_line = s.replace(['\n', '\r'], " ");
    if one_line.chars().count() <= max {
        return one_line;
    }
    let mut out: String = one_line.chars().take(max.saturating_sub(1)).collect();
    out.push('…');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_read_well() {
        assert_eq!(short_duration(Duration::from_secs(45)), "45s");
        assert_eq!(short_duration(Duration::from_secs(192)), "3m12s");
        assert_eq!(short_duration(Duration::from_secs(18_240)), "5h4m");
        assert_eq!(short_duration(Duration::from_secs(183_600)), "2d3h");
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(8 * 1024 * 1024 * 1024), "8.0 GiB");
        assert_eq!(truncate("abcdef", 4), "abc…");
        assert_eq!(truncate("a\nb", 4), "a b");
        assert_eq!(enum_word("JOB_STATE_TIMED_OUT", "JOB_STATE_"), "timed out");
        assert_eq!(when(None), "-");
    }

    #[test]
    fn outside_text_cannot_drive_the_terminal_or_forge_lines() {
        let hostile = "ok\x1b]0;pwned\x07\x1b[2J\rdeploy succeeded\nnext";
        let shown = untrusted(hostile);
        assert!(!shown.contains('\x1b') && !shown.contains('\x07') && !shown.contains('\r'));
        assert!(shown.contains("\\u{1b}]0;pwned"), "{shown}");
        assert!(
            shown.contains("\nnext"),
            "newlines stay in multi-line output: {shown}"
        );
        let row = one_line(hostile);
        assert!(!row.contains('\n'), "{row}");
        assert_eq!(one_line("plain name"), "plain name");
        assert_eq!(one_line("tab\there"), "tab\\there");
    }

    #[test]
    fn colour_is_invisible_to_widths() {
        let red = paint("failed", Tone::Bad, true);
        assert_eq!(red, "\x1b[31mfailed\x1b[0m");
        assert_eq!(visible_width(&red), 6);
        assert_eq!(paint("failed", Tone::Bad, false), "failed");
        assert_eq!(state("online", false), "online");
    }
}
