//! A job's output: captured lines, the spool file, live readers and replication.
//!
//! Two pump threads (stdout, stderr) read the job's pipes, split lines (a line longer than the
//! configured maximum becomes several records; a last line without newline is kept) and call
//! [`Output::append`], which under one lock gives each line the job's next sequence number and
//! a nanosecond timestamp (never decreasing), appends it to the spool file, offers it to the
//! replication queue, and publishes the new end of the spool. Readers ([`SpoolReader`]) read
//! the spool file at their own pace and wait on that progress signal when they reach the end:
//! a slow reader never slows the job, and memory does not grow with the number of readers.
//!
//! Spool format: frames of `joblet.LogRecord` (4-byte big-endian length + protobuf), the same
//! framing as the IPC stream.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use joblet_ipc::IpcSender;
use joblet_proto::joblet::{LogRecord, LogStream};
use tokio::sync::watch;
use tokio_util::codec::Decoder;

/// Every this many records the spool index remembers an offset, so a reader starting after a
/// sequence seeks close to it instead of scanning from the start.
const INDEX_EVERY: u64 = 1024;
/// Bytes a reader takes from the spool per read.
const READ_CHUNK: u64 = 1024 * 1024;
/// Size of each pipe read.
const PIPE_READ: usize = 64 * 1024;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Progress {
    pub last_sequence: u64,
    /// Bytes of whole frames in the spool file.
    pub end_offset: u64,
    /// The job ended and both pipes reached end of file: no more lines will come.
    pub finished: bool,
}

struct SpoolState {
    file: File,
    next_sequence: u64,
    last_timestamp: i64,
    end_offset: u64,
    /// (sequence, offset of its frame), every INDEX_EVERY records.
    index: Vec<(u64, u64)>,
    buffer: BytesMut,
    /// Lowest sequence the replication queue refused since the last replay.
    replay_from: Option<u64>,
    write_failed: bool,
}

pub struct Output {
    job_id: String,
    path: PathBuf,
    state: Mutex<SpoolState>,
    progress: watch::Sender<Progress>,
    replication: Option<IpcSender>,
}

pub fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i64)
}

