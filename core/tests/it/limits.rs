//! Limits enforced by real cgroups on real processes.

use joblet_proto::joblet::{GetJobMetricsRequest, StopJobRequest};

use crate::harness::{self, finished, logs, run, shell};

#[tokio::test]
async fn a_job_over_its_memory_limit_is_oom_killed_and_failed() {
    let dir = tempfile::tempdir().unwrap();
    let core = harness::start_core(dir.path(), "").await;
    let mut client = core.client().await;
    // tail keeps a whole "line" in memory: 300 MB of zeros without a newline.
    let mut request = shell("head -c 300000000 /dev/zero | tail > /dev/null");
    request.max_memory = 64;
    let id = run(&mut client, request).await;
    let done = finished(&mut client, &id).await;
    assert_eq!(done.status, "FAILED", "{done:?}");
    assert!(
        done.status_reason.contains("out of memory"),
        "{}",
        done.status_reason
    );
    assert_ne!(done.exit_code, 0);
    core.terminate().await;
}

#[tokio::test]
async fn max_cpu_50_holds_a_busy_loop_to_half_a_core() {
    let _alone = harness::CPU_BOUND.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let core = harness::start_core(
        dir.path(),
        "jobs:\n  metrics_interval: 500ms\n  work_root: /tmp/joblet-test-work\n",
    )
    .await;
    let mut client = core.client().await;
    let mut request = shell("while :; do :; done");
    request.max_cpu = 50;
    let id = run(&mut client, request).await;
    tokio::time::sleep(std::time::Duration::from_secs(5)).await;
    let mut samples = client
        .get_job_metrics(GetJobMetricsRequest {
            job_uuid: id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut cpu = Vec::new();
    while let Some(event) = samples.message().await.unwrap() {
        cpu.push(event.cpu_percent);
    }
    client
        .stop_job(StopJobRequest {
            uuid: id,
            grace_period: "1s".into(),
        })
        .await
        .unwrap();
    // Skip the first samples (the first has no previous reading).
    let steady = &cpu[2..];
    let mean = steady.iter().sum::<f64>() / steady.len() as f64;
    assert!(
        (40.0..=60.0).contains(&mean),
        "mean cpu {mean:.1}% from {cpu:?}"
    );
    core.terminate().await;
}

#[tokio::test]
async fn the_pids_limit_stops_a_fork_loop() {
    let dir = tempfile::tempdir().unwrap();
    let core = harness::start_core(
        dir.path(),
        "cgroup:\n  pids_limit: 16\njobs:\n  metrics_interval: 100ms\n  work_root: /tmp/joblet-test-work\n",
    )
    .await;
    let mut client = core.client().await;
    // The forks run in a subshell, which dies at the first fork refused; the job itself then
    // stays (forking nothing) for about a second with the sleeps it got, so that samples see
    // them, and fails.
    let id = run(
        &mut client,
        shell(
            "(for i in $(seq 64); do sleep 3 & done; wait); \
             i=0; while [ $i -lt 1000000 ]; do i=$((i+1)); done; exit 1",
        ),
    )
    .await;
    let output = logs(&mut client, &id).await;
    assert!(
        output.contains("fork"),
        "forks beyond pids.max fail: {output}"
    );
    let done = finished(&mut client, &id).await;
    assert_eq!(done.status, "FAILED");
    let highest = harness::samples(&mut client, &id)
        .await
        .iter()
        .map(|event| event.pids)
        .max()
        .unwrap_or(0);
    assert!(
        (1..=16).contains(&highest),
        "pids.max 16, sampled {highest}"
    );
    core.terminate().await;
}

#[tokio::test]
async fn metrics_are_sampled_from_the_jobs_cgroup() {
    let dir = tempfile::tempdir().unwrap();
    let core = harness::start_core(
        dir.path(),
        "jobs:\n  metrics_interval: 200ms\n  work_root: /tmp/joblet-test-work\n",
    )
    .await;
    let mut client = core.client().await;
    let mut request =
        shell("exec /usr/bin/python3 -c 'import time; a = bytearray(50_000_000); time.sleep(1.5)'");
    request.max_memory = 256;
    let id = run(&mut client, request).await;
    finished(&mut client, &id).await;
    let events = harness::samples(&mut client, &id).await;
    assert!(events.len() >= 3, "{events:?}");
    assert!(
        events.iter().all(|e| e.memory_limit == 256 * 1024 * 1024),
        "{events:?}"
    );
    assert!(
        events.iter().any(|e| e.memory_bytes > 10_000_000),
        "{events:?}"
    );
    assert!(events.iter().any(|e| e.pids >= 1), "{events:?}");
    assert!(
        events
            .windows(2)
            .all(|w| w[0].sequence + 1 == w[1].sequence)
    );
    // Pressure stall information: on cgroup v2 with PSI in the kernel, nothing on v1.
    let v2 = std::path::Path::new("/sys/fs/cgroup/cgroup.controllers").exists();
    let psi = std::fs::read_to_string("/proc/pressure/memory").is_ok();
    let with_pressure = events
        .iter()
        .filter(|e| e.cpu_pressure_some.is_some() && e.memory_pressure_some.is_some())
        .count();
    if v2 && psi {
        assert_eq!(with_pressure, events.len(), "{events:?}");
    } else {
        assert_eq!(with_pressure, 0, "no PSI without cgroup v2: {events:?}");
    }
    core.terminate().await;
}

/// This machine's controllers are bound to cgroup v1; its cgroup2 hierarchy has none of those
/// core uses. In a mount namespace where that hierarchy is /sys/fs/cgroup, core runs in v2
/// mode: it must say so, and refuse a job whose limits the hierarchy cannot enforce (every job
/// has a pids limit), naming the controller, and leave no cgroup behind.
#[tokio::test]
async fn on_cgroup_v2_without_controllers_jobs_are_refused_naming_the_limit() {
    // Only where the cgroup2 hierarchy lacks the pids controller (a v1 host like this one).
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap();
    let Some(unified) = mounts
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|f| f.get(2) == Some(&"cgroup2"))
        .map(|f| f[1].to_owned())
    else {
        eprintln!("skipped: no cgroup2 hierarchy mounted");
        return;
    };
    let controllers =
        std::fs::read_to_string(format!("{unified}/cgroup.controllers")).unwrap_or_default();
    if controllers.split_whitespace().any(|c| c == "pids") {
        eprintln!("skipped: the cgroup2 hierarchy has the pids controller");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut command = tokio::process::Command::new("unshare");
    command.args([
        "--mount",
        "--propagation",
        "private",
        "/bin/sh",
        "-c",
        "mount -t cgroup2 cgroup2 /sys/fs/cgroup && exec \"$0\" \"$@\"",
        env!("CARGO_BIN_EXE_joblet-core"),
    ]);
    let core = harness::start_core_with(command, dir.path(), "persist:\n  enabled: false\n").await;
    let log = std::fs::read_to_string(&core.log).unwrap();
    assert!(log.contains("version=\"v2\""), "{log}");
    let mut client = core.client().await;
    let id = harness::run(&mut client, harness::shell("echo never")).await;
    let status = harness::finished(&mut client, &id).await;
    assert_eq!(status.status, "FAILED");
    let log = std::fs::read_to_string(&core.log).unwrap();
    assert!(
        log.contains("limit pids did not take effect"),
        "the refusal names the limit: {log}"
    );
    // The namespace's view of the hierarchy: core's leaf and the (empty) parent of jobs.
    let root = format!("/proc/{}/root/sys/fs/cgroup", core.child.id().unwrap());
    let leftovers: Vec<_> = walk(std::path::Path::new(&root))
        .into_iter()
        .filter(|path| path.to_string_lossy().contains(&id))
        .collect();
    assert!(leftovers.is_empty(), "job cgroups left: {leftovers:?}");
    assert!(std::path::Path::new(&root).join("joblet-core").is_dir());
    core.terminate().await;
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            found.push(entry.path());
            found.extend(walk(&entry.path()));
        }
    }
    found
}

