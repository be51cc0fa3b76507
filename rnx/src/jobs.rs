//! Job commands other than log and metrics.

use std::io::{IsTerminal, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use joblet_proto::joblet::{
    CancelJobRequest, DeleteAllJobsRequest, DeleteJobRequest, EmptyRequest, FileUpload,
    GetJobStatusRequest, GetJobStatusResponse, Job, RunJobRequest, StopJobRequest,
    StreamLogsRequest,
};
use joblet_proto::persist::{ListJobsRequest, PingRequest};
use serde_json::json;

use crate::cli::{ListArgs, RunArgs};
use crate::config::Node;
use crate::output::{flush, human_bytes, json_line, write};
use crate::{Failure, connect, timespec};

fn key_values(
    flag: &str,
    pairs: &[String],
) -> Result<std::collections::HashMap<String, String>, Failure> {
    pairs
        .iter()
        .map(|pair| {
            pair.split_once('=')
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .ok_or_else(|| Failure::Usage(format!("{flag} {pair:?}: expected K=V")))
        })
        .collect()
}

fn uploads(paths: &[std::path::PathBuf]) -> Result<Vec<FileUpload>, Failure> {
    let mut uploads = Vec::new();
    for path in paths {
        let name = path
            .file_name()
            .ok_or_else(|| Failure::Usage(format!("--upload {}: no file name", path.display())))?;
        collect_upload(path, Path::new(name), &mut uploads)?;
    }
    Ok(uploads)
}

fn collect_upload(
    source: &Path,
    target: &Path,
    uploads: &mut Vec<FileUpload>,
) -> Result<(), Failure> {
    let failed = |e: std::io::Error| Failure::Usage(format!("--upload {}: {e}", source.display()));
    let metadata = std::fs::metadata(source).map_err(failed)?;
    let mode = metadata.permissions().mode() & 0o7777;
    if metadata.is_dir() {
        uploads.push(FileUpload {
            path: target.display().to_string(),
            content: Default::default(),
            mode,
            is_directory: true,
        });
        let mut entries: Vec<_> = std::fs::read_dir(source)
            .map_err(failed)?
            .collect::<Result<_, _>>()
            .map_err(failed)?;
        entries.sort_by_key(|e| e.file_name());
        for entry in entries {
            collect_upload(&entry.path(), &target.join(entry.file_name()), uploads)?;
        }
    } else {
        uploads.push(FileUpload {
            path: target.display().to_string(),
            content: std::fs::read(source).map_err(failed)?.into(),
            mode,
            is_directory: false,
        });
    }
    Ok(())
}

/// On a terminal, a spinner while files are uploaded with the job (they travel in its one
/// request): how many, how large, for how long. Nothing otherwise.
fn upload_progress(uploads: &[FileUpload]) -> Option<indicatif::ProgressBar> {
    let bytes: usize = uploads.iter().map(|u| u.content.len()).sum();
    if uploads.is_empty() || !std::io::stderr().is_terminal() {
        return None;
    }
    let files = uploads.iter().filter(|u| !u.is_directory).count();
    let style =
        indicatif::ProgressStyle::with_template("rnx: {spinner} {msg} {prefix} ({elapsed})")
            .ok()?;
    let progress = indicatif::ProgressBar::new_spinner()
        .with_style(style)
        .with_message("uploading")
        .with_prefix(format!(
            "{files} file{} ({})",
            if files == 1 { "" } else { "s" },
            human_bytes(bytes as i64)
        ));
    progress.enable_steady_tick(std::time::Duration::from_millis(100));
    Some(progress)
}

pub async fn run(node: &Node, args: RunArgs, json: bool) -> Result<(), Failure> {
    let mut command = args.command.into_iter();
    let request = RunJobRequest {
        command: command.next().unwrap_or_default(),
        args: command.collect(),
        max_cpu: args.max_cpu.unwrap_or(0),
        max_memory: args.max_memory.unwrap_or(0),
        max_io_bps: args.max_iobps.unwrap_or(0),
        cpu_cores: args.cpu_cores.unwrap_or_default(),
        environment: key_values("--env", &args.env)?,
        secret_environment: key_values("--secret-env", &args.secret_env)?,
        uploads: uploads(&args.upload)?,
        work_dir: args.workdir.unwrap_or_default(),
        schedule: match args.schedule {
            Some(when) => timespec::parse_future(&when)
                .map_err(|e| Failure::Usage(format!("--schedule: {e}")))?,
            None => String::new(),
        },
        network: args.network.unwrap_or_default(),
        timeout: args.timeout.unwrap_or_default(),
        ..Default::default()
    };
    let mut core = connect::core(node).await?;
    let progress = upload_progress(&request.uploads);
    let response = core.run_job(request).await;
    if let Some(progress) = progress {
        match &response {
            Ok(_) => progress.finish_with_message("uploaded"),
            Err(_) => progress.abandon_with_message("upload failed"),
        }
    }
    let response = response?.into_inner();
    let mut out = std::io::stdout().lock();
    if !args.follow {
        if json {
            json_line(
                &mut out,
                &json!({"uuid": response.job_uuid, "status": response.status}),
            )?;
        } else {
            write(&mut out, format!("{}\n", response.job_uuid).as_bytes())?;
        }
        return Ok(());
    }
    eprintln!("job {}", response.job_uuid);
    let mut stream = core
        .stream_logs(StreamLogsRequest {
            job_uuid: response.job_uuid.clone(),
            after_sequence: 0,
            follow: true,
            ..Default::default()
        })
        .await?
        .into_inner();
    // Ctrl-C stops the job, as `docker run` does; a second one (or the first, with
    // --detach-on-interrupt) detaches and leaves it running.
    let mut interrupts = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        .map_err(|e| Failure::Usage(format!("cannot handle Ctrl-C: {e}")))?;
    let mut stopping = false;
    loop {
        tokio::select! {
            message = stream.message() => match message? {
                Some(record) => {
                    // The job's bytes as written: no newline after a partial record.
                    write(&mut out, &record.content)?;
                    if !record.partial {
                        write(&mut out, b"\n")?;
                    }
                }
                None => break,
            },
            _ = interrupts.recv() => {
                flush(&mut out)?;
                if args.detach_on_interrupt || stopping {
                    eprintln!(
                        "rnx: detached; job {} keeps running (rnx job log -f {} follows it again)",
                        response.job_uuid,
                        response.job_uuid.get(..8).unwrap_or(&response.job_uuid)
                    );
                    return Err(Failure::Exit(130));
                }
                stopping = true;
                eprintln!("rnx: stopping job {} (Ctrl-C again to detach and leave it running)", response.job_uuid);
                let mut stopper = core.clone();
                let uuid = response.job_uuid.clone();
                tokio::spawn(async move {
                    if let Err(status) = stopper.stop_job(StopJobRequest { uuid, ..Default::default() }).await {
                        eprintln!("rnx: stopping the job failed: {}", status.message());
                    }
                });
            }
        }
    }
    flush(&mut out)?;
    drop(out);
    let status = core
        .get_job_status(GetJobStatusRequest {
            uuid: response.job_uuid,
        })
        .await?
        .into_inner();
    if status.status != "COMPLETED" {
        eprintln!(
            "rnx: job {} {}{}",
            status.uuid,
            status.status,
            reason(&status)
        );
    }
    let code = match status.status.as_str() {
        "COMPLETED" => 0,
        _ => u8::try_from(status.exit_code)
            .ok()
            .filter(|c| *c != 0)
            .unwrap_or(1),
    };
    if code == 0 {
        Ok(())
    } else {
        Err(Failure::Exit(code))
    }
}

fn reason(status: &GetJobStatusResponse) -> String {
    if status.status_reason.is_empty() {
        String::new()
    } else {
        format!(": {}", status.status_reason)
    }
}

/// A job's status as JSON: what is not set (no exit code before the job ended, no end time
/// while it runs) is `null`, not `0` or `""`.
fn status_json(s: &GetJobStatusResponse) -> serde_json::Value {
    let ended = !s.end_time.is_empty();
    json!({
        "uuid": s.uuid, "status": s.status, "exit_code": ended.then_some(s.exit_code),
        "reason": text_or_null(&s.status_reason),
        "command": s.command, "args": s.args, "start_time": text_or_null(&s.start_time),
        "end_time": text_or_null(&s.end_time), "scheduled_time": text_or_null(&s.scheduled_time),
        "max_cpu": s.max_cpu, "max_memory": s.max_memory,
        "max_io_bps": s.max_io_bps, "cpu_cores": text_or_null(&s.cpu_cores),
        "network": text_or_null(&s.network),
        "work_dir": text_or_null(&s.work_dir), "environment": s.environment,
        "secret_environment": s.secret_environment, "node_id": text_or_null(&s.node_id),
        "timeout": text_or_null(&s.timeout),
        "history": s.history,
    })
}

/// A text field for JSON: `null` when empty.
fn text_or_null(text: &str) -> Option<&str> {
    (!text.is_empty()).then_some(text)
}

/// One row of `job list`: a job core holds, or one from persist's history.
struct Listed {
    job: Job,
    /// Unix ns of submission (0 when unknown).
    created: i64,
    history: bool,
}

/// The history of persist's catalogue as list rows (`None` when persist is not configured or
/// does not answer; a warning says so).
async fn history_jobs(node: &Node, args: &ListArgs, since: i64, until: i64) -> Option<Vec<Listed>> {
    let unreachable = |reason: String| {
        eprintln!("warning: joblet-persist: {reason}; listing joblet-core's jobs only");
        None
    };
    let mut persist = match connect::persist(node).await {
        Ok(Some(persist)) => persist,
        Ok(None) => return unreachable("no persist address in the client config".into()),
        Err(failure) => return unreachable(failure.to_string()),
    };
    let request = ListJobsRequest {
        since,
        until,
        statuses: args.status.iter().map(|s| s.to_uppercase()).collect(),
        limit: args.limit.unwrap_or(0),
        ..Default::default()
    };
    let summaries = match persist.list_jobs(request).await {
        Ok(response) => response.into_inner().jobs,
        Err(status) => return unreachable(status.message().to_owned()),
    };
    Some(
        summaries
            .into_iter()
            .map(|summary| {
                let created = summary.created();
                let job = summary
                    .record
                    .and_then(|record| record.job)
                    .unwrap_or_else(|| Job {
                        uuid: summary.job_id.clone(),
                        status: joblet_proto::UNKNOWN_STATUS.into(),
                        ..Default::default()
                    });
                Listed {
                    job,
                    created,
                    history: true,
                }
            })
            .collect(),
    )
}

pub async fn list(node: &Node, args: ListArgs, json: bool) -> Result<(), Failure> {
    let bound = |flag: &str, text: &Option<String>| -> Result<i64, Failure> {
        match text {
            None => Ok(0),
            Some(text) => timespec::parse_past(text)
                .map(|ns| ns.max(1))
                .map_err(|e| Failure::Usage(format!("{flag}: {e}"))),
        }
    };
    let (since, until) = (
        bound("--since", &args.since)?,
        bound("--until", &args.until)?,
    );
    let wanted = args.status.as_ref().map(|s| s.to_uppercase());
    if let Some(status) = &wanted
        && !JOB_STATES.contains(&status.as_str())
    {
        return Err(Failure::Usage(format!(
            "--status: {status:?} is not a job state (one of {})",
            JOB_STATES.join(", ")
        )));
    }
    let mut core = connect::core(node).await?;
    let in_window =
        |created: i64| (since == 0 || created >= since) && (until == 0 || created < until);
    let mut rows: Vec<Listed> = core
        .list_jobs(EmptyRequest {})
        .await?
        .into_inner()
        .jobs
        .into_iter()
        .map(|job| Listed {
            created: chrono::DateTime::parse_from_rfc3339(&job.created_time)
                .ok()
                .and_then(|t| t.timestamp_nanos_opt())
                .unwrap_or(0),
            job,
            history: false,
        })
        .filter(|row| wanted.as_ref().is_none_or(|w| &row.job.status == w))
        .filter(|row| in_window(row.created))
        .collect();
    if args.all
        && let Some(history) = history_jobs(node, &args, since, until).await
    {
        let held: std::collections::HashSet<String> =
            rows.iter().map(|row| row.job.uuid.clone()).collect();
        rows.extend(
            history
                .into_iter()
                .filter(|row| !held.contains(&row.job.uuid)),
        );
    }
    if args.all || args.limit.is_some() {
        rows.sort_by_key(|row| std::cmp::Reverse(row.created));
    }
    if let Some(limit) = args.limit {
        rows.truncate(limit as usize);
    }
    let mut out = std::io::stdout().lock();
    if json {
        for Listed { job, history, .. } in &rows {
            json_line(
                &mut out,
                &json!({
                    "uuid": job.uuid, "status": job.status, "exit_code": exit_code(job),
                    "command": job.command, "args": job.args,
                    "start_time": text_or_null(&job.start_time),
                    "end_time": text_or_null(&job.end_time),
                    "reason": text_or_null(&job.status_reason),
                    "created_time": text_or_null(&job.created_time), "history": history,
                    "scheduled_time": text_or_null(&job.scheduled_time),
                }),
            )?;
        }
        return Ok(());
    }
    let id_width = if args.no_trunc { 36 } else { SHORT_ID };
    let mut header = format!(
        "{:<id_width$}  {:<12}  {:>4}  {:<30}  ",
        "ID", "STATUS", "EXIT", "STARTED"
    );
    if args.all {
        header.push_str(&format!("{:<7}  ", "WHERE"));
    }
    header.push_str("COMMAND\n");
    write(&mut out, header.as_bytes())?;
    // On a terminal each job is one row, cut to its width; a pipe gets whole rows.
    let width = crate::output::terminal_width();
    for Listed { job, history, .. } in rows {
        let id = if args.no_trunc {
            job.uuid.as_str()
        } else {
            job.uuid.get(..SHORT_ID).unwrap_or(&job.uuid)
        };
        let exit = exit_code(&job)
            .map(|code| code.to_string())
            .unwrap_or_default();
        let started = if job.status == "SCHEDULED" {
            &job.scheduled_time
        } else {
            &job.start_time
        };
        let started = match timespec::for_table(started) {
            shown if shown.is_empty() => shown,
            shown => format!("{shown} ({})", timespec::ago(started)),
        };
        let mut line = format!(
            "{id:<id_width$}  {:<12}  {exit:>4}  {started:<30}  ",
            job.status
        );
        if args.all {
            line.push_str(&format!(
                "{:<7}  ",
                if history { "history" } else { "core" }
            ));
        }
        line.push_str(&command_line(&job.command, &job.args));
        let mut line = crate::output::fit(&line, width);
        line.push('\n');
        write(&mut out, line.as_bytes())?;
    }
    Ok(())
}

pub async fn status(node: &Node, id: &str, json: bool) -> Result<(), Failure> {
    let mut core = connect::core(node).await?;
    let s = core
        .get_job_status(GetJobStatusRequest { uuid: id.into() })
        .await?
        .into_inner();
    let mut out = std::io::stdout().lock();
    if json {
        return json_line(&mut out, &status_json(&s));
    }
    let mut text = String::new();
    let mut row = |k: &str, v: &str| {
        if !v.is_empty() {
            text.push_str(&format!("{k:<12} {v}\n"));
        }
    };
    row("ID", &s.uuid);
    row("Status", &format!("{}{}", s.status, reason(&s)));
    if s.history {
        row(
            "Source",
            "history (joblet-persist); joblet-core no longer holds this job",
        );
    }
    // A job that has not ended has no exit code (not 0).
    let ended = !s.end_time.is_empty();
    if ended {
        row("Exit code", &s.exit_code.to_string());
    }
    row("Command", &command_line(&s.command, &s.args));
    row("Scheduled", &timespec::for_status(&s.scheduled_time));
    row("Started", &timespec::for_status(&s.start_time));
    row("Ended", &timespec::for_status(&s.end_time));
    if let Ok(start) = chrono::DateTime::parse_from_rfc3339(&s.start_time) {
        let end = chrono::DateTime::parse_from_rfc3339(&s.end_time).ok();
        let until = end.unwrap_or_else(|| chrono::Utc::now().fixed_offset());
        let took = (until - start).to_std().unwrap_or_default();
        // To the millisecond, as the times above.
        let took = std::time::Duration::from_millis(took.as_millis() as u64);
        let took = humantime::format_duration(took).to_string();
        match end {
            Some(_) => row("Duration", &took),
            None => row("Running for", &took),
        }
    }
    row("Max CPU", &nonzero(s.max_cpu, "%"));
    row("Max memory", &nonzero(s.max_memory, " MiB"));
    row("Max IO", &nonzero(s.max_io_bps, " B/s"));
    row("CPU cores", &s.cpu_cores);
    row("Network", &s.network);
    row("Work dir", &s.work_dir);
    row("Timeout", &s.timeout);
    row("Node", &s.node_id);
    let mut environment: Vec<_> = s
        .environment
        .iter()
        .chain(s.secret_environment.iter())
        .collect();
    environment.sort();
    for (k, v) in environment {
        row("Env", &format!("{k}={v}"));
    }
    write(&mut out, text.as_bytes())
}

fn nonzero(value: i32, unit: &str) -> String {
    if value == 0 {
        String::new()
    } else {
        format!("{value}{unit}")
    }
}

pub async fn stop(node: &Node, id: &str, grace: Option<String>, json: bool) -> Result<(), Failure> {
    let mut core = connect::core(node).await?;
    if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        let wait = grace
            .as_deref()
            .map_or("the node's grace period".to_owned(), str::to_owned);
        eprintln!("rnx: stopping job {id}: SIGTERM now, SIGKILL if it still runs after {wait}…");
    }
    let r = core
        .stop_job(StopJobRequest {
            uuid: id.into(),
            grace_period: grace.unwrap_or_default(),
        })
        .await?
        .into_inner();
    let mut out = std::io::stdout().lock();
    if json {
        return json_line(
            &mut out,
            &json!({"uuid": r.uuid, "status": r.status, "exit_code": r.exit_code, "end_time": r.end_time}),
        );
    }
    write(
        &mut out,
        format!("{} {} (exit code {})\n", r.uuid, r.status, r.exit_code).as_bytes(),
    )
}

