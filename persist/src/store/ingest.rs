//! Ingest: a batch of replicated messages stored atomically and idempotently, pipelined in two
//! steps (see the store's module docs): prepare (dedup decisions, the write batch, the summaries
//! it leads to) under `pending`, write under `commit`.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::time::Instant;

use joblet_daemon::lock;
use joblet_ipc::{Batch, Envelope, MessageType, MetricData, Refusal, RefusalReason};
use joblet_proto::ipc::JobRecord;
use joblet_proto::persist::JobSummary;
use prost::Message;
use rocksdb::WriteBatch;

use super::value::{encode_gap, encode_line};
use super::{CF_JOBS, CF_LOGS, CF_METRICS, CF_SUMMARIES, IngestOutcome, Store, StoreError};
use crate::keys;
use crate::metrics as m;

impl Store {
    /// Stores a batch atomically and durably (per the configured durability). Records already
    /// stored are skipped; invalid payloads are skipped and counted. Two calls at a time
    /// overlap: one prepares while the other writes (see the module docs).
    pub fn ingest(&self, batch: &Batch) -> Result<IngestOutcome, StoreError> {
        let started = Instant::now();
        let cfs = [self.cf(CF_LOGS)?, self.cf(CF_METRICS)?];
        let summaries_cf = self.cf(CF_SUMMARIES)?;
        let jobs_cf = self.cf(CF_JOBS)?;
        let mut pending = lock(&self.pending);
        let mut commit = None;
        if self.resync.load(Ordering::Acquire) {
            commit = Some(lock(&self.commit));
            *pending = lock(&self.durable).clone();
            self.resync.store(false, Ordering::Release);
        }
        // The jobs of this batch, and where each is in `changed`.
        let mut changed: Vec<JobChanges> = Vec::new();
        let mut jobs: HashMap<&str, usize> = HashMap::new();
        // A record takes about what its frame took: sized once, the batch's buffer is not
        // grown (and copied) a dozen times over.
        let mut write = WriteBatch::with_capacity_bytes(batch.frame_bytes() + 4096);
        let mut outcome = IngestOutcome::default();
        let mut key = Vec::new();
        let mut value = Vec::new();
        // Messages come in runs of one job: its summary is looked up once per run. `None`
        // stands for a job id the keys cannot hold.
        let mut current: Option<(&str, Option<usize>)> = None;

        for message in batch.iter() {
            let job_id = message.job_id;
            let index = match current {
                Some((id, index)) if id == job_id => index,
                _ => {
                    let index = (!job_id.contains('\0')).then(|| {
                        *jobs.entry(job_id).or_insert_with(|| {
                            // A job whose messages all turn out invalid keeps first_timestamp ==
                            // i64::MAX and is not written.
                            changed.push(JobChanges {
                                summary: pending.get(job_id).cloned().unwrap_or_else(|| {
                                    JobSummary {
                                        job_id: job_id.to_owned(),
                                        first_timestamp: i64::MAX,
                                        last_timestamp: i64::MIN,
                                        ..Default::default()
                                    }
                                }),
                                new: [Vec::new(), Vec::new()],
                                replayed: HashSet::new(),
                            });
                            changed.len() - 1
                        })
                    });
                    current = Some((job_id, index));
                    index
                }
            };
            let Some(index) = index else {
                outcome.refuse(
                    &message,
                    RefusalReason::BadPayload,
                    "its job id holds a NUL byte",
                );
                continue;
            };
            let job = &mut changed[index];
            let kind = match message.kind() {
                MessageType::Log => Kind::Log,
                MessageType::Metric => Kind::Metric,
                // Only the newest version of a job's record is kept.
                MessageType::Job => {
                    let summary = &mut job.summary;
                    if message.sequence <= summary.last_record_sequence {
                        outcome.duplicates += 1;
                    } else if JobRecord::decode(message.data).is_err() {
                        let detail = "its payload does not decode as JobRecord";
                        outcome.refuse(&message, RefusalReason::BadPayload, detail);
                    } else {
                        write.put_cf(jobs_cf, job_id.as_bytes(), message.data);
                        summary.last_record_sequence = message.sequence;
                        summary.first_timestamp = summary.first_timestamp.min(message.timestamp);
                        summary.last_timestamp = summary.last_timestamp.max(message.timestamp);
                        outcome.records += 1;
                    }
                    continue;
                }
                MessageType::Unspecified => {
                    outcome.refuse(&message, RefusalReason::BadPayload, "unknown message type");
                    continue;
                }
            };
            let summary = &mut job.summary;
            let highest = kind.highest(summary);
            keys::encode_into(&mut key, job_id, message.timestamp, message.sequence);
            // A sequence above the highest stored one is new (the sender keeps each job's
            // order); only replays need looking up: earlier in this batch, or stored.
            let replay = message.sequence <= highest;
            let downsampled =
                kind == Kind::Metric && message.timestamp < summary.metrics_downsampled_before;
            if replay && downsampled {
                // Rolled up already (see `downsample.rs`): its key is gone, its minute counts it.
                outcome.duplicates += 1;
                continue;
            }
            if replay {
                if job.new[kind as usize]
                    .binary_search(&message.sequence)
                    .is_ok()
                    || job.replayed.contains(&(kind, message.sequence))
                {
                    outcome.duplicates += 1;
                    continue;
                }
                // What was prepared before must be written before it can be looked up.
                commit.get_or_insert_with(|| lock(&self.commit));
                if self.db.get_pinned_cf(cfs[kind as usize], &key)?.is_some() {
                    outcome.duplicates += 1;
                    continue;
                }
            }
            value.clear();
            if kind == Kind::Log {
                let payload = joblet_ipc::log_payload(message.data).ok();
                // The stream is stored in one byte: a value that is not a known stream would
                // be read back as another stream, or not at all.
                let stream = payload.and_then(|p| joblet_ipc::Stream::try_from(p.stream).ok());
                match (payload, stream) {
                    (Some(payload), Some(stream)) if payload.lost_lines == 0 => {
                        let content = payload.content;
                        encode_line(&mut value, stream, content, payload.partial);
                        summary.log_lines += 1;
                        summary.log_bytes += content.len() as u64;
                        outcome.bytes += content.len() as u64;
                        outcome.lines += 1;
                    }
                    (Some(payload), Some(stream)) => {
                        encode_gap(&mut value, stream, payload.lost_lines, payload.lost_reason);
                        summary.lost_lines += payload.lost_lines;
                        outcome.lost_lines += payload.lost_lines;
                    }
                    // A line that cannot be read is not dropped in silence: a gap marker
                    // takes its place, and the sender hears why.
                    _ => {
                        let detail = match payload {
                            Some(payload) => format!("unknown stream {}", payload.stream),
                            None => "its payload does not decode as LogData".to_owned(),
                        };
                        outcome.refuse(&message, RefusalReason::BadPayload, &detail);
                        encode_gap(&mut value, joblet_ipc::Stream::Unspecified, 1, &detail);
                        summary.lost_lines += 1;
                        outcome.lost_lines += 1;
                    }
                }
                summary.last_log_sequence = summary.last_log_sequence.max(message.sequence);
            } else {
                if MetricData::decode(message.data).is_err() {
                    let detail = "its payload does not decode as MetricData";
                    outcome.refuse(&message, RefusalReason::BadPayload, detail);
                    continue;
                }
                value.extend_from_slice(message.data);
                if downsampled {
                    // A new sample of a minute rolled up already: the next pass merges it.
                    let late = summary.metrics_late_from.unwrap_or(i64::MAX);
                    summary.metrics_late_from = Some(late.min(message.timestamp));
                }
                summary.metric_samples += 1;
                summary.last_metric_sequence = summary.last_metric_sequence.max(message.sequence);
                outcome.samples += 1;
            }
            if replay {
                job.replayed.insert((kind, message.sequence));
            } else {
                job.new[kind as usize].push(message.sequence);
            }
            summary.first_timestamp = summary.first_timestamp.min(message.timestamp);
            summary.last_timestamp = summary.last_timestamp.max(message.timestamp);
            write.put_cf(cfs[kind as usize], &key, &value);
        }
        let summaries: Vec<JobSummary> = changed
            .into_iter()
            .map(|job| job.summary)
            .filter(|summary| summary.first_timestamp != i64::MAX)
            .collect();
        if !write.is_empty() {
            for summary in &summaries {
                write.put_cf(
                    summaries_cf,
                    summary.job_id.as_bytes(),
                    summary.encode_to_vec(),
                );
                pending.insert(summary.job_id.clone(), summary.clone());
            }
            let commit = commit.unwrap_or_else(|| lock(&self.commit));
            drop(pending);
            if self.resync.load(Ordering::Acquire) {
                return Err(StoreError::Aborted);
            }
            if let Err(error) = self.db.write_opt(write, &self.ingest_options) {
                self.resync.store(true, Ordering::Release);
                return Err(error.into());
            }
            let mut durable = lock(&self.durable);
            for summary in summaries {
                durable.insert(summary.job_id.clone(), summary);
            }
            drop(durable);
            drop(commit);
            // One fsync covers this batch and whatever was written before it; the next batch
            // is written meanwhile. Should it fail, the batch is not acknowledged and its
            // sender sends it again.
            if self.sync_after_write {
                self.db.flush_wal(true)?;
            }
        }
        self.ingested.fetch_add(outcome.bytes, Ordering::Relaxed);
        metrics::histogram!(m::WRITE_DURATION).record(started.elapsed().as_secs_f64());
        metrics::counter!(m::LINES_STORED).increment(outcome.lines);
        metrics::counter!(m::METRICS_STORED).increment(outcome.samples);
        if outcome.records > 0 {
            metrics::counter!(m::JOB_RECORDS_STORED).increment(outcome.records);
        }
        if outcome.duplicates > 0 {
            metrics::counter!(m::DUPLICATES_SKIPPED).increment(outcome.duplicates);
        }
        if !outcome.refused.is_empty() {
            metrics::counter!(joblet_ipc::metrics::PERSIST_IPC_FRAMES_REJECTED, "reason" => "payload")
                .increment(outcome.refused.len() as u64);
        }
        Ok(outcome)
    }
}

impl IngestOutcome {
    /// Notes that `message` is refused, and why.
    fn refuse(&mut self, message: &Envelope<'_>, reason: RefusalReason, detail: &str) {
        self.refused.push(Refusal {
            reason: reason as i32,
            job_id: message.job_id.chars().take(64).collect(),
            r#type: message.r#type,
            sequence: message.sequence,
            detail: detail.to_owned(),
        });
    }
}

/// What a batch being prepared changes of one job.
struct JobChanges {
    summary: JobSummary,
    /// Sequences written as new in this batch, per [`Kind`]: increasing, so a later replay of
    /// one of them in the same batch is found by binary search.
    new: [Vec<u64>; 2],
    /// Replays (sequence at or below the highest stored) written in this batch.
    replayed: HashSet<(Kind, u64)>,
}

/// The two kinds of timestamped records; the value indexes `new` and the column families
/// (`[logs, metrics]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Kind {
    Log = 0,
    Metric = 1,
}

impl Kind {
    /// The highest sequence of this kind stored for the job.
    fn highest(self, summary: &JobSummary) -> u64 {
        match self {
            Kind::Log => summary.last_log_sequence,
            Kind::Metric => summary.last_metric_sequence,
        }
    }
}
