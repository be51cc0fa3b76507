//! Output capture and replication to a real joblet-persist.

use std::collections::HashMap;

use joblet_proto::joblet::LogStream;
use joblet_proto::persist::persist_service_client::PersistServiceClient;

use crate::harness::{self, finished, records, run, shell};

#[tokio::test]
async fn a_million_lines_arrive_complete_in_order_and_separated() {
    let _alone = harness::CPU_BOUND.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let core = harness::start_core(dir.path(), "persist:\n  enabled: false\n").await;
    let mut client = core.client().await;
    let id = run(
        &mut client,
        shell("seq 1 1000000; seq 1 1000 >&2; printf 'no newline'"),
    )
    .await;
    let records = records(&mut client, &id, 0).await;
    let stdout: Vec<&[u8]> = records
        .iter()
        .filter(|r| r.stream == LogStream::Stdout as i32)
        .map(|r| r.content.as_ref())
        .collect();
    let stderr: Vec<&[u8]> = records
        .iter()
        .filter(|r| r.stream == LogStream::Stderr as i32)
        .map(|r| r.content.as_ref())
        .collect();
    assert_eq!(stdout.len(), 1_000_001);
    for (i, line) in stdout[..1_000_000].iter().enumerate() {
        assert_eq!(*line, (i + 1).to_string().as_bytes());
    }
    assert_eq!(
        stdout[1_000_000], b"no newline",
        "a last partial line is kept"
    );
    assert_eq!(stderr.len(), 1000);
    let sequences: Vec<u64> = records.iter().map(|r| r.sequence).collect();
    assert_eq!(sequences, (1..=records.len() as u64).collect::<Vec<_>>());
    assert!(records.windows(2).all(|w| w[0].timestamp <= w[1].timestamp));

    // A cursor continues exactly after the given sequence.
    let tail = crate::harness::records(&mut client, &id, 999_990).await;
    assert_eq!(tail.first().map(|r| r.sequence), Some(999_991));
    assert_eq!(tail.len(), records.len() - 999_990);
    finished(&mut client, &id).await;
    core.terminate().await;
}

