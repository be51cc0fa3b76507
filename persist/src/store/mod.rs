//! The RocksDB store: three column families and what may be done with them.
//!
//! - `logs`: key (job_id, timestamp, sequence) → stream byte ‖ content bytes, or a gap marker
//!   (lines lost at that place, and why: see `value.rs`).
//! - `metrics`: key (job_id, timestamp, sequence) → `joblet.ipc.MetricData` bytes, or for a
//!   minute older than `retention.metrics_full_resolution`, 0 ‖ `MetricRollup` (see
//!   `downsample.rs`).
//! - `summaries`: job_id → `joblet.persist.JobSummary` (first/last timestamp, counts, bytes,
//!   highest stored sequence per kind), written in the same atomic batch as the records.
//! - `jobs`: job_id → `joblet.ipc.JobRecord`, the catalogue: the newest version of the job's
//!   record core replicated (the summary holds its version), kept under the logs' retention
//!   counted from the record's last update.
//!
//! Invariants:
//! - Writes are idempotent: a record is identified by its key; one that is already stored is
//!   skipped (and not counted twice in the summary).
//! - Retention is enforced by compaction filters on each column family, relative to a record's
//!   own timestamp, and by [`Store::enforce_retention`], which drops whole expired key ranges
//!   and compacts them at once (see [`crate::retention`]); reads clamp their time range to the
//!   retention window so expired records are never returned even before they are removed. The
//!   periods are read from the shared [`Policy`] at each use, so a reload applies at once.
//! - Ingest is pipelined in two steps, each serialised by its own lock, taken in this order:
//!   `pending` (prepare: dedup decisions, the write batch, the summaries it leads to) and
//!   `commit` (the RocksDB write). A batch takes `commit` before it releases `pending`, so
//!   batches are written in the order they were prepared, and the next batch is prepared
//!   while this one is written. With durability `sync` the WAL is fsynced after `commit` is
//!   released, so the next batch is written while this one's fsync runs; `ingest` returns (and
//!   the batch is acknowledged) only after that fsync. Queries see `durable` summaries only,
//!   updated after the write: a summary never claims lines that are not yet stored (readable;
//!   they are on disk once their batch is acknowledged).
//!
//! Layout: this module opens the store and holds the catalogue (summaries, records, deletion);
//! `ingest.rs` the ingest pipeline, `scan.rs` the scans, `expiry.rs` the compaction filters and the
//! retention pass, `downsample.rs` the 1-minute rollups of older metric samples.

mod downsample;
mod expiry;
mod ingest;
mod scan;
mod value;

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use joblet_ipc::MetricData;
use joblet_proto::ipc::JobRecord;
use joblet_proto::persist::JobSummary;
use prost::Message;
use rocksdb::{
    BlockBasedOptions, Cache, ColumnFamilyDescriptor, DB, DBCompressionType, Options, WriteBatch,
    WriteOptions,
};

use crate::config::{Compression, Config, Durability, RocksDbConfig};
use crate::keys;
use crate::retention::Policy;
use joblet_daemon::lock;
use tokio::sync::watch;

pub use downsample::{Downsampled, MINUTE_NS, MetricValue};
use expiry::{job_record_filter, longest, oldest_kept_ns, record_filter, summary_filter};
pub use value::Gap;

pub const CF_LOGS: &str = "logs";
pub const CF_METRICS: &str = "metrics";
pub const CF_SUMMARIES: &str = "summaries";
pub const CF_JOBS: &str = "jobs";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("no job matches {0:?}")]
    NotFound(String),
    #[error("job id prefix {prefix:?} matches {count} jobs; give more characters")]
    Ambiguous { prefix: String, count: usize },
    #[error("{field}: {message}")]
    InvalidArgument {
        field: &'static str,
        message: String,
    },
    #[error("rocksdb: {0}")]
    Rocks(#[from] rocksdb::Error),
    #[error("column family {0} is missing")]
    MissingColumnFamily(&'static str),
    #[error("an earlier write failed; this batch was prepared on top of it and is refused")]
    Aborted,
}

/// What a catalogue listing selects: jobs whose id starts with `prefix`, created in
/// `[since, until)` (Unix ns), with one of `statuses` (any when empty; "UNKNOWN" is a job without
/// a record); at most `limit`, newest first.
#[derive(Debug, Clone, Default)]
pub struct CatalogueFilter {
    pub prefix: String,
    pub since: Option<i64>,
    pub until: Option<i64>,
    pub statuses: Vec<String>,
    pub limit: Option<usize>,
}

/// Stream selector of a log query.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamFilter {
    Both,
    Stdout,
    Stderr,
}

