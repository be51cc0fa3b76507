//! A job's supervisor: the small process that owns a running job, so that the job and its
//! output outlive joblet-core (a restart, an upgrade, a crash), as containerd's shims and
//! conmon do for containers.
//!
//! Core starts it as `joblet-core supervise <job id>` (the same binary, so the two always
//! match) and hands it the job's [`Launch`] on its stdin (never on disk: it holds the job's
//! secret values). The supervisor then
//! 1. takes a name of its own (`pkill joblet-core` does not match it), a session of its own (a
//!    terminal's Ctrl-C does not reach it) and ignores termination signals;
//! 2. starts the job ([`crate::spawn`]: cgroup, namespaces, the waiter) with its stdout and
//!    stderr as pipes, and says `started` (or why it failed) on its stdout, core's only pipe
//!    to it, which it then closes: nothing it does later depends on core being alive;
//! 3. pumps both pipes into the job's spool ([`crate::output::pump`]: sequences, timestamps,
//!    one write per read);
//! 4. once the job ended and both pipes are at end of file, syncs the spool, records the exit
//!    status in the job's exit file (written aside, synced, renamed into place) and exits.
//!
//! Core never waits for it as a parent: it watches a pidfd (which also works for a supervisor
//! started by an earlier run of core, see [`Supervisor::reattach`]) and reads the exit file. A
//! supervisor is recognised by its pid, its start time and the boot it ran in
//! ([`SupervisorId`]), so a recycled pid is never mistaken for it.

use std::fs::File;
use std::io::{self, BufRead, Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};

use joblet_proto::joblet::LogStream;
use serde::{Deserialize, Serialize};

use crate::output::{self, SpoolWriter};
use crate::spawn::{self, SpawnSpec};

/// The first argument that makes joblet-core a supervisor.
pub const MODE: &str = "supervise";
/// The supervisor's process name (`comm`, at most 15 bytes).
const NAME: &std::ffi::CStr = c"joblet-supervis";
/// What the supervisor says on its stdout once the job runs.
const STARTED: &str = "started";
/// Stack of the supervisor's stderr pump thread: it holds no big buffer on its stack.
const PUMP_STACK: usize = 64 * 1024;

/// What a supervisor needs to run a job.
#[derive(Serialize, Deserialize)]
pub struct Launch {
    pub job_id: String,
    pub spawn: SpawnSpec,
    /// The job's spool, created (empty) by core.
    pub spool: PathBuf,
    /// Where the supervisor records how the job ended.
    pub exit_file: PathBuf,
    pub max_line: usize,
}

/// How a job ended, as its supervisor recorded it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Exit {
    /// The job's exit code, or 128+N for a death by signal N.
    pub exit_code: i32,
    pub ended_ns: i64,
}

/// Which process a supervisor is, as core's journal records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SupervisorId {
    pub pid: i32,
    /// Its start time, in clock ticks after boot (`/proc/<pid>/stat` field 22).
    pub started: u64,
    /// `/proc/sys/kernel/random/boot_id` when it was started.
    pub boot_id: String,
}

/// The supervisor's side: `joblet-core supervise <job id>`.
pub fn main() -> ExitCode {
    let _ = nix::sys::prctl::set_name(NAME);
    let _ = nix::unistd::setsid();
    spawn::ignore_termination_signals();
    let mut input = Vec::new();
    let launch = io::stdin()
        .read_to_end(&mut input)
        .map_err(|e| format!("read the launch: {e}"))
        .and_then(|_| {
            serde_json::from_slice::<Launch>(&input).map_err(|e| format!("read the launch: {e}"))
        });
    drop(input);
    let mut report = |said: &str| {
        let mut stdout = io::stdout().lock();
        let _ = writeln!(stdout, "{said}");
        let _ = stdout.flush();
        // From here on, nothing goes to core.
        if let Ok(null) = File::options().write(true).open("/dev/null") {
            let _ = nix::unistd::dup2_stdout(null);
        }
    };
    let launch = match launch {
        Ok(launch) => launch,
        Err(error) => {
            report(&format!("failed: {error}"));
            return ExitCode::FAILURE;
        }
    };
    match supervise(&launch, &mut report) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("joblet-supervisor[{}]: {error}", launch.job_id);
            ExitCode::FAILURE
        }
    }
}

