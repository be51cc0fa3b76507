//! The core side of the replication stream.
//!
//! Messages go into a bounded queue (`buffer_size` messages), encoded as frames straight into
//! its buffer from a [`Frame`] (borrowed data: [`Frame::log`], [`Frame::metric`], or an
//! `&IpcMessage`). [`IpcSender::send`] waits for room (core's replication, which reads the spool
//! behind the job, uses it: nothing is dropped); [`IpcSender::try_send`] never waits and, when
//! the queue is full, drops the message and counts the drop by reason, for callers that must
//! never wait. One writer task takes everything queued at once and writes it with a single
//! call, reconnecting with exponential backoff and jitter when the socket is missing or breaks.
//! A connection that ends without a single acknowledgement (persist failing to store: disk
//! full, a frame over its limit) counts as a failed attempt too: the next one waits longer, up
//! to `reconnect_delay`, instead of reconnecting and resending at once; the refusals are logged
//! when they start, once a minute while they last, and when they end.
//! A batch whose write failed is written again first after the reconnect (persist stores
//! idempotently, so a partial write is harmless).
//!
//! A second task per connection reads persist's acknowledgements and records, per job and type,
//! the highest acknowledged sequence (see the crate docs for what an ack promises).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use futures::StreamExt;
use joblet_daemon::LogLimiter;
use joblet_proto::ipc::{IpcAck, MessageType, Refusal, RefusalReason};
use rand::Rng;
use tokio::io::AsyncWriteExt;
use tokio::net::UnixStream;
use tokio::net::unix::OwnedWriteHalf;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::codec::FramedRead;
use tokio_util::sync::CancellationToken;

use crate::codec::{DEFAULT_MAX_FRAME_BYTES, FrameCodec};
use crate::message::Frame;
use crate::metrics as m;
use crate::queue::{FrameQueue, PushError};

/// First reconnect delay; it doubles up to `reconnect_delay`.
const INITIAL_BACKOFF: Duration = Duration::from_millis(50);
/// While persist keeps refusing (connections that end without an acknowledgement), a summary
/// is logged this often.
const REFUSAL_SUMMARY_INTERVAL: Duration = Duration::from_secs(60);
/// How long shutdown waits to flush what is still queued.
const SHUTDOWN_FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone)]
pub struct SenderConfig {
    pub socket_path: PathBuf,
    /// Queue capacity in messages (ADR default 10000). When full, `try_send` drops and counts.
    pub buffer_size: usize,
    /// Upper bound of the reconnect backoff (ADR default 5s).
    pub reconnect_delay: Duration,
    pub max_frame_bytes: usize,
}

impl SenderConfig {
    pub fn new(socket_path: impl Into<PathBuf>) -> Self {
        SenderConfig {
            socket_path: socket_path.into(),
            buffer_size: 10_000,
            reconnect_delay: Duration::from_secs(5),
            max_frame_bytes: DEFAULT_MAX_FRAME_BYTES,
        }
    }
}

/// Why a message was not queued. Every one of these is also counted in
/// `joblet_ipc_messages_dropped_total{reason}` — except `Closed`, which means shutdown began.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    #[error("replication queue is full")]
    QueueFull,
    #[error("replication queue is full and persist is disconnected")]
    Disconnected,
    #[error("message of {len} bytes exceeds the frame limit")]
    Oversized { len: usize },
    #[error("sender is shut down")]
    Closed,
}

impl SendError {
    pub fn reason(self) -> &'static str {
        match self {
            SendError::QueueFull => "queue_full",
            SendError::Disconnected => "disconnected",
            SendError::Oversized { .. } => "oversized",
            SendError::Closed => "shutdown",
        }
    }
}

/// Counters of one sender, readable at any time.
#[derive(Debug, Default)]
pub struct SenderStats {
    pub sent: AtomicU64,
    pub dropped_queue_full: AtomicU64,
    pub dropped_disconnected: AtomicU64,
    pub dropped_oversized: AtomicU64,
    pub dropped_shutdown: AtomicU64,
    pub reconnects: AtomicU64,
}

impl SenderStats {
    pub fn dropped(&self) -> u64 {
        self.dropped_queue_full.load(Ordering::Relaxed)
            + self.dropped_disconnected.load(Ordering::Relaxed)
            + self.dropped_oversized.load(Ordering::Relaxed)
            + self.dropped_shutdown.load(Ordering::Relaxed)
    }