/// What a log or metric scan selects. Time bounds: `start` inclusive, `end` exclusive, Unix ns.
#[derive(Debug, Clone, Default)]
pub struct Selection {
    pub job_id: String,
    pub start: Option<i64>,
    pub end: Option<i64>,
    pub after_sequence: u64,
    pub offset: usize,
    pub limit: Option<usize>,
    /// Only the newest N matching records, still delivered oldest first.
    pub tail: Option<usize>,
    /// Forward scans: start strictly after this (timestamp, sequence), where an earlier scan
    /// of the same selection stopped.
    pub resume_after: Option<(i64, u64)>,
    /// Forward scans: stop after examining this many records (matching or not); the scan then
    /// returns the (timestamp, sequence) of the last one, to resume after.
    pub examine_at_most: Option<usize>,
}

/// A stored log line, its content borrowed from the store.
#[derive(Debug, Clone, Copy)]
pub struct LogRecord<'a> {
    pub stream: joblet_ipc::Stream,
    pub timestamp: i64,
    pub sequence: u64,
    pub content: &'a [u8],
    /// No newline followed the content (a piece of a longer line, or a stream's unterminated
    /// end).
    pub partial: bool,
    /// For a gap marker: the lines lost at this place (content is empty).
    pub gap: Option<Gap<'a>>,
}

/// A stored sample, or a minute of samples downsampled (`rollup`; `sample` then holds the
/// averages).
#[derive(Debug, Clone)]
pub struct MetricRecord {
    pub timestamp: i64,
    pub sequence: u64,
    pub sample: MetricData,
    pub rollup: Option<joblet_proto::persist::MetricRollup>,
}

/// How one ingest batch went.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct IngestOutcome {
    pub lines: u64,
    pub samples: u64,
    pub records: u64,
    pub duplicates: u64,
    /// Lines the gap markers stored stand for.
    pub lost_lines: u64,
    /// Messages that could not be read (a log line's place then holds a gap marker).
    pub refused: Vec<joblet_ipc::Refusal>,
    /// Bytes of log content stored.
    pub bytes: u64,
}

/// Flushes with durability `flushed`: numbered as they start.
#[derive(Default)]
struct Flushes {
    started: AtomicU64,
    done: watch::Sender<Flushed>,
    /// Something was written since the last flush started.
    unflushed: AtomicBool,
}

/// The last flush that completed and the last that failed (0: none), with why it failed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Flushed {
    pub completed: u64,
    pub failed: u64,
    pub failure: Option<Arc<str>>,
}

impl Flushed {
    /// Whether what [`Store::durable_after`] numbered `target` is durable (`Some(Ok)`), can
    /// no longer become durable this way (`Some(Err(why))`: that flush failed; the sender
    /// sends it again), or is still waiting (`None`).
    pub fn settles(&self, target: u64) -> Option<Result<(), Arc<str>>> {
        if self.completed >= target {
            Some(Ok(()))
        } else if self.failed >= target {
            Some(Err(self
                .failure
                .clone()
                .unwrap_or_else(|| "unknown".into())))
        } else {
            None
        }
    }
}

pub struct Store {
    db: DB,
    /// The configured durability as RocksDB write options: what `delete_job` writes with.
    write_options: WriteOptions,
    /// What ingest writes with: never synced itself; with `sync_after_write` the WAL is synced
    /// after the write, outside the commit lock.
    ingest_options: WriteOptions,
    sync_after_write: bool,
    /// Durability `flushed`: nothing is durable before a flush; see [`Flushes`].
    flushes: Option<Flushes>,
    /// Retention periods and size cap in force, shared with the compaction filters.
    policy: Arc<Policy>,
    /// Bytes of log content ingested since start (the size cap's trigger).
    ingested: AtomicU64,
    /// Summaries including batches prepared but perhaps not yet written; the prepare lock.
    pending: Mutex<HashMap<String, JobSummary>>,
    /// The write lock, taken while `pending` is held.
    commit: Mutex<()>,
    /// Summaries of what is stored, for queries.
    durable: Mutex<HashMap<String, JobSummary>>,
    /// A write failed: `pending` counts a batch that was not stored. Batches prepared on top of
    /// it are refused (their sender sends them again), and the next one starts from `durable`.
    resync: AtomicBool,
}

