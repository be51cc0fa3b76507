//! Core catalogue benchmark (needs root; uses the binaries beside this one): what N finished
//! jobs cost joblet-core, and what recording each job durably costs `RunJob`.
//!
//! joblet-persist and joblet-core start on a temp dir, then N short jobs (`/bin/true`) run one
//! after another through `RunJob`, each submitted once the one before ended. Reported, each beside a baseline from the same run:
//! - `RunJob` latency p50/p99 (client-side, the job recorded durably in core's journal before
//!   the answer) against `GetJobStatus` round trips on the same connection;
//! - `rnx job run --follow -- true` end to end (process start included) against `rnx status`;
//! - core's RSS and open files once all N ended, against the same right after start;
//! - `ListJobs` time with N jobs against `ListJobs` on the fresh core;
//! - core's start with N jobs in its journal against its start with none, and that all N are
//!   listed after it.

use std::process::Stdio;
use std::time::{Duration, Instant};

use clap::Parser;
use joblet_benches::{Daemon, Table, core_config, persist_config, rss_mib, sibling, start};
use joblet_proto::joblet::job_service_client::JobServiceClient;
use joblet_proto::joblet::{EmptyRequest, GetJobStatusRequest, RunJobRequest};
use tonic::transport::Channel;

#[derive(Parser)]
struct Args {
    /// Jobs to run.
    #[arg(long, default_value_t = 10_000)]
    jobs: usize,
    /// Jobs run through the rnx binary for the end-to-end figure.
    #[arg(long, default_value_t = 50)]
    rnx_jobs: usize,
}

fn open_files(pid: u32) -> anyhow::Result<f64> {
    Ok(std::fs::read_dir(format!("/proc/{pid}/fd"))?.count() as f64)
}

fn percentile(samples: &mut [f64], p: f64) -> f64 {
    samples.sort_by(f64::total_cmp);
    let index = ((samples.len() as f64 - 1.0) * p).round() as usize;
    samples[index.min(samples.len() - 1)]
}

async fn client(daemon: &Daemon) -> anyhow::Result<JobServiceClient<Channel>> {
    Ok(JobServiceClient::connect(format!("http://{}", daemon.grpc))
        .await?
        .max_decoding_message_size(256 << 20))
}

/// Milliseconds of `call`, `times` times.
async fn timed<F, Fut>(times: usize, mut call: F) -> anyhow::Result<Vec<f64>>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let mut samples = Vec::with_capacity(times);
    for _ in 0..times {
        let started = Instant::now();
        call().await?;
        samples.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    Ok(samples)
}

