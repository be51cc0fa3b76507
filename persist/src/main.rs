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
    #[arg(long, short, env = "JOBLET_PERSIST_CONFIG", global = true)]
    config: Option<PathBuf>,
    /// Check the configuration and what it points at (certificates, key permissions,
    /// directories) as start would, print one line per problem and exit (1 if any).
    #[arg(long)]
    check_config: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

/// Maintenance, with the daemon stopped (RocksDB admits one process per data directory).
/// Nothing is lost meanwhile: core keeps every line until persist has acknowledged it.
#[derive(clap::Subcommand)]
enum Command {
    /// Write a consistent copy of data_dir (a RocksDB checkpoint) to a new directory.
    #[command(
        after_help = "Example:\n  systemctl stop joblet-persist\n  runuser -u joblet -- joblet-persist backup --to /var/backups/joblet-$(date +%F)\n  systemctl start joblet-persist"
    )]
    Backup {
        #[arg(long, value_name = "DIR")]
        to: PathBuf,
    },
    /// Replace data_dir with a backup; the replaced data is kept beside it, renamed.
    #[command(
        after_help = "Example:\n  systemctl stop joblet-persist\n  joblet-persist restore --from /var/backups/joblet-2026-12-01\n  systemctl start joblet-persist"
    )]
    Restore {
        #[arg(long, value_name = "DIR")]
        from: PathBuf,
    },
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
        return check(&config).finish("joblet-persist");
    }
    if let Some(command) = args.command {
        return maintain(&config, command);
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

fn maintain(config: &Config, command: Command) -> ExitCode {
    let done = match command {
        Command::Backup { to } => joblet_persist::backup::backup(config, &to).map(|bytes| {
            format!(
                "backed up {} to {} ({})",
                config.data_dir.display(),
                to.display(),
                bytesize::ByteSize::b(bytes)
            )
        }),
        Command::Restore { from } => {
            joblet_persist::backup::restore(config, &from).map(|(jobs, replaced)| {
                let kept = replaced.map_or(String::new(), |aside| {
                    format!("; the replaced data is in {}", aside.display())
                });
                format!(
                    "restored {jobs} jobs from {} into {}{kept}",
                    from.display(),
                    config.data_dir.display()
                )
            })
        }
    };
    match done {
        Ok(text) => {
            println!("{text}");
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("joblet-persist: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// What start would trip over, beyond the syntax and values [`Config::load`] checked.
fn check(config: &Config) -> joblet_daemon::check::Report {
    use joblet_daemon::check::{self, End};
    let mut report = check::Report::default();
    if let (Some(files), false) = (&config.grpc.tls, config.grpc.insecure) {
        check::tls("grpc.tls", files, End::Server, &mut report);
    }
    check::socket_dir("ipc.socket", &config.ipc.socket, true, &mut report);
    check::state_dir("data_dir", &config.data_dir, &mut report);
    report
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
