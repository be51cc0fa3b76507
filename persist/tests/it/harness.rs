//! Starting and stopping the real daemon, and the clients tests use.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use joblet_ipc::{IpcMessage, IpcSender, MessageType, SenderConfig};
use joblet_proto::persist::persist_service_client::PersistServiceClient;
use joblet_proto::persist::{LogLine, QueryLogsRequest};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

pub const WAIT: Duration = Duration::from_secs(30);

pub struct Daemon {
    pub child: Child,
    pub grpc: SocketAddr,
    pub metrics: SocketAddr,
    pub socket: PathBuf,
    pub stderr_log: PathBuf,
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
    let stderr_log = dir.join("persist.log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_joblet-persist"))
        .arg("--config")
        .arg(config_path)
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&stderr_log).unwrap())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let ready = tokio::time::timeout(WAIT, lines.next_line())
        .await
        .expect("daemon did not become ready")
        .unwrap()
        .unwrap_or_else(|| {
            panic!(
                "daemon exited before ready: {}",
                std::fs::read_to_string(&stderr_log).unwrap_or_default()
            )
        });
    let field = |name: &str| {
        ready
            .split_whitespace()
            .find_map(|part| part.strip_prefix(&format!("{name}=")))
            .unwrap_or_else(|| panic!("no {name}= in {ready:?}"))
            .to_owned()
    };
    Daemon {
        child,
        grpc: field("grpc").parse().unwrap(),
        metrics: field("metrics").parse().unwrap(),
        socket: PathBuf::from(field("ipc")),
        stderr_log,
    }
}

impl Daemon {
    pub async fn client(&self) -> PersistServiceClient<Channel> {
        PersistServiceClient::connect(format!("http://{}", self.grpc))
            .await
            .unwrap()
    }

    pub async fn terminate(mut self) -> std::process::ExitStatus {
        let pid = nix::unistd::Pid::from_raw(self.child.id().unwrap() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
        tokio::time::timeout(WAIT, self.child.wait())
            .await
            .expect("daemon did not stop on SIGTERM")
            .unwrap()
    }

    pub async fn kill_hard(mut self) {
        self.child.start_kill().unwrap();
        self.child.wait().await.unwrap();
    }

    /// The Prometheus exposition text.
    pub async fn scrape(&self) -> String {
        let mut stream = tokio::net::TcpStream::connect(self.metrics).await.unwrap();
        stream
            .write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
            .await
            .unwrap();
        let mut body = String::new();
        stream.read_to_string(&mut body).await.unwrap();
        body
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
