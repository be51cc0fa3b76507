//! Command-line definitions and dispatch.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::{Failure, config, jobs, logs, metrics};

#[derive(Parser)]
#[command(
    name = "rnx",
    version,
    about = "Run and watch jobs on a joblet node",
    after_help = "Examples:\n  rnx job run -- echo hello\n  rnx job run --max-memory 512 --follow -- python3 train.py\n  rnx job list\n  rnx job log -f 3f2a\n  rnx job metrics --chart 3f2a\n\nExit codes: 0 ok; job run --follow: the job's exit code; 1 refused by the server;\n2 usage or configuration error; 3 job log: lines were lost (shown as gaps);\n69 daemon unreachable."
)]
pub struct Cli {
    /// rnx-config.yml to use (default: $RNX_CONFIG, ./rnx-config.yml, ~/.rnx/rnx-config.yml).
    #[arg(long, global = true, help_heading = "Global options")]
    pub config: Option<PathBuf>,
    /// Node of the config file to talk to.
    #[arg(
        long,
        global = true,
        default_value = "default",
        help_heading = "Global options"
    )]
    pub node: String,
    /// Print JSON instead of tables.
    #[arg(long, global = true, help_heading = "Global options")]
    pub json: bool,
    /// Show times in UTC (default: local time, TZ; JSON is always UTC).
    #[arg(long, global = true, help_heading = "Global options")]
    pub utc: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Manage jobs.
    #[command(subcommand)]
    Job(Box<JobCommand>),
    /// Health of the node: joblet-core and joblet-persist.
    #[command(after_help = "Example:\n  rnx status")]
    Status,
    /// Running jobs with their CPU, memory, IO rates and pids, refreshed (like docker stats).
    #[command(
        after_help = "Examples:\n  rnx top\n  rnx top --sort memory --interval 5s\n  rnx top --once --json"
    )]
    Top(TopArgs),
    /// Certificates for mutual TLS.
    #[command(subcommand)]
    Certs(CertsCommand),
    /// The client configuration.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Print a shell completion script for rnx.
    #[command(
        after_help = "Examples:\n  rnx completions bash > /etc/bash_completion.d/rnx\n  rnx completions zsh > \"${fpath[1]}/_rnx\"\n  rnx completions fish > ~/.config/fish/completions/rnx.fish"
    )]
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
}

#[derive(Args)]
pub struct TopArgs {
    /// Time between refreshes.
    #[arg(long, default_value = "2s", value_name = "DURATION")]
    pub interval: String,
    /// Order of the rows (largest first; id: alphabetical).
    #[arg(long, value_enum, default_value_t = TopSort::Cpu)]
    pub sort: TopSort,
    /// Print once (when every running job has a sample) and exit.
    #[arg(long)]
    pub once: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum TopSort {
    Cpu,
    Memory,
    Io,
    Pids,
    Id,
}

#[derive(Subcommand)]
pub enum ConfigCommand {
    /// Which rnx-config.yml is used and why, its nodes, whose certificate and until when.
    #[command(
        after_help = "Example:\n  rnx config show\n  RNX_CONFIG=/etc/joblet/certs/viewer-rnx-config.yml rnx config show"
    )]
    Show,
}

#[derive(Subcommand)]
pub enum CertsCommand {
    /// Create a CA, a server certificate, admin/viewer/core client certificates and rnx configs.
    #[command(
        after_help = "Example:\n  rnx certs init --out /etc/joblet/certs --host joblet.example.com\n\nWrites ca.pem, server.pem, admin.pem, viewer.pem, core-client.pem (each with -key.pem),\nrnx-config.yml (admin) and viewer-rnx-config.yml. The server certificate covers the\ngiven hosts plus localhost and 127.0.0.1."
    )]
    Init(crate::certs::Options),
}

