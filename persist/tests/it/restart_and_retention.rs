//! Durability across kill -9, idempotent replays, retention, bad payloads, metrics, shutdown
//! and configuration errors.

use joblet_ipc::{MessageType, Stream, log_message};
use joblet_proto::persist::QueryLogsRequest;

use crate::harness::{self, Replicator, job_summaries, query_logs};
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
    let jobs = job_summaries(&daemon).await;
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
async fn acknowledged_lines_survive_kill_9_with_durability_flushed() {
    acknowledged_data_survives_kill_9("flushed").await;
}

/// Durability `flushed`: lines stored but not yet flushed are not acknowledged; a kill -9
/// loses them and only them, the job's summary agrees with what is left, and the sender's
/// replay from its acknowledgement completes the job once.
#[tokio::test]
async fn with_durability_flushed_a_kill_9_loses_only_what_was_not_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    // The first 20,000 are acknowledged after a flush; the rest are stored and killed well
    // before the next one.
    let extra = "storage:\n  durability: flushed\n  flush_interval: 5s\n";
    let daemon = harness::start(dir.path(), extra).await;
    let base = now();
    let replicator = Replicator::connect(&daemon.socket).await;
    replicator
        .send_all_acked(lines(JOB, 1..=20_000, base))
        .await;
    for message in lines(JOB, 20_001..=60_000, base) {
        replicator.sender.send(&message).await.unwrap();
    }
    // Kill once everything is stored (queries see what is not flushed yet too).
    tokio::time::timeout(harness::WAIT, async {
        while all_sequences(&daemon, JOB).await.len() < 60_000 {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    })
    .await
    .unwrap();
    let acked = replicator.sender.acknowledged(JOB, MessageType::Log);
    daemon.kill_hard().await;
    drop(replicator);
    assert_eq!(
        acked, 20_000,
        "nothing written since the last flush is acknowledged"
    );

    let daemon = harness::start(dir.path(), extra).await;
    let kept = all_sequences(&daemon, JOB).await;
    assert_eq!(
        kept,
        (1..=20_000).collect::<Vec<_>>(),
        "what was not flushed is gone"
    );
    assert_eq!(
        job_summaries(&daemon).await[0].log_lines,
        kept.len() as u64,
        "the summary agrees with the lines"
    );

    let replicator = Replicator::connect(&daemon.socket).await;
    replicator
        .send_all_acked(lines(JOB, acked + 1..=60_000, base))
        .await;
    assert_eq!(
        all_sequences(&daemon, JOB).await,
        (1..=60_000).collect::<Vec<_>>()
    );
    assert_eq!(job_summaries(&daemon).await[0].log_lines, 60_000);
    drop(replicator);
    daemon.terminate().await;
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
async fn an_unreadable_line_is_kept_as_a_gap_counted_and_metrics_are_exported() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = harness::start(dir.path(), "").await;
    let replicator = Replicator::connect(&daemon.socket).await;
    let mut broken = log_message(JOB, 2, now(), Stream::Stdout, "x".into());
    broken.data = bytes::Bytes::from_static(&[0xff, 0xff, 0xff]);
    let mut messages = lines(JOB, 1..=1, now());
    messages.push(broken);
    messages.extend(lines(JOB, 3..=3, now()));
    replicator.send_all_acked(messages).await;
    let mut client = daemon.client().await;
    let request = QueryLogsRequest {
        job_id: JOB.into(),
        ..Default::default()
    };
    let stored = query_logs(&mut client, request).await.unwrap();
    let mut stored: Vec<_> = stored
        .iter()
        .map(|line| (line.sequence, line.lost_lines, line.lost_reason.as_str()))
        .collect();
    stored.sort();
    assert_eq!(
        stored,
        [
            (1, 0, ""),
            (2, 1, "its payload does not decode as LogData"),
            (3, 0, "")
        ],
        "the line that cannot be read is a gap in its place"
    );
    assert_eq!(job_summaries(&daemon).await[0].lost_lines, 1);

    let scrape = daemon.scrape().await;
    for name in [
        "joblet_persist_ipc_messages_received_total",
        "joblet_persist_ipc_frames_rejected_total{reason=\"payload\"} 1",
        "joblet_persist_ingest_errors_total{reason=\"bad_payload\"} 1",
        "joblet_persist_ingest_errors_total{reason=\"store_failed\"} 0",
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
    // CPU seconds to the tick as the kernel counts them, not truncated to whole seconds
    // (rate() needs them): the exported value is the process's own, read at the scrape.
    let pid = daemon.child.id().unwrap();
    let mut compared = None;
    for _ in 0..300 {
        let exported: f64 = daemon
            .scrape()
            .await
            .lines()
            .find_map(|line| {
                line.strip_prefix("process_cpu_seconds_total ")?
                    .parse()
                    .ok()
            })
            .unwrap();
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..]
            .split_whitespace()
            .collect();
        let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
        // Once the kernel counted more than a tenth of a second beyond whole seconds (where
        // truncation would show), they must agree.
        if ticks % 100 > 10 {
            compared = Some((exported, ticks as f64 / 100.0));
            break;
        }
        // Some work for it meanwhile.
        let request = QueryLogsRequest {
            job_id: JOB.into(),
            ..Default::default()
        };
        for _ in 0..20 {
            query_logs(&mut client, request.clone()).await.unwrap();
        }
    }
    let (exported, counted) = compared.expect("persist used some CPU");
    assert!(
        (exported - counted).abs() <= 0.05,
        "process_cpu_seconds_total {exported}, the kernel counted {counted}"
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
    let config = harness::write_config(second_dir.path(), &first.metrics.unwrap().to_string(), "");
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
    let log = daemon.log.clone();
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
    // Its values are valid; what it points at is what an install provides (certificates, the
    // unit's runtime directory), and each is named.
    let checked =
        harness::run_to_exit(&["--config", reference, "--check-config"].map(AsRef::as_ref));
    let problems = String::from_utf8_lossy(&checked.stderr);
    assert_eq!(checked.status.code(), Some(1), "{problems}");
    for key in ["grpc.tls.cert", "grpc.tls.key", "grpc.tls.ca", "ipc.socket"] {
        assert!(problems.contains(key), "{key} not named: {problems}");
    }
    assert!(
        problems
            .lines()
            .all(|line| line.contains("/etc/joblet/certs/") || line.contains("/run/joblet-persist")),
        "{problems}"
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
    let threads = joblet_daemon::thread_nice_values(daemon.child.id().unwrap()).unwrap();
    assert!(
        threads.len() > 2 && threads.iter().all(|(_, nice)| *nice == 7),
        "{threads:?}"
    );
    daemon.terminate().await;
}

/// `count` lines of `job` of about 100 bytes that compress little, timestamped from `base`.
fn incompressible_lines(job: &str, count: u64, base: i64) -> Vec<joblet_ipc::IpcMessage> {
    let mut state = 0x9e37_79b9_7f4a_7c15u64 ^ job.len() as u64;
    (1..=count)
        .map(|sequence| {
            let mut content = format!("{sequence:08} ");
            for _ in 0..6 {
                state = state
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1_442_695_040_888_963_407);
                content.push_str(&format!("{state:016x}"));
            }
            log_message(
                job,
                sequence,
                base + sequence as i64,
                Stream::Stdout,
                content.into(),
            )
        })
        .collect()
}

async fn listed_jobs(daemon: &harness::Daemon) -> Vec<String> {
    job_summaries(daemon)
        .await
        .into_iter()
        .map(|job| job.job_id)
        .collect()
}

/// Waits up to `within` for `done`, checking every 200 ms.
async fn eventually(within: std::time::Duration, done: impl AsyncFnMut() -> bool) -> bool {
    joblet_test_support::eventually(within, std::time::Duration::from_millis(200), done).await
}

fn data_bytes(dir: &std::path::Path) -> u64 {
    joblet_persist::store::directory_bytes(&dir.join("data"))
}

#[tokio::test]
async fn an_expired_job_frees_its_disk_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = harness::start(
        dir.path(),
        "retention:\n  logs: 3s\n  metrics: 3s\n  allow_under_a_minute: true\n  check_interval: 1s\n",
    )
    .await;
    let replicator = Replicator::connect(&daemon.socket).await;
    let expiring = "e0000000-0000-4000-8000-000000000001";
    let kept = "e0000000-0000-4000-8000-000000000002";
    replicator
        .send_all_acked(incompressible_lines(expiring, 200_000, now()))
        .await;
    // Newer than the retention for the whole test.
    let in_an_hour = now() + 3600 * 1_000_000_000;
    replicator
        .send_all_acked(incompressible_lines(kept, 1000, in_an_hour))
        .await;
    let full = data_bytes(dir.path());
    assert!(full > 15 << 20, "the job takes room: {full} bytes");
    let freed = eventually(std::time::Duration::from_secs(30), async || {
        !listed_jobs(&daemon).await.contains(&expiring.to_owned())
            && data_bytes(dir.path()) < full / 4
    })
    .await;
    assert!(
        freed,
        "the expired job is gone and its disk freed: {} of {full} bytes left",
        data_bytes(dir.path())
    );
    assert_eq!(listed_jobs(&daemon).await, [kept]);
    assert_eq!(
        all_sequences(&daemon, kept).await.len(),
        1000,
        "the live job is untouched"
    );
    let scraped = daemon.scrape().await;
    assert!(
        scraped.contains("joblet_persist_retention_evicted_jobs_total{reason=\"retention\"} 1"),
        "{scraped}"
    );
    drop(replicator);
    daemon.terminate().await;
}

