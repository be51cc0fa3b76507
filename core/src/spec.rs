//! Validating a `RunJobRequest` into a [`JobSpec`]: every field is checked here, at the
//! boundary, and a bad one is refused with INVALID_ARGUMENT naming it.

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use chrono::{DateTime, Utc};
use joblet_proto::joblet::RunJobRequest;
use serde::{Deserialize, Serialize};

use crate::config::JobsConfig;
use crate::error::CoreError;
use crate::spawn::Network;

const MAX_COMMAND_BYTES: usize = 4096;
const MAX_ARGS: usize = 4096;
const MAX_ARGS_BYTES: usize = 1024 * 1024;
const MAX_ENV_VARS: usize = 1024;

/// Serialized (core's state journal) without its content, which is written to the work dir at
/// start and not kept.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Upload {
    /// Relative to the job's work dir, without `..`.
    pub path: PathBuf,
    #[serde(skip)]
    pub content: bytes::Bytes,
    pub mode: u32,
    pub is_directory: bool,
}

/// Serialized into core's state journal as validated, except secret values: only the names of
/// `secret_environment` are written, so no secret reaches the disk.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobSpec {
    pub command: String,
    pub args: Vec<String>,
    pub environment: BTreeMap<String, String>,
    #[serde(serialize_with = "names_only")]
    pub secret_environment: BTreeMap<String, String>,
    pub work_dir: Option<PathBuf>,
    pub uploads: Vec<Upload>,
    pub max_cpu: u32,
    pub max_memory_mb: u32,
    pub max_io_bps: u64,
    pub cpu_cores: String,
    pub network: Network,
    pub network_name: String,
    pub schedule: Option<DateTime<Utc>>,
    pub timeout: Option<Duration>,
    pub timeout_text: String,
}

fn names_only<S: serde::Serializer>(
    secrets: &BTreeMap<String, String>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.collect_map(secrets.keys().map(|name| (name, "")))
}

fn invalid(field: &'static str, message: impl Into<String>) -> CoreError {
    CoreError::InvalidArgument {
        field,
        message: message.into(),
    }
}

fn no_nul(field: &'static str, value: &str) -> Result<(), CoreError> {
    if value.contains('\0') {
        return Err(invalid(field, "must not contain NUL bytes"));
    }
    Ok(())
}

fn environment(
    field: &'static str,
    map: std::collections::HashMap<String, String>,
) -> Result<BTreeMap<String, String>, CoreError> {
    if map.len() > MAX_ENV_VARS {
        return Err(invalid(field, format!("at most {MAX_ENV_VARS} variables")));
    }
    for (name, value) in &map {
        let valid_name = !name.is_empty()
            && !name.starts_with(|c: char| c.is_ascii_digit())
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !valid_name {
            return Err(invalid(
                field,
                format!(
                    "{name:?} is not a valid variable name (letters, digits, _; not starting with a digit)"
                ),
            ));
        }
        no_nul(field, value)?;
    }
    Ok(map.into_iter().collect())
}

fn limit(field: &'static str, value: i32, ceiling: u32) -> Result<u32, CoreError> {
    if value < 0 {
        return Err(invalid(field, "must not be negative"));
    }
    let value = value as u32;
    if ceiling > 0 && value > ceiling {
        return Err(invalid(
            field,
            format!("{value} exceeds the node's maximum of {ceiling}"),
        ));
    }
    Ok(value)
}

/// Parses a `schedule`: RFC 3339, or empty for "now".
pub fn parse_schedule(text: &str) -> Result<Option<DateTime<Utc>>, CoreError> {
    if text.is_empty() {
        return Ok(None);
    }
    DateTime::parse_from_rfc3339(text)
        .map(|t| Some(t.with_timezone(&Utc)))
        .map_err(|e| invalid("schedule", format!("{text:?} is not an RFC 3339 time: {e}")))
}

