//! The persist side of the replication stream.
//!
//! [`IpcReceiver::bind`] creates the Unix socket (mode 0600), replacing a stale socket file left
//! by a crashed process but refusing to steal a socket another process still serves.
//! [`IpcReceiver::run`] accepts connections, one task pair each: a reader checks the frames it
//! reads and queues them, as read, in runs of valid frames (see [`crate::batch`]); a store task
//! takes everything queued (up to about `max_batch_messages`) as one [`Batch`], hands it to the
//! [`MessageSink`] (up to [`BATCHES_IN_FLIGHT`] at once) and acknowledges batches in order once
//! stored and durable (a store may make them durable later, all at once: reading and storing go
//! on meanwhile). While the store is busy the next batch grows, so the slower the store (an fsync per
//! batch), the larger its batches: group commit. When the queue is full the reader stops, the
//! socket buffer fills and the sender slows down: memory does not grow.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use futures::StreamExt;
use futures::stream::FuturesOrdered;
use joblet_proto::ipc::{IpcAck, JobAck, MessageType, Refusal, RefusalReason};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::batch::{self, Batch, Envelope, Stop};
use crate::codec::{DEFAULT_MAX_FRAME_BYTES, FrameError, LENGTH_PREFIX_BYTES, encode_frame};
use crate::metrics as m;
use joblet_daemon::LogLimiter;

/// Batches handed to the sink at once per connection (a sink may prepare one while it writes
/// the other).
pub const BATCHES_IN_FLIGHT: usize = 2;
/// Runs of frames queued per connection while batches are stored. A run is what one read
/// returned (at most the socket's buffer, about 200 KiB): the queue holds a few MiB.
const QUEUED_RUNS: usize = 32;
/// Reads go into buffers of this size (larger when a frame needs it), shared by the runs split
/// off them: one allocation per several reads.
const READ_BUFFER_BYTES: usize = 1024 * 1024;
/// A buffer with less room than this left is replaced before the next read.
const MIN_READ_BYTES: usize = 64 * 1024;
/// Of a frame over the limit, this much of its start is read to learn whose message it is
/// (job id, type, sequence, stream: they come before the content); the rest is skipped.
const OVERSIZED_HEAD_BYTES: usize = 4096;
/// The first bytes of every message senders write: field 1 (version) = 1.
const SENDERS_START: [u8; 2] = [0x08, crate::PROTOCOL_VERSION as u8];
/// A connection that has had nothing to read for this long gives its read buffer back: an idle
/// connection holds no buffer (only its task and the socket's kernel buffers).
const IDLE_RELEASE: std::time::Duration = std::time::Duration::from_secs(1);

#[derive(Debug, Clone)]
pub struct ReceiverConfig {
    pub socket_path: PathBuf,
    pub max_frame_bytes: usize,
    /// Most messages handed to the sink in one batch.
    pub max_batch_messages: usize,
    /// Connections served at once; more are closed as soon as they are accepted, and counted.
    pub max_connections: usize,
}

impl ReceiverConfig {
    pub fn new(socket_path: impl Into<PathBuf>) -> Self {
        ReceiverConfig {
            socket_path: socket_path.into(),
            max_frame_bytes: DEFAULT_MAX_FRAME_BYTES,
            max_batch_messages: 8192,
            max_connections: 16,
        }
    }
}

/// Where received messages go. A batch is acknowledged once `store` has returned and then
/// `durable` has: a store that makes each batch durable as it writes it (the default `durable`
/// is at once) or one that makes everything written so far durable later (a flush), while the
/// connection goes on reading and storing. `store` returns the messages it refused (a payload
/// that does not decode), which the ack reports. An error of either is answered with a
/// `STORE_FAILED` refusal and the connection is closed; the sender backs off and sends the
/// data again after reconnecting.
pub trait MessageSink: Send + Sync + 'static {
    fn store(&self, batch: Batch) -> impl Future<Output = Result<Vec<Refusal>, String>> + Send;

    /// Resolves once everything stored before the call is durable by the store's policy.
    fn durable(&self) -> impl Future<Output = Result<(), String>> + Send {
        std::future::ready(Ok(()))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BindError {
    #[error("socket {path} is in use by another process")]
    InUse { path: PathBuf },
    #[error("{path} exists and is not a socket; refusing to replace it")]
    NotASocket { path: PathBuf },
    #[error(
        "directory {dir} of the socket is writable by others (mode {mode:o}); use a directory only joblet can write"
    )]
    UnsafeDirectory { dir: PathBuf, mode: u32 },
    #[error("cannot bind socket {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