    fn count_drop(&self, error: SendError, messages: u64) {
        let counter = match error {
            SendError::QueueFull => &self.dropped_queue_full,
            SendError::Disconnected => &self.dropped_disconnected,
            SendError::Oversized { .. } => &self.dropped_oversized,
            SendError::Closed => &self.dropped_shutdown,
        };
        counter.fetch_add(messages, Ordering::Relaxed);
        metrics::counter!(m::IPC_MESSAGES_DROPPED, "reason" => error.reason()).increment(messages);
    }
}

struct Shared {
    config: SenderConfig,
    stats: SenderStats,
    connected: AtomicBool,
    /// Per job: highest acknowledged sequence for logs ([0]), metrics ([1]) and the job's
    /// record ([2]).
    acks: Mutex<HashMap<String, [u64; 3]>>,
    /// Incremented on every successful connect; core watches it to replay after a reconnect.
    connection_generation: watch::Sender<u64>,
    /// Acknowledgement frames received, over all connections: a connection during which this
    /// did not grow made no progress.
    acks_received: AtomicU64,
    /// Why persist last refused to store (its `STORE_FAILED` detail, or that it closed
    /// connections without acknowledging), until it acknowledges again.
    refusing: Mutex<Option<String>>,
}

impl Shared {
    /// Whether persist acknowledged something since `acks_received` was `acks`, and is not
    /// refusing to store now.
    fn progressed_since(&self, acks: u64) -> bool {
        self.acks_received.load(Ordering::Relaxed) > acks
            && joblet_daemon::lock(&self.refusing).is_none()
    }
}

/// Handle to the replication stream. Cheap to clone; all clones feed the same queue.
#[derive(Clone)]
pub struct IpcSender {
    queue: Arc<FrameQueue>,
    shared: Arc<Shared>,
}

impl IpcSender {
    /// Starts the writer task. It runs until `shutdown` is cancelled, then flushes what is
    /// queued (if connected, for at most a few seconds) and ends.
    pub fn start(config: SenderConfig, shutdown: CancellationToken) -> (IpcSender, JoinHandle<()>) {
        let queue = Arc::new(FrameQueue::new(config.buffer_size.max(1)));
        metrics::gauge!(m::IPC_QUEUE_CAPACITY).set(config.buffer_size as f64);
        metrics::gauge!(m::IPC_CONNECTED).set(0.0);
        let shared = Arc::new(Shared {
            config,
            stats: SenderStats::default(),
            connected: AtomicBool::new(false),
            acks: Mutex::new(HashMap::new()),
            connection_generation: watch::Sender::new(0),
            acks_received: AtomicU64::new(0),
            refusing: Mutex::new(None),
        });
        let writer = Writer {
            shared: shared.clone(),
            queue: queue.clone(),
            pending: BytesMut::new(),
            pending_messages: 0,
            shutdown,
            refusals: Refusals::default(),
            acks_at_connect: 0,
        };
        let task = tokio::spawn(writer.run());
        (IpcSender { queue, shared }, task)
    }

