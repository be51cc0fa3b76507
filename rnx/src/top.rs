//! `rnx top`: the node's running jobs with their latest CPU, memory, IO rates and pids,
//! refreshed every interval — redrawn in place on a terminal, one block per refresh otherwise
//! (or one JSON line per job), like `docker stats`.
//!
//! Each running job's samples are followed from core (`StreamMetrics`); the job list is read
//! again at every refresh, so jobs that start appear and jobs that end leave.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::IsTerminal;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use joblet_proto::joblet::{EmptyRequest, Job, JobMetricsEvent, StreamMetricsRequest};
use serde_json::json;

use crate::cli::{TopArgs, TopSort};
use crate::config::Node;
use crate::jobs::{SHORT_ID, command_line};
use crate::output::{flush, human_bytes, json_line, write};
use crate::{Failure, connect};

/// The latest two samples of a job (two: IO counters are totals, rates need a difference).
#[derive(Default, Clone)]
struct Samples {
    latest: Option<JobMetricsEvent>,
    previous: Option<JobMetricsEvent>,
}

type Latest = Arc<Mutex<HashMap<String, Samples>>>;

/// One job's line.
struct Row {
    id: String,
    cpu: f64,
    memory: i64,
    limit: i64,
    read_rate: Option<f64>,
    write_rate: Option<f64>,
    pids: i64,
    command: String,
    sampled: bool,
}

pub async fn show(node: &Node, args: TopArgs, json: bool) -> Result<(), Failure> {
    let interval = humantime::parse_duration(&args.interval)
        .ok()
        .filter(|i| *i >= Duration::from_millis(100))
        .ok_or_else(|| {
            Failure::Usage(format!(
                "--interval: {:?} is not a duration of at least 100ms (2s, 500ms)",
                args.interval
            ))
        })?;
    let mut client = connect::core(node).await?;
    let latest: Latest = Arc::default();
    let mut followed: HashMap<String, tokio::task::JoinHandle<()>> = HashMap::new();
    let terminal = std::io::stdout().is_terminal() && !json;
    let mut out = std::io::stdout().lock();
    let started = Instant::now();
    loop {
        let running: Vec<Job> = client
            .list_jobs(EmptyRequest {})
            .await?
            .into_inner()
            .jobs
            .into_iter()
            .filter(|job| job.status == "RUNNING")
            .collect();
        // Follow new jobs; forget ended ones.
        for job in &running {
            followed
                .entry(job.uuid.clone())
                .or_insert_with(|| follow(client.clone(), job.uuid.clone(), latest.clone()));
        }
        followed.retain(|id, task| {
            let keep = running.iter().any(|job| &job.uuid == id);
            if !keep {
                task.abort();
                lock(&latest).remove(id);
            }
            keep
        });
        let rows = rows(&running, &lock(&latest), args.sort);
        // --once waits (up to two intervals) until every job has a sample to show.
        let waiting =
            args.once && rows.iter().any(|row| !row.sampled) && started.elapsed() < interval * 2;
        if !waiting {
            if json {
                for row in &rows {
                    json_line(&mut out, &row_json(row))?;
                }
            } else {
                let mut text = String::new();
                if terminal {
                    // Home and clear: the view is redrawn in place.
                    text.push_str("\x1b[H\x1b[2J");
                }
                let _ = writeln!(
                    text,
                    "{} running job{} on {}, every {} (Ctrl-C to quit)",
                    rows.len(),
                    if rows.len() == 1 { "" } else { "s" },
                    node.address,
                    humantime::format_duration(interval)
                );
                // On a terminal each job is one row, cut to its width.
                let width = crate::output::terminal_width();
                for row in render(&rows).lines() {
                    text.push_str(&crate::output::fit(row, width));
                    text.push('\n');
                }
                if !terminal {
                    text.push('\n');
                }
                write(&mut out, text.as_bytes())?;
            }
            flush(&mut out)?;
            if args.once {
                break;
            }
        }
        tokio::select! {
            () = tokio::time::sleep(if waiting { Duration::from_millis(100) } else { interval }) => {}
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    for task in followed.values() {
        task.abort();
    }
    Ok(())
}

fn lock(latest: &Latest) -> std::sync::MutexGuard<'_, HashMap<String, Samples>> {
    latest
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Follows `id`'s samples, keeping the latest two in `latest`, until the job ends.
fn follow(
    mut client: joblet_proto::joblet::job_service_client::JobServiceClient<
        tonic::transport::Channel,
    >,
    id: String,
    latest: Latest,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let request = StreamMetricsRequest {
            job_uuid: id.clone(),
            after_sequence: 0,
            follow: true,
        };
        let Ok(response) = client.stream_metrics(request).await else {
            return;
        };
        let mut stream = response.into_inner();
        while let Ok(Some(record)) = stream.message().await {
            if let Some(sample) = record.sample {
                let mut latest = lock(&latest);
                let samples = latest.entry(id.clone()).or_default();
                samples.previous = samples.latest.replace(sample);
            }
        }
    })
}