/// Counters of one receiver.
#[derive(Debug, Default)]
pub struct ReceiverStats {
    pub received: AtomicU64,
    pub rejected: AtomicU64,
    pub connections: AtomicU64,
    pub store_errors: AtomicU64,
}

pub struct IpcReceiver {
    listener: UnixListener,
    config: ReceiverConfig,
    stats: Arc<ReceiverStats>,
}

impl IpcReceiver {
    pub async fn bind(config: ReceiverConfig) -> Result<IpcReceiver, BindError> {
        let path = &config.socket_path;
        check_directory(path)?;
        remove_stale_socket(path).await?;
        let io_error = |source| BindError::Io {
            path: path.clone(),
            source,
        };
        let listener = UnixListener::bind(path).map_err(io_error)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(io_error)?;
        Ok(IpcReceiver {
            listener,
            config,
            stats: Arc::new(ReceiverStats::default()),
        })
    }

    pub fn socket_path(&self) -> &Path {
        &self.config.socket_path
    }

    pub fn stats(&self) -> Arc<ReceiverStats> {
        self.stats.clone()
    }

    /// Serves connections until `shutdown` is cancelled; then stops accepting, stores and
    /// acknowledges what each connection already read, and removes the socket file.
    pub async fn run<S: MessageSink>(self, sink: Arc<S>, shutdown: CancellationToken) {
        let connections = TaskTracker::new();
        let slots = Arc::new(tokio::sync::Semaphore::new(self.config.max_connections));
        loop {
            let accepted = tokio::select! {
                () = shutdown.cancelled() => break,
                accepted = self.listener.accept() => accepted,
            };
            match accepted {
                Ok((stream, _)) => {
                    let Ok(slot) = slots.clone().try_acquire_owned() else {
                        drop(stream);
                        metrics::counter!(m::PERSIST_IPC_CONNECTIONS_REFUSED, "reason" => "max_connections").increment(1);
                        if let Some(refused) = CONNECTIONS_REFUSED_LOG.hit() {
                            tracing::warn!(
                                max = self.config.max_connections,
                                refused,
                                "IPC connection refused: ipc.max_connections are open"
                            );
                        }
                        continue;
                    };
                    let connection = Connection {
                        config: self.config.clone(),
                        stats: self.stats.clone(),
                        sink: sink.clone(),
                        shutdown: shutdown.clone(),
                    };
                    connections.spawn(async move {
                        connection.serve(stream).await;
                        drop(slot);
                    });
                }
                Err(error) => {
                    tracing::warn!(%error, "accept on the IPC socket failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            }
        }
        connections.close();
        connections.wait().await;
        let _ = std::fs::remove_file(&self.config.socket_path);
    }
}

/// Refuses a socket directory others may write to, unless it has the sticky bit (like /tmp,
/// the ADR's default), where others can create entries but not remove or replace ours.
fn check_directory(path: &Path) -> Result<(), BindError> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let metadata = std::fs::metadata(dir).map_err(|source| BindError::Io {
        path: path.to_owned(),
        source,
    })?;
    let mode = metadata.permissions().mode() & 0o7777;
    let others_write = mode & 0o002 != 0;
    let sticky = mode & 0o1000 != 0;
    if others_write && !sticky {
        return Err(BindError::UnsafeDirectory {
            dir: dir.to_owned(),
            mode,
        });
    }
    if others_write {
        tracing::warn!(dir = %dir.display(), "the IPC socket's directory is world-writable (sticky); a private directory is safer");
    }
    Ok(())
}

async fn remove_stale_socket(path: &Path) -> Result<(), BindError> {
    let metadata = match std::fs::symlink_metadata(path) {
        Ok(metadata) => metadata,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(BindError::Io {
                path: path.to_owned(),
                source,
            });
        }
    };
    if !metadata.file_type().is_socket() {
        return Err(BindError::NotASocket {
            path: path.to_owned(),
        });
    }
    if UnixStream::connect(path).await.is_ok() {
        return Err(BindError::InUse {
            path: path.to_owned(),
        });
    }
    tracing::info!(socket = %path.display(), "removing stale socket file");
    std::fs::remove_file(path).map_err(|source| BindError::Io {
        path: path.to_owned(),
        source,
    })
}

struct Connection<S> {
    config: ReceiverConfig,
    stats: Arc<ReceiverStats>,
    sink: Arc<S>,
    shutdown: CancellationToken,
}

/// A run of whole, valid frames as read from the socket, how many messages it holds and the
/// acknowledgement it earns once stored (with what was refused before it).
struct Run {
    frames: Bytes,
    messages: usize,
    highest: Highest,
    refused: Vec<Refusal>,
}

/// The highest sequence per job and type of the messages seen, noted while they are scanned
/// (messages come in runs of one job and type: one entry per run).
#[derive(Default)]
struct Highest(Vec<JobAck>);

impl Highest {
    fn see(&mut self, envelope: &Envelope<'_>) {
        match self.0.last_mut() {
            Some(last) if last.job_id == envelope.job_id && last.r#type == envelope.r#type => {
                last.sequence = last.sequence.max(envelope.sequence);
            }
            _ => self.0.push(JobAck {
                job_id: envelope.job_id.to_owned(),
                r#type: envelope.r#type,
                sequence: envelope.sequence,
            }),
        }
    }

