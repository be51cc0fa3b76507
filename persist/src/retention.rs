//! Retention that frees disk on time, a size cap, and both changed without a restart.
//!
//! The compaction filters ([`crate::store`]) drop expired records whenever RocksDB compacts
//! them, but an idle store is compacted only by the daily periodic compaction: a job's expired
//! lines used disk for up to a day. So every `retention.check_interval`:
//! 1. a job whose newest line and sample are older than their retention is dropped whole
//!    (`DeleteRange` on its keys, its summary and record removed), and the dropped ranges are
//!    compacted at once, which deletes or rewrites the files that held them;
//! 2. with `retention.max_bytes` set, while the data directory is larger, the jobs with the
//!    oldest newest-record are dropped whole (each logged and counted) until it is back under
//!    90 % of the cap. The check also runs as soon as a twentieth of the cap was ingested since
//!    the last one, so the cap holds between intervals.
//!
//! Each pass first rolls metric samples older than `retention.metrics_full_resolution` up into
//! 1-minute records (`store/downsample.rs`).
//!
//! Records of jobs that still write keep expiring through the compaction filters. The periods
//! and the cap live in a [`Policy`] that the filters, queries and this task read at each use:
//! SIGHUP re-reads them from the configuration file ([`Policy::apply`]).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::config::{Retention, RetentionConfig};
use crate::store::Store;

/// The size cap frees down to this share of it, so that it is not hit again at once.
pub const CAP_TARGET_PERCENT: u64 = 90;
/// How often the task checks whether a twentieth of the cap was ingested.
const CAP_POLL: Duration = Duration::from_secs(1);

/// Retention periods and the size cap in force (0 = forever / no cap).
#[derive(Debug, Default)]
pub struct Policy {
    logs_ns: AtomicU64,
    metrics_ns: AtomicU64,
    metrics_full_resolution_ns: AtomicU64,
    max_bytes: AtomicU64,
    /// Wakes the retention task (a changed policy, a cap about to be reached).
    wake: Notify,
}

fn nanos(retention: Retention) -> u64 {
    retention
        .0
        .map_or(0, |period| period.as_nanos().min(u64::MAX as u128) as u64)
}

fn retention(nanos: u64) -> Retention {
    Retention((nanos > 0).then(|| Duration::from_nanos(nanos)))
}

impl Policy {
    pub fn new(config: &RetentionConfig) -> Arc<Policy> {
        let policy = Arc::new(Policy::default());
        policy.set(config);
        policy
    }

    pub fn logs(&self) -> Retention {
        retention(self.logs_ns.load(Ordering::Relaxed))
    }

    pub fn metrics(&self) -> Retention {
        retention(self.metrics_ns.load(Ordering::Relaxed))
    }

    /// How long samples are kept as taken before they are downsampled.
    pub fn metrics_full_resolution(&self) -> Retention {
        retention(self.metrics_full_resolution_ns.load(Ordering::Relaxed))
    }

    pub fn max_bytes(&self) -> Option<u64> {
        Some(self.max_bytes.load(Ordering::Relaxed)).filter(|&cap| cap > 0)
    }

    /// Takes the periods and cap of `config` (already validated); returns what changed, as
    /// `key: old → new` texts, and wakes the retention task if anything did.
    pub fn apply(&self, config: &RetentionConfig) -> Vec<String> {
        let changed = self.set(config);
        if !changed.is_empty() {
            self.wake.notify_one();
        }
        changed
    }

    fn set(&self, config: &RetentionConfig) -> Vec<String> {
        let mut changed = Vec::new();
        let show = |nanos: u64| match nanos {
            0 => "0 (forever)".to_owned(),
            n => humantime::format_duration(Duration::from_nanos(n)).to_string(),
        };
        for (key, slot, value, shown) in [
            (
                "retention.logs",
                &self.logs_ns,
                nanos(config.logs),
                show as fn(u64) -> String,
            ),
            (
                "retention.metrics",
                &self.metrics_ns,
                nanos(config.metrics),
                show,
            ),
            (
                "retention.metrics_full_resolution",
                &self.metrics_full_resolution_ns,
                nanos(config.metrics_full_resolution),
                show,
            ),
            (
                "retention.max_bytes",
                &self.max_bytes,
                config.max_bytes.as_u64(),
                |bytes: u64| match bytes {
                    0 => "0 (no cap)".to_owned(),
                    b => bytesize::ByteSize::b(b).to_string(),
                },
            ),
        ] {
            let old = slot.swap(value, Ordering::Relaxed);
            if old != value {
                changed.push(format!("{key}: {} → {}", shown(old), shown(value)));
            }
        }
        changed
    }
}

