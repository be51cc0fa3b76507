//! Persist benchmark, against baselines measured in the same run:
//! 1. ingest: N 150-byte lines through the real IPC sender and socket into the real store
//!    (acknowledged, i.e. durable by the default `flushed` policy), against raw RocksDB
//!    `WriteBatch` writes of the same keys and values with the same options and batch size;
//! 2. on that data, time to the first line of random 1-minute window queries over gRPC,
//!    against a raw RocksDB seek in-process;
//! 3. a full scan streamed to a gRPC client, against a raw RocksDB iterator scan.
//!
//! After a warm-up round, the sides run in the order baseline, real, real, baseline; the table
//! shows the means (see benches/README.md).

use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use joblet_benches::Table;
use joblet_ipc::{Frame, IpcSender, MessageType, SenderConfig, Stream};
use joblet_persist::Persist;
use joblet_persist::config::{Config, Retention};
use joblet_persist::store::Store;
use joblet_proto::persist::QueryLogsRequest;
use joblet_proto::persist::persist_service_client::PersistServiceClient;
use rand::Rng;
use tokio_util::sync::CancellationToken;

/// Lines are allocated on one thread and freed on another (scans, ingest, replication); glibc's
/// malloc serialises that on its arena locks, which showed in profiles.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Clone)]
struct Args {
    #[arg(long, default_value_t = 10_000_000)]
    lines: u64,
    #[arg(long, default_value_t = 150)]
    line_bytes: usize,
    /// Time between consecutive lines' timestamps (so N lines span N × this).
    #[arg(long, default_value_t = 100_000)]
    line_interval_ns: i64,
    #[arg(long, default_value_t = 500)]
    window_queries: usize,
    /// Both stores with `rocksdb.direct_io` on (flushes and compactions past the page cache).
    #[arg(long)]
    direct_io: bool,
}

const JOB: &str = "b3c1e0f2-5a6b-4c7d-8e9f-0a1b2c3d4e5f";
const T0: i64 = 1_760_000_000_000_000_000;
/// The receiver's batch size, used for the baseline's write batches too.
const BATCH: usize = 8192;
/// Pause between window queries (each is cancelled after its first line).
const QUERY_GAP_MS: u64 = 20;

/// What one round measured on one side.
struct Round {
    ingest_rate: f64,
    first_line: Vec<Duration>,
    scan_rate: f64,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let contents = line_contents(args.line_bytes);
    // The client is a thread of its own at the default priority, like rnx.
    let client = Client::start();
    // The real side runs at the nice value joblet-persist (and core's replication) runs at by
    // default; the baseline on a thread of its own at the default priority.
    let nice = Config::default().nice;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .on_thread_start(move || {
            let _ = joblet_daemon::set_thread_nice(nice);
        })
        .build()?;

    // Two rounds per side, in the order baseline, real, real, baseline, so that neither side
    // always runs first or last, after a baseline round that is not counted: a process's first
    // round ran slower than its later ones. Each round writes into a new store and deletes it
    // at its end, so every round starts with the pages its predecessor just freed (see the
    // README).
    let (mut raw, mut ours, mut warm_up) = (Vec::new(), Vec::new(), 0.0);
    for (round, real_side) in [false, false, true, true, false].into_iter().enumerate() {
        if real_side {
            let (args, contents, client) = (args.clone(), contents.clone(), client.clone());
            let round = runtime.spawn(real(args, contents, client));
            ours.push(runtime.block_on(round)??);
        } else {
            let (args, contents) = (args.clone(), contents.clone());
            let baseline = std::thread::spawn(move || baseline(&args, &contents));
            let measured = baseline
                .join()
                .map_err(|_| anyhow::anyhow!("baseline panicked"))??;
            if round == 0 {
                warm_up = measured.ingest_rate;
            } else {
                raw.push(measured);
            }
        }
    }

