//! Metric downsampling: samples older than `retention.metrics_full_resolution` are kept as one
//! record per job and minute, the minimum, sum (for the average) and maximum of each figure and
//! how many samples it stands for.
//!
//! A rollup lives in the metrics column family beside the samples, under the key of its minute
//! (job, minute start, highest sequence of its samples), so scans, retention and job deletion
//! treat both alike and a query gets each minute in its place. Its value starts with a 0 byte,
//! which no sample's can (a protobuf field key is never 0, and ingest stores only samples that
//! decode).
//!
//! Each job's summary says up to where its samples were downsampled. Every retention pass rolls
//! the minutes from there to the cutoff up in one atomic batch — the rollups written, the
//! samples range-deleted, the summary moved on — holding the ingest locks, a bounded number of
//! samples at a time. A replayed sample below that point was rolled up already and is skipped
//! as a duplicate; a new one (core was cut off for longer than the full resolution) is stored,
//! noted in the summary, and merged into its minute's rollup by the next pass.

use std::collections::BTreeMap;

use joblet_daemon::lock;
use joblet_ipc::{MetricData, now_ns};
use joblet_proto::persist::MetricRollup;
use prost::Message;
use rocksdb::{ReadOptions, WriteBatch};

use super::{CF_METRICS, CF_SUMMARIES, Store, StoreError};
use crate::keys;
use crate::metrics as m;

/// The first byte of a rollup's value.
const ROLLUP_MARKER: u8 = 0;
pub const MINUTE_NS: i64 = 60_000_000_000;
/// Samples rolled up per batch: the ingest locks are held for a few milliseconds at a time.
const SAMPLES_PER_STEP: usize = 20_000;

/// A stored metric value.
#[derive(Debug, Clone, PartialEq)]
#[allow(clippy::large_enum_variant)] // decoded one at a time, never stored in bulk
pub enum MetricValue {
    Sample(MetricData),
    /// A minute of samples, summarised.
    Rollup(MetricRollup),
}

impl MetricValue {
    /// `None` for bytes that are neither.
    pub fn decode(value: &[u8]) -> Option<MetricValue> {
        match value.split_first() {
            Some((&ROLLUP_MARKER, rest)) => MetricRollup::decode(rest).ok().map(Self::Rollup),
            _ => MetricData::decode(value).ok().map(Self::Sample),
        }
    }
}

/// What downsampling did in one pass.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Downsampled {
    pub jobs: u64,
    pub samples: u64,
    pub rollups: u64,
}

impl Store {
    /// Rolls up every job's samples older than the full resolution (see the module docs).
    /// Blocking.
    pub fn downsample_metrics(&self) -> Result<Downsampled, StoreError> {
        self.downsample_metrics_at(now_ns())
    }

    /// [`Store::downsample_metrics`] as if it were `now` (Unix ns).
    pub(crate) fn downsample_metrics_at(&self, now: i64) -> Result<Downsampled, StoreError> {
        let Some(full) = self.policy.metrics_full_resolution().0 else {
            return Ok(Downsampled::default());
        };
        let full = i64::try_from(full.as_nanos()).unwrap_or(i64::MAX);
        let cutoff = floor_minute(now.saturating_sub(full));
        let due: Vec<String> = lock(&self.durable)
            .values()
            .filter(|summary| due_from(summary, cutoff).is_some())
            .map(|summary| summary.job_id.clone())
            .collect();
        let mut done = Downsampled::default();
        for job_id in due {
            let before = done.samples;
            while let Some((samples, rollups)) = self.downsample_step(&job_id, cutoff)? {
                done.samples += samples;
                done.rollups += rollups;
            }
            done.jobs += u64::from(done.samples > before);
        }
        if done.samples > 0 {
            metrics::counter!(m::METRICS_DOWNSAMPLED).increment(done.samples);
        }
        Ok(done)
    }

