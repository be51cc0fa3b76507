//! Core benchmark (needs root; uses the release binaries beside this one):
//! 1. a job writing N 150-byte lines under joblet-core with joblet-persist connected, against
//!    the same command writing to a file directly, in the same run: wall time, its ratio, and
//!    joblet-core's CPU seconds per million lines. Rounds alternate baseline and job, each
//!    after a `sync` and after persist has stored everything of the previous round, so that
//!    neither side runs against the other's leftovers; medians are reported, and how long
//!    persist took after the job ended to hold every line;
//! 2. live latency: a job writes lines carrying their write time (CLOCK_REALTIME ns); a
//!    StreamLogs subscriber notes when each arrives.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use joblet_benches::{Table, core_config, persist_config, processes, sibling, start};
use joblet_proto::joblet::job_service_client::JobServiceClient;
use joblet_proto::joblet::{GetJobStatusRequest, RunJobRequest, StreamLogsRequest};
use joblet_proto::persist::ListJobsRequest;
use joblet_proto::persist::persist_service_client::PersistServiceClient;
use tonic::transport::Channel;

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 10_000_000)]
    lines: u64,
    #[arg(long, default_value_t = 150)]
    line_bytes: usize,
    /// Lines of the latency job (one every 2 ms).
    #[arg(long, default_value_t = 2000)]
    latency_lines: u64,
    /// Rounds of baseline and job; medians are reported.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// joblet-persist's storage.durability (sync, wal, flushed); its default if not given.
    #[arg(long)]
    durability: Option<String>,
}

/// Bytes a process caused to be written to storage so far (`/proc/<pid>/io` write_bytes: what
/// reaches the disk, not what goes through pipes or sockets).
fn write_bytes(pid: u32) -> anyhow::Result<u64> {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io"))?;
    io.lines()
        .find_map(|line| line.strip_prefix("write_bytes: "))
        .context("no write_bytes in /proc/<pid>/io")?
        .trim()
        .parse()
        .context("write_bytes")
}

/// user+system CPU seconds of a process so far.
fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let after_name = &stat[stat.rfind(')').context("stat format")? + 2..];
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let ticks: f64 = fields[11].parse::<f64>()? + fields[12].parse::<f64>()?;
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)?.unwrap_or(100) as f64;
    Ok(ticks / hz)
}