#[derive(Subcommand)]
pub enum JobCommand {
    /// Run a command as a job; prints its id (or, with --follow, its output).
    #[command(
        after_help = "Examples:\n  rnx job run -- echo hello\n  rnx job run --max-cpu 50 --max-memory 256 --env MODE=fast -- ./work.sh\n  rnx job run --schedule 30s -- date\n  rnx job run --upload data.csv --follow -- wc -l data.csv"
    )]
    Run(RunArgs),
    /// List jobs.
    #[command(
        after_help = "Jobs joblet-core no longer holds (finished longer than its jobs.keep_finished ago) are\nlisted by --all from joblet-persist's history, marked \"history\".\nTimes (T) are RFC 3339 or a duration back from now (10m); --since is inclusive, --until\nexclusive; both apply to when a job was submitted.\n\nExamples:\n  rnx job list\n  rnx job list --status RUNNING --json\n  rnx job list --all --since 1d --status FAILED --limit 20"
    )]
    List(ListArgs),
    /// Show one job.
    #[command(after_help = "Example:\n  rnx job status 3f2a")]
    Status {
        /// Job id or a unique prefix of it.
        id: String,
    },
    /// Stop a running job: SIGTERM, then SIGKILL after the grace period.
    #[command(after_help = "Example:\n  rnx job stop 3f2a --grace 30s")]
    Stop {
        id: String,
        /// Time between SIGTERM and SIGKILL (default: the node's).
        #[arg(long)]
        grace: Option<String>,
    },
    /// Cancel a scheduled job.
    #[command(after_help = "Example:\n  rnx job cancel 3f2a")]
    Cancel { id: String },
    /// Delete an ended job and its history.
    #[command(after_help = "Example:\n  rnx job delete 3f2a")]
    Delete { id: String },
    /// Delete every ended job (running and scheduled ones are kept).
    #[command(name = "delete-all", after_help = "Example:\n  rnx job delete-all")]
    DeleteAll,
    /// Show a job's output: history from joblet-persist, then live from joblet-core.
    #[command(
        after_help = "Times (T) are RFC 3339 (nanoseconds allowed) or a duration back from now (10m).\n--since is inclusive, --until exclusive.\n\nOutput is the job's bytes exactly (with one stream: what it wrote). --json gives one object\nper record: stream, timestamp (RFC 3339, UTC), timestamp_ns, sequence, and content (text)\nor content_base64 (bytes that are not UTF-8); \"partial\": true when no newline followed it.\nLines lost before persist stored them are said on stderr, in their place (exit 3).\n\nExamples:\n  rnx job log 3f2a\n  rnx job log -f 3f2a\n  rnx job log --since 10m --stderr --grep ERROR 3f2a\n  rnx job log --tail 100 --timestamps 3f2a"
    )]
    Log(LogArgs),
    /// Show a job's resource samples (CPU, memory, IO, pids).
    #[command(
        after_help = "Examples:\n  rnx job metrics 3f2a\n  rnx job metrics --chart 3f2a\n  rnx job metrics -f --json 3f2a"
    )]
    Metrics(MetricsArgs),
}

#[derive(Args)]
pub struct RunArgs {
    /// CPU limit in percent of one core (100 = one core).
    #[arg(long)]
    pub max_cpu: Option<i32>,
    /// Memory limit in MiB.
    #[arg(long)]
    pub max_memory: Option<i32>,
    /// IO limit in bytes per second.
    #[arg(long)]
    pub max_iobps: Option<i32>,
    /// CPUs the job may use, e.g. 0-1 or 0,2.
    #[arg(long)]
    pub cpu_cores: Option<String>,
    /// Environment variable K=V (repeatable).
    #[arg(long = "env", value_name = "K=V")]
    pub env: Vec<String>,
    /// Secret environment variable K=V: masked in every answer and log (repeatable).
    #[arg(long = "secret-env", value_name = "K=V")]
    pub secret_env: Vec<String>,
    /// File or directory copied into the job's work dir (repeatable).
    #[arg(long = "upload", value_name = "PATH")]
    pub upload: Vec<PathBuf>,
    /// Work directory on the node (default: a fresh one per job).
    #[arg(long)]
    pub workdir: Option<String>,
    /// Start at WHEN: RFC 3339 or a duration from now (30s, 1h30m).
    #[arg(long, value_name = "WHEN")]
    pub schedule: Option<String>,
    /// host (default) or none (loopback only).
    #[arg(long)]
    pub network: Option<String>,
    /// Stop the job after this long (e.g. 10m).
    #[arg(long)]
    pub timeout: Option<String>,
    /// Stream the output and exit with the job's exit code. Ctrl-C stops the job (a second
    /// Ctrl-C detaches, leaving it running).
    #[arg(long, short)]
    pub follow: bool,
    /// With --follow: Ctrl-C detaches at once and leaves the job running.
    #[arg(long, requires = "follow")]
    pub detach_on_interrupt: bool,
    /// The command and its arguments.
    #[arg(required = true, last = true, value_name = "COMMAND")]
    pub command: Vec<String>,
}