    let mean = |rounds: &[Round], figure: fn(&Round) -> f64| {
        rounds.iter().map(figure).sum::<f64>() / rounds.len() as f64
    };
    let first_lines = |rounds: &[Round]| -> Vec<Duration> {
        rounds
            .iter()
            .flat_map(|r| r.first_line.iter().copied())
            .collect()
    };
    let mut table = Table::default();
    table.add(
        "ingest lines/s (IPC → store, acked)",
        mean(&ours, |r| r.ingest_rate),
        Some(mean(&raw, |r| r.ingest_rate)),
        "lines/s",
        ">= 1,000,000 and >= 0.70 of raw",
    );
    for (name, p) in [("p50", 0.50), ("p99", 0.99)] {
        table.add(
            format!("window query first line {name} (gRPC)"),
            percentile(&first_lines(&ours), p),
            Some(percentile(&first_lines(&raw), p)),
            "ms",
            if name == "p99" { "<= 2 ms" } else { "" },
        );
    }
    table.add(
        "full scan lines/s to a gRPC client",
        mean(&ours, |r| r.scan_rate),
        Some(mean(&raw, |r| r.scan_rate)),
        "lines/s",
        ">= 2,000,000",
    );
    let each = |rounds: &[Round]| {
        rounds
            .iter()
            .map(|r| format!("{:.2}M", r.ingest_rate / 1e6))
            .collect::<Vec<_>>()
            .join(", ")
    };
    println!(
        "{}",
        table.render(&format!(
            "persist: {} lines of {} bytes, durability {:?}, direct_io {}, baseline = raw RocksDB, \
             same options; after a warm-up, rounds baseline, real, real, baseline (means; query \
             percentiles over both rounds); queries run once flushes and compactions settled, for both",
            args.lines,
            args.line_bytes,
            Config::default().storage.durability,
            if args.direct_io { "on" } else { "off" }
        ))
    );
    println!(
        "ingest per round: real {}; baseline {} (warm-up round, not counted: {:.2}M)",
        each(&ours),
        each(&raw),
        warm_up / 1e6
    );
    Ok(())
}

/// One baseline round: raw `WriteBatch` writes of the same keys and values with the same
/// options and batch size; once settled, raw iterator seeks and a raw full scan.
fn baseline(args: &Args, contents: &[bytes::Bytes]) -> anyhow::Result<Round> {
    let dir = tempfile::tempdir()?;
    let store = Store::open(&config(args, dir.path()))?;
    let db = store.raw_db();
    let logs = db
        .cf_handle(joblet_persist::store::CF_LOGS)
        .context("logs column family")?;
    let started = Instant::now();
    // Sized for a full batch once, as the store sizes its batches.
    let batch_bytes = BATCH * (JOB.len() + 32 + args.line_bytes);
    let mut batch = rocksdb::WriteBatch::with_capacity_bytes(batch_bytes);
    for sequence in 1..=args.lines {
        let key =
            joblet_persist::keys::encode(JOB, timestamp(args.line_interval_ns, sequence), sequence);
        let content = &contents[sequence as usize % contents.len()];
        let mut value = Vec::with_capacity(content.len() + 1);
        value.push(Stream::Stdout as u8);
        value.extend_from_slice(content);
        batch.put_cf(logs, key, value);
        if batch.len() == BATCH {
            let full = std::mem::replace(
                &mut batch,
                rocksdb::WriteBatch::with_capacity_bytes(batch_bytes),
            );
            db.write_opt(full, store.write_options())?;
        }
    }
    db.write_opt(batch, store.write_options())?;
    // What the real side's last acknowledgement waits for under the durability in force: the
    // WAL synced (sync) or the memtables flushed (flushed).
    store.sync_wal()?;
    store.make_durable()?;
    let ingest_rate = args.lines as f64 / started.elapsed().as_secs_f64();
    settle(&store);

    let mut rng = rand::rng();
    let mut first_line = Vec::with_capacity(args.window_queries);
    for _ in 0..args.window_queries {
        let start = T0 + rng.random_range(0..span(args).max(1));
        let began = Instant::now();
        let mut options = rocksdb::ReadOptions::default();
        options.set_iterate_lower_bound(joblet_persist::keys::lower_bound(JOB, start));
        options.set_iterate_upper_bound(joblet_persist::keys::lower_bound(
            JOB,
            start + 60_000_000_000,
        ));
        let mut iter = db.raw_iterator_cf_opt(logs, options);
        iter.seek_to_first();
        anyhow::ensure!(iter.valid(), "raw window query found nothing");
        first_line.push(began.elapsed());
    }
    let started = Instant::now();
    let mut iter = db.raw_iterator_cf(logs);
    iter.seek_to_first();
    let mut scanned = 0u64;
    while iter.valid() {
        scanned += 1;
        iter.next();
    }
    anyhow::ensure!(scanned == args.lines, "raw scan found {scanned} lines");
    let scan_rate = scanned as f64 / started.elapsed().as_secs_f64();
    Ok(Round {
        ingest_rate,
        first_line,
        scan_rate,
    })
}