    /// Rolls up the next bounded stretch of `job_id`'s samples before `cutoff`; returns the
    /// samples and the rollups written, or `None` when nothing is left to do.
    fn downsample_step(&self, job_id: &str, cutoff: i64) -> Result<Option<(u64, u64)>, StoreError> {
        let cf = self.cf(CF_METRICS)?;
        let summaries_cf = self.cf(CF_SUMMARIES)?;
        // Both ingest locks, in ingest's order: nothing is being prepared or written, so the
        // summary is current and no sample of this range arrives meanwhile.
        let mut pending = lock(&self.pending);
        let _commit = lock(&self.commit);
        if self.resync.load(std::sync::atomic::Ordering::Acquire) {
            // A write failed and `pending` is not to be trusted; the next pass tries again.
            return Ok(None);
        }
        let Some(mut summary) = pending.get(job_id).cloned() else {
            return Ok(None);
        };
        let Some(from) = due_from(&summary, cutoff) else {
            return Ok(None);
        };

        // From the start of `from`'s minute: a late sample's minute may hold a rollup already,
        // which it joins.
        let lower = keys::lower_bound(job_id, floor_minute(from));
        let mut options = ReadOptions::default();
        options.set_iterate_lower_bound(lower.clone());
        options.set_iterate_upper_bound(keys::lower_bound(job_id, cutoff));
        let mut iter = self.db.raw_iterator_cf_opt(cf, options);
        iter.seek_to_first();
        // Minute start → (its rollup so far, the highest sequence in it).
        let mut minutes: BTreeMap<i64, (MetricRollup, u64)> = BTreeMap::new();
        let mut samples = 0u64;
        let mut end = cutoff;
        while iter.valid() {
            let (Some(key), Some(value)) = (iter.key(), iter.value()) else {
                break;
            };
            let Some((_, timestamp, sequence)) = keys::decode(key) else {
                iter.next();
                continue;
            };
            let minute = floor_minute(timestamp);
            if samples as usize >= SAMPLES_PER_STEP && !minutes.contains_key(&minute) {
                end = minute;
                break;
            }
            let rollup = match MetricValue::decode(value) {
                Some(MetricValue::Sample(sample)) => {
                    samples += 1;
                    rollup_of(&sample)
                }
                Some(MetricValue::Rollup(rollup)) => rollup,
                // Ingest stores nothing unreadable; should something be, it is left alone.
                None => {
                    iter.next();
                    continue;
                }
            };
            minutes
                .entry(minute)
                .and_modify(|(merged, highest)| {
                    merge(merged, &rollup);
                    *highest = (*highest).max(sequence);
                })
                .or_insert((rollup, sequence));
            iter.next();
        }
        iter.status()?;
        drop(iter);

        let mut write = WriteBatch::default();
        if samples > 0 {
            // The range's samples and old rollups go; the rollups are written after the range
            // deletion in the same batch, so they stay.
            write.delete_range_cf(cf, &lower, &keys::lower_bound(job_id, end));
            for (minute, (rollup, highest)) in &minutes {
                let mut value = vec![ROLLUP_MARKER];
                rollup.encode(&mut value).expect("a Vec grows as needed");
                write.put_cf(cf, keys::encode(job_id, *minute, *highest), value);
            }
        }
        let watermark = summary.metrics_downsampled_before;
        summary.metrics_downsampled_before = watermark.max(end);
        // Stopped short of where an earlier pass had got: the late samples left start at `end`.
        summary.metrics_late_from = (end < watermark).then_some(end);
        write.put_cf(summaries_cf, job_id.as_bytes(), summary.encode_to_vec());
        self.db.write_opt(write, &self.write_options)?;
        // With durability `flushed`, the next flush makes it durable; until then a crash
        // leaves the samples as they were (the flush is atomic), to be rolled up again.
        self.durable_after();
        pending.insert(job_id.to_owned(), summary.clone());
        lock(&self.durable).insert(job_id.to_owned(), summary);
        let rollups = if samples > 0 { minutes.len() as u64 } else { 0 };
        Ok(Some((samples, rollups)))
    }
}

