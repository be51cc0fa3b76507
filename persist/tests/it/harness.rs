//! Starting and stopping the real daemon, and the clients tests use.

use std::path::{Path, PathBuf};
use std::time::Duration;

use joblet_ipc::{IpcMessage, IpcSender, MessageType, SenderConfig};
use joblet_proto::persist::persist_service_client::PersistServiceClient;
use joblet_proto::persist::{JobSummary, ListJobsRequest, LogLine, QueryLogsRequest};
use tokio::process::Command;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

pub use joblet_test_support::WAIT;

/// A running joblet-persist.
pub struct Daemon {
    process: joblet_test_support::Daemon,
    /// The replication socket.
    pub socket: PathBuf,
}

impl std::ops::Deref for Daemon {
    type Target = joblet_test_support::Daemon;
    fn deref(&self) -> &Self::Target {
        &self.process
    }
}

impl std::ops::DerefMut for Daemon {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.process
    }
}

/// Writes a config into `dir` (data, socket and log there; ports chosen free) with `extra`
/// YAML appended, and starts the daemon.
pub async fn start(dir: &Path, extra: &str) -> Daemon {
    let config_path = write_config(dir, "127.0.0.1:0", extra);
    start_with_config(dir, &config_path).await
}

/// Writes `dir/persist-config.yml`: data and socket in `dir`, gRPC on a free port, the
/// Prometheus endpoint on `metrics`, and `extra` YAML appended.
pub fn write_config(dir: &Path, metrics: &str, extra: &str) -> PathBuf {
    let config = format!(
        "data_dir: {data}\nipc:\n  socket: {socket}\ngrpc:\n  listen: 127.0.0.1:0\n  insecure: true\nmetrics:\n  listen: {metrics}\n{extra}",
        data = dir.join("data").display(),
        socket = dir.join("persist.sock").display(),
    );
    let config_path = dir.join("persist-config.yml");
    std::fs::write(&config_path, config).unwrap();
    config_path
}

/// Runs the daemon with `args` to its end (for configurations it refuses), with its output.
pub fn run_to_exit(args: &[&std::ffi::OsStr]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_joblet-persist"))
        .args(args)
        .output()
        .unwrap()
}

pub async fn start_with_config(dir: &Path, config_path: &Path) -> Daemon {
    let command = Command::new(env!("CARGO_BIN_EXE_joblet-persist"));
    let process =
        joblet_test_support::Daemon::start(command, config_path, &dir.join("persist.log")).await;
    Daemon {
        socket: process.ipc.clone().expect("persist names its socket"),
        process,
    }
}

impl Daemon {
    pub async fn client(&self) -> PersistServiceClient<Channel> {
        PersistServiceClient::connect(format!("http://{}", self.grpc))
            .await
            .unwrap()
    }

    pub async fn terminate(self) -> std::process::ExitStatus {
        self.process.terminate().await
    }

    pub async fn kill_hard(self) {
        self.process.kill_hard().await
    }
}

pub struct Replicator {
    pub sender: IpcSender,
    shutdown: CancellationToken,
}

impl Replicator {
    pub async fn connect(socket: &Path) -> Replicator {
        let shutdown = CancellationToken::new();
        let mut config = SenderConfig::new(socket);
        config.reconnect_delay = Duration::from_millis(100);
        let (sender, _task) = IpcSender::start(config, shutdown.clone());
        let mut connections = sender.connections();
        tokio::time::timeout(WAIT, connections.wait_for(|g| *g >= 1))
            .await
            .expect("sender did not connect")
            .unwrap();
        Replicator { sender, shutdown }
    }

    /// Sends every message (waiting for room) and waits until persist acknowledged the last
    /// sequence of each job and kind.
    pub async fn send_all_acked(&self, messages: Vec<IpcMessage>) {
        let mut last = std::collections::HashMap::new();
        for message in &messages {
            last.insert((message.job_id.clone(), message.r#type), message.sequence);
            self.sender.send(message).await.unwrap();
        }
        for ((job, kind), sequence) in last {
            let kind = MessageType::try_from(kind).unwrap();
            tokio::time::timeout(WAIT, async {
                while self.sender.acknowledged(&job, kind) < sequence {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            })
            .await
            .unwrap_or_else(|_| panic!("{job} not acknowledged up to {sequence}"));
        }
    }
}

impl Drop for Replicator {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

pub async fn query_logs(
    client: &mut PersistServiceClient<Channel>,
    request: QueryLogsRequest,
) -> Result<Vec<LogLine>, tonic::Status> {
    let mut stream = client.query_logs(request).await?.into_inner();
    let mut lines = Vec::new();
    while let Some(line) = stream.message().await? {
        lines.push(line);
    }
    Ok(lines)
}

/// Every stored job's summary (ListJobs).
pub async fn job_summaries(daemon: &Daemon) -> Vec<JobSummary> {
    daemon
        .client()
        .await
        .list_jobs(ListJobsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .jobs
}