/// The value of an exported gauge once it equals `wanted`, or its last value after 5 s.
async fn gauge_soon(core: &harness::Daemon, name: &str, wanted: f64) -> f64 {
    let mut value = f64::NAN;
    for _ in 0..50 {
        let exported = core.scrape().await;
        value = exported
            .lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
            .unwrap_or(f64::NAN);
        if value == wanted {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    value
}

#[tokio::test]
async fn persist_killed_mid_job_still_ends_up_with_every_line_once() {
    let _alone = harness::CPU_BOUND.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let persist = harness::start_persist(dir.path()).await;
    let core = harness::start_core(dir.path(), "").await;
    let mut client = core.client().await;
    // ~6 s of output, 1000 lines every 10 ms.
    let id = run(
        &mut client,
        shell("i=0; while [ $i -lt 600 ]; do seq $((i*1000+1)) $((i*1000+1000)); i=$((i+1)); sleep 0.01; done"),
    )
    .await;
    // Killed while replication is under way: some lines stored, most still to come.
    let under_way = joblet_test_support::eventually(
        harness::WAIT,
        std::time::Duration::from_millis(50),
        async || harness::persisted_lines(&persist, &id).await.len() >= 10_000,
    )
    .await;
    assert!(under_way, "replication started");
    persist.kill_hard().await;
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    let persist = harness::start_persist(dir.path()).await;
    let done = finished(&mut client, &id).await;
    assert_eq!(done.status, "COMPLETED");

    // Replication catches up after the job ended.
    let expected = 600_000;
    let mut lines = Vec::new();
    for _ in 0..300 {
        lines = harness::persisted_lines(&persist, &id).await;
        if lines.len() >= expected {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(
        lines.len(),
        expected,
        "persist holds every line exactly once"
    );
    let mut by_sequence: HashMap<u64, Vec<u8>> = HashMap::new();
    for (sequence, content) in lines {
        assert!(
            by_sequence.insert(sequence, content).is_none(),
            "duplicate {sequence}"
        );
    }
    for n in 1..=expected as u64 {
        assert_eq!(by_sequence[&n], n.to_string().into_bytes());
    }
    // What the killed persist had not acknowledged was sent again, and counted apart.
    let resent = gauge_soon(&core, "joblet_ipc_messages_resent_total", -1.0).await;
    let sent = gauge_soon(&core, "joblet_ipc_messages_sent_total", -1.0).await;
    assert!(
        resent > 0.0 && sent >= expected as f64 + resent,
        "sent {sent}, of which resent {resent}"
    );
    core.terminate().await;
    persist.terminate().await;
}

#[tokio::test]
async fn a_flood_into_a_tiny_queue_with_persist_absent_is_replicated_in_full_later() {
    let _alone = harness::CPU_BOUND.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let core = harness::start_core(
        dir.path(),
        &format!(
            "persist:\n  socket: {}\n  query_address: null\n  reconnect_delay: 200ms\n  buffer_size: 64\njobs:\n  work_root: {}\n  metrics_interval: 100ms\n",
            dir.path().join("persist.sock").display(),
            dir.path().join("work").display()
        ),
    )
    .await;
    let mut client = core.client().await;
    let expected = 200_000;
    let id = run(&mut client, shell("seq 1 200000; sleep 0.5")).await;
    assert_eq!(finished(&mut client, &id).await.status, "COMPLETED");
    assert_eq!(
        gauge_soon(
            &core,
            "joblet_core_replication_behind_lines{reason=\"disconnected\"}",
            200_000.0
        )
        .await,
        200_000.0,
        "every line is waiting for persist, which is not there"
    );
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    let waited = gauge_soon(
        &core,
        "joblet_core_replication_oldest_unacked_seconds",
        -1.0,
    )
    .await;
    assert!(waited >= 1.0, "the lines have waited {waited} s");

    let persist = harness::start_persist(dir.path()).await;
    let mut lines = Vec::new();
    for _ in 0..300 {
        lines = harness::persisted_lines(&persist, &id).await;
        if lines.len() >= expected {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let numbers: Vec<u64> = lines
        .iter()
        .map(|(_, content)| std::str::from_utf8(content).unwrap().parse().unwrap())
        .collect();
    assert_eq!(numbers, (1..=expected as u64).collect::<Vec<_>>());
    for reason in ["disconnected", "persist_busy", "persist_refusing"] {
        let name = format!("joblet_core_replication_behind_lines{{reason=\"{reason}\"}}");
        assert_eq!(
            gauge_soon(&core, &name, 0.0).await,
            0.0,
            "persist acknowledged everything"
        );
    }
    assert_eq!(
        gauge_soon(&core, "joblet_core_replication_oldest_unacked_seconds", 0.0).await,
        0.0,
        "nothing waits once persist caught up"
    );

    let mut persist_client = PersistServiceClient::connect(format!("http://{}", persist.grpc))
        .await
        .unwrap();
    let mut samples = persist_client
        .query_metrics(joblet_proto::persist::QueryMetricsRequest {
            job_id: id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut sample_sequences = Vec::new();
    while let Some(sample) = samples.message().await.unwrap() {
        sample_sequences.push(sample.sequence);
    }
    assert!(
        !sample_sequences.is_empty(),
        "the job's metric samples are replicated too"
    );
    assert_eq!(
        sample_sequences,
        (1..=sample_sequences.len() as u64).collect::<Vec<_>>()
    );

    let exported = core.scrape().await;
    let dropped: f64 = exported
        .lines()
        .filter(|l| l.starts_with("joblet_ipc_messages_dropped_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(dropped, 0.0, "replication waits for room; it drops nothing");
    core.terminate().await;
    persist.terminate().await;
}

#[tokio::test]
async fn core_exports_job_and_replication_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let core = harness::start_core(dir.path(), "").await;
    let mut client = core.client().await;
    let id = run(&mut client, shell("echo one; exit 4")).await;
    finished(&mut client, &id).await;
    let scrape = core.scrape().await;
    for expected in [
        "joblet_core_jobs{state=\"FAILED\"} 1",
        "joblet_core_jobs_started_total 1",
        "joblet_core_job_failures_total 1",
        "joblet_ipc_connected 0",
        "joblet_ipc_queue_capacity 10000",
        "joblet_ipc_queue_depth",
        "joblet_core_up 1",
        "process_resident_memory_bytes",
        "process_cpu_seconds_total",
        "process_open_fds",
    ] {
        assert!(
            scrape.contains(expected),
            "missing {expected} in:\n{scrape}"
        );
    }
    let log = core.log.clone();
    let status = core.terminate().await;
    assert!(
        status.success(),
        "{}",
        std::fs::read_to_string(log).unwrap()
    );
}

/// Every `joblet_*` name the alert rules and the dashboard use, as it appears in the
/// exposition format.
fn names_in_alert_rules() -> Vec<String> {
    let rules = concat!(
        include_str!("../../../deploy/prometheus/alerts.yml"),
        include_str!("../../../deploy/grafana/joblet.json")
    );
    let mut names: Vec<String> = rules
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|token| token.starts_with("joblet_"))
        .map(str::to_owned)
        .collect();
    names.sort();
    names.dedup();
    names
}

#[test]
fn every_dashboard_panel_has_one_unit_follows_the_instance_variable_and_shows_zero_when_quiet() {
    let dashboard: serde_json::Value =
        serde_json::from_str(include_str!("../../../deploy/grafana/joblet.json")).unwrap();
    let variables = dashboard["templating"]["list"].as_array().unwrap();
    assert!(variables.iter().any(|v| v["name"] == "instance"));
    for panel in dashboard["panels"].as_array().unwrap() {
        let title = panel["title"].as_str().unwrap();
        let defaults = &panel["fieldConfig"]["defaults"];
        assert!(defaults["unit"].is_string(), "{title}: one unit");
        assert!(
            panel["fieldConfig"]["overrides"]
                .as_array()
                .unwrap()
                .is_empty(),
            "{title}: no second unit"
        );
        assert_eq!(defaults["noValue"], "0", "{title}: shows 0 when quiet");
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            assert!(
                expr.matches("{instance=~\"$instance\"").count()
                    >= expr.matches("joblet_").count() + expr.matches("process_").count(),
                "{title}: every series follows $instance: {expr}"
            );
        }
    }
}

#[tokio::test]
async fn every_metric_in_the_alert_rules_and_dashboard_is_exported_by_a_real_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let persist = harness::start_persist_with_metrics(dir.path(), true).await;
    let core = harness::start_core(dir.path(), "").await;
    let mut client = core.client().await;
    let id = run(&mut client, shell("echo hello")).await;
    finished(&mut client, &id).await;
    // Wait until persist has stored the replicated line (its write histogram exists then).
    let mut persisted = String::new();
    for _ in 0..200 {
        persisted = persist.scrape().await;
        if persisted.contains("joblet_persist_log_lines_stored_total 1") {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let exported = format!("{}\n{persisted}", core.scrape().await);
    let names = names_in_alert_rules();
    assert!(names.len() >= 6, "{names:?}");
    for name in names {
        let present = exported.lines().any(|line| {
            line.starts_with(&format!("{name}{{")) || line.starts_with(&format!("{name} "))
        });
        assert!(
            present,
            "alert rules use {name}, which neither daemon exports:\n{exported}"
        );
    }
    core.terminate().await;
    persist.terminate().await;
}

#[tokio::test]
async fn replication_runs_below_the_jobs_cpu_priority() {
    let dir = tempfile::tempdir().unwrap();
    let core = harness::start_core(dir.path(), "").await;
    let mut client = core.client().await;
    // Spool readers (blocking threads) start once a job's output is replicated.
    let id = run(&mut client, shell("seq 1 1000")).await;
    finished(&mut client, &id).await;
    let threads = joblet_daemon::thread_nice_values(core.child.id().unwrap()).unwrap();
    let replication: Vec<_> = threads
        .iter()
        .filter(|(name, _)| name.starts_with("joblet-replicat"))
        .collect();
    assert!(
        !replication.is_empty(),
        "no replication thread in {threads:?}"
    );
    assert!(
        replication.iter().all(|(_, nice)| *nice == 10),
        "replication threads run at persist.replication_nice: {threads:?}"
    );
    let others: Vec<_> = threads
        .iter()
        .filter(|(name, _)| !name.starts_with("joblet-replicat"))
        .collect();
    assert!(
        others.iter().all(|(_, nice)| *nice == 0),
        "the rest of core keeps the default priority: {threads:?}"
    );
    core.terminate().await;
}