impl Store {
    pub fn open(config: &Config) -> Result<Store, StoreError> {
        let path = &config.data_dir;
        let cache = Cache::new_lru_cache(config.rocksdb.block_cache_size.as_u64() as usize);
        let mut table = BlockBasedOptions::default();
        table.set_block_cache(&cache);
        table.set_bloom_filter(10.0, false);
        table.set_block_size(config.rocksdb.block_size.as_u64() as usize);

        let base = |name: &'static str| {
            let mut options = Options::default();
            options.set_block_based_table_factory(&table);
            options.set_write_buffer_size(config.rocksdb.write_buffer_size.as_u64() as usize);
            set_compression(&mut options, &config.rocksdb);
            // Files are revisited at least daily, so retention removes data from idle
            // column families too.
            options.set_periodic_compaction_seconds(86_400);
            (name, options)
        };
        let policy = Policy::new(&config.retention);
        let (logs_name, mut logs) = base(CF_LOGS);
        // No bloom filter in the bottom level, where nearly all records are: point lookups
        // only check replayed records, which are mostly there (a filter costs 1.25 B a line).
        logs.set_optimize_filters_for_hits(true);
        logs.set_compaction_filter(
            "joblet-log-retention",
            record_filter(policy.clone(), Policy::logs, CF_LOGS),
        );
        let (metrics_name, mut metrics) = base(CF_METRICS);
        metrics.set_optimize_filters_for_hits(true);
        metrics.set_compaction_filter(
            "joblet-metric-retention",
            record_filter(policy.clone(), Policy::metrics, CF_METRICS),
        );
        let (jobs_name, mut jobs) = base(CF_JOBS);
        jobs.set_compaction_filter(
            "joblet-job-record-retention",
            job_record_filter(policy.clone()),
        );
        let (summaries_name, mut summaries) = base(CF_SUMMARIES);
        summaries.set_compaction_filter("joblet-summary-retention", summary_filter(policy.clone()));

        let mut db_options = Options::default();
        db_options.create_if_missing(true);
        db_options.create_missing_column_families(true);
        db_options.increase_parallelism(2);
        db_options.set_use_direct_io_for_flush_and_compaction(config.rocksdb.direct_io);
        db_options.set_use_direct_reads(config.rocksdb.direct_io);
        // RocksDB's own info log must not fill the disk either: a few small files.
        db_options.set_keep_log_file_num(4);
        db_options.set_max_log_file_size(8 << 20);
        let flushed = config.storage.durability == Durability::Flushed;
        // Without a WAL, column families are consistent with each other (a job's lines with
        // its summary) only if they are flushed together.
        db_options.set_atomic_flush(flushed);
        let db = DB::open_cf_descriptors(
            &db_options,
            path,
            [
                ColumnFamilyDescriptor::new(logs_name, logs),
                ColumnFamilyDescriptor::new(metrics_name, metrics),
                ColumnFamilyDescriptor::new(summaries_name, summaries),
                ColumnFamilyDescriptor::new(jobs_name, jobs),
            ],
        )?;
        let sync = config.storage.durability == Durability::Sync;
        let mut write_options = WriteOptions::default();
        write_options.set_sync(sync);
        write_options.disable_wal(flushed);
        let mut ingest_options = WriteOptions::default();
        ingest_options.disable_wal(flushed);