pub async fn cancel(node: &Node, id: &str, json: bool) -> Result<(), Failure> {
    let mut core = connect::core(node).await?;
    let r = core
        .cancel_job(CancelJobRequest { uuid: id.into() })
        .await?
        .into_inner();
    let mut out = std::io::stdout().lock();
    if json {
        return json_line(&mut out, &json!({"uuid": r.uuid, "status": r.status}));
    }
    write(&mut out, format!("{} {}\n", r.uuid, r.status).as_bytes())
}

pub async fn delete(node: &Node, id: &str, json: bool) -> Result<(), Failure> {
    let mut core = connect::core(node).await?;
    let r = core
        .delete_job(DeleteJobRequest { uuid: id.into() })
        .await?
        .into_inner();
    let mut out = std::io::stdout().lock();
    if json {
        return json_line(&mut out, &json!({"uuid": r.uuid, "deleted": r.success}));
    }
    write(&mut out, format!("{} deleted\n", r.uuid).as_bytes())
}

pub async fn delete_all(node: &Node, json: bool) -> Result<(), Failure> {
    let mut core = connect::core(node).await?;
    let r = core
        .delete_all_jobs(DeleteAllJobsRequest {})
        .await?
        .into_inner();
    let mut out = std::io::stdout().lock();
    if json {
        return json_line(
            &mut out,
            &json!({"deleted": r.deleted_count, "skipped": r.skipped_count}),
        );
    }
    write(&mut out, format!("{}\n", r.message).as_bytes())
}