/// Where `summary`'s job has samples to roll up before `cutoff`, if it has.
fn due_from(summary: &joblet_proto::persist::JobSummary, cutoff: i64) -> Option<i64> {
    if summary.metric_samples == 0 || summary.first_timestamp >= cutoff {
        return None;
    }
    // Nothing stored since the last pass got past the newest record: a finished job is not
    // visited (and its summary rewritten) again every pass.
    if summary.metrics_late_from.is_none()
        && summary.metrics_downsampled_before > summary.last_timestamp
    {
        return None;
    }
    let from = match summary.metrics_downsampled_before {
        0 => i64::MIN,
        watermark => watermark,
    };
    let from = summary
        .metrics_late_from
        .map_or(from, |late| late.min(from));
    (from < cutoff).then_some(from)
}

/// The start of the minute `timestamp` is in.
pub fn floor_minute(timestamp: i64) -> i64 {
    // The minute of the earliest times starts before i64::MIN: it is cut there.
    timestamp
        .div_euclid(MINUTE_NS)
        .checked_mul(MINUTE_NS)
        .unwrap_or(i64::MIN)
}

/// `a` and `b` combined figure by figure with `f64s` and `i64s`; a pressure figure only one of
/// them has is kept as it is.
fn combine(
    a: &MetricData,
    b: &MetricData,
    f64s: fn(f64, f64) -> f64,
    i64s: fn(i64, i64) -> i64,
) -> MetricData {
    let optional = |x: Option<f64>, y: Option<f64>| match (x, y) {
        (Some(x), Some(y)) => Some(f64s(x, y)),
        (x, y) => x.or(y),
    };
    MetricData {
        cpu_percent: f64s(a.cpu_percent, b.cpu_percent),
        memory_bytes: i64s(a.memory_bytes, b.memory_bytes),
        memory_limit: i64s(a.memory_limit, b.memory_limit),
        io_read_bytes: i64s(a.io_read_bytes, b.io_read_bytes),
        io_write_bytes: i64s(a.io_write_bytes, b.io_write_bytes),
        pids: i64s(a.pids, b.pids),
        net_recv_bytes: i64s(a.net_recv_bytes, b.net_recv_bytes),
        net_sent_bytes: i64s(a.net_sent_bytes, b.net_sent_bytes),
        cpu_pressure_some: optional(a.cpu_pressure_some, b.cpu_pressure_some),
        memory_pressure_some: optional(a.memory_pressure_some, b.memory_pressure_some),
        memory_pressure_full: optional(a.memory_pressure_full, b.memory_pressure_full),
    }
}

/// One sample as a rollup of one.
pub fn rollup_of(sample: &MetricData) -> MetricRollup {
    MetricRollup {
        samples: 1,
        min: Some(*sample),
        max: Some(*sample),
        sum: Some(*sample),
    }
}

/// Adds `other`'s samples to `rollup`.
pub fn merge(rollup: &mut MetricRollup, other: &MetricRollup) {
    let pick = |mine: &mut Option<MetricData>,
                theirs: &Option<MetricData>,
                f: fn(f64, f64) -> f64,
                i: fn(i64, i64) -> i64| {
        *mine = match (mine.take(), theirs) {
            (Some(a), Some(b)) => Some(combine(&a, b, f, i)),
            (a, b) => a.or(*b),
        };
    };
    pick(&mut rollup.min, &other.min, f64::min, i64::min);
    pick(&mut rollup.max, &other.max, f64::max, i64::max);
    pick(
        &mut rollup.sum,
        &other.sum,
        |a, b| a + b,
        i64::saturating_add,
    );
    rollup.samples = rollup.samples.saturating_add(other.samples);
}

