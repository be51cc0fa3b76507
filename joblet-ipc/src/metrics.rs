//! Prometheus metric names emitted by this crate, with their help text.
//!
//! The sender's metrics are joblet-core's (`joblet_ipc_*`); the receiver's are joblet-persist's
//! (`joblet_persist_ipc_*`). Alert rules in `deploy/prometheus/` refer to these names.
//! [`serve_exporter`] is the Prometheus endpoint both daemons share, with their process
//! figures (`process_*`: resident memory, CPU seconds, open file descriptors).

use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};

pub const IPC_MESSAGES_SENT: &str = "joblet_ipc_messages_sent_total";
pub const IPC_MESSAGES_DROPPED: &str = "joblet_ipc_messages_dropped_total";
pub const IPC_QUEUE_DEPTH: &str = "joblet_ipc_queue_depth";
pub const IPC_QUEUE_CAPACITY: &str = "joblet_ipc_queue_capacity";
pub const IPC_CONNECTED: &str = "joblet_ipc_connected";
pub const IPC_RECONNECTS: &str = "joblet_ipc_reconnects_total";
pub const IPC_CONNECT_ATTEMPTS: &str = "joblet_ipc_connect_attempts_total";
pub const IPC_ACKS_RECEIVED: &str = "joblet_ipc_acks_received_total";
pub const BUILD_INFO: &str = "joblet_build_info";
pub const IPC_WRITE_DURATION: &str = "joblet_ipc_write_duration_seconds";

pub const PERSIST_IPC_MESSAGES_RECEIVED: &str = "joblet_persist_ipc_messages_received_total";
pub const PERSIST_IPC_FRAMES_REJECTED: &str = "joblet_persist_ipc_frames_rejected_total";
pub const PERSIST_IPC_CONNECTIONS: &str = "joblet_persist_ipc_connections";
pub const PERSIST_IPC_CONNECTIONS_REFUSED: &str = "joblet_persist_ipc_connections_refused_total";

/// Reasons a sender drops a message (`joblet_ipc_messages_dropped_total{reason}`).
pub const DROP_REASONS: [&str; 4] = ["queue_full", "disconnected", "oversized", "shutdown"];
/// Reasons a receiver rejects a frame (`joblet_persist_ipc_frames_rejected_total{reason}`).
pub const REJECT_REASONS: [&str; 7] = [
    "oversized",
    "truncated",
    "decode",
    "version",
    "empty_job_id",
    "type",
    "payload",
];

/// Histogram buckets for every `_seconds` histogram of both daemons, from 100 µs to 30 s, so
/// that alert rules can take quantiles with `histogram_quantile`.
pub const SECONDS_BUCKETS: [f64; 16] = [
    0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    30.0,
];

/// Registers help text for the sender's metrics (call once, from joblet-core), and creates
/// its counters at zero so that rates and alerts see them before the first event.
pub fn describe_sender() {
    metrics::counter!(IPC_MESSAGES_SENT).absolute(0);
    metrics::counter!(IPC_RECONNECTS).absolute(0);
    metrics::counter!(IPC_CONNECT_ATTEMPTS).absolute(0);
    metrics::counter!(IPC_ACKS_RECEIVED).absolute(0);
    describe_counter!(
        IPC_ACKS_RECEIVED,
        "Acknowledgements received from joblet-persist: while lines are behind, a counter that \
         does not grow means replication is stalled."
    );
    describe_counter!(
        IPC_CONNECT_ATTEMPTS,
        "Attempts to connect to joblet-persist, successful or not (reconnects_total counts \
         the successful reconnects)."
    );
    for reason in DROP_REASONS {
        metrics::counter!(IPC_MESSAGES_DROPPED, "reason" => reason).absolute(0);
    }
    describe_counter!(IPC_MESSAGES_SENT, "Messages written to the persist socket.");
    describe_counter!(
        IPC_MESSAGES_DROPPED,
        "Messages not replicated, by reason (queue_full, disconnected, oversized, shutdown)."
    );
    describe_gauge!(
        IPC_QUEUE_DEPTH,
        "Messages waiting in the replication queue."
    );
    describe_gauge!(IPC_QUEUE_CAPACITY, "Capacity of the replication queue.");
    describe_gauge!(
        IPC_CONNECTED,
        "1 while connected to joblet-persist, else 0."
    );
    describe_counter!(
        IPC_RECONNECTS,
        "Successful reconnections to joblet-persist."
    );
    describe_histogram!(
        IPC_WRITE_DURATION,
        Unit::Seconds,
        "Time to write one batch of frames to the persist socket."
    );
}