    /// Queues `message` without waiting. On error the message is dropped and counted.
    pub fn try_send<'a>(&self, message: impl Into<Frame<'a>>) -> Result<(), SendError> {
        let frame = message.into();
        let result = self.check_size(&frame).and_then(|()| {
            self.queue.try_push(&frame).map_err(|error| match error {
                PushError::Full if self.is_connected() => SendError::QueueFull,
                PushError::Full => SendError::Disconnected,
                PushError::Closed => SendError::Closed,
            })
        });
        if let Err(error) = result {
            self.shared.stats.count_drop(error, 1);
        }
        result
    }

    /// Queues `message`, waiting for room. For replay and bulk transfers that may wait; the job
    /// path uses [`IpcSender::try_send`].
    pub async fn send<'a>(&self, message: impl Into<Frame<'a>>) -> Result<(), SendError> {
        let frame = message.into();
        let result = match self.check_size(&frame) {
            Ok(()) => self.queue.push(&frame).await.map_err(|_| SendError::Closed),
            Err(error) => Err(error),
        };
        if let Err(error) = result {
            self.shared.stats.count_drop(error, 1);
        }
        result
    }

    fn check_size(&self, frame: &Frame) -> Result<(), SendError> {
        let len = frame.body_len();
        if len > self.shared.config.max_frame_bytes {
            return Err(SendError::Oversized { len });
        }
        Ok(())
    }

    /// Highest sequence of `job_id` and `kind` that persist acknowledged (0 = none yet).
    pub fn acknowledged(&self, job_id: &str, kind: MessageType) -> u64 {
        let acks = joblet_daemon::lock(&self.shared.acks);
        acks.get(job_id)
            .map_or(0, |by_kind| by_kind[ack_slot(kind)])
    }

    /// Records that persist is known to hold `job_id`'s `kind` up to `sequence` (from an
    /// earlier run's checkpoint); acknowledgements only grow.
    pub fn seed_acknowledged(&self, job_id: &str, kind: MessageType, sequence: u64) {
        if sequence == 0 {
            return;
        }
        let mut acks = joblet_daemon::lock(&self.shared.acks);
        let entry = acks.entry(job_id.to_owned()).or_default();
        let slot = &mut entry[ack_slot(kind)];
        *slot = (*slot).max(sequence);
    }

    /// Forgets the acknowledgements of a job (call when the job is deleted).
    pub fn forget_job(&self, job_id: &str) {
        let mut acks = joblet_daemon::lock(&self.shared.acks);
        acks.remove(job_id);
    }

    pub fn is_connected(&self) -> bool {
        self.shared.connected.load(Ordering::Relaxed)
    }

    /// Why persist refuses what it is sent (it cannot store), while it does.
    pub fn refusing(&self) -> Option<String> {
        joblet_daemon::lock(&self.shared.refusing).clone()
    }

    /// A receiver of the connection generation: it changes every time the sender connects.
    pub fn connections(&self) -> watch::Receiver<u64> {
        self.shared.connection_generation.subscribe()
    }

    pub fn stats(&self) -> &SenderStats {
        &self.shared.stats
    }

    /// Messages waiting in the queue.
    pub fn queue_depth(&self) -> usize {
        self.queue.len()
    }
}

fn ack_slot(kind: MessageType) -> usize {
    match kind {
        MessageType::Metric => 1,
        MessageType::Job => 2,
        MessageType::Log | MessageType::Unspecified => 0,
    }
}

struct Writer {
    shared: Arc<Shared>,
    queue: Arc<FrameQueue>,
    /// The frames being written, and how many; kept across a reconnect when their write
    /// failed.
    pending: BytesMut,
    pending_messages: usize,
    shutdown: CancellationToken,
    /// Connections that ended without an acknowledgement, until one makes progress.
    refusals: Refusals,
    /// `acks_received` when the current connection was made.
    acks_at_connect: u64,
}

enum ConnectionEnd {
    Shutdown,
    Broken,
}

impl Writer {
    async fn run(mut self) {
        let mut backoff = INITIAL_BACKOFF;
        let mut ever_connected = false;
        let mut warned = false;
        loop {
            self.publish_queue_depth();
            metrics::counter!(m::IPC_CONNECT_ATTEMPTS).increment(1);
            let connect = UnixStream::connect(&self.shared.config.socket_path);
            let stream = tokio::select! {
                () = self.shutdown.cancelled() => break,
                result = connect => result,
            };
            let stream = match stream {
                Ok(stream) => stream,
                Err(error) => {
                    if !warned {
                        tracing::warn!(
                            socket = %self.shared.config.socket_path.display(),
                            %error,
                            "cannot reach joblet-persist; replication waits and retries"
                        );
                        warned = true;
                    }
                    let delay = jitter(backoff);
                    backoff = (backoff * 2).min(self.shared.config.reconnect_delay);
                    tokio::select! {
                        () = self.shutdown.cancelled() => break,
                        () = tokio::time::sleep(delay) => continue,
                    }
                }
            };
            warned = false;
            if ever_connected {
                self.shared.stats.reconnects.fetch_add(1, Ordering::Relaxed);
                metrics::counter!(m::IPC_RECONNECTS).increment(1);
            }
            ever_connected = true;
            if self.refusals.count == 0 {
                tracing::info!(socket = %self.shared.config.socket_path.display(), "connected to joblet-persist");
            }
            let acks_before = self.shared.acks_received.load(Ordering::Relaxed);
            self.acks_at_connect = acks_before;
            let (read_half, write_half) = stream.into_split();
            let ack_reader = tokio::spawn(read_acks(
                FramedRead::new(
                    read_half,
                    FrameCodec::<IpcAck>::new(self.shared.config.max_frame_bytes),
                ),
                self.shared.clone(),
            ));
            self.set_connected(true);
            self.shared
                .connection_generation
                .send_modify(|generation| *generation += 1);
            let end = self.write_until_broken(write_half, ack_reader).await;
            self.set_connected(false);
            if let ConnectionEnd::Shutdown = end {
                return;
            }
            if self.shared.progressed_since(acks_before) {
                // It worked for a while: try again at once.
                self.refusals.recovered();
                backoff = INITIAL_BACKOFF;
                tracing::warn!("connection to joblet-persist lost; reconnecting");
                continue;
            }
            // persist took the connection but acknowledged nothing (a store error, disk full):
            // wait longer each time instead of resending at once.
            let why = {
                let mut refusing = joblet_daemon::lock(&self.shared.refusing);
                refusing
                    .get_or_insert_with(|| {
                        "it closed the connection without acknowledging anything".to_owned()
                    })
                    .clone()
            };
            self.refusals.note(backoff, &why);
            let delay = jitter(backoff);
            backoff = (backoff * 2).min(self.shared.config.reconnect_delay);
            tokio::select! {
                () = self.shutdown.cancelled() => break,
                () = tokio::time::sleep(delay) => {}
            }
        }
        // Shut down while disconnected: whatever is queued cannot be delivered.
        self.queue.close();
        let lost = self.take_all();
        if lost > 0 {
            self.shared.stats.count_drop(SendError::Closed, lost as u64);
        }
    }

