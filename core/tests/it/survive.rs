//! Running jobs survive joblet-core: kill -9 or SIGTERM of core mid-job, a restart, and the job
//! is re-attached (listed RUNNING, stoppable, under its limits and timeout), ends with its real
//! exit status, and every line it wrote is in core and persist exactly once. A job whose
//! supervisor died while core was down ends FAILED "lost", its output kept.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use joblet_proto::joblet::job_service_client::JobServiceClient;
use joblet_proto::joblet::{DeleteJobRequest, EmptyRequest, StopJobRequest};
use tonic::transport::Channel;

use crate::harness::{
    self, Daemon, WAIT, finished, logs, pids_with, process_with, run, shell, status, wait_records,
    wait_status,
};

const KEEP: &str = "jobs:\n  on_core_shutdown: keep\n  stop_grace_period: 1s\n";

fn keep(dir: &Path) -> String {
    format!("{KEEP}  work_root: {}\n", dir.join("work").display())
}

/// A job printing `1..=count` at about 1,000 lines a second.
fn numbered_lines(count: u64) -> joblet_proto::joblet::RunJobRequest {
    shell(&format!(
        "i=0; while [ $i -lt {count} ]; do i=$((i+1)); echo $i; \
         if [ $((i % 50)) -eq 0 ]; then sleep 0.05; fi; done"
    ))
}

/// The directories of the job's cgroup, on any hierarchy.
fn cgroup_dirs(id: &str) -> Vec<PathBuf> {
    fn walk(dir: &Path, id: &str, depth: usize, found: &mut Vec<PathBuf>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let path = entry.path();
            if entry.file_name() == id {
                found.push(path);
            } else if depth > 0 {
                walk(&path, id, depth - 1, found);
            }
        }
    }
    let mut found = Vec::new();
    walk(Path::new("/sys/fs/cgroup"), id, 8, &mut found);
    found
}

/// Nothing of the job is left: no supervisor, no process, no cgroup.
fn nothing_left_of(id: &str, marker: &str) {
    assert!(!process_with(&format!("supervise {id}")), "supervisor gone");
    assert!(!process_with(marker), "job processes gone");
    assert_eq!(cgroup_dirs(id), Vec::<PathBuf>::new(), "cgroup removed");
}

async fn listed(client: &mut JobServiceClient<Channel>, id: &str) -> String {
    let jobs = client
        .list_jobs(EmptyRequest {})
        .await
        .unwrap()
        .into_inner()
        .jobs;
    jobs.into_iter()
        .find(|job| job.uuid == id)
        .map(|job| job.status)
        .unwrap_or_default()
}

/// Lines 1..=count in order, each once, as core serves them.
async fn core_has_every_line(client: &mut JobServiceClient<Channel>, id: &str, count: u64) {
    let text = logs(client, id).await;
    let expected: Vec<String> = (1..=count).map(|n| n.to_string()).collect();
    assert!(
        text.lines().eq(expected.iter().map(String::as_str)),
        "core serves every line once, in order ({} lines)",
        text.lines().count()
    );
}

/// A 6 s job printing 6,000 numbered lines; core goes down at about 1.5 s by `stop`, stays
/// down for 1.5 s and starts again: the job is re-attached and nothing is lost.
async fn survives(stop: impl AsyncFnOnce(Daemon)) {
    let _alone = harness::CPU_BOUND.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let config = keep(dir.path());
    let persist = harness::start_persist(dir.path()).await;
    let core = harness::start_core(dir.path(), &config).await;
    let mut client = core.client().await;
    let count = 6000;
    let id = run(&mut client, numbered_lines(count)).await;
    wait_records(&mut client, &id, 1500).await;
    stop(core).await;
    assert!(
        process_with(&format!("supervise {id}")),
        "the job's supervisor outlives core"
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let core = harness::start_core(dir.path(), &config).await;
    let mut client = core.client().await;
    assert_eq!(listed(&mut client, &id).await, "RUNNING", "re-attached");
    let done = finished(&mut client, &id).await;
    assert_eq!(
        (done.status.as_str(), done.exit_code),
        ("COMPLETED", 0),
        "{}",
        done.status_reason
    );
    core_has_every_line(&mut client, &id, count).await;
    harness::persisted_exactly(&persist, &id, count, |n| n.to_string()).await;
    nothing_left_of(&id, "i % 50");
    client
        .delete_job(DeleteJobRequest { uuid: id.clone() })
        .await
        .unwrap();
    let spools: Vec<_> = std::fs::read_dir(dir.path().join("state/spool"))
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|name| name.starts_with(&id))
        .collect();
    assert_eq!(spools, Vec::<String>::new(), "a deleted job leaves no file");
    core.terminate().await;
    persist.terminate().await;
}

#[tokio::test]
async fn a_job_survives_kill_9_of_core_with_every_line_once() {
    survives(async |core: Daemon| core.kill_hard().await).await;
}

#[tokio::test]
async fn a_job_survives_sigterm_of_core_with_every_line_once() {
    survives(async |core: Daemon| {
        let log = core.log.clone();
        assert!(core.terminate().await.success());
        let said = std::fs::read_to_string(log).unwrap();
        assert!(said.contains("keep running"), "{said}");
    })
    .await;
}

