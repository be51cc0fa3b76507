//! IPC benchmark: 150-byte log lines through the real `IpcSender`, a real Unix socket and the
//! real `IpcReceiver`, against a baseline in the same run: the same frame bytes written raw
//! through a Unix socket with a 64 KiB buffer and read back with a 64 KiB buffer.

use std::io::{BufWriter, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use joblet_benches::Table;
use joblet_ipc::{
    Batch, Frame, IpcReceiver, IpcSender, MessageSink, ReceiverConfig, Refusal, SenderConfig,
    Stream,
};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// Lines are allocated on one thread and freed on another (scans, ingest, replication); glibc's
/// malloc serialises that on its arena locks, which showed in profiles.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
struct Args {
    /// Messages per run.
    #[arg(long, default_value_t = 5_000_000)]
    messages: u64,
    /// Size of each log line's content in bytes.
    #[arg(long, default_value_t = 150)]
    line_bytes: usize,
}

const JOB_ID: &str = "4f1c2a7e-9b3d-4c5e-8f60-1a2b3c4d5e6f";

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let content = bytes::Bytes::from(vec![b'x'; args.line_bytes]);
    let frame = Frame::log(JOB_ID, 1, 1, Stream::Stdout, &content, false).to_bytes();

    let baseline = raw_socket(&frame, args.messages)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let real = runtime.block_on(through_joblet_ipc(content, args.messages))?;

    let frame_mb = frame.len() as f64 / 1e6;
    let mut table = Table::default();
    table.add(
        "messages/s (joblet-ipc)",
        real.messages_per_second,
        Some(baseline),
        "msg/s",
        ">= 3,000,000 and >= 0.40 of raw",
    );
    table.add(
        "MB/s on the wire (joblet-ipc)",
        real.messages_per_second * frame_mb,
        Some(baseline * frame_mb),
        "MB/s",
        "",
    );
    table.add("dropped", real.dropped as f64, None, "msg", "0");
    println!(
        "{}",
        table.render(&format!(
            "ipc: {} messages of {} content bytes ({} bytes per frame)",
            args.messages,
            args.line_bytes,
            frame.len()
        ))
    );
    Ok(())
}

/// Baseline: the same frames, written through a 64 KiB buffer and read with a 64 KiB buffer.
fn raw_socket(frame: &[u8], messages: u64) -> anyhow::Result<f64> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("raw.sock");
    let listener = UnixListener::bind(&path)?;
    let total = frame.len() as u64 * messages;
    let reader = std::thread::spawn(move || -> anyhow::Result<u64> {
        let (mut stream, _) = listener.accept()?;
        let mut buf = vec![0u8; 64 * 1024];
        let mut read = 0u64;
        while read < total {
            let n = stream.read(&mut buf)?;
            anyhow::ensure!(n > 0, "raw writer closed early");
            read += n as u64;
        }
        Ok(read)
    });
    let started = Instant::now();
    let mut writer = BufWriter::with_capacity(64 * 1024, UnixStream::connect(&path)?);
    for _ in 0..messages {
        writer.write_all(frame)?;
    }
    writer.flush()?;
    reader
        .join()
        .map_err(|_| anyhow::anyhow!("reader panicked"))??;
    Ok(messages as f64 / started.elapsed().as_secs_f64())
}

struct CountingSink {
    messages: AtomicU64,
    target: u64,
    done: Notify,
}

impl MessageSink for CountingSink {
    async fn store(&self, batch: Batch) -> Result<Vec<Refusal>, String> {
        // Read every envelope, as a store does: the receiver hands them over unread.
        let n = batch
            .iter()
            .filter(|envelope| !envelope.data.is_empty())
            .count() as u64;
        if self.messages.fetch_add(n, Ordering::Relaxed) + n >= self.target {
            self.done.notify_one();
        }
        Ok(Vec::new())
    }
}

struct RealResult {
    messages_per_second: f64,
    dropped: u64,
}

async fn through_joblet_ipc(content: bytes::Bytes, messages: u64) -> anyhow::Result<RealResult> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("persist.sock");
    let shutdown = CancellationToken::new();
    let receiver = IpcReceiver::bind(ReceiverConfig::new(&path)).await?;
    let sink = Arc::new(CountingSink {
        messages: AtomicU64::new(0),
        target: messages,
        done: Notify::new(),
    });
    let receiver_task = tokio::spawn(receiver.run(sink.clone(), shutdown.clone()));
    let (sender, sender_task) = IpcSender::start(SenderConfig::new(&path), shutdown.clone());
    let mut connections = sender.connections();
    tokio::time::timeout(Duration::from_secs(10), connections.wait_for(|g| *g >= 1))
        .await
        .context("sender did not connect")??;

    let started = Instant::now();
    let producer = {
        let sender = sender.clone();
        tokio::spawn(async move {
            for sequence in 1..=messages {
                let frame = Frame::log(
                    JOB_ID,
                    sequence,
                    sequence as i64,
                    Stream::Stdout,
                    &content,
                    false,
                );
                if sender.send(frame).await.is_err() {
                    break;
                }
            }
        })
    };
    tokio::time::timeout(Duration::from_secs(300), sink.done.notified())
        .await
        .context("receiver did not get every message")?;
    let elapsed = started.elapsed();
    producer.await?;
    shutdown.cancel();
    sender_task.await?;
    receiver_task.await?;
    Ok(RealResult {
        messages_per_second: messages as f64 / elapsed.as_secs_f64(),
        dropped: sender.stats().dropped(),
    })
}
