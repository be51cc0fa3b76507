//! Integration tests: the real sender and receiver over a real Unix socket.

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::BufMut;
use joblet_ipc::receiver::BindError;
use joblet_ipc::{
    Batch, Frame, IpcMessage, IpcReceiver, IpcSender, MessageSink, MessageType, ReceiverConfig,
    Refusal, SendError, SenderConfig, Stream, log_message,
};
use prost::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::{Semaphore, watch};
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(20);

/// A sink that keeps everything it is given, optionally held shut by a gate.
struct CollectingSink {
    messages: Mutex<Vec<IpcMessage>>,
    count: watch::Sender<usize>,
    gate: Option<Arc<Semaphore>>,
    /// `durable` waits until this is true.
    settled: watch::Sender<bool>,
}

impl CollectingSink {
    fn new() -> Arc<Self> {
        Self::gated(None)
    }

    fn gated(gate: Option<Arc<Semaphore>>) -> Arc<Self> {
        Arc::new(CollectingSink {
            messages: Mutex::new(Vec::new()),
            count: watch::Sender::new(0),
            gate,
            settled: watch::Sender::new(true),
        })
    }

    async fn wait_for(&self, expected: usize) {
        let mut count = self.count.subscribe();
        let reached = tokio::time::timeout(WAIT, count.wait_for(|n| *n >= expected)).await;
        assert!(
            reached.is_ok(),
            "timed out: sink holds {} of {expected} messages",
            *self.count.borrow()
        );
    }

    fn messages(&self) -> Vec<IpcMessage> {
        self.messages.lock().unwrap().clone()
    }
}

impl MessageSink for CollectingSink {
    async fn store(&self, batch: Batch) -> Result<Vec<Refusal>, String> {
        if let Some(gate) = &self.gate {
            let _permit = gate.acquire().await.map_err(|e| e.to_string())?;
        }
        let mut messages = self.messages.lock().unwrap();
        messages.extend(batch.iter().map(|envelope| envelope.to_message()));
        self.count.send_replace(messages.len());
        Ok(Vec::new())
    }

    async fn durable(&self) -> Result<(), String> {
        let mut settled = self.settled.subscribe();
        settled.wait_for(|s| *s).await.map_err(|e| e.to_string())?;
        Ok(())
    }
}

struct RunningReceiver {
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
    stats: Arc<joblet_ipc::ReceiverStats>,
}

impl RunningReceiver {
    async fn start(path: &Path, sink: Arc<CollectingSink>) -> Self {
        let receiver = IpcReceiver::bind(ReceiverConfig::new(path)).await.unwrap();
        let stats = receiver.stats();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(receiver.run(sink, shutdown.clone()));
        RunningReceiver {
            shutdown,
            task,
            stats,
        }
    }

    async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.unwrap();
    }
}

fn socket_in(dir: &tempfile::TempDir) -> PathBuf {
    dir.path().join("persist.sock")
}

fn line(job: &str, sequence: u64) -> IpcMessage {
    log_message(
        job,
        sequence,
        sequence as i64 * 1000,
        Stream::Stdout,
        format!("{job} line {sequence}").into(),
    )
}

fn start_sender(path: &Path, buffer_size: usize) -> (IpcSender, CancellationToken) {
    let shutdown = CancellationToken::new();
    let mut config = SenderConfig::new(path);
    config.buffer_size = buffer_size;
    config.reconnect_delay = Duration::from_millis(200);
    let (sender, _task) = IpcSender::start(config, shutdown.clone());
    (sender, shutdown)
}

async fn wait_connected(sender: &IpcSender, generation: u64) {
    let mut connections = sender.connections();
    tokio::time::timeout(WAIT, connections.wait_for(|g| *g >= generation))
        .await
        .expect("sender did not connect")
        .unwrap();
}

