//! Metric samples older than `retention.metrics_full_resolution` are served as 1-minute
//! rollups (min, average, max), each saying so; replays of rolled-up samples are skipped, late
//! samples are merged into their minute, and all of it survives a restart.

use std::time::Duration;

use joblet_ipc::{MetricData, metric_message};
use joblet_proto::persist::{Metric, QueryMetricsRequest};

use crate::harness::{self, Replicator};
use crate::ingest_and_query::now;

const JOB: &str = "d0475a3e-0000-4000-8000-00000000d0e5";
const SECOND: i64 = 1_000_000_000;
const MINUTE: i64 = 60 * SECOND;

/// A sample whose figures follow from `n`, so that each minute's extremes and averages differ.
fn sample(n: u64) -> MetricData {
    MetricData {
        cpu_percent: (n % 60) as f64 * 1.5,
        memory_bytes: 1_000_000 + (n as i64 * 7919) % 100_000,
        memory_limit: 1 << 30,
        pids: 1 + (n % 5) as i64,
        ..Default::default()
    }
}

async fn query(daemon: &harness::Daemon, start_time: i64, end_time: i64) -> Vec<Metric> {
    let mut stream = daemon
        .client()
        .await
        .query_metrics(QueryMetricsRequest {
            job_id: JOB.to_owned(),
            start_time,
            end_time,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut metrics = Vec::new();
    while let Some(metric) = stream.message().await.unwrap() {
        metrics.push(metric);
    }
    metrics
}

async fn summary(daemon: &harness::Daemon) -> joblet_proto::persist::JobSummary {
    let mut jobs = harness::job_summaries(daemon).await;
    assert_eq!(jobs.len(), 1);
    jobs.remove(0)
}

/// Waits until the records of the job satisfy `done`; returns the last ones read.
async fn records_when(daemon: &harness::Daemon, done: impl Fn(&[Metric]) -> bool) -> Vec<Metric> {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let records = query(daemon, 0, 0).await;
        if done(&records) || std::time::Instant::now() > deadline {
            return records;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// What a rollup of `samples` (sequence, sample) must say.
fn check_rollup(metric: &Metric, minute: i64, samples: &[(u64, MetricData)]) {
    let cpu: Vec<f64> = samples.iter().map(|(_, s)| s.cpu_percent).collect();
    let memory: Vec<i64> = samples.iter().map(|(_, s)| s.memory_bytes).collect();
    let (average, min, max) = (
        metric.sample.as_ref().unwrap(),
        metric.min.as_ref().unwrap(),
        metric.max.as_ref().unwrap(),
    );
    assert_eq!(metric.resolution_seconds, 60, "{metric:?}");
    assert_eq!(metric.timestamp, minute);
    assert_eq!(metric.samples as usize, samples.len());
    assert_eq!(
        metric.sequence,
        samples.iter().map(|(n, _)| *n).max().unwrap()
    );
    assert_eq!(
        min.cpu_percent,
        cpu.iter().cloned().fold(f64::MAX, f64::min)
    );
    assert_eq!(
        max.cpu_percent,
        cpu.iter().cloned().fold(f64::MIN, f64::max)
    );
    let mean = cpu.iter().sum::<f64>() / cpu.len() as f64;
    assert!(
        (average.cpu_percent - mean).abs() < 1e-9,
        "{average:?} vs {mean}"
    );
    assert_eq!(min.memory_bytes, *memory.iter().min().unwrap());
    assert_eq!(max.memory_bytes, *memory.iter().max().unwrap());
    let mean = memory.iter().sum::<i64>() as f64 / memory.len() as f64;
    assert_eq!(average.memory_bytes, mean.round() as i64);
    assert_eq!(average.memory_limit, 1 << 30);
}

#[tokio::test]
async fn samples_older_than_the_full_resolution_are_served_as_minute_rollups() {
    let dir = tempfile::tempdir().unwrap();
    let config = "retention:\n  metrics_full_resolution: 10m\n  check_interval: 1s\n";
    let daemon = harness::start(dir.path(), config).await;
    // Three minutes of samples, one a second, two hours ago; five in the last minute.
    let base = (now() - 2 * 3600 * SECOND) / MINUTE * MINUTE;
    let old: Vec<(u64, i64, MetricData)> = (1..=180u64)
        .map(|n| (n, base + (n as i64 - 1) * SECOND, sample(n)))
        .collect();
    let recent: Vec<(u64, i64, MetricData)> = (181..=185u64)
        .map(|n| {
            (
                n,
                now() - 60 * SECOND + (n as i64 - 181) * SECOND,
                sample(n),
            )
        })
        .collect();
    let messages = |samples: &[(u64, i64, MetricData)]| -> Vec<joblet_ipc::IpcMessage> {
        samples
            .iter()
            .map(|(n, at, s)| metric_message(JOB, *n, *at, s))
            .collect()
    };
    let all: Vec<_> = old.iter().chain(&recent).cloned().collect();
    let replicator = Replicator::connect(&daemon.socket).await;
    replicator.send_all_acked(messages(&all)).await;

    let records = records_when(&daemon, |r| r.len() == 8).await;
    assert_eq!(records.len(), 8, "3 rollups and 5 samples: {records:#?}");
    let minute_samples = |m: i64| -> Vec<(u64, MetricData)> {
        old.iter()
            .filter(|(_, at, _)| (at - base) / MINUTE == m)
            .map(|(n, _, s)| (*n, *s))
            .collect()
    };
    for (m, record) in records[..3].iter().enumerate() {
        check_rollup(record, base + m as i64 * MINUTE, &minute_samples(m as i64));
    }
    for (record, (n, at, s)) in records[3..].iter().zip(&recent) {
        assert_eq!(
            (record.resolution_seconds, record.samples, record.sequence),
            (0, 1, *n),
            "recent samples are kept as taken"
        );
        assert_eq!(record.timestamp, *at);
        assert_eq!(record.sample.as_ref().unwrap().cpu_percent, s.cpu_percent);
        assert!(record.min.is_none() && record.max.is_none());
    }
    // A time range gets the rollups of its minutes.
    let middle = query(&daemon, base + MINUTE, base + 2 * MINUTE).await;
    assert_eq!(middle.len(), 1);
    check_rollup(&middle[0], base + MINUTE, &minute_samples(1));
    let scraped = daemon.scrape().await;
    assert!(
        scraped.contains("joblet_persist_metric_samples_downsampled_total 180"),
        "{scraped}"
    );

    // Core replays everything after a reconnect: nothing is counted twice.
    drop(replicator);
    let replicator = Replicator::connect(&daemon.socket).await;
    replicator.send_all_acked(messages(&all)).await;
    assert_eq!(summary(&daemon).await.metric_samples, 185);
    let scraped = daemon.scrape().await;
    assert!(
        scraped.contains("joblet_persist_duplicates_skipped_total 185"),
        "every replayed sample is a duplicate, rolled up or not: {scraped}"
    );
    assert_eq!(
        query(&daemon, 0, 0).await,
        records,
        "a replay changes nothing"
    );

    // A sample core could not send for two hours arrives: it joins its minute's rollup.
    let late = (186u64, base + 30 * SECOND + SECOND / 2, sample(59));
    replicator.send_all_acked(messages(&[late])).await;
    let merged = records_when(&daemon, |r| r[0].samples == 61).await;
    assert_eq!(merged.len(), 8, "{merged:#?}");
    let mut first = minute_samples(0);
    first.push((late.0, late.2));
    check_rollup(&merged[0], base, &first);
    assert_eq!(merged[1..], records[1..]);
    drop(replicator);

    // All of it survives a restart.
    daemon.terminate().await;
    let daemon = harness::start(dir.path(), config).await;
    assert_eq!(query(&daemon, 0, 0).await, merged);
    assert_eq!(summary(&daemon).await.metric_samples, 186);
    daemon.terminate().await;
}

#[tokio::test]
async fn with_full_resolution_zero_every_sample_is_kept_as_taken() {
    let dir = tempfile::tempdir().unwrap();
    let config = "retention:\n  metrics_full_resolution: 0\n  check_interval: 1s\n";
    let daemon = harness::start(dir.path(), config).await;
    let base = (now() - 2 * 3600 * SECOND) / MINUTE * MINUTE;
    let replicator = Replicator::connect(&daemon.socket).await;
    replicator
        .send_all_acked(
            (1..=120u64)
                .map(|n| metric_message(JOB, n, base + n as i64 * SECOND, &sample(n)))
                .collect(),
        )
        .await;
    tokio::time::sleep(Duration::from_millis(2500)).await; // two passes
    let records = query(&daemon, 0, 0).await;
    assert_eq!(records.len(), 120);
    assert!(records.iter().all(|r| r.resolution_seconds == 0));
    drop(replicator);
    daemon.terminate().await;
}
