//! joblet-core's configuration file (YAML). The structs are the file format: every key has a
//! default (`deploy/config/joblet-config.yml` lists them), unknown keys are refused, and
//! [`Config::validate`] rejects nonsense naming the key.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::bail;
use bytesize::ByteSize;
use joblet_daemon::tls::TlsFiles;
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub grpc: GrpcConfig,
    pub metrics: MetricsConfig,
    /// Per-job spool files (the ADR's "local files") and other state.
    pub state_dir: PathBuf,
    /// Node name reported to clients.
    pub node_id: String,
    pub persist: PersistConfig,
    pub cgroup: CgroupConfig,
    pub jobs: JobsConfig,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            grpc: GrpcConfig::default(),
            metrics: MetricsConfig::default(),
            state_dir: PathBuf::from("/var/lib/joblet"),
            node_id: String::new(),
            persist: PersistConfig::default(),
            cgroup: CgroupConfig::default(),
            jobs: JobsConfig::default(),
        }
    }
}

/// joblet-core's defaults: gRPC on 50051 with requests up to 80 MiB (uploads travel inside
/// RunJob), Prometheus on 9091.
#[derive(Debug, Clone)]
pub struct CoreDefaults;

impl joblet_daemon::config::Defaults for CoreDefaults {
    const GRPC_PORT: u16 = 50051;
    const MAX_REQUEST_MIB: u64 = 80;
    const METRICS_PORT: u16 = 9091;
}

pub type GrpcConfig = joblet_daemon::config::GrpcConfig<CoreDefaults>;
pub type MetricsConfig = joblet_daemon::config::MetricsConfig<CoreDefaults>;

/// The ADR's `persist:` block, plus where persist answers queries.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PersistConfig {
    pub enabled: bool,
    pub socket: PathBuf,
    /// Replication queue capacity in messages; when full, replication waits for room (it
    /// reads the spool behind the job, which never waits).
    pub buffer_size: usize,
    /// Upper bound of the reconnect backoff.
    #[serde(with = "humantime_serde")]
    pub reconnect_delay: Duration,
    pub max_frame_size: ByteSize,
    /// persist's gRPC address, used to read history of jobs core no longer holds and to delete
    /// a job's history with the job; null = not used.
    pub query_address: Option<String>,
    /// Client certificate (OU admin), key and CA for calling persist over mutual TLS; null =
    /// plaintext (persist with grpc.insecure).
    pub query_tls: Option<TlsFiles>,
    /// Nice value (-20..=19) of the replication thread: above the jobs' 0, so that on a busy
    /// host replication falls behind (the spool holds the rest) instead of slowing jobs down.
    pub replication_nice: i32,
}

