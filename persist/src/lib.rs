//! joblet-persist: the query side of ADR-0001.
//!
//! It receives every log line and metric sample joblet-core replicates over the IPC socket
//! ([`ingest`]), stores them in RocksDB ([`store`]) and answers history queries over gRPC
//! ([`service`]). [`Persist::open`] acquires everything that can fail at start (data directory,
//! RocksDB, the socket); [`Persist::serve`] runs until the shutdown token is cancelled, then
//! stops accepting, stores and acknowledges what was received, and flushes RocksDB.

pub mod backup;
pub mod config;
pub mod ingest;
pub mod keys;
pub mod log_route;
pub mod metrics;
pub mod retention;
pub mod service;
pub mod store;

use std::os::unix::fs::DirBuilderExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use joblet_ipc::{IpcReceiver, ReceiverConfig};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// HTTP/2 flow-control windows: the 64 KiB default caps a long history stream at a fraction
/// of what a scan produces.
const STREAM_WINDOW_BYTES: u32 = 4 << 20;
const CONNECTION_WINDOW_BYTES: u32 = 8 << 20;

use crate::config::{Config, Durability};
use crate::store::Store;

/// How often storage gauges are refreshed.
const GAUGE_INTERVAL: Duration = Duration::from_secs(10);

pub struct Persist {
    config: Config,
    /// The file the configuration came from: SIGHUP re-reads its retention settings.
    config_path: Option<std::path::PathBuf>,
    store: Arc<Store>,
    receiver: IpcReceiver,
}

impl Persist {
    pub async fn open(config: Config) -> anyhow::Result<Persist> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&config.data_dir)
            .with_context(|| format!("create data_dir {}", config.data_dir.display()))?;
        let store_config = config.clone();
        let store = tokio::task::spawn_blocking(move || Store::open(&store_config))
            .await?
            .with_context(|| format!("open store in {}", config.data_dir.display()))?;
        let mut receiver_config = ReceiverConfig::new(&config.ipc.socket);
        receiver_config.max_frame_bytes = config.ipc.max_frame_size.as_u64() as usize;
        receiver_config.max_connections = config.ipc.max_connections;
        let receiver = IpcReceiver::bind(receiver_config)
            .await
            .context("ipc.socket")?;
        Ok(Persist {
            config,
            config_path: None,
            store: Arc::new(store),
            receiver,
        })
    }

    /// Names the file the configuration came from, so that SIGHUP re-reads retention from it.
    pub fn with_config_path(mut self, path: std::path::PathBuf) -> Persist {
        self.config_path = Some(path);
        self
    }

    pub fn store(&self) -> Arc<Store> {
        self.store.clone()
    }

    pub async fn serve(self, grpc: TcpListener, shutdown: CancellationToken) -> anyhow::Result<()> {
        let Persist {
            config,
            config_path,
            store,
            receiver,
        } = self;
        let tasks = tokio_util::task::TaskTracker::new();
        let sink = Arc::new(ingest::StoreSink::new(store.clone()));
        let receiving = tokio::spawn(receiver.run(sink, shutdown.clone()));
        // With durability `flushed` the receiver's last acknowledgements wait for a flush:
        // the flusher stops after the receiver.
        let flusher_stop = CancellationToken::new();
        let flusher = (config.storage.durability == Durability::Flushed).then(|| {
            tokio::spawn(flush_periodically(
                store.clone(),
                config.storage.flush_interval,
                shutdown.clone(),
                flusher_stop.clone(),
            ))
        });
        tasks.spawn(publish_storage_gauges(
            store.clone(),
            config.clone(),
            shutdown.clone(),
        ));
        tasks.spawn(publish_query_stall(shutdown.clone()));
        tasks.spawn(retention::run(
            store.clone(),
            config.data_dir.clone(),
            config.retention.check_interval,
            shutdown.clone(),
        ));
        if let Some(path) = &config_path {
            retention::reload_on_sighup(
                path,
                config.clone(),
                store.policy().clone(),
                shutdown.clone(),
            )
            .context("install the SIGHUP handler")?;
        }
        if config.storage.durability == Durability::Wal {
            tasks.spawn(sync_wal_periodically(
                store.clone(),
                config.storage.background_sync_interval,
                shutdown.clone(),
            ));
        }
        ::metrics::gauge!(metrics::UP).set(1.0);
        let api = log_route::PersistRoutes::new(
            service::PersistApi::new(store.clone(), config.query.max_tail),
            config.grpc.max_request_size.as_u64() as usize,
        );
        let (tls, auth) = joblet_daemon::tls::listener_security(
            config.grpc.listen,
            config.grpc.tls.as_ref(),
            config.grpc.insecure,
            service::read_only,
        )
        .context("grpc.tls")?;
        let router = tonic::transport::Server::builder()
            // Every log line of an RPC names it.
            .trace_fn(|request| tracing::info_span!("rpc", method = %request.uri().path()))
            .initial_stream_window_size(Some(STREAM_WINDOW_BYTES))
            .initial_connection_window_size(Some(CONNECTION_WINDOW_BYTES))
            .layer(auth)
            .layer(joblet_daemon::request_limit::layer())
            .add_service(api);
        let served = joblet_daemon::tls::serve(router, grpc, tls, shutdown.clone()).await;
        shutdown.cancel();
        let _ = receiving.await;
        flusher_stop.cancel();
        if let Some(flusher) = flusher {
            let _ = flusher.await;
        }
        tasks.close();
        tasks.wait().await;
        ::metrics::gauge!(metrics::UP).set(0.0);
        tokio::task::spawn_blocking(move || store.flush())
            .await?
            .context("flush store at shutdown")?;
        served.context("gRPC server")?;
        tracing::info!("joblet-persist stopped");
        Ok(())
    }
}

