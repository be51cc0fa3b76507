//! Plumbing both daemons share: allocator tuning, logging to stderr and shutdown on
//! SIGTERM/SIGINT.

use tokio_util::sync::CancellationToken;

/// Logs to stderr, filtered by RUST_LOG (default `info`), coloured only on a terminal.
pub fn init_tracing() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

/// Cancels `shutdown` on the first SIGTERM or SIGINT; a second one exits at once (status 130),
/// for an operator who will not wait for a long drain. Call inside a tokio runtime.
pub fn cancel_on_signals(shutdown: CancellationToken) -> std::io::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    tokio::spawn(async move {
        tokio::select! {
            _ = terminate.recv() => tracing::info!("SIGTERM: shutting down (a second SIGTERM or SIGINT exits at once)"),
            _ = interrupt.recv() => tracing::info!("SIGINT: shutting down (a second SIGTERM or SIGINT exits at once)"),
        }
        shutdown.cancel();
        tokio::select! {
            _ = terminate.recv() => {}
            _ = interrupt.recv() => {}
        }
        tracing::warn!("second signal: exiting now, without finishing the shutdown");
        std::process::exit(130);
    });
    Ok(())
}

/// Sets the nice value (-20..=19) of the calling thread; threads it starts afterwards inherit
/// it. Called before a daemon starts any thread, it applies to the whole process. Raising the
/// value needs no privilege; lowering it needs CAP_SYS_NICE.
pub fn set_thread_nice(nice: i32) -> std::io::Result<()> {
    // On Linux, PRIO_PROCESS with no pid names the calling thread, not the whole process.
    rustix::process::setpriority_process(None, nice).map_err(std::io::Error::from)
}

/// The name and nice value of every thread of process `pid`, from /proc.
pub fn thread_nice_values(pid: u32) -> std::io::Result<Vec<(String, i32)>> {
    let mut threads = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let task = task?.path();
        let name = std::fs::read_to_string(task.join("comm"))?;
        let stat = std::fs::read_to_string(task.join("stat"))?;
        // nice is field 19 of stat: the 17th after the parenthesised name.
        let nice = stat
            .rfind(')')
            .and_then(|end| stat[end + 1..].split_whitespace().nth(16))
            .and_then(|field| field.parse().ok())
            .ok_or_else(|| std::io::Error::other(format!("unexpected {}", task.display())))?;
        threads.push((name.trim().to_owned(), nice));
    }
    Ok(threads)
}

/// Decides when a repeated event is logged: the first time, then at most once per `interval`,
/// with how many happened since the last line.
pub struct LogLimiter {
    interval: std::time::Duration,
    state: std::sync::Mutex<(Option<std::time::Instant>, u64)>,
}

impl LogLimiter {
    pub const fn new(interval: std::time::Duration) -> LogLimiter {
        LogLimiter {
            interval,
            state: std::sync::Mutex::new((None, 0)),
        }
    }

    /// Counts one event; `Some(events since the last log line)` when this one is to be logged.
    pub fn hit(&self) -> Option<u64> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.1 += 1;
        let now = std::time::Instant::now();
        match state.0 {
            Some(at) if now.duration_since(at) < self.interval => None,
            _ => {
                state.0 = Some(now);
                Some(std::mem::take(&mut state.1))
            }
        }
    }
}

/// Values of mimalloc v3's `mi_option_e` (the version libmimalloc-sys builds; it names
/// neither). A test checks them against their defaults.
const MI_OPTION_ARENA_EAGER_COMMIT: libmimalloc_sys::mi_option_t = 4;
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Makes mimalloc (both daemons' allocator) keep resident only what is in use. By default it
/// commits its arenas eagerly — an idle IPC connection cost persist ~1 MiB of RSS — and purges
/// freed pages only after a delay checked when the thread owning them allocates again, so pages
/// freed by threads that then idle or exit stay resident. `purge_at_once` also sets that delay
/// to 0 (core, whose jobs' output threads come and go). `MIMALLOC_ARENA_EAGER_COMMIT` and
/// `MIMALLOC_PURGE_DELAY` in the environment still win.
///
/// It must run before the first allocation, which creates mimalloc's first arena: each daemon
/// calls it from a function in its `.init_array` ([`tune_allocator_at_load!`]). Nothing here
/// allocates.
#[allow(unsafe_code)]
pub fn tune_allocator(purge_at_once: bool) {
    let set_unless_in_environment = |variable: &std::ffi::CStr, option| {
        // SAFETY: getenv reads the environment before any thread exists; mi_option_set only
        // stores a value in mimalloc's option table (unknown options are ignored).
        unsafe {
            if libc::getenv(variable.as_ptr()).is_null() {
                libmimalloc_sys::mi_option_set(option, 0);
            }
        }
    };
    set_unless_in_environment(c"MIMALLOC_ARENA_EAGER_COMMIT", MI_OPTION_ARENA_EAGER_COMMIT);
    if purge_at_once {
        set_unless_in_environment(c"MIMALLOC_PURGE_DELAY", MI_OPTION_PURGE_DELAY);
    }
}

/// Returns the memory mimalloc holds free to the system now, rather than when this thread
/// next allocates (a thread about to block for long, after a burst).
#[allow(unsafe_code)]
pub fn release_free_memory() {
    // SAFETY: mi_collect only frees what mimalloc itself holds unused.
    unsafe { libmimalloc_sys::mi_collect(true) };
}

/// Runs [`tune_allocator`]`($purge_at_once)` when the binary is loaded, before `main` and
/// before anything allocates. Use once, in a daemon's `main.rs`.
#[macro_export]
macro_rules! tune_allocator_at_load {
    ($purge_at_once:expr) => {
        #[allow(unsafe_code)]
        #[used]
        #[unsafe(link_section = ".init_array")]
        static TUNE_ALLOCATOR_AT_LOAD: extern "C" fn() = {
            extern "C" fn tune() {
                $crate::tune_allocator($purge_at_once);
            }
            tune
        };
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[allow(unsafe_code)]
    fn the_mimalloc_option_numbers_are_those_of_the_bundled_version() {
        // SAFETY: reads mimalloc's option table.
        let (eager, delay) = unsafe {
            (
                libmimalloc_sys::mi_option_get(MI_OPTION_ARENA_EAGER_COMMIT),
                libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY),
            )
        };
        if std::env::var_os("MIMALLOC_ARENA_EAGER_COMMIT").is_none() {
            assert_eq!(eager, 2, "arena_eager_commit defaults to 2 (on overcommit)");
        }
        if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
            assert_eq!(
                delay, 1000,
                "purge_delay defaults to 1000 ms in mimalloc v3"
            );
        }
    }
}