/// Every state a listed job can be in (UNKNOWN: a job persist holds data of but no record).
const JOB_STATES: [&str; 8] = [
    "SCHEDULED",
    "INITIALIZING",
    "RUNNING",
    "COMPLETED",
    "FAILED",
    "STOPPED",
    "CANCELED",
    "UNKNOWN",
];

/// Characters of a job id the table shows (`--no-trunc` for all 36).
pub(crate) const SHORT_ID: usize = 8;

/// A job's exit code once it has one (it has ended).
fn exit_code(job: &joblet_proto::joblet::Job) -> Option<i32> {
    ["COMPLETED", "FAILED", "STOPPED", "CANCELED"]
        .contains(&job.status.as_str())
        .then_some(job.exit_code)
}

/// A job's command as a shell would need it typed, on one line (control characters escaped).
pub(crate) fn command_line(command: &str, args: &[String]) -> String {
    let words = std::iter::once(command).chain(args.iter().map(String::as_str));
    let quoted =
        shlex::try_join(words.clone()).unwrap_or_else(|_| words.collect::<Vec<_>>().join(" "));
    let mut line = String::with_capacity(quoted.len());
    for c in quoted.chars() {
        if c.is_control() {
            line.extend(c.escape_default());
        } else {
            line.push(c);
        }
    }
    line
}