async fn publish_storage_gauges(store: Arc<Store>, config: Config, shutdown: CancellationToken) {
    loop {
        let store = store.clone();
        let config_for_task = config.clone();
        let measured = tokio::task::spawn_blocking(move || {
            let used = store::directory_bytes(&config_for_task.data_dir);
            let filesystem = filesystem_bytes(&config_for_task.data_dir);
            let capacity = config_for_task
                .storage
                .capacity
                .map(|c| c.as_u64())
                .or(filesystem.map(|(size, _)| size));
            (used, capacity, filesystem, store.index_bytes())
        })
        .await;
        if let Ok((used, capacity, filesystem, index)) = measured {
            ::metrics::gauge!(metrics::STORAGE_BYTES).set(used as f64);
            if let Some(capacity) = capacity {
                ::metrics::gauge!(metrics::STORAGE_CAPACITY_BYTES).set(capacity as f64);
            }
            if let Some((size, available)) = filesystem {
                ::metrics::gauge!(metrics::FILESYSTEM_SIZE_BYTES).set(size as f64);
                ::metrics::gauge!(metrics::FILESYSTEM_AVAILABLE_BYTES).set(available as f64);
            }
            ::metrics::gauge!(metrics::INDEX_BYTES).set(index as f64);
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(GAUGE_INTERVAL) => {}
        }
    }
}

/// Every second: the oldest running query's age, and the longest a running query has worked
/// without handing on a record.
async fn publish_query_stall(shutdown: CancellationToken) {
    loop {
        let (oldest, stall) = service::in_flight();
        ::metrics::gauge!(metrics::QUERY_OLDEST).set(oldest.as_secs_f64());
        ::metrics::gauge!(metrics::QUERY_STALL).set(stall.as_secs_f64());
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

/// The size of the filesystem holding `path`, and what an unprivileged writer can still use.
fn filesystem_bytes(path: &Path) -> Option<(u64, u64)> {
    let stat = nix::sys::statvfs::statvfs(path).ok()?;
    let fragment = stat.fragment_size() as u64;
    Some((
        stat.blocks() as u64 * fragment,
        stat.blocks_available() as u64 * fragment,
    ))
}

/// Durability `flushed`: flushes what was written every `every` (at once once shutting down,
/// so that the last acknowledgements go out), until `stop`.
async fn flush_periodically(
    store: Arc<Store>,
    every: Duration,
    shutdown: CancellationToken,
    stop: CancellationToken,
) {
    static FAILED_LOG: joblet_daemon::LogLimiter =
        joblet_daemon::LogLimiter::new(Duration::from_secs(60));
    loop {
        let wait = if shutdown.is_cancelled() {
            Duration::from_millis(10)
        } else {
            every
        };
        tokio::select! {
            () = stop.cancelled() => return,
            () = shutdown.cancelled(), if !shutdown.is_cancelled() => {}
            () = tokio::time::sleep(wait) => {}
        }
        let store = store.clone();
        match tokio::task::spawn_blocking(move || store.flush_written()).await {
            Ok(Ok(_)) => {}
            Ok(Err(error)) => {
                if let Some(since_last) = FAILED_LOG.hit() {
                    tracing::error!(%error, failures_since_last_report = since_last, "flush failed; the batches that waited for it are refused and core sends them again");
                }
            }
            Err(error) => tracing::error!(%error, "flush task failed"),
        }
    }
}

async fn sync_wal_periodically(store: Arc<Store>, every: Duration, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(every) => {}
        }
        let store = store.clone();
        match tokio::task::spawn_blocking(move || store.sync_wal()).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => tracing::error!(%error, "WAL sync failed"),
            Err(error) => tracing::error!(%error, "WAL sync task failed"),
        }
    }
}
