//! Replication to joblet-persist: one task per job and kind (log lines, metric samples, the
//! job's record for persist's catalogue) reads the job's spool, metrics spool or state from the
//! first sequence persist has not acknowledged and queues it on the IPC sender, waiting for room
//! when the queue is full. A job's record is sent at every state change, its version as the
//! sequence; persist keeps the newest.
//!
//! Acknowledgements live in the sender, in memory; [`Replication::checkpoint`] writes them into
//! the job's journal record (when a job is fully replicated, and at shutdown), so that after a
//! restart [`Replication::resume`] starts from there rather than from the first line. Anything
//! between the checkpoint and what persist really holds is sent again and stored once.
//!
//! The job never waits for this: its output goes to the spool, and replication follows at its
//! own pace, like any other reader. Nothing is dropped for lack of queue room, and a persist that
//! is slow or down only makes replication fall behind. After every reconnect a task starts over
//! from persist's acknowledgement, so what was lost in the broken connection is sent again;
//! persist stores idempotently, so nothing is stored twice. A task ends once everything of its
//! job is acknowledged, or when the job is deleted, or when replication stops.
//!
//! All of it runs on one thread of its own at a lower CPU priority (`persist.replication_nice`):
//! on a host whose CPUs are busy with jobs, replication yields to them and catches up later.

use joblet_daemon::lock;
use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use joblet_ipc::{Frame, IpcMessage, IpcSender, MessageType, SendError, SenderConfig};
use joblet_proto::ipc::JobRecord;
use prost::Message;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::PersistConfig;
use crate::job::Job;
use crate::metrics as m;
use crate::state::Acked;

/// How often a task whose data is all queued checks for persist's final acknowledgement.
const ACK_POLL: Duration = Duration::from_millis(100);
/// How often the lag gauge is refreshed.
const LAG_INTERVAL: Duration = Duration::from_secs(1);

pub struct Replication {
    sender: IpcSender,
    /// The replication thread's runtime: the sender and every replicator run there.
    runtime: tokio::runtime::Handle,
    tasks: TaskTracker,
    stop: CancellationToken,
    sender_shutdown: CancellationToken,
    sender_task: Mutex<Option<tokio::task::JoinHandle<()>>>,
    thread: Mutex<Option<(std::thread::JoinHandle<()>, CancellationToken)>>,
    /// Jobs whose lines are not all acknowledged yet, for the lag gauge.
    replicating: Arc<Mutex<HashMap<String, Arc<Job>>>>,
    /// Node name put into replicated job records.
    node_id: String,
}

impl Replication {
    /// Starts the replication thread, at nice `persist.replication_nice`, with the IPC sender
    /// running on it.
    pub fn start(config: &PersistConfig, node_id: &str) -> std::io::Result<Replication> {
        let mut sender_config = SenderConfig::new(&config.socket);
        sender_config.buffer_size = config.buffer_size;
        sender_config.reconnect_delay = config.reconnect_delay;
        sender_config.max_frame_bytes = config.max_frame_size.as_u64() as usize;
        let nice = config.replication_nice;
        let thread_stop = CancellationToken::new();
        let (runtime_tx, runtime_rx) = std::sync::mpsc::channel();
        let stopped = thread_stop.clone();
        let thread = std::thread::Builder::new()
            .name("joblet-replication".into())
            .spawn(move || {
                // Threads the runtime starts (its blocking pool) inherit the nice value.
                match joblet_daemon::set_thread_nice(nice) {
                    Ok(()) => tracing::info!(nice, "replication runs at a lower CPU priority than jobs"),
                    Err(error) => tracing::warn!(nice, %error, "cannot set the replication thread's nice value"),
                }
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .thread_name("joblet-replication")
                    .build();
                match runtime {
                    Ok(runtime) => {
                        let _ = runtime_tx.send(Ok(runtime.handle().clone()));
                        runtime.block_on(stopped.cancelled());
                        runtime.shutdown_timeout(Duration::from_secs(1));
                    }
                    Err(error) => {
                        let _ = runtime_tx.send(Err(error));
                    }
                }
            })?;
        let runtime = runtime_rx
            .recv()
            .map_err(|_| std::io::Error::other("the replication thread ended at start"))??;
        let sender_shutdown = CancellationToken::new();
        let (sender, sender_task) = {
            let _context = runtime.enter();
            IpcSender::start(sender_config, sender_shutdown.clone())
        };
        let replicating = Arc::new(Mutex::new(HashMap::new()));
        let stop = CancellationToken::new();
        runtime.spawn(publish_lag(
            sender.clone(),
            replicating.clone(),
            stop.clone(),
        ));
        Ok(Replication {
            sender,
            runtime,
            tasks: TaskTracker::new(),
            stop,
            sender_shutdown,
            sender_task: Mutex::new(Some(sender_task)),
            thread: Mutex::new(Some((thread, thread_stop))),
            replicating,
            node_id: node_id.to_owned(),
        })
    }