    /// One acknowledgement for all of `runs`.
    fn ack(runs: Vec<Highest>, refused: Vec<Refusal>) -> IpcAck {
        let mut highest: HashMap<(String, i32), u64> = HashMap::new();
        for ack in runs.into_iter().flat_map(|run| run.0) {
            let entry = highest.entry((ack.job_id, ack.r#type)).or_default();
            *entry = (*entry).max(ack.sequence);
        }
        IpcAck {
            jobs: highest
                .into_iter()
                .map(|((job_id, r#type), sequence)| JobAck {
                    job_id,
                    r#type,
                    sequence,
                })
                .collect(),
            refused,
        }
    }
}

impl<S: MessageSink> Connection<S> {
    /// Every log line of a connection carries its span: `ipc_connection{id=N}`.
    #[tracing::instrument(name = "ipc_connection", skip_all, fields(id = self.stats.connections.load(Ordering::Relaxed) + 1))]
    async fn serve(self, stream: UnixStream) {
        self.stats.connections.fetch_add(1, Ordering::Relaxed);
        metrics::gauge!(m::PERSIST_IPC_CONNECTIONS).increment(1.0);
        let (read_half, write_half) = stream.into_split();
        let (runs, queued) = mpsc::channel(QUEUED_RUNS);
        let store = tokio::spawn(store_and_ack(
            self.sink.clone(),
            queued,
            self.config.max_batch_messages,
            write_half,
            self.stats.clone(),
            self.config.max_frame_bytes,
        ));
        self.read_frames(read_half, &runs).await;
        drop(runs);
        if let Err(error) = store.await {
            tracing::error!(%error, "IPC store task failed");
        }
        self.stats.connections.fetch_sub(1, Ordering::Relaxed);
        metrics::gauge!(m::PERSIST_IPC_CONNECTIONS).decrement(1.0);
    }

    /// Reads the socket and queues what it read as runs of valid frames, until the sender
    /// closes the connection, a frame cannot be trusted, the store fails or shutdown.
    async fn read_frames(&self, mut socket: OwnedReadHalf, runs: &mpsc::Sender<Run>) {
        let max_frame_bytes = self.config.max_frame_bytes;
        let mut buffer = BytesMut::new();
        // Bytes of a refused frame still to be read and thrown away.
        let mut skip = 0usize;
        loop {
            // Queue the valid frames at the front; skip an invalid one alone and go on.
            let need = loop {
                // What is left of a refused frame is thrown away as it arrives.
                if skip > 0 {
                    let skipped = skip.min(buffer.len());
                    buffer.advance(skipped);
                    skip -= skipped;
                    if skip > 0 {
                        break 0;
                    }
                }
                let mut highest = Highest::default();
                let scan = batch::scan(&buffer, max_frame_bytes, |e| highest.see(e));
                if scan.messages > 0 {
                    let run = Run {
                        frames: buffer.split_to(scan.bytes).freeze(),
                        messages: scan.messages,
                        highest,
                        refused: Vec::new(),
                    };
                    self.stats
                        .received
                        .fetch_add(scan.messages as u64, Ordering::Relaxed);
                    metrics::counter!(m::PERSIST_IPC_MESSAGES_RECEIVED)
                        .increment(scan.messages as u64);
                    if runs.send(run).await.is_err() {
                        return; // the store task failed and closed the connection
                    }
                }
                match scan.stop {
                    Stop::NeedMore(bytes) => break bytes,
                    Stop::Invalid { frame_bytes, why } => {
                        let envelope = Envelope::read(&buffer[LENGTH_PREFIX_BYTES..frame_bytes]);
                        let job_id = envelope.map(|e| e.job_id).unwrap_or_default();
                        if let Some(rejected) = REJECTED_LOG.hit() {
                            tracing::warn!(
                                job_id,
                                reason = why.reason(),
                                rejected,
                                "rejected IPC message (logged at most once a minute, with how many since; all are counted in joblet_persist_ipc_frames_rejected_total)"
                            );
                        }
                        self.reject(why.reason());
                        buffer.advance(frame_bytes);
                    }
                    Stop::Oversized { len } => {
                        // Its head says whose it is: refused in-band, and skipped. A frame
                        // that does not start as senders start theirs (version 1 first) is
                        // garbage, not waited for.
                        let head = LENGTH_PREFIX_BYTES + len.min(OVERSIZED_HEAD_BYTES);
                        let body = &buffer[LENGTH_PREFIX_BYTES..head.min(buffer.len())];
                        let plausible = body.iter().zip(SENDERS_START).all(|(a, b)| *a == b);
                        if plausible && buffer.len() < head {
                            break head - buffer.len();
                        }
                        let refused = plausible
                            .then(|| refuse_oversized(body, len, max_frame_bytes))
                            .flatten();
                        let Some(run) = refused else {
                            let error = FrameError::Oversized {
                                len,
                                max: max_frame_bytes,
                            };
                            return self.close_on(error);
                        };
                        self.reject("oversized");
                        count_ingest_error(RefusalReason::FrameTooLarge, 1);
                        if let Some(refused) = OVERSIZED_LOG.hit() {
                            let refusal = &run.refused[0];
                            tracing::warn!(
                                job_id = refusal.job_id,
                                sequence = refusal.sequence,
                                len,
                                max = max_frame_bytes,
                                refused,
                                "refused an IPC frame over ipc.max_frame_size; a log line is stored as a gap marker (logged at most once a minute, with how many since)"
                            );
                        }
                        if runs.send(run).await.is_err() {
                            return;
                        }
                        skip = LENGTH_PREFIX_BYTES + len;
                    }
                    Stop::Undecodable(error) => return self.close_on(error.into()),
                }
            };
            // Nothing buffered: wait until there is something to read before taking a
            // buffer, and give the buffer back if nothing comes for a while.
            if buffer.is_empty() {
                let readable = tokio::select! {
                    () = self.shutdown.cancelled() => return,
                    readable = tokio::time::timeout(IDLE_RELEASE, socket.readable()) => readable,
                };
                match readable {
                    Err(_idle) => {
                        buffer = BytesMut::new();
                        tokio::select! {
                            () = self.shutdown.cancelled() => return,
                            _ = socket.readable() => {}
                        }
                    }
                    Ok(Err(error)) => {
                        tracing::debug!(%error, "IPC connection closed");
                        return;
                    }
                    Ok(Ok(())) => {}
                }
            }
            // Room for the rest of the frame, and for a large read: one allocation serves
            // several reads, and the runs split off it share it.
            if buffer.capacity() - buffer.len() < need.max(MIN_READ_BYTES) {
                buffer.reserve(need.max(READ_BUFFER_BYTES));
            }
            let read = tokio::select! {
                () = self.shutdown.cancelled() => return,
                read = socket.read_buf(&mut buffer) => read,
            };
            match read {
                Ok(0) if buffer.is_empty() => return,
                Ok(0) => {
                    let remaining = buffer.len();
                    return self.close_on(FrameError::Truncated { remaining });
                }
                Ok(_) => {}
                Err(error) => {
                    tracing::debug!(%error, "IPC connection closed");
                    return;
                }
            }
        }
    }

    fn close_on(&self, error: FrameError) {
        self.reject(error.reason());
        if let Some(closed) = BAD_FRAME_LOG.hit() {
            tracing::warn!(%error, closed, "bad IPC frame; closing the connection (logged at most once a minute, with how many since)");
        }
    }

    fn reject(&self, reason: &'static str) {
        self.stats.rejected.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(m::PERSIST_IPC_FRAMES_REJECTED, "reason" => reason).increment(1);
    }
}

/// A failing store fails every batch of every reconnect: logged at the first failure, then at
/// most once a minute with the count.
static STORE_ERROR_LOG: LogLimiter = LogLimiter::new(Duration::from_secs(60));
/// A sender writing garbage must not flood the log: one line a minute per kind, with a count.
static REJECTED_LOG: LogLimiter = LogLimiter::new(Duration::from_secs(60));
static BAD_FRAME_LOG: LogLimiter = LogLimiter::new(Duration::from_secs(60));
static OVERSIZED_LOG: LogLimiter = LogLimiter::new(Duration::from_secs(60));
/// Refused connections: logged at the first, then at most once a minute.
static CONNECTIONS_REFUSED_LOG: LogLimiter = LogLimiter::new(Duration::from_secs(60));

/// What a frame over the limit becomes, from its head (`body`, the frame's first bytes): a
/// refusal, and for a log line a gap marker stored in its place; `None` when the head does
/// not say whose message it is (the connection is then closed, as for any frame that cannot
/// be trusted).
fn refuse_oversized(body: &[u8], len: usize, max_frame_bytes: usize) -> Option<Run> {
    let head = Envelope::read_head(body)?;
    let kind = head.envelope.validate().ok()?;
    let detail = format!(
        "frame of {len} bytes is over joblet-persist's ipc.max_frame_size ({max_frame_bytes} bytes)"
    );
    let mut highest = Highest::default();
    highest.see(&head.envelope);
    let refusal = Refusal {
        reason: RefusalReason::FrameTooLarge as i32,
        job_id: head.envelope.job_id.to_owned(),
        r#type: kind as i32,
        sequence: head.envelope.sequence,
        detail: detail.clone(),
    };
    let (frames, messages) = if kind == MessageType::Log {
        let stream = crate::Stream::try_from(head.stream).unwrap_or(crate::Stream::Stdout);
        let gap = crate::gap_message(
            head.envelope.job_id,
            head.envelope.sequence,
            head.envelope.timestamp,
            stream,
            1,
            &detail,
        );
        let mut frame = BytesMut::new();
        encode_frame(&gap, usize::MAX, &mut frame).ok()?;
        (frame.freeze(), 1)
    } else {
        (Bytes::new(), 0)
    };
    Some(Run {
        frames,
        messages,
        highest,
        refused: vec![refusal],
    })
}

/// `joblet_persist_ingest_errors_total{reason}`.
fn count_ingest_error(reason: RefusalReason, messages: u64) {
    let reason = m::refusal_label(reason);
    metrics::counter!(m::PERSIST_INGEST_ERRORS, "reason" => reason).increment(messages);
}

/// The ack of a batch stored (or made durable), or after logging why not, the refusal that
/// answers it.
fn stored_or_refused(
    stored: Result<IpcAck, String>,
    stats: &ReceiverStats,
) -> Result<IpcAck, IpcAck> {
    stored.map_err(|error| {
        stats.store_errors.fetch_add(1, Ordering::Relaxed);
        count_ingest_error(RefusalReason::StoreFailed, 1);
        if let Some(since_last) = STORE_ERROR_LOG.hit() {
            tracing::error!(%error, failures_since_last_report = since_last, "storing replicated data failed; refusing and closing the connection (the sender retries with backoff)");
        }
        IpcAck {
            jobs: Vec::new(),
            refused: vec![Refusal {
                reason: RefusalReason::StoreFailed as i32,
                detail: error,
                ..Default::default()
            }],
        }
    })
}

/// Writes `ack`; `false` when it cannot be framed (which ends the connection).
async fn send_ack(
    ack: &IpcAck,
    socket: &mut OwnedWriteHalf,
    buffer: &mut BytesMut,
    max_frame_bytes: usize,
) -> bool {
    buffer.clear();
    if encode_frame(ack, max_frame_bytes, buffer).is_err() {
        tracing::error!("acknowledgement too large to frame");
        return false;
    }
    // If the sender went away, keep storing what was already read.
    let _ = socket.write_all(buffer).await;
    true
}

async fn store_and_ack<S: MessageSink>(
    sink: Arc<S>,
    mut queued: mpsc::Receiver<Run>,
    max_batch: usize,
    mut socket: OwnedWriteHalf,
    stats: Arc<ReceiverStats>,
    max_frame_bytes: usize,
) {
    let mut buffer = BytesMut::new();
    // Up to BATCHES_IN_FLIGHT batches are stored at once (a sink may prepare one while it
    // writes another); they are acknowledged in order.
    let mut storing = FuturesOrdered::new();
    // Stored batches waiting to be durable, in order; they do not hold up reading and storing.
    let mut settling = FuturesOrdered::new();
    let mut open = true;
    loop {
        tokio::select! {
            stored = storing.next(), if !storing.is_empty() => {
                let Some(stored) = stored else { continue };
                let ack = match stored_or_refused(stored, &stats) {
                    Ok(ack) => ack,
                    Err(refusal) => {
                        // Acknowledge what was stored before, then say why no more.
                        while let Some(Ok(ack)) = settling.next().await {
                            if !send_ack(&ack, &mut socket, &mut buffer, max_frame_bytes).await {
                                return;
                            }
                        }
                        send_ack(&refusal, &mut socket, &mut buffer, max_frame_bytes).await;
                        return; // dropping `queued` stops the reader
                    }
                };
                let sink = sink.clone();
                settling.push_back(async move { sink.durable().await.map(|()| ack) });
            }
            settled = settling.next(), if !settling.is_empty() => {
                let Some(settled) = settled else { continue };
                let ack = match stored_or_refused(settled, &stats) {
                    Ok(ack) => ack,
                    Err(refusal) => {
                        send_ack(&refusal, &mut socket, &mut buffer, max_frame_bytes).await;
                        return;
                    }
                };
                if !send_ack(&ack, &mut socket, &mut buffer, max_frame_bytes).await {
                    return;
                }
            }
            run = queued.recv(), if open && storing.len() < BATCHES_IN_FLIGHT => {
                let Some(run) = run else {
                    open = false; // the reader is done: finish what is being stored
                    continue;
                };
                // Everything queued, up to about `max_batch` messages, goes as one batch.
                let mut batch = Batch::default();
                let mut highest = vec![run.highest];
                let mut refused = run.refused;
                batch.push(run.frames, run.messages);
                while batch.len() < max_batch {
                    let Ok(run) = queued.try_recv() else { break };
                    batch.push(run.frames, run.messages);
                    highest.push(run.highest);
                    refused.extend(run.refused);
                }
                let sink = sink.clone();
                storing.push_back(async move {
                    let mut ack = Highest::ack(highest, refused);
                    let refused = sink.store(batch).await?;
                    if !refused.is_empty() {
                        count_ingest_error(RefusalReason::BadPayload, refused.len() as u64);
                    }
                    ack.refused.extend(refused);
                    Ok::<_, String>(ack)
                });
            }
            else => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::{log_message, metric_message};
    use joblet_proto::ipc::{MetricData, Stream};

    #[test]
    fn an_ack_holds_the_highest_sequence_per_job_and_type_across_runs() {
        let log = |job: &str, sequence| log_message(job, sequence, 1, Stream::Stdout, "x".into());
        let metric = |job: &str, sequence| metric_message(job, sequence, 1, &MetricData::default());
        let runs = [
            vec![log("a", 7), log("a", 8), metric("a", 2), log("b", 1)],
            vec![log("a", 6), metric("a", 3), log("a", 9), metric("b", 5)],
        ];
        let highest = runs
            .iter()
            .map(|run| {
                let mut highest = Highest::default();
                Batch::from_messages(run)
                    .iter()
                    .for_each(|e| highest.see(&e));
                highest
            })
            .collect();
        let mut acks: Vec<(String, MessageType, u64)> = Highest::ack(highest, Vec::new())
            .jobs
            .into_iter()
            .map(|ack| (ack.job_id.clone(), ack.r#type(), ack.sequence))
            .collect();
        acks.sort();
        let expected = [
            ("a", MessageType::Log, 9),
            ("a", MessageType::Metric, 3),
            ("b", MessageType::Log, 1),
            ("b", MessageType::Metric, 5),
        ]
        .map(|(job, kind, sequence)| (job.to_owned(), kind, sequence));
        assert_eq!(acks, expected);
    }
}