/// `joblet_build_info{component, version}` = 1, so dashboards and alerts can tell what runs.
pub fn publish_build_info(component: &'static str, version: &'static str) {
    describe_gauge!(BUILD_INFO, "1, labelled with the daemon and its version.");
    metrics::gauge!(BUILD_INFO, "component" => component, "version" => version).set(1.0);
}

/// Registers help text for the receiver's metrics (call once, from joblet-persist), and
/// creates its counters at zero.
pub fn describe_receiver() {
    metrics::counter!(PERSIST_IPC_MESSAGES_RECEIVED).absolute(0);
    metrics::gauge!(PERSIST_IPC_CONNECTIONS).set(0.0);
    metrics::counter!(PERSIST_IPC_CONNECTIONS_REFUSED, "reason" => "max_connections").absolute(0);
    describe_counter!(
        PERSIST_IPC_CONNECTIONS_REFUSED,
        "IPC connections closed at once, by reason (max_connections: ipc.max_connections open)."
    );
    for reason in REJECT_REASONS {
        metrics::counter!(PERSIST_IPC_FRAMES_REJECTED, "reason" => reason).absolute(0);
    }
    describe_counter!(
        PERSIST_IPC_MESSAGES_RECEIVED,
        "Valid messages received from joblet-core."
    );
    describe_counter!(
        PERSIST_IPC_FRAMES_REJECTED,
        "Frames or messages refused, by reason (oversized, truncated, decode, version, empty_job_id, type)."
    );
    describe_gauge!(
        PERSIST_IPC_CONNECTIONS,
        "Open IPC connections from joblet-core."
    );
}

/// The Prometheus text exposition format, version 0.0.4.
const EXPOSITION_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// How often process figures are refreshed.
const PROCESS_REFRESH: std::time::Duration = std::time::Duration::from_secs(5);

/// Starts the Prometheus endpoint of `metrics.listen`, if set: binds `listen` (port 0 picks a
/// free port), installs the recorder (histograms with [`SECONDS_BUCKETS`]), serves
/// `GET /metrics` from it, and refreshes the process figures. Returns the address bound; an
/// error names the config key. Call inside a tokio runtime.
pub async fn serve_exporter(
    listen: Option<std::net::SocketAddr>,
) -> std::io::Result<Option<std::net::SocketAddr>> {
    let Some(address) = listen else {
        return Ok(None);
    };
    install_exporter(address).await.map(Some).map_err(|error| {
        std::io::Error::new(
            error.kind(),
            format!("metrics.listen: start Prometheus exporter on {address}: {error}"),
        )
    })
}

async fn install_exporter(address: std::net::SocketAddr) -> std::io::Result<std::net::SocketAddr> {
    let listener = tokio::net::TcpListener::bind(address).await?;
    let bound = listener.local_addr()?;
    let handle = metrics_exporter_prometheus::PrometheusBuilder::new()
        .set_buckets(&SECONDS_BUCKETS)
        .and_then(|builder| builder.install_recorder())
        .map_err(std::io::Error::other)?;
    let collector = metrics_process::Collector::default();
    collector.describe();
    collector.collect();
    let upkeep = handle.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(PROCESS_REFRESH).await;
            collector.collect();
            upkeep.run_upkeep();
        }
    });
    let render = move || {
        let content_type = (axum::http::header::CONTENT_TYPE, EXPOSITION_CONTENT_TYPE);
        std::future::ready(([content_type], handle.render()))
    };
    let app = axum::Router::new().route("/metrics", axum::routing::get(render));
    tokio::spawn(async move {
        if let Err(error) = axum::serve(listener, app).await {
            tracing::error!(%error, "Prometheus endpoint stopped");
        }
    });
    Ok(bound)
}