    pub fn sender(&self) -> &IpcSender {
        &self.sender
    }

    /// Starts replicating `job`'s lines and samples.
    pub fn watch(&self, job: &Arc<Job>) {
        let replicator = |kind| Replicator {
            sender: self.sender.clone(),
            job: job.clone(),
            kind,
            stop: self.stop.clone(),
        };
        lock(&self.replicating).insert(job.id.clone(), job.clone());
        let replicating = self.replicating.clone();
        let id = job.id.clone();
        let logs = replicator(MessageType::Log).run(send_logs);
        self.tasks.spawn_on(
            async move {
                logs.await;
                lock(&replicating).remove(&id);
            },
            &self.runtime,
        );
        let metrics = replicator(MessageType::Metric).run(send_metrics);
        self.tasks.spawn_on(metrics, &self.runtime);
        let node_id = self.node_id.clone();
        let records = replicator(MessageType::Job)
            .run(move |sender, job, round| send_records(sender, job, round, node_id.clone()));
        self.tasks.spawn_on(records, &self.runtime);
    }

    /// Replicates a job restored from the journal, from its last checkpoint on.
    pub fn resume(&self, job: &Arc<Job>) {
        let acked = job.replicated();
        for (kind, sequence) in [
            (MessageType::Log, acked.logs),
            (MessageType::Metric, acked.metrics),
            (MessageType::Job, acked.record),
        ] {
            self.sender.seed_acknowledged(&job.id, kind, sequence);
        }
        self.watch(job);
    }

    /// What persist has acknowledged of `job`, as far as core knows.
    pub fn acked(&self, job: &Job) -> Acked {
        let checkpoint = job.replicated();
        let acked = |kind| self.sender.acknowledged(&job.id, kind);
        Acked {
            logs: checkpoint.logs.max(acked(MessageType::Log)),
            metrics: checkpoint.metrics.max(acked(MessageType::Metric)),
            record: checkpoint.record.max(acked(MessageType::Job)),
        }
    }

    /// The job ended and persist acknowledged all of its lines, samples and its last record.
    pub fn is_complete(&self, job: &Job) -> bool {
        let state = job.state();
        let acked = self.acked(job);
        state.status.is_terminal()
            && acked.logs >= job.output.progress().last_sequence
            && acked.metrics >= job.metrics.progress().last_sequence
            && acked.record >= state.version
    }

    /// Spooled lines of `job` persist has not acknowledged.
    pub fn lines_behind(&self, job: &Job) -> u64 {
        job.output
            .progress()
            .last_sequence
            .saturating_sub(self.acked(job).logs)
    }

    /// Writes what persist acknowledged of `job` into its journal record (if it changed).
    pub async fn checkpoint(&self, job: &Job) {
        job.checkpoint_replication(self.acked(job)).await;
    }

    /// At shutdown, once every job has ended: waits up to `wait` for persist to acknowledge
    /// what is not yet replicated (not at all when persist is unreachable), then stops. What
    /// is left is reported by the caller, job by job.
    pub async fn drain(&self, wait: Duration) {
        self.tasks.close();
        if self.sender.is_connected() {
            let _ = tokio::time::timeout(wait, self.tasks.wait()).await;
        }
        self.stop.cancel();
        self.tasks.wait().await;
    }

