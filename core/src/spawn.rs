//! Starting a job's process: into its cgroup and new namespaces before it execs.
//!
//! The job's supervisor ([`crate::supervisor`]) calls [`spawn`]. Everything happens in its
//! forked child (`pre_exec`), without allocating there: cgroup files are opened and all strings
//! prepared beforehand. The child
//! 0. restores the default action of the termination signals the supervisor ignores,
//! 1. writes "0" to each `cgroup.procs` of the job cgroup (so even its first page is charged
//!    to the job),
//! 2. starts a new session and unshares mount, UTS, IPC and PID namespaces (and the network
//!    namespace for network mode `none`),
//! 3. forks: the new child is PID 1 of the job's PID namespace; it makes mounts private,
//!    mounts a fresh /proc, sets the host name and brings up loopback. Its parent stays outside
//!    as a tiny waiter that ignores termination signals and exits with the job's status (128+N
//!    for a death by signal N).
//! 4. PID 1 forks once more: the child execs the command (PID 2), and PID 1 stays as the job's
//!    init (`joblet-init`, like Docker's `--init`): it reaps orphans and, when the command
//!    exits, exits with its status. The kernel shields a namespace's PID 1 from signals it has
//!    no handler for, so a command run as PID 1 ignored `stop`'s SIGTERM and was SIGKILLed
//!    after the grace period; as PID 2 it gets SIGTERM's default action like anywhere else.
//!    When the init exits the kernel kills whatever is left in the namespace, so no orphan
//!    outlives the job.
#![allow(unsafe_code)]

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use nix::mount::{MsFlags, mount};
use nix::sched::{CloneFlags, unshare};
use nix::sys::signal::{SigHandler, Signal, signal};
use nix::sys::wait::{WaitStatus, waitpid};
use nix::unistd::{ForkResult, fork, sethostname, setsid};

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Network {
    /// The host's network namespace.
    Host,
    /// A new network namespace with only loopback.
    None,
}

#[derive(serde::Serialize, serde::Deserialize)]
pub struct SpawnSpec {
    pub command: String,
    pub args: Vec<String>,
    pub environment: Vec<(String, String)>,
    pub work_dir: PathBuf,
    pub hostname: String,
    pub network: Network,
    pub cgroup_procs: Vec<PathBuf>,
}

/// PATH given to jobs whose environment does not set one.
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Starts the job. stdout and stderr are pipes; stdin is /dev/null.
pub fn spawn(spec: &SpawnSpec) -> io::Result<Child> {
    let procs: Vec<File> = spec
        .cgroup_procs
        .iter()
        .map(|path| std::fs::OpenOptions::new().write(true).open(path))
        .collect::<io::Result<_>>()?;
    let procs_fds: Vec<i32> = procs.iter().map(AsRawFd::as_raw_fd).collect();
    let hostname = CString::new(spec.hostname.clone())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "hostname contains NUL"))?;
    let network = spec.network;

    let mut command = Command::new(&spec.command);
    command
        .args(&spec.args)
        .env_clear()
        .env("PATH", DEFAULT_PATH)
        .env("HOME", &spec.work_dir)
        .envs(spec.environment.iter().map(|(k, v)| (k, v)))
        .current_dir(&spec.work_dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: the closure runs in the forked child before exec and only makes system calls on
    // data prepared above; it does not allocate or take locks.
    unsafe {
        command.pre_exec(move || enter_job(&procs_fds, &hostname, network));
    }
    let child = command.spawn();
    drop(procs);
    child
}

/// Signals that end a process when nobody handles them, and that the supervisor and the
/// waiter ignore.
const TERMINATING: [Signal; 4] = [
    Signal::SIGTERM,
    Signal::SIGINT,
    Signal::SIGHUP,
    Signal::SIGQUIT,
];

/// Ignores [`TERMINATING`] signals (the supervisor: only SIGKILL ends it).
pub fn ignore_termination_signals() {
    for terminating in TERMINATING {
        // SAFETY: setting a signal to be ignored installs no handler code.
        unsafe {
            let _ = signal(terminating, SigHandler::SigIgn);
        }
    }
}