impl Default for PersistConfig {
    fn default() -> Self {
        PersistConfig {
            enabled: true,
            socket: PathBuf::from("/tmp/joblet-persist.sock"),
            buffer_size: 10_000,
            reconnect_delay: Duration::from_secs(5),
            max_frame_size: ByteSize::mib(8),
            query_address: Some("127.0.0.1:50052".to_owned()),
            query_tls: Some(TlsFiles {
                cert: PathBuf::from("/etc/joblet/certs/core-client.pem"),
                key: PathBuf::from("/etc/joblet/certs/core-client-key.pem"),
                ca: PathBuf::from("/etc/joblet/certs/ca.pem"),
            }),
            replication_nice: 10,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CgroupConfig {
    /// Parent of the job cgroups, relative to core's own cgroup (so a unit with Delegate=yes
    /// keeps jobs inside its subtree).
    pub parent: String,
    /// pids.max of every job.
    pub pids_limit: u32,
}

impl Default for CgroupConfig {
    fn default() -> Self {
        CgroupConfig {
            parent: "joblet".to_owned(),
            pids_limit: 1024,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct JobsConfig {
    /// Limits applied when a job asks for none (0 = unlimited).
    pub default_max_cpu: u32,
    pub default_max_memory_mb: u32,
    pub default_max_io_bps: u64,
    /// Largest limits a job may ask for (0 = no ceiling).
    pub max_cpu: u32,
    pub max_memory_mb: u32,
    /// How often each job's cgroup is sampled for metrics.
    #[serde(with = "humantime_serde")]
    pub metrics_interval: Duration,
    /// Time between SIGTERM and SIGKILL when a job is stopped.
    #[serde(with = "humantime_serde")]
    pub stop_grace_period: Duration,
    /// Longer output lines are split into several records of at most this many bytes.
    pub max_line_length: ByteSize,
    /// Work directory root; each job gets `<work_root>/<job id>` unless it names its own.
    pub work_root: PathBuf,
    /// Largest total size of a job's uploads.
    pub max_upload_size: ByteSize,
    /// How long a finished job stays in core (listed, its spool kept) once joblet-persist has
    /// acknowledged all of its output; then it is only in persist's history.
    #[serde(with = "humantime_serde")]
    pub keep_finished: Duration,
    /// With persist disabled, the most the spools of finished jobs may take: above it the
    /// oldest finished jobs are dropped. (With persist enabled a spool is kept until persist
    /// has acknowledged it, whatever its size.)
    pub spool_max_bytes: ByteSize,
    /// What a stop or restart of joblet-core does to running jobs: `keep` leaves them running
    /// (their supervisors write their output on, and the next start re-attaches them), `stop`
    /// stops them (SIGKILL) and records them STOPPED.
    pub on_core_shutdown: OnCoreShutdown,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnCoreShutdown {
    Keep,
    Stop,
}

impl Default for JobsConfig {
    fn default() -> Self {
        JobsConfig {
            default_max_cpu: 0,
            default_max_memory_mb: 0,
            default_max_io_bps: 0,
            max_cpu: 0,
            max_memory_mb: 0,
            metrics_interval: Duration::from_secs(1),
            stop_grace_period: Duration::from_secs(10),
            max_line_length: ByteSize::kib(64),
            work_root: PathBuf::from("/var/lib/joblet/work"),
            max_upload_size: ByteSize::mib(64),
            keep_finished: Duration::from_secs(3600),
            spool_max_bytes: ByteSize::gib(10),
            on_core_shutdown: OnCoreShutdown::Keep,
        }
    }
}

impl PersistConfig {
    /// persist's query API, when core should use it.
    pub fn query_target(&self) -> Option<crate::history::PersistAddress> {
        let address = self.query_address.clone().filter(|_| self.enabled)?;
        Some(crate::history::PersistAddress {
            address,
            tls: self.query_tls.clone(),
        })
    }
}

impl Config {
    pub fn load(path: &Path) -> anyhow::Result<Config> {
        joblet_daemon::config::load(path, Config::validate)
    }

    pub fn parse(text: &str) -> anyhow::Result<Config> {
        joblet_daemon::config::parse(text, Config::validate)
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        if self.state_dir.as_os_str().is_empty() {
            bail!("state_dir: must not be empty");
        }
        joblet_daemon::tls::check_listener(
            self.grpc.listen,
            self.grpc.tls.as_ref(),
            self.grpc.insecure,
        )
        .map_err(anyhow::Error::msg)?;
        if self.persist.buffer_size == 0 {
            bail!("persist.buffer_size: must be greater than zero");
        }
        if !(-20..=19).contains(&self.persist.replication_nice) {
            bail!("persist.replication_nice: must be a nice value from -20 to 19");
        }
        if self.persist.reconnect_delay.is_zero() {
            bail!("persist.reconnect_delay: must be greater than zero");
        }
        if self.persist.socket.as_os_str().len() > 107 {
            bail!("persist.socket: path is longer than the 107 bytes a Unix socket allows");
        }
        let parent = &self.cgroup.parent;
        if parent.is_empty() || parent.starts_with('/') || parent.split('/').any(|p| p == "..") {
            bail!("cgroup.parent: must be a relative path without '..', got {parent:?}");
        }
        if self.cgroup.pids_limit == 0 {
            bail!("cgroup.pids_limit: must be greater than zero");
        }
        if self.jobs.metrics_interval < Duration::from_millis(100) {
            bail!("jobs.metrics_interval: must be at least 100ms");
        }
        if self.jobs.max_line_length.as_u64() < 128 {
            bail!("jobs.max_line_length: must be at least 128 bytes");
        }
        // The longest line, in the frame that carries it, with the longest envelope fields.
        let longest_line = vec![0u8; self.jobs.max_line_length.as_u64() as usize];
        let frame = joblet_ipc::Frame::log(
            "00000000-0000-0000-0000-000000000000",
            u64::MAX,
            i64::MIN,
            joblet_ipc::Stream::Stderr,
            &longest_line,
            true,
        )
        .body_len() as u64;
        if frame > self.persist.max_frame_size.as_u64() {
            bail!(
                "jobs.max_line_length: a line of {} takes a frame of {frame} bytes, more than \
                 persist.max_frame_size ({}); lower jobs.max_line_length or raise \
                 persist.max_frame_size (and joblet-persist's ipc.max_frame_size with it)",
                self.jobs.max_line_length,
                self.persist.max_frame_size
            );
        }
        if self.jobs.max_cpu > 0 && self.jobs.default_max_cpu > self.jobs.max_cpu {
            bail!("jobs.default_max_cpu: exceeds jobs.max_cpu");
        }
        if self.jobs.max_memory_mb > 0 && self.jobs.default_max_memory_mb > self.jobs.max_memory_mb
        {
            bail!("jobs.default_max_memory_mb: exceeds jobs.max_memory_mb");
        }
        if self.jobs.spool_max_bytes.as_u64() == 0 {
            bail!("jobs.spool_max_bytes: must be greater than zero");
        }
        if !self.jobs.work_root.is_absolute() {
            bail!("jobs.work_root: must be an absolute path");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reference_config_parses_and_matches_the_defaults() {
        let text = include_str!("../../deploy/config/joblet-config.yml");
        let parsed = Config::parse(text).expect("reference config parses");
        // Except the socket: the shipped units give both daemons a private /tmp.
        let mut defaults = Config::default();
        defaults.persist.socket = PathBuf::from("/run/joblet-persist/persist.sock");
        assert_eq!(format!("{parsed:?}"), format!("{defaults:?}"));
    }

    #[test]
    fn nonsense_is_refused_naming_the_key() {
        let error = |text: &str| format!("{:#}", Config::parse(text).unwrap_err());
        assert!(error("persist:\n  buffer_size: 0\n").contains("persist.buffer_size"));
        assert!(error("persist:\n  reconnect_delay: soon\n").contains("reconnect_delay"));
        assert!(error("persist:\n  replication_nice: 20\n").contains("persist.replication_nice"));
        assert!(error("cgroup:\n  parent: /abs\n").contains("cgroup.parent"));
        assert!(error("jobs:\n  metrics_interval: 1ms\n").contains("jobs.metrics_interval"));
        assert!(error("nope: 1\n").contains("unknown field `nope`"));
        assert!(
            error("grpc:\n  listen: 10.1.2.3:50051\n  insecure: true\n").contains("grpc.insecure")
        );
        assert!(error("grpc:\n  tls: null\n").contains("grpc.tls"));
        // A 1000-byte line does not fit a 1 KiB frame with its envelope.
        let tight = "persist:\n  max_frame_size: 1 KiB\njobs:\n  max_line_length: 1000 B\n";
        let said = error(tight);
        assert!(
            said.contains("jobs.max_line_length") && said.contains("persist.max_frame_size"),
            "{said}"
        );
        assert!(
            Config::parse("persist:\n  max_frame_size: 1 KiB\njobs:\n  max_line_length: 900 B\n")
                .is_ok()
        );
    }
}