impl Output {
    pub fn create(
        job_id: &str,
        path: &Path,
        replication: Option<IpcSender>,
    ) -> io::Result<Arc<Output>> {
        let file = std::fs::OpenOptions::new()
            .create_new(true)
            .append(true)
            .read(true)
            .open(path)?;
        Ok(Arc::new(Output {
            job_id: job_id.to_owned(),
            path: path.to_owned(),
            state: Mutex::new(SpoolState {
                file,
                next_sequence: 1,
                last_timestamp: 0,
                end_offset: 0,
                index: Vec::new(),
                buffer: BytesMut::with_capacity(PIPE_READ * 2),
                replay_from: None,
                write_failed: false,
            }),
            progress: watch::Sender::new(Progress::default()),
            replication,
        }))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SpoolState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records `lines` of `stream`, in order.
    pub fn append(&self, stream: LogStream, lines: Vec<Bytes>) {
        if lines.is_empty() {
            return;
        }
        let ipc_stream = match stream {
            LogStream::Stderr => joblet_ipc::Stream::Stderr,
            _ => joblet_ipc::Stream::Stdout,
        };
        let mut state = self.lock();
        let state = &mut *state;
        for content in lines {
            let sequence = state.next_sequence;
            state.next_sequence += 1;
            let timestamp = now_ns().max(state.last_timestamp);
            state.last_timestamp = timestamp;
            if sequence % INDEX_EVERY == 1 {
                let offset = state.end_offset + state.buffer.len() as u64;
                state.index.push((sequence, offset));
            }
            let record = LogRecord {
                stream: stream as i32,
                timestamp,
                sequence,
                content,
            };
            // Lines are bounded by max_line_length, far below any frame limit.
            let _ = joblet_ipc::codec::encode_frame(&record, usize::MAX, &mut state.buffer);
            if let Some(sender) = &self.replication {
                let message = joblet_ipc::log_message(
                    &self.job_id,
                    sequence,
                    timestamp,
                    ipc_stream,
                    record.content,
                );
                if sender.try_send(message).is_err() {
                    state.replay_from =
                        Some(state.replay_from.map_or(sequence, |s| s.min(sequence)));
                }
            }
        }
        match state.file.write_all(&state.buffer) {
            Ok(()) => state.end_offset += state.buffer.len() as u64,
            Err(error) => {
                if !state.write_failed {
                    tracing::error!(job_id = %self.job_id, %error, "cannot write the job's spool file; live readers miss lines from here");
                    state.write_failed = true;
                }
            }
        }
        state.buffer.clear();
        let progress = Progress {
            last_sequence: state.next_sequence - 1,
            end_offset: state.end_offset,
            finished: false,
        };
        self.progress.send_replace(progress);
    }

    /// No more lines will come.
    pub fn finish(&self) {
        self.progress.send_modify(|p| p.finished = true);
    }

    pub fn progress(&self) -> Progress {
        *self.progress.borrow()
    }

    pub fn job_id(&self) -> &str {
        &self.job_id
    }

    /// Takes the lowest sequence that failed to replicate since the last call.
    pub fn take_replay_from(&self) -> Option<u64> {
        self.lock().replay_from.take()
    }

    /// Marks everything from `sequence` on as needing replication again.
    pub fn mark_replay_from(&self, sequence: u64) {
        let mut state = self.lock();
        state.replay_from = Some(state.replay_from.map_or(sequence, |s| s.min(sequence)));
    }

    /// A reader of the records after `after_sequence`.
    pub fn reader(self: &Arc<Self>, after_sequence: u64) -> io::Result<SpoolReader> {
        let start = {
            let state = self.lock();
            let position = state
                .index
                .partition_point(|(sequence, _)| *sequence <= after_sequence + 1);
            position.checked_sub(1).map_or(0, |i| state.index[i].1)
        };
        Ok(SpoolReader {
            file: Arc::new(File::open(&self.path)?),
            position: start,
            after_sequence,
            buffer: BytesMut::new(),
            codec: joblet_ipc::FrameCodec::new(usize::MAX >> 1),
            progress: self.progress.subscribe(),
        })
    }
}

pub struct SpoolReader {
    file: Arc<File>,
    position: u64,
    after_sequence: u64,
    buffer: BytesMut,
    codec: joblet_ipc::FrameCodec<LogRecord>,
    progress: watch::Receiver<Progress>,
}

impl SpoolReader {
    /// The next records, or `None` at the end (immediately if `follow` is false, else once
    /// the job has finished and everything was read).
    pub async fn next_batch(&mut self, follow: bool) -> io::Result<Option<Vec<LogRecord>>> {
        loop {
            let progress = *self.progress.borrow_and_update();
            if self.position < progress.end_offset {
                let length = (progress.end_offset - self.position).min(READ_CHUNK) as usize;
                let file = self.file.clone();
                let position = self.position;
                let chunk = tokio::task::spawn_blocking(move || {
                    let mut chunk = vec![0u8; length];
                    file.read_exact_at(&mut chunk, position).map(|()| chunk)
                })
                .await
                .map_err(io::Error::other)??;
                self.position += length as u64;
                self.buffer.extend_from_slice(&chunk);
                let mut records = Vec::new();
                while let Some(record) = self
                    .codec
                    .decode(&mut self.buffer)
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?
                {
                    if record.sequence > self.after_sequence {
                        self.after_sequence = record.sequence;
                        records.push(record);
                    }
                }
                if !records.is_empty() {
                    return Ok(Some(records));
                }
                continue;
            }
            if progress.finished || !follow {
                return Ok(None);
            }
            if self.progress.changed().await.is_err() {
                return Ok(None);
            }
        }
    }
}

/// Reads a job's pipe until end of file, handing complete lines to `output`. Runs on its own
/// thread: the pipe and the spool are blocking I/O.
pub fn pump(output: &Output, stream: LogStream, mut pipe: impl Read, max_line: usize) {
    let mut splitter = LineSplitter::new(max_line);
    let mut buffer = vec![0u8; PIPE_READ];
    loop {
        match pipe.read(&mut buffer) {
            Ok(0) => break,
            Ok(n) => output.append(stream, splitter.push(&buffer[..n])),
            Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
            Err(error) => {
                tracing::warn!(job_id = %output.job_id, %error, "reading job output failed");
                break;
            }
        }
    }
    output.append(stream, splitter.finish());
}

/// Splits a byte stream into lines without their newline; lines longer than `max` are cut
/// into pieces of `max` bytes.
pub struct LineSplitter {
    partial: Vec<u8>,
    max: usize,
}

impl LineSplitter {
    pub fn new(max: usize) -> Self {
        LineSplitter {
            partial: Vec::new(),
            max: max.max(1),
        }
    }

