//! Expiry: the compaction filters that drop expired records as RocksDB compacts them, and the
//! retention pass ([`crate::retention`]) that drops expired jobs' ranges and the jobs over the
//! size cap, and compacts what it dropped.

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use joblet_daemon::lock;
use joblet_ipc::now_ns;
use joblet_proto::ipc::JobRecord;
use joblet_proto::persist::JobSummary;
use prost::Message;
use rocksdb::WriteBatch;
use rocksdb::compaction_filter::Decision;

use super::{CF_JOBS, CF_LOGS, CF_METRICS, CF_SUMMARIES, Store, StoreError, directory_bytes};
use crate::config::Retention;
use crate::keys;
use crate::metrics as m;
use crate::retention::{CAP_TARGET_PERCENT, Dropped, Policy};

impl Store {
    /// Bytes of log content ingested since start.
    pub fn ingested_bytes(&self) -> u64 {
        self.ingested.load(Ordering::Relaxed)
    }

    /// One retention pass (see [`crate::retention`]): drops the jobs whose newest record is
    /// older than retention, the log or metric range of a job whose newest line or sample is,
    /// then (with a size cap) the jobs with the oldest newest-record while `data_dir` is over
    /// the cap, and compacts every dropped range. Blocking.
    pub fn enforce_retention(&self, data_dir: &Path) -> Result<Dropped, StoreError> {
        let (logs, metrics) = (self.policy.logs(), self.policy.metrics());
        let cutoffs = [oldest_kept_ns(logs), oldest_kept_ns(metrics)];
        let whole_cutoff = oldest_kept_ns(longest(logs, metrics));
        let mut summaries: Vec<JobSummary> = lock(&self.durable).values().cloned().collect();
        summaries.sort_by(|a, b| a.job_id.cmp(&b.job_id));
        let mut dropped = Dropped::default();
        // Per column family (logs, metrics): which jobs' ranges were dropped.
        let mut cleared: [HashSet<String>; 2] = Default::default();
        let mut gone = HashSet::new();
        for summary in &summaries {
            if summary.last_timestamp < whole_cutoff {
                if self.delete_job(&summary.job_id)? {
                    dropped.expired_jobs += 1;
                    dropped.expired_bytes += summary.log_bytes;
                }
                gone.insert(summary.job_id.clone());
                continue;
            }
            for (kind, cf_name) in [CF_LOGS, CF_METRICS].into_iter().enumerate() {
                if self.drop_kind_if_expired(&summary.job_id, cf_name, cutoffs[kind])? {
                    cleared[kind].insert(summary.job_id.clone());
                }
            }
        }
        if !gone.is_empty() {
            metrics::counter!(m::RETENTION_EVICTED_JOBS, "reason" => "retention")
                .increment(dropped.expired_jobs);
            metrics::counter!(m::RETENTION_EVICTED_BYTES, "reason" => "retention")
                .increment(dropped.expired_bytes);
        }
        for set in &mut cleared {
            set.extend(gone.iter().cloned());
        }
        self.compact_dropped(&summaries, &cleared)?;

        let Some(cap) = self.policy.max_bytes() else {
            return Ok(dropped);
        };
        let used = directory_bytes(data_dir);
        if used <= cap {
            return Ok(dropped);
        }
        // What each job takes on disk, estimated from its share of the raw bytes.
        let mut alive: Vec<&JobSummary> = summaries
            .iter()
            .filter(|s| !gone.contains(&s.job_id))
            .collect();
        let raw = |s: &JobSummary| s.log_bytes + s.metric_samples * 64 + 512;
        let total_raw: u64 = alive.iter().map(|s| raw(s)).sum::<u64>().max(1);
        let on_disk_per_raw = used as f64 / total_raw as f64;
        let mut to_free = used - cap * CAP_TARGET_PERCENT / 100;
        alive.sort_by_key(|s| s.last_timestamp);
        let mut capped = HashSet::new();
        for summary in alive {
            if to_free == 0 {
                break;
            }
            let estimate = (raw(summary) as f64 * on_disk_per_raw) as u64;
            if self.delete_job(&summary.job_id)? {
                tracing::warn!(
                    job_id = %summary.job_id,
                    bytes = estimate,
                    cap,
                    used,
                    "retention.max_bytes: the job with the oldest data is dropped"
                );
                metrics::counter!(m::RETENTION_EVICTED_JOBS, "reason" => "max_bytes").increment(1);
                metrics::counter!(m::RETENTION_EVICTED_BYTES, "reason" => "max_bytes")
                    .increment(summary.log_bytes);
                dropped.capped_jobs += 1;
                dropped.capped_bytes += summary.log_bytes;
            }
            capped.insert(summary.job_id.clone());
            to_free = to_free.saturating_sub(estimate.max(1));
        }
        self.compact_dropped(&summaries, &[capped.clone(), capped])?;
        Ok(dropped)
    }