    async fn write_until_broken(
        &mut self,
        mut socket: OwnedWriteHalf,
        mut ack_reader: JoinHandle<()>,
    ) -> ConnectionEnd {
        loop {
            if self.pending_messages == 0 {
                self.pending.clear();
                tokio::select! {
                    biased;
                    received = self.queue.take(&mut self.pending) => {
                        if received == 0 {
                            return ConnectionEnd::Shutdown;
                        }
                        self.pending_messages = received;
                    }
                    _ = &mut ack_reader => return ConnectionEnd::Broken,
                    () = self.shutdown.cancelled() => {
                        self.flush_on_shutdown(socket).await;
                        ack_reader.abort();
                        return ConnectionEnd::Shutdown;
                    }
                }
            }
            self.publish_queue_depth();
            if self.write_pending(&mut socket).await.is_err() {
                ack_reader.abort();
                return ConnectionEnd::Broken;
            }
            if self.refusals.count > 0 && self.shared.progressed_since(self.acks_at_connect) {
                self.refusals.recovered();
            }
        }
    }

    async fn write_pending(&mut self, socket: &mut OwnedWriteHalf) -> std::io::Result<()> {
        let started = Instant::now();
        socket.write_all(&self.pending).await?;
        metrics::histogram!(m::IPC_WRITE_DURATION).record(started.elapsed().as_secs_f64());
        let written = std::mem::take(&mut self.pending_messages) as u64;
        self.pending.clear();
        self.shared.stats.sent.fetch_add(written, Ordering::Relaxed);
        metrics::counter!(m::IPC_MESSAGES_SENT).increment(written);
        Ok(())
    }

    async fn flush_on_shutdown(&mut self, mut socket: OwnedWriteHalf) {
        self.queue.close();
        let flush = async {
            loop {
                if self.pending_messages == 0 {
                    self.pending.clear();
                    self.pending_messages = self.queue.take(&mut self.pending).await;
                    if self.pending_messages == 0 {
                        return Ok(());
                    }
                }
                self.write_pending(&mut socket).await?;
            }
        };
        let result: std::io::Result<()> =
            match tokio::time::timeout(SHUTDOWN_FLUSH_TIMEOUT, flush).await {
                Ok(result) => result,
                Err(_) => Err(std::io::ErrorKind::TimedOut.into()),
            };
        if let Err(error) = result {
            let lost = self.take_all();
            tracing::warn!(%error, lost, "could not flush the replication queue at shutdown");
            self.shared.stats.count_drop(SendError::Closed, lost as u64);
        }
        let _ = socket.shutdown().await;
    }

    /// Drops what is pending and queued (the queue is closed); returns how many messages.
    fn take_all(&mut self) -> usize {
        let mut rest = BytesMut::new();
        let lost = std::mem::take(&mut self.pending_messages) + self.queue.try_take(&mut rest);
        self.pending.clear();
        lost
    }

    fn set_connected(&self, connected: bool) {
        self.shared.connected.store(connected, Ordering::Relaxed);
        metrics::gauge!(m::IPC_CONNECTED).set(if connected { 1.0 } else { 0.0 });
    }

    fn publish_queue_depth(&self) {
        metrics::gauge!(m::IPC_QUEUE_DEPTH).set(self.queue.len() as f64);
    }
}

