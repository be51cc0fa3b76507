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
    /// Check the configuration and what it points at (certificates, key permissions,
    /// directories, cgroup controllers) as start would, print one line per problem and exit
    /// (1 if any).
    #[arg(long)]
    check_config: bool,
    /// With --check-config: joblet-persist's configuration, to check that both agree on the
    /// socket and the frame size.
    #[arg(long, requires = "check_config", value_name = "PATH")]
    persist_config: Option<PathBuf>,
}

// Every job's short-lived output threads free their pages: give them back at once, or core's
// RSS grows with every job that ever ran (2,000 `true` jobs: 20 → 330 MiB).
joblet_daemon::tune_allocator_at_load!(true);

fn main() -> ExitCode {
    if std::env::args_os()
        .nth(1)
        .is_some_and(|mode| mode == joblet_core::supervisor::MODE)
    {
        return joblet_core::supervisor::main();
    }
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
        return joblet_core::check::check(&config, args.persist_config.as_deref())
            .finish("joblet-core");
    }
    joblet_daemon::init_tracing();
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
    let metrics_address = joblet_daemon::exporter::serve(config.metrics.listen).await?;
    joblet_core::metrics::describe();
    let grpc = tokio::net::TcpListener::bind(config.grpc.listen)
        .await
        .with_context(|| format!("grpc.listen: bind {}", config.grpc.listen))?;
    let grpc_address = grpc.local_addr()?;
    let shutdown = CancellationToken::new();
    let core = Core::open(config, shutdown.clone()).await?;
    joblet_daemon::cancel_on_signals(shutdown.clone()).context("install signal handlers")?;
    tracing::info!(grpc = %grpc_address, "joblet-core ready");
    println!(
        "joblet-core ready grpc={grpc_address} metrics={}",
        metrics_address.map_or("off".to_owned(), |a| a.to_string())
    );
    core.serve(grpc, shutdown).await
}