fn enter_job(procs_fds: &[i32], hostname: &CString, network: Network) -> io::Result<()> {
    for terminating in TERMINATING {
        // SAFETY: restores the default action; no handler code.
        unsafe {
            let _ = signal(terminating, SigHandler::SigDfl);
        }
    }
    for &fd in procs_fds {
        // SAFETY: fd is an open cgroup.procs file owned by the parent until spawn returns.
        let written = unsafe { libc::write(fd, b"0".as_ptr().cast(), 1) };
        if written != 1 {
            return Err(io::Error::last_os_error());
        }
    }
    setsid()?;
    let mut flags = CloneFlags::CLONE_NEWNS
        | CloneFlags::CLONE_NEWUTS
        | CloneFlags::CLONE_NEWIPC
        | CloneFlags::CLONE_NEWPID;
    if network == Network::None {
        flags |= CloneFlags::CLONE_NEWNET;
    }
    unshare(flags)?;
    // SAFETY: the process is single-threaded here (a freshly forked child).
    match unsafe { fork() }? {
        ForkResult::Parent { child } => wait_and_exit(child),
        ForkResult::Child => {
            // If the waiter dies (e.g. SIGKILL), take the job down with it.
            // SAFETY: plain prctl call.
            unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
            mount(
                None::<&str>,
                "/",
                None::<&str>,
                MsFlags::MS_REC | MsFlags::MS_PRIVATE,
                None::<&str>,
            )?;
            mount(
                Some("proc"),
                "/proc",
                Some("proc"),
                MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
                None::<&str>,
            )?;
            sethostname(hostname.to_str().unwrap_or("joblet"))?;
            if network == Network::None {
                loopback_up()?;
            }
            // SAFETY: the process is single-threaded here (a freshly forked child).
            match unsafe { fork() }? {
                ForkResult::Parent { child } => init(child),
                ForkResult::Child => Ok(()),
            }
        }
    }
}

/// The job's init (PID 1 of its namespace): reaps every child, and exits with the command's
/// status once the command (`command`, PID 2) has exited.
fn init(command: nix::unistd::Pid) -> ! {
    // SAFETY: plain prctl call with a static NUL-terminated name.
    unsafe { libc::prctl(libc::PR_SET_NAME, c"joblet-init".as_ptr()) };
    // It writes nothing and must hold neither the job's pipes nor the pipe through which the
    // supervisor learns that the command exec'd.
    // SAFETY: close_range only closes descriptors of this process.
    unsafe { libc::syscall(libc::SYS_close_range, 0u32, u32::MAX, 0u32) };
    let code = loop {
        match waitpid(None, None) {
            Ok(WaitStatus::Exited(pid, code)) if pid == command => break code,
            Ok(WaitStatus::Signaled(pid, signal, _)) if pid == command => {
                break 128 + signal as i32;
            }
            Ok(_) | Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => break 255,
        }
    };
    // SAFETY: _exit skips atexit handlers and destructors, which belong to the supervisor.
    unsafe { libc::_exit(code) }
}

/// The waiter: outside the job's PID namespace, waits for its PID 1 (the init) and exits with
/// its status.
fn wait_and_exit(child: nix::unistd::Pid) -> ! {
    // Close every inherited descriptor but stdio, in particular the pipe through which the
    // daemon learns whether exec succeeded: it must see EOF once the job's PID 1 has exec'd,
    // not when the job ends.
    // SAFETY: close_range only closes descriptors of this process.
    unsafe { libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) };
    // Its command line is still the supervisor's (it never execs): its name tells them apart.
    // SAFETY: plain prctl call with a static NUL-terminated name.
    unsafe { libc::prctl(libc::PR_SET_NAME, c"joblet-waiter".as_ptr()) };
    ignore_termination_signals();
    let code = loop {
        match waitpid(child, None) {
            Ok(WaitStatus::Exited(_, code)) => break code,
            Ok(WaitStatus::Signaled(_, signal, _)) => break 128 + signal as i32,
            Ok(_) | Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => break 255,
        }
    };
    // SAFETY: _exit skips atexit handlers and destructors, which belong to the daemon.
    unsafe { libc::_exit(code) }
}

/// Brings up `lo` in a new network namespace.
fn loopback_up() -> io::Result<()> {
    // SAFETY: an ioctl on a socket we own with a zero-initialised ifreq naming "lo".
    unsafe {
        let socket = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if socket < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut request: libc::ifreq = std::mem::zeroed();
        for (slot, byte) in request.ifr_name.iter_mut().zip(b"lo\0") {
            *slot = *byte as libc::c_char;
        }
        let result = if libc::ioctl(socket, libc::SIOCGIFFLAGS, &mut request) < 0 {
            Err(io::Error::last_os_error())
        } else {
            request.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
            if libc::ioctl(socket, libc::SIOCSIFFLAGS, &request) < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(())
            }
        };
        libc::close(socket);
        result
    }
}