async fn wait_acked(sender: &IpcSender, job: &str, sequence: u64) {
    tokio::time::timeout(WAIT, async {
        while sender.acknowledged(job, MessageType::Log) < sequence {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .unwrap_or_else(|_| {
        panic!(
            "{job} acked only up to {}",
            sender.acknowledged(job, MessageType::Log)
        )
    });
}

fn sequences_by_job(messages: &[IpcMessage]) -> HashMap<String, Vec<u64>> {
    let mut by_job: HashMap<String, Vec<u64>> = HashMap::new();
    for message in messages {
        by_job
            .entry(message.job_id.clone())
            .or_default()
            .push(message.sequence);
    }
    by_job
}

#[tokio::test]
async fn per_job_order_is_preserved_end_to_end_and_acked() {
    let dir = tempfile::tempdir().unwrap();
    let path = socket_in(&dir);
    let sink = CollectingSink::new();
    let receiver = RunningReceiver::start(&path, sink.clone()).await;
    let (sender, _shutdown) = start_sender(&path, 100_000);
    wait_connected(&sender, 1).await;

    let jobs = ["job-a", "job-b", "job-c"];
    let per_job = 20_000u64;
    for sequence in 1..=per_job {
        for job in jobs {
            sender.send(&line(job, sequence)).await.unwrap();
        }
    }
    sink.wait_for(jobs.len() * per_job as usize).await;
    for job in jobs {
        wait_acked(&sender, job, per_job).await;
    }

    let by_job = sequences_by_job(&sink.messages());
    let expected: Vec<u64> = (1..=per_job).collect();
    for job in jobs {
        assert_eq!(by_job[job], expected, "order of {job}");
    }
    assert_eq!(sender.stats().dropped(), 0);
    let first = &sink.messages()[0];
    assert_eq!(
        first.data,
        line("job-a", 1).data,
        "payload arrives unchanged"
    );
    receiver.stop().await;
}

#[tokio::test]
async fn a_message_over_the_frame_limit_is_refused_and_counted_and_the_rest_flows() {
    let dir = tempfile::tempdir().unwrap();
    let path = socket_in(&dir);
    let sink = CollectingSink::new();
    let receiver = RunningReceiver::start(&path, sink.clone()).await;
    let shutdown = CancellationToken::new();
    let mut config = SenderConfig::new(&path);
    config.max_frame_bytes = 1024;
    let (sender, _task) = IpcSender::start(config, shutdown.clone());
    wait_connected(&sender, 1).await;

    let big = Frame::log("job", 1, 1, Stream::Stdout, &[b'x'; 1100], false);
    let refused = sender.send(big).await;
    assert!(
        matches!(refused, Err(SendError::Oversized { len }) if len == big.body_len() && len > 1024),
        "{refused:?}"
    );
    assert!(matches!(
        sender.try_send(big),
        Err(SendError::Oversized { .. })
    ));
    sender
        .send(Frame::log("job", 2, 2, Stream::Stdout, b"fits", false))
        .await
        .unwrap();
    wait_acked(&sender, "job", 2).await;
    assert_eq!(
        sink.messages(),
        [log_message("job", 2, 2, Stream::Stdout, "fits".into())]
    );
    assert_eq!(sender.stats().dropped_oversized.load(Ordering::Relaxed), 2);
    shutdown.cancel();
    receiver.stop().await;
}

#[tokio::test]
async fn full_queue_while_disconnected_drops_exactly_the_overflow() {
    let dir = tempfile::tempdir().unwrap();
    let path = socket_in(&dir);
    let (sender, _shutdown) = start_sender(&path, 10);

    let mut refused = 0;
    for sequence in 1..=25 {
        match sender.try_send(&line("job", sequence)) {
            Ok(()) => {}
            Err(error) => {
                assert_eq!(error, SendError::Disconnected);
                refused += 1;
            }
        }
    }
    assert_eq!(refused, 15);
    assert_eq!(
        sender
            .stats()
            .dropped_disconnected
            .load(std::sync::atomic::Ordering::Relaxed),
        15
    );
    assert_eq!(sender.queue_depth(), 10);

    // Persist comes up: the ten queued messages are delivered, in order.
    let sink = CollectingSink::new();
    let receiver = RunningReceiver::start(&path, sink.clone()).await;
    sink.wait_for(10).await;
    wait_acked(&sender, "job", 10).await;
    let by_job = sequences_by_job(&sink.messages());
    assert_eq!(by_job["job"], (1..=10).collect::<Vec<_>>());
    receiver.stop().await;
}

#[tokio::test]
async fn full_queue_while_connected_counts_every_drop_and_loses_nothing_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let path = socket_in(&dir);
    let gate = Arc::new(Semaphore::new(0));
    let sink = CollectingSink::gated(Some(gate.clone()));
    let receiver = RunningReceiver::start(&path, sink.clone()).await;
    let (sender, _shutdown) = start_sender(&path, 1000);
    wait_connected(&sender, 1).await;

    let mut accepted = Vec::new();
    let mut refused = 0u64;
    for sequence in 1..=200_000 {
        match sender.try_send(&line("job", sequence)) {
            Ok(()) => accepted.push(sequence),
            Err(SendError::QueueFull) => refused += 1,
            Err(other) => panic!("unexpected {other}"),
        }
        if sequence % 1000 == 0 {
            tokio::task::yield_now().await;
        }
    }
    assert!(refused > 0, "a stalled store must fill the queue");
    let stats = sender.stats();
    assert_eq!(
        stats
            .dropped_queue_full
            .load(std::sync::atomic::Ordering::Relaxed),
        refused
    );

    gate.add_permits(Semaphore::MAX_PERMITS);
    sink.wait_for(accepted.len()).await;
    wait_acked(&sender, "job", *accepted.last().unwrap()).await;
    let by_job = sequences_by_job(&sink.messages());
    assert_eq!(
        by_job["job"], accepted,
        "every accepted message, once, in order"
    );
    assert_eq!(accepted.len() as u64 + refused, 200_000);
    receiver.stop().await;
}

#[tokio::test]
async fn sender_reconnects_after_receiver_restart_and_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let path = socket_in(&dir);
    let first_sink = CollectingSink::new();
    let receiver = RunningReceiver::start(&path, first_sink.clone()).await;
    let (sender, _shutdown) = start_sender(&path, 10_000);
    wait_connected(&sender, 1).await;
    for sequence in 1..=100 {
        sender.try_send(&line("job", sequence)).unwrap();
    }
    first_sink.wait_for(100).await;
    wait_acked(&sender, "job", 100).await;
    receiver.stop().await;

    // While persist is down, messages queue up.
    for sequence in 101..=200 {
        sender.try_send(&line("job", sequence)).unwrap();
    }
    let second_sink = CollectingSink::new();
    let receiver = RunningReceiver::start(&path, second_sink.clone()).await;
    wait_connected(&sender, 2).await;
    wait_acked(&sender, "job", 200).await;

    // Whatever was written into the dead connection is written again after the reconnect:
    // the second receiver holds 101..=200 with nothing missing (a repeat is allowed; persist
    // stores idempotently).
    let mut received = sequences_by_job(&second_sink.messages())
        .remove("job")
        .unwrap();
    received.dedup();
    assert_eq!(received.last(), Some(&200));
    let missing: Vec<u64> = (101..=200).filter(|s| !received.contains(s)).collect();
    assert!(missing.is_empty(), "missing after reconnect: {missing:?}");
    assert!(received.windows(2).all(|w| w[0] < w[1]), "order kept");
    assert_eq!(
        sender
            .stats()
            .reconnects
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    assert_eq!(sender.stats().dropped(), 0);
    receiver.stop().await;
}

async fn raw_client(path: &Path) -> UnixStream {
    UnixStream::connect(path).await.unwrap()
}

/// Reads until the receiver closes the connection; fails if it does not.
async fn assert_closed_by_receiver(mut stream: UnixStream) {
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(WAIT, stream.read(&mut buf))
        .await
        .expect("receiver must close a connection that sent a bad frame");
    assert!(matches!(read, Ok(0) | Err(_)), "expected EOF, got {read:?}");
}

fn frame_bytes(message: &IpcMessage) -> Vec<u8> {
    let mut buf = bytes::BytesMut::new();
    joblet_ipc::codec::encode_frame(message, 1 << 20, &mut buf).unwrap();
    buf.to_vec()
}

#[tokio::test]
async fn bad_frames_close_only_their_connection_and_are_counted() {
    let dir = tempfile::tempdir().unwrap();
    let path = socket_in(&dir);
    let sink = CollectingSink::new();
    let receiver = RunningReceiver::start(&path, sink.clone()).await;

    // A healthy sender stays connected throughout.
    let (sender, _shutdown) = start_sender(&path, 1000);
    wait_connected(&sender, 1).await;
    sender.try_send(&line("good", 1)).unwrap();
    sink.wait_for(1).await;

    // Oversized: a length prefix far over the 8 MiB default.
    let mut oversized = raw_client(&path).await;
    let mut bytes = Vec::new();
    bytes.put_u32(512 * 1024 * 1024);
    bytes.extend_from_slice(b"xxxx");
    oversized.write_all(&bytes).await.unwrap();
    assert_closed_by_receiver(oversized).await;

    // Undecodable body.
    let mut garbage = raw_client(&path).await;
    garbage
        .write_all(&[0, 0, 0, 4, 0xff, 0xff, 0xff, 0xff])
        .await
        .unwrap();
    assert_closed_by_receiver(garbage).await;

    // Truncated: half a frame, then the writer closes.
    let mut truncated = raw_client(&path).await;
    let whole = frame_bytes(&line("truncated", 1));
    truncated
        .write_all(&whole[..whole.len() / 2])
        .await
        .unwrap();
    truncated.shutdown().await.unwrap();
    assert_closed_by_receiver(truncated).await;

    // Unknown version and empty job id are skipped; the valid frame after them is stored.
    let mut mixed = raw_client(&path).await;
    let mut wrong_version = line("versioned", 1);
    wrong_version.version = 99;
    let mut no_job = line("", 1);
    no_job.job_id.clear();
    let mut bytes = frame_bytes(&wrong_version);
    bytes.extend(frame_bytes(&no_job));
    bytes.extend(frame_bytes(&line("after-bad", 1)));
    mixed.write_all(&bytes).await.unwrap();
    sink.wait_for(2).await;

    sender.try_send(&line("good", 2)).unwrap();
    sink.wait_for(3).await;
    wait_acked(&sender, "good", 2).await;

    let jobs: Vec<String> = sink.messages().into_iter().map(|m| m.job_id).collect();
    assert_eq!(jobs, ["good", "after-bad", "good"]);
    assert_eq!(
        receiver
            .stats
            .rejected
            .load(std::sync::atomic::Ordering::Relaxed),
        5,
        "oversized, decode, truncated, version, empty job id"
    );
    assert_eq!(
        sender
            .stats()
            .reconnects
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
    drop(mixed);
    receiver.stop().await;
}

#[tokio::test]
async fn socket_is_private_stale_files_are_replaced_and_live_sockets_are_not_stolen() {
    let dir = tempfile::tempdir().unwrap();
    let path = socket_in(&dir);

    // A stale socket file from a crashed process.
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    assert!(path.exists());
    let receiver = RunningReceiver::start(&path, CollectingSink::new()).await;
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);

    // A second receiver must not take over the live socket.
    let second = IpcReceiver::bind(ReceiverConfig::new(&path)).await;
    assert!(matches!(second, Err(BindError::InUse { .. })));
    receiver.stop().await;
    assert!(!path.exists(), "socket removed at shutdown");

    // A regular file at the path is never deleted.
    std::fs::write(&path, b"not a socket").unwrap();
    let refused = IpcReceiver::bind(ReceiverConfig::new(&path)).await;
    assert!(matches!(refused, Err(BindError::NotASocket { .. })));
    assert_eq!(std::fs::read(&path).unwrap(), b"not a socket");
}

#[tokio::test]
async fn a_socket_directory_writable_by_others_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let open_dir = dir.path().join("open");
    std::fs::create_dir(&open_dir).unwrap();
    std::fs::set_permissions(&open_dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    let refused = IpcReceiver::bind(ReceiverConfig::new(open_dir.join("p.sock"))).await;
    match refused {
        Err(error @ BindError::UnsafeDirectory { .. }) => {
            assert!(error.to_string().contains("writable by others"), "{error}");
        }
        Err(other) => panic!("wrong error: {other}"),
        Ok(_) => panic!("bound in a world-writable directory"),
    }
    assert!(!open_dir.join("p.sock").exists());
    // Sticky world-writable (like /tmp) is accepted: others cannot replace the socket there.
    std::fs::set_permissions(&open_dir, std::fs::Permissions::from_mode(0o1777)).unwrap();
    let receiver = RunningReceiver::start(&open_dir.join("p.sock"), CollectingSink::new()).await;
    receiver.stop().await;
}

#[tokio::test]
async fn batches_are_acknowledged_once_durable_while_reading_and_storing_go_on() {
    let dir = tempfile::tempdir().unwrap();
    let path = socket_in(&dir);
    let sink = CollectingSink::new();
    sink.settled.send_replace(false);
    let receiver = RunningReceiver::start(&path, sink.clone()).await;
    let (sender, shutdown) = start_sender(&path, 1000);
    wait_connected(&sender, 1).await;
    for sequence in 1..=50_000 {
        sender.send(&line("job-a", sequence)).await.unwrap();
    }
    // Far more batches than are stored at once went in, none acknowledged yet.
    sink.wait_for(50_000).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(sender.acknowledged("job-a", MessageType::Log), 0);
    sink.settled.send_replace(true);
    wait_acked(&sender, "job-a", 50_000).await;
    shutdown.cancel();
    receiver.stop().await;
}

/// A sink whose store fails until told otherwise, as a full disk does.
struct FailingSink {
    inner: Arc<CollectingSink>,
    failing: std::sync::atomic::AtomicBool,
    attempts: std::sync::atomic::AtomicU64,
}

impl MessageSink for FailingSink {
    async fn store(&self, batch: Batch) -> Result<Vec<Refusal>, String> {
        self.attempts.fetch_add(1, Ordering::Relaxed);
        if self.failing.load(Ordering::Relaxed) {
            return Err("No space left on device (os error 28)".into());
        }
        self.inner.store(batch).await
    }
}

#[tokio::test]
async fn a_frame_over_the_receivers_limit_becomes_a_gap_acknowledged_in_band_and_the_rest_flows() {
    let dir = tempfile::tempdir().unwrap();
    let path = socket_in(&dir);
    let sink = CollectingSink::new();
    // persist's limit (4 KiB) is below core's (8 MiB): a 10 KB line passes the sender only.
    let mut config = ReceiverConfig::new(&path);
    config.max_frame_bytes = 4096;
    let receiver = IpcReceiver::bind(config).await.unwrap();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(receiver.run(sink.clone(), shutdown.clone()));
    let (sender, _stop) = start_sender(&path, 1000);
    wait_connected(&sender, 1).await;

    let mut big = line("job", 2);
    big.data = joblet_ipc::LogData {
        stream: Stream::Stderr as i32,
        content: vec![b'x'; 10_000].into(),
        ..Default::default()
    }
    .encode_to_vec()
    .into();
    for message in [line("job", 1), big, line("job", 3)] {
        sender.send(&message).await.unwrap();
    }
    wait_acked(&sender, "job", 3).await;
    let messages = sink.messages();
    let payloads: Vec<_> = messages
        .iter()
        .map(|m| {
            let payload = joblet_ipc::log_payload(&m.data).unwrap();
            (
                m.sequence,
                payload.lost_lines,
                payload.stream,
                payload.content.len(),
            )
        })
        .collect();
    assert_eq!(
        payloads,
        [
            (1, 0, Stream::Stdout as i32, 10),
            (2, 1, Stream::Stderr as i32, 0),
            (3, 0, Stream::Stdout as i32, 10)
        ],
        "the line over the limit is a gap marker in its place, the next line follows"
    );
    let gap = joblet_ipc::log_payload(&messages[1].data).unwrap();
    assert!(
        gap.lost_reason.contains("ipc.max_frame_size (4096 bytes)"),
        "{}",
        gap.lost_reason
    );
    assert_eq!(messages[1].timestamp, 2000, "the gap has the line's time");
    assert_eq!(
        sender.stats().reconnects.load(Ordering::Relaxed),
        0,
        "refused in-band: the connection stays"
    );
    shutdown.cancel();
    task.await.unwrap();
}

#[tokio::test]
async fn a_store_that_fails_is_answered_in_band_and_the_sender_backs_off_then_resends() {
    let dir = tempfile::tempdir().unwrap();
    let path = socket_in(&dir);
    let sink = Arc::new(FailingSink {
        inner: CollectingSink::new(),
        failing: true.into(),
        attempts: 0.into(),
    });
    let receiver = IpcReceiver::bind(ReceiverConfig::new(&path)).await.unwrap();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(receiver.run(sink.clone(), shutdown.clone()));
    let (sender, _stop) = start_sender(&path, 1000);
    wait_connected(&sender, 1).await;
    for sequence in 1..=10 {
        sender.send(&line("job", sequence)).await.unwrap();
    }
    // The sender hears why, in-band.
    tokio::time::timeout(WAIT, async {
        while sender.refusing().is_none() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the sender is told that persist cannot store");
    assert!(
        sender
            .refusing()
            .unwrap()
            .contains("No space left on device"),
        "{:?}",
        sender.refusing()
    );
    assert_eq!(sender.acknowledged("job", MessageType::Log), 0);

    // It reconnects (after a backoff), and what it sends again once the disk has room is
    // acknowledged: the refusal is over.
    wait_connected(&sender, 2).await;
    sink.failing.store(false, Ordering::Relaxed);
    for sequence in 1..=10 {
        sender.send(&line("job", sequence)).await.unwrap();
    }
    wait_acked(&sender, "job", 10).await;
    let received = sequences_by_job(&sink.inner.messages())
        .remove("job")
        .unwrap();
    assert_eq!(received, (1..=10).collect::<Vec<_>>());
    assert_eq!(sender.refusing(), None);
    assert_eq!(sink.attempts.load(Ordering::Relaxed), 2);
    shutdown.cancel();
    task.await.unwrap();
}