    /// Drops the `cf_name` range of `job_id` if its newest record there is older than `cutoff`
    /// (under the ingest locks, so that no line arriving meanwhile goes with it). Returns
    /// whether it did.
    fn drop_kind_if_expired(
        &self,
        job_id: &str,
        cf_name: &'static str,
        cutoff: i64,
    ) -> Result<bool, StoreError> {
        if cutoff == i64::MIN {
            return Ok(false);
        }
        let cf = self.cf(cf_name)?;
        let (start, end) = (keys::job_start(job_id), keys::job_end(job_id));
        let _pending = lock(&self.pending);
        let _commit = lock(&self.commit);
        let mut iter = self.db.raw_iterator_cf(cf);
        iter.seek_for_prev(&end);
        let newest = iter
            .key()
            .filter(|key| key.starts_with(&start))
            .and_then(keys::timestamp_of);
        iter.status()?;
        match newest {
            Some(timestamp) if timestamp < cutoff => {
                let mut write = WriteBatch::default();
                write.delete_range_cf(cf, &start, &end);
                self.db.write_opt(write, &self.write_options)?;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    /// Compacts the key ranges of the jobs in `dropped` (per logs, metrics), merging neighbours
    /// (in key order, among `all` jobs) into one range, so that their files are rewritten or
    /// deleted now rather than at the next periodic compaction.
    fn compact_dropped(
        &self,
        all: &[JobSummary],
        dropped: &[HashSet<String>; 2],
    ) -> Result<(), StoreError> {
        for (kind, cf_name) in [CF_LOGS, CF_METRICS].into_iter().enumerate() {
            if dropped[kind].is_empty() {
                continue;
            }
            let cf = self.cf(cf_name)?;
            let mut run: Option<(&str, &str)> = None;
            let compact = |(first, last): (&str, &str)| {
                self.db.compact_range_cf(
                    cf,
                    Some(keys::job_start(first)),
                    Some(keys::job_end(last)),
                );
            };
            // `all` is sorted by job id, which is key order.
            for summary in all {
                let id = summary.job_id.as_str();
                if dropped[kind].contains(id) {
                    run = Some(run.map_or((id, id), |(first, _)| (first, id)));
                } else if let Some(span) = run.take() {
                    compact(span);
                }
            }
            if let Some(span) = run {
                compact(span);
            }
        }
        // The WAL files that held the dropped records go only once every column family's
        // memtable that shares them is flushed.
        self.flush()
    }
}

/// The oldest timestamp still inside `retention` (i64::MIN when kept forever).
pub(super) fn oldest_kept_ns(retention: Retention) -> i64 {
    match retention.0 {
        None => i64::MIN,
        Some(period) => now_ns().saturating_sub(period.as_nanos().min(i64::MAX as u128) as i64),
    }
}

pub(super) fn longest(a: Retention, b: Retention) -> Retention {
    match (a.0, b.0) {
        (Some(a), Some(b)) => Retention(Some(a.max(b))),
        _ => Retention(None),
    }
}

pub(super) fn record_filter(
    policy: Arc<Policy>,
    retention: fn(&Policy) -> Retention,
    cf: &'static str,
) -> impl FnMut(u32, &[u8], &[u8]) -> Decision + Send + 'static {
    let expired = metrics::counter!(m::RETENTION_EXPIRED, "cf" => cf);
    move |_level, key, _value| {
        let retention = retention(&policy);
        if retention.0.is_none() {
            return Decision::Keep;
        }
        match keys::timestamp_of(key) {
            Some(timestamp) if timestamp < oldest_kept_ns(retention) => {
                expired.increment(1);
                Decision::Remove
            }
            _ => Decision::Keep,
        }
    }
}

pub(super) fn job_record_filter(
    policy: Arc<Policy>,
) -> impl FnMut(u32, &[u8], &[u8]) -> Decision + Send + 'static {
    let expired = metrics::counter!(m::RETENTION_EXPIRED, "cf" => CF_JOBS);
    move |_level, _key, value| {
        let retention = policy.logs();
        if retention.0.is_none() {
            return Decision::Keep;
        }
        match JobRecord::decode(value) {
            Ok(record) if record.updated < oldest_kept_ns(retention) => {
                expired.increment(1);
                Decision::Remove
            }
            _ => Decision::Keep,
        }
    }
}

pub(super) fn summary_filter(
    policy: Arc<Policy>,
) -> impl FnMut(u32, &[u8], &[u8]) -> Decision + Send + 'static {
    let expired = metrics::counter!(m::RETENTION_EXPIRED, "cf" => CF_SUMMARIES);
    move |_level, _key, value| {
        let retention = longest(policy.logs(), policy.metrics());
        if retention.0.is_none() {
            return Decision::Keep;
        }
        match JobSummary::decode(value) {
            Ok(summary) if summary.last_timestamp < oldest_kept_ns(retention) => {
                expired.increment(1);
                Decision::Remove
            }
            _ => Decision::Keep,
        }
    }
}