pub async fn node_status(node: &Node, json: bool) -> Result<(), Failure> {
    let core = match connect::monitoring(node).await {
        Ok(mut client) => client
            .get_system_status(EmptyRequest {})
            .await
            .map(|r| r.into_inner())
            .map_err(|e| Failure::from(e).to_string()),
        Err(failure) => Err(failure.to_string()),
    };
    let persist = match connect::persist(node).await {
        Ok(Some(mut client)) => Some(
            client
                .ping(PingRequest {})
                .await
                .map(|r| r.into_inner())
                .map_err(|e| Failure::from(e).to_string()),
        ),
        Ok(None) => None,
        Err(failure) => Some(Err(failure.to_string())),
    };
    let mut out = std::io::stdout().lock();
    if json {
        json_line(
            &mut out,
            &json!({
                "node_id": node.node_id,
                "core": match &core {
                    Ok(s) => json!({"available": s.available, "host": s.host.as_ref().map(|h| h.hostname.clone()),
                        "version": s.server_version.as_ref().map(|v| v.version.clone()),
                        "cpu_cores": s.cpu.as_ref().map(|c| c.cores), "cpu_percent": s.cpu.as_ref().map(|c| c.usage_percent),
                        "memory_percent": s.memory.as_ref().map(|m| m.usage_percent),
                        "persist_connected": s.persist_connected}),
                    Err(e) => json!({"available": false, "error": e}),
                },
                "persist": match &persist {
                    None => json!(null),
                    Some(Ok(p)) => json!({"available": true, "version": p.version, "uptime_seconds": p.uptime_seconds}),
                    Some(Err(e)) => json!({"available": false, "error": e}),
                },
            }),
        )?;
    } else {
        let mut text = String::new();
        match &core {
            Ok(s) => {
                let host = s.host.clone().unwrap_or_default();
                let cpu = s.cpu.clone().unwrap_or_default();
                let memory = s.memory.unwrap_or_default();
                text.push_str(&format!(
                    "joblet-core     {}  up, version {}, host {} ({}), {} cores at {:.0}%, memory {:.0}% of {}, replication {}\n",
                    node.address,
                    s.server_version.as_ref().map(|v| v.version.as_str()).unwrap_or("?"),
                    host.hostname,
                    host.kernel_version,
                    cpu.cores,
                    cpu.usage_percent,
                    memory.usage_percent,
                    crate::output::human_bytes(memory.total_bytes),
                    if s.persist_connected { "connected" } else { "not connected" },
                ));
            }
            Err(e) => text.push_str(&format!("joblet-core     {}  DOWN: {e}\n", node.address)),
        }
        match (&persist, &node.persist_address) {
            (Some(Ok(p)), Some(address)) => text.push_str(&format!(
                "joblet-persist  {address}  up, version {}, uptime {}s\n",
                p.version, p.uptime_seconds
            )),
            (Some(Err(e)), Some(address)) => {
                text.push_str(&format!("joblet-persist  {address}  DOWN: {e}\n"))
            }
            _ => text.push_str("joblet-persist  not configured (no persistAddress)\n"),
        }
        write(&mut out, text.as_bytes())?;
    }
    out.flush().ok();
    // Each daemon's state is printed above, once: exit 69 (unavailable) if either is down.
    match (&core, &persist) {
        (Ok(_), None | Some(Ok(_))) => Ok(()),
        _ => Err(Failure::Exit(69)),
    }
}
