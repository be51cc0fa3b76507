//! Plumbing both daemons share: logging to stderr and shutdown on SIGTERM/SIGINT.

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

/// Cancels `shutdown` on the first SIGTERM or SIGINT. Call inside a tokio runtime.
pub fn cancel_on_signals(shutdown: CancellationToken) -> std::io::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    tokio::spawn(async move {
        tokio::select! {
            _ = terminate.recv() => tracing::info!("SIGTERM: shutting down"),
            _ = interrupt.recv() => tracing::info!("SIGINT: shutting down"),
        }
        shutdown.cancel();
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