fn config(args: &Args, dir: &std::path::Path) -> Config {
    let mut config = Config {
        data_dir: dir.join("data"),
        ..Default::default()
    };
    config.ipc.socket = dir.join("persist.sock");
    config.retention.logs = Retention(None);
    config.metrics.listen = None;
    config.grpc.insecure = true;
    config.rocksdb.direct_io = args.direct_io;
    config
}

/// Waits until RocksDB has no flush or compaction running or pending.
fn settle(store: &Store) {
    let db = store.raw_db();
    let Some(logs) = db.cf_handle(joblet_persist::store::CF_LOGS) else {
        return;
    };
    let busy = |name: &str| db.property_int_value(name).ok().flatten().unwrap_or(0) > 0;
    let logs_busy = |name: &str| {
        db.property_int_value_cf(logs, name)
            .ok()
            .flatten()
            .unwrap_or(0)
            > 0
    };
    let deadline = Instant::now() + Duration::from_secs(300);
    while Instant::now() < deadline
        && (busy("rocksdb.num-running-flushes")
            || busy("rocksdb.num-running-compactions")
            || logs_busy("rocksdb.compaction-pending")
            || logs_busy("rocksdb.mem-table-flush-pending"))
    {
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn timestamp(line_interval_ns: i64, sequence: u64) -> i64 {
    T0 + sequence as i64 * line_interval_ns
}

/// Printable, varied lines so that compression sees something like real output.
fn line_contents(len: usize) -> Vec<bytes::Bytes> {
    let mut rng = rand::rng();
    (0..1024)
        .map(|_| {
            (0..len)
                .map(|_| rng.random_range(b' '..=b'~'))
                .collect::<Vec<u8>>()
                .into()
        })
        .collect()
}

fn percentile(samples: &[Duration], p: f64) -> f64 {
    let mut sorted = samples.to_vec();
    sorted.sort();
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted.get(index).map_or(0.0, |d| d.as_secs_f64() * 1000.0)
}

/// One round of the real side: ingest over IPC into a persist hosted in-process, then, once
/// settled, window queries and a full scan over gRPC.
async fn real(args: Args, contents: Vec<bytes::Bytes>, client: Client) -> anyhow::Result<Round> {
    let dir = tempfile::tempdir()?;
    let config = config(&args, dir.path());
    let shutdown = CancellationToken::new();
    let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let address = grpc.local_addr()?;
    let persist = Persist::open(config.clone()).await?;
    let store = persist.store();
    let server = tokio::spawn(persist.serve(grpc, shutdown.clone()));

    let ingest_rate = {
        let socket = config.ipc.socket.clone();
        let (lines, interval) = (args.lines, args.line_interval_ns);
        let nice = config.nice;
        // Like joblet-core's replication: its own thread, a single-threaded runtime, the
        // persist nice value (core's replication_nice has the same default).
        tokio::task::spawn_blocking(move || {
            let _ = joblet_daemon::set_thread_nice(nice);
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?
                .block_on(replicate(&socket, lines, &contents, interval))
        })
        .await??
    };
    // Queries are measured on a store at rest, like the baseline's: not against the flushes
    // and compactions the ingest just caused.
    tokio::task::spawn_blocking(move || settle(&store)).await?;

    let (first_line, scan_rate) = client
        .run(address, args.lines, args.window_queries, span(&args))
        .await?;

    shutdown.cancel();
    server.await??;
    Ok(Round {
        ingest_rate,
        first_line,
        scan_rate,
    })
}

/// Sends `lines` lines through a real `IpcSender` and returns the rate at which persist
/// acknowledged them.
async fn replicate(
    socket: &std::path::Path,
    lines: u64,
    contents: &[bytes::Bytes],
    line_interval_ns: i64,
) -> anyhow::Result<f64> {
    let shutdown = CancellationToken::new();
    let (sender, sender_task) = IpcSender::start(SenderConfig::new(socket), shutdown.clone());
    let mut connections = sender.connections();
    tokio::time::timeout(Duration::from_secs(10), connections.wait_for(|g| *g >= 1))
        .await
        .context("sender did not connect")??;
    let started = Instant::now();
    for sequence in 1..=lines {
        let content = &contents[sequence as usize % contents.len()];
        let timestamp = timestamp(line_interval_ns, sequence);
        // As joblet-core's replication builds them.
        let frame = Frame::log(JOB, sequence, timestamp, Stream::Stdout, content, false);
        sender.send(frame).await.ok().context("sender closed")?;
    }
    while sender.acknowledged(JOB, MessageType::Log) < lines {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let rate = lines as f64 / started.elapsed().as_secs_f64();
    shutdown.cancel();
    sender_task.await?;
    Ok(rate)
}

fn span(args: &Args) -> i64 {
    args.lines as i64 * args.line_interval_ns
}

type QueryResult = anyhow::Result<(Vec<Duration>, f64)>;
/// Server address, lines stored, window queries, time span of the lines; where to reply.
type Request = (
    std::net::SocketAddr,
    u64,
    usize,
    i64,
    tokio::sync::oneshot::Sender<QueryResult>,
);

/// The gRPC client: a thread with a single-threaded runtime of its own, like rnx, as a
/// separate process would be; on the server's runtime its tasks would queue behind the
/// server's.
#[derive(Clone)]
struct Client {
    requests: std::sync::mpsc::Sender<Request>,
}

impl Client {
    fn start() -> Client {
        let (requests, incoming) = std::sync::mpsc::channel::<Request>();
        std::thread::spawn(move || {
            for (address, lines, window_queries, span, reply) in incoming {
                let result = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(anyhow::Error::from)
                    .and_then(|runtime| {
                        runtime.block_on(query(address, lines, window_queries, span))
                    });
                let _ = reply.send(result);
            }
        });
        Client { requests }
    }

    async fn run(
        &self,
        address: std::net::SocketAddr,
        lines: u64,
        window_queries: usize,
        span: i64,
    ) -> QueryResult {
        let (reply, result) = tokio::sync::oneshot::channel();
        self.requests
            .send((address, lines, window_queries, span, reply))
            .map_err(|_| anyhow::anyhow!("client thread ended"))?;
        result.await?
    }
}

/// Window queries (time to the first line of each) and a full scan, over gRPC.
async fn query(
    address: std::net::SocketAddr,
    lines: u64,
    window_queries: usize,
    span: i64,
) -> anyhow::Result<(Vec<Duration>, f64)> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{address}"))?
        .initial_stream_window_size(Some(4 << 20))
        .initial_connection_window_size(Some(8 << 20))
        .connect()
        .await?;
    let mut client = PersistServiceClient::new(channel);
    let mut first_line = Vec::with_capacity(window_queries);
    for _ in 0..window_queries {
        let start = T0 + rand::rng().random_range(0..span.max(1));
        let began = Instant::now();
        let mut stream = client
            .query_logs(QueryLogsRequest {
                job_id: JOB.to_owned(),
                start_time: start,
                end_time: start + 60_000_000_000,
                ..Default::default()
            })
            .await?
            .into_inner();
        stream
            .message()
            .await?
            .context("window query found nothing")?;
        first_line.push(began.elapsed());
        // Cancel the rest of the window and give the server time to stop streaming it, so
        // that each query is measured alone.
        drop(stream);
        tokio::time::sleep(Duration::from_millis(QUERY_GAP_MS)).await;
    }

    let started = Instant::now();
    let mut stream = client
        .query_logs(QueryLogsRequest {
            job_id: JOB.to_owned(),
            ..Default::default()
        })
        .await?
        .into_inner();
    let mut scanned = 0u64;
    while stream.message().await?.is_some() {
        scanned += 1;
    }
    anyhow::ensure!(scanned == lines, "full scan returned {scanned} lines");
    let scan_rate = scanned as f64 / started.elapsed().as_secs_f64();
    Ok((first_line, scan_rate))
}