        let store = Store {
            db,
            write_options,
            ingest_options,
            sync_after_write: sync,
            flushes: flushed.then(Flushes::default),
            policy,
            ingested: AtomicU64::new(0),
            pending: Mutex::new(HashMap::new()),
            commit: Mutex::new(()),
            durable: Mutex::new(HashMap::new()),
            resync: AtomicBool::new(false),
        };
        store.load_summaries()?;
        Ok(store)
    }

    fn cf(&self, name: &'static str) -> Result<&rocksdb::ColumnFamily, StoreError> {
        self.db
            .cf_handle(name)
            .ok_or(StoreError::MissingColumnFamily(name))
    }

    fn load_summaries(&self) -> Result<(), StoreError> {
        let mut loaded = HashMap::new();
        let mut iter = self.db.raw_iterator_cf(self.cf(CF_SUMMARIES)?);
        iter.seek_to_first();
        while iter.valid() {
            if let (Some(key), Some(value)) = (iter.key(), iter.value()) {
                match (std::str::from_utf8(key), JobSummary::decode(value)) {
                    (Ok(job_id), Ok(summary)) => {
                        loaded.insert(job_id.to_owned(), summary);
                    }
                    _ => tracing::warn!("skipping an unreadable job summary"),
                }
            }
            iter.next();
        }
        iter.status()?;
        tracing::info!(jobs = loaded.len(), "loaded job summaries");
        *lock(&self.pending) = loaded.clone();
        *lock(&self.durable) = loaded;
        Ok(())
    }

    /// The database itself, for benchmarks that compare against raw RocksDB with the same
    /// options. Everything else goes through the methods above.
    pub fn raw_db(&self) -> &DB {
        &self.db
    }

    /// The write options ingest uses (sync or not, per the durability policy).
    pub fn write_options(&self) -> &WriteOptions {
        &self.write_options
    }

    /// With durability `flushed`: the flush after which what was written so far is durable
    /// (see [`Store::flushed`]); `None` when writes are durable as they are made.
    pub fn durable_after(&self) -> Option<u64> {
        let flushes = self.flushes.as_ref()?;
        flushes.unflushed.store(true, Ordering::SeqCst);
        // A flush that starts after this read includes every write that returned before it.
        Some(flushes.started.load(Ordering::SeqCst) + 1)
    }

    /// With durability `flushed`: the last completed and failed flushes, as they change.
    pub fn flushed(&self) -> Option<watch::Receiver<Flushed>> {
        self.flushes
            .as_ref()
            .map(|flushes| flushes.done.subscribe())
    }

    /// With durability `flushed`, if anything was written since the last flush: flushes every
    /// column family (atomically) to SST files, which makes it durable. Returns whether it
    /// flushed.
    pub fn flush_written(&self) -> Result<bool, StoreError> {
        let Some(flushes) = &self.flushes else {
            return Ok(false);
        };
        if !flushes.unflushed.swap(false, Ordering::SeqCst) {
            return Ok(false);
        }
        let number = flushes.started.fetch_add(1, Ordering::SeqCst) + 1;
        let names = [CF_LOGS, CF_METRICS, CF_SUMMARIES, CF_JOBS];
        let cfs = names
            .iter()
            .map(|name| self.cf(name))
            .collect::<Result<Vec<_>, _>>()?;
        let mut options = rocksdb::FlushOptions::default();
        options.set_wait(true);
        let flushed = self.db.flush_cfs_opt(&cfs, &options);
        flushes.done.send_modify(|done| match &flushed {
            Ok(()) => done.completed = done.completed.max(number),
            // What waited for this flush is not acknowledged: its connection closes and the
            // sender sends it again, as when a write fails (a full disk, for one), and is
            // told why.
            Err(error) => {
                done.failed = done.failed.max(number);
                done.failure = Some(StoreError::from(error.clone()).to_string().into());
            }
        });
        flushed?;
        Ok(true)
    }

    /// With durability `flushed`: makes everything written so far durable now (a flush).
    pub fn make_durable(&self) -> Result<(), StoreError> {
        self.durable_after();
        self.flush_written().map(drop)
    }

    /// Syncs the write-ahead log to disk (durability `wal` does this periodically).
    pub fn sync_wal(&self) -> Result<(), StoreError> {
        Ok(self.db.flush_wal(true)?)
    }

    /// Resolves a full job id or a unique prefix of one.
    pub fn resolve_job(&self, id_or_prefix: &str) -> Result<String, StoreError> {
        if id_or_prefix.is_empty() {
            return Err(StoreError::InvalidArgument {
                field: "job_id",
                message: "must not be empty".into(),
            });
        }
        let summaries = lock(&self.durable);
        if summaries.contains_key(id_or_prefix) {
            return Ok(id_or_prefix.to_owned());
        }
        let matches: Vec<&String> = summaries
            .keys()
            .filter(|id| id.starts_with(id_or_prefix))
            .take(2)
            .collect();
        match matches.as_slice() {
            [] => Err(StoreError::NotFound(echoed(id_or_prefix))),
            [only] => Ok((*only).clone()),
            _ => Err(StoreError::Ambiguous {
                prefix: echoed(id_or_prefix),
                count: summaries
                    .keys()
                    .filter(|id| id.starts_with(id_or_prefix))
                    .count(),
            }),
        }
    }

    /// Summaries of stored jobs whose id starts with `prefix`, ordered by id.
    pub fn list_jobs(&self, prefix: &str) -> Vec<JobSummary> {
        let oldest_kept = oldest_kept_ns(longest(self.policy.logs(), self.policy.metrics()));
        let mut jobs: Vec<JobSummary> = lock(&self.durable)
            .values()
            .filter(|s| s.job_id.starts_with(prefix) && s.last_timestamp >= oldest_kept)
            .cloned()
            .collect();
        jobs.sort_by(|a, b| a.job_id.cmp(&b.job_id));
        jobs
    }

    /// The catalogue: summaries with their job records, filtered by `filter`. Newest first
    /// (by creation; a job without a record counts as created at its first line) when a limit
    /// is set, else ordered by id.
    pub fn list_catalogue(&self, filter: &CatalogueFilter) -> Result<Vec<JobSummary>, StoreError> {
        let jobs_cf = self.cf(CF_JOBS)?;
        let mut listed = Vec::new();
        for mut summary in self.list_jobs(&filter.prefix) {
            if summary.last_record_sequence > 0
                && let Some(value) = self.db.get_pinned_cf(jobs_cf, summary.job_id.as_bytes())?
            {
                summary.record = JobRecord::decode(value.as_ref()).ok();
            }
            let (created, status) = (summary.created(), summary.status());
            let wanted = filter.since.is_none_or(|since| created >= since)
                && filter.until.is_none_or(|until| created < until)
                && (filter.statuses.is_empty()
                    || filter
                        .statuses
                        .iter()
                        .any(|s| s.eq_ignore_ascii_case(status)));
            if wanted {
                listed.push((created, summary));
            }
        }
        if let Some(limit) = filter.limit {
            listed.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.job_id.cmp(&b.1.job_id)));
            listed.truncate(limit);
        }
        Ok(listed.into_iter().map(|(_, summary)| summary).collect())
    }

    pub fn policy(&self) -> &Arc<Policy> {
        &self.policy
    }

    /// Removes every record and the summary of `job_id`; returns whether it had any.
    pub fn delete_job(&self, job_id: &str) -> Result<bool, StoreError> {
        let mut pending = lock(&self.pending);
        let _commit = lock(&self.commit);
        let existed = lock(&self.durable).contains_key(job_id);
        let mut write = WriteBatch::default();
        let (start, end) = (keys::job_start(job_id), keys::job_end(job_id));
        write.delete_range_cf(self.cf(CF_LOGS)?, &start, &end);
        write.delete_range_cf(self.cf(CF_METRICS)?, &start, &end);
        write.delete_cf(self.cf(CF_SUMMARIES)?, job_id.as_bytes());
        write.delete_cf(self.cf(CF_JOBS)?, job_id.as_bytes());
        self.db.write_opt(write, &self.write_options)?;
        pending.remove(job_id);
        lock(&self.durable).remove(job_id);
        drop((pending, _commit));
        // Without a WAL a delete is durable once flushed: before it is answered.
        self.make_durable()?;
        Ok(existed)
    }

    /// Compacts every column family now (retention filters run during compaction).
    pub fn compact(&self) -> Result<(), StoreError> {
        for name in [CF_LOGS, CF_METRICS, CF_SUMMARIES, CF_JOBS] {
            self.db
                .compact_range_cf(self.cf(name)?, None::<&[u8]>, None::<&[u8]>);
        }
        Ok(())
    }

    /// Memory held by index and filter blocks across column families.
    pub fn index_bytes(&self) -> u64 {
        [CF_LOGS, CF_METRICS, CF_SUMMARIES, CF_JOBS]
            .into_iter()
            .filter_map(|name| self.cf(name).ok())
            .filter_map(|cf| {
                self.db
                    .property_int_value_cf(cf, rocksdb::properties::ESTIMATE_TABLE_READERS_MEM)
                    .ok()
                    .flatten()
            })
            .sum()
    }

    /// Flushes memtables so that a clean shutdown leaves no WAL to replay.
    pub fn flush(&self) -> Result<(), StoreError> {
        self.flush_written()?;
        self.db.flush_wal(true)?;
        for name in [CF_LOGS, CF_METRICS, CF_SUMMARIES, CF_JOBS] {
            self.db.flush_cf(self.cf(name)?)?;
        }
        Ok(())
    }
}

