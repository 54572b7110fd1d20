//! What a job sent, as tests read it: the agent messages drained from an outbox (or
//! received by a stand-in controller), with its steps, log lines and a transcript.

use sentinel_proto::v1::{agent_message, job_event, AgentMessage, JobStep, StepStatus};

use crate::fixture::SECRET;

/// What one job sent.
pub struct Sent {
    /// Everything, in order.
    pub msgs: Vec<AgentMessage>,
}

impl Sent {
    /// The messages one job sent.
    pub fn new(msgs: Vec<AgentMessage>) -> Self {
        Self { msgs }
    }

    /// Its step events, in order.
    pub fn steps(&self) -> Vec<JobStep> {
        self.msgs
            .iter()
            .filter_map(|m| match &m.msg {
                Some(agent_message::Msg::JobEvent(e)) => match &e.event {
                    Some(job_event::Event::Step(s)) => Some(s.clone()),
                    _ => None,
                },
                _ => None,
            })
            .collect()
    }

    /// The final status of `name` (its last event).
    pub fn step(&self, name: &str) -> Option<StepStatus> {
        self.steps()
            .into_iter()
            .rev()
            .find(|s| s.name == name)
            .map(|s| s.status())
    }

    /// Its log lines as (stream, line).
    pub fn logs(&self) -> Vec<(String, String)> {
        self.msgs
            .iter()
            .filter_map(|m| match &m.msg {
                Some(agent_message::Msg::JobEvent(e)) => match &e.event {
                    Some(job_event::Event::Log(l)) => Some((l.stream.clone(), l.line.clone())),
                    _ => None,
                },
                _ => None,
            })
            .collect()
    }

    /// Every step and log line, one per line, as an operator would read them.
    pub fn transcript(&self) -> String {
        let mut out = String::new();
        for m in &self.msgs {
            if let Some(agent_message::Msg::JobEvent(e)) = &m.msg {
                match &e.event {
                    Some(job_event::Event::Log(l)) => {
                        out.push_str(&format!("  [{}] {}\n", l.stream, l.line))
                    }
                    Some(job_event::Event::Step(s)) => out.push_str(&format!(
                        "  == {} {:?} {}ms {}\n",
                        s.name,
                        s.status(),
                        s.duration_ms,
                        s.detail
                    )),
                    _ => {}
                }
            }
        }
        out
    }

    /// "unpack 40ms, switch 1ms, ..." for the steps that ended.
    pub fn durations(&self) -> String {
        self.steps()
            .iter()
            .filter(|s| s.status() != StepStatus::Started)
            .map(|s| format!("{} {}ms", s.name, s.duration_ms))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The secret appears nowhere: not in a log line, a step detail, anything.
    pub fn assert_no_secret(&self) {
        let text = format!("{:?}", self.msgs);
        assert!(
            !text.contains(SECRET),
            "the secret leaked into events: {text}"
        );
    }
}
