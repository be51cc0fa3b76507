//! joblet-core daemon: flags, config, tracing, the Prometheus exporter, the listener; then
//! [`joblet_core::Core`] does the work.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use joblet_core::Core;
use joblet_core::config::Config;
use tokio_util::sync::CancellationToken;

/// Lines are allocated on one thread and freed on another (scans, ingest, replication); glibc's
/// malloc serialises that on its arena locks, which showed in profiles.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const DEFAULT_CONFIG: &str = "/etc/joblet/joblet-config.yml";

/// Runs Linux commands as jobs under cgroup limits and namespaces (ADR-0001 command side).
#[derive(Parser)]
#[command(version)]
struct Args {
    /// Configuration file (YAML); see deploy/config/joblet-config.yml.
    #[arg(long, short, env = "JOBLET_CONFIG")]
    config: Option<PathBuf>,
    /// Validate the configuration and exit.
    #[arg(long)]
    check_config: bool,
}

/// Values of mimalloc v3's `mi_option_e` (the version libmimalloc-sys builds; it names
/// neither). The test below checks them against their defaults.
const MI_OPTION_ARENA_EAGER_COMMIT: libmimalloc_sys::mi_option_t = 4;
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Makes mimalloc give freed memory back to the system as it is freed. By default it commits
/// its arenas eagerly and purges freed pages only after a delay that is checked when the thread
/// owning them allocates again: every job's short-lived output threads left their freed pages
/// resident, and core's RSS grew with every job that ever ran (2,000 `true` jobs: 20 → 330 MiB,
/// though the pages held nothing; with these options 28 MiB). `MIMALLOC_PURGE_DELAY` and
/// `MIMALLOC_ARENA_EAGER_COMMIT` in the environment still win.
#[allow(unsafe_code)]
fn return_freed_memory_promptly() {
    for (variable, option) in [
        ("MIMALLOC_PURGE_DELAY", MI_OPTION_PURGE_DELAY),
        ("MIMALLOC_ARENA_EAGER_COMMIT", MI_OPTION_ARENA_EAGER_COMMIT),
    ] {
        if std::env::var_os(variable).is_none() {
            // SAFETY: mi_option_set only stores a value in mimalloc's option table; any
            // option number is accepted (unknown ones are ignored).
            unsafe { libmimalloc_sys::mi_option_set(option, 0) };
        }
    }
}

fn main() -> ExitCode {
    return_freed_memory_promptly();
    let args = Args::parse();
    let config = match args.config {
        Some(path) => Config::load(&path),
        None if Path::new(DEFAULT_CONFIG).exists() => Config::load(Path::new(DEFAULT_CONFIG)),
        None => Ok(Config::default()),
    };
    let config = match config {
        Ok(config) => config,
        Err(error) => {
            eprintln!("joblet-core: {error:#}");
            return ExitCode::from(2);
        }
    };
    if args.check_config {
        println!("configuration is valid");
        return ExitCode::SUCCESS;
    }
    joblet_ipc::daemon::init_tracing();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("joblet-core: start runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("{error:#}");
            eprintln!("joblet-core: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(config: Config) -> anyhow::Result<()> {
    let metrics_address = joblet_ipc::metrics::serve_exporter(config.metrics.listen).await?;
    joblet_core::metrics::describe();
    let grpc = tokio::net::TcpListener::bind(config.grpc.listen)
        .await
        .with_context(|| format!("grpc.listen: bind {}", config.grpc.listen))?;
    let grpc_address = grpc.local_addr()?;
    let shutdown = CancellationToken::new();
    let core = Core::open(config, shutdown.clone()).await?;
    joblet_ipc::daemon::cancel_on_signals(shutdown.clone()).context("install signal handlers")?;
    tracing::info!(grpc = %grpc_address, "joblet-core ready");
    println!(
        "joblet-core ready grpc={grpc_address} metrics={}",
        metrics_address.map_or("off".to_owned(), |a| a.to_string())
    );
    core.serve(grpc, shutdown).await
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