    /// Last step of shutdown, after [`Replication::drain`]: the sender writes what is queued
    /// (for a few seconds at most, if connected) and the replication thread ends.
    pub async fn stop(&self) {
        self.sender_shutdown.cancel();
        let task = lock(&self.sender_task).take();
        if let Some(task) = task {
            let _ = task.await;
        }
        let thread = lock(&self.thread).take();
        if let Some((thread, stop)) = thread {
            stop.cancel();
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
    }
}

/// Publishes how many spooled lines persist has not acknowledged, every LAG_INTERVAL.
async fn publish_lag(
    sender: IpcSender,
    replicating: Arc<Mutex<HashMap<String, Arc<Job>>>>,
    stop: CancellationToken,
) {
    // Since when each job has had lines persist has not acknowledged.
    let mut behind_since: HashMap<String, std::time::Instant> = HashMap::new();
    loop {
        let jobs: Vec<Arc<Job>> = lock(&replicating).values().cloned().collect();
        let now = std::time::Instant::now();
        let mut behind = 0;
        let mut still_behind = HashMap::with_capacity(behind_since.len());
        for job in &jobs {
            let written = job.output.progress().last_sequence;
            let lines = written.saturating_sub(sender.acknowledged(&job.id, MessageType::Log));
            if lines > 0 {
                behind += lines;
                let since = behind_since.get(&job.id).copied().unwrap_or(now);
                still_behind.insert(job.id.clone(), since);
            }
        }
        behind_since = still_behind;
        let oldest = behind_since
            .values()
            .map(|since| now.duration_since(*since).as_secs_f64())
            .fold(0.0, f64::max);
        // Why it is behind: persist unreachable, refusing to store, or taking its time.
        let why = if !sender.is_connected() {
            "disconnected"
        } else if sender.refusing().is_some() {
            "persist_refusing"
        } else {
            "persist_busy"
        };
        for reason in m::BEHIND_REASONS {
            let lines = if reason == why { behind } else { 0 };
            metrics::gauge!(m::REPLICATION_BEHIND, "reason" => reason).set(lines as f64);
        }
        metrics::gauge!(m::REPLICATION_OLDEST_UNACKED).set(oldest);
        // The writer updates the queue depth as it takes batches; refreshed here too, so that
        // it does not read stale while the writer is blocked on a stuck persist.
        metrics::gauge!(joblet_ipc::metrics::IPC_QUEUE_DEPTH).set(sender.queue_depth() as f64);
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(LAG_INTERVAL) => {}
        }
    }
}

struct Replicator {
    sender: IpcSender,
    job: Arc<Job>,
    kind: MessageType,
    stop: CancellationToken,
}

/// One pass of a replicator over its job's records, from `first`: those up to
/// `resend_through` were queued by an earlier pass (before a reconnect) and count as resent.
struct Round {
    first: u64,
    resend_through: u64,
    /// The highest sequence queued by any pass.
    queued: Arc<AtomicU64>,
}

impl Round {
    /// Notes that `sequence` was queued.
    fn queued(&self, sequence: u64) {
        if sequence <= self.resend_through {
            metrics::counter!(joblet_ipc::metrics::IPC_MESSAGES_RESENT).increment(1);
        }
        self.queued.fetch_max(sequence, Ordering::Relaxed);
    }
}

impl Replicator {
    /// `send_from(sender, job, round)` queues the job's records of this kind from sequence
    /// `round.first` until no more will come, and returns the last sequence there is.
    async fn run<F, Fut>(self, send_from: F)
    where
        F: Fn(IpcSender, Arc<Job>, Round) -> Fut,
        Fut: Future<Output = Result<u64, SendError>>,
    {
        let queued = Arc::new(AtomicU64::new(0));
        let mut connections = self.sender.connections();
        loop {
            connections.borrow_and_update();
            if !self.sender.is_connected() {
                tokio::select! {
                    () = self.stop.cancelled() => return,
                    changed = connections.changed() => if changed.is_err() { return } else { continue },
                }
            }
            let round = Round {
                first: self.sender.acknowledged(&self.job.id, self.kind) + 1,
                resend_through: queued.load(Ordering::Relaxed),
                queued: queued.clone(),
            };
            let replicate = async {
                let last = send_from(self.sender.clone(), self.job.clone(), round).await?;
                while self.sender.acknowledged(&self.job.id, self.kind) < last
                    && !self.job.is_deleted()
                {
                    tokio::time::sleep(ACK_POLL).await;
                }
                Ok::<_, SendError>(())
            };
            tokio::select! {
                () = self.stop.cancelled() => return,
                // A new connection: start over from what persist acknowledged.
                changed = connections.changed() => if changed.is_err() { return },
                _done = replicate => return,
            }
        }
    }
}