fn supervise(launch: &Launch, report: &mut dyn FnMut(&str)) -> Result<(), String> {
    let writer = match SpoolWriter::open(&launch.spool) {
        Ok(writer) => writer,
        Err(error) => {
            let error = format!("open the spool {}: {error}", launch.spool.display());
            report(&format!("failed: {error}"));
            return Err(error);
        }
    };
    let mut child = match spawn::spawn(&launch.spawn) {
        Ok(child) => child,
        Err(error) => {
            report(&format!(
                "failed: start {:?}: {error}",
                launch.spawn.command
            ));
            return Ok(());
        }
    };
    report(STARTED);
    let pipes = [
        child.stdout.take().map(output_pipe),
        child.stderr.take().map(output_pipe),
    ];
    let [stdout, stderr] = pipes;
    let max_line = launch.max_line;
    std::thread::scope(|scope| {
        let writer = &writer;
        let stderr_pump = stderr.map(|pipe| {
            std::thread::Builder::new()
                .stack_size(PUMP_STACK)
                .spawn_scoped(scope, move || {
                    output::pump(writer, LogStream::Stderr, pipe, max_line)
                })
        });
        if let Some(pipe) = stdout {
            output::pump(writer, LogStream::Stdout, pipe, max_line);
        }
        if let Some(Ok(pump)) = stderr_pump {
            let _ = pump.join();
        }
    });
    let exit_code = match child.wait() {
        Ok(status) => exit_code_of(status),
        Err(_) => -1,
    };
    writer
        .sync()
        .map_err(|e| format!("sync the spool {}: {e}", launch.spool.display()))?;
    let exit = Exit {
        exit_code,
        ended_ns: joblet_ipc::now_ns(),
    };
    record_exit(&launch.exit_file, &exit)
        .map_err(|e| format!("record the exit in {}: {e}", launch.exit_file.display()))
}

/// Pipe capacity asked for the job's stdout and stderr (Linux's default limit for
/// unprivileged processes): the job can write on while its pump waits for a CPU.
const PIPE_BYTES: i32 = 1024 * 1024;

/// The read end of a job's output pipe as a file, enlarged to [`PIPE_BYTES`] when the kernel
/// allows.
fn output_pipe(pipe: impl Into<OwnedFd>) -> File {
    let file = File::from(pipe.into());
    let _ = nix::fcntl::fcntl(&file, nix::fcntl::FcntlArg::F_SETPIPE_SZ(PIPE_BYTES));
    file
}

/// The waiter already maps signal deaths to 128+N; a waiter killed itself shows as a signal.
fn exit_code_of(status: std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(-1)
}

/// Writes `exit` durably: aside, synced, renamed into place, the directory synced.
fn record_exit(path: &Path, exit: &Exit) -> io::Result<()> {
    let aside = path.with_extension("exit-new");
    let mut file = File::create(&aside)?;
    file.write_all(&serde_json::to_vec(exit).map_err(io::Error::other)?)?;
    file.sync_all()?;
    std::fs::rename(&aside, path)?;
    if let Some(dir) = path.parent() {
        File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// How the job ended, if its supervisor recorded it.
pub fn read_exit(path: &Path) -> io::Result<Option<Exit>> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e)),
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(error) => Err(error),
    }
}

/// Core's handle on a job's supervisor.
pub struct Supervisor {
    pub id: SupervisorId,
    pidfd: OwnedFd,
    /// Set when this run of core started it (so it reaps it).
    child: Option<std::process::Child>,
}

