//! A job's resource samples: appended to the job's metrics spool (`<id>.metrics` beside its
//! log spool: frames of `joblet.ipc.IPCMessage` of type METRIC without a job id), streamed live
//! and replicated (by [`crate::replicate`], which reads them like any other subscriber).
//!
//! While the job runs the newest [`RECENT`] samples are also kept in memory, so live readers
//! near the end never touch the disk; a finished job keeps neither samples nor an open file.
//! Samples are kept until the spool is removed (see the manager's eviction).

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::BytesMut;
use joblet_ipc::{IpcMessage, MessageType, MetricData};
use prost::Message;
use tokio::sync::watch;
use tokio_util::codec::Decoder;

/// Samples kept in memory while the job runs.
const RECENT: usize = 64;
/// Every this many samples the index remembers an offset, so a reader starting after a
/// sequence reads only from close to it.
const INDEX_EVERY: u64 = 256;

#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub sequence: u64,
    pub timestamp: i64,
    pub data: MetricData,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SampleProgress {
    pub last_sequence: u64,
    /// Bytes of whole frames in the metrics spool.
    pub end_offset: u64,
    pub finished: bool,
}

pub struct MetricsLog {
    path: PathBuf,
    state: Mutex<State>,
    progress: watch::Sender<SampleProgress>,
}

struct State {
    file: Option<File>,
    next_sequence: u64,
    end_offset: u64,
    /// (sequence, offset of its frame), every INDEX_EVERY samples.
    index: Vec<(u64, u64)>,
    recent: VecDeque<Sample>,
    write_failed: bool,
}

impl MetricsLog {
    /// A new, empty metrics spool at `path`.
    pub fn create(path: &Path) -> io::Result<Arc<MetricsLog>> {
        let file = std::fs::OpenOptions::new()
            .create_new(true)
            .append(true)
            .open(path)?;
        Ok(MetricsLog::with(
            path,
            Some(file),
            SampleProgress::default(),
        ))
    }

    /// The metrics spool of a job recorded by an earlier run: `spooled` (last sequence, bytes)
    /// as the journal recorded it when the job ended, or else read from the file.
    pub fn restore(path: &Path, spooled: Option<(u64, u64)>) -> io::Result<Arc<MetricsLog>> {
        let (last_sequence, end_offset) = match spooled {
            Some(known) => known,
            None => crate::output::scan_spool::<IpcMessage>(path, |message| message.sequence)?,
        };
        Ok(MetricsLog::with(
            path,
            None,
            SampleProgress {
                last_sequence,
                end_offset,
                finished: true,
            },
        ))
    }

    /// The metrics spool of a job that still runs (re-attached after a restart of core): read
    /// to its last whole frame (a frame torn by a crash is cut off), then appended to.
    pub fn reopen(path: &Path) -> io::Result<Arc<MetricsLog>> {
        let (last_sequence, end_offset) =
            crate::output::scan_spool::<IpcMessage>(path, |message| message.sequence)?;
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        file.set_len(end_offset)?;
        let progress = SampleProgress {
            last_sequence,
            end_offset,
            finished: false,
        };
        Ok(MetricsLog::with(path, Some(file), progress))
    }