    pub fn push(&mut self, mut data: &[u8]) -> Vec<Bytes> {
        let mut lines = Vec::new();
        while !data.is_empty() {
            let room = self.max - self.partial.len();
            let window = &data[..data.len().min(room + 1)];
            match memchr_newline(window) {
                Some(end) if end <= room => {
                    if self.partial.is_empty() {
                        lines.push(Bytes::copy_from_slice(&data[..end]));
                    } else {
                        self.partial.extend_from_slice(&data[..end]);
                        lines.push(Bytes::from(std::mem::take(&mut self.partial)));
                    }
                    data = &data[end + 1..];
                }
                _ => {
                    let take = data.len().min(room);
                    self.partial.extend_from_slice(&data[..take]);
                    data = &data[take..];
                    if self.partial.len() == self.max {
                        lines.push(Bytes::from(std::mem::take(&mut self.partial)));
                    }
                }
            }
        }
        lines
    }

    /// The last line if the stream did not end with a newline.
    pub fn finish(&mut self) -> Vec<Bytes> {
        if self.partial.is_empty() {
            Vec::new()
        } else {
            vec![Bytes::from(std::mem::take(&mut self.partial))]
        }
    }
}

fn memchr_newline(data: &[u8]) -> Option<usize> {
    data.iter().position(|&b| b == b'\n')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(max: usize, chunks: &[&[u8]]) -> Vec<Vec<u8>> {
        let mut splitter = LineSplitter::new(max);
        let mut lines: Vec<Vec<u8>> = Vec::new();
        for chunk in chunks {
            lines.extend(splitter.push(chunk).into_iter().map(|b| b.to_vec()));
        }
        lines.extend(splitter.finish().into_iter().map(|b| b.to_vec()));
        lines
    }

    #[test]
    fn lines_across_chunks_and_a_last_partial_line() {
        assert_eq!(
            split(100, &[b"ab", b"c\nde\n", b"\nf"]),
            vec![b"abc".to_vec(), b"de".to_vec(), b"".to_vec(), b"f".to_vec()]
        );
    }

    #[test]
    fn long_lines_are_split_not_dropped() {
        assert_eq!(
            split(4, &[b"abcdefghij\nxy", b"z\n"]),
            vec![
                b"abcd".to_vec(),
                b"efgh".to_vec(),
                b"ij".to_vec(),
                b"xyz".to_vec()
            ]
        );
        // Exactly max bytes then a newline is one line, not a line and an empty one.
        assert_eq!(split(4, &[b"abcd\n"]), vec![b"abcd".to_vec()]);
    }

    #[tokio::test]
    async fn readers_see_every_line_once_from_any_cursor() {
        let dir = tempfile::tempdir().unwrap();
        let output = Output::create("job", &dir.path().join("spool"), None).unwrap();
        for batch in 0..10u64 {
            let lines = (0..500)
                .map(|i| Bytes::from(format!("{}", batch * 500 + i + 1)))
                .collect();
            output.append(LogStream::Stdout, lines);
        }
        output.finish();
        for after in [0u64, 1, 1023, 1024, 1025, 2500, 4999, 5000] {
            let mut reader = output.reader(after).unwrap();
            let mut seen = Vec::new();
            while let Some(batch) = reader.next_batch(true).await.unwrap() {
                seen.extend(batch.into_iter().map(|r| r.sequence));
            }
            assert_eq!(
                seen,
                ((after + 1)..=5000).collect::<Vec<_>>(),
                "after {after}"
            );
        }
    }
}