/// What expired while persist was down goes when it starts, not a check interval later.
#[tokio::test]
async fn a_restart_drops_what_expired_meanwhile_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = harness::start(dir.path(), "retention:\n  logs: 0\n  metrics: 0\n").await;
    let old = "e0000000-0000-4000-8000-000000000003";
    let replicator = Replicator::connect(&daemon.socket).await;
    let two_days_ago = now() - 2 * 86_400 * 1_000_000_000;
    replicator
        .send_all_acked(incompressible_lines(old, 1000, two_days_ago))
        .await;
    drop(replicator);
    daemon.terminate().await;

    // A day's retention, checked hourly: only the pass at start can drop the job in time.
    let daemon = harness::start(
        dir.path(),
        "retention:\n  logs: 1d\n  metrics: 1d\n  check_interval: 1h\n",
    )
    .await;
    let evicted = "joblet_persist_retention_evicted_jobs_total{reason=\"retention\"} 1";
    let dropped = eventually(std::time::Duration::from_secs(20), async || {
        daemon.scrape().await.contains(evicted)
    })
    .await;
    assert!(dropped, "the job is dropped: {}", daemon.scrape().await);
    assert_eq!(listed_jobs(&daemon).await, Vec::<String>::new());
    daemon.terminate().await;
}

#[tokio::test]
async fn the_size_cap_drops_the_jobs_with_the_oldest_data_first() {
    let dir = tempfile::tempdir().unwrap();
    let cap = 12u64 << 20;
    let daemon = harness::start(
        dir.path(),
        &format!("retention:\n  logs: 0\n  metrics: 0\n  max_bytes: {cap}\n  check_interval: 1s\n"),
    )
    .await;
    let replicator = Replicator::connect(&daemon.socket).await;
    let jobs: Vec<String> = (1..=6)
        .map(|n| format!("c0000000-0000-4000-8000-00000000000{n}"))
        .collect();
    let hour = 3600 * 1_000_000_000i64;
    for (n, job) in jobs.iter().enumerate() {
        // Job 1 has the oldest data, job 6 the newest: about 5 MB each, 30 MB in all.
        let base = now() - (10 - n as i64) * hour;
        replicator
            .send_all_acked(incompressible_lines(job, 40_000, base))
            .await;
    }
    let under = eventually(std::time::Duration::from_secs(30), async || {
        data_bytes(dir.path()) <= cap
    })
    .await;
    assert!(
        under,
        "the data directory is back under the cap: {} bytes",
        data_bytes(dir.path())
    );
    let left = listed_jobs(&daemon).await;
    assert!(!left.is_empty() && left.len() < 6, "{left:?}");
    let first_kept = jobs.iter().position(|job| left.contains(job)).unwrap();
    assert_eq!(
        left,
        jobs[first_kept..],
        "the oldest go first, the newest stay"
    );
    let log = std::fs::read_to_string(&daemon.log).unwrap();
    assert_eq!(
        log.matches("retention.max_bytes: the job with the oldest data is dropped")
            .count(),
        first_kept,
        "each drop is logged: {log}"
    );
    drop(replicator);
    daemon.terminate().await;
}