    fn with(path: &Path, file: Option<File>, progress: SampleProgress) -> Arc<MetricsLog> {
        Arc::new(MetricsLog {
            path: path.to_owned(),
            state: Mutex::new(State {
                file,
                next_sequence: progress.last_sequence + 1,
                end_offset: progress.end_offset,
                index: Vec::new(),
                recent: VecDeque::new(),
                write_failed: false,
            }),
            progress: watch::Sender::new(progress),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        joblet_daemon::lock(&self.state)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends a sample. Blocking (a small write): call it from a blocking thread.
    pub fn push(&self, timestamp: i64, data: MetricData) {
        let mut state = self.lock();
        let sequence = state.next_sequence;
        state.next_sequence += 1;
        let mut frame = BytesMut::new();
        let message = IpcMessage {
            version: joblet_ipc::PROTOCOL_VERSION,
            r#type: MessageType::Metric as i32,
            job_id: String::new(),
            timestamp,
            sequence,
            data: data.encode_to_vec().into(),
        };
        if joblet_ipc::codec::encode_frame(&message, usize::MAX >> 1, &mut frame).is_err() {
            return;
        }
        // A sample taken as the job finished comes too late.
        let Some(file) = state.file.as_mut() else {
            return;
        };
        let written = file.write_all(&frame);
        if let Err(error) = written {
            if !state.write_failed {
                tracing::error!(path = %self.path.display(), %error, "cannot write the job's metrics spool; samples are missed from here");
                state.write_failed = true;
            }
            return;
        }
        if sequence % INDEX_EVERY == 1 {
            let offset = state.end_offset;
            state.index.push((sequence, offset));
        }
        state.end_offset += frame.len() as u64;
        if state.recent.len() == RECENT {
            state.recent.pop_front();
        }
        state.recent.push_back(Sample {
            sequence,
            timestamp,
            data,
        });
        let end_offset = state.end_offset;
        drop(state);
        self.progress.send_modify(|p| {
            p.last_sequence = sequence;
            p.end_offset = end_offset;
        });
    }

    /// No more samples will come: closes the spool for writing and frees what was in memory.
    pub fn finish(&self) {
        {
            let mut state = self.lock();
            state.file = None;
            state.recent = VecDeque::new();
            state.index.shrink_to_fit();
        }
        self.progress.send_modify(|p| p.finished = true);
    }

    /// Samples after `after_sequence`, oldest first: from memory when the newest ones are
    /// asked for, otherwise read from the spool on a blocking thread.
    pub async fn after(&self, after_sequence: u64) -> io::Result<Vec<Sample>> {
        let (start, end) = {
            let state = self.lock();
            let last = state.next_sequence - 1;
            if after_sequence >= last {
                return Ok(Vec::new());
            }
            if state
                .recent
                .front()
                .is_some_and(|first| first.sequence <= after_sequence + 1)
            {
                return Ok(state
                    .recent
                    .iter()
                    .filter(|s| s.sequence > after_sequence)
                    .cloned()
                    .collect());
            }
            let position = state
                .index
                .partition_point(|(sequence, _)| *sequence <= after_sequence + 1);
            let start = position.checked_sub(1).map_or(0, |i| state.index[i].1);
            (start, state.end_offset)
        };
        let path = self.path.clone();
        let samples = tokio::task::spawn_blocking(move || read(&path, start, end))
            .await
            .map_err(io::Error::other)??;
        Ok(samples
            .into_iter()
            .filter(|s| s.sequence > after_sequence)
            .collect())
    }

    pub fn last_sequence(&self) -> u64 {
        self.progress.borrow().last_sequence
    }

    pub fn progress(&self) -> SampleProgress {
        *self.progress.borrow()
    }

    pub fn subscribe(&self) -> watch::Receiver<SampleProgress> {
        self.progress.subscribe()
    }
}

/// The samples in `[start, end)` of the spool at `path`.
fn read(path: &Path, start: u64, end: u64) -> io::Result<Vec<Sample>> {
    if end <= start {
        return Ok(Vec::new());
    }
    let file = File::open(path)?;
    let mut bytes = vec![0u8; (end - start) as usize];
    file.read_exact_at(&mut bytes, start)?;
    Ok(decode_all(&mut BytesMut::from(&bytes[..])))
}

/// The whole samples at the start of `bytes`.
fn decode_all(bytes: &mut BytesMut) -> Vec<Sample> {
    let mut codec = joblet_ipc::FrameCodec::<IpcMessage>::new(usize::MAX >> 1);
    let mut samples = Vec::new();
    while let Ok(Some(message)) = codec.decode(bytes) {
        let Ok(data) = MetricData::decode(message.data) else {
            break;
        };
        samples.push(Sample {
            sequence: message.sequence,
            timestamp: message.timestamp,
            data,
        });
    }
    samples
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(cpu: f64) -> MetricData {
        MetricData {
            cpu_percent: cpu,
            memory_bytes: 1 << 20,
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn samples_from_memory_and_disk_then_restored_from_the_file_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("job.metrics");
        let log = MetricsLog::create(&path).unwrap();
        for i in 1..=1000 {
            log.push(i, sample(i as f64));
        }
        for after in [0u64, 1, 255, 256, 257, 900, 950, 999, 1000] {
            let seen: Vec<u64> = log
                .after(after)
                .await
                .unwrap()
                .iter()
                .map(|s| s.sequence)
                .collect();
            assert_eq!(
                seen,
                ((after + 1)..=1000).collect::<Vec<_>>(),
                "after {after}"
            );
        }
        let progress = log.progress();
        log.finish();
        assert!(
            log.after(998).await.unwrap().len() == 2,
            "read from disk once finished"
        );
        // A torn last frame, as a crash would leave it.
        let mut bytes = std::fs::read(&path).unwrap();
        bytes.truncate(bytes.len() - 3);
        std::fs::write(&path, &bytes).unwrap();
        let restored = MetricsLog::restore(&path, None).unwrap();
        assert_eq!(restored.last_sequence(), 999);
        let all = restored.after(0).await.unwrap();
        assert_eq!(all.len(), 999);
        assert_eq!(all[41].data, sample(42.0));
        assert!(restored.progress().end_offset < progress.end_offset);
        let known =
            MetricsLog::restore(&path, Some((999, restored.progress().end_offset))).unwrap();
        assert_eq!(known.after(990).await.unwrap().len(), 9);
    }
}
