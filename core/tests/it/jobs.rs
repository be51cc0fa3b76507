//! Job lifecycle through the public API.

use std::time::Duration;

use joblet_proto::joblet::{
    CancelJobRequest, DeleteAllJobsRequest, DeleteJobRequest, EmptyRequest, FileUpload,
    GetJobStatusRequest, RunJobRequest, StopJobRequest,
};

use crate::harness::{self, finished, logs, run, shell, status, wait_status};

#[tokio::test]
async fn a_job_runs_and_its_output_and_exit_code_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    let core = harness::start_core(dir.path(), "").await;
    let mut client = core.client().await;

    let id = run(
        &mut client,
        RunJobRequest {
            command: "echo".into(),
            args: vec!["hi".into()],
            ..Default::default()
        },
    )
    .await;
    assert_eq!(logs(&mut client, &id).await, "hi\n");
    // A missing final newline and a line longer than max_line_length (64 KiB) come back as
    // written through the compat stream: no newline is added to a line's pieces or its end.
    let written = format!("a\n{}\nb", "x".repeat(150_000));
    let script = "printf 'a\\n'; head -c 150000 /dev/zero | tr '\\0' x; printf '\\nb'";
    let exact = run(&mut client, harness::shell(script)).await;
    let got = logs(&mut client, &exact).await;
    assert!(
        got == written,
        "not the bytes written: {} bytes, ending {:?}",
        got.len(),
        &got[got.len().saturating_sub(20)..]
    );
    let done = finished(&mut client, &id).await;
    assert_eq!(
        (done.status.as_str(), done.exit_code),
        ("COMPLETED", 0),
        "{done:?}"
    );
    assert!(!done.start_time.is_empty() && !done.end_time.is_empty());
    chrono::DateTime::parse_from_rfc3339(&done.end_time).unwrap();

    let id = run(&mut client, shell("echo out; echo err >&2; exit 3")).await;
    let done = finished(&mut client, &id).await;
    assert_eq!(
        (done.status.as_str(), done.exit_code),
        ("FAILED", 3),
        "{done:?}"
    );
    assert!(
        done.status_reason.contains("code 3"),
        "{}",
        done.status_reason
    );

    // A unique prefix names the job; unknown ids are NOT_FOUND.
    assert_eq!(status(&mut client, &id[..8]).await.uuid, id);
    let missing = client
        .get_job_status(GetJobStatusRequest {
            uuid: "ffffffff-0000".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), tonic::Code::NotFound);
    core.terminate().await;
}

#[tokio::test]
async fn the_job_runs_under_its_own_init_in_its_own_namespaces() {
    let dir = tempfile::tempdir().unwrap();
    let core = harness::start_core(dir.path(), "").await;
    let mut client = core.client().await;
    let mut request = shell(
        "echo pid=$$ parent=$PPID init=$(cat /proc/1/comm); hostname; ls /proc | grep -c '^[0-9]'; cat /proc/net/dev | tail -n +3 | cut -d: -f1 | tr -d ' '",
    );
    request.network = "none".into();
    let id = run(&mut client, request).await;
    let output = logs(&mut client, &id).await;
    let lines: Vec<&str> = output.lines().collect();
    assert_eq!(lines[0], "pid=2 parent=1 init=joblet-init", "{output}");
    assert!(lines[1].starts_with("job-"), "{output}");
    let processes: u32 = lines[2].parse().unwrap();
    assert!(
        processes <= 4,
        "fresh /proc shows only the job's processes: {output}"
    );
    assert_eq!(
        &lines[3..],
        ["lo"],
        "network none has loopback only: {output}"
    );
    core.terminate().await;
}

