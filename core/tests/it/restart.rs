//! Core's state across restarts: the job catalogue, spools kept until persist acknowledged
//! them, finished jobs that cost no file, eviction into persist's history, a damaged journal.

use std::path::Path;
use std::time::Duration;

use joblet_proto::joblet::job_service_client::JobServiceClient;
use joblet_proto::joblet::{CancelJobRequest, EmptyRequest, RunJobRequest};
use tonic::transport::Channel;

use crate::harness::{self, Daemon, WAIT, finished, logs, run, shell, status, wait_status};

fn numbered(n: u64) -> String {
    n.to_string()
}

fn open_files(daemon: &Daemon) -> usize {
    let pid = daemon.child.id().unwrap();
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

fn spool_files(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir.join("state/spool"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

async fn list(client: &mut JobServiceClient<Channel>) -> Vec<joblet_proto::joblet::Job> {
    client
        .list_jobs(EmptyRequest {})
        .await
        .unwrap()
        .into_inner()
        .jobs
}

#[tokio::test]
async fn a_core_stopped_while_persist_is_down_sends_every_line_after_the_next_start() {
    let _alone = harness::CPU_BOUND.lock().await;
    let dir = tempfile::tempdir().unwrap();
    // persist is not running: its socket is missing.
    let core = harness::start_core(dir.path(), "").await;
    let mut client = core.client().await;
    let id = run(&mut client, shell("seq 1 50000; exit 3")).await;
    let done = finished(&mut client, &id).await;
    assert_eq!((done.status.as_str(), done.exit_code), ("FAILED", 3));
    let log = core.log.clone();
    assert!(core.terminate().await.success());
    let said = std::fs::read_to_string(&log).unwrap();
    assert!(
        said.contains(&id) && said.contains("sent after the next start"),
        "shutdown says which job's lines wait in its spool: {said}"
    );

    let persist = harness::start_persist(dir.path()).await;
    let core = harness::start_core(dir.path(), "").await;
    harness::persisted_exactly(&persist, &id, 50_000, numbered).await;
    let mut client = core.client().await;
    let restored = status(&mut client, &id).await;
    assert_eq!(
        (restored.status.as_str(), restored.exit_code),
        ("FAILED", 3),
        "the job is known after the restart, with its exit code"
    );
    assert_eq!(restored.command, "/bin/sh");
    assert!(!restored.history, "core still holds it");
    let text = logs(&mut client, &id).await;
    assert_eq!(text.lines().count(), 50_000, "core still serves its output");
    core.terminate().await;
    persist.terminate().await;
}

#[tokio::test]
async fn a_core_killed_after_the_job_ended_and_before_persist_caught_up_loses_nothing() {
    let _alone = harness::CPU_BOUND.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let core = harness::start_core(dir.path(), "").await;
    let mut client = core.client().await;
    let id = run(&mut client, shell("seq 1 50000")).await;
    assert_eq!(finished(&mut client, &id).await.status, "COMPLETED");
    core.kill_hard().await;

    let persist = harness::start_persist(dir.path()).await;
    let core = harness::start_core(dir.path(), "").await;
    harness::persisted_exactly(&persist, &id, 50_000, numbered).await;
    let restored = status(&mut core.client().await, &id).await;
    assert_eq!(
        (restored.status.as_str(), restored.exit_code),
        ("COMPLETED", 0)
    );
    core.terminate().await;
    persist.terminate().await;
}

#[tokio::test]
async fn finished_jobs_hold_no_file_and_are_all_listed_after_a_restart() {
    let _alone = harness::CPU_BOUND.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let config = "persist:\n  enabled: false\n";
    let core = harness::start_core(dir.path(), config).await;
    let mut client = core.client().await;
    let mut ids = Vec::new();
    for _ in 0..10 {
        let id = run(&mut client, shell("echo hello")).await;
        finished(&mut client, &id).await;
        ids.push(id);
    }
    let before = open_files(&core);
    for round in 0..300 {
        let id = run(&mut client, shell(&format!("echo {round}"))).await;
        ids.push(id);
    }
    // And the rest of 10,000 that never ran (their spools exist all the same): scheduled,
    // then canceled.
    let later = (chrono::Utc::now() + chrono::Duration::hours(1)).to_rfc3339();
    for _ in ids.len()..10_000 {
        let id = run(
            &mut client,
            RunJobRequest {
                command: "/bin/true".into(),
                schedule: later.clone(),
                ..Default::default()
            },
        )
        .await;
        client
            .cancel_job(CancelJobRequest { uuid: id.clone() })
            .await
            .unwrap();
        ids.push(id);
    }
    for id in &ids {
        let done = finished(&mut client, id).await;
        assert!(["COMPLETED", "CANCELED"].contains(&done.status.as_str()));
    }
    let after = open_files(&core);
    assert!(
        after <= before + 4,
        "open files grew from {before} to {after} with {} finished jobs",
        ids.len()
    );
    let statuses = |jobs: Vec<joblet_proto::joblet::Job>| {
        let mut listed: Vec<(String, String)> =
            jobs.into_iter().map(|j| (j.uuid, j.status)).collect();
        listed.sort();
        listed
    };
    let listed = statuses(list(&mut client).await);
    assert_eq!(listed.len(), ids.len());
    core.terminate().await;

    let core = harness::start_core(dir.path(), config).await;
    let mut client = core.client().await;
    assert_eq!(
        statuses(list(&mut client).await),
        listed,
        "every job is listed after the restart, as it was"
    );
    assert!(open_files(&core) <= before + 4);
    core.terminate().await;
}

#[tokio::test]
async fn a_damaged_state_journal_costs_only_the_damaged_records() {
    let dir = tempfile::tempdir().unwrap();
    let config = "persist:\n  enabled: false\n";
    let core = harness::start_core(dir.path(), config).await;
    let mut client = core.client().await;
    let mut ids = Vec::new();
    for n in 0..5 {
        let id = run(&mut client, shell(&format!("echo job {n}"))).await;
        finished(&mut client, &id).await;
        ids.push(id);
    }
    core.terminate().await;
    // A start rewrites the journal with one record per job; damage that one.
    harness::start_core(dir.path(), config)
        .await
        .terminate()
        .await;
    let journal = dir.path().join("state/jobs.journal");
    let mut bytes = std::fs::read(&journal).unwrap();
    let first = 8 + u32::from_be_bytes(bytes[..4].try_into().unwrap()) as usize;
    bytes.splice(
        first..first,
        b"\xde\xad\xbe\xefnot a record at all".iter().copied(),
    );
    let torn = bytes.len() - 50;
    bytes.truncate(torn);
    std::fs::write(&journal, &bytes).unwrap();

    let core = harness::start_core(dir.path(), config).await;
    let mut client = core.client().await;
    let jobs = list(&mut client).await;
    assert_eq!(
        jobs.len(),
        5,
        "every job with a readable record or a spool is listed"
    );
    let unknown: Vec<_> = jobs.iter().filter(|j| j.command == "(unknown)").collect();
    assert_eq!(unknown.len(), 1, "only the torn record is lost");
    assert!(unknown[0].status_reason.contains("no record"));
    let text = logs(&mut client, &unknown[0].uuid).await;
    assert!(text.starts_with("job "), "its output is kept: {text:?}");
    for job in jobs.iter().filter(|j| j.command != "(unknown)") {
        assert_eq!(job.status, "COMPLETED");
    }
    let said = std::fs::read_to_string(&core.log).unwrap();
    assert_eq!(
        said.matches("unreadable bytes").count(),
        1,
        "one warning: {said}"
    );
    let exported = core.scrape().await;
    assert!(
        exported
            .lines()
            .any(|l| l.starts_with("joblet_core_state_skipped_bytes_total ") && !l.ends_with(" 0")),
        "the skipped bytes are counted"
    );
    core.terminate().await;
}

#[tokio::test]
async fn a_scheduled_job_is_still_scheduled_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let config = "persist:\n  enabled: false\n";
    let core = harness::start_core(dir.path(), config).await;
    let mut client = core.client().await;
    let at = (chrono::Utc::now() + chrono::Duration::seconds(4)).to_rfc3339();
    let id = run(
        &mut client,
        RunJobRequest {
            command: "/bin/echo".into(),
            args: vec!["on time".into()],
            schedule: at,
            ..Default::default()
        },
    )
    .await;
    core.terminate().await;
    let core = harness::start_core(dir.path(), config).await;
    let mut client = core.client().await;
    assert_eq!(status(&mut client, &id).await.status, "SCHEDULED");
    wait_status(&mut client, &id, "COMPLETED").await;
    assert_eq!(logs(&mut client, &id).await, "on time\n");
    core.terminate().await;
}

#[tokio::test]
async fn an_acknowledged_job_leaves_core_after_keep_finished_and_stays_in_history() {
    let dir = tempfile::tempdir().unwrap();
    let persist = harness::start_persist(dir.path()).await;
    let config = format!(
        "persist:\n  socket: {}\n  query_address: {}\n  query_tls: null\n  reconnect_delay: 200ms\njobs:\n  work_root: {}\n  keep_finished: 1s\n",
        dir.path().join("persist.sock").display(),
        persist.grpc,
        dir.path().join("work").display(),
    );
    let core = harness::start_core(dir.path(), &config).await;
    let mut client = core.client().await;
    let id = run(&mut client, shell("seq 1 500; exit 7")).await;
    finished(&mut client, &id).await;
    tokio::time::timeout(WAIT, async {
        while !list(&mut client).await.is_empty() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("the job leaves core's list once replicated and older than keep_finished");
    assert!(
        spool_files(dir.path()).is_empty(),
        "{:?}",
        spool_files(dir.path())
    );
    harness::persisted_exactly(&persist, &id, 500, numbered).await;

    let from_history = status(&mut client, &id).await;
    assert!(from_history.history, "answered from persist's catalogue");
    assert_eq!(
        (from_history.status.as_str(), from_history.exit_code),
        ("FAILED", 7)
    );
    assert_eq!(from_history.command, "/bin/sh");
    let prefix = status(&mut client, &id[..8]).await;
    assert_eq!(prefix.uuid, id, "a prefix finds it too");
    assert_eq!(logs(&mut client, &id).await.lines().count(), 500);
    core.terminate().await;
    persist.terminate().await;
}

#[tokio::test]
async fn without_persist_the_oldest_finished_jobs_go_once_spools_exceed_their_cap() {
    let dir = tempfile::tempdir().unwrap();
    // Each job's spools take ~10 KB; the cap holds two of them.
    let config = format!(
        "persist:\n  enabled: false\njobs:\n  work_root: {}\n  spool_max_bytes: 25 KB\n  keep_finished: 200ms\n",
        dir.path().join("work").display()
    );
    let core = harness::start_core(dir.path(), &config).await;
    let mut client = core.client().await;
    let mut ids = Vec::new();
    for _ in 0..4 {
        let id = run(&mut client, shell("seq 1 500")).await;
        finished(&mut client, &id).await;
        ids.push(id);
    }
    let kept = tokio::time::timeout(WAIT, async {
        loop {
            let listed: Vec<String> = list(&mut client)
                .await
                .into_iter()
                .map(|j| j.uuid)
                .collect();
            // A job leaves the list, then its files go.
            if listed.len() == 2 && spool_files(dir.path()).len() == 4 {
                return listed;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("spools over the cap are evicted");
    let mut newest = ids[2..].to_vec();
    newest.sort();
    let mut kept = kept;
    kept.sort();
    assert_eq!(kept, newest, "the oldest finished jobs went first");
    assert_eq!(
        spool_files(dir.path()).len(),
        4,
        "two jobs' log and metrics spools: {:?}",
        spool_files(dir.path())
    );
    assert_eq!(logs(&mut client, &ids[3]).await.lines().count(), 500);
    let exported = core.scrape().await;
    assert!(
        exported
            .lines()
            .any(|l| l.starts_with("joblet_core_jobs_evicted_total{reason=\"spool_max_bytes\"} 2")),
        "evictions are counted"
    );
    let said = std::fs::read_to_string(&core.log).unwrap();
    assert!(
        said.contains(&ids[0]) && said.contains("dropped"),
        "each eviction is logged"
    );
    core.terminate().await;
}
