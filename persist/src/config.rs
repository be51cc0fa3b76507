//! The configuration file (YAML). The structs are the file format: every key has a default
//! (`deploy/config/persist-config.yml` lists them), unknown keys are refused, and
//! [`Config::validate`] rejects nonsense with a message naming the key.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::bail;
use bytesize::ByteSize;
use serde::{Deserialize, Deserializer};

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Where RocksDB keeps its files.
    pub data_dir: PathBuf,
    pub ipc: IpcConfig,
    pub grpc: GrpcConfig,
    pub metrics: MetricsConfig,
    pub retention: RetentionConfig,
    pub storage: StorageConfig,
    pub rocksdb: RocksDbConfig,
    pub query: QueryConfig,
    /// Nice value (-20..=19) of the whole daemon: above the 0 of jobs and clients, so that on
    /// a busy host ingest and big scans yield the CPU (ADR-0001: queries never compete with
    /// running jobs).
    pub nice: i32,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            data_dir: PathBuf::from("/var/lib/joblet-persist"),
            ipc: IpcConfig::default(),
            grpc: GrpcConfig::default(),
            metrics: MetricsConfig::default(),
            retention: RetentionConfig::default(),
            storage: StorageConfig::default(),
            rocksdb: RocksDbConfig::default(),
            query: QueryConfig::default(),
            nice: 10,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IpcConfig {
    /// Unix socket core connects to; created with mode 0600.
    pub socket: PathBuf,
    /// Largest accepted frame.
    pub max_frame_size: ByteSize,
    /// Connections served at once (one joblet-core needs one); more are closed and counted in
    /// joblet_persist_ipc_connections_refused_total.
    pub max_connections: usize,
}

impl Default for IpcConfig {
    fn default() -> Self {
        IpcConfig {
            socket: PathBuf::from("/tmp/joblet-persist.sock"),
            max_frame_size: ByteSize::mib(8),
            max_connections: 16,
        }
    }
}

/// joblet-persist's defaults: gRPC on 50052 with requests up to 4 MiB, Prometheus on 9092.
#[derive(Debug, Clone)]
pub struct PersistDefaults;

impl joblet_daemon::config::Defaults for PersistDefaults {
    const GRPC_PORT: u16 = 50052;
    const MAX_REQUEST_MIB: u64 = 4;
    const METRICS_PORT: u16 = 9092;
}

pub type GrpcConfig = joblet_daemon::config::GrpcConfig<PersistDefaults>;
pub type MetricsConfig = joblet_daemon::config::MetricsConfig<PersistDefaults>;

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetentionConfig {
    /// How long log lines are kept, counted from each line's timestamp; "0" keeps forever.
    pub logs: Retention,
    /// How long metric samples are kept; "0" keeps forever.
    pub metrics: Retention,
    /// How long metric samples are kept as taken; older ones are kept as 1-minute rollups
    /// (min, average, max). "0": never downsampled.
    pub metrics_full_resolution: Retention,
    /// Accepts retention periods under one minute. For tests only: in production such a value
    /// is a typo ("1ns") that would delete everything.
    pub allow_under_a_minute: bool,
    /// Most the data directory may take; above it the jobs with the oldest data are dropped
    /// whole until it is back under 90 % of it. 0: no cap.
    pub max_bytes: ByteSize,
    /// How often expired jobs are dropped and their disk space freed (and the cap checked).
    #[serde(with = "humantime_serde")]
    pub check_interval: Duration,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        RetentionConfig {
            logs: Retention(Some(Duration::from_secs(7 * 86_400))),
            metrics: Retention(Some(Duration::from_secs(30 * 86_400))),
            metrics_full_resolution: Retention(Some(Duration::from_secs(86_400))),
            allow_under_a_minute: false,
            max_bytes: ByteSize::b(0),
            check_interval: Duration::from_secs(60),
        }
    }
}

/// A retention period; `None` keeps data forever.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention(pub Option<Duration>);

