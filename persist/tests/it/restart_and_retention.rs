//! Durability across kill -9, idempotent replays, retention, bad payloads, metrics, shutdown
//! and configuration errors.

use joblet_ipc::{MessageType, Stream, log_message};
use joblet_proto::persist::{ListJobsRequest, QueryLogsRequest};

use crate::harness::{self, Replicator, query_logs};
use crate::ingest_and_query::now;

const JOB: &str = "7e57d00d-0000-4000-8000-00000000abcd";

fn lines(
    job: &str,
    range: std::ops::RangeInclusive<u64>,
    base: i64,
) -> Vec<joblet_ipc::IpcMessage> {
    range
        .map(|sequence| {
            log_message(
                job,
                sequence,
                base + sequence as i64,
                Stream::Stdout,
                format!("{sequence:08}").into(),
            )
        })
        .collect()
}

async fn all_sequences(daemon: &harness::Daemon, job: &str) -> Vec<u64> {
    let mut client = daemon.client().await;
    query_logs(
        &mut client,
        QueryLogsRequest {
            job_id: job.to_owned(),
            ..Default::default()
        },
    )
    .await
    .unwrap()
    .iter()
    .map(|l| l.sequence)
    .collect()
}

async fn acknowledged_data_survives_kill_9(durability: &str) {
    let dir = tempfile::tempdir().unwrap();
    let extra = format!("storage:\n  durability: {durability}\n");
    let daemon = harness::start(dir.path(), &extra).await;
    let base = now();
    {
        let replicator = Replicator::connect(&daemon.socket).await;
        replicator
            .send_all_acked(lines(JOB, 1..=20_000, base))
            .await;
        assert_eq!(
            replicator.sender.acknowledged(JOB, MessageType::Log),
            20_000
        );
    }
    daemon.kill_hard().await;

    let daemon = harness::start(dir.path(), &extra).await;
    assert_eq!(
        all_sequences(&daemon, JOB).await,
        (1..=20_000).collect::<Vec<_>>(),
        "everything acknowledged before kill -9 is there after restart"
    );

    // Core replays after a reconnect: replayed lines are stored once, and counted once.
    let replicator = Replicator::connect(&daemon.socket).await;
    replicator
        .send_all_acked(lines(JOB, 19_001..=21_000, base))
        .await;
    assert_eq!(
        all_sequences(&daemon, JOB).await,
        (1..=21_000).collect::<Vec<_>>()
    );
    let jobs = daemon
        .client()
        .await
        .list_jobs(ListJobsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .jobs;
    assert_eq!(jobs[0].log_lines, 21_000);
    let scrape = daemon.scrape().await;
    assert!(
        scrape.contains("joblet_persist_duplicates_skipped_total 1000"),
        "{scrape}"
    );
    drop(replicator);
    daemon.terminate().await;
}

#[tokio::test]
async fn acknowledged_lines_survive_kill_9_with_durability_sync() {
    acknowledged_data_survives_kill_9("sync").await;
}

#[tokio::test]
async fn acknowledged_lines_survive_kill_9_with_durability_wal() {
    acknowledged_data_survives_kill_9("wal").await;
}

#[tokio::test]
async fn expired_lines_are_never_returned() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = harness::start(dir.path(), "retention:\n  logs: 1h\n").await;
    let replicator = Replicator::connect(&daemon.socket).await;
    let two_hours_ago = now() - 2 * 3600 * 1_000_000_000;
    let mut messages = lines(JOB, 1..=5, two_hours_ago);
    messages.extend(lines(JOB, 6..=8, now()));
    replicator.send_all_acked(messages).await;
    assert_eq!(all_sequences(&daemon, JOB).await, [6, 7, 8]);
    drop(replicator);
    daemon.terminate().await;
}

#[tokio::test]
async fn invalid_payloads_are_counted_and_skipped_and_metrics_are_exported() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = harness::start(dir.path(), "").await;
    let replicator = Replicator::connect(&daemon.socket).await;
    let mut broken = log_message(JOB, 2, now(), Stream::Stdout, "x".into());
    broken.data = bytes::Bytes::from_static(&[0xff, 0xff, 0xff]);
    let mut messages = lines(JOB, 1..=1, now());
    messages.push(broken);
    messages.extend(lines(JOB, 3..=3, now()));
    replicator.send_all_acked(messages).await;
    assert_eq!(all_sequences(&daemon, JOB).await, [1, 3]);

    let scrape = daemon.scrape().await;
    for name in [
        "joblet_persist_ipc_messages_received_total",
        "joblet_persist_ipc_frames_rejected_total{reason=\"payload\"} 1",
        "joblet_persist_ipc_connections 1",
        "joblet_persist_write_duration_seconds",
        "joblet_persist_storage_bytes",
        "joblet_persist_storage_capacity_bytes",
        "joblet_persist_index_bytes",
        "joblet_persist_up 1",
        "process_resident_memory_bytes",
        "process_open_fds",
    ] {
        assert!(scrape.contains(name), "missing {name} in:\n{scrape}");
    }
    assert!(
        scrape.starts_with("HTTP/1.0 200") || scrape.starts_with("HTTP/1.1 200"),
        "{scrape}"
    );
    assert!(
        scrape
            .to_ascii_lowercase()
            .contains("content-type: text/plain; version=0.0.4"),
        "{scrape}"
    );
    drop(replicator);
    daemon.terminate().await;
}

#[tokio::test]
async fn a_metrics_address_in_use_is_refused_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let first = harness::start(dir.path(), "").await;
    let second_dir = tempfile::tempdir().unwrap();
    let config = harness::write_config(second_dir.path(), &first.metrics.to_string(), "");
    let refused = harness::run_to_exit(&["--config".as_ref(), config.as_ref()]);
    assert_eq!(refused.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("metrics.listen") && stderr.contains("in use"),
        "{stderr}"
    );
    first.terminate().await;
}

#[tokio::test]
async fn sigterm_stops_cleanly_and_removes_the_socket() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = harness::start(dir.path(), "").await;
    let socket = daemon.socket.clone();
    assert!(socket.exists());
    let log = daemon.stderr_log.clone();
    let status = daemon.terminate().await;
    assert!(
        status.success(),
        "{status:?}: {}",
        std::fs::read_to_string(log).unwrap()
    );
    assert!(!socket.exists());
}

#[test]
fn configuration_errors_name_the_key_and_the_reference_config_is_valid() {
    let reference = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/config/persist-config.yml"
    );
    let ok = harness::run_to_exit(&["--config", reference, "--check-config"].map(AsRef::as_ref));
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );

    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.yml");
    std::fs::write(&bad, "retention:\n  logs: -1d\n").unwrap();
    let refused = harness::run_to_exit(&["--config".as_ref(), bad.as_ref()]);
    assert_eq!(refused.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("retention") && stderr.contains("negative"),
        "{stderr}"
    );

    let missing = harness::run_to_exit(&["--config", "/no/such/file.yml"].map(AsRef::as_ref));
    assert_eq!(missing.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("/no/such/file.yml"));
}

#[tokio::test]
async fn every_thread_runs_at_the_configured_nice_value() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = harness::start(dir.path(), "nice: 7\n").await;
    let threads = joblet_ipc::daemon::thread_nice_values(daemon.child.id().unwrap()).unwrap();
    assert!(
        threads.len() > 2 && threads.iter().all(|(_, nice)| *nice == 7),
        "{threads:?}"
    );
    daemon.terminate().await;
}
