//! `--json` output: API messages in the canonical proto3 JSON mapping, read through the
//! descriptors the controller serves for reflection. A script sees exactly the field names,
//! enum names, int64-as-string and RFC 3339 times that `grpcurl -emit-defaults` prints for the
//! same call, and every field the API has, including ones added later. Fields at their default
//! are printed too (an empty list is `[]`, not absent), so `jq '.jobs[]'` works on an empty
//! answer and a script never has to guess whether "absent" means false, zero or unknown.

use std::sync::OnceLock;

use anyhow::Context;
use prost_reflect::{DescriptorPool, DynamicMessage, SerializeOptions};

fn pool() -> anyhow::Result<&'static DescriptorPool> {
    static POOL: OnceLock<DescriptorPool> = OnceLock::new();
    if let Some(pool) = POOL.get() {
        return Ok(pool);
    }
    let pool = DescriptorPool::decode(sentinel_proto::FILE_DESCRIPTOR_SET)
        .context("reading the API's descriptors")?;
    Ok(POOL.get_or_init(|| pool))
}

fn dynamic<M: prost::Message>(message: &M, full_name: &str) -> anyhow::Result<DynamicMessage> {
    let descriptor = pool()?
        .get_message_by_name(full_name)
        .with_context(|| format!("no message {full_name} in the API's descriptors"))?;
    DynamicMessage::decode(descriptor, message.encode_to_vec().as_slice())
        .with_context(|| format!("re-reading a {full_name}"))
}

/// `message` (of the protobuf type `full_name`, e.g. `sentinel.v1.Host`) as indented JSON,
/// fields in the API's order.
pub fn to_string<M: prost::Message>(message: &M, full_name: &str) -> anyhow::Result<String> {
    let mut out = serde_json::Serializer::pretty(Vec::new());
    dynamic(message, full_name)?
        .serialize_with_options(
            &mut out,
            &SerializeOptions::new().skip_default_fields(false),
        )
        .with_context(|| format!("writing a {full_name} as JSON"))?;
    String::from_utf8(out.into_inner()).context("JSON is UTF-8")
}

/// `message` as a JSON value.
pub fn to_json<M: prost::Message>(
    message: &M,
    full_name: &str,
) -> anyhow::Result<serde_json::Value> {
    serde_json::from_str(&to_string(message, full_name)?).context("re-reading the JSON")
}

/// Prints `message` as indented JSON.
pub fn print<M: prost::Message>(message: &M, full_name: &str) -> anyhow::Result<()> {
    println!("{}", to_string(message, full_name)?);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use sentinel_proto::v1::{Host, HostStatus, Job, JobKind, JobState};

    #[test]
    fn messages_come_out_as_grpcurl_prints_them() {
        let host = Host {
            name: "argus".into(),
            status: HostStatus::Online as i32,
            last_seen: Some(prost_types::Timestamp {
                seconds: 1_700_000_000,
                nanos: 0,
            }),
            state_age_seconds: 1.5,
            ..Default::default()
        };
        let json = to_json(&host, "sentinel.v1.Host").unwrap();
        assert_eq!(json["name"], "argus");
        assert_eq!(json["status"], "HOST_STATUS_ONLINE");
        assert_eq!(json["lastSeen"], "2023-11-14T22:13:20Z");
        assert_eq!(json["stateAgeSeconds"], 1.5);

        let job = Job {
            job_id: "j-1".into(),
            kind: JobKind::VerifyBackups as i32,
            state: JobState::TimedOut as i32,
            ..Default::default()
        };
        let json = to_json(&job, "sentinel.v1.Job").unwrap();
        assert_eq!(json["kind"], "JOB_KIND_VERIFY_BACKUPS");
        assert_eq!(json["state"], "JOB_STATE_TIMED_OUT");
        assert!(to_json(&job, "sentinel.v1.Nope").is_err());
    }

    #[test]
    fn empty_lists_and_zero_values_are_printed_not_left_out() {
        let empty = sentinel_proto::v1::ListJobsResponse::default();
        let json = to_json(&empty, "sentinel.v1.ListJobsResponse").unwrap();
        assert_eq!(json["jobs"], serde_json::json!([]), "{json}");
        let job = Job::default();
        let json = to_json(&job, "sentinel.v1.Job").unwrap();
        assert_eq!(json["jobId"], "");
        assert_eq!(json["state"], "JOB_STATE_UNSPECIFIED");
    }
}