/// A relative upload path that stays inside the work dir.
fn upload_path(path: &str) -> Result<PathBuf, CoreError> {
    no_nul("uploads", path)?;
    let candidate = Path::new(path);
    if path.is_empty() || candidate.is_absolute() {
        return Err(invalid(
            "uploads",
            format!("path {path:?} must be relative to the work dir"),
        ));
    }
    for component in candidate.components() {
        if !matches!(component, Component::Normal(_) | Component::CurDir) {
            return Err(invalid(
                "uploads",
                format!("path {path:?} must not leave the work dir"),
            ));
        }
    }
    Ok(candidate.to_owned())
}

impl JobSpec {
    /// The spec of a job whose record was lost (only its spool survived).
    pub fn unknown() -> JobSpec {
        JobSpec {
            command: "(unknown)".into(),
            args: Vec::new(),
            environment: BTreeMap::new(),
            secret_environment: BTreeMap::new(),
            work_dir: None,
            uploads: Vec::new(),
            max_cpu: 0,
            max_memory_mb: 0,
            max_io_bps: 0,
            cpu_cores: String::new(),
            network: Network::Host,
            network_name: String::new(),
            schedule: None,
            timeout: None,
            timeout_text: String::new(),
        }
    }

    pub fn from_request(request: RunJobRequest, limits: &JobsConfig) -> Result<JobSpec, CoreError> {
        if request.command.trim().is_empty() {
            return Err(invalid("command", "must not be empty"));
        }
        if request.command.len() > MAX_COMMAND_BYTES {
            return Err(invalid(
                "command",
                format!("longer than {MAX_COMMAND_BYTES} bytes"),
            ));
        }
        no_nul("command", &request.command)?;
        if request.args.len() > MAX_ARGS {
            return Err(invalid("args", format!("at most {MAX_ARGS} arguments")));
        }
        if request.args.iter().map(String::len).sum::<usize>() > MAX_ARGS_BYTES {
            return Err(invalid(
                "args",
                format!("longer than {MAX_ARGS_BYTES} bytes in all"),
            ));
        }
        for arg in &request.args {
            no_nul("args", arg)?;
        }
        let environment = environment("environment", request.environment)?;
        let secret_environment = environment_secret(request.secret_environment)?;

        let max_cpu = match limit("max_cpu", request.max_cpu, limits.max_cpu)? {
            0 => limits.default_max_cpu,
            v => v,
        };
        let max_memory_mb = match limit("max_memory", request.max_memory, limits.max_memory_mb)? {
            0 => limits.default_max_memory_mb,
            v => v,
        };
        if request.max_io_bps < 0 {
            return Err(invalid("max_io_bps", "must not be negative"));
        }
        let max_io_bps = match request.max_io_bps as u64 {
            0 => limits.default_max_io_bps,
            v => v,
        };
        if !request.cpu_cores.is_empty() && crate::cgroup::parse_cpus(&request.cpu_cores).is_none()
        {
            return Err(invalid(
                "cpu_cores",
                format!(
                    "{:?} is not a CPU list like \"0-1\" or \"0,2\"",
                    request.cpu_cores
                ),
            ));
        }
        let network = match request.network.as_str() {
            "" | "host" => Network::Host,
            "none" | "isolated" => Network::None,
            other => {
                return Err(invalid(
                    "network",
                    format!("{other:?}: use \"host\" or \"none\""),
                ));
            }
        };
        let schedule = parse_schedule(&request.schedule)?;
        let timeout = match request.timeout.trim() {
            "" | "0" => None,
            text => Some(
                humantime::parse_duration(text)
                    .map_err(|e| invalid("timeout", format!("{text:?}: {e}")))?,
            ),
        };
        let work_dir = match request.work_dir.as_str() {
            "" => None,
            dir => {
                no_nul("work_dir", dir)?;
                let path = PathBuf::from(dir);
                if !path.is_absolute() || path.components().any(|c| c == Component::ParentDir) {
                    return Err(invalid("work_dir", "must be an absolute path without '..'"));
                }
                Some(path)
            }
        };
        if !request.volumes.is_empty() {
            return Err(invalid("volumes", "volumes are not supported by this node"));
        }
        if !request.runtime.is_empty() {
            return Err(invalid(
                "runtime",
                "runtimes are not supported by this node",
            ));
        }
        if request.gpu_count != 0 || request.gpu_memory_mb != 0 {
            return Err(invalid("gpu_count", "GPUs are not supported by this node"));
        }
        let mut total = 0u64;
        let mut uploads = Vec::with_capacity(request.uploads.len());
        for upload in request.uploads {
            total += upload.content.len() as u64;
            if total > limits.max_upload_size.as_u64() {
                return Err(invalid(
                    "uploads",
                    format!(
                        "larger than {} in all (jobs.max_upload_size)",
                        limits.max_upload_size
                    ),
                ));
            }
            if upload.mode > 0o7777 {
                return Err(invalid(
                    "uploads",
                    format!("mode {:o} is not a file mode", upload.mode),
                ));
            }
            uploads.push(Upload {
                path: upload_path(&upload.path)?,
                content: upload.content,
                mode: upload.mode,
                is_directory: upload.is_directory,
            });
        }
        Ok(JobSpec {
            command: request.command,
            args: request.args,
            environment,
            secret_environment,
            work_dir,
            uploads,
            max_cpu,
            max_memory_mb,
            max_io_bps,
            cpu_cores: request.cpu_cores,
            network,
            network_name: if network == Network::None {
                "none"
            } else {
                "host"
            }
            .to_owned(),
            schedule,
            timeout,
            timeout_text: request.timeout,
        })
    }
}