/// Recent levels one way, the bottom level (older data, nearly all of it) another; zstd with
/// its level and, at the bottom, a dictionary trained per file.
fn set_compression(options: &mut Options, config: &RocksDbConfig) {
    let kind = |compression| match compression {
        Compression::None => DBCompressionType::None,
        Compression::Lz4 => DBCompressionType::Lz4,
        Compression::Zstd => DBCompressionType::Zstd,
    };
    // -14 is RocksDB's "default window bits"; strategy 0 is zstd's default. The level only
    // where zstd uses it: LZ4 given a level of 6 compressed at a third of the ingest rate.
    options.set_compression_type(kind(config.compression));
    if config.compression == Compression::Zstd {
        options.set_compression_options(-14, config.zstd_level, 0, 0);
    }
    options.set_bottommost_compression_type(kind(config.bottommost_compression));
    // The level and a dictionary per bottom-level file serve LZ4 there as well as zstd: the
    // storage bench measured LZ4 at the bottom at 34 B a line of an access log with both, 45
    // with the dictionary alone and 54 with neither.
    let dictionary = config.zstd_dictionary_size.as_u64() as i32;
    options.set_bottommost_compression_options(-14, config.zstd_level, 0, dictionary, true);
    options.set_bottommost_zstd_max_train_bytes(dictionary * 100, true);
}

/// Input echoed in an error, cut to 64 characters (a 100 KB id must not make the reply too
/// large to send), as core does.
fn echoed(input: &str) -> String {
    const MAX_ECHOED_CHARS: usize = 64;
    match input.char_indices().nth(MAX_ECHOED_CHARS) {
        Some((end, _)) => format!("{}…", &input[..end]),
        None => input.to_owned(),
    }
}