impl Supervisor {
    /// Starts a supervisor for `launch` and returns once the job runs, or why it could not
    /// start. Blocking.
    pub fn launch(launch: &Launch) -> Result<Supervisor, String> {
        let input = serde_json::to_vec(launch).map_err(|e| e.to_string())?;
        let mut child = Command::new("/proc/self/exe")
            .arg0("joblet-core")
            .arg(MODE)
            .arg(&launch.job_id)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("start the job's supervisor: {e}"))?;
        let said = (|| {
            let mut stdin = child.stdin.take().ok_or("no stdin")?;
            stdin.write_all(&input).map_err(|e| e.to_string())?;
            drop(stdin);
            let mut line = String::new();
            let stdout = child.stdout.take().ok_or("no stdout")?;
            io::BufReader::new(stdout)
                .read_line(&mut line)
                .map_err(|e| e.to_string())?;
            Ok::<_, String>(line)
        })();
        let said = said.map_err(|e| format!("the job's supervisor: {e}"))?;
        let said = said.trim_end();
        if said != STARTED {
            let _ = child.wait();
            return Err(match said.strip_prefix("failed: ") {
                Some(why) => why.to_owned(),
                None => format!("the job's supervisor ended at start ({said:?})"),
            });
        }
        let pid = child.id() as i32;
        let identify = || -> io::Result<(OwnedFd, SupervisorId)> {
            let pidfd = pidfd(pid)?;
            let id = SupervisorId {
                pid,
                started: start_time(pid)?,
                boot_id: boot_id()?,
            };
            Ok((pidfd, id))
        };
        match identify() {
            Ok((pidfd, id)) => Ok(Supervisor {
                id,
                pidfd,
                child: Some(child),
            }),
            Err(error) => {
                let _ = child.kill();
                let _ = child.wait();
                Err(format!("identify the job's supervisor: {error}"))
            }
        }
    }

    /// The supervisor recorded as `id`, if that very process still runs.
    pub fn reattach(id: &SupervisorId) -> Option<Supervisor> {
        if boot_id().ok()? != id.boot_id {
            return None;
        }
        let pidfd = pidfd(id.pid).ok()?;
        if start_time(id.pid).ok()? != id.started || has_exited(&pidfd) {
            // Another process has the pid now, or ours ended after the pidfd was opened.
            return None;
        }
        Some(Supervisor {
            id: id.clone(),
            pidfd,
            child: None,
        })
    }

    /// Waits until the supervisor has exited (and reaps it if this run of core started it).
    #[allow(unsafe_code)]
    pub async fn exited(self) {
        use tokio::io::Interest;
        use tokio::io::unix::AsyncFd;
        // SAFETY: an OwnedFd is a valid, open descriptor that stays open and the same until the
        // AsyncFd that owns it is dropped.
        let registered = unsafe { AsyncFd::register_with_interest(self.pidfd, Interest::READABLE) };
        match registered {
            Ok(fd) => {
                let _ = fd.readable().await;
            }
            Err(error) => {
                tracing::error!(pid = self.id.pid, %error, "cannot watch the job's supervisor");
                std::future::pending::<()>().await;
            }
        }
        if let Some(mut child) = self.child {
            let _ = tokio::task::spawn_blocking(move || child.wait()).await;
        }
    }
}

fn pidfd(pid: i32) -> io::Result<OwnedFd> {
    let pid = rustix::process::Pid::from_raw(pid)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "pid 0"))?;
    Ok(rustix::process::pidfd_open(
        pid,
        rustix::process::PidfdFlags::empty(),
    )?)
}

/// A pidfd is readable once its process has exited.
fn has_exited(pidfd: &OwnedFd) -> bool {
    use std::os::fd::AsFd;
    let mut fds = [nix::poll::PollFd::new(
        pidfd.as_fd(),
        nix::poll::PollFlags::POLLIN,
    )];
    nix::poll::poll(&mut fds, nix::poll::PollTimeout::ZERO).is_ok_and(|ready| ready > 0)
}

/// A process's start time in clock ticks after boot.
fn start_time(pid: i32) -> io::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name (field 2) is in parentheses and may hold anything, spaces included.
    let after_name = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "no command name"))?;
    after_name
        .split_whitespace()
        .nth(19)
        .and_then(|field| field.parse().ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "no start time"))
}

/// This boot's id (`/proc/sys/kernel/random/boot_id`).
pub fn boot_id() -> io::Result<String> {
    Ok(std::fs::read_to_string("/proc/sys/kernel/random/boot_id")?
        .trim()
        .to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_supervisor_is_only_recognised_with_its_start_time_and_boot() {
        let me = std::process::id() as i32;
        let id = SupervisorId {
            pid: me,
            started: start_time(me).unwrap(),
            boot_id: boot_id().unwrap(),
        };
        assert!(Supervisor::reattach(&id).is_some(), "this very process");
        let recycled = SupervisorId {
            started: id.started + 1,
            ..id.clone()
        };
        assert!(
            Supervisor::reattach(&recycled).is_none(),
            "same pid, later start"
        );
        let rebooted = SupervisorId {
            boot_id: "another boot".into(),
            ..id.clone()
        };
        assert!(Supervisor::reattach(&rebooted).is_none(), "an earlier boot");
        let mut gone = std::process::Command::new("true").spawn().unwrap();
        let pid = gone.id() as i32;
        let started = start_time(pid).unwrap_or(0);
        gone.wait().unwrap();
        let ended = SupervisorId {
            pid,
            started,
            boot_id: id.boot_id.clone(),
        };
        assert!(
            Supervisor::reattach(&ended).is_none(),
            "a process that ended"
        );
    }

    #[test]
    fn an_exit_is_recorded_durably_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("job.exit");
        assert_eq!(read_exit(&path).unwrap(), None);
        let exit = Exit {
            exit_code: 137,
            ended_ns: 5,
        };
        record_exit(&path, &exit).unwrap();
        assert_eq!(read_exit(&path).unwrap(), Some(exit));
        assert!(!path.with_extension("exit-new").exists());
        std::fs::write(&path, b"{\"exit_co").unwrap();
        assert!(read_exit(&path).is_err(), "a damaged exit file is an error");
    }
}
