//! The persist side of the replication stream.
//!
//! [`IpcReceiver::bind`] creates the Unix socket (mode 0600), replacing a stale socket file left
//! by a crashed process but refusing to steal a socket another process still serves.
//! [`IpcReceiver::run`] accepts connections, one task pair each: a reader decodes frames into a
//! bounded queue; a store task takes everything queued (up to `max_batch_messages`) as one
//! batch, hands it to the [`MessageSink`] (up to [`BATCHES_IN_FLIGHT`] at once) and
//! acknowledges batches in order once stored. While the store is busy the next batch grows, so
//! the slower the store (an fsync per batch), the larger its batches: group commit. When the queue is full the reader stops, the socket buffer fills and
//! the sender slows down: memory does not grow.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::BytesMut;
use futures::stream::FuturesOrdered;
use futures::{FutureExt, StreamExt};
use joblet_proto::ipc::{IpcAck, IpcMessage, JobAck, MessageType};
use tokio::io::AsyncWriteExt;
use tokio::net::unix::OwnedWriteHalf;
use tokio::net::{UnixListener, UnixStream};
use tokio_util::codec::FramedRead;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::codec::{DEFAULT_MAX_FRAME_BYTES, FrameCodec, FrameError, encode_frame};
use crate::message::validate;
use crate::metrics as m;
use crate::queue::Queue;

/// Batches handed to the sink at once per connection (a sink may prepare one while it writes
/// the other); the queue holds as many batches again while they are stored.
pub const BATCHES_IN_FLIGHT: usize = 2;
/// Decoded messages moved into the queue under one lock.
const BURST_MESSAGES: usize = 256;
/// Read buffer per connection: large reads mean few syscalls at high rates.
const READ_BUFFER_BYTES: usize = 256 * 1024;

#[derive(Debug, Clone)]
pub struct ReceiverConfig {
    pub socket_path: PathBuf,
    pub max_frame_bytes: usize,
    /// Most messages handed to the sink in one batch.
    pub max_batch_messages: usize,
}

impl ReceiverConfig {
    pub fn new(socket_path: impl Into<PathBuf>) -> Self {
        ReceiverConfig {
            socket_path: socket_path.into(),
            max_frame_bytes: DEFAULT_MAX_FRAME_BYTES,
            max_batch_messages: 8192,
        }
    }
}