#[tokio::test]
async fn environment_uploads_and_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let core = harness::start_core(dir.path(), "").await;
    let mut client = core.client().await;
    let mut request = shell("echo $GREETING $TOKEN; cat data/in.txt; pwd");
    request
        .environment
        .insert("GREETING".into(), "hello".into());
    request
        .secret_environment
        .insert("TOKEN".into(), "s3cret".into());
    request.uploads.push(FileUpload {
        path: "data/in.txt".into(),
        content: "uploaded\n".into(),
        mode: 0o600,
        is_directory: false,
    });
    let id = run(&mut client, request).await;
    let output = logs(&mut client, &id).await;
    let lines: Vec<&str> = output.lines().collect();
    assert_eq!(lines[0], "hello s3cret");
    assert_eq!(lines[1], "uploaded");
    assert!(lines[2].ends_with(&id), "{output}");
    let done = finished(&mut client, &id).await;
    assert_eq!(done.secret_environment["TOKEN"], "***");
    assert_eq!(done.environment["GREETING"], "hello");
    assert!(!format!("{done:?}").contains("s3cret"));
    let listed = client
        .list_jobs(EmptyRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(!format!("{listed:?}").contains("s3cret"));

    let mut escaping = shell("true");
    escaping.uploads.push(FileUpload {
        path: "../../etc/evil".into(),
        ..Default::default()
    });
    let refused = client.run_job(escaping).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    assert!(
        refused.message().contains("uploads"),
        "{}",
        refused.message()
    );
    core.terminate().await;
}