#[tokio::test]
async fn sighup_applies_new_retention_at_once_and_refuses_a_bad_file() {
    let dir = tempfile::tempdir().unwrap();
    let config = harness::write_config(
        dir.path(),
        "127.0.0.1:0",
        "retention:\n  logs: 7d\n  metrics: 7d\n",
    );
    let daemon = harness::start_with_config(dir.path(), &config).await;
    let pid = nix::unistd::Pid::from_raw(daemon.child.id().unwrap() as i32);
    let replicator = Replicator::connect(&daemon.socket).await;
    let ten_minutes_ago = now() - 600 * 1_000_000_000;
    replicator
        .send_all_acked(lines(JOB, 1..=100, ten_minutes_ago))
        .await;
    assert_eq!(listed_jobs(&daemon).await, [JOB]);

    // A file that does not validate changes nothing.
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, text.replace("logs: 7d", "logs: 5 parsecs")).unwrap();
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).unwrap();
    let refused = eventually(std::time::Duration::from_secs(10), async || {
        std::fs::read_to_string(&daemon.log)
            .unwrap()
            .contains("configuration refused")
    })
    .await;
    assert!(refused, "the bad file is refused and said so");
    assert_eq!(
        all_sequences(&daemon, JOB).await.len(),
        100,
        "old settings kept"
    );

    std::fs::write(
        &config,
        text.replace(
            "logs: 7d\n  metrics: 7d\n",
            "logs: 1m\n  metrics: 1m\n  check_interval: 1s\n",
        ),
    )
    .unwrap();
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).unwrap();
    let applied = eventually(std::time::Duration::from_secs(10), async || {
        listed_jobs(&daemon).await.is_empty()
    })
    .await;
    assert!(
        applied,
        "the job older than the new retention is dropped without a restart"
    );
    let log = std::fs::read_to_string(&daemon.log).unwrap();
    assert!(log.contains("retention.logs: 7days → 1m"), "{log}");
    drop(replicator);
    daemon.terminate().await;
}