/// What one retention pass dropped.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Dropped {
    pub expired_jobs: u64,
    pub expired_bytes: u64,
    pub capped_jobs: u64,
    pub capped_bytes: u64,
}

/// Runs retention passes until `shutdown`: at start, so that what expired while persist was
/// down goes at once; then every `interval`, when the policy changes, and when a twentieth of
/// the cap was ingested since the last pass.
pub async fn run(
    store: Arc<Store>,
    data_dir: PathBuf,
    interval: Duration,
    shutdown: CancellationToken,
) {
    let policy = store.policy().clone();
    let mut last = Instant::now();
    let mut ingested_at_last = store.ingested_bytes();
    // The first pass runs at once.
    policy.wake.notify_one();
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = policy.wake.notified() => {}
            () = tokio::time::sleep(interval.min(CAP_POLL)) => {
                let due = last.elapsed() >= interval;
                let filling = policy.max_bytes().is_some_and(|cap| {
                    store.ingested_bytes().saturating_sub(ingested_at_last) >= cap / 20
                });
                if !due && !filling {
                    continue;
                }
            }
        }
        last = Instant::now();
        ingested_at_last = store.ingested_bytes();
        let pass = {
            let store = store.clone();
            let data_dir = data_dir.clone();
            tokio::task::spawn_blocking(move || {
                match store.downsample_metrics() {
                    Ok(done) if done.samples > 0 => tracing::info!(
                        jobs = done.jobs,
                        samples = done.samples,
                        rollups = done.rollups,
                        "metric samples older than retention.metrics_full_resolution rolled up"
                    ),
                    Ok(_) => {}
                    Err(error) => tracing::error!(%error, "downsampling metrics failed"),
                }
                store.enforce_retention(&data_dir)
            })
            .await
        };
        match pass {
            Ok(Ok(dropped)) if dropped != Dropped::default() => tracing::info!(
                expired_jobs = dropped.expired_jobs,
                expired_bytes = dropped.expired_bytes,
                capped_jobs = dropped.capped_jobs,
                capped_bytes = dropped.capped_bytes,
                took_ms = last.elapsed().as_millis() as u64,
                "retention pass freed disk"
            ),
            Ok(Ok(_)) => {}
            Ok(Err(error)) => tracing::error!(%error, "retention pass failed"),
            Err(error) => tracing::error!(%error, "retention task failed"),
        }
    }
}

/// Re-reads `retention.*` from `path` on every SIGHUP (`systemctl reload`) and applies it at
/// once; a file that does not load or validate is refused with the running settings kept.
/// Other settings need a restart, which is said when they changed.
pub fn reload_on_sighup(
    path: &Path,
    running: crate::config::Config,
    policy: Arc<Policy>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hangups = signal(SignalKind::hangup())?;
    let path = path.to_owned();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                received = hangups.recv() => if received.is_none() { return },
            }
            let loaded = {
                let path = path.clone();
                tokio::task::spawn_blocking(move || crate::config::Config::load(&path)).await
            };
            let config = match loaded {
                Ok(Ok(config)) => config,
                Ok(Err(error)) => {
                    tracing::error!(path = %path.display(), "SIGHUP: configuration refused, the running settings are kept: {error:#}");
                    continue;
                }
                Err(error) => {
                    tracing::error!(%error, "SIGHUP: reading the configuration failed");
                    continue;
                }
            };
            let changed = policy.apply(&config.retention);
            if changed.is_empty() {
                tracing::info!("SIGHUP: retention unchanged");
            } else {
                tracing::info!(changes = %changed.join(", "), "SIGHUP: retention applied");
            }
            let mut rest = config.clone();
            rest.retention = running.retention.clone();
            if format!("{rest:?}") != format!("{running:?}") {
                tracing::warn!(
                    "SIGHUP: settings other than retention.* changed; they take effect at the next restart"
                );
            }
        }
    });
    Ok(())
}