#[tokio::test]
async fn stop_sends_sigterm_then_sigkill_after_the_grace_period() {
    let dir = tempfile::tempdir().unwrap();
    let core = harness::start_core(dir.path(), "").await;
    let mut client = core.client().await;

    // A job that handles SIGTERM ends by itself.
    let id = run(
        &mut client,
        shell("trap 'echo bye; exit 0' TERM; echo ready; while :; do sleep 0.05; done"),
    )
    .await;
    let mut stream = client
        .get_job_logs(joblet_proto::joblet::GetJobLogsRequest { uuid: id.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stream.message().await.unwrap().unwrap().payload, "ready\n");
    let stopped = client
        .stop_job(StopJobRequest {
            uuid: id.clone(),
            grace_period: "10s".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stopped.status, "STOPPED");
    assert!(logs(&mut client, &id).await.contains("bye"));

    // One that ignores it is killed after the grace period.
    let id = run(
        &mut client,
        shell("trap '' TERM; echo up; while :; do sleep 0.05; done"),
    )
    .await;
    // Its trap is set once it said so.
    harness::wait_records(&mut client, &id, 1).await;
    let started = std::time::Instant::now();
    let stopped = client
        .stop_job(StopJobRequest {
            uuid: id.clone(),
            grace_period: "1s".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let took = started.elapsed();
    assert_eq!(
        (stopped.status.as_str(), stopped.exit_code),
        ("STOPPED", 137)
    );
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(5),
        "{took:?}"
    );

    // An ordinary program (no SIGTERM handler) ends on SIGTERM at once, not after the grace
    // period: it is not its namespace's PID 1.
    let plain = run(
        &mut client,
        RunJobRequest {
            command: "sleep".into(),
            args: vec!["100".into()],
            ..Default::default()
        },
    )
    .await;
    wait_status(&mut client, &plain, "RUNNING").await;
    let started = std::time::Instant::now();
    let stopped = client
        .stop_job(StopJobRequest {
            uuid: plain,
            grace_period: "10s".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (stopped.status.as_str(), stopped.exit_code),
        ("STOPPED", 143),
        "ended by SIGTERM"
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );

    // Stopping an ended job is refused.
    let again = client
        .stop_job(StopJobRequest {
            uuid: id,
            grace_period: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(again.code(), tonic::Code::FailedPrecondition);
    core.terminate().await;
}

#[tokio::test]
async fn scheduled_jobs_start_on_time_and_can_be_canceled() {
    let dir = tempfile::tempdir().unwrap();
    let core = harness::start_core(dir.path(), "").await;
    let mut client = core.client().await;

    let at = chrono::Utc::now() + chrono::Duration::seconds(2);
    let mut request = shell("echo started");
    request.schedule = at.to_rfc3339();
    let response = client.run_job(request).await.unwrap().into_inner();
    assert_eq!(response.status, "SCHEDULED");
    let done = finished(&mut client, &response.job_uuid).await;
    assert_eq!(done.status, "COMPLETED");
    let started = chrono::DateTime::parse_from_rfc3339(&done.start_time).unwrap();
    let drift = (started.timestamp_millis() - at.timestamp_millis()).abs();
    assert!(drift <= 1000, "started {drift} ms from its schedule");

    let mut request = shell("echo never");
    request.schedule = (chrono::Utc::now() + chrono::Duration::hours(1)).to_rfc3339();
    let id = run(&mut client, request).await;
    let canceled = client
        .cancel_job(CancelJobRequest { uuid: id.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(canceled.status, "CANCELED");
    assert_eq!(logs(&mut client, &id).await, "");
    core.terminate().await;
}

#[tokio::test]
async fn delete_removes_ended_jobs_and_skips_running_ones() {
    let dir = tempfile::tempdir().unwrap();
    let core = harness::start_core(dir.path(), "").await;
    let mut client = core.client().await;
    let ended = run(&mut client, shell("true")).await;
    finished(&mut client, &ended).await;
    let running = run(&mut client, shell("sleep 30")).await;
    crate::harness::wait_status(&mut client, &running, "RUNNING").await;
    let refused = client
        .delete_job(DeleteJobRequest {
            uuid: running.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition);

    let all = client
        .delete_all_jobs(DeleteAllJobsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!((all.deleted_count, all.skipped_count), (1, 1));
    let gone = client
        .get_job_status(GetJobStatusRequest { uuid: ended })
        .await
        .unwrap_err();
    assert_eq!(gone.code(), tonic::Code::NotFound);

    // Shutdown ends the running job and leaves no cgroup behind.
    let cgroup_dirs = job_cgroup_dirs(&running);
    assert!(!cgroup_dirs.is_empty());
    core.terminate().await;
    for dir in cgroup_dirs {
        assert!(!dir.exists(), "{} leaked", dir.display());
    }
}

/// Every directory named after the job under /sys/fs/cgroup.
pub fn job_cgroup_dirs(id: &str) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![std::path::PathBuf::from("/sys/fs/cgroup")];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                if entry.file_name() == id {
                    found.push(entry.path());
                } else {
                    stack.push(entry.path());
                }
            }
        }
    }
    found
}

#[tokio::test]
async fn bad_requests_are_refused_with_the_field_named() {
    let dir = tempfile::tempdir().unwrap();
    let core = harness::start_core(dir.path(), "").await;
    let mut client = core.client().await;
    for (request, field) in [
        (RunJobRequest::default(), "command"),
        (
            RunJobRequest {
                command: "x".into(),
                max_memory: -5,
                ..Default::default()
            },
            "max_memory",
        ),
        (
            RunJobRequest {
                command: "x".into(),
                schedule: "soon".into(),
                ..Default::default()
            },
            "schedule",
        ),
        (
            RunJobRequest {
                command: "x".into(),
                timeout: "forever".into(),
                ..Default::default()
            },
            "timeout",
        ),
    ] {
        let status = client.run_job(request).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(status.message().contains(field), "{}", status.message());
    }
    let missing = run(
        &mut client,
        RunJobRequest {
            command: "/no/such/binary".into(),
            ..Default::default()
        },
    )
    .await;
    let done = finished(&mut client, &missing).await;
    assert_eq!(done.status, "FAILED");
    assert!(
        done.status_reason.contains("/no/such/binary"),
        "{}",
        done.status_reason
    );
    core.terminate().await;
}

#[tokio::test]
async fn hostile_ids_symlinks_and_oversized_requests_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let core = harness::start_core(dir.path(), "grpc:\n  max_request_size: 1 MiB\n").await;
    let mut client = core.client().await;

    for id in ["../../etc", "x'; DROP", &"a".repeat(100)] {
        let status = client
            .get_job_status(GetJobStatusRequest {
                uuid: id.to_owned(),
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{id}");
        assert!(status.message().contains("uuid"), "{}", status.message());
    }

    // An upload through a symlink planted in a work dir is refused before anything runs.
    let work = dir.path().join("shared-work");
    std::fs::create_dir_all(&work).unwrap();
    let outside = dir.path().join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    std::os::unix::fs::symlink(&outside, work.join("link")).unwrap();
    let mut request = shell("true");
    request.work_dir = work.display().to_string();
    request.uploads.push(FileUpload {
        path: "link/owned.txt".into(),
        content: "x".into(),
        ..Default::default()
    });
    let status = client.run_job(request).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(status.message().contains("symlink"), "{}", status.message());
    assert!(!outside.join("owned.txt").exists());

    // A request over grpc.max_request_size is refused whole.
    let mut request = shell("true");
    request.uploads.push(FileUpload {
        path: "big.bin".into(),
        content: vec![0u8; 2 << 20].into(),
        ..Default::default()
    });
    let status = client.run_job(request).await.unwrap_err();
    assert_ne!(status.code(), tonic::Code::Ok);
    let listed = client
        .list_jobs(EmptyRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(listed.jobs.is_empty(), "nothing was created: {listed:?}");
    core.terminate().await;
}

#[tokio::test]
async fn a_second_sigterm_ends_a_long_shutdown_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let mut core = harness::start_core(dir.path(), "").await;
    let mut client = core.client().await;
    let id = run(&mut client, shell("trap '' TERM; echo up; exec sleep 600")).await;
    wait_status(&mut client, &id, "RUNNING").await;
    // A StopJob waiting out a long grace period holds the graceful shutdown open.
    let mut stopping = client.clone();
    let stop = tokio::spawn(async move {
        stopping
            .stop_job(StopJobRequest {
                uuid: id,
                grace_period: "60s".into(),
            })
            .await
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let pid = nix::unistd::Pid::from_raw(core.child.id().unwrap() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        core.child.try_wait().unwrap().is_none(),
        "the first SIGTERM waits for the shutdown"
    );
    let second = std::time::Instant::now();
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let status = tokio::time::timeout(Duration::from_secs(5), core.child.wait())
        .await
        .expect("the second SIGTERM exits at once")
        .unwrap();
    assert_eq!(status.code(), Some(130), "{:?}", second.elapsed());
    let _ = stop.await;
    // What the shutdown left behind is cleaned up by the next start (stop mode).
    let core = harness::start_core(dir.path(), "").await;
    core.terminate().await;
}

#[tokio::test]
async fn a_request_over_the_size_limit_is_refused_naming_the_limit_and_its_key() {
    let dir = tempfile::tempdir().unwrap();
    let core = harness::start_core(dir.path(), "grpc:\n  max_request_size: 1 MiB\n").await;
    let mut client = core.client().await.max_encoding_message_size(64 << 20);
    let mut request = shell("true");
    request.uploads.push(FileUpload {
        path: "big.bin".into(),
        content: vec![7u8; 2 << 20].into(),
        mode: 0o600,
        is_directory: false,
    });
    let refused = client.run_job(request).await.unwrap_err();
    assert_eq!(
        refused.code(),
        tonic::Code::ResourceExhausted,
        "{refused:?}"
    );
    assert!(
        refused.message().contains("grpc.max_request_size"),
        "{}",
        refused.message()
    );
    // The connection is still good.
    let id = run(&mut client, shell("echo fine")).await;
    assert_eq!(logs(&mut client, &id).await, "fine\n");
    core.terminate().await;
}
