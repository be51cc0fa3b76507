//! Job supervisor benchmark (needs root; uses the joblet-core binary beside this one): what a
//! running job's supervisor costs in memory, and how long joblet-core takes to re-attach N
//! running jobs after it was killed.
//!
//! joblet-core starts on a temp dir (persist disabled) and N jobs start that each print a burst
//! of lines and then sleep. Reported, each beside a baseline from the same run:
//! - per supervisor (`joblet-core supervise`, once its job's burst is over): RSS, PSS (shared
//!   pages divided among the processes that map them) and private memory, against the same of
//!   the job's own `sleep` process;
//! - core's start after a kill -9 with N running jobs (its ready line comes once every job is
//!   re-attached), against core's first start with no job, and that all N are RUNNING after it.

use std::time::{Duration, Instant};

use clap::Parser;
use joblet_benches::{Table, core_config, proc_mib, processes, rss_mib, sibling, start};
use joblet_proto::joblet::job_service_client::JobServiceClient;
use joblet_proto::joblet::{EmptyRequest, RunJobRequest};

#[derive(Parser)]
struct Args {
    /// Running jobs.
    #[arg(long, default_value_t = 100)]
    jobs: usize,
    /// Lines each job prints before it sleeps.
    #[arg(long, default_value_t = 100_000)]
    lines: u64,
}

/// Mean RSS, PSS and private memory (MiB) of `pids`.
fn memory(pids: &[u32]) -> anyhow::Result<[f64; 3]> {
    let mut sums = [0.0; 3];
    for &pid in pids {
        sums[0] += rss_mib(pid)?;
        sums[1] += proc_mib(pid, "smaps_rollup", "Pss")?;
        sums[2] += proc_mib(pid, "smaps_rollup", "Private_Clean")?
            + proc_mib(pid, "smaps_rollup", "Private_Dirty")?;
    }
    Ok(sums.map(|sum| sum / pids.len().max(1) as f64))
}

async fn running(
    client: &mut JobServiceClient<tonic::transport::Channel>,
) -> anyhow::Result<usize> {
    let jobs = client.list_jobs(EmptyRequest {}).await?.into_inner().jobs;
    Ok(jobs.iter().filter(|j| j.status == "RUNNING").count())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let n = args.jobs;
    let dir = tempfile::tempdir()?;
    // `stop`: the final shutdown ends the jobs (the kill -9 below leaves them running).
    let config = core_config(
        dir.path(),
        "joblet-bench-reattach",
        "  on_core_shutdown: stop\npersist:\n  enabled: false\n",
    )?;
    let core_binary = sibling("joblet-core")?;
    let started = Instant::now();
    let core = start(&core_binary, &config).await?;
    let empty_start = started.elapsed().as_secs_f64() * 1000.0;
    let mut client = JobServiceClient::connect(format!("http://{}", core.grpc)).await?;
    // A marker no other process on the host has in its command line.
    let marker = format!("{}.25", 600 + std::process::id() % 1000);
    for _ in 0..n {
        client
            .run_job(RunJobRequest {
                command: "/bin/sh".into(),
                args: vec![
                    "-c".into(),
                    format!("seq 1 {}; exec sleep {marker}", args.lines),
                ],
                ..Default::default()
            })
            .await?;
    }
    let deadline = Instant::now() + Duration::from_secs(300);
    while processes("sleep", &marker).len() < n {
        anyhow::ensure!(Instant::now() < deadline, "the jobs did not all start");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Each supervisor lets its buffers go a second after its job's burst.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let supervisors: Vec<u32> = processes("joblet-supervis", "supervise");
    anyhow::ensure!(
        supervisors.len() >= n,
        "{} supervisors for {n} jobs",
        supervisors.len()
    );
    let supervisor = memory(&supervisors)?;
    let job = memory(&processes("sleep", &marker))?;

    let mut core = core;
    core.child.kill().await?;
    let started = Instant::now();
    let core = start(&core_binary, &config).await?;
    let reattach = started.elapsed().as_secs_f64() * 1000.0;
    let mut client = JobServiceClient::connect(format!("http://{}", core.grpc)).await?;
    let reattached = running(&mut client).await?;
    anyhow::ensure!(
        reattached == n,
        "{reattached} of {n} jobs RUNNING after the restart"
    );
    core.terminate().await?;
    anyhow::ensure!(
        processes("sleep", &marker).is_empty(),
        "jobs left running after the final shutdown"
    );

    let mut table = Table::default();
    let names = ["RSS", "PSS", "private"];
    for (i, name) in names.iter().enumerate() {
        table.add(
            format!("supervisor {name} per job (job's sleep)"),
            supervisor[i],
            Some(job[i]),
            "MiB",
            if *name == "RSS" { "" } else { "<= 2" },
        );
    }
    table.add(
        format!("core start, {n} running jobs re-attached (no job)"),
        reattach,
        Some(empty_start),
        "ms",
        "",
    );
    print!(
        "{}",
        table.render(&format!(
            "{n} running jobs, each printed {} lines",
            args.lines
        ))
    );
    println!("all {n} jobs RUNNING after core was killed and started again");
    Ok(())
}