/// Connections persist ended without acknowledging anything, logged when they start, every
/// [`REFUSAL_SUMMARY_INTERVAL`] while they go on (with the latest reason), and when they
/// stop: not once per attempt. A changed reason waits for the next summary too: one failure
/// often shows as two reasons in a row (a full disk fails a flush, then the next write), and
/// a reason naming a different file each time must not flood the log.
#[derive(Default)]
struct Refusals {
    count: u64,
    since: Option<Instant>,
    reported: Option<Instant>,
    reported_count: u64,
}

impl Refusals {
    fn note(&mut self, backoff: Duration, why: &str) {
        self.count += 1;
        let now = Instant::now();
        let since = *self.since.get_or_insert(now);
        match self.reported {
            None => tracing::warn!(
                why,
                "joblet-persist refuses to store replicated data; replication waits and \
                 retries with backoff"
            ),
            Some(at) if now.duration_since(at) >= REFUSAL_SUMMARY_INTERVAL => tracing::warn!(
                why,
                attempts = self.count - self.reported_count,
                failing_for = ?now.duration_since(since),
                next_retry_within = ?backoff,
                "joblet-persist still refuses; replication waits"
            ),
            Some(_) => return,
        }
        self.reported = Some(now);
        self.reported_count = self.count;
    }

    fn recovered(&mut self) {
        if let Some(since) = self.since.take() {
            tracing::info!(
                attempts = self.count,
                after = ?since.elapsed(),
                "joblet-persist acknowledges again"
            );
        }
        *self = Refusals::default();
    }
}

async fn read_acks(
    mut acks: FramedRead<tokio::net::unix::OwnedReadHalf, FrameCodec<IpcAck>>,
    shared: Arc<Shared>,
) {
    while let Some(frame) = acks.next().await {
        let ack = match frame {
            Ok(ack) => ack,
            Err(crate::FrameError::Io(error)) => {
                tracing::debug!(%error, "connection to joblet-persist ended");
                return;
            }
            Err(error) => {
                tracing::warn!(%error, "bad acknowledgement frame from joblet-persist");
                return;
            }
        };
        let store_failed = ack
            .refused
            .iter()
            .find(|refusal| refusal.reason() == RefusalReason::StoreFailed);
        match store_failed {
            // persist ends the connection after this; it is answered with backoff.
            Some(refusal) => {
                let reason = m::refusal_label(RefusalReason::StoreFailed);
                metrics::counter!(m::IPC_MESSAGES_REFUSED, "reason" => reason).increment(1);
                *joblet_daemon::lock(&shared.refusing) =
                    Some(format!("it cannot store: {}", refusal.detail));
            }
            None if !ack.jobs.is_empty() => {
                *joblet_daemon::lock(&shared.refusing) = None;
            }
            None => {}
        }
        for refusal in ack
            .refused
            .iter()
            .filter(|r| r.reason() != RefusalReason::StoreFailed)
        {
            note_refused(refusal);
        }
        if ack.jobs.is_empty() {
            continue; // a refusal alone is no progress
        }
        shared.acks_received.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(m::IPC_ACKS_RECEIVED).increment(1);
        let mut table = joblet_daemon::lock(&shared.acks);
        for job in ack.jobs {
            let slot = ack_slot(job.r#type());
            let entry = table.entry(job.job_id).or_default();
            entry[slot] = entry[slot].max(job.sequence);
        }
    }
}

/// A message persist refused alone (too large for it, a payload it cannot read): counted, and
/// logged at most once a minute. A log line refused is stored as a gap marker by persist.
fn note_refused(refusal: &Refusal) {
    static REFUSED_LOG: LogLimiter = LogLimiter::new(Duration::from_secs(60));
    let reason = m::refusal_label(refusal.reason());
    metrics::counter!(m::IPC_MESSAGES_REFUSED, "reason" => reason).increment(1);
    if refusal.r#type() == MessageType::Log {
        metrics::counter!(m::REPLICATION_LINES_LOST, "reason" => reason).increment(1);
    }
    if let Some(refused) = REFUSED_LOG.hit() {
        tracing::error!(
            job_id = refusal.job_id,
            kind = ?refusal.r#type(),
            sequence = refusal.sequence,
            reason,
            detail = refusal.detail,
            refused,
            "joblet-persist refused a message; it is lost (a log line shows as a gap in the job's \
             log). Logged at most once a minute, with how many since"
        );
    }
}

/// A delay drawn uniformly from [base/2, base] so that many senders do not retry in lockstep.
fn jitter(base: Duration) -> Duration {
    let half = base / 2;
    half + rand::rng().random_range(Duration::ZERO..=half)
}