#[tokio::test]
async fn a_process_killed_for_memory_is_reported_even_when_the_job_succeeds() {
    let dir = tempfile::tempdir().unwrap();
    let core = harness::start_core(dir.path(), "").await;
    let mut client = core.client().await;
    // `tail` holds a 300 MB "line" and is OOM-killed; the job goes on and exits 0.
    let mut request = shell("(head -c 300000000 /dev/zero | tail > /dev/null); echo survived");
    request.max_memory = 64;
    let id = run(&mut client, request).await;
    let output = logs(&mut client, &id).await;
    // The shell's "Killed" goes to stderr, and across two pipes the order of lines written
    // microseconds apart is not kept: look for the line, not its place.
    assert!(output.lines().any(|line| line == "survived"), "{output:?}");
    let done = finished(&mut client, &id).await;
    assert_eq!((done.status.as_str(), done.exit_code), ("COMPLETED", 0));
    assert!(
        done.status_reason
            .contains("1 process killed for exceeding max_memory 64 MiB"),
        "{}",
        done.status_reason
    );
    core.terminate().await;
}

#[tokio::test]
async fn the_io_limit_holds_and_io_is_measured() {
    let _alone = harness::CPU_BOUND.lock().await;
    let dir = tempfile::tempdir().unwrap();
    // O_DIRECT needs a real file system (in the v2 guest /tmp is a tmpfs; it has a scratch
    // disk instead).
    let scratch = std::env::var("JOBLET_TEST_SCRATCH")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| dir.path().to_owned());
    let target = scratch.join(format!("io-{}", std::process::id()));
    let core = harness::start_core(
        dir.path(),
        "jobs:\n  metrics_interval: 100ms\n  work_root: /tmp/joblet-test-work\n",
    )
    .await;
    let mut client = core.client().await;
    let mut request = shell(&format!(
        "start=$(date +%s%N); dd if=/dev/zero of={} bs=1M count=10 oflag=direct 2>/dev/null; \
         end=$(date +%s%N); rm -f {0}; echo $(( (end - start) / 1000000 ))",
        target.display()
    ));
    request.max_io_bps = 5 << 20;
    let id = run(&mut client, request).await;
    let output = logs(&mut client, &id).await;
    let done = finished(&mut client, &id).await;
    assert_eq!(done.status, "COMPLETED", "{done:?} {output}");
    let millis: u64 = output.trim().parse().unwrap();
    assert!(
        millis >= 1200,
        "10 MiB at 5 MiB/s took {millis} ms: the limit did not hold"
    );
    let written = harness::samples(&mut client, &id)
        .await
        .iter()
        .map(|event| event.disk_write_bytes)
        .max()
        .unwrap_or(0);
    assert!(
        written >= 8 << 20,
        "the job wrote 10 MiB; its metrics say {written} bytes"
    );
    core.terminate().await;
}

