//! Scans: a job's log lines or metric samples in (timestamp, sequence) order, clamped to
//! retention, forward or (for a tail) backward, resumable where a budget stopped them.

use std::collections::VecDeque;
use std::ops::ControlFlow;

use rocksdb::ReadOptions;

use super::expiry::oldest_kept_ns;
use super::value::parse_log_value;
use super::{
    CF_LOGS, CF_METRICS, LogRecord, MetricRecord, MetricValue, Selection, Store, StoreError,
    StreamFilter,
};
use crate::config::Retention;
use crate::keys;

impl Store {
    /// Streams matching log lines in (timestamp, sequence) order to `emit` until it breaks.
    /// Lines are lent: their content is borrowed from RocksDB's block. Returns where to resume
    /// when the scan stopped at `examine_at_most`.
    pub fn scan_logs(
        &self,
        selection: &Selection,
        streams: StreamFilter,
        contains: &[u8],
        mut emit: impl FnMut(LogRecord<'_>) -> ControlFlow<()>,
    ) -> Result<Option<(i64, u64)>, StoreError> {
        let finder = (!contains.is_empty()).then(|| memchr::memmem::Finder::new(contains));
        self.scan(
            CF_LOGS,
            self.policy.logs(),
            selection,
            |value| {
                parse_log_value(value).is_some_and(|line| {
                    let wanted = match streams {
                        StreamFilter::Both => true,
                        StreamFilter::Stdout => line.stream == joblet_ipc::Stream::Stdout,
                        StreamFilter::Stderr => line.stream == joblet_ipc::Stream::Stderr,
                    };
                    // A gap passes every filter: the lines it stands for might have matched.
                    line.gap.is_some()
                        || wanted
                            && finder
                                .as_ref()
                                .is_none_or(|f| f.find(line.content).is_some())
                })
            },
            &mut |timestamp, sequence, value| match parse_log_value(value) {
                Some(line) => emit(LogRecord {
                    stream: line.stream,
                    timestamp,
                    sequence,
                    content: line.content,
                    partial: line.partial,
                    gap: line.gap,
                }),
                None => ControlFlow::Continue(()),
            },
        )
    }

    /// Streams matching metric samples in (timestamp, sequence) order to `emit`.
    pub fn scan_metrics(
        &self,
        selection: &Selection,
        mut emit: impl FnMut(MetricRecord) -> ControlFlow<()>,
    ) -> Result<Option<(i64, u64)>, StoreError> {
        self.scan(
            CF_METRICS,
            self.policy.metrics(),
            selection,
            |value| MetricValue::decode(value).is_some(),
            &mut |timestamp, sequence, value| match MetricValue::decode(value) {
                Some(MetricValue::Sample(sample)) => emit(MetricRecord {
                    timestamp,
                    sequence,
                    sample,
                    rollup: None,
                }),
                Some(MetricValue::Rollup(rollup)) => emit(MetricRecord {
                    timestamp,
                    sequence,
                    sample: super::downsample::average(&rollup),
                    rollup: Some(rollup),
                }),
                None => ControlFlow::Continue(()),
            },
        )
    }

    /// The shared scan: bounds from the selection (clamped to retention), a forward scan — or,
    /// for a tail, a backward scan that keeps the newest N — then offset and limit. `wanted`
    /// filters records by value; `emit` gets (timestamp, sequence, value) of those selected.
    fn scan(
        &self,
        cf_name: &'static str,
        retention: Retention,
        selection: &Selection,
        wanted: impl Fn(&[u8]) -> bool,
        emit: &mut impl FnMut(i64, u64, &[u8]) -> ControlFlow<()>,
    ) -> Result<Option<(i64, u64)>, StoreError> {
        let cf = self.cf(cf_name)?;
        let job = selection.job_id.as_str();
        let start = selection
            .start
            .unwrap_or(i64::MIN)
            .max(oldest_kept_ns(retention));
        let mut lower = keys::lower_bound(job, start);
        if let Some((timestamp, sequence)) = selection.resume_after {
            // The key right after that record's: keys have a fixed length, so appending a byte
            // gives the next possible one.
            let mut after = keys::encode(job, timestamp, sequence);
            after.push(0);
            lower = lower.max(after);
        }
        let upper = match selection.end {
            Some(end) => keys::lower_bound(job, end),
            None => keys::job_end(job),
        };
        if lower >= upper {
            return Ok(None);
        }
        let mut options = ReadOptions::default();
        options.set_iterate_lower_bound(lower);
        options.set_iterate_upper_bound(upper);
        let mut iter = self.db.raw_iterator_cf_opt(cf, options);

        let matching = |key: &[u8], value: &[u8]| -> Option<(i64, u64)> {
            let (_, timestamp, sequence) = keys::decode(key)?;
            (sequence > selection.after_sequence && wanted(value)).then_some((timestamp, sequence))
        };

        if let Some(tail) = selection.tail {
            let mut newest = VecDeque::with_capacity(tail.min(4096));
            iter.seek_to_last();
            while iter.valid() && newest.len() < tail {
                if let (Some(key), Some(value)) = (iter.key(), iter.value())
                    && let Some((timestamp, sequence)) = matching(key, value)
                {
                    newest.push_front((timestamp, sequence, value.to_vec()));
                }
                iter.prev();
            }
            iter.status()?;
            let take = selection.limit.unwrap_or(usize::MAX);
            for (timestamp, sequence, value) in newest.iter().skip(selection.offset).take(take) {
                if emit(*timestamp, *sequence, value).is_break() {
                    break;
                }
            }
            return Ok(None);
        }

        let mut skip = selection.offset;
        let mut remaining = selection.limit.unwrap_or(usize::MAX);
        let mut budget = selection.examine_at_most.unwrap_or(usize::MAX);
        iter.seek_to_first();
        while iter.valid() && remaining > 0 {
            if let (Some(key), Some(value)) = (iter.key(), iter.value()) {
                if let Some((timestamp, sequence)) = matching(key, value) {
                    if skip > 0 {
                        skip -= 1;
                    } else {
                        remaining -= 1;
                        if emit(timestamp, sequence, value).is_break() {
                            return Ok(None);
                        }
                    }
                }
                budget -= 1;
                if budget == 0 {
                    return Ok(
                        keys::decode(key).map(|(_, timestamp, sequence)| (timestamp, sequence))
                    );
                }
            }
            iter.next();
        }
        iter.status()?;
        Ok(None)
    }
}