#[tokio::test]
async fn a_query_over_the_request_limit_is_refused_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = harness::start(dir.path(), "").await;
    let mut client = daemon.client().await.max_encoding_message_size(64 << 20);
    let refused = client
        .query_logs(QueryLogsRequest {
            job_id: JOB.to_owned(),
            contains: "x".repeat(5 << 20),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(
        refused.code(),
        tonic::Code::ResourceExhausted,
        "{refused:?}"
    );
    assert!(
        refused.message().contains("grpc.max_request_size"),
        "{refused:?}"
    );
    daemon.terminate().await;
}

/// `joblet-persist backup` / `restore` with the daemon's config, to their end.
fn maintain(config: &std::path::Path, args: &[&str]) -> std::process::Output {
    let mut all: Vec<&std::ffi::OsStr> = vec!["--config".as_ref(), config.as_ref()];
    all.extend(args.iter().map(|a| std::ffi::OsStr::new(*a)));
    harness::run_to_exit(&all)
}

#[tokio::test]
async fn a_backup_restores_exactly_what_was_stored_when_it_was_taken() {
    const LATER: &str = "7e57d00d-0000-4000-8000-00000000beef";
    let dir = tempfile::tempdir().unwrap();
    let base = now();
    let daemon = harness::start(dir.path(), "").await;
    let config = dir.path().join("persist-config.yml");
    Replicator::connect(&daemon.socket)
        .await
        .send_all_acked(lines(JOB, 1..=30_000, base))
        .await;
    let backup = dir.path().join("backup");
    let backup_arg = backup.to_str().unwrap();

    // While the daemon runs the data directory is its alone: refused, saying what to do.
    let refused = maintain(&config, &["backup", "--to", backup_arg]);
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success() && said.contains("stop it first"),
        "{said}"
    );
    assert!(!backup.exists());

    daemon.terminate().await;
    let taken = maintain(&config, &["backup", "--to", backup_arg]);
    assert!(
        taken.status.success(),
        "{}",
        String::from_utf8_lossy(&taken.stderr)
    );
    let again = maintain(&config, &["backup", "--to", backup_arg]);
    assert!(String::from_utf8_lossy(&again.stderr).contains("exists"));

    // More data after the backup, then the backup is restored over it.
    let daemon = harness::start_with_config(dir.path(), &config).await;
    Replicator::connect(&daemon.socket)
        .await
        .send_all_acked(lines(LATER, 1..=10, base))
        .await;
    daemon.terminate().await;
    let not_a_backup = maintain(&config, &["restore", "--from", "/etc"]);
    assert!(String::from_utf8_lossy(&not_a_backup.stderr).contains("not a joblet-persist backup"));
    let restored = maintain(&config, &["restore", "--from", backup_arg]);
    let said = String::from_utf8_lossy(&restored.stdout);
    assert!(
        restored.status.success(),
        "{}",
        String::from_utf8_lossy(&restored.stderr)
    );
    assert!(
        said.contains("restored 1 jobs") && said.contains(".replaced-"),
        "{said}"
    );

    let daemon = harness::start_with_config(dir.path(), &config).await;
    assert_eq!(
        all_sequences(&daemon, JOB).await,
        (1..=30_000).collect::<Vec<_>>()
    );
    let mut client = daemon.client().await;
    let later = QueryLogsRequest {
        job_id: LATER.to_owned(),
        ..Default::default()
    };
    let missing = query_logs(&mut client, later).await.unwrap_err();
    assert_eq!(missing.code(), tonic::Code::NotFound);
    daemon.terminate().await;
}