impl<'de> Deserialize<'de> for Retention {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(i64),
            Text(String),
        }
        match Raw::deserialize(deserializer)? {
            Raw::Number(0) => Ok(Retention(None)),
            Raw::Number(n) => Err(serde::de::Error::custom(format!(
                "invalid retention {n}: use a duration like \"7d\" or 0 for forever"
            ))),
            Raw::Text(text) => parse_retention(&text).map_err(serde::de::Error::custom),
        }
    }
}

fn parse_retention(text: &str) -> Result<Retention, String> {
    let text = text.trim();
    if text == "0" || text.eq_ignore_ascii_case("forever") {
        return Ok(Retention(None));
    }
    if text.starts_with('-') {
        return Err(format!("invalid retention {text:?}: it cannot be negative"));
    }
    match humantime::parse_duration(text) {
        Ok(d) if d.is_zero() => Ok(Retention(None)),
        Ok(d) => Ok(Retention(Some(d))),
        Err(e) => Err(format!(
            "invalid retention {text:?}: {e} (use a duration like \"7d\", or 0 for forever)"
        )),
    }
}

/// When an acknowledgement is sent, relative to the data reaching the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Durability {
    /// Every ingest batch is written to the WAL and fsynced before it is acknowledged: acked
    /// data survives a power loss. Batches hold everything that arrived meanwhile, so one
    /// fsync (3-4 ms here) covers thousands of lines at high rates.
    Sync,
    /// Every batch is written to the WAL (in the OS page cache) before it is acknowledged:
    /// acked data survives a crash of joblet-persist, not of the machine. The WAL is fsynced
    /// in the background every `background_sync_interval`.
    Wal,
    /// No WAL: a batch is acknowledged once it is in a flushed (fsynced) SST file; everything
    /// written is flushed every `flush_interval`. Each line is written once by persist (plus
    /// compactions) instead of twice. A crash (of persist or the machine) loses what was not
    /// flushed yet, which core still holds — it keeps every line until persist acknowledged
    /// it — and sends again. Acknowledgements come up to `flush_interval` later.
    Flushed,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StorageConfig {
    pub durability: Durability,
    /// With durability `wal`: how often the WAL is fsynced.
    #[serde(with = "humantime_serde")]
    pub background_sync_interval: Duration,
    /// With durability `flushed`: how often what was written is flushed to SST files (and
    /// acknowledged).
    #[serde(with = "humantime_serde")]
    pub flush_interval: Duration,
    /// Capacity used for the storage usage gauge and alert; null = the size of the filesystem
    /// holding `data_dir`.
    pub capacity: Option<ByteSize>,
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            durability: Durability::Flushed,
            background_sync_interval: Duration::from_secs(1),
            flush_interval: Duration::from_secs(2),
            capacity: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Compression {
    None,
    Lz4,
    Zstd,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RocksDbConfig {
    /// Shared block cache for reads.
    pub block_cache_size: ByteSize,
    /// Memtable size per column family before it is flushed.
    pub write_buffer_size: ByteSize,
    /// Compression of recent data (every level but the bottom one): fast, as these files are
    /// rewritten by compactions soon.
    pub compression: Compression,
    /// Compression of older data, the bottom level, where nearly all of it ends up. zstd packs
    /// it 13-23 % tighter but its compactions hold sustained ingest to a third (see
    /// deploy/config/persist-config.yml).
    pub bottommost_compression: Compression,
    /// zstd's level (1–22) where zstd is used, and the bottom level's with LZ4 too: higher
    /// packs tighter and compacts slower.
    pub zstd_level: i32,
    /// Size of the dictionary per bottom-level file (zstd: trained from up to 100 times as
    /// much of its data; LZ4: sampled from it); "0" compresses each block on its own.
    pub zstd_dictionary_size: ByteSize,
    /// Uncompressed size of a data block: the unit that is compressed and read. Logs are
    /// mostly read in long forward scans: 16 KiB blocks mean a quarter of the block reads,
    /// index entries and checksums of RocksDB's 4 KiB default; 64 KiB made scans faster still
    /// but a window's first line, which costs one block, slower.
    pub block_size: ByteSize,
    /// RocksDB reads and writes its files with O_DIRECT, past the page cache: less CPU per
    /// stored line and no job's cached pages evicted for persist's, but the block cache is then
    /// the only cache, so recent history is read from disk. The filesystem must support
    /// O_DIRECT (tmpfs does not).
    pub direct_io: bool,
}

impl Default for RocksDbConfig {
    fn default() -> Self {
        RocksDbConfig {
            block_cache_size: ByteSize::mib(128),
            write_buffer_size: ByteSize::mib(64),
            compression: Compression::Lz4,
            bottommost_compression: Compression::Lz4,
            zstd_level: 6,
            zstd_dictionary_size: ByteSize::kib(16),
            block_size: ByteSize::kib(16),
            direct_io: false,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct QueryConfig {
    /// Largest `tail` a query may ask for (tail keeps that many lines in memory).
    pub max_tail: u32,
}

impl Default for QueryConfig {
    fn default() -> Self {
        QueryConfig {
            max_tail: 1_000_000,
        }
    }
}

impl Config {
    /// Reads, parses and validates a config file.
    pub fn load(path: &Path) -> anyhow::Result<Config> {
        joblet_daemon::config::load(path, Config::validate)
    }

    pub fn parse(text: &str) -> anyhow::Result<Config> {
        joblet_daemon::config::parse(text, Config::validate)
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        if self.data_dir.as_os_str().is_empty() {
            bail!("data_dir: must not be empty");
        }
        for (key, retention) in [
            ("retention.logs", self.retention.logs),
            ("retention.metrics", self.retention.metrics),
            (
                "retention.metrics_full_resolution",
                self.retention.metrics_full_resolution,
            ),
        ] {
            if let Some(period) = retention.0
                && period < Duration::from_secs(60)
                && !self.retention.allow_under_a_minute
            {
                bail!(
                    "{key}: {} is under one minute and would delete data as it arrives; use at \
                     least 1m, or 0 to keep forever",
                    humantime::format_duration(period)
                );
            }
        }
        if !(1..=22).contains(&self.rocksdb.zstd_level) {
            bail!("rocksdb.zstd_level: must be 1 to 22");
        }
        if self.rocksdb.zstd_dictionary_size > ByteSize::mib(1) {
            bail!("rocksdb.zstd_dictionary_size: at most 1MiB");
        }
        if !(ByteSize::kib(1)..=ByteSize::mib(4)).contains(&self.rocksdb.block_size) {
            bail!("rocksdb.block_size: must be 1KiB to 4MiB");
        }
        if !(Duration::from_millis(10)..=Duration::from_secs(600))
            .contains(&self.storage.flush_interval)
        {
            bail!("storage.flush_interval: must be 10ms to 10m");
        }
        if self.retention.check_interval < Duration::from_secs(1) {
            bail!("retention.check_interval: must be at least 1s");
        }
        if self.ipc.max_connections == 0 {
            bail!("ipc.max_connections: must be at least 1");
        }
        // sun_path holds 108 bytes including the terminating NUL.
        if self.ipc.socket.as_os_str().len() > 107 {
            bail!("ipc.socket: path is longer than the 107 bytes a Unix socket allows");
        }
        let frame = self.ipc.max_frame_size.as_u64();
        if !(1024..=u32::MAX as u64).contains(&frame) {
            bail!("ipc.max_frame_size: must be between 1 KiB and 4 GiB, got {frame} bytes");
        }
        joblet_daemon::tls::check_listener(
            self.grpc.listen,
            self.grpc.tls.as_ref(),
            self.grpc.insecure,
        )
        .map_err(anyhow::Error::msg)?;
        if self.storage.background_sync_interval.is_zero() {
            bail!("storage.background_sync_interval: must be greater than zero");
        }
        if self.storage.capacity.is_some_and(|c| c.as_u64() == 0) {
            bail!("storage.capacity: must be greater than zero (or null for the filesystem size)");
        }
        if self.rocksdb.write_buffer_size.as_u64() < 1024 * 1024 {
            bail!("rocksdb.write_buffer_size: must be at least 1 MiB");
        }
        if !(-20..=19).contains(&self.nice) {
            bail!("nice: must be a nice value from -20 to 19");
        }
        if self.query.max_tail == 0 {
            bail!("query.max_tail: must be greater than zero");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reference_config_parses_and_matches_the_defaults() {
        let text = include_str!("../../deploy/config/persist-config.yml");
        let parsed = Config::parse(text).expect("reference config parses");
        // Except the socket: the shipped unit gives persist a private /tmp.
        let mut defaults = Config::default();
        defaults.ipc.socket = PathBuf::from("/run/joblet-persist/persist.sock");
        assert_eq!(format!("{parsed:?}"), format!("{defaults:?}"));
    }

    #[test]
    fn empty_file_means_defaults() {
        let config = Config::parse("").unwrap();
        assert_eq!(config.grpc.listen.port(), 50052);
        assert_eq!(config.ipc.socket, PathBuf::from("/tmp/joblet-persist.sock"));
    }

    #[test]
    fn retention_accepts_durations_and_zero() {
        let config = Config::parse("retention:\n  logs: 30d\n  metrics: 0\n").unwrap();
        assert_eq!(
            config.retention.logs,
            Retention(Some(Duration::from_secs(30 * 86_400)))
        );
        assert_eq!(config.retention.metrics, Retention(None));
    }

    fn error_of(text: &str) -> String {
        format!("{:#}", Config::parse(text).unwrap_err())
    }

    #[test]
    fn nonsense_is_refused_naming_the_key() {
        assert!(error_of("retention:\n  logs: -5d\n").contains("negative"));
        let short = error_of("retention:\n  logs: 1ns\n");
        assert!(
            short.contains("retention.logs") && short.contains("one minute"),
            "{short}"
        );
        assert!(error_of("retention:\n  metrics: 59s\n").contains("retention.metrics"));
        assert!(
            error_of("retention:\n  metrics_full_resolution: 10s\n")
                .contains("retention.metrics_full_resolution")
        );
        assert_eq!(
            Config::parse("retention:\n  metrics_full_resolution: 0\n")
                .unwrap()
                .retention
                .metrics_full_resolution,
            Retention(None),
            "0: never downsampled"
        );
        assert!(Config::parse("retention:\n  logs: 1m\n").is_ok());
        assert!(
            Config::parse("retention:\n  logs: 1s\n  allow_under_a_minute: true\n").is_ok(),
            "tests may ask for short retention explicitly"
        );
        assert!(error_of("retention:\n  logs: soon\n").contains("invalid retention"));
        assert!(error_of("bogus: 1\n").contains("unknown field `bogus`"));
        assert!(error_of("nice: 20\n").contains("nice: must be"));
        assert!(error_of("ipc:\n  sockett: /tmp/x\n").contains("unknown field `sockett`"));
        assert!(error_of("rocksdb:\n  zstd_level: 30\n").contains("rocksdb.zstd_level"));
        assert!(error_of("rocksdb:\n  block_size: 100 B\n").contains("rocksdb.block_size"));
        assert!(error_of("grpc:\n  listen: nowhere\n").contains("grpc"));
        assert!(error_of("storage:\n  durability: maybe\n").contains("durability"));
        assert!(error_of("ipc:\n  max_frame_size: 10\n").contains("ipc.max_frame_size"));
        assert!(error_of("rocksdb:\n  compression: brotli\n").contains("compression"));
        assert!(
            error_of("grpc:\n  listen: 0.0.0.0:50052\n  insecure: true\n")
                .contains("grpc.insecure")
        );
        assert!(error_of("grpc:\n  tls: null\n").contains("grpc.tls"));
    }
}