#[tokio::test]
async fn with_on_core_shutdown_stop_a_shutdown_stops_jobs_and_keeps_their_output() {
    let dir = tempfile::tempdir().unwrap();
    let config = "jobs:\n  on_core_shutdown: stop\n";
    let core = harness::start_core(dir.path(), config).await;
    let mut client = core.client().await;
    let marker = "986.25";
    let id = run(
        &mut client,
        shell(&format!("seq 1 100; exec sleep {marker}")),
    )
    .await;
    wait_records(&mut client, &id, 100).await;
    assert!(core.terminate().await.success());
    nothing_left_of(&id, marker);

    let core = harness::start_core(dir.path(), config).await;
    let mut client = core.client().await;
    let stopped = status(&mut client, &id).await;
    assert_eq!(
        (stopped.status.as_str(), stopped.status_reason.as_str()),
        ("STOPPED", "joblet-core shut down")
    );
    assert_eq!(logs(&mut client, &id).await.lines().count(), 100);
    core.terminate().await;
}

#[tokio::test]
async fn re_attached_jobs_can_be_stopped_and_keep_their_memory_limit_and_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let config = keep(dir.path());
    let core = harness::start_core(dir.path(), &config).await;
    let mut client = core.client().await;
    let stoppable = run(&mut client, shell("echo up; exec sleep 985.5")).await;
    let mut hog = shell("echo up; sleep 3; head -c 300000000 /dev/zero | tail > /dev/null");
    hog.max_memory = 64;
    let hog = run(&mut client, hog).await;
    let mut slow = shell("echo up; exec sleep 985.75");
    slow.timeout = "4s".into();
    let slow = run(&mut client, slow).await;
    for id in [&stoppable, &hog, &slow] {
        wait_records(&mut client, id, 1).await;
    }
    core.kill_hard().await;
    // Down long enough that a timeout counted anew from the restart would end the job at least
    // 6 s after its start.
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let core = harness::start_core(dir.path(), &config).await;
    let mut client = core.client().await;
    for id in [&stoppable, &hog, &slow] {
        assert_eq!(listed(&mut client, id).await, "RUNNING");
    }
    let stop = Instant::now();
    client
        .stop_job(StopJobRequest {
            uuid: stoppable.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    wait_status(&mut client, &stoppable, "STOPPED").await;
    assert!(
        stop.elapsed() < Duration::from_secs(5),
        "{:?}",
        stop.elapsed()
    );

    let done = finished(&mut client, &hog).await;
    assert_eq!(done.status, "FAILED");
    assert!(
        done.status_reason.contains("out of memory"),
        "{}",
        done.status_reason
    );

    let done = finished(&mut client, &slow).await;
    assert_eq!(
        (done.status.as_str(), done.status_reason.as_str()),
        ("FAILED", "timed out after 4s")
    );
    let at = |time: &str| chrono::DateTime::parse_from_rfc3339(time).unwrap();
    let ran = (at(&done.end_time) - at(&done.start_time)).num_seconds();
    assert!(
        (3..=5).contains(&ran),
        "the timeout counts from the job's start, across the restart: ran {ran} s ({} to {})",
        done.start_time,
        done.end_time
    );
    for (id, marker) in [
        (&stoppable, "985.5"),
        (&hog, "head -c 300000000"),
        (&slow, "985.75"),
    ] {
        nothing_left_of(id, marker);
    }
    core.terminate().await;
}

#[tokio::test]
async fn a_job_whose_supervisor_died_while_core_was_down_ends_lost_with_its_output_kept() {
    let dir = tempfile::tempdir().unwrap();
    let config = keep(dir.path());
    let core = harness::start_core(dir.path(), &config).await;
    let mut client = core.client().await;
    let marker = "986.5";
    let id = run(
        &mut client,
        shell(&format!("seq 1 1000; exec sleep {marker}")),
    )
    .await;
    wait_records(&mut client, &id, 1000).await;
    core.kill_hard().await;
    // As a reboot would: the supervisor is gone (its job runs on, nobody reads its output).
    let supervisors: Vec<i32> = pids_with(&format!("supervise {id}"))
        .into_iter()
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|name| name.trim() == "joblet-supervis")
        })
        .collect();
    assert_eq!(supervisors.len(), 1, "one supervisor per job");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(supervisors[0]),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    // Dead (a zombie's command line is empty) before core comes back.
    let gone = joblet_test_support::eventually(WAIT, Duration::from_millis(20), async || {
        !pids_with(&format!("supervise {id}")).contains(&supervisors[0])
    })
    .await;
    assert!(gone, "the supervisor is dead");

    let core = harness::start_core(dir.path(), &config).await;
    let mut client = core.client().await;
    let lost = finished(&mut client, &id).await;
    assert_eq!((lost.status.as_str(), lost.exit_code), ("FAILED", -1));
    assert!(
        lost.status_reason.starts_with("lost:"),
        "{}",
        lost.status_reason
    );
    assert_eq!(
        logs(&mut client, &id).await.lines().count(),
        1000,
        "what it wrote is kept"
    );
    nothing_left_of(&id, marker);
    core.terminate().await;
}
