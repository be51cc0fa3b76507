//! A running job's resource samples: its cgroup read every `jobs.metrics_interval` and appended
//! to its metrics spool.

use std::sync::Arc;
use std::time::{Duration, Instant};

use joblet_ipc::MetricData;

use crate::job::Job;

/// Samples the job's cgroup every `interval` until aborted.
pub async fn sample_metrics(job: Arc<Job>, interval: Duration) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut previous: Option<(Instant, u64)> = None;
    loop {
        ticker.tick().await;
        let Some(cgroup) = job.cgroup() else { continue };
        let sampled = job.clone();
        // The cgroup read and the spool append are blocking I/O.
        let Ok(taken) = tokio::task::spawn_blocking(move || {
            let usage = cgroup.usage();
            let now = Instant::now();
            let cpu_percent = match previous {
                Some((at, cpu)) => {
                    let wall = now.duration_since(at).as_nanos().max(1) as f64;
                    usage.cpu_nanos.saturating_sub(cpu) as f64 / wall * 100.0
                }
                None => 0.0,
            };
            let limit = if usage.memory_limit <= 0 || usage.memory_limit >= i64::MAX / 2 {
                0
            } else {
                usage.memory_limit
            };
            sampled.metrics.push(
                joblet_ipc::now_ns(),
                MetricData {
                    cpu_percent,
                    memory_bytes: usage.memory_bytes as i64,
                    memory_limit: limit,
                    io_read_bytes: usage.io_read_bytes as i64,
                    io_write_bytes: usage.io_write_bytes as i64,
                    pids: usage.pids as i64,
                    cpu_pressure_some: usage.cpu_pressure_some,
                    memory_pressure_some: usage.memory_pressure_some,
                    memory_pressure_full: usage.memory_pressure_full,
                    ..Default::default()
                },
            );
            (now, usage.cpu_nanos)
        })
        .await
        else {
            continue;
        };
        previous = Some(taken);
    }
}
