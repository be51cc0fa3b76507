//! The Prometheus endpoint both daemons serve (`metrics.listen`), with the process figures, and
//! what every daemon exports about itself.

use metrics::describe_gauge;

pub const BUILD_INFO: &str = "joblet_build_info";

/// Histogram buckets for every `_seconds` histogram of both daemons, from 100 µs to 30 s, so
/// that alert rules can take quantiles with `histogram_quantile`.
pub const SECONDS_BUCKETS: [f64; 16] = [
    0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    30.0,
];

/// `joblet_build_info{component, version}` = 1, so dashboards and alerts can tell what runs.
pub fn publish_build_info(component: &'static str, version: &'static str) {
    describe_gauge!(BUILD_INFO, "1, labelled with the daemon and its version.");
    metrics::gauge!(BUILD_INFO, "component" => component, "version" => version).set(1.0);
}

/// The Prometheus text exposition format, version 0.0.4.
const EXPOSITION_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// How often the exporter's histograms are kept up (process figures are read at each scrape).
const UPKEEP_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);

/// Starts the Prometheus endpoint of `metrics.listen`, if set: binds `listen` (port 0 picks a
/// free port), installs the recorder (histograms with [`SECONDS_BUCKETS`]), serves
/// `GET /metrics` from it, and refreshes the process figures. Returns the address bound; an
/// error names the config key. Call inside a tokio runtime.
pub async fn serve(
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
            tokio::time::sleep(UPKEEP_INTERVAL).await;
            upkeep.run_upkeep();
        }
    });
    let render = move || {
        // The process figures as of this scrape (CPU seconds to the tick: a gauge, as
        // metrics-process exports them unrounded).
        collector.collect();
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
