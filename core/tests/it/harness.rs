//! Starting the daemons and talking to them.

use std::path::{Path, PathBuf};
use std::time::Duration;

use joblet_proto::joblet::job_service_client::JobServiceClient;
use joblet_proto::joblet::{
    GetJobLogsRequest, GetJobStatusRequest, GetJobStatusResponse, LogRecord, RunJobRequest,
    StreamLogsRequest,
};
use joblet_proto::persist::QueryLogsRequest;
use joblet_proto::persist::persist_service_client::PersistServiceClient;
use tokio::process::Command;
use tonic::transport::Channel;

pub use joblet_test_support::WAIT;

/// Held by tests that load the CPU or measure it, so that they do not run at the same time
/// (cargo runs a binary's tests in parallel; this machine has two cores).
pub static CPU_BOUND: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A running joblet-core or joblet-persist.
pub struct Daemon(joblet_test_support::Daemon);

impl std::ops::Deref for Daemon {
    type Target = joblet_test_support::Daemon;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl std::ops::DerefMut for Daemon {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

/// Starts joblet-core with state in `dir`, persist socket `dir/persist.sock`, and `extra` YAML.
pub async fn start_core(dir: &Path, extra: &str) -> Daemon {
    let binary = Path::new(env!("CARGO_BIN_EXE_joblet-core"));
    let command = match delegated_cgroup(dir) {
        // Like a systemd unit with Delegate=yes: core alone in a cgroup of its own.
        Some(cgroup) => {
            let mut command = Command::new("/bin/sh");
            command
                .arg("-c")
                .arg("echo $$ > \"$0/cgroup.procs\" && exec \"$@\"")
                .arg(cgroup)
                .arg(binary);
            command
        }
        None => Command::new(binary),
    };
    start_core_with(command, dir, extra).await
}

/// On a cgroup v2 host where the tests run below the root (a delegated subtree, as under
/// systemd), a cgroup beside the tests' own for one core: v2 enables controllers only in
/// cgroups without processes of their own, so core cannot share the tests' cgroup. `None` on
/// v1 or at the root, where core is started as it is.
fn delegated_cgroup(dir: &Path) -> Option<PathBuf> {
    let own = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let mut lines = own.lines();
    let path = lines.next()?.strip_prefix("0::")?.to_owned();
    if lines.next().is_some() || path == "/" {
        return None;
    }
    let parent = Path::new(&path).parent()?;
    let name = format!(
        "core-{}",
        dir.file_name()?.to_string_lossy().trim_start_matches('.')
    );
    // Straight into the leaf core would move itself to: a cgroup whose controllers are
    // enabled for its children (by an earlier core) admits no process.
    let cgroup = Path::new("/sys/fs/cgroup")
        .join(parent.strip_prefix("/").ok()?)
        .join(name)
        .join("joblet-core");
    std::fs::create_dir_all(&cgroup).ok()?;
    Some(cgroup)
}

/// Like [`start_core`], with `command` running the joblet-core binary (e.g. through a
/// wrapper); `--config PATH` is appended to it.
pub async fn start_core_with(command: Command, dir: &Path, extra: &str) -> Daemon {
    // `extra` may start with a grpc: block; its keys join the harness's own.
    let (grpc_extra, extra) = match extra.strip_prefix("grpc:\n") {
        Some(rest) => {
            let end: usize = rest
                .lines()
                .take_while(|line| line.starts_with("  "))
                .map(|line| line.len() + 1)
                .sum();
            rest.split_at(end)
        }
        None => ("", extra),
    };
    let config = format!(
        "grpc:\n  listen: 127.0.0.1:0\n  insecure: true\n{grpc_extra}metrics:\n  listen: 127.0.0.1:0\nstate_dir: {state}\n{extra}",
        state = dir.join("state").display(),
    );
    // Each daemon gets its own cgroup parent: a test's core removes its parent at shutdown
    // while other tests' cores keep running.
    let parent = format!(
        "joblet-test-{}",
        dir.file_name()
            .unwrap()
            .to_string_lossy()
            .trim_start_matches('.')
    );
    let config = if config.contains("\ncgroup:\n") {
        config.replace("\ncgroup:\n", &format!("\ncgroup:\n  parent: {parent}\n"))
    } else {
        format!("{config}\ncgroup:\n  parent: {parent}\n")
    };
    let config = if config.contains("\njobs:") {
        config
    } else {
        format!(
            "{config}\njobs:\n  work_root: {}\n",
            dir.join("work").display()
        )
    };
    // Tests end their daemons with their jobs (a test that keeps jobs running says so).
    let config = if config.contains("on_core_shutdown:") {
        config
    } else {
        config.replace("\njobs:\n", "\njobs:\n  on_core_shutdown: stop\n")
    };
    let config = if config.contains("\npersist:") {
        config
    } else {
        format!(
            "{config}\npersist:\n  socket: {}\n  query_address: null\n  reconnect_delay: 200ms\n",
            dir.join("persist.sock").display()
        )
    };
    let path = dir.join("joblet-config.yml");
    std::fs::write(&path, config).unwrap();
    Daemon(joblet_test_support::Daemon::start(command, &path, &dir.join("core.log")).await)
}

/// The joblet-persist binary built beside joblet-core (`cargo build --workspace --bins`).
pub fn persist_binary() -> PathBuf {
    joblet_test_support::sibling(
        Path::new(env!("CARGO_BIN_EXE_joblet-core")),
        "joblet-persist",
    )
}

/// Starts joblet-persist with data in `dir/persist-data` and socket `dir/persist.sock`.
pub async fn start_persist(dir: &Path) -> Daemon {
    start_persist_with_metrics(dir, false).await
}

pub async fn start_persist_with_metrics(dir: &Path, metrics: bool) -> Daemon {
    let path = dir.join("persist-config.yml");
    let metrics = if metrics { "127.0.0.1:0" } else { "null" };
    std::fs::write(
        &path,
        format!(
            "data_dir: {}\nipc:\n  socket: {}\ngrpc:\n  listen: 127.0.0.1:0\n  insecure: true\nmetrics:\n  listen: {metrics}\nretention:\n  logs: 0\n  metrics: 0\n",
            dir.join("persist-data").display(),
            dir.join("persist.sock").display()
        ),
    )
    .unwrap();
    let command = Command::new(persist_binary());
    Daemon(joblet_test_support::Daemon::start(command, &path, &dir.join("persist.log")).await)
}

impl Daemon {
    pub async fn client(&self) -> JobServiceClient<Channel> {
        JobServiceClient::connect(format!("http://{}", self.grpc))
            .await
            .unwrap()
            .max_decoding_message_size(64 << 20)
    }

    pub async fn terminate(self) -> std::process::ExitStatus {
        self.0.terminate().await
    }

    pub async fn kill_hard(self) {
        self.0.kill_hard().await
    }
}

pub fn shell(script: &str) -> RunJobRequest {
    RunJobRequest {
        command: "/bin/sh".into(),
        args: vec!["-c".into(), script.into()],
        ..Default::default()
    }
}

pub async fn run(client: &mut JobServiceClient<Channel>, request: RunJobRequest) -> String {
    client.run_job(request).await.unwrap().into_inner().job_uuid
}

pub async fn status(client: &mut JobServiceClient<Channel>, id: &str) -> GetJobStatusResponse {
    client
        .get_job_status(GetJobStatusRequest { uuid: id.into() })
        .await
        .unwrap()
        .into_inner()
}

/// The whole output through the compat GetJobLogs stream, which ends with the job.
pub async fn logs(client: &mut JobServiceClient<Channel>, id: &str) -> String {
    let mut stream = client
        .get_job_logs(GetJobLogsRequest { uuid: id.into() })
        .await
        .unwrap()
        .into_inner();
    let mut text = Vec::new();
    tokio::time::timeout(WAIT, async {
        while let Some(chunk) = stream.message().await.unwrap() {
            text.extend_from_slice(&chunk.payload);
        }
    })
    .await
    .expect("log stream did not end with the job");
    String::from_utf8_lossy(&text).into_owned()
}

/// Every record after `after`, following until the job ends.
pub async fn records(
    client: &mut JobServiceClient<Channel>,
    id: &str,
    after: u64,
) -> Vec<LogRecord> {
    let mut stream = client
        .stream_logs(StreamLogsRequest {
            job_uuid: id.into(),
            after_sequence: after,
            follow: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut records = Vec::new();
    tokio::time::timeout(WAIT, async {
        while let Some(record) = stream.message().await.unwrap() {
            records.push(record);
        }
    })
    .await
    .expect("record stream did not end with the job");
    records
}

/// Waits for the job to end and returns its final status.
pub async fn finished(client: &mut JobServiceClient<Channel>, id: &str) -> GetJobStatusResponse {
    let _ = logs(client, id).await;
    tokio::time::timeout(WAIT, async {
        loop {
            let status = status(client, id).await;
            if ["COMPLETED", "FAILED", "STOPPED", "CANCELED"].contains(&status.status.as_str()) {
                return status;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("job did not end")
}

/// Waits until the job reports `wanted`.
pub async fn wait_status(client: &mut JobServiceClient<Channel>, id: &str, wanted: &str) {
    tokio::time::timeout(WAIT, async {
        while status(client, id).await.status != wanted {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("job never reached {wanted}"));
}

/// The lines persist holds of `id`, as (sequence, content), in its order.
pub async fn persisted_lines(persist: &Daemon, id: &str) -> Vec<(u64, Vec<u8>)> {
    let mut client = PersistServiceClient::connect(format!("http://{}", persist.grpc))
        .await
        .unwrap();
    let response = client
        .query_logs(QueryLogsRequest {
            job_id: id.into(),
            ..Default::default()
        })
        .await;
    let mut stream = match response {
        Ok(response) => response.into_inner(),
        // Nothing of the job has arrived yet.
        Err(status) if status.code() == tonic::Code::NotFound => return Vec::new(),
        Err(status) => panic!("QueryLogs: {status}"),
    };
    let mut lines = Vec::new();
    while let Some(line) = stream.message().await.unwrap() {
        lines.push((line.sequence, line.content.to_vec()));
    }
    lines
}

/// Waits (up to [`WAIT`]) until persist holds `count` lines of `id`, then checks that they are
/// `1..=count` exactly once each, every line `n` reading `content(n)`.
pub async fn persisted_exactly(
    persist: &Daemon,
    id: &str,
    count: u64,
    content: impl Fn(u64) -> String,
) {
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut lines = persisted_lines(persist, id).await;
    while (lines.len() as u64) < count && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        lines = persisted_lines(persist, id).await;
    }
    assert_eq!(
        lines.len() as u64,
        count,
        "persist holds every line exactly once"
    );
    let mut sequences: Vec<u64> = lines.iter().map(|(sequence, _)| *sequence).collect();
    sequences.sort_unstable();
    assert_eq!(
        sequences,
        (1..=count).collect::<Vec<_>>(),
        "no gap, no duplicate"
    );
    for (sequence, text) in &lines {
        assert_eq!(text, content(*sequence).as_bytes(), "line {sequence}");
    }
}

/// Every metric sample core has of `id` (GetJobMetrics).
pub async fn samples(
    client: &mut JobServiceClient<Channel>,
    id: &str,
) -> Vec<joblet_proto::joblet::JobMetricsEvent> {
    let mut stream = client
        .get_job_metrics(joblet_proto::joblet::GetJobMetricsRequest {
            job_uuid: id.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut events = Vec::new();
    while let Some(event) = stream.message().await.unwrap() {
        events.push(event);
    }
    events
}

/// Log records core has of `id` now, without following.
pub async fn records_now(client: &mut JobServiceClient<Channel>, id: &str) -> usize {
    let mut stream = client
        .stream_logs(StreamLogsRequest {
            job_uuid: id.into(),
            follow: false,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut count = 0;
    while let Some(_record) = stream.message().await.unwrap() {
        count += 1;
    }
    count
}

/// Waits until core has at least `count` log records of `id`.
pub async fn wait_records(client: &mut JobServiceClient<Channel>, id: &str, count: usize) {
    tokio::time::timeout(WAIT, async {
        while records_now(client, id).await < count {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("the job never wrote {count} lines"));
}

/// Whether a process whose command line contains `marker` runs.
pub fn process_with(marker: &str) -> bool {
    !pids_with(marker).is_empty()
}

/// The processes whose command line contains `marker`.
pub fn pids_with(marker: &str) -> Vec<i32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|entry| {
            let pid = entry.file_name().to_str()?.parse().ok()?;
            let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
            String::from_utf8_lossy(&cmdline)
                .replace('\0', " ")
                .contains(marker)
                .then_some(pid)
        })
        .collect()
}