/// Queues the job's lines from `first` to the end of its output.
async fn send_logs(sender: IpcSender, job: Arc<Job>, round: Round) -> Result<u64, SendError> {
    let mut reader = job
        .output
        .reader(round.first - 1)
        .map_err(|_| SendError::Closed)?;
    loop {
        if job.is_deleted() {
            return Ok(0);
        }
        let records = match reader.next_batch(true).await {
            Ok(Some(records)) => records,
            Ok(None) => return Ok(job.output.progress().last_sequence),
            Err(error) => {
                tracing::error!(job_id = %job.id, %error, "cannot read the job's spool; its output is not replicated further");
                return Err(SendError::Closed);
            }
        };
        for record in records {
            let stream = match record.stream() {
                joblet_proto::joblet::LogStream::Stderr => joblet_ipc::Stream::Stderr,
                _ => joblet_ipc::Stream::Stdout,
            };
            let frame = Frame::log(
                &job.id,
                record.sequence,
                record.timestamp,
                stream,
                &record.content,
                record.partial,
            );
            match sender.send(frame).await {
                Ok(()) => {}
                // Cannot happen with a valid config (a line always fits a frame); should it,
                // the line is lost, said, counted and marked by a gap in its place, and the
                // job's later lines still flow.
                Err(SendError::Oversized { len }) => {
                    tracing::error!(job_id = %job.id, sequence = record.sequence, len, "a log line is too large for an IPC frame; it is replaced by a gap marker");
                    metrics::counter!(m::REPLICATION_LINES_LOST, "reason" => "oversized")
                        .increment(1);
                    let reason =
                        format!("line of {len} bytes is over joblet-core's persist.max_frame_size");
                    let gap = joblet_ipc::gap_message(
                        &job.id,
                        record.sequence,
                        record.timestamp,
                        stream,
                        1,
                        &reason,
                    );
                    sender.send(&gap).await?;
                }
                Err(error) => return Err(error),
            }
            round.queued(record.sequence);
        }
    }
}

/// Queues the job's metric samples from `first` until sampling ended.
async fn send_metrics(sender: IpcSender, job: Arc<Job>, round: Round) -> Result<u64, SendError> {
    let mut progress = job.metrics.subscribe();
    let mut next = round.first;
    loop {
        let now = *progress.borrow_and_update();
        let samples = match job.metrics.after(next - 1).await {
            Ok(samples) => samples,
            Err(error) => {
                tracing::error!(job_id = %job.id, %error, "cannot read the job's metrics spool; its samples are not replicated further");
                return Err(SendError::Closed);
            }
        };
        for sample in samples {
            if job.is_deleted() {
                return Ok(0);
            }
            let frame = Frame::metric(&job.id, sample.sequence, sample.timestamp, &sample.data);
            sender.send(frame).await?;
            round.queued(sample.sequence);
            next = sample.sequence + 1;
        }
        if now.finished || job.is_deleted() {
            return Ok(now.last_sequence);
        }
        if progress.changed().await.is_err() {
            return Ok(job.metrics.last_sequence());
        }
    }
}

/// Queues the job's record at every state change from version `first` until it ended.
async fn send_records(
    sender: IpcSender,
    job: Arc<Job>,
    round: Round,
    node_id: String,
) -> Result<u64, SendError> {
    let mut changes = job.subscribe();
    let mut next = round.first;
    loop {
        changes.borrow_and_update();
        let state = job.state();
        if job.is_deleted() {
            return Ok(0);
        }
        if state.version >= next {
            let updated = joblet_ipc::now_ns();
            let record = JobRecord {
                job: Some(crate::service::job_message(&job, &node_id)),
                created: job.created.timestamp_nanos_opt().unwrap_or(0),
                updated,
            };
            let message = IpcMessage {
                version: joblet_ipc::PROTOCOL_VERSION,
                r#type: MessageType::Job as i32,
                job_id: job.id.clone(),
                timestamp: updated,
                sequence: state.version,
                data: record.encode_to_vec().into(),
            };
            sender.send(&message).await?;
            round.queued(state.version);
            next = state.version + 1;
        }
        if state.status.is_terminal() {
            return Ok(state.version);
        }
        if changes.changed().await.is_err() {
            return Ok(job.state().version);
        }
    }
}
