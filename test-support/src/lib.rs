//! What the integration tests of core, persist and rnx share (a dev-dependency only): the real
//! daemons started from their binaries and stopped, their ready line read, their Prometheus
//! endpoint scraped, and waiting for a condition instead of sleeping.
//!
//! Each crate's harness adds what is its own (the configuration it writes, its clients).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};

/// How long a daemon may take to start or stop, and a test's waits their default.
pub const WAIT: Duration = Duration::from_secs(60);

/// A daemon, started, that printed its ready line
/// (`<name> ready grpc=ADDR [ipc=PATH] metrics=ADDR|off`).
pub struct Daemon {
    pub child: Child,
    /// Where its standard error (its log) goes.
    pub log: PathBuf,
    pub grpc: SocketAddr,
    /// The Prometheus endpoint, unless the configuration turned it off.
    pub metrics: Option<SocketAddr>,
    /// persist's replication socket.
    pub ipc: Option<PathBuf>,
}

impl Daemon {
    /// Runs `command` with `--config config` appended, its log into `log`, and waits for its
    /// ready line; panics with the log when it exits before.
    pub async fn start(mut command: Command, config: &Path, log: &Path) -> Daemon {
        let mut child = command
            .arg("--config")
            .arg(config)
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(log).unwrap())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {command:?}: {e}"));
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let ready = tokio::time::timeout(WAIT, lines.next_line())
            .await
            .unwrap_or_else(|_| panic!("{command:?} did not become ready"))
            .unwrap()
            .unwrap_or_else(|| {
                panic!(
                    "{command:?} exited before ready: {}",
                    std::fs::read_to_string(log).unwrap_or_default()
                )
            });
        let field = |name: &str| {
            ready
                .split_whitespace()
                .find_map(|part| part.strip_prefix(name)?.strip_prefix('='))
                .filter(|value| *value != "off")
        };
        Daemon {
            child,
            log: log.to_owned(),
            grpc: field("grpc")
                .and_then(|a| a.parse().ok())
                .unwrap_or_else(|| panic!("no grpc= in {ready:?}")),
            metrics: field("metrics").and_then(|a| a.parse().ok()),
            ipc: field("ipc").map(PathBuf::from),
        }
    }

    pub fn pid(&self) -> nix::unistd::Pid {
        nix::unistd::Pid::from_raw(self.child.id().expect("the daemon runs") as i32)
    }

    /// What it wrote to its log so far.
    pub fn said(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Stops it with SIGTERM; panics unless it exits within [`WAIT`].
    pub async fn terminate(mut self) -> ExitStatus {
        nix::sys::signal::kill(self.pid(), nix::sys::signal::Signal::SIGTERM).unwrap();
        tokio::time::timeout(WAIT, self.child.wait())
            .await
            .expect("daemon did not stop on SIGTERM")
            .unwrap()
    }

    /// Kills it with SIGKILL, as a crash would end it.
    pub async fn kill_hard(mut self) {
        self.child.start_kill().unwrap();
        self.child.wait().await.unwrap();
    }

    /// The Prometheus exposition text.
    pub async fn scrape(&self) -> String {
        scrape(self.metrics.expect("the daemon exports metrics")).await
    }
}

/// The Prometheus exposition text served at `address`.
pub async fn scrape(address: SocketAddr) -> String {
    let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let mut body = String::new();
    stream.read_to_string(&mut body).await.unwrap();
    body
}

/// Whether `done` came true within `within`, checked every `every`.
pub async fn eventually(
    within: Duration,
    every: Duration,
    mut done: impl AsyncFnMut() -> bool,
) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if done().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(every).await;
    }
}

/// The binary `name` built beside `binary` (`cargo build --workspace --bins` builds them all);
/// panics, saying so, when it is missing.
pub fn sibling(binary: &Path, name: &str) -> PathBuf {
    let path = binary.with_file_name(name);
    assert!(
        path.exists(),
        "{} is missing: build the workspace binaries first (cargo build --workspace --bins)",
        path.display()
    );
    path
}