fn environment_secret(
    map: std::collections::HashMap<String, String>,
) -> Result<BTreeMap<String, String>, CoreError> {
    environment("secret_environment", map)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(request: RunJobRequest) -> Result<JobSpec, CoreError> {
        JobSpec::from_request(request, &JobsConfig::default())
    }

    fn field_of(request: RunJobRequest) -> &'static str {
        match spec(request) {
            Err(CoreError::InvalidArgument { field, .. }) => field,
            other => panic!("expected INVALID_ARGUMENT, got {other:?}"),
        }
    }

    fn run(command: &str) -> RunJobRequest {
        RunJobRequest {
            command: command.to_owned(),
            ..Default::default()
        }
    }

    #[test]
    fn hostile_requests_are_refused_naming_the_field() {
        assert_eq!(field_of(run("")), "command");
        assert_eq!(field_of(run("a\0b")), "command");
        assert_eq!(field_of(run(&"x".repeat(5000))), "command");
        let mut r = run("echo");
        r.args = vec!["ok".into(), "bad\0".into()];
        assert_eq!(field_of(r), "args");
        let mut r = run("echo");
        r.environment.insert("1BAD".into(), "x".into());
        assert_eq!(field_of(r), "environment");
        let mut r = run("echo");
        r.secret_environment.insert("A=B".into(), "x".into());
        assert_eq!(field_of(r), "secret_environment");
        let mut r = run("echo");
        r.max_cpu = -1;
        assert_eq!(field_of(r), "max_cpu");
        let mut r = run("echo");
        r.cpu_cores = "0-x".into();
        assert_eq!(field_of(r), "cpu_cores");
        let mut r = run("echo");
        r.schedule = "tomorrow".into();
        assert_eq!(field_of(r), "schedule");
        let mut r = run("echo");
        r.network = "bridge".into();
        assert_eq!(field_of(r), "network");
        for path in ["../x", "/etc/passwd", "a/../../b", ""] {
            let mut r = run("echo");
            r.uploads.push(joblet_proto::joblet::FileUpload {
                path: path.into(),
                ..Default::default()
            });
            assert_eq!(field_of(r), "uploads", "{path}");
        }
    }

    #[test]
    fn a_plain_request_is_accepted() {
        let mut r = run("echo");
        r.args = vec!["hi".into()];
        r.max_cpu = 50;
        r.cpu_cores = "0".into();
        r.network = "none".into();
        r.timeout = "30s".into();
        r.schedule = "2030-01-01T00:00:00Z".into();
        let spec = spec(r).unwrap();
        assert_eq!(spec.max_cpu, 50);
        assert_eq!(spec.network, Network::None);
        assert_eq!(spec.timeout, Some(Duration::from_secs(30)));
        assert!(spec.schedule.is_some());
    }
}