/// The CPU seconds and bytes written to storage of job `id`'s supervisor (`joblet-core
/// supervise <id>`), sampled until it exits (its last sample); 0 for a core without supervisors.
fn watch_supervisor(id: &str) -> tokio::task::JoinHandle<(f64, u64)> {
    let marker = format!("supervise {id}");
    tokio::spawn(async move {
        let found = async {
            loop {
                let pid = processes("joblet-supervis", &marker).first().copied();
                if pid.is_some() {
                    return pid;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        };
        let Ok(Some(pid)) = tokio::time::timeout(Duration::from_secs(2), found).await else {
            return (0.0, 0);
        };
        let mut last = (0.0, 0);
        while let (Ok(seconds), Ok(written)) = (cpu_seconds(pid), write_bytes(pid)) {
            last = (seconds, written);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        last
    })
}

fn generator(args: &Args) -> String {
    // yes repeats one 150-byte line (149 characters and the newline) as fast as a pipe takes it.
    let line: String = "x".repeat(args.line_bytes - 1);
    format!("yes {line} | head -n {}", args.lines)
}

async fn wait_ended(client: &mut JobServiceClient<Channel>, id: &str) -> anyhow::Result<String> {
    loop {
        let status = client
            .get_job_status(GetJobStatusRequest {
                uuid: id.to_owned(),
            })
            .await?
            .into_inner();
        if ["COMPLETED", "FAILED", "STOPPED"].contains(&status.status.as_str()) {
            return Ok(status.status);
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Wall seconds of the generator writing to `target` directly (a file is removed after).
async fn run_direct(args: &Args, target: &Path) -> anyhow::Result<f64> {
    let started = Instant::now();
    let status = tokio::process::Command::new("/bin/sh")
        .arg("-c")
        .arg(format!("{} > {}", generator(args), target.display()))
        .status()
        .await?;
    anyhow::ensure!(status.success(), "baseline command failed");
    let wall = started.elapsed().as_secs_f64();
    if target.is_file() {
        std::fs::remove_file(target)?;
    }
    Ok(wall)
}

/// Waits until joblet-persist has stored all `lines` of job `id`.
async fn wait_persisted(
    client: &mut PersistServiceClient<Channel>,
    id: &str,
    lines: u64,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let stored = client
            .list_jobs(ListJobsRequest {
                job_id_prefix: id.to_owned(),
                ..Default::default()
            })
            .await?
            .into_inner()
            .jobs
            .first()
            .map_or(0, |job| job.log_lines);
        if stored >= lines {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "persist holds {stored} of {lines} lines after 10 minutes"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(0.0)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let dir = tempfile::tempdir()?;
    let socket = dir.path().join("persist.sock");

    let durability = args
        .durability
        .as_ref()
        .map_or(String::new(), |d| format!("storage:\n  durability: {d}\n"));
    let persist_config = persist_config(
        dir.path(),
        &socket,
        &format!("retention:\n  logs: 0\n  metrics: 0\n{durability}"),
    )?;
    let core_config = core_config(
        dir.path(),
        "joblet-bench",
        &format!(
            "persist:\n  socket: {}\n  query_address: null\n",
            socket.display()
        ),
    )?;
    let persist = start(&sibling("joblet-persist")?, &persist_config).await?;
    let core = start(&sibling("joblet-core")?, &core_config).await?;
    let core_pid = core.child.id().context("core pid")?;
    let persist_pid = persist.child.id().context("persist pid")?;
    let mut client = JobServiceClient::connect(format!("http://{}", core.grpc)).await?;
    tokio::time::sleep(Duration::from_millis(500)).await; // replication connected

    let mut persist_client =
        PersistServiceClient::connect(format!("http://{}", persist.grpc)).await?;
    let (mut baseline_walls, mut null_walls, mut core_walls, mut core_cpus, mut catch_ups) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut supervisor_cpus = Vec::new();
    // Bytes written to storage per line: the supervisor (spool), core, persist.
    let (mut spool_bytes, mut core_bytes, mut persist_bytes) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..args.rounds {
        nix::unistd::sync();
        baseline_walls.push(run_direct(&args, &dir.path().join("direct.out")).await?);
        null_walls.push(run_direct(&args, Path::new("/dev/null")).await?);

        nix::unistd::sync();
        let cpu_before = cpu_seconds(core_pid)?;
        let written_before = (write_bytes(core_pid)?, write_bytes(persist_pid)?);
        let started = Instant::now();
        let id = client
            .run_job(RunJobRequest {
                command: "/bin/sh".into(),
                args: vec!["-c".into(), generator(&args)],
                ..Default::default()
            })
            .await?
            .into_inner()
            .job_uuid;
        let supervisor = watch_supervisor(&id);
        let ended = wait_ended(&mut client, &id).await?;
        anyhow::ensure!(ended == "COMPLETED", "bench job ended {ended}");
        core_walls.push(started.elapsed().as_secs_f64());
        core_cpus.push(cpu_seconds(core_pid)? - cpu_before);
        let (supervisor_cpu, supervisor_written) = supervisor.await?;
        supervisor_cpus.push(supervisor_cpu);
        let job_end = Instant::now();
        wait_persisted(&mut persist_client, &id, args.lines).await?;
        catch_ups.push(job_end.elapsed().as_secs_f64());
        // Persist's flushes and compactions of this round's lines, as far as they happen soon.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let per_line = |bytes: u64| bytes as f64 / args.lines as f64;
        spool_bytes.push(per_line(supervisor_written));
        // A reaped child's I/O is added to its parent's: core's figure less its supervisor's.
        let core_written = write_bytes(core_pid)? - written_before.0;
        core_bytes.push(per_line(core_written.saturating_sub(supervisor_written)));
        persist_bytes.push(per_line(write_bytes(persist_pid)? - written_before.1));
    }
    let core_wall = median(&mut core_walls);
    let baseline_wall = median(&mut baseline_walls);
    let null_wall = median(&mut null_walls);
    let core_cpu = median(&mut core_cpus);
    let supervisor_cpu = median(&mut supervisor_cpus);

    // Live latency.
    let script = format!(
        "i=0; while [ $i -lt {} ]; do date +%s%N; sleep 0.002; i=$((i+1)); done",
        args.latency_lines
    );
    let id = client
        .run_job(RunJobRequest {
            command: "/bin/sh".into(),
            args: vec!["-c".into(), script],
            ..Default::default()
        })
        .await?
        .into_inner()
        .job_uuid;
    let mut stream = client
        .stream_logs(StreamLogsRequest {
            job_uuid: id,
            follow: true,
            ..Default::default()
        })
        .await?
        .into_inner();
    let mut latencies = Vec::new();
    while let Some(record) = stream.message().await? {
        let received = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_nanos() as i64;
        if let Ok(written) = std::str::from_utf8(&record.content)
            .unwrap_or("")
            .trim()
            .parse::<i64>()
        {
            latencies.push(Duration::from_nanos((received - written).max(0) as u64));
        }
    }
    latencies.sort();
    let percentile = |p: f64| {
        latencies
            .get(((latencies.len() as f64 - 1.0) * p).round() as usize)
            .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
    };

    let mut table = Table::default();
    table.add(
        "job wall time under core (persist on)",
        core_wall,
        Some(baseline_wall),
        "s",
        "ratio <= 1.10",
    );
    table.add(
        "the same, against writing to /dev/null",
        core_wall,
        Some(null_wall),
        "s",
        "(context: the job alone)",
    );
    table.add(
        "persist holds every line, after job end",
        median(&mut catch_ups),
        None,
        "s",
        "",
    );
    table.add(
        "core CPU seconds per million lines",
        core_cpu / (args.lines as f64 / 1e6),
        None,
        "s",
        "",
    );
    table.add(
        "job's supervisor CPU s per million lines",
        supervisor_cpu / (args.lines as f64 / 1e6),
        None,
        "s",
        "(the pump; 0 before supervisors)",
    );
    table.add(
        "bytes written to disk per line: spool",
        median(&mut spool_bytes),
        Some(args.line_bytes as f64),
        "B",
        "(the job's supervisor; baseline: the line)",
    );
    table.add(
        "bytes written to disk per line: core",
        median(&mut core_bytes),
        None,
        "B",
        "",
    );
    table.add(
        "bytes written to disk per line: persist",
        median(&mut persist_bytes),
        Some(args.line_bytes as f64),
        "B",
        "(WAL, flushes, compactions until 3 s after)",
    );
    table.add(
        "live latency write→subscriber p50",
        percentile(0.5),
        None,
        "ms",
        "",
    );
    table.add(
        "live latency write→subscriber p99",
        percentile(0.99),
        None,
        "ms",
        "<= 5 ms",
    );
    println!(
        "{}",
        table.render(&format!(
            "core: {} lines of {} bytes; baseline = the same command writing to a file; \
             medians of {} rounds; persist durability: {}",
            args.lines,
            args.line_bytes,
            args.rounds,
            args.durability.as_deref().unwrap_or("default")
        ))
    );
    drop(core);
    drop(persist);
    Ok(())
}