/// Where received messages go. `store` returns once the batch is durable by the store's policy;
/// only then is the batch acknowledged. An error closes the connection without an ack, and the
/// sender will send the data again after reconnecting.
pub trait MessageSink: Send + Sync + 'static {
    /// Stores `batch` and hands the vector back, so that its buffer (hundreds of KiB at full
    /// rate) is reused for a later batch instead of being allocated and faulted in again.
    fn store(
        &self,
        batch: Vec<IpcMessage>,
    ) -> impl Future<Output = Result<Vec<IpcMessage>, String>> + Send;
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
        loop {
            let accepted = tokio::select! {
                () = shutdown.cancelled() => break,
                accepted = self.listener.accept() => accepted,
            };
            match accepted {
                Ok((stream, _)) => {
                    let connection = Connection {
                        config: self.config.clone(),
                        stats: self.stats.clone(),
                        sink: sink.clone(),
                        shutdown: shutdown.clone(),
                    };
                    connections.spawn(connection.serve(stream));
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

impl<S: MessageSink> Connection<S> {
    async fn serve(self, stream: UnixStream) {
        self.stats.connections.fetch_add(1, Ordering::Relaxed);
        metrics::gauge!(m::PERSIST_IPC_CONNECTIONS).increment(1.0);
        let (read_half, write_half) = stream.into_split();
        let queue = Arc::new(Queue::new(
            self.config.max_batch_messages * BATCHES_IN_FLIGHT,
        ));
        let store = tokio::spawn(store_and_ack(
            self.sink.clone(),
            queue.clone(),
            self.config.max_batch_messages,
            write_half,
            self.stats.clone(),
            self.config.max_frame_bytes,
        ));
        let frames = FramedRead::with_capacity(
            read_half,
            FrameCodec::<IpcMessage>::new(self.config.max_frame_bytes),
            READ_BUFFER_BYTES,
        );
        self.read_frames(frames, &queue).await;
        queue.close();
        if let Err(error) = store.await {
            tracing::error!(%error, "IPC store task failed");
        }
        self.stats.connections.fetch_sub(1, Ordering::Relaxed);
        metrics::gauge!(m::PERSIST_IPC_CONNECTIONS).decrement(1.0);
    }

    async fn read_frames(
        &self,
        mut frames: FramedRead<tokio::net::unix::OwnedReadHalf, FrameCodec<IpcMessage>>,
        queue: &Queue<IpcMessage>,
    ) {
        let mut burst = Vec::with_capacity(BURST_MESSAGES);
        loop {
            let first = tokio::select! {
                () = self.shutdown.cancelled() => return,
                frame = frames.next() => frame,
            };
            // Take everything already buffered before counting: counters are updated per
            // burst, not per message.
            let mut received = 0u64;
            let mut open = true;
            burst.clear();
            let mut next = Some(first);
            while let Some(frame) = next {
                match self.accept(frame) {
                    None => {
                        open = false;
                        break;
                    }
                    Some(Some(message)) => {
                        received += 1;
                        burst.push(message);
                        if burst.len() == BURST_MESSAGES
                            && queue.push_all(&mut burst).await.is_err()
                        {
                            open = false; // the store task failed and closed the connection
                            break;
                        }
                    }
                    Some(None) => {}
                }
                next = frames.next().now_or_never();
            }
            if open && queue.push_all(&mut burst).await.is_err() {
                open = false;
            }
            self.stats.received.fetch_add(received, Ordering::Relaxed);
            metrics::counter!(m::PERSIST_IPC_MESSAGES_RECEIVED).increment(received);
            if !open {
                return;
            }
        }
    }

    /// The message of a decoded frame: `Some(None)` for a message rejected alone, `None` when
    /// the connection must close.
    fn accept(&self, frame: Option<Result<IpcMessage, FrameError>>) -> Option<Option<IpcMessage>> {
        match frame {
            None => None,
            Some(Ok(message)) => match validate(&message) {
                Ok(_) => Some(Some(message)),
                Err(invalid) => {
                    self.reject(invalid.reason());
                    tracing::warn!(job_id = %message.job_id, reason = invalid.reason(), "rejected IPC message");
                    Some(None)
                }
            },
            Some(Err(FrameError::Io(error))) => {
                tracing::debug!(%error, "IPC connection closed");
                None
            }
            Some(Err(error)) => {
                self.reject(error.reason());
                tracing::warn!(%error, "bad IPC frame; closing the connection");
                None
            }
        }
    }

    fn reject(&self, reason: &'static str) {
        self.stats.rejected.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(m::PERSIST_IPC_FRAMES_REJECTED, "reason" => reason).increment(1);
    }
}

async fn store_and_ack<S: MessageSink>(
    sink: Arc<S>,
    queue: Arc<Queue<IpcMessage>>,
    max_batch: usize,
    mut socket: OwnedWriteHalf,
    stats: Arc<ReceiverStats>,
    max_frame_bytes: usize,
) {
    let mut buffer = BytesMut::new();
    // Up to BATCHES_IN_FLIGHT batches are stored at once (a sink may prepare one while it
    // writes another); they are acknowledged in order.
    let mut storing = FuturesOrdered::new();
    // Batch vectors handed back by the sink, for the next batches.
    let mut spare: Vec<Vec<IpcMessage>> = Vec::new();
    let mut open = true;
    loop {
        let mut batch = spare.pop().unwrap_or_default();
        tokio::select! {
            stored = storing.next(), if !storing.is_empty() => {
                spare.push(batch);
                let Some(stored) = stored else { continue };
                let ack = match stored {
                    Ok((ack, mut done)) => {
                        Vec::clear(&mut done);
                        spare.push(done);
                        ack
                    }
                    Err(error) => {
                        stats.store_errors.fetch_add(1, Ordering::Relaxed);
                        tracing::error!(%error, "storing replicated data failed; closing the connection");
                        queue.close();
                        return;
                    }
                };
                buffer.clear();
                if encode_frame(&ack, max_frame_bytes, &mut buffer).is_err() {
                    tracing::error!("acknowledgement too large to frame");
                    queue.close();
                    return;
                }
                // If the sender went away, keep storing what was already read.
                let _ = socket.write_all(&buffer).await;
            }
            taken = queue.take(&mut batch, max_batch), if open && storing.len() < BATCHES_IN_FLIGHT => {
                if taken == 0 {
                    open = false; // closed and empty: finish what is being stored
                } else {
                    let ack = ack_for(&batch);
                    let sink = sink.clone();
                    storing.push_back(async move { sink.store(batch).await.map(|done| (ack, done)) });
                }
            }
            else => return,
        }
    }
}

/// The highest sequence per job and type in a batch.
fn ack_for(batch: &[IpcMessage]) -> IpcAck {
    let mut highest: HashMap<(&str, i32), u64> = HashMap::new();
    // Messages come in runs of one job and type: one lookup per run.
    for run in batch.chunk_by(|a, b| a.job_id == b.job_id && a.r#type == b.r#type) {
        let top = run.iter().map(|m| m.sequence).max().unwrap_or(0);
        let entry = highest
            .entry((run[0].job_id.as_str(), run[0].r#type))
            .or_default();
        *entry = (*entry).max(top);
    }
    IpcAck {
        jobs: highest
            .into_iter()
            .map(|((job_id, kind), sequence)| JobAck {
                job_id: job_id.to_owned(),
                r#type: MessageType::try_from(kind).unwrap_or_default() as i32,
                sequence,
            })
            .collect(),
    }
}