/// Each figure's average over the samples of `rollup`.
pub fn average(rollup: &MetricRollup) -> MetricData {
    let n = f64::from(rollup.samples.max(1));
    let sum = rollup.sum.unwrap_or_default();
    let int = |x: i64| (x as f64 / n).round() as i64;
    MetricData {
        cpu_percent: sum.cpu_percent / n,
        memory_bytes: int(sum.memory_bytes),
        memory_limit: int(sum.memory_limit),
        io_read_bytes: int(sum.io_read_bytes),
        io_write_bytes: int(sum.io_write_bytes),
        pids: int(sum.pids),
        net_recv_bytes: int(sum.net_recv_bytes),
        net_sent_bytes: int(sum.net_sent_bytes),
        cpu_pressure_some: sum.cpu_pressure_some.map(|x| x / n),
        memory_pressure_some: sum.memory_pressure_some.map(|x| x / n),
        memory_pressure_full: sum.memory_pressure_full.map(|x| x / n),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample(cpu: f64, memory: i64, pressure: Option<f64>) -> MetricData {
        MetricData {
            cpu_percent: cpu,
            memory_bytes: memory,
            pids: memory / 10,
            cpu_pressure_some: pressure,
            ..Default::default()
        }
    }

    #[test]
    fn a_rollup_holds_min_average_and_max_of_each_figure() {
        let mut rollup = rollup_of(&sample(10.0, 100, Some(1.0)));
        merge(&mut rollup, &rollup_of(&sample(30.0, 300, Some(3.0))));
        merge(&mut rollup, &rollup_of(&sample(20.0, 200, None)));
        assert_eq!(rollup.samples, 3);
        assert_eq!(rollup.min.as_ref().unwrap().cpu_percent, 10.0);
        assert_eq!(rollup.max.as_ref().unwrap().memory_bytes, 300);
        assert_eq!(rollup.max.as_ref().unwrap().cpu_pressure_some, Some(3.0));
        let average = average(&rollup);
        assert_eq!(average.cpu_percent, 20.0);
        assert_eq!(average.memory_bytes, 200);
        assert_eq!(average.pids, 20);
    }

    #[test]
    fn stored_values_tell_a_sample_from_a_rollup() {
        let one = sample(1.5, 7, None);
        let mut value = vec![ROLLUP_MARKER];
        rollup_of(&one).encode(&mut value).unwrap();
        assert_eq!(
            MetricValue::decode(&value),
            Some(MetricValue::Rollup(rollup_of(&one)))
        );
        assert_eq!(
            MetricValue::decode(&one.encode_to_vec()),
            Some(MetricValue::Sample(one))
        );
        // An all-zero sample encodes to nothing, and is still a sample.
        assert_eq!(
            MetricValue::decode(&[]),
            Some(MetricValue::Sample(MetricData::default()))
        );
    }

    proptest! {
        #[test]
        fn no_sample_decodes_from_a_value_starting_with_the_marker(rest in any::<Vec<u8>>()) {
            let mut value = vec![ROLLUP_MARKER];
            value.extend_from_slice(&rest);
            prop_assert!(MetricData::decode(value.as_slice()).is_err());
        }

        #[test]
        fn merging_in_any_grouping_gives_the_same_rollup(
            values in proptest::collection::vec((0.0f64..100.0, 0i64..1 << 40), 1..50),
            split in any::<prop::sample::Index>(),
        ) {
            let rollups: Vec<MetricRollup> =
                values.iter().map(|&(c, m)| rollup_of(&sample(c, m, None))).collect();
            let at = split.index(rollups.len());
            let fold = |part: &[MetricRollup]| part.iter().skip(1).fold(part[0], |mut a, b| {
                merge(&mut a, b);
                a
            });
            let whole = fold(&rollups);
            if at > 0 {
                let mut left = fold(&rollups[..at]);
                merge(&mut left, &fold(&rollups[at..]));
                prop_assert_eq!(left.samples, whole.samples);
                prop_assert_eq!(&left.min, &whole.min);
                prop_assert_eq!(&left.max, &whole.max);
                prop_assert_eq!(left.sum.as_ref().unwrap().memory_bytes, whole.sum.as_ref().unwrap().memory_bytes);
            }
            let (min, max) = values.iter().fold((f64::MAX, f64::MIN), |(lo, hi), &(c, _)| (lo.min(c), hi.max(c)));
            prop_assert_eq!(whole.min.unwrap().cpu_percent, min);
            prop_assert_eq!(whole.max.unwrap().cpu_percent, max);
        }
    }
}
