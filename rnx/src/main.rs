//! rnx: the joblet command-line client.
//!
//! Exit codes are decided in one place ([`Failure::exit_code`]): 0 success; for `job run
//! --follow` the job's own exit code (128+N for a signal); 1 a request the server refused;
//! 2 bad usage or configuration; 69 a daemon that cannot be reached.

mod certs;
mod cli;
mod config;
mod connect;
mod hybrid;
mod jobs;
mod logs;
mod metrics;
mod output;
mod timespec;
mod top;

use std::process::ExitCode;

use clap::Parser;

/// Why rnx stops early.
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    #[error("{0}")]
    Usage(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("{}", describe_status(.0))]
    Remote(tonic::Status),
    /// The command succeeded and wants this exit code (job run --follow).
    #[error("exit {0}")]
    Exit(u8),
}

fn describe_status(status: &tonic::Status) -> String {
    let code = match status.code() {
        tonic::Code::NotFound => "not found",
        tonic::Code::InvalidArgument => "invalid argument",
        tonic::Code::FailedPrecondition => "refused",
        tonic::Code::PermissionDenied => "permission denied",
        tonic::Code::Unauthenticated => "unauthenticated",
        tonic::Code::Unavailable => "unavailable",
        _ => "error",
    };
    format!("{code}: {}", status.message())
}

/// What a plaintext client sees from a server that speaks TLS only: the server closes the
/// connection during the HTTP/2 handshake, reported as one or the other depending on timing.
/// Both also stand for other failures (a daemon dying mid-stream), so the server is asked
/// ([`connect::plaintext_server_speaks_tls`]) before the error is explained as TLS.
const PLAINTEXT_TO_TLS: [&str; 2] = ["h2 protocol error", "transport error"];

fn requires_tls(what: &str) -> Failure {
    Failure::Usage(format!(
        "the server closed the connection during the HTTP/2 handshake ({what}): it requires \
         TLS. Give this node cert, key and ca in rnx-config.yml (`rnx certs init` writes a \
         config with them; see deploy/README.md, Certificates)"
    ))
}

impl From<tonic::Status> for Failure {
    fn from(status: tonic::Status) -> Self {
        if PLAINTEXT_TO_TLS
            .iter()
            .any(|symptom| status.message().starts_with(symptom))
            && connect::plaintext_server_speaks_tls()
        {
            return requires_tls(status.message());
        }
        if status.code() == tonic::Code::Unavailable {
            Failure::Unavailable(describe_status(&status))
        } else {
            Failure::Remote(status)
        }
    }
}

impl Failure {
    fn exit_code(&self) -> u8 {
        match self {
            Failure::Usage(_) => 2,
            Failure::Unavailable(_) => 69,
            Failure::Remote(_) => 1,
            Failure::Exit(code) => *code,
        }
    }
}

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    // One thread: a CLI's work is waiting on the network and the terminal. Its tasks (history
    // and live streams) run concurrently without cross-thread wake-ups, which on a busy host
    // kept the first line of a query waiting for a CPU.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("rnx: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(cli::dispatch(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Exit(code)) => ExitCode::from(code),
        Err(failure) => {
            if !output::is_broken_pipe(&failure) {
                eprintln!("rnx: {failure}");
            }
            ExitCode::from(if output::is_broken_pipe(&failure) {
                0
            } else {
                failure.exit_code()
            })
        }
    }
}