#[tokio::test]
async fn job_cgroups_live_under_cores_own_cgroup() {
    let dir = tempfile::tempdir().unwrap();
    let core = harness::start_core(dir.path(), "").await;
    let mut client = core.client().await;
    let id = run(&mut client, shell("sleep 30")).await;
    harness::wait_status(&mut client, &id, "RUNNING").await;
    let pid = core.child.id().unwrap();
    let own = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    // v2: "0::/<own>/joblet-core" (core moved itself into a leaf); v1: the pids hierarchy.
    let (mount, own) = match own.lines().find_map(|l| l.strip_prefix("0::")) {
        Some(path) if !own.lines().any(|l| l.contains(":pids:")) => (
            "/sys/fs/cgroup".to_owned(),
            path.trim_end_matches("/joblet-core").to_owned(),
        ),
        _ => (
            "/sys/fs/cgroup/pids".to_owned(),
            own.lines()
                .find_map(|l| l.split_once(":pids:").map(|(_, p)| p.to_owned()))
                .unwrap(),
        ),
    };
    let parent = format!(
        "joblet-test-{}",
        dir.path()
            .file_name()
            .unwrap()
            .to_string_lossy()
            .trim_start_matches('.')
    );
    let job_dir = std::path::Path::new(&mount)
        .join(own.trim_start_matches('/'))
        .join(parent)
        .join(&id);
    let procs = std::fs::read_to_string(job_dir.join("cgroup.procs"))
        .unwrap_or_else(|e| panic!("{}: {e}", job_dir.display()));
    assert!(
        !procs.trim().is_empty(),
        "the job's processes are in {}",
        job_dir.display()
    );
    client
        .stop_job(StopJobRequest {
            uuid: id,
            grace_period: "1s".into(),
        })
        .await
        .unwrap();
    core.terminate().await;
    assert!(!job_dir.exists(), "no cgroup left behind");
}

#[tokio::test]
async fn cpu_cores_pin_the_job_and_a_timeout_ends_it() {
    let dir = tempfile::tempdir().unwrap();
    let core = harness::start_core(
        dir.path(),
        "jobs:\n  stop_grace_period: 1s\n  work_root: /tmp/joblet-test-work\n",
    )
    .await;
    let mut client = core.client().await;
    let mut pinned = shell("grep Cpus_allowed_list /proc/self/status");
    pinned.cpu_cores = "0".into();
    let id = run(&mut client, pinned).await;
    let output = logs(&mut client, &id).await;
    assert_eq!(output.split_whitespace().last(), Some("0"), "{output}");

    let mut slow = shell("sleep 30");
    slow.timeout = "1s".into();
    let started = std::time::Instant::now();
    let id = run(&mut client, slow).await;
    let done = finished(&mut client, &id).await;
    assert_eq!(done.status, "FAILED");
    assert_eq!(done.status_reason, "timed out after 1s");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(10),
        "timeout plus grace period, not the job's 30 s"
    );
    core.terminate().await;
}