#[derive(Args)]
pub struct ListArgs {
    /// Only jobs in this state (RUNNING, COMPLETED, FAILED, ...).
    #[arg(long)]
    pub status: Option<String>,
    /// Also jobs from joblet-persist's history, newest first.
    #[arg(long)]
    pub all: bool,
    /// Only jobs submitted at or after T.
    #[arg(long, value_name = "T")]
    pub since: Option<String>,
    /// Only jobs submitted before T.
    #[arg(long, value_name = "T")]
    pub until: Option<String>,
    /// At most N jobs, the newest.
    #[arg(long, value_name = "N")]
    pub limit: Option<u32>,
    /// Full job ids (the table shows their first 8 characters, enough for every command).
    #[arg(long)]
    pub no_trunc: bool,
}

#[derive(Args)]
pub struct LogArgs {
    /// Job id or a unique prefix of it.
    pub id: String,
    /// Keep following new output until the job ends.
    #[arg(long, short)]
    pub follow: bool,
    /// Only lines at or after T.
    #[arg(long, value_name = "T")]
    pub since: Option<String>,
    /// Only lines before T.
    #[arg(long, value_name = "T")]
    pub until: Option<String>,
    /// Only the last N lines (then follow, with -f).
    #[arg(long, value_name = "N")]
    pub tail: Option<u32>,
    /// Only stdout.
    #[arg(long, conflicts_with = "stderr")]
    pub stdout: bool,
    /// Only stderr.
    #[arg(long)]
    pub stderr: bool,
    /// Only lines containing TEXT.
    #[arg(long, value_name = "TEXT")]
    pub grep: Option<String>,
    /// Prefix each line with its RFC 3339 timestamp.
    #[arg(long)]
    pub timestamps: bool,
    /// Mark each line with its stream (`out|`, `err|`); the default when both streams go to a
    /// terminal.
    #[arg(long, conflicts_with = "no_prefix")]
    pub prefix: bool,
    /// No stream mark, even on a terminal.
    #[arg(long)]
    pub no_prefix: bool,
}

#[derive(Args)]
pub struct MetricsArgs {
    /// Job id or a unique prefix of it.
    pub id: String,
    /// Keep following new samples until the job ends.
    #[arg(long, short)]
    pub follow: bool,
    /// Only samples at or after T (RFC 3339, or a duration back from now: 10m).
    #[arg(long, value_name = "T")]
    pub since: Option<String>,
    /// Only samples before T.
    #[arg(long, value_name = "T")]
    pub until: Option<String>,
    /// Draw CPU and memory over time instead of a table.
    #[arg(long)]
    pub chart: bool,
}

pub async fn dispatch(cli: Cli) -> Result<(), Failure> {
    if let Command::Certs(CertsCommand::Init(options)) = cli.command {
        return crate::certs::init(options);
    }
    if let Command::Config(ConfigCommand::Show) = cli.command {
        let shown = config::show(cli.config.as_deref()).map_err(Failure::Usage)?;
        print!("{shown}");
        return Ok(());
    }
    if let Command::Completions { shell } = cli.command {
        use clap::CommandFactory;
        clap_complete::generate(shell, &mut Cli::command(), "rnx", &mut std::io::stdout());
        return Ok(());
    }
    let node = config::load(cli.config.as_deref(), &cli.node).map_err(Failure::Usage)?;
    let json = cli.json;
    crate::timespec::show_utc(cli.utc);
    match cli.command {
        Command::Status => jobs::node_status(&node, json).await,
        Command::Top(args) => crate::top::show(&node, args, json).await,
        Command::Certs(_) | Command::Config(_) | Command::Completions { .. } => Ok(()),
        Command::Job(command) => match *command {
            JobCommand::Run(args) => jobs::run(&node, args, json).await,
            JobCommand::List(args) => jobs::list(&node, args, json).await,
            JobCommand::Status { id } => jobs::status(&node, &id, json).await,
            JobCommand::Stop { id, grace } => jobs::stop(&node, &id, grace, json).await,
            JobCommand::Cancel { id } => jobs::cancel(&node, &id, json).await,
            JobCommand::Delete { id } => jobs::delete(&node, &id, json).await,
            JobCommand::DeleteAll => jobs::delete_all(&node, json).await,
            JobCommand::Log(args) => logs::show(&node, args, json).await,
            JobCommand::Metrics(args) => metrics::show(&node, args, json).await,
        },
    }
}