fn rows(running: &[Job], latest: &HashMap<String, Samples>, sort: TopSort) -> Vec<Row> {
    let mut rows: Vec<Row> = running
        .iter()
        .map(|job| {
            let samples = latest.get(&job.uuid).cloned().unwrap_or_default();
            let rate = |field: fn(&JobMetricsEvent) -> i64| {
                let (now, before) = (samples.latest.as_ref()?, samples.previous.as_ref()?);
                let seconds = (now.timestamp - before.timestamp) as f64 / 1e9;
                (seconds > 0.0).then(|| (field(now) - field(before)).max(0) as f64 / seconds)
            };
            let now = samples.latest.clone().unwrap_or_default();
            Row {
                id: job.uuid.clone(),
                cpu: now.cpu_percent,
                memory: now.memory_bytes,
                limit: now.memory_limit,
                read_rate: rate(|s| s.disk_read_bytes),
                write_rate: rate(|s| s.disk_write_bytes),
                pids: now.pids,
                command: command_line(&job.command, &job.args),
                sampled: samples.latest.is_some(),
            }
        })
        .collect();
    let io = |row: &Row| row.read_rate.unwrap_or(0.0) + row.write_rate.unwrap_or(0.0);
    rows.sort_by(|a, b| match sort {
        TopSort::Cpu => b.cpu.total_cmp(&a.cpu),
        TopSort::Memory => b.memory.cmp(&a.memory),
        TopSort::Io => io(b).total_cmp(&io(a)),
        TopSort::Pids => b.pids.cmp(&a.pids),
        TopSort::Id => a.id.cmp(&b.id),
    });
    rows
}

fn render(rows: &[Row]) -> String {
    let mut text = format!(
        "{:<8}  {:>6}  {:>10}  {:>10}  {:>11}  {:>11}  {:>5}  COMMAND\n",
        "ID", "CPU%", "MEMORY", "LIMIT", "READ/s", "WRITE/s", "PIDS"
    );
    for row in rows {
        let rate = |rate: Option<f64>| rate.map_or("-".to_owned(), |r| human_bytes(r as i64));
        let shown = |value: String| if row.sampled { value } else { "-".to_owned() };
        let _ = writeln!(
            text,
            "{:<8}  {:>6}  {:>10}  {:>10}  {:>11}  {:>11}  {:>5}  {}",
            row.id.get(..SHORT_ID).unwrap_or(&row.id),
            shown(format!("{:.1}", row.cpu)),
            shown(human_bytes(row.memory)),
            if row.limit > 0 {
                human_bytes(row.limit)
            } else {
                "-".to_owned()
            },
            rate(row.read_rate),
            rate(row.write_rate),
            shown(row.pids.to_string()),
            row.command
        );
    }
    text
}

fn row_json(row: &Row) -> serde_json::Value {
    let sampled = |value: serde_json::Value| {
        if row.sampled {
            value
        } else {
            serde_json::Value::Null
        }
    };
    json!({
        "uuid": row.id,
        "cpu_percent": sampled(json!(row.cpu)),
        "memory_bytes": sampled(json!(row.memory)),
        "memory_limit": (row.limit > 0).then_some(row.limit),
        "io_read_bytes_per_second": row.read_rate,
        "io_write_bytes_per_second": row.write_rate,
        "pids": sampled(json!(row.pids)),
        "command": row.command,
    })
}
