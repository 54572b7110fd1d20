//! Prometheus metrics: the families and their text exposition ([`family`]), and the `/metrics`
//! endpoint that serves them ([`serve`]).

pub mod family;
pub mod serve;

/// A label value for a protobuf enum name: `JOB_STATE_TIMED_OUT` -> `timed_out`.
pub fn enum_word(name: &str, prefix: &str) -> String {
    name.trim_start_matches(prefix).to_ascii_lowercase()
}