/// Bytes used by all files under `dir`.
pub fn directory_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let metadata = entry.metadata().ok()?;
            Some(if metadata.is_dir() {
                directory_bytes(&entry.path())
            } else {
                metadata.len()
            })
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, Retention};
    use downsample::floor_minute;
    use joblet_ipc::{Batch, Stream, log_message, now_ns};
    use std::ops::ControlFlow;
    use std::time::Duration;

    const HOUR_NS: i64 = 3600 * 1_000_000_000;

    fn config(dir: &Path, logs: Retention) -> Config {
        let mut config = Config {
            data_dir: dir.to_owned(),
            ..Default::default()
        };
        config.retention.logs = logs;
        config.storage.durability = Durability::Wal;
        config
    }

    /// Ingests `messages` as the receiver would hand them over.
    fn ingest(store: &Store, messages: &[joblet_ipc::IpcMessage]) -> IngestOutcome {
        store.ingest(&Batch::from_messages(messages)).unwrap()
    }

    fn count_all(store: &Store, job: &str) -> usize {
        let mut count = 0;
        store
            .scan_logs(
                &Selection {
                    job_id: job.to_owned(),
                    ..Default::default()
                },
                StreamFilter::Both,
                b"",
                |_| {
                    count += 1;
                    ControlFlow::Continue(())
                },
            )
            .unwrap();
        count
    }

    /// Three lines two hours old and two fresh ones, in a store keeping logs for one hour.
    fn store_with_old_and_new_lines(dir: &Path) -> Store {
        let store = Store::open(&config(dir, Retention(Some(Duration::from_secs(3600))))).unwrap();
        let old = now_ns() - 2 * HOUR_NS;
        let batch: Vec<_> = (1..=3)
            .map(|s| log_message("job", s, old + s as i64, Stream::Stdout, "old".into()))
            .chain((4..=5).map(|s| log_message("job", s, now_ns(), Stream::Stdout, "new".into())))
            .collect();
        ingest(&store, &batch);
        store.flush().unwrap();
        store
    }

    #[test]
    fn compaction_removes_expired_records_for_good() {
        let dir = tempfile::tempdir().unwrap();
        let store = store_with_old_and_new_lines(dir.path());
        assert_eq!(
            count_all(&store, "job"),
            2,
            "expired lines are hidden at once"
        );
        store.compact().unwrap();
        drop(store);
        // Reopened with retention off, only what compaction kept is there.
        let store = Store::open(&config(dir.path(), Retention(None))).unwrap();
        assert_eq!(count_all(&store, "job"), 2);
    }

    #[test]
    fn without_compaction_expired_records_are_only_hidden() {
        // The control for the test above: the removal is RocksDB's doing, not the query's.
        let dir = tempfile::tempdir().unwrap();
        drop(store_with_old_and_new_lines(dir.path()));
        let store = Store::open(&config(dir.path(), Retention(None))).unwrap();
        assert_eq!(count_all(&store, "job"), 5);
    }

    #[test]
    fn downsampling_rolls_up_in_bounded_steps_and_loses_no_sample() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = config(dir.path(), Retention(None));
        config.retention.metrics_full_resolution = Retention(Some(Duration::from_secs(3600)));
        let store = Store::open(&config).unwrap();
        // 50,000 samples 100 ms apart, three hours ago: 84 minutes, more than one step's worth.
        let start = floor_minute(now_ns() - 3 * HOUR_NS) + 123;
        let samples: Vec<_> = (1..=50_000u64)
            .map(|n| {
                let sample = MetricData {
                    cpu_percent: n as f64,
                    ..Default::default()
                };
                let at = start + (n as i64 - 1) * 100_000_000;
                joblet_ipc::metric_message("job", n, at, &sample)
            })
            .collect();
        for chunk in samples.chunks(8192) {
            ingest(&store, chunk);
        }
        let done = store.downsample_metrics().unwrap();
        assert_eq!((done.jobs, done.samples), (1, 50_000));
        let mut rollups = Vec::new();
        store
            .scan_metrics(
                &Selection {
                    job_id: "job".into(),
                    ..Default::default()
                },
                |record| {
                    rollups.push(record);
                    ControlFlow::Continue(())
                },
            )
            .unwrap();
        assert_eq!(rollups.len() as u64, done.rollups);
        assert_eq!(rollups.len(), 84, "one record a minute");
        let counted: u32 = rollups
            .iter()
            .map(|r| r.rollup.as_ref().unwrap().samples)
            .sum();
        assert_eq!(counted, 50_000);
        let cpu_sum: f64 = rollups
            .iter()
            .map(|r| r.rollup.as_ref().unwrap().sum.as_ref().unwrap().cpu_percent)
            .sum();
        assert_eq!(cpu_sum, (1..=50_000u64).sum::<u64>() as f64);
        assert!(
            rollups
                .windows(2)
                .all(|w| w[0].timestamp + MINUTE_NS == w[1].timestamp)
        );
        assert_eq!(rollups.last().unwrap().sequence, 50_000);
        // Nothing left to do, and the summary says where it got to; an hour later the job
        // is not even visited: nothing is written.
        assert_eq!(store.downsample_metrics().unwrap(), Downsampled::default());
        let written = store.raw_db().latest_sequence_number();
        let later = store.downsample_metrics_at(now_ns() + HOUR_NS).unwrap();
        assert_eq!(later, Downsampled::default());
        assert_eq!(store.raw_db().latest_sequence_number(), written);
        let summary = &store.list_jobs("job")[0];
        assert_eq!(summary.metric_samples, 50_000);
        assert!(summary.metrics_downsampled_before > rollups.last().unwrap().timestamp);
        assert_eq!(summary.metrics_late_from, None);
    }

    #[test]
    fn the_bottom_level_compresses_with_the_level_and_a_dictionary_whatever_the_algorithm() {
        let options_of = |bottommost: Compression| {
            let dir = tempfile::tempdir().unwrap();
            let mut config = config(dir.path(), Retention(None));
            config.rocksdb.bottommost_compression = bottommost;
            drop(Store::open(&config).unwrap());
            let file = std::fs::read_dir(dir.path())
                .unwrap()
                .filter_map(Result::ok)
                .find(|e| e.file_name().to_string_lossy().starts_with("OPTIONS-"))
                .expect("an OPTIONS file");
            std::fs::read_to_string(file.path()).unwrap()
        };
        // Both algorithms get the level and the dictionary at the bottom: measured, LZ4 packs
        // a quarter tighter with them.
        for (compression, name) in [
            (Compression::Zstd, "kZSTD"),
            (Compression::Lz4, "kLZ4Compression"),
        ] {
            let options = options_of(compression);
            assert!(
                options.contains(&format!("bottommost_compression={name}")),
                "{options}"
            );
            assert!(
                options.contains("enabled=true;max_dict_bytes=16384;")
                    && options.contains("zstd_max_train_bytes=1638400;level=6;"),
                "{options}"
            );
        }
    }

    #[test]
    fn with_direct_io_flushed_lines_are_stored_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let mut direct = config(dir.path(), Retention(None));
        direct.rocksdb.direct_io = true;
        let store = Store::open(&direct).unwrap();
        let batch: Vec<_> = (1..=1000)
            .map(|s| log_message("job", s, 1000 + s as i64, Stream::Stdout, "x".into()))
            .collect();
        ingest(&store, &batch);
        store.flush().unwrap();
        assert_eq!(count_all(&store, "job"), 1000);
        // RocksDB records the options it runs with.
        let options_file = std::fs::read_dir(dir.path())
            .unwrap()
            .filter_map(Result::ok)
            .find(|e| e.file_name().to_string_lossy().starts_with("OPTIONS-"))
            .expect("an OPTIONS file");
        let options = std::fs::read_to_string(options_file.path()).unwrap();
        for option in [
            "use_direct_io_for_flush_and_compaction=true",
            "use_direct_reads=true",
        ] {
            assert!(options.contains(option), "{option} in {options}");
        }
    }

    #[test]
    fn a_scan_resumed_where_its_budget_stopped_it_misses_and_repeats_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&config(dir.path(), Retention(None))).unwrap();
        // Same timestamp for runs of lines: resuming must go by (timestamp, sequence).
        let batch: Vec<_> = (1..=500u64)
            .map(|s| {
                let content = if s % 7 == 0 { "match" } else { "other" };
                log_message(
                    "job",
                    s,
                    1000 + (s / 10) as i64,
                    Stream::Stdout,
                    content.into(),
                )
            })
            .collect();
        ingest(&store, &batch);
        let mut selection = Selection {
            job_id: "job".into(),
            examine_at_most: Some(9),
            ..Default::default()
        };
        let mut seen = Vec::new();
        loop {
            let stopped = store
                .scan_logs(&selection, StreamFilter::Both, b"match", |record| {
                    seen.push(record.sequence);
                    ControlFlow::Continue(())
                })
                .unwrap();
            match stopped {
                Some(resume) => selection.resume_after = Some(resume),
                None => break,
            }
        }
        let expected: Vec<u64> = (1..=500).filter(|s| s % 7 == 0).collect();
        assert_eq!(seen, expected);
    }

    #[test]
    fn replays_are_stored_once_and_counted_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&config(dir.path(), Retention(None))).unwrap();
        let batch: Vec<_> = (1..=10)
            .map(|s| log_message("job", s, 1000 + s as i64, Stream::Stdout, "x".into()))
            .collect();
        assert_eq!(ingest(&store, &batch).lines, 10);
        let outcome = ingest(&store, &batch[4..]);
        assert_eq!((outcome.lines, outcome.duplicates), (0, 6));
        assert_eq!(count_all(&store, "job"), 10);
        assert_eq!(store.list_jobs("")[0].log_lines, 10);
    }

    #[test]
    fn lines_of_unknown_streams_are_refused_and_kept_as_gaps_not_as_another_stream() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&config(dir.path(), Retention(None))).unwrap();
        let with_stream = |sequence: u64, stream: i32| {
            let mut message = log_message("job", sequence, 1000, Stream::Stdout, "x".into());
            let data = joblet_ipc::LogData {
                stream,
                content: "x".into(),
                ..Default::default()
            };
            message.data = data.encode_to_vec().into();
            message
        };
        let batch = [with_stream(1, 2), with_stream(2, 7), with_stream(3, 258)];
        let outcome = ingest(&store, &batch);
        assert_eq!((outcome.lines, outcome.lost_lines), (1, 2));
        let refused: Vec<_> = outcome
            .refused
            .iter()
            .map(|r| (r.sequence, r.reason()))
            .collect();
        let bad = joblet_ipc::RefusalReason::BadPayload;
        assert_eq!(refused, [(2, bad), (3, bad)]);
        assert_eq!(store.list_jobs("")[0].lost_lines, 2);
        let mut streams = Vec::new();
        let all = Selection {
            job_id: "job".into(),
            ..Default::default()
        };
        store
            .scan_logs(&all, StreamFilter::Both, b"", |record| {
                streams.push((record.sequence, record.stream, record.gap.map(|g| g.lines)));
                ControlFlow::Continue(())
            })
            .unwrap();
        let unspecified = Stream::Unspecified;
        assert_eq!(
            streams,
            [
                (1, Stream::Stderr, None),
                (2, unspecified, Some(1)),
                (3, unspecified, Some(1))
            ]
        );
    }

    #[test]
    fn a_replay_inside_the_batch_it_repeats_is_stored_and_counted_once() {
        // After a reconnect core sends again from persist's last ack while earlier sends may
        // still be in flight: one batch can hold a line twice, or a gap and its fill.
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&config(dir.path(), Retention(None))).unwrap();
        let line = |s: u64| log_message("job", s, 1000 + s as i64, Stream::Stdout, "x".into());
        let batch: Vec<_> = [1, 2, 4, 5, 2, 3, 4, 3, 5, 6]
            .into_iter()
            .map(line)
            .collect();
        let outcome = ingest(&store, &batch);
        assert_eq!((outcome.lines, outcome.duplicates), (6, 4));
        assert_eq!(count_all(&store, "job"), 6);
        let summary = &store.list_jobs("")[0];
        assert_eq!((summary.log_lines, summary.last_log_sequence), (6, 6));
    }

    #[test]
    fn batches_ingested_concurrently_are_stored_once_and_summed_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let store = std::sync::Arc::new(Store::open(&config(dir.path(), Retention(None))).unwrap());
        // Two writers, as the receiver runs them: disjoint runs, then overlapping replays.
        let batches: Vec<Vec<_>> = (0..40u64)
            .map(|b| {
                let from = if b % 5 == 4 {
                    b * 100 - 150
                } else {
                    b * 100 + 1
                };
                (from..=b * 100 + 100)
                    .map(|s| log_message("job", s, 1000 + s as i64, Stream::Stdout, "x".into()))
                    .collect()
            })
            .collect();
        std::thread::scope(|scope| {
            for half in batches.chunks(20) {
                let store = &store;
                scope.spawn(move || {
                    for batch in half {
                        ingest(store, batch);
                    }
                });
            }
        });
        assert_eq!(count_all(&store, "job"), 4000);
        let summary = &store.list_jobs("")[0];
        assert_eq!((summary.log_lines, summary.last_log_sequence), (4000, 4000));
    }

    #[test]
    fn a_line_dropped_earlier_and_replayed_later_fills_its_gap() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&config(dir.path(), Retention(None))).unwrap();
        let line = |s: u64| log_message("job", s, 1000 + s as i64, Stream::Stdout, "x".into());
        ingest(&store, &[line(1), line(2), line(4)]);
        assert_eq!(ingest(&store, &[line(3)]).lines, 1);
        assert_eq!(count_all(&store, "job"), 4);
        assert_eq!(store.list_jobs("")[0].log_lines, 4);
    }
}