async fn list_count(client: &mut JobServiceClient<Channel>) -> anyhow::Result<(usize, usize)> {
    let jobs = client.list_jobs(EmptyRequest {}).await?.into_inner().jobs;
    let ended = jobs
        .iter()
        .filter(|j| ["COMPLETED", "FAILED", "STOPPED", "CANCELED"].contains(&j.status.as_str()))
        .count();
    Ok((jobs.len(), ended))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let dir = tempfile::tempdir()?;
    let socket = dir.path().join("persist.sock");
    let persist_config = persist_config(dir.path(), &socket, "")?;
    let persist = start(&sibling("joblet-persist")?, &persist_config).await?;
    let core_config = core_config(
        dir.path(),
        "joblet-bench-catalogue",
        &format!(
            "persist:\n  socket: {}\n  query_address: {}\n  query_tls: null\n",
            socket.display(),
            persist.grpc
        ),
    )?;
    let core_binary = sibling("joblet-core")?;
    let started = Instant::now();
    let core = start(&core_binary, &core_config).await?;
    let empty_start = started.elapsed().as_secs_f64() * 1000.0;
    let mut jobs = client(&core).await?;
    let fresh_rss = rss_mib(core.pid())?;
    let fresh_files = open_files(core.pid())?;
    let mut fresh_list = timed(20, || {
        let mut jobs = jobs.clone();
        async move {
            jobs.list_jobs(EmptyRequest {}).await?;
            Ok(())
        }
    })
    .await?;

    // N jobs, one after another; the RunJob answer comes once the job is journaled.
    let request = RunJobRequest {
        command: "/bin/true".into(),
        ..Default::default()
    };
    let mut run_ms = Vec::with_capacity(args.jobs);
    let mut status_ms = Vec::with_capacity(args.jobs);
    let mut last = String::new();
    for _ in 0..args.jobs {
        let started = Instant::now();
        last = jobs.run_job(request.clone()).await?.into_inner().job_uuid;
        run_ms.push(started.elapsed().as_secs_f64() * 1000.0);
        // Each job ends before the next is submitted, so that RunJob is timed on a core that
        // is not busy starting earlier jobs.
        loop {
            let started = Instant::now();
            let status = jobs
                .get_job_status(GetJobStatusRequest { uuid: last.clone() })
                .await?
                .into_inner();
            status_ms.push(started.elapsed().as_secs_f64() * 1000.0);
            if status.end_time.is_empty() {
                tokio::time::sleep(Duration::from_millis(1)).await;
            } else {
                break;
            }
        }
    }
    let deadline = Instant::now() + Duration::from_secs(600);
    while list_count(&mut jobs).await?.1 < args.jobs {
        anyhow::ensure!(Instant::now() < deadline, "jobs did not end");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Let replication finish and the allocator purge what the jobs freed.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let rss = rss_mib(core.pid())?;
    let files = open_files(core.pid())?;
    let mut list_ms = timed(20, || {
        let mut jobs = jobs.clone();
        async move {
            jobs.list_jobs(EmptyRequest {}).await?;
            Ok(())
        }
    })
    .await?;

    // rnx end to end, against `rnx status` (connect, one RPC, exit).
    let rnx_config = dir.path().join("rnx-config.yml");
    std::fs::write(
        &rnx_config,
        format!(
            "nodes:\n  default:\n    address: \"{}\"\n    persistAddress: \"{}\"\n",
            core.grpc, persist.grpc
        ),
    )?;
    let rnx = sibling("rnx")?;
    let rnx_call = |words: &'static [&'static str]| {
        let rnx = rnx.clone();
        let config = rnx_config.clone();
        move || {
            let rnx = rnx.clone();
            let config = config.clone();
            async move {
                let output = tokio::process::Command::new(&rnx)
                    .arg("--config")
                    .arg(&config)
                    .args(words)
                    .stdin(Stdio::null())
                    .output()
                    .await?;
                anyhow::ensure!(
                    output.status.success(),
                    "rnx {words:?}: {}",
                    String::from_utf8_lossy(&output.stderr)
                );
                Ok(())
            }
        }
    };
    let mut rnx_run = timed(
        args.rnx_jobs,
        rnx_call(&["job", "run", "--follow", "--", "true"]),
    )
    .await?;
    let mut rnx_status = timed(args.rnx_jobs, rnx_call(&["status"])).await?;
    let total = args.jobs + args.rnx_jobs;

    core.terminate().await?;
    let started = Instant::now();
    let core = start(&core_binary, &core_config).await?;
    let full_start = started.elapsed().as_secs_f64() * 1000.0;
    let mut jobs = client(&core).await?;
    let (listed, ended) = list_count(&mut jobs).await?;
    let restored_rss = rss_mib(core.pid())?;
    anyhow::ensure!(
        listed == total && ended == total,
        "after the restart {listed} jobs listed ({ended} ended), {total} expected"
    );
    let _ = last;
    core.terminate().await?;
    persist.terminate().await?;

    let mut table = Table::default();
    let n = args.jobs;
    table.add(
        "RunJob p50 (GetJobStatus)",
        percentile(&mut run_ms, 0.5),
        Some(percentile(&mut status_ms, 0.5)),
        "ms",
        "",
    );
    table.add(
        "RunJob p99 (GetJobStatus)",
        percentile(&mut run_ms, 0.99),
        Some(percentile(&mut status_ms, 0.99)),
        "ms",
        "<= 5",
    );
    table.add(
        "rnx job run --follow true p50 (rnx status)",
        percentile(&mut rnx_run, 0.5),
        Some(percentile(&mut rnx_status, 0.5)),
        "ms",
        "",
    );
    table.add(
        format!("core RSS, {n} ended (fresh core)"),
        rss,
        Some(fresh_rss),
        "MiB",
        "<= 80",
    );
    table.add(
        format!("core RSS after a restart, {total} jobs (fresh)"),
        restored_rss,
        Some(fresh_rss),
        "MiB",
        "<= 80",
    );
    table.add(
        format!("core open files, {n} ended (fresh)"),
        files,
        Some(fresh_files),
        "files",
        "<= 64",
    );
    table.add(
        format!("ListJobs p50, {n} jobs (0 jobs)"),
        percentile(&mut list_ms, 0.5),
        Some(percentile(&mut fresh_list, 0.5)),
        "ms",
        "< 100",
    );
    table.add(
        format!("core start, {total} in journal (empty)"),
        full_start,
        Some(empty_start),
        "ms",
        "",
    );
    print!(
        "{}",
        table.render(&format!("joblet-core with {n} finished jobs"))
    );
    println!("all {total} jobs listed after the restart");
    Ok(())
}
