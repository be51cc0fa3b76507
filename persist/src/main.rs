//! joblet-persist daemon: flags, config, tracing, the Prometheus exporter, listeners; then
//! [`joblet_persist::Persist`] does the work.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use joblet_persist::Persist;
use joblet_persist::config::Config;
use tokio_util::sync::CancellationToken;

/// Lines are allocated on one thread and freed on another (scans, ingest, replication); glibc's
/// malloc serialises that on its arena locks, which showed in profiles.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const DEFAULT_CONFIG: &str = "/etc/joblet/persist-config.yml";

/// Stores joblet job logs and metrics and answers history queries (ADR-0001).
#[derive(Parser)]
#[command(version)]
struct Args {
    /// Configuration file (YAML); see deploy/config/persist-config.yml.
    #[arg(long, short, env = "JOBLET_PERSIST_CONFIG")]
    config: Option<PathBuf>,
    /// Validate the configuration and exit.
    #[arg(long)]
    check_config: bool,
}

// No eagerly committed arena memory (an idle IPC connection cost ~1 MiB); freed memory is
// purged on mimalloc's own schedule (ingest allocates and frees constantly).
joblet_daemon::tune_allocator_at_load!(false);

fn main() -> ExitCode {
    let args = Args::parse();
    let (config, config_path) = match load_config(args.config) {
        Ok(loaded) => loaded,
        Err(error) => {
            eprintln!("joblet-persist: {error:#}");
            return ExitCode::from(2);
        }
    };
    if args.check_config {
        println!("configuration is valid");
        return ExitCode::SUCCESS;
    }
    joblet_daemon::init_tracing();
    // Before any thread starts: every thread of the daemon (RocksDB's too) inherits it.
    match joblet_daemon::set_thread_nice(config.nice) {
        Ok(()) => tracing::info!(nice = config.nice, "CPU priority set"),
        Err(error) => tracing::warn!(nice = config.nice, %error, "cannot set the nice value"),
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("joblet-persist: start runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(config, config_path)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("{error:#}");
            eprintln!("joblet-persist: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// The configuration and the file it came from (none: the built-in defaults).
fn load_config(path: Option<PathBuf>) -> anyhow::Result<(Config, Option<PathBuf>)> {
    let path = path.or_else(|| {
        let default = PathBuf::from(DEFAULT_CONFIG);
        default.exists().then_some(default)
    });
    match path {
        Some(path) => Ok((Config::load(&path)?, Some(path))),
        None => Ok((Config::default(), None)),
    }
}

async fn run(config: Config, config_path: Option<PathBuf>) -> anyhow::Result<()> {
    let metrics_address = joblet_daemon::exporter::serve(config.metrics.listen).await?;
    joblet_persist::metrics::describe();
    let grpc = tokio::net::TcpListener::bind(config.grpc.listen)
        .await
        .with_context(|| format!("grpc.listen: bind {}", config.grpc.listen))?;
    let grpc_address = grpc.local_addr()?;
    let socket = config.ipc.socket.clone();
    let mut persist = Persist::open(config).await?;
    if let Some(path) = config_path {
        persist = persist.with_config_path(path);
    }

    let shutdown = CancellationToken::new();
    joblet_daemon::cancel_on_signals(shutdown.clone()).context("install signal handlers")?;
    tracing::info!(grpc = %grpc_address, ipc = %socket.display(), "joblet-persist ready");
    // One line on stdout for scripts and tests that start the daemon with port 0.
    println!(
        "joblet-persist ready grpc={grpc_address} ipc={} metrics={}",
        socket.display(),
        metrics_address.map_or("off".to_owned(), |a| a.to_string())
    );
    persist.serve(grpc, shutdown).await
}
